/**
 * Fault suite: network faults injected into the in-process registry while
 * `fetchImage` fills a real cache, and process faults (`kill -9` mid-blob,
 * two processes sharing one cache) with the CLI in child processes. After
 * every run the cache must hold no blob whose content differs from its name.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { DigestMismatchError } from "../src/errors.ts";
import { MediaType } from "../src/manifest.ts";
import type { ProgressEvent } from "../src/progress.ts";
import { staticCredentials } from "../src/registry/auth.ts";
import { RegistryError } from "../src/registry/errors.ts";
import { fetchImage, type FetchOptions } from "../src/stage.ts";
import { type CliRun, cliCommand } from "./fixtures/cli.ts";
import { type Fault, MemoryRegistry, type MemoryRegistryOptions } from "./fixtures/registry.ts";
import { blobBytes, tempDir } from "./fixtures/temp.ts";

function sha256File(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/**
 * Assert that every file under `blobs/sha256` has the content its name
 * states, and return the names found.
 */
function assertCacheIntact(cache: string): string[] {
  const dir = path.join(cache, "blobs", "sha256");
  const names = fs.existsSync(dir) ? fs.readdirSync(dir) : [];
  for (const name of names) {
    assert.equal(sha256File(path.join(dir, name)), name, `blob ${name} in the cache is corrupt`);
  }
  return names.map((name) => `sha256:${name}`);
}

/** Files left in the cache's `ingest/` directory (partial downloads, locks, temporary files). */
function ingestLeftovers(cache: string): string[] {
  const dir = path.join(cache, "ingest");
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
}

const LAYER_SIZE = 256 * 1024;
const CUT = 100_000;

interface FaultRun {
  registry: MemoryRegistry;
  cache: string;
  layers: string[];
  delays: number[];
  events: ProgressEvent[];
  result: Promise<unknown>;
}

/**
 * Push a two-layer image, add the faults to the requests for its first
 * layer, and fetch it into a new cache. With `redirectBlobsTo`, the faults
 * hit the storage origin instead of the registry's redirect.
 */
function fetchWithFaults(
  faults: Omit<Fault, "match">[],
  registryOptions: MemoryRegistryOptions = {},
  options: FetchOptions = {},
): FaultRun {
  const registry = new MemoryRegistry(registryOptions);
  const image = registry.pushImage("team/app", "1.0", [
    { bytes: blobBytes(LAYER_SIZE, 1), mediaType: MediaType.ociLayerGzip },
    { bytes: blobBytes(LAYER_SIZE / 2, 2), mediaType: MediaType.ociLayerGzip },
  ]);
  const faulty = image.layers[0].digest;
  for (const fault of faults) {
    registry.addFault({
      match: (_request, url) =>
        registryOptions.redirectBlobsTo
          ? url.pathname === `/_storage/${faulty}`
          : url.pathname.endsWith(`/blobs/${faulty}`),
      ...fault,
    });
  }

  const cache = tempDir("faults");
  const delays: number[] = [];
  const events: ProgressEvent[] = [];
  const result = fetchImage(`${registry.host}/team/app:1.0`, {
    fetch: registry.fetch,
    cache,
    platform: "linux/amd64",
    credentials: () => Promise.resolve(undefined),
    sleep: (ms) => {
      delays.push(ms);
      return Promise.resolve();
    },
    timeoutMs: 200,
    onEvent: (event) => events.push(event),
    ...options,
  });
  return {
    registry,
    cache,
    layers: image.layers.map((layer) => layer.digest),
    delays,
    events,
    result,
  };
}

/** `Range` headers of the GETs of a blob, on the registry and its storage origin. */
function blobRanges(registry: MemoryRegistry, digest: string): (string | undefined)[] {
  return registry.log
    .filter((entry) => entry.method === "GET" && entry.path.includes(digest))
    .filter((entry) => !entry.path.startsWith("/v2/") || !registry.options.redirectBlobsTo)
    .map((entry) => entry.range);
}

/** Recoverable faults: the fetch must succeed and store every blob intact. */
const RECOVERED: {
  name: string;
  faults: Omit<Fault, "match">[];
  registry?: MemoryRegistryOptions;
  check: (run: FaultRun) => void;
}[] = [
  {
    name: "a body that ends early",
    faults: [{ truncateAfter: CUT }],
    check: ({ registry, layers }) => {
      assert.deepEqual(blobRanges(registry, layers[0]), [undefined, `bytes=${CUT}-`]);
    },
  },
  {
    name: "a connection reset mid-blob",
    faults: [{ resetAfter: CUT }],
    check: ({ registry, layers }) => {
      assert.deepEqual(blobRanges(registry, layers[0]), [undefined, `bytes=${CUT}-`]);
    },
  },
  {
    name: "a stalled body",
    faults: [{ stallAfter: CUT }],
    check: ({ registry, layers }) => {
      assert.deepEqual(blobRanges(registry, layers[0]), [undefined, `bytes=${CUT}-`]);
    },
  },
  {
    name: "a server that ignores Range",
    faults: [{ truncateAfter: CUT }, { ignoreRange: true }],
    check: ({ registry, layers }) => {
      assert.deepEqual(blobRanges(registry, layers[0]), [undefined, `bytes=${CUT}-`]);
    },
  },
  {
    name: "two 500 responses",
    faults: [{ status: 500, times: 2 }],
    check: ({ registry, layers, delays }) => {
      assert.equal(blobRanges(registry, layers[0]).length, 3);
      assert.equal(delays.length, 2);
      assert.ok(delays[1] > delays[0] * 1.01 || delays[1] >= 500, `backoff grows: ${delays}`);
    },
  },
  {
    name: "429 with Retry-After",
    faults: [{ status: 429, retryAfter: "7" }],
    check: ({ delays, events }) => {
      assert.deepEqual(delays, [7000]);
      const retry = events.find((event) => event.type === "retry");
      assert.equal(retry?.type, "retry");
      assert.match(retry.reason, /rate limited/);
    },
  },
  {
    name: "a refused connection",
    faults: [{ networkError: true, times: 2 }],
    check: ({ registry, layers }) => {
      assert.equal(blobRanges(registry, layers[0]).length, 3);
    },
  },
  {
    name: "a redirect to storage that rejects Authorization",
    faults: [{ truncateAfter: CUT }],
    registry: { auth: { type: "bearer" }, redirectBlobsTo: "storage.example" },
    check: ({ registry, layers }) => {
      const storage = registry.log.filter((entry) => entry.host === "storage.example");
      assert.ok(storage.length >= 2);
      for (const entry of storage) assert.equal(entry.authorization, undefined, entry.url);
      const blobGets = registry.log.filter((entry) =>
        entry.host === registry.host && entry.path.endsWith(`/blobs/${layers[0]}`) &&
        entry.authorization
      );
      assert.ok(blobGets.length >= 1, "the registry itself got the token");
      assert.deepEqual(storage.filter((e) => e.path.includes(layers[0])).map((e) => e.range), [
        undefined,
        `bytes=${CUT}-`,
      ]);
    },
  },
];

for (const { name, faults, registry: registryOptions, check } of RECOVERED) {
  test(`fetchImage() recovers from ${name}`, async () => {
    const run = fetchWithFaults(faults, registryOptions);
    try {
      await run.result;
      check(run);
      const stored = assertCacheIntact(run.cache);
      for (const layer of run.layers) assert.ok(stored.includes(layer), `${layer} is stored`);
      assert.deepEqual(ingestLeftovers(run.cache), []);
      assert.equal(run.registry.faults.length, 0, "every fault was used");
    } finally {
      fs.rmSync(run.cache, { recursive: true, force: true });
    }
  });
}

test("fetchImage() rejects wrong content and keeps it out", async () => {
  const run = fetchWithFaults([{ corrupt: true }]);
  try {
    await assert.rejects(run.result, (error: unknown) => {
      assert.ok(error instanceof DigestMismatchError, String(error));
      assert.equal(error.expected, run.layers[0]);
      return true;
    });
    assert.ok(!assertCacheIntact(run.cache).includes(run.layers[0]));
    assert.deepEqual(ingestLeftovers(run.cache), [], "the wrong bytes are not kept for resuming");

    await fetchImage(`${run.registry.host}/team/app:1.0`, {
      fetch: run.registry.fetch,
      cache: run.cache,
      platform: "linux/amd64",
      credentials: () => Promise.resolve(undefined),
    });
    assert.ok(assertCacheIntact(run.cache).includes(run.layers[0]));
  } finally {
    fs.rmSync(run.cache, { recursive: true, force: true });
  }
});

test("fetchImage() gives up on a lasting 500", async () => {
  const run = fetchWithFaults([{ status: 500, times: 100 }], {}, { retries: 2 });
  try {
    await assert.rejects(run.result, (error: unknown) => {
      assert.ok(error instanceof RegistryError, String(error));
      assert.equal(error.status, 500);
      return true;
    });
    assert.equal(blobRanges(run.registry, run.layers[0]).length, 3);
    assert.ok(!assertCacheIntact(run.cache).includes(run.layers[0]));
  } finally {
    fs.rmSync(run.cache, { recursive: true, force: true });
  }
});

test("fetchImage() keeps a partial blob for the next run", async () => {
  const run = fetchWithFaults([{ resetAfter: CUT }, { status: 500, times: 100 }], {}, {
    retries: 1,
  });
  try {
    await assert.rejects(run.result, RegistryError);
    assert.ok(!assertCacheIntact(run.cache).includes(run.layers[0]));
    const hex = run.layers[0].slice("sha256:".length);
    const partials = fs.readdirSync(path.join(run.cache, "ingest")).filter((name) => name.startsWith(`${hex}.`) && name.endsWith(".partial"));
    assert.equal(partials.length, 1);
    assert.equal(fs.statSync(path.join(run.cache, "ingest", partials[0])).size, CUT);

    run.registry.faults.length = 0;
    run.registry.log.length = 0;
    await fetchImage(`${run.registry.host}/team/app:1.0`, {
      fetch: run.registry.fetch,
      cache: run.cache,
      platform: "linux/amd64",
      credentials: () => Promise.resolve(undefined),
    });
    assert.deepEqual(blobRanges(run.registry, run.layers[0]), [`bytes=${CUT}-`]);
    assert.ok(assertCacheIntact(run.cache).includes(run.layers[0]));
    assert.deepEqual(ingestLeftovers(run.cache), []);
  } finally {
    fs.rmSync(run.cache, { recursive: true, force: true });
  }
});

/** Push an image with `count` distinct layers and return their digests. */
function pushLayers(registry: MemoryRegistry, count: number, size: number): string[] {
  const layers = Array.from({ length: count }, (_, i) => ({
    bytes: blobBytes(size, 100 + i),
    mediaType: MediaType.ociLayerGzip,
  }));
  return registry.pushImage("team/app", "1.0", layers).layers.map((layer) => layer.digest);
}

/** Wrap the registry's fetch to record the maximum number of blob bodies open at once. */
function countingFetch(registry: MemoryRegistry): { fetch: typeof fetch; peak: () => number } {
  let open = 0;
  let peak = 0;
  const counting: typeof fetch = async (input, init) => {
    const response = await registry.fetch(input, init);
    if (!new URL(new Request(input).url).pathname.includes("/blobs/") || !response.body) {
      return response;
    }
    open++;
    peak = Math.max(peak, open);
    let closed = false;
    const close = () => {
      if (!closed) open--;
      closed = true;
    };
    const body = response.body.pipeThrough(new TransformStream({ flush: close }));
    return new Response(body, { status: response.status, headers: response.headers });
  };
  return { fetch: counting, peak: () => peak };
}

test("fetchImage() downloads three layers at once by default", async () => {
  for (const [concurrency, expected] of [[undefined, 3], [1, 1], [5, 5]] as const) {
    const registry = new MemoryRegistry();
    const layers = pushLayers(registry, 6, 64 * 1024);
    registry.addFault({
      match: (_request, url) => layers.some((digest) => url.pathname.endsWith(digest)),
      throttle: { chunkBytes: 16 * 1024, delayMs: 5 },
      times: layers.length,
    });
    const counting = countingFetch(registry);
    const cache = tempDir("concurrency");
    try {
      await fetchImage(`${registry.host}/team/app:1.0`, {
        fetch: counting.fetch,
        cache,
        platform: "linux/amd64",
        credentials: () => Promise.resolve(undefined),
        concurrency,
      });
      assert.equal(counting.peak(), expected, `concurrency ${concurrency}`);
      assert.equal(assertCacheIntact(cache).length, layers.length + 2);
    } finally {
      fs.rmSync(cache, { recursive: true, force: true });
    }
  }
});

test("fetchImage() fetches a repeated layer once", async () => {
  const registry = new MemoryRegistry();
  const a = registry.addBlob(blobBytes(10_000, 7), MediaType.ociLayerGzip);
  const b = registry.addBlob(blobBytes(10_000, 8), MediaType.ociLayerGzip);
  const config = registry.addBlob(
    new TextEncoder().encode('{"architecture":"amd64","os":"linux"}'),
    MediaType.ociConfig,
  );
  registry.putManifest("team/app", "1.0", {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config,
    layers: [a, b, a],
  }, MediaType.ociManifest);
  const cache = tempDir("repeated");
  try {
    const result = await fetchImage(`${registry.host}/team/app:1.0`, {
      fetch: registry.fetch,
      cache,
      platform: "linux/amd64",
      credentials: () => Promise.resolve(undefined),
    });
    assert.equal(result.manifest.layers.length, 3);
    assert.equal(registry.requests(`/blobs/${a.digest}`).length, 1);
    assert.equal(registry.requests(`/blobs/${b.digest}`).length, 1);
    assert.equal(result.downloaded, 3, "config and two distinct layers");
  } finally {
    fs.rmSync(cache, { recursive: true, force: true });
  }
});

/** Spawn the CLI in a child process and return its handle, so the test can kill it. */
function spawnCli(args: string[], env: Record<string, string>) {
  const [program, prefix] = cliCommand();
  const child: ChildProcess = spawn(program, [...prefix, ...args], {
    env: { ...process.env, NO_COLOR: "1", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (chunk) => (stdout += chunk));
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  const done = new Promise<CliRun & { signal: string | null }>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code: code ?? -1, signal, stdout, stderr }));
  });
  return { child, done, output: () => ({ stdout, stderr }) };
}

/** Return an environment in which CLI children find none of the machine's credentials. */
function isolatedEnv(home: string): Record<string, string> {
  fs.mkdirSync(path.join(home, "docker"), { recursive: true });
  return {
    HOME: home,
    DOCKER_CONFIG: path.join(home, "docker"),
    OCISTAGE_USERNAME: "",
    OCISTAGE_PASSWORD: "",
    OCISTAGE_MIRRORS: "",
  };
}

/**
 * Poll `condition` every 20 ms until it holds. After `limitMs`, fail with
 * `describe()`, which reports the state the test was waiting on.
 */
async function waitFor(condition: () => boolean, describe: () => string, limitMs = 30_000): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${describe()}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return -1;
  }
}

test("fetch resumes after kill -9 mid-blob", async () => {
  const registry = new MemoryRegistry();
  const small = [blobBytes(20_000, 31), blobBytes(30_000, 32)];
  const big = blobBytes(2 * 1024 * 1024, 33);
  const image = registry.pushImage("team/app", "1.0", [
    { bytes: small[0], mediaType: MediaType.ociLayerGzip },
    { bytes: big, mediaType: MediaType.ociLayerGzip },
    { bytes: small[1], mediaType: MediaType.ociLayerGzip },
  ]);
  const [first, large, last] = image.layers.map((layer) => layer.digest);
  const stallOffset = 1024 * 1024;
  registry.addFault({ match: `/blobs/${large}`, stallAfter: stallOffset });
  const server = await registry.listen();
  const home = tempDir("kill");
  const cache = path.join(home, "cache");
  const blobFile = (digest: string) => path.join(cache, "blobs", "sha256", digest.slice(7));
  const partialSize = () => {
    const dir = path.join(cache, "ingest");
    const names = fs.existsSync(dir) ? fs.readdirSync(dir).filter((name) => name.startsWith(`${large.slice(7)}.`) && name.endsWith(".partial")) : [];
    return names.length === 1 ? fileSize(path.join(dir, names[0])) : -1;
  };
  const args = ["fetch", `${server.host}/team/app:1.0`, "--cache", cache, "--json"];

  try {
    const killed = spawnCli(args, isolatedEnv(home));
    await waitFor(
      () =>
        fs.existsSync(blobFile(first)) && fs.existsSync(blobFile(last)) &&
        partialSize() === stallOffset,
      () =>
        `small layers stored: ${fs.existsSync(blobFile(first))}, ${fs.existsSync(blobFile(last))}; ` +
        `partial bytes: ${partialSize()} of ${stallOffset}; requests: ${registry.log.length}; ` +
        `CLI stderr: ${killed.output().stderr}`,
    );
    killed.child.kill("SIGKILL");
    const outcome = await killed.done;
    assert.equal(outcome.signal, "SIGKILL");
    assert.ok(!fs.existsSync(blobFile(large)), "no partial blob under its final name");
    assertCacheIntact(cache);

    registry.log.length = 0;
    const rerun = await spawnCli(args, isolatedEnv(home)).done;
    assert.equal(rerun.code, 0, rerun.stderr);

    const blobGets = registry.log.filter((entry) => entry.path.includes("/blobs/"));
    assert.deepEqual(
      blobGets.map((entry) => [entry.path.split("/").at(-1), entry.range]),
      [[large, `bytes=${stallOffset}-`]],
      "completed blobs are not requested again and the large one resumes",
    );
    const stored = assertCacheIntact(cache);
    for (const digest of [image.config.digest, first, large, last]) {
      assert.ok(stored.includes(digest), `${digest} is stored`);
    }
    assert.deepEqual(ingestLeftovers(cache), [], "the partial file is gone");
  } finally {
    await server.close();
    fs.rmSync(home, { recursive: true, force: true });
  }
});

test("fetch runs twice at once into one cache", async () => {
  const registry = new MemoryRegistry();
  const image = registry.pushImage("team/app", "1.0", [
    { bytes: blobBytes(1024 * 1024, 41), mediaType: MediaType.ociLayerGzip },
    { bytes: blobBytes(300_000, 42), mediaType: MediaType.ociLayerGzip },
    { bytes: blobBytes(200_000, 43), mediaType: MediaType.ociLayerGzip },
  ]);
  const large = image.layers[0].digest;

  // Hold both processes' first request for the large layer until the other
  // one has asked too, so the two downloads of it overlap. When one process
  // fails before asking, the hold ends after 5 s so that the test reports it.
  const arrived: (() => void)[] = [];
  let holding = true;
  const releaseAll = () => {
    holding = false;
    arrived.forEach((release) => release());
  };
  const fallback = setTimeout(releaseAll, 5_000);
  const handle = registry.handle.bind(registry);
  registry.handle = async (request) => {
    if (new URL(request.url).pathname.endsWith(`/blobs/${large}`) && holding) {
      await new Promise<void>((resolve) => {
        arrived.push(resolve);
        if (arrived.length === 2) releaseAll();
      });
    }
    return await handle(request);
  };
  registry.addFault({
    match: (_request, url) => url.pathname.includes("/blobs/"),
    throttle: { chunkBytes: 64 * 1024, delayMs: 2 },
    times: 100,
  });
  const server = await registry.listen();
  const home = tempDir("shared");
  const cache = path.join(home, "cache");
  const args = ["fetch", `${server.host}/team/app:1.0`, "--cache", cache, "--json"];

  try {
    const runs = await Promise.all([
      spawnCli(args, isolatedEnv(home)).done,
      spawnCli(args, isolatedEnv(home)).done,
    ]);
    for (const run of runs) {
      assert.equal(run.code, 0, run.stderr);
      assert.equal(JSON.parse(run.stdout).digest, image.manifest.digest);
    }
    assert.equal(registry.requests(`/blobs/${large}`).length, 2, "both processes downloaded it");
    const stored = assertCacheIntact(cache);
    for (const digest of [image.manifest.digest, image.config.digest, ...image.layers.map((l) => l.digest)]) {
      assert.ok(stored.includes(digest), `${digest} is stored`);
    }
    assert.deepEqual(ingestLeftovers(cache), []);
  } finally {
    clearTimeout(fallback);
    await server.close();
    fs.rmSync(home, { recursive: true, force: true });
  }
});
