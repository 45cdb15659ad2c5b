#!/usr/bin/env -S deno run -A
/**
 * The ocistage command line: `track`, `fetch`, `stage`, `export` and
 * `inspect`. Exit codes: 0 success, 1 runtime failure, 2 usage error.
 *
 * @module
 */
import * as fs from "node:fs";
import { fileURLToPath } from "node:url";
import { runCli } from "./src/cli/main.ts";

export { runCli };

function invokedDirectly(): boolean {
  const main = (import.meta as ImportMeta & { main?: boolean }).main;
  if (main !== undefined) return main;
  const script = globalThis.process?.argv[1];
  if (!script) return false;
  try {
    return fs.realpathSync(script) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  const process = globalThis.process;
  process.exitCode = await runCli(process.argv.slice(2), {
    stdout: process.stdout,
    stderr: process.stderr,
    stdin: process.stdin,
    env: process.env,
  });
}
