/**
 * The npm package as users install it: `npm pack` builds dist/ (prepack),
 * the tarball is installed into a project outside the repository, and
 * `npx ocistage` (Node) and `bunx ocistage` (Bun) stage an image from
 * the real distribution registry on 127.0.0.1. The library entry point is
 * imported from the installed package as well.
 *
 * Node runs twice: the Node 22 that package.json installs from npm, and the
 * machine's own `node` (Node 20 on the machines this was written on, whose
 * `node:zlib` has no zstd, so the `fzstd` fallback decodes the zstd layer).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { buildTar, gzipBytes, type TarEntrySpec, zstdBytes } from "./fixtures/tar.ts";
import { type Distribution, digestOf, MEDIA, pushImage, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";

const skip = skipUnlessPrograms("docker-registry");

const REPO_ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN_DIR = path.join(REPO_ROOT, "node_modules", ".bin");
const REPOSITORY = "package/base";

/** What a child process produced. */
interface ProgramRun {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Run a program to completion with exactly the environment `env`; a non-zero
 * exit is returned, not thrown.
 *
 * NOTE: Deno 2.9's `node:child_process` adds the parent's variables to an
 * `env` option instead of replacing them, so the variables that childEnv()
 * drops would come back. `env -i` clears the environment on every runtime.
 */
function runProgram(program: string, args: string[], options: { cwd: string; env: Record<string, string> }): Promise<ProgramRun> {
  const assignments = Object.entries(options.env).map(([key, value]) => `${key}=${value}`);
  const envArgs = ["-i", ...assignments, program, ...args];
  return new Promise((resolve, reject) => {
    execFile("/usr/bin/env", envArgs, { cwd: options.cwd, timeout: 180_000, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== "number") {
        reject(new Error(`${program} ${args.join(" ")} failed to start: ${error.message}\n${stderr}`, { cause: error }));
        return;
      }
      resolve({ code: error ? Number(error.code) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/**
 * Return the environment with PATH set to `dirs` and without the variables
 * npm sets for scripts. `npm_*` would point a nested npm at this repository,
 * and bunx would run node shebangs with the node that `NODE` names.
 */
function childEnv(dirs: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value === undefined || key === "NODE" || key.toLowerCase().startsWith("npm_")) continue;
    env[key] = value;
  }
  env.PATH = dirs.join(path.delimiter);
  env.NO_COLOR = "1";
  return env;
}

/** PATH without the repository's node_modules/.bin and Bun's `node` shim, so `node` is the machine's. */
function machinePath(): string[] {
  return (process.env.PATH ?? "").split(path.delimiter).filter((dir) => {
    if (!dir) return false;
    if (path.resolve(dir).startsWith(REPO_ROOT)) return false;
    return !/bun-node/.test(dir);
  });
}

/** Create a directory whose only entry is `node`, linked to the Node 22 that package.json installs. */
function makeNode22Dir(parent: string): string {
  const binary = fs.realpathSync(path.join(BIN_DIR, "node"));
  const dir = path.join(parent, "node22-bin");
  fs.mkdirSync(dir);
  fs.symlinkSync(binary, path.join(dir, "node"));
  return dir;
}

/** Two layers: a gzip base, and a zstd layer with a whiteout, a symlink and a changed file. */
function imageLayers(): { bytes: Uint8Array; mediaType: string; diffId: string }[] {
  const base: TarEntrySpec[] = [
    { path: "etc/", type: "dir", mode: 0o755 },
    { path: "etc/hostname", content: "packaged\n" },
    { path: "etc/hosts", content: "127.0.0.1 localhost\n" },
    { path: "bin/", type: "dir", mode: 0o755 },
    { path: "bin/tool", content: "#!/bin/sh\necho v1\n", mode: 0o755 },
  ];
  const upper: TarEntrySpec[] = [
    { path: "etc/.wh.hosts", content: "" },
    { path: "bin/tool", content: "#!/bin/sh\necho v2\n", mode: 0o750 },
    { path: "bin/alias", type: "symlink", linkname: "tool" },
  ];
  const baseTar = buildTar(base);
  const upperTar = buildTar(upper);
  return [
    { bytes: gzipBytes(baseTar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(baseTar) },
    { bytes: zstdBytes(upperTar), mediaType: MEDIA.ociLayerZstd, diffId: digestOf(upperTar) },
  ];
}

/** Check a tree staged from `imageLayers()`. */
function assertStaged(target: string): void {
  assert.equal(fs.readFileSync(path.join(target, "etc/hostname"), "utf8"), "packaged\n");
  assert.equal(fs.existsSync(path.join(target, "etc/hosts")), false, "etc/hosts was whited out");
  assert.equal(fs.readFileSync(path.join(target, "bin/tool"), "utf8"), "#!/bin/sh\necho v2\n");
  assert.equal(fs.statSync(path.join(target, "bin/tool")).mode & 0o7777, 0o750);
  assert.equal(fs.readlinkSync(path.join(target, "bin/alias")), "tool");
}

describe("npm package installed from its tarball", { skip }, () => {
  let registry: Distribution;
  let work: string;
  let consumer: string;
  let tarball: string;
  let image: string;
  let node22Dir: string;

  before(async () => {
    registry = await startDistribution();
    const layers = imageLayers();
    await pushImage(registry.url, REPOSITORY, "1.0", layers, { diffIds: layers.map((layer) => layer.diffId) });
    image = `${registry.host}/${REPOSITORY}:1.0`;

    work = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-package-"));
    node22Dir = makeNode22Dir(work);
    const env = childEnv(process.env.PATH?.split(path.delimiter) ?? []);
    const pack = await runProgram("npm", ["pack", "--json", "--pack-destination", work], { cwd: REPO_ROOT, env });
    assert.equal(pack.code, 0, pack.stderr);
    const [packed] = JSON.parse(pack.stdout.slice(pack.stdout.indexOf("["))) as { filename: string; files: { path: string }[] }[];
    tarball = path.join(work, packed.filename);

    consumer = path.join(work, "consumer");
    fs.mkdirSync(consumer);
    fs.writeFileSync(path.join(consumer, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
    const install = await runProgram("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", tarball], { cwd: consumer, env });
    assert.equal(install.code, 0, install.stderr);
  });

  after(async () => {
    await registry?.close();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  test("tarball holds dist and no sources", async () => {
    const list = await runProgram("tar", ["-tzf", tarball], { cwd: work, env: childEnv(machinePath()) });
    assert.equal(list.code, 0, list.stderr);
    const files = list.stdout.trim().split("\n").sort();
    assert.deepEqual(files, [
      "package/README.md",
      "package/dist/cli.js",
      "package/dist/mod.js",
      "package/dist/ocistage.js",
      "package/package.json",
    ]);
  });

  test("installed bin is a node script", () => {
    const bin = path.join(consumer, "node_modules", ".bin", "ocistage");
    assert.ok(fs.lstatSync(bin).isSymbolicLink(), "npm links the bin into node_modules/.bin");
    const text = fs.readFileSync(bin, "utf8");
    assert.equal(text.split("\n")[0], "#!/usr/bin/env node");
    assert.ok(fs.statSync(bin).mode & 0o111, "the bin is executable");
  });

  test("npx ocistage stages on Node 22", async () => {
    const env = childEnv([node22Dir, ...machinePath()]);
    const version = await runProgram("node", ["--version"], { cwd: consumer, env });
    assert.match(version.stdout, /^v22\./);

    const target = path.join(work, "rootfs-node22");
    const cache = path.join(work, "cache-node22");
    const run = await runProgram("npx", ["ocistage", "stage", image, target, "--cache", cache, "--platform", "linux/amd64"], { cwd: consumer, env });
    assert.equal(run.code, 0, run.stderr);
    assertStaged(target);
  });

  test("npx ocistage stages on the machine's node", async () => {
    const env = childEnv(machinePath());
    const version = await runProgram("node", ["-p", "process.versions.bun ?? process.version"], { cwd: consumer, env });
    assert.match(version.stdout, /^v\d+\./, "node on the machine's PATH is Node.js");

    const target = path.join(work, "rootfs-machine-node");
    const cache = path.join(work, "cache-machine-node");
    const run = await runProgram("npx", ["ocistage", "stage", image, target, "--cache", cache, "--platform", "linux/amd64"], { cwd: consumer, env });
    assert.equal(run.code, 0, `node ${version.stdout.trim()}: ${run.stderr}`);
    assertStaged(target);
  });

  test("bunx ocistage stages on Bun", async () => {
    // With no `node` on PATH, bunx runs the bin's node shebang on Bun itself.
    const emptyDir = path.join(work, "empty-bin");
    fs.mkdirSync(emptyDir);
    const env = childEnv([emptyDir]);
    const target = path.join(work, "rootfs-bun");
    const cache = path.join(work, "cache-bun");
    const bunx = path.join(BIN_DIR, "bunx");
    const run = await runProgram(bunx, ["ocistage", "stage", image, target, "--cache", cache, "--platform", "linux/amd64"], { cwd: consumer, env });
    assert.equal(run.code, 0, run.stderr);
    assertStaged(target);
  });

  test("library import stages on Node and Bun", async () => {
    const script = path.join(consumer, "stage.mjs");
    fs.writeFileSync(
      script,
      [
        'import { stage } from "ocistage";',
        "const [image, target, cache] = process.argv.slice(2);",
        'const result = await stage(image, target, { cache, platform: "linux/amd64" });',
        "console.log(result.digest);",
        "",
      ].join("\n"),
    );
    const runtimes: [string, string, string[]][] = [
      ["node22", "node", [node22Dir]],
      ["bun", path.join(BIN_DIR, "bun"), []],
    ];
    for (const [name, program, extraPath] of runtimes) {
      const target = path.join(work, `rootfs-lib-${name}`);
      const cache = path.join(work, `cache-lib-${name}`);
      const env = childEnv([...extraPath, ...machinePath()]);
      const run = await runProgram(program, [script, image, target, cache], { cwd: consumer, env });
      assert.equal(run.code, 0, `${name}: ${run.stderr}`);
      assert.match(run.stdout, /^sha256:[0-9a-f]{64}\n$/, name);
      assertStaged(target);
    }
  });
});
