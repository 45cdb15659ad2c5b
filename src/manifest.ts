/**
 * Image manifests and indexes: media types, parsing with validation, and
 * platform selection.
 *
 * Supported: Docker image manifest v2 schema 2, Docker manifest list, OCI
 * image manifest and OCI image index. Docker schema 1 is rejected with a
 * {@link ManifestError} that tells the user to re-push the image.
 *
 * @module
 */
import { type Digest, parseDigest } from "./digest.ts";
import { DigestMismatchError, ManifestError, PlatformNotFoundError } from "./errors.ts";
import { formatPlatform, type Platform, rankPlatform } from "./reference.ts";

/** Media types of manifests, indexes, configs and layers. */
export const MediaType = {
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerManifestList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifestSchema1: "application/vnd.docker.distribution.manifest.v1+json",
  dockerManifestSchema1Signed: "application/vnd.docker.distribution.manifest.v1+prettyjws",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",

  dockerConfig: "application/vnd.docker.container.image.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",

  dockerLayerGzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  dockerForeignLayerGzip: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
  ociLayer: "application/vnd.oci.image.layer.v1.tar",
  ociLayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  ociLayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  ociLayerNondistributable: "application/vnd.oci.image.layer.nondistributable.v1.tar",
  ociLayerNondistributableGzip: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
  ociLayerNondistributableZstd: "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
} as const;

/** Media types of single-platform image manifests. */
export type ManifestMediaType = typeof MediaType.dockerManifest | typeof MediaType.ociManifest;
/** Media types of multi-platform indexes. */
export type IndexMediaType = typeof MediaType.dockerManifestList | typeof MediaType.ociIndex;

/** The `Accept` header value that lists every manifest type, schema 1 included. */
export const MANIFEST_ACCEPT = [
  MediaType.ociIndex,
  MediaType.dockerManifestList,
  MediaType.ociManifest,
  MediaType.dockerManifest,
  MediaType.dockerManifestSchema1Signed,
  MediaType.dockerManifestSchema1,
].join(", ");

/** The largest manifest or index accepted, in bytes. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

/** Platform of an index entry, with the optional OCI fields kept. */
export interface DescriptorPlatform extends Platform {
  "os.version"?: string;
  "os.features"?: string[];
}

/** A content descriptor: the media type, digest and size a manifest records for a blob or child manifest. */
export interface Descriptor {
  mediaType: string;
  digest: Digest;
  /** Size in bytes. */
  size: number;
  /** Other locations of the content (foreign layers). */
  urls?: string[];
  annotations?: Record<string, string>;
  /** Present on index entries. */
  platform?: DescriptorPlatform;
  artifactType?: string;
}

/** A single-platform image manifest. `mediaType` is always set, even when the document omits it. */
export interface ImageManifest {
  schemaVersion: 2;
  mediaType: ManifestMediaType;
  config: Descriptor;
  /** Layers, lowest first. */
  layers: Descriptor[];
  annotations?: Record<string, string>;
  subject?: Descriptor;
  artifactType?: string;
}

/** A multi-platform index. `mediaType` is always set, even when the document omits it. */
export interface ImageIndex {
  schemaVersion: 2;
  mediaType: IndexMediaType;
  manifests: Descriptor[];
  annotations?: Record<string, string>;
  subject?: Descriptor;
}

/** Return true when the parsed document is an index (Docker manifest list or OCI index). */
export function isImageIndex(document: ImageManifest | ImageIndex): document is ImageIndex {
  return document.mediaType === MediaType.ociIndex ||
    document.mediaType === MediaType.dockerManifestList;
}

/** Return true for media types of indexes. */
export function isIndexMediaType(mediaType: string): mediaType is IndexMediaType {
  return mediaType === MediaType.ociIndex || mediaType === MediaType.dockerManifestList;
}

/** Return true for media types of single-platform manifests. */
export function isManifestMediaType(mediaType: string): mediaType is ManifestMediaType {
  return mediaType === MediaType.ociManifest || mediaType === MediaType.dockerManifest;
}

/** Compression of a layer blob, by media type. */
export type LayerCompression = "gzip" | "zstd" | "none";

/**
 * Return the compression a layer media type declares, or `undefined` for a
 * media type that is not a known layer type.
 */
export function layerCompression(mediaType: string): LayerCompression | undefined {
  switch (mediaType) {
    case MediaType.dockerLayerGzip:
    case MediaType.dockerForeignLayerGzip:
    case MediaType.ociLayerGzip:
    case MediaType.ociLayerNondistributableGzip:
      return "gzip";
    case MediaType.ociLayerZstd:
    case MediaType.ociLayerNondistributableZstd:
      return "zstd";
    case MediaType.ociLayer:
    case MediaType.ociLayerNondistributable:
      return "none";
    default:
      return undefined;
  }
}

/** Return true for foreign (Docker) and non-distributable (OCI) layer media types. */
export function isForeignLayerMediaType(mediaType: string): boolean {
  return mediaType === MediaType.dockerForeignLayerGzip ||
    mediaType.startsWith("application/vnd.oci.image.layer.nondistributable.");
}

/**
 * Return the `urls` of a foreign or non-distributable layer, or `undefined`
 * when the layer is an ordinary registry blob.
 */
export function foreignLayerUrls(descriptor: Descriptor): string[] | undefined {
  if (!isForeignLayerMediaType(descriptor.mediaType)) return undefined;
  return descriptor.urls?.length ? descriptor.urls : undefined;
}

/**
 * Parse and validate a manifest or index.
 *
 * The type comes from the document's `mediaType`, else from `contentType`
 * (parameters ignored), else from its shape (`manifests` means an OCI index,
 * `config` and `layers` an OCI manifest). Every descriptor must have a media
 * type, a sha256 digest and a size that is a non-negative safe integer.
 *
 * @param source names the document in messages, such as the reference or digest.
 * @throws {ManifestError} for malformed or unsupported documents (schema 1 included).
 * @throws {RangeError} for documents larger than {@link MAX_MANIFEST_BYTES}.
 */
export function parseManifest(
  bytes: Uint8Array,
  contentType: string | undefined,
  source: string,
): ImageManifest | ImageIndex {
  if (bytes.byteLength > MAX_MANIFEST_BYTES) {
    throw new RangeError(
      `manifest "${source}" has ${bytes.byteLength} bytes, more than the limit of ` +
        `${MAX_MANIFEST_BYTES}: check that the reference names an image manifest`,
    );
  }

  const headerType = contentType?.split(";")[0].trim().toLowerCase() || undefined;
  if (isSchema1(headerType)) throw schema1Error(source);

  const document = parseJson(bytes, source);
  if (document.schemaVersion === 1) throw schema1Error(source);
  const mediaType = detectMediaType(document, headerType, source);
  if (document.schemaVersion !== 2) {
    throw new ManifestError(
      `manifest "${source}" has schemaVersion ${JSON.stringify(document.schemaVersion)}, ` +
        "expected 2: the document is not a supported image manifest",
      source,
    );
  }

  const read = new FieldReader(source);
  if (isIndexMediaType(mediaType)) {
    const index: ImageIndex = {
      schemaVersion: 2,
      mediaType,
      manifests: read.descriptors(document.manifests, "manifests"),
    };
    copyOptional(index, document, read);
    return index;
  }

  const manifest: ImageManifest = {
    schemaVersion: 2,
    mediaType,
    config: read.descriptor(document.config, "config"),
    layers: read.descriptors(document.layers, "layers"),
  };
  copyOptional(manifest, document, read);
  if (typeof document.artifactType === "string") manifest.artifactType = document.artifactType;
  return manifest;
}

function isSchema1(mediaType: string | undefined): boolean {
  return mediaType === MediaType.dockerManifestSchema1 ||
    mediaType === MediaType.dockerManifestSchema1Signed;
}

function schema1Error(source: string): ManifestError {
  return new ManifestError(
    `manifest "${source}" uses Docker image manifest schema 1, which is unsupported: ` +
      "re-push the image with a current client (docker, podman, skopeo or crane)",
    source,
  );
}

function parseJson(bytes: Uint8Array, source: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new ManifestError(
      `manifest "${source}" is not valid JSON (${(error as Error).message}): ` +
        "check that the reference names an image manifest",
      source,
      { cause: error },
    );
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ManifestError(
      `manifest "${source}" is not a JSON object: check that the reference names an image manifest`,
      source,
    );
  }
  return value as Record<string, unknown>;
}

/** Pick the document type: body `mediaType`, then the Content-Type header, then the shape. */
function detectMediaType(
  document: Record<string, unknown>,
  headerType: string | undefined,
  source: string,
): ManifestMediaType | IndexMediaType {
  const declared = document.mediaType;
  if (declared !== undefined) {
    if (typeof declared !== "string") {
      throw new ManifestError(`manifest "${source}" has a mediaType that is not a string`, source);
    }
    if (isSchema1(declared)) throw schema1Error(source);
    if (isIndexMediaType(declared) || isManifestMediaType(declared)) return declared;
    throw unknownTypeError(declared, source);
  }

  if (headerType && (isIndexMediaType(headerType) || isManifestMediaType(headerType))) {
    return headerType;
  }
  if (Array.isArray(document.manifests)) return MediaType.ociIndex;
  if (document.config !== undefined && Array.isArray(document.layers)) return MediaType.ociManifest;

  const generic = headerType === undefined || headerType === "application/json" ||
    headerType === "text/plain" || headerType === "application/octet-stream";
  if (!generic) throw unknownTypeError(headerType!, source);
  throw new ManifestError(
    `manifest "${source}" has no mediaType and neither "manifests" nor "config" and "layers": ` +
      "check that the reference names an image manifest",
    source,
  );
}

function unknownTypeError(mediaType: string, source: string): ManifestError {
  return new ManifestError(
    `manifest "${source}" has unsupported media type "${mediaType}": ocistage reads Docker ` +
      "v2 schema 2 manifests and manifest lists, and OCI image manifests and indexes",
    source,
  );
}

function copyOptional(
  target: ImageManifest | ImageIndex,
  document: Record<string, unknown>,
  read: FieldReader,
): void {
  if (document.annotations !== undefined) {
    target.annotations = read.stringMap(document.annotations, "annotations");
  }
  if (document.subject !== undefined) target.subject = read.descriptor(document.subject, "subject");
}

/** Validates descriptor fields, naming the JSON path of a bad value. */
class FieldReader {
  private readonly source: string;

  constructor(source: string) {
    this.source = source;
  }

  fail(path: string, problem: string, cause?: unknown): never {
    throw new ManifestError(
      `manifest "${this.source}" is invalid: ${path} ${problem}`,
      this.source,
      cause === undefined ? undefined : { cause },
    );
  }

  descriptors(value: unknown, path: string): Descriptor[] {
    if (!Array.isArray(value)) this.fail(path, "is missing or not an array");
    return (value as unknown[]).map((item, i) => this.descriptor(item, `${path}[${i}]`));
  }

  descriptor(value: unknown, path: string): Descriptor {
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      this.fail(path, "is missing or not an object");
    }
    const fields = value as Record<string, unknown>;

    const { mediaType, digest, size } = fields;
    if (typeof mediaType !== "string" || mediaType.length === 0) {
      this.fail(`${path}.mediaType`, "is missing or not a string");
    }
    if (typeof digest !== "string") this.fail(`${path}.digest`, "is missing or not a string");
    let parsedDigest: Digest;
    try {
      parsedDigest = parseDigest(digest as string);
    } catch (error) {
      this.fail(`${path}.digest`, `is invalid (${(error as Error).message})`, error);
    }
    if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) {
      this.fail(`${path}.size`, `is ${JSON.stringify(size)}, expected a non-negative integer`);
    }

    const descriptor: Descriptor = {
      mediaType: mediaType as string,
      digest: parsedDigest!,
      size: size as number,
    };
    if (fields.urls !== undefined) descriptor.urls = this.urls(fields.urls, `${path}.urls`);
    if (fields.annotations !== undefined) {
      descriptor.annotations = this.stringMap(fields.annotations, `${path}.annotations`);
    }
    if (fields.platform !== undefined) {
      descriptor.platform = this.platform(fields.platform, `${path}.platform`);
    }
    if (typeof fields.artifactType === "string") descriptor.artifactType = fields.artifactType;
    return descriptor;
  }

  urls(value: unknown, path: string): string[] {
    if (!Array.isArray(value) || value.some((url) => typeof url !== "string")) {
      this.fail(path, "is not an array of strings");
    }
    return [...(value as string[])];
  }

  stringMap(value: unknown, path: string): Record<string, string> {
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      this.fail(path, "is not an object");
    }
    const entries = Object.entries(value as Record<string, unknown>);
    for (const [key, item] of entries) {
      if (typeof item !== "string") this.fail(`${path}.${key}`, "is not a string");
    }
    return Object.fromEntries(entries) as Record<string, string>;
  }

  platform(value: unknown, path: string): DescriptorPlatform {
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      this.fail(path, "is not an object");
    }
    const fields = value as Record<string, unknown>;
    if (typeof fields.os !== "string") this.fail(`${path}.os`, "is missing or not a string");
    if (typeof fields.architecture !== "string") {
      this.fail(`${path}.architecture`, "is missing or not a string");
    }

    const platform: DescriptorPlatform = {
      os: fields.os as string,
      architecture: fields.architecture as string,
    };
    if (typeof fields.variant === "string" && fields.variant) platform.variant = fields.variant;
    if (typeof fields["os.version"] === "string") platform["os.version"] = fields["os.version"];
    if (Array.isArray(fields["os.features"])) {
      platform["os.features"] = fields["os.features"].filter((f) => typeof f === "string");
    }
    return platform;
  }
}

/**
 * Choose the index entry for a platform.
 *
 * Entries whose platform is `unknown/unknown` (attestations) and entries
 * that are neither manifests nor indexes are ignored. Among the rest the best
 * {@link rankPlatform} wins, the first listed on a tie: an exact variant, then
 * an entry without a variant, then the closest lower ARM variant (a `v7` host
 * may take `v6`, never the reverse). `arm64` equals `arm64/v8`. An index
 * whose only image entry has no `platform` is taken as is.
 *
 * @param source names the index in messages.
 * @throws {PlatformNotFoundError} listing the platforms the index offers.
 */
export function selectManifest(index: ImageIndex, platform: Platform, source: string): Descriptor {
  const images = index.manifests.filter((entry) =>
    (isManifestMediaType(entry.mediaType) || isIndexMediaType(entry.mediaType)) &&
    !(entry.platform?.os === "unknown" && entry.platform?.architecture === "unknown")
  );

  let best: Descriptor | undefined;
  let bestRank = Infinity;
  for (const entry of images) {
    if (entry.platform === undefined) continue;
    const rank = rankPlatform(entry.platform, platform);
    if (rank !== undefined && rank < bestRank) {
      best = entry;
      bestRank = rank;
    }
  }
  if (best) return best;

  if (images.length === 1 && images[0].platform === undefined) return images[0];

  const available = images
    .filter((entry) => entry.platform !== undefined)
    .map((entry) => formatPlatform(entry.platform!));
  throw new PlatformNotFoundError(formatPlatform(platform), [...new Set(available)], source);
}

/** A manifest or index with the exact bytes it was read from. */
export interface FetchedManifest {
  bytes: Uint8Array;
  mediaType: string;
  digest: Digest;
  manifest: ImageManifest | ImageIndex;
}

/** A single-platform manifest reached from a reference, through an index when there is one. */
export interface ResolvedManifest {
  /** Digest of the index the manifest was chosen from, when the reference named an index. */
  indexDigest?: Digest;
  digest: Digest;
  manifest: ImageManifest;
  bytes: Uint8Array;
  mediaType: string;
}

/** Maximum number of nested indexes followed from a reference to a manifest. */
export const MAX_INDEX_DEPTH = 3;

/**
 * Follow indexes from `top` to the manifest for `platform`, loading each
 * chosen entry with `load`. `name` names the image in messages.
 *
 * @throws {ManifestError} when indexes nest deeper than {@link MAX_INDEX_DEPTH}.
 * @throws {PlatformNotFoundError} when an index has no matching entry.
 * @throws {DigestMismatchError} when a loaded manifest's size differs from its index entry.
 */
export async function resolveIndex(
  top: FetchedManifest,
  platform: Platform,
  name: string,
  load: (entry: Descriptor) => Promise<FetchedManifest>,
): Promise<ResolvedManifest> {
  let current = top;
  for (let depth = 0; isImageIndex(current.manifest); depth++) {
    const source = `${name}@${current.digest}`;
    if (depth === MAX_INDEX_DEPTH) {
      throw new ManifestError(`index "${source}" nests more than ${MAX_INDEX_DEPTH} indexes: check the image`, source);
    }
    const entry = selectManifest(current.manifest, platform, source);
    current = await load(entry);
    if (current.bytes.byteLength !== entry.size) {
      throw new DigestMismatchError(
        `manifest ${entry.digest} for ${formatPlatform(platform)} has ${current.bytes.byteLength} bytes, ` +
          `but index "${source}" states ${entry.size}: the index is corrupt; re-push the image`,
        entry.digest,
      );
    }
  }
  return {
    indexDigest: current === top ? undefined : top.digest,
    digest: current.digest,
    manifest: current.manifest as ImageManifest,
    bytes: current.bytes,
    mediaType: current.mediaType,
  };
}
