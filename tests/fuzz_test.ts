/**
 * Bounded, deterministic fuzz tests for the layer applier and the
 * `WWW-Authenticate` parser.
 *
 * Every run uses a fixed seed, printed in the test name and in every failure
 * message together with the iteration. Set `OCISTAGE_FUZZ_SEED` and
 * `OCISTAGE_FUZZ_ITERATIONS` for deeper local runs, for example:
 *
 * ```sh
 * OCISTAGE_FUZZ_SEED=0x1234 OCISTAGE_FUZZ_ITERATIONS=50000 npx deno test -A tests/fuzz_test.ts
 * ```
 *
 * `OCISTAGE_FUZZ_ITERATIONS` sets the applier's iteration count, and the
 * parser tests scale with it.
 *
 * Deno's and Bun's test runners fail a test on an unhandled promise
 * rejection themselves, before a `process` listener sees it, so such a
 * failure names the seed but not the iteration: lower
 * `OCISTAGE_FUZZ_ITERATIONS` to find it.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { createVerifyStream, type Digest } from "../src/digest.ts";
import { DigestMismatchError, LayerError } from "../src/errors.ts";
import { LayerApplier } from "../src/layer/apply.ts";
import { decompressStream } from "../src/layer/decompress.ts";
import { type Challenge, parseWwwAuthenticate } from "../src/registry/auth.ts";
import { formatSeed, fuzzSettings, iterationSeed, Prng } from "./fixtures/prng.ts";
import { buildEntry, buildGlobalHeader, buildTar, concat, gzipBytes, streamOf, type TarEntrySpec } from "./fixtures/tar.ts";
import { createWorkspace, snapshot, type Workspace } from "./fixtures/workspace.ts";

const APPLIER_ITERATIONS = 800;
const HEADER_ITERATIONS = 20_000;
const ROUND_TRIP_ITERATIONS = 4_000;

const applierSettings = fuzzSettings(0x0c15_7a6e, APPLIER_ITERATIONS);
const headerSettings = fuzzSettings(0x0c15_7a6e, HEADER_ITERATIONS, APPLIER_ITERATIONS);
const roundTripSettings = fuzzSettings(0x0c15_7a6e, ROUND_TRIP_ITERATIONS, APPLIER_ITERATIONS);

/** Prefix of every name a breakout would create. The test checks that no such name appears outside a root. */
const TOKEN_PREFIX = "ocistage-fuzz-";

/**
 * Timeout of each fuzz test. Bun's test runner stops a test after 5 s by
 * default, which a deep run or a slow disk exceeds.
 */
const TEST_TIMEOUT_MS = 3_600_000;

/** Iterations that share one workspace. Each iteration starts with an empty root. */
const WORKSPACE_REUSE = 50;

/** Bound on one layer application. It only turns a hang into a failure that names the iteration. */
const HANG_LIMIT_MS = 30_000;

const BLOCK = 512;
const encoder = new TextEncoder();

// ---------------------------------------------------------------------------
// Seed layers

/** The workspace paths and the breakout token that seed layers are built from. */
interface Context {
  outside: string;
  token: string;
}

/** A layer built from entries, with a name for failure messages. */
interface SeedLayer {
  name: string;
  tar: Uint8Array;
}

/** Names and link targets that try to escape the root or break the whiteout rules. */
function hostileNames({ outside, token }: Context): (string | Uint8Array)[] {
  return [
    `../${token}`,
    `/etc/${token}`,
    `a/../../${token}`,
    `./../${token}`,
    `/../outside/${token}`,
    `${outside}/${token}`,
    `pwn/${token}`,
    `up/outside/${token}`,
    `up/../${token}`,
    `rootlink/../../${token}`,
    `etc/${token}`,
    `loop1/${token}`,
    `dangling/${token}`,
    `via/../../${token}`,
    `hl/${token}`,
    `usr/bin/tool/${token}`,
    `dev/${token}`,
    `/proc/self/cwd/${token}`,
    `a\\..\\${token}`,
    ".wh..",
    ".wh.",
    ".wh...",
    ".wh..wh..opq",
    ".wh..wh.plnk",
    `real/.wh.${token}`,
    ".wh.etc",
    ".wh.usr",
    "..",
    ".",
    "/",
    "./",
    "",
    "//",
    "a/..",
    "../..",
    "../outside",
    outside,
    "dev",
    "dev/../etc/passwd",
    `x\0${token}`,
    "\0",
    `${"n".repeat(99)}/`,
    new Uint8Array([0xff, 0xfe, 0x2f, 0x41]),
    new Uint8Array([0x61, 0x2f, 0xc3]),
  ];
}

function seedLayers(context: Context, rng: Prng): SeedLayer[] {
  const { outside, token } = context;
  const deep = `deep/${"d".repeat(90)}/${"e".repeat(90)}/${token}`;

  const tree: TarEntrySpec[] = [
    { path: "etc/", type: "dir" },
    { path: "etc/hostname", content: "box\n" },
    { path: "usr/bin/", type: "dir" },
    { path: "usr/bin/tool", mode: 0o4755, content: "x".repeat(700) },
    { path: "usr/bin/sh", type: "symlink", linkname: "tool" },
    { path: "usr/bin/tool2", type: "hardlink", linkname: "usr/bin/tool" },
    { path: "abs", type: "symlink", linkname: "/usr/bin" },
    { path: "./lead/dot", content: "" },
    { path: "/slash/file", content: "s", mtime: 0 },
    { path: "dev/", type: "dir" },
    { path: "dev/null", type: "char", devmajor: 1, devminor: 3 },
    { path: "pipe", type: "fifo" },
    { path: "blk", type: "block", devmajor: 8 },
    { path: "closed/", type: "dir", mode: 0 },
    { path: "sticky/", type: "dir", mode: 0o1777 },
    { path: "exact", content: "y".repeat(BLOCK) },
  ];

  const links: TarEntrySpec[] = [
    { path: "pwn", type: "symlink", linkname: outside },
    { path: "up", type: "symlink", linkname: "../.." },
    { path: "rootlink", type: "symlink", linkname: "/" },
    { path: "etc", type: "symlink", linkname: "/etc" },
    { path: "loop1", type: "symlink", linkname: "loop2" },
    { path: "loop2", type: "symlink", linkname: "loop1" },
    { path: "real/", type: "dir" },
    { path: "via", type: "symlink", linkname: "real" },
    { path: `via/${token}`, content: "through a relative symlink" },
    { path: `rootlink/${token}-root`, content: "through /" },
    { path: `up/real/${token}-up`, content: "through ../.." },
    { path: "hl", type: "hardlink", linkname: `via/${token}` },
    { path: "dangling", type: "symlink", linkname: "nowhere/at/all" },
  ];

  const whiteouts: TarEntrySpec[] = [
    { path: "etc/", type: "dir" },
    { path: "etc/.wh.hostname" },
    { path: "usr/bin/.wh..wh..opq" },
    { path: "usr/bin/fresh", content: "new" },
    { path: ".wh.abs" },
    { path: ".wh.pipe" },
    { path: "real/.wh..wh..opq" },
    { path: ".wh..wh.plnk/123", content: "aufs" },
    { path: "a/.wh.b" },
    { path: `.wh.${token}` },
    { path: "sticky/.wh..wh..opq" },
    { path: ".wh.lead" },
  ];

  const longNames: TarEntrySpec[] = [
    { path: deep, content: "pax path" },
    { path: `gnu/${"g".repeat(150)}`, content: "gnu path", longName: "gnu" },
    { path: "gnulink", type: "symlink", linkname: `${"l".repeat(120)}/${outside}`, longName: "gnu" },
    { path: "paxhard", type: "hardlink", linkname: deep },
    { path: "big", content: "b".repeat(1000), base256Size: true },
    { path: "times", content: "t", pax: { mtime: "1700000000.25", uid: "1000", gid: "1000", "SCHILY.xattr.user.k": "v" } },
    { path: "innocent", content: "renamed by PAX", pax: { path: `paxdir/${token}` } },
    { path: "utf8/\u00e9\u6587\u5b57", content: "utf-8" },
  ];

  const replacements: TarEntrySpec[] = [
    { path: "etc", content: "a file over a directory" },
    { path: "usr/bin/tool/", type: "dir" },
    { path: "usr/bin/sh", content: "a file over a symlink" },
    { path: "usr/bin/tool2", type: "symlink", linkname: "../../etc" },
    { path: "dup", content: "first" },
    { path: "dup", content: "second" },
    { path: "dup/", type: "dir" },
    { path: "dup/inner", content: "inner" },
    { path: "dup", type: "symlink", linkname: "etc" },
    { path: "abs/through-abs", content: "through an absolute symlink" },
  ];

  const names = hostileNames(context);
  const hostile: TarEntrySpec[] = [
    { path: "safe", content: "ok" },
    { path: "real/", type: "dir" },
    { path: "via", type: "symlink", linkname: "real" },
    { path: "pwn", type: "symlink", linkname: outside },
    { path: "up", type: "symlink", linkname: "../.." },
    { path: "rootlink", type: "symlink", linkname: "/" },
  ];
  const hostileCount = rng.range(1, 3);
  for (let i = 0; i < hostileCount; i++) {
    const type = rng.pick(["file", "dir", "symlink", "hardlink"] as const);
    const linkname = type === "symlink" || type === "hardlink" ? rng.pick(names) : undefined;
    const content = type === "file" ? "hostile" : undefined;
    hostile.splice(rng.int(hostile.length + 1), 0, { path: rng.pick(names), type, linkname, content });
  }

  return [
    { name: "tree", tar: buildTar(tree) },
    { name: "links", tar: buildTar(links) },
    { name: "whiteouts", tar: buildTar(whiteouts) },
    {
      name: "long-names",
      tar: concat([buildGlobalHeader({ uname: "fuzz", mtime: "1600000000", path: "ignored" }), buildTar(longNames)]),
    },
    { name: "replacements", tar: buildTar(replacements) },
    { name: "hostile", tar: buildTar(hostile) },
  ];
}

// ---------------------------------------------------------------------------
// Mutations

/** Header fields as [name, offset, length]. */
const HEADER_FIELDS: [string, number, number][] = [
  ["name", 0, 100],
  ["mode", 100, 8],
  ["uid", 108, 8],
  ["gid", 116, 8],
  ["size", 124, 12],
  ["mtime", 136, 12],
  ["checksum", 148, 8],
  ["typeflag", 156, 1],
  ["linkname", 157, 100],
  ["magic", 257, 8],
  ["uname", 265, 32],
  ["devmajor", 329, 8],
  ["prefix", 345, 155],
];

const NUMERIC_FIELDS: [string, number, number][] = [
  ["mode", 100, 8],
  ["uid", 108, 8],
  ["gid", 116, 8],
  ["size", 124, 12],
  ["mtime", 136, 12],
];

const TYPEFLAGS = "0123456789xgLKSVMDAN\0 ";

/** Offsets of the blocks that look like ustar headers. */
function headerOffsets(data: Uint8Array): number[] {
  const offsets: number[] = [];
  for (let at = 0; at + BLOCK <= data.length; at += BLOCK) {
    if (data[at + 257] === 0x75 && data[at + 258] === 0x73 && data[at + 259] === 0x74 && data[at + 262] === 0) {
      offsets.push(at);
    }
  }
  return offsets;
}

/** Rewrites the checksum of the header at `at` so that it matches the block again. */
function fixChecksum(data: Uint8Array, at: number): void {
  data.fill(0x20, at + 148, at + 156);
  let sum = 0;
  for (let i = at; i < at + BLOCK; i++) sum += data[i];
  data.set(encoder.encode(sum.toString(8).padStart(6, "0")), at + 148);
  data[at + 154] = 0;
}

/** Reads an octal field, or returns 0 when it is not plain octal. */
function octalField(data: Uint8Array, at: number, length: number): number {
  let value = 0;
  for (let i = at; i < at + length && data[i] !== 0 && data[i] !== 0x20; i++) {
    if (data[i] < 0x30 || data[i] > 0x37) return 0;
    value = value * 8 + data[i] - 0x30;
  }
  return value;
}

function writeField(data: Uint8Array, at: number, length: number, value: Uint8Array): void {
  data.fill(0, at, at + length);
  data.set(value.subarray(0, length), at);
}

function toBytes(value: string | Uint8Array): Uint8Array {
  return typeof value === "string" ? encoder.encode(value) : value;
}

function describeBytes(value: string | Uint8Array): string {
  return typeof value === "string" ? JSON.stringify(value) : `bytes[${[...value].join(",")}]`;
}

/** Returns a random number field (octal digits, base-256 or garbage) and its description. */
function randomNumber(rng: Prng, length: number, limit: number): [Uint8Array, string] {
  const field = new Uint8Array(length);
  const form = rng.int(4);
  if (form === 0) {
    const value = rng.pick([0, 1, 511, 512, 513, rng.int(limit + 1), 8 ** (length - 1) - 1]);
    field.set(encoder.encode(value.toString(8).padStart(length - 1, "0").slice(-(length - 1))));
    return [field, `octal ${value}`];
  }
  if (form === 1) {
    field[0] = 0x80;
    const width = rng.range(1, length - 1);
    field.set(rng.bytes(width), length - width);
    if (rng.chance(0.5)) field.fill(0, 1, length - 7);
    return [field, "base-256"];
  }
  if (form === 2) {
    field[0] = rng.pick([0xff, 0x81, 0xc0]);
    field.set(rng.bytes(length - 1), 1);
    return [field, "negative or invalid base-256"];
  }
  const text = rng.pick([" ", "  7 ", "-1", "9", "0x10", "\0 1", "777777777777"]);
  field.set(encoder.encode(text).subarray(0, length));
  return [field, `text ${JSON.stringify(text)}`];
}

type Mutation = (rng: Prng, data: Uint8Array, others: SeedLayer[], context: Context) => [Uint8Array, string];

/** Picks a header block, or any block when no header is left. */
function pickHeader(rng: Prng, data: Uint8Array): number | undefined {
  const headers = headerOffsets(data);
  if (headers.length > 0) return rng.pick(headers);
  const blocks = Math.floor(data.length / BLOCK);
  return blocks > 0 ? rng.int(blocks) * BLOCK : undefined;
}

function maybeFixChecksum(rng: Prng, data: Uint8Array, at: number): string {
  if (rng.chance(0.85)) {
    fixChecksum(data, at);
    return "";
  }
  return " (checksum left stale)";
}

const MUTATIONS: Record<string, Mutation> = {
  flipBytes(rng, data) {
    const out = data.slice();
    const count = rng.range(1, 8);
    for (let i = 0; i < count && out.length > 0; i++) out[rng.int(out.length)] ^= (rng.next() & 0xff) | 1;
    return [out, `flip ${count} bytes`];
  },

  flipHeaderField(rng, data) {
    const out = data.slice();
    const at = pickHeader(rng, out);
    if (at === undefined) return [out, "flip header field (no block)"];
    const [field, start, length] = rng.pick(HEADER_FIELDS);
    out[at + start + rng.int(length)] ^= (rng.next() & 0xff) | 1;
    return [out, `flip ${field} of block at ${at}${maybeFixChecksum(rng, out, at)}`];
  },

  setTypeflag(rng, data) {
    const out = data.slice();
    const at = pickHeader(rng, out);
    if (at === undefined) return [out, "set typeflag (no block)"];
    const flag = rng.chance(0.7) ? TYPEFLAGS.charCodeAt(rng.int(TYPEFLAGS.length)) : rng.next() & 0xff;
    out[at + 156] = flag;
    return [out, `typeflag 0x${flag.toString(16)} at ${at}${maybeFixChecksum(rng, out, at)}`];
  },

  rewriteName(rng, data, _others, context) {
    const out = data.slice();
    const at = pickHeader(rng, out);
    if (at === undefined) return [out, "rewrite name (no block)"];
    const value = rng.pick(hostileNames(context));
    const [field, start, length] = rng.pick([["name", 0, 100], ["linkname", 157, 100], ["prefix", 345, 155]] as const);
    writeField(out, at + start, length, toBytes(value));
    return [out, `${field} ${describeBytes(value)} at ${at}${maybeFixChecksum(rng, out, at)}`];
  },

  setNumber(rng, data) {
    const out = data.slice();
    const at = pickHeader(rng, out);
    if (at === undefined) return [out, "set number (no block)"];
    const [field, start, length] = rng.pick(NUMERIC_FIELDS);
    const [value, text] = randomNumber(rng, length, data.length);
    out.set(value, at + start);
    return [out, `${field} ${text} at ${at}${maybeFixChecksum(rng, out, at)}`];
  },

  truncate(rng, data) {
    const cut = rng.chance(0.5) ? rng.int(data.length + 1) : rng.int(Math.floor(data.length / BLOCK) + 1) * BLOCK;
    return [data.slice(0, cut), `truncate to ${cut}`];
  },

  truncateInBody(rng, data) {
    const files = headerOffsets(data).filter((at) => data[at + 156] === 0x30 && octalField(data, at + 124, 12) > 0);
    if (files.length === 0) return [data.slice(0, rng.int(data.length + 1)), "truncate (no file body)"];
    const at = rng.pick(files);
    const cut = Math.min(data.length, at + BLOCK + rng.int(octalField(data, at + 124, 12)));
    return [data.slice(0, cut), `truncate to ${cut}, inside the body of the entry at ${at}`];
  },

  spliceBlocks(rng, data, others) {
    const donor = rng.pick(others);
    const donorBlocks = Math.floor(donor.tar.length / BLOCK);
    const count = rng.range(1, 4);
    const from = rng.int(Math.max(1, donorBlocks - count + 1)) * BLOCK;
    const piece = donor.tar.subarray(from, from + count * BLOCK);
    const to = rng.int(Math.floor(data.length / BLOCK) + 1) * BLOCK;
    const overwrite = rng.chance(0.5);
    const rest = data.subarray(overwrite ? Math.min(data.length, to + piece.length) : to);
    return [
      concat([data.subarray(0, to), piece, rest]),
      `${overwrite ? "overwrite" : "insert"} ${count} blocks of ${donor.name} from ${from} at ${to}`,
    ];
  },

  duplicateBlocks(rng, data) {
    const blocks = Math.floor(data.length / BLOCK);
    if (blocks === 0) return [data, "duplicate blocks (none)"];
    const count = rng.range(1, 4);
    const from = rng.int(blocks) * BLOCK;
    const piece = data.subarray(from, from + count * BLOCK);
    const to = rng.int(blocks + 1) * BLOCK;
    return [concat([data.subarray(0, to), piece, data.subarray(to)]), `duplicate ${count} blocks from ${from} at ${to}`];
  },

  deleteBlocks(rng, data) {
    const blocks = Math.floor(data.length / BLOCK);
    if (blocks === 0) return [data, "delete blocks (none)"];
    const count = rng.range(1, 3);
    const from = rng.int(blocks) * BLOCK;
    return [concat([data.subarray(0, from), data.subarray(from + count * BLOCK)]), `delete ${count} blocks at ${from}`];
  },

  zeroBlock(rng, data) {
    const out = data.slice();
    const blocks = Math.floor(out.length / BLOCK);
    if (blocks === 0) return [out, "zero block (none)"];
    const at = rng.int(blocks) * BLOCK;
    out.fill(0, at, at + BLOCK);
    return [out, `zero block at ${at}`];
  },

  insertEntry(rng, data, _others, context) {
    const names = hostileNames(context);
    const type = rng.pick(["file", "dir", "symlink", "hardlink", "fifo"] as const);
    const spec: TarEntrySpec = {
      path: rng.pick(names),
      type,
      content: type === "file" ? "inserted" : undefined,
      linkname: type === "symlink" || type === "hardlink" ? rng.pick(names) : undefined,
      longName: rng.chance(0.3) ? "gnu" : "auto",
      mode: rng.chance(0.2) ? rng.int(0o10000) : undefined,
    };
    if (rng.chance(0.3)) {
      spec.pax = rng.pick<Record<string, string>>([
        { path: describeName(rng.pick(names)) },
        { linkpath: describeName(rng.pick(names)) },
        { mtime: rng.pick(["-1", "1e3", "9007199254740991", "-9007199254740991.5", "0.000001", ""]) },
        { uid: rng.pick(["4294967296", "9007199254740991", "-1", "1000"]) },
        { size: rng.pick(["0", "1", "99999999", "x"]) },
        { "GNU.sparse.name": "sparse" },
        { "SCHILY.xattr.security.capability": "\u0001" },
      ]);
    }
    const entry = buildEntry(spec);
    const headers = headerOffsets(data);
    const to = headers.length > 0 && rng.chance(0.8) ? rng.pick(headers) : rng.int(Math.floor(data.length / BLOCK) + 1) * BLOCK;
    const label = `${type} ${describeBytes(spec.path)}${spec.linkname ? ` -> ${describeBytes(spec.linkname)}` : ""}`;
    return [concat([data.subarray(0, to), entry, data.subarray(to)]), `insert ${label} at ${to}`];
  },

  appendGarbage(rng, data) {
    const garbage = rng.chance(0.5) ? new Uint8Array(rng.range(1, 1500)) : rng.bytes(rng.range(1, 1500));
    return [concat([data, garbage]), `append ${garbage.length} bytes`];
  },
};

function describeName(value: string | Uint8Array): string {
  return typeof value === "string" ? value : new TextDecoder().decode(value);
}

const MUTATION_NAMES = Object.keys(MUTATIONS);

function mutate(rng: Prng, data: Uint8Array, others: SeedLayer[], context: Context, log: string[]): Uint8Array {
  const count = rng.range(1, 3);
  for (let i = 0; i < count; i++) {
    const name = rng.pick(MUTATION_NAMES);
    const [next, description] = MUTATIONS[name](rng, data, others, context);
    data = next;
    log.push(description);
  }
  return data;
}

// ---------------------------------------------------------------------------
// Streams into the applier

const CHUNK_SIZES = [1, 7, 100, 511, 512, 513, 4096, 65536];

function sha256(data: Uint8Array): Digest {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

/** What the stream for one layer was built with. */
interface OpenedLayer {
  stream: ReadableStream<Uint8Array>;
  /** True when the stream checks a digest that the bytes do not have. */
  wrongDigest: boolean;
  digest: Digest;
}

/**
 * Builds the stream the applier reads: raw tar bytes, or gzip through
 * `decompressStream`, optionally checked by a verifying stream first.
 */
async function openLayer(rng: Prng, tar: Uint8Array, log: string[]): Promise<OpenedLayer> {
  let blob = tar;
  const gzip = rng.chance(0.25);
  if (gzip) {
    blob = gzipBytes(tar);
    if (rng.chance(0.3)) {
      blob = blob.slice();
      if (rng.chance(0.5)) {
        blob[rng.int(blob.length)] ^= 0x55;
        log.push("gzip, one byte flipped");
      } else {
        blob = blob.slice(0, rng.int(blob.length));
        log.push(`gzip, truncated to ${blob.length}`);
      }
    } else {
      log.push("gzip");
    }
  }

  // One-byte chunks cost a stream read per byte, so only small blobs get them.
  let chunkSize = rng.pick(CHUNK_SIZES);
  if (chunkSize === 1 && blob.length > 8192) chunkSize = 7;
  let stream = streamOf(blob, chunkSize);
  log.push(`chunks of ${chunkSize}`);

  const digest = sha256(blob);
  let wrongDigest = false;
  if (rng.chance(0.25)) {
    wrongDigest = rng.chance(0.3);
    const expected: Digest = wrongDigest ? sha256(concat([blob, new Uint8Array([1])])) : digest;
    const size = rng.chance(0.5) ? blob.length : undefined;
    stream = stream.pipeThrough(await createVerifyStream({ digest: expected, size, label: "layer" }));
    log.push(wrongDigest ? "verified against a wrong digest" : "verified");
  }

  if (gzip || rng.chance(0.1)) {
    const compression = rng.pick(["auto", "gzip", "none"] as const);
    stream = decompressStream(stream, compression);
    log.push(`decompressStream ${compression}`);
  }
  return { stream, wrongDigest, digest };
}

/** A layer application that did not settle within {@linkcode HANG_LIMIT_MS}. */
class HangError extends Error {
  override name = "HangError";
}

async function withHangLimit<T>(promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new HangError(`did not settle within ${HANG_LIMIT_MS} ms`)), HANG_LIMIT_MS);
  });
  try {
    return await Promise.race([promise, limit]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// Checks

/** Everything outside the root: the workspace directories themselves and the sentinel tree. */
function outsideState(workspace: Workspace): unknown {
  const stat = (dir: string) => {
    const s = fs.lstatSync(dir);
    return { mode: s.mode, uid: s.uid, gid: s.gid, mtimeMs: s.mtimeMs, ino: s.ino };
  };
  return {
    base: stat(workspace.base),
    baseEntries: fs.readdirSync(workspace.base).sort(),
    outside: stat(workspace.outside),
    outsideTree: [...snapshot(workspace.outside)],
  };
}

/** Directories where a breakout would most likely land. */
function watchedDirectories(workspace: Workspace): string[] {
  return [workspace.base, workspace.outside, path.dirname(workspace.base), os.tmpdir(), "/", "/etc", "/tmp"];
}

function breakoutNames(token: string): string[] {
  return [token, `${token}-root`, `${token}-up`];
}

/** Checks the staged tree: only files, directories and symlinks, and no whiteout file. */
function checkRoot(root: string): string | undefined {
  for (const [name, node] of snapshot(root)) {
    if (node.type === "other") return `"${name}" is a device, FIFO or socket`;
    const base = name.slice(name.lastIndexOf("/") + 1);
    if (node.type !== "dir" && base.startsWith(".wh.")) return `whiteout "${name}" was written as a ${node.type}`;
  }
  return undefined;
}

function describeError(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}\n${error.stack ?? ""}`;
  return String(error);
}

function openFileDescriptors(): number | undefined {
  try {
    return fs.readdirSync("/proc/self/fd").length;
  } catch {
    return undefined;
  }
}

function emptyDirectory(dir: string): void {
  for (const name of fs.readdirSync(dir)) fs.rmSync(path.join(dir, name), { recursive: true, force: true });
}

/** Result of one applier iteration. */
interface IterationResult {
  failure?: string;
  outcome: "applied" | "LayerError" | "DigestMismatchError";
}

/** Runs one iteration into the empty `workspace.root`. */
async function applierIteration(
  seed: number,
  iteration: number,
  token: string,
  workspace: Workspace,
): Promise<IterationResult> {
  const rng = new Prng(iterationSeed(seed, iteration));
  const log: string[] = [];
  const context: Context = { outside: workspace.outside, token };
  const seeds = seedLayers(context, rng);

  const layerCount = rng.chance(0.35) ? 2 : 1;
  const layers: Uint8Array[] = [];
  for (let k = 0; k < layerCount; k++) {
    // At least 30 percent of the picks are the hostile layer, because escapes are the main risk.
    const chosen = rng.chance(0.3) ? seeds[seeds.length - 1] : rng.pick(seeds);
    log.push(`layer ${k}: ${chosen.name}`);
    const pristine = k === 0 && layerCount === 2 && rng.chance(0.5);
    layers.push(pristine ? chosen.tar : mutate(rng, chosen.tar, seeds, context, log));
  }

  const before = outsideState(workspace);
  // Owners stay at their default (applied when running as root) or are turned off.
  const applier = new LayerApplier(workspace.root, { owners: rng.chance(0.2) ? false : undefined });
  let caught: unknown;
  let wrongDigest = false;
  try {
    for (const [index, tar] of layers.entries()) {
      const opened = await openLayer(rng, tar, log);
      wrongDigest ||= opened.wrongDigest;
      await withHangLimit(applier.applyLayer(opened.stream, { digest: opened.digest, index }));
    }
    applier.finish();
  } catch (error) {
    caught = error;
  }

  const steps = log.join("; ");
  if (caught !== undefined && !(caught instanceof LayerError) && !(caught instanceof DigestMismatchError)) {
    return { outcome: "applied", failure: `undocumented error after [${steps}]: ${describeError(caught)}` };
  }
  if (caught === undefined && wrongDigest) {
    return { outcome: "applied", failure: `a layer with a wrong digest was accepted after [${steps}]` };
  }

  try {
    assert.deepEqual(outsideState(workspace), before);
  } catch (error) {
    return { outcome: "applied", failure: `something outside the root changed after [${steps}]: ${describeError(error)}` };
  }
  for (const dir of watchedDirectories(workspace)) {
    for (const name of breakoutNames(token)) {
      if (fs.existsSync(path.join(dir, name))) {
        return { outcome: "applied", failure: `"${name}" appeared in ${dir} after [${steps}]` };
      }
    }
  }
  const problem = checkRoot(workspace.root);
  if (problem !== undefined) return { outcome: "applied", failure: `${problem} after [${steps}]` };

  if (caught instanceof LayerError) return { outcome: "LayerError" };
  if (caught instanceof DigestMismatchError) return { outcome: "DigestMismatchError" };
  return { outcome: "applied" };
}

/**
 * Moves the root into `trash` and creates an empty one. On ext4 mounted
 * with `discard`, removing many roots at once measured about four times
 * faster than removing each right after it was written.
 */
function resetRoot(workspace: Workspace, trash: string, iteration: number): void {
  fs.renameSync(workspace.root, path.join(trash, String(iteration)));
  fs.mkdirSync(workspace.root);
}

// ---------------------------------------------------------------------------
// Applier fuzz

test(`LayerApplier fuzz, seed ${formatSeed(applierSettings.seed)}`, { timeout: TEST_TIMEOUT_MS }, async () => {
  const { seed, iterations } = applierSettings;
  const token = `${TOKEN_PREFIX}${formatSeed(seed)}`;
  const where = (iteration: number) =>
    `seed ${formatSeed(seed)} iteration ${iteration} (rerun: OCISTAGE_FUZZ_SEED=${formatSeed(seed)} OCISTAGE_FUZZ_ITERATIONS=${
      iteration + 1
    })`;

  const descriptorsBefore = openFileDescriptors();
  const outcomes = { applied: 0, LayerError: 0, DigestMismatchError: 0 };
  let workspace: Workspace | undefined;
  const trash = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-trash-"));
  try {
    for (let current = 0; current < iterations; current++) {
      if (current % WORKSPACE_REUSE === 0) {
        workspace?.cleanup();
        emptyDirectory(trash);
        workspace = createWorkspace();
      }
      let result: IterationResult;
      try {
        result = await applierIteration(seed, current, token, workspace!);
      } catch (error) {
        assert.fail(`${where(current)}: ${describeError(error)}`);
      }
      if (result.failure !== undefined) assert.fail(`${where(current)}: ${result.failure}`);
      try {
        resetRoot(workspace!, trash, current);
      } catch (error) {
        assert.fail(`${where(current)}: the root could not be replaced after the iteration: ${describeError(error)}`);
      }
      outcomes[result.outcome]++;
    }
  } finally {
    workspace?.cleanup();
    fs.rmSync(trash, { recursive: true, force: true });
  }

  // Every outcome must occur, or the mutations have stopped reaching the applier.
  for (const [outcome, count] of Object.entries(outcomes)) {
    assert.ok(count > 0 || iterations < 200, `no iteration ended as ${outcome}: ${JSON.stringify(outcomes)}`);
  }

  const descriptorsAfter = openFileDescriptors();
  if (descriptorsBefore !== undefined && descriptorsAfter !== undefined) {
    // A small slack for descriptors that the runtime or an earlier test may open meanwhile.
    assert.ok(
      descriptorsAfter - descriptorsBefore <= 3,
      `open file descriptors grew from ${descriptorsBefore} to ${descriptorsAfter} over ${iterations} iterations`,
    );
  }

  for (const dir of ["/", "/etc", "/tmp", os.tmpdir()]) {
    const found = fs.readdirSync(dir).filter((name) => name.startsWith(TOKEN_PREFIX));
    assert.deepEqual(found, [], `names from a breakout appeared in ${dir}`);
  }
});

// ---------------------------------------------------------------------------
// WWW-Authenticate fuzz

const HEADER_SEEDS = [
  'Bearer realm="https://a/token",service="reg",scope="repository:x:pull"',
  'Basic realm="r"',
  'Basic realm="r", Bearer realm="https://a/token",service="reg"',
  'Bearer realm="https://a/token",scope="repository:a:pull,push",note="x\\"y\\\\z"',
  "Negotiate YWJjZGVm==",
  'Negotiate YWJj, Basic realm="x"',
  'Digest realm="r", qop="auth,auth-int", nonce="abc", opaque=xyz',
  'Bearer error="invalid_token", error_description="The access token expired"',
  'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
  'bearer REALM = "x" , SERVICE = y',
  ", ,Bearer realm=x,,  ,",
  "",
];

const HEADER_ALPHABET = [
  " ", " ", "\t", ",", ",", "=", "=", '"', '"', "\\", "a", "B", "z", "0", "9", "/", "+", "~", "-", ".", "_", "!",
  ";", ":", "(", "{", "@", "\r", "\n", "\0", "\u00e9", "\u6587", "\ud83d", "\ud83d\ude00", "realm", "Bearer ", "Basic ",
];

const MAX_HEADER = 4096;

function randomText(rng: Prng, length: number): string {
  let text = "";
  while (text.length < length) text += rng.pick(HEADER_ALPHABET);
  return text;
}

function mutateHeader(rng: Prng, header: string): string {
  const at = rng.int(header.length + 1);
  switch (rng.int(7)) {
    case 0:
      return header.slice(0, at) + randomText(rng, rng.range(1, 4)) + header.slice(at);
    case 1:
      return header.slice(0, at) + header.slice(at + rng.range(1, 8));
    case 2: {
      const end = at + rng.range(1, 16);
      return header.slice(0, end) + header.slice(at, end) + header.slice(end);
    }
    case 3:
      return header + rng.pick([", ", ",", " ", ""]) + rng.pick(HEADER_SEEDS);
    case 4:
      return header.slice(0, at);
    case 5: {
      const piece = header.slice(at, at + rng.range(1, 8)) || rng.pick(HEADER_ALPHABET);
      return header.slice(0, at) + piece.repeat(rng.range(2, 200)) + header.slice(at);
    }
    default:
      return header.slice(0, at) + rng.pick(HEADER_ALPHABET) + header.slice(at + 1);
  }
}

const TCHAR_LOWER = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;
const TOKEN68 = /^[A-Za-z0-9\-._~+/]+=*$/;

/** Returns what is wrong with a parse result, or undefined when every challenge is well formed. */
function checkChallenges(result: unknown, header: string): string | undefined {
  if (!Array.isArray(result)) return "the result is not an array";
  const lower = header.toLowerCase();
  for (const [index, challenge] of (result as Challenge[]).entries()) {
    const at = `challenge ${index}`;
    if (typeof challenge !== "object" || challenge === null) return `${at} is not an object`;
    const keys = Object.keys(challenge).filter((key) => key !== "scheme" && key !== "params" && key !== "token68");
    if (keys.length > 0) return `${at} has unexpected keys ${JSON.stringify(keys)}`;
    if (typeof challenge.scheme !== "string" || !TCHAR_LOWER.test(challenge.scheme)) {
      return `${at} has scheme ${JSON.stringify(challenge.scheme)}, not a lowercase token`;
    }
    if (!lower.includes(challenge.scheme)) return `${at} has scheme ${JSON.stringify(challenge.scheme)}, not in the header`;
    if (typeof challenge.params !== "object" || challenge.params === null || Array.isArray(challenge.params)) {
      return `${at} has params that are not a plain object`;
    }
    for (const [name, value] of Object.entries(challenge.params)) {
      if (!TCHAR_LOWER.test(name)) return `${at} has parameter name ${JSON.stringify(name)}, not a lowercase token`;
      if (typeof value !== "string") return `${at} has parameter ${JSON.stringify(name)} with a ${typeof value} value`;
    }
    if (challenge.token68 !== undefined) {
      if (typeof challenge.token68 !== "string" || !TOKEN68.test(challenge.token68)) {
        return `${at} has token68 ${JSON.stringify(challenge.token68)}, which is not token68`;
      }
      if (!header.includes(challenge.token68)) return `${at} has token68 ${JSON.stringify(challenge.token68)}, not in the header`;
      if (Object.keys(challenge.params).length > 0) return `${at} has both token68 and parameters`;
    }
  }
  return undefined;
}

function parseChecked(header: string, where: string): Challenge[] {
  let result: Challenge[];
  try {
    result = parseWwwAuthenticate(header);
  } catch (error) {
    assert.fail(`${where}: parseWwwAuthenticate(${JSON.stringify(header)}) threw ${describeError(error)}`);
  }
  const problem = checkChallenges(result, header);
  if (problem !== undefined) {
    assert.fail(`${where}: parseWwwAuthenticate(${JSON.stringify(header)}): ${problem}; got ${JSON.stringify(result)}`);
  }
  return result;
}

test(`parseWwwAuthenticate() fuzz, seed ${formatSeed(headerSettings.seed)}`, { timeout: TEST_TIMEOUT_MS }, () => {
  const { seed, iterations } = headerSettings;
  for (let iteration = 0; iteration < iterations; iteration++) {
    const rng = new Prng(iterationSeed(seed, iteration));
    let header = rng.chance(0.2) ? randomText(rng, rng.int(512)) : rng.pick(HEADER_SEEDS);
    const rounds = rng.range(1, 6);
    for (let i = 0; i < rounds; i++) header = mutateHeader(rng, header);
    header = header.slice(0, MAX_HEADER);
    parseChecked(header, `seed ${formatSeed(seed)} iteration ${iteration}`);
  }
});

// Round trips: challenges serialised as RFC 9110 allows must parse back unchanged.

const TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const TOKEN68_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/";
const PARAM_NAMES = ["realm", "service", "scope", "error", "__proto__", "constructor", "toString", "hasOwnProperty"];
const VALUE_ALPHABET = ["a", "Z", "0", ",", ",", " ", "=", '"', "\\", "/", ":", "\t", "\u00e9", "\ud83d\ude00", "realm=x"];

function randomToken(rng: Prng, alphabet: string, max: number): string {
  let text = "";
  const length = rng.range(1, max);
  for (let i = 0; i < length; i++) text += alphabet[rng.int(alphabet.length)];
  return text;
}

function optionalWhitespace(rng: Prng): string {
  return rng.chance(0.7) ? "" : rng.pick([" ", "  ", "\t", " \t"]);
}

function quote(rng: Prng, value: string): string {
  let out = '"';
  for (const char of value) {
    if (char === '"' || char === "\\" || rng.chance(0.05)) out += "\\";
    out += char;
  }
  return `${out}"`;
}

/** Builds a random valid header and the challenges it must parse to. */
function randomChallenges(rng: Prng): [string, Challenge[]] {
  const challenges: Challenge[] = [];
  const parts: string[] = [];
  const count = rng.range(1, 4);
  for (let c = 0; c < count; c++) {
    const scheme = randomToken(rng, TCHARS, 10);
    const challenge: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    let text = scheme;

    if (rng.chance(0.2)) {
      const token68 = randomToken(rng, TOKEN68_CHARS, 24) + "=".repeat(rng.int(3));
      challenge.token68 = token68;
      text += ` ${token68}`;
    } else {
      const params: string[] = [];
      const seen = new Set<string>();
      const paramCount = rng.int(5);
      for (let p = 0; p < paramCount; p++) {
        const name = rng.chance(0.4) ? rng.pick(PARAM_NAMES) : randomToken(rng, TCHARS, 8);
        if (seen.has(name.toLowerCase())) continue;
        seen.add(name.toLowerCase());
        let value = "";
        const length = rng.int(6);
        for (let i = 0; i < length; i++) value += rng.pick(VALUE_ALPHABET);
        const bare = value !== "" && [...value].every((char) => TCHARS.includes(char)) && rng.chance(0.6);
        // defineProperty, because assigning "__proto__" would set the prototype instead.
        Object.defineProperty(challenge.params, name.toLowerCase(), {
          value,
          enumerable: true,
          writable: true,
          configurable: true,
        });
        params.push(`${name}${optionalWhitespace(rng)}=${optionalWhitespace(rng)}${bare ? value : quote(rng, value)}`);
      }
      if (params.length > 0) {
        text += ` ${params.join(`${optionalWhitespace(rng)},${rng.chance(0.1) ? " ," : ""}${optionalWhitespace(rng)}`)}`;
      }
    }
    challenges.push(challenge);
    parts.push(text);
  }
  const header = parts.join(`${optionalWhitespace(rng)},${rng.chance(0.1) ? " , " : ""}${optionalWhitespace(rng)}`);
  return [header, challenges];
}

test(`parseWwwAuthenticate() round trip fuzz, seed ${formatSeed(roundTripSettings.seed)}`, { timeout: TEST_TIMEOUT_MS }, () => {
  const { seed, iterations } = roundTripSettings;
  for (let iteration = 0; iteration < iterations; iteration++) {
    const rng = new Prng(iterationSeed(seed, iteration));
    const [header, expected] = randomChallenges(rng);
    const where = `seed ${formatSeed(seed)} iteration ${iteration}`;
    const parsed = parseChecked(header, where);
    assert.deepEqual(parsed, expected, `${where}: parseWwwAuthenticate(${JSON.stringify(header)})`);
  }
});

/** Long adversarial headers: each must parse in time linear in its length. */
const ADVERSARIAL_HEADERS: [string, string][] = [
  ["commas", ",".repeat(65536)],
  ["spaces", " ".repeat(65536)],
  ["schemes without parameters", "a ".repeat(32768)],
  ["parameter names without values", "Bearer " + "a=".repeat(32765)],
  ["unterminated escapes", 'Bearer x="' + "\\".repeat(65526)],
  ["many parameters", "Bearer " + "a=b,".repeat(16382)],
  ["long token then a second word", "Bearer " + "a".repeat(65520) + " b"],
  ["long token68 candidate", "Bearer " + "a".repeat(65000) + "=".repeat(520) + "x"],
  ["tokens and commas", "Bearer " + "a,".repeat(32764)],
  ["quotes", 'a b="' + '"'.repeat(65530)],
  ["equals signs", "A " + "=".repeat(65534)],
  ["empty list elements between parameters", "Bearer a=b" + ", ,".repeat(21840)],
  ["words without commas", "Bearer " + "a b=c ".repeat(10920)],
  ["one quoted value", 'Bearer realm="' + "x,".repeat(32760) + '"'],
];

test("parseWwwAuthenticate() stays linear on 64 KiB headers", () => {
  const rng = new Prng(0x64_0000);
  const headers = [...ADVERSARIAL_HEADERS, ["random text", randomText(rng, 65536)] as [string, string]];
  for (const [name, header] of headers) {
    const started = performance.now();
    parseChecked(header, name);
    const elapsed = performance.now() - started;
    // A safety net against catastrophic backtracking, not a speed target:
    // linear parsing takes a few milliseconds.
    assert.ok(elapsed < 2000, `parsing ${name} (${header.length} characters) took ${elapsed.toFixed(0)} ms`);
  }
});
