/**
 * The decoder worker: decodes one gzip or zstd layer on its own thread, so
 * that on Deno, whose `node:zlib` decodes on the calling thread, the layer
 * applier writes files while the next chunks are decoded.
 *
 * Started by {@linkcode decompressStream} through the web `Worker` API. One
 * worker decodes one stream at a time, and may decode several in turn. The
 * protocol, every message a plain object with a `type`:
 * - in: `start` (the compression, the number of output chunks it may send
 *   ahead, and the number of input chunks to ask for ahead), then `input`
 *   (an `ArrayBuffer`, transferred), `end` and `credit` (one more output
 *   chunk may be sent);
 * - out: `more` (send one more input chunk), `output` (an `ArrayBuffer`,
 *   transferred), `done` after the last output, or `error` with a message.
 *
 * @module
 */

import { type Compression, decodeInThread } from "./decompress.ts";

/** A message from the stream that started the worker. */
export type ToWorker =
  | { type: "start"; compression: Exclude<Compression, "none">; credits: number; inputWindow: number }
  | { type: "input"; chunk: ArrayBuffer }
  | { type: "end" }
  | { type: "credit" };

/** A message from the worker to the stream that started it. */
export type FromWorker =
  | { type: "more" }
  | { type: "output"; chunk: ArrayBuffer }
  | { type: "done" }
  | { type: "error"; message: string };

interface WorkerScope {
  onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
  postMessage(message: FromWorker, transfer?: Transferable[]): void;
}

const scope = globalThis as unknown as WorkerScope;

const inputs: Uint8Array[] = [];
let inputEnded = false;
let credits = 0;
let wake: (() => void) | undefined;

function notify(): void {
  const resolve = wake;
  wake = undefined;
  resolve?.();
}

function waitForMessage(): Promise<void> {
  return new Promise((resolve) => (wake = resolve));
}

scope.onmessage = (event) => {
  const message = event.data;
  switch (message.type) {
    case "start":
      // A worker may decode several streams in turn, so the last one's state is cleared.
      inputs.length = 0;
      inputEnded = false;
      credits = message.credits;
      for (let i = 0; i < message.inputWindow; i++) scope.postMessage({ type: "more" });
      void run(message.compression);
      return;
    case "input":
      inputs.push(new Uint8Array(message.chunk));
      break;
    case "end":
      inputEnded = true;
      break;
    case "credit":
      credits++;
      break;
  }
  notify();
};

/** The compressed input as a stream that requests one more chunk each time it hands one on. */
function inputStream(): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      while (inputs.length === 0 && !inputEnded) await waitForMessage();
      const chunk = inputs.shift();
      if (chunk === undefined) {
        controller.close();
        return;
      }
      controller.enqueue(chunk);
      scope.postMessage({ type: "more" });
    },
  }, { highWaterMark: 0 });
}

/**
 * Bytes of decoded output per message. Batching the decoder's 64 KiB chunks
 * keeps the messages, and the work of passing each, few.
 */
const BATCH_SIZE = 1 << 20;

async function run(compression: Exclude<Compression, "none">): Promise<void> {
  const reader = decodeInThread(inputStream(), compression).getReader();
  let batch = new Uint8Array(BATCH_SIZE);
  let filled = 0;
  const send = async (bytes: Uint8Array) => {
    while (credits === 0) await waitForMessage();
    credits--;
    scope.postMessage({ type: "output", chunk: bytes.buffer as ArrayBuffer }, [bytes.buffer as ArrayBuffer]);
  };
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      // The decoder may reuse the buffer of a chunk it handed out, so bytes
      // are copied into the batch, which the worker then gives away.
      let at = 0;
      while (at < value.length) {
        const count = Math.min(value.length - at, BATCH_SIZE - filled);
        batch.set(value.subarray(at, at + count), filled);
        filled += count;
        at += count;
        if (filled === BATCH_SIZE) {
          await send(batch);
          batch = new Uint8Array(BATCH_SIZE);
          filled = 0;
        }
      }
    }
    if (filled > 0) await send(batch.slice(0, filled));
    scope.postMessage({ type: "done" });
  } catch (error) {
    scope.postMessage({ type: "error", message: error instanceof Error ? error.message : String(error) });
  }
}
