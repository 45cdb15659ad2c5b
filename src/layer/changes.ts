/**
 * Layer changes, read from the tar headers alone, and the lower-layer paths
 * that the changes of upper layers hide.
 *
 * The layer applier uses {@linkcode HiddenPaths} to leave out files that an
 * upper layer would remove or replace anyway, so that each byte that
 * survives in the final tree is written once and the whiteouts of upper
 * layers find less to delete.
 *
 * Paths are the normalised entry names ({@linkcode splitName}) joined by
 * `/`, relative to the root, as the tar stream states them: symlinks are
 * not resolved here. The applier makes that safe (see `LayerApplier`).
 *
 * @module
 */

import { LayerError } from "../errors.ts";
import { readTar, type TarHandler, type TarHeader } from "./tar.ts";
import { quoteName, splitName, whiteoutKind, whiteoutTarget } from "./names.ts";

/**
 * The changes of one layer, by kind. Entries that the applier drops
 * (devices, FIFOs, entries below `dev/`, aufs metadata, hardlinks to any of
 * them) are left out.
 */
export interface LayerChanges {
  /** Paths of directory entries. */
  dirs: string[];
  /** Paths of regular-file entries. */
  files: string[];
  /** Paths of symlink entries. */
  symlinks: string[];
  /** Hardlink entries as `[path, target]`. */
  hardlinks: [string, string][];
  /** Targets of the hardlinks whose target this layer had not written before the link, so it lies in a lower layer. */
  lowerTargets: string[];
  /** Paths that `.wh.NAME` markers remove. */
  whiteouts: string[];
  /** Directories that carry an opaque marker. */
  opaque: string[];
}

/** Returns a {@linkcode LayerChanges} with no entries. */
export function emptyChanges(): LayerChanges {
  return { dirs: [], files: [], symlinks: [], hardlinks: [], lowerTargets: [], whiteouts: [], opaque: [] };
}

/**
 * Returns why the applier drops an entry, as a warning code, or undefined
 * when it keeps it. `dropped` contains the paths dropped so far in the same
 * layer, for hardlinks to them; a dropped entry's path is added to it.
 */
export function dropReason(header: TarHeader, parts: string[], dropped: Set<string>): string | undefined {
  let code: string | undefined;
  if (parts[0] === "dev" && parts.length > 1) code = "dev-entry-dropped";
  else if (header.type === "char" || header.type === "block") code = "device-dropped";
  else if (header.type === "fifo") code = "fifo-dropped";
  else if (parts.some((part) => whiteoutKind(part) === "aufs-metadata")) code = "aufs-metadata-dropped";
  else if (header.type === "hardlink") {
    const target = splitName(header.linkname, header.name, "link target");
    if ((target[0] === "dev" && target.length > 1) || dropped.has(target.join("/"))) code = "hardlink-dropped";
  }
  if (code !== undefined) dropped.add(parts.join("/"));
  return code;
}

/**
 * A {@linkcode TarHandler} that records the changes of a layer and ignores
 * the bodies. Names are checked as the applier checks them, so a name that
 * the applier rejects is a {@linkcode LayerError} here too.
 */
export class ChangeRecorder implements TarHandler {
  readonly changes: LayerChanges = emptyChanges();
  readonly #dropped = new Set<string>();
  /** Paths of the non-directories written so far. */
  readonly #written = new Set<string>();

  entry(header: TarHeader): void {
    const parts = splitName(header.name, header.name);
    if (parts.length === 0) {
      if (header.type === "dir") return;
      throw new LayerError(
        `tar entry ${quoteName(header.name)} names the root directory but is a ${header.type}: the layer is malformed`,
        { entry: header.name },
      );
    }
    if (dropReason(header, parts, this.#dropped) !== undefined) return;

    const path = parts.join("/");
    const base = parts[parts.length - 1];
    const kind = whiteoutKind(base);
    if (kind === "opaque") {
      this.changes.opaque.push(parts.slice(0, -1).join("/"));
      return;
    }
    if (kind === "whiteout") {
      const target = whiteoutTarget(base, header.name);
      this.changes.whiteouts.push(parts.length === 1 ? target : `${parts.slice(0, -1).join("/")}/${target}`);
      return;
    }

    switch (header.type) {
      case "dir":
        this.changes.dirs.push(path);
        break;
      case "file":
        this.changes.files.push(path);
        this.#written.add(path);
        break;
      case "symlink":
        this.changes.symlinks.push(path);
        this.#written.add(path);
        break;
      case "hardlink": {
        const target = splitName(header.linkname, header.name, "link target").join("/");
        this.changes.hardlinks.push([path, target]);
        if (!this.#written.has(target)) this.changes.lowerTargets.push(target);
        this.#written.add(path);
        break;
      }
    }
  }

  body(): void {}

  entryEnd(): void {}
}

/** Reads a layer's uncompressed tar stream to its end and returns its changes. */
export async function readLayerChanges(tar: ReadableStream<Uint8Array>): Promise<LayerChanges> {
  const recorder = new ChangeRecorder();
  await readTar(tar, recorder);
  return recorder.changes;
}

/**
 * Parses changes stored as JSON by {@linkcode JSON.stringify}. Returns
 * undefined for text of any other shape, so that a damaged record is read
 * again from the layer instead of trusted.
 */
export function parseLayerChanges(text: string): LayerChanges | undefined {
  try {
    return toLayerChanges(JSON.parse(text));
  } catch {
    return undefined;
  }
}

/** Returns `value` as {@linkcode LayerChanges} when it has that shape, else undefined. */
export function toLayerChanges(input: unknown): LayerChanges | undefined {
  if (typeof input !== "object" || input === null) return undefined;
  const value = input as Record<string, unknown>;
  const strings = (list: unknown): list is string[] => Array.isArray(list) && list.every((item) => typeof item === "string");
  const pairs = (list: unknown): list is [string, string][] =>
    Array.isArray(list) && list.every((item) => Array.isArray(item) && item.length === 2 && strings(item));
  const { dirs, files, symlinks, hardlinks, lowerTargets, whiteouts, opaque } = value;
  if (
    !strings(dirs) || !strings(files) || !strings(symlinks) || !pairs(hardlinks) || !strings(lowerTargets) ||
    !strings(whiteouts) || !strings(opaque)
  ) {
    return undefined;
  }
  return { dirs, files, symlinks, hardlinks, lowerTargets, whiteouts, opaque };
}

/** The highest layer that applies each kind of change at one path; -1 for none. */
interface PathChanges {
  /** A whiteout removes the path and everything below it. */
  whiteout: number;
  /** An opaque marker hides what lower layers put below the path. */
  opaque: number;
  /** A file, symlink or hardlink replaces the path and everything below it. */
  nonDirectory: number;
  /** A directory replaces a non-directory at the path. */
  directory: number;
  /** A hardlink links to what a lower layer put at the path. */
  linkTarget: number;
}

/**
 * The files of lower layers that upper layers hide: removed by a whiteout
 * or an opaque marker, or replaced by a directory or a newer non-directory.
 * Built from the known changes of the layers above the lowest.
 *
 * `hides` decides from names alone. It is exact only while every directory
 * on the path is a real directory, so the caller passes the paths where
 * symlinks were created (see {@linkcode HiddenPaths.hides}).
 *
 * @example
 * ```ts
 * const hidden = new HiddenPaths([undefined, { ...emptyChanges(), whiteouts: ["etc/motd"] }]);
 * hidden.hides(["etc", "motd"], 0, () => false); // true
 * ```
 */
export class HiddenPaths {
  readonly #paths = new Map<string, PathChanges>();

  /**
   * `changes[i]` contains the changes of layer `i`, or undefined when they
   * are unknown. Layer 0's are not needed. A layer with unknown changes
   * hides nothing here, so fewer files are left out. The applier handles
   * what such a layer does to a left-out file (a hardlink to it, a
   * whiteout) when it applies the layer.
   */
  constructor(changes: (LayerChanges | undefined)[]) {
    for (let layer = 1; layer < changes.length; layer++) {
      const layerChanges = changes[layer];
      if (layerChanges === undefined) continue;
      for (const path of layerChanges.whiteouts) this.#at(path).whiteout = layer;
      for (const path of layerChanges.opaque) this.#at(path).opaque = layer;
      for (const path of layerChanges.dirs) this.#at(path).directory = layer;
      for (const path of layerChanges.files) this.#at(path).nonDirectory = layer;
      for (const path of layerChanges.symlinks) this.#at(path).nonDirectory = layer;
      for (const [path] of layerChanges.hardlinks) this.#at(path).nonDirectory = layer;
      for (const path of layerChanges.lowerTargets) this.#at(path).linkTarget = layer;
    }
  }

  /**
   * True when a non-directory of `layer` at `parts` is certain not to
   * survive, because a layer above removes or replaces it, and no layer
   * above names it as a hardlink target. `isLink(path)` returns whether a
   * symlink (or a hardlink, which can be one) was ever created at `path`.
   * An entry below such a path is never hidden, because its real path may
   * differ from its name.
   */
  hides(parts: string[], layer: number, isLink: (path: string) => boolean): boolean {
    // An opaque marker at the root hides every entry of the layers below it.
    let hidden = (this.#paths.get("")?.opaque ?? -1) > layer;
    let prefix = "";
    let changes: PathChanges | undefined;
    const last = parts.length - 1;
    for (let i = 0; i <= last; i++) {
      prefix = i === 0 ? parts[0] : `${prefix}/${parts[i]}`;
      if (i < last && isLink(prefix)) return false;
      changes = this.#paths.get(prefix);
      if (changes === undefined || hidden) continue;
      if (changes.whiteout > layer) hidden = true;
      else if (i < last) hidden = changes.opaque > layer || changes.nonDirectory > layer;
      else hidden = changes.nonDirectory > layer || changes.directory > layer;
    }
    // A link from above would need the content; it is written rather than read twice.
    return hidden && (changes?.linkTarget ?? -1) <= layer;
  }

  #at(path: string): PathChanges {
    let changes = this.#paths.get(path);
    if (changes === undefined) {
      changes = { whiteout: -1, opaque: -1, nonDirectory: -1, directory: -1, linkTarget: -1 };
      this.#paths.set(path, changes);
    }
    return changes;
  }
}

/** The location of a left-out file's content: the layer and the ordinal of its tar entry (1 for the first). */
export interface ContentSource {
  layer: number;
  entry: number;
}

interface LeftOutNode {
  source?: ContentSource;
  children?: Map<string, LeftOutNode>;
}

/**
 * The files left out so far, by real path, with where their content is, so
 * that a hardlink to one can get the content. Paths are forgotten when
 * something is written there or when they are removed, as the files would
 * have been.
 */
export class LeftOutFiles {
  readonly #root: LeftOutNode = {};
  #size = 0;

  /** Number of paths recorded. */
  get size(): number {
    return this.#size;
  }

  get(path: string): ContentSource | undefined {
    return this.#node(path, false)?.source;
  }

  set(path: string, source: ContentSource): void {
    const node = this.#node(path, true)!;
    if (node.source === undefined) this.#size++;
    node.source = source;
  }

  /** Forgets the file at `path`, not what is below it. */
  delete(path: string): void {
    const node = this.#node(path, false);
    if (node?.source === undefined) return;
    node.source = undefined;
    this.#size--;
  }

  /**
   * Forgets `path` and everything below it that a layer below `layer` left
   * out; with `childrenOnly`, only what is below it.
   */
  deleteBelow(path: string, layer = Infinity, childrenOnly = false): void {
    if (this.#size === 0) return;
    const node = this.#node(path, false);
    if (node === undefined) return;
    const visit = (current: LeftOutNode, self: boolean): void => {
      if (self && current.source !== undefined && current.source.layer < layer) {
        current.source = undefined;
        this.#size--;
      }
      for (const child of current.children?.values() ?? []) visit(child, true);
    };
    visit(node, !childrenOnly);
  }

  #node(path: string, create: boolean): LeftOutNode | undefined {
    let node = this.#root;
    if (path === "") return node;
    for (const part of path.split("/")) {
      let child = node.children?.get(part);
      if (child === undefined) {
        if (!create) return undefined;
        child = {};
        (node.children ??= new Map()).set(part, child);
      }
      node = child;
    }
    return node;
  }
}
