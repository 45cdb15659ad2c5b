/**
 * inspect and listTags: manifests, configs, offered platforms and tags from
 * an in-process registry and from local sources.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { inspect, listTags } from "../src/inspect.ts";
import { formatInspect } from "../src/cli/output.ts";
import { ImageNotFoundError, PlatformNotFoundError } from "../src/errors.ts";
import type { RegistryError } from "../src/registry/errors.ts";
import { RegistryClient } from "../src/registry/client.ts";
import { buildTar, gzipBytes } from "./fixtures/tar.ts";
import { MemoryRegistry } from "./fixtures/registry.ts";
import { buildImage, writeLegacyArchive, writeOciLayout } from "./fixtures/local_images.ts";
import { tempDir } from "./fixtures/temp.ts";

const LAYER = "application/vnd.oci.image.layer.v1.tar+gzip";

function layer(text: string) {
  return { bytes: gzipBytes(buildTar([{ path: "file", content: text }])), mediaType: LAYER };
}

/** Create a registry with "app:multi" (arm64, s390x and an attestation) and "app:single" (amd64). */
function multiPlatformRegistry() {
  const registry = new MemoryRegistry();
  const arm = registry.pushImage("team/app", undefined, [layer("arm\n")], { platform: { os: "linux", architecture: "arm64", variant: "v8" } });
  const s390x = registry.pushImage("team/app", undefined, [layer("s390x\n")], { platform: { os: "linux", architecture: "s390x" } });
  const attestation = registry.pushImage("team/app", undefined, [layer("{}")]);
  const index = registry.pushIndex("team/app", "multi", [
    { manifest: arm.manifest, platform: { os: "linux", architecture: "arm64", variant: "v8" } },
    { manifest: s390x.manifest, platform: { os: "linux", architecture: "s390x" } },
    { manifest: attestation.manifest, platform: { os: "unknown", architecture: "unknown" } },
  ]);
  const single = registry.pushImage("team/app", "single", [layer("one\n"), layer("two\n")], { platform: { os: "linux", architecture: "amd64" } });
  const client = new RegistryClient({ fetch: registry.fetch });
  return { registry, client, arm, s390x, index, single };
}

test("inspect() of an index lists its platforms without attestations", async () => {
  const { client, index, arm } = multiPlatformRegistry();
  const result = await inspect("reg.example/team/app:multi", { client, platform: "linux/arm64" });

  assert.equal(result.source, "reg.example/team/app:multi");
  assert.equal(result.digest, index.digest);
  assert.equal(result.mediaType, "application/vnd.oci.image.index.v1+json");
  assert.deepEqual(result.platforms.map((entry) => entry.platform), ["linux/arm64/v8", "linux/s390x"]);
  assert.equal(result.manifest?.digest, arm.manifest.digest);
  assert.equal(result.config?.descriptor.digest, arm.config.digest);
  assert.equal(result.config?.document.architecture, "arm64");
  assert.equal(result.tags, undefined, "tags only on request");
});

const hostIsOffered = process.arch === "s390x" || process.arch === "arm64";

test("inspect() without a platform tolerates a missing host platform", { skip: hostIsOffered && "the host platform is offered" }, async () => {
  const { client } = multiPlatformRegistry();
  const result = await inspect("reg.example/team/app:multi", { client });
  assert.equal(result.manifest, undefined);
  assert.equal(result.config, undefined);
  assert.equal(result.platforms.length, 2);
  assert.match(formatInspect(result), /Platform: +none read: .*pass --platform/);
});

test("inspect() with an unoffered platform fails", async () => {
  const { client } = multiPlatformRegistry();
  await assert.rejects(inspect("reg.example/team/app:multi", { client, platform: "linux/ppc64le" }), (error: Error) => {
    assert.ok(error instanceof PlatformNotFoundError);
    assert.deepEqual(error.available, ["linux/arm64/v8", "linux/s390x"]);
    return true;
  });
});

test("inspect() of a single manifest reports the config's platform", async () => {
  const { client, single } = multiPlatformRegistry();
  const result = await inspect("reg.example/team/app:single", { client, platform: "linux/amd64", tags: true });

  assert.equal(result.index, undefined);
  assert.equal(result.digest, single.manifest.digest);
  assert.deepEqual(result.platforms, [{
    platform: "linux/amd64",
    digest: single.manifest.digest,
    mediaType: single.manifest.mediaType,
    size: single.manifest.size,
  }]);
  assert.equal(result.manifest?.document.layers.length, 2);
  assert.deepEqual(result.tags, ["multi", "single"]);
});

test("inspect() of a missing tag lists the tags there are", async () => {
  const { client } = multiPlatformRegistry();
  const error = await inspect("reg.example/team/app:nope", { client }).catch((caught) => caught);
  assert.ok(error instanceof ImageNotFoundError, String(error));
  assert.deepEqual(error.available, ["multi", "single"]);
  assert.equal(error.message, 'tag "nope" not found in "reg.example/team/app:nope": the repository has tags "multi", "single"; pass one of them');
  assert.equal((error.cause as RegistryError).status, 404);
});

test("listTags() returns the repository's tags", async () => {
  const { client } = multiPlatformRegistry();
  assert.deepEqual(await listTags("reg.example/team/app", { client }), ["multi", "single"]);
});

test("inspect() reads a layout entry that is an index", async () => {
  const work = tempDir("inspect-layout");
  const amd = buildImage([[{ path: "a", content: "a\n" }]]);
  const arm = buildImage([[{ path: "b", content: "b\n" }]], { platform: { os: "linux", architecture: "arm64", variant: "v8" } });
  const [entry] = writeOciLayout(work, [{ name: "1.0", images: [amd, arm] }]);

  const result = await inspect(`oci:${work}:1.0`, { platform: "linux/arm64", tags: true });
  assert.equal(result.reference, undefined);
  assert.equal(result.digest, entry.digest);
  assert.deepEqual(result.platforms.map((offered) => offered.platform), ["linux/amd64", "linux/arm64/v8"]);
  assert.equal(result.manifest?.digest, arm.manifest.digest);
  assert.equal(result.config?.document.created, "2024-01-02T03:04:05Z");
  assert.deepEqual(result.tags, ["1.0"]);
});

test("inspect() reads a legacy docker archive", async () => {
  const work = tempDir("inspect-archive");
  const image = buildImage([[{ path: "a", content: "a\n" }], [{ path: "b", content: "b\n" }]], { compression: "none" });
  writeLegacyArchive(path.join(work, "a.tar"), [{ image, repoTags: ["app:1"] }]);

  const result = await inspect(`docker-archive:${work}/a.tar`, { platform: "linux/amd64", tags: true });
  assert.equal(result.config?.descriptor.digest, image.config.digest);
  assert.deepEqual(result.manifest?.document.layers.map((entry) => entry.digest), image.layers.map((entry) => entry.digest));
  assert.deepEqual(
    result.manifest?.document.layers.map((entry) => entry.mediaType),
    ["application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar"],
  );
  assert.deepEqual(result.tags, ["app:1"]);
  assert.equal(result.digest, result.manifest?.digest, "a single manifest is its own top");
});

test("formatInspect() shows manifest, config fields and layers", async () => {
  const { client, single } = multiPlatformRegistry();
  const text = formatInspect(await inspect("reg.example/team/app:single", { client, platform: "linux/amd64", tags: true }));
  const lines = text.split("\n");

  assert.equal(lines[0], "Image:      reg.example/team/app:single");
  assert.ok(lines.includes(`Digest:     ${single.manifest.digest} (application/vnd.oci.image.manifest.v1+json)`), text);
  assert.ok(lines.includes("Platforms:  linux/amd64"), text);
  assert.ok(lines.some((line) => line.startsWith(`Config:     ${single.config.digest}`)), text);
  assert.ok(lines.some((line) => line.startsWith("Layers:     2, ")), text);
  assert.ok(lines.some((line) => line.includes(`  1. ${single.layers[0].digest}`)), text);
  assert.ok(lines.includes("Tags:       multi, single"), text);
});
