/**
 * A `docker save` archive as an {@link ImageSource}.
 *
 * The archive must be an uncompressed tar file on disk: its members are
 * indexed once by reading the headers only, and blobs are then read in place
 * at their offsets. Two layouts are understood:
 *
 * - legacy (Docker before 25): `manifest.json`, `<config-hex>.json` and
 *   `<layer-id>/layer.tar`. ocistage builds an OCI manifest for the image.
 *   The reported digest is that built manifest's, so it differs from the
 *   digest the image has on a registry. Layers are verified against the config's
 *   `rootfs.diff_ids`, and the config against its file name when that is a
 *   sha256 hex digest.
 * - OCI (Docker 25 and later): an OCI image layout inside the tar, plus the
 *   same `manifest.json`. The image's own manifest is used when `index.json`
 *   leads to one with the same config.
 *
 * Symlinked members (Docker 25 links `<id>/layer.tar` to the blob) are
 * followed inside the archive.
 *
 * @module
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { createSha256, type Digest, type HasherBackend, isDigest } from "../digest.ts";
import { ImageNotFoundError, ManifestError } from "../errors.ts";
import { type Descriptor, type ImageManifest, isImageIndex, MediaType, parseManifest } from "../manifest.ts";
import { formatReference, parseReference, type Platform } from "../reference.ts";
import type { FetchedManifest, ResolvedManifest } from "../registry/client.ts";
import {
  type FileRegion,
  type ImageSource,
  MAX_SMALL_BLOB,
  readRegion,
  readVerifiedRegion,
  type SourceBlobOptions,
  verifiedRegionStream,
} from "../image-source.ts";
import { type LayoutFiles, LayoutSource } from "./layout.ts";

/** One entry of a `docker save` manifest.json. */
interface ArchiveEntry {
  Config: string;
  RepoTags?: string[] | null;
  Layers: string[];
}

/** One member of the archive: where its content starts and how long it is. */
interface Member {
  type: "file" | "symlink" | "hardlink" | "other";
  offset: number;
  size: number;
  linkname?: string;
}

const BLOCK = 512;
/** Tar typeflags of the members the index follows; "7" is a contiguous file, read as a regular one. */
const MEMBER_TYPES: Record<string, Member["type"]> = { "0": "file", "7": "file", "1": "hardlink", "2": "symlink" };
const MAX_LINK_HOPS = 16;
const SHA256_PATH = /(?:^|\/)blobs\/sha256\/([a-f0-9]{64})$/;
const HEX_NAME = /^([a-f0-9]{64})(?:\.json)?$/;

/** An image in a `docker save` archive. */
export class DockerArchiveSource implements ImageSource {
  readonly name: string;
  readonly #file: string;
  readonly #wanted?: string;
  readonly #hasher: HasherBackend;
  #members?: Map<string, Member>;
  #resolved?: Promise<{ cacheName?: string; delegate?: LayoutSource; built?: FetchedManifest }>;
  #cacheName?: string;

  constructor(file: string, name: string | undefined, hasher: HasherBackend = "auto") {
    this.#file = file;
    this.#wanted = name;
    this.#hasher = hasher;
    this.name = `docker-archive:${file}${name === undefined ? "" : `:${name}`}`;
  }

  /** The selected image's first `RepoTags` entry, normalized; known after the first read. */
  get cacheName(): string | undefined {
    return this.#cacheName;
  }

  async listTags(): Promise<string[]> {
    return this.#manifestJson().flatMap((entry) => entry.RepoTags ?? []);
  }

  async top(): Promise<FetchedManifest> {
    const image = await this.#image();
    return image.delegate ? await image.delegate.top() : image.built!;
  }

  async resolve(platform: Platform): Promise<ResolvedManifest> {
    const image = await this.#image();
    if (image.delegate) return await image.delegate.resolve(platform);
    const built = image.built!;
    return { digest: built.digest, manifest: built.manifest as ImageManifest, bytes: built.bytes, mediaType: built.mediaType };
  }

  openBlob(descriptor: Descriptor, options: SourceBlobOptions = {}): ReadableStream<Uint8Array> {
    return verifiedRegionStream(this.#blobRegion(descriptor), descriptor, this.#hasher, options.resumeFrom);
  }

  readBlob(descriptor: Descriptor): Promise<Uint8Array> {
    return readVerifiedRegion(this.#blobRegion(descriptor), descriptor, this.#hasher);
  }

  close(): void {}

  /** Blobs by digest: set while building the manifest of a legacy archive. */
  readonly #paths = new Map<string, string>();

  #blobRegion(descriptor: Descriptor): FileRegion {
    const label = `blob ${descriptor.digest} in "${this.name}"`;
    const member = this.#paths.get(descriptor.digest) ?? `blobs/sha256/${descriptor.digest.slice("sha256:".length)}`;
    const region = this.#files().region(member, label);
    if (!region) throw new ManifestError(`${label} is missing: the archive is incomplete; save the image again`, this.name);
    return region;
  }

  #image(): Promise<{ cacheName?: string; delegate?: LayoutSource; built?: FetchedManifest }> {
    this.#resolved ??= this.#loadImage();
    return this.#resolved;
  }

  async #loadImage(): Promise<{ cacheName?: string; delegate?: LayoutSource; built?: FetchedManifest }> {
    const entry = this.#selectEntry();
    const firstTag = entry.RepoTags?.[0];
    this.#cacheName = firstTag === undefined ? undefined : normalizeTag(firstTag);

    const config = await this.#readConfig(entry);
    const delegate = await this.#findInLayout(config.digest);
    if (delegate) return { cacheName: this.#cacheName, delegate };
    return { cacheName: this.#cacheName, built: await this.#buildManifest(entry, config) };
  }

  #manifestJson(): ArchiveEntry[] {
    const region = this.#files().region("manifest.json", "manifest.json");
    if (!region) {
      throw new ManifestError(
        `"${this.#file}" is not a docker save archive: it has no manifest.json; write it with "docker save -o FILE IMAGE"`,
        this.name,
      );
    }
    if (region.size > MAX_SMALL_BLOB) throw new RangeError(`manifest.json of "${this.name}" is larger than ${MAX_SMALL_BLOB} bytes`);
    let entries: unknown;
    try {
      entries = JSON.parse(new TextDecoder().decode(readRegion(region)));
    } catch (cause) {
      throw new ManifestError(`manifest.json of "${this.name}" is not valid JSON: save the image again`, this.name, { cause });
    }
    const valid = Array.isArray(entries) && entries.every((entry) =>
      entry !== null && typeof entry === "object" && typeof entry.Config === "string" && Array.isArray(entry.Layers) &&
      entry.Layers.every((layer: unknown) => typeof layer === "string") &&
      (entry.RepoTags == null || (Array.isArray(entry.RepoTags) && entry.RepoTags.every((tag: unknown) => typeof tag === "string")))
    );
    if (!valid) {
      throw new ManifestError(
        `manifest.json of "${this.name}" is malformed: expected a list of {Config, RepoTags, Layers}; save the image again`,
        this.name,
      );
    }
    return entries as ArchiveEntry[];
  }

  #selectEntry(): ArchiveEntry {
    const entries = this.#manifestJson();
    const tags = entries.flatMap((entry) => entry.RepoTags ?? []);
    const quoted = tags.map((tag) => `"${tag}"`).join(", ") || "no tags";
    if (this.#wanted === undefined) {
      if (entries.length === 1) return entries[0];
      throw new ImageNotFoundError(
        `"${this.#file}" contains ${entries.length} images: name one, as in "docker-archive:${this.#file}:NAME"; it offers ${quoted}`,
        this.name,
        tags,
      );
    }
    const wanted = normalizeTag(this.#wanted);
    const found = entries.find((entry) => (entry.RepoTags ?? []).some((tag) => normalizeTag(tag) === wanted));
    if (!found) {
      throw new ImageNotFoundError(`no image named "${this.#wanted}" in "${this.#file}": it offers ${quoted}`, this.name, tags);
    }
    this.#cacheName = wanted;
    return found;
  }

  async #readConfig(entry: ArchiveEntry): Promise<{ digest: Digest; bytes: Uint8Array; path: string }> {
    const label = `config "${entry.Config}" in "${this.name}"`;
    const region = this.#files().region(entry.Config, label);
    if (!region) throw new ManifestError(`${label} is missing: the archive is incomplete; save the image again`, this.name);
    const named = memberDigest(entry.Config);
    if (named) return { digest: named, bytes: await readVerifiedRegion(region, { digest: named, size: region.size }, this.#hasher), path: entry.Config };

    // The file name does not state the digest, so the config is taken as it is.
    if (region.size > MAX_SMALL_BLOB) throw new RangeError(`${label} has more than ${MAX_SMALL_BLOB} bytes: check the archive`);
    const bytes = readRegion(region);
    const hash = await createSha256(this.#hasher);
    hash.update(bytes);
    return { digest: hash.digest(), bytes, path: entry.Config };
  }

  /** In an archive that contains an OCI layout, find the manifest whose config has this digest. */
  async #findInLayout(configDigest: Digest): Promise<LayoutSource | undefined> {
    const files = this.#files();
    if (!files.region("index.json", "index.json") || !files.region("oci-layout", "oci-layout")) return undefined;
    const layout = new LayoutSource(files, this.name, { hasher: this.#hasher });
    for (const entry of layout.readIndex().manifests) {
      if (!layout.hasBlob(entry.digest)) continue;
      const document = await layout.loadDocument(entry);
      const children = isImageIndex(document.manifest) ? document.manifest.manifests : [];
      const matches = !isImageIndex(document.manifest) && document.manifest.config.digest === configDigest;
      const childMatches = await Promise.all(children.filter((child) => layout.hasBlob(child.digest)).map(async (child) => {
        const manifest = (await layout.loadDocument(child)).manifest;
        return !isImageIndex(manifest) && manifest.config.digest === configDigest;
      }));
      if (matches || childMatches.some(Boolean)) return new LayoutSource(files, this.name, { entries: [entry], hasher: this.#hasher });
    }
    return undefined;
  }

  /** Build an OCI manifest for a legacy entry, verifying layers against the config's diff_ids. */
  async #buildManifest(entry: ArchiveEntry, config: { digest: Digest; bytes: Uint8Array; path: string }): Promise<FetchedManifest> {
    const diffIds = readDiffIds(config.bytes, this.name);
    const layers: Descriptor[] = entry.Layers.map((layer, index) => {
      const label = `layer "${layer}" in "${this.name}"`;
      const region = this.#files().region(layer, label);
      if (!region) throw new ManifestError(`${label} is missing: the archive is incomplete; save the image again`, this.name);
      const digest = memberDigest(this.#files().resolve(layer)) ?? diffIds[index];
      if (digest === undefined) {
        throw new ManifestError(
          `${label} has no digest to verify it against: the config lists ${diffIds.length} diff_ids for ${entry.Layers.length} layers; save the image again`,
          this.name,
        );
      }
      this.#paths.set(digest, layer);
      return { mediaType: layerMediaType(region), digest, size: region.size };
    });
    this.#paths.set(config.digest, config.path);

    const manifest = {
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: config.digest, size: config.bytes.byteLength },
      layers,
    };
    const bytes = new TextEncoder().encode(JSON.stringify(manifest));
    const hash = await createSha256(this.#hasher);
    hash.update(bytes);
    const digest = hash.digest();
    return { bytes, digest, mediaType: MediaType.ociManifest, manifest: parseManifest(bytes, MediaType.ociManifest, `${this.name}@${digest}`) };
  }

  #files(): LayoutFiles & { resolve(name: string): string } {
    this.#members ??= indexArchive(this.#file, this.name);
    const members = this.#members;
    const resolve = (name: string): string => resolveMember(members, name, this.name);
    return {
      resolve,
      region: (relative, label) => {
        const member = members.get(resolve(relative));
        if (!member || member.type !== "file") return undefined;
        return { path: this.#file, offset: member.offset, size: member.size, label };
      },
    };
  }
}

/** Normalize a RepoTag or requested name the way references are written in full. */
function normalizeTag(tag: string): string {
  try {
    return formatReference(parseReference(tag));
  } catch {
    return tag;
  }
}

/** Return the digest a member path states (`blobs/sha256/<hex>` or `<hex>.json`), if any. */
function memberDigest(name: string): Digest | undefined {
  const blob = SHA256_PATH.exec(name);
  if (blob) return `sha256:${blob[1]}`;
  const hexName = HEX_NAME.exec(path.posix.basename(name));
  return hexName ? `sha256:${hexName[1]}` : undefined;
}

function readDiffIds(bytes: Uint8Array, source: string): Digest[] {
  let config: { rootfs?: { diff_ids?: unknown } };
  try {
    config = JSON.parse(new TextDecoder().decode(bytes));
  } catch (cause) {
    throw new ManifestError(`the image config in "${source}" is not valid JSON: save the image again`, source, { cause });
  }
  const ids = config?.rootfs?.diff_ids;
  if (!Array.isArray(ids) || !ids.every((id) => typeof id === "string" && isDigest(id))) {
    throw new ManifestError(`the image config in "${source}" has no valid rootfs.diff_ids: save the image again`, source);
  }
  return ids as Digest[];
}

/** Pick the OCI layer media type from the first bytes of a layer. */
function layerMediaType(region: FileRegion): string {
  const head = new Uint8Array(4);
  const handle = fs.openSync(region.path, "r");
  try {
    fs.readSync(handle, head, 0, Math.min(4, region.size), region.offset);
  } finally {
    fs.closeSync(handle);
  }
  if (head[0] === 0x1f && head[1] === 0x8b) return MediaType.ociLayerGzip;
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return MediaType.ociLayerZstd;
  return MediaType.ociLayer;
}

/** Follow symlinks and hardlinks between members, relative to the archive root. */
function resolveMember(members: Map<string, Member>, name: string, source: string): string {
  let current = normalizeMember(name);
  for (let hop = 0; hop < MAX_LINK_HOPS; hop++) {
    const member = members.get(current);
    if (!member || (member.type !== "symlink" && member.type !== "hardlink")) return current;
    const target = member.linkname ?? "";
    current = member.type === "symlink" ? normalizeMember(path.posix.join(path.posix.dirname(current), target)) : normalizeMember(target);
  }
  throw new ManifestError(`member "${name}" of "${source}" has more than ${MAX_LINK_HOPS} links in a chain: the archive is malformed`, source);
}

function normalizeMember(name: string): string {
  return path.posix.normalize(name.replace(/^\/+/, "")).replace(/^(\.\.\/)+/, "").replace(/^\.\//, "").replace(/\/$/, "");
}

/**
 * Read the headers of an uncompressed tar file and return its members by
 * name. PAX `path`, `linkpath` and `size` records and GNU long names are
 * honoured; bodies are skipped without being read.
 */
function indexArchive(file: string, source: string): Map<string, Member> {
  let handle: number;
  try {
    handle = fs.openSync(file, "r");
  } catch (cause) {
    throw new ManifestError(`cannot open docker archive "${file}": check the path`, source, { cause });
  }
  const members = new Map<string, Member>();
  try {
    const fileSize = fs.fstatSync(handle).size;
    const header = new Uint8Array(BLOCK);
    let position = 0;
    let pending: { path?: string; linkpath?: string; size?: number } = {};
    while (position + BLOCK <= fileSize) {
      fs.readSync(handle, header, 0, BLOCK, position);
      if (header.every((byte) => byte === 0)) break;
      if (!checksumValid(header)) {
        if (position === 0 && header[0] === 0x1f && header[1] === 0x8b) {
          throw new ManifestError(`docker archive "${file}" is gzip-compressed: decompress it first, as with "gunzip -k"`, source);
        }
        throw new ManifestError(`"${file}" is not a tar archive, or is corrupt at byte ${position}: pass the output of "docker save"`, source);
      }
      const typeflag = String.fromCharCode(header[156] || 0x30);
      const size = pending.size ?? readNumber(header.subarray(124, 136));
      const body = position + BLOCK;
      position = body + Math.ceil(size / BLOCK) * BLOCK;

      if (typeflag === "x" || typeflag === "L" || typeflag === "K") {
        const bytes = new Uint8Array(size);
        fs.readSync(handle, bytes, 0, size, body);
        const text = new TextDecoder().decode(bytes);
        if (typeflag === "x") pending = { ...pending, ...parsePax(text) };
        else if (typeflag === "L") pending.path = text.replace(/\0.*$/s, "");
        else pending.linkpath = text.replace(/\0.*$/s, "");
        continue;
      }
      if (typeflag === "g") continue;

      const name = pending.path ?? headerName(header);
      const linkname = pending.linkpath ?? cString(header.subarray(157, 257));
      pending = {};
      const type = MEMBER_TYPES[typeflag] ?? "other";
      members.set(normalizeMember(name), { type, offset: body, size, ...(linkname ? { linkname } : {}) });
    }
  } finally {
    fs.closeSync(handle);
  }
  return members;
}

function checksumValid(header: Uint8Array): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i];
  return readNumber(header.subarray(148, 156)) === sum;
}

function headerName(header: Uint8Array): string {
  const name = cString(header.subarray(0, 100));
  const ustar = cString(header.subarray(257, 262)) === "ustar";
  const prefix = ustar ? cString(header.subarray(345, 500)) : "";
  return prefix ? `${prefix}/${name}` : name;
}

function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
}

/** Read an octal field, or a base-256 one (high bit set). */
function readNumber(field: Uint8Array): number {
  if (field[0] & 0x80) {
    let value = field[0] & 0x7f;
    for (let i = 1; i < field.length; i++) value = value * 256 + field[i];
    return value;
  }
  const text = cString(field).trim();
  return text === "" ? 0 : Number.parseInt(text, 8);
}

function parsePax(text: string): { path?: string; linkpath?: string; size?: number } {
  const records: { path?: string; linkpath?: string; size?: number } = {};
  const bytes = new TextEncoder().encode(text);
  let offset = 0;
  while (offset < bytes.length) {
    const space = bytes.indexOf(0x20, offset);
    if (space < 0) break;
    const length = Number.parseInt(new TextDecoder().decode(bytes.subarray(offset, space)), 10);
    if (!Number.isSafeInteger(length) || length <= 0) break;
    const record = new TextDecoder().decode(bytes.subarray(space + 1, offset + length - 1));
    const equals = record.indexOf("=");
    const key = record.slice(0, equals);
    const value = record.slice(equals + 1);
    if (key === "path") records.path = value;
    else if (key === "linkpath") records.linkpath = value;
    else if (key === "size") records.size = Number.parseInt(value, 10);
    offset += length;
  }
  return records;
}
