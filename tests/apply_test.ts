import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { spawnSync } from "node:child_process";
import process from "node:process";

import { applyLayers, LayerApplier } from "../src/layer/apply.ts";
import { compressionFromMediaType, decompressStream } from "../src/layer/decompress.ts";
import { LayerError } from "../src/errors.ts";
import type { WarningEvent } from "../src/progress.ts";
import { buildGlobalHeader, buildTar, gzipBytes, streamOf, type TarEntrySpec, zstdBytes } from "./fixtures/tar.ts";
import { type Applied, applyEntries, createWorkspace, type LayerSpec, snapshot, type TreeNode } from "./fixtures/workspace.ts";

const isRoot = process.getuid?.() === 0;

/** Applies `layers` into a fresh workspace, runs `check` on the root, and removes the workspace. */
async function withLayers(
  layers: LayerSpec[],
  check: (root: string, applied: Applied) => void | Promise<void>,
  options: { owners?: boolean; chunkSize?: number } = {},
): Promise<void> {
  const workspace = createWorkspace();
  try {
    const applied = await applyEntries(workspace.root, layers, options);
    await check(workspace.root, applied);
  } finally {
    workspace.cleanup();
  }
}

/** Asserts that applying `layers` fails with a LayerError matching `pattern`, and returns the error. */
async function expectLayerError(layers: LayerSpec[], pattern: RegExp): Promise<LayerError> {
  const workspace = createWorkspace();
  try {
    let caught: unknown;
    try {
      await applyEntries(workspace.root, layers);
    } catch (error) {
      caught = error;
    }
    assert.ok(caught instanceof LayerError, `expected LayerError, got ${caught}`);
    assert.match(caught.message, pattern);
    return caught;
  } finally {
    workspace.cleanup();
  }
}

function node(root: string, name: string): TreeNode {
  const found = snapshot(root).get(name);
  assert.ok(found, `expected "${name}" in the staged tree`);
  return found;
}

function assertFile(root: string, name: string, content: string, mode?: number): void {
  const found = node(root, name);
  assert.equal(found.type, "file", `${name} type`);
  assert.equal(found.content, content, `${name} content`);
  if (mode !== undefined) assert.equal(found.mode, mode, `${name} mode`);
}

function assertDir(root: string, name: string, mode?: number): void {
  const found = node(root, name);
  assert.equal(found.type, "dir", `${name} type`);
  if (mode !== undefined) assert.equal(found.mode, mode, `${name} mode`);
}

function assertSymlink(root: string, name: string, linkname: string): void {
  const found = node(root, name);
  assert.equal(found.type, "symlink", `${name} type`);
  assert.equal(found.linkname, linkname, `${name} target`);
}

function assertAbsent(root: string, ...names: string[]): void {
  const tree = snapshot(root);
  for (const name of names) assert.equal(tree.has(name), false, `expected "${name}" to be absent`);
}

function warnings(applied: Applied): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const event of applied.events) {
    if (event.type === "warning") counts[event.code] = (counts[event.code] ?? 0) + event.count;
  }
  return counts;
}

const dir = (name: string, mode = 0o755): TarEntrySpec => ({ path: name, type: "dir", mode });
const file = (name: string, content: string, mode = 0o644): TarEntrySpec => ({ path: name, content, mode });
const symlink = (name: string, linkname: string): TarEntrySpec => ({ path: name, type: "symlink", linkname });
const hardlink = (name: string, linkname: string): TarEntrySpec => ({ path: name, type: "hardlink", linkname });
const marker = (name: string): TarEntrySpec => ({ path: name, content: "" });

// Cases that broke other layer appliers.

test("opaque marker hides lower children but not new ones", async () => {
  await withLayers([
    [dir("d1/"), file("d1/foobar", "")],
    [dir("d1/"), marker("d1/.wh..wh..opq"), file("d1/foo", "")],
  ], (root) => {
    assertDir(root, "d1", 0o755);
    assertFile(root, "d1/foo", "", 0o644);
    assertAbsent(root, "d1/foobar", "d1/.wh..wh..opq", "d1/.wh..opq");
  });
});

test("whiteout spares paths the layer wrote before it", async () => {
  await withLayers([
    [dir("a/"), dir("a/b/"), dir("a/b/c/"), file("a/b/c/bar", "bar")],
    [dir("a/"), dir("a/b/"), dir("a/b/c/"), file("a/b/c/foo", "foo"), marker("a/.wh.b")],
  ], (root) => {
    assertDir(root, "a/b/c", 0o755);
    assertFile(root, "a/b/c/foo", "foo");
    assertAbsent(root, "a/b/c/bar", "a/.wh.b");
  });
});

test("dot-slash names match plain names across layers", async () => {
  await withLayers([
    [dir("./"), dir("./usr/"), dir("./usr/bin/"), file("./usr/bin/date", "date"), file("./usr/bin/keep", "k")],
    [dir("usr/"), dir("usr/bin/"), marker("usr/bin/.wh.date")],
    [dir("./usr/bin/"), marker("./usr/bin/.wh.keep"), file("./usr/bin/keep", "k2")],
  ], (root) => {
    assertDir(root, "usr/bin", 0o755);
    assertFile(root, "usr/bin/keep", "k2");
    assertAbsent(root, "usr/bin/date", "usr/bin/.wh.date", "usr/bin/.wh.keep");
  });
});

test("whiteout of a symlink removes only the link", async () => {
  await withLayers([
    [
      dir("etc/"),
      dir("usr/"),
      dir("usr/share/"),
      dir("usr/share/zoneinfo/"),
      dir("usr/share/zoneinfo/Etc/"),
      file("usr/share/zoneinfo/Etc/UTC", "TZif"),
      symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC"),
    ],
    [dir("etc/"), marker("etc/.wh.localtime")],
  ], (root) => {
    assertDir(root, "etc", 0o755);
    assertFile(root, "usr/share/zoneinfo/Etc/UTC", "TZif");
    assertAbsent(root, "etc/localtime");
  });
});

test("whiteout with an empty, dot or dot-dot name is rejected", async () => {
  const cases: LayerSpec[][] = [
    [[dir("etc/"), file("etc/passwd", "root:x:0:0"), file("etc/hosts", "127.0.0.1 localhost")], [dir("etc/"), marker("etc/.wh.")]],
    [[file("keep", "k")], [marker(".wh."), file("etc/config.txt", "c")]],
    [[file("keep", "k")], [marker(".wh...")]],
    [[file("keep", "k")], [marker(".wh..")]],
  ];
  for (const layers of cases) {
    const workspace = createWorkspace();
    try {
      const before = snapshot(workspace.base);
      await assert.rejects(applyEntries(workspace.root, layers), (error: unknown) => {
        assert.ok(error instanceof LayerError);
        assert.match(error.message, /names no file/);
        assert.equal(error.layer, "sha256:layer1");
        return true;
      });
      const after = snapshot(workspace.base);
      assert.equal(after.get("outside/secret.txt")?.content, "do not touch");
      for (const name of before.keys()) {
        if (!name.startsWith("root/")) assert.ok(after.has(name), `"${name}" was removed`);
      }
      const staged = snapshot(workspace.root);
      if (staged.has("etc/passwd")) assert.equal(staged.get("etc/passwd")?.content, "root:x:0:0");
      if (staged.has("keep")) assert.equal(staged.get("keep")?.content, "k");
      assert.ok(staged.has("etc/passwd") || staged.has("keep"), "the lower layer's files were removed");
    } finally {
      workspace.cleanup();
    }
  }
});

test("hardlinked peer survives a whiteout of the original", async () => {
  await withLayers([
    [file("LINK-A", "data"), hardlink("LINK-Z", "LINK-A")],
    [marker(".wh.LINK-A")],
  ], (root) => {
    assertFile(root, "LINK-Z", "data", 0o644);
    assertAbsent(root, "LINK-A");
  });
});

test("absolute hardlink target resolves inside the root", async () => {
  await withLayers([
    [dir("usr/"), dir("usr/bin/"), file("usr/bin/perlbug", "#!/usr/bin/perl\n", 0o755), hardlink("usr/bin/perlthanks", "/usr/bin/perlbug")],
  ], (root) => {
    assertFile(root, "usr/bin/perlbug", "#!/usr/bin/perl\n", 0o755);
    assertFile(root, "usr/bin/perlthanks", "#!/usr/bin/perl\n", 0o755);
    assert.equal(node(root, "usr/bin/perlthanks").ino, node(root, "usr/bin/perlbug").ino);
  });
});

test("root directory member is skipped", async () => {
  const workspace = createWorkspace();
  try {
    fs.chmodSync(workspace.root, 0o751);
    await applyEntries(workspace.root, [[dir("/", 0o700), dir("./", 0o700), file("hello", "hi")]]);
    assert.equal(fs.statSync(workspace.root).mode & 0o777, 0o751);
  } finally {
    workspace.cleanup();
  }
});

test("hardlink target climbing above the root is rejected", async () => {
  const error = await expectLayerError([[file("a", "x"), hardlink("b", "/../victim")]], /climbs above the root/);
  assert.equal(error.entry, "b");
  assert.equal(error.layer, "sha256:layer0");
});

test("hardlinks create their missing parents", async () => {
  await withLayers([
    [
      file("bin/app.repo_mapping", "m", 0o755),
      file("bin/app", "ELF", 0o755),
      file("bin/app.runfiles/_main/main.go", "package main", 0o755),
      hardlink("bin/app.runfiles/_repo_mapping", "bin/app.repo_mapping"),
      hardlink("bin/app.runfiles/_main/app_/app", "bin/app"),
    ],
  ], (root) => {
    for (const name of ["bin", "bin/app.runfiles", "bin/app.runfiles/_main", "bin/app.runfiles/_main/app_"]) {
      assertDir(root, name, 0o755);
    }
    assertFile(root, "bin/app", "ELF", 0o755);
    assertFile(root, "bin/app.repo_mapping", "m", 0o755);
    assertFile(root, "bin/app.runfiles/_main/main.go", "package main", 0o755);
    assert.equal(node(root, "bin/app.runfiles/_main/app_/app").ino, node(root, "bin/app").ino);
    assert.equal(node(root, "bin/app.runfiles/_repo_mapping").ino, node(root, "bin/app.repo_mapping").ino);
  });
});

test("directory over directory takes the new mode", async () => {
  await withLayers([[dir("foobar/", 0o700)], [dir("foobar/", 0o755)]], (root) => {
    assertDir(root, "foobar", 0o755);
  });
});

const readOnlyLayers: TarEntrySpec[][] = [
  [
    dir("root/", 0o550),
    file("root/.bash_logout", "x"),
    dir("usr/"),
    dir("usr/bin/", 0o555),
    file("usr/bin/true", "t", 0o755),
    dir("etc/"),
    file("etc/gshadow", "old", 0o000),
  ],
  [dir("usr/bin/", 0o555), file("usr/bin/false", "f", 0o755), dir("etc/"), file("etc/gshadow", "new", 0o000)],
];

test("read-only directories do not block later layers", async () => {
  await withLayers(readOnlyLayers, (root) => {
    assertDir(root, "root", 0o750);
    assertFile(root, "root/.bash_logout", "x", 0o644);
    assertDir(root, "usr/bin", 0o755);
    assertFile(root, "usr/bin/true", "t", 0o755);
    assertFile(root, "usr/bin/false", "f", 0o755);
    assertFile(root, "etc/gshadow", "new", 0o400);
  });
});

test("read-only directories do not block a non-root user", { skip: !isRoot && "needs root to switch to nobody" }, () => {
  const workspace = createWorkspace();
  try {
    fs.chmodSync(workspace.base, 0o755);
    fs.chownSync(workspace.root, 65534, 65534);
    const layersFile = path.join(workspace.base, "layers.json");
    const layers = readOnlyLayers.map((entries) => Array.from(buildTar(entries)));
    fs.writeFileSync(layersFile, JSON.stringify(layers));
    const script = `
      import { readFileSync } from "node:fs";
      import { applyLayers } from ${JSON.stringify(path.resolve("src/layer/apply.ts"))};
      const layers = JSON.parse(readFileSync(${JSON.stringify(layersFile)}, "utf8"));
      await applyLayers(${JSON.stringify(workspace.root)}, layers.map((bytes) => ({
        tar: new Blob([new Uint8Array(bytes)]).stream(),
      })));
    `;
    const deno = path.resolve("node_modules/.bin/deno");
    const result = spawnSync(
      "setpriv",
      ["--reuid=65534", "--regid=65534", "--clear-groups", "--", deno, "eval", "--quiet", script],
      { encoding: "utf8", env: { ...process.env, HOME: workspace.base, DENO_DIR: path.join(workspace.base, ".deno") } },
    );
    assert.equal(result.status, 0, result.stderr);
    const tree = snapshot(workspace.root);
    assert.equal(tree.get("usr/bin")?.mode, 0o755);
    assert.equal(tree.get("usr/bin/false")?.content, "f");
    assert.equal(tree.get("etc/gshadow")?.content, "new");
    assert.equal(tree.get("etc/gshadow")?.mode, 0o400);
    assert.equal(tree.get("etc/gshadow")?.uid, 65534);
    assert.equal(tree.get("root")?.mode, 0o750);
  } finally {
    workspace.cleanup();
  }
});

test("devices, FIFOs and entries below dev are dropped", async () => {
  await withLayers([
    [
      dir("dev/"),
      { path: "dev/agpgart", type: "char", mode: 0o660, devmajor: 10, devminor: 175 },
      { path: "dev/null", type: "char", mode: 0o666, devmajor: 1, devminor: 3 },
      file("dev/readme.txt", "regular file under dev"),
      file("./dev/extra.txt", "prefixed regular file under dev"),
      { path: "./dev/console", type: "char", mode: 0o600, devmajor: 5, devminor: 1 },
      dir("run/"),
      { path: "run/initctl", type: "fifo", mode: 0o600 },
      { path: "run/loop0", type: "block", devmajor: 7, devminor: 0 },
      dir("etc/"),
      file("etc/hostname", "box"),
    ],
  ], (root, applied) => {
    assertDir(root, "dev", 0o755);
    assertDir(root, "run", 0o755);
    assertFile(root, "etc/hostname", "box");
    assertAbsent(root, "dev/agpgart", "dev/null", "dev/readme.txt", "dev/extra.txt", "dev/console", "run/initctl", "run/loop0");
    assert.deepEqual(warnings(applied), { "dev-entry-dropped": 5, "fifo-dropped": 1, "device-dropped": 1 });
    assert.equal(applied.stats[0].dropped, 7);
    const event = applied.events.find((e) => e.type === "warning" && e.code === "dev-entry-dropped") as WarningEvent;
    assert.equal(event.layer, "sha256:layer0");
    assert.match(event.message, /dropped 5 entries below dev\/ of layer sha256:layer0/);
  });
});

test("duplicate path in one layer: last member wins", async () => {
  await withLayers([
    [
      dir("usr/"),
      dir("usr/share/"),
      dir("usr/share/licenses/"),
      dir("usr/share/licenses/systemd/"),
      file("usr/share/licenses/systemd/LICENSE.LGPL2.1", "first"),
      file("usr/share/licenses/systemd/LICENSE.LGPL2.1", "second"),
    ],
  ], (root) => {
    assertFile(root, "usr/share/licenses/systemd/LICENSE.LGPL2.1", "second", 0o644);
  });
});

test("directory after a symlink of the same name replaces it", async () => {
  await withLayers([
    [dir("usr/"), dir("usr/lib/"), symlink("lib", "usr/lib"), dir("lib/"), file("lib/x", "x")],
  ], (root) => {
    assertDir(root, "lib", 0o755);
    assertFile(root, "lib/x", "x");
    assertDir(root, "usr/lib");
    assertAbsent(root, "usr/lib/x");
  });
});

test("symlink parent pointing outside the root fails", async () => {
  const workspace = createWorkspace();
  try {
    const outsideTarget = path.join(workspace.base, "ocistage-outside");
    await assert.rejects(
      applyEntries(workspace.root, [[symlink("pwn", outsideTarget), file("pwn/escaped.txt", "owned")]]),
      (error: unknown) => error instanceof LayerError && /does not exist in the image/.test(error.message),
    );
    assert.equal(fs.existsSync(outsideTarget), false);
    assertSymlink(workspace.root, "pwn", outsideTarget);
  } finally {
    workspace.cleanup();
  }
});

test("absolute symlink parent resolves inside the root", async () => {
  await withLayers([
    [dir("etc/"), dir("etc/cron.d/"), symlink("data", "/etc")],
    [file("data/cron.d/evil", "* * * * * root sh")],
  ], (root) => {
    assertSymlink(root, "data", "/etc");
    assertFile(root, "etc/cron.d/evil", "* * * * * root sh");
    assert.equal(fs.existsSync("/etc/cron.d/evil"), false);
  });
});

const longDir = "opt/" + "a".repeat(150);
const longLink = "opt/" + "b".repeat(150);

test("GNU long names and link names", async () => {
  await withLayers([
    [dir("opt/"), { ...file(`${longDir}/file.txt`, "hi"), longName: "gnu" }, { ...symlink("opt/link", longLink), longName: "gnu" }],
  ], (root) => {
    assertFile(root, `${longDir}/file.txt`, "hi", 0o644);
    assertSymlink(root, "opt/link", longLink);
    assertAbsent(root, "././@LongLink", "@LongLink");
  });
});

test("PAX long names and link names", async () => {
  await withLayers([
    [dir("opt/"), { ...file(`${longDir}/file.txt`, "hi"), longName: "pax" }, { ...symlink("opt/link", longLink), longName: "pax" }],
  ], (root) => {
    assertFile(root, `${longDir}/file.txt`, "hi");
    assertSymlink(root, "opt/link", longLink);
    assertAbsent(root, "PaxHeader");
  });
});

test("base-256 and PAX sizes", async () => {
  const big = new Uint8Array(3 * 1024 * 1024 + 17).fill(0x61);
  const text = new TextDecoder().decode(big);
  await withLayers([
    [
      { path: "big.img", content: big, base256Size: true },
      { path: "pax.img", content: big, size: 0, pax: { size: String(big.length) } },
      file("after.txt", "after"),
    ],
  ], (root, applied) => {
    assertFile(root, "big.img", text);
    assertFile(root, "pax.img", text);
    assertFile(root, "after.txt", "after");
    assert.equal(applied.stats[0].bytes, 2 * big.length + 5);
  }, { chunkSize: 65536 });
});

test("empty layers change nothing", async () => {
  for (const empty of [new Uint8Array(0), new Uint8Array(10240), new Uint8Array(1024)]) {
    await withLayers([[file("hello", "hi")], empty], (root, applied) => {
      assertFile(root, "hello", "hi");
      assert.equal(snapshot(root).size, 1);
      assert.equal(applied.stats[1].entries, 0);
    });
  }
});

test("zstd layer by media type", async () => {
  const workspace = createWorkspace();
  try {
    const blob = zstdBytes(buildTar([dir("etc/"), file("etc/os-release", "ID=debian")]));
    const compression = compressionFromMediaType("application/vnd.oci.image.layer.v1.tar+zstd");
    assert.equal(compression, "zstd");
    const applier = new LayerApplier(workspace.root);
    await applier.applyLayer(decompressStream(streamOf(blob, 100), compression!), { digest: "sha256:z" });
    applier.finish();
    assertFile(workspace.root, "etc/os-release", "ID=debian", 0o644);
  } finally {
    workspace.cleanup();
  }
});

// Rules of the applier.

test("modes keep special bits and add owner access", async () => {
  await withLayers([
    [
      file("suid", "s", 0o4755),
      file("sgid", "g", 0o2711),
      file("none", "n", 0o000),
      file("wo", "w", 0o222),
      dir("sticky/", 0o1777),
      dir("closed/", 0o000),
      dir("closed/inner/", 0o500),
      file("closed/inner/f", "f", 0o444),
    ],
  ], (root) => {
    assertFile(root, "suid", "s", 0o4755);
    assertFile(root, "sgid", "g", 0o2711);
    assertFile(root, "none", "n", 0o400);
    assertFile(root, "wo", "w", 0o622);
    assertDir(root, "sticky", 0o1777);
    assertDir(root, "closed", 0o700);
    assertDir(root, "closed/inner", 0o700);
    assertFile(root, "closed/inner/f", "f", 0o444);
  });
});

test("mtimes of files, directories and symlinks", async () => {
  await withLayers([
    [
      { ...dir("d/"), mtime: 1_000_000_000 },
      { ...file("d/f", "x"), mtime: 1_100_000_000 },
      { ...symlink("d/l", "f"), mtime: 1_200_000_000 },
      { ...file("d/g", "late"), mtime: 1_300_000_000 },
    ],
  ], (root) => {
    assert.equal(node(root, "d").mtime, 1_000_000_000);
    assert.equal(node(root, "d/f").mtime, 1_100_000_000);
    assert.equal(node(root, "d/l").mtime, 1_200_000_000);
    assert.equal(node(root, "d/g").mtime, 1_300_000_000);
  });
});

test("owners applied when requested", { skip: !isRoot && "needs root" }, async () => {
  const layer = [
    { ...dir("d/"), uid: 1234, gid: 4321 },
    { ...file("d/f", "x", 0o4755), uid: 1234, gid: 4321 },
    { ...symlink("d/l", "f"), uid: 2222, gid: 3333 },
  ];
  await withLayers([layer], (root) => {
    assert.equal(node(root, "d").uid, 1234);
    assert.equal(node(root, "d").gid, 4321);
    assert.equal(node(root, "d/f").uid, 1234);
    assert.equal(node(root, "d/f").mode, 0o4755);
    assert.equal(node(root, "d/l").uid, 2222);
    assert.equal(node(root, "d/l").gid, 3333);
  }, { owners: true });
  await withLayers([layer], (root) => {
    assert.equal(node(root, "d").uid, process.getuid!());
    assert.equal(node(root, "d/f").uid, process.getuid!());
    assert.equal(node(root, "d/l").uid, process.getuid!());
  }, { owners: false });
});

test("xattrs are counted and not applied", async () => {
  await withLayers([
    [
      { ...file("a", "1"), pax: { "SCHILY.xattr.security.capability": "x" } },
      { ...file("b", "2"), pax: { "SCHILY.xattr.user.one": "1", "SCHILY.xattr.user.two": "2" } },
      file("c", "3"),
    ],
  ], (root, applied) => {
    assertFile(root, "a", "1");
    assert.deepEqual(warnings(applied), { "xattr-ignored": 2 });
  });
});

test("file replaces a directory and directory replaces a file", async () => {
  await withLayers([
    [dir("x/"), file("x/inner", "i"), file("y", "file")],
    [file("x", "now a file"), dir("y/"), file("y/inner", "now a dir")],
  ], (root) => {
    assertFile(root, "x", "now a file");
    assertDir(root, "y");
    assertFile(root, "y/inner", "now a dir");
    assertAbsent(root, "x/inner");
  });
});

test("replacing a hardlinked file keeps the peer", async () => {
  await withLayers([
    [file("a", "old"), hardlink("b", "a")],
    [file("a", "new")],
  ], (root) => {
    assertFile(root, "a", "new");
    assertFile(root, "b", "old");
  });
});

test("hardlink to a missing target fails", async () => {
  const error = await expectLayerError([[hardlink("b", "nowhere")]], /points to "nowhere", which does not exist/);
  assert.equal(error.entry, "b");
});

test("hardlink to a directory fails", async () => {
  await expectLayerError([[dir("d/"), hardlink("b", "d")]], /which is a directory/);
});

test("hardlink to itself keeps the file", async () => {
  await withLayers([[file("a", "x"), hardlink("a", "a")]], (root) => {
    assertFile(root, "a", "x");
  });
});

test("hardlink to a dropped entry is dropped", async () => {
  await withLayers([
    [{ path: "run/fifo", type: "fifo" }, hardlink("run/peer", "run/fifo"), hardlink("null2", "dev/null")],
  ], (root, applied) => {
    assertAbsent(root, "run/fifo", "run/peer", "null2");
    assert.deepEqual(warnings(applied), { "fifo-dropped": 1, "hardlink-dropped": 2 });
  });
});

test("whiteout of a missing path changes nothing", async () => {
  await withLayers([[file("keep", "k")], [marker(".wh.gone"), marker("no/such/dir/.wh.x"), marker("nodir/.wh..wh..opq")]], (root, applied) => {
    assertFile(root, "keep", "k");
    assertAbsent(root, "no", "nodir");
    assert.equal(applied.stats[1].whiteouts, 3);
  });
});

test("opaque marker at the root", async () => {
  await withLayers([
    [dir("etc/"), file("etc/a", "a"), file("top", "t")],
    [file("new", "n"), marker(".wh..wh..opq"), file("later", "l")],
  ], (root) => {
    assertFile(root, "new", "n");
    assertFile(root, "later", "l");
    assertAbsent(root, "etc", "top");
  });
});

test("whiteout of a directory removes its subtree", async () => {
  await withLayers([
    [dir("a/"), dir("a/b/"), file("a/b/c", "c"), symlink("a/b/l", "/etc"), file("a/keep", "k")],
    [marker("a/.wh.b")],
  ], (root) => {
    assertAbsent(root, "a/b");
    assertFile(root, "a/keep", "k");
  });
});

test("whiteout before new content in the same layer", async () => {
  await withLayers([
    [dir("a/"), file("a/old", "o")],
    [marker(".wh.a"), dir("a/"), file("a/new", "n")],
  ], (root) => {
    assertFile(root, "a/new", "n");
    assertAbsent(root, "a/old");
  });
});

test("aufs metadata is dropped", async () => {
  await withLayers([
    [dir(".wh..wh.plnk/"), file(".wh..wh.plnk/123.456", "x"), file(".wh..wh.aufs", ""), file("kept", "k")],
  ], (root, applied) => {
    assertFile(root, "kept", "k");
    assertAbsent(root, ".wh..wh.plnk", ".wh..wh.aufs");
    assert.deepEqual(warnings(applied), { "aufs-metadata-dropped": 3 });
  });
});

test("symlink loop in a parent fails", async () => {
  const error = await expectLayerError([[symlink("a", "b"), symlink("b", "a"), file("a/x", "x")]], /more than 40 symlinks/);
  assert.equal(error.entry, "a/x");
});

test("parent that is a file fails", async () => {
  await expectLayerError([[file("f", "x"), file("f/g", "y")]], /parent "\/f" of entry "f\/g" is not a directory/);
});

test("relative symlink parent resolves chroot-style", async () => {
  await withLayers([
    [dir("usr/"), dir("usr/lib/"), symlink("lib", "usr/lib"), symlink("usr/lib64", "../../../../usr/lib")],
    [file("lib/a", "a"), file("usr/lib64/b", "b")],
  ], (root) => {
    assertFile(root, "usr/lib/a", "a");
    assertFile(root, "usr/lib/b", "b");
    assertSymlink(root, "lib", "usr/lib");
  });
});

test("large file written in chunks", async () => {
  const content = new Uint8Array(5 * 1024 * 1024 + 3).map((_, i) => 0x61 + (i % 26));
  await withLayers([[{ path: "big", content }]], (root) => {
    const written = fs.readFileSync(path.join(root, "big"));
    assert.equal(written.length, content.length);
    assert.ok(written.equals(content));
  }, { chunkSize: 1000 });
});

test("stats count each kind of entry", async () => {
  await withLayers([
    [file("a", "1"), file("b", "22")],
    [dir("d/"), file("d/f", "333"), symlink("s", "d"), hardlink("h", "a"), marker(".wh.b"), { path: "p", type: "fifo" }],
  ], (_root, applied) => {
    assert.deepEqual(applied.stats[1], {
      entries: 6,
      files: 1,
      directories: 1,
      symlinks: 1,
      hardlinks: 1,
      whiteouts: 1,
      dropped: 1,
      bytes: 3,
      hidden: 0,
    });
  });
});

test("global PAX header is not an entry", async () => {
  const tar = new Uint8Array([...buildGlobalHeader({ comment: "built by test" }), ...buildTar([file("a", "1")])]);
  await withLayers([tar], (root) => {
    assertFile(root, "a", "1");
    assertAbsent(root, "pax_global_header");
  });
});

test("layer stream is read to its end", async () => {
  const workspace = createWorkspace();
  try {
    const tar = new Uint8Array([...buildTar([file("a", "1")]), ...new Uint8Array(4096), 1, 2, 3]);
    let read = 0;
    const counted = streamOf(tar, 500).pipeThrough(new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        read += chunk.length;
        controller.enqueue(chunk);
      },
    }));
    const events: WarningEvent[] = [];
    const applier = new LayerApplier(workspace.root, { onEvent: (event) => events.push(event as WarningEvent) });
    await applier.applyLayer(counted, { digest: "sha256:t" });
    assert.equal(read, tar.length);
    assert.equal(events.length, 1);
    assert.equal(events[0].code, "trailing-data");
    assert.equal(events[0].count, 3);
  } finally {
    workspace.cleanup();
  }
});

test("stream error passes through unchanged", async () => {
  const workspace = createWorkspace();
  try {
    const failure = new Error("digest mismatch");
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(buildTar([file("a", "1")], { end: false }));
      },
      pull(controller) {
        controller.error(failure);
      },
    });
    const applier = new LayerApplier(workspace.root);
    await assert.rejects(applier.applyLayer(stream), (error) => error === failure);
  } finally {
    workspace.cleanup();
  }
});

test("applyLayers applies gzip layers in order", async () => {
  const workspace = createWorkspace();
  try {
    const layers = [
      [dir("etc/", 0o555), file("etc/a", "1")],
      [file("etc/a", "2"), file("etc/b", "3")],
    ].map((entries, index) => ({
      digest: `sha256:${index}`,
      tar: decompressStream(streamOf(gzipBytes(buildTar(entries))), "gzip"),
    }));
    await applyLayers(workspace.root, layers);
    assertFile(workspace.root, "etc/a", "2");
    assertFile(workspace.root, "etc/b", "3");
    assertDir(workspace.root, "etc", 0o755);
  } finally {
    workspace.cleanup();
  }
});

test("LayerApplier rejects a missing root", () => {
  assert.throws(() => new LayerApplier("/nonexistent/ocistage-root"), TypeError);
});

test("error in a later entry names the layer and entry", async () => {
  const error = await expectLayerError([[file("ok", "1")], [file("fine", "2"), { path: "disk.img", type: { flag: "S" } }]], /sparse/);
  assert.equal(error.layer, "sha256:layer1");
  assert.equal(error.entry, "disk.img");
});

// Malformed layers, each through gzip or zstd decompression and the applier, with a defined outcome.

interface MalformedCase {
  name: string;
  /** The compressed blob as stored in the registry. */
  blob: () => Uint8Array;
  /** A pattern for the expected LayerError message, or the files expected in the tree. */
  outcome: RegExp | Record<string, string>;
}

const good = () => buildTar([file("a", "1"), file("b", "2")]);

const malformedCases: MalformedCase[] = [
  {
    name: "bad header checksum",
    blob: () => gzipBytes(buildTar([file("a", "1"), file("b", "2")], { corruptChecksumAt: 1 })),
    outcome: /invalid checksum/,
  },
  {
    name: "truncated header",
    blob: () => gzipBytes(good().subarray(0, 1024 + 200)),
    outcome: /truncated inside the header/,
  },
  {
    name: "truncated body",
    blob: () => gzipBytes(buildTar([{ path: "a", content: new Uint8Array(4000) }]).subarray(0, 2048)),
    outcome: /truncated inside the body of entry "a"/,
  },
  {
    name: "size beyond the end",
    blob: () => gzipBytes(buildTar([{ path: "a", content: "1", size: 1_000_000 }])),
    outcome: /truncated inside the body of entry "a"/,
  },
  {
    name: "truncated zstd tar",
    blob: () => zstdBytes(buildTar([{ path: "a", content: new Uint8Array(4000) }]).subarray(0, 2048)),
    outcome: /truncated inside the body of entry "a"/,
  },
  {
    name: "trailing garbage after the end marker",
    blob: () => gzipBytes(new Uint8Array([...good(), ...buildTar([file("hidden", "x")])])),
    outcome: { a: "1", b: "2" },
  },
  {
    name: "trailing zero padding",
    blob: () => gzipBytes(new Uint8Array([...good(), ...new Uint8Array(20 * 512)])),
    outcome: { a: "1", b: "2" },
  },
  {
    name: "missing end marker",
    blob: () => gzipBytes(buildTar([file("a", "1"), file("b", "2")], { end: false })),
    outcome: { a: "1", b: "2" },
  },
  {
    name: "multi-member gzip",
    blob: () => {
      const tar = good();
      return new Uint8Array([...gzipBytes(tar.subarray(0, 700)), ...gzipBytes(tar.subarray(700))]);
    },
    outcome: { a: "1", b: "2" },
  },
  {
    name: "corrupt gzip",
    blob: () => {
      const blob = gzipBytes(buildTar([{ path: "a", content: new Uint8Array(50_000).map((_, i) => i % 253) }])).slice();
      for (let i = 30; i < 60; i++) blob[i] ^= 0xff;
      return blob;
    },
    outcome: /gzip decompression of the layer failed/,
  },
  {
    name: "zero-byte blob",
    blob: () => new Uint8Array(0),
    outcome: {},
  },
  {
    name: "gzip of nothing",
    blob: () => gzipBytes(new Uint8Array(0)),
    outcome: {},
  },
  {
    name: "sparse entry",
    blob: () => gzipBytes(buildTar([file("a", "1"), { path: "disk.img", type: { flag: "S" }, content: "x" }])),
    outcome: /"disk.img" is a sparse file/,
  },
  {
    name: "PAX sparse entry",
    blob: () => gzipBytes(buildTar([{ path: "GNUSparseFile.0/disk", content: "x", pax: { "GNU.sparse.major": "1" } }])),
    outcome: /sparse file/,
  },
  {
    name: "unknown type",
    blob: () => gzipBytes(buildTar([{ path: "odd", type: { flag: "X" } }])),
    outcome: /"odd" has unsupported type 'X'/,
  },
  {
    name: "volume label",
    blob: () => gzipBytes(buildTar([{ path: "label", type: { flag: "V" } }])),
    outcome: /volume label/,
  },
  {
    name: "huge PAX record",
    blob: () => gzipBytes(buildTar([{ path: "a", content: "1", pax: { comment: "c".repeat(2 * 1024 * 1024) } }])),
    outcome: /over the limit of 1048576/,
  },
  {
    name: "huge GNU long name",
    blob: () => gzipBytes(buildTar([{ path: "n".repeat(1024 * 1024 + 1), content: "1", longName: "gnu" }])),
    outcome: /over the limit of 1048576/,
  },
];

for (const malformed of malformedCases) {
  test(`malformed layer: ${malformed.name}`, async () => {
    const workspace = createWorkspace();
    try {
      const blob = malformed.blob();
      const applier = new LayerApplier(workspace.root);
      const layer = applier.applyLayer(decompressStream(streamOf(blob, 1000), "auto"), { digest: "sha256:bad" });
      if (malformed.outcome instanceof RegExp) {
        const pattern = malformed.outcome;
        await assert.rejects(layer, (error: unknown) => {
          assert.ok(error instanceof LayerError, `expected LayerError, got ${error}`);
          assert.match(error.message, pattern);
          return true;
        });
        return;
      }
      await layer;
      applier.finish();
      const files: Record<string, string> = {};
      for (const [name, found] of snapshot(workspace.root)) files[name] = found.content ?? found.type;
      assert.deepEqual(files, malformed.outcome);
    } finally {
      workspace.cleanup();
    }
  });
}

test("name length limits are checked before writing", async () => {
  await withLayers([[file(`d/${"é".repeat(127)}`, "ok"), file(`${"p/".repeat(500)}f`, "deep")]], (root) => {
    assertFile(root, `d/${"é".repeat(127)}`, "ok");
    assertFile(root, `${"p/".repeat(500)}f`, "deep");
  });
  for (const [name, pattern] of [
    [`d/${"é".repeat(128)}`, /more than 255 bytes/],
    [`${"p/".repeat(2100)}f`, /too long to stage/],
  ] as const) {
    const workspace = createWorkspace();
    try {
      await assert.rejects(applyEntries(workspace.root, [[file(name, "x")]]), pattern);
      assert.deepEqual(fs.readdirSync(workspace.root), []);
    } finally {
      workspace.cleanup();
    }
  }
});

test("each entry type replaces an existing path", async () => {
  await withLayers([
    [file("t", "target"), file("f", "old"), dir("d/"), file("d/inner", "i"), symlink("s", "t"), dir("e/")],
    [symlink("d", "t"), hardlink("f", "t"), file("s", "now a file"), hardlink("e", "t")],
  ], (root) => {
    assertSymlink(root, "d", "t");
    assertFile(root, "f", "target");
    assert.equal(node(root, "f").ino, node(root, "t").ino);
    assertFile(root, "s", "now a file");
    assertFile(root, "e", "target");
    assertAbsent(root, "d/inner");
  });
});

test("owner id out of range is a LayerError", async () => {
  for (const [field, type] of [["uid", "dir"], ["gid", "dir"], ["uid", "file"], ["uid", "symlink"]] as const) {
    const workspace = createWorkspace();
    try {
      const entry: TarEntrySpec = { path: "x", type, linkname: type === "symlink" ? "t" : undefined, pax: { [field]: "102438405362" } };
      let caught: unknown;
      try {
        await applyEntries(workspace.root, [[entry]], { owners: true });
      } catch (error) {
        caught = error;
      }
      assert.ok(caught instanceof LayerError, `${field} of a ${type}: expected LayerError, got ${caught}`);
      assert.match(caught.message, new RegExp(`${field} 102438405362`));
      assert.equal(caught.entry, "x");
    } finally {
      workspace.cleanup();
    }
  }
});
