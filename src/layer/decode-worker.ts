/**
 * The decoder worker: reads, hashes and decodes one layer blob file on its
 * own thread, so that on Deno, whose `node:zlib` decodes on the calling
 * thread, the layer applier writes files while the next chunks are decoded.
 * Reading the file here also keeps the buffers of the compressed data, and
 * the garbage they leave, out of the applier's thread.
 *
 * Started by {@linkcode decompressBlobFile} through the web `Worker` API. One
 * worker decodes one blob at a time, and may decode several in turn. The
 * protocol, every message a plain object with a `type`:
 * - in: `start` (the file, its compression, the sha256 backend and the
 *   number of output chunks the worker may send ahead), then `credit` (one
 *   more output chunk may be sent, optionally with a used output buffer to
 *   fill again);
 * - out: `output` (an `ArrayBuffer`, transferred, and the number of bytes it
 *   holds), `done` with the size and digest of the file after the last
 *   output, or `error`.
 *
 * @module
 */

import * as fs from "node:fs";

import { hashedFileStream } from "../cache.ts";
import type { Digest, HasherBackend } from "../digest.ts";
import { LayerError } from "../errors.ts";
import { type Compression, decompressStream } from "./decompress.ts";

/** A message from the stream that started the worker. */
export type ToWorker =
  | { type: "start"; file: string; compression: Compression | "auto"; hasher: HasherBackend; credits: number }
  | { type: "credit"; buffer?: ArrayBuffer };

/** A message from the worker to the stream that started it. */
export type FromWorker =
  | { type: "output"; chunk: ArrayBuffer; length: number }
  | { type: "done"; received: number; digest: Digest }
  | { type: "error"; message: string; layer: boolean; entry?: string };

interface WorkerScope {
  onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
  postMessage(message: FromWorker, transfer?: Transferable[]): void;
}

const scope = globalThis as unknown as WorkerScope;

/**
 * Bytes of decoded output per message. Batching the decoder's 64 KiB chunks
 * keeps the messages, and the work of passing each, few.
 */
const BATCH_SIZE = 1 << 20;

let credits = 0;
/** Output buffers given back by the stream, filled again before new ones are allocated. */
const spare: ArrayBuffer[] = [];
let wake: (() => void) | undefined;

scope.onmessage = (event) => {
  const message = event.data;
  if (message.type === "start") {
    credits = message.credits;
    void run(message.file, message.compression, message.hasher);
    return;
  }
  credits++;
  if (message.buffer?.byteLength === BATCH_SIZE) spare.push(message.buffer);
  const resolve = wake;
  wake = undefined;
  resolve?.();
};

async function run(file: string, compression: Compression | "auto", hasher: HasherBackend): Promise<void> {
  let end: { received: number; digest: Digest } | undefined;
  const nextBatch = () => new Uint8Array(spare.pop() ?? new ArrayBuffer(BATCH_SIZE));
  let batch = nextBatch();
  let filled = 0;
  const send = async () => {
    while (credits === 0) await new Promise<void>((resolve) => (wake = resolve));
    credits--;
    const chunk = batch.buffer as ArrayBuffer;
    scope.postMessage({ type: "output", chunk, length: filled }, [chunk]);
    batch = nextBatch();
    filled = 0;
  };

  try {
    const handle = await fs.promises.open(file, "r");
    const blob = hashedFileStream(handle, hasher, (received, digest) => (end = { received, digest }));
    for await (const value of decompressStream(blob, compression)) {
      // The decoder may reuse the buffer of a chunk it handed out, so bytes
      // are copied into the batch, which the worker then gives away.
      let at = 0;
      while (at < value.length) {
        const count = Math.min(value.length - at, BATCH_SIZE - filled);
        batch.set(value.subarray(at, at + count), filled);
        filled += count;
        at += count;
        if (filled === BATCH_SIZE) await send();
      }
    }
    if (filled > 0) await send();
    scope.postMessage({ type: "done", received: end!.received, digest: end!.digest });
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    scope.postMessage({ type: "error", message, layer: error instanceof LayerError, entry: (error as LayerError).entry });
  }
}
