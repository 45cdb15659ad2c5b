/**
 * Builds the benchmark images from real files on this machine, as OCI image
 * layouts of gzip layers, with GNU `tar` and `gzip` subprocesses so that no
 * layer is ever held in memory. A finished layout is reused while its
 * specification and the files it was made from stay the same.
 *
 * @module
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";

/** One layer: directories copied from the host, whiteout markers, opaque markers. */
export interface LayerSpec {
  /** Paths relative to `/` copied recursively; the ones missing on this machine are left out. */
  paths: string[];
  /** Paths relative to `/` that get a `.wh.NAME` marker, removing them from lower layers. */
  whiteouts?: string[];
  /** Directories relative to `/` that get a `.wh..wh..opq` marker, hiding their lower-layer children. */
  opaque?: string[];
}

/** An image to build: its name in the layout and its layers, lowest first. */
export interface ImageSpec {
  name: string;
  /** gzip level (1 to 9) for every layer. */
  gzipLevel: number;
  layers: LayerSpec[];
}

/** The multi-layer image of about 500 MB of tar that the staging timings use. */
export const STAGE_IMAGE: ImageSpec = {
  name: "stage",
  gzipLevel: 6,
  layers: [
    { paths: ["usr/include", "usr/share/man"] },
    { paths: ["usr/lib/python3.11", "usr/share/perl", "usr/share/vim", "usr/share/icons", "usr/share/doc"] },
    { paths: ["usr/lib/gcc"] },
    {
      // An update of a lower layer: replaces about 3,400 headers, removes
      // three man sections and empties the icon themes before one comes back.
      paths: ["usr/include/c++", "usr/include/linux", "usr/include/llvm-14", "usr/share/icons/hicolor"],
      whiteouts: ["usr/share/man/man3", "usr/share/man/man7", "usr/share/man/man8", "usr/share/doc/git"],
      opaque: ["usr/share/icons"],
    },
  ],
};

/** A one-layer image of about 2 GB of tar, for the peak-memory measurement. */
export const BIG_LAYER_IMAGE: ImageSpec = {
  name: "big-layer",
  gzipLevel: 1,
  layers: [
    {
      paths: ["usr/lib/x86_64-linux-gnu", "usr/lib/jvm", "usr/lib/llvm-14", "usr/lib/gcc", "usr/share/locale", "usr/bin"],
    },
  ],
};

/** Sizes of a built image. */
export interface BuiltImage {
  /** The OCI image layout directory; the image is tagged `spec.name` in it. */
  layout: string;
  name: string;
  /** Per layer: uncompressed tar bytes, gzip bytes and tar entries. */
  layers: { tarBytes: number; gzipBytes: number; entries: number; digest: string }[];
  /** True when an earlier build was reused. */
  reused: boolean;
}

/**
 * Builds `spec` as an OCI image layout below `workDir`, or reuses the one an
 * earlier call built from the same specification and source paths.
 */
export function buildImage(spec: ImageSpec, workDir: string): BuiltImage {
  const dir = path.join(workDir, spec.name);
  const layout = path.join(dir, "layout");
  const resolved = resolveSpec(spec);
  const key = JSON.stringify(resolved);
  const summaryFile = path.join(dir, "image.json");

  try {
    const previous = JSON.parse(fs.readFileSync(summaryFile, "utf8")) as { key: string; image: BuiltImage };
    if (previous.key === key && fs.existsSync(path.join(layout, "index.json"))) return { ...previous.image, reused: true };
  } catch {
    // No earlier build, or an unreadable one: build again.
  }

  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(path.join(layout, "blobs", "sha256"), { recursive: true });
  const markers = path.join(dir, "markers");

  const layers = resolved.layers.map((layer, index) => buildLayer(layer, index, dir, markers, spec.gzipLevel));
  const blobs = path.join(layout, "blobs", "sha256");
  const descriptors = layers.map((layer) => {
    const hex = layer.digest.slice("sha256:".length);
    fs.renameSync(layer.file, path.join(blobs, hex));
    return { mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layer.digest, size: layer.gzipBytes };
  });

  const config = {
    architecture: "amd64",
    os: "linux",
    config: {},
    rootfs: { type: "layers", diff_ids: layers.map((layer) => layer.diffId) },
  };
  const configDescriptor = writeBlob(blobs, JSON.stringify(config), "application/vnd.oci.image.config.v1+json");
  const manifest = {
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: configDescriptor,
    layers: descriptors,
  };
  const manifestDescriptor = writeBlob(blobs, JSON.stringify(manifest), manifest.mediaType);
  const index = {
    schemaVersion: 2,
    manifests: [{ ...manifestDescriptor, annotations: { "org.opencontainers.image.ref.name": spec.name } }],
  };
  fs.writeFileSync(path.join(layout, "index.json"), JSON.stringify(index));
  fs.writeFileSync(path.join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  fs.rmSync(markers, { recursive: true, force: true });

  const image: BuiltImage = {
    layout,
    name: spec.name,
    layers: layers.map((layer) => ({ tarBytes: layer.tarBytes, gzipBytes: layer.gzipBytes, entries: layer.entries, digest: layer.digest })),
    reused: false,
  };
  fs.writeFileSync(summaryFile, JSON.stringify({ key, image }, null, 2));
  return image;
}

/** Drops the paths missing on this machine and records the size and mtime of each path kept, to notice changes. */
function resolveSpec(spec: ImageSpec) {
  const present = (paths: string[] = []) => paths.filter((entry) => fs.existsSync(`/${entry}`));
  return {
    ...spec,
    // Bump when buildLayer changes what it archives, so older builds are not reused.
    builder: 2,
    layers: spec.layers.map((layer) => ({
      paths: present(layer.paths).map((entry) => ({ path: entry, mtime: fs.statSync(`/${entry}`).mtimeMs })),
      whiteouts: layer.whiteouts ?? [],
      opaque: layer.opaque ?? [],
    })),
  };
}

type ResolvedLayer = ReturnType<typeof resolveSpec>["layers"][number];

interface LayerFile {
  file: string;
  digest: string;
  diffId: string;
  tarBytes: number;
  gzipBytes: number;
  entries: number;
}

function buildLayer(layer: ResolvedLayer, index: number, dir: string, markers: string, level: number): LayerFile {
  // Whiteout markers are empty files, archived from a scratch directory.
  const markerPaths: string[] = [];
  for (const entry of layer.whiteouts) markerPaths.push(path.join(path.dirname(entry), `.wh.${path.basename(entry)}`));
  for (const entry of layer.opaque) markerPaths.push(path.join(entry, ".wh..wh..opq"));
  for (const marker of markerPaths) {
    fs.mkdirSync(path.join(markers, path.dirname(marker)), { recursive: true });
    fs.writeFileSync(path.join(markers, marker), "");
  }

  const file = path.join(dir, `layer${index}.tar.gz`);
  // Parent directories get entries of their own, as in layers that image builders write.
  const parents = new Set<string>();
  for (const entry of [...layer.paths.map((item) => item.path), ...markerPaths]) {
    for (let parent = path.dirname(entry); parent !== "."; parent = path.dirname(parent)) parents.add(parent);
  }
  const tarArgs = [
    "--format=gnu",
    "--sort=name",
    "--numeric-owner",
    "-cf",
    "-",
    "-C",
    "/",
    "--no-recursion",
    ...[...parents].sort(),
    "--recursion",
    ...layer.paths.map((entry) => entry.path),
  ];
  if (markerPaths.length > 0) tarArgs.push("-C", markers, "--no-recursion", ...markerPaths);
  const quoted = tarArgs.map(shellQuote).join(" ");
  // `tee` hands the tar stream to sha256sum (the diff ID) and wc (its size) while gzip compresses it.
  const script = `set -o pipefail; tar ${quoted} | tee >(sha256sum > ${shellQuote(`${file}.diffid`)}) ` +
    `>(wc -c > ${shellQuote(`${file}.size`)}) | gzip -${level} -n > ${shellQuote(file)}; wait`;
  execFileSync("bash", ["-c", script], { stdio: ["ignore", "ignore", "inherit"] });
  waitForFile(`${file}.diffid`);
  waitForFile(`${file}.size`);

  const diffId = `sha256:${fs.readFileSync(`${file}.diffid`, "utf8").split(" ")[0]}`;
  const tarBytes = Number(fs.readFileSync(`${file}.size`, "utf8").trim());
  const entries = Number(
    execFileSync("bash", ["-c", `gzip -dc ${shellQuote(file)} | tar -tf - | wc -l`], { encoding: "utf8" }).trim(),
  );
  const digest = `sha256:${execFileSync("sha256sum", [file], { encoding: "utf8" }).split(" ")[0]}`;
  return { file, digest, diffId, tarBytes, gzipBytes: fs.statSync(file).size, entries };
}

/** Waits until a process substitution has written its line (bash's `wait` does not cover them all). */
function waitForFile(file: string): void {
  for (let i = 0; i < 200; i++) {
    if (fs.existsSync(file) && fs.readFileSync(file, "utf8").endsWith("\n")) return;
    execFileSync("sleep", ["0.05"]);
  }
  throw new Error(`"${file}" was not written: check that bash, sha256sum and wc are installed`);
}

function writeBlob(blobs: string, text: string, mediaType: string) {
  const bytes = new TextEncoder().encode(text);
  const hex = createHash("sha256").update(bytes).digest("hex");
  fs.writeFileSync(path.join(blobs, hex), bytes);
  return { mediaType, digest: `sha256:${hex}`, size: bytes.byteLength };
}

function shellQuote(value: string): string {
  return `'${value.replace(/'/g, "'\\''")}'`;
}
