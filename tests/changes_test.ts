/**
 * Tests of layer changes and of leaving out what upper layers hide: the
 * changes read from tar headers, `HiddenPaths` and hardlinks to left-out
 * files. A fuzz test applies random layers both ways, with every entry
 * written and with hidden entries left out, and requires the same tree.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { emptyChanges, HiddenPaths, type LayerChanges, parseLayerChanges, readLayerChanges } from "../src/layer/changes.ts";
import { LayerError } from "../src/errors.ts";
import { BlobCache } from "../src/cache.ts";
import { LayerApplier, type LayerStats } from "../src/layer/apply.ts";
import { buildTar, streamOf, type TarEntrySpec } from "./fixtures/tar.ts";
import { applyEntries, createWorkspace, snapshot } from "./fixtures/workspace.ts";
import { formatSeed, fuzzSettings, iterationSeed, Prng } from "./fixtures/prng.ts";

const dir = (name: string, mode = 0o755): TarEntrySpec => ({ path: name, type: "dir", mode });
const file = (name: string, content: string, mode = 0o644): TarEntrySpec => ({ path: name, content, mode });
const symlink = (name: string, linkname: string): TarEntrySpec => ({ path: name, type: "symlink", linkname });
const hardlink = (name: string, linkname: string): TarEntrySpec => ({ path: name, type: "hardlink", linkname });
const marker = (name: string): TarEntrySpec => ({ path: name, content: "" });

const noLinks = () => false;

function changes(partial: Partial<LayerChanges>): LayerChanges {
  return { ...emptyChanges(), ...partial };
}

test("readLayerChanges() sorts entries by kind and leaves out dropped ones", async () => {
  const tar = buildTar([
    dir("./"),
    dir("./usr/"),
    file("usr/bin/tool", "x"),
    symlink("usr/lib64", "lib"),
    hardlink("usr/bin/alias", "./usr/bin/tool"),
    hardlink("usr/bin/again", "usr/bin/alias/../tool"),
    hardlink("usr/bin/old", "usr/bin/older"),
    marker("etc/.wh.motd"),
    marker("opt/.wh..wh..opq"),
    marker(".wh..wh..opq"),
    { path: "dev/null", type: "char" },
    { path: "pipe", type: "fifo" },
    hardlink("pipe-link", "pipe"),
    marker("var/.wh..wh.plnk/1"),
  ]);
  assert.deepEqual(await readLayerChanges(streamOf(tar, 100)), {
    dirs: ["usr"],
    files: ["usr/bin/tool"],
    symlinks: ["usr/lib64"],
    hardlinks: [["usr/bin/alias", "usr/bin/tool"], ["usr/bin/again", "usr/bin/tool"], ["usr/bin/old", "usr/bin/older"]],
    lowerTargets: ["usr/bin/older"],
    whiteouts: ["etc/motd"],
    opaque: ["opt", ""],
  });
});

test("readLayerChanges() rejects the names that the applier rejects", async () => {
  await assert.rejects(readLayerChanges(streamOf(buildTar([file("../escape", "x")]))), LayerError);
  await assert.rejects(readLayerChanges(streamOf(buildTar([marker("etc/.wh..")]))), LayerError);
});

test("parseLayerChanges() rejects other shapes", () => {
  const recorded = changes({ files: ["a\nb"], hardlinks: [["x", "y"]], opaque: [""] });
  assert.deepEqual(parseLayerChanges(JSON.stringify(recorded)), recorded);
  for (const text of ["", "null", "[]", '{"dirs":[]}', JSON.stringify({ ...recorded, files: [1] }), JSON.stringify({ ...recorded, hardlinks: [["x"]] })]) {
    assert.equal(parseLayerChanges(text), undefined, text);
  }
});

test("BlobCache records changes and ignores a damaged record", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-changes-"));
  try {
    const cache = new BlobCache(dir);
    const digest = `sha256:${"ab".repeat(32)}` as const;
    assert.equal(cache.readChanges(digest), undefined);
    const recorded = changes({ dirs: ["usr"], whiteouts: ["etc/motd"] });
    cache.writeChanges(digest, recorded);
    assert.deepEqual(cache.readChanges(digest), recorded);
    const file = path.join(dir, "changes", "sha256", `${"ab".repeat(32)}.json`);
    const record = JSON.parse(fs.readFileSync(file, "utf8"));

    fs.writeFileSync(file, '{"dirs":["us');
    assert.equal(cache.readChanges(digest), undefined, "truncated");
    fs.writeFileSync(file, JSON.stringify({ ...record, changes: { ...recorded, whiteouts: ["etc/motd", "usr"] } }));
    assert.equal(cache.readChanges(digest), undefined, "edited changes");
    fs.writeFileSync(file, JSON.stringify({ ...record, version: 2 }));
    assert.equal(cache.readChanges(digest), undefined, "another version");
    fs.writeFileSync(file, JSON.stringify({ ...record, layer: `sha256:${"cd".repeat(32)}` }));
    assert.equal(cache.readChanges(digest), undefined, "another layer");
    fs.writeFileSync(file, JSON.stringify(record));
    assert.deepEqual(cache.readChanges(digest), recorded, "the record as written");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("HiddenPaths.hides() applies upper layers only", () => {
  const hidden = new HiddenPaths([
    undefined,
    changes({ files: ["etc/passwd"], dirs: ["opt/app"] }),
    changes({ whiteouts: ["usr/share/doc"], opaque: ["var/cache"], symlinks: ["lib"] }),
  ]);
  const cases: [string, number, boolean][] = [
    // path, layer, hidden
    ["etc/passwd", 0, true],
    ["etc/passwd", 1, false],
    ["etc/passwd/x", 0, true],
    ["etc/group", 0, false],
    ["etc", 0, false],
    ["opt/app", 0, true],
    ["opt/app/bin", 0, false],
    ["usr/share/doc", 0, true],
    ["usr/share/doc/git/README", 1, true],
    ["usr/share/doc/x", 2, false],
    ["usr/share/docs", 0, false],
    ["var/cache", 0, false],
    ["var/cache/apt", 1, true],
    ["lib", 0, true],
    ["lib/x", 0, true],
  ];
  for (const [name, layer, expected] of cases) {
    assert.equal(hidden.hides(name.split("/"), layer, noLinks), expected, `${name} in layer ${layer}`);
  }
});

const upperLinks = new HiddenPaths([
  undefined,
  changes({ hardlinks: [["bin/sh", "usr/bin/dash"]], lowerTargets: ["usr/bin/dash"] }),
  changes({ whiteouts: ["usr/bin", "opt"], opaque: [""] }),
]);

test("HiddenPaths.hides() keeps hardlink targets of upper layers", () => {
  assert.equal(upperLinks.hides(["usr", "bin", "bash"], 0, noLinks), true);
  assert.equal(upperLinks.hides(["usr", "bin", "dash"], 0, noLinks), false);
  assert.equal(upperLinks.hides(["usr", "bin", "dash"], 1, noLinks), true);
});

test("HiddenPaths.hides() keeps paths below links", () => {
  assert.equal(upperLinks.hides(["opt", "a", "b"], 0, (path) => path === "opt/a"), false);
  assert.equal(upperLinks.hides(["opt", "a"], 0, (path) => path === "opt/a"), true);
});

test("HiddenPaths.hides() with an opaque root", () => {
  assert.equal(upperLinks.hides(["srv"], 1, noLinks), true);
  assert.equal(upperLinks.hides(["srv"], 2, noLinks), false);
});

test("HiddenPaths.hides() uses the layers with known changes", () => {
  const hidden = new HiddenPaths([undefined, undefined, changes({ whiteouts: ["tmp"] })]);
  assert.equal(hidden.hides(["tmp", "x"], 0, noLinks), true);
  assert.equal(hidden.hides(["tmp", "x"], 1, noLinks), true);
  assert.equal(hidden.hides(["tmp", "x"], 2, noLinks), false);
});

test("hidden files are not written", async () => {
  const workspace = createWorkspace();
  try {
    const applied = await applyEntries(workspace.root, [
      [dir("doc/"), file("doc/a", "old"), file("doc/b", "old"), file("keep", "k"), file("bin", "old")],
      [marker(".wh.doc"), file("bin", "new")],
    ], { leaveOut: true });
    assert.equal(applied.stats[0].hidden, 3);
    assert.equal(applied.stats[0].directories, 1);
    assert.equal(applied.stats[0].files, 1);
    assert.equal(applied.stats[0].bytes, 1);
    assert.equal(applied.stats[1].whiteouts, 1);
    assert.deepEqual([...snapshot(workspace.root).keys()], ["bin", "keep"]);
    assert.equal(fs.readFileSync(path.join(workspace.root, "bin"), "utf8"), "new");
  } finally {
    workspace.cleanup();
  }
});

test("entry below left-out file fails", async () => {
  const layers = [[file("f", "x"), file("f/x", "y")], [marker(".wh.f")]];
  for (const leaveOut of [false, true]) {
    const workspace = createWorkspace();
    try {
      await assert.rejects(applyEntries(workspace.root, layers, { leaveOut }), /parent "\/f" of entry "f\/x" is not a directory/);
    } finally {
      workspace.cleanup();
    }
  }
});

/** Applies layers with hidden entries left out, and counts the second reads of each layer. */
async function applyLeavingOut(root: string, layers: TarEntrySpec[][]): Promise<{ stats: LayerStats[]; reopened: number[] }> {
  const tars = layers.map((layer) => buildTar(layer));
  const hidden = new HiddenPaths(await Promise.all(tars.map((tar, index) => index === 0 ? undefined : readLayerChanges(streamOf(tar)))));
  const applier = new LayerApplier(root);
  const stats: LayerStats[] = [];
  const reopened = tars.map(() => 0);
  for (const [index, tar] of tars.entries()) {
    const reopen = () => {
      reopened[index]++;
      return streamOf(tar, 7);
    };
    stats.push(await applier.applyLayer(streamOf(tar, 7), { index }, { hidden, reopen }));
  }
  applier.finish();
  return { stats, reopened };
}

test("hardlink to a left-out file reads the layer again", async () => {
  const workspace = createWorkspace();
  try {
    const { stats, reopened } = await applyLeavingOut(workspace.root, [
      [file("bin/perl5", "interpreter", 0o751), hardlink("bin/perl", "bin/perl5"), hardlink("bin/perl-copy", "bin/perl5")],
      [marker("bin/.wh.perl5")],
    ]);
    assert.deepEqual(reopened, [1, 0]);
    assert.equal(stats[0].hidden, 0, "the file written back is not counted");
    const nodes = snapshot(workspace.root);
    assert.deepEqual([...nodes.keys()], ["bin", "bin/perl", "bin/perl-copy"]);
    for (const name of ["bin/perl", "bin/perl-copy"]) {
      assert.equal(nodes.get(name)!.content, "interpreter");
      assert.equal(nodes.get(name)!.mode, 0o751);
      assert.equal(nodes.get(name)!.nlink, 2);
    }
  } finally {
    workspace.cleanup();
  }
});

test("hardlinks that are hidden too need no second read", async () => {
  const workspace = createWorkspace();
  try {
    const { stats, reopened } = await applyLeavingOut(workspace.root, [
      [file("usr/bin/perl5.36", "old"), hardlink("usr/bin/perl", "usr/bin/perl5.36")],
      [file("usr/bin/perl5.36", "new"), hardlink("usr/bin/perl", "usr/bin/perl5.36")],
    ]);
    assert.deepEqual(reopened, [0, 0]);
    assert.equal(stats[0].hidden, 2);
    assert.equal(stats[0].hardlinks, 0);
    const nodes = snapshot(workspace.root);
    assert.equal(nodes.get("usr/bin/perl")!.content, "new");
    assert.equal(nodes.get("usr/bin/perl")!.nlink, 2);
  } finally {
    workspace.cleanup();
  }
});

// ---------------------------------------------------------------------------
// Fuzz: random layers over a few names, applied both ways.

const FUZZ_ITERATIONS = 400;
const settings = fuzzSettings(0x1eaf_0075, FUZZ_ITERATIONS, 10_000);

/** Directory names; a few entries of other kinds use them too, to replace directories. */
const DIRS = ["a", "b", "c"];
const LEAVES = ["f", "g", "h"];

function randomDirectory(rng: Prng, depth = rng.range(1, 2)): string {
  const parts: string[] = [];
  for (let i = 0; i < depth; i++) parts.push(rng.pick(DIRS));
  return parts.join("/");
}

/** Returns a path for a non-directory: mostly a leaf name below zero to two directories. */
function randomLeaf(rng: Prng): string {
  if (rng.chance(0.1)) return randomDirectory(rng);
  const base = rng.pick(LEAVES);
  return rng.chance(0.2) ? base : `${randomDirectory(rng)}/${base}`;
}

function randomEntry(rng: Prng, earlier: string[]): TarEntrySpec {
  const mtime = 1_600_000_000 + rng.int(1000);
  const roll = rng.int(100);
  if (roll < 20) return { path: `${randomDirectory(rng)}/`, type: "dir", mode: rng.pick([0o755, 0o700, 0o555]), mtime };
  if (roll < 60) {
    const name = randomLeaf(rng);
    return { path: name, content: `${name}@${rng.int(100)}`, mode: rng.pick([0o644, 0o600, 0o4755]), mtime };
  }
  if (roll < 68) {
    // Symlinks to directories, so that later entries may resolve through them.
    const target = rng.pick([rng.pick(DIRS), `../${rng.pick(DIRS)}`, `/${randomDirectory(rng)}`, rng.pick(LEAVES)]);
    const name = rng.chance(0.6) ? randomDirectory(rng) : randomLeaf(rng);
    return { path: name, type: "symlink", linkname: target, mtime };
  }
  if (roll < 82) {
    const target = earlier.length > 0 && rng.chance(0.85) ? rng.pick(earlier) : randomLeaf(rng);
    return { path: randomLeaf(rng), type: "hardlink", linkname: target, mtime };
  }
  const parent = rng.chance(0.3) ? "" : `${randomDirectory(rng)}/`;
  if (roll < 96) return { path: `${parent}.wh.${rng.chance(0.5) ? rng.pick(DIRS) : rng.pick(LEAVES)}`, content: "" };
  return { path: `${parent}.wh..wh..opq`, content: "" };
}

test(`leaving out hidden entries changes nothing, fuzz, seed ${formatSeed(settings.seed)}`, async () => {
  const outcomes = { applied: 0, failed: 0, leftOut: 0 };
  for (let iteration = 0; iteration < settings.iterations; iteration++) {
    const rng = new Prng(iterationSeed(settings.seed, iteration));
    const earlier: string[] = [];
    const layers: TarEntrySpec[][] = [];
    for (let k = rng.range(2, 4); k > 0; k--) {
      const layer: TarEntrySpec[] = [];
      for (let n = rng.range(1, 10); n > 0; n--) {
        const entry = randomEntry(rng, earlier);
        layer.push(entry);
        if (entry.type === undefined && !String(entry.path).includes(".wh.")) earlier.push(String(entry.path));
      }
      layers.push(layer);
    }

    const workspace = createWorkspace();
    try {
      // applyEntries applies both ways and fails unless both give the same tree, warnings and error.
      // Some iterations know the changes of only some layers, as a first stage may.
      const known = layers.map(() => rng.chance(0.75));
      const applied = await applyEntries(workspace.root, layers, { known });
      outcomes.applied++;
      if (applied.leftOut!.stats.some((stats) => stats.hidden > 0)) outcomes.leftOut++;
    } catch (error) {
      if (!(error instanceof LayerError)) {
        const replay = `OCISTAGE_FUZZ_SEED=${formatSeed(settings.seed)}, iteration ${iteration}`;
        assert.fail(`${replay}: ${error instanceof Error ? error.message : error}\nlayers: ${JSON.stringify(layers)}`);
      }
      outcomes.failed++;
    } finally {
      workspace.cleanup();
    }
  }
  // The generator must keep producing both outcomes and hidden entries, or the test checks little.
  if (settings.iterations >= 200) {
    assert.ok(outcomes.applied > settings.iterations / 4, JSON.stringify(outcomes));
    assert.ok(outcomes.failed > 0, JSON.stringify(outcomes));
    assert.ok(outcomes.leftOut > settings.iterations / 10, JSON.stringify(outcomes));
  }
});
