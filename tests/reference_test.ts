import { test } from "node:test";
import assert from "node:assert/strict";
import type { Digest } from "../src/digest.ts";
import { InvalidReferenceError } from "../src/errors.ts";
import {
  formatPlatform,
  formatReference,
  hostPlatform,
  type ImageReference,
  parsePlatform,
  parseReference,
  platformMatches,
  rankPlatform,
  referenceFromRegistryUrl,
  registryBaseUrl,
} from "../src/reference.ts";

const DIGEST: Digest = `sha256:${"ab".repeat(32)}`;

const VALID: [string, ImageReference][] = [
  ["alpine", { registry: "docker.io", repository: "library/alpine", tag: "latest" }],
  ["alpine:3.20", { registry: "docker.io", repository: "library/alpine", tag: "3.20" }],
  ["library/alpine", { registry: "docker.io", repository: "library/alpine", tag: "latest" }],
  ["bitnami/redis:7", { registry: "docker.io", repository: "bitnami/redis", tag: "7" }],
  ["docker.io/alpine", { registry: "docker.io", repository: "library/alpine", tag: "latest" }],
  ["index.docker.io/alpine", {
    registry: "docker.io",
    repository: "library/alpine",
    tag: "latest",
  }],
  ["127.0.0.1:5000/a/b:t", { registry: "127.0.0.1:5000", repository: "a/b", tag: "t" }],
  ["localhost/app", { registry: "localhost", repository: "app", tag: "latest" }],
  ["localhost:5000/app", { registry: "localhost:5000", repository: "app", tag: "latest" }],
  ["[::1]:5000/app:v1", { registry: "[::1]:5000", repository: "app", tag: "v1" }],
  ["ghcr.io/org/sub/app:1.0_rc-2", {
    registry: "ghcr.io",
    repository: "org/sub/app",
    tag: "1.0_rc-2",
  }],
  [`alpine@${DIGEST}`, { registry: "docker.io", repository: "library/alpine", digest: DIGEST }],
  [`quay.io/a/b:t@${DIGEST}`, { registry: "quay.io", repository: "a/b", tag: "t", digest: DIGEST }],
  ["Reg.Example/app", { registry: "Reg.Example", repository: "app", tag: "latest" }],
  ["a__b/c-d--e.f", { registry: "docker.io", repository: "a__b/c-d--e.f", tag: "latest" }],
];

for (const [input, expected] of VALID) {
  test(`parseReference() reads "${input}"`, () => {
    assert.deepEqual(parseReference(input), expected);
  });
}

const INVALID: [string, RegExp][] = [
  ["", /empty/],
  ["Alpine", /lowercase/],
  ["alpine:", /tag ""/],
  ["alpine:-bad", /tag "-bad"/],
  [`alpine:${"x".repeat(129)}`, /tag/],
  ["alpine@sha256:abc", /digest is invalid/],
  [`alpine@md5:${"a".repeat(32)}`, /digest is invalid/],
  ["https://ghcr.io/a/b", /URL scheme/],
  ["reg.example:port/app", /registry "reg.example:port"/],
  ["reg.example/", /repository name is empty/],
  ["a//b", /component ""/],
  ["a/-b", /component "-b"/],
  ["a/b_", /component "b_"/],
  ["a/b___c", /component "b___c"/],
  ["ab".repeat(32), /image ID/],
  [`reg.example/${"a".repeat(250)}`, /longer than 255/],
];

for (const [input, reason] of INVALID) {
  test(`parseReference() rejects "${input.slice(0, 40)}"`, () => {
    assert.throws(() => parseReference(input), (error: unknown) => {
      assert.ok(error instanceof InvalidReferenceError);
      assert.equal(error.input, input);
      assert.match(error.message, reason);
      assert.match(error.message, /expected \[registry\[:port\]\/\]repository/);
      assert.ok(error.message.includes(`"${input}"`));
      return true;
    });
  });
}

test("formatReference() round trips parsed references", () => {
  for (const [input] of VALID) {
    const ref = parseReference(input);
    assert.deepEqual(parseReference(formatReference(ref)), ref);
  }
  assert.equal(formatReference(parseReference("alpine")), "docker.io/library/alpine:latest");
  assert.equal(
    formatReference(parseReference(`a/b:t@${DIGEST}`)),
    `docker.io/a/b:t@${DIGEST}`,
  );
});

test("registryBaseUrl() maps hosts to schemes", () => {
  const table: [string, Parameters<typeof registryBaseUrl>[1], string][] = [
    ["docker.io", {}, "https://registry-1.docker.io"],
    ["ghcr.io", {}, "https://ghcr.io"],
    ["reg.example:5000", {}, "https://reg.example:5000"],
    ["reg.example:5000", { plainHttp: true }, "http://reg.example:5000"],
    ["localhost:5000", {}, "http://localhost:5000"],
    ["localhost", {}, "http://localhost"],
    ["127.0.0.1:5000", {}, "http://127.0.0.1:5000"],
    ["[::1]:5000", {}, "http://[::1]:5000"],
    ["127.0.0.2:5000", {}, "https://127.0.0.2:5000"],
    [
      "docker.io",
      { registryUrl: "https://registry.hub.docker.com" },
      "https://registry-1.docker.io",
    ],
    ["10.0.0.5:5000", { registryUrl: "http://10.0.0.5:5000/" }, "http://10.0.0.5:5000"],
    ["other.example", { registryUrl: "http://10.0.0.5:5000" }, "https://other.example"],
  ];
  for (const [registry, options, expected] of table) {
    assert.equal(
      registryBaseUrl(registry, options),
      expected,
      `${registry} ${JSON.stringify(options)}`,
    );
  }
});

test("referenceFromRegistryUrl() reads BuildStream sources", () => {
  assert.deepEqual(
    referenceFromRegistryUrl("https://registry.hub.docker.com", "library/alpine"),
    { registry: "docker.io", repository: "library/alpine", tag: "latest" },
  );
  assert.deepEqual(
    referenceFromRegistryUrl("https://index.docker.io", "alpine", "3.20"),
    { registry: "docker.io", repository: "library/alpine", tag: "3.20" },
  );
  assert.deepEqual(
    referenceFromRegistryUrl("http://127.0.0.1:5000", "team/app", DIGEST),
    { registry: "127.0.0.1:5000", repository: "team/app", digest: DIGEST },
  );
  assert.deepEqual(
    referenceFromRegistryUrl("https://reg.example/v2/", "app"),
    { registry: "reg.example", repository: "app", tag: "latest" },
  );
});

test("referenceFromRegistryUrl() rejects bad parts", () => {
  const table: [string, string, string | undefined, RegExp][] = [
    ["ftp://reg.example", "app", undefined, /scheme "ftp:"/],
    ["not a url", "app", undefined, /not a URL/],
    ["https://reg.example/prefix", "app", undefined, /remove the path/],
    ["https://user:pw@reg.example", "app", undefined, /credentials/],
    ["https://reg.example", "App", undefined, /lowercase/],
    ["https://reg.example", "app:1", undefined, /own field/],
    ["https://reg.example", "app", "sha256:12", /invalid digest "sha256:12"/],
    ["https://reg.example", "app", "bad tag", /invalid tag "bad tag"/],
  ];
  for (const [url, image, tagOrDigest, reason] of table) {
    assert.throws(
      () => referenceFromRegistryUrl(url, image, tagOrDigest),
      (error: unknown) => error instanceof InvalidReferenceError && reason.test(error.message),
      `${url} ${image} ${tagOrDigest}`,
    );
  }
});

test("parsePlatform() reads and normalises platforms", () => {
  assert.deepEqual(parsePlatform("linux/amd64"), { os: "linux", architecture: "amd64" });
  assert.deepEqual(parsePlatform("linux/arm/v7"), {
    os: "linux",
    architecture: "arm",
    variant: "v7",
  });
  assert.deepEqual(parsePlatform("Linux/x86_64"), { os: "linux", architecture: "amd64" });
  assert.deepEqual(parsePlatform("linux/aarch64"), { os: "linux", architecture: "arm64" });
  assert.deepEqual(parsePlatform("linux/armhf"), {
    os: "linux",
    architecture: "arm",
    variant: "v7",
  });
  for (const bad of ["linux", "linux/", "/amd64", "linux/arm/v7/x", "linux amd64", ""]) {
    assert.throws(() => parsePlatform(bad), InvalidReferenceError, bad);
  }
});

test("formatPlatform() round trips", () => {
  for (const text of ["linux/amd64", "linux/arm/v6", "windows/amd64"]) {
    assert.equal(formatPlatform(parsePlatform(text)), text);
  }
});

test("hostPlatform() names a known platform", () => {
  const host = hostPlatform();
  assert.ok(["linux", "windows"].includes(host.os));
  assert.ok(host.architecture.length > 0);
  assert.ok(!["x64", "x86_64", "aarch64"].includes(host.architecture));
  if (host.architecture === "arm") assert.match(host.variant ?? "", /^v[5-8]$/);
});

test("rankPlatform() orders variants", () => {
  const p = (text: string) => parsePlatform(text);
  const table: [string, string, number | undefined][] = [
    ["linux/amd64", "linux/amd64", 0],
    ["linux/arm64", "linux/arm64/v8", 0],
    ["linux/arm64/v8", "linux/arm64", 0],
    ["linux/arm/v7", "linux/arm", 0],
    ["linux/arm", "linux/arm/v7", 1],
    ["linux/arm/v6", "linux/arm/v7", 2],
    ["linux/arm/v5", "linux/arm/v7", 3],
    ["linux/arm/v7", "linux/arm/v6", undefined],
    ["linux/amd64/v3", "linux/amd64", undefined],
    ["linux/amd64", "linux/arm64", undefined],
    ["windows/amd64", "linux/amd64", undefined],
  ];
  for (const [candidate, wanted, rank] of table) {
    assert.equal(rankPlatform(p(candidate), p(wanted)), rank, `${candidate} for ${wanted}`);
    assert.equal(platformMatches(p(candidate), p(wanted)), rank !== undefined);
  }
});
