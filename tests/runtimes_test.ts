/**
 * The package metadata that lets each runtime install ocistage: deno.json
 * (JSR) and package.json (npm) must name the same version and dependencies,
 * and the test scripts must cover every runtime.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { spawnSync } from "node:child_process";

function readJson(name: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(new URL(`../${name}`, import.meta.url), "utf8"));
}

const denoJson = readJson("deno.json") as {
  name: string;
  version: string;
  license: string;
  exports: Record<string, string>;
  imports: Record<string, string>;
};
const packageJson = readJson("package.json") as {
  version: string;
  license: string;
  bin: Record<string, string>;
  exports: Record<string, string>;
  files: string[];
  dependencies: Record<string, string>;
  scripts: Record<string, string>;
};

test("deno.json and package.json share the version", () => {
  assert.equal(denoJson.version, packageJson.version);
  assert.equal(denoJson.license, packageJson.license);
});

test("deno.json imports map each npm dependency", () => {
  const expected = Object.entries(packageJson.dependencies).map(([name, range]) => [name, `npm:${name}@${range}`]);
  assert.deepEqual(Object.entries(denoJson.imports).sort(), expected.sort());
});

test("deno.json exports the library and CLI", () => {
  assert.deepEqual(denoJson.exports, { ".": "./mod.ts", "./cli": "./cli.ts" });
  for (const file of Object.values(denoJson.exports)) {
    assert.ok(fs.existsSync(new URL(`../${file}`, import.meta.url)), `${file} exists`);
  }
});

test("package.json points at the build", () => {
  assert.deepEqual(packageJson.bin, { ocistage: "dist/cli.js" });
  assert.deepEqual(packageJson.exports, { ".": "./dist/mod.js", "./cli": "./dist/cli.js" });
  assert.ok(packageJson.files.includes("dist/"));
  assert.match(packageJson.scripts.prepack, /scripts\/build\.mjs/, "npm pack builds dist/ first");
});

test("test scripts cover three runtimes", () => {
  assert.match(packageJson.scripts.test, /\bdeno test\b/);
  assert.match(packageJson.scripts["test:bun"], /\bbun test\b/);
  assert.match(packageJson.scripts["test:node"], /\bnode .*--test\b/);
  const ci = fs.readFileSync(new URL("../.ci/run", import.meta.url), "utf8");
  for (const command of ["npm test", "npm run test:bun", "npm run test:node"]) {
    assert.ok(ci.split("\n").includes(command), `.ci/run runs "${command}"`);
  }
});

test("deno task check runs the npm-installed Deno", () => {
  // deno task runs a bare `deno` from node_modules/.bin as an npm bin script,
  // which fails for the native binary that the deno package installs there.
  const root = new URL("..", import.meta.url).pathname;
  const result = spawnSync(path.join(root, "node_modules", ".bin", "deno"), ["task", "check"], { cwd: root, encoding: "utf8", env: { ...process.env, NO_COLOR: "1" } });
  assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
  assert.match(result.stderr, /Check .*cli\.ts/);
});
