/**
 * export: the flattened root filesystem as one tar stream. Archives are
 * checked by extracting them with GNU tar and comparing the trees.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createTarDecoder } from "modern-tar";
import { packTree, exportTar } from "../src/export.ts";
import { buildTar, gzipBytes } from "./fixtures/tar.ts";
import { richImageLayers } from "./fixtures/images.ts";
import { diffTrees, snapshotTree } from "./fixtures/tree.ts";
import { buildImage, writeOciLayout } from "./fixtures/local_images.ts";
import { type Distribution, digestOf, MEDIA, pushImage, run, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { cliCommand, runCliProcess } from "./fixtures/cli.ts";
import { tempDir } from "./fixtures/temp.ts";

/** Create a WritableStream that collects every chunk. */
function collector(): { stream: WritableStream<Uint8Array>; bytes(): Uint8Array; closed: () => boolean; aborted: () => boolean } {
  const chunks: Uint8Array[] = [];
  let closed = false;
  let aborted = false;
  return {
    stream: new WritableStream({
      write: (chunk) => void chunks.push(chunk.slice()),
      close: () => void (closed = true),
      abort: () => void (aborted = true),
    }),
    bytes: () => {
      const total = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0));
      let offset = 0;
      for (const chunk of chunks) {
        total.set(chunk, offset);
        offset += chunk.byteLength;
      }
      return total;
    },
    closed: () => closed,
    aborted: () => aborted,
  };
}

/** Headers of a tar archive, in order. */
async function listEntries(bytes: Uint8Array): Promise<{ name: string; type?: string; linkname?: string; mode?: number; size: number }[]> {
  const decoder = createTarDecoder();
  const entries: { name: string; type?: string; linkname?: string; mode?: number; size: number }[] = [];
  const reading = (async () => {
    for await (const entry of decoder.readable) {
      entries.push({ ...entry.header });
      await entry.body.cancel();
    }
  })();
  const writer = decoder.writable.getWriter();
  await writer.write(bytes);
  await writer.close();
  await reading;
  return entries;
}

function extractWithTar(archive: string, into: string): void {
  fs.mkdirSync(into, { recursive: true });
  run("tar", ["-xf", archive, "-C", into]);
}

/** Build a tree with every kind of entry that export writes. */
function buildSampleTree(root: string): void {
  const t = new Date(1_700_000_000 * 1000);
  fs.mkdirSync(path.join(root, "etc/deep/er"), { recursive: true });
  fs.writeFileSync(path.join(root, "etc/hostname"), "box\n");
  fs.writeFileSync(path.join(root, "empty"), "");
  fs.writeFileSync(path.join(root, "setuid"), "s\n");
  fs.chmodSync(path.join(root, "setuid"), 0o4755);
  fs.writeFileSync(path.join(root, "private"), "p\n");
  fs.chmodSync(path.join(root, "private"), 0o600);
  const big = new Uint8Array(3 * (1 << 20) + 17).map((_, i) => (i * 31) & 0xff);
  fs.writeFileSync(path.join(root, "big.bin"), big);
  fs.writeFileSync(path.join(root, "original"), "shared\n");
  fs.linkSync(path.join(root, "original"), path.join(root, "etc/linked"));
  fs.symlinkSync("etc/hostname", path.join(root, "relative-link"));
  fs.symlinkSync("/nowhere/at/all", path.join(root, "dangling"));
  const long = path.join(root, "l".repeat(80), "m".repeat(80));
  fs.mkdirSync(long, { recursive: true });
  fs.writeFileSync(path.join(long, "file-with-a-long-path"), "long\n");
  fs.writeFileSync(path.join(root, "grüße-日本語"), "unicode\n");
  fs.mkdirSync(path.join(root, "sticky"), { mode: 0o1777 });
  fs.chmodSync(path.join(root, "sticky"), 0o1777);
  for (const name of ["etc/hostname", "big.bin", "original", "etc/deep/er", "etc/deep", "etc", "sticky", "setuid", "private"]) {
    fs.utimesSync(path.join(root, name), t, t);
  }
  fs.lutimesSync(path.join(root, "relative-link"), t, t);
}

test("packTree() output extracts with GNU tar to the same tree", async () => {
  const work = tempDir("pack");
  const source = path.join(work, "source");
  fs.mkdirSync(source);
  buildSampleTree(source);

  const archive = path.join(work, "out.tar");
  const sink = collector();
  const packed = await packTree(source, sink.stream);
  fs.writeFileSync(archive, sink.bytes());
  assert.equal(sink.closed(), true, "the output stream is closed at the end");
  assert.equal(packed.bytes, sink.bytes().byteLength);

  const extracted = path.join(work, "extracted");
  extractWithTar(archive, extracted);
  // The archive has no entry for the root, so each root keeps its own metadata.
  const before = snapshotTree(source);
  const after = snapshotTree(extracted);
  before.delete("");
  after.delete("");
  assert.deepEqual(diffTrees(before, after), []);
  assert.equal(after.get("original")?.ino, after.get("etc/linked")?.ino, "hardlinks share an inode after extraction");
  assert.equal(after.get("sticky")?.mode, 0o1777);
  assert.equal(after.get("setuid")?.mode, 0o4755);
  assert.equal(packed.entries, before.size);
});

test("packTree() omits the root and links after their target", async () => {
  const work = tempDir("order");
  fs.mkdirSync(path.join(work, "b"));
  fs.writeFileSync(path.join(work, "b/first"), "x");
  fs.linkSync(path.join(work, "b/first"), path.join(work, "a-second"));
  fs.symlinkSync("b/first", path.join(work, "c-link"));

  const sink = collector();
  await packTree(work, sink.stream);
  const entries = await listEntries(sink.bytes());
  assert.deepEqual(entries.map((entry) => entry.name), ["a-second", "b/", "b/first", "c-link"]);
  assert.equal(entries[0].type, "file", "the first path in archive order carries the content");
  assert.equal(entries[2].type, "link");
  assert.equal(entries[2].linkname, "a-second");
  assert.equal(entries[3].type, "symlink");
  assert.equal(entries[3].linkname, "b/first");
});

test("packTree() records owners as 0 when asked not to keep them", async () => {
  const work = tempDir("owners");
  fs.writeFileSync(path.join(work, "file"), "x");
  const sink = collector();
  await packTree(work, sink.stream, { owners: false });
  const listing = run("tar", ["--numeric-owner", "-tvf", "-"], { input: Buffer.from(sink.bytes()) as unknown as string });
  for (const line of listing.trim().split("\n")) assert.match(line, /^\S+ 0\/0 /, line);
});

test("exportTar() applies whiteouts and leaves no whiteout files", async () => {
  const work = tempDir("export-local");
  writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [buildImage(richImageLayers())] }]);
  const sink = collector();
  const result = await exportTar(`oci:${work}/layout:1`, sink.stream, { cache: path.join(work, "cache"), platform: "linux/amd64" });
  const names = (await listEntries(sink.bytes())).map((entry) => entry.name);

  assert.equal(result.entries, names.length);
  assert.ok(names.includes("etc/motd"));
  assert.ok(!names.includes("etc/hosts"), "a whited-out file is absent");
  assert.ok(!names.some((name) => name.startsWith("whited")), "a whited-out directory is absent");
  assert.ok(!names.some((name) => name.split("/").some((part) => part.startsWith(".wh."))), "no whiteout entries");
  assert.deepEqual(names.filter((name) => name.startsWith("opaque/")), ["opaque/", "opaque/upper"]);
  assert.deepEqual(names.filter((name) => name.startsWith("dev/")), ["dev/"]);
});

test("exportTar() aborts the output and removes its temporary directory on failure", async () => {
  const work = tempDir("export-fail");
  const temp = path.join(work, "tmp");
  fs.mkdirSync(temp);
  const image = buildImage([[{ path: "a", content: "a\n" }]]);
  writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [image] }]);
  fs.writeFileSync(path.join(work, "layout/blobs/sha256", image.layers[0].digest.slice(7)), gzipBytes(buildTar([{ path: "a", content: "b\n" }])));

  const sink = collector();
  await assert.rejects(
    exportTar(`oci:${work}/layout:1`, sink.stream, { cache: path.join(work, "cache"), tempDir: temp }),
    /image files are (?:incomplete or )?corrupt/,
  );
  assert.equal(sink.aborted(), true);
  assert.deepEqual(fs.readdirSync(temp), [], "the staging directory is gone");
});

const skip = skipUnlessPrograms("docker-registry");

describe("export against the distribution registry", { skip }, () => {
  let registry: Distribution;
  let work: string;
  before(async () => {
    registry = await startDistribution();
    work = tempDir("export-e2e");
  });
  after(async () => {
    await registry?.close();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  test("export piped to tar -x gives the tree stage gives", async () => {
    const layers = richImageLayers().map((entries) => {
      const tar = buildTar(entries);
      return { bytes: gzipBytes(tar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(tar) };
    });
    await pushImage(registry.url, "rich/export", "v1", layers, { diffIds: layers.map((layer) => layer.diffId) });
    const image = `${registry.host}/rich/export:v1`;
    const cache = path.join(work, "cache");

    const staged = path.join(work, "staged");
    const stageRun = await runCliProcess(["stage", image, staged, "--cache", cache, "--platform", "linux/amd64", "--quiet"]);
    assert.equal(stageRun.code, 0, stageRun.stderr);

    const extracted = path.join(work, "extracted");
    fs.mkdirSync(extracted);
    const [program, prefix] = cliCommand();
    const exporter = spawn(program, [...prefix, "export", image, "--cache", cache, "--platform", "linux/amd64", "--quiet"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    const untar = spawn("tar", ["-xf", "-", "-C", extracted], { stdio: ["pipe", "ignore", "pipe"] });
    exporter.stdout.pipe(untar.stdin);
    let stderr = "";
    exporter.stderr.on("data", (chunk) => (stderr += chunk));
    untar.stderr.on("data", (chunk) => (stderr += chunk));
    const [exportCode, tarCode] = await Promise.all([
      new Promise((resolve) => exporter.on("close", resolve)),
      new Promise((resolve) => untar.on("close", resolve)),
    ]);
    assert.equal(exportCode, 0, stderr);
    assert.equal(tarCode, 0, stderr);

    const stagedTree = snapshotTree(staged);
    const exportedTree = snapshotTree(extracted);
    // The two runs staged at different times, and stage gives the root directory the time it ran.
    stagedTree.get("")!.mtime = exportedTree.get("")!.mtime;
    assert.deepEqual(diffTrees(stagedTree, exportedTree, ["type", "mode", "sha256", "size", "target", "mtime"]), []);
    assert.equal(exportedTree.get("data/original")?.ino, exportedTree.get("data/link-two")?.ino, "hardlinks survive");
  });

  test("export -o writes the file only when complete", async () => {
    const output = path.join(work, "rootfs.tar");
    const missing = await runCliProcess(["export", `${registry.host}/rich/absent:v1`, "-o", output, "--cache", path.join(work, "cache")]);
    assert.equal(missing.code, 1, missing.stderr);
    assert.equal(fs.existsSync(output), false);
    assert.deepEqual(fs.readdirSync(work).filter((name) => name.includes("partial")), [], "no partial file is left");
  });
});
