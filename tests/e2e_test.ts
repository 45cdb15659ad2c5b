/**
 * End-to-end tests: the CLI in a child process against the real CNCF
 * distribution registry on 127.0.0.1, with images built in code.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { buildTar, gzipBytes, type TarEntrySpec, zstdBytes } from "./fixtures/tar.ts";
import { type Distribution, digestOf, MEDIA, pushImage, pushIndex, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { richImageLayers } from "./fixtures/images.ts";
import { runCliProcess } from "./fixtures/cli.ts";
import { snapshotTree } from "./fixtures/tree.ts";
import { tempDir } from "./fixtures/temp.ts";

const skip = skipUnlessPrograms("docker-registry");

type Compression = "gzip" | "zstd" | "none";

function layerBlob(entries: TarEntrySpec[], compression: Compression, format: "oci" | "docker") {
  const tar = buildTar(entries);
  if (compression === "gzip") {
    return { bytes: gzipBytes(tar), mediaType: format === "oci" ? MEDIA.ociLayerGzip : MEDIA.dockerLayerGzip, diffId: digestOf(tar) };
  }
  if (compression === "zstd") return { bytes: zstdBytes(tar), mediaType: MEDIA.ociLayerZstd, diffId: digestOf(tar) };
  return { bytes: tar, mediaType: MEDIA.ociLayer, diffId: digestOf(tar) };
}

async function pushLayers(registry: Distribution, repository: string, tag: string, layers: TarEntrySpec[][], compressions: Compression[], format: "oci" | "docker", platform?: { os: string; architecture: string; variant?: string }) {
  const blobs = layers.map((entries, i) => layerBlob(entries, compressions[i % compressions.length], format));
  return await pushImage(registry.url, repository, tag, blobs, { format, diffIds: blobs.map((b) => b.diffId), platform });
}

/** Check the staged rich image against the result the layer rules prescribe. */
function assertRichTree(dir: string): void {
  const tree = snapshotTree(dir);
  const read = (name: string) => fs.readFileSync(path.join(dir, name), "utf8");
  const mode = (name: string) => tree.get(name)?.mode.toString(8);

  assert.equal(read("etc/hostname"), "base\n");
  assert.equal(read("etc/motd"), "welcome\n");
  assert.equal(tree.has("etc/hosts"), false, "etc/hosts was whited out");
  assert.equal(tree.get("etc/os-release")?.target, "/usr/lib/os-release");
  assert.equal(tree.get("lib")?.target, "usr/lib");
  assert.equal(read("bin/tool"), "#!/bin/sh\necho tool v2\n");
  assert.equal(mode("bin/su-helper"), "4755");
  assert.equal(mode("secret"), "400", "a 0000 file gains owner read");
  assert.equal(mode("readonly"), "755", "a 0555 directory gains owner write and execute");
  assert.equal(read("readonly/new"), "written into a 0555 directory\n");
  assert.equal(read("readonly/old"), "old\n");
  assert.equal(tree.has("whited"), false);
  assert.equal(tree.has("whited/inner/file"), false);
  assert.deepEqual([...tree.keys()].filter((name) => name.startsWith("opaque/")), ["opaque/upper"]);
  assert.equal(mode("opaque"), "755", "the upper directory entry's mode replaces the lower one");
  assert.equal(read("recreated"), "second version\n");
  assert.equal(mode("recreated"), "600");
  assert.equal(tree.has("data/link-one"), false);
  assert.equal(tree.get("data/original")?.ino, tree.get("data/link-two")?.ino, "hardlinks share an inode");
  assert.equal(mode("data"), "700");
  assert.equal(tree.get("dev")?.type, "dir");
  assert.deepEqual([...tree.keys()].filter((name) => name.startsWith("dev/")), []);
  assert.equal(tree.has("run/pipe"), false, "FIFOs are dropped");
  assert.equal(tree.has("run/sda"), false, "block devices are dropped");
  assert.equal(read(`deep/${"d".repeat(60)}/${"e".repeat(50)}/file-with-a-long-path.txt`), "long\n");
  assert.equal(read("unicode/grüße-日本語.txt"), "non-ascii\n");
  assert.equal(tree.get("etc/hostname")?.mtime, 1_700_000_001);
  assert.equal(tree.get("recreated")?.mtime, 1_700_000_103);
  assert.equal(tree.get("data")?.mtime, 1_700_000_200, "directory mtimes are applied after the last layer");
  for (const [name, entry] of tree) {
    assert.ok(!name.split("/").some((part) => part.startsWith(".wh.")), `whiteout file ${name} left in the tree`);
    if (entry.type === "file") assert.ok(entry.mode & 0o400, `${name} is not owner-readable`);
    if (entry.type === "dir") assert.equal(entry.mode & 0o700, 0o700, `${name} is not owner rwx`);
  }
}

describe("end to end against the distribution registry", { skip }, () => {
  let registry: Distribution;
  let cache: string;
  before(async () => {
    registry = await startDistribution();
    cache = tempDir("cache");
  });
  after(async () => {
    await registry?.close();
    fs.rmSync(cache, { recursive: true, force: true });
  });

  const variants: { name: string; format: "oci" | "docker"; compressions: Compression[] }[] = [
    { name: "OCI manifest, gzip layers", format: "oci", compressions: ["gzip"] },
    { name: "Docker v2 manifest, gzip layers", format: "docker", compressions: ["gzip"] },
    { name: "OCI manifest, zstd and uncompressed layers", format: "oci", compressions: ["zstd", "none", "gzip", "zstd"] },
  ];
  for (const variant of variants) {
    test(`stage ${variant.name}`, async () => {
      const repository = `rich/${variant.format}-${variant.compressions.join("-")}`;
      const pushed = await pushLayers(registry, repository, "v1", richImageLayers(), variant.compressions, variant.format);
      const target = path.join(tempDir("stage"), "rootfs");
      const run = await runCliProcess(["stage", `${registry.host}/${repository}:v1`, target, "--cache", cache, "--platform", "linux/amd64"]);
      assert.equal(run.code, 0, run.stderr);
      assertRichTree(target);
      assert.match(run.stderr, /warning: .*dev\//, "dropping dev/ entries is reported");
      assert.ok(fs.existsSync(path.join(cache, "blobs", "sha256", pushed.digest.slice(7))), "manifest stored in the cache");
    });
  }

  /** Layers where the upper one removes or replaces four files of the lower one, and a hardlink to one of them survives. */
  const hidingLayers = (base: TarEntrySpec[]): TarEntrySpec[][] => [
    [
      ...base,
      { path: "doc/", type: "dir" },
      { path: "doc/a", content: "a\n" },
      { path: "doc/b", content: "b\n" },
      { path: "bin/tool", content: "old\n" },
      { path: "lib/libx", content: "library\n", mode: 0o755 },
      { path: "lib/liby", type: "hardlink", linkname: "lib/libx" },
    ],
    [{ path: ".wh.doc", content: "" }, { path: "bin/tool", content: "new\n" }, { path: "lib/.wh.libx", content: "" }],
  ];

  /** Stages an image into a new directory and returns it with the `hidden` count of each layer event. */
  const stageCounting = async (image: string, cacheDir: string, flags: string[] = []) => {
    const target = path.join(tempDir("hidden"), "rootfs");
    const run = await runCliProcess(["stage", image, target, "--cache", cacheDir, "--json", ...flags]);
    assert.equal(run.code, 0, run.stderr);
    const events = run.stderr.trim().split("\n").map((line) => JSON.parse(line));
    return { target, hidden: events.filter((event) => event.type === "layer").map((event) => event.hidden) };
  };

  // Directories without an entry of their own get the time of the stage as mtime.
  const comparable = (dir: string) =>
    [...snapshotTree(dir)].map(([name, { ino: _ino, mtime, ...entry }]) => [name, { ...entry, mtime: entry.type === "dir" ? 0 : mtime }]);

  test("stage records changes, then leaves out hidden files", async () => {
    await pushLayers(registry, "hidden/small", "v1", hidingLayers([]), ["gzip"], "oci");
    const image = `${registry.host}/hidden/small:v1`;
    const ownCache = tempDir("hidden-cache");

    const first = await stageCounting(image, ownCache);
    assert.deepEqual(first.hidden, [0, 0], "a top layer that is not small against the base is not read ahead");
    assert.equal(fs.readdirSync(path.join(ownCache, "changes", "sha256")).length, 2, "the changes of both layers are recorded");

    const second = await stageCounting(image, ownCache);
    assert.deepEqual(second.hidden, [3, 0], "lib/libx is written back for lib/liby");
    const written = await stageCounting(image, ownCache, ["--write-hidden"]);
    assert.deepEqual(written.hidden, [0, 0]);

    // A damaged record is not trusted, and the next stage writes it again.
    const recordDir = path.join(ownCache, "changes", "sha256");
    const names = fs.readdirSync(recordDir);
    fs.writeFileSync(path.join(recordDir, names[0]), '{"files":[');
    // An edit that keeps the JSON valid is caught by the record's checksum.
    const edited = JSON.parse(fs.readFileSync(path.join(recordDir, names[1]), "utf8"));
    edited.changes.whiteouts.push("bin", "lib");
    fs.writeFileSync(path.join(recordDir, names[1]), JSON.stringify(edited));
    const damaged = await stageCounting(image, ownCache);
    assert.deepEqual(damaged.hidden, [0, 0]);
    const repaired = await stageCounting(image, ownCache);
    assert.deepEqual(repaired.hidden, [3, 0]);
    assert.deepEqual(comparable(damaged.target), comparable(written.target));
    assert.deepEqual(comparable(repaired.target), comparable(written.target));

    assert.deepEqual(comparable(first.target), comparable(written.target));
    assert.deepEqual(comparable(second.target), comparable(written.target));
    assert.deepEqual(fs.readdirSync(second.target).sort(), ["bin", "lib"]);
    assert.equal(fs.readFileSync(path.join(second.target, "bin/tool"), "utf8"), "new\n");
    assert.equal(fs.readFileSync(path.join(second.target, "lib/liby"), "utf8"), "library\n");
    assert.equal(fs.statSync(path.join(second.target, "lib/liby")).mode & 0o777, 0o755);
  });

  test("stage reads a small top layer ahead", async () => {
    // Random bytes keep the base layer's blob large against the top layer's.
    const noise = crypto.getRandomValues(new Uint8Array(32 * 1024));
    await pushLayers(registry, "hidden/large", "v1", hidingLayers([{ path: "noise", content: noise }]), ["gzip"], "oci");
    const image = `${registry.host}/hidden/large:v1`;

    const first = await stageCounting(image, tempDir("ahead-cache"));
    assert.deepEqual(first.hidden, [3, 0]);
    const written = await stageCounting(image, tempDir("ahead-written"), ["--write-hidden"]);
    assert.deepEqual(comparable(first.target), comparable(written.target));
  });

  test("stage picks the platform from a multi-platform index", async () => {
    const platforms = [
      { os: "linux", architecture: "amd64" },
      { os: "linux", architecture: "arm64", variant: "v8" },
      { os: "linux", architecture: "arm", variant: "v7" },
    ];
    for (const format of ["oci", "docker"] as const) {
      const repository = `multi/${format}`;
      const entries = [];
      for (const platform of platforms) {
        const name = [platform.architecture, platform.variant].filter(Boolean).join("-");
        const layer = [{ path: "arch", content: `${name}\n` }];
        const manifest = await pushLayers(registry, repository, `only-${name}`, [layer], ["gzip"], format, platform);
        entries.push({ manifest, platform });
      }
      await pushIndex(registry.url, repository, "latest", entries, format);
      for (const [wanted, expected] of [["linux/amd64", "amd64"], ["linux/arm64", "arm64-v8"], ["linux/arm/v7", "arm-v7"], ["linux/arm", "arm-v7"]]) {
        const target = path.join(tempDir("multi"), "rootfs");
        const run = await runCliProcess(["stage", `${registry.host}/${repository}`, target, "--cache", cache, "--platform", wanted]);
        assert.equal(run.code, 0, run.stderr);
        assert.equal(fs.readFileSync(path.join(target, "arch"), "utf8"), `${expected}\n`, `${format} index, platform ${wanted}`);
      }
      const missing = await runCliProcess(["track", `${registry.host}/${repository}`, "--platform", "linux/s390x", "--cache", cache]);
      assert.equal(missing.code, 1);
      assert.match(missing.stderr, /linux\/s390x/);
      assert.match(missing.stderr, /linux\/arm64/, "the error lists the platforms the index offers");
    }
  });

  test("track prints the platform manifest digest", async () => {
    const pushed = await pushLayers(registry, "track/plain", "1.0", [[{ path: "f", content: "x" }]], ["gzip"], "oci");
    const run = await runCliProcess(["track", `${registry.host}/track/plain:1.0`, "--platform", "linux/amd64"]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.trim(), pushed.digest);
    const json = await runCliProcess(["track", `${registry.host}/track/plain:1.0`, "--platform", "linux/amd64", "--json"]);
    assert.equal(JSON.parse(json.stdout).digest, pushed.digest);
  });

  test("stage, export and inspect --json print results", async () => {
    const pushed = await pushLayers(registry, "json/out", "2.0", [[{ path: "hello", content: "hi\n" }]], ["gzip"], "oci");
    const image = `${registry.host}/json/out:2.0`;
    const dir = tempDir("json");

    const staged = await runCliProcess(["stage", image, path.join(dir, "rootfs"), "--json", "--platform", "linux/amd64", "--cache", cache]);
    assert.equal(staged.code, 0, staged.stderr);
    const stageResult = JSON.parse(staged.stdout);
    assert.equal(stageResult.digest, pushed.digest);
    assert.equal(stageResult.target, path.join(dir, "rootfs"));

    const archive = path.join(dir, "rootfs.tar");
    const exported = await runCliProcess(["export", image, "-o", archive, "--json", "--platform", "linux/amd64", "--cache", cache]);
    assert.equal(exported.code, 0, exported.stderr);
    const exportResult = JSON.parse(exported.stdout);
    assert.equal(exportResult.digest, pushed.digest);
    assert.equal(exportResult.entries, 1);

    const again = path.join(dir, "again.tar");
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const second = await runCliProcess(["export", image, "-o", again, "--platform", "linux/amd64", "--cache", cache]);
    assert.equal(second.code, 0, second.stderr);
    assert.deepEqual(fs.readFileSync(again), fs.readFileSync(archive), "two exports of one image are identical");

    await pushLayers(registry, "json/out", "3.0", [[{ path: "hello", content: "hi\n" }]], ["gzip"], "oci");
    const tags = await runCliProcess(["inspect", `${registry.host}/json/out`, "--tags", "--json"]);
    assert.equal(tags.code, 0, tags.stderr);
    assert.deepEqual(JSON.parse(tags.stdout).tags, ["2.0", "3.0"]);
    const plainTags = await runCliProcess(["inspect", `${registry.host}/json/out`, "--tags"]);
    assert.equal(plainTags.stdout, "2.0\n3.0\n");
  });

  test("track on an element file changes only the ref line", async () => {
    const pushed = await pushLayers(registry, "element/base", "stable", [[{ path: "hello", content: "hi\n" }]], ["gzip"], "oci");
    const dir = tempDir("element");
    const file = path.join(dir, "base.bst");
    const original = [
      "# The base system, pulled from the local test registry.",
      "kind: import",
      "sources:",
      "- kind: docker",
      `  registry-url: http://${registry.host}   # loopback registry`,
      "  image: element/base",
      "  track: stable  # follow the stable tag",
      `  ref: ${"0".repeat(64)}  # updated by track`,
      "  architecture: amd64",
      "  os: linux",
      "",
    ].join("\n");
    fs.writeFileSync(file, original);
    const run = await runCliProcess(["track", file, "--cache", path.join(dir, "cache")]);
    assert.equal(run.code, 0, run.stderr);
    const updated = fs.readFileSync(file, "utf8");
    const before = original.split("\n");
    const afterLines = updated.split("\n");
    assert.equal(afterLines.length, before.length);
    const changed = before.flatMap((line, i) => (line === afterLines[i] ? [] : [i]));
    assert.deepEqual(changed, [7], "only the ref line changes");
    assert.equal(afterLines[7], `  ref: ${pushed.digest.slice(7)}  # updated by track`);

    const target = path.join(dir, "rootfs");
    const staged = await runCliProcess(["stage", file, target, "--cache", path.join(dir, "cache")]);
    assert.equal(staged.code, 0, staged.stderr);
    assert.equal(fs.readFileSync(path.join(target, "hello"), "utf8"), "hi\n");
  });

  test("fetch stores an OCI layout that skopeo can read", { skip: skipUnlessPrograms("skopeo") }, async () => {
    const pushed = await pushLayers(registry, "layout/check", "1", richImageLayers(), ["gzip"], "oci");
    const dir = tempDir("layout");
    const run = await runCliProcess(["fetch", `${registry.host}/layout/check:1`, "--cache", dir, "--platform", "linux/amd64"]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.trim(), pushed.digest);
    const { run: exec } = await import("./fixtures/distribution.ts");
    const inspected = JSON.parse(exec("skopeo", ["inspect", "--raw", `oci:${dir}:${registry.host}/layout/check:1`]));
    assert.equal(inspected.layers.length, 4);
    assert.deepEqual(fs.readdirSync(path.join(dir, "ingest")), [], "no partial files left behind");
  });

  test("bad input gives one clear error and the right exit code", async () => {
    await pushLayers(registry, "errors/present", "1", [[{ path: "f", content: "x" }]], ["gzip"], "oci");
    const nonEmpty = tempDir("nonempty");
    fs.writeFileSync(path.join(nonEmpty, "keep"), "x");
    const cases: { args: string[]; code: number; pattern: RegExp }[] = [
      { args: ["track", `${registry.host}/errors/present:nope`], code: 1, pattern: /tag "nope" not found.*has tags "1"/ },
      { args: ["track", `${registry.host}/errors/absent:1`], code: 1, pattern: /repository "errors\/absent" not found/ },
      { args: ["track", "UPPER/Case:tag"], code: 2, pattern: /UPPER\/Case/ },
      { args: ["track", `${registry.host}/errors/present:1`, "--platform", "linux"], code: 2, pattern: /"linux"/ },
      { args: ["stage", `${registry.host}/errors/present:1`, nonEmpty, "--platform", "linux/amd64"], code: 1, pattern: /not an empty directory/ },
      { args: ["stage", `${registry.host}/errors/present:1`], code: 2, pattern: /DIR/ },
      { args: ["frobnicate"], code: 2, pattern: /unknown command "frobnicate"/ },
      { args: ["track", "alpine", "--no-such-flag"], code: 2, pattern: /no-such-flag/ },
      { args: ["fetch", "x", "--concurrency", "0"], code: 2, pattern: /--concurrency "0"/ },
      { args: ["fetch", "x", "--hasher", "md5"], code: 2, pattern: /--hasher "md5"/ },
    ];
    for (const { args, code, pattern } of cases) {
      const run = await runCliProcess([...args, "--cache", tempDir("errcache")]);
      assert.equal(run.code, code, `${args.join(" ")}: ${run.stderr}`);
      assert.match(run.stderr, pattern, args.join(" "));
      assert.equal(run.stderr.trim().split("\n").filter((line) => line.startsWith("ocistage:")).length, 1, `one error line for ${args.join(" ")}`);
    }
    const absent = await runCliProcess(["track", `${registry.host}/errors/absent:1`, "--cache", tempDir("errcache")]);
    assert.doesNotMatch(absent.stderr, /tag "1"/, "a missing repository is not blamed on the tag");
    assert.deepEqual(fs.readdirSync(nonEmpty), ["keep"], "a non-empty target is left alone");
  });

  test("explicit platform must match a single-platform image", async () => {
    const other = process.arch === "arm64" ? { os: "linux", architecture: "amd64" } : { os: "linux", architecture: "arm64" };
    const name = `${other.os}/${other.architecture}`;
    await pushLayers(registry, "single/other", "1", [[{ path: "f", content: "x" }]], ["gzip"], "oci", other);
    const image = `${registry.host}/single/other:1`;

    const mismatch = process.arch === "arm64" ? "linux/s390x" : "linux/ppc64le";
    const tracked = await runCliProcess(["track", image, "--platform", mismatch, "--cache", cache]);
    assert.equal(tracked.code, 1, tracked.stderr);
    assert.match(tracked.stderr, new RegExp(`no manifest for platform "${mismatch}"`));
    assert.match(tracked.stderr, new RegExp(name), "the error names the platform the image offers");

    const target = path.join(tempDir("single"), "rootfs");
    const staged = await runCliProcess(["stage", image, target, "--platform", mismatch, "--cache", cache]);
    assert.equal(staged.code, 1, staged.stderr);
    assert.equal(fs.existsSync(target), false, "a failed stage removes the directory it created");

    const implicit = await runCliProcess(["stage", image, target, "--cache", cache]);
    assert.equal(implicit.code, 0, implicit.stderr);
    assert.match(implicit.stderr, new RegExp(`warning: .*single-platform image for ${name}`));
    assert.equal(fs.readFileSync(path.join(target, "f"), "utf8"), "x");

    const matching = await runCliProcess(["track", image, "--platform", name, "--cache", cache]);
    assert.equal(matching.code, 0, matching.stderr);
  });

  test("failed stage leaves an empty target", async () => {
    const layers = [[{ path: "ok", content: "fine\n" }], [{ path: "dir/", type: "dir" as const, mode: 0o555 }, { path: "../escape", content: "bad" }]];
    await pushLayers(registry, "failing/escape", "1", layers, ["gzip"], "oci");
    const parent = tempDir("failing");
    const target = path.join(parent, "rootfs");
    fs.mkdirSync(target);
    const run = await runCliProcess(["stage", `${registry.host}/failing/escape:1`, target, "--platform", "linux/amd64", "--cache", cache]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /\.\.\/escape/);
    assert.deepEqual(fs.readdirSync(target), [], "what the first layer wrote is removed");
    assert.deepEqual(fs.readdirSync(parent), ["rootfs"], "nothing is written beside the target");
  });

  test("invalid element file names the file, line and key", async () => {
    const dir = tempDir("badelement");
    const file = path.join(dir, "bad.bst");
    fs.writeFileSync(file, "kind: import\nsources:\n- kind: docker\n  image: library/alpine\n  url: https://example.invalid\n  track: latest\n");
    const run = await runCliProcess(["track", file]);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /bad\.bst/);
    assert.match(run.stderr, /\burl\b/);
    assert.match(run.stderr, /line 5|:5/);
  });
});
