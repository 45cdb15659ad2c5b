// Build dist/ with esbuild. Node refuses to strip types from files inside
// node_modules, so the npm package ships JavaScript:
//
//   dist/mod.js       the library for Node and Bun, importing its npm packages
//   dist/cli.js       the `ocistage` bin with a node shebang, importing the same
//   dist/ocistage.js  the library as one self-contained ES module for `import`
//                     from a URL (Deno). It inlines the npm packages, so only
//                     `node:` built-ins remain imports.
//
// Each carries the layer decoder's worker (src/layer/decode-worker.ts) as
// text, bundled self-contained like dist/ocistage.js, and starts it from a
// blob URL on Deno. So no bundle needs a second file next to it.
//
// Usage: node scripts/build.mjs [--outdir DIR] (npm run build; the default
// DIR is dist/). Runs on Node, Deno and Bun.
import * as fs from "node:fs";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import * as esbuild from "esbuild";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { values } = parseArgs({ options: { outdir: { type: "string" } } });
const outdir = path.resolve(values.outdir ?? path.join(root, "dist"));

/** Options every bundle shares: ES modules for current runtimes. */
const common = {
  absWorkingDir: root,
  bundle: true,
  format: "esm",
  platform: "node",
  target: "es2022",
  logLevel: "warning",
  legalComments: "none",
};

fs.rmSync(outdir, { recursive: true, force: true });

// The worker first, so that every bundle below can carry its text.
const worker = await esbuild.build({
  ...common,
  entryPoints: ["src/layer/decode-worker.ts"],
  platform: "neutral",
  mainFields: ["module", "main"],
  external: ["node:*"],
  write: false,
});
common.define = { OCISTAGE_DECODE_WORKER: JSON.stringify(worker.outputFiles[0].text) };

await esbuild.build({
  ...common,
  entryPoints: { mod: "mod.ts" },
  outdir,
  packages: "external",
});

// cli.ts starts with a Deno shebang, but the npm bin needs node's. esbuild
// keeps the entry's shebang line, so the build replaces it.
const cli = await esbuild.build({
  ...common,
  entryPoints: { cli: "cli.ts" },
  outdir,
  packages: "external",
  write: false,
});
for (const file of cli.outputFiles) {
  const text = file.text.replace(/^#![^\n]*\n/, "");
  fs.writeFileSync(file.path, `#!/usr/bin/env node\n${text}`, { mode: 0o755 });
}

// The "neutral" platform with ESM-first resolution takes each package's ES
// module build. yaml's "node" build is CommonJS and would need `require`,
// which an ES module loaded from a URL does not have.
await esbuild.build({
  ...common,
  entryPoints: { ocistage: "mod.ts" },
  outdir,
  platform: "neutral",
  mainFields: ["module", "main"],
  external: ["node:*"],
});

for (const name of fs.readdirSync(outdir).sort()) {
  const size = fs.statSync(path.join(outdir, name)).size;
  console.log(`${path.join(path.relative(root, outdir), name)}  ${(size / 1024).toFixed(1)} KiB`);
}
