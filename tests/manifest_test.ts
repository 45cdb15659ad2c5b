import { test } from "node:test";
import assert from "node:assert/strict";
import { ManifestError, PlatformNotFoundError } from "../src/errors.ts";
import {
  foreignLayerUrls,
  type ImageIndex,
  type ImageManifest,
  isImageIndex,
  layerCompression,
  MAX_MANIFEST_BYTES,
  MediaType,
  parseManifest,
  selectManifest,
} from "../src/manifest.ts";
import { parsePlatform } from "../src/reference.ts";

const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
const digestOf = (char: string) => `sha256:${char.repeat(64)}`;

const DOCKER_MANIFEST = {
  schemaVersion: 2,
  mediaType: MediaType.dockerManifest,
  config: { mediaType: MediaType.dockerConfig, size: 1469, digest: digestOf("1") },
  layers: [
    { mediaType: MediaType.dockerLayerGzip, size: 2811478, digest: digestOf("2") },
    { mediaType: MediaType.dockerLayerGzip, size: 0, digest: digestOf("3") },
  ],
};

function entry(
  char: string,
  platform?: Record<string, string>,
  mediaType: string = MediaType.dockerManifest,
) {
  return platform
    ? { mediaType, size: 528, digest: digestOf(char), platform }
    : { mediaType, size: 528, digest: digestOf(char) };
}

function index(...manifests: unknown[]): ImageIndex {
  const parsed = parseManifest(
    encode({ schemaVersion: 2, mediaType: MediaType.dockerManifestList, manifests }),
    undefined,
    "test index",
  );
  assert.ok(isImageIndex(parsed));
  return parsed;
}

test("parseManifest() reads a Docker v2 manifest", () => {
  const manifest = parseManifest(
    encode(DOCKER_MANIFEST),
    MediaType.dockerManifest,
    "ref",
  ) as ImageManifest;
  assert.equal(isImageIndex(manifest), false);
  assert.equal(manifest.mediaType, MediaType.dockerManifest);
  assert.equal(manifest.config.digest, digestOf("1"));
  assert.equal(manifest.layers.length, 2);
  assert.equal(manifest.layers[0].size, 2811478);
  assert.equal(manifest.layers[1].size, 0);
});

test("parseManifest() detects the type", () => {
  const { mediaType: _, ...untyped } = DOCKER_MANIFEST;
  const cases: [unknown, string | undefined, string][] = [
    [DOCKER_MANIFEST, undefined, MediaType.dockerManifest],
    [DOCKER_MANIFEST, "application/json", MediaType.dockerManifest],
    [untyped, `${MediaType.dockerManifest}; charset=utf-8`, MediaType.dockerManifest],
    [untyped, undefined, MediaType.ociManifest],
    [untyped, "application/json", MediaType.ociManifest],
    [{ schemaVersion: 2, manifests: [] }, undefined, MediaType.ociIndex],
    [
      { schemaVersion: 2, manifests: [] },
      MediaType.dockerManifestList,
      MediaType.dockerManifestList,
    ],
    [
      { ...DOCKER_MANIFEST, mediaType: MediaType.ociManifest },
      MediaType.dockerManifest,
      MediaType.ociManifest,
    ],
  ];
  for (const [document, contentType, expected] of cases) {
    assert.equal(
      parseManifest(encode(document), contentType, "ref").mediaType,
      expected,
      `${contentType}`,
    );
  }
});

test("parseManifest() keeps OCI index fields", () => {
  const parsed = parseManifest(
    encode({
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [{
        mediaType: MediaType.ociManifest,
        size: 10,
        digest: digestOf("a"),
        platform: { os: "windows", architecture: "amd64", "os.version": "10.0.17763.1" },
        annotations: { "vnd.docker.reference.type": "attestation-manifest" },
      }],
      annotations: { "org.opencontainers.image.created": "2024-01-01T00:00:00Z" },
    }),
    undefined,
    "ref",
  );
  assert.ok(isImageIndex(parsed));
  assert.equal(parsed.manifests[0].platform?.["os.version"], "10.0.17763.1");
  assert.equal(
    parsed.manifests[0].annotations?.["vnd.docker.reference.type"],
    "attestation-manifest",
  );
  assert.equal(parsed.annotations?.["org.opencontainers.image.created"], "2024-01-01T00:00:00Z");
});

test("parseManifest() rejects schema 1", () => {
  const cases: [unknown, string | undefined][] = [
    [{ schemaVersion: 1, name: "a", tag: "b", fsLayers: [] }, undefined],
    [{ schemaVersion: 1, name: "a", tag: "b", fsLayers: [] }, "application/json"],
    [DOCKER_MANIFEST, MediaType.dockerManifestSchema1Signed],
    [DOCKER_MANIFEST, MediaType.dockerManifestSchema1],
    [{ ...DOCKER_MANIFEST, mediaType: MediaType.dockerManifestSchema1 }, undefined],
  ];
  for (const [document, contentType] of cases) {
    assert.throws(
      () => parseManifest(encode(document), contentType, "old:image"),
      (error: unknown) => {
        assert.ok(error instanceof ManifestError);
        assert.equal(error.source, "old:image");
        assert.match(
          error.message,
          /schema 1, which is unsupported: re-push the image with a current client/,
        );
        return true;
      },
    );
  }
});

test("parseManifest() rejects invalid documents", () => {
  const layer = DOCKER_MANIFEST.layers[0];
  const withLayer = (changes: Record<string, unknown>) => ({
    ...DOCKER_MANIFEST,
    layers: [{ ...layer, ...changes }],
  });
  const cases: [string | unknown, string | undefined, RegExp][] = [
    ["{not json", undefined, /not valid JSON/],
    ["[1,2]", undefined, /not a JSON object/],
    [
      { ...DOCKER_MANIFEST, mediaType: "application/vnd.example.thing+json" },
      undefined,
      /unsupported media type "application\/vnd.example.thing\+json"/,
    ],
    [
      { schemaVersion: 2, foo: 1 },
      "application/vnd.example.other+json",
      /unsupported media type "application\/vnd.example.other\+json"/,
    ],
    [{ schemaVersion: 2, foo: 1 }, undefined, /no mediaType/],
    [{ ...DOCKER_MANIFEST, schemaVersion: 3 }, undefined, /schemaVersion 3/],
    [{ ...DOCKER_MANIFEST, config: undefined }, undefined, /config is missing/],
    [{ ...DOCKER_MANIFEST, layers: {} }, undefined, /layers is missing or not an array/],
    [withLayer({ size: -1 }), undefined, /layers\[0\]\.size is -1/],
    [withLayer({ size: 1.5 }), undefined, /layers\[0\]\.size is 1.5/],
    [withLayer({ size: 2 ** 53 }), undefined, /layers\[0\]\.size/],
    [withLayer({ size: "10" }), undefined, /layers\[0\]\.size is "10"/],
    [withLayer({ digest: "sha256:XYZ" }), undefined, /layers\[0\]\.digest is invalid/],
    [withLayer({ digest: `sha512:${"a".repeat(128)}` }), undefined, /only sha256/],
    [withLayer({ mediaType: undefined }), undefined, /layers\[0\]\.mediaType is missing/],
    [withLayer({ urls: "https://x" }), undefined, /layers\[0\]\.urls is not an array/],
    [
      withLayer({ annotations: { a: 1 } }),
      undefined,
      /layers\[0\]\.annotations\.a is not a string/,
    ],
    [
      {
        schemaVersion: 2,
        mediaType: MediaType.ociIndex,
        manifests: [{ ...entry("a"), platform: { os: "linux" } }],
      },
      undefined,
      /manifests\[0\]\.platform\.architecture/,
    ],
  ];
  for (const [document, contentType, reason] of cases) {
    const bytes = typeof document === "string"
      ? new TextEncoder().encode(document)
      : encode(document);
    assert.throws(
      () => parseManifest(bytes, contentType, "ref"),
      (error: unknown) => error instanceof ManifestError && reason.test(error.message),
      String(reason),
    );
  }
});

test("parseManifest() rejects oversized documents", () => {
  const bytes = new Uint8Array(MAX_MANIFEST_BYTES + 1).fill(0x20);
  assert.throws(() => parseManifest(bytes, undefined, "big"), RangeError);
});

test("layerCompression() maps layer media types", () => {
  assert.equal(layerCompression(MediaType.dockerLayerGzip), "gzip");
  assert.equal(layerCompression(MediaType.dockerForeignLayerGzip), "gzip");
  assert.equal(layerCompression(MediaType.ociLayerGzip), "gzip");
  assert.equal(layerCompression(MediaType.ociLayerZstd), "zstd");
  assert.equal(layerCompression(MediaType.ociLayer), "none");
  assert.equal(layerCompression(MediaType.ociLayerNondistributableZstd), "zstd");
  assert.equal(layerCompression("application/vnd.example"), undefined);
});

test("foreignLayerUrls() needs a foreign type and urls", () => {
  const base = { size: 1, digest: digestOf("f") as `sha256:${string}` };
  assert.deepEqual(
    foreignLayerUrls({
      ...base,
      mediaType: MediaType.dockerForeignLayerGzip,
      urls: ["https://a/b"],
    }),
    ["https://a/b"],
  );
  assert.equal(
    foreignLayerUrls({ ...base, mediaType: MediaType.dockerForeignLayerGzip }),
    undefined,
  );
  assert.equal(
    foreignLayerUrls({ ...base, mediaType: MediaType.dockerLayerGzip, urls: ["https://a"] }),
    undefined,
  );
  assert.deepEqual(
    foreignLayerUrls({
      ...base,
      mediaType: MediaType.ociLayerNondistributableGzip,
      urls: ["https://c"],
    }),
    ["https://c"],
  );
});

test("selectManifest() takes arm64 entry without variant", () => {
  // An arm64/v8 host and an index whose arm64 entry has no variant.
  const list = index(
    entry("a", { architecture: "amd64", os: "linux" }),
    entry("b", { architecture: "arm", os: "linux", variant: "v7" }),
    entry("c", { architecture: "arm64", os: "linux" }),
    entry("e", { architecture: "ppc64le", os: "linux" }),
  );
  const chosen = selectManifest(list, { os: "linux", architecture: "arm64", variant: "v8" }, "ref");
  assert.equal(chosen.digest, digestOf("c"));
});

test("selectManifest() chooses by platform", () => {
  const list = index(
    entry("a", { architecture: "amd64", os: "linux" }),
    entry("b", { architecture: "amd64", os: "linux", variant: "v3" }),
    entry("c", { architecture: "arm", os: "linux", variant: "v6" }),
    entry("d", { architecture: "arm", os: "linux", variant: "v7" }),
    entry("e", { architecture: "arm64", os: "linux", variant: "v8" }),
    entry("f", { architecture: "arm", os: "linux", variant: "v5" }),
    entry("0", { architecture: "unknown", os: "unknown" }),
    entry("7", { architecture: "amd64", os: "windows" }),
  );
  const table: [string, string][] = [
    ["linux/amd64", "a"],
    ["linux/amd64/v3", "b"],
    ["linux/arm", "d"],
    ["linux/arm/v7", "d"],
    ["linux/arm/v6", "c"],
    ["linux/arm/v8", "d"],
    ["linux/arm64", "e"],
    ["windows/amd64", "7"],
  ];
  for (const [platform, expected] of table) {
    assert.equal(
      selectManifest(list, parsePlatform(platform), "ref").digest,
      digestOf(expected),
      platform,
    );
  }
});

test("selectManifest() prefers closest lower ARM variant", () => {
  const list = index(
    entry("5", { architecture: "arm", os: "linux", variant: "v5" }),
    entry("6", { architecture: "arm", os: "linux", variant: "v6" }),
  );
  assert.equal(selectManifest(list, parsePlatform("linux/arm/v7"), "ref").digest, digestOf("6"));
  assert.throws(
    () =>
      selectManifest(
        index(entry("7", { architecture: "arm", os: "linux", variant: "v7" })),
        parsePlatform("linux/arm/v6"),
        "ref",
      ),
    PlatformNotFoundError,
  );
});

test("selectManifest() falls back to no variant", () => {
  const list = index(
    entry("6", { architecture: "arm", os: "linux", variant: "v6" }),
    entry("9", { architecture: "arm", os: "linux" }),
  );
  assert.equal(selectManifest(list, parsePlatform("linux/arm/v7"), "ref").digest, digestOf("9"));
});

test("selectManifest() takes first of equal entries", () => {
  const list = index(
    entry("1", { architecture: "amd64", os: "linux" }),
    entry("2", { architecture: "amd64", os: "linux" }),
  );
  assert.equal(selectManifest(list, parsePlatform("linux/amd64"), "ref").digest, digestOf("1"));
});

test("selectManifest() takes a lone entry without platform", () => {
  const list = index(entry("1"));
  assert.equal(selectManifest(list, parsePlatform("linux/s390x"), "ref").digest, digestOf("1"));
});

test("selectManifest() lists platforms when none match", () => {
  const list = index(
    entry("a", { architecture: "amd64", os: "linux" }),
    entry("b", { architecture: "arm", os: "linux", variant: "v7" }),
    entry("0", { architecture: "unknown", os: "unknown" }),
    entry("c", { architecture: "amd64", os: "linux" }, MediaType.dockerConfig),
  );
  assert.throws(
    () => selectManifest(list, parsePlatform("linux/riscv64"), "reg.example/app:1"),
    (error: unknown) => {
      assert.ok(error instanceof PlatformNotFoundError);
      assert.equal(error.requested, "linux/riscv64");
      assert.deepEqual(error.available, ["linux/amd64", "linux/arm/v7"]);
      assert.match(error.message, /reg\.example\/app:1/);
      return true;
    },
  );
});
