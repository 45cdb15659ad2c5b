/**
 * Local image sources: OCI image layouts (`oci:DIR[:TAG]`) and `docker save`
 * archives (`docker-archive:FILE[:NAME]`), built by hand, read through
 * track, fetch and stage.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { buildTar, gzipBytes } from "./fixtures/tar.ts";
import { digestOf, type Distribution, MEDIA, pushImage, run, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { richImageLayers } from "./fixtures/images.ts";
import { diffTrees, snapshotTree } from "./fixtures/tree.ts";
import { MemoryRegistry } from "./fixtures/registry.ts";
import { buildImage, type BuiltImage, writeLegacyArchive, writeOciArchive, writeOciLayout } from "./fixtures/local_images.ts";
import { openImageSource, parseSourceLocation } from "../src/image-source.ts";
import { fetchImage, stage, track } from "../src/stage.ts";
import { DigestMismatchError, ImageNotFoundError, InvalidReferenceError, LayerError, ManifestError, TargetNotEmptyError } from "../src/errors.ts";
import { RegistryClient } from "../src/registry/client.ts";
import { BlobCache } from "../src/cache.ts";
import { tempDir } from "./fixtures/temp.ts";

const AMD64 = { os: "linux", architecture: "amd64" };
const ARM64 = { os: "linux", architecture: "arm64", variant: "v8" };

function simpleImage(text: string, platform = AMD64, compression: "gzip" | "none" = "gzip"): BuiltImage {
  return buildImage([
    [{ path: "etc/", type: "dir" }, { path: "etc/release", content: text }, { path: "old", content: "old\n" }],
    [{ path: ".wh.old", content: "" }, { path: "etc/extra", content: "extra\n" }],
  ], { platform, compression });
}

async function stageInto(source: string, cache: string, platform = "linux/amd64"): Promise<string> {
  const target = path.join(tempDir("target"), "rootfs");
  await stage(source, target, { cache, platform });
  return target;
}

test("parseSourceLocation() reads oci and docker-archive forms", () => {
  assert.deepEqual(parseSourceLocation("oci:/srv/layout"), { kind: "oci", dir: "/srv/layout" });
  assert.deepEqual(parseSourceLocation("oci:/srv/layout:1.0"), { kind: "oci", dir: "/srv/layout", tag: "1.0" });
  assert.deepEqual(parseSourceLocation("oci:cache:127.0.0.1:5000/base:1.0"), {
    kind: "oci",
    dir: "cache",
    tag: "127.0.0.1:5000/base:1.0",
  });
  assert.deepEqual(parseSourceLocation("docker-archive:/tmp/a.tar:app:1"), {
    kind: "docker-archive",
    file: "/tmp/a.tar",
    name: "app:1",
  });
  assert.equal(parseSourceLocation("alpine").kind, "registry");
});

test("parseSourceLocation() keeps an existing path with a colon whole", () => {
  const dir = path.join(tempDir("colon"), "a:b");
  fs.mkdirSync(dir);
  assert.deepEqual(parseSourceLocation(`oci:${dir}`), { kind: "oci", dir });
});

test("parseSourceLocation() rejects an empty path or name", () => {
  assert.throws(() => parseSourceLocation("oci:"), InvalidReferenceError);
  assert.throws(() => parseSourceLocation("docker-archive::app"), /the path is empty/);
  assert.throws(() => parseSourceLocation("oci:/nonexistent-dir:"), /the name after ":" is empty/);
});

test("stage() gives one tree from a layout and both archive forms", async () => {
  const work = tempDir("rich");
  const layers = richImageLayers();
  const gzipped = buildImage(layers);
  const plain = buildImage(layers, { compression: "none" });
  writeOciLayout(path.join(work, "layout"), [{ name: "1.0", images: [gzipped] }]);
  writeLegacyArchive(path.join(work, "legacy.tar"), [{ image: plain, repoTags: ["rich:1.0"] }]);
  writeOciArchive(path.join(work, "oci.tar"), [{ image: plain, repoTags: ["rich:1.0"] }]);

  const fromLayout = await stageInto(`oci:${work}/layout:1.0`, path.join(work, "cache-a"));
  const fromLegacy = await stageInto(`docker-archive:${work}/legacy.tar`, path.join(work, "cache-b"));
  const fromOciArchive = await stageInto(`docker-archive:${work}/oci.tar:rich:1.0`, path.join(work, "cache-c"));

  // The root directory keeps the metadata it got when stage created it, so
  // its mtime is the time of each stage and is left out of the comparison.
  const below = (dir: string) => {
    const tree = snapshotTree(dir);
    tree.delete("");
    return tree;
  };
  const expected = below(fromLayout);
  assert.equal(fs.readFileSync(path.join(fromLayout, "bin/tool"), "utf8"), "#!/bin/sh\necho tool v2\n");
  assert.equal(expected.has("etc/hosts"), false);
  assert.deepEqual(diffTrees(expected, below(fromLegacy)), []);
  assert.deepEqual(diffTrees(expected, below(fromOciArchive)), []);
});

test("stage() selects the platform of a layout entry that is an index", async () => {
  const work = tempDir("platforms");
  writeOciLayout(path.join(work, "layout"), [{ name: "multi", images: [simpleImage("amd64\n"), simpleImage("arm64\n", ARM64)] }]);

  const amd = await stageInto(`oci:${work}/layout:multi`, path.join(work, "cache"), "linux/amd64");
  const arm = await stageInto(`oci:${work}/layout:multi`, path.join(work, "cache"), "linux/arm64");
  assert.equal(fs.readFileSync(path.join(amd, "etc/release"), "utf8"), "amd64\n");
  assert.equal(fs.readFileSync(path.join(arm, "etc/release"), "utf8"), "arm64\n");
  assert.equal(fs.existsSync(path.join(arm, "old")), false, "the whiteout applies");
  await assert.rejects(stageInto(`oci:${work}/layout:multi`, path.join(work, "cache"), "linux/s390x"), /linux\/amd64/);
});

test("track() of a layout index entry returns the platform's manifest", async () => {
  const work = tempDir("track");
  const amd = simpleImage("a\n");
  const arm = simpleImage("b\n", ARM64);
  writeOciLayout(path.join(work, "layout"), [{ name: "multi", images: [amd, arm] }]);
  const result = await track(`oci:${work}/layout:multi`, { platform: "linux/arm64" });
  assert.equal(result.digest, arm.manifest.digest);
  assert.ok(result.indexDigest);
  assert.equal(result.reference, undefined);
  assert.equal(result.source, `oci:${work}/layout:multi`);
});

test("layout without a tag needs a single named image", async () => {
  const work = tempDir("untagged");
  writeOciLayout(path.join(work, "one"), [{ images: [simpleImage("one\n")] }]);
  writeOciLayout(path.join(work, "two"), [{ name: "a", images: [simpleImage("a\n")] }, { name: "b", images: [simpleImage("b\n")] }]);

  const target = await stageInto(`oci:${work}/one`, path.join(work, "cache"));
  assert.equal(fs.readFileSync(path.join(target, "etc/release"), "utf8"), "one\n");

  const error = await track(`oci:${work}/two`, { platform: "linux/amd64" }).catch((caught) => caught);
  assert.ok(error instanceof ImageNotFoundError);
  assert.deepEqual(error.available, ["a", "b"]);
  assert.match(error.message, /several images/);
});

test("layout with an unknown tag lists the names it has", async () => {
  const work = tempDir("unknown");
  writeOciLayout(work, [{ name: "1.0", images: [simpleImage("x\n")] }, { name: "2.0", images: [simpleImage("y\n")] }]);
  const error = await track(`oci:${work}:3.0`).catch((caught) => caught);
  assert.ok(error instanceof ImageNotFoundError);
  assert.match(error.message, /no image named "3\.0".*"1\.0", "2\.0"/);
});

test("a directory that is not a layout is named in the error", async () => {
  const work = tempDir("not-layout");
  await assert.rejects(track(`oci:${work}`), (error: Error) => {
    assert.ok(error instanceof ManifestError);
    assert.match(error.message, /is not an OCI image layout: it has no oci-layout file/);
    return true;
  });
  await assert.rejects(track(`oci:${work}/missing`), /OCI image layout directory ".*missing" does not exist: check the path/);
});

test("stage() rejects a corrupt layer blob in a layout", async () => {
  const work = tempDir("corrupt");
  const image = simpleImage("x\n");
  writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [image] }]);
  const blob = path.join(work, "layout", "blobs", "sha256", image.layers[1].digest.slice(7));
  const bytes = fs.readFileSync(blob);
  bytes[bytes.length - 1] ^= 0xff;
  fs.writeFileSync(blob, bytes);

  const cache = path.join(work, "cache");
  await assert.rejects(stageInto(`oci:${work}/layout:1`, cache), (error: Error) => {
    assert.ok(error instanceof DigestMismatchError, String(error));
    assert.equal(error.expected, image.layers[1].digest);
    assert.match(error.message, /in "oci:.*layout:1"/);
    return true;
  });
  assert.equal(new BlobCache(cache).has(image.layers[1].digest as `sha256:${string}`), false, "the corrupt blob is not cached");
});

/** Returns `length` bytes from a xorshift generator, which zstd cannot compress. */
function noise(length: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let state = seed;
  for (let i = 0; i < length; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    bytes[i] = state & 0xff;
  }
  return bytes;
}

describe("stage() rejects corrupt zstd with a right digest", () => {
  // zstd stores noise in raw blocks, where a changed byte only changes the
  // output, and text in compressed blocks, where it breaks the decoding.
  const text = new TextEncoder().encode("layer text that zstd compresses well\n".repeat(5000));
  const cases: [string, Uint8Array, boolean][] = [
    ["in a raw block", noise(200_000, 7), false],
    ["in a compressed block", text, false],
    // Deno 2.9's node:zlib threw this checksum error as an uncaught exception.
    ["in a raw block of a frame with a checksum", noise(200_000, 11), true],
  ];
  for (const [name, content, checksum] of cases) {
    test(name, async () => {
      const work = tempDir("zstd-corrupt");
      const image = buildImage([[{ path: "data", content }]], {
        compression: "zstd",
        zstdChecksum: checksum,
        alterLayer: (bytes) => {
          const altered = bytes.slice();
          altered[Math.floor(altered.length / 2)] ^= 0x55;
          return altered;
        },
      });
      writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [image] }]);

      // The parents of the target are new too, and a failed stage removes them.
      const target = path.join(work, "new", "parents", "rootfs");
      await assert.rejects(
        stage(`oci:${work}/layout:1`, target, { cache: path.join(work, "cache"), platform: "linux/amd64" }),
        (error: Error) => {
          assert.ok(error instanceof DigestMismatchError || error instanceof LayerError, String(error));
          assert.match(error.message, /decompressed content has digest|zstd decompression of the layer failed|the layer is corrupt/);
          if (error instanceof LayerError) {
            assert.match(error.message, new RegExp(`^layer ${image.layers[0].digest} cannot be applied \\(`));
            assert.match(error.message, /the blob matches its digest, so the image itself is broken: rebuild it or push it again$/);
            assert.doesNotMatch(error.message, /fetch/);
          }
          return true;
        },
      );
      assert.equal(fs.existsSync(path.join(work, "new")), false, "the failed stage removed the directories it created");
    });
  }
});

describe("stage() replaces a damaged cached layer", () => {
  // Damage near the start breaks the first tar header while most of the
  // 3 MB blob is still unread. Damage near the end breaks the gzip trailer.
  const cases: [string, (length: number) => [number, number]][] = [
    ["damage near the start", () => [100, 200]],
    ["damage near the end", (length) => [length - 200, length - 20]],
  ];
  for (const [name, range] of cases) {
    test(name, async () => {
      const work = tempDir("damaged-cache");
      const image = buildImage([[{ path: "etc/", type: "dir" }, { path: "etc/release", content: "intact\n" }, {
        path: "noise",
        content: noise(3_000_000, 3),
      }]]);
      writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [image] }]);
      const source = `oci:${work}/layout:1`;
      const cache = path.join(work, "cache");
      await stageInto(source, cache);

      const digest = image.layers[0].digest as `sha256:${string}`;
      const blob = new BlobCache(cache).blobPath(digest);
      const bytes = fs.readFileSync(blob);
      const [from, to] = range(bytes.length);
      for (let i = from; i < to; i++) bytes[i] ^= 0x5a;
      fs.writeFileSync(blob, bytes);

      const target = path.join(work, "rootfs");
      await assert.rejects(stage(source, target, { cache, platform: "linux/amd64" }), (error: Error) => {
        assert.ok(error instanceof DigestMismatchError, String(error));
        assert.match(error.message, new RegExp(`cached blob ${digest} is damaged \\(its content has digest sha256:[0-9a-f]{64}\\)`));
        assert.match(error.message, /it is removed from the cache, so running the command again downloads it/);
        return true;
      });
      assert.equal(fs.existsSync(blob), false, "the damaged blob is removed");
      assert.equal(fs.existsSync(target), false, "the failed stage removed its target");

      await stage(source, target, { cache, platform: "linux/amd64" });
      assert.equal(fs.readFileSync(path.join(target, "etc", "release"), "utf8"), "intact\n");
    });
  }
});

test("stage() replaces a damaged cached config", async () => {
  const work = tempDir("damaged-config");
  const image = simpleImage("intact\n");
  writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [image] }]);
  const source = `oci:${work}/layout:1`;
  const cache = path.join(work, "cache");
  await stageInto(source, cache);

  const config = new BlobCache(cache).blobPath(image.config.digest as `sha256:${string}`);
  fs.writeFileSync(config, fs.readFileSync(config, "utf8").replace("amd64", "AMD64"));
  await assert.rejects(stageInto(source, cache), (error: Error) => {
    assert.ok(error instanceof DigestMismatchError, String(error));
    assert.match(error.message, new RegExp(`^cached blob ${image.config.digest} is damaged \\(its content has digest sha256:[0-9a-f]{64}\\)`));
    assert.match(error.message, /it is removed from the cache, so running the command again downloads it$/);
    return true;
  });
  assert.equal(fs.existsSync(config), false, "the damaged config is removed");

  const target = await stageInto(source, cache);
  assert.equal(fs.readFileSync(path.join(target, "etc", "release"), "utf8"), "intact\n");
});

test("stage() rejects a target that is a file and leaves the file alone", async () => {
  const work = tempDir("file-target");
  writeOciLayout(path.join(work, "layout"), [{ name: "1", images: [simpleImage("x\n")] }]);
  const file = path.join(work, "rootfs");
  fs.writeFileSync(file, "keep\n");
  await assert.rejects(stage(`oci:${work}/layout:1`, file, { cache: path.join(work, "cache") }), (error: Error) => {
    assert.ok(error instanceof TargetNotEmptyError, String(error));
    assert.match(error.message, /stage target ".*rootfs" is not a directory: choose a new or empty directory/);
    return true;
  });
  assert.equal(fs.readFileSync(file, "utf8"), "keep\n");
});

test("stage() rejects a layout blob of the wrong size before reading it", async () => {
  const work = tempDir("short");
  const image = simpleImage("x\n");
  writeOciLayout(work, [{ name: "1", images: [image] }]);
  fs.truncateSync(path.join(work, "blobs", "sha256", image.layers[0].digest.slice(7)), 10);
  await assert.rejects(stageInto(`oci:${work}:1`, path.join(tempDir("cache"), "c")), /has 10 bytes, expected \d+/);
});

test("ocistage's own cache is a layout that stage() reads", async () => {
  const registry = new MemoryRegistry();
  const tar = buildTar([{ path: "hello", content: "from the registry\n" }]);
  registry.pushImage("team/app", "1.0", [{ bytes: gzipBytes(tar), mediaType: "application/vnd.oci.image.layer.v1.tar+gzip" }]);
  const cache = tempDir("own-cache");
  const client = new RegistryClient({ fetch: registry.fetch });
  await fetchImage("reg.example/team/app:1.0", { client, cache, platform: "linux/amd64" });

  const target = await stageInto(`oci:${cache}:reg.example/team/app:1.0`, tempDir("second-cache"));
  assert.equal(fs.readFileSync(path.join(target, "hello"), "utf8"), "from the registry\n");
});

test("legacy archive layers are verified against the config's diff_ids", async () => {
  const work = tempDir("legacy-corrupt");
  const image = simpleImage("x\n", AMD64, "none");
  image.layers[0].bytes = image.layers[0].bytes.slice();
  const content = new TextEncoder().encode("x\n");
  const at = image.layers[0].bytes.findIndex((_, i) => content.every((byte, j) => image.layers[0].bytes[i + j] === byte));
  image.layers[0].bytes[at] = "y".charCodeAt(0);
  writeLegacyArchive(path.join(work, "a.tar"), [{ image, repoTags: ["app:1"] }]);
  await assert.rejects(stageInto(`docker-archive:${work}/a.tar`, path.join(work, "cache")), (error: Error) => {
    assert.ok(error instanceof DigestMismatchError, String(error));
    assert.equal(error.expected, image.layers[0].digest, "checked against the diff_id the config states");
    return true;
  });
});

test("legacy archive follows symlinked layer members", async () => {
  const work = tempDir("legacy-links");
  writeLegacyArchive(path.join(work, "a.tar"), [{ image: simpleImage("linked\n", AMD64, "none"), repoTags: ["app:1"] }], {
    symlinkLayers: true,
  });
  const target = await stageInto(`docker-archive:${work}/a.tar`, path.join(work, "cache"));
  assert.equal(fs.readFileSync(path.join(target, "etc/release"), "utf8"), "linked\n");
  assert.equal(fs.readFileSync(path.join(target, "etc/extra"), "utf8"), "extra\n");
});

test("archive with several images selects by RepoTag", async () => {
  const work = tempDir("several");
  const file = path.join(work, "a.tar");
  writeLegacyArchive(file, [
    { image: simpleImage("one\n", AMD64, "none"), repoTags: ["app:1", "registry.example/app:1"] },
    { image: simpleImage("two\n", AMD64, "none"), repoTags: ["app:2"] },
  ]);

  const target = await stageInto(`docker-archive:${file}:docker.io/library/app:2`, path.join(work, "cache"));
  assert.equal(fs.readFileSync(path.join(target, "etc/release"), "utf8"), "two\n");

  const unnamed = await track(`docker-archive:${file}`).catch((caught) => caught);
  assert.ok(unnamed instanceof ImageNotFoundError);
  assert.match(unnamed.message, /contains 2 images: name one/);
  const missing = await track(`docker-archive:${file}:app:3`).catch((caught) => caught);
  assert.ok(missing instanceof ImageNotFoundError);
  assert.deepEqual(missing.available, ["app:1", "registry.example/app:1", "app:2"]);
});

test("OCI-form archive reports the image's own manifest digest", async () => {
  const work = tempDir("oci-archive");
  const image = simpleImage("x\n", AMD64, "none");
  writeOciArchive(path.join(work, "a.tar"), [{ image, repoTags: ["app:1"] }]);
  const result = await track(`docker-archive:${work}/a.tar`);
  assert.equal(result.digest, image.manifest.digest);
});

test("a gzip-compressed archive gets a clear error", async () => {
  const work = tempDir("gzip-archive");
  writeLegacyArchive(path.join(work, "a.tar"), [{ image: simpleImage("x\n", AMD64, "none"), repoTags: ["app:1"] }]);
  fs.writeFileSync(path.join(work, "a.tar.gz"), gzipBytes(fs.readFileSync(path.join(work, "a.tar"))));
  await assert.rejects(track(`docker-archive:${work}/a.tar.gz`), /is gzip-compressed: decompress it first/);
  await assert.rejects(track(`docker-archive:${work}/missing.tar`), /cannot open docker archive ".*missing\.tar": check the path/);
});

test("fetchImage() copies an archive into the cache under its RepoTag", async () => {
  const work = tempDir("import");
  const image = simpleImage("imported\n", AMD64, "none");
  writeLegacyArchive(path.join(work, "a.tar"), [{ image, repoTags: ["app:1"] }]);
  const cache = path.join(work, "cache");
  const result = await fetchImage(`docker-archive:${work}/a.tar`, { cache });
  assert.equal(result.downloaded, 3, "config and two layers copied");
  assert.equal(result.source, `docker-archive:${work}/a.tar`);
  assert.ok(new BlobCache(cache).findManifest("docker.io/library/app:1"), "recorded under the normalized tag");

  fs.rmSync(path.join(work, "a.tar"));
  const target = await stageInto(`oci:${cache}:docker.io/library/app:1`, cache);
  assert.equal(fs.readFileSync(path.join(target, "etc/release"), "utf8"), "imported\n");
});

test("listTags() returns layout names and archive RepoTags", async () => {
  const work = tempDir("tags");
  writeOciLayout(path.join(work, "layout"), [{ name: "1.0", images: [simpleImage("a\n")] }, { name: "2.0", images: [simpleImage("b\n")] }]);
  writeLegacyArchive(path.join(work, "a.tar"), [{ image: simpleImage("a\n", AMD64, "none"), repoTags: ["app:1", "app:latest"] }]);

  const layout = openImageSource(`oci:${work}/layout`);
  assert.deepEqual(await layout.listTags(), ["1.0", "2.0"]);
  const archive = openImageSource(`docker-archive:${work}/a.tar`);
  assert.deepEqual(await archive.listTags(), ["app:1", "app:latest"]);
});

const skipTools = skipUnlessPrograms("docker-registry", "skopeo");

describe("layouts and archives written by skopeo", { skip: skipTools }, () => {
  let registry: Distribution;
  before(async () => {
    registry = await startDistribution();
  });
  after(async () => await registry?.close());

  test("stage() reads skopeo's oci and docker-archive output", async () => {
    const work = tempDir("skopeo");
    const layers = richImageLayers().map((entries) => {
      const tar = buildTar(entries);
      return { bytes: gzipBytes(tar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(tar) };
    });
    const pushed = await pushImage(registry.url, "rich/skopeo", "v1", layers, { diffIds: layers.map((layer) => layer.diffId) });
    const reference = `${registry.host}/rich/skopeo:v1`;
    run("skopeo", ["copy", "--src-tls-verify=false", `docker://${reference}`, `oci:${work}/layout:v1`]);
    run("skopeo", ["copy", "--src-tls-verify=false", `docker://${reference}`, `docker-archive:${work}/image.tar:rich/skopeo:v1`]);

    const fromRegistry = await stageInto(reference, path.join(work, "cache-registry"));
    const fromLayout = await stageInto(`oci:${work}/layout:v1`, path.join(work, "cache-layout"));
    const fromArchive = await stageInto(`docker-archive:${work}/image.tar:rich/skopeo:v1`, path.join(work, "cache-archive"));

    // Each stage gives the root directory the time it ran, so the root is left out.
    const snapshotBelowRoot = (dir: string) => {
      const tree = snapshotTree(dir);
      tree.delete("");
      return tree;
    };
    const expected = snapshotBelowRoot(fromRegistry);
    assert.deepEqual(diffTrees(expected, snapshotBelowRoot(fromLayout)), []);
    assert.deepEqual(diffTrees(expected, snapshotBelowRoot(fromArchive)), []);
    assert.equal((await track(`oci:${work}/layout:v1`)).digest, pushed.digest, "skopeo keeps the manifest");
  });
});
