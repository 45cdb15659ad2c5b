import { test } from "node:test";
import assert from "node:assert/strict";

import { MAX_META_SIZE, type TarHeader, TarReader } from "../src/layer/tar.ts";
import { LayerError } from "../src/errors.ts";
import { buildEntry, buildGlobalHeader, buildTar, type TarEntrySpec } from "./fixtures/tar.ts";

interface ReadEntry {
  header: TarHeader;
  body: Uint8Array;
}

interface ReadResult {
  entries: ReadEntry[];
  reader: TarReader;
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** Reads `data` pushed in chunks of `chunkSize` bytes and collects every entry. */
function readAll(data: Uint8Array, chunkSize = data.length || 1): ReadResult {
  const entries: ReadEntry[] = [];
  let parts: Uint8Array[] = [];
  let open = false;
  const reader = new TarReader({
    entry(header) {
      assert.equal(open, false, "entry() called before entryEnd() of the previous entry");
      open = true;
      entries.push({ header, body: new Uint8Array(0) });
      parts = [];
    },
    body(chunk) {
      parts.push(chunk.slice());
    },
    entryEnd() {
      open = false;
      const total = parts.reduce((sum, part) => sum + part.length, 0);
      const body = new Uint8Array(total);
      let at = 0;
      for (const part of parts) {
        body.set(part, at);
        at += part.length;
      }
      entries[entries.length - 1].body = body;
    },
  });
  for (let at = 0; at < data.length; at += chunkSize) reader.push(data.subarray(at, at + chunkSize));
  reader.end();
  return { entries, reader };
}

function names(result: ReadResult): string[] {
  return result.entries.map((entry) => entry.header.name);
}

/** Overwrites bytes of the header block at `offset` and recomputes its checksum. */
function patchHeader(tar: Uint8Array, offset: number, field: number, bytes: Uint8Array): Uint8Array {
  const out = tar.slice();
  out.set(bytes, offset + field);
  const block = out.subarray(offset, offset + 512);
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  block.set(encoder.encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
  return out;
}

function assertLayerError(fn: () => unknown, pattern: RegExp): LayerError {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof LayerError, `expected LayerError, got ${caught}`);
  assert.match(caught.message, pattern);
  return caught;
}

const sample: TarEntrySpec[] = [
  { path: "etc/", type: "dir", mode: 0o755, mtime: 1_600_000_000 },
  { path: "etc/hostname", content: "box\n", mode: 0o644, uid: 1000, gid: 100, uname: "user", gname: "users" },
  { path: "bin/sh", type: "symlink", linkname: "/bin/busybox" },
  { path: "bin/ash", type: "hardlink", linkname: "bin/busybox" },
  { path: "dev/null", type: "char", devmajor: 1, devminor: 3, mode: 0o666 },
  { path: "dev/loop0", type: "block", devmajor: 7, devminor: 0 },
  { path: "run/initctl", type: "fifo", mode: 0o600 },
  { path: "big", content: new Uint8Array(5000).fill(7), mode: 0o4755 },
  { path: "empty", content: "" },
];

test("TarReader reads every entry type and field", () => {
  const { entries, reader } = readAll(buildTar(sample));

  assert.deepEqual(names({ entries, reader }), sample.map((entry) => entry.path));
  assert.deepEqual(entries.map((entry) => entry.header.type), [
    "dir",
    "file",
    "symlink",
    "hardlink",
    "char",
    "block",
    "fifo",
    "file",
    "file",
  ]);
  assert.equal(entries[0].header.mtime, 1_600_000_000);
  assert.equal(entries[0].header.mode, 0o755);
  assert.equal(decoder.decode(entries[1].body), "box\n");
  assert.equal(entries[1].header.uid, 1000);
  assert.equal(entries[1].header.gid, 100);
  assert.equal(entries[1].header.uname, "user");
  assert.equal(entries[1].header.gname, "users");
  assert.equal(entries[2].header.linkname, "/bin/busybox");
  assert.equal(entries[3].header.linkname, "bin/busybox");
  assert.equal(entries[4].header.devmajor, 1);
  assert.equal(entries[4].header.devminor, 3);
  assert.equal(entries[7].header.mode, 0o4755);
  assert.equal(entries[7].header.size, 5000);
  assert.deepEqual(entries[7].body, new Uint8Array(5000).fill(7));
  assert.equal(entries[8].body.length, 0);
  assert.equal(reader.done, true);
  assert.equal(reader.trailingBytes, 0);
});

test("TarReader gives the same result for any chunking", () => {
  const tar = buildTar(sample);
  const whole = readAll(tar);
  for (const size of [1, 7, 100, 511, 512, 513, 1024, 4097]) {
    const chunked = readAll(tar, size);
    assert.deepEqual(names(chunked), names(whole), `chunk size ${size}`);
    assert.deepEqual(chunked.entries.map((entry) => entry.body), whole.entries.map((entry) => entry.body));
  }
});

test("TarReader passes body chunks without copying", () => {
  const tar = buildTar([{ path: "a", content: new Uint8Array(3000).fill(1) }]);
  const buffers: ArrayBufferLike[] = [];
  const reader = new TarReader({ entry() {}, body: (chunk) => buffers.push(chunk.buffer), entryEnd() {} });
  reader.push(tar);
  reader.end();
  assert.equal(buffers.length, 1);
  assert.equal(buffers[0], tar.buffer);
});

test("TarReader joins the ustar prefix and name fields", () => {
  let tar = buildTar([{ path: "file.txt", content: "x" }]);
  tar = patchHeader(tar, 0, 345, encoder.encode("some/long/prefix"));
  assert.deepEqual(names(readAll(tar)), ["some/long/prefix/file.txt"]);
});

test("TarReader ignores the prefix field of GNU headers", () => {
  let tar = buildTar([{ path: "file.txt", content: "x" }]);
  tar = patchHeader(tar, 0, 257, encoder.encode("ustar  \0"));
  tar = patchHeader(tar, 0, 345, new Uint8Array([1, 2, 3]));
  assert.deepEqual(names(readAll(tar)), ["file.txt"]);
});

test("TarReader reads GNU long names and link names", () => {
  const longName = "opt/" + "a".repeat(150) + "/file.txt";
  const longLink = "opt/" + "b".repeat(150);
  const tar = buildTar([
    { path: longName, content: "hi", longName: "gnu" },
    { path: "opt/link", type: "symlink", linkname: longLink, longName: "gnu" },
    { path: "short", content: "s" },
  ]);
  const { entries } = readAll(tar, 100);
  assert.deepEqual(entries.map((entry) => entry.header.name), [longName, "opt/link", "short"]);
  assert.equal(decoder.decode(entries[0].body), "hi");
  assert.equal(entries[1].header.linkname, longLink);
  assert.equal(entries[2].header.linkname, "");
});

test("TarReader reads PAX path, linkpath and numeric records", () => {
  const longName = "x/".repeat(120) + "end";
  const tar = buildTar([
    {
      path: longName,
      content: "p",
      pax: { uid: "70000000000", gid: "12", mtime: "1700000000.25", uname: "ünï", "SCHILY.xattr.user.a": "1" },
    },
    { path: "l", type: "symlink", linkname: "t/".repeat(80) },
    { path: "after", content: "a" },
  ]);
  const { entries } = readAll(tar);
  assert.equal(entries[0].header.name, longName);
  assert.equal(entries[0].header.uid, 70_000_000_000);
  assert.equal(entries[0].header.gid, 12);
  assert.equal(entries[0].header.mtime, 1_700_000_000.25);
  assert.equal(entries[0].header.uname, "ünï");
  assert.equal(entries[0].header.xattrs, 1);
  assert.equal(entries[1].header.linkname, "t/".repeat(80));
  assert.equal(entries[1].header.xattrs, 0);
  assert.equal(entries[2].header.uid, 0);
});

test("TarReader applies PAX size over the header size", () => {
  const tar = buildTar([
    { path: "f", content: "0123456789", size: 0, pax: { size: "10" } },
    { path: "g", content: "g" },
  ]);
  const { entries } = readAll(tar);
  assert.equal(decoder.decode(entries[0].body), "0123456789");
  assert.equal(entries[1].header.name, "g");
});

test("TarReader applies global PAX records to later entries", () => {
  const tar = new Uint8Array([
    ...buildGlobalHeader({ mtime: "1234", uid: "7", path: "ignored" }),
    ...buildTar([{ path: "a", content: "1", uid: 0 }, { path: "b", content: "2", pax: { uid: "9" } }]),
  ]);
  const { entries } = readAll(tar);
  assert.deepEqual(entries.map((entry) => entry.header.name), ["a", "b"]);
  assert.equal(entries[0].header.mtime, 1234);
  assert.equal(entries[0].header.uid, 7);
  assert.equal(entries[1].header.uid, 9);
});

test("TarReader reads base-256 sizes", () => {
  const tar = buildTar([{ path: "f", content: "abc", base256Size: true }, { path: "g", content: "" }]);
  const { entries } = readAll(tar);
  assert.equal(entries[0].header.size, 3);
  assert.equal(decoder.decode(entries[0].body), "abc");
  assert.equal(entries[1].header.name, "g");
});

/** Streams an entry with an 8 GiB body of zeros through the reader without holding it in memory. */
function streamHugeEntry(spec: TarEntrySpec): { size: number; bodyBytes: number; after: string[] } {
  const size = 8 * 1024 ** 3;
  const headerBytes = buildEntry({ ...spec, size });
  const zeros = new Uint8Array(4 * 1024 * 1024);
  let bodyBytes = 0;
  let headerSize = -1;
  const after: string[] = [];
  const reader = new TarReader({
    entry(header) {
      if (headerSize < 0) headerSize = header.size;
      else after.push(header.name);
    },
    body(chunk) {
      if (after.length === 0) bodyBytes += chunk.length;
    },
    entryEnd() {},
  });
  reader.push(headerBytes);
  for (let left = size; left > 0; left -= zeros.length) reader.push(zeros.subarray(0, Math.min(left, zeros.length)));
  reader.push(buildTar([{ path: "after.txt", content: "after" }]));
  reader.end();
  return { size: headerSize, bodyBytes, after };
}

test("TarReader streams an 8 GiB base-256 entry", () => {
  const result = streamHugeEntry({ path: "big.img", base256Size: true });
  assert.equal(result.size, 8 * 1024 ** 3);
  assert.equal(result.bodyBytes, 8 * 1024 ** 3);
  assert.deepEqual(result.after, ["after.txt"]);
});

test("TarReader streams an 8 GiB entry sized by PAX", () => {
  const result = streamHugeEntry({ path: "big.img", pax: { size: String(8 * 1024 ** 3) } });
  assert.equal(result.size, 8 * 1024 ** 3);
  assert.equal(result.bodyBytes, 8 * 1024 ** 3);
  assert.deepEqual(result.after, ["after.txt"]);
});

test("TarReader treats typeflag 7 as a regular file", () => {
  const { entries } = readAll(buildTar([{ path: "c", type: { flag: "7" }, content: "data" }]));
  assert.equal(entries[0].header.type, "file");
  assert.equal(decoder.decode(entries[0].body), "data");
});

test("TarReader reads old NUL typeflag entries", () => {
  const { entries } = readAll(buildTar([{ path: "f", type: { flag: "\0" }, content: "x" }, { path: "d/", type: { flag: "\0" } }]));
  assert.equal(entries[0].header.type, "file");
  assert.equal(entries[1].header.type, "dir");
});

test("TarReader ignores the size of link and directory headers", () => {
  const tar = buildTar([
    { path: "l", type: "symlink", linkname: "t", size: 5 },
    { path: "d/", type: "dir", size: 100 },
    { path: "next", content: "n" },
  ]);
  const { entries } = readAll(tar);
  assert.deepEqual(entries.map((entry) => entry.header.name), ["l", "d/", "next"]);
  assert.equal(entries[0].body.length, 0);
});

test("TarReader accepts signed header checksums", () => {
  let tar = buildTar([{ path: "caf\u00e9", content: "x" }]);
  const block = tar.subarray(0, 512);
  block.fill(0x20, 148, 156);
  let signed = 0;
  for (const byte of block) signed += byte > 127 ? byte - 256 : byte;
  tar = tar.slice();
  tar.set(encoder.encode(signed.toString(8).padStart(6, "0") + "\0 "), 148);
  assert.deepEqual(names(readAll(tar)), ["café"]);
});

test("TarReader rejects a bad header checksum", () => {
  const tar = buildTar([{ path: "a", content: "1" }, { path: "b", content: "2" }], { corruptChecksumAt: 1 });
  const error = assertLayerError(() => readAll(tar), /invalid checksum/);
  assert.match(error.message, /offset 1024/);
});

test("TarReader rejects an invalid octal field", () => {
  let tar = buildTar([{ path: "a", content: "1" }]);
  tar = patchHeader(tar, 0, 124, encoder.encode("0000000009x"));
  assertLayerError(() => readAll(tar), /invalid size field/);
});

test("TarReader rejects a truncated header", () => {
  const tar = buildTar([{ path: "a", content: "1" }, { path: "b", content: "2" }]);
  assertLayerError(() => readAll(tar.subarray(0, 1024 + 100)), /truncated inside the header at offset 1024/);
  assertLayerError(() => readAll(tar.subarray(0, 200)), /truncated inside the header/);
});

test("TarReader rejects a truncated body", () => {
  const tar = buildTar([{ path: "a", content: new Uint8Array(2000) }]);
  const error = assertLayerError(() => readAll(tar.subarray(0, 512 + 1000)), /truncated inside the body of entry "a"/);
  assert.equal(error.entry, "a");
});

test("TarReader accepts input ending in the last padding", () => {
  const tar = buildTar([{ path: "a", content: "12345" }, { path: "b", content: "67" }], { end: false });
  const { entries } = readAll(tar.subarray(0, 512 * 3 + 100));
  assert.deepEqual(entries.map((entry) => entry.header.name), ["a", "b"]);
  assert.equal(new TextDecoder().decode(entries[1].body), "67");
});

test("TarReader rejects a size beyond the end of input", () => {
  const tar = buildTar([{ path: "a", content: "abc", size: 100_000 }]);
  assertLayerError(() => readAll(tar), /truncated inside the body of entry "a"/);
});

test("TarReader rejects an extended header without its entry", () => {
  const full = buildTar([{ path: "p".repeat(200), content: "x" }], { end: false });
  assertLayerError(() => readAll(full.subarray(0, 1024)), /extended header without its entry/);
});

test("TarReader accepts an archive without end blocks", () => {
  const result = readAll(buildTar([{ path: "a", content: "1" }], { end: false }));
  assert.deepEqual(names(result), ["a"]);
  assert.equal(result.reader.done, false);
});

test("TarReader accepts a single end block", () => {
  const tar = buildTar([{ path: "a", content: "1" }]);
  const result = readAll(tar.subarray(0, tar.length - 512));
  assert.deepEqual(names(result), ["a"]);
});

test("TarReader accepts empty input and bare end blocks", () => {
  assert.deepEqual(names(readAll(new Uint8Array(0))), []);
  assert.deepEqual(names(readAll(new Uint8Array(1024))), []);
  assert.deepEqual(names(readAll(new Uint8Array(10240))), []);
  assert.deepEqual(names(readAll(new Uint8Array(700))), []);
});

test("TarReader counts trailing zero padding", () => {
  const tar = new Uint8Array([...buildTar([{ path: "a", content: "1" }]), ...new Uint8Array(9000)]);
  const result = readAll(tar, 1000);
  assert.deepEqual(names(result), ["a"]);
  assert.equal(result.reader.trailingBytes, 9000);
  assert.equal(result.reader.trailingNonZeroBytes, 0);
});

test("TarReader tolerates and counts trailing garbage", () => {
  const garbage = buildTar([{ path: "hidden", content: "smuggled" }]);
  const tar = new Uint8Array([...buildTar([{ path: "a", content: "1" }]), ...garbage]);
  const result = readAll(tar);
  assert.deepEqual(names(result), ["a"]);
  assert.equal(result.reader.trailingBytes, garbage.length);
  assert.ok(result.reader.trailingNonZeroBytes > 0);
});

test("TarReader rejects a lone zero block before data", () => {
  const tar = new Uint8Array([
    ...buildTar([{ path: "a", content: "1" }], { end: false }),
    ...new Uint8Array(512),
    ...buildTar([{ path: "b", content: "2" }]),
  ]);
  assertLayerError(() => readAll(tar), /lone zero block/);
});

test("TarReader rejects names that are not UTF-8", () => {
  const bad = new Uint8Array([0x61, 0xff, 0x62]);
  const error = assertLayerError(() => readAll(buildTar([{ path: bad, content: "x" }])), /not valid UTF-8/);
  assert.equal(error.entry, "a\ufffdb");
  assertLayerError(() => readAll(buildTar([{ path: new Uint8Array(150).fill(0xc3), content: "x" }])), /not valid UTF-8/);
  assertLayerError(
    () => readAll(buildTar([{ path: new Uint8Array(150).fill(0xc3), content: "x", longName: "gnu" }])),
    /not valid UTF-8/,
  );
});

test("TarReader rejects link targets that are not UTF-8", () => {
  const tar = buildTar([{ path: "l", type: "symlink", linkname: new Uint8Array([0x2f, 0xc0, 0x80]) }]);
  const error = assertLayerError(() => readAll(tar), /link target that is not valid UTF-8/);
  assert.equal(error.entry, "l");
});

test("TarReader rejects NUL in PAX and GNU names", () => {
  const withNul = new Uint8Array([...encoder.encode("a".repeat(120)), 0, ...encoder.encode("evil")]);
  assertLayerError(() => readAll(buildTar([{ path: withNul, content: "x" }])), /NUL byte in its name/);
  assertLayerError(() => readAll(buildTar([{ path: withNul, content: "x", longName: "gnu" }])), /NUL byte in its name/);
  const linkNul = new Uint8Array([...encoder.encode("t".repeat(120)), 0, 0x78]);
  assertLayerError(
    () => readAll(buildTar([{ path: "l", type: "symlink", linkname: linkNul }])),
    /NUL byte in its link target/,
  );
});

test("TarReader rejects sparse entries", () => {
  const error = assertLayerError(() => readAll(buildTar([{ path: "disk.img", type: { flag: "S" }, content: "x" }])), /sparse/);
  assert.equal(error.entry, "disk.img");
  const pax = buildTar([{
    path: "GNUSparseFile.0/disk.img",
    content: "x",
    pax: { "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "disk.img" },
  }]);
  const paxError = assertLayerError(() => readAll(pax), /tar entry "disk.img" is a sparse file/);
  assert.equal(paxError.entry, "disk.img");
});

test("TarReader rejects volume, multi-volume and unknown types", () => {
  for (const [flag, pattern] of [["V", /volume label/], ["M", /multi-volume/], ["D", /directory dump/], ["Z", /'Z'/], ["\x01", /0x01/]] as const) {
    const error = assertLayerError(() => readAll(buildTar([{ path: "odd", type: { flag } }])), pattern);
    assert.equal(error.entry, "odd");
  }
});

test("TarReader caps PAX and long-name records", () => {
  const huge = "p".repeat(MAX_META_SIZE + 10);
  assertLayerError(() => readAll(buildTar([{ path: huge, content: "x" }])), /over the limit/);
  assertLayerError(() => readAll(buildTar([{ path: huge, content: "x", longName: "gnu" }])), /over the limit/);
  assertLayerError(() => readAll(buildTar([{ path: "a", pax: { comment: huge } }])), /over the limit/);
});

test("TarReader rejects malformed PAX records", () => {
  let tar = buildTar([{ path: "a", content: "1", pax: { comment: "hello" } }]);
  const body = 512;
  tar = tar.slice();
  tar[body] = 0x39;
  assertLayerError(() => readAll(tar), /malformed record/);
  const badUid = buildTar([{ path: "a", content: "1", pax: { uid: "12x" } }]);
  assertLayerError(() => readAll(badUid), /invalid PAX uid record "12x"/);
});

test("TarReader propagates handler errors", () => {
  const reader = new TarReader({
    entry() {
      throw new RangeError("stop");
    },
    body() {},
    entryEnd() {},
  });
  assert.throws(() => reader.push(buildTar([{ path: "a" }])), RangeError);
});
