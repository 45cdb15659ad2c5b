/**
 * Content digests: parsing, streaming sha256 with a native and a WebAssembly
 * backend, and a verifying stream that checks size and digest at its end.
 *
 * @module
 */
import { createSHA256 } from "hash-wasm";
import { DigestMismatchError } from "./errors.ts";

/** A content digest in the form `sha256:<64 lowercase hex digits>`. */
export type Digest = `sha256:${string}`;

const SHA256_DIGEST = /^sha256:[a-f0-9]{64}$/;
const OTHER_DIGEST = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;

/**
 * Validate a digest string and return it typed as {@link Digest}.
 *
 * Only sha256 is supported; other well-formed algorithms get their own message.
 *
 * @throws {TypeError} when the string is not a sha256 digest.
 */
export function parseDigest(value: string): Digest {
  if (SHA256_DIGEST.test(value)) return value as Digest;
  if (OTHER_DIGEST.test(value) && !value.startsWith("sha256:")) {
    throw new TypeError(
      `unsupported digest algorithm in "${value}": only sha256 digests are supported`,
    );
  }
  throw new TypeError(
    `invalid digest "${value}": expected "sha256:" followed by 64 lowercase hex digits`,
  );
}

/** Return true when `value` is a valid sha256 digest string. */
export function isDigest(value: string): value is Digest {
  return SHA256_DIGEST.test(value);
}

/** The sha256 implementation: `auto` picks `native` when `node:crypto` loads. */
export type HasherBackend = "auto" | "native" | "wasm";

/** An incremental sha256 computation. */
export interface Sha256 {
  /** The backend actually in use. */
  readonly backend: "native" | "wasm";
  /** Feed the next chunk of content. */
  update(chunk: Uint8Array): void;
  /** Finish and return the digest as `sha256:<hex>`; the hasher cannot be reused. */
  digest(): Digest;
}

type NodeCrypto = typeof import("node:crypto");
let nodeCrypto: Promise<NodeCrypto | undefined> | undefined;

function loadNodeCrypto(): Promise<NodeCrypto | undefined> {
  nodeCrypto ??= import("node:crypto").then(
    (mod) => (typeof mod.createHash === "function" ? mod : undefined),
    () => undefined,
  );
  return nodeCrypto;
}

/**
 * Create an incremental sha256 hasher.
 *
 * `native` uses `node:crypto` (SHA-NI where the CPU has it) and throws when the
 * runtime lacks it; `wasm` uses hash-wasm; `auto` (the default) prefers native.
 */
export async function createSha256(backend: HasherBackend = "auto"): Promise<Sha256> {
  if (backend !== "wasm") {
    const crypto = await loadNodeCrypto();
    if (crypto) {
      const hash = crypto.createHash("sha256");
      return {
        backend: "native",
        update: (chunk) => void hash.update(chunk),
        digest: () => `sha256:${hash.digest("hex")}` as Digest,
      };
    }
    if (backend === "native") {
      throw new TypeError(
        'hasher "native" needs node:crypto, which this runtime lacks: use "wasm" or "auto"',
      );
    }
  }
  const hash = await createSHA256();
  hash.init();
  return {
    backend: "wasm",
    update: (chunk) => void hash.update(chunk),
    digest: () => `sha256:${hash.digest("hex")}` as Digest,
  };
}

/** Compute the sha256 digest of a complete buffer. */
export async function sha256Of(data: Uint8Array, backend: HasherBackend = "auto"): Promise<Digest> {
  const hash = await createSha256(backend);
  hash.update(data);
  return hash.digest();
}

/** The size and digest a verifying stream checks at its end. */
export interface VerifyExpectation {
  /** The digest the content must have. */
  digest: Digest;
  /** The exact size in bytes, when the descriptor states one. */
  size?: number;
  /** Name of the content for messages, such as "layer sha256:ab..." (default "blob"). */
  label?: string;
}

/**
 * Check that `received` bytes and `actual` digest match the expectation.
 *
 * @throws {DigestMismatchError} naming the content, both values and the fix.
 */
export function checkContent(expect: VerifyExpectation, received: number, actual: Digest): void {
  const label = expect.label ?? "blob";
  if (expect.size !== undefined && received !== expect.size) {
    throw new DigestMismatchError(
      `${label} ${expect.digest} has ${received} bytes, expected ${expect.size}: ` +
        "the registry sent incomplete or different content; retry, or check the image's manifest",
      expect.digest,
    );
  }
  if (actual !== expect.digest) {
    throw new DigestMismatchError(
      `${label} content has digest ${actual}, expected ${expect.digest}: ` +
        "the content is corrupt or the manifest is wrong; retry, or re-push the image",
      expect.digest,
      actual,
    );
  }
}

/**
 * Create a pass-through stream that hashes and counts every chunk and, when
 * the input ends, throws {@link DigestMismatchError} if size or digest differ.
 *
 * Chunks pass on unchanged as they arrive, so the consumer must treat its
 * output as unverified until the stream closes without error. A stream that
 * exceeds the expected size fails as soon as it does.
 */
export async function createVerifyStream(
  expect: VerifyExpectation,
  backend: HasherBackend = "auto",
): Promise<TransformStream<Uint8Array, Uint8Array>> {
  const hash = await createSha256(backend);
  let received = 0;
  return new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, controller) {
      received += chunk.byteLength;
      if (expect.size !== undefined && received > expect.size) {
        throw new DigestMismatchError(
          `${expect.label ?? "blob"} ${expect.digest} is longer than the ${expect.size} bytes ` +
            "its descriptor states: the content is corrupt or the manifest is wrong",
          expect.digest,
        );
      }
      hash.update(chunk);
      controller.enqueue(chunk);
    },
    flush() {
      checkContent(expect, received, hash.digest());
    },
  });
}
