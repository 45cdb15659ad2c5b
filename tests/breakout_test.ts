/**
 * A catalogue of attempts to make the layer applier create, change or
 * remove anything outside the stage root. Each test places a sentinel
 * directory beside the root (`outside/secret.txt`), applies hostile layers,
 * and checks that everything outside the root is exactly as before. Names
 * that a breakout would create carry a unique token, and the test also
 * checks the temporary directory and `/` for them.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { randomUUID } from "node:crypto";

import { LayerError } from "../src/errors.ts";
import type { TarEntrySpec } from "./fixtures/tar.ts";
import { applyEntries, createWorkspace, type LayerSpec, snapshot, type Workspace } from "./fixtures/workspace.ts";

/** The context a hostile layer is built from. */
interface Target {
  /** Absolute path of the sentinel directory beside the root. */
  outside: string;
  /** A unique file name that must not appear outside the root. */
  token: string;
}

type Outcome = "error" | ((root: string, target: Target) => void);

const encoder = new TextEncoder();

function outsideState(workspace: Workspace): Map<string, unknown> {
  const state = new Map<string, unknown>();
  for (const [name, node] of snapshot(workspace.base)) {
    if (name === "root" || name.startsWith("root/")) continue;
    state.set(name, node);
  }
  return state;
}

function assertNoToken(workspace: Workspace, token: string): void {
  for (const dir of [workspace.base, workspace.outside, os.tmpdir(), "/", "/tmp"]) {
    assert.equal(fs.existsSync(path.join(dir, token)), false, `"${token}" appeared in ${dir}`);
  }
}

/**
 * Applies the layers that `build` returns and checks the outcome: "error"
 * expects a LayerError, a function checks the staged root. Either way
 * nothing outside the root may change.
 */
async function attempt(build: (target: Target) => LayerSpec[], outcome: Outcome): Promise<void> {
  const workspace = createWorkspace();
  const token = `ocistage-breakout-${randomUUID()}`;
  try {
    const target = { outside: workspace.outside, token };
    const layers = build(target);
    const before = outsideState(workspace);

    let caught: unknown;
    try {
      await applyEntries(workspace.root, layers);
    } catch (error) {
      caught = error;
    }

    if (outcome === "error") {
      assert.ok(caught instanceof LayerError, `expected LayerError, got ${caught}`);
    } else {
      assert.equal(caught, undefined, `unexpected error: ${caught}`);
      outcome(workspace.root, target);
    }
    assert.deepEqual(outsideState(workspace), before, "something outside the root changed");
    assertNoToken(workspace, token);
    assert.equal(fs.readFileSync(path.join(workspace.outside, "secret.txt"), "utf8"), "do not touch");
  } finally {
    workspace.cleanup();
  }
}

const dir = (name: string | Uint8Array): TarEntrySpec => ({ path: name, type: "dir" });
const file = (name: string | Uint8Array, content = "owned"): TarEntrySpec => ({ path: name, content });
const symlink = (name: string, linkname: string | Uint8Array): TarEntrySpec => ({ path: name, type: "symlink", linkname });
const hardlink = (name: string, linkname: string | Uint8Array): TarEntrySpec => ({ path: name, type: "hardlink", linkname });

function exists(root: string, name: string): boolean {
  return fs.existsSync(path.join(root, name));
}

// Names that climb or are absolute.

test("dot-dot name", async () => {
  await attempt(({ token }) => [[file(`../outside/${token}`)]], "error");
});

test("dot-dot after a directory", async () => {
  await attempt(({ token }) => [[dir("a/"), file(`a/../../outside/${token}`)]], "error");
});

test("dot-dot after a leading slash", async () => {
  await attempt(({ token }) => [[file(`/../outside/${token}`)]], "error");
});

test("dot-dot after dot-slash", async () => {
  await attempt(({ token }) => [[file(`./../${token}`)]], "error");
});

test("bare dot-dot directory", async () => {
  await attempt(() => [[dir("..")]], "error");
});

test("absolute name stays inside the root", async () => {
  await attempt(({ outside, token }) => [[file(`${outside}/${token}`)]], (root, { outside, token }) => {
    assert.ok(exists(root, `${outside.slice(1)}/${token}`));
  });
});

test("backslash dot-dot is a plain name", async () => {
  await attempt(({ token }) => [[file(`..\\${token}`)]], (root, { token }) => {
    assert.ok(exists(root, `..\\${token}`));
  });
});

test("GNU long name with dot-dot", async () => {
  await attempt(({ token }) => [[{ ...file(`${"a/".repeat(60)}${"../".repeat(61)}${token}`), longName: "gnu" }]], "error");
});

test("PAX path with dot-dot", async () => {
  await attempt(({ token }) => [[{ ...file("innocent"), pax: { path: `../${token}` } }]], "error");
});

// Symlinks as parents.

test("absolute symlink out, write in the same layer", async () => {
  await attempt(({ outside, token }) => [[symlink("pwn", outside), file(`pwn/${token}`)]], "error");
});

test("absolute symlink out, write in a later layer", async () => {
  await attempt(({ outside, token }) => [[symlink("pwn", outside)], [file(`pwn/${token}`)]], "error");
});

test("relative symlink out, write through it", async () => {
  await attempt(({ token }) => [[symlink("pwn", "../outside"), file(`pwn/${token}`)]], "error");
});

test("relative symlink out lands in the root's own directory", async () => {
  await attempt(({ token }) => [[dir("outside/"), symlink("pwn", "../../../outside"), file(`pwn/${token}`)]], (root, { token }) => {
    assert.ok(exists(root, `outside/${token}`));
  });
});

test("symlink to the root directory", async () => {
  await attempt(({ token }) => [[dir("etc/"), symlink("top", "/"), file(`top/etc/${token}`)]], (root, { token }) => {
    assert.ok(exists(root, `etc/${token}`));
  });
});

test("symlink to dot repeated", async () => {
  await attempt(({ token }) => [[symlink("self", "."), file(`self/self/self/${token}`)]], (root, { token }) => {
    assert.ok(exists(root, token));
  });
});

test("symlink chain out of the root", async () => {
  await attempt(({ outside, token }) => [
    [symlink("a", "b"), symlink("b", "c"), symlink("c", "../../d"), symlink("d", outside)],
    [file(`a/${token}`)],
  ], "error");
});

test("symlink chain of 40 links resolves", async () => {
  await attempt(({ token }) => {
    const links: TarEntrySpec[] = [dir("end/")];
    for (let i = 0; i < 40; i++) links.push(symlink(`l${i}`, i === 39 ? "end" : `l${i + 1}`));
    return [links, [file(`l0/${token}`)]];
  }, (root, { token }) => {
    assert.ok(exists(root, `end/${token}`));
  });
});

test("symlink chain of 41 links fails", async () => {
  await attempt(({ token }) => {
    const links: TarEntrySpec[] = [dir("end/")];
    for (let i = 0; i < 41; i++) links.push(symlink(`l${i}`, i === 40 ? "end" : `l${i + 1}`));
    return [links, [file(`l0/${token}`)]];
  }, "error");
});

test("symlink loop", async () => {
  await attempt(({ token }) => [[symlink("a", "b"), symlink("b", "a"), file(`a/${token}`)]], "error");
});

test("symlink to itself", async () => {
  await attempt(({ token }) => [[symlink("a", "a"), file(`a/${token}`)]], "error");
});

test("symlink named dot", async () => {
  await attempt(({ outside }) => [[symlink(".", outside)]], "error");
});

test("symlink named slash", async () => {
  await attempt(({ outside }) => [[symlink("/", outside)]], "error");
});

test("symlink through proc", async () => {
  await attempt(({ token }) => [[symlink("p", "/proc/self/cwd"), file(`p/${token}`)]], "error");
});

test("parent replaced by a symlink after it was used", async () => {
  await attempt(({ outside, token }) => [[dir("d/"), file("d/a", "a"), symlink("d", outside), file(`d/${token}`)]], "error");
});

test("symlink below dev is dropped", async () => {
  await attempt(({ outside, token }) => [[dir("dev/"), symlink("dev/x", outside), file(`dev/x/${token}`)]], (root) => {
    assert.deepEqual(fs.readdirSync(path.join(root, "dev")), []);
  });
});

test("dev as a symlink out of the root", async () => {
  await attempt(({ outside, token }) => [[symlink("dev", outside), file(`dev/${token}`)]], (root) => {
    assert.equal(fs.lstatSync(path.join(root, "dev")).isSymbolicLink(), true);
  });
});

// Replacing links.

test("file over a symlink pointing out", async () => {
  await attempt(({ outside }) => [[symlink("f", `${outside}/secret.txt`)], [file("f", "replaced")]], (root) => {
    assert.equal(fs.readFileSync(path.join(root, "f"), "utf8"), "replaced");
  });
});

test("directory over a symlink pointing out", async () => {
  await attempt(({ outside, token }) => [[symlink("d", outside)], [dir("d/"), file(`d/${token}`)]], (root, { token }) => {
    assert.equal(fs.lstatSync(path.join(root, "d")).isDirectory(), true);
    assert.ok(exists(root, `d/${token}`));
  });
});

test("symlink over a symlink pointing out", async () => {
  await attempt(({ outside }) => [[symlink("s", outside)], [symlink("s", "/etc")]], (root) => {
    assert.equal(fs.readlinkSync(path.join(root, "s")), "/etc");
  });
});

// Hardlinks.

test("hardlink to a dot-dot target", async () => {
  await attempt(() => [[hardlink("h", "../outside/secret.txt")]], "error");
});

test("hardlink to an absolute host path", async () => {
  await attempt(({ outside }) => [[hardlink("h", `${outside}/secret.txt`)]], "error");
});

test("hardlink through a symlink pointing out", async () => {
  await attempt(({ outside }) => [[symlink("l", outside), hardlink("h", "l/secret.txt")]], "error");
});

test("hardlink created below a symlink pointing out", async () => {
  await attempt(({ outside, token }) => [[file("a"), symlink("l", outside), hardlink(`l/${token}`, "a")]], "error");
});

test("hardlink to a symlink pointing out", async () => {
  await attempt(({ outside }) => [[symlink("s", `${outside}/secret.txt`), hardlink("h", "s")], [file("h", "x")]], (root) => {
    assert.equal(fs.readFileSync(path.join(root, "h"), "utf8"), "x");
    assert.equal(fs.readlinkSync(path.join(root, "s")), `${path.dirname(root)}/outside/secret.txt`);
  });
});

test("hardlink to the root", async () => {
  await attempt(() => [[hardlink("h", "./")]], "error");
});

// Whiteouts.

test("whiteout of dot-dot", async () => {
  await attempt(() => [[file("keep")], [file(".wh..")]], "error");
});

test("whiteout of dot-dot-dot", async () => {
  await attempt(() => [[file("keep")], [file(".wh...")]], "error");
});

test("whiteout in a dot-dot directory", async () => {
  await attempt(() => [[file("keep")], [file("../.wh.outside")]], "error");
});

test("whiteout under an absolute symlink out", async () => {
  await attempt(({ outside }) => [[symlink("l", outside)], [file("l/.wh.secret.txt")]], (root) => {
    assert.equal(fs.lstatSync(path.join(root, "l")).isSymbolicLink(), true);
  });
});

test("whiteout under a relative symlink out", async () => {
  await attempt(() => [[symlink("l", "../outside")], [file("l/.wh.secret.txt")]], () => {});
});

test("opaque marker under a symlink out", async () => {
  await attempt(({ outside }) => [[symlink("l", outside)], [file("l/.wh..wh..opq")]], () => {});
});

test("opaque marker on a lower-layer symlink out", async () => {
  await attempt(({ outside }) => [[symlink("l", outside)], [dir("l/"), file("l/.wh..wh..opq"), file("l/new")]], (root) => {
    assert.equal(fs.lstatSync(path.join(root, "l")).isDirectory(), true);
    assert.deepEqual(fs.readdirSync(path.join(root, "l")), ["new"]);
  });
});

test("opaque marker on a lower-layer symlink inside", async () => {
  await attempt(() => [[dir("real/"), file("real/old"), symlink("l", "real")], [file("l/.wh..wh..opq")]], (root) => {
    assert.deepEqual(fs.readdirSync(path.join(root, "real")), []);
    assert.equal(fs.lstatSync(path.join(root, "l")).isSymbolicLink(), true);
  });
});

test("whiteout of a symlink out removes only the link", async () => {
  await attempt(({ outside }) => [[symlink("l", outside)], [file(".wh.l")]], (root) => {
    assert.equal(exists(root, "l"), false);
  });
});

test("whiteout through a symlink chain out", async () => {
  await attempt(({ outside }) => [[symlink("a", "b"), symlink("b", outside)], [file("a/.wh.secret.txt"), file("b/.wh..wh..opq")]], () => {});
});

// Bytes and lengths.

test("NUL in a PAX name", async () => {
  await attempt(({ token }) => [[{ ...file("x"), pax: { path: `safe\0../../${token}` } }]], "error");
});

test("NUL in a GNU long name", async () => {
  await attempt(({ token }) => [[{
    ...file(new Uint8Array([...encoder.encode("a".repeat(120)), 0, ...encoder.encode(`/../../${token}`)])),
    longName: "gnu",
  }]], "error");
});

test("NUL in a link name", async () => {
  await attempt(({ outside }) => [[symlink("l", new Uint8Array([...encoder.encode("t".repeat(120)), 0, ...encoder.encode(outside)]))]], "error");
});

test("non-UTF-8 name", async () => {
  await attempt(() => [[file(new Uint8Array([0x2e, 0x2e, 0xff, 0x2f, 0x78]))]], "error");
});

test("non-UTF-8 link name", async () => {
  await attempt(() => [[symlink("l", new Uint8Array([0x2e, 0x2e, 0x2f, 0xc0, 0xaf]))]], "error");
});

test("very long name of short components", async () => {
  await attempt(({ token }) => [[file(`${"d/".repeat(3000)}${token}`)]], "error");
});

test("very long single component", async () => {
  await attempt(({ token }) => [[file(`${"n".repeat(300)}${token}`)]], "error");
});

test("very long link name", async () => {
  await attempt(() => [[symlink("l", "/" + "x".repeat(5000))]], "error");
});

test("very long hardlink name with dot-dot", async () => {
  await attempt(() => [[file("a"), hardlink("h", `${"q/".repeat(2000)}${"../".repeat(2001)}outside/secret.txt`)]], "error");
});
