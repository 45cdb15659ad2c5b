import { test } from "node:test";
import assert from "node:assert/strict";
import { createSha256, createVerifyStream, type Digest, isDigest, parseDigest, sha256Of } from "../src/digest.ts";
import { DigestMismatchError } from "../src/errors.ts";

const EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const ABC = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

test("parseDigest accepts sha256 and names what is wrong", () => {
  assert.equal(parseDigest(ABC), ABC);
  assert.throws(() => parseDigest(ABC.toUpperCase()), /invalid digest/);
  assert.throws(() => parseDigest("sha256:abc"), /64 lowercase hex digits/);
  assert.throws(() => parseDigest(`sha512:${"a".repeat(128)}`), /unsupported digest algorithm/);
  assert.throws(() => parseDigest(""), TypeError);
  assert.equal(isDigest(EMPTY), true);
  assert.equal(isDigest(`${EMPTY}0`), false);
});

for (const backend of ["native", "wasm", "auto"] as const) {
  test(`createSha256 ${backend} matches known vectors`, async () => {
    const hash = await createSha256(backend);
    assert.equal(hash.backend, backend === "wasm" ? "wasm" : "native");
    hash.update(new TextEncoder().encode("a"));
    hash.update(new TextEncoder().encode("bc"));
    assert.equal(hash.digest(), ABC);
    assert.equal(await sha256Of(new Uint8Array(0), backend), EMPTY);
  });
}

async function pump(chunks: Uint8Array[], expect: { digest: Digest; size?: number }): Promise<Uint8Array[]> {
  const out: Uint8Array[] = [];
  const source = new ReadableStream<Uint8Array>({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  const reader = source.pipeThrough(await createVerifyStream(expect)).getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return out;
    out.push(value);
  }
}

test("verify stream passes matching content through", async () => {
  const parts = [new TextEncoder().encode("a"), new Uint8Array(0), new TextEncoder().encode("bc")];
  const out = await pump(parts, { digest: ABC, size: 3 });
  assert.equal(out.length, 3);
});

test("verify stream rejects a wrong digest at the end", async () => {
  await assert.rejects(pump([new TextEncoder().encode("abd")], { digest: ABC, size: 3 }), (error: Error) => {
    assert.ok(error instanceof DigestMismatchError);
    assert.equal(error.expected, ABC);
    assert.match(error.message, /expected sha256:ba78/);
    return true;
  });
});

test("verify stream rejects short and long content", async () => {
  await assert.rejects(pump([new TextEncoder().encode("ab")], { digest: ABC, size: 3 }), /has 2 bytes, expected 3/);
  await assert.rejects(pump([new TextEncoder().encode("abcd")], { digest: ABC, size: 3 }), /longer than the 3 bytes/);
});
