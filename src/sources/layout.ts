/**
 * An OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) as
 * an {@link ImageSource}, read from a directory or from the members of a
 * `docker save` archive.
 *
 * Entries of `index.json` are chosen by their
 * `org.opencontainers.image.ref.name` annotation. Without a tag, the layout
 * must hold one image: one entry, or several entries that share one name
 * (or have none), from which the platform decides. An entry that points to
 * an index is resolved by platform, as a registry index is.
 *
 * @module
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { createSha256, type Digest, type HasherBackend } from "../digest.ts";
import { ImageNotFoundError, ManifestError } from "../errors.ts";
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  isImageIndex,
  MediaType,
  parseManifest,
  resolveIndex,
} from "../manifest.ts";
import type { Platform } from "../reference.ts";
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

/** The annotation that names an `index.json` entry. */
export const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";


/** Access to the files of a layout, wherever they are stored. */
export interface LayoutFiles {
  /** Return the region of the file at `relative` (a `/`-separated path), or undefined when it is missing. */
  region(relative: string, label: string): FileRegion | undefined;
  /** The directory the files are in, when they are in one. */
  dir?: string;
}

/** Return the files of a layout stored in a directory. */
export function directoryFiles(dir: string): LayoutFiles {
  return {
    dir,
    region(relative, label) {
      const file = path.join(dir, ...relative.split("/"));
      let stat: fs.Stats;
      try {
        stat = fs.statSync(file);
      } catch {
        return undefined;
      }
      return stat.isFile() ? { path: file, offset: 0, size: stat.size, label } : undefined;
    },
  };
}

/** Options of {@link LayoutSource}. */
export interface LayoutSourceOptions {
  /** Only `index.json` entries with this ref name. */
  tag?: string;
  /** Use these entries instead of reading `index.json`. */
  entries?: Descriptor[];
  /** sha256 backend (default "auto"). */
  hasher?: HasherBackend;
}

/** An image in an OCI image layout. */
export class LayoutSource implements ImageSource {
  readonly name: string;
  readonly #files: LayoutFiles;
  readonly #tag?: string;
  readonly #hasher: HasherBackend;
  #entries?: Descriptor[];

  constructor(files: LayoutFiles, name: string, options: LayoutSourceOptions = {}) {
    this.#files = files;
    this.name = name;
    this.#tag = options.tag;
    this.#entries = options.entries;
    this.#hasher = options.hasher ?? "auto";
  }

  /** Open the layout in `dir`, optionally the entries named `tag`. */
  static fromDirectory(dir: string, tag: string | undefined, hasher?: HasherBackend): LayoutSource {
    const name = `oci:${dir}${tag === undefined ? "" : `:${tag}`}`;
    return new LayoutSource(directoryFiles(dir), name, { tag, hasher });
  }

  /**
   * Return the entries of `index.json` (checking that the layout is one).
   *
   * @throws {ManifestError} when `oci-layout` or `index.json` is missing or malformed.
   */
  readIndex(): ImageIndex {
    const label = `${this.name}`;
    const dir = this.#files.dir;
    if (dir !== undefined && !fs.existsSync(dir)) {
      throw new ManifestError(`OCI image layout directory "${dir}" does not exist: check the path after "oci:"`, label);
    }
    if (!this.#files.region("oci-layout", "oci-layout")) {
      throw new ManifestError(
        `"${label}" is not an OCI image layout: it has no oci-layout file; pass a directory written by skopeo, umoci or ocistage`,
        label,
      );
    }
    const region = this.#files.region("index.json", "index.json");
    if (!region) {
      throw new ManifestError(`OCI image layout "${label}" has no index.json: the layout is incomplete; write it again`, label);
    }
    if (region.size > MAX_SMALL_BLOB) {
      throw new RangeError(`index.json of "${label}" has ${region.size} bytes, more than the limit of ${MAX_SMALL_BLOB}`);
    }
    const bytes = readRegion(region);
    const document = parseManifest(bytes, MediaType.ociIndex, `${label} index.json`);
    if (!isImageIndex(document)) {
      throw new ManifestError(`index.json of "${label}" is not an image index: the layout is malformed`, label);
    }
    return document;
  }

  /** Return the ref names of the layout's entries, in order, without repeats. */
  listTags(): Promise<string[]> {
    const names = this.readIndex().manifests.map((entry) => entry.annotations?.[REF_NAME_ANNOTATION]);
    return Promise.resolve([...new Set(names.filter((name): name is string => name !== undefined))]);
  }

  #selected(): Descriptor[] {
    if (this.#entries) return this.#entries;
    const all = this.readIndex().manifests;
    const nameOf = (entry: Descriptor) => entry.annotations?.[REF_NAME_ANNOTATION];
    const names = [...new Set(all.map(nameOf))];
    const offered = names.filter((name): name is string => name !== undefined);

    let entries: Descriptor[];
    if (this.#tag !== undefined) {
      entries = all.filter((entry) => nameOf(entry) === this.#tag);
      if (entries.length === 0) {
        throw new ImageNotFoundError(
          `no image named "${this.#tag}" in "${this.name}": ${
            offered.length ? `the layout offers ${offered.map((name) => `"${name}"`).join(", ")}` : "its entries have no names"
          }; pass one of them after the colon`,
          this.name,
          offered,
        );
      }
    } else {
      if (all.length === 0) throw new ImageNotFoundError(`OCI image layout "${this.name}" contains no images`, this.name, []);
      if (names.length > 1) {
        throw new ImageNotFoundError(
          `OCI image layout "${this.name}" contains several images: name one, as in "${this.name}:${offered[0]}"; it offers ${
            offered.map((name) => `"${name}"`).join(", ")
          }`,
          this.name,
          offered,
        );
      }
      entries = all;
    }
    this.#entries = entries;
    return entries;
  }

  async top(): Promise<FetchedManifest> {
    const entries = this.#selected();
    if (entries.length === 1) return await this.loadDocument(entries[0]);

    // Several entries under one name: treat them as the platforms of one image.
    const index: ImageIndex = { schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: entries };
    const bytes = new TextEncoder().encode(JSON.stringify(index));
    const hash = await createSha256(this.#hasher);
    hash.update(bytes);
    return { bytes, digest: hash.digest(), mediaType: MediaType.ociIndex, manifest: index };
  }

  async resolve(platform: Platform): Promise<ResolvedManifest> {
    return await resolveIndex(await this.top(), platform, this.name, (entry) => this.loadDocument(entry));
  }

  /** Read, verify and parse the manifest or index a descriptor points to. */
  async loadDocument(descriptor: Descriptor): Promise<FetchedManifest> {
    const bytes = await this.readBlob(descriptor);
    const manifest = parseManifest(bytes, descriptor.mediaType, `${this.name}@${descriptor.digest}`);
    return { bytes, digest: descriptor.digest, mediaType: manifest.mediaType, manifest };
  }

  openBlob(descriptor: Descriptor, options: SourceBlobOptions = {}): ReadableStream<Uint8Array> {
    return verifiedRegionStream(this.#blobRegion(descriptor), descriptor, this.#hasher, options.resumeFrom);
  }

  readBlob(descriptor: Descriptor): Promise<Uint8Array> {
    return readVerifiedRegion(this.#blobRegion(descriptor), descriptor, this.#hasher);
  }

  /** Return true when the blob a descriptor names is present. */
  hasBlob(digest: Digest): boolean {
    return this.#files.region(blobPath(digest), digest) !== undefined;
  }

  #blobRegion(descriptor: Descriptor): FileRegion {
    const label = `blob ${descriptor.digest} in "${this.name}"`;
    const region = this.#files.region(blobPath(descriptor.digest), label);
    if (!region) {
      throw new ManifestError(
        `${label} is missing: the layout is incomplete; copy the image into it again`,
        this.name,
      );
    }
    return region;
  }

  close(): void {}
}

/** Return the path of a blob inside a layout. */
export function blobPath(digest: Digest): string {
  const [algorithm, hex] = digest.split(":");
  return `blobs/${algorithm}/${hex}`;
}
