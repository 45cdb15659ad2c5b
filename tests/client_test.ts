import { test } from "node:test";
import assert from "node:assert/strict";
import { createSha256, type Digest } from "../src/digest.ts";
import { DigestMismatchError, ManifestError, PlatformNotFoundError } from "../src/errors.ts";
import { isImageIndex, MediaType } from "../src/manifest.ts";
import type { ProgressEvent } from "../src/progress.ts";
import { type ImageReference, parsePlatform } from "../src/reference.ts";
import { staticCredentials } from "../src/registry/auth.ts";
import { RegistryClient, type RegistryClientOptions } from "../src/registry/client.ts";
import {
  errorFromResponse,
  ForeignLayerError,
  isRetryableStatus,
  parseRetryAfter,
  redactUrl,
  RegistryError,
} from "../src/registry/errors.ts";
import { MemoryRegistry, type MemoryRegistryOptions, sha256Hex } from "./fixtures/registry.ts";
import { blobBytes } from "./fixtures/temp.ts";

const encoder = new TextEncoder();

interface Setup {
  registry: MemoryRegistry;
  client: RegistryClient;
  ref: ImageReference;
  delays: number[];
  events: ProgressEvent[];
}

function setup(
  registryOptions: MemoryRegistryOptions = {},
  clientOptions: RegistryClientOptions = {},
): Setup {
  const registry = new MemoryRegistry(registryOptions);
  const delays: number[] = [];
  const events: ProgressEvent[] = [];
  const client = new RegistryClient({
    fetch: registry.fetch,
    sleep: (ms) => {
      delays.push(ms);
      return Promise.resolve();
    },
    onEvent: (event) => events.push(event),
    ...clientOptions,
  });
  const ref: ImageReference = { registry: registry.host, repository: "team/app", tag: "1.0" };
  return { registry, client, ref, delays, events };
}

async function readAll(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

test("getManifest() fetches by tag", async () => {
  const { registry, client, ref } = setup();
  const image = registry.pushImage("team/app", "1.0", [{
    bytes: blobBytes(100),
    mediaType: MediaType.ociLayerGzip,
  }]);

  const fetched = await client.getManifest(ref);

  assert.equal(fetched.digest, image.manifest.digest);
  assert.equal(fetched.mediaType, MediaType.ociManifest);
  assert.deepEqual(fetched.bytes, image.manifestBytes);
  assert.ok(!isImageIndex(fetched.manifest));
  assert.equal(fetched.manifest.layers[0].digest, image.layers[0].digest);
  assert.match(registry.log[0].accept ?? "", /manifest\.v1\+prettyjws/);
  assert.equal(registry.log[0].url, "https://reg.example/v2/team/app/manifests/1.0");
});

test("getManifest() digests the exact bytes", async () => {
  // Pretty-printed JSON with no Docker-Content-Digest: the digest must come from these bytes.
  const { registry, client } = setup({ digestHeader: "none" });
  const layer = registry.addBlob(blobBytes(10), MediaType.dockerLayerGzip);
  const config = registry.addBlob(encoder.encode("{}"), MediaType.dockerConfig);
  const bytes = encoder.encode(
    JSON.stringify(
      { schemaVersion: 2, mediaType: MediaType.dockerManifest, config, layers: [layer] },
      null,
      3,
    ) + "\n",
  );
  registry.putManifest("rhel7/rhel", "7.3", bytes, MediaType.dockerManifest);

  const fetched = await client.getManifest({
    registry: "reg.example",
    repository: "rhel7/rhel",
    tag: "7.3",
  });

  assert.equal(fetched.digest, sha256Hex(bytes));
  assert.deepEqual(fetched.bytes, bytes);
});

test("getManifest() rejects wrong Docker-Content-Digest", async () => {
  const { registry, client, ref } = setup({ digestHeader: "wrong" });
  registry.pushImage("team/app", "1.0", []);
  await assert.rejects(client.getManifest(ref), (error: unknown) => {
    assert.ok(error instanceof DigestMismatchError);
    assert.match(error.message, /Docker-Content-Digest/);
    return true;
  });
});

test("getManifest() checks a pinned digest", async () => {
  const { registry, client, ref } = setup({ digestHeader: "none" });
  const image = registry.pushImage("team/app", "1.0", []);
  const pinned: Digest = `sha256:${"e".repeat(64)}`;
  registry.putManifest("team/app", pinned, image.manifestBytes, MediaType.ociManifest);

  await assert.rejects(client.getManifest({ ...ref, digest: pinned }), (error: unknown) => {
    assert.ok(error instanceof DigestMismatchError);
    assert.equal(error.expected, pinned);
    assert.equal(error.actual, image.manifest.digest);
    return true;
  });
  const byDigest = await client.getManifest({ ...ref, digest: image.manifest.digest });
  assert.equal(byDigest.digest, image.manifest.digest);
});

test("getManifest() explains unknown tags", async () => {
  const { registry, client } = setup();
  registry.pushImage("foo", "1.0", []);
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "foo", tag: "x" }),
    (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.status, 404);
      assert.deepEqual(error.codes, ["MANIFEST_UNKNOWN"]);
      assert.equal(error.retryable, false);
      assert.equal(error.method, "GET");
      assert.match(
        error.message,
        /^manifest unknown: tag "x" not found in reg\.example\/foo: check the tag/,
      );
      return true;
    },
  );
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "missing", tag: "x" }),
    /repository unknown: "reg\.example\/missing" not found/,
  );
});

test("getManifest() rejects schema 1", async () => {
  const { registry, client, ref } = setup();
  registry.putManifest("team/app", "1.0", {
    schemaVersion: 1,
    name: "team/app",
    tag: "1.0",
    fsLayers: [],
  }, MediaType.dockerManifestSchema1Signed);
  await assert.rejects(client.getManifest(ref), (error: unknown) => {
    assert.ok(error instanceof ManifestError);
    assert.match(error.message, /schema 1.*re-push/);
    return true;
  });
});

test("resolve() follows an index to the platform", async () => {
  for (const format of ["oci", "docker"] as const) {
    const { registry, client, ref } = setup();
    const amd = registry.pushImage("team/app", undefined, [{
      bytes: blobBytes(5, 1),
      mediaType: MediaType.ociLayerGzip,
    }], { format });
    const arm = registry.pushImage("team/app", undefined, [{
      bytes: blobBytes(5, 2),
      mediaType: MediaType.ociLayerGzip,
    }], { format });
    const index = registry.pushIndex("team/app", "1.0", [
      { manifest: amd.manifest, platform: { os: "linux", architecture: "amd64" } },
      { manifest: arm.manifest, platform: { os: "linux", architecture: "arm64" } },
    ], format);

    const resolved = await client.resolve(ref, parsePlatform("linux/arm64/v8"));

    assert.equal(resolved.indexDigest, index.digest, format);
    assert.equal(resolved.digest, arm.manifest.digest, format);
    assert.deepEqual(resolved.bytes, arm.manifestBytes, format);
    assert.equal(resolved.manifest.layers[0].digest, arm.layers[0].digest, format);
    await assert.rejects(client.resolve(ref, parsePlatform("linux/s390x")), PlatformNotFoundError);
  }
});

test("resolve() returns a plain manifest", async () => {
  const { registry, client, ref } = setup();
  const image = registry.pushImage("team/app", "1.0", []);
  const resolved = await client.resolve(ref, parsePlatform("linux/riscv64"));
  assert.equal(resolved.indexDigest, undefined);
  assert.equal(resolved.digest, image.manifest.digest);
});

test("resolve() checks index entry sizes", async () => {
  const { registry, client, ref } = setup();
  const image = registry.pushImage("team/app", undefined, []);
  registry.pushIndex("team/app", "1.0", [
    {
      manifest: { ...image.manifest, size: image.manifest.size + 1 },
      platform: { os: "linux", architecture: "amd64" },
    },
  ]);
  await assert.rejects(client.resolve(ref, parsePlatform("linux/amd64")), DigestMismatchError);
});

test("openBlob() streams and verifies", async () => {
  const { registry, client, ref } = setup();
  const bytes = blobBytes(200_000);
  const descriptor = registry.addBlob(bytes, MediaType.ociLayerGzip);
  const progress: number[] = [];

  const received = await readAll(
    client.openBlob(ref, descriptor, { onProgress: (n) => progress.push(n) }),
  );

  assert.deepEqual(received, bytes);
  assert.equal(progress.at(-1), bytes.byteLength);
  assert.equal(registry.requests("/blobs/").length, 1);
});

test("openBlob() reads an empty blob", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(new Uint8Array(0));
  assert.equal((await readAll(client.openBlob(ref, descriptor))).byteLength, 0);
});

test("openBlob() rejects corrupt content", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(1000));
  registry.addFault({ match: "/blobs/", corrupt: true });
  await assert.rejects(readAll(client.openBlob(ref, descriptor)), (error: unknown) => {
    assert.ok(error instanceof DigestMismatchError);
    assert.equal(error.expected, descriptor.digest);
    assert.ok(error.actual?.startsWith("sha256:"));
    return true;
  });
});

test("openBlob() rejects a longer blob", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(1000));
  await assert.rejects(
    readAll(client.openBlob(ref, { ...descriptor, size: 999 })),
    (error: unknown) => {
      assert.ok(error instanceof DigestMismatchError);
      assert.match(error.message, /longer than the 999 bytes/);
      return true;
    },
  );
});

test("openBlob() rejects a shorter blob", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(1000));
  await assert.rejects(
    readAll(client.openBlob(ref, { ...descriptor, size: 1001 })),
    (error: unknown) => {
      assert.ok(error instanceof DigestMismatchError);
      assert.match(error.message, /has 1000 bytes, expected 1001/);
      return true;
    },
  );
});

test("openBlob() resumes cut-off bodies", async () => {
  const cases: [string, Record<string, unknown>][] = [
    ["normal end", { truncateAfter: 3000 }],
    ["reset", { resetAfter: 3000 }],
    ["reset, Range ignored", { resetAfter: 3000 }],
  ];
  for (const [name, fault] of cases) {
    const { registry, client, ref, events } = setup();
    const bytes = blobBytes(10_000, 7);
    const descriptor = registry.addBlob(bytes);
    registry.addFault({ match: "/blobs/", ...fault });
    if (name.includes("ignored")) registry.addFault({ match: "/blobs/", ignoreRange: true });

    const received = await readAll(client.openBlob(ref, descriptor));

    assert.deepEqual(received, bytes, name);
    const ranges = registry.requests("/blobs/").map((entry) => entry.range);
    assert.deepEqual(ranges, [undefined, "bytes=3000-"], name);
    assert.equal(events.filter((event) => event.type === "retry").length, 1, name);
  }
});

test("openBlob() resumes after a stall", async () => {
  const { registry, client, ref } = setup({}, { timeoutMs: 300 });
  const bytes = blobBytes(5000, 3);
  const descriptor = registry.addBlob(bytes);
  registry.addFault({ match: "/blobs/", stallAfter: 1000 });

  const received = await readAll(client.openBlob(ref, descriptor));

  assert.deepEqual(received, bytes);
  assert.deepEqual(registry.requests("/blobs/").map((entry) => entry.range), [
    undefined,
    "bytes=1000-",
  ]);
});

test("openBlob() gives up after the retry budget", async () => {
  const { registry, client, ref, delays } = setup({}, { retries: 2 });
  const descriptor = registry.addBlob(blobBytes(5000));
  registry.addFault({ match: "/blobs/", truncateAfter: 0, times: 10 });

  await assert.rejects(readAll(client.openBlob(ref, descriptor)), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.equal(error.retryable, true);
    assert.match(error.message, /ended after 0 of 5000 bytes/);
    return true;
  });
  assert.equal(registry.requests("/blobs/").length, 3);
  assert.equal(delays.length, 2);
});

test("openBlob() continues a partial download", async () => {
  const { registry, client, ref } = setup();
  const bytes = blobBytes(4000, 9);
  const descriptor = registry.addBlob(bytes);

  for (const offset of [0, 1, 2500, 4000]) {
    const hash = await createSha256();
    hash.update(bytes.subarray(0, offset));
    const rest = await readAll(client.openBlob(ref, descriptor, { resumeFrom: { offset, hash } }));
    assert.deepEqual(rest, bytes.subarray(offset), `offset ${offset}`);
  }
  assert.deepEqual(
    registry.requests("/blobs/").map((entry) => entry.range),
    [undefined, "bytes=1-", "bytes=2500-"],
  );

  const wrongHash = await createSha256();
  wrongHash.update(new Uint8Array(2500));
  await assert.rejects(
    readAll(client.openBlob(ref, descriptor, { resumeFrom: { offset: 2500, hash: wrongHash } })),
    DigestMismatchError,
  );
});

test("openBlob() retries 5xx with backoff", async () => {
  const { registry, client, ref, delays, events } = setup({}, { retryDelayMs: 100 });
  const bytes = blobBytes(100);
  const descriptor = registry.addBlob(bytes);
  registry.addFault({ match: "/blobs/", status: 503, times: 2 });
  registry.addFault({ match: "/blobs/", networkError: true });

  assert.deepEqual(await readAll(client.openBlob(ref, descriptor)), bytes);

  assert.equal(delays.length, 3);
  // Each delay is the doubled base with jitter between half and all of it.
  const bounds: [number, number][] = [[50, 100], [100, 200], [200, 400]];
  bounds.forEach(([low, high], i) => {
    assert.ok(delays[i] >= low, `delay ${i} is ${delays[i]}`);
    assert.ok(delays[i] <= high, `delay ${i} is ${delays[i]}`);
  });
  const retries = events.filter((event) => event.type === "retry");
  assert.deepEqual(retries.map((event) => event.attempt), [1, 2, 3]);
  assert.match(retries[0].reason, /server error 503/);
});

test("openBlob() does not retry 404", async () => {
  const { client, ref, delays } = setup();
  const missing = {
    mediaType: MediaType.ociLayerGzip,
    digest: `sha256:${"1".repeat(64)}` as Digest,
    size: 3,
  };
  await assert.rejects(readAll(client.openBlob(ref, missing)), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.equal(error.status, 404);
    assert.match(error.message, /blob unknown/);
    return true;
  });
  assert.equal(delays.length, 0);
});

test("openBlob() drops Authorization on redirect", async () => {
  // The registry redirects the blob GET to a storage host that rejects requests carrying Authorization.
  const { registry, client, ref } = setup({
    auth: { type: "bearer" },
    redirectBlobsTo: "storage.example",
  });
  const bytes = blobBytes(3000);
  const descriptor = registry.addBlob(bytes);

  assert.deepEqual(await readAll(client.openBlob(ref, descriptor)), bytes);

  const toRegistry = registry.log.filter((entry) =>
    entry.host === "reg.example" && entry.path.includes("/blobs/")
  );
  const toStorage = registry.log.filter((entry) => entry.host === "storage.example");
  assert.equal(toStorage.length, 1);
  assert.equal(toStorage[0].authorization, undefined);
  assert.equal(
    toStorage[0].url,
    `https://storage.example/_storage/${descriptor.digest}?sig=S3CR3T`,
  );
  assert.match(toRegistry.at(-1)?.authorization ?? "", /^Bearer /);
});

test("openBlob() resumes through a redirect", async () => {
  const { registry, client, ref } = setup({ redirectBlobsTo: "storage.example" });
  const bytes = blobBytes(3000);
  const descriptor = registry.addBlob(bytes);
  registry.addFault({ match: "/_storage/", resetAfter: 1200 });

  assert.deepEqual(await readAll(client.openBlob(ref, descriptor)), bytes);
  const ranges = registry.log.filter((entry) => entry.host === "storage.example").map((entry) =>
    entry.range
  );
  assert.deepEqual(ranges, [undefined, "bytes=1200-"]);
});

test("openBlob() rejects HTTPS to HTTP redirects", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(10));
  registry.route(
    "reg.example",
    () => new Response(null, { status: 302, headers: { location: "http://storage.example/x" } }),
  );
  await assert.rejects(readAll(client.openBlob(ref, descriptor)), /leaves HTTPS/);
});

test("openBlob() refuses foreign layers by default", async () => {
  const { registry, client, ref } = setup();
  const descriptor = {
    mediaType: MediaType.dockerForeignLayerGzip,
    size: 92818888,
    digest: "sha256:e46172273a4e4384e1eec7fb01091c828a256ea0f87b30f61381fba9bc511371" as Digest,
    urls: ["https://go.microsoft.com/fwlink/?linkid=873594"],
  };
  await assert.rejects(readAll(client.openBlob(ref, descriptor)), (error: unknown) => {
    assert.ok(error instanceof ForeignLayerError);
    assert.equal(error.digest, descriptor.digest);
    assert.deepEqual(error.urls, descriptor.urls);
    assert.match(
      error.message,
      /foreign media type "application\/vnd\.docker\.image\.rootfs\.foreign\.diff\.tar\.gzip"/,
    );
    assert.match(error.message, /go\.microsoft\.com\/fwlink/);
    assert.match(error.message, /--allow-foreign-urls/);
    return true;
  });
  assert.equal(registry.log.length, 0);
});

test("openBlob() fetches allowed foreign layers", async () => {
  const { registry, client, ref } = setup({ auth: { type: "bearer" } }, { allowForeignUrls: true });
  const bytes = blobBytes(2000, 5);
  const digest = sha256Hex(bytes);
  const seen: Request[] = [];
  registry.route("go.microsoft.com", (request) => {
    seen.push(request);
    return new Response(null, {
      status: 302,
      headers: { location: "https://download.example/layer.tar.gz" },
    });
  });
  registry.route("download.example", (request) => {
    seen.push(request);
    return new Response(new Uint8Array(bytes));
  });
  const descriptor = {
    mediaType: MediaType.dockerForeignLayerGzip,
    size: bytes.byteLength,
    digest,
    urls: ["https://go.microsoft.com/fwlink/?linkid=873594"],
  };

  assert.deepEqual(await readAll(client.openBlob(ref, descriptor)), bytes);

  assert.equal(seen.length, 2);
  assert.ok(seen.every((request) => !request.headers.has("authorization")));
  assert.equal(registry.requests("/blobs/").length, 0);
});

test("openBlob() falls back to the registry for foreign layers", async () => {
  const { registry, client, ref } = setup({}, { allowForeignUrls: true, retries: 0 });
  const bytes = blobBytes(500);
  const stored = registry.addBlob(bytes);
  const descriptor = {
    ...stored,
    mediaType: MediaType.ociLayerNondistributableGzip,
    urls: ["https://gone.example/x"],
  };
  assert.deepEqual(await readAll(client.openBlob(ref, descriptor)), bytes);
  assert.equal(registry.requests("/blobs/").length, 1);
});

test("openBlob() stops when aborted", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(100));
  const controller = new AbortController();
  controller.abort(new Error("stop now"));
  await assert.rejects(
    readAll(client.openBlob(ref, descriptor, { signal: controller.signal })),
    /stop now/,
  );
});

test("getBlob() returns small blobs", async () => {
  const { registry, client, ref } = setup();
  const config = registry.addBlob(encoder.encode('{"os":"linux"}'), MediaType.ociConfig);
  assert.equal(new TextDecoder().decode(await client.getBlob(ref, config)), '{"os":"linux"}');
  await assert.rejects(client.getBlob(ref, config, { maxBytes: 3 }), RangeError);
});

test("listTags() waits for Retry-After on 429", async () => {
  const { registry, client, delays } = setup();
  registry.pushImage("app", "latest", []);
  registry.addFault({ match: "/tags/list", status: 429, retryAfter: "2", code: "TOOMANYREQUESTS" });

  const tags = await client.listTags({ registry: "reg.example", repository: "app", tag: "latest" });

  assert.deepEqual(tags, ["latest"]);
  assert.deepEqual(delays, [2000]);
});

test("listTags() bounds Retry-After and reports rate limits", async () => {
  const { registry, client, delays } = setup({}, { retries: 2, maxRetryDelayMs: 5000 });
  registry.pushImage("app", "latest", []);
  registry.addFault({ match: "/tags/list", status: 429, retryAfter: "3600", times: 3 });

  await assert.rejects(
    client.listTags({ registry: "reg.example", repository: "app" }),
    (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.status, 429);
      assert.equal(error.retryAfterMs, 3_600_000);
      assert.match(error.message, /rate limited/);
      assert.match(error.message, /Retry-After: "3600"/);
      return true;
    },
  );
  assert.deepEqual(delays, [5000, 5000]);
});

test("listTags() follows pagination", async () => {
  const { registry, client } = setup();
  for (const tag of ["a", "b", "c", "d", "e"]) {
    registry.pushImage("app", tag, [], { platform: { os: "linux", architecture: tag } });
  }
  const original = registry.fetch;
  const fetchFirstPageOfTwo: typeof fetch = (input, init) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    if (url.pathname.endsWith("/tags/list") && !url.searchParams.has("n")) {
      url.searchParams.set("n", "2");
    }
    return original(url, init);
  };
  const paged = new RegistryClient({ fetch: fetchFirstPageOfTwo });
  assert.deepEqual(await paged.listTags({ registry: "reg.example", repository: "app" }), [
    "a",
    "b",
    "c",
    "d",
    "e",
  ]);
  assert.deepEqual(await client.listTags({ registry: "reg.example", repository: "app" }), [
    "a",
    "b",
    "c",
    "d",
    "e",
  ]);
});

test("RegistryError URLs hide secrets", async () => {
  const { registry, client, ref } = setup({ redirectBlobsTo: "storage.example" });
  const descriptor = registry.addBlob(blobBytes(10));
  registry.addFault({ match: "/_storage/", status: 400 });
  await assert.rejects(readAll(client.openBlob(ref, descriptor)), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.ok(!error.url.includes("S3CR3T"), error.url);
    assert.ok(!error.message.includes("S3CR3T"), error.message);
    assert.match(error.url, /sig=REDACTED/);
    return true;
  });
});

test("RegistryClient works over HTTP on 127.0.0.1", async () => {
  const registry = new MemoryRegistry({ auth: { type: "bearer" } });
  const server = await registry.listen();
  try {
    const bytes = blobBytes(300_000, 11);
    const image = registry.pushImage("team/app", "1.0", [{
      bytes,
      mediaType: MediaType.ociLayerGzip,
    }]);
    registry.addFault({ match: "/blobs/sha256", resetAfter: 100_000 });
    const client = new RegistryClient({ sleep: () => Promise.resolve() });
    const ref: ImageReference = { registry: server.host, repository: "team/app", tag: "1.0" };

    const resolved = await client.resolve(ref, parsePlatform("linux/amd64"));
    const layer = await readAll(client.openBlob(ref, resolved.manifest.layers[0]));

    assert.equal(resolved.digest, image.manifest.digest);
    assert.deepEqual(layer, bytes);
    // How much of the prefix a runtime delivers before it reports the reset varies (Bun delivers
    // none), so the second request may start at 0 or resume with Range.
    const ranges = registry.requests(`/blobs/${image.layers[0].digest}`).map((entry) =>
      entry.range
    );
    assert.equal(ranges.length, 2);
    assert.equal(ranges[0], undefined);
    assert.ok(ranges[1] === undefined || /^bytes=[0-9]+-$/.test(ranges[1]), ranges[1]);
  } finally {
    await server.close();
  }
});

test("RegistryClient sends basic credentials", async () => {
  const auth = { type: "basic" as const, username: "ci", password: "p4ss:word" };
  const { registry, client, ref } = setup({ auth }, {
    credentials: staticCredentials({ username: "ci", password: "p4ss:word" }),
  });
  registry.pushImage("team/app", "1.0", []);

  await client.getManifest(ref);
  await client.getManifest(ref);

  assert.deepEqual(registry.log.map((entry) => entry.authorization), [
    undefined,
    `Basic ${btoa("ci:p4ss:word")}`,
    `Basic ${btoa("ci:p4ss:word")}`,
  ]);
});

test("RegistryClient explains missing credentials", async () => {
  const { registry, client, ref } = setup({
    auth: { type: "basic", username: "ci", password: "x" },
  });
  registry.pushImage("team/app", "1.0", []);
  await assert.rejects(client.getManifest(ref), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.equal(error.status, 401);
    assert.match(error.message, /authentication required/);
    assert.match(error.message, /docker login/);
    return true;
  });

  const wrong = setup({ auth: { type: "basic", username: "ci", password: "x" } }, {
    credentials: staticCredentials({ username: "ci", password: "wrong-secret" }),
  });
  wrong.registry.pushImage("team/app", "1.0", []);
  await assert.rejects(wrong.client.getManifest(wrong.ref), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.match(error.message, /rejected the credentials/);
    assert.ok(!error.message.includes("wrong-secret"));
    return true;
  });
  assert.equal(wrong.registry.log.length, 2);
});

test("errorFromResponse() explains statuses", async () => {
  const json = (status: number, codes: string[], headers: Record<string, string> = {}) =>
    new Response(
      JSON.stringify({ errors: codes.map((code) => ({ code, message: code.toLowerCase() })) }),
      {
        status,
        headers,
      },
    );
  const url = "https://reg.example/v2/foo/manifests/x";
  const subject = { registry: "127.0.0.1:5000", repository: "foo" };
  const table: [Response, Parameters<typeof errorFromResponse>[3], RegExp, boolean][] = [
    [
      json(404, ["MANIFEST_UNKNOWN"]),
      { ...subject, manifest: "x" },
      /^manifest unknown: tag "x" not found in 127\.0\.0\.1:5000\/foo: check the tag/,
      false,
    ],
    [
      json(404, ["MANIFEST_UNKNOWN"]),
      { ...subject, manifest: `sha256:${"a".repeat(64)}` },
      /manifest unknown: digest "sha256:a+" not found/,
      false,
    ],
    [
      json(404, ["NAME_UNKNOWN"]),
      { ...subject, manifest: "x" },
      /repository unknown: "127\.0\.0\.1:5000\/foo" not found/,
      false,
    ],
    [
      json(404, ["BLOB_UNKNOWN"]),
      { ...subject, blob: "sha256:b" },
      /blob unknown: "sha256:b" not found in 127\.0\.0\.1:5000\/foo/,
      false,
    ],
    [
      json(401, ["UNAUTHORIZED"]),
      subject,
      /authentication required \(status 401\).*docker login.*OCISTAGE_USERNAME/,
      false,
    ],
    [
      json(401, ["UNAUTHORIZED"]),
      { ...subject, credentialsSent: true },
      /rejected the credentials/,
      false,
    ],
    [json(403, ["DENIED"]), subject, /access denied \(status 403\).*may pull "foo"/, false],
    [
      json(429, ["TOOMANYREQUESTS"], { "retry-after": "7" }),
      subject,
      /^rate limited by 127\.0\.0\.1:5000 \(Retry-After: "7"\)/,
      true,
    ],
    [json(503, []), subject, /server error 503 .* retry later/, true],
    [json(500, ["UNKNOWN"]), subject, /server error 500/, true],
    [json(408, []), subject, /unexpected status 408/, true],
    [json(501, []), subject, /server error 501/, false],
    [json(400, ["DIGEST_INVALID"]), subject, /unexpected status 400 \(DIGEST_INVALID\)/, false],
    [new Response("<html>oops</html>", { status: 502 }), subject, /server error 502/, true],
  ];
  for (const [response, requestSubject, pattern, retryable] of table) {
    const error = await errorFromResponse(response, "GET", url, requestSubject);
    assert.match(error.message, pattern);
    assert.equal(error.retryable, retryable, error.message);
    assert.equal(error.status, response.status);
  }

  const rateLimited = await errorFromResponse(
    json(429, ["TOOMANYREQUESTS"], { "retry-after": "7" }),
    "GET",
    url,
  );
  assert.deepEqual(rateLimited.codes, ["TOOMANYREQUESTS"]);
  assert.equal(rateLimited.retryAfterMs, 7000);
  assert.match(rateLimited.message, /registry message: "toomanyrequests"/);
});

test("parseRetryAfter() reads seconds and dates", () => {
  const now = Date.parse("2024-05-01T12:00:00Z");
  assert.equal(parseRetryAfter("2", now), 2000);
  assert.equal(parseRetryAfter(" 0 ", now), 0);
  assert.equal(parseRetryAfter("Wed, 01 May 2024 12:00:30 GMT", now), 30_000);
  assert.equal(parseRetryAfter("Wed, 01 May 2024 11:00:00 GMT", now), 0);
  assert.equal(parseRetryAfter("soon", now), undefined);
  assert.equal(parseRetryAfter(null, now), undefined);
});

test("isRetryableStatus() picks transient statuses", () => {
  const retryable = [408, 429, 500, 502, 503, 504];
  const final = [400, 401, 403, 404, 416, 501, 505];
  for (const status of retryable) assert.equal(isRetryableStatus(status), true, String(status));
  for (const status of final) assert.equal(isRetryableStatus(status), false, String(status));
});

test("redactUrl() removes credentials and tokens", () => {
  const table: [string, string][] = [
    ["https://user:pw@reg.example/v2/", "https://reg.example/v2/"],
    [
      "https://s3.example/b?X-Amz-Signature=abc&X-Amz-Credential=k&X-Amz-Date=1",
      "https://s3.example/b?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Date=1",
    ],
    ["https://cdn.example/b?sig=S&se=2024", "https://cdn.example/b?sig=REDACTED&se=2024"],
    [
      "https://auth.example/token?service=s&access_token=t",
      "https://auth.example/token?service=s&access_token=REDACTED",
    ],
    ["not a url", "not a url"],
  ];
  for (const [input, expected] of table) assert.equal(redactUrl(input), expected);
});

test("getManifest() retries a cut-off body", async () => {
  const cases: [string, Record<string, unknown>][] = [
    ["reset", { resetAfter: 50 }],
    ["stall", { stallAfter: 50 }],
    ["normal end", { truncateAfter: 50 }],
  ];
  for (const [name, fault] of cases) {
    const { registry, client, ref, events } = setup({}, { timeoutMs: 300 });
    const image = registry.pushImage("team/app", "1.0", [{
      bytes: blobBytes(10),
      mediaType: MediaType.ociLayerGzip,
    }]);
    registry.addFault({ match: "/manifests/", ...fault });

    const fetched = await client.getManifest(ref);

    assert.equal(fetched.digest, image.manifest.digest, name);
    assert.equal(registry.requests("/manifests/").length, 2, name);
    assert.equal(events.length, 1, name);
  }
});

test("RegistryClient stops redirect loops", async () => {
  const { registry, client, ref } = setup();
  const descriptor = registry.addBlob(blobBytes(10));
  registry.route(
    "reg.example",
    () => new Response(null, { status: 302, headers: { location: "/v2/again" } }),
  );
  await assert.rejects(readAll(client.openBlob(ref, descriptor)), /too many redirects/);
});

test("RegistryClient times out waiting for headers", async () => {
  let calls = 0;
  const hanging: typeof fetch = (_input, init) => {
    calls++;
    return new Promise((_, reject) => {
      init?.signal?.addEventListener(
        "abort",
        () => reject(new DOMException("aborted", "AbortError")),
      );
    });
  };
  const client = new RegistryClient({
    fetch: hanging,
    timeoutMs: 100,
    retries: 1,
    sleep: () => Promise.resolve(),
  });
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "app", tag: "1" }),
    (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.retryable, true);
      assert.match(error.message, /timed out after 100 ms waiting for response headers/);
      return true;
    },
  );
  assert.equal(calls, 2);
});

/** Return a body that never ends and a count of the bytes pulled from it. */
function endlessBody(): { body: ReadableStream<Uint8Array>; pulled: () => number } {
  let pulled = 0;
  const chunk = new Uint8Array(64 * 1024).fill(0x7b);
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      pulled += chunk.byteLength;
      controller.enqueue(chunk.slice());
    },
  }, { highWaterMark: 0 });
  return { body, pulled: () => pulled };
}

test("getManifest() caps endless bodies", async () => {
  const endless = endlessBody();
  const client = new RegistryClient({
    fetch: () =>
      Promise.resolve(
        new Response(endless.body, { headers: { "content-type": MediaType.ociManifest } }),
      ),
  });
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "app", tag: "1" }),
    RangeError,
  );
  assert.ok(endless.pulled() <= 5 * 1024 * 1024, `read ${endless.pulled()} bytes`);

  const declared = new RegistryClient({
    fetch: () =>
      Promise.resolve(
        new Response("{}", { headers: { "content-length": String(64 * 1024 * 1024) } }),
      ),
  });
  await assert.rejects(
    declared.getManifest({ registry: "reg.example", repository: "app", tag: "1" }),
    /more than the limit of 4194304/,
  );
});

test("RegistryClient caps endless token bodies", async () => {
  const endless = endlessBody();
  const client = new RegistryClient({
    fetch: (input) => {
      const url = new URL(new Request(input).url);
      if (url.pathname === "/token") return Promise.resolve(new Response(endless.body));
      return Promise.resolve(
        new Response(null, {
          status: 401,
          headers: { "www-authenticate": 'Bearer realm="https://reg.example/token"' },
        }),
      );
    },
  });
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "app", tag: "1" }),
    /longer than the limit of 1048576 bytes/,
  );
  assert.ok(endless.pulled() <= 2 * 1024 * 1024, `read ${endless.pulled()} bytes`);
});

test("errorFromResponse() reads 64 KiB of an endless body", async () => {
  const endless = endlessBody();
  const error = await errorFromResponse(
    new Response(endless.body, { status: 500 }),
    "GET",
    "https://reg.example/v2/app/manifests/1",
  );
  assert.equal(error.status, 500);
  assert.equal(error.retryable, true);
  assert.ok(endless.pulled() <= 128 * 1024, `read ${endless.pulled()} bytes`);
});
