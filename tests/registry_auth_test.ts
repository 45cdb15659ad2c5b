/**
 * Authentication against the real CNCF distribution registry on 127.0.0.1:
 * htpasswd basic auth, and bearer tokens from a JWT token server written for
 * the tests. The CLI runs in a child process with credentials from each
 * source it supports, and its output is scanned for every secret.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { parsePlatform, type ImageReference } from "../src/reference.ts";
import { staticCredentials } from "../src/registry/auth.ts";
import { RegistryClient } from "../src/registry/client.ts";
import { RegistryError } from "../src/registry/errors.ts";
import { type CliRun, runCliProcess } from "./fixtures/cli.ts";
import {
  type Distribution,
  digestOf,
  htpasswdEnv,
  MEDIA,
  pushImage,
  skipUnlessPrograms,
  startDistribution,
  startTokenServer,
  type TokenServer,
} from "./fixtures/distribution.ts";
import { buildTar, gzipBytes } from "./fixtures/tar.ts";
import { tempDir } from "./fixtures/temp.ts";

const skip = skipUnlessPrograms("docker-registry", "openssl");

const USER = "ci-user";
const PASSWORD = "pw-Zq81-never-print-me";
const REFRESH_TOKEN = "refresh-Kx7-never-print-me";

/** Build a gzip layer with one file whose content names the repository. */
function layerFor(repository: string) {
  const tar = buildTar([{ path: "etc/origin", content: `${repository}\n` }]);
  return { bytes: gzipBytes(tar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(tar) };
}

/**
 * Return an environment in which a CLI child finds none of the machine's
 * credentials: an empty docker config directory and empty OCISTAGE_* variables.
 */
function isolatedEnv(home: string, extra: Record<string, string> = {}): Record<string, string> {
  const docker = path.join(home, "docker-empty");
  fs.mkdirSync(docker, { recursive: true });
  return {
    HOME: home,
    DOCKER_CONFIG: docker,
    OCISTAGE_USERNAME: "",
    OCISTAGE_PASSWORD: "",
    OCISTAGE_MIRRORS: "",
    ...extra,
  };
}

/** Assert that no secret, nor the basic auth encoding of the password, appears in a run's output. */
function assertNoSecrets(run: CliRun, secrets: string[]): void {
  const encoded = Buffer.from(`${USER}:${PASSWORD}`).toString("base64");
  for (const secret of [...secrets, encoded]) {
    assert.ok(!run.stdout.includes(secret), `stdout contains a secret: ${run.stdout}`);
    assert.ok(!run.stderr.includes(secret), `stderr contains a secret: ${run.stderr}`);
  }
}

/** Write an executable docker-credential-NAME into `dir` that returns credentials for one server only. */
function writeCredentialHelper(dir: string, name: string, server: string): void {
  const file = path.join(dir, `docker-credential-${name}`);
  fs.writeFileSync(
    file,
    [
      "#!/bin/sh",
      '[ "$1" = get ] || exit 2',
      "read -r server",
      `if [ "$server" = "${server}" ]; then`,
      `  printf '{"ServerURL":"%s","Username":"${USER}","Secret":"${PASSWORD}"}' "$server"`,
      "else",
      '  echo "credentials not found in native keychain"; exit 1',
      "fi",
    ].join("\n") + "\n",
  );
  fs.chmodSync(file, 0o755);
}

/** Assert that a fetch run succeeded and stored every blob of the pushed image. */
function assertFetched(run: CliRun, cache: string, layerDigest: string): void {
  assert.equal(run.code, 0, run.stderr);
  const result = JSON.parse(run.stdout) as { layers: { digest: string }[] };
  assert.deepEqual(result.layers.map((layer) => layer.digest), [layerDigest]);
  const hex = layerDigest.slice("sha256:".length);
  const stored = fs.readFileSync(path.join(cache, "blobs", "sha256", hex));
  assert.equal(digestOf(stored), layerDigest);
}

describe("basic auth against the distribution registry", { skip }, () => {
  let dir = "";
  let registry: Distribution;
  let reference = "";
  let layerDigest = "";
  const authorization = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString("base64")}`;

  before(async () => {
    dir = tempDir("basic-auth");
    registry = await startDistribution({ env: await htpasswdEnv(dir, { [USER]: PASSWORD }) });
    const layer = layerFor("team/app");
    layerDigest = digestOf(layer.bytes);
    await pushImage(registry.url, "team/app", "1.0", [layer], {
      diffIds: [layer.diffId],
      headers: { authorization },
    });
    reference = `${registry.host}/team/app:1.0`;
  });

  after(async () => {
    await registry?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("registry rejects anonymous requests", async () => {
    const response = await fetch(`${registry.url}/v2/team/app/manifests/1.0`);
    await response.body?.cancel();
    assert.equal(response.status, 401);
    assert.match(response.headers.get("www-authenticate") ?? "", /^Basic /);
  });

  test("RegistryClient pulls with basic credentials", async () => {
    const client = new RegistryClient({
      credentials: staticCredentials({ username: USER, password: PASSWORD }),
    });
    const ref: ImageReference = { registry: registry.host, repository: "team/app", tag: "1.0" };

    const resolved = await client.resolve(ref, parsePlatform("linux/amd64"));
    const layer = await client.getBlob(ref, resolved.manifest.layers[0]);

    assert.equal(digestOf(layer), layerDigest);
  });

  test("RegistryClient reports a wrong password without it", async () => {
    const client = new RegistryClient({
      credentials: staticCredentials({ username: USER, password: "wrong-pw-4471" }),
    });
    const ref: ImageReference = { registry: registry.host, repository: "team/app", tag: "1.0" };

    await assert.rejects(client.getManifest(ref), (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.status, 401);
      assert.match(error.message, /rejected the credentials/);
      assert.ok(!error.message.includes("wrong-pw-4471"), error.message);
      return true;
    });
  });

  test("fetch reads --username and --password-stdin", async () => {
    const cache = path.join(dir, "cache-flags");
    const run = await runCliProcess(
      ["fetch", reference, "--cache", cache, "--username", USER, "--password-stdin", "--json"],
      { input: `${PASSWORD}\n`, env: isolatedEnv(dir) },
    );
    assertFetched(run, cache, layerDigest);
    assertNoSecrets(run, [PASSWORD]);
  });

  test("fetch reads OCISTAGE_USERNAME and OCISTAGE_PASSWORD", async () => {
    const cache = path.join(dir, "cache-env");
    const run = await runCliProcess(["fetch", reference, "--cache", cache, "--json"], {
      env: isolatedEnv(dir, { OCISTAGE_USERNAME: USER, OCISTAGE_PASSWORD: PASSWORD }),
    });
    assertFetched(run, cache, layerDigest);
    assertNoSecrets(run, [PASSWORD]);
  });

  test("fetch reads auths from docker config.json", async () => {
    const docker = path.join(dir, "docker-auths");
    fs.mkdirSync(docker);
    const auth = Buffer.from(`${USER}:${PASSWORD}`).toString("base64");
    fs.writeFileSync(
      path.join(docker, "config.json"),
      JSON.stringify({ auths: { [`http://${registry.host}`]: { auth } } }),
    );
    const cache = path.join(dir, "cache-config");
    const run = await runCliProcess(["fetch", reference, "--cache", cache, "--json"], {
      env: isolatedEnv(dir, { DOCKER_CONFIG: docker }),
    });
    assertFetched(run, cache, layerDigest);
    assertNoSecrets(run, [PASSWORD]);
  });

  test("fetch runs the credsStore helper", async () => {
    const docker = path.join(dir, "docker-store");
    fs.mkdirSync(docker);
    writeCredentialHelper(docker, "ocistagetest", registry.host);
    fs.writeFileSync(
      path.join(docker, "config.json"),
      JSON.stringify({ credsStore: "ocistagetest" }),
    );
    const cache = path.join(dir, "cache-store");
    const run = await runCliProcess(["fetch", reference, "--cache", cache, "--json"], {
      env: isolatedEnv(dir, {
        DOCKER_CONFIG: docker,
        PATH: `${docker}${path.delimiter}${process.env.PATH ?? ""}`,
      }),
    });
    assertFetched(run, cache, layerDigest);
    assertNoSecrets(run, [PASSWORD]);
  });

  test("fetch reports rejected credentials", async () => {
    const wrong = "wrong-pw-9350-never-print-me";
    const run = await runCliProcess(
      ["fetch", reference, "--cache", path.join(dir, "cache-wrong"), "--username", USER, "--password-stdin"],
      { input: wrong, env: isolatedEnv(dir) },
    );
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /authentication failed \(status 401\)/);
    assert.match(run.stderr, new RegExp(registry.host.replace(/\./g, "\\.")));
    assertNoSecrets(run, [wrong, Buffer.from(`${USER}:${wrong}`).toString("base64")]);
  });

  test("fetch without credentials says how to log in", async () => {
    const run = await runCliProcess(
      ["fetch", reference, "--cache", path.join(dir, "cache-none")],
      { env: isolatedEnv(dir) },
    );
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /authentication required \(status 401\)/);
    assert.match(run.stderr, /--password-stdin/);
  });
});

describe("token auth against the distribution registry", { skip }, () => {
  let dir = "";
  let tokens: TokenServer;
  let registry: Distribution;
  const digests = new Map<string, string>();

  before(async () => {
    dir = tempDir("token-auth");
    tokens = await startTokenServer(dir, {
      users: { [USER]: PASSWORD },
      refreshTokens: { [REFRESH_TOKEN]: USER },
      pull: { "": ["public/app"], [USER]: ["team/app", "public/app"] },
    });
    registry = await startDistribution({ env: tokens.registryEnv });
    for (const repository of ["team/app", "team/secret", "public/app"]) {
      const layer = layerFor(repository);
      digests.set(repository, digestOf(layer.bytes));
      const setupToken = tokens.sign([
        { type: "repository", name: repository, actions: ["pull", "push"] },
      ]);
      await pushImage(registry.url, repository, "1.0", [layer], {
        diffIds: [layer.diffId],
        headers: { authorization: `Bearer ${setupToken}` },
      });
    }
    tokens.issued.length = 0;
    tokens.requests.length = 0;
  });

  after(async () => {
    await registry?.close();
    await tokens?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const ref = (repository: string): ImageReference => ({
    registry: registry.host,
    repository,
    tag: "1.0",
  });

  test("RegistryClient pulls anonymously where allowed", async () => {
    const before = tokens.requests.length;
    const client = new RegistryClient();

    const resolved = await client.resolve(ref("public/app"), parsePlatform("linux/amd64"));
    const layer = await client.getBlob(ref("public/app"), resolved.manifest.layers[0]);

    assert.equal(digestOf(layer), digests.get("public/app"));
    const requests = tokens.requests.slice(before);
    assert.equal(requests.length, 1, "one token serves the manifest and the blobs");
    assert.equal(requests[0].authorization, undefined);
    assert.deepEqual(requests[0].scopes, ["repository:public/app:pull"]);
    assert.equal(new URL(requests[0].url).searchParams.get("service"), tokens.service);
  });

  test("RegistryClient gets tokens with credentials", async () => {
    const before = tokens.requests.length;
    const client = new RegistryClient({
      credentials: staticCredentials({ username: USER, password: PASSWORD }),
    });

    const resolved = await client.resolve(ref("team/app"), parsePlatform("linux/amd64"));
    const layer = await client.getBlob(ref("team/app"), resolved.manifest.layers[0]);

    assert.equal(digestOf(layer), digests.get("team/app"));
    const requests = tokens.requests.slice(before);
    assert.equal(requests.length, 1);
    assert.match(requests[0].authorization ?? "", /^Basic /);
  });

  test("RegistryClient explains insufficient_scope", async () => {
    const withCredentials = new RegistryClient({
      credentials: staticCredentials({ username: USER, password: PASSWORD }),
    });
    await assert.rejects(withCredentials.getManifest(ref("team/secret")), (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.status, 401);
      assert.match(error.message, /insufficient_scope/);
      assert.match(error.message, /"team\/secret"/);
      assert.match(error.message, /that the account may pull/);
      return true;
    });

    const anonymous = new RegistryClient();
    await assert.rejects(anonymous.getManifest(ref("team/app")), (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.match(error.message, /insufficient_scope/);
      assert.match(error.message, /docker login/);
      return true;
    });
  });

  test("fetch with --password-stdin prints no token", async () => {
    const cache = path.join(dir, "cache-flags");
    const run = await runCliProcess(
      ["fetch", `${registry.host}/team/app:1.0`, "--cache", cache, "--username", USER, "--password-stdin", "--json"],
      { input: PASSWORD, env: isolatedEnv(dir) },
    );
    assertFetched(run, cache, digests.get("team/app")!);
    assert.ok(tokens.issued.length > 0);
    assertNoSecrets(run, [PASSWORD, ...tokens.issued]);
  });

  test("fetch exchanges a docker config identitytoken", async () => {
    const docker = path.join(dir, "docker-identity");
    fs.mkdirSync(docker);
    fs.writeFileSync(
      path.join(docker, "config.json"),
      JSON.stringify({ auths: { [registry.host]: { identitytoken: REFRESH_TOKEN } } }),
    );
    const before = tokens.requests.length;
    const cache = path.join(dir, "cache-identity");
    const run = await runCliProcess(
      ["fetch", `${registry.host}/team/app:1.0`, "--cache", cache, "--json"],
      { env: isolatedEnv(dir, { DOCKER_CONFIG: docker }) },
    );
    assertFetched(run, cache, digests.get("team/app")!);
    assert.deepEqual(tokens.requests.slice(before).map((request) => request.method), ["POST"]);
    assertNoSecrets(run, [REFRESH_TOKEN, ...tokens.issued]);
  });

  test("fetch runs the credHelpers entry of the registry", async () => {
    const docker = path.join(dir, "docker-helpers");
    fs.mkdirSync(docker);
    writeCredentialHelper(docker, "ocistagehelper", registry.host);
    fs.writeFileSync(
      path.join(docker, "config.json"),
      JSON.stringify({ credHelpers: { [registry.host]: "ocistagehelper" } }),
    );
    const cache = path.join(dir, "cache-helpers");
    const run = await runCliProcess(
      ["fetch", `${registry.host}/team/app:1.0`, "--cache", cache, "--json"],
      {
        env: isolatedEnv(dir, {
          DOCKER_CONFIG: docker,
          PATH: `${docker}${path.delimiter}${process.env.PATH ?? ""}`,
        }),
      },
    );
    assertFetched(run, cache, digests.get("team/app")!);
    assertNoSecrets(run, [PASSWORD, ...tokens.issued]);
  });

  test("fetch reports insufficient_scope without secrets", async () => {
    const run = await runCliProcess(
      ["fetch", `${registry.host}/team/secret:1.0`, "--cache", path.join(dir, "cache-denied"), "--username", USER, "--password-stdin"],
      { input: PASSWORD, env: isolatedEnv(dir) },
    );
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /insufficient_scope/);
    assertNoSecrets(run, [PASSWORD, ...tokens.issued]);
  });
});
