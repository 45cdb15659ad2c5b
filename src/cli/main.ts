/**
 * Argument parsing, command dispatch and error reporting for the CLI.
 * `runCli` never exits the process: it returns the exit code, so tests can
 * run it in-process.
 *
 * @module
 */
import * as fs from "node:fs";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { ElementError, InvalidReferenceError } from "../errors.ts";
import { parseElement, setRef } from "../element.ts";
import { DockerSource } from "../source.ts";
import { fetchImage, type FetchOptions, stage, type StageOptions, track } from "../stage.ts";
import { exportTar } from "../export.ts";
import { inspect, listTags } from "../inspect.ts";
import { formatReference, referenceFromRegistryUrl } from "../reference.ts";
import { formatInspect, outputStream, writableFor } from "./output.ts";
import { addMirrorFlag, mergeMirrors, type MirrorMap, mirrorHosts, parseMirrorsFile } from "../mirrors.ts";
import { chainCredentials, credentialsExcept, dockerConfigCredentials, environmentCredentials } from "../registry/auth.ts";
import { ProgressReporter } from "./progress.ts";
import { HELP, USAGE } from "./help.ts";

/** The streams and environment the CLI uses. */
export interface CliIo {
  /** Receives results; `export` writes binary chunks and waits for "drain" when `write` returns false. */
  stdout: { write(chunk: string | Uint8Array): unknown; isTTY?: boolean; once?(event: "drain", listener: () => void): unknown };
  stderr: { write(text: string): unknown; isTTY?: boolean; columns?: number };
  stdin?: AsyncIterable<Uint8Array | string>;
  env?: Record<string, string | undefined>;
}

/** A mistake in the command line: exit code 2. */
export class UsageError extends TypeError {
  override name = "UsageError";
}

const OPTIONS = {
  platform: { type: "string" },
  cache: { type: "string" },
  username: { type: "string" },
  "password-stdin": { type: "boolean" },
  "plain-http": { type: "boolean" },
  "registry-url": { type: "string" },
  concurrency: { type: "string" },
  hasher: { type: "string" },
  "decode-worker": { type: "boolean" },
  "write-hidden": { type: "boolean" },
  "allow-foreign-urls": { type: "boolean" },
  mirror: { type: "string", multiple: true },
  "mirrors-file": { type: "string" },
  output: { type: "string", short: "o" },
  tags: { type: "boolean" },
  json: { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
} as const satisfies ParseArgsConfig["options"];

type Flags = {
  [K in keyof typeof OPTIONS]?: (typeof OPTIONS)[K] extends { multiple: true } ? string[]
    : (typeof OPTIONS)[K]["type"] extends "string" ? string
    : boolean;
};

const COMMANDS = ["track", "fetch", "stage", "export", "inspect", "key"] as const;
type Command = (typeof COMMANDS)[number];

/** Run the CLI with `argv` (without the program name) and return the exit code. */
export async function runCli(argv: string[], io: CliIo): Promise<number> {
  let flags: Flags;
  let positionals: string[];
  try {
    const parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
    flags = parsed.values as Flags;
    positionals = parsed.positionals;
  } catch (error) {
    io.stderr.write(`ocistage: ${describeArgumentError(error as Error)}\n${USAGE}`);
    return 2;
  }

  if (flags.version) {
    io.stdout.write(`ocistage ${VERSION}\n`);
    return 0;
  }
  const [command, ...operands] = positionals;
  if (flags.help || command === "help") {
    io.stdout.write(HELP[(command === "help" ? operands[0] : command) as Command] ?? HELP.main);
    return 0;
  }
  if (!command) {
    io.stderr.write(USAGE);
    return 2;
  }
  if (!COMMANDS.includes(command as Command)) {
    io.stderr.write(`ocistage: unknown command "${command}": use one of ${COMMANDS.join(", ")}\n${USAGE}`);
    return 2;
  }

  const reporter = new ProgressReporter(io.stderr, { quiet: flags.quiet === true, json: flags.json === true });
  try {
    return await dispatch(command as Command, operands, flags, io, reporter);
  } catch (error) {
    reporter.stop();
    io.stderr.write(`ocistage: ${describeError(error)}\n`);
    return isUsageError(error) ? 2 : 1;
  } finally {
    reporter.stop();
  }
}

/** Reword parseArgs's unknown-option message, suggesting the closest known option. */
function describeArgumentError(error: Error): string {
  const unknown = /^Unknown option '(-{1,2}[^']*)'/.exec(error.message);
  if (!unknown) return error.message;
  const given = unknown[1].replace(/^-+/, "");
  const names = Object.keys(OPTIONS);
  const closest = names
    .map((name) => ({ name, distance: editDistance(given, name) }))
    .sort((a, b) => a.distance - b.distance)[0];
  const hint = closest && closest.distance <= 2 ? `did you mean --${closest.name}? ` : "";
  return `unknown option "${unknown[1]}": ${hint}run "ocistage --help" for the options`;
}

/** Levenshtein distance between two short strings. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

const VERSION = "0.1.0";

function isUsageError(error: unknown): boolean {
  return error instanceof UsageError || error instanceof InvalidReferenceError;
}

/** Render an error and its causes as one line each, innermost last. */
function describeError(error: unknown): string {
  const lines: string[] = [];
  let current: unknown = error;
  for (let depth = 0; current !== undefined && depth < 8; depth++) {
    if (current instanceof Error) {
      if (!lines.some((line) => line.includes(current instanceof Error ? current.message : ""))) {
        lines.push(current.message);
      }
      current = current.cause;
    } else {
      lines.push(String(current));
      break;
    }
  }
  return lines.join("\n  caused by: ");
}

async function dispatch(command: Command, operands: string[], flags: Flags, io: CliIo, reporter: ProgressReporter): Promise<number> {
  const wanted = command === "stage" ? 2 : 1;
  if (operands.length !== wanted) {
    const forms: Partial<Record<Command, string>> = { stage: "IMAGE|ELEMENT DIR", key: "ELEMENT" };
    const form = forms[command] ?? "IMAGE|ELEMENT";
    throw new UsageError(`"${command}" takes ${form}, got ${operands.length} argument(s): see ocistage ${command} --help`);
  }
  checkCommandFlags(command, flags, io);
  const options = await pullOptions(flags, io, reporter);
  const input = operands[0];

  if (command === "key" && !isElementPath(input)) {
    throw new UsageError(`key takes a BuildStream element file (.bst, .yml or .yaml), not "${input}"`);
  }
  if (command === "key" || isElementPath(input)) return await runElement(command, input, operands[1], flags, options, io, reporter);

  if (flags["registry-url"]) throw new UsageError(`--registry-url applies to element files only; put the registry in the image reference "${input}"`);
  if (command === "export") return await runExport(input, flags, options, io, reporter);
  if (command === "inspect" && flags.tags && !namesOneImage(input)) {
    // Only the repository or layout is named, so list its tags without picking one.
    const tags = await listTags(input, options);
    io.stdout.write(flags.json ? JSON.stringify({ source: input, tags }) + "\n" : tags.map((tag) => `${tag}\n`).join(""));
    return 0;
  }
  if (command === "inspect") {
    const result = await inspect(input, { ...options, tags: flags.tags === true });
    io.stdout.write(flags.json ? JSON.stringify(result) + "\n" : formatInspect(result));
    return 0;
  }
  if (command === "track") {
    const result = await track(input, options);
    io.stdout.write(flags.json ? JSON.stringify(trackJson(result)) + "\n" : `${result.digest}\n`);
  } else if (command === "fetch") {
    const result = await fetchImage(input, options);
    io.stdout.write(flags.json ? JSON.stringify(fetchJson(result)) + "\n" : `${result.digest}\n`);
  } else {
    const result = await stage(input, operands[1], options);
    if (flags.json) io.stdout.write(JSON.stringify({ ...fetchJson(result), target: result.target }) + "\n");
    reporter.finish(`staged ${result.source} (${result.digest}) into ${operands[1]}`);
  }
  return 0;
}

/**
 * Return true when `input` names one image: a registry reference with a tag
 * or digest, or a local source with a name after the path. A bare
 * repository or layout directory names a set of tags.
 */
function namesOneImage(input: string): boolean {
  const local = /^(oci|docker-archive):(.*)$/.exec(input);
  if (local) return local[2].includes(":");
  const lastComponent = input.slice(input.lastIndexOf("/") + 1);
  return lastComponent.includes(":") || lastComponent.includes("@");
}

/** Reject flags that the command does not use, naming the command that does. */
function checkCommandFlags(command: Command, flags: Flags, io: CliIo): void {
  if (flags.output !== undefined && command !== "export") {
    throw new UsageError(`-o/--output applies to export only; "${command}" writes to standard output`);
  }
  if (flags.tags && command !== "inspect") throw new UsageError(`--tags applies to inspect only, not to "${command}"`);
  for (const flag of ["decode-worker", "write-hidden"] as const) {
    if (flags[flag] && command !== "stage" && command !== "export") {
      throw new UsageError(`--${flag} applies to stage and export only, not to "${command}"`);
    }
  }
  if (command === "key") {
    // The key comes from the element's own registry-url, image and ref.
    for (const name of ["platform", "registry-url"] as const) {
      if (flags[name] !== undefined) throw new UsageError(`--${name} does not apply to key, which reads only the element file`);
    }
  }
  const toStdout = flags.output === undefined || flags.output === "-";
  if (command === "export" && toStdout && io.stdout.isTTY) {
    throw new UsageError("export writes a tar archive, and standard output is a terminal: pass -o FILE or redirect it, as in > rootfs.tar");
  }
}

async function runExport(input: string, flags: Flags, options: StageOptions, io: CliIo, reporter: ProgressReporter): Promise<number> {
  const output = flags.output === undefined || flags.output === "-" ? { stream: writableFor(io.stdout), commit: () => {} } : outputStream(flags.output);
  const result = await exportTar(input, output.stream, options);
  output.commit();
  // With the archive on standard output, the JSON result goes to standard error.
  if (flags.json) {
    const sink = flags.output === undefined || flags.output === "-" ? io.stderr : io.stdout;
    sink.write(JSON.stringify({ ...fetchJson(result), output: flags.output ?? "-", entries: result.entries }) + "\n");
  }
  reporter.finish(`exported ${result.source} (${result.digest}): ${result.entries} entries to ${flags.output ?? "standard output"}`);
  return 0;
}

/** Return true when an operand names an element file: it ends in .bst/.yml/.yaml or is an existing regular file. */
function isElementPath(input: string): boolean {
  if (/\.(bst|ya?ml)$/i.test(input)) return true;
  try {
    return fs.statSync(input).isFile();
  } catch {
    return false;
  }
}

async function runElement(
  command: Command,
  file: string,
  target: string | undefined,
  flags: Flags,
  options: StageOptions,
  io: CliIo,
  reporter: ProgressReporter,
): Promise<number> {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (error) {
    throw new ElementError(`cannot read element file "${file}": check the path`, { file, cause: error });
  }
  const configs = parseElement(text, file);
  // Every pull option, mirrors included, reaches each source's registry client.
  const sources = configs.map((config) => new DockerSource(config, { ...options, registryUrl: flags["registry-url"] ?? config.registryUrl }));

  try {
    return await runSources(command, file, text, sources, target, flags, options, io, reporter);
  } catch (error) {
    // Errors about one source carry its line; add the file so the message points to it.
    if (error instanceof ElementError && error.file === undefined && error.line !== undefined) {
      const key = error.key ? ` key "${error.key}"` : "";
      throw new ElementError(`"${file}" line ${error.line}${key}: ${error.message}`, { file, line: error.line, key: error.key, cause: error.cause });
    }
    throw error;
  }
}

async function runSources(
  command: Command,
  file: string,
  text: string,
  sources: DockerSource[],
  target: string | undefined,
  flags: Flags,
  options: StageOptions,
  io: CliIo,
  reporter: ProgressReporter,
): Promise<number> {
  if (command === "key") {
    const keys = sources.map((source) => source.uniqueKey());
    io.stdout.write(flags.json ? JSON.stringify({ file, keys }) + "\n" : keys.map((key) => JSON.stringify(key) + "\n").join(""));
    return 0;
  }

  if (command === "inspect" || command === "export") {
    const registryUrl = (source: DockerSource) => flags["registry-url"] ?? source.config.registryUrl;
    const images = sources.map((source) => pinnedImage(source, registryUrl(source)));
    if (command === "export") {
      if (sources.length !== 1) {
        throw new ElementError(`element "${file}" has ${sources.length} docker sources: export takes an element with one`, { file });
      }
      return await runExport(images[0], flags, { ...options, platform: sources[0].platform, registryUrl: registryUrl(sources[0]) }, io, reporter);
    }
    const results = [];
    for (const [i, source] of sources.entries()) {
      const sourceOptions = { ...options, platform: source.platform, registryUrl: registryUrl(source), tags: flags.tags === true };
      const result = await inspect(images[i], sourceOptions);
      results.push({ ...result, uniqueKey: source.digest ? source.uniqueKey() : undefined });
    }
    io.stdout.write(flags.json ? JSON.stringify({ file, sources: results }) + "\n" : results.map(formatInspect).join("\n"));
    return 0;
  }

  if (command === "track") {
    let updated = text;
    const results = [];
    for (const source of sources) {
      const digest = await source.track();
      updated = setRef(updated, source.config.index, digest.slice("sha256:".length));
      results.push({ index: source.config.index, image: source.config.image, digest });
    }
    if (updated !== text) writeFileKeepingMode(file, updated);
    io.stdout.write(
      flags.json ? JSON.stringify({ file, sources: results }) + "\n" : results.map((r) => `${r.digest}\n`).join(""),
    );
    return 0;
  }

  if (command === "fetch") {
    for (const source of sources) {
      const result = await source.fetch();
      io.stdout.write(flags.json ? JSON.stringify(fetchJson(result)) + "\n" : `${result.digest}\n`);
    }
    return 0;
  }

  if (sources.length !== 1 && sources.some((source) => !source.config.directory)) {
    throw new ElementError(
      `element "${file}" has ${sources.length} docker sources: give each a distinct "directory" so they can be staged together`,
      { file },
    );
  }
  for (const source of sources) await source.stage(target!);
  return 0;
}

/** Return the registry reference of a source: its pinned digest, else its track tag. */
function pinnedImage(source: DockerSource, registryUrl: string): string {
  const { image, ref, track } = source.config;
  return formatReference(referenceFromRegistryUrl(registryUrl, image, ref ? `sha256:${ref}` : track));
}

function writeFileKeepingMode(file: string, text: string): void {
  const temp = `${file}.ocistage-${globalThis.process?.pid ?? 0}.tmp`;
  const mode = fs.statSync(file).mode & 0o7777;
  fs.writeFileSync(temp, text, { mode });
  fs.renameSync(temp, file);
}

async function pullOptions(flags: Flags, io: CliIo, reporter: ProgressReporter): Promise<StageOptions> {
  const options: StageOptions = { onEvent: (event) => reporter.handle(event) };
  if (flags["decode-worker"]) options.decodeWorker = true;
  if (flags["write-hidden"]) options.writeHidden = true;
  if (flags.platform !== undefined) options.platform = flags.platform;
  if (flags.cache !== undefined) options.cache = flags.cache;
  if (flags["plain-http"]) options.plainHttp = true;
  if (flags["allow-foreign-urls"]) options.allowForeignUrls = true;

  const mirrors = mirrorOptions(flags, io);
  if (mirrors) options.mirrors = mirrors;

  if (flags.concurrency !== undefined) {
    const value = Number(flags.concurrency);
    if (!Number.isInteger(value) || value < 1 || value > 64) {
      throw new UsageError(`invalid --concurrency "${flags.concurrency}": pass a whole number from 1 to 64`);
    }
    options.concurrency = value;
  }
  if (flags.hasher !== undefined) {
    if (!["auto", "native", "wasm"].includes(flags.hasher)) {
      throw new UsageError(`invalid --hasher "${flags.hasher}": use auto, native or wasm`);
    }
    options.hasher = flags.hasher as FetchOptions["hasher"];
  }
  if (flags["password-stdin"] && !flags.username) {
    throw new UsageError("--password-stdin needs --username");
  }
  if (flags.username !== undefined) {
    if (!flags["password-stdin"]) {
      throw new UsageError("--username needs --password-stdin: pipe the password or token on standard input");
    }
    const password = await readAll(io.stdin);
    const username = flags.username;

    // Flag and environment credentials name no host, so mirrors never get them.
    // Docker's config.json still serves mirrors and other hosts by their own name.
    const mirrorHostNames = mirrorHosts(options.mirrors);
    options.credentials = chainCredentials(
      credentialsExcept(mirrorHostNames, () => Promise.resolve({ username, password })),
      credentialsExcept(mirrorHostNames, environmentCredentials(io.env ?? globalThis.process?.env)),
      dockerConfigCredentials({ env: io.env ?? globalThis.process?.env }),
    );
  }
  return options;
}

/** Collect mirrors from --mirror flags, then --mirrors-file or $OCISTAGE_MIRRORS. */
function mirrorOptions(flags: Flags, io: CliIo): MirrorMap | undefined {
  const fromFlags: MirrorMap = {};
  try {
    for (const value of flags.mirror ?? []) addMirrorFlag(fromFlags, value);
  } catch (error) {
    throw new UsageError(`--mirror: ${(error as Error).message}`);
  }

  const file = flags["mirrors-file"] ?? (io.env ?? globalThis.process?.env)?.OCISTAGE_MIRRORS;
  let fromFile: MirrorMap | undefined;
  if (file) {
    let text: string;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (error) {
      throw new UsageError(`cannot read mirrors file "${file}" (${(error as Error).message}): check the path`);
    }
    fromFile = parseMirrorsFile(text, file);
  }
  const merged = mergeMirrors(fromFlags, fromFile);
  return Object.keys(merged).length > 0 ? merged : undefined;
}

async function readAll(stdin: CliIo["stdin"]): Promise<string> {
  if (!stdin) throw new UsageError("--password-stdin: standard input is not available");
  let text = "";
  const decoder = new TextDecoder();
  for await (const chunk of stdin) text += typeof chunk === "string" ? chunk : decoder.decode(chunk, { stream: true });
  text = text.replace(/\r?\n$/, "");
  if (text === "") throw new UsageError("--password-stdin: standard input was empty; pipe the password or token");
  return text;
}

function trackJson(result: Awaited<ReturnType<typeof track>>) {
  return {
    source: result.source,
    reference: result.reference,
    platform: result.platform,
    digest: result.digest,
    indexDigest: result.indexDigest,
    mediaType: result.mediaType,
  };
}

function fetchJson(result: Awaited<ReturnType<typeof fetchImage>>) {
  return {
    ...trackJson(result),
    cache: result.cache.dir,
    layers: result.manifest.layers.map((layer) => ({ digest: layer.digest, size: layer.size, mediaType: layer.mediaType })),
    downloaded: result.downloaded,
  };
}
