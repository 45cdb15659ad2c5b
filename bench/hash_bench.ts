/**
 * sha256 per backend, raw and through ocistage's verifying stream, as
 * `deno bench` cases (Deno only; bench/hash.ts is the variant that also runs
 * on Bun and Node):
 *
 *   deno bench -A bench/hash_bench.ts
 *
 * Each iteration hashes 64 MiB in 1 MiB chunks. The "stream" cases of one
 * backend run in the same group as its "raw" case, so `deno bench` prints
 * the stream/raw ratio as "x times slower".
 */
import { createSha256, createVerifyStream, type Digest, type HasherBackend } from "../src/digest.ts";

const CHUNK = new Uint8Array(1 << 20).map((_, i) => (i * 31) & 0xff);
const CHUNKS = 64;
const TOTAL = CHUNK.byteLength * CHUNKS;

async function hashRaw(backend: HasherBackend): Promise<Digest> {
  const hash = await createSha256(backend);
  for (let i = 0; i < CHUNKS; i++) hash.update(CHUNK);
  return hash.digest();
}

async function hashThroughStream(backend: HasherBackend, digest: Digest): Promise<void> {
  let sent = 0;
  const source = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent === CHUNKS) {
        controller.close();
        return;
      }
      controller.enqueue(CHUNK);
      sent++;
    },
  });
  const verify = await createVerifyStream({ digest, size: TOTAL }, backend);
  const reader = source.pipeThrough(verify).getReader();
  while (!(await reader.read()).done) {
    // The stream checks size and digest when it ends.
  }
}

const expected = await hashRaw("native");

for (const backend of ["native", "wasm"] as const) {
  Deno.bench({
    name: `${backend} raw, 64 MiB`,
    group: backend,
    baseline: true,
    async fn() {
      await hashRaw(backend);
    },
  });
  Deno.bench({
    name: `${backend} verifying stream, 64 MiB`,
    group: backend,
    async fn() {
      await hashThroughStream(backend, expected);
    },
  });
}
