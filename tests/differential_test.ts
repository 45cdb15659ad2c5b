/**
 * Differential test: the same multi-layer image staged by ocistage and by
 * `skopeo copy` + `umoci raw unpack --rootless` must give the same tree,
 * apart from the differences ocistage prescribes: device nodes, FIFOs and
 * everything below dev/ are dropped, files gain owner read and directories
 * owner read, write and execute.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { buildTar, gzipBytes, type TarEntrySpec } from "./fixtures/tar.ts";
import { type Distribution, digestOf, MEDIA, pushImage, run, skipUnlessPrograms, startDistribution } from "./fixtures/distribution.ts";
import { richImageLayers } from "./fixtures/images.ts";
import { runCliProcess } from "./fixtures/cli.ts";
import { diffTrees, snapshotTree, type TreeEntry } from "./fixtures/tree.ts";

const skip = skipUnlessPrograms("docker-registry", "skopeo", "umoci");

/** Paths whose last entry in the layers is a device node or FIFO. */
function specialPaths(layers: TarEntrySpec[][]): Set<string> {
  const special = new Set<string>();
  for (const layer of layers) {
    for (const entry of layer) {
      const name = String(entry.path).replace(/^\.\//, "").replace(/\/$/, "");
      if (entry.type === "char" || entry.type === "block" || entry.type === "fifo") special.add(name);
      else special.delete(name);
    }
  }
  return special;
}

/** Apply the differences ocistage prescribes to umoci's tree. */
function expectedFromUmoci(tree: Map<string, TreeEntry>, special: Set<string>): Map<string, TreeEntry> {
  const expected = new Map<string, TreeEntry>();
  for (const [name, entry] of tree) {
    // The target directory keeps its own metadata: ocistage skips a layer's
    // "./" entry, where umoci applies it to the root.
    if (name === "" || name.startsWith("dev/") || special.has(name)) continue;
    let mode = entry.mode;
    if (entry.type === "file") mode |= 0o400;
    if (entry.type === "dir") mode |= 0o700;
    expected.set(name, { ...entry, mode });
  }
  return expected;
}

/** Group paths by inode, as sorted lists of paths that are hardlinked together. */
function linkGroups(tree: Map<string, TreeEntry>): string[][] {
  const groups = new Map<number, string[]>();
  for (const [name, entry] of tree) {
    if (entry.type !== "file") continue;
    groups.set(entry.ino, [...(groups.get(entry.ino) ?? []), name]);
  }
  return [...groups.values()].filter((group) => group.length > 1).map((group) => group.sort()).sort();
}

describe("differential against skopeo and umoci", { skip }, () => {
  let registry: Distribution;
  let work: string;
  before(async () => {
    registry = await startDistribution();
    work = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-diff-"));
  });
  after(async () => {
    await registry?.close();
    fs.rmSync(work, { recursive: true, force: true });
  });

  test("layers written by umoci insert stage like umoci unpack", async () => {
    // umoci 0.4.7 ends its layers right after the last body, without the
    // padding and end blocks, which ocistage must accept.
    const layout = path.join(work, "umoci-layout");
    const files = path.join(work, "umoci-files");
    fs.mkdirSync(path.join(files, "opt", "app"), { recursive: true });
    fs.writeFileSync(path.join(files, "opt", "app", "config"), "version=1\n");
    fs.writeFileSync(path.join(files, "opt", "app", "old"), "old\n");
    run("umoci", ["init", "--layout", layout]);
    run("umoci", ["new", "--image", `${layout}:t`]);
    run("umoci", ["insert", "--rootless", "--image", `${layout}:t`, path.join(files, "opt"), "/opt"]);
    run("umoci", ["insert", "--rootless", "--image", `${layout}:t`, "--whiteout", "/opt/app/old"]);

    const umociRoot = path.join(work, "umoci-insert-unpacked");
    run("umoci", ["raw", "unpack", "--rootless", "--image", `${layout}:t`, umociRoot]);
    const ours = path.join(work, "umoci-insert-staged");
    const staged = await runCliProcess(["stage", `oci:${layout}:t`, ours, "--cache", path.join(work, "cache-umoci")]);
    assert.equal(staged.code, 0, staged.stderr);

    const ourTree = snapshotTree(ours);
    ourTree.delete("");
    assert.equal(fs.readFileSync(path.join(ours, "opt/app/config"), "utf8"), "version=1\n");
    assert.equal(ourTree.has("opt/app/old"), false, "the whiteout layer applies");
    assert.deepEqual(diffTrees(ourTree, expectedFromUmoci(snapshotTree(umociRoot), new Set())), []);
  });

  test("rich image stages like umoci raw unpack", async () => {
    const layers = richImageLayers();
    const blobs = layers.map((entries) => {
      const tar = buildTar(entries);
      return { bytes: gzipBytes(tar), mediaType: MEDIA.ociLayerGzip, diffId: digestOf(tar) };
    });
    await pushImage(registry.url, "diff/rich", "v1", blobs, { diffIds: blobs.map((blob) => blob.diffId) });
    const reference = `${registry.host}/diff/rich:v1`;

    const layout = path.join(work, "layout");
    run("skopeo", ["copy", "--src-tls-verify=false", `docker://${reference}`, `oci:${layout}:v1`]);
    const umociRoot = path.join(work, "umoci");
    run("umoci", ["raw", "unpack", "--rootless", "--image", `${layout}:v1`, umociRoot]);

    const ours = path.join(work, "ocistage");
    const staged = await runCliProcess(["stage", reference, ours, "--cache", path.join(work, "cache"), "--platform", "linux/amd64"]);
    assert.equal(staged.code, 0, staged.stderr);

    const umociTree = snapshotTree(umociRoot);
    const ourTree = snapshotTree(ours);
    ourTree.delete("");
    const expected = expectedFromUmoci(umociTree, specialPaths(layers));
    assert.ok(expected.size >= 29, `the comparison covers the whole image: ${[...expected.keys()].join(" ")}`);
    assert.deepEqual(diffTrees(ourTree, expected), []);
    assert.deepEqual(linkGroups(ourTree), linkGroups(umociTree));
    assert.deepEqual(linkGroups(ourTree), [["data/link-two", "data/original"]]);

    // The same through the decoder worker, from the cache the first stage filled.
    const viaWorker = path.join(work, "ocistage-worker");
    const workerStaged = await runCliProcess(
      ["stage", reference, viaWorker, "--cache", path.join(work, "cache"), "--platform", "linux/amd64", "--decode-worker"],
    );
    assert.equal(workerStaged.code, 0, workerStaged.stderr);
    const workerTree = snapshotTree(viaWorker);
    workerTree.delete("");
    assert.deepEqual(diffTrees(workerTree, expected), []);
    assert.deepEqual(linkGroups(workerTree), linkGroups(umociTree));
  });
});
