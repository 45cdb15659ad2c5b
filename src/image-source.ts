/**
 * Image sources: where `track`, `fetch`, `stage`, `export` and `inspect`
 * read an image from. Three kinds exist, chosen by the reference's prefix:
 *
 * - a registry reference, such as `alpine:3.20` (no prefix);
 * - `oci:DIR[:TAG]`, an OCI image layout directory as skopeo, umoci or
 *   ocistage's own cache write it; TAG matches the
 *   `org.opencontainers.image.ref.name` annotation in `index.json`;
 * - `docker-archive:FILE[:NAME]`, an archive written by `docker save`, in the
 *   legacy layout or the OCI layout that Docker 25 and later writes; NAME
 *   matches one of the archive's `RepoTags`.
 *
 * Every source verifies what it returns: manifests against the digest and
 * size that point to them, blobs while they stream.
 *
 * @example
 * ```ts
 * const source = openImageSource("oci:./layout:1.0");
 * try {
 *   const { manifest } = await source.resolve({ os: "linux", architecture: "amd64" });
 *   const config = await source.readBlob(manifest.config);
 * } finally {
 *   source.close();
 * }
 * ```
 *
 * @module
 */
import * as fs from "node:fs";
import { createSha256, type Digest, type HasherBackend, type Sha256 } from "./digest.ts";
import { DigestMismatchError, ImageNotFoundError, InvalidReferenceError } from "./errors.ts";
import { RegistryError } from "./registry/errors.ts";
import type { Descriptor } from "./manifest.ts";
import { type ImageReference, parseReference, type Platform } from "./reference.ts";
import type { FetchedManifest, RegistryClient, ResolvedManifest } from "./registry/client.ts";
import { RegistrySource } from "./sources/registry.ts";
import { LayoutSource } from "./sources/layout.ts";
import { DockerArchiveSource } from "./sources/archive.ts";

/** The location of an image, as parsed from a source reference. */
export type SourceLocation =
  | { kind: "registry"; reference: ImageReference }
  | { kind: "oci"; dir: string; tag?: string }
  | { kind: "docker-archive"; file: string; name?: string };

/** Options for reading a blob from an {@link ImageSource}. */
export interface SourceBlobOptions {
  /** Continue from `offset`. `hash` has been fed the bytes before it and is fed every byte after. */
  resumeFrom?: { offset: number; hash: Sha256 };
  /** Read from the registry itself, not its mirrors (registry sources only). */
  skipMirrors?: boolean;
}

/**
 * An image to read: its top-level document, the manifest of one platform,
 * and verified blob streams. Call `close()` when done.
 */
export interface ImageSource {
  /** The source as written (`oci:DIR:TAG`, a full registry reference, ...), for messages. */
  readonly name: string;
  /** The reference the image is recorded under in the cache's `index.json`, if it has one. */
  readonly cacheName?: string;
  /** The registry reference, for registry sources only. */
  readonly reference?: ImageReference;
  /** Return the document the source names: an image manifest or an index. */
  top(): Promise<FetchedManifest>;
  /**
   * Return the image manifest for `platform`, choosing from an index when
   * the source names one.
   *
   * @throws {PlatformNotFoundError} when no entry matches.
   */
  resolve(platform: Platform): Promise<ResolvedManifest>;
  /**
   * Stream a blob. The stream errors with `DigestMismatchError` at its end
   * when the size or sha256 differs from the descriptor, so treat the chunks
   * as unverified until it closes.
   */
  openBlob(descriptor: Descriptor, options?: SourceBlobOptions): ReadableStream<Uint8Array>;
  /** Read a small blob such as an image config whole, verified (at most 4 MiB). */
  readBlob(descriptor: Descriptor): Promise<Uint8Array>;
  /** List the tags the source offers: registry tags, layout ref names or archive `RepoTags`. */
  listTags(): Promise<string[]>;
  /** Release open files. */
  close(): void;
}

/** Options of {@link openImageSource}. */
export interface ImageSourceOptions {
  /** The registry client for registry references. Required for those. */
  client?: RegistryClient;
  /** sha256 backend for local sources (default "auto"). */
  hasher?: HasherBackend;
}

const OCI_PREFIX = "oci:";
const ARCHIVE_PREFIX = "docker-archive:";

/** Return true when `input` names a local source (`oci:` or `docker-archive:`). */
export function isLocalSource(input: string | ImageReference): input is string {
  return typeof input === "string" && (input.startsWith(OCI_PREFIX) || input.startsWith(ARCHIVE_PREFIX));
}

/**
 * Parse a source reference. A path that contains ":" is read up to the
 * first ":" unless the whole text names an existing file or directory.
 *
 * @example
 * ```ts
 * parseSourceLocation("oci:/var/lib/images:1.0"); // { kind: "oci", dir: "/var/lib/images", tag: "1.0" }
 * parseSourceLocation("alpine"); // { kind: "registry", reference: { registry: "docker.io", ... } }
 * ```
 *
 * @throws {InvalidReferenceError} for an empty path or an invalid registry reference.
 */
export function parseSourceLocation(input: string | ImageReference): SourceLocation {
  if (typeof input !== "string") return { kind: "registry", reference: input };
  if (input.startsWith(OCI_PREFIX)) {
    const [dir, tag] = splitPath(input, OCI_PREFIX, "oci:DIR[:TAG]");
    return tag === undefined ? { kind: "oci", dir } : { kind: "oci", dir, tag };
  }
  if (input.startsWith(ARCHIVE_PREFIX)) {
    const [file, name] = splitPath(input, ARCHIVE_PREFIX, "docker-archive:FILE[:NAME]");
    return name === undefined ? { kind: "docker-archive", file } : { kind: "docker-archive", file, name };
  }
  return { kind: "registry", reference: parseReference(input) };
}

function splitPath(input: string, prefix: string, form: string): [string, string | undefined] {
  const rest = input.slice(prefix.length);
  let split: [string, string | undefined] = [rest, undefined];
  const colon = rest.indexOf(":");
  if (colon >= 0 && !fs.existsSync(rest)) split = [rest.slice(0, colon), rest.slice(colon + 1)];
  if (split[0] === "") throw new InvalidReferenceError(input, `invalid source "${input}": the path is empty; expected ${form}`);
  if (split[1] === "") throw new InvalidReferenceError(input, `invalid source "${input}": the name after ":" is empty; expected ${form}`);
  return split;
}

/**
 * Open the source that `input` names: a registry reference (which needs
 * `options.client`), `oci:DIR[:TAG]` or `docker-archive:FILE[:NAME]`.
 * Local sources are checked when first read, not here.
 *
 * @throws {InvalidReferenceError} for a malformed reference.
 * @throws {TypeError} for a registry reference without a client.
 */
export function openImageSource(input: string | ImageReference, options: ImageSourceOptions = {}): ImageSource {
  const location = parseSourceLocation(input);
  switch (location.kind) {
    case "registry":
      if (!options.client) throw new TypeError("openImageSource needs options.client to read a registry reference");
      return new RegistrySource(options.client, location.reference);
    case "oci":
      return LayoutSource.fromDirectory(location.dir, location.tag, options.hasher);
    case "docker-archive":
      return new DockerArchiveSource(location.file, location.name, options.hasher);
  }
}

/** A readable region of a local file: a whole blob file, or one member of a tar archive. */
export interface FileRegion {
  /** The file to read, and where the region starts in it. */
  path: string;
  offset: number;
  size: number;
  /** Names the region in messages, such as `blob sha256:... in oci:./layout`. */
  label: string;
}

const CHUNK_SIZE = 1 << 20;

/**
 * Stream a file region, hashing and counting every byte, and error at the
 * end when the size or digest differs from `expect`. With `resumeFrom`, the
 * stream starts at that offset and continues its hash.
 */
export function verifiedRegionStream(
  region: FileRegion,
  expect: { digest: Digest; size: number },
  hasher: HasherBackend,
  resumeFrom?: { offset: number; hash: Sha256 },
): ReadableStream<Uint8Array> {
  let handle: fs.promises.FileHandle | undefined;
  let hash: Sha256;
  let position = resumeFrom?.offset ?? 0;
  const close = async () => {
    const open = handle;
    handle = undefined;
    await open?.close();
  };
  return new ReadableStream<Uint8Array>({
    start: async () => {
      // A region of the wrong size cannot match, so fail before reading it.
      if (region.size !== expect.size) checkRegion(region, expect, region.size, expect.digest);
      hash = resumeFrom?.hash ?? await createSha256(hasher);
      handle = await fs.promises.open(region.path, "r");
    },
    pull: async (controller) => {
      const length = Math.min(CHUNK_SIZE, region.size - position);
      const buffer = new Uint8Array(Math.max(0, length));
      const { bytesRead } = length > 0 ? await handle!.read(buffer, 0, length, region.offset + position) : { bytesRead: 0 };
      if (bytesRead === 0) {
        await close();
        checkRegion(region, expect, position, hash.digest());
        controller.close();
        return;
      }
      const chunk = buffer.subarray(0, bytesRead);
      position += bytesRead;
      hash.update(chunk);
      controller.enqueue(chunk);
    },
    cancel: close,
  }, { highWaterMark: 0 });
}

/** Read a region whole and verify it; for manifests and configs. */
export async function readVerifiedRegion(
  region: FileRegion,
  expect: { digest: Digest; size: number },
  hasher: HasherBackend,
): Promise<Uint8Array> {
  if (region.size !== expect.size) checkRegion(region, expect, region.size, expect.digest);
  if (region.size > MAX_SMALL_BLOB) {
    throw new RangeError(`${region.label} has ${region.size} bytes, more than the limit of ${MAX_SMALL_BLOB} for a manifest or config: check the image`);
  }
  const bytes = readRegion(region);
  const hash = await createSha256(hasher);
  hash.update(bytes);
  checkRegion(region, expect, bytes.byteLength, hash.digest());
  return bytes;
}

/** Read a small region whole, without verification (for index.json and manifest.json). */
export function readRegion(region: FileRegion): Uint8Array {
  const bytes = new Uint8Array(region.size);
  const handle = fs.openSync(region.path, "r");
  try {
    let read = 0;
    while (read < region.size) {
      const count = fs.readSync(handle, bytes, read, region.size - read, region.offset + read);
      if (count === 0) break;
      read += count;
    }
    return bytes.subarray(0, read);
  } finally {
    fs.closeSync(handle);
  }
}

/** Throw {@link DigestMismatchError} when a local region's size or digest differs from its descriptor. */
function checkRegion(region: FileRegion, expect: { digest: Digest; size: number }, received: number, actual: Digest): void {
  if (received !== expect.size) {
    throw new DigestMismatchError(
      `${region.label} has ${received} bytes, expected ${expect.size}: the image files are incomplete or corrupt; write them again`,
      expect.digest,
    );
  }
  if (actual !== expect.digest) {
    throw new DigestMismatchError(
      `${region.label} has digest ${actual}, expected ${expect.digest}: the image files are corrupt; write them again`,
      expect.digest,
      actual,
    );
  }
}

/** The largest manifest, index or config read whole, in bytes. */
export const MAX_SMALL_BLOB = 4 * 1024 * 1024;

const MAX_LISTED_TAGS = 20;

/**
 * Rethrow `error`, explained when it is a registry's 404 for a tag: an
 * {@link ImageNotFoundError} listing the tags the repository has, or, when
 * the tag list is a 404 too, one saying that the repository does not exist
 * (the distribution registry returns MANIFEST_UNKNOWN in both cases).
 */
export async function explainMissingTag(source: ImageSource, error: unknown): Promise<never> {
  const reference = source.reference;
  if (!(error instanceof RegistryError) || error.status !== 404 || !reference?.tag || reference.digest) throw error;
  let tags: string[];
  try {
    tags = await source.listTags();
  } catch (listError) {
    if (listError instanceof RegistryError && listError.status === 404) {
      throw new ImageNotFoundError(
        `repository "${reference.repository}" not found on ${reference.registry}: check the image name in "${source.name}"`,
        source.name,
        [],
        // The tag list's 404 is the evidence; the manifest's 404 would blame the tag.
        { cause: listError },
      );
    }
    // The tag list is unavailable (some registries do not offer it), so the original error is the better report.
    throw error;
  }
  const shown = tags.slice(0, MAX_LISTED_TAGS).map((tag) => `"${tag}"`).join(", ");
  const more = tags.length > MAX_LISTED_TAGS ? ` and ${tags.length - MAX_LISTED_TAGS} more` : "";
  const offer = tags.length > 0 ? `the repository has tags ${shown}${more}; pass one of them` : "the repository has no tags";
  throw new ImageNotFoundError(`tag "${reference.tag}" not found in "${source.name}": ${offer}`, source.name, tags, { cause: error });
}
