/**
 * ProgressReporter: redrawn bars on a fake terminal with a fake clock, one
 * line per step otherwise, JSON lines, silence; and the download events the
 * registry path emits while a blob streams.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { formatBytes, ProgressReporter, shortDigest } from "../src/cli/progress.ts";
import type { DownloadEvent, ProgressEvent } from "../src/progress.ts";
import { fetchImage } from "../src/stage.ts";
import { MemoryRegistry } from "./fixtures/registry.ts";

const A = `sha256:${"a".repeat(64)}`;
const B = `sha256:${"b".repeat(64)}`;

/** Create a stream that records writes, with a terminal flag. */
function fakeStream(isTTY: boolean) {
  const writes: string[] = [];
  return { writes, isTTY, columns: 80, write: (text: string) => void writes.push(text) };
}

function fakeClock(start: number) {
  let now = start;
  return { now: () => now, set: (value: number) => void (now = value) };
}

function download(digest: string, received: number, total: number, done = false, cached = false): DownloadEvent {
  return { type: "download", digest, received, total, done, ...(cached ? { cached } : {}) };
}

test("ProgressReporter draws a bar per blob on a terminal", () => {
  const out = fakeStream(true);
  const clock = fakeClock(10_000);
  const reporter = new ProgressReporter(out, { now: clock.now });

  reporter.handle(download(A, 0, 2048));
  assert.equal(out.writes.length, 1);
  assert.ok(out.writes[0].startsWith("\x1b[2K"), "each bar line is cleared first");
  assert.match(out.writes[0], new RegExp(`^\\x1b\\[2K${shortDigest(A)} \\[-+\\] 0 B/2.0 KiB 0 B/s --:--\\n$`));

  clock.set(10_050);
  reporter.handle(download(A, 512, 2048));
  assert.equal(out.writes.length, 1, "redraws are throttled to one per 100 ms");

  clock.set(11_000);
  reporter.handle(download(A, 1024, 2048));
  assert.equal(out.writes.length, 2);
  const redraw = out.writes[1];
  assert.ok(redraw.startsWith("\x1b[1F\x1b[2K"), "the cursor moves up over the one drawn bar");
  assert.match(redraw, /1\.0 KiB\/2\.0 KiB 1\.0 KiB\/s 0:01 left\n$/, "bytes, rate and time left");
  const bar = /\[(#*)(-*)\]/.exec(redraw)!;
  assert.equal(bar[1].length, bar[2].length, "half the bar is filled at half the bytes");
});

test("ProgressReporter prints messages above the bars", () => {
  const out = fakeStream(true);
  const clock = fakeClock(10_000);
  const reporter = new ProgressReporter(out, { now: clock.now });

  reporter.handle(download(A, 0, 100));
  clock.set(10_200);
  reporter.handle(download(B, 0, 100));
  const twoBars = out.writes.at(-1)!;
  assert.ok(twoBars.startsWith("\x1b[1F"));
  assert.equal(twoBars.split("\x1b[2K").length - 1, 2, "both bars are drawn");

  reporter.handle({ type: "warning", code: "fifo-dropped", message: "dropped 1 FIFO entry", count: 1 });
  const message = out.writes.at(-2)!;
  assert.equal(message, "\x1b[2F\x1b[0Jwarning: dropped 1 FIFO entry\n", "the bars are erased and the message written");
  assert.equal(out.writes.at(-1)!.split("\x1b[2K").length - 1, 2, "the bars come back below it");

  clock.set(10_210);
  reporter.handle(download(A, 100, 100, true));
  assert.match(out.writes.at(-1)!, /100 B done\n/, "completion is drawn at once, throttle or not");
  reporter.stop();
  assert.ok(out.writes.at(-1)!.startsWith("\x1b[2F"), "stop() draws the final state in place");
});

test("ProgressReporter writes one line per finished step elsewhere", () => {
  const out = fakeStream(false);
  const reporter = new ProgressReporter(out);
  const events: ProgressEvent[] = [
    download(A, 10, 2048),
    download(A, 2048, 2048, true),
    download(B, 100, 100, true, true),
    { type: "retry", request: "GET http://127.0.0.1/v2/x/blobs/y", attempt: 1, delayMs: 500, reason: "HTTP 503" },
    { type: "layer", digest: A, index: 0, count: 2, read: 2048, total: 2048, done: true },
    { type: "warning", code: "xattr-ignored", message: "ignored the extended attributes of 2 entries", count: 2 },
  ];
  for (const event of events) reporter.handle(event);
  reporter.finish("staged x into y");

  assert.deepEqual(out.writes, [
    `fetched ${shortDigest(A)} 2.0 KiB\n`,
    `cached ${shortDigest(B)} 100 B\n`,
    "retrying GET http://127.0.0.1/v2/x/blobs/y in 0.5 s (attempt 1): HTTP 503\n",
    `applied layer 1/2 ${shortDigest(A)}\n`,
    "warning: ignored the extended attributes of 2 entries\n",
    "staged x into y\n",
  ]);
});

test("ProgressReporter writes JSON lines with json", () => {
  const out = fakeStream(true);
  const reporter = new ProgressReporter(out, { json: true });
  reporter.handle(download(A, 10, 2048));
  reporter.handle(download(A, 2048, 2048, true));
  reporter.handle({ type: "warning", code: "fifo-dropped", message: "dropped 1 FIFO entry", count: 1 });
  reporter.finish("done");

  const parsed = out.writes.map((line) => JSON.parse(line));
  assert.equal(parsed.length, 3, "chunk events are left out");
  assert.deepEqual(parsed[0], download(A, 2048, 2048, true));
  assert.equal(parsed[1].code, "fifo-dropped");
  assert.deepEqual(parsed[2], { type: "done", message: "done" });
  assert.ok(!out.writes.join("").includes("\x1b"), "no terminal codes even on a terminal");
});

test("ProgressReporter writes nothing with quiet", () => {
  const out = fakeStream(true);
  const reporter = new ProgressReporter(out, { quiet: true });
  reporter.handle(download(A, 2048, 2048, true));
  reporter.handle({ type: "warning", code: "fifo-dropped", message: "dropped 1 FIFO entry", count: 1 });
  reporter.finish("done");
  reporter.stop();
  assert.deepEqual(out.writes, []);
});

test("formatBytes() uses binary units", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(1023), "1023 B");
  assert.equal(formatBytes(1536), "1.5 KiB");
  assert.equal(formatBytes(5 * 1024 ** 3), "5.0 GiB");
});

test("fetchImage() reports bytes while a blob downloads", async () => {
  const registry = new MemoryRegistry();
  const server = await registry.listen();
  try {
    const bytes = new Uint8Array(4 * 1024 * 1024).map((_, i) => (i * 7919) >>> 3);
    const pushed = registry.pushImage("team/big", "1", [{ bytes, mediaType: "application/vnd.oci.image.layer.v1.tar" }]);
    const layer = pushed.layers[0].digest;
    const events: DownloadEvent[] = [];
    const cache = fs.mkdtempSync(path.join(os.tmpdir(), "ocistage-progress-"));
    await fetchImage(`${server.host}/team/big:1`, {
      cache,
      platform: "linux/amd64",
      onEvent: (event) => event.type === "download" && event.digest === layer && events.push(event),
    });

    const partial = events.filter((event) => !event.done);
    assert.ok(partial.length >= 2, `expected several progress events, got ${partial.length}`);
    for (let i = 1; i < partial.length; i++) assert.ok(partial[i].received > partial[i - 1].received, "received grows");
    assert.ok(partial[0].received < bytes.byteLength, "the first event comes before the end");
    assert.equal(partial.at(-1)!.received, bytes.byteLength);
    assert.ok(partial.every((event) => event.total === bytes.byteLength));
    assert.deepEqual(events.at(-1), { ...download(layer, bytes.byteLength, bytes.byteLength, true), cached: false });
  } finally {
    await server.close();
  }
});
