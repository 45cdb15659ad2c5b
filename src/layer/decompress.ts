/**
 * Layer decompression: gzip, zstd or none, chosen by media type and checked
 * against the magic bytes at the start of the blob.
 *
 * gzip goes through `node:zlib` `createGunzip`, because it is the only
 * decoder that reads multi-member gzip on Deno, Bun and Node (Deno's
 * `DecompressionStream` stops after the first member). zstd uses
 * `node:zlib` `createZstdDecompress` where the runtime has it (Deno 2.9, Bun,
 * Node 22.15 and later) and the `fzstd` package otherwise.
 *
 * NOTE: `node:zlib` zstd on Deno 2.9 ends without an error on a truncated
 * frame. The digest check of the blob and the tar reader's truncation check
 * catch such input instead.
 *
 * @module
 */

import { Duplex } from "node:stream";
import * as zlib from "node:zlib";
import { Decompress as ZstdDecompress } from "fzstd";

import { LayerError } from "../errors.ts";
import type { FromWorker, ToWorker } from "./decode-worker.ts";

/** Compression of a layer blob. */
export type Compression = "gzip" | "zstd" | "none";

const GZIP_MAGIC = [0x1f, 0x8b];
const ZSTD_MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

/** Bytes read before choosing a decoder: enough for the magic bytes and a tar header. */
const PEEK_SIZE = 512;

/**
 * Returns the compression that a layer media type names, or undefined for a
 * media type that is not a layer.
 *
 * Recognises the OCI layer types (`application/vnd.oci.image.layer.v1.tar`,
 * `+gzip`, `+zstd`, and their `nondistributable` forms) and the Docker types
 * (`application/vnd.docker.image.rootfs.diff.tar.gzip`, `.foreign.diff.tar.gzip`,
 * `.diff.tar`). Parameters after `;` and letter case are ignored.
 */
export function compressionFromMediaType(mediaType: string): Compression | undefined {
  const type = mediaType.split(";")[0].trim().toLowerCase();
  if (type.startsWith("application/vnd.oci.image.layer.")) {
    if (type.endsWith(".tar")) return "none";
    if (type.endsWith(".tar+gzip")) return "gzip";
    if (type.endsWith(".tar+zstd")) return "zstd";
    return undefined;
  }
  if (type.startsWith("application/vnd.docker.image.rootfs.")) {
    if (type.endsWith(".tar.gzip")) return "gzip";
    if (type.endsWith(".tar.zstd")) return "zstd";
    if (type.endsWith(".tar")) return "none";
    return undefined;
  }
  return undefined;
}

/** Options of {@linkcode decompressStream}. */
export interface DecompressOptions {
  /**
   * Decode gzip and zstd in a web `Worker`, so that the consumer of the
   * stream runs while the next chunks are decoded. Default: true on Deno,
   * whose `node:zlib` decodes on the calling thread, and false elsewhere:
   * Node and Bun already decode on their thread pool, and Node has no web
   * `Worker`. Where there is no `Worker`, true decodes in the thread.
   */
  worker?: boolean;
  /**
   * Workers to take a decoder from and give it back to when the stream has
   * ended, so that the layers of one image share one worker. Without it,
   * each stream starts its own worker and ends it.
   */
  workers?: DecoderWorkers;
}

/**
 * Decoder workers kept between the layers of one image, because starting
 * one takes tens of milliseconds. An idle worker keeps a Deno process
 * running, so the owner calls {@linkcode DecoderWorkers.close} when done.
 */
export class DecoderWorkers {
  #idle: Worker[] = [];
  #closed = false;
  #started = 0;

  /** Number of workers started so far. */
  get started(): number {
    return this.#started;
  }

  /** Returns an idle worker, or a new one. */
  take(): Worker {
    const idle = this.#idle.pop();
    if (idle !== undefined) return idle;
    this.#started++;
    return startWorker();
  }

  /** Keeps a worker that finished a stream cleanly for the next stream, or ends it after close(). */
  release(worker: Worker): void {
    if (this.#closed) worker.terminate();
    else this.#idle.push(worker);
  }

  /** Ends every idle worker; workers still decoding end with their streams. */
  close(): void {
    this.#closed = true;
    for (const worker of this.#idle) worker.terminate();
    this.#idle = [];
  }
}

/** Returns the compression that the first bytes of a blob show, or "none". */
export function compressionFromMagic(head: Uint8Array): Compression {
  if (startsWith(head, GZIP_MAGIC)) return "gzip";
  if (startsWith(head, ZSTD_MAGIC)) return "zstd";
  return "none";
}

/**
 * Decompresses a layer blob into its tar stream.
 *
 * With `compression` "auto" the magic bytes decide. Otherwise the declared
 * compression is checked against them. Data that starts with gzip or zstd
 * magic is decompressed even when declared "none", as Docker and containerd
 * do. Data declared compressed that has no magic bytes passes through
 * unchanged only when it starts with a ustar header, and is a
 * {@linkcode LayerError} otherwise. An empty blob gives an empty stream.
 * A corrupt compressed stream fails the returned stream with a `LayerError`.
 * Cancelling the returned stream cancels `input`.
 *
 * On Deno, gzip and zstd are decoded in a worker by default (see
 * {@linkcode DecompressOptions.worker}).
 *
 * @example
 * ```ts
 * const tar = decompressStream(blob, compressionFromMediaType(descriptor.mediaType) ?? "auto");
 * ```
 */
export function decompressStream(
  input: ReadableStream<Uint8Array>,
  compression: Compression | "auto",
  options: DecompressOptions = {},
): ReadableStream<Uint8Array> {
  const useWorker = options.worker ?? defaultWorker();
  const inputReader = input.getReader();
  let output: ReadableStreamDefaultReader<Uint8Array> | undefined;
  let actual: Compression = "none";
  const failure: { input?: unknown } = {};

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        if (output === undefined) {
          const head = await peek(inputReader, failure);
          actual = chooseCompression(head, compression);
          const source = prefixed(head, inputReader, failure);
          output = (actual !== "none" && useWorker ? decodeInWorker(source, actual, options.workers) : decodeInThread(source, actual))
            .getReader();
        }
        const { done, value } = await output.read();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch (error) {
        // An input error (a network failure, a digest mismatch) passes through
        // unchanged, even when the decoder reports it in its own words.
        if ("input" in failure) throw failure.input;
        if (error instanceof LayerError) throw error;
        throw new LayerError(
          `${actual} decompression of the layer failed (${errorText(error)}): the blob is corrupt; remove it from the cache and fetch it again`,
          { cause: error },
        );
      }
    },
    async cancel(reason) {
      // Only the input's cancellation matters to the caller, so the decoder
      // is torn down without waiting for it.
      output?.cancel(reason).catch(() => {});
      await inputReader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

function startsWith(bytes: Uint8Array, magic: number[]): boolean {
  if (bytes.length < magic.length) return false;
  return magic.every((byte, index) => bytes[index] === byte);
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Reads chunks until at least {@linkcode PEEK_SIZE} bytes or the end of input, and returns them joined. */
async function peek(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  failure: { input?: unknown },
): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  while (total < PEEK_SIZE) {
    const { done, value } = await readInput(reader, failure);
    if (done) break;
    chunks.push(value);
    total += value.length;
  }
  if (chunks.length === 1) return chunks[0];
  const head = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    head.set(chunk, at);
    at += chunk.length;
  }
  return head;
}

function chooseCompression(head: Uint8Array, declared: Compression | "auto"): Compression {
  const magic = compressionFromMagic(head);
  if (declared === "auto" || magic !== "none" || head.length === 0) return magic;
  if (declared === "none" || looksLikeTar(head)) return "none";

  const hex = Array.from(head.subarray(0, 4), (byte) => byte.toString(16).padStart(2, "0")).join(" ");
  throw new LayerError(
    `layer declared as ${declared} starts with bytes "${hex}", which are neither gzip, zstd nor tar: check the layer media type or fetch the blob again`,
  );
}

function looksLikeTar(head: Uint8Array): boolean {
  const magic = new TextDecoder().decode(head.subarray(257, 262));
  return head.length >= PEEK_SIZE && magic === "ustar";
}

/** Reads one chunk of input and records a read error in `failure`. */
async function readInput(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  failure: { input?: unknown },
): Promise<ReadableStreamReadResult<Uint8Array>> {
  try {
    return await reader.read();
  } catch (error) {
    failure.input = error;
    throw error;
  }
}

/** Returns a stream of `head` followed by the rest of `reader`. */
function prefixed(
  head: Uint8Array,
  reader: ReadableStreamDefaultReader<Uint8Array>,
  failure: { input?: unknown },
): ReadableStream<Uint8Array> {
  let sentHead = head.length === 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (!sentHead) {
        sentHead = true;
        controller.enqueue(head);
        return;
      }
      const { done, value } = await readInput(reader, failure);
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

/**
 * Decodes on the calling thread. Exported for the decoder worker; callers
 * use {@linkcode decompressStream}.
 */
export function decodeInThread(source: ReadableStream<Uint8Array>, compression: Compression): ReadableStream<Uint8Array> {
  switch (compression) {
    case "none":
      return source;
    case "gzip":
      return nodeDecoder(source, zlib.createGunzip({ chunkSize: DECODER_CHUNK_SIZE }));
    case "zstd": {
      const create = (zlib as { createZstdDecompress?: (options: zlib.ZlibOptions) => Duplex }).createZstdDecompress;
      if (typeof create === "function") return nodeDecoder(source, create({ chunkSize: DECODER_CHUNK_SIZE }));
      return source.pipeThrough(fzstdTransform());
    }
  }
}

/**
 * Output chunk size of the `node:zlib` decoders. 64 KiB decodes about 15%
 * faster than the default 16 KiB on Deno 2.9 (bench/README.md).
 */
const DECODER_CHUNK_SIZE = 64 * 1024;

/**
 * Runs a `node:zlib` decoder as a web stream that reads `source` only when
 * the decoder has room and its output has been taken. `Duplex.toWeb` is not
 * used because its readable side limits the number of queued chunks (16,384
 * for zlib) instead of their bytes, so behind a slow disk it buffered
 * hundreds of megabytes of a large layer.
 */
function nodeDecoder(source: ReadableStream<Uint8Array>, decoder: Duplex): ReadableStream<Uint8Array> {
  const reader = source.getReader();
  let inputDone = false;
  let outputDone = false;
  let failure: { error: unknown } | undefined;
  let wake: (() => void) | undefined;
  const notify = () => {
    const resolve = wake;
    wake = undefined;
    resolve?.();
  };
  decoder.on("readable", notify);
  decoder.on("drain", notify);
  decoder.on("end", () => {
    outputDone = true;
    notify();
  });
  decoder.on("error", (error) => {
    failure ??= { error };
    notify();
  });

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      for (;;) {
        if (failure !== undefined) throw failure.error;
        const chunk = decoder.read() as Uint8Array | null;
        if (chunk !== null) {
          controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
          return;
        }
        if (outputDone) {
          controller.close();
          return;
        }
        if (!inputDone && !decoder.writableNeedDrain) {
          const { done, value } = await reader.read();
          if (done) {
            inputDone = true;
            decoder.end();
          } else {
            decoder.write(value);
          }
          continue;
        }
        // Every path that leaves the decoder busy ends in one of the events above.
        await new Promise<void>((resolve) => (wake = resolve));
      }
    },
    cancel(reason) {
      decoder.destroy();
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

/** Creates a zstd decoder on `fzstd`, for runtimes whose `node:zlib` has no zstd (Node before 22.15). */
function fzstdTransform(): TransformStream<Uint8Array, Uint8Array> {
  let decoder: ZstdDecompress;
  return new TransformStream<Uint8Array, Uint8Array>({
    start(controller) {
      decoder = new ZstdDecompress((data) => {
        if (data.length > 0) controller.enqueue(data);
      });
    },
    transform(chunk) {
      decoder.push(chunk);
    },
    flush() {
      decoder.push(new Uint8Array(0), true);
    },
  });
}

function defaultWorker(): boolean {
  return "Deno" in globalThis && typeof globalThis.Worker === "function";
}

/**
 * The decoder worker's code as text. The bundles in dist/ carry it, because
 * they may be loaded from a URL or from a package without src/.
 * scripts/build.mjs defines it. From source it is undefined.
 */
declare const OCISTAGE_DECODE_WORKER: string | undefined;

let workerUrl: string | undefined;

/** Starts a decoder worker from the bundled text, or from src/layer/decode-worker.ts. */
function startWorker(): Worker {
  if (workerUrl === undefined) {
    workerUrl = typeof OCISTAGE_DECODE_WORKER === "string"
      ? URL.createObjectURL(new Blob([OCISTAGE_DECODE_WORKER], { type: "text/javascript" }))
      : new URL("./decode-worker.ts", import.meta.url).href;
  }
  return new Worker(workerUrl, { type: "module" });
}

/** Output chunks the worker may send ahead of the consumer, and input chunks it requests ahead. */
const WORKER_CREDITS = 4;
const WORKER_INPUT_WINDOW = 2;

/**
 * Decodes `source` in a decoder worker (src/layer/decode-worker.ts), with
 * flow control both ways: the worker requests each input chunk, and sends
 * at most {@linkcode WORKER_CREDITS} output chunks that the consumer has not
 * taken. The worker ends with the stream.
 */
function decodeInWorker(
  source: ReadableStream<Uint8Array>,
  compression: Exclude<Compression, "none">,
  workers: DecoderWorkers | undefined,
): ReadableStream<Uint8Array> {
  if (typeof globalThis.Worker !== "function") return decodeInThread(source, compression);

  const reader = source.getReader();
  const worker = workers?.take() ?? startWorker();
  const post = (message: ToWorker, transfer: Transferable[] = []) => worker.postMessage(message, transfer);
  const outputs: Uint8Array[] = [];
  let finished = false;
  let failure: { error: unknown } | undefined;
  let wake: (() => void) | undefined;
  const notify = () => {
    const resolve = wake;
    wake = undefined;
    resolve?.();
  };

  // Input goes to the worker one chunk per request, in order.
  let requested = 0;
  let pumping = false;
  let inputDone = false;
  const pump = async () => {
    if (pumping) return;
    pumping = true;
    try {
      while (requested > 0 && !inputDone) {
        requested--;
        const { done, value } = await reader.read();
        if (done) {
          inputDone = true;
          post({ type: "end" });
          return;
        }
        // The copy keeps the caller's chunk usable when the worker takes the buffer.
        const chunk = value.slice().buffer;
        post({ type: "input", chunk }, [chunk]);
      }
    } catch (error) {
      failure ??= { error };
      notify();
    } finally {
      pumping = false;
    }
  };

  worker.onmessage = (event: MessageEvent<FromWorker>) => {
    const message = event.data;
    switch (message.type) {
      case "more":
        requested++;
        void pump();
        return;
      case "output":
        outputs.push(new Uint8Array(message.chunk));
        break;
      case "done":
        finished = true;
        break;
      case "error":
        failure ??= { error: new Error(message.message) };
        break;
    }
    notify();
  };
  worker.onerror = (event: ErrorEvent) => {
    event.preventDefault();
    failure ??= { error: new Error(`the decoder worker failed: ${event.message}`) };
    notify();
  };

  return new ReadableStream<Uint8Array>({
    start() {
      post({ type: "start", compression, credits: WORKER_CREDITS, inputWindow: WORKER_INPUT_WINDOW });
    },
    async pull(controller) {
      for (;;) {
        const chunk = outputs.shift();
        if (chunk !== undefined) {
          controller.enqueue(chunk);
          post({ type: "credit" });
          return;
        }
        if (failure !== undefined) {
          worker.terminate();
          throw failure.error;
        }
        if (finished) {
          if (workers) workers.release(worker);
          else worker.terminate();
          controller.close();
          return;
        }
        await new Promise<void>((resolve) => (wake = resolve));
      }
    },
    cancel(reason) {
      worker.terminate();
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}
