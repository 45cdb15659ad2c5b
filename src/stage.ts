/**
 * The three steps of ocistage: `track` resolves a reference to the manifest
 * digest of one platform, `fetch` stores the manifest and every layer in the
 * cache, and `stage` applies the layers in order into a directory.
 *
 * @module
 */
import * as fs from "node:fs";
import { BlobCache, type BlobDescriptor } from "./cache.ts";
import { createVerifyStream, type Digest, type HasherBackend, isDigest } from "./digest.ts";
import { DigestMismatchError, LayerError, PlatformNotFoundError, TargetNotEmptyError } from "./errors.ts";
import type { EventHandler } from "./progress.ts";
import { formatPlatform, hostPlatform, type ImageReference, parsePlatform, type Platform, rankPlatform } from "./reference.ts";
import { type Descriptor, foreignLayerUrls, type ImageManifest } from "./manifest.ts";
import { ForeignLayerError } from "./registry/errors.ts";
import { RegistryClient, type RegistryClientOptions } from "./registry/client.ts";
import { chainCredentials, credentialsExcept, dockerConfigCredentials, environmentCredentials } from "./registry/auth.ts";
import { mirrorHosts } from "./mirrors.ts";
import { explainMissingTag, type ImageSource, isLocalSource, openImageSource } from "./image-source.ts";
import { LayerApplier, type LayerStats } from "./layer/apply.ts";
import { ChangeRecorder, HiddenPaths, type LayerChanges, readLayerChanges } from "./layer/changes.ts";
import { compressionFromMediaType, DecoderWorkers, decompressBlobFile, openedOnRead } from "./layer/decompress.ts";

/** Options shared by {@link track}, {@link fetchImage} and {@link stage}. */
export interface PullOptions extends RegistryClientOptions {
  /** Platform to select from an index, as `os/arch[/variant]` or an object. Default: the host's. */
  platform?: Platform | string;
  /** A registry client to use instead of one built from these options. */
  client?: RegistryClient;
  /** Reports progress and warnings; the library never prints. */
  onEvent?: EventHandler;
}

/** Options of {@link fetchImage}. */
export interface FetchOptions extends PullOptions {
  /** The cache, or its directory. Default: {@link defaultCacheDir}. */
  cache?: BlobCache | string;
  /** Number of layers downloaded at once. Default 3. */
  concurrency?: number;
  /** sha256 backend. Default "auto" (node:crypto when present, else hash-wasm). */
  hasher?: HasherBackend;
}

/** Options of {@link stage}. */
export interface StageOptions extends FetchOptions {
  /** Apply file owners from the layers. Default: true when running as root. */
  owners?: boolean;
  /**
   * Read, hash and decompress each layer in a worker thread while the
   * layer's files are written, on runtimes with a web `Worker` (Deno, Bun).
   * On Deno this stages about 20% faster, but peak memory grows by up to
   * about 90 MiB (bench/README.md). Bun and Node gain nothing, because they
   * decompress on their thread pool already. Default false.
   */
  decodeWorker?: boolean;
  /**
   * Write every entry, also the files that an upper layer removes or
   * replaces. By default those are left out. They are found from the
   * records of the layers' changes that each stage writes into the cache,
   * and on a first stage from the upper layers whose blobs are at most an
   * eighth of the blobs below them, read ahead. Default false.
   */
  writeHidden?: boolean;
}

/** The outcome of {@link track}. */
export interface TrackResult {
  /** The registry reference that was resolved; absent for local sources (`oci:`, `docker-archive:`). */
  reference?: ImageReference;
  /** The image as a full reference or local source, such as "docker.io/library/alpine:3.20" or "oci:./layout:1.0". */
  source: string;
  /** The platform that was selected. */
  platform: Platform;
  /** Digest of the platform's image manifest. */
  digest: Digest;
  /** Digest of the index the tag pointed to, when it pointed to one. */
  indexDigest?: Digest;
  /** Media type of the image manifest. */
  mediaType: string;
}

/** The outcome of {@link fetchImage}. */
export interface FetchResult extends TrackResult {
  manifest: ImageManifest;
  /** The cache that now contains every blob of the image. */
  cache: BlobCache;
  /** Number of blobs downloaded (the rest were cached already). */
  downloaded: number;
}

/** The outcome of {@link stage}. */
export interface StageResult extends FetchResult {
  /** The directory the root filesystem was staged into. */
  target: string;
}

/** Open the source an image names; only registry references get a client. */
function sourceFor(image: string | ImageReference, options: FetchOptions): { source: ImageSource; client?: RegistryClient } {
  const client = isLocalSource(image) ? undefined : clientFor(options);
  return { source: openImageSource(image, { client, hasher: options.hasher }), client };
}

function toPlatform(platform: Platform | string | undefined): Platform {
  if (platform === undefined) return hostPlatform();
  return typeof platform === "string" ? parsePlatform(platform) : platform;
}

/**
 * Build the client for one call. Without explicit `credentials`, they come
 * from OCISTAGE_USERNAME/OCISTAGE_PASSWORD, then docker's config.json.
 */
export function clientFor(options: PullOptions): RegistryClient {
  if (options.client) return options.client;
  // OCISTAGE_USERNAME/OCISTAGE_PASSWORD name no host, so mirrors never get them.
  const credentials = options.credentials ??
    chainCredentials(credentialsExcept(mirrorHosts(options.mirrors), environmentCredentials()), dockerConfigCredentials());
  return new RegistryClient({ ...options, credentials });
}

/**
 * Resolve an image reference to the manifest digest of one platform.
 * `image` may also name a local source, `oci:DIR[:TAG]` or
 * `docker-archive:FILE[:NAME]` (see {@link openImageSource}).
 *
 * @example
 * ```ts
 * const { digest } = await track("127.0.0.1:5000/base:1.0", { platform: "linux/arm64" });
 * ```
 */
export async function track(image: string | ImageReference, options: PullOptions = {}): Promise<TrackResult> {
  const platform = toPlatform(options.platform);
  const { source } = sourceFor(image, options);
  let resolved;
  try {
    resolved = await source.resolve(platform).catch((error) => explainMissingTag(source, error));
    // Without an index there was nothing to choose from, so an explicit
    // platform is checked against the image config instead.
    if (!resolved.indexDigest && options.platform !== undefined) {
      checkImagePlatform(await source.readBlob(resolved.manifest.config), platform, true, source.name, options);
    }
  } finally {
    source.close();
  }
  return {
    reference: source.reference,
    source: source.name,
    platform,
    digest: resolved.digest,
    indexDigest: resolved.indexDigest,
    mediaType: resolved.mediaType,
  };
}

/**
 * Download the manifest, config and every layer of an image into the cache,
 * verifying each blob's size and sha256 while it streams. Blobs already in
 * the cache are not downloaded again. A local source (`oci:DIR[:TAG]`,
 * `docker-archive:FILE[:NAME]`) is copied into the cache the same way, and
 * recorded in its `index.json` only when the source names the image (a
 * docker archive's `RepoTags`).
 *
 * The name avoids shadowing the global `fetch`; `mod.ts` also exports it as
 * `fetch` for those who import it under a namespace.
 *
 * @example
 * ```ts
 * const result = await fetchImage("127.0.0.1:5000/base:1.0", { cache: "/var/cache/ocistage" });
 * console.log(result.digest, result.downloaded);
 * ```
 */
export async function fetchImage(image: string | ImageReference, options: FetchOptions = {}): Promise<FetchResult> {
  return await pull(image, options, undefined);
}

/**
 * Pull an image and stage its root filesystem into `target`, which must be a
 * new or empty directory. Layers are applied in manifest order as soon as
 * each has arrived, while later layers still download.
 *
 * Local sources (`oci:DIR[:TAG]`, `docker-archive:FILE[:NAME]`) take the
 * same path: their blobs are verified while they are copied into the cache,
 * then applied from there, so each blob is checked once and a second stage
 * of the same image reads nothing from the source but its manifest.
 *
 * @example
 * ```ts
 * await stage("127.0.0.1:5000/base:1.0", "./rootfs", { platform: "linux/amd64" });
 * ```
 */
export async function stage(image: string | ImageReference, target: string, options: StageOptions = {}): Promise<StageResult> {
  const created = prepareTarget(target);
  const workers = new DecoderWorkers();
  let plan: ChangesPlan | undefined;
  let changes: Promise<LayerChanges | undefined>[] = [];
  let hidden: Promise<HiddenPaths> | undefined;
  try {
    const applier = new LayerApplier(target, { onEvent: options.onEvent, owners: options.owners });
    const result = await pull(image, options, {
      prepare(cache, layers) {
        if (options.writeHidden) return [];
        plan = planChanges(cache, layers);
        return [...plan.readAhead].map((index) => layers[index].digest);
      },
      start(cache, layers, downloads) {
        if (plan !== undefined) changes = plannedChanges(plan, cache, layers, downloads, options);
      },
      async apply(cache, layer, index, count, diffId) {
        const compression = compressionFromMediaType(layer.mediaType ?? "") ?? "auto";
        // gzip has a CRC, but a zstd frame's checksum is optional and fzstd
        // skips it, so zstd layers are checked against the config's diff_id.
        const checkDiffId = diffId !== undefined && (compression === "zstd" || compression === "auto");
        const open = async () => {
          const tar = decompressBlobFile(cache.blobPath(layer.digest), compression, {
            hasher: options.hasher,
            onEnd: (received, actual) => cache.checkStored(layer.digest, layer.size, received, actual),
            worker: options.decodeWorker,
            workers,
            // The verifying stream below reads one chunk ahead of the applier.
            reuseChunks: !checkDiffId,
          });
          if (!checkDiffId) return tar;
          return tar.pipeThrough(await createVerifyStream({ digest: diffId, label: `layer ${layer.digest} decompressed` }, options.hasher));
        };
        const tar = await open();

        if (changes.length > 1) hidden ??= Promise.all(changes).then((list) => new HiddenPaths(list));
        const hiddenPaths = await hidden;
        const reopen = () => openedOnRead(open);
        let stats: LayerStats;
        // Changes that the plan found, or read ahead, are in the cache already.
        const known = (await changes[index]) !== undefined || cache.readChanges(layer.digest) !== undefined;
        const record = known ? undefined : new ChangeRecorder();
        try {
          stats = await applier.applyLayer(tar, { digest: layer.digest, index }, hiddenPaths ? { hidden: hiddenPaths, reopen, record } : { record });
        } catch (error) {
          throw await explainLayerFailure(error, cache, layer);
        }
        // The stream checked the blob's digest at its end, so the record describes the right content.
        if (record !== undefined) cache.writeChanges(layer.digest, record.changes);
        options.onEvent?.({ type: "layer", digest: layer.digest, index, count, read: layer.size, total: layer.size, done: true, hidden: stats.hidden });
      },
    });
    applier.finish();
    return { ...result, target };
  } catch (error) {
    // A half-staged tree is of no use and would block the next attempt,
    // which needs an empty target: remove what this call wrote.
    clearTarget(target, created);
    throw error;
  } finally {
    // Reads of upper layers that are still running end before the workers do.
    await Promise.allSettled(changes);
    workers.close();
  }
}

/**
 * An upper layer without a record is read ahead of the lower layers when
 * its blob is at most this share of the blobs below it. Reading a layer
 * costs a second decompression of it, which pays off for a small top layer
 * that removes or replaces many files of a large base, the usual shape.
 */
const READ_AHEAD_SHARE = 1 / 8;

/** The changes of the upper layers that are available before the layers are applied. */
interface ChangesPlan {
  /** Changes recorded in the cache, by layer index. */
  recorded: (LayerChanges | undefined)[];
  /** Layers to read ahead, by layer index: small ones without a record. */
  readAhead: Set<number>;
}

/** Finds the recorded changes of the layers above the lowest, and the layers worth reading ahead. */
function planChanges(cache: BlobCache, layers: Descriptor[]): ChangesPlan {
  const plan: ChangesPlan = { recorded: [undefined], readAhead: new Set() };
  const planned = new Set<string>();
  let below = layers[0]?.size ?? 0;
  for (let index = 1; index < layers.length; index++) {
    const layer = layers[index];
    const recorded = cache.readChanges(layer.digest);
    plan.recorded.push(recorded);
    if (recorded === undefined && layer.size <= below * READ_AHEAD_SHARE && !planned.has(layer.digest)) {
      plan.readAhead.add(index);
      planned.add(layer.digest);
    }
    below += layer.size;
  }
  return plan;
}

/**
 * Returns, for each layer, a promise of its changes: the record, the
 * changes read from the blob once it has arrived for a layer read ahead,
 * or undefined. Returns an empty list when no upper layer's changes will
 * be known.
 */
function plannedChanges(
  plan: ChangesPlan,
  cache: BlobCache,
  layers: Descriptor[],
  downloads: Map<string, Promise<void>>,
  options: StageOptions,
): Promise<LayerChanges | undefined>[] {
  if (plan.readAhead.size === 0 && plan.recorded.every((changes) => changes === undefined)) return [];
  const reads = new Map<string, Promise<LayerChanges | undefined>>();
  return layers.map((layer, index) => {
    if (!plan.readAhead.has(index)) return Promise.resolve(plan.recorded[index]);
    let read = reads.get(layer.digest);
    if (read === undefined) {
      read = downloads.get(layer.digest)!.then(() => readChangesFromBlob(cache, layer, options)).catch(() => undefined);
      reads.set(layer.digest, read);
    }
    return read;
  });
}

/** Reads the changes of a layer blob from its tar headers, and records them in the cache when the blob matched its digest. */
async function readChangesFromBlob(cache: BlobCache, layer: Descriptor, options: StageOptions): Promise<LayerChanges | undefined> {
  let intact = false;
  const tar = decompressBlobFile(cache.blobPath(layer.digest), compressionFromMediaType(layer.mediaType ?? "") ?? "auto", {
    hasher: options.hasher,
    // The applier reports and removes a damaged blob, so here its changes are only left unrecorded.
    onEnd: (received, actual) => {
      intact = received === layer.size && actual === layer.digest;
    },
  });
  const changes = await readLayerChanges(tar);
  if (!intact) return undefined;
  cache.writeChanges(layer.digest, changes);
  return changes;
}

/**
 * Applies the layers of an image: `prepare` is called before the downloads
 * start, `start` once they have started, then `apply` for each layer in order.
 */
interface LayerSink {
  /** Returns the digests of blobs to download right after the lowest layer's. */
  prepare?(cache: BlobCache, layers: Descriptor[]): string[];
  start?(cache: BlobCache, layers: Descriptor[], downloads: Map<string, Promise<void>>): void;
  /** Applies one layer that is in the cache; `diffId` is its uncompressed digest from the image config, when the config states one. */
  apply(cache: BlobCache, layer: Descriptor, index: number, count: number, diffId: Digest | undefined): Promise<void>;
}

async function pull(image: string | ImageReference, options: FetchOptions, sink: LayerSink | undefined): Promise<FetchResult> {
  const platform = toPlatform(options.platform);
  const { source, client } = sourceFor(image, options);
  try {
    return await pullFrom(source, client, platform, options, sink);
  } finally {
    source.close();
  }
}

async function pullFrom(
  source: ImageSource,
  client: RegistryClient | undefined,
  platform: Platform,
  options: FetchOptions,
  sink: LayerSink | undefined,
): Promise<FetchResult> {
  const cache = options.cache instanceof BlobCache ? options.cache : new BlobCache(options.cache, { hasher: options.hasher });
  const reference = source.reference;

  const resolved = await source.resolve(platform).catch((error) => explainMissingTag(source, error));
  const manifestDescriptor: BlobDescriptor = {
    mediaType: resolved.mediaType,
    digest: resolved.digest,
    size: resolved.bytes.byteLength,
  };
  await cache.putBytes(manifestDescriptor, resolved.bytes);

  const manifest = resolved.manifest;
  if (!options.allowForeignUrls) {
    // Stop before any download rather than after the layers below it.
    for (const layer of manifest.layers) {
      const urls = foreignLayerUrls(layer);
      if (urls) throw new ForeignLayerError(layer.digest, layer.mediaType, urls);
    }
  }
  let downloaded = 0;
  const download = async (descriptor: Descriptor): Promise<void> => {
    const ingest = (skipMirrors: boolean) =>
      cache.ingest(
        descriptor,
        (resume) => source.openBlob(descriptor, { resumeFrom: resume, skipMirrors }),
        (received) => options.onEvent?.({ type: "download", digest: descriptor.digest, received, total: descriptor.size, done: false }),
      );
    let fresh: boolean;
    try {
      fresh = await ingest(false);
    } catch (error) {
      // Wrong content is only found at the end of a blob, too late to switch
      // sources in the stream, so a mirror's bad copy gets one retry from the registry.
      if (!(error instanceof DigestMismatchError) || !reference || !client?.hasMirrors(reference)) throw error;
      fresh = await ingest(true);
    }
    if (fresh) downloaded++;
    options.onEvent?.({ type: "download", digest: descriptor.digest, received: descriptor.size, total: descriptor.size, done: true, cached: !fresh });
  };

  await download(manifest.config);
  const config = await cache.readBytes(manifest.config.digest, manifest.config.size);
  if (!resolved.indexDigest) checkImagePlatform(config, platform, options.platform !== undefined, source.name, options);
  const diffIds = sink ? configDiffIds(config, manifest.layers.length) : [];
  const layers = manifest.layers;
  const early = sink?.prepare?.(cache, layers) ?? [];
  const pending = downloadAll(layers, options.concurrency ?? 3, download, early);
  try {
    if (sink) {
      sink.start?.(cache, layers, pending);
      for (let index = 0; index < layers.length; index++) {
        await pending.get(layers[index].digest);
        await sink.apply(cache, layers[index], index, layers.length, diffIds[index]);
      }
    }
    await Promise.all(pending.values());
  } catch (error) {
    // Let the downloads still running settle so nothing writes after we return.
    await Promise.allSettled(pending.values());
    throw error;
  }

  if (source.cacheName) cache.tagManifest(source.cacheName, { ...manifestDescriptor, platform: { ...platform } });
  return {
    reference,
    source: source.name,
    platform,
    digest: resolved.digest,
    indexDigest: resolved.indexDigest,
    mediaType: resolved.mediaType,
    manifest,
    cache,
    downloaded,
  };
}

/**
 * Returns the error to report for a layer that failed to decompress or to
 * read as tar, after hashing its blob in the cache to find the cause. A
 * damaged copy in the cache is removed, and the error states that the next
 * run downloads it again. An intact blob means that the image itself is
 * broken. Errors that name an entry, and errors of other kinds, pass
 * unchanged.
 */
async function explainLayerFailure(error: unknown, cache: BlobCache, layer: Descriptor): Promise<unknown> {
  if (!(error instanceof LayerError) || error.entry !== undefined) return error;
  let damage: DigestMismatchError | undefined;
  try {
    damage = await cache.findDamage(layer.digest, layer.size);
  } catch {
    return error;
  }
  if (damage !== undefined) return damage;
  return new LayerError(
    `layer ${layer.digest} cannot be applied (${error.message}), and the blob matches its digest, so the image itself is broken: rebuild it or push it again`,
    { layer: error.layer ?? layer.digest, cause: error },
  );
}

/**
 * Returns the config's `rootfs.diff_ids` when they are digests, one per
 * layer, and an empty list otherwise (a config that is not JSON, has no
 * such list, or has one of another length).
 */
function configDiffIds(configBytes: Uint8Array, layerCount: number): (Digest | undefined)[] {
  let config: { rootfs?: { diff_ids?: unknown } };
  try {
    config = JSON.parse(new TextDecoder().decode(configBytes));
  } catch {
    return [];
  }
  const ids = config?.rootfs?.diff_ids;
  if (!Array.isArray(ids) || ids.length !== layerCount) return [];
  return ids.map((id) => (typeof id === "string" && isDigest(id) ? id : undefined));
}

/**
 * Check the platform an image config states against the requested one. A
 * mismatch is a {@link PlatformNotFoundError} when the platform was given
 * explicitly, and a "platform-mismatch" warning when it was the host's
 * default. A config without `os` and `architecture` passes.
 */
function checkImagePlatform(configBytes: Uint8Array, requested: Platform, explicit: boolean, sourceName: string, options: PullOptions): void {
  let config: { os?: unknown; architecture?: unknown; variant?: unknown };
  try {
    config = JSON.parse(new TextDecoder().decode(configBytes));
  } catch {
    return;
  }
  if (typeof config.os !== "string" || typeof config.architecture !== "string") return;
  const offered: Platform = {
    os: config.os,
    architecture: config.architecture,
    ...(typeof config.variant === "string" && config.variant ? { variant: config.variant } : {}),
  };
  if (rankPlatform(offered, requested) !== undefined) return;
  if (explicit) throw new PlatformNotFoundError(formatPlatform(requested), [formatPlatform(offered)], sourceName);
  options.onEvent?.({
    type: "warning",
    code: "platform-mismatch",
    message: `${sourceName} is a single-platform image for ${formatPlatform(offered)}, not this host's ${formatPlatform(requested)}: ` +
      "its programs may not run here; pass --platform to state the platform you want",
    count: 1,
  });
}

/**
 * Start the downloads of the distinct layers, at most `concurrency` at once,
 * in manifest order except that the blobs in `early` follow the first
 * layer's, and return each layer's completion by digest.
 */
function downloadAll(
  layers: Descriptor[],
  concurrency: number,
  download: (descriptor: Descriptor) => Promise<void>,
  early: string[] = [],
): Map<string, Promise<void>> {
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new RangeError(`invalid concurrency ${concurrency}: pass a whole number of at least 1`);
  }
  const distinct = new Map<string, Descriptor>();
  for (const layer of layers) if (!distinct.has(layer.digest)) distinct.set(layer.digest, layer);

  const queue = [...distinct.values()];
  const first = queue[0];
  const rank = (layer: Descriptor) => (layer === first ? 0 : early.includes(layer.digest) ? 1 : 2);
  queue.sort((a, b) => rank(a) - rank(b));
  const waiters = new Map<string, { promise: Promise<void>; resolve: () => void; reject: (error: unknown) => void }>();
  for (const layer of queue) {
    let resolve!: () => void;
    let reject!: (error: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // The awaiting caller sees the failure. This handler only keeps it from counting as unhandled before then.
    promise.catch(() => {});
    waiters.set(layer.digest, { promise, resolve, reject });
  }

  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (next < queue.length) {
      const layer = queue[next++];
      const waiter = waiters.get(layer.digest)!;
      if (failed) {
        waiter.reject(new Error(`download of ${layer.digest} was not started because another layer failed`));
        continue;
      }
      try {
        await download(layer);
        waiter.resolve();
      } catch (error) {
        failed = true;
        waiter.reject(error);
      }
    }
  };
  for (let i = 0; i < Math.min(concurrency, queue.length); i++) void worker();
  return new Map([...waiters].map(([digest, waiter]) => [digest, waiter.promise]));
}

/**
 * Create the target directory, or check that an existing one is empty.
 * Returns the topmost directory created here (the target or a missing
 * parent of it), or undefined when the target existed.
 */
function prepareTarget(target: string): string | undefined {
  if (target === "") throw new TypeError("stage target is an empty string: pass the directory to stage into");
  let entries: string[];
  try {
    entries = fs.readdirSync(target);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return fs.mkdirSync(target, { recursive: true }) ?? target;
    if (code === "ENOTDIR") throw new TargetNotEmptyError(target, { notDirectory: true });
    throw error;
  }
  if (entries.length > 0) throw new TargetNotEmptyError(target);
  return undefined;
}

/**
 * Remove what a failed stage wrote: the directories this call created
 * (`created`, the target or a parent of it), else everything inside the
 * target (it was empty before). Directories are made writable first so that
 * a non-root user can remove read-only ones.
 */
function clearTarget(target: string, created: string | undefined): void {
  const makeWritable = (dir: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const child = `${dir}/${entry.name}`;
      fs.chmodSync(child, 0o700);
      makeWritable(child);
    }
  };
  try {
    makeWritable(target);
    if (created !== undefined) {
      fs.rmSync(created, { recursive: true, force: true });
      return;
    }
    for (const name of fs.readdirSync(target)) fs.rmSync(`${target}/${name}`, { recursive: true, force: true });
  } catch {
    // The original error matters more; what is left stays for the user to remove.
  }
}
