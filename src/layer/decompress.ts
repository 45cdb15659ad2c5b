/**
 * Layer decompression: gzip, zstd or none, chosen by media type and checked
 * against the magic bytes at the start of the blob.
 *
 * gzip goes through `node:zlib` `createGunzip`, because it is the only
 * decoder that reads multi-member gzip on Deno, Bun and Node (Deno's
 * `DecompressionStream` stops after the first member). zstd uses
 * `node:zlib` `createZstdDecompress` on Bun and on Node 22.15 and later, and
 * the `fzstd` package on Deno and older Node. `fzstd` does not check a
 * frame's content checksum, and frames need not have one, so `stage` checks
 * zstd layers against the image config's diff_ids.
 *
 * NOTE: `node:zlib` zstd on Deno 2.9 throws a corrupt frame's error as an
 * uncaught exception, which ends the process, in place of an `error` event.
 * That is why Deno decodes zstd with `fzstd`.
 *
 * @module
 */

import * as fs from "node:fs";
import { Duplex } from "node:stream";
import * as zlib from "node:zlib";
import { Decompress as ZstdDecompress } from "fzstd";

import { LayerError } from "../errors.ts";
import type { FromWorker, ToWorker } from "./decode-worker.ts";
import { hashedFileStream } from "../cache.ts";
import type { Digest, HasherBackend } from "../digest.ts";

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

/** Options of {@linkcode decompressBlobFile}. */
export interface BlobFileOptions {
  /** sha256 backend. Default "auto". */
  hasher?: HasherBackend;
  /**
   * Called with the byte count and digest of the file after its last byte;
   * an error it throws fails the stream. Without it nothing is checked.
   */
  onEnd?: (received: number, actual: Digest) => void;
  /**
   * Read, hash and decode in a web `Worker`, so that the consumer of the
   * stream runs while the next chunks are decoded. This helps on Deno,
   * whose `node:zlib` decodes on the calling thread. It costs memory,
   * because the worker has its own heap and allocator arena
   * (bench/README.md has both figures). Node and Bun already decode on
   * their thread pool. Where there is no web `Worker` (Node), the stream
   * reads in the calling thread. Default false.
   */
  worker?: boolean;
  /**
   * Workers to take a decoder from and give it back to when the stream has
   * ended, so that the layers of one image share one worker. Without it,
   * each stream starts its own worker and ends it.
   */
  workers?: DecoderWorkers;
  /**
   * Reuse the buffer of each chunk once the next chunk is read, which keeps
   * the worker from allocating a buffer per chunk. Only for consumers that
   * are done with a chunk when they read the next, such as the layer
   * applier. Default false.
   */
  reuseChunks?: boolean;
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
 * @example
 * ```ts
 * const tar = decompressStream(blob, compressionFromMediaType(descriptor.mediaType) ?? "auto");
 * ```
 */
export function decompressStream(
  input: ReadableStream<Uint8Array>,
  compression: Compression | "auto",
): ReadableStream<Uint8Array> {
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
          output = decodeInThread(prefixed(head, inputReader, failure), actual).getReader();
        }
        const { done, value } = await output.read();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch (error) {
        // An input error (a network failure, a digest mismatch) passes through
        // unchanged, even when the decoder reports it in its own words.
        if ("input" in failure) throw failure.input;
        // The input is left unread, so it is cancelled: that closes the file
        // or connection behind it.
        output?.cancel(error).catch(() => {});
        inputReader.cancel(error).catch(() => {});
        if (error instanceof LayerError) throw error;
        throw new LayerError(
          `${actual} decompression of the layer failed (${errorText(error)}): the layer's compressed data is invalid`,
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
    `layer declared as ${declared} starts with bytes "${hex}", which are neither gzip, zstd nor tar: check the layer media type`,
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

function decodeInThread(source: ReadableStream<Uint8Array>, compression: Compression): ReadableStream<Uint8Array> {
  switch (compression) {
    case "none":
      return source;
    case "gzip":
      return nodeDecoder(source, zlib.createGunzip({ chunkSize: DECODER_CHUNK_SIZE }));
    case "zstd": {
      const create = nativeZstd();
      if (create !== undefined) return nodeDecoder(source, create({ chunkSize: DECODER_CHUNK_SIZE }));
      return source.pipeThrough(fzstdTransform());
    }
  }
}

/** Returns `node:zlib`'s zstd decoder factory where ocistage uses it: not on Deno (see the module NOTE), nor where it is missing. */
function nativeZstd(): ((options: zlib.ZlibOptions) => Duplex) | undefined {
  if ("Deno" in globalThis) return undefined;
  const create = (zlib as { createZstdDecompress?: (options: zlib.ZlibOptions) => Duplex }).createZstdDecompress;
  return typeof create === "function" ? create : undefined;
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

/** Output chunks the worker may send ahead of the consumer. */
const WORKER_CREDITS = 4;

/**
 * Reads a layer blob file, hashes it and decompresses it into its tar
 * stream, in the calling thread or, with `worker`, in a decoder worker
 * (src/layer/decode-worker.ts; see {@linkcode BlobFileOptions.worker}).
 * Compression, errors and cancellation are as for
 * {@linkcode decompressStream}. `options.onEnd` checks the file's size and
 * digest after its last byte.
 *
 * @example
 * ```ts
 * const tar = decompressBlobFile(cache.blobPath(digest), "gzip", {
 *   onEnd: (received, actual) => cache.checkStored(digest, size, received, actual),
 * });
 * ```
 */
export function decompressBlobFile(file: string, compression: Compression | "auto", options: BlobFileOptions = {}): ReadableStream<Uint8Array> {
  const useWorker = options.worker === true && typeof globalThis.Worker === "function";
  if (useWorker) return decodeInWorker(file, compression, options);

  const onEnd = options.onEnd ?? (() => {});
  const blob = openedOnRead(async () => hashedFileStream(await fs.promises.open(file, "r"), options.hasher ?? "auto", onEnd));
  return decompressStream(blob, compression);
}

/** Returns a stream that calls `open` on its first read and then passes on what the opened stream gives. */
export function openedOnRead(open: () => Promise<ReadableStream<Uint8Array>>): ReadableStream<Uint8Array> {
  let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      reader ??= (await open()).getReader();
      const { done, value } = await reader.read();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel(reason) {
      return reader?.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

/**
 * Runs {@linkcode decompressBlobFile} in a decoder worker. The worker sends
 * at most {@linkcode WORKER_CREDITS} output chunks that the consumer has not
 * taken, and ends with the stream unless `workers` keeps it.
 */
function decodeInWorker(file: string, compression: Compression | "auto", options: BlobFileOptions): ReadableStream<Uint8Array> {
  const { workers, reuseChunks, onEnd } = options;
  const worker = workers?.take() ?? startWorker();
  const post = (message: ToWorker, transfer: Transferable[] = []) => worker.postMessage(message, transfer);
  const outputs: Uint8Array[] = [];
  /** The buffer of the chunk last handed out, given back to the worker on the next read with `reuseChunks`. */
  let handedOut: ArrayBuffer | undefined;
  let end: { received: number; digest: Digest } | undefined;
  let failure: { error: unknown } | undefined;
  let wake: (() => void) | undefined;
  const notify = () => {
    const resolve = wake;
    wake = undefined;
    resolve?.();
  };

  worker.onmessage = (event: MessageEvent<FromWorker>) => {
    const message = event.data;
    if (message.type === "output") outputs.push(new Uint8Array(message.chunk, 0, message.length));
    else if (message.type === "done") end = { received: message.received, digest: message.digest };
    else failure ??= { error: message.layer ? new LayerError(message.message, { entry: message.entry }) : new Error(message.message) };
    notify();
  };
  worker.onerror = (event: ErrorEvent) => {
    event.preventDefault();
    failure ??= { error: new Error(`the decoder worker failed: ${event.message}`) };
    notify();
  };

  const stop = () => worker.terminate();
  return new ReadableStream<Uint8Array>({
    start() {
      post({ type: "start", file, compression, hasher: options.hasher ?? "auto", credits: WORKER_CREDITS });
    },
    async pull(controller) {
      for (;;) {
        const chunk = outputs.shift();
        if (chunk !== undefined) {
          const used = handedOut;
          handedOut = reuseChunks ? chunk.buffer as ArrayBuffer : undefined;
          controller.enqueue(chunk);
          post({ type: "credit", buffer: used }, used ? [used] : []);
          return;
        }
        if (failure !== undefined) {
          stop();
          throw failure.error;
        }
        if (end !== undefined) {
          if (workers) workers.release(worker);
          else stop();
          onEnd?.(end.received, end.digest);
          controller.close();
          return;
        }
        await new Promise<void>((resolve) => (wake = resolve));
      }
    },
    cancel() {
      stop();
    },
  }, { highWaterMark: 0 });
}
