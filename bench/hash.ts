/**
 * sha256 throughput per backend, raw and through ocistage's verifying
 * stream, for 64 KiB and 1 MiB chunks. Runs on Deno, Bun and Node:
 *
 *   deno run -A bench/hash.ts
 *   bun bench/hash.ts
 *   node --experimental-strip-types bench/hash.ts
 *
 * Prints one line per measurement and the stream/raw ratio per backend.
 * Each figure is the median of 5 runs over 512 MiB of data.
 */
import { createSha256, createVerifyStream, type Digest } from "../src/digest.ts";

const TOTAL = 512 << 20;
const RUNS = 5;

function runtimeName(): string {
  const versions = globalThis.process?.versions as Record<string, string | undefined> | undefined;
  if (versions?.deno) return `deno ${versions.deno}`;
  if (versions?.bun) return `bun ${versions.bun}`;
  return `node ${versions?.node ?? "?"}`;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

async function raw(backend: "native" | "wasm", chunk: Uint8Array): Promise<{ seconds: number; digest: Digest }> {
  const start = performance.now();
  const hash = await createSha256(backend);
  for (let done = 0; done < TOTAL; done += chunk.byteLength) hash.update(chunk);
  const digest = hash.digest();
  return { seconds: (performance.now() - start) / 1000, digest };
}

async function throughStream(backend: "native" | "wasm", chunk: Uint8Array, digest: Digest): Promise<number> {
  const start = performance.now();
  let sent = 0;
  const source = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent >= TOTAL) {
        controller.close();
        return;
      }
      controller.enqueue(chunk);
      sent += chunk.byteLength;
    },
  });
  const verify = await createVerifyStream({ digest, size: TOTAL }, backend);
  const reader = source.pipeThrough(verify).getReader();
  while (!(await reader.read()).done) {
    // Drain: the stream checks size and digest when it ends.
  }
  return (performance.now() - start) / 1000;
}

const mb = (seconds: number) => (TOTAL / seconds / 1e6).toFixed(0);

console.log(`sha256 throughput on ${runtimeName()}, ${TOTAL >> 20} MiB per run, median of ${RUNS} runs`);
for (const backend of ["native", "wasm"] as const) {
  for (const size of [64 << 10, 1 << 20]) {
    const chunk = new Uint8Array(size).map((_, i) => (i * 31) & 0xff);
    const rawTimes: number[] = [];
    const streamTimes: number[] = [];
    let digest: Digest | undefined;
    for (let i = 0; i < RUNS; i++) {
      const result = await raw(backend, chunk);
      rawTimes.push(result.seconds);
      digest = result.digest;
      streamTimes.push(await throughStream(backend, chunk, digest));
    }
    const rawSeconds = median(rawTimes);
    const streamSeconds = median(streamTimes);
    console.log(
      `${backend.padEnd(6)} chunk ${String(size >> 10).padStart(4)} KiB: raw ${mb(rawSeconds)} MB/s, ` +
        `verifying stream ${mb(streamSeconds)} MB/s, stream/raw ${(rawSeconds / streamSeconds).toFixed(2)}`,
    );
  }
}
