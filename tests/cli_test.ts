/**
 * The CLI in-process through runCli with captured streams, against local
 * images and in-process registries on 127.0.0.1; and in a child process
 * against the real distribution registry.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { type CliIo, runCli } from "../src/cli/main.ts";
import { HELP } from "../src/cli/help.ts";
import { buildTar, gzipBytes } from "./fixtures/tar.ts";
import { MemoryRegistry } from "./fixtures/registry.ts";
import { buildImage, writeOciLayout } from "./fixtures/local_images.ts";
import { type Distribution, MEDIA, pushImage, run, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { runCliProcess } from "./fixtures/cli.ts";
import { tempDir } from "./fixtures/temp.ts";

/** Captured output of one in-process run. */
interface Captured {
  code: number;
  stdout: string;
  stderr: string;
  bytes: Uint8Array;
}

/** Run the CLI in-process with captured streams. */
async function cli(args: string[], options: { stdoutIsTTY?: boolean; stdin?: string } = {}): Promise<Captured> {
  const out: Uint8Array[] = [];
  let stderr = "";
  const encoder = new TextEncoder();
  const io: CliIo = {
    stdout: { isTTY: options.stdoutIsTTY, write: (chunk) => void out.push(typeof chunk === "string" ? encoder.encode(chunk) : chunk.slice()) },
    stderr: { isTTY: false, write: (text) => void (stderr += text) },
    stdin: (async function* () {
      if (options.stdin !== undefined) yield options.stdin;
    })(),
    env: {},
  };
  const code = await runCli(args, io);
  const bytes = new Uint8Array(out.reduce((sum, chunk) => sum + chunk.byteLength, 0));
  let offset = 0;
  for (const chunk of out) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return { code, stdout: new TextDecoder().decode(bytes), stderr, bytes };
}

function layout(): { dir: string; image: ReturnType<typeof buildImage> } {
  const dir = tempDir("cli-layout");
  const image = buildImage([[{ path: "etc/", type: "dir" }, { path: "etc/name", content: "layout\n" }]]);
  writeOciLayout(dir, [{ name: "1.0", images: [image] }]);
  return { dir, image };
}

describe("usage errors exit with 2", () => {
  const cases: [string, string[], RegExp][] = [
    ["no command", [], /usage: ocistage/],
    ["unknown command", ["pull", "alpine"], /unknown command "pull": use one of track, fetch, stage, export, inspect, key/],
    ["unknown flag", ["track", "alpine", "--bogus"], /unknown option "--bogus"/],
    ["key with --platform", ["key", "base.bst", "--platform", "linux/arm64"], /--platform does not apply to key/],
    ["misspelt flag", ["track", "alpine", "--platfrom", "linux/amd64"], /unknown option "--platfrom": did you mean --platform\?/],
    ["missing operand", ["stage", "alpine"], /"stage" takes IMAGE\|ELEMENT DIR, got 1 argument\(s\): see ocistage stage --help/],
    ["output on track", ["track", "alpine", "-o", "x"], /-o\/--output applies to export only/],
    ["tags on fetch", ["fetch", "alpine", "--tags"], /--tags applies to inspect only/],
    ["decode worker on track", ["track", "alpine", "--decode-worker"], /--decode-worker applies to stage and export only/],
    ["key of an image reference", ["key", "127.0.0.1:5000/team/base:1.0"], /key takes a BuildStream element file \(\.bst, \.yml or \.yaml\), not "127\.0\.0\.1:5000\/team\/base:1\.0"/],
    ["bad concurrency", ["fetch", "alpine", "--concurrency", "0"], /invalid --concurrency "0": pass a whole number from 1 to 64/],
    ["bad reference", ["track", "Not A Reference"], /Not A Reference/],
    ["export to a terminal", ["export", "alpine"], /standard output is a terminal: pass -o FILE/],
    ["export -o - to a terminal", ["export", "alpine", "-o", "-"], /standard output is a terminal: pass -o FILE/],
  ];
  for (const [name, args, message] of cases) {
    test(`runCli() ${name}`, async () => {
      const result = await cli(args, { stdoutIsTTY: true });
      assert.equal(result.code, 2, result.stderr);
      assert.match(result.stderr, message);
    });
  }
});

test("runCli() help covers every command and flag", async () => {
  const main = await cli(["--help"]);
  assert.equal(main.code, 0);
  for (const command of ["track", "fetch", "stage", "export", "inspect", "key"]) {
    assert.match(main.stdout, new RegExp(`ocistage ${command} `), `main help lists ${command}`);
    const own = await cli([command, "--help"]);
    assert.equal(own.code, 0);
    assert.equal(own.stdout, HELP[command]);
    assert.match(own.stdout, new RegExp(`^Usage: ocistage ${command} `));
  }
  const flags = ["--platform", "--cache", "--username", "--password-stdin", "--plain-http", "--registry-url", "--concurrency", "--hasher", "--allow-foreign-urls", "--mirror", "--mirrors-file", "--json", "--quiet"];
  for (const flag of flags) assert.ok(HELP.stage.includes(flag), `stage help documents ${flag}`);
  assert.match(HELP.export, /-o, --output FILE/);
  assert.match(HELP.inspect, /--tags/);
  assert.match(HELP.main, /Exit codes: 0 success, 1 failure, 2 usage error/);
  assert.match(HELP.main, /default 3/, "defaults are stated");
});

test("runCli() track and inspect read an OCI layout", async () => {
  const { dir, image } = layout();
  const tracked = await cli(["track", `oci:${dir}:1.0`]);
  assert.equal(tracked.code, 0, tracked.stderr);
  assert.equal(tracked.stdout, `${image.manifest.digest}\n`);

  const json = await cli(["track", `oci:${dir}:1.0`, "--json"]);
  assert.equal(JSON.parse(json.stdout).source, `oci:${dir}:1.0`);

  const inspected = await cli(["inspect", `oci:${dir}:1.0`, "--json", "--tags", "--platform", "linux/amd64"]);
  assert.equal(inspected.code, 0, inspected.stderr);
  const result = JSON.parse(inspected.stdout);
  assert.equal(result.manifest.digest, image.manifest.digest);
  assert.equal(result.config.document.config.WorkingDir, "/");
  assert.deepEqual(result.tags, ["1.0"]);

  const text = await cli(["inspect", `oci:${dir}:1.0`, "--platform", "linux/amd64"]);
  assert.match(text.stdout, /^Image: +oci:.*:1\.0$/m);
  assert.match(text.stdout, /^Cmd: +\["\/bin\/sh"\]$/m);
});

test("runCli() export writes a tar archive to -o FILE and to stdout", async () => {
  const { dir } = layout();
  const work = tempDir("cli-export");
  const file = path.join(work, "rootfs.tar");
  const written = await cli(["export", `oci:${dir}:1.0`, "-o", file, "--cache", path.join(work, "cache"), "--platform", "linux/amd64"]);
  assert.equal(written.code, 0, written.stderr);
  assert.equal(written.stdout, "");
  assert.match(written.stderr, /exported oci:.* entries to .*rootfs\.tar/);
  assert.deepEqual(run("tar", ["-tf", file]).trim().split("\n"), ["etc/", "etc/name"]);

  const piped = await cli(["export", `oci:${dir}:1.0`, "--cache", path.join(work, "cache"), "--quiet", "--platform", "linux/amd64"]);
  assert.equal(piped.code, 0, piped.stderr);
  assert.equal(piped.stderr, "", "--quiet silences progress");
  assert.deepEqual(Buffer.from(piped.bytes), fs.readFileSync(file), "the same archive either way");
});

test("runCli() failure exits with 1 and names the value and fix", async () => {
  const { dir } = layout();
  const result = await cli(["stage", `oci:${dir}:2.0`, path.join(tempDir("cli-fail"), "rootfs")]);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^ocistage: no image named "2\.0" in "oci:.*:2\.0": the layout offers "1\.0"; pass one of them after the colon\n$/);
});

describe("element files", () => {
  let registry: MemoryRegistry;
  let server: { host: string; url: string; close(): Promise<void> };
  let base: string;
  let tools: string;
  before(async () => {
    registry = new MemoryRegistry();
    server = await registry.listen();
    const layerOf = (text: string) => ({ bytes: gzipBytes(buildTar([{ path: "name", content: text }])), mediaType: MEDIA.ociLayerGzip });
    base = registry.pushImage("team/base", "1.0", [layerOf("base\n")]).manifest.digest;
    tools = registry.pushImage("team/tools", "2.0", [layerOf("tools\n")]).manifest.digest;
  });
  after(async () => await server?.close());

  function element(sources: string): string {
    const file = path.join(tempDir("cli-element"), "image.bst");
    fs.writeFileSync(file, `kind: import\n# keep this comment\nsources:\n${sources}`);
    return file;
  }

  test("track writes the ref of each docker source", async () => {
    const file = element(
      `- kind: docker\n  registry-url: ${server.url}\n  image: team/base\n  track: "1.0"\n` +
        `- kind: local\n  path: files\n` +
        `- kind: docker\n  registry-url: ${server.url}\n  image: team/tools\n  track: "2.0"\n  directory: tools\n`,
    );
    const before = fs.readFileSync(file, "utf8");
    const result = await cli(["track", file, "--platform", "linux/amd64"]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `${base}\n${tools}\n`);

    const after = fs.readFileSync(file, "utf8");
    const added = after.split("\n").filter((line) => !before.split("\n").includes(line));
    assert.deepEqual(added, [`  ref: ${base.slice(7)}`, `  ref: ${tools.slice(7)}`], "only the two ref lines are new");
    assert.match(after, /# keep this comment/);

    const keys = await cli(["key", file]);
    assert.equal(keys.code, 0, keys.stderr);
    assert.deepEqual(keys.stdout.trim().split("\n").map((line) => JSON.parse(line)), [
      [server.url, "team/base", base],
      [server.url, "team/tools", tools],
    ]);

    const inspected = await cli(["inspect", file, "--json", "--platform", "linux/amd64"]);
    assert.equal(inspected.code, 0, inspected.stderr);
    const sources = JSON.parse(inspected.stdout).sources;
    assert.deepEqual(sources.map((source: { uniqueKey: string[] }) => source.uniqueKey), [
      [server.url, "team/base", base],
      [server.url, "team/tools", tools],
    ]);
  });

  test("export and inspect read an element's pinned image", async () => {
    const file = element(`- kind: docker\n  registry-url: ${server.url}\n  image: team/base\n  ref: ${base.slice(7)}\n  architecture: amd64\n  os: linux\n`);
    const work = tempDir("cli-element-export");
    const archive = path.join(work, "rootfs.tar");
    const exported = await cli(["export", file, "-o", archive, "--cache", path.join(work, "cache")]);
    assert.equal(exported.code, 0, exported.stderr);
    assert.equal(run("tar", ["-xOf", archive, "name"]), "base\n");

    const inspected = await cli(["inspect", file]);
    assert.equal(inspected.code, 0, inspected.stderr);
    assert.match(inspected.stdout, new RegExp(`^Image: +${server.host}/team/base@${base}$`, "m"));
    assert.match(inspected.stdout, /^Platform: +linux\/amd64$/m, "the element's os and architecture are used");
  });

  test("key without a ref names the file, line and key", async () => {
    const file = element(`- kind: docker\n  registry-url: ${server.url}\n  image: team/base\n  track: "1.0"\n`);
    const result = await cli(["key", file]);
    assert.equal(result.code, 1);
    assert.match(result.stderr, new RegExp(`"${file.replaceAll("/", "\\/")}" line 4 key "ref": docker source "team/base" has no ref`));
  });

  test("an invalid element names the file, line and key", async () => {
    const file = element(`- kind: docker\n  image: team/base\n  track: "1.0"\n  tag: latest\n`);
    const result = await cli(["track", file]);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /image\.bst" line 7/);
    assert.match(result.stderr, /"tag"/);
  });

  test("element sources use mirrors from the command line", async () => {
    const mirror = new MemoryRegistry();
    const mirrorServer = await mirror.listen();
    const upstream = new MemoryRegistry();
    const upstreamServer = await upstream.listen();
    try {
      const layerBytes = gzipBytes(buildTar([{ path: "name", content: "mirrored\n" }]));
      const pushed = mirror.pushImage("team/app", "1.0", [{ bytes: layerBytes, mediaType: MEDIA.ociLayerGzip }]);
      const file = element(
        `- kind: docker\n  registry-url: ${upstreamServer.url}\n  image: team/app\n  ref: ${pushed.manifest.digest.slice(7)}\n`,
      );
      const target = path.join(tempDir("cli-mirror"), "rootfs");
      const args = ["stage", file, target, "--cache", tempDir("cli-mirror-cache"), "--platform", "linux/amd64"];
      const result = await cli([...args, "--mirror", `${upstreamServer.host}=${mirrorServer.url}`]);
      assert.equal(result.code, 0, result.stderr);
      assert.equal(fs.readFileSync(path.join(target, "name"), "utf8"), "mirrored\n");
      assert.ok(mirror.log.some((entry) => entry.path.includes("/blobs/")), "blobs came from the mirror");
    } finally {
      await mirrorServer.close();
      await upstreamServer.close();
    }
  });
});

const skip = skipUnlessPrograms("docker-registry");

describe("CLI process against the distribution registry", { skip }, () => {
  let registry: Distribution;
  before(async () => {
    registry = await startDistribution();
  });
  after(async () => await registry?.close());

  test("inspect --tags lists the repository's tags", async () => {
    const layer = { bytes: gzipBytes(buildTar([{ path: "a", content: "a\n" }])), mediaType: MEDIA.ociLayerGzip };
    for (const tag of ["1.0", "1.1", "latest"]) await pushImage(registry.url, "team/tagged", tag, [layer]);

    const listed = await runCliProcess(["inspect", `${registry.host}/team/tagged:1.0`, "--tags", "--json", "--platform", "linux/amd64"]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.deepEqual(JSON.parse(listed.stdout).tags.sort(), ["1.0", "1.1", "latest"]);

    const missing = await runCliProcess(["inspect", `${registry.host}/team/tagged:2.0`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /tag "2\.0" not found in ".*team\/tagged:2\.0": the repository has tags .*"1\.1".*; pass one of them/);
    assert.match(missing.stderr, /caused by: manifest unknown/);

    const usage = await runCliProcess(["inspect"]);
    assert.equal(usage.code, 2);
  });
});
