/**
 * `exportTar`: the flattened root filesystem of an image as one tar stream,
 * like `crane export`.
 *
 * Design: the image is staged into a temporary directory with
 * {@link stage}, which applies whiteouts, path confinement and every other
 * layer rule, and the tree is then written as a tar stream with
 * `modern-tar`'s packer. The temporary directory is removed afterwards,
 * also on failure. A streaming design that never touches the disk would have
 * to repeat the layer rules on tar entries (a later layer can delete or
 * replace any earlier path), so it was not chosen. The cost is disk space
 * for one unpacked copy of the image in the temporary directory.
 *
 * Because the tree comes from `stage`, the archive contains what `stage` keeps:
 * device nodes, FIFOs and entries below `dev/` are absent, every file is
 * owner-readable and every directory owner-writable.
 *
 * @module
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createTarPacker, type TarHeader } from "modern-tar";
import type { ImageReference } from "./reference.ts";
import { type FetchResult, stage, type StageOptions } from "./stage.ts";

/** Options of {@link exportTar}. */
export interface ExportOptions extends StageOptions {
  /** Parent of the temporary staging directory. Default: the system's temporary directory (`os.tmpdir()`). */
  tempDir?: string;
}

/** The outcome of {@link exportTar}. */
export interface ExportResult extends FetchResult {
  /** Number of tar entries written. */
  entries: number;
  /** Bytes of tar written. */
  bytes: number;
}

/** Options of {@link packTree}. */
export interface PackTreeOptions {
  /** Record each entry's uid and gid. Default: true when running as root, else every entry gets 0. */
  owners?: boolean;
}

/**
 * Pull an image and write its flattened root filesystem to `output` as a
 * tar stream (POSIX ustar, with PAX records for long names). `output` is
 * closed when the archive is complete and aborted on failure.
 *
 * @example
 * ```ts
 * import * as fs from "node:fs";
 * import { Writable } from "node:stream";
 *
 * const file = Writable.toWeb(fs.createWriteStream("rootfs.tar")) as WritableStream<Uint8Array>;
 * await exportTar("127.0.0.1:5000/base:1.0", file, { platform: "linux/amd64" });
 * ```
 */
export async function exportTar(
  image: string | ImageReference,
  output: WritableStream<Uint8Array>,
  options: ExportOptions = {},
): Promise<ExportResult> {
  let work: string | undefined;
  try {
    work = fs.mkdtempSync(path.join(options.tempDir ?? os.tmpdir(), "ocistage-export-"));
    const root = path.join(work, "rootfs");
    const { target: _target, ...staged } = await stage(image, root, options);
    const packed = await packTree(root, output, { owners: options.owners });
    return { ...staged, ...packed };
  } catch (error) {
    await output.abort(error).catch(() => {});
    throw error;
  } finally {
    if (work !== undefined) fs.rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Write the tree below `root` to `output` as a tar stream and close it.
 * Entries come in sorted order, each directory before its contents. The root
 * itself has no entry, because its metadata is that of the staging directory,
 * not the image's, and would make two exports of one image differ. Regular files, directories and symlinks are
 * written with their mode (setuid, setgid and sticky included) and mtime in
 * whole seconds. A file with several links is written once, and its other
 * paths become hardlink entries to the first. Other file types are skipped.
 */
export async function packTree(
  root: string,
  output: WritableStream<Uint8Array>,
  options: PackTreeOptions = {},
): Promise<{ entries: number; bytes: number }> {
  const owners = options.owners ?? globalThis.process?.getuid?.() === 0;
  const { readable, controller } = createTarPacker();
  let bytes = 0;
  const counted = readable.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, stream) {
        bytes += chunk.byteLength;
        stream.enqueue(chunk);
      },
    }),
  );
  const piping = counted.pipeTo(output);

  let entries = 0;
  try {
    const firstPaths = new Map<string, string>();
    for (const { name, full, stat } of walk(root)) {
      const header: TarHeader = {
        name,
        size: 0,
        mode: stat.mode & 0o7777,
        mtime: new Date(Math.floor(stat.mtimeMs / 1000) * 1000),
        uid: owners ? stat.uid : 0,
        gid: owners ? stat.gid : 0,
      };
      if (stat.isDirectory()) {
        await addEntry(controller.add({ ...header, type: "directory" }));
      } else if (stat.isSymbolicLink()) {
        await addEntry(controller.add({ ...header, mode: 0o777, type: "symlink", linkname: fs.readlinkSync(full) }));
      } else if (stat.isFile()) {
        const inode = `${stat.dev}:${stat.ino}`;
        const first = stat.nlink > 1 ? firstPaths.get(inode) : undefined;
        if (first !== undefined) {
          await addEntry(controller.add({ ...header, type: "link", linkname: first }));
        } else {
          if (stat.nlink > 1) firstPaths.set(inode, name);
          await addFile(controller.add({ ...header, type: "file", size: stat.size }), full, stat.size);
        }
      } else {
        continue;
      }
      entries++;
    }
    controller.finalize();
  } catch (error) {
    controller.error(error);
    await piping.catch(() => {});
    throw error;
  }
  await piping;
  return { entries, bytes };
}

interface WalkEntry {
  /** Name in the archive: the relative path, with "/" after directories. */
  name: string;
  full: string;
  stat: fs.Stats;
}

/** Yield every entry below the root, depth first, names sorted by code unit. */
function* walk(root: string): Generator<WalkEntry> {
  const stack: { relative: string; full: string }[] = [{ relative: "", full: root }];
  while (stack.length > 0) {
    const { relative, full } = stack.pop()!;
    const stat = fs.lstatSync(full);
    const isDir = stat.isDirectory();
    if (relative !== "") yield { name: isDir ? `${relative}/` : relative, full, stat };
    if (!isDir) continue;
    const children = fs.readdirSync(full).sort().reverse();
    for (const child of children) {
      stack.push({ relative: relative === "" ? child : `${relative}/${child}`, full: path.join(full, child) });
    }
  }
}

async function addEntry(entry: WritableStream<Uint8Array>): Promise<void> {
  await entry.close();
}

const CHUNK_SIZE = 1 << 20;

/** Copy exactly `size` bytes of a file into a tar entry. */
async function addFile(entry: WritableStream<Uint8Array>, file: string, size: number): Promise<void> {
  const writer = entry.getWriter();
  const handle = fs.openSync(file, "r");
  try {
    let done = 0;
    while (done < size) {
      const buffer = new Uint8Array(Math.min(CHUNK_SIZE, size - done));
      const read = fs.readSync(handle, buffer, 0, buffer.length, done);
      if (read === 0) throw new Error(`file "${file}" shrank while it was exported: export again`);
      await writer.write(buffer.subarray(0, read));
      done += read;
    }
    await writer.close();
  } finally {
    fs.closeSync(handle);
  }
}
