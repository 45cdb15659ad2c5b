/**
 * Importing ocistage from a URL. The build's dist/ocistage.js is served over
 * HTTP on 127.0.0.1. A script in a directory outside the repository, with no
 * deno.json, package.json or node_modules of its own, imports it under
 * `deno run` and stages an image from the real distribution registry.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { buildTar, gzipBytes, type TarEntrySpec, zstdBytes } from "./fixtures/tar.ts";
import { type Distribution, digestOf, MEDIA, pushImage, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { currentRuntime } from "./fixtures/cli.ts";

const skip = skipUnlessPrograms("docker-registry");

const REPO_ROOT = fileURLToPath(new URL("..", import.meta.url));
const REPOSITORY = "url/base";

/** What a child process produced. */
interface ProgramRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a program to completion; a non-zero exit is returned, not thrown. */
function runProgram(program: string, args: string[], options: { cwd: string; env?: Record<string, string> }): Promise<ProgramRun> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, NO_COLOR: "1", ...options.env };
    execFile(program, args, { cwd: options.cwd, env, timeout: 180_000, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== "number") {
        reject(new Error(`${program} ${args.join(" ")} failed to start: ${error.message}\n${stderr}`, { cause: error }));
        return;
      }
      resolve({ code: error ? Number(error.code) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** Return the command that runs a script file on the runtime running the tests. */
function scriptCommand(script: string): [string, string[]] {
  const runtime = currentRuntime();
  if (runtime === "deno") return [process.execPath, ["run", "-A", script]];
  return [process.execPath, [script]];
}

/** Return the Deno binary: this process on Deno, else the one package.json installs. */
function denoProgram(): string {
  if (currentRuntime() === "deno") return process.execPath;
  return path.join(REPO_ROOT, "node_modules", ".bin", "deno");
}

/** A static file server on 127.0.0.1 that records every requested path. */
interface FileServer {
  url: string;
  host: string;
  requests: string[];
  close(): Promise<void>;
}

function serveDirectory(dir: string): Promise<FileServer> {
  const requests: string[] = [];
  const server = http.createServer((request, response) => {
    const name = new URL(request.url ?? "/", "http://127.0.0.1").pathname;
    requests.push(name);
    const file = path.join(dir, path.basename(name));
    if (!name.endsWith(".js") || !fs.existsSync(file)) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": "text/javascript; charset=utf-8" });
    response.end(fs.readFileSync(file));
  });
  return new Promise((resolve, reject) => {
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as AddressInfo).port;
      resolve({
        url: `http://127.0.0.1:${port}`,
        host: `127.0.0.1:${port}`,
        requests,
        close: () => new Promise((done) => server.close(() => done())),
      });
    });
  });
}

/** Two layers: a gzip base, and a zstd layer that whites out a file and adds a symlink. */
function imageLayers(): { bytes: Uint8Array; mediaType: string; diffId: string }[] {
  const base: TarEntrySpec[] = [
    { path: "etc/", type: "dir", mode: 0o755 },
    { path: "etc/hostname", content: "from-url\n" },
    { path: "etc/hosts", content: "127.0.0.1 localhost\n" },
  ];
  const upper: TarEntrySpec[] = [
    { path: "etc/.wh.hosts", content: "" },
    { path: "etc/motd", content: "hello\n", mode: 0o640 },
    { path: "etc/name", type: "symlink", linkname: "hostname" },
  ];
  const baseTar = buildTar(base);
  const upperTar = buildTar(upper);
  return [
    { bytes: gzipBytes(baseTar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(baseTar) },
    { bytes: zstdBytes(upperTar), mediaType: MEDIA.ociLayerZstd, diffId: digestOf(upperTar) },
  ];
}

const CONSUMER = `import { stage } from "MODULE_URL";

const [image, target, cache] = Deno.args;
const result = await stage(image, target, { cache, platform: "linux/amd64" });
console.log(result.digest);
`;

describe("import from a URL under deno run", { skip }, () => {
  let registry: Distribution;
  let files: FileServer;
  let work: string;
  let image: string;
  let manifestDigest: string;

  before(async () => {
    registry = await startDistribution();
    const layers = imageLayers();
    const pushed = await pushImage(registry.url, REPOSITORY, "1.0", layers, { diffIds: layers.map((layer) => layer.diffId) });
    image = `${registry.host}/${REPOSITORY}:1.0`;
    manifestDigest = pushed.digest;

    work = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-url-"));
    const outdir = path.join(work, "dist");
    const [program, args] = scriptCommand(path.join(REPO_ROOT, "scripts", "build.mjs"));
    const build = await runProgram(program, [...args, "--outdir", outdir], { cwd: REPO_ROOT });
    assert.equal(build.code, 0, build.stderr);
    files = await serveDirectory(outdir);
  });

  after(async () => {
    await files?.close();
    await registry?.close();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  test("bundle imports only node: built-ins", () => {
    const text = fs.readFileSync(path.join(work, "dist", "ocistage.js"), "utf8");
    const specifiers = [...text.matchAll(/^import\s[^;]*?from\s+"([^"]+)"/gm)].map((match) => match[1]);
    assert.ok(specifiers.length > 0, "the bundle imports node: built-ins");
    for (const specifier of specifiers) assert.match(specifier, /^node:/, `import of "${specifier}"`);
    assert.doesNotMatch(text, /\brequire\(/, "the bundle calls require()");
  });

  test("deno run stages through the URL", async () => {
    const consumerDir = path.join(work, "consumer");
    fs.mkdirSync(consumerDir);
    const script = path.join(consumerDir, "consumer.ts");
    fs.writeFileSync(script, CONSUMER.replace("MODULE_URL", `${files.url}/ocistage.js`));
    const target = path.join(consumerDir, "rootfs");
    const cache = path.join(consumerDir, "cache");

    const run = await runProgram(
      denoProgram(),
      [
        "run",
        `--allow-import=${files.host}`,
        `--allow-net=${registry.host}`,
        "--allow-read",
        "--allow-write",
        "--allow-sys=uid",
        "--no-config",
        script,
        image,
        target,
        cache,
      ],
      { cwd: consumerDir, env: { DENO_DIR: path.join(work, "deno-dir"), DENO_NO_UPDATE_CHECK: "1" } },
    );
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, `${manifestDigest}\n`);
    assert.deepEqual(files.requests, ["/ocistage.js"], "Deno fetched the one bundle and nothing else");

    assert.equal(fs.readFileSync(path.join(target, "etc/hostname"), "utf8"), "from-url\n");
    assert.equal(fs.existsSync(path.join(target, "etc/hosts")), false, "etc/hosts was whited out");
    assert.equal(fs.readFileSync(path.join(target, "etc/motd"), "utf8"), "hello\n");
    assert.equal(fs.statSync(path.join(target, "etc/motd")).mode & 0o7777, 0o640);
    assert.equal(fs.readlinkSync(path.join(target, "etc/name")), "hostname");
    assert.deepEqual(fs.readdirSync(consumerDir).sort(), ["cache", "consumer.ts", "rootfs"], "no node_modules or lock file appeared");
  });
});
