/**
 * The content-addressed blob cache, laid out as an OCI image layout
 * (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) so that skopeo, umoci
 * and crane can read it, and `stage` can read theirs.
 *
 * Writes go to a file under `ingest/` and are renamed into `blobs/` only
 * after the size and digest checks pass, so a crash never leaves a partial
 * blob under its final name. Every download writes its own file,
 * `ingest/<hex>.<pid>.<random>.partial`, so two processes never write one
 * file. A download that fails, or whose process is killed, leaves that file
 * behind. The next fetch of the blob claims it by renaming it to a name of
 * its own, which only one claimant can do, and resumes from its end. A
 * file is claimable when its process is gone, or when it belongs to this
 * process and no download in it is using the file.
 *
 * `changes/sha256/<hex>.json` records what each layer blob changes (its
 * paths by kind, see `LayerChanges`), written when a stage applies the
 * verified blob or reads it ahead, so that later stages know which lower
 * files to leave out. Other OCI tools ignore this directory.
 *
 * @module
 */
import * as fs from "node:fs";
import * as path from "node:path";
import * as os from "node:os";
import { checkContent, createSha256, type Digest, type HasherBackend, parseDigest, type Sha256 } from "./digest.ts";
import { DigestMismatchError } from "./errors.ts";
import { createHash } from "node:crypto";
import { type LayerChanges, toLayerChanges } from "./layer/changes.ts";

/** A content descriptor as in the OCI image spec. */
export interface BlobDescriptor {
  mediaType?: string;
  digest: Digest;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os: string; architecture: string; variant?: string };
}

/** Resume point of a download: the bytes already on disk and their running hash. */
export interface ResumePoint {
  offset: number;
  hash: Sha256;
}

/**
 * Supplies the content of a blob from `resume.offset` onwards. The producer
 * must feed every chunk to `resume.hash` (already fed the first `offset`
 * bytes) and error its stream when the final size or digest is wrong: the
 * registry client's `openBlob` does both. The cache itself checks the size.
 */
export type BlobProducer = (resume: ResumePoint) => Promise<ReadableStream<Uint8Array>> | ReadableStream<Uint8Array>;

/**
 * Returns a stream of an open file in 1 MiB chunks that hashes them as they
 * pass, closes the file at its end and then calls `onEnd` with the byte
 * count and digest. An error thrown by `onEnd` fails the stream.
 */
export function hashedFileStream(
  handle: fs.promises.FileHandle,
  hasher: HasherBackend,
  onEnd: (received: number, actual: Digest) => void,
): ReadableStream<Uint8Array> {
  let hash: Sha256;
  let received = 0;
  const chunkSize = 1 << 20;
  return new ReadableStream<Uint8Array>({
    type: "bytes",
    start: async () => {
      hash = await createSha256(hasher);
    },
    pull: async (controller) => {
      const buffer = new Uint8Array(chunkSize);
      const { bytesRead } = await handle.read(buffer, 0, chunkSize, null);
      if (bytesRead === 0) {
        await handle.close();
        onEnd(received, hash.digest());
        controller.close();
        return;
      }
      const chunk = buffer.subarray(0, bytesRead);
      received += bytesRead;
      hash.update(chunk);
      controller.enqueue(chunk);
    },
    cancel: async () => {
      await handle.close();
    },
  });
}

/** Return the default cache directory: `$OCISTAGE_CACHE`, `$XDG_CACHE_HOME/ocistage` or `~/.cache/ocistage`. */
export function defaultCacheDir(): string {
  const env = globalThis.process?.env ?? {};
  if (env.OCISTAGE_CACHE) return env.OCISTAGE_CACHE;
  if (env.XDG_CACHE_HOME) return path.join(env.XDG_CACHE_HOME, "ocistage");
  return path.join(os.homedir(), ".cache", "ocistage");
}

const LAYOUT_FILE = JSON.stringify({ imageLayoutVersion: "1.0.0" });
const REF_NAME = "org.opencontainers.image.ref.name";

/** Options of {@link BlobCache}. */
export interface BlobCacheOptions {
  /** sha256 backend for verification (default "auto"). */
  hasher?: HasherBackend;
}

/** A content-addressed store of blobs in an OCI image layout directory. */
export class BlobCache {
  /** The layout's root directory. */
  readonly dir: string;
  readonly #hasher: HasherBackend;

  /** Open (and create when missing) the layout at `dir`. */
  constructor(dir: string = defaultCacheDir(), options: BlobCacheOptions = {}) {
    this.dir = path.resolve(dir);
    this.#hasher = options.hasher ?? "auto";
    try {
      fs.mkdirSync(path.join(this.dir, "blobs", "sha256"), { recursive: true });
      fs.mkdirSync(path.join(this.dir, "ingest"), { recursive: true });
    } catch (error) {
      throw new Error(
        `cannot create cache directory "${this.dir}": pass a writable directory with --cache or OCISTAGE_CACHE`,
        { cause: error },
      );
    }
    const layoutFile = path.join(this.dir, "oci-layout");
    if (!fs.existsSync(layoutFile)) writeFileAtomic(layoutFile, LAYOUT_FILE);
    const indexFile = path.join(this.dir, "index.json");
    if (!fs.existsSync(indexFile)) writeFileAtomic(indexFile, indexJson([]));
  }

  /** Return the path a blob has (or would have) in the layout. */
  blobPath(digest: Digest): string {
    return path.join(this.dir, "blobs", "sha256", parseDigest(digest).slice("sha256:".length));
  }

  /** Return true when the blob is present with the expected size (content is verified when read). */
  has(digest: Digest, size?: number): boolean {
    try {
      const stat = fs.statSync(this.blobPath(digest));
      return stat.isFile() && (size === undefined || stat.size === size);
    } catch {
      return false;
    }
  }

  /**
   * Read a whole blob into memory and verify it. Meant for manifests and configs.
   *
   * @throws {DigestMismatchError} when the stored content is corrupt; the corrupt file is removed.
   */
  async readBytes(digest: Digest, size?: number): Promise<Uint8Array> {
    const file = this.blobPath(digest);
    const bytes = new Uint8Array(fs.readFileSync(file));
    const hash = await createSha256(this.#hasher);
    hash.update(bytes);
    this.#checkOrEvict(file, { digest, size }, bytes.byteLength, hash.digest());
    return bytes;
  }

  /**
   * Open a stored blob as a stream that verifies size and digest at its end.
   * A corrupt file is removed from the cache before the stream errors, so the
   * next fetch downloads it again.
   */
  async openBlob(digest: Digest, size?: number): Promise<ReadableStream<Uint8Array>> {
    const file = this.blobPath(digest);
    const handle = await fs.promises.open(file, "r");
    return hashedFileStream(handle, this.#hasher, (received, actual) => this.checkStored(digest, size, received, actual));
  }

  /**
   * Hash a stored blob to find whether it is damaged. A damaged blob is
   * removed from the cache, and the error that describes the damage is
   * returned. Returns undefined when the blob is intact.
   */
  async findDamage(digest: Digest, size?: number): Promise<DigestMismatchError | undefined> {
    const stream = await this.openBlob(digest, size);
    try {
      for await (const _ of stream);
      return undefined;
    } catch (error) {
      if (error instanceof DigestMismatchError) return error;
      throw error;
    }
  }

  /**
   * Check the size and digest that a read of a stored blob found. A corrupt
   * file is removed from the cache, so the next fetch downloads it again.
   *
   * @throws {DigestMismatchError} when they differ from `digest` and `size`.
   */
  checkStored(digest: Digest, size: number | undefined, received: number, actual: Digest): void {
    this.#checkOrEvict(this.blobPath(digest), { digest, size }, received, actual);
  }

  #checkOrEvict(file: string, expect: { digest: Digest; size?: number }, received: number, actual: Digest): void {
    try {
      checkContent(expect, received, actual);
    } catch (error) {
      fs.rmSync(file, { force: true });
      const found = received !== expect.size && expect.size !== undefined ? `it has ${received} bytes, not ${expect.size}` : `its content has digest ${actual}`;
      throw new DigestMismatchError(
        `cached blob ${expect.digest} is damaged (${found}): it is removed from the cache, so running the command again downloads it`,
        expect.digest,
        actual,
        { cause: error },
      );
    }
  }

  /** Store a small blob (manifest, config) given in full, after checking its digest. */
  async putBytes(descriptor: BlobDescriptor, bytes: Uint8Array): Promise<void> {
    const hash = await createSha256(this.#hasher);
    hash.update(bytes);
    checkContent({ digest: descriptor.digest, size: descriptor.size, label: "blob" }, bytes.byteLength, hash.digest());
    if (this.has(descriptor.digest, descriptor.size)) return;
    const temp = this.#partialName(descriptor.digest);
    fs.writeFileSync(temp, bytes);
    fs.renameSync(temp, this.blobPath(descriptor.digest));
  }

  /**
   * Store a blob from a stream, unless it is present already.
   *
   * `produce` gets the resume point: offset 0, or the end of a partial
   * download of the same blob left by an interrupted fetch, with a hash that
   * has seen those bytes (see {@link BlobProducer}).
   *
   * @returns true when the blob was downloaded, false when it was cached.
   */
  async ingest(descriptor: BlobDescriptor, produce: BlobProducer, onProgress?: (bytes: number) => void): Promise<boolean> {
    const { digest, size } = descriptor;
    if (this.has(digest, size)) return false;

    const target = this.#partialName(digest);
    filesInUse.add(target);
    try {
      const hash = await createSha256(this.#hasher);
      const claimed = this.#claimPartial(digest, target);
      let offset = claimed ? this.#rehashPartial(target, hash, size) : 0;
      const stream = await produce({ offset, hash });
      const handle = fs.openSync(target, offset > 0 ? "a" : "w");
      try {
        for await (const chunk of stream) {
          if (offset + chunk.byteLength > size) {
            throw new DigestMismatchError(
              `blob ${digest} is longer than the ${size} bytes its descriptor states: ` +
                "the content is corrupt or the manifest is wrong",
              digest,
            );
          }
          writeAll(handle, chunk);
          offset += chunk.byteLength;
          onProgress?.(offset);
        }
      } finally {
        fs.closeSync(handle);
      }
      if (offset !== size) {
        throw new DigestMismatchError(`blob ${digest} ended after ${offset} of ${size} bytes: retry the fetch`, digest);
      }
      fs.renameSync(target, this.blobPath(digest));
      return true;
    } catch (error) {
      // The partial file stays for the next attempt unless its content is wrong.
      if (error instanceof DigestMismatchError) fs.rmSync(target, { force: true });
      throw error;
    } finally {
      filesInUse.delete(target);
    }
  }

  /** Return a fresh partial-file path for a download by this process. */
  #partialName(digest: Digest): string {
    const hex = parseDigest(digest).slice("sha256:".length);
    const random = Math.random().toString(36).slice(2, 10);
    return path.join(this.dir, "ingest", `${hex}.${globalThis.process?.pid ?? 0}.${random}.partial`);
  }

  /**
   * Take over the largest claimable partial file of a blob by renaming it to
   * `target`. Returns false when there is none, or when other processes
   * claimed every candidate first.
   */
  #claimPartial(digest: Digest, target: string): boolean {
    const hex = digest.slice("sha256:".length);
    const ingest = path.join(this.dir, "ingest");
    const candidates: { file: string; size: number }[] = [];
    for (const name of fs.readdirSync(ingest)) {
      const match = PARTIAL_NAME.exec(name);
      if (!match || match[1] !== hex) continue;
      const file = path.join(ingest, name);
      const pid = Number(match[2]);
      const own = pid === globalThis.process?.pid;
      if (filesInUse.has(file) || (own ? false : isAlive(pid))) continue;
      try {
        candidates.push({ file, size: fs.statSync(file).size });
      } catch {
        // Claimed by another process since readdir.
      }
    }
    candidates.sort((a, b) => b.size - a.size);
    for (const candidate of candidates) {
      try {
        fs.renameSync(candidate.file, target);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "ENOENT") continue;
        throw error;
      }
      // Smaller leftovers of the same blob are of no further use.
      for (const other of candidates) if (other !== candidate) fs.rmSync(other.file, { force: true });
      return true;
    }
    return false;
  }

  /** Hash the bytes of a partial download so the download can continue from its end. */
  #rehashPartial(file: string, hash: Sha256, size: number): number {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(file);
    } catch {
      return 0;
    }
    if (!stat.isFile() || stat.size === 0 || stat.size >= size) {
      fs.rmSync(file, { force: true });
      return 0;
    }
    const handle = fs.openSync(file, "r");
    try {
      const buffer = new Uint8Array(1 << 20);
      let total = 0;
      while (total < stat.size) {
        const read = fs.readSync(handle, buffer, 0, Math.min(buffer.length, stat.size - total), total);
        if (read === 0) break;
        hash.update(buffer.subarray(0, read));
        total += read;
      }
      return total;
    } finally {
      fs.closeSync(handle);
    }
  }

  /**
   * Return the recorded changes of a layer blob, or undefined when none are
   * recorded or the record is damaged: of another format version, for
   * another blob, or with changes that do not match its checksum.
   */
  readChanges(digest: Digest): LayerChanges | undefined {
    let record: { version?: unknown; layer?: unknown; sha256?: unknown; changes?: unknown };
    try {
      record = JSON.parse(fs.readFileSync(this.#changesPath(digest), "utf8"));
    } catch {
      return undefined;
    }
    if (record?.version !== CHANGES_VERSION || record.layer !== digest) return undefined;
    const changes = toLayerChanges(record.changes);
    if (changes === undefined || record.sha256 !== changesChecksum(changes)) return undefined;
    return changes;
  }

  /**
   * Record the changes of a layer blob, read from content that matched its
   * digest. A cache that cannot be written only loses the record.
   */
  writeChanges(digest: Digest, changes: LayerChanges): void {
    const file = this.#changesPath(digest);
    try {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      const record = { version: CHANGES_VERSION, layer: digest, sha256: changesChecksum(changes), changes };
      writeFileAtomic(file, JSON.stringify(record));
    } catch {
      // The record only saves reading the layer again.
    }
  }

  #changesPath(digest: Digest): string {
    return path.join(this.dir, "changes", "sha256", `${parseDigest(digest).slice("sha256:".length)}.json`);
  }

  /** Return the descriptors listed in `index.json`. */
  listManifests(): BlobDescriptor[] {
    const text = fs.readFileSync(path.join(this.dir, "index.json"), "utf8");
    const index = JSON.parse(text) as { manifests?: BlobDescriptor[] };
    return Array.isArray(index.manifests) ? index.manifests : [];
  }

  /**
   * Record a manifest in `index.json` under a reference name, replacing an
   * earlier entry of the same name, so other OCI tools can find it as
   * `oci:DIR:NAME`.
   */
  tagManifest(name: string, descriptor: BlobDescriptor): void {
    const file = path.join(this.dir, "index.json");
    const manifests = this.listManifests().filter((entry) => entry.annotations?.[REF_NAME] !== name);
    manifests.push({
      mediaType: descriptor.mediaType,
      digest: descriptor.digest,
      size: descriptor.size,
      ...(descriptor.platform ? { platform: descriptor.platform } : {}),
      annotations: { [REF_NAME]: name },
    });
    writeFileAtomic(file, indexJson(manifests));
  }

  /** Find the descriptor recorded under a reference name. */
  findManifest(name: string): BlobDescriptor | undefined {
    return this.listManifests().find((entry) => entry.annotations?.[REF_NAME] === name);
  }
}

/** Format version of change records; a record of another version is read again from its layer. */
const CHANGES_VERSION = 1;

/** Returns the sha256 of the JSON text of `changes`, which a change record carries to catch edits and damage. */
function changesChecksum(changes: LayerChanges): string {
  const { dirs, files, symlinks, hardlinks, lowerTargets, whiteouts, opaque } = changes;
  return createHash("sha256").update(JSON.stringify([dirs, files, symlinks, hardlinks, lowerTargets, whiteouts, opaque])).digest("hex");
}

function indexJson(manifests: BlobDescriptor[]): string {
  return JSON.stringify({ schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests }, null, 2) + "\n";
}

/** Write a small file so readers see either the old or the new content. */
function writeFileAtomic(file: string, content: string): void {
  const temp = `${file}.${globalThis.process?.pid ?? 0}.${Math.random().toString(36).slice(2, 10)}.tmp`;
  fs.writeFileSync(temp, content);
  fs.renameSync(temp, file);
}

function writeAll(handle: number, chunk: Uint8Array): void {
  let written = 0;
  while (written < chunk.byteLength) {
    written += fs.writeSync(handle, chunk, written, chunk.byteLength - written);
  }
}

/** Partial-file names: `<hex>.<pid>.<random>.partial`. */
const PARTIAL_NAME = /^([a-f0-9]{64})\.(\d+)\.[a-z0-9]+\.partial$/;

/** Partial files that downloads in this process are writing. */
const filesInUse = new Set<string>();

function isAlive(pid: number): boolean {
  try {
    globalThis.process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}
