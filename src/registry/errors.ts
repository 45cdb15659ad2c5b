/**
 * Errors of the registry client: {@link RegistryError} for HTTP and network
 * failures, {@link ForeignLayerError} for layers that live outside the
 * registry, and the helpers that build them from responses.
 *
 * @module
 */

/** Fields of a {@link RegistryError}. */
export interface RegistryErrorOptions extends ErrorOptions {
  /** HTTP status, or undefined when no response arrived. */
  status?: number;
  /** Registry error codes from the response body, such as `"MANIFEST_UNKNOWN"`. */
  codes?: string[];
  method: string;
  /** The request URL; credentials and token query parameters are removed here. */
  url: string | URL;
  /** Whether repeating the request may succeed (default false). */
  retryable?: boolean;
  /** Delay the server requested with `Retry-After`, in milliseconds. */
  retryAfterMs?: number;
}

/** A failed registry request: an error status, a network failure or a timeout. */
export class RegistryError extends Error {
  override name = "RegistryError";
  /** HTTP status, or undefined when no response arrived. */
  readonly status?: number;
  /** Registry error codes from the response body (may be empty). */
  readonly codes: string[];
  readonly method: string;
  /** The request URL without credentials or token query parameters. */
  readonly url: string;
  /** Whether repeating the request may succeed. */
  readonly retryable: boolean;
  /** Delay the server requested with `Retry-After`, in milliseconds. */
  readonly retryAfterMs?: number;

  constructor(message: string, options: RegistryErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.status = options.status;
    this.codes = options.codes ?? [];
    this.method = options.method;
    this.url = redactUrl(options.url);
    this.retryable = options.retryable ?? false;
    this.retryAfterMs = options.retryAfterMs;
  }
}

/**
 * A foreign or non-distributable layer whose content is only at external
 * URLs, requested while fetching from those URLs is not allowed.
 */
export class ForeignLayerError extends Error {
  override name = "ForeignLayerError";
  readonly digest: string;
  readonly mediaType: string;
  readonly urls: string[];
  constructor(digest: string, mediaType: string, urls: string[]) {
    super(
      `layer ${digest} has foreign media type "${mediaType}" and lives at ${
        urls.map((url) => `"${redactUrl(url)}"`).join(", ")
      }: pass --allow-foreign-urls (option allowForeignUrls) to download it from there`,
    );
    this.digest = digest;
    this.mediaType = mediaType;
    this.urls = urls;
  }
}

const SECRET_PARAMETER = /token|sig|signature|credential|secret|password|key|auth|code/i;

/**
 * Return a URL as text with user info removed and the values of query
 * parameters that may carry secrets (tokens, signatures, keys) replaced by
 * `REDACTED`. Text that is not a URL is returned unchanged.
 */
export function redactUrl(url: string | URL): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return String(url);
  }
  parsed.username = "";
  parsed.password = "";
  for (const name of [...new Set(parsed.searchParams.keys())]) {
    if (SECRET_PARAMETER.test(name)) parsed.searchParams.set(name, "REDACTED");
  }
  return parsed.href;
}

/** Return true for statuses worth retrying: 408, 429 and 5xx except 501 and 505. */
export function isRetryableStatus(status: number): boolean {
  if (status === 408 || status === 429) return true;
  return status >= 500 && status <= 599 && status !== 501 && status !== 505;
}

/**
 * Parse a `Retry-After` value (delay in seconds or an HTTP date) into
 * milliseconds from `now`; undefined when it is missing or malformed.
 */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^[0-9]+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** The purpose of a request (manifest, blob, tag list), so a failure message can name it and suggest a fix. */
export interface RequestSubject {
  /** `host[:port]` as in references, such as `"docker.io"`. */
  registry?: string;
  repository?: string;
  /** The tag or digest of a manifest request. */
  manifest?: string;
  /** The digest of a blob request. */
  blob?: string;
  /** True for a tag list request. */
  tags?: boolean;
  /** True for a request to a token endpoint. */
  token?: boolean;
  /** Whether the request carried credentials (never the credentials themselves). */
  credentialsSent?: boolean;
  /** The `error` parameter of a 401's bearer challenge, such as `"insufficient_scope"`. */
  authError?: string;
}

/** Largest error body read for registry error codes, in bytes. */
const MAX_ERROR_BODY = 64 * 1024;

interface RegistryErrorBody {
  codes: string[];
  detail?: string;
}

/** Read the registry error codes and first message from an error response, reading at most 64 KiB. */
async function readErrorBody(response: Response): Promise<RegistryErrorBody> {
  const body = response.body;
  if (!body) return { codes: [] };

  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  try {
    while (length < MAX_ERROR_BODY) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      length += value.byteLength;
    }
  } catch {
    return { codes: [] };
  } finally {
    reader.cancel().catch(() => {});
  }

  const bytes = new Uint8Array(Math.min(length, MAX_ERROR_BODY));
  let offset = 0;
  for (const chunk of chunks) {
    const part = chunk.subarray(0, bytes.byteLength - offset);
    bytes.set(part, offset);
    offset += part.byteLength;
  }
  try {
    const parsed = JSON.parse(new TextDecoder().decode(bytes)) as {
      errors?: { code?: unknown; message?: unknown }[];
    };
    const errors = Array.isArray(parsed.errors) ? parsed.errors : [];
    const codes = errors.map((e) => e?.code).filter((c): c is string => typeof c === "string");
    const message = errors.map((e) => e?.message).find((m) => typeof m === "string");
    return { codes, detail: message as string | undefined };
  } catch {
    return { codes: [] };
  }
}

/**
 * Build a {@link RegistryError} from an error response, reading at most
 * 64 KiB of its body for registry error codes. The body is consumed.
 */
export async function errorFromResponse(
  response: Response,
  method: string,
  url: string | URL,
  subject: RequestSubject = {},
): Promise<RegistryError> {
  const status = response.status;
  const { codes, detail } = await readErrorBody(response);
  const retryAfterHeader = response.headers.get("retry-after");
  const retryAfterMs = parseRetryAfter(retryAfterHeader);

  const request = `${method} ${redactUrl(url)}`;
  const registryText = detail ? ` (registry message: "${detail.slice(0, 200)}")` : "";
  const message = describeStatus(status, codes, request, subject, retryAfterHeader) + registryText;
  return new RegistryError(message, {
    status,
    codes,
    method,
    url,
    retryable: isRetryableStatus(status),
    retryAfterMs,
  });
}

function describeStatus(
  status: number,
  codes: string[],
  request: string,
  subject: RequestSubject,
  retryAfter: string | null,
): string {
  const repository = subject.registry && subject.repository
    ? `${subject.registry}/${subject.repository}`
    : subject.repository ?? subject.registry ?? "the registry";

  if (status === 401 || status === 403) return describeAuthFailure(status, request, subject);
  if (status === 429) {
    const after = retryAfter === null ? "" : ` (Retry-After: "${retryAfter}")`;
    return `rate limited by ${subject.registry ?? "the server"}${after} for ${request}: ` +
      "wait and retry, or log in, because registries often allow authenticated clients more requests";
  }
  if (status === 404) return describeNotFound(codes, request, subject, repository);
  if (status === 501 || status === 505) {
    return `server error ${status} for ${request}: the server does not support this request; ` +
      "check the registry address";
  }
  if (status >= 500) {
    return `server error ${status} for ${request}: the registry failed to answer; retry later`;
  }

  const codeText = codes.length ? ` (${codes.join(", ")})` : "";
  return `unexpected status ${status}${codeText} for ${request}: check the reference and ` +
    "the registry address";
}

function describeAuthFailure(status: number, request: string, subject: RequestSubject): string {
  const how = "log in with `docker login`, pass --username with --password-stdin, or set " +
    "OCISTAGE_USERNAME and OCISTAGE_PASSWORD";
  if (subject.token) {
    return `token request rejected with status ${status} for ${request}: ` +
      (subject.credentialsSent ? "check the username and password" : how);
  }
  if (subject.authError === "insufficient_scope") {
    const repository = subject.repository ?? "this repository";
    const next = subject.credentialsSent
      ? `check the name, and that the account may pull "${repository}"`
      : `check the name, then ${how}`;
    return `access denied (insufficient_scope) for ${request}: the registry's token does not ` +
      `grant pull on "${repository}", so the repository does not exist or needs other ` +
      `credentials; ${next}`;
  }
  if (status === 403) {
    return `access denied (status 403) for ${request}: check that the credentials may pull ` +
      `"${subject.repository ?? "this repository"}"`;
  }
  if (subject.credentialsSent) {
    return `authentication failed (status 401) for ${request}: the registry rejected the ` +
      "credentials, or the repository does not exist; check both";
  }
  return `authentication required (status 401) for ${request}, or the repository does not ` +
    `exist: check the name, then ${how}`;
}

function describeNotFound(
  codes: string[],
  request: string,
  subject: RequestSubject,
  repository: string,
): string {
  if (codes.includes("NAME_UNKNOWN")) {
    return `repository unknown: "${repository}" not found (${request}): check the registry ` +
      "and repository name";
  }
  if (subject.manifest !== undefined) {
    if (subject.manifest.includes(":")) {
      return `manifest unknown: digest "${subject.manifest}" not found in ${repository}: ` +
        "check the digest, or track the tag again to get the current one";
    }
    return `manifest unknown: tag "${subject.manifest}" not found in ${repository}: ` +
      "check the tag (ocistage inspect lists the repository's tags)";
  }
  if (subject.blob !== undefined) {
    return `blob unknown: "${subject.blob}" not found in ${repository}: the image in the ` +
      "registry is incomplete; re-push it";
  }
  if (subject.tags) {
    return `repository unknown: "${repository}" not found (${request}): check the name`;
  }
  return `not found (status 404) for ${request}: check the registry address`;
}

/** Build a retryable {@link RegistryError} for a request that got no response. */
export function networkError(method: string, url: string | URL, cause: unknown): RegistryError {
  const reason = cause instanceof Error ? cause.message : String(cause);
  return new RegistryError(
    `request failed for ${method} ${redactUrl(url)}: ${reason}: check the network and the ` +
      "registry address",
    { method, url, retryable: true, cause },
  );
}

/** Build a retryable {@link RegistryError} for a response or body that stalled. */
export function timeoutError(
  method: string,
  url: string | URL,
  timeoutMs: number,
  what: string,
): RegistryError {
  return new RegistryError(
    `timed out after ${timeoutMs} ms waiting for ${what} of ${method} ${redactUrl(url)}: ` +
      "check the network, or raise the timeout",
    { method, url, retryable: true },
  );
}
