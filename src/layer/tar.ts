/**
 * A push-based, synchronous tar reader for layer application.
 *
 * ocistage reads tar with its own decoder because modern-tar 0.8.7's decoder
 * turns unknown typeflags (GNU sparse `S`, vendor types) into regular files
 * and decodes names lossily, so it cannot enforce the rejection rules below.
 * A push-based reader also avoids one ReadableStream per entry, which matters
 * for layers of tens of thousands of small files. Body chunks are handed to
 * the handler as subarrays of the pushed chunk, without copying.
 *
 * Supported: ustar (with the `prefix` field), old v7 headers, GNU long names
 * and link names (`L`, `K`), and GNU base-256 numeric fields. PAX extended
 * (`x`) and global (`g`) headers may carry the `path`, `linkpath`, `size`,
 * `mtime`, `uid`, `gid`, `uname` and `gname` records.
 *
 * Rejected with a {@linkcode LayerError}:
 * - a header whose checksum matches neither the unsigned nor the signed sum;
 * - a name or link target that is not valid UTF-8 or contains NUL, because
 *   `node:fs` paths are strings on Deno and raw bytes cannot be written;
 * - sparse entries (typeflag `S` or PAX `GNU.sparse.*` records), multi-volume
 *   (`M`), volume labels (`V`) and every other unknown typeflag (`7`,
 *   contiguous files, counts as a regular file);
 * - PAX and GNU long-name records over {@linkcode MAX_META_SIZE} bytes;
 * - input that ends inside a header or a body, and a zero block followed by
 *   a non-zero block.
 *
 * Tolerated: input that ends without the two zero blocks, also when it ends
 * inside the padding after the last entry's complete body (umoci 0.4.7 writes
 * such layers, and umoci and Go's archive/tar read them), and any data after
 * the end blocks. Trailing bytes are counted in {@linkcode TarReader.trailingBytes} and
 * the non-zero ones in {@linkcode TarReader.trailingNonZeroBytes}: Docker and
 * containerd stop at the end marker and discard the rest, so rejecting it
 * would refuse images they run. The caller decides whether to warn.
 *
 * @module
 */

import { LayerError } from "../errors.ts";
import { quoteName } from "./names.ts";

/** Maximum size in bytes of one PAX header or GNU long-name record. */
export const MAX_META_SIZE = 1024 * 1024;

/** Entry types the reader hands to its handler. */
export type TarEntryType = "file" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo";

/** The decoded header of one tar entry, with PAX and GNU records applied. */
export interface TarHeader {
  /** Member name exactly as stored (not normalised). */
  name: string;
  type: TarEntryType;
  /** Permission and special bits (`mode & 0o7777`). */
  mode: number;
  uid: number;
  gid: number;
  /** Body size in bytes. */
  size: number;
  /** Modification time in seconds since the epoch (may be fractional from PAX). */
  mtime: number;
  /** Symlink or hardlink target exactly as stored, or "". */
  linkname: string;
  uname: string;
  gname: string;
  devmajor: number;
  devminor: number;
  /** Number of extended attribute records (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`). */
  xattrs: number;
  /** Byte offset of the entry's header in the tar stream. */
  offset: number;
}

/** Callbacks that a {@linkcode TarReader} calls synchronously from `push`. */
export interface TarHandler {
  /** Called once per entry, before its body. */
  entry(header: TarHeader): void;
  /** Called with consecutive pieces of the body; the array is only valid during the call. */
  body(chunk: Uint8Array): void;
  /** Called after the last body byte of the entry. */
  entryEnd(): void;
}

const BLOCK = 512;
const utf8 = new TextDecoder("utf-8", { fatal: true });
const lossy = new TextDecoder("utf-8");

type State = "header" | "body" | "meta" | "padding" | "zero" | "done";

/**
 * Parses a tar stream pushed chunk by chunk and calls a {@linkcode TarHandler}.
 *
 * @example
 * ```ts
 * const reader = new TarReader({
 *   entry: (header) => console.log(header.name),
 *   body: () => {},
 *   entryEnd: () => {},
 * });
 * for await (const chunk of stream) reader.push(chunk);
 * reader.end();
 * ```
 */
export class TarReader {
  /** Bytes after the end-of-archive marker. */
  trailingBytes = 0;
  /** Non-zero bytes after the end-of-archive marker. */
  trailingNonZeroBytes = 0;

  #handler: TarHandler;
  #state: State = "header";
  #block = new Uint8Array(BLOCK);
  #blockFill = 0;
  #offset = 0;
  #remaining = 0;
  #padding = 0;
  #current = "";

  #metaType = "";
  #meta: Uint8Array = new Uint8Array(0);
  #metaFill = 0;
  #longName?: Uint8Array;
  #longLink?: Uint8Array;
  #pax?: Map<string, Uint8Array>;
  #globalPax = new Map<string, Uint8Array>();

  constructor(handler: TarHandler) {
    this.#handler = handler;
  }

  /** True once the end-of-archive marker (two zero blocks) has been read. */
  get done(): boolean {
    return this.#state === "done";
  }

  /** Parses as much of `chunk` as possible; throws a {@linkcode LayerError} on malformed input. */
  push(chunk: Uint8Array): void {
    let position = 0;
    while (position < chunk.length) {
      switch (this.#state) {
        case "header":
        case "zero":
          position = this.#readBlock(chunk, position);
          break;
        case "body":
          position = this.#readBody(chunk, position);
          break;
        case "meta":
          position = this.#readMeta(chunk, position);
          break;
        case "padding":
          position = this.#skipPadding(chunk, position);
          break;
        case "done":
          this.#countTrailing(chunk, position);
          position = chunk.length;
          break;
      }
    }
  }

  /** Checks that the input did not stop inside an entry; call once after the last `push`. */
  end(): void {
    if (this.#state === "done" || this.#state === "padding") return;
    if (this.#state === "header" || this.#state === "zero") {
      if (this.#blockFill === 0 || isZero(this.#block.subarray(0, this.#blockFill))) {
        if (this.#pendingMeta()) {
          throw this.#error("tar stream ends after an extended header without its entry: the layer is truncated");
        }
        return;
      }
      throw this.#error(`tar stream is truncated inside the header at offset ${this.#offset}: the layer ends early`);
    }
    throw this.#error(
      `tar stream is truncated inside the body of entry ${quoteName(this.#current)}: the layer ends early`,
      this.#current,
    );
  }

  #pendingMeta(): boolean {
    return this.#longName !== undefined || this.#longLink !== undefined || this.#pax !== undefined;
  }

  #readBlock(chunk: Uint8Array, position: number): number {
    let block: Uint8Array;
    if (this.#blockFill === 0 && chunk.length - position >= BLOCK) {
      block = chunk.subarray(position, position + BLOCK);
      position += BLOCK;
    } else {
      const take = Math.min(BLOCK - this.#blockFill, chunk.length - position);
      this.#block.set(chunk.subarray(position, position + take), this.#blockFill);
      this.#blockFill += take;
      position += take;
      if (this.#blockFill < BLOCK) return position;
      block = this.#block;
      this.#blockFill = 0;
    }

    const offset = this.#offset;
    this.#offset += BLOCK;
    if (isZero(block)) {
      if (this.#state === "zero") this.#state = "done";
      else this.#state = "zero";
      return position;
    }
    if (this.#state === "zero") {
      throw this.#error(`tar stream has a lone zero block before offset ${offset}: the archive is corrupt`);
    }
    this.#parseHeader(block, offset);
    return position;
  }

  #readBody(chunk: Uint8Array, position: number): number {
    const take = Math.min(this.#remaining, chunk.length - position);
    this.#handler.body(chunk.subarray(position, position + take));
    this.#remaining -= take;
    this.#offset += take;
    if (this.#remaining === 0) this.#finishEntry();
    return position + take;
  }

  #readMeta(chunk: Uint8Array, position: number): number {
    const take = Math.min(this.#remaining, chunk.length - position);
    this.#meta.set(chunk.subarray(position, position + take), this.#metaFill);
    this.#metaFill += take;
    this.#remaining -= take;
    this.#offset += take;
    if (this.#remaining === 0) {
      this.#storeMeta();
      this.#state = this.#padding > 0 ? "padding" : "header";
    }
    return position + take;
  }

  #skipPadding(chunk: Uint8Array, position: number): number {
    const take = Math.min(this.#padding, chunk.length - position);
    this.#padding -= take;
    this.#offset += take;
    if (this.#padding === 0) this.#state = "header";
    return position + take;
  }

  #countTrailing(chunk: Uint8Array, position: number): void {
    this.trailingBytes += chunk.length - position;
    for (let i = position; i < chunk.length; i++) {
      if (chunk[i] !== 0) this.trailingNonZeroBytes++;
    }
  }

  #finishEntry(): void {
    this.#handler.entryEnd();
    this.#state = this.#padding > 0 ? "padding" : "header";
  }

  #parseHeader(block: Uint8Array, offset: number): void {
    verifyChecksum(block, offset);

    const typeflag = String.fromCharCode(block[156]);
    const size = this.#readNumber(block, 124, 12, "size", offset);
    const padding = (BLOCK - (size % BLOCK)) % BLOCK;

    if (typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K") {
      if (size > MAX_META_SIZE) {
        throw this.#error(
          `tar extended header at offset ${offset} is ${size} bytes, over the limit of ${MAX_META_SIZE}: the layer is malformed or hostile`,
        );
      }
      this.#metaType = typeflag;
      this.#meta = new Uint8Array(size);
      this.#metaFill = 0;
      this.#remaining = size;
      this.#padding = padding;
      if (size === 0) this.#storeMeta();
      if (size > 0) this.#state = "meta";
      else this.#state = padding > 0 ? "padding" : "header";
      return;
    }

    const header = this.#buildHeader(block, typeflag, size, offset);
    // Like Go's archive/tar (and so Docker), links, directories, devices and
    // FIFOs have no body, whatever their size field contains.
    if (header.type !== "file") header.size = 0;
    this.#current = header.name;
    this.#remaining = header.size;
    this.#padding = (BLOCK - (header.size % BLOCK)) % BLOCK;
    this.#handler.entry(header);
    if (header.size > 0) this.#state = "body";
    else this.#finishEntry();
  }

  #buildHeader(block: Uint8Array, typeflag: string, size: number, offset: number): TarHeader {
    const ustar = block[257] === 0x75 && block[258] === 0x73 && block[259] === 0x74 &&
      block[260] === 0x61 && block[261] === 0x72 && block[262] === 0;
    let nameBytes = this.#longName ?? fieldBytes(block, 0, 100);
    if (this.#longName === undefined && ustar && block[345] !== 0) {
      nameBytes = concat(fieldBytes(block, 345, 155), new Uint8Array([0x2f]), nameBytes);
    }
    let linkBytes = this.#longLink ?? fieldBytes(block, 157, 100);

    const pax = new Map(this.#globalPax);
    for (const [key, value] of this.#pax ?? []) pax.set(key, value);
    this.#longName = undefined;
    this.#longLink = undefined;
    this.#pax = undefined;

    const localPath = pax.get("path");
    if (localPath !== undefined) nameBytes = localPath;
    const localLink = pax.get("linkpath");
    if (localLink !== undefined) linkBytes = localLink;
    const name = decodeName(nameBytes, "name", lossy.decode(nameBytes), offset);

    const sparse = typeflag === "S" || [...pax.keys()].some((key) => key.startsWith("GNU.sparse."));
    if (sparse) {
      const sparseName = pax.get("GNU.sparse.name");
      const displayName = sparseName ? lossy.decode(sparseName) : name;
      throw this.#error(
        `tar entry ${quoteName(displayName)} is a sparse file, which ocistage does not support: rebuild the layer without GNU tar's --sparse option`,
        displayName,
      );
    }
    const type = entryType(typeflag, name);
    if (type === undefined) {
      throw this.#error(
        `tar entry ${quoteName(name)} has unsupported type ${describeFlag(typeflag)}: rebuild the layer with regular files, directories and links only`,
        name,
      );
    }
    const linkname = decodeName(linkBytes, "link target", name, offset);

    let xattrs = 0;
    for (const key of pax.keys()) {
      if (key.startsWith("SCHILY.xattr.") || key.startsWith("LIBARCHIVE.xattr.")) xattrs++;
    }

    return {
      name,
      type,
      mode: this.#readNumber(block, 100, 8, "mode", offset) & 0o7777,
      uid: this.#paxNumber(pax, "uid", name) ?? this.#readNumber(block, 108, 8, "uid", offset),
      gid: this.#paxNumber(pax, "gid", name) ?? this.#readNumber(block, 116, 8, "gid", offset),
      size: this.#paxNumber(pax, "size", name) ?? size,
      mtime: this.#paxNumber(pax, "mtime", name) ?? this.#readNumber(block, 136, 12, "mtime", offset),
      linkname,
      uname: paxString(pax, "uname") ?? lossy.decode(fieldBytes(block, 265, 32)),
      gname: paxString(pax, "gname") ?? lossy.decode(fieldBytes(block, 297, 32)),
      devmajor: ustar ? this.#readNumber(block, 329, 8, "devmajor", offset) : 0,
      devminor: ustar ? this.#readNumber(block, 337, 8, "devminor", offset) : 0,
      xattrs,
      offset,
    };
  }

  #storeMeta(): void {
    const data = this.#meta.subarray(0, this.#metaFill);
    this.#meta = new Uint8Array(0);
    switch (this.#metaType) {
      case "L":
        this.#longName = trimTrailingNul(data);
        break;
      case "K":
        this.#longLink = trimTrailingNul(data);
        break;
      case "x":
        this.#pax = parsePax(data, this.#offset);
        break;
      case "g":
        for (const [key, value] of parsePax(data, this.#offset)) {
          // Per-entry keys in a global header would give every later entry the same name or size.
          if (key === "path" || key === "linkpath" || key === "size") continue;
          this.#globalPax.set(key, value);
        }
        break;
    }
  }

  #readNumber(block: Uint8Array, start: number, length: number, field: string, offset: number): number {
    const value = parseNumber(block, start, length);
    if (value === undefined) {
      throw this.#error(`tar header at offset ${offset} has an invalid ${field} field: the layer is corrupt`);
    }
    return value;
  }

  #paxNumber(pax: Map<string, Uint8Array>, key: string, name: string): number | undefined {
    const raw = pax.get(key);
    if (raw === undefined) return undefined;
    const text = lossy.decode(raw);
    const pattern = key === "mtime" ? /^-?\d+(\.\d+)?$/ : /^\d+$/;
    const value = Number(text);
    if (!pattern.test(text) || !Number.isSafeInteger(Math.trunc(value))) {
      throw this.#error(`tar entry ${quoteName(name)} has an invalid PAX ${key} record ${quoteName(text)}: the layer is corrupt`, name);
    }
    return value;
  }

  #error(message: string, entry?: string): LayerError {
    return new LayerError(message, { entry });
  }
}

function isZero(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** Returns a string field's bytes up to the first NUL. */
function fieldBytes(block: Uint8Array, start: number, length: number): Uint8Array {
  let end = start;
  while (end < start + length && block[end] !== 0) end++;
  return block.subarray(start, end);
}

function trimTrailingNul(data: Uint8Array): Uint8Array {
  let end = data.length;
  while (end > 0 && data[end - 1] === 0) end--;
  return data.slice(0, end);
}

function decodeName(bytes: Uint8Array, field: string, entry: string, offset: number): string {
  if (bytes.includes(0)) {
    throw new LayerError(
      `tar entry ${quoteName(entry)} at offset ${offset} has a NUL byte in its ${field}: the layer is malformed`,
      { entry },
    );
  }
  try {
    return utf8.decode(bytes);
  } catch (cause) {
    throw new LayerError(
      `tar entry ${quoteName(entry)} at offset ${offset} has a ${field} that is not valid UTF-8, which ocistage cannot write: rebuild the layer with UTF-8 names`,
      { entry, cause },
    );
  }
}

/**
 * Parses an octal or GNU base-256 numeric field; returns undefined when the
 * field is invalid, negative or above `Number.MAX_SAFE_INTEGER`.
 */
function parseNumber(block: Uint8Array, start: number, length: number): number | undefined {
  const first = block[start];
  if (first & 0x80) {
    if (first !== 0x80) return undefined;
    let value = 0n;
    for (let i = start + 1; i < start + length; i++) value = (value << 8n) | BigInt(block[i]);
    return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : undefined;
  }

  let i = start;
  const end = start + length;
  while (i < end && (block[i] === 0x20 || block[i] === 0)) {
    if (block[i] === 0) return isZero(block.subarray(i, end)) ? 0 : undefined;
    i++;
  }
  let value = 0;
  for (; i < end; i++) {
    const byte = block[i];
    if (byte === 0 || byte === 0x20) break;
    if (byte < 0x30 || byte > 0x37) return undefined;
    value = value * 8 + (byte - 0x30);
  }
  return value;
}

function verifyChecksum(block: Uint8Array, offset: number): void {
  const stored = parseNumber(block, 148, 8);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : block[i];
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  if (stored === unsigned || stored === signed) return;
  throw new LayerError(
    `tar header at offset ${offset} has an invalid checksum (stored ${stored ?? "unreadable"}, computed ${unsigned}): the layer is corrupt`,
  );
}

function entryType(typeflag: string, name: string): TarEntryType | undefined {
  switch (typeflag) {
    case "0":
    case "7":
      return "file";
    case "\0":
      return name.endsWith("/") ? "dir" : "file";
    case "1":
      return "hardlink";
    case "2":
      return "symlink";
    case "3":
      return "char";
    case "4":
      return "block";
    case "5":
      return "dir";
    case "6":
      return "fifo";
    default:
      return undefined;
  }
}

function describeFlag(typeflag: string): string {
  const names: Record<string, string> = {
    S: "'S' (GNU sparse file)",
    V: "'V' (GNU volume label)",
    M: "'M' (GNU multi-volume continuation)",
    D: "'D' (GNU directory dump)",
  };
  const code = typeflag.charCodeAt(0);
  const printable = code >= 0x20 && code < 0x7f ? `'${typeflag}'` : `0x${code.toString(16).padStart(2, "0")}`;
  return names[typeflag] ?? printable;
}

function paxString(pax: Map<string, Uint8Array>, key: string): string | undefined {
  const raw = pax.get(key);
  return raw === undefined ? undefined : lossy.decode(raw);
}

/** Parses PAX records, `"<length> <key>=<value>\n"`, keeping values as bytes. */
function parsePax(data: Uint8Array, offset: number): Map<string, Uint8Array> {
  const records = new Map<string, Uint8Array>();
  let at = 0;
  while (at < data.length) {
    // Some writers pad the record area with NUL bytes.
    if (data[at] === 0) break;

    let space = at;
    let length = 0;
    while (space < data.length && data[space] >= 0x30 && data[space] <= 0x39) {
      length = length * 10 + (data[space] - 0x30);
      space++;
    }
    const end = at + length;
    if (space === at || data[space] !== 0x20 || end > data.length || end <= space + 1 || data[end - 1] !== 0x0a) {
      throw new LayerError(`tar PAX header before offset ${offset} has a malformed record: the layer is corrupt`);
    }
    const equals = data.indexOf(0x3d, space + 1);
    if (equals < 0 || equals >= end - 1) {
      throw new LayerError(`tar PAX header before offset ${offset} has a record without "=": the layer is corrupt`);
    }
    const key = lossy.decode(data.subarray(space + 1, equals));
    records.set(key, data.slice(equals + 1, end - 1));
    at = end;
  }
  return records;
}

/**
 * Reads a tar stream to its end through a new {@linkcode TarReader} and
 * returns the reader. On an error of the stream or the handler, cancels the
 * rest of the stream and throws the error.
 */
export async function readTar(tar: ReadableStream<Uint8Array>, handler: TarHandler): Promise<TarReader> {
  const reader = new TarReader(handler);
  const input = tar.getReader();
  try {
    for (;;) {
      const { done, value } = await input.read();
      if (done) break;
      reader.push(value);
    }
    reader.end();
  } catch (error) {
    input.cancel(error).catch(() => {});
    throw error;
  } finally {
    input.releaseLock();
  }
  return reader;
}
