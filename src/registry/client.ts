/**
 * A read-only client for the OCI distribution API on web-standard `fetch`
 * and streams: manifests, platform resolution, tag lists and verified blob
 * streams with retries, `Range` resume and hand-followed redirects.
 *
 * @example
 * ```ts
 * const client = new RegistryClient({ credentials: dockerConfigCredentials() });
 * const ref = parseReference("alpine:3.20");
 * const { manifest } = await client.resolve(ref, hostPlatform());
 * const layer = client.openBlob(ref, manifest.layers[0]);
 * ```
 *
 * @module
 */
import {
  checkContent,
  createSha256,
  type Digest,
  type HasherBackend,
  isDigest,
  type Sha256,
  sha256Of,
} from "../digest.ts";
import { DigestMismatchError, ManifestError } from "../errors.ts";
import {
  type Descriptor,
  foreignLayerUrls,
  type ImageIndex,
  type ImageManifest,
  MANIFEST_ACCEPT,
  MAX_MANIFEST_BYTES,
  parseManifest,
  type FetchedManifest,
  type ResolvedManifest,
  resolveIndex,
  selectManifest,
} from "../manifest.ts";
import { type Mirror, type MirrorMap, mirrorHosts, mirrorsFor } from "../mirrors.ts";
import type { EventHandler } from "../progress.ts";
import {
  type ImageReference,
  type Platform,
  registryBaseUrl,
} from "../reference.ts";
import {
  bearerChallengeError,
  type CredentialResolver,
  readLimited,
  RegistryAuth,
} from "./auth.ts";
import {
  errorFromResponse,
  ForeignLayerError,
  networkError,
  redactUrl,
  RegistryError,
  type RequestSubject,
  timeoutError,
} from "./errors.ts";

/** Options of {@link RegistryClient}. */
export interface RegistryClientOptions {
  /** The fetch implementation (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Source of credentials (default: none, so access is anonymous). */
  credentials?: CredentialResolver;
  /** Use HTTP instead of HTTPS for every registry (default false; loopback hosts always use HTTP). */
  plainHttp?: boolean;
  /** An explicit URL for the registry it names, such as `"http://10.0.0.5:5000"`. */
  registryUrl?: string;
  /** Retries after a network error, 408, 429 or 5xx, per request (default 4). */
  retries?: number;
  /** Receives retry events, and warning events when a mirror or other source fails. */
  onEvent?: EventHandler;
  /** `User-Agent` header (default `"ocistage/0.1.0"`). */
  userAgent?: string;
  /** Milliseconds to wait for response headers, and for each body chunk (default 30000). */
  timeoutMs?: number;
  /** First backoff delay in milliseconds, doubled per retry, with jitter (default 500). */
  retryDelayMs?: number;
  /** Upper bound of a backoff delay and of a honoured `Retry-After`, in milliseconds (default 30000). */
  maxRetryDelayMs?: number;
  /** Download foreign and non-distributable layers from their `urls` (default false). */
  allowForeignUrls?: boolean;
  /** sha256 backend (default `"auto"`). */
  hasher?: HasherBackend;
  /** Waits between retries; tests pass a fake (default: a timer that the signal cancels). */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /** Clock in milliseconds, for token expiry (default `Date.now`). */
  now?: () => number;
  /**
   * Mirror locations per registry (`"docker.io"` for Docker Hub), such as
   * `{ "docker.io": ["https://mirror.example"] }`; see `src/mirrors.ts` for
   * the location forms. Manifests by digest and blobs are requested from
   * each mirror in order, then from the registry; tags always go to the
   * registry. A mirror gets one retry per request before the next source is
   * tried, and credentials are resolved for the mirror's own `host[:port]`.
   * A resolver that ignores the host, such as `staticCredentials`, thus
   * gives mirrors the same credentials. Wrap it in `credentialsExcept` with
   * `mirrorHosts(mirrors)` to prevent that. Default: no mirrors.
   */
  mirrors?: MirrorMap;
}

export type { FetchedManifest, ResolvedManifest } from "../manifest.ts";

/** Options of {@link RegistryClient.openBlob}. */
export interface OpenBlobOptions {
  /** Continue a partial download: bytes already held and the hash over them. */
  resumeFrom?: { offset: number; hash: Sha256 };
  signal?: AbortSignal;
  /** Called with the byte count so far (including `resumeFrom.offset`) after each chunk. */
  onProgress?: (received: number) => void;
  /** Fetch from the registry only, for a retry after a mirror sent wrong content (default false). */
  skipMirrors?: boolean;
}

/** One request as the retry loop sends it. */
export interface RegistryRequest {
  method: string;
  url: string;
  headers?: Record<string, string>;
  /** Registry name for auth; undefined sends no credentials (foreign URLs). */
  registry?: string;
  /** Token scope, such as `"repository:library/alpine:pull"`. */
  scope?: string;
  subject: RequestSubject;
  signal?: AbortSignal;
  /** Retries for this request (default: the client's `retries`). */
  retries?: number;
  /** The mirror this request goes to, when it goes to one. */
  mirror?: Mirror;
}

/** A place that serves a repository's content: a mirror or the registry itself. */
interface Endpoint {
  /** `host[:port]` for auth state and credentials. */
  registry: string;
  baseUrl: string;
  /** Repository name at this endpoint (with a mirror's prefix). */
  repository: string;
  mirror?: Mirror;
}

const MAX_REDIRECTS = 10;
const MAX_TAG_PAGES = 100;
const DEFAULT_BLOB_LIMIT = 4 * 1024 * 1024;
/** Retries per request to a mirror, kept low so a dead mirror delays a pull only briefly. */
const MIRROR_RETRIES = 1;

/**
 * A registry client. One instance keeps auth state (challenges and tokens)
 * for every registry it talks to, so reuse it across requests.
 */
export class RegistryClient {
  private readonly fetchImpl: typeof fetch;
  private readonly auth: RegistryAuth;
  private readonly retries: number;
  private readonly timeoutMs: number;
  private readonly retryDelayMs: number;
  private readonly maxRetryDelayMs: number;
  private readonly userAgent: string;
  private readonly sleep: (ms: number, signal?: AbortSignal) => Promise<void>;
  private readonly options: RegistryClientOptions;

  constructor(options: RegistryClientOptions = {}) {
    this.options = options;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.retries = options.retries ?? 4;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.retryDelayMs = options.retryDelayMs ?? 500;
    this.maxRetryDelayMs = options.maxRetryDelayMs ?? 30_000;
    this.userAgent = options.userAgent ?? "ocistage/0.1.0";
    this.sleep = options.sleep ?? abortableSleep;
    // Parse the mirror locations now, so a bad one fails before any request.
    mirrorHosts(options.mirrors);
    this.auth = new RegistryAuth({
      credentials: options.credentials,
      now: options.now,
      fetch: (url, init, subject) =>
        this.send({
          method: init.method ?? "GET",
          url,
          subject,
          signal: init.signal ?? undefined,
        }, init),
    });
  }

  /** Return the API base URL for a reference's registry, honouring `plainHttp` and `registryUrl`. */
  baseUrl(ref: ImageReference): string {
    return registryBaseUrl(ref.registry, {
      plainHttp: this.options.plainHttp,
      registryUrl: this.options.registryUrl,
    });
  }

  /**
   * Fetch a manifest or index by tag or digest (default: the reference's
   * digest, else its tag).
   *
   * The digest is computed from the exact bytes received. A
   * `Docker-Content-Digest` header is compared when present, and a request by
   * digest must return content with that digest.
   *
   * @throws {RegistryError} for HTTP and network failures.
   * @throws {DigestMismatchError} when the content does not match a digest.
   * @throws {ManifestError} for malformed or unsupported manifests.
   * @throws {RangeError} for manifests over 4 MiB.
   */
  async getManifest(
    ref: ImageReference,
    reference: string | undefined = ref.digest ?? ref.tag,
    signal?: AbortSignal,
  ): Promise<FetchedManifest> {
    if (reference === undefined) {
      throw new TypeError(
        `reference "${ref.registry}/${ref.repository}" has neither tag nor digest: pass one`,
      );
    }
    const endpoints = this.endpoints(ref, reference.includes(":"));
    for (const endpoint of endpoints.slice(0, -1)) {
      try {
        return await this.getManifestFrom(endpoint, reference, signal);
      } catch (error) {
        if (signal?.aborted) throw signal.reason;
        this.warnMirrorFailed(endpoint.mirror!, `manifest ${reference}`, error);
      }
    }
    return await this.getManifestFrom(endpoints[endpoints.length - 1], reference, signal);
  }

  /** Return true when a reference's registry has mirrors. */
  hasMirrors(ref: ImageReference): boolean {
    return mirrorsFor(this.options.mirrors, ref.registry).length > 0;
  }

  /** Return where to request a reference's content: its mirrors first when `byDigest`, then the registry. */
  private endpoints(ref: ImageReference, byDigest: boolean): Endpoint[] {
    const origin: Endpoint = {
      registry: ref.registry,
      baseUrl: this.baseUrl(ref),
      repository: ref.repository,
    };
    if (!byDigest) return [origin];
    const mirrors = mirrorsFor(this.options.mirrors, ref.registry).map((mirror): Endpoint => ({
      registry: mirror.host,
      baseUrl: mirror.origin,
      repository: mirror.prefix ? `${mirror.prefix}/${ref.repository}` : ref.repository,
      mirror,
    }));
    return [...mirrors, origin];
  }

  /** Report that a mirror failed and the next source is tried. */
  private warnMirrorFailed(mirror: Mirror, what: string, error: unknown): void {
    const reason = error instanceof Error ? error.message : String(error);
    this.options.onEvent?.({
      type: "warning",
      code: "mirror-failed",
      message: `mirror "${redactUrl(mirror.location)}" failed for ${what}, so the next source ` +
        `is tried: ${reason}`,
      count: 1,
    });
  }

  /**
   * Report that a blob source failed for good and the next source is tried.
   *
   * @internal for the blob reader.
   */
  warnSourceFailed(source: RegistryRequest, what: string, error: unknown): void {
    if (source.mirror) {
      this.warnMirrorFailed(source.mirror, what, error);
      return;
    }
    const reason = error instanceof Error ? error.message : String(error);
    this.options.onEvent?.({
      type: "warning",
      code: "source-failed",
      message: `"${redactUrl(source.url)}" failed for ${what}, so the next source is tried: ${reason}`,
      count: 1,
    });
  }

  private async getManifestFrom(
    endpoint: Endpoint,
    reference: string,
    signal: AbortSignal | undefined,
  ): Promise<FetchedManifest> {
    const url = `${endpoint.baseUrl}/v2/${endpoint.repository}/manifests/${reference}`;
    const { response, bytes } = await this.fetchSmall({
      method: "GET",
      url,
      headers: { accept: MANIFEST_ACCEPT },
      registry: endpoint.registry,
      scope: `repository:${endpoint.repository}:pull`,
      subject: {
        registry: endpoint.registry,
        repository: endpoint.repository,
        manifest: reference,
      },
      signal,
      retries: endpoint.mirror ? Math.min(MIRROR_RETRIES, this.retries) : undefined,
      mirror: endpoint.mirror,
    });
    const digest = await sha256Of(bytes, this.options.hasher);
    const separator = reference.includes(":") ? "@" : ":";
    const source = `${endpoint.registry}/${endpoint.repository}${separator}${reference}`;

    const headerDigest = response.headers.get("docker-content-digest");
    if (headerDigest && isDigest(headerDigest) && headerDigest !== digest) {
      throw new DigestMismatchError(
        `manifest "${source}" has digest ${digest}, but the registry's Docker-Content-Digest ` +
          `header states ${headerDigest}: retry, and report it to the registry if it persists`,
        headerDigest,
        digest,
      );
    }
    if (reference.includes(":") && reference !== digest) {
      throw new DigestMismatchError(
        `manifest "${source}" has digest ${digest}, expected ${reference}: the registry sent ` +
          "different content; retry, or check the pinned digest",
        reference,
        digest,
      );
    }

    const contentType = response.headers.get("content-type") ?? undefined;
    const manifest = parseManifest(bytes, contentType, source);
    return { bytes, mediaType: manifest.mediaType, digest, manifest };
  }

  /**
   * Resolve a reference to a single-platform manifest, choosing from an index
   * by platform (see {@link selectManifest}).
   *
   * @throws {PlatformNotFoundError} when the index has no matching entry.
   */
  async resolve(
    ref: ImageReference,
    platform: Platform,
    signal?: AbortSignal,
  ): Promise<ResolvedManifest> {
    const top = await this.getManifest(ref, undefined, signal);
    return await resolveIndex(top, platform, `${ref.registry}/${ref.repository}`, (entry) => this.getManifest(ref, entry.digest, signal));
  }

  /** List a repository's tags, following `Link` pagination. */
  async listTags(ref: ImageReference, signal?: AbortSignal): Promise<string[]> {
    const tags: string[] = [];
    let url: string | undefined = `${this.baseUrl(ref)}/v2/${ref.repository}/tags/list`;

    for (let page = 0; url !== undefined && page < MAX_TAG_PAGES; page++) {
      const { response, bytes } = await this.fetchSmall({
        method: "GET",
        url,
        headers: { accept: "application/json" },
        registry: ref.registry,
        scope: pullScope(ref),
        subject: { registry: ref.registry, repository: ref.repository, tags: true },
        signal,
      });
      let body: { tags?: unknown };
      try {
        body = JSON.parse(new TextDecoder().decode(bytes));
      } catch (error) {
        throw new RegistryError(
          `tag list from GET ${redactUrl(url)} is not JSON: check the registry address`,
          { status: response.status, method: "GET", url, cause: error },
        );
      }
      if (Array.isArray(body.tags)) {
        tags.push(...body.tags.filter((tag): tag is string => typeof tag === "string"));
      }
      url = nextPageUrl(response.headers.get("link"), url);
    }
    return tags;
  }

  /**
   * Fetch a small blob, such as an image config, whole and verified.
   *
   * @throws {RangeError} when the descriptor states more than `maxBytes` (default 4 MiB).
   */
  async getBlob(
    ref: ImageReference,
    descriptor: Descriptor,
    options: { maxBytes?: number; signal?: AbortSignal } = {},
  ): Promise<Uint8Array> {
    const limit = options.maxBytes ?? DEFAULT_BLOB_LIMIT;
    if (descriptor.size > limit) {
      throw new RangeError(
        `blob ${descriptor.digest} has ${descriptor.size} bytes, more than the limit of ${limit}: ` +
          "stream it with openBlob instead",
      );
    }
    const stream = this.openBlob(ref, descriptor, { signal: options.signal });
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  /**
   * Stream a blob from `resumeFrom.offset` (default 0) to its end.
   *
   * The stream hashes and counts as it goes, continuing `resumeFrom.hash`,
   * and errors with {@link DigestMismatchError} when the size or digest
   * differs from the descriptor. Chunks are unverified until the stream
   * closes. Network errors, stalls, 408, 429 and 5xx are retried with
   * backoff. A body that stops short, whether the runtime reports an error
   * or a normal end, resumes with `Range` (a server that returns 200 instead
   * of 206 is read from the start, skipping what was received).
   *
   * Foreign and non-distributable layers with `urls` are fetched from those
   * URLs, without credentials, only with `allowForeignUrls`. Without it the
   * stream errors with {@link ForeignLayerError}.
   *
   * Sources are tried in order: foreign URLs (when allowed), the registry's
   * mirrors, then the registry. When one fails for good, the next continues
   * from the same offset with `Range`, and a `warning` event names the
   * failure. Wrong content is found only at the end, so a caller that gets
   * {@link DigestMismatchError} with mirrors configured may retry with
   * `skipMirrors`.
   */
  openBlob(
    ref: ImageReference,
    descriptor: Descriptor,
    options: OpenBlobOptions = {},
  ): ReadableStream<Uint8Array> {
    return new BlobReader(this, ref, descriptor, options).stream();
  }

  /**
   * Return the sources of a blob, in order of preference.
   *
   * @internal for the blob reader.
   */
  blobSources(
    ref: ImageReference,
    descriptor: Descriptor,
    options: { skipMirrors?: boolean } = {},
  ): RegistryRequest[] {
    const endpoints = this.endpoints(ref, !options.skipMirrors);
    const registrySources = endpoints.map((endpoint): RegistryRequest => ({
      method: "GET",
      url: `${endpoint.baseUrl}/v2/${endpoint.repository}/blobs/${descriptor.digest}`,
      registry: endpoint.registry,
      scope: `repository:${endpoint.repository}:pull`,
      subject: {
        registry: endpoint.registry,
        repository: endpoint.repository,
        blob: descriptor.digest,
      },
      retries: endpoint.mirror ? Math.min(MIRROR_RETRIES, this.retries) : undefined,
      mirror: endpoint.mirror,
    }));

    const urls = foreignLayerUrls(descriptor);
    if (!urls) return registrySources;
    if (!this.options.allowForeignUrls) {
      throw new ForeignLayerError(descriptor.digest, descriptor.mediaType, urls);
    }
    const external = urls
      .filter((url) => /^https?:\/\//i.test(url))
      .map((url): RegistryRequest => ({
        method: "GET",
        url,
        subject: { blob: descriptor.digest },
      }));
    return [...external, ...registrySources];
  }

  /**
   * Settings the blob reader needs.
   *
   * @internal
   */
  get settings(): { retries: number; timeoutMs: number; hasher?: HasherBackend } {
    return {
      retries: this.retries,
      timeoutMs: this.timeoutMs,
      hasher: this.options.hasher,
    };
  }

  /**
   * Send a request with auth, hand-followed redirects and retries; return a
   * 2xx response or throw {@link RegistryError}.
   *
   * @internal for the blob reader and token requests.
   */
  async send(request: RegistryRequest, init: RequestInit = {}): Promise<Response> {
    for (let attempt = 0;; attempt++) {
      let failure: RegistryError;
      try {
        const response = await this.sendOnce(request, init);
        if (response.ok) return response;
        const credentialsSent = request.subject.credentialsSent ??
          (request.registry !== undefined && await this.auth.hasCredentials(request.registry));
        const authError = response.status === 401
          ? bearerChallengeError(response.headers.get("www-authenticate"))
          : undefined;
        failure = await errorFromResponse(response, request.method, response.url || request.url, {
          ...request.subject,
          credentialsSent,
          authError,
        });
      } catch (error) {
        if (request.signal?.aborted) throw request.signal.reason;
        if (!(error instanceof RegistryError) || !error.retryable) throw error;
        if (authErrors.has(error)) throw error;
        failure = error;
      }

      if (!failure.retryable || attempt >= (request.retries ?? this.retries)) throw failure;
      await this.backoff(request, attempt, failure);
    }
  }

  /**
   * Wait before retry `attempt + 1` and report it. A `Retry-After` delay, bounded by
   * `maxRetryDelayMs`, replaces the exponential backoff.
   *
   * @internal
   */
  async backoff(
    request: { method: string; url: string; signal?: AbortSignal },
    attempt: number,
    failure: RegistryError,
  ): Promise<void> {
    const exponential = Math.min(this.maxRetryDelayMs, this.retryDelayMs * 2 ** attempt);
    const jittered = Math.round(exponential * (0.5 + Math.random() * 0.5));
    const delayMs = failure.retryAfterMs === undefined
      ? jittered
      : Math.min(failure.retryAfterMs, this.maxRetryDelayMs);

    this.options.onEvent?.({
      type: "retry",
      request: `${request.method} ${redactUrl(request.url)}`,
      attempt: attempt + 1,
      delayMs,
      reason: failure.message,
    });
    await this.sleep(delayMs, request.signal);
  }

  /** Send one attempt: auth, one repeat after a 401 challenge, and redirects, without retries. */
  private async sendOnce(request: RegistryRequest, init: RequestInit): Promise<Response> {
    const origin = new URL(request.url).origin;
    let authorization = request.registry === undefined ? undefined : await markAuthErrors(
      this.auth.authorization(request.registry, request.scope ?? "", request.signal),
    );
    let answeredChallenge = false;
    let url = request.url;

    for (let redirects = 0; redirects <= MAX_REDIRECTS;) {
      const sameOrigin = new URL(url).origin === origin;
      const headers = new Headers(init.headers);
      for (const [name, value] of Object.entries(request.headers ?? {})) headers.set(name, value);
      headers.set("user-agent", this.userAgent);
      if (authorization) headers.set("authorization", authorization);
      // Credentials belong to the origin they were meant for, never to a redirect target.
      if (!sameOrigin) headers.delete("authorization");

      const response = await this.fetchWithTimeout(url, {
        ...init,
        method: init.method ?? request.method,
        headers,
      }, request);

      if (
        response.status === 401 && sameOrigin && request.registry !== undefined &&
        !answeredChallenge
      ) {
        answeredChallenge = true;
        const next = await markAuthErrors(this.auth.respond(
          request.registry,
          request.scope ?? "",
          response.headers.get("www-authenticate"),
          authorization,
          request.signal,
        ));
        if (next !== undefined) {
          await response.body?.cancel().catch(() => {});
          authorization = next;
          continue;
        }
        return response;
      }

      const location = response.headers.get("location");
      if (response.status >= 300 && response.status < 400 && location) {
        await response.body?.cancel().catch(() => {});
        url = this.redirectTarget(url, location, request);
        redirects++;
        continue;
      }
      return withUrl(response, url);
    }
    const described = `${request.method} ${redactUrl(request.url)}`;
    throw new RegistryError(
      `too many redirects (more than ${MAX_REDIRECTS}) for ${described}: check the registry address`,
      { method: request.method, url: request.url },
    );
  }

  private redirectTarget(from: string, location: string, request: RegistryRequest): string {
    const target = new URL(location, from);
    const downgrade = new URL(from).protocol === "https:" && target.protocol === "http:";
    if ((target.protocol !== "https:" && target.protocol !== "http:") || downgrade) {
      throw new RegistryError(
        `redirect of ${request.method} ${redactUrl(from)} to "${redactUrl(target)}" rejected, ` +
          "because it leaves HTTPS or HTTP: check the registry's storage configuration",
        { method: request.method, url: from },
      );
    }
    return target.href;
  }

  /** Fetch with `redirect: "manual"`, failing as retryable when headers take longer than the timeout. */
  private async fetchWithTimeout(
    url: string,
    init: RequestInit,
    request: RegistryRequest,
  ): Promise<Response> {
    const outer = request.signal;
    if (outer?.aborted) throw outer.reason;
    const controller = new AbortController();
    const signal = outer ? AbortSignal.any([outer, controller.signal]) : controller.signal;

    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, this.timeoutMs);
    try {
      return await this.fetchImpl(url, { ...init, redirect: "manual", signal });
    } catch (error) {
      if (outer?.aborted) throw outer.reason;
      if (timedOut) {
        throw timeoutError(init.method ?? "GET", url, this.timeoutMs, "response headers");
      }
      throw networkError(init.method ?? "GET", url, error);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Send a request and read its body whole (at most 4 MiB), retrying when
   * the body fails or stalls as well as when the request does.
   */
  private async fetchSmall(
    request: RegistryRequest,
  ): Promise<{ response: Response; bytes: Uint8Array }> {
    for (let attempt = 0;; attempt++) {
      const response = await this.send(request);
      try {
        const bytes = await this.readBody(
          response,
          MAX_MANIFEST_BYTES,
          request.method,
          request.url,
        );
        return { response, bytes };
      } catch (error) {
        if (request.signal?.aborted) throw request.signal.reason;
        const budget = request.retries ?? this.retries;
        if (!(error instanceof RegistryError) || !error.retryable || attempt >= budget) {
          throw error;
        }
        await this.backoff(request, attempt, error);
      }
    }
  }

  /** Read a small body whole, failing when it is over `limit` or takes longer than the timeout. */
  private async readBody(
    response: Response,
    limit: number,
    method: string,
    url: string,
  ): Promise<Uint8Array> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stalled = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        response.body?.cancel().catch(() => {});
        reject(timeoutError(method, url, this.timeoutMs, "the response body"));
      }, this.timeoutMs);
    });
    try {
      const bytes = await Promise.race([readLimited(response, limit), stalled]);
      const declared = Number(response.headers.get("content-length") ?? NaN);
      if (bytes.byteLength < declared) {
        throw new RegistryError(
          `body of ${method} ${
            redactUrl(url)
          } ended after ${bytes.byteLength} of ${declared} bytes: ` +
            "the connection was cut; retry",
          { method, url, retryable: true },
        );
      }
      return bytes;
    } catch (error) {
      if (error instanceof RangeError || error instanceof RegistryError) throw error;
      throw networkError(method, url, error);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** Streams one blob with verification, retries and resume. */
class BlobReader {
  private hash?: Sha256;
  private received: number;
  private reader?: ReadableStreamDefaultReader<Uint8Array>;
  /** Bytes to drop from the current body, when a server ignored `Range`. */
  private skip = 0;
  private sources: RegistryRequest[] = [];
  private sourceIndex = 0;
  private failures = 0;
  private readonly label: string;
  private readonly client: RegistryClient;
  private readonly ref: ImageReference;
  private readonly descriptor: Descriptor;
  private readonly options: OpenBlobOptions;

  constructor(client: RegistryClient, ref: ImageReference, descriptor: Descriptor, options: OpenBlobOptions) {
    this.client = client;
    this.ref = ref;
    this.descriptor = descriptor;
    this.options = options;
    this.received = options.resumeFrom?.offset ?? 0;
    this.hash = options.resumeFrom?.hash;
    this.label = `blob ${descriptor.digest} of ${ref.registry}/${ref.repository}`;
  }

  stream(): ReadableStream<Uint8Array> {
    return new ReadableStream<Uint8Array>({
      start: () => this.start(),
      pull: (controller) => this.pull(controller),
      cancel: async (reason) => {
        await this.reader?.cancel(reason).catch(() => {});
      },
    }, { highWaterMark: 0 });
  }

  private async start(): Promise<void> {
    this.sources = this.client.blobSources(this.ref, this.descriptor, {
      skipMirrors: this.options.skipMirrors,
    });
    this.hash ??= await createSha256(this.client.settings.hasher);
    const { offset } = this.options.resumeFrom ?? { offset: 0 };
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > this.descriptor.size) {
      throw new RangeError(
        `resume offset ${offset} is outside ${this.label}, which has ${this.descriptor.size} bytes: ` +
          "discard the partial download",
      );
    }
  }

  private async pull(controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> {
    for (;;) {
      if (this.received === this.descriptor.size && this.reader === undefined) {
        checkContent(
          { digest: this.descriptor.digest, size: this.descriptor.size, label: this.label },
          this.received,
          this.hash!.digest(),
        );
        controller.close();
        return;
      }
      if (this.reader === undefined) await this.openBody();

      let result: ReadableStreamReadResult<Uint8Array>;
      try {
        result = await this.readChunk();
      } catch (error) {
        if (this.options.signal?.aborted) throw this.options.signal.reason;
        await this.recover(error as RegistryError);
        continue;
      }

      if (result.done) {
        this.reader = undefined;
        if (this.received < this.descriptor.size) {
          await this.recover(this.shortBodyError());
        }
        continue;
      }
      if (this.enqueue(result.value, controller)) return;
    }
  }

  /** Hash, count and pass on a chunk; return false when it was skipped entirely. */
  private enqueue(
    value: Uint8Array,
    controller: ReadableStreamDefaultController<Uint8Array>,
  ): boolean {
    let chunk = value;
    if (this.skip > 0) {
      const dropped = Math.min(this.skip, chunk.byteLength);
      this.skip -= dropped;
      chunk = chunk.subarray(dropped);
      if (chunk.byteLength === 0) return false;
    }

    if (this.received + chunk.byteLength > this.descriptor.size) {
      this.reader?.cancel().catch(() => {});
      throw new DigestMismatchError(
        `${this.label} is longer than the ${this.descriptor.size} bytes its descriptor states: ` +
          "the content is corrupt or the manifest is wrong",
        this.descriptor.digest,
      );
    }
    this.hash!.update(chunk);
    this.received += chunk.byteLength;
    this.failures = 0;
    this.options.onProgress?.(this.received);
    controller.enqueue(chunk);
    return true;
  }

  /** Open the body at the current offset, trying the next source when one fails for good. */
  private async openBody(): Promise<void> {
    for (;;) {
      const source = this.sources[this.sourceIndex];
      const headers: Record<string, string> = {};
      if (this.received > 0) headers.range = `bytes=${this.received}-`;
      try {
        const response = await this.client.send({
          ...source,
          headers,
          signal: this.options.signal,
        });
        this.acceptBody(response, source);
        return;
      } catch (error) {
        if (error instanceof RegistryError && error.status === 416) {
          // The server has no bytes past the current offset: the blob is shorter than stated.
          checkContent(
            { digest: this.descriptor.digest, size: this.descriptor.size, label: this.label },
            this.received,
            this.hash!.digest(),
          );
        }
        const last = this.sourceIndex === this.sources.length - 1;
        if (last || this.options.signal?.aborted) throw error;
        this.nextSource(error);
      }
    }
  }

  private acceptBody(response: Response, source: RegistryRequest): void {
    if (!response.body) {
      throw new RegistryError(
        `response to GET ${redactUrl(source.url)} has no body: check the registry`,
        { status: response.status, method: "GET", url: source.url },
      );
    }

    this.skip = 0;
    if (this.received > 0 && response.status === 206) {
      const start = /^bytes ([0-9]+)-/.exec(response.headers.get("content-range") ?? "")?.[1];
      if (start !== undefined && Number(start) !== this.received) {
        response.body.cancel().catch(() => {});
        throw new RegistryError(
          `range response to GET ${redactUrl(source.url)} starts at byte ${start}, expected ` +
            `${this.received}: the server or a proxy handles Range requests wrongly`,
          { status: 206, method: "GET", url: source.url },
        );
      }
    } else if (this.received > 0) {
      this.skip = this.received;
    }
    this.reader = response.body.getReader();
  }

  /** Read one chunk, failing as retryable when none arrives within the timeout. */
  private async readChunk(): Promise<ReadableStreamReadResult<Uint8Array>> {
    const reader = this.reader!;
    const source = this.sources[this.sourceIndex];
    const { timeoutMs } = this.client.settings;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stalled = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(timeoutError("GET", source.url, timeoutMs, "the next body chunk")),
        timeoutMs,
      );
    });

    try {
      return await Promise.race([reader.read(), stalled]);
    } catch (error) {
      reader.cancel().catch(() => {});
      this.reader = undefined;
      if (error instanceof RegistryError) throw error;
      throw networkError("GET", source.url, error);
    } finally {
      clearTimeout(timer);
    }
  }

  private shortBodyError(): RegistryError {
    const source = this.sources[this.sourceIndex];
    return new RegistryError(
      `body of GET ${redactUrl(source.url)} ended after ${this.received} of ` +
        `${this.descriptor.size} bytes: the connection was cut; retry`,
      { method: "GET", url: source.url, retryable: true },
    );
  }

  /**
   * Count a failure and wait before resuming. When the current source's
   * retries are spent, or the failure is not retryable, continue from the
   * same offset at the next source, or rethrow at the last one.
   */
  private async recover(error: RegistryError): Promise<void> {
    this.reader = undefined;
    if (!(error instanceof RegistryError)) throw error;
    const source = this.sources[this.sourceIndex];
    const budget = source.retries ?? this.client.settings.retries;
    if (error.retryable && this.failures < budget) {
      await this.client.backoff({ ...source, signal: this.options.signal }, this.failures, error);
      this.failures++;
      return;
    }
    if (this.sourceIndex === this.sources.length - 1) throw error;
    this.nextSource(error);
  }

  /** Move on to the next source; the content is the same, so the offset and hash carry over. */
  private nextSource(error: unknown): void {
    this.client.warnSourceFailed(this.sources[this.sourceIndex], `blob ${this.descriptor.digest}`, error);
    this.sourceIndex++;
    this.failures = 0;
  }
}

/**
 * Errors from token requests, which ran their own retries already, so the
 * request that needed the token must not retry them again.
 */
const authErrors = new WeakSet<Error>();

async function markAuthErrors<T>(pending: Promise<T>): Promise<T> {
  try {
    return await pending;
  } catch (error) {
    if (error instanceof Error) authErrors.add(error);
    throw error;
  }
}

/** Scope for pulling from a reference's repository. */
function pullScope(ref: ImageReference): string {
  return `repository:${ref.repository}:pull`;
}

/** Resolve the `rel="next"` target of a `Link` header against the current URL. */
function nextPageUrl(link: string | null, current: string): string | undefined {
  const match = link ? /<([^>]+)>\s*;\s*rel="?next"?/i.exec(link) : null;
  return match ? new URL(match[1], current).href : undefined;
}

/** Keep the URL a response came from, since some fetch implementations leave `url` empty. */
function withUrl(response: Response, url: string): Response {
  if (response.url) return response;
  try {
    Object.defineProperty(response, "url", { value: url });
  } catch {
    // NOTE: a frozen Response keeps its empty url; messages then fall back to the request URL.
  }
  return response;
}

/** Wait `ms` milliseconds, rejecting early with the signal's reason. */
function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
