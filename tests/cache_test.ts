import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { BlobCache, type BlobProducer, defaultCacheDir, type ResumePoint } from "../src/cache.ts";
import { checkContent, type Digest, sha256Of } from "../src/digest.ts";
import { DigestMismatchError } from "../src/errors.ts";

function tempCache(): BlobCache {
  return new BlobCache(fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-cache-")));
}

/** Return the partial files of a blob in the cache's ingest directory. */
function partialFiles(cache: BlobCache, digest: Digest): string[] {
  const dir = path.join(cache.dir, "ingest");
  return fs.readdirSync(dir).filter((name) => name.startsWith(`${digest.slice(7)}.`) && name.endsWith(".partial")).map((name) => path.join(dir, name));
}

function bytesOf(size: number, seed = 7): Uint8Array {
  return new Uint8Array(size).map((_, i) => (i * seed + (i >> 8)) & 0xff);
}

/**
 * A producer that behaves like the registry client: serves `content` from
 * the resume offset, feeds the resume hash and errors on a wrong digest.
 * `cutAt` ends the stream with an error after that many bytes of the blob.
 */
function producerOf(content: Uint8Array, digest: Digest, options: { cutAt?: number; log?: number[] } = {}): BlobProducer {
  return (resume: ResumePoint) => {
    options.log?.push(resume.offset);
    let offset = resume.offset;
    return new ReadableStream<Uint8Array>({
      pull(controller) {
        if (options.cutAt !== undefined && offset >= options.cutAt) {
          controller.error(new Error("connection reset"));
          return;
        }
        if (offset >= content.byteLength) {
          try {
            checkContent({ digest, size: content.byteLength }, offset, resume.hash.digest());
            controller.close();
          } catch (error) {
            controller.error(error);
          }
          return;
        }
        const end = Math.min(content.byteLength, offset + 1000, options.cutAt ?? Infinity);
        const chunk = content.slice(offset, end);
        resume.hash.update(chunk);
        controller.enqueue(chunk);
        offset = end;
      },
    });
  };
}

test("BlobCache creates an OCI image layout", () => {
  const cache = tempCache();
  assert.deepEqual(JSON.parse(fs.readFileSync(path.join(cache.dir, "oci-layout"), "utf8")), { imageLayoutVersion: "1.0.0" });
  const index = JSON.parse(fs.readFileSync(path.join(cache.dir, "index.json"), "utf8"));
  assert.equal(index.schemaVersion, 2);
  assert.deepEqual(index.manifests, []);
});

test("ingest stores a verified blob under its digest", async () => {
  const cache = tempCache();
  const content = bytesOf(5000);
  const digest = await sha256Of(content);
  const progress: number[] = [];
  assert.equal(await cache.ingest({ digest, size: content.byteLength }, producerOf(content, digest), (n) => progress.push(n)), true);
  assert.deepEqual(new Uint8Array(fs.readFileSync(cache.blobPath(digest))), content);
  assert.equal(progress.at(-1), 5000);
  assert.equal(cache.has(digest, 5000), true);
  assert.equal(cache.has(digest, 4999), false);
  assert.deepEqual(fs.readdirSync(path.join(cache.dir, "ingest")), []);
  assert.equal(await cache.ingest({ digest, size: content.byteLength }, () => {
    throw new Error("a cached blob must not be downloaded again");
  }), false);
});

test("ingest of wrong content leaves nothing under the final name", async () => {
  const cache = tempCache();
  const content = bytesOf(3000);
  const digest = await sha256Of(bytesOf(3000, 11));
  await assert.rejects(cache.ingest({ digest, size: 3000 }, producerOf(content, digest)), DigestMismatchError);
  assert.equal(fs.existsSync(cache.blobPath(digest)), false);
  assert.deepEqual(fs.readdirSync(path.join(cache.dir, "ingest")), [], "the wrong partial content is removed");
});

test("ingest rejects content longer than the descriptor", async () => {
  const cache = tempCache();
  const content = bytesOf(3000);
  const digest = await sha256Of(content);
  await assert.rejects(cache.ingest({ digest, size: 2000 }, producerOf(content, digest)), (error: Error) => {
    assert.ok(error instanceof DigestMismatchError);
    assert.match(error.message, /2000 bytes/);
    return true;
  });
  assert.equal(fs.existsSync(cache.blobPath(digest)), false);
});

test("ingest resumes an interrupted download from the partial file", async () => {
  const cache = tempCache();
  const content = bytesOf(10_000);
  const digest = await sha256Of(content);
  const offsets: number[] = [];
  await assert.rejects(cache.ingest({ digest, size: 10_000 }, producerOf(content, digest, { cutAt: 4000, log: offsets })), /connection reset/);
  assert.equal(fs.existsSync(cache.blobPath(digest)), false);
  const partials = partialFiles(cache, digest);
  assert.equal(partials.length, 1);
  assert.equal(fs.statSync(partials[0]).size, 4000);

  assert.equal(await cache.ingest({ digest, size: 10_000 }, producerOf(content, digest, { log: offsets })), true);
  assert.deepEqual(offsets, [0, 4000]);
  assert.deepEqual(new Uint8Array(fs.readFileSync(cache.blobPath(digest))), content);
  assert.deepEqual(fs.readdirSync(path.join(cache.dir, "ingest")), []);
});

test("ingest with a corrupt partial file fails once, then downloads afresh", async () => {
  const cache = tempCache();
  const content = bytesOf(6000);
  const digest = await sha256Of(content);
  const partial = path.join(cache.dir, "ingest", `${digest.slice(7)}.999999999.dead.partial`);
  fs.writeFileSync(partial, bytesOf(2000, 3));
  await assert.rejects(cache.ingest({ digest, size: 6000 }, producerOf(content, digest)), DigestMismatchError);
  assert.deepEqual(partialFiles(cache, digest), []);
  assert.equal(await cache.ingest({ digest, size: 6000 }, producerOf(content, digest)), true);
  assert.deepEqual(new Uint8Array(fs.readFileSync(cache.blobPath(digest))), content);
});

test("ingest resumes the partial file of a dead process", async () => {
  const cache = tempCache();
  const content = bytesOf(3000);
  const digest = await sha256Of(content);
  const dead = path.join(cache.dir, "ingest", `${digest.slice(7)}.999999999.abc.partial`);
  fs.writeFileSync(dead, content.slice(0, 1200));
  const offsets: number[] = [];
  assert.equal(await cache.ingest({ digest, size: 3000 }, producerOf(content, digest, { log: offsets })), true);
  assert.deepEqual(offsets, [1200]);
  assert.deepEqual(fs.readdirSync(path.join(cache.dir, "ingest")), []);
});

test("ingest leaves the partial file of a live process alone", async () => {
  const cache = tempCache();
  const content = bytesOf(3000);
  const digest = await sha256Of(content);
  // PID 1 is always alive, so its download counts as in progress.
  const live = path.join(cache.dir, "ingest", `${digest.slice(7)}.1.abc.partial`);
  fs.writeFileSync(live, content.slice(0, 1200));
  const offsets: number[] = [];
  assert.equal(await cache.ingest({ digest, size: 3000 }, producerOf(content, digest, { log: offsets })), true);
  assert.deepEqual(offsets, [0]);
  assert.equal(fs.statSync(live).size, 1200, "the other download's file is untouched");
});

test("concurrent ingests of one blob both succeed", async () => {
  const cache = tempCache();
  const content = bytesOf(200_000);
  const digest = await sha256Of(content);
  const results = await Promise.all([
    cache.ingest({ digest, size: content.byteLength }, producerOf(content, digest)),
    cache.ingest({ digest, size: content.byteLength }, producerOf(content, digest)),
  ]);
  assert.ok(results.includes(true));
  assert.deepEqual(new Uint8Array(fs.readFileSync(cache.blobPath(digest))), content);
  assert.deepEqual(fs.readdirSync(path.join(cache.dir, "ingest")), []);
});

test("openBlob verifies content and evicts a corrupt blob", async () => {
  const cache = tempCache();
  const content = bytesOf(3_000_000);
  const digest = await sha256Of(content);
  await cache.putBytes({ digest, size: content.byteLength }, content);
  const read = new Uint8Array(await new Response(await cache.openBlob(digest, content.byteLength)).arrayBuffer());
  assert.deepEqual(read, content);

  const file = cache.blobPath(digest);
  const corrupt = new Uint8Array(content);
  corrupt[1_500_000] ^= 1;
  fs.writeFileSync(file, corrupt);
  await assert.rejects(new Response(await cache.openBlob(digest, content.byteLength)).arrayBuffer(), DigestMismatchError);
  assert.equal(fs.existsSync(file), false, "the corrupt blob is removed so the next fetch downloads it");
});

test("putBytes rejects bytes that do not match the digest", async () => {
  const cache = tempCache();
  const digest = await sha256Of(new TextEncoder().encode("right"));
  await assert.rejects(cache.putBytes({ digest, size: 5 }, new TextEncoder().encode("wrong")), DigestMismatchError);
  assert.equal(cache.has(digest), false);
});

test("tagManifest records names that replace earlier entries", async () => {
  const cache = tempCache();
  const one = await sha256Of(new Uint8Array([1]));
  const two = await sha256Of(new Uint8Array([2]));
  cache.tagManifest("127.0.0.1:5000/a:1", { digest: one, size: 1, mediaType: "application/vnd.oci.image.manifest.v1+json" });
  cache.tagManifest("127.0.0.1:5000/b:1", { digest: one, size: 1, mediaType: "application/vnd.oci.image.manifest.v1+json" });
  cache.tagManifest("127.0.0.1:5000/a:1", { digest: two, size: 1, mediaType: "application/vnd.oci.image.manifest.v1+json" });
  assert.equal(cache.listManifests().length, 2);
  assert.equal(cache.findManifest("127.0.0.1:5000/a:1")?.digest, two);
  assert.equal(cache.findManifest("127.0.0.1:5000/b:1")?.digest, one);
});

test("defaultCacheDir follows OCISTAGE_CACHE, then XDG_CACHE_HOME", () => {
  const saved = { cache: process.env.OCISTAGE_CACHE, xdg: process.env.XDG_CACHE_HOME };
  try {
    process.env.OCISTAGE_CACHE = "/tmp/explicit";
    assert.equal(defaultCacheDir(), "/tmp/explicit");
    delete process.env.OCISTAGE_CACHE;
    process.env.XDG_CACHE_HOME = "/tmp/xdg";
    assert.equal(defaultCacheDir(), path.join("/tmp/xdg", "ocistage"));
    delete process.env.XDG_CACHE_HOME;
    assert.equal(defaultCacheDir(), path.join(os.homedir(), ".cache", "ocistage"));
  } finally {
    for (const [key, value] of [["OCISTAGE_CACHE", saved.cache], ["XDG_CACHE_HOME", saved.xdg]] as const) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }
});
