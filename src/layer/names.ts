/**
 * Entry names in layer tar streams: normalisation and the whiteout
 * vocabulary of the OCI image spec's layer changesets.
 *
 * @module
 */

import { LayerError } from "../errors.ts";

/** Maximum length of a name shown in full in an error message. Longer names are shortened in the middle. */
const MAX_SHOWN = 200;

/**
 * Quotes a name for an error message: control characters escaped as JSON
 * does, and names over 200 characters shortened in the middle.
 */
export function quoteName(name: string): string {
  const shortened = name.length > MAX_SHOWN ? `${name.slice(0, 120)}...${name.slice(-60)}` : name;
  return JSON.stringify(shortened);
}

/** Prefix of a whiteout file: `dir/.wh.NAME` removes `dir/NAME` from lower layers. */
export const WHITEOUT_PREFIX = ".wh.";

/** Opaque whiteout marker: `dir/.wh..wh..opq` hides every lower-layer child of `dir`. */
export const OPAQUE_MARKER = ".wh..wh..opq";

/**
 * Prefix of aufs metadata (`.wh..wh.plnk`, `.wh..wh.aufs`), which old Docker
 * layers may contain and which is not part of the image.
 */
export const AUFS_METADATA_PREFIX = ".wh..wh.";

/** Meaning of an entry's base name in the whiteout vocabulary. */
export type WhiteoutKind = "opaque" | "whiteout" | "aufs-metadata" | "none";

/**
 * Classifies a base name. The opaque marker is checked before the generic
 * prefix, so `.wh..wh..opq` never reads as a whiteout of `.wh..opq`.
 */
export function whiteoutKind(base: string): WhiteoutKind {
  if (base === OPAQUE_MARKER) return "opaque";
  if (base.startsWith(AUFS_METADATA_PREFIX)) return "aufs-metadata";
  if (base.startsWith(WHITEOUT_PREFIX)) return "whiteout";
  return "none";
}

/**
 * Returns the name that a `.wh.NAME` whiteout removes; throws a
 * {@linkcode LayerError} when NAME is empty, `.` or `..`, because such a
 * marker names no sibling of the directory that contains it.
 */
export function whiteoutTarget(base: string, entry: string): string {
  const target = base.slice(WHITEOUT_PREFIX.length);
  if (target === "" || target === "." || target === "..") {
    throw new LayerError(
      `whiteout ${quoteName(entry)} names no file (".wh." followed by "${target}"): the layer is malformed; rebuild it`,
      { entry },
    );
  }
  return target;
}

/**
 * Splits an entry name or hardlink target into path components relative to
 * the root. Leading `/` and `./`, empty components and `.` are dropped, and
 * `..` removes the component before it. An empty result is the root itself.
 *
 * Throws a {@linkcode LayerError} for an empty name, a NUL byte, or a `..`
 * that climbs above the root.
 *
 * @example
 * ```ts
 * splitName("./usr//bin/../lib/", "x"); // ["usr", "lib"]
 * ```
 */
export function splitName(name: string, entry: string, field = "name"): string[] {
  if (name === "") {
    throw new LayerError(`tar entry has an empty ${field}: the layer is malformed; rebuild it`, { entry });
  }
  if (name.includes("\0")) {
    throw new LayerError(`tar entry ${quoteName(entry)} has a NUL byte in its ${field}: the layer is malformed`, { entry });
  }

  const parts: string[] = [];
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part !== "..") {
      parts.push(part);
      continue;
    }
    if (parts.length === 0) {
      throw new LayerError(
        `tar entry ${quoteName(entry)} has a ${field} ${quoteName(name)} that climbs above the root with "..": the layer is malformed or hostile`,
        { entry },
      );
    }
    parts.pop();
  }
  return parts;
}
