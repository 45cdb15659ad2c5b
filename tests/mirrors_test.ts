/**
 * Registry mirrors. The tests cover parsing of locations, flags and files,
 * and the client's use of mirrors for content by digest with fallback to the
 * registry. The CLI runs against a real distribution registry as an
 * authenticated mirror.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { MediaType } from "../src/manifest.ts";
import {
  addMirrorFlag,
  mergeMirrors,
  mirrorHosts,
  mirrorsFor,
  parseMirror,
  parseMirrorsFile,
} from "../src/mirrors.ts";
import type { ProgressEvent } from "../src/progress.ts";
import { type ImageReference, parsePlatform } from "../src/reference.ts";
import { type Credentials, credentialsExcept, staticCredentials } from "../src/registry/auth.ts";
import { RegistryClient, type RegistryClientOptions } from "../src/registry/client.ts";
import { RegistryError } from "../src/registry/errors.ts";
import { fetchImage } from "../src/stage.ts";
import { runCliProcess } from "./fixtures/cli.ts";
import {
  htpasswdEnv,
  pushBlob,
  pushManifest,
  skipUnlessPrograms,
  startDistribution,
} from "./fixtures/distribution.ts";
import { MemoryRegistry, type MemoryRegistryOptions, type PushedImage } from "./fixtures/registry.ts";
import { blobBytes, tempDir } from "./fixtures/temp.ts";

test("parseMirror() reads locations", () => {
  const table: [string, { host: string; origin: string; prefix: string }][] = [
    ["https://mirror.example", { host: "mirror.example", origin: "https://mirror.example", prefix: "" }],
    ["mirror.example", { host: "mirror.example", origin: "https://mirror.example", prefix: "" }],
    ["http://mirror.example:8080/", {
      host: "mirror.example:8080",
      origin: "http://mirror.example:8080",
      prefix: "",
    }],
    ["127.0.0.1:5001/hub", { host: "127.0.0.1:5001", origin: "http://127.0.0.1:5001", prefix: "hub" }],
    ["localhost/a/b/", { host: "localhost", origin: "http://localhost", prefix: "a/b" }],
    ["https://127.0.0.1:5001", {
      host: "127.0.0.1:5001",
      origin: "https://127.0.0.1:5001",
      prefix: "",
    }],
  ];
  for (const [location, expected] of table) {
    const mirror = parseMirror(location);
    assert.deepEqual(
      { host: mirror.host, origin: mirror.origin, prefix: mirror.prefix },
      expected,
      location,
    );
    assert.equal(mirror.location, location);
  }
});

test("parseMirror() rejects bad locations", () => {
  const table: [string, RegExp][] = [
    ["ftp://mirror.example", /scheme "ftp:" is not supported/],
    ["https://user:pw@mirror.example", /contains credentials/],
    ["https://mirror.example/?x=1", /remove the query/],
    ["https://mirror.example/#top", /remove the query and fragment/],
    ["", /invalid mirror location ""/],
    ["bad host", /invalid mirror location "bad host"/],
  ];
  for (const [location, pattern] of table) {
    assert.throws(() => parseMirror(location), (error: unknown) => {
      assert.ok(error instanceof TypeError, location);
      assert.match(error.message, pattern, location);
      return true;
    });
  }
});

test("addMirrorFlag() groups by registry", () => {
  const map = {};
  addMirrorFlag(map, "docker.io=https://one.example");
  addMirrorFlag(map, "index.docker.io=two.example/hub");
  addMirrorFlag(map, "ghcr.io=127.0.0.1:5001");
  assert.deepEqual(map, {
    "docker.io": ["https://one.example", "two.example/hub"],
    "ghcr.io": ["127.0.0.1:5001"],
  });
  for (const bad of ["docker.io", "=https://m.example", "docker.io="]) {
    assert.throws(() => addMirrorFlag({}, bad), /expected REGISTRY=LOCATION/, bad);
  }
  assert.throws(() => addMirrorFlag({}, "docker.io=ftp://m.example"), /scheme "ftp:"/);
});

test("parseMirrorsFile() reads YAML and JSON", () => {
  const yaml = [
    "# mirrors for CI",
    "mirrors:",
    "  docker.io:",
    "    - https://mirror.example",
    "    - 127.0.0.1:5001/hub",
    "  registry-1.docker.io: https://third.example",
    "  ghcr.io: https://ghcr-cache.example",
    "",
  ].join("\n");
  assert.deepEqual(parseMirrorsFile(yaml, "mirrors.yaml"), {
    "docker.io": ["https://mirror.example", "127.0.0.1:5001/hub", "https://third.example"],
    "ghcr.io": ["https://ghcr-cache.example"],
  });

  const json = JSON.stringify({ mirrors: { "quay.io": ["https://quay-cache.example"] } });
  assert.deepEqual(parseMirrorsFile(json, "mirrors.json"), {
    "quay.io": ["https://quay-cache.example"],
  });
  assert.deepEqual(parseMirrorsFile("", "empty.yaml"), {});
});

test("parseMirrorsFile() rejects bad files", () => {
  const table: [string, RegExp][] = [
    ["mirrors: [unclosed", /"bad.yaml" is not valid YAML or JSON/],
    ["- a\n- b\n", /"bad.yaml" is not a mapping/],
    ["registries: {}\n", /has unknown key "registries"/],
    ["mirrors: [a]\n", /"mirrors" value that is not a mapping/],
    ["mirrors:\n  docker.io: 5\n", /value for "docker.io" that is neither a string/],
    ["mirrors:\n  docker.io: [1]\n", /value for "docker.io" that is neither a string/],
  ];
  for (const [text, pattern] of table) {
    assert.throws(() => parseMirrorsFile(text, "bad.yaml"), (error: unknown) => {
      assert.ok(error instanceof SyntaxError, text);
      assert.match(error.message, pattern, text);
      return true;
    });
  }
  assert.throws(
    () => parseMirrorsFile("mirrors:\n  docker.io: ftp://x.example\n", "bad.yaml"),
    TypeError,
  );
});

test("mergeMirrors() keeps order and drops repeats", () => {
  const merged = mergeMirrors(
    { "docker.io": ["https://a.example"] },
    undefined,
    { "index.docker.io": ["https://b.example", "https://a.example"], "ghcr.io": ["c.example"] },
  );
  assert.deepEqual(merged, {
    "docker.io": ["https://a.example", "https://b.example"],
    "ghcr.io": ["c.example"],
  });
  assert.deepEqual(mirrorHosts(merged), ["a.example", "b.example", "c.example"]);
  assert.deepEqual(mirrorsFor(merged, "registry-1.docker.io").map((m) => m.host), [
    "a.example",
    "b.example",
  ]);
  assert.deepEqual(mirrorsFor(merged, "quay.io"), []);
});

test("credentialsExcept() skips the named hosts", async () => {
  const resolver = credentialsExcept(
    ["mirror.example", "127.0.0.1:5001"],
    staticCredentials({ username: "u", password: "p" }),
  );
  assert.equal(await resolver("mirror.example"), undefined);
  assert.equal(await resolver("MIRROR.example"), undefined);
  assert.equal(await resolver("127.0.0.1:5001"), undefined);
  assert.deepEqual(await resolver("reg.example"), { username: "u", password: "p" });
});

interface MirrorSetup {
  origin: MemoryRegistry;
  mirror: MemoryRegistry;
  image: PushedImage;
  /** Digest of the index that tag 1.0 names. */
  index: string;
  ref: ImageReference;
  client: RegistryClient;
  events: ProgressEvent[];
  delays: number[];
}

/**
 * Push one image (an index over one amd64 manifest) to an origin and a
 * mirror, and build a client that knows the mirror. `mirrorRepository`
 * stores the mirror's copy under another name, for mirror path prefixes.
 */
function mirrorSetup(
  options: {
    mirrorLocation?: string;
    mirrorRepository?: string;
    origin?: MemoryRegistryOptions;
    mirror?: MemoryRegistryOptions;
    client?: RegistryClientOptions;
  } = {},
): MirrorSetup {
  const origin = new MemoryRegistry({ host: "reg.example", ...options.origin });
  const mirror = new MemoryRegistry({ host: "mirror.example", ...options.mirror });
  const layers = [
    { bytes: blobBytes(200_000, 1), mediaType: MediaType.ociLayerGzip },
    { bytes: blobBytes(50_000, 2), mediaType: MediaType.ociLayerGzip },
  ];
  const platform = { os: "linux", architecture: "amd64" };
  const image = origin.pushImage("team/app", undefined, layers, { platform });
  const index = origin.pushIndex("team/app", "1.0", [{ manifest: image.manifest, platform }]);
  mirror.pushImage(options.mirrorRepository ?? "team/app", undefined, layers, { platform });

  const events: ProgressEvent[] = [];
  const delays: number[] = [];
  const client = new RegistryClient({
    fetch: joinFetch(origin, mirror),
    mirrors: { "reg.example": [options.mirrorLocation ?? "https://mirror.example"] },
    sleep: (ms) => {
      delays.push(ms);
      return Promise.resolve();
    },
    onEvent: (event) => events.push(event),
    ...options.client,
  });
  const ref: ImageReference = { registry: "reg.example", repository: "team/app", tag: "1.0" };
  return { origin, mirror, image, index: index.digest, ref, client, events, delays };
}

/** Route requests to whichever registry serves the host; unknown hosts refuse the connection. */
function joinFetch(...registries: MemoryRegistry[]): typeof fetch {
  return (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    const host = new URL(url).host;
    const registry = registries.find((candidate) => candidate.host === host) ?? registries[0];
    return registry.fetch(input, init);
  };
}

async function readAll(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Resolve the setup's reference and read every layer through the client. */
async function pullAll(setup: MirrorSetup, ref = setup.ref): Promise<void> {
  const resolved = await setup.client.resolve(ref, parsePlatform("linux/amd64"));
  assert.equal(resolved.digest, setup.image.manifest.digest);
  for (const layer of resolved.manifest.layers) {
    const bytes = await readAll(setup.client.openBlob(ref, layer));
    assert.equal(bytes.byteLength, layer.size);
  }
}

/** Return the paths of the manifest and blob GETs a registry received. */
function contentGets(registry: MemoryRegistry): string[] {
  return registry.log
    .filter((entry) => entry.method === "GET" && /\/(manifests|blobs)\//.test(entry.path))
    .map((entry) => entry.path);
}

test("RegistryClient takes content by digest from a mirror", async () => {
  const setup = mirrorSetup();
  await pullAll(setup);

  assert.deepEqual(contentGets(setup.origin), ["/v2/team/app/manifests/1.0"], "only the tag");
  assert.deepEqual(contentGets(setup.mirror), [
    `/v2/team/app/manifests/${setup.image.manifest.digest}`,
    `/v2/team/app/blobs/${setup.image.layers[0].digest}`,
    `/v2/team/app/blobs/${setup.image.layers[1].digest}`,
  ]);
  assert.deepEqual(setup.events.filter((event) => event.type === "warning"), []);
});

test("RegistryClient applies a mirror's path prefix", async () => {
  const setup = mirrorSetup({
    mirrorLocation: "https://mirror.example/cache/reg",
    mirrorRepository: "cache/reg/team/app",
  });
  await pullAll(setup);

  assert.ok(contentGets(setup.mirror).every((p) => p.startsWith("/v2/cache/reg/team/app/")));
  assert.equal(contentGets(setup.mirror).length, 3);
  assert.deepEqual(contentGets(setup.origin), ["/v2/team/app/manifests/1.0"]);
});

test("RegistryClient pins a digest without the registry", async () => {
  const setup = mirrorSetup();
  const pinned = { ...setup.ref, tag: undefined, digest: setup.image.manifest.digest };
  await pullAll(setup, pinned as ImageReference);
  assert.deepEqual(contentGets(setup.origin), []);
  assert.equal(contentGets(setup.mirror).length, 3);
});

test("RegistryClient falls back when a mirror lacks content", async () => {
  const setup = mirrorSetup();
  setup.mirror.blobs.delete(setup.image.layers[1].digest);
  await pullAll(setup);

  assert.deepEqual(contentGets(setup.origin), [
    "/v2/team/app/manifests/1.0",
    `/v2/team/app/blobs/${setup.image.layers[1].digest}`,
  ]);
  const warnings = setup.events.filter((event) => event.type === "warning");
  assert.equal(warnings.length, 1);
  assert.equal(warnings[0].type === "warning" && warnings[0].code, "mirror-failed");
  assert.match(warnings[0].type === "warning" ? warnings[0].message : "", /blob unknown/);
});

test("RegistryClient falls back when a mirror is down", async () => {
  const setup = mirrorSetup({ mirrorLocation: "https://down.example" });
  await pullAll(setup);

  assert.equal(contentGets(setup.origin).length, 4, "tag, manifest by digest and two layers");
  // One retry per mirror request: two attempts for each of the three requests.
  assert.equal(setup.delays.length, 3);
  assert.equal(setup.events.filter((event) => event.type === "warning").length, 3);
});

test("RegistryClient continues a cut mirror blob at the registry", async () => {
  const setup = mirrorSetup();
  const layer = setup.image.layers[0];
  setup.mirror.addFault({ match: `/blobs/${layer.digest}`, resetAfter: 60_000 });
  setup.mirror.addFault({ match: `/blobs/${layer.digest}`, status: 503, times: 100 });
  await pullAll(setup);

  const originRanges = setup.origin.log
    .filter((entry) => entry.path.endsWith(`/blobs/${layer.digest}`))
    .map((entry) => entry.range);
  assert.deepEqual(originRanges, ["bytes=60000-"]);
});

test("RegistryClient reports the registry's error last", async () => {
  const setup = mirrorSetup();
  setup.mirror.blobs.delete(setup.image.layers[0].digest);
  setup.origin.blobs.delete(setup.image.layers[0].digest);
  const resolved = await setup.client.resolve(setup.ref, parsePlatform("linux/amd64"));
  await assert.rejects(readAll(setup.client.openBlob(setup.ref, resolved.manifest.layers[0])), (
    error: unknown,
  ) => {
    assert.ok(error instanceof RegistryError);
    assert.equal(error.status, 404);
    assert.match(error.url, /^https:\/\/reg\.example\//);
    return true;
  });
});

test("fetchImage() refetches a mirror's wrong blob from the registry", async () => {
  const setup = mirrorSetup();
  const layer = setup.image.layers[0];
  setup.mirror.addFault({ match: `/blobs/${layer.digest}`, corrupt: true });
  const cache = tempDir("mirror-corrupt");
  try {
    await fetchImage(`reg.example/team/app:1.0`, {
      client: setup.client,
      cache,
      platform: "linux/amd64",
    });
    const stored = fs.readFileSync(path.join(cache, "blobs", "sha256", layer.digest.slice(7)));
    assert.equal(`sha256:${createHash("sha256").update(stored).digest("hex")}`, layer.digest);
    assert.equal(setup.origin.requests(`/blobs/${layer.digest}`).length, 1);
    assert.equal(setup.mirror.requests(`/blobs/${layer.digest}`).length, 1);
  } finally {
    fs.rmSync(cache, { recursive: true, force: true });
  }
});

test("RegistryClient resolves credentials per mirror host", async () => {
  const originCredentials = { username: "origin-user", password: "origin-pw" };
  const mirrorCredentials = { username: "mirror-user", password: "mirror-pw" };
  const asked: string[] = [];
  const setup = mirrorSetup({
    origin: { auth: { type: "basic", ...originCredentials } },
    mirror: { auth: { type: "bearer", ...mirrorCredentials } },
    client: {
      credentials: (host: string): Promise<Credentials | undefined> => {
        asked.push(host);
        if (host === "reg.example") return Promise.resolve(originCredentials);
        if (host === "mirror.example") return Promise.resolve(mirrorCredentials);
        return Promise.resolve(undefined);
      },
    },
  });
  await pullAll(setup);

  assert.deepEqual([...new Set(asked)].sort(), ["mirror.example", "reg.example"]);
  const basic = (c: { username: string; password: string }) =>
    `Basic ${Buffer.from(`${c.username}:${c.password}`).toString("base64")}`;
  const tokenRequests = setup.mirror.log.filter((entry) => entry.path.startsWith("/token"));
  assert.equal(tokenRequests.length, 1);
  assert.equal(tokenRequests[0].authorization, basic(mirrorCredentials));
  for (const entry of setup.mirror.log) {
    assert.notEqual(entry.authorization, basic(originCredentials), entry.path);
  }
  assert.equal(contentGets(setup.origin).length, 2, "the tag, once without and once with credentials");
});

test("RegistryClient rejects a bad mirror location", () => {
  assert.throws(
    () => new RegistryClient({ mirrors: { "docker.io": ["ftp://mirror.example"] } }),
    /invalid mirror location "ftp:\/\/mirror.example"/,
  );
});

test("fetchImage() uses a Docker Hub mirror", async () => {
  // Only the mirror is routed, so any request to Docker Hub itself would fail.
  const mirror = new MemoryRegistry({ host: "hub-mirror.example" });
  const image = mirror.pushImage("library/alpine", undefined, [
    { bytes: blobBytes(10_000, 9), mediaType: MediaType.ociLayerGzip },
  ]);
  const cache = tempDir("hub-mirror");
  try {
    const result = await fetchImage(`alpine@${image.manifest.digest}`, {
      fetch: mirror.fetch,
      mirrors: { "docker.io": ["https://hub-mirror.example"] },
      credentials: () => Promise.resolve(undefined),
      cache,
      platform: "linux/amd64",
    });
    assert.equal(result.digest, image.manifest.digest);
    assert.equal(result.downloaded, 2);
  } finally {
    fs.rmSync(cache, { recursive: true, force: true });
  }
});

const skip = skipUnlessPrograms("docker-registry");

test("CLI pulls through an authenticated distribution mirror", { skip }, async () => {
  const home = tempDir("cli-mirror");
  const originPassword = "origin-pw-never-print-8812";
  const mirrorPassword = "mirror-pw-never-print-5530";
  const origin = new MemoryRegistry({
    auth: { type: "basic", username: "origin-user", password: originPassword },
  });
  const layers = [
    { bytes: blobBytes(150_000, 21), mediaType: MediaType.ociLayerGzip },
    { bytes: blobBytes(40_000, 22), mediaType: MediaType.ociLayerGzip },
  ];
  const image = origin.pushImage("team/app", "1.0", layers);
  const originServer = await origin.listen();
  const mirrorAuth = `Basic ${Buffer.from(`mirror-user:${mirrorPassword}`).toString("base64")}`;
  const mirror = await startDistribution({
    env: await htpasswdEnv(home, { "mirror-user": mirrorPassword }),
  });

  try {
    // The mirror gets byte-identical copies of the origin's blobs and manifest.
    const headers = { authorization: mirrorAuth };
    for (const descriptor of [image.config, ...image.layers]) {
      const blob = origin.blobs.get(descriptor.digest)!;
      await pushBlob(mirror.url, "team/app", blob.bytes, descriptor.mediaType, headers);
    }
    const manifest = JSON.parse(new TextDecoder().decode(image.manifestBytes));
    const copied = await pushManifest(
      mirror.url,
      "team/app",
      image.manifest.digest,
      manifest,
      image.manifest.mediaType,
      headers,
    );
    assert.equal(copied.digest, image.manifest.digest);
    const docker = path.join(home, "docker");
    fs.mkdirSync(docker);
    fs.writeFileSync(
      path.join(docker, "config.json"),
      JSON.stringify({ auths: { [mirror.host]: { auth: mirrorAuth.slice("Basic ".length) } } }),
    );
    const env = {
      HOME: home,
      DOCKER_CONFIG: docker,
      OCISTAGE_USERNAME: "",
      OCISTAGE_PASSWORD: "",
      OCISTAGE_MIRRORS: "",
    };

    // Tag through --mirror and --username: the tag at the origin, the rest at the mirror.
    const byTag = await runCliProcess([
      "fetch",
      `${originServer.host}/team/app:1.0`,
      "--cache",
      path.join(home, "cache-tag"),
      "--mirror",
      `${originServer.host}=${mirror.host}`,
      "--username",
      "origin-user",
      "--password-stdin",
      "--json",
    ], { input: originPassword, env });
    assert.equal(byTag.code, 0, byTag.stderr);
    assert.equal(JSON.parse(byTag.stdout).digest, image.manifest.digest);
    assert.deepEqual(contentGets(origin), [
      "/v2/team/app/manifests/1.0",
      "/v2/team/app/manifests/1.0",
    ], "the origin serves only the tag (once challenged, once with credentials)");
    assert.doesNotMatch(byTag.stderr, /mirror-failed|failed for blob/);

    // Digest through a mirrors file named by OCISTAGE_MIRRORS and environment credentials.
    origin.log.length = 0;
    const file = path.join(home, "mirrors.yaml");
    fs.writeFileSync(file, `mirrors:\n  "${originServer.host}":\n    - ${mirror.url}\n`);
    const byDigest = await runCliProcess([
      "fetch",
      `${originServer.host}/team/app@${image.manifest.digest}`,
      "--cache",
      path.join(home, "cache-digest"),
      "--json",
    ], {
      env: {
        ...env,
        OCISTAGE_MIRRORS: file,
        OCISTAGE_USERNAME: "origin-user",
        OCISTAGE_PASSWORD: originPassword,
      },
    });
    assert.equal(byDigest.code, 0, byDigest.stderr);
    assert.deepEqual(origin.log, [], "a pinned pull never reaches the origin");

    for (const run of [byTag, byDigest]) {
      for (const secret of [originPassword, mirrorPassword, mirrorAuth.slice(6)]) {
        assert.ok(!run.stdout.includes(secret), run.stdout);
        assert.ok(!run.stderr.includes(secret), run.stderr);
      }
    }
  } finally {
    await originServer.close();
    await mirror.close();
    fs.rmSync(home, { recursive: true, force: true });
  }
});

test("CLI rejects a bad --mirror", async () => {
  const run = await runCliProcess(["fetch", "reg.example/app:1", "--mirror", "reg.example"]);
  assert.equal(run.code, 2, run.stderr);
  assert.match(run.stderr, /--mirror: invalid mirror "reg.example"/);
});
