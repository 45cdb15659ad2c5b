/**
 * The layer applier: writes the tar changesets of an image's layers, lowest
 * first, into one root directory.
 *
 * Contracts and limits:
 * - Tar formats: whatever {@linkcode TarReader} reads (ustar, GNU long names,
 *   PAX, base-256). Sparse files, unknown types and names that are not UTF-8
 *   are a {@linkcode LayerError} naming the entry.
 * - Names: a leading `/` or `./`, repeated `/` and `.` components are dropped
 *   and `..` is collapsed. Empty names, NUL bytes and a `..` that climbs
 *   above the root are errors. A directory entry for the root itself (`./`,
 *   `/`) is skipped, so the root keeps its own mode and owner. Any other
 *   entry type for the root is an error.
 * - Confinement: every parent directory is resolved inside the root, one
 *   component at a time with `lstat`. A symlink met on the way is followed as
 *   if the root were `/`, so `..` stops at the root and absolute targets
 *   start from it. At most {@linkcode MAX_SYMLINKS} links are followed per
 *   lookup, then the entry is an error. Parents named by the entry are
 *   created when missing (mode 0755). Parents reached through a symlink
 *   target must exist. The last component is never followed. Hardlink
 *   targets resolve the same way, relative to the root. Nothing is created,
 *   linked, changed or removed outside the root, whatever the links point to.
 * - Whiteouts: `.wh..wh..opq` (checked first) hides every lower-layer child
 *   of its directory, and `.wh.NAME` removes NAME and everything below it.
 *   Both act only on lower layers: paths this layer wrote before or after
 *   the marker survive, because the applier tracks them. A whiteout never
 *   follows its last component, and never creates missing parents. A bare
 *   `.wh.`, `.wh..` or `.wh...` is an error. Whiteout files never appear in
 *   the result. aufs metadata (`.wh..wh.plnk` and the like) is dropped.
 * - Replacement: a non-directory replaces whatever is at its path (unlink,
 *   then create, so a hardlinked peer keeps its content). A directory over a
 *   directory merges and takes the new metadata. A directory replaces a
 *   non-directory, including a symlink.
 * - Duplicates: within one layer the last member with a name wins, as tar
 *   extraction does. A later non-directory removes a directory written
 *   earlier in the same layer together with its contents.
 * - Dropped, each kind counted in one warning event per layer: character and
 *   block devices, FIFOs, everything below `dev/` (the `dev` directory itself
 *   stays), hardlinks to a dropped entry, and aufs metadata.
 * - Modes: kept, setuid, setgid and sticky included. Owner read is added to
 *   every file and owner read, write and execute to every directory, so the
 *   result can always be read and removed. Directories stay writable while
 *   layers are applied and get their final mode and mtime in `finish()`.
 * - Times: mtimes kept for files, directories and symlinks (`lutimes`).
 *   atime is set to the mtime.
 * - Owners: applied only when `owners` is true, by default when running as
 *   root (uid 0). Otherwise files belong to the calling user. With owners
 *   on, a uid or gid above 4294967294 is an error naming the entry.
 * - xattrs (PAX `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`): not applied, because
 *   no runtime has an API for them. Counted in a warning.
 * - Hidden entries, with `LayerApplyOptions.hidden` (the changes of the
 *   upper layers): a file that an upper layer removes or replaces is not
 *   written, and neither is a hardlink to such a file when the link is
 *   hidden too. What the file would have replaced is still removed, and
 *   whiteouts of its own layer spare its path. When a hardlink that is
 *   written points to a left-out file, the file is written back at its
 *   path, and its content is filled in after the current layer by reading
 *   the layer that contains it once more.
 *   Directories and symlinks are always written, and so is any entry below
 *   a path where a symlink or hardlink was created, because its real path
 *   may differ from its name. The result is the same tree. One difference:
 *   an entry below a file is an error, so layers that write below a file
 *   which an upper layer then removes fail with every entry written, and
 *   may apply when that file is left out.
 * - Data after the tar end marker: read to the end, so a verifying stream
 *   upstream sees every byte. Non-zero trailing bytes are counted in a
 *   warning.
 *
 * The applier writes with synchronous `node:fs` calls, because one awaited
 * call per entry would cost more than the work itself for small files.
 * Filesystem access stays in `RootTree` (lookups, deferred directory
 * metadata) and in the write and remove methods of `LayerWriter`.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import * as fs from "node:fs";
import process from "node:process";

import { LayerError } from "../errors.ts";
import type { EventHandler } from "../progress.ts";
import { readTar, type TarHandler, type TarHeader, type TarReader } from "./tar.ts";
import { quoteName, splitName, whiteoutKind, whiteoutTarget } from "./names.ts";
import { type ChangeRecorder, type ContentSource, dropReason, type HiddenPaths, LeftOutFiles } from "./changes.ts";

/** Maximum number of symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`. */
export const MAX_SYMLINKS = 40;

/** Linux's `PATH_MAX` (bytes of a path, NUL included) and `NAME_MAX` (bytes of one component). */
const PATH_MAX = 4096;
const NAME_MAX = 255;

/** Options for {@linkcode LayerApplier} and {@linkcode applyLayers}. */
export interface ApplyOptions {
  /** Receives one warning event per kind of dropped or ignored content per layer. */
  onEvent?: EventHandler;
  /** Apply the uid and gid of every entry. Default: true when running as root. */
  owners?: boolean;
}

/** Identifies a layer in errors and events. */
export interface LayerInfo {
  /** Digest of the layer blob. */
  digest?: string;
  /** 0-based position of the layer in the manifest. */
  index?: number;
}

/** Options of {@linkcode LayerApplier.applyLayer}. */
export interface LayerApplyOptions {
  /**
   * The paths that the layers above this one hide. Files there are left
   * out, as the module documentation describes. Needs
   * `reopen` and `LayerInfo.index`. Default: every entry is written.
   */
  hidden?: HiddenPaths;
  /**
   * Opens the layer's uncompressed tar stream again. It is called only
   * when a hardlink that survives, in this layer or a later one, points to
   * a file that was left out, to read that file's content.
   */
  reopen?: () => ReadableStream<Uint8Array>;
  /** Records the layer's changes while it is applied, for {@linkcode HiddenPaths} in later stages. */
  record?: ChangeRecorder;
}

/** Counts of what one layer changed. */
export interface LayerStats {
  /** Tar entries read, whiteouts and dropped entries included. */
  entries: number;
  files: number;
  directories: number;
  symlinks: number;
  hardlinks: number;
  /** Whiteout files and opaque markers. */
  whiteouts: number;
  /** Entries dropped (devices, FIFOs, entries below `dev/`, aufs metadata). */
  dropped: number;
  /** Bytes of file content written. */
  bytes: number;
  /**
   * Files and hardlinks left out because a layer above removes or replaces
   * them. A file that a hardlink of a later layer needs is written back
   * then, and stays in this count.
   */
  hidden: number;
}

/** A layer for {@linkcode applyLayers}: its uncompressed tar stream and its digest. */
export interface LayerSource {
  digest?: string;
  tar: ReadableStream<Uint8Array>;
}

/** Final metadata of a directory, applied by `finish()`. */
interface DirectoryMetadata {
  mode: number;
  mtime?: number;
  uid?: number;
  gid?: number;
}

/** Treatment of a missing component in a path lookup. */
type Missing = "create" | "require" | "lookup";

/** Warning codes and the sentence each count goes into. */
const WARNINGS: Record<string, (count: number) => string> = {
  "device-dropped": (count) => `dropped ${plural(count, "character or block device entry", "character or block device entries")}`,
  "fifo-dropped": (count) => `dropped ${plural(count, "FIFO entry", "FIFO entries")}`,
  "dev-entry-dropped": (count) => `dropped ${plural(count, "entry", "entries")} below dev/`,
  "hardlink-dropped": (count) => `dropped ${plural(count, "hardlink", "hardlinks")} to dropped entries`,
  "aufs-metadata-dropped": (count) => `dropped ${plural(count, "aufs metadata entry", "aufs metadata entries")} (.wh..wh.*)`,
  "xattr-ignored": (count) => `ignored the extended attributes of ${plural(count, "entry", "entries")}`,
  "trailing-data": (count) => `ignored ${plural(count, "non-zero byte", "non-zero bytes")} after the end of the tar archive`,
};

function plural(count: number, one: string, many: string): string {
  return `${count} ${count === 1 ? one : many}`;
}

const OPEN_NEW = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL |
  (fs.constants.O_NOFOLLOW ?? 0);

/**
 * Applies layers in order into one root directory; see the module
 * documentation for every rule.
 *
 * @example
 * ```ts
 * const applier = new LayerApplier("/tmp/rootfs");
 * for (const layer of layers) {
 *   await applier.applyLayer(decompressStream(layer.blob, "gzip"), { digest: layer.digest });
 * }
 * applier.finish();
 * ```
 */
export class LayerApplier {
  /** The real path of the root directory (symlinks resolved). */
  readonly root: string;
  readonly #tree: RootTree;
  readonly #onEvent?: EventHandler;

  /** Prepares to apply layers into `root`, which must be an existing directory (new or empty). */
  constructor(root: string, options: ApplyOptions = {}) {
    let real: string;
    try {
      real = fs.realpathSync(root);
    } catch (cause) {
      throw new TypeError(`stage root "${root}" does not exist: create the directory first`, { cause });
    }
    if (!fs.statSync(real).isDirectory()) {
      throw new TypeError(`stage root "${root}" is not a directory: pass a new or empty directory`);
    }
    this.root = real;
    this.#tree = new RootTree(real, options.owners ?? process.getuid?.() === 0);
    this.#onEvent = options.onEvent;
  }

  /**
   * Applies one layer from its uncompressed tar stream, reading the stream to
   * its end. A failure is a {@linkcode LayerError} carrying the layer digest
   * and, when one entry is to blame, its name. Errors of the stream itself
   * (a digest mismatch, a network failure) pass through unchanged.
   */
  async applyLayer(tar: ReadableStream<Uint8Array>, info: LayerInfo = {}, options: LayerApplyOptions = {}): Promise<LayerStats> {
    const { hidden, reopen } = options;
    if (hidden !== undefined && (reopen === undefined || info.index === undefined)) {
      throw new TypeError("applyLayer() with hidden paths needs a reopen function and the layer index");
    }
    if (reopen !== undefined && info.index !== undefined) this.#tree.reopen.set(info.index, reopen);
    const writer = new LayerWriter(this.#tree, info, hidden, options.record);
    let reader: TarReader;
    try {
      reader = await readTar(tar, writer);
    } catch (error) {
      writer.abort();
      if (error instanceof LayerError && error.layer === undefined) error.layer = info.digest;
      throw error;
    }

    try {
      await writer.fillPlaceholders();
    } catch (error) {
      if (error instanceof LayerError && error.layer === undefined) error.layer = info.digest;
      throw error;
    }
    if (reader.trailingNonZeroBytes > 0) writer.warn("trailing-data", reader.trailingNonZeroBytes);
    if (this.#onEvent !== undefined) writer.emitWarnings(this.#onEvent);
    return writer.stats;
  }

  /**
   * Applies the final mode, mtime and (with owners) uid and gid of every
   * directory, deepest first. Call once after the last layer.
   */
  finish(): void {
    this.#tree.finish();
  }
}

/**
 * Applies `layers` in order into `root` and then the final directory
 * metadata. `root` must be an existing directory, new or empty.
 */
export async function applyLayers(
  root: string,
  layers: Iterable<LayerSource> | AsyncIterable<LayerSource>,
  options: ApplyOptions = {},
): Promise<void> {
  const applier = new LayerApplier(root, options);
  let index = 0;
  for await (const layer of layers) {
    await applier.applyLayer(layer.tar, { digest: layer.digest, index });
    index++;
  }
  applier.finish();
}

/**
 * The root directory being staged: path lookups confined to it, and the
 * directory metadata deferred to the end. Shared by the layers of one stage.
 */
class RootTree {
  readonly root: string;
  readonly owners: boolean;
  /** Raw parent path (components joined by "/") to the resolved directory path, both relative to the root. */
  #directories = new Map<string, string>();
  /** Final metadata of every directory, by resolved path. */
  #deferred = new Map<string, DirectoryMetadata>();
  /** Resolved paths where a symlink or hardlink was ever created, for {@linkcode HiddenPaths}. */
  readonly links = new Set<string>();
  readonly isLink = (path: string): boolean => this.links.has(path);
  /** Files left out because upper layers hide them. */
  readonly leftOut = new LeftOutFiles();
  /** Opens the tar stream of a layer again, by layer index. */
  readonly reopen = new Map<number, () => ReadableStream<Uint8Array>>();
  /** Files written back for left-out content that a hardlink needs, by `layer:entry` of the content, and by path. */
  readonly placeholders = new Map<string, Placeholder>();
  readonly placeholderAt = new Map<string, Placeholder>();

  constructor(root: string, owners: boolean) {
    this.root = root;
    this.owners = owners;
  }

  /** Returns the absolute path of a path relative to the root. */
  absolute(path: string): string {
    return path === "" ? this.root : `${this.root}/${path}`;
  }

  /** Returns the lstat of a path relative to the root, or undefined when it does not exist. */
  lstat(path: string): fs.Stats | undefined {
    return fs.lstatSync(this.absolute(path), { throwIfNoEntry: false });
  }

  /** Records the final metadata of a directory; with `replace` false an existing record is kept. */
  deferDirectory(path: string, metadata: DirectoryMetadata, replace: boolean): void {
    if (replace || !this.#deferred.has(path)) this.#deferred.set(path, metadata);
  }

  /** Forgets cached lookups and deferred metadata at and below a removed directory. */
  forgetDirectory(path: string): void {
    this.#directories.clear();
    if (this.#deferred.size === 0) return;
    const prefix = path === "" ? "" : `${path}/`;
    for (const key of this.#deferred.keys()) {
      if (key === path || key.startsWith(prefix)) this.#deferred.delete(key);
    }
  }

  /** Forgets cached lookups after a symlink that a lookup may have crossed was removed. */
  forgetLookups(): void {
    this.#directories.clear();
  }

  /** Applies the deferred directory metadata, deepest first. */
  finish(): void {
    const paths = [...this.#deferred.keys()].sort((a, b) => depth(b) - depth(a));
    for (const path of paths) {
      const metadata = this.#deferred.get(path)!;
      const absolute = this.absolute(path);
      // chmod and utimes follow symlinks, so only a real directory is touched.
      if (!this.lstat(path)?.isDirectory()) continue;
      if (this.owners && metadata.uid !== undefined) fs.lchownSync(absolute, metadata.uid, metadata.gid ?? 0);
      fs.chmodSync(absolute, metadata.mode);
      if (metadata.mtime !== undefined) fs.utimesSync(absolute, metadata.mtime, metadata.mtime);
    }
    this.#deferred.clear();
  }

  /**
   * Resolves a directory given as raw components to a real directory inside
   * the root and returns its path relative to the root. With "create",
   * missing components of `parts` are created. Components reached through a
   * symlink must always exist. With "lookup", a missing or non-directory
   * component returns undefined; otherwise it is a {@linkcode LayerError}.
   */
  resolveDirectory(parts: string[], missing: Missing, entry: string): string | undefined {
    const key = parts.join("/");
    const cached = this.#directories.get(key);
    if (cached !== undefined) return cached;

    let resolved: string[] = [];
    let prefix = "";
    let start = 0;
    for (; start < parts.length; start++) {
      const next = start === 0 ? parts[0] : `${prefix}/${parts[start]}`;
      const hit = this.#directories.get(next);
      if (hit === undefined) break;
      prefix = next;
      resolved = hit === "" ? [] : hit.split("/");
    }

    const budget = { links: 0 };
    for (let i = start; i < parts.length; i++) {
      const step = this.#step(resolved, parts[i], missing, budget, entry);
      if (step === undefined) return undefined;
      resolved = step;
      prefix = i === 0 ? parts[0] : `${prefix}/${parts[i]}`;
      this.#directories.set(prefix, resolved.join("/"));
    }
    return resolved.join("/");
  }

  /** Resolves one component below the real directory `base`, following a symlink chroot-style. */
  #step(
    base: string[],
    name: string,
    missing: Missing,
    budget: { links: number },
    entry: string,
  ): string[] | undefined {
    if (name === "" || name === ".") return base;
    if (name === "..") return base.slice(0, -1);

    const candidate = [...base, name];
    const path = candidate.join("/");
    const stat = this.lstat(path);
    if (stat === undefined) {
      if (missing === "lookup") return undefined;
      // A left-out file is a file all the same: nothing can be written below it.
      if (this.leftOut.size > 0 && this.leftOut.get(path) !== undefined) throw belowFile(path, entry);
      if (missing === "require") {
        throw new LayerError(
          `parent directory ${quoteName(`/${path}`)} of entry ${quoteName(entry)} does not exist in the image: the layer refers to a missing path`,
          { entry },
        );
      }
      fs.mkdirSync(this.absolute(path), { mode: 0o755 });
      this.deferDirectory(path, { mode: 0o755 }, false);
      return candidate;
    }
    if (stat.isDirectory()) return candidate;

    if (stat.isSymbolicLink()) {
      budget.links++;
      if (budget.links > MAX_SYMLINKS) {
        throw new LayerError(
          `resolving the parent of entry ${quoteName(entry)} followed more than ${MAX_SYMLINKS} symlinks: the layer has a symlink loop`,
          { entry },
        );
      }
      const target = fs.readlinkSync(this.absolute(path));
      let current = target.startsWith("/") ? [] : base;
      const targetMissing = missing === "lookup" ? "lookup" : "require";
      for (const part of target.split("/")) {
        const next = this.#step(current, part, targetMissing, budget, entry);
        if (next === undefined) return undefined;
        current = next;
      }
      return current;
    }

    if (missing === "lookup") return undefined;
    throw belowFile(path, entry);
  }
}

function belowFile(path: string, entry: string): LayerError {
  return new LayerError(
    `parent ${quoteName(`/${path}`)} of entry ${quoteName(entry)} is not a directory: the layer writes below a file`,
    { entry },
  );
}

/** Largest uid and gid that chown applies. `0xffffffff` is -1 to chown, which means "leave unchanged". */
const MAX_ID = 0xffff_fffe;

/** Rejects a uid or gid that chown cannot apply, before anything of the entry is written. */
function checkOwner(header: TarHeader): void {
  for (const [field, id] of [["uid", header.uid], ["gid", header.gid]] as const) {
    if (id <= MAX_ID) continue;
    throw new LayerError(
      `tar entry ${quoteName(header.name)} has ${field} ${id}, above the Linux maximum of ${MAX_ID}: rebuild the layer with smaller ids, or stage with owners off`,
      { entry: header.name },
    );
  }
}

function depth(path: string): number {
  let count = 0;
  for (let i = 0; i < path.length; i++) if (path.charCodeAt(i) === 0x2f) count++;
  return count;
}

/** Applies the entries of one layer; the TarReader calls it synchronously. */
class LayerWriter implements TarHandler {
  readonly stats: LayerStats = {
    entries: 0,
    files: 0,
    directories: 0,
    symlinks: 0,
    hardlinks: 0,
    whiteouts: 0,
    dropped: 0,
    bytes: 0,
    hidden: 0,
  };

  readonly #tree: RootTree;
  readonly #info: LayerInfo;
  readonly #hidden?: HiddenPaths;
  readonly #recorder?: ChangeRecorder;
  /** Whether hidden entries are left out in this layer. */
  readonly #leaveOut: boolean;
  /** Resolved paths this layer wrote, and every ancestor of them. */
  readonly #written = new Set<string>();
  readonly #writtenAncestors = new Set<string>();
  /** Normalised names of entries this layer dropped, for hardlinks to them. */
  readonly #dropped = new Set<string>();
  readonly #warnings = new Map<string, number>();

  #entry = "";
  #fd: number | undefined;
  #file?: TarHeader;

  constructor(tree: RootTree, info: LayerInfo, hidden?: HiddenPaths, recorder?: ChangeRecorder) {
    this.#recorder = recorder;
    this.#tree = tree;
    this.#info = info;
    this.#hidden = hidden;
    const index = info.index ?? -1;
    this.#leaveOut = hidden !== undefined && index >= 0;
  }

  entry(header: TarHeader): void {
    this.#entry = header.name;
    this.stats.entries++;
    try {
      this.#applyEntry(header);
      this.#recorder?.entry(header);
    } catch (error) {
      throw this.#wrap(error);
    }
  }

  body(chunk: Uint8Array): void {
    if (this.#fd === undefined) return;
    try {
      writeAll(this.#fd, chunk);
      this.stats.bytes += chunk.length;
    } catch (error) {
      throw this.#wrap(error);
    }
  }

  entryEnd(): void {
    if (this.#fd === undefined) return;
    const fd = this.#fd;
    const header = this.#file!;
    this.#fd = undefined;
    this.#file = undefined;
    try {
      setFileMetadata(fd, header, this.#tree.owners);
    } catch (error) {
      throw this.#wrap(error);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Closes the file being written, if any, after a failure. */
  abort(): void {
    if (this.#fd === undefined) return;
    fs.closeSync(this.#fd);
    this.#fd = undefined;
  }

  warn(code: string, count = 1): void {
    this.#warnings.set(code, (this.#warnings.get(code) ?? 0) + count);
  }

  emitWarnings(onEvent: EventHandler): void {
    const layer = this.#info.digest;
    let where = "";
    if (layer !== undefined) where = ` of layer ${layer}`;
    else if (this.#info.index !== undefined) where = ` of layer ${this.#info.index}`;
    for (const [code, count] of this.#warnings) {
      onEvent({ type: "warning", code, message: `${WARNINGS[code](count)}${where}`, count, layer });
    }
  }

  #wrap(error: unknown): unknown {
    if (error instanceof LayerError) return error;
    if (!(error instanceof Error) || !("code" in error)) return error;
    return new LayerError(
      `writing entry ${quoteName(this.#entry)} failed (${error.message}): check free space and permissions of the stage directory`,
      { entry: this.#entry, cause: error },
    );
  }

  #applyEntry(header: TarHeader): void {
    const parts = splitName(header.name, header.name);
    if (parts.length === 0) {
      if (header.type === "dir") return;
      throw new LayerError(
        `tar entry ${quoteName(header.name)} names the root directory but is a ${header.type}: the layer is malformed`,
        { entry: header.name },
      );
    }
    this.#checkLength(parts);

    if (this.#drop(header, parts)) return;
    if (header.xattrs > 0) this.warn("xattr-ignored");

    const base = parts[parts.length - 1];
    const kind = whiteoutKind(base);
    if (kind === "opaque") {
      this.stats.whiteouts++;
      this.#opaque(parts.slice(0, -1));
      return;
    }
    if (kind === "whiteout") {
      this.stats.whiteouts++;
      this.#whiteout(parts.slice(0, -1), whiteoutTarget(base, header.name));
      return;
    }

    if (this.#tree.owners) checkOwner(header);
    const parent = this.#tree.resolveDirectory(parts.slice(0, -1), "create", header.name)!;
    const path = parent === "" ? base : `${parent}/${base}`;
    const link = header.type === "hardlink" ? this.#resolveLinkTarget(header) : undefined;
    if (this.#leaveOut && this.#isHidden(header, parts, path, link?.source)) {
      this.stats.hidden++;
      return;
    }
    // What was left out at this path is replaced, as the file would have been.
    if (this.#tree.leftOut.size > 0) {
      if (header.type === "dir") this.#tree.leftOut.delete(path);
      else this.#tree.leftOut.deleteBelow(path);
    }
    switch (header.type) {
      case "dir":
        this.#writeDirectory(path, header);
        break;
      case "file":
        this.#writeFile(path, header);
        break;
      case "symlink":
        this.#writeSymlink(path, header);
        break;
      case "hardlink":
        this.#writeHardlink(path, header, link!.target, link!.source);
        break;
    }
  }

  /**
   * Rejects a name that Linux could not create below the root, before any
   * of its parents are created.
   */
  #checkLength(parts: string[]): void {
    for (const part of parts) {
      if (part.length * 3 > NAME_MAX && Buffer.byteLength(part) > NAME_MAX) {
        throw new LayerError(
          `tar entry ${quoteName(this.#entry)} has a path component of more than ${NAME_MAX} bytes: the layer cannot be staged on Linux`,
          { entry: this.#entry },
        );
      }
    }
    const room = PATH_MAX - 2 - Buffer.byteLength(this.#tree.root);
    const length = parts.reduce((sum, part) => sum + part.length + 1, 0);
    if (length * 3 > room && Buffer.byteLength(parts.join("/")) > room) {
      throw new LayerError(
        `tar entry ${quoteName(this.#entry)} is too long to stage below "${this.#tree.root}" (Linux limits paths to ${PATH_MAX} bytes): stage into a shorter directory path`,
        { entry: this.#entry },
      );
    }
  }

  /** Drops devices, FIFOs, entries below dev/, aufs metadata and hardlinks to any of them. */
  #drop(header: TarHeader, parts: string[]): boolean {
    const code = dropReason(header, parts, this.#dropped);
    if (code === undefined) return false;
    this.stats.dropped++;
    this.warn(code);
    return true;
  }

  /**
   * Returns true when a layer above removes or replaces a file, so that it
   * need not be written, and records where its content is for hardlinks to
   * it. Directories and symlinks are always written, because later entries
   * may resolve through them, and so are hardlinks to files on disk.
   */
  #isHidden(header: TarHeader, parts: string[], path: string, linkSource: ContentSource | undefined): boolean {
    const index = this.#info.index!;
    let source: ContentSource | undefined;
    if (header.type === "file") source = { layer: index, entry: this.stats.entries };
    else if (header.type === "hardlink") source = linkSource;
    if (source === undefined || !this.#hidden!.hides(parts, index, this.#tree.isLink)) return false;
    // What the entry would have replaced goes all the same: a directory
    // there may contain what no upper layer removes.
    const stat = this.#tree.lstat(path);
    if (stat !== undefined) this.#remove(path, stat);
    this.#tree.leftOut.deleteBelow(path);
    this.#tree.leftOut.set(path, source);
    // Whiteouts of this layer spare the path, as they spare what it writes.
    this.#markWritten(path);
    return true;
  }

  /**
   * Resolves a hardlink's target. Returns its path relative to the root
   * (undefined when a directory on the way is missing) and, when the file
   * there was left out, where its content is.
   */
  #resolveLinkTarget(header: TarHeader): { target?: string; source?: ContentSource } {
    const targetParts = splitName(header.linkname, header.name, "link target");
    if (targetParts.length === 0) {
      throw new LayerError(`hardlink ${quoteName(header.name)} points to the root directory: the layer is malformed`, {
        entry: header.name,
      });
    }
    // A target below a missing directory or a file does not exist either.
    const parent = this.#tree.resolveDirectory(targetParts.slice(0, -1), "lookup", header.name);
    if (parent === undefined) return {};
    const base = targetParts[targetParts.length - 1];
    const target = parent === "" ? base : `${parent}/${base}`;
    return { target, source: this.#tree.leftOut.size > 0 ? this.#tree.leftOut.get(target) : undefined };
  }

  /**
   * Writes a left-out file back at its path, because a hardlink needs it:
   * as a link to a file already written back for the same content, which
   * shares the inode as the left-out file would, or else as an empty file
   * that {@linkcode fillPlaceholders} fills.
   */
  #writeBack(path: string, source: ContentSource): void {
    const tree = this.#tree;
    const key = `${source.layer}:${source.entry}`;
    const absolute = tree.absolute(path);
    let placeholder = tree.placeholders.get(key);
    const peer = placeholder?.paths[0];
    if (peer === undefined) {
      this.#replace(path, () => fs.closeSync(fs.openSync(absolute, OPEN_NEW, 0o600)));
    } else if (peer !== path) {
      this.#replace(path, () => fs.linkSync(tree.absolute(peer), absolute));
    }
    if (placeholder === undefined) {
      placeholder = { source, paths: [], filled: false };
      tree.placeholders.set(key, placeholder);
    }
    this.#addPlaceholderPath(placeholder, path);
    tree.leftOut.delete(path);
    // The count is of files not written; one left out by an earlier layer stays in that layer's count.
    if (source.layer === this.#info.index) this.stats.hidden--;
  }

  #addPlaceholderPath(placeholder: Placeholder, path: string): void {
    if (!placeholder.paths.includes(path)) placeholder.paths.push(path);
    this.#tree.placeholderAt.set(path, placeholder);
  }

  /** Forgets left-out files and placeholders at or below a path that was removed. */
  #forgetRemoved(path: string, directory: boolean): void {
    this.#tree.leftOut.deleteBelow(path);
    const placeholderAt = this.#tree.placeholderAt;
    if (placeholderAt.size === 0) return;
    for (const [key, placeholder] of placeholderAt) {
      if (key !== path && !(directory && key.startsWith(`${path}/`))) continue;
      placeholder.paths.splice(placeholder.paths.indexOf(key), 1);
      placeholderAt.delete(key);
    }
  }

  /**
   * Writes the content of left-out files into the placeholders that
   * hardlinks to them created, with the mode, owner and mtime of the file
   * entry, reading each layer that contains such content once more. Does
   * nothing when there are none.
   */
  async fillPlaceholders(): Promise<void> {
    const byLayer = new Map<number, Map<number, string>>();
    for (const placeholder of this.#tree.placeholders.values()) {
      const { source, paths } = placeholder;
      if (placeholder.filled || paths.length === 0) continue;
      placeholder.filled = true;
      let needed = byLayer.get(source.layer);
      if (needed === undefined) byLayer.set(source.layer, needed = new Map());
      needed.set(source.entry, paths[0]);
    }
    for (const [layer, needed] of byLayer) await this.#fillFrom(this.#tree.reopen.get(layer)!(), needed);
  }

  /** Reads a layer's tar stream and writes the content of the entries in `needed` (by ordinal) to their paths. */
  async #fillFrom(tar: ReadableStream<Uint8Array>, needed: Map<number, string>): Promise<void> {
    let ordinal = 0;
    let fd: number | undefined;
    let source: TarHeader | undefined;
    const tree = this.#tree;
    const handler: TarHandler = {
      entry: (header) => {
        ordinal++;
        const path = needed.get(ordinal);
        if (path === undefined) return;
        this.#entry = header.name;
        fd = fs.openSync(tree.absolute(path), fs.constants.O_WRONLY | fs.constants.O_TRUNC | (fs.constants.O_NOFOLLOW ?? 0));
        source = header;
      },
      body: (chunk) => {
        if (fd === undefined) return;
        writeAll(fd, chunk);
        this.stats.bytes += chunk.length;
      },
      entryEnd: () => {
        if (fd === undefined) return;
        const file = fd;
        fd = undefined;
        try {
          setFileMetadata(file, source!, tree.owners);
        } finally {
          fs.closeSync(file);
        }
      },
    };

    try {
      await readTar(tar, handler);
    } catch (error) {
      throw this.#wrap(error);
    } finally {
      if (fd !== undefined) fs.closeSync(fd);
    }
  }

  #markWritten(path: string): void {
    this.#written.add(path);
    let end = path.lastIndexOf("/");
    while (end > 0) {
      const ancestor = path.slice(0, end);
      if (this.#writtenAncestors.has(ancestor)) return;
      this.#writtenAncestors.add(ancestor);
      end = ancestor.lastIndexOf("/");
    }
  }

  #whiteout(parentParts: string[], name: string): void {
    const parent = this.#tree.resolveDirectory(parentParts, "lookup", this.#entry);
    if (parent === undefined) return;
    this.#removeLower(parent === "" ? name : `${parent}/${name}`);
  }

  #opaque(parentParts: string[]): void {
    const parent = this.#tree.resolveDirectory(parentParts, "lookup", this.#entry);
    if (parent === undefined) return;
    this.#tree.leftOut.deleteBelow(parent, this.#info.index ?? Infinity, true);
    for (const child of fs.readdirSync(this.#tree.absolute(parent))) {
      this.#removeLower(parent === "" ? child : `${parent}/${child}`);
    }
  }

  /** Removes what lower layers put at `path`, sparing every path this layer wrote. */
  #removeLower(path: string): void {
    // Files of lower layers that were left out go too; this layer's stay.
    this.#tree.leftOut.deleteBelow(path, this.#info.index ?? Infinity);
    const stat = this.#tree.lstat(path);
    if (stat === undefined) return;
    const spared = this.#written.has(path) || this.#writtenAncestors.has(path);
    if (!spared) {
      this.#remove(path, stat);
      return;
    }
    if (!stat.isDirectory()) return;
    for (const child of fs.readdirSync(this.#tree.absolute(path))) {
      this.#removeLower(`${path}/${child}`);
    }
  }

  /** Removes whatever is at `path`, without following a symlink there. */
  #remove(path: string, stat: fs.Stats): void {
    this.#forgetRemoved(path, stat.isDirectory());
    const absolute = this.#tree.absolute(path);
    if (stat.isDirectory()) {
      fs.rmSync(absolute, { recursive: true, force: true });
      this.#tree.forgetDirectory(path);
      return;
    }
    fs.unlinkSync(absolute);
    if (stat.isSymbolicLink()) this.#tree.forgetLookups();
  }

  /**
   * Runs `create`, which makes a new non-directory at `path`. When something
   * is already there, removes it and runs `create` again. Trying first saves
   * an lstat per entry in the common case of a new path.
   */
  #replace<T>(path: string, create: () => T): T {
    try {
      return create();
    } catch (error) {
      if ((error as { code?: string }).code !== "EEXIST") throw error;
    }
    const stat = this.#tree.lstat(path);
    if (stat !== undefined) this.#remove(path, stat);
    return create();
  }

  #writeDirectory(path: string, header: TarHeader): void {
    const absolute = this.#tree.absolute(path);
    try {
      fs.mkdirSync(absolute, { mode: 0o700 });
    } catch (error) {
      if ((error as { code?: string }).code !== "EEXIST") throw error;
      const stat = this.#tree.lstat(path)!;
      if (!stat.isDirectory()) {
        this.#remove(path, stat);
        fs.mkdirSync(absolute, { mode: 0o700 });
      }
    }

    this.#tree.deferDirectory(path, {
      mode: header.mode | 0o700,
      mtime: header.mtime,
      uid: header.uid,
      gid: header.gid,
    }, true);
    this.#markWritten(path);
    this.stats.directories++;
  }

  #writeFile(path: string, header: TarHeader): void {
    const absolute = this.#tree.absolute(path);
    this.#fd = this.#replace(path, () => fs.openSync(absolute, OPEN_NEW, 0o600));
    this.#file = header;
    this.#markWritten(path);
    this.stats.files++;
  }

  #writeSymlink(path: string, header: TarHeader): void {
    if (header.linkname === "") {
      throw new LayerError(`symlink ${quoteName(header.name)} has an empty target: the layer is malformed`, {
        entry: header.name,
      });
    }
    const absolute = this.#tree.absolute(path);
    this.#replace(path, () => fs.symlinkSync(header.linkname, absolute));
    this.#tree.links.add(path);
    if (this.#tree.owners) fs.lchownSync(absolute, header.uid, header.gid);
    try {
      fs.lutimesSync(absolute, header.mtime, header.mtime);
    } catch (error) {
      // Runtimes without lutimes keep the creation time of the symlink.
      if (!isUnsupported(error)) throw error;
    }
    this.#markWritten(path);
    this.stats.symlinks++;
  }

  #writeHardlink(path: string, header: TarHeader, target: string | undefined, source: ContentSource | undefined): void {
    this.#tree.links.add(path);
    if (source !== undefined) this.#writeBack(target!, source);

    const stat = target === undefined ? undefined : this.#tree.lstat(target);
    if (stat === undefined || stat.isDirectory()) {
      const problem = stat === undefined ? "does not exist" : "is a directory";
      throw new LayerError(
        `hardlink ${quoteName(header.name)} points to ${quoteName(header.linkname)}, which ${problem} in the image: the layer is malformed`,
        { entry: header.name },
      );
    }
    if (target! !== path) {
      const existing = this.#tree.absolute(target!);
      const absolute = this.#tree.absolute(path);
      this.#replace(path, () => fs.linkSync(existing, absolute));
      const placeholder = this.#tree.placeholderAt.get(target!);
      if (placeholder !== undefined) this.#addPlaceholderPath(placeholder, path);
    }
    this.#markWritten(path);
    this.stats.hardlinks++;
  }
}

/** Writes all of `chunk` to the open file `fd`. */
function writeAll(fd: number, chunk: Uint8Array): void {
  let written = 0;
  while (written < chunk.length) written += fs.writeSync(fd, chunk, written, chunk.length - written);
}

/** Sets the owner (with `owners`), mode and mtime of a file entry on its open file, adding owner read to the mode. */
function setFileMetadata(fd: number, header: TarHeader, owners: boolean): void {
  // chown before chmod, because chown clears the setuid and setgid bits.
  if (owners) fs.fchownSync(fd, header.uid, header.gid);
  fs.fchmodSync(fd, header.mode | 0o400);
  fs.futimesSync(fd, header.mtime, header.mtime);
}

/** A left-out file written back for a hardlink, and every path linked to it. */
interface Placeholder {
  source: ContentSource;
  paths: string[];
  /** Whether the content has been written. */
  filled: boolean;
}

function isUnsupported(error: unknown): boolean {
  const code = (error as { code?: string })?.code;
  return code === "ENOSYS" || code === "ENOTSUP" || code === "ERR_METHOD_NOT_IMPLEMENTED";
}
