/**
 * Rendering of library events on standard error: a redrawn block of
 * per-blob progress bars on a terminal, one line per finished step
 * otherwise, one JSON object per line with --json, and nothing with
 * --quiet (warnings included).
 *
 * @module
 */
import type { ProgressEvent } from "../progress.ts";

/** The stream the reporter writes to. */
export interface ReporterStream {
  write(text: string): unknown;
  isTTY?: boolean;
  columns?: number;
}

interface BlobState {
  digest: string;
  received: number;
  total: number;
  done: boolean;
  started: number;
}

/** Options of {@link ProgressReporter}. */
export interface ReporterOptions {
  /** Write nothing. Default false. */
  quiet?: boolean;
  /** Write each finished step, warning and retry as one JSON object per line. Default false. */
  json?: boolean;
  /** Redraw progress bars. Default: `out.isTTY`. */
  tty?: boolean;
  /** Clock in milliseconds, for rates and redraw throttling. Default `Date.now`. */
  now?: () => number;
}

/**
 * Turns {@link ProgressEvent}s into text on a stream. On a terminal, each
 * blob gets a bar with bytes received, rate and time left, redrawn at most
 * every 100 ms and on completion; messages print above the bars.
 */
export class ProgressReporter {
  readonly #out: ReporterStream;
  readonly #quiet: boolean;
  readonly #json: boolean;
  readonly #tty: boolean;
  readonly #blobs = new Map<string, BlobState>();
  #drawnLines = 0;
  #lastDraw = 0;
  readonly #now: () => number;

  constructor(out: ReporterStream, options: ReporterOptions = {}) {
    this.#out = out;
    this.#quiet = options.quiet === true;
    this.#json = options.json === true;
    this.#tty = !this.#json && (options.tty ?? out.isTTY === true);
    this.#now = options.now ?? (() => Date.now());
  }

  /** Render one event. */
  handle(event: ProgressEvent): void {
    if (this.#quiet) return;
    if (this.#json) {
      // Per-chunk download events would flood a log; only finished steps are written.
      if (event.type === "warning" || event.type === "retry" || event.done) this.#out.write(`${JSON.stringify(event)}\n`);
      return;
    }
    switch (event.type) {
      case "warning":
        this.#line(`warning: ${event.message}`);
        break;
      case "retry":
        this.#line(`retrying ${event.request} in ${(event.delayMs / 1000).toFixed(1)} s (attempt ${event.attempt}): ${event.reason}`);
        break;
      case "download":
        this.#download(event.digest, event.received, event.total, event.done, event.cached === true);
        break;
      case "layer":
        if (event.done) {
          const hidden = event.hidden ? ` (left out ${event.hidden} ${event.hidden === 1 ? "file" : "files"} that upper layers hide)` : "";
          this.#line(`applied layer ${event.index + 1}/${event.count} ${shortDigest(event.digest)}${hidden}`);
        }
        break;
    }
  }

  /** Print a final summary line (as `{"type":"done","message":...}` in JSON mode). */
  finish(message: string): void {
    if (this.#quiet) return;
    if (this.#json) this.#out.write(`${JSON.stringify({ type: "done", message })}\n`);
    else this.#line(message);
  }

  /** Leave the terminal tidy: the last bars stay, the cursor goes below them. */
  stop(): void {
    if (this.#tty && this.#drawnLines > 0) this.#draw(true);
    this.#drawnLines = 0;
    this.#blobs.clear();
  }

  #download(digest: string, received: number, total: number, done: boolean, cached: boolean): void {
    let state = this.#blobs.get(digest);
    if (!state) {
      state = { digest, received: 0, total, done: false, started: this.#now() };
      this.#blobs.set(digest, state);
    }
    state.received = received;
    state.total = total;
    state.done = done;
    if (!this.#tty) {
      if (done) this.#line(`${cached ? "cached" : "fetched"} ${shortDigest(digest)} ${formatBytes(total)}`);
      return;
    }
    this.#draw(done);
  }

  #draw(force: boolean): void {
    const now = this.#now();
    if (!force && now - this.#lastDraw < 100) return;
    this.#lastDraw = now;
    let text = this.#drawnLines > 0 ? `\x1b[${this.#drawnLines}F` : "";
    const width = Math.max(40, Math.min(this.#out.columns ?? 80, 120));
    for (const state of this.#blobs.values()) text += `\x1b[2K${renderBar(state, now, width)}\n`;
    this.#drawnLines = this.#blobs.size;
    this.#out.write(text);
  }

  #line(text: string): void {
    if (this.#tty && this.#drawnLines > 0) {
      // Print above the bars, then redraw them below.
      this.#out.write(`\x1b[${this.#drawnLines}F\x1b[0J${text}\n`);
      this.#drawnLines = 0;
      this.#draw(true);
      return;
    }
    this.#out.write(`${text}\n`);
  }
}

function renderBar(state: BlobState, now: number, width: number): string {
  const elapsed = Math.max(1, now - state.started) / 1000;
  const rate = state.received / elapsed;
  const fraction = state.total > 0 ? Math.min(1, state.received / state.total) : 1;
  const label = shortDigest(state.digest);
  const tail = state.done
    ? `${formatBytes(state.total)} done`
    : `${formatBytes(state.received)}/${formatBytes(state.total)} ${formatBytes(rate)}/s ${formatEta(state, rate)}`;
  const barWidth = Math.max(10, width - label.length - tail.length - 4);
  const filled = Math.round(fraction * barWidth);
  return `${label} [${"#".repeat(filled)}${"-".repeat(barWidth - filled)}] ${tail}`;
}

function formatEta(state: BlobState, rate: number): string {
  if (rate <= 0) return "--:--";
  const seconds = Math.ceil((state.total - state.received) / rate);
  return `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")} left`;
}

/** Return "sha256:" and the first 12 hex digits. */
export function shortDigest(digest: string): string {
  return digest.slice(0, "sha256:".length + 12);
}

/** Format a byte count with binary units (B, KiB, MiB, GiB). */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}
