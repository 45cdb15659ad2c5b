import { after, test } from "node:test";
import assert from "node:assert/strict";

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { compressionFromMagic, compressionFromMediaType, DecoderWorkers, decompressBlobFile, decompressStream } from "../src/layer/decompress.ts";
import { sha256Of } from "../src/digest.ts";
import { LayerError } from "../src/errors.ts";
import { buildTar, concat, gzipBytes, streamOf, zstdBytes } from "./fixtures/tar.ts";

async function collect(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const chunk of stream) parts.push(chunk);
  return concat(parts);
}

async function rejectsWithLayerError(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof LayerError, `expected LayerError, got ${error}`);
    assert.match(error.message, pattern);
    return true;
  });
}

const tar = buildTar([
  { path: "etc/", type: "dir" },
  { path: "etc/os-release", content: "ID=debian\n" },
  { path: "data.bin", content: new Uint8Array(200_000).map((_, i) => (i * 7919) % 251) },
]);

test("compressionFromMediaType maps layer media types", () => {
  const table: [string, string | undefined][] = [
    ["application/vnd.oci.image.layer.v1.tar", "none"],
    ["application/vnd.oci.image.layer.v1.tar+gzip", "gzip"],
    ["application/vnd.oci.image.layer.v1.tar+zstd", "zstd"],
    ["application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"],
    ["application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"],
    ["application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"],
    ["application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"],
    ["application/vnd.docker.image.rootfs.diff.tar", "none"],
    ["Application/VND.OCI.Image.Layer.V1.Tar+Gzip; charset=binary", "gzip"],
    ["application/vnd.oci.image.config.v1+json", undefined],
    ["application/vnd.oci.image.layer.v1.tar+bzip2", undefined],
    ["", undefined],
  ];
  for (const [mediaType, expected] of table) {
    assert.equal(compressionFromMediaType(mediaType), expected, mediaType);
  }
});

test("compressionFromMagic reads gzip and zstd magic", () => {
  assert.equal(compressionFromMagic(new Uint8Array([0x1f, 0x8b, 8, 0])), "gzip");
  assert.equal(compressionFromMagic(new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0])), "zstd");
  assert.equal(compressionFromMagic(new Uint8Array([0x28, 0xb5, 0x2f])), "none");
  assert.equal(compressionFromMagic(tar), "none");
  assert.equal(compressionFromMagic(new Uint8Array(0)), "none");
});

test("decompressStream gunzips a layer", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(gzipBytes(tar), 1000), "gzip")), tar);
});

test("decompressStream reads every gzip member", async () => {
  const first = tar.subarray(0, 100_000);
  const second = tar.subarray(100_000);
  const joined = new Uint8Array([...gzipBytes(first), ...gzipBytes(second)]);
  assert.deepEqual(await collect(decompressStream(streamOf(joined, 4096), "gzip")), tar);
});

test("decompressStream decodes zstd", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(zstdBytes(tar), 777), "zstd")), tar);
});

test("decompressStream passes an uncompressed tar through", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(tar, 300), "none")), tar);
});

test("decompressStream detects compression with auto", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(gzipBytes(tar)), "auto")), tar);
  assert.deepEqual(await collect(decompressStream(streamOf(zstdBytes(tar)), "auto")), tar);
  assert.deepEqual(await collect(decompressStream(streamOf(tar), "auto")), tar);
});

test("decompressStream peeks across one-byte chunks", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(gzipBytes(tar), 1), "gzip")), tar);
});

test("decompressStream follows magic over a none media type", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(gzipBytes(tar)), "none")), tar);
});

test("decompressStream follows magic over another compression", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(zstdBytes(tar)), "gzip")), tar);
});

test("decompressStream passes a tar declared as gzip", async () => {
  assert.deepEqual(await collect(decompressStream(streamOf(tar), "gzip")), tar);
});

test("decompressStream rejects unknown data declared as gzip", async () => {
  const junk = new Uint8Array(2000).fill(0x41);
  await rejectsWithLayerError(collect(decompressStream(streamOf(junk), "gzip")), /declared as gzip starts with bytes "41 41 41 41"/);
});

test("decompressStream rejects corrupt gzip", async () => {
  const gz = gzipBytes(tar).slice();
  for (let i = 100; i < 200; i++) gz[i] ^= 0x5a;
  await rejectsWithLayerError(collect(decompressStream(streamOf(gz, 512), "gzip")), /gzip decompression of the layer failed/);
});

test("decompressStream rejects truncated gzip", async () => {
  const gz = gzipBytes(tar);
  await rejectsWithLayerError(
    collect(decompressStream(streamOf(gz.subarray(0, gz.length - 100)), "gzip")),
    /gzip decompression of the layer failed/,
  );
});

test("decompressStream rejects a corrupt zstd frame header", async () => {
  const zst = zstdBytes(tar).slice();
  zst[4] = 0xff;
  zst[5] = 0xff;
  await rejectsWithLayerError(collect(decompressStream(streamOf(zst), "zstd")), /zstd decompression of the layer failed/);
});

test("decompressStream gives nothing for an empty blob", async () => {
  for (const compression of ["gzip", "zstd", "none", "auto"] as const) {
    const out = await collect(decompressStream(streamOf(new Uint8Array(0)), compression));
    assert.equal(out.length, 0, compression);
  }
});

test("decompressStream cancels its input when cancelled", async () => {
  let cancelled: unknown;
  const member = gzipBytes(tar);
  const input = new ReadableStream<Uint8Array>({
    // An endless run of gzip members, so only cancel() can stop it.
    pull(controller) {
      controller.enqueue(member);
    },
    cancel(reason) {
      cancelled = reason;
    },
  });
  const reader = decompressStream(input, "gzip").getReader();
  await reader.read();
  await reader.cancel("stop");
  assert.equal(cancelled, "stop");
});

test("decompressStream passes input errors through unchanged", async () => {
  for (const [compression, data] of [["none", tar], ["gzip", gzipBytes(tar)], ["zstd", zstdBytes(tar)]] as const) {
    const failure = new TypeError("network lost");
    const input = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(data.subarray(0, 1024));
      },
      pull(controller) {
        controller.error(failure);
      },
    });
    await assert.rejects(collect(decompressStream(input, compression)), (error) => error === failure, compression);
  }
});

// The worker path runs where the runtime has a web Worker (Deno, Bun); on
// Node, `worker: true` reads in the thread and the same results hold.
const hasWorker = typeof globalThis.Worker === "function";

/** Reads a stream slowly, so that the worker has to wait for credits. */
async function collectSlowly(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const chunk of stream) {
    parts.push(chunk.slice());
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  return concat(parts);
}

const blobDir = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-decompress-"));
let blobCount = 0;
after(() => fs.rmSync(blobDir, { recursive: true, force: true }));

/** Writes `bytes` to a new file in a temporary directory and returns its path. */
function blobFile(bytes: Uint8Array): string {
  const file = path.join(blobDir, `blob-${blobCount++}`);
  fs.writeFileSync(file, bytes);
  return file;
}

for (const worker of [false, true]) {
  test(`decompressBlobFile with worker ${worker} decodes and reports size and digest`, async () => {
    for (const [compression, bytes] of [["gzip", gzipBytes(tar)], ["zstd", zstdBytes(tar)], ["auto", tar]] as const) {
      const file = blobFile(bytes);
      let end: [number, string] | undefined;
      const out = await collect(decompressBlobFile(file, compression, { worker, onEnd: (received, actual) => (end = [received, actual]) }));
      assert.deepEqual(out, tar, compression);
      assert.deepEqual(end, [bytes.length, await sha256Of(bytes)], compression);
    }
  });

  test(`decompressBlobFile with worker ${worker} keeps bytes in order across batches`, async () => {
    // 5 MiB of varied bytes: several 1 MiB batches, a short last one, and a slow reader.
    const big = new Uint8Array(5 * 1024 * 1024 + 12345).map((_, i) => (i * 2654435761) >>> 24);
    const file = blobFile(gzipBytes(big));
    assert.deepEqual(await collectSlowly(decompressBlobFile(file, "gzip", { worker, reuseChunks: true })), big);
  });

  test(`decompressBlobFile with worker ${worker} fails on corrupt data, onEnd and a missing file`, async () => {
    const gz = gzipBytes(tar).slice();
    for (let i = 100; i < 200; i++) gz[i] ^= 0x5a;
    await rejectsWithLayerError(collect(decompressBlobFile(blobFile(gz), "gzip", { worker })), /gzip decompression of the layer failed/);

    const failure = new TypeError("digest differs");
    const onEnd = () => {
      throw failure;
    };
    await assert.rejects(collect(decompressBlobFile(blobFile(gzipBytes(tar)), "gzip", { worker, onEnd })), (error) => error === failure);

    await assert.rejects(collect(decompressBlobFile(path.join(os.tmpdir(), "ocistage-no-such-blob"), "gzip", { worker })), /ENOENT|No such file/);
  });

  test(`decompressBlobFile with worker ${worker} stops when cancelled`, async () => {
    const big = new Uint8Array(8 * 1024 * 1024).map((_, i) => (i * 7919) % 251);
    const reader = decompressBlobFile(blobFile(gzipBytes(big)), "gzip", { worker }).getReader();
    const first = await reader.read();
    assert.equal(first.done, false);
    await reader.cancel("stop");
    const after = await reader.read();
    assert.equal(after.done, true);
  });
}

test("DecoderWorkers gives one worker to streams in turn, and a failed stream's worker is not reused", async () => {
  const workers = new DecoderWorkers();
  try {
    const file = blobFile(gzipBytes(tar));
    for (let i = 0; i < 3; i++) {
      assert.deepEqual(await collect(decompressBlobFile(file, "gzip", { worker: true, workers })), tar);
    }
    assert.equal(workers.started, hasWorker ? 1 : 0);

    const gz = gzipBytes(tar).slice();
    for (let i = 100; i < 200; i++) gz[i] ^= 0x5a;
    await rejectsWithLayerError(collect(decompressBlobFile(blobFile(gz), "gzip", { worker: true, workers })), /gzip decompression/);
    assert.deepEqual(await collect(decompressBlobFile(blobFile(zstdBytes(tar)), "zstd", { worker: true, workers })), tar);
    assert.equal(workers.started, hasWorker ? 2 : 0);
  } finally {
    workers.close();
  }
});
