/**
 * Output helpers of the CLI: the text form of `inspect`, and the writable
 * streams `export` writes its tar archive to.
 *
 * @module
 */
import * as fs from "node:fs";
import * as path from "node:path";
import type { InspectResult } from "../inspect.ts";
import { formatPlatform } from "../reference.ts";
import { formatBytes } from "./progress.ts";

/** Render an {@link InspectResult} as aligned "Field: value" lines. */
export function formatInspect(result: InspectResult): string {
  const lines: [string, string][] = [["Image", result.source]];
  lines.push(["Digest", `${result.digest} (${result.mediaType})`]);
  if (result.platforms.length > 0) lines.push(["Platforms", result.platforms.map((entry) => entry.platform).join(", ")]);

  if (!result.manifest || !result.platform) {
    lines.push(["Platform", "none read: the image does not offer this host's platform; pass --platform with one it offers"]);
  } else {
    const manifest = result.manifest;
    lines.push(["Platform", formatPlatform(result.platform)]);
    lines.push(["Manifest", `${manifest.digest} (${manifest.mediaType}, ${formatBytes(manifest.size)})`]);
    if (result.config) {
      lines.push(["Config", `${result.config.descriptor.digest} (${formatBytes(result.config.descriptor.size)})`]);
      lines.push(...configLines(result.config.document));
    }
    const layers = manifest.document.layers;
    const total = layers.reduce((sum, layer) => sum + layer.size, 0);
    lines.push(["Layers", `${layers.length}, ${formatBytes(total)} as stored`]);
    layers.forEach((layer, i) => lines.push(["", `${String(i + 1).padStart(3)}. ${layer.digest} ${formatBytes(layer.size).padStart(10)} ${layer.mediaType}`]));
  }
  if (result.tags) lines.push(["Tags", result.tags.length > 0 ? result.tags.join(", ") : "none"]);

  // A fixed column keeps the output stable for scripts that cut it; "Entrypoint:" is the longest label.
  const width = 12;
  return lines.map(([label, value]) => `${label ? `${label}:` : ""}`.padEnd(width) + value).join("\n") + "\n";
}

/** Return the commonly read image config fields that are present, as label and value. */
function configLines(config: Record<string, unknown>): [string, string][] {
  const lines: [string, string][] = [];
  if (typeof config.created === "string") lines.push(["Created", config.created]);
  const run = config.config;
  if (run === null || typeof run !== "object") return lines;
  const fields = run as Record<string, unknown>;
  for (const key of ["Entrypoint", "Cmd", "WorkingDir", "User"]) {
    const value = fields[key];
    if (value === undefined || value === null || value === "") continue;
    lines.push([key, typeof value === "string" ? value : JSON.stringify(value)]);
  }
  if (Array.isArray(fields.Env) && fields.Env.length > 0) lines.push(["Env", fields.Env.join(" ")]);
  if (fields.Labels && typeof fields.Labels === "object") {
    const labels = Object.entries(fields.Labels as Record<string, unknown>).map(([key, value]) => `${key}=${value}`);
    if (labels.length > 0) lines.push(["Labels", labels.join(" ")]);
  }
  return lines;
}

/** The part of a Node-style stream that {@link writableFor} uses. */
export interface ByteSink {
  write(chunk: string | Uint8Array): unknown;
  once?(event: "drain", listener: () => void): unknown;
}

/**
 * Wrap a Node-style stream (`process.stdout`, a test capture) as a web
 * WritableStream, waiting for "drain" when `write` returns false. Closing
 * the web stream leaves the underlying stream open.
 */
export function writableFor(sink: ByteSink): WritableStream<Uint8Array> {
  return new WritableStream<Uint8Array>({
    write(chunk) {
      const accepted = sink.write(chunk);
      if (accepted === false && sink.once) {
        return new Promise<void>((resolve) => sink.once!("drain", resolve));
      }
    },
  });
}

/**
 * Open `file` for writing through a temporary file beside it. `commit()`
 * renames the temporary file into place once the stream has closed; an
 * aborted stream removes it, so `file` is never left half written.
 */
export function outputStream(file: string): { stream: WritableStream<Uint8Array>; commit(): void } {
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${globalThis.process?.pid ?? 0}.partial`);
  let handle: number;
  try {
    handle = fs.openSync(temp, "w", 0o644);
  } catch (cause) {
    throw new Error(`cannot write output file "${file}" (${(cause as Error).message}): check that its directory exists and is writable`, { cause });
  }
  let open = true;
  const closeHandle = () => {
    if (open) fs.closeSync(handle);
    open = false;
  };
  const stream = new WritableStream<Uint8Array>({
    write(chunk) {
      let written = 0;
      while (written < chunk.byteLength) written += fs.writeSync(handle, chunk, written, chunk.byteLength - written);
    },
    close: closeHandle,
    abort() {
      closeHandle();
      fs.rmSync(temp, { force: true });
    },
  });
  return {
    stream,
    commit() {
      closeHandle();
      fs.renameSync(temp, file);
    },
  };
}
