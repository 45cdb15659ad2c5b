/**
 * Staging benchmark: ocistage against `skopeo copy` + `umoci raw unpack`,
 * on disk and on tmpfs, with a real distribution registry on 127.0.0.1.
 *
 *   npm run bench              (the same as: deno run -A bench/stage.ts)
 *   deno run -A bench/stage.ts --runs 3 --runtimes deno,bun,node
 *
 * What it does, all against 127.0.0.1 only:
 * 1. builds the images of bench/image.ts from files on this machine (once;
 *    later runs reuse them from `--work`, default ~/.cache/ocistage-bench);
 * 2. starts docker-registry and pushes both images with skopeo;
 * 3. on each filesystem, runs these in turn, `--runs` times, and prints the
 *    median wall time of each and the ratios:
 *    - `skopeo copy` into a new OCI layout + `umoci raw unpack --rootless`,
 *    - `umoci raw unpack --rootless` alone, from a prepared layout,
 *    - ocistage cold: `stage` with an empty cache (download and stage),
 *    - ocistage warm: `stage` with every blob cached, after one untimed
 *      stage that recorded the changes of the layers;
 * 4. checks once that ocistage's tree equals umoci's, apart from the
 *    differences ocistage prescribes (owner read and write bits, dev/);
 * 5. measures peak RSS of a cold `stage` of a one-layer image of about 2 GB.
 *
 * Every command runs under `/usr/bin/time` for peak RSS and CPU time
 * (Debian: `apt-get install time`; without it the RSS column stays empty).
 * The default run (Deno only, 5 runs) takes about 12 minutes on 2 cores, and
 * stops starting new runs once `--max-minutes` (default 15) would be passed.
 *
 * @module
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { findProgram, startDistribution } from "../tests/fixtures/distribution.ts";
import { diffTrees, snapshotTree, type TreeEntry } from "../tests/fixtures/tree.ts";
import { BIG_LAYER_IMAGE, buildImage, type BuiltImage, STAGE_IMAGE } from "./image.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const TIME = "/usr/bin/time";
/** Outside /tmp, which other jobs on a shared machine may clean while the bench runs. */
const DEFAULT_WORK = path.join(os.homedir(), ".cache", "ocistage-bench");

/** A runtime for ocistage, and "+worker" for `stage --decode-worker` on it. */
type Runtime = "deno" | "bun" | "node" | "deno+worker" | "bun+worker";
const RUNTIMES: Runtime[] = ["deno", "bun", "node", "deno+worker", "bun+worker"];

const USAGE = `usage: deno run -A bench/stage.ts [options]
  --runs N           timed runs of each command per filesystem (default 5)
  --runtimes LIST    comma-separated runtimes for ocistage: deno,bun,node, and deno+worker or
                     bun+worker for stage --decode-worker (default deno)
  --fs LIST          filesystems: disk,tmpfs (default both)
  --disk-dir DIR     directory on disk for outputs (default: the --work directory)
  --tmpfs-dir DIR    directory on tmpfs for outputs (default /dev/shm)
  --work DIR         where the built images and the registry's storage are kept (default ~/.cache/ocistage-bench)
  --node PATH        node binary for the node runtime (default: node_modules/.bin/node, else node on PATH)
  --max-minutes M    start no new run after M minutes (default 15)
  --settle-minutes M before each round on disk, wait up to M minutes for file creates to cost what
                     they cost on a settled disk (default 8; 0 skips the wait, the probe still runs)
  --no-memory        skip the peak-memory measurement of the 2 GB layer
  --no-check         skip the comparison of ocistage's tree with umoci's
  --json FILE        also write every measurement to FILE
`;

interface Options {
  runs: number;
  runtimes: Runtime[];
  filesystems: { name: string; dir: string }[];
  work: string;
  node: string;
  deadline: number;
  settleMs: number;
  memory: boolean;
  check: boolean;
  json?: string;
}

function parseOptions(): Options {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      runs: { type: "string", default: "5" },
      runtimes: { type: "string", default: "deno" },
      fs: { type: "string", default: "disk,tmpfs" },
      "disk-dir": { type: "string", default: DEFAULT_WORK },
      "tmpfs-dir": { type: "string", default: "/dev/shm" },
      work: { type: "string", default: DEFAULT_WORK },
      node: { type: "string", default: defaultNode() },
      "max-minutes": { type: "string", default: "15" },
      "settle-minutes": { type: "string", default: "8" },
      "no-memory": { type: "boolean", default: false },
      "no-check": { type: "boolean", default: false },
      json: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) usage(`invalid --runs "${values.runs}": pass a whole number of at least 1`);
  const runtimes = values.runtimes.split(",").map((name) => name.trim()) as Runtime[];
  for (const runtime of runtimes) {
    if (!RUNTIMES.includes(runtime)) usage(`unknown runtime "${runtime}" in --runtimes: use ${RUNTIMES.join(", ")}`);
  }
  const dirs: Record<string, string> = { disk: values["disk-dir"], tmpfs: values["tmpfs-dir"] };
  const filesystems = values.fs.split(",").map((name) => {
    const dir = dirs[name.trim()];
    if (dir === undefined) usage(`unknown filesystem "${name}" in --fs: use disk or tmpfs`);
    return { name: name.trim(), dir };
  });
  const minutes = Number(values["max-minutes"]);
  if (!(minutes > 0)) usage(`invalid --max-minutes "${values["max-minutes"]}": pass a positive number`);
  const settleMinutes = Number(values["settle-minutes"]);
  if (!(settleMinutes >= 0)) usage(`invalid --settle-minutes "${values["settle-minutes"]}": pass a number of at least 0`);
  return {
    runs,
    runtimes,
    filesystems,
    work: path.resolve(values.work),
    node: values.node,
    deadline: Date.now() + minutes * 60_000,
    settleMs: settleMinutes * 60_000,
    memory: !values["no-memory"],
    check: !values["no-check"],
    json: values.json,
  };
}

/** Returns the node binary installed from npm into the project (a newer Node than Debian's), else node on PATH. */
function defaultNode(): string {
  const local = path.join(ROOT, "node_modules", ".bin", "node");
  return fs.existsSync(local) ? local : "node";
}

function usage(message: string): never {
  process.stderr.write(`bench: ${message}\n${USAGE}`);
  process.exit(2);
}

/** One timed command: wall seconds, CPU seconds and peak RSS in MiB (NaN without /usr/bin/time). */
interface Timing {
  seconds: number;
  user: number;
  system: number;
  rssMiB: number;
}

/** Maximum run time of one command, after which the bench kills it and fails. */
const COMMAND_TIMEOUT_MS = 10 * 60_000;

/** Runs a command to completion under /usr/bin/time and returns its timing; throws with its stderr on failure. */
function timed(program: string, args: string[], env: Record<string, string> = {}): Promise<Timing> {
  const useTime = fs.existsSync(TIME);
  const timeFile = path.join(os.tmpdir(), `ocistage-bench-time-${process.pid}`);
  const [command, commandArgs] = useTime
    ? [TIME, ["-f", "%e %U %S %M", "-o", timeFile, program, ...args]]
    : [program, args];
  const start = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(command, commandArgs, {
      cwd: ROOT,
      env: { ...process.env, NO_COLOR: "1", ...env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr.on("data", (chunk) => (stderr = (stderr + chunk).slice(-4000)));
    const timer = setTimeout(() => child.kill("SIGKILL"), COMMAND_TIMEOUT_MS);
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const seconds = (performance.now() - start) / 1000;
      if (code !== 0) {
        reject(new Error(`${program} ${args.join(" ")} failed (${signal ?? `exit ${code}`}):\n${stderr}`));
        return;
      }
      if (!useTime) {
        resolve({ seconds, user: NaN, system: NaN, rssMiB: NaN });
        return;
      }
      const [, user, system, rssKiB] = fs.readFileSync(timeFile, "utf8").trim().split(/\s+/).map(Number);
      fs.rmSync(timeFile, { force: true });
      resolve({ seconds, user, system, rssMiB: rssKiB / 1024 });
    });
  });
}

/** Removes a directory tree and flushes dirty pages, so one run's writeback does not slow the next. */
async function cleanUp(dir: string): Promise<void> {
  await timed("rm", ["-rf", dir]);
  await timed("sync", []);
}

/**
 * Returns a new, empty directory for one timed command. On tmpfs it is
 * always the same path, removed after each command by {@linkcode clearScratch}.
 * On disk every command gets its own directory below `runs`, kept until the
 * end, because ext4 without a journal (as on this machine) makes each
 * create skip the inodes deleted in the last minutes (see
 * {@linkcode settleDisk}). `runs` has the ext4 "top of directory
 * hierarchy" flag (`chattr +T`), so ext4 spreads these directories over the
 * disk, as it does for directories in the filesystem root. Otherwise each
 * command's tree would land in the block groups where the last command's
 * whiteouts had just deleted thousands of files.
 */
function nextScratch(bed: Bed): string {
  const scratch = bed.onDisk ? path.join(bed.base, "runs", `run-${bed.scratchCount++}`) : path.join(bed.base, "run");
  fs.mkdirSync(scratch, { recursive: true });
  return scratch;
}

/** Removes a command's scratch directory on tmpfs, and on disk flushes its dirty pages, so that its writeback does not slow the next command. */
async function clearScratch(bed: Bed, scratch: string): Promise<void> {
  if (bed.onDisk) await timed("sync", []);
  else await cleanUp(scratch);
}

/** Sets the ext4 "top of directory hierarchy" flag on `dir`; returns false where chattr or the flag is missing. */
async function markTopDirectory(dir: string): Promise<boolean> {
  try {
    await timed("chattr", ["+T", dir]);
    return true;
  } catch {
    return false;
  }
}

/**
 * Directories and files per directory of one disk probe, and the cost per
 * file up to which the disk counts as settled.
 */
const PROBE_DIRECTORIES = 4;
const PROBE_FILES = 500;
const SETTLED_MICROSECONDS = 60;

/**
 * Returns the cost in microseconds of creating a file, writing 4 KiB and
 * closing it: the mean per directory, of the slowest of
 * {@linkcode PROBE_DIRECTORIES} new directories `NAME-0`, `NAME-1`, ... in
 * `parent`. Below a directory marked with {@linkcode markTopDirectory} they
 * land in different block groups, of which only some may be slow. The files
 * stay until the bed is removed, because removing them would unsettle the
 * disk again.
 */
function probeCreates(parent: string, name: string): number {
  const data = new Uint8Array(4096);
  let slowest = 0;
  for (let d = 0; d < PROBE_DIRECTORIES; d++) {
    const subdir = path.join(parent, `${name}-${d}`);
    fs.mkdirSync(subdir, { recursive: true });
    const start = performance.now();
    for (let i = 0; i < PROBE_FILES; i++) {
      const fd = fs.openSync(path.join(subdir, String(i)), "wx");
      fs.writeSync(fd, data);
      fs.closeSync(fd);
    }
    slowest = Math.max(slowest, ((performance.now() - start) * 1000) / PROBE_FILES);
  }
  return slowest;
}

/** Probes the disk of a bed and records the result. */
function probeBed(bed: Bed): number {
  const cost = probeCreates(path.join(bed.base, "runs"), `probe-${bed.probes.length}`);
  bed.probes.push(cost);
  return cost;
}

/**
 * Probes the cost of file creates on disk, and while it is above
 * {@linkcode SETTLED_MICROSECONDS}, waits and probes again, for at most
 * `limitMs`. Returns the last probe. The reason: ext4 without a journal
 * does not reuse an inode freed in the last 60 s (360 s while its inode
 * table block is dirty), and checks every such inode on each create
 * (`recently_deleted` in Linux's fs/ext4/ialloc.c). For minutes after a
 * mass deletion, such as the end of the previous bench run, every create
 * costs several times more for every tool alike, and the ratios approach 1
 * whatever the tools do.
 */
async function settleDisk(bed: Bed, limitMs: number): Promise<number> {
  const started = Date.now();
  for (;;) {
    const cost = probeBed(bed);
    if (cost <= SETTLED_MICROSECONDS || Date.now() - started >= limitMs) return cost;
    process.stdout.write(
      `  disk: a file create costs ${cost.toFixed(0)} us against about 30 us on a settled disk; waiting 30 s (--settle-minutes)\n`,
    );
    await new Promise((resolve) => setTimeout(resolve, 30_000));
  }
}

/** Returns the command line that runs the ocistage CLI on a runtime. */
function ocistageCommand(runtime: Runtime, options: Options, nodeBundle: string | undefined): [string, string[]] {
  const bin = (name: string) => path.join(ROOT, "node_modules", ".bin", name);
  if (runtime.startsWith("deno")) return [bin("deno"), ["run", "-A", path.join(ROOT, "cli.ts")]];
  if (runtime.startsWith("bun")) return [bin("bun"), [path.join(ROOT, "cli.ts")]];
  return [options.node, [nodeBundle!]];
}

/** Returns the options of `stage` that a runtime entry adds. */
function stageFlags(runtime: Runtime): string[] {
  return runtime.endsWith("+worker") ? ["--decode-worker"] : [];
}

/** Bundles cli.ts for Node with esbuild, the way the npm package ships it, below node_modules so packages resolve. */
async function bundleForNode(): Promise<string> {
  const out = path.join(ROOT, "node_modules", ".cache", "ocistage-bench", "cli.mjs");
  await timed(path.join(ROOT, "node_modules", ".bin", "esbuild"), [
    path.join(ROOT, "cli.ts"),
    "--bundle",
    "--platform=node",
    "--format=esm",
    "--packages=external",
    "--log-level=warning",
    `--outfile=${out}`,
  ]);
  return out;
}

async function runtimeVersion(program: string, args: string[]): Promise<string> {
  const output: string = await new Promise((resolve) => {
    const child = spawn(program, args, { stdio: ["ignore", "pipe", "ignore"] });
    let text = "";
    child.stdout.on("data", (chunk) => (text += chunk));
    child.on("error", () => resolve("missing"));
    child.on("close", () => resolve(text));
  });
  return output.split("\n")[0].trim();
}

function median(values: number[]): number {
  const sorted = values.filter((value) => !Number.isNaN(value)).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** One competitor in the timed loop; `run` stages the image once below `scratch`, an empty directory. */
interface Contender {
  name: string;
  run(scratch: string): Promise<Timing>;
}

function addTimings(a: Timing, b: Timing): Timing {
  return { seconds: a.seconds + b.seconds, user: a.user + b.user, system: a.system + b.system, rssMiB: Math.max(a.rssMiB, b.rssMiB) };
}

interface Context {
  options: Options;
  host: string;
  nodeBundle?: string;
}

function reference(context: Context, image: BuiltImage): string {
  return `${context.host}/bench/${image.name}:latest`;
}

function contenders(context: Context, image: BuiltImage, layout: string, warmCache: string): Contender[] {
  const ref = reference(context, image);
  const list: Contender[] = [
    {
      name: "skopeo copy + umoci unpack",
      run: async (scratch) => {
        const copy = await timed("skopeo", ["copy", "--quiet", "--src-tls-verify=false", `docker://${ref}`, `oci:${scratch}/layout:bench`]);
        const unpack = await timed("umoci", ["raw", "unpack", "--rootless", "--image", `${scratch}/layout:bench`, `${scratch}/rootfs`]);
        return addTimings(copy, unpack);
      },
    },
    {
      name: "umoci unpack",
      run: (scratch) => timed("umoci", ["raw", "unpack", "--rootless", "--image", `${layout}:bench`, `${scratch}/rootfs`]),
    },
  ];
  for (const runtime of context.options.runtimes) {
    const [program, prefix] = ocistageCommand(runtime, context.options, context.nodeBundle);
    list.push({
      name: `ocistage cold (${runtime})`,
      run: (scratch) => timed(program, [...prefix, "stage", ...stageFlags(runtime), "--quiet", "--cache", `${scratch}/cache`, ref, `${scratch}/rootfs`]),
    });
    list.push({
      name: `ocistage warm (${runtime})`,
      run: (scratch) => timed(program, [...prefix, "stage", ...stageFlags(runtime), "--quiet", "--cache", warmCache, ref, `${scratch}/rootfs`]),
    });
  }
  return list;
}

/** Results of one filesystem: every timing of every contender. */
type Results = Map<string, Timing[]>;

/** The timed loop's state on one filesystem. */
interface Bed {
  filesystem: { name: string; dir: string };
  base: string;
  onDisk: boolean;
  /** Number of scratch directories made on disk so far (see nextScratch). */
  scratchCount: number;
  contenders: Contender[];
  results: Results;
  /** Cost per file create of every disk probe, in microseconds. */
  probes: number[];
  /** The probe taken right before each timed command, by contender. */
  probeBefore: Map<string, number[]>;
}

/** Creates the working directory on one filesystem, with a layout for umoci alone and a full cache for ocistage warm (untimed). */
async function prepareBed(context: Context, image: BuiltImage, filesystem: { name: string; dir: string }): Promise<Bed> {
  const base = fs.mkdtempSync(path.join(filesystem.dir, "ocistage-bench-"));
  const layout = path.join(base, "layout");
  await timed("skopeo", ["copy", "--quiet", "--src-tls-verify=false", `docker://${reference(context, image)}`, `oci:${layout}:bench`]);
  const warmCache = path.join(base, "warm-cache");
  const [program, prefix] = ocistageCommand(context.options.runtimes[0], context.options, context.nodeBundle);
  await timed(program, [...prefix, "fetch", "--quiet", "--cache", warmCache, reference(context, image)]);
  // Any first stage of an image records the layers' changes in the cache.
  // Warm runs measure the stages after it.
  const prime = path.join(base, "prime");
  await timed(program, [...prefix, "stage", "--quiet", "--cache", warmCache, reference(context, image), prime]);
  fs.rmSync(prime, { recursive: true, force: true });

  const onDisk = filesystem.name === "disk";
  if (onDisk) {
    fs.mkdirSync(path.join(base, "runs"));
    if (!await markTopDirectory(path.join(base, "runs"))) {
      console.log(`note: chattr +T failed on ${base}/runs (not ext4, or no chattr), so ext4 may put runs next to each other`);
    }
  }

  const list = contenders(context, image, layout, warmCache);
  return {
    filesystem,
    base,
    onDisk,
    scratchCount: 0,
    contenders: list,
    results: new Map(list.map((contender) => [contender.name, []])),
    probes: [],
    probeBefore: new Map(list.map((contender) => [contender.name, []])),
  };
}

/**
 * Runs every contender on every filesystem once per run, alternating, and
 * returns true when it stopped before `--runs` because of `--max-minutes`.
 */
async function runAlternating(context: Context, beds: Bed[]): Promise<boolean> {
  let runStarted = Date.now();
  for (let run = 0; run < context.options.runs; run++) {
    const lastRun = Date.now() - runStarted;
    if (run > 0 && Date.now() + lastRun > context.options.deadline) return true;
    runStarted = Date.now();
    for (const bed of beds) {
      // Rotate the order so that no contender always runs right after the same neighbour.
      for (let i = 0; i < bed.contenders.length; i++) {
        const contender = bed.contenders[(run + i) % bed.contenders.length];
        // Only the first command of a round waits for a settled disk, so
        // that a round takes about as long as its commands. The probes
        // before the others are recorded and printed.
        if (bed.onDisk) {
          const cost = i === 0 ? await settleDisk(bed, context.options.settleMs) : probeBed(bed);
          bed.probeBefore.get(contender.name)!.push(cost);
        }
        const scratch = nextScratch(bed);
        const timing = await contender.run(scratch);
        bed.results.get(contender.name)!.push(timing);
        await clearScratch(bed, scratch);
      }
    }
    process.stdout.write(`  run ${run + 1}/${context.options.runs} done in ${((Date.now() - runStarted) / 1000).toFixed(0)} s\n`);
  }
  return false;
}

function formatSeconds(value: number): string {
  return Number.isNaN(value) ? "-" : value.toFixed(2);
}

function printResults(bed: Bed, runtimes: Runtime[]): Record<string, number> {
  const filesystem = bed.filesystem.name;
  const results = bed.results;
  const medians = new Map<string, Timing>();
  for (const [name, timings] of results) {
    medians.set(name, {
      seconds: median(timings.map((timing) => timing.seconds)),
      user: median(timings.map((timing) => timing.user)),
      system: median(timings.map((timing) => timing.system)),
      rssMiB: median(timings.map((timing) => timing.rssMiB)),
    });
  }
  const runs = Math.min(...[...results.values()].map((timings) => timings.length));
  console.log(`\n${filesystem}: median of ${runs} runs (seconds; CPU user/system; peak RSS MiB)`);
  for (const [name, timing] of medians) {
    const all = results.get(name)!.map((entry) => entry.seconds.toFixed(2)).join(" ");
    console.log(
      `  ${name.padEnd(28)} ${formatSeconds(timing.seconds).padStart(7)}   cpu ${formatSeconds(timing.user)}/${formatSeconds(timing.system)}` +
        `   rss ${Number.isNaN(timing.rssMiB) ? "-" : timing.rssMiB.toFixed(0)}   [${all}]`,
    );
  }
  if (bed.probes.length > 0) {
    console.log(`  cost of a file create right before each command (us; about 30 on a settled disk):`);
    for (const [name, costs] of bed.probeBefore) {
      console.log(`    ${name.padEnd(28)} [${costs.map((cost) => cost.toFixed(0)).join(" ")}]`);
    }
  }

  const ratios: Record<string, number> = {};
  const both = medians.get("skopeo copy + umoci unpack")!.seconds;
  const umoci = medians.get("umoci unpack")!.seconds;
  for (const runtime of runtimes) {
    const cold = medians.get(`ocistage cold (${runtime})`)!.seconds / both;
    const warm = medians.get(`ocistage warm (${runtime})`)!.seconds / umoci;
    ratios[`${filesystem} cold/skopeo+umoci (${runtime})`] = cold;
    ratios[`${filesystem} warm/umoci (${runtime})`] = warm;
    console.log(
      `  ${runtime}: cold / (skopeo + umoci) = ${cold.toFixed(2)} (target <= 0.60, ${cold <= 0.6 ? "met" : "NOT met"}); ` +
        `warm / umoci = ${warm.toFixed(2)} (target <= 0.80, ${warm <= 0.8 ? "met" : "NOT met"})`,
    );
  }
  return ratios;
}

/**
 * Stages the image with ocistage and with umoci on tmpfs and compares the
 * trees. Before the comparison, umoci's tree gets what ocistage does
 * differently: owner read on files, owner read, write and execute on
 * directories, no entries below dev/, and the target's own metadata.
 */
async function checkAgainstUmoci(context: Context, image: BuiltImage, dir: string): Promise<string[]> {
  const base = fs.mkdtempSync(path.join(dir, "ocistage-bench-check-"));
  try {
    const ref = reference(context, image);
    await timed("skopeo", ["copy", "--quiet", "--src-tls-verify=false", `docker://${ref}`, `oci:${base}/layout:bench`]);
    await timed("umoci", ["raw", "unpack", "--rootless", "--image", `${base}/layout:bench`, `${base}/umoci`]);
    const [program, prefix] = ocistageCommand(context.options.runtimes[0], context.options, context.nodeBundle);
    await timed(program, [...prefix, "stage", "--quiet", "--cache", `${base}/cache`, ref, `${base}/ocistage`]);

    const ours = snapshotTree(`${base}/ocistage`);
    ours.delete("");
    const expected = new Map<string, TreeEntry>();
    for (const [name, entry] of snapshotTree(`${base}/umoci`)) {
      if (name === "" || name.startsWith("dev/")) continue;
      let mode = entry.mode;
      if (entry.type === "file") mode |= 0o400;
      if (entry.type === "dir") mode |= 0o700;
      expected.set(name, { ...entry, mode });
    }
    return diffTrees(ours, expected);
  } finally {
    await cleanUp(base);
  }
}

async function measureMemory(context: Context, image: BuiltImage, dir: string): Promise<Record<string, Timing>> {
  const peaks: Record<string, Timing> = {};
  for (const runtime of context.options.runtimes) {
    const base = fs.mkdtempSync(path.join(dir, "ocistage-bench-memory-"));
    try {
      const [program, prefix] = ocistageCommand(runtime, context.options, context.nodeBundle);
      peaks[runtime] = await timed(program, [
        ...prefix,
        "stage",
        ...stageFlags(runtime),
        "--quiet",
        "--cache",
        `${base}/cache`,
        reference(context, image),
        `${base}/rootfs`,
      ]);
    } finally {
      await cleanUp(base);
    }
  }
  return peaks;
}

function describeImage(image: BuiltImage): string {
  const sum = (pick: (layer: BuiltImage["layers"][number]) => number) => image.layers.reduce((total, layer) => total + pick(layer), 0);
  const mb = (bytes: number) => (bytes / 1e6).toFixed(0);
  return `${image.layers.length} gzip layers, ${mb(sum((layer) => layer.tarBytes))} MB of tar ` +
    `(${mb(sum((layer) => layer.gzipBytes))} MB gzip), ${sum((layer) => layer.entries)} tar entries` +
    `${image.reused ? ", reused from an earlier build" : ""}`;
}

async function describeMachine(options: Options): Promise<string[]> {
  const bin = (name: string) => path.join(ROOT, "node_modules", ".bin", name);
  const lines = [
    `machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? "unknown"}), ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB memory, ${os.release()}`,
  ];
  for (const filesystem of options.filesystems) {
    const mount = await runtimeVersion("findmnt", ["-n", "-o", "FSTYPE,OPTIONS", "--target", filesystem.dir]);
    lines.push(`${filesystem.name}: ${filesystem.dir} (${mount})`);
  }
  const versions = [
    `deno ${(await runtimeVersion(bin("deno"), ["--version"])).replace(/^deno /, "")}`,
    `bun ${await runtimeVersion(bin("bun"), ["--version"])}`,
    `node ${await runtimeVersion(options.node, ["--version"])}`,
    await runtimeVersion("skopeo", ["--version"]),
    await runtimeVersion("umoci", ["--version"]),
  ];
  lines.push(`versions: ${versions.join(", ")}`);
  return lines;
}

async function main(): Promise<void> {
  const options = parseOptions();
  const started = Date.now();
  const missing = ["docker-registry", "skopeo", "umoci", "tar", "gzip"].filter((name) => !findProgram(name));
  if (missing.length > 0) {
    throw new Error(`missing programs: ${missing.join(", ")}; install them with: apt-get install docker-registry skopeo umoci tar gzip`);
  }
  if (!fs.existsSync(TIME)) {
    console.log(`note: ${TIME} is missing, so no peak RSS or CPU times; install it with: apt-get install time`);
  }
  for (const line of await describeMachine(options)) console.log(line);

  console.log(`building images in ${options.work} (the first build takes about 1.5 minutes)`);
  fs.mkdirSync(options.work, { recursive: true });
  const stageImage = buildImage(STAGE_IMAGE, options.work);
  console.log(`staging image: ${describeImage(stageImage)}`);
  const bigImage = options.memory ? buildImage(BIG_LAYER_IMAGE, options.work) : undefined;
  if (bigImage) console.log(`memory image: ${describeImage(bigImage)}`);

  // The registry keeps its storage below os.tmpdir(), so point that into the work directory.
  const registryTemp = path.join(options.work, "tmp");
  fs.mkdirSync(registryTemp, { recursive: true });
  process.env.TMPDIR = registryTemp;
  const registry = await startDistribution();
  const context: Context = { options, host: registry.host };
  const report: Record<string, unknown> = { machine: await describeMachine(options), image: stageImage };
  try {
    for (const image of [stageImage, bigImage]) {
      if (!image) continue;
      await timed("skopeo", ["copy", "--quiet", "--dest-tls-verify=false", `oci:${image.layout}:${image.name}`, `docker://${reference(context, image)}`]);
    }
    if (options.runtimes.includes("node")) context.nodeBundle = await bundleForNode();

    const beds: Bed[] = [];
    try {
      for (const filesystem of options.filesystems) beds.push(await prepareBed(context, stageImage, filesystem));
      const names = options.filesystems.map((filesystem) => `${filesystem.name} (${filesystem.dir})`).join(" and ");
      console.log(`\ntiming on ${names}, ${options.runs} runs`);
      const stoppedEarly = await runAlternating(context, beds);
      if (stoppedEarly) console.log(`  stopped early: another run would pass --max-minutes`);
    } finally {
      for (const bed of beds) await cleanUp(bed.base);
    }
    const ratios: Record<string, number> = {};
    for (const bed of beds) {
      Object.assign(ratios, printResults(bed, options.runtimes));
      report[bed.filesystem.name] = Object.fromEntries(bed.results);
      if (bed.probes.length > 0) report[`${bed.filesystem.name} probes`] = Object.fromEntries(bed.probeBefore);
    }
    report.ratios = ratios;

    const tmpfs = options.filesystems.find((filesystem) => filesystem.name === "tmpfs")?.dir ?? options.filesystems[0].dir;
    if (options.check) {
      const differences = await checkAgainstUmoci(context, stageImage, tmpfs);
      console.log(
        differences.length === 0
          ? "\ncheck: ocistage's tree equals umoci's (with the prescribed differences)"
          : `\ncheck: ocistage's tree differs from umoci's in ${differences.length} places:\n  ${differences.slice(0, 20).join("\n  ")}`,
      );
      report.differences = differences;
    }
    if (bigImage) {
      const peaks = await measureMemory(context, bigImage, tmpfs);
      console.log(`\npeak memory of a cold stage of the memory image, on ${tmpfs}:`);
      for (const [runtime, timing] of Object.entries(peaks)) {
        const rss = timing.rssMiB;
        console.log(`  ${runtime}: ${Number.isNaN(rss) ? "-" : rss.toFixed(0)} MiB peak RSS (target < 200, ${rss < 200 ? "met" : "NOT met"}), ${timing.seconds.toFixed(1)} s`);
      }
      report.memory = peaks;
    }
  } finally {
    await registry.close();
  }
  if (options.json) fs.writeFileSync(options.json, JSON.stringify(report, null, 2));
  console.log(`\nbench finished in ${((Date.now() - started) / 60_000).toFixed(1)} minutes`);
}

await main();
