/**
 * `inspect`: what an image is made of (the top-level manifest or index,
 * the platforms it offers, the chosen platform's manifest and config) and
 * `listTags`: the tags of its repository or local source. Nothing is
 * stored in the cache.
 *
 * @module
 */
import type { Digest } from "./digest.ts";
import { ImageNotFoundError, ManifestError, PlatformNotFoundError } from "./errors.ts";
import type { FetchedManifest } from "./registry/client.ts";
import { type Descriptor, type ImageIndex, type ImageManifest, isImageIndex } from "./manifest.ts";
import { formatPlatform, hostPlatform, type ImageReference, parsePlatform, type Platform } from "./reference.ts";
import { explainMissingTag, type ImageSource, isLocalSource, openImageSource } from "./image-source.ts";
import { clientFor, type PullOptions } from "./stage.ts";

/** Options of {@link inspect}. */
export interface InspectOptions extends PullOptions {
  /** Also list the tags of the repository or local source. Default false. */
  tags?: boolean;
}

/** A platform an index offers, with the entry that serves it. */
export interface OfferedPlatform {
  /** As `os/arch[/variant]`. */
  platform: string;
  digest: Digest;
  mediaType: string;
  size: number;
}

/** The outcome of {@link inspect}. */
export interface InspectResult {
  /** The image as a full reference or local source. */
  source: string;
  /** The registry reference, absent for local sources. */
  reference?: ImageReference;
  /** Digest and media type of the document the reference names (an index or a manifest). */
  digest: Digest;
  mediaType: string;
  /** The index, when the reference names one. */
  index?: ImageIndex;
  /** Platforms of the index's image entries; for a single manifest, the config's platform. */
  platforms: OfferedPlatform[];
  /** The platform whose manifest was read. Absent when no platform was requested and the host's is not offered. */
  platform?: Platform;
  /** The chosen platform's image manifest, with its digest. */
  manifest?: { digest: Digest; mediaType: string; size: number; document: ImageManifest };
  /** The image config as parsed JSON, with its descriptor. */
  config?: { descriptor: Descriptor; document: Record<string, unknown> };
  /** The tags, when `options.tags` is set. */
  tags?: string[];
}

/**
 * Read an image's manifest (or index), the platform's manifest and its
 * config. `image` is a registry reference, `oci:DIR[:TAG]` or
 * `docker-archive:FILE[:NAME]`.
 *
 * Without `options.platform`, the host's platform is read when the index
 * offers it; when it does not, the result has the index and its platforms
 * but no manifest or config. An explicit platform that is not offered is an
 * error.
 *
 * @example
 * ```ts
 * const info = await inspect("127.0.0.1:5000/base:1.0");
 * console.log(info.platforms.map((entry) => entry.platform), info.config?.document.created);
 * ```
 *
 * @throws {PlatformNotFoundError} when `options.platform` is not offered.
 * @throws {ImageNotFoundError} when the registry has no such tag, listing the tags it has.
 */
export async function inspect(image: string | ImageReference, options: InspectOptions = {}): Promise<InspectResult> {
  const source = sourceFor(image, options);
  try {
    const top = await topOrTags(source);
    const result: InspectResult = {
      source: source.name,
      reference: source.reference,
      digest: top.digest,
      mediaType: top.mediaType,
      platforms: [],
    };
    if (isImageIndex(top.manifest)) {
      result.index = top.manifest;
      result.platforms = offeredPlatforms(top.manifest);
    }

    const requested = options.platform === undefined
      ? undefined
      : typeof options.platform === "string"
      ? parsePlatform(options.platform)
      : options.platform;
    const platform = requested ?? hostPlatform();
    let resolved;
    try {
      resolved = await source.resolve(platform);
    } catch (error) {
      if (!(error instanceof PlatformNotFoundError) || requested !== undefined) throw error;
    }
    if (resolved) {
      result.platform = platform;
      result.manifest = {
        digest: resolved.digest,
        mediaType: resolved.mediaType,
        size: resolved.bytes.byteLength,
        document: resolved.manifest,
      };
      const configBytes = await source.readBlob(resolved.manifest.config);
      const document = parseConfig(configBytes, resolved.manifest.config, source.name);
      result.config = { descriptor: resolved.manifest.config, document };
      if (!result.index) {
        const own = configPlatform(document);
        if (own) result.platforms = [{ platform: own, digest: resolved.digest, mediaType: resolved.mediaType, size: resolved.bytes.byteLength }];
      }
    }
    if (options.tags) result.tags = await source.listTags();
    return result;
  } finally {
    source.close();
  }
}

/**
 * List the tags of an image's repository (registry references), the ref
 * names of an OCI layout, or the `RepoTags` of a docker archive.
 *
 * @example
 * ```ts
 * const tags = await listTags("127.0.0.1:5000/base");
 * ```
 */
export async function listTags(image: string | ImageReference, options: PullOptions = {}): Promise<string[]> {
  const source = sourceFor(image, options);
  try {
    return await source.listTags();
  } finally {
    source.close();
  }
}

function sourceFor(image: string | ImageReference, options: PullOptions): ImageSource {
  if (isLocalSource(image)) return openImageSource(image, { hasher: options.hasher });
  return openImageSource(image, { client: clientFor(options) });
}

/**
 * Read the top-level document. When a registry has no such tag, fail with
 * an {@link ImageNotFoundError} that lists the tags the repository has.
 */
async function topOrTags(source: ImageSource): Promise<FetchedManifest> {
  try {
    return await source.top();
  } catch (error) {
    return await explainMissingTag(source, error);
  }
}

function offeredPlatforms(index: ImageIndex): OfferedPlatform[] {
  return index.manifests
    .filter((entry) => entry.platform && !(entry.platform.os === "unknown" && entry.platform.architecture === "unknown"))
    .map((entry) => ({ platform: formatPlatform(entry.platform!), digest: entry.digest, mediaType: entry.mediaType, size: entry.size }));
}

function parseConfig(bytes: Uint8Array, descriptor: Descriptor, source: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder().decode(bytes));
  } catch (cause) {
    throw new ManifestError(`config ${descriptor.digest} of "${source}" is not valid JSON: the image is corrupt; re-push it`, source, { cause });
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ManifestError(`config ${descriptor.digest} of "${source}" is not a JSON object: the image is corrupt; re-push it`, source);
  }
  return value as Record<string, unknown>;
}

function configPlatform(config: Record<string, unknown>): string | undefined {
  const { os, architecture, variant } = config;
  if (typeof os !== "string" || typeof architecture !== "string") return undefined;
  return formatPlatform({ os, architecture, ...(typeof variant === "string" && variant ? { variant } : {}) });
}
