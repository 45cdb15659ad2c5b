/**
 * Registry authentication: `WWW-Authenticate` parsing (RFC 9110 section
 * 11.6.1), bearer tokens from the distribution token protocol, basic auth,
 * and credential resolvers for docker `config.json` and the environment.
 *
 * Secrets never appear in error messages.
 *
 * @module
 */
import process from "node:process";
import { errorFromResponse, redactUrl, RegistryError, type RequestSubject } from "./errors.ts";

/** One challenge of a `WWW-Authenticate` header. */
export interface Challenge {
  /** Auth scheme in lowercase, such as `"bearer"` or `"basic"`. */
  scheme: string;
  /** Auth parameters, names in lowercase, values unquoted. */
  params: Record<string, string>;
  /** A token68 value, for schemes that send one instead of parameters. */
  token68?: string;
}

const TCHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/;
const TOKEN68_CHAR = /[A-Za-z0-9\-._~+/]/;

/**
 * Parse a `WWW-Authenticate` header into its challenges.
 *
 * Handles several challenges in one header, quoted strings containing commas,
 * `=` and backslash escapes, and token68 values. Schemes are kept whatever
 * they are, so callers can skip the ones they do not support. Malformed parts
 * are skipped up to the next comma.
 *
 * @example
 * ```ts
 * parseWwwAuthenticate('Bearer realm="https://auth.example/token",scope="repository:a:pull,push"');
 * // [{ scheme: "bearer", params: { realm: "https://auth.example/token", scope: "repository:a:pull,push" } }]
 * ```
 */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const parser = new HeaderParser(header);
  const challenges: Challenge[] = [];

  while (parser.skipSeparators()) {
    const scheme = parser.token();
    if (!scheme) {
      parser.skipPastComma();
      continue;
    }
    const challenge: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    challenges.push(challenge);

    if (!parser.skipSpaces()) continue;
    const token68 = parser.token68();
    if (token68 !== undefined) {
      challenge.token68 = token68;
      continue;
    }
    parser.params(challenge.params);
  }
  return challenges;
}

/** A cursor over a header value with the RFC 9110 token rules. */
class HeaderParser {
  private position = 0;
  private readonly text: string;

  constructor(text: string) {
    this.text = text;
  }

  private peek(offset = 0): string {
    return this.text[this.position + offset] ?? "";
  }

  /** Skip spaces and commas; return false at the end of the text. */
  skipSeparators(): boolean {
    while (/[ \t,]/.test(this.peek())) this.position++;
    return this.position < this.text.length;
  }

  /** Skip spaces; return true when at least one was skipped and text follows. */
  skipSpaces(): boolean {
    const start = this.position;
    while (/[ \t]/.test(this.peek())) this.position++;
    return this.position > start && this.position < this.text.length && this.peek() !== ",";
  }

  skipPastComma(): void {
    while (this.position < this.text.length && this.peek() !== ",") this.position++;
  }

  token(): string {
    const start = this.position;
    while (this.peek() && TCHAR.test(this.peek())) this.position++;
    return this.text.slice(start, this.position);
  }

  /** Read a token68 when it is the only value before a comma or the end; else read nothing. */
  token68(): string | undefined {
    let end = this.position;
    while (this.text[end] && TOKEN68_CHAR.test(this.text[end])) end++;
    if (end === this.position) return undefined;
    while (this.text[end] === "=") end++;

    let after = end;
    while (/[ \t]/.test(this.text[after] ?? "")) after++;
    if (after < this.text.length && this.text[after] !== ",") return undefined;

    const value = this.text.slice(this.position, end);
    this.position = after;
    return value;
  }

  /** Read `name=value` pairs separated by commas until the next challenge starts. */
  params(into: Record<string, string>): void {
    for (;;) {
      const start = this.position;
      const name = this.token();
      this.skipWhitespace();
      if (!name || this.peek() !== "=") {
        this.position = start;
        this.skipPastComma();
        return;
      }
      this.position++;
      this.skipWhitespace();
      const value = this.peek() === '"' ? this.quotedString() : this.token();
      // Plain assignment of "__proto__" would set the prototype on Node and Bun and drop the parameter.
      Object.defineProperty(into, name.toLowerCase(), { value, enumerable: true, writable: true, configurable: true });
      this.skipWhitespace();

      if (this.peek() !== ",") {
        this.skipPastComma();
        return;
      }
      if (!this.nextIsParam()) return;
    }
  }

  /** After a comma: true (and positioned on the name) when a `name=` parameter follows. */
  private nextIsParam(): boolean {
    let cursor = this.position;
    while (/[ \t,]/.test(this.text[cursor] ?? "")) cursor++;
    let end = cursor;
    while (this.text[end] && TCHAR.test(this.text[end])) end++;
    if (end === cursor) return false;
    let equals = end;
    while (/[ \t]/.test(this.text[equals] ?? "")) equals++;
    if (this.text[equals] !== "=") return false;
    this.position = cursor;
    return true;
  }

  private skipWhitespace(): void {
    while (/[ \t]/.test(this.peek())) this.position++;
  }

  private quotedString(): string {
    this.position++;
    let value = "";
    while (this.position < this.text.length) {
      const char = this.text[this.position++];
      if (char === '"') return value;
      if (char === "\\" && this.position < this.text.length) {
        value += this.text[this.position++];
      } else {
        value += char;
      }
    }
    return value;
  }
}

/** Credentials for one registry: a user name and password, or an OAuth2 refresh token. */
export type Credentials =
  | { username: string; password: string }
  | { identityToken: string };

/** Look up credentials for a registry, by its name as in references (`"docker.io"`, `"host:port"`). */
export type CredentialResolver = (registryHost: string) => Promise<Credentials | undefined>;

/** Return the `Authorization` value for basic auth. */
export function basicAuthorization(credentials: { username: string; password: string }): string {
  const bytes = new TextEncoder().encode(`${credentials.username}:${credentials.password}`);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return `Basic ${btoa(binary)}`;
}

/** Return a resolver that gives the same credentials for every registry. */
export function staticCredentials(credentials: Credentials): CredentialResolver {
  return () => Promise.resolve(credentials);
}

/**
 * Return a resolver that calls `resolver` for every registry except `hosts`,
 * for which it returns nothing. Use it to keep credentials that are not tied
 * to a host (flags, environment) away from mirrors.
 */
export function credentialsExcept(
  hosts: Iterable<string>,
  resolver: CredentialResolver,
): CredentialResolver {
  const excluded = new Set([...hosts].map((host) => host.toLowerCase()));
  return (registry) =>
    excluded.has(registry.toLowerCase()) ? Promise.resolve(undefined) : resolver(registry);
}

/** Return a resolver that tries each resolver in turn and returns the first credentials found. */
export function chainCredentials(...resolvers: CredentialResolver[]): CredentialResolver {
  return async (registry) => {
    for (const resolve of resolvers) {
      const credentials = await resolve(registry);
      if (credentials) return credentials;
    }
    return undefined;
  };
}

/**
 * Return a resolver reading `OCISTAGE_USERNAME` and `OCISTAGE_PASSWORD`, used for
 * every registry. It returns nothing unless both are set.
 */
export function environmentCredentials(
  env: Record<string, string | undefined> = process.env,
): CredentialResolver {
  return () => {
    const username = env.OCISTAGE_USERNAME;
    const password = env.OCISTAGE_PASSWORD;
    return Promise.resolve(username && password ? { username, password } : undefined);
  };
}

/** Options of {@link dockerConfigCredentials}. */
export interface DockerConfigOptions {
  /** Directory of `config.json` (default `$DOCKER_CONFIG`, else `~/.docker`). */
  configDir?: string;
  /** Environment for `DOCKER_CONFIG`, `HOME` and the helpers' `PATH` (default `process.env`). */
  env?: Record<string, string | undefined>;
}

/** Docker Hub's key in docker `config.json` and for credential helpers. */
const DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/";
const DOCKER_HUB_HOSTS = new Set([
  "docker.io",
  "index.docker.io",
  "registry-1.docker.io",
  "registry.hub.docker.com",
]);

/** Normalise a `config.json` key or registry name to a registry name as in references. */
function configKeyRegistry(key: string): string {
  const host = key.replace(/^[a-z][a-z0-9+.-]*:\/\//i, "").replace(/\/.*$/, "").toLowerCase();
  return DOCKER_HUB_HOSTS.has(host) ? "docker.io" : host;
}

interface DockerConfig {
  auths?: Record<
    string,
    { auth?: string; identitytoken?: string; username?: string; password?: string }
  >;
  credHelpers?: Record<string, string>;
  credsStore?: string;
}

/**
 * Return a resolver reading docker's `config.json`: `auths` entries with `auth`
 * (base64 `user:password`) or `identitytoken`, and `credHelpers` or
 * `credsStore` through `docker-credential-NAME get`.
 *
 * A missing `config.json` means no credentials. A malformed one, or a helper
 * that fails for a reason other than "credentials not found", raises an error
 * naming the file or helper (never the secret).
 */
export function dockerConfigCredentials(options: DockerConfigOptions = {}): CredentialResolver {
  let config: Promise<{ path: string; data: DockerConfig } | undefined> | undefined;

  return async (registry) => {
    config ??= readDockerConfig(options);
    const loaded = await config;
    if (!loaded) return undefined;
    const { data, path } = loaded;
    const wanted = configKeyRegistry(registry);

    const helperEntry = Object.entries(data.credHelpers ?? {})
      .find(([key]) => configKeyRegistry(key) === wanted);
    if (helperEntry) return runCredentialHelper(helperEntry[1], helperEntry[0], options.env);

    const authEntry = Object.entries(data.auths ?? {})
      .find(([key]) => configKeyRegistry(key) === wanted);
    const fromAuths = authEntry ? decodeAuthEntry(authEntry[1], authEntry[0], path) : undefined;
    if (fromAuths) return fromAuths;

    if (data.credsStore) {
      const serverUrl = authEntry?.[0] ?? (wanted === "docker.io" ? DOCKER_HUB_CONFIG_KEY : wanted);
      return runCredentialHelper(data.credsStore, serverUrl, options.env);
    }
    return undefined;
  };
}

async function readDockerConfig(
  options: DockerConfigOptions,
): Promise<{ path: string; data: DockerConfig } | undefined> {
  const { readFile } = await import("node:fs/promises");
  const { join } = await import("node:path");
  const env = options.env ?? process.env;
  const home = env.HOME ?? env.USERPROFILE ?? (await import("node:os")).homedir();
  const dir = options.configDir ?? env.DOCKER_CONFIG ?? join(home, ".docker");
  const path = join(dir, "config.json");

  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") return undefined;
    throw new Error(`reading docker config "${path}" failed: ${(error as Error).message}`, {
      cause: error,
    });
  }
  try {
    const data = JSON.parse(text);
    if (data === null || typeof data !== "object") throw new SyntaxError("not a JSON object");
    return { path, data: data as DockerConfig };
  } catch (error) {
    throw new SyntaxError(
      `docker config "${path}" is not valid JSON (${(error as Error).message}): fix or remove it`,
      { cause: error },
    );
  }
}

function decodeAuthEntry(
  entry: { auth?: string; identitytoken?: string; username?: string; password?: string },
  key: string,
  path: string,
): Credentials | undefined {
  if (entry.identitytoken) return { identityToken: entry.identitytoken };
  if (entry.username && entry.password) {
    return { username: entry.username, password: entry.password };
  }
  if (!entry.auth) return undefined;

  let decoded: string;
  try {
    const binary = atob(entry.auth);
    decoded = new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
  } catch {
    throw new SyntaxError(
      `docker config "${path}" has an "auth" value for "${key}" that is not base64: ` +
        "log in again with `docker login`",
    );
  }
  const colon = decoded.indexOf(":");
  if (colon <= 0) {
    throw new SyntaxError(
      `docker config "${path}" has an "auth" value for "${key}" that is not "user:password": ` +
        "log in again with `docker login`",
    );
  }
  return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

/** Largest helper output read, in bytes. */
const MAX_HELPER_OUTPUT = 1024 * 1024;

/**
 * Run `docker-credential-NAME get` with the server URL on stdin. A helper
 * user name of `<token>` marks an identity token.
 */
async function runCredentialHelper(
  name: string,
  serverUrl: string,
  env: Record<string, string | undefined> = process.env,
): Promise<Credentials | undefined> {
  const { spawn } = await import("node:child_process");
  const program = `docker-credential-${name}`;

  const { code, stdout, stderr, spawnError } = await new Promise<{
    code: number | null;
    stdout: string;
    stderr: string;
    spawnError?: Error;
  }>((resolve) => {
    const child = spawn(program, ["get"], { stdio: ["pipe", "pipe", "pipe"], env });
    let out = "";
    let err = "";
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
      if (out.length < MAX_HELPER_OUTPUT) out += chunk;
    });
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
      if (err.length < MAX_HELPER_OUTPUT) err += chunk;
    });
    child.on(
      "error",
      (error) => resolve({ code: null, stdout: out, stderr: err, spawnError: error }),
    );
    child.on("close", (exitCode) => resolve({ code: exitCode, stdout: out, stderr: err }));
    child.stdin.on("error", () => {});
    child.stdin.end(serverUrl);
  });

  if (spawnError) {
    throw new Error(
      `credential helper "${program}" for "${serverUrl}" could not run (${spawnError.message}): ` +
        "install it, or remove it from the docker config",
      { cause: spawnError },
    );
  }
  const output = `${stdout}\n${stderr}`;
  if (code !== 0) {
    if (/credentials not found/i.test(output)) return undefined;
    const firstLine = (stderr.trim() || stdout.trim()).split("\n")[0].slice(0, 200);
    throw new Error(
      `credential helper "${program}" failed for "${serverUrl}" with exit code ${code}` +
        (firstLine ? ` ("${firstLine}")` : "") + ": run `docker login` again",
    );
  }

  let parsed: { Username?: unknown; Secret?: unknown };
  try {
    parsed = JSON.parse(stdout);
  } catch {
    throw new SyntaxError(
      `credential helper "${program}" returned output that is not JSON for "${serverUrl}": ` +
        "check the helper's version",
    );
  }
  if (typeof parsed.Secret !== "string" || parsed.Secret === "") return undefined;
  if (parsed.Username === "<token>") return { identityToken: parsed.Secret };
  return { username: String(parsed.Username ?? ""), password: parsed.Secret };
}

/** Options of {@link RegistryAuth}. */
export interface RegistryAuthOptions {
  /**
   * Sends token requests and returns a 2xx response or throws; the client
   * passes its retrying sender. `subject` describes the request for messages.
   */
  fetch: (url: string, init: RequestInit, subject: RequestSubject) => Promise<Response>;
  credentials?: CredentialResolver;
  /** Clock in milliseconds, for token expiry (default `Date.now`). */
  now?: () => number;
  /** OAuth2 client id sent with identity-token requests (default `"ocistage"`). */
  clientId?: string;
}

/** Largest token response read, in bytes. */
const MAX_TOKEN_BODY = 1024 * 1024;
/** Token lifetime when the response has no `expires_in`, per the distribution token spec. */
const DEFAULT_TOKEN_SECONDS = 60;

interface CachedToken {
  authorization: string;
  expiresAt: number;
}

/**
 * Authorization state per registry: the challenge it sent last, and bearer
 * tokens cached per scope until `expires_in` runs out.
 */
export class RegistryAuth {
  private readonly challenges = new Map<string, Challenge>();
  private readonly tokens = new Map<string, CachedToken>();
  private readonly credentialCache = new Map<string, Promise<Credentials | undefined>>();
  private readonly now: () => number;
  private readonly options: RegistryAuthOptions;

  constructor(options: RegistryAuthOptions) {
    this.options = options;
    this.now = options.now ?? Date.now;
  }

  /** Resolve credentials for a registry once and remember them. */
  credentialsFor(registry: string): Promise<Credentials | undefined> {
    let found = this.credentialCache.get(registry);
    if (!found) {
      found = this.options.credentials?.(registry) ?? Promise.resolve(undefined);
      this.credentialCache.set(registry, found);
    }
    return found;
  }

  /**
   * Return the `Authorization` value to send to a registry before any 401,
   * based on the challenge it sent earlier; undefined when none is known yet.
   */
  async authorization(
    registry: string,
    scope: string,
    signal?: AbortSignal,
  ): Promise<string | undefined> {
    const challenge = this.challenges.get(registry);
    if (!challenge) return undefined;
    return await this.authorize(registry, challenge, scope, false, signal);
  }

  /**
   * Handle a 401: remember the registry's challenge and return the
   * `Authorization` value to retry with, or undefined when a retry cannot
   * help (no supported scheme, no credentials for basic auth, or the same
   * value was just rejected).
   */
  async respond(
    registry: string,
    scope: string,
    header: string | null,
    rejected: string | undefined,
    signal?: AbortSignal,
  ): Promise<string | undefined> {
    const challenge = supportedChallenge(header);
    if (!challenge) return undefined;
    // Later requests may be for other repositories, so the stored challenge
    // keeps only realm and service, not this request's scope or error.
    const { scope: _scope, error: _error, ...reusable } = challenge.params;
    this.challenges.set(registry, { scheme: challenge.scheme, params: reusable });

    const authorization = await this.authorize(registry, challenge, scope, true, signal);
    return authorization === rejected ? undefined : authorization;
  }

  /** Whether a request to this registry will carry credentials of the user. */
  async hasCredentials(registry: string): Promise<boolean> {
    return (await this.credentialsFor(registry)) !== undefined;
  }

  private async authorize(
    registry: string,
    challenge: Challenge,
    scope: string,
    refresh: boolean,
    signal?: AbortSignal,
  ): Promise<string | undefined> {
    const credentials = await this.credentialsFor(registry);
    if (challenge.scheme === "basic") {
      return credentials && "username" in credentials ? basicAuthorization(credentials) : undefined;
    }

    // Tokens are cached by the scope the request needs, whatever extra scopes
    // a challenge asked for, so the next request for it finds the token.
    const key = `${registry} ${challenge.params.realm} ${challenge.params.service ?? ""} ${scope}`;
    const cached = this.tokens.get(key);
    if (cached && !refresh && cached.expiresAt > this.now()) return cached.authorization;

    const scopes = tokenScopes(challenge, scope);
    const token = await this.fetchToken(challenge, scopes, credentials, signal);
    this.tokens.set(key, token);
    return token.authorization;
  }

  private async fetchToken(
    challenge: Challenge,
    scopes: string[],
    credentials: Credentials | undefined,
    signal?: AbortSignal,
  ): Promise<CachedToken> {
    const url = tokenRequestUrl(challenge, scopes);
    const headers: Record<string, string> = { accept: "application/json" };
    let init: RequestInit = { method: "GET", headers, signal };

    if (credentials && "identityToken" in credentials) {
      const form = new URLSearchParams({
        grant_type: "refresh_token",
        refresh_token: credentials.identityToken,
        client_id: this.options.clientId ?? "ocistage",
        scope: scopes.join(" "),
      });
      if (challenge.params.service) form.set("service", challenge.params.service);
      headers["content-type"] = "application/x-www-form-urlencoded";
      init = { method: "POST", headers, body: form.toString(), signal };
      url.search = "";
    } else if (credentials) {
      headers.authorization = basicAuthorization(credentials);
    }

    const subject = { token: true, credentialsSent: credentials !== undefined };
    const response = await this.options.fetch(url.href, init, subject);
    if (!response.ok) throw await errorFromResponse(response, init.method!, url, subject);
    return this.readToken(response, init.method!, url);
  }

  private async readToken(response: Response, method: string, url: URL): Promise<CachedToken> {
    const text = new TextDecoder().decode(await readLimited(response, MAX_TOKEN_BODY));
    const invalid = (reason: string) =>
      new RegistryError(
        `token response from ${method} ${redactUrl(url)} is invalid: ${reason}: ` +
          "check the registry's token service",
        { status: response.status, method, url },
      );

    let body: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      body = JSON.parse(text);
    } catch {
      throw invalid("it is not JSON");
    }
    const token = typeof body.token === "string" && body.token
      ? body.token
      : typeof body.access_token === "string" && body.access_token
      ? body.access_token
      : undefined;
    if (!token) throw invalid('it has neither "token" nor "access_token"');

    const seconds = typeof body.expires_in === "number" && body.expires_in > 0
      ? body.expires_in
      : DEFAULT_TOKEN_SECONDS;
    // Renew a little early so a token does not expire between check and use.
    const margin = Math.min(10_000, (seconds * 1000) / 10);
    return { authorization: `Bearer ${token}`, expiresAt: this.now() + seconds * 1000 - margin };
  }
}

/** Select the challenge to reply to: bearer with a realm first, else basic. Other schemes are skipped. */
function supportedChallenge(header: string | null): Challenge | undefined {
  const challenges = parseWwwAuthenticate(header ?? "");
  return challenges.find((c) => c.scheme === "bearer" && c.params.realm) ??
    challenges.find((c) => c.scheme === "basic");
}

/**
 * Return the `error` parameter of a bearer challenge (RFC 6750 section 3),
 * such as `"insufficient_scope"` or `"invalid_token"`, or undefined.
 */
export function bearerChallengeError(header: string | null): string | undefined {
  const bearer = parseWwwAuthenticate(header ?? "").find((c) => c.scheme === "bearer");
  return bearer?.params.error || undefined;
}

/**
 * Return the scopes to request: those of the challenge, plus the request's
 * own scope unless a challenge scope already grants pull on that resource.
 */
export function tokenScopes(challenge: Challenge, scope: string): string[] {
  const scopes = (challenge.params.scope ?? "").split(" ").filter(Boolean);
  const [type, name] = splitScope(scope);
  const covered = scopes.some((s) => {
    const [otherType, otherName, actions] = splitScope(s);
    return otherType === type && otherName === name && actions.split(",").includes("pull");
  });
  if (!covered && scope) scopes.push(scope);
  return scopes;
}

/** Split `type:name:actions`; names may contain `:` (a registry port). */
function splitScope(scope: string): [string, string, string] {
  const first = scope.indexOf(":");
  const last = scope.lastIndexOf(":");
  if (first === -1 || first === last) return [scope, "", ""];
  return [scope.slice(0, first), scope.slice(first + 1, last), scope.slice(last + 1)];
}

/**
 * Build the token request URL: the challenge's realm with `service` and one
 * `scope` parameter per scope.
 *
 * @throws {RegistryError} when the realm is not an http(s) URL.
 */
export function tokenRequestUrl(challenge: Challenge, scopes: string[]): URL {
  let url: URL;
  try {
    url = new URL(challenge.params.realm ?? "");
  } catch {
    url = new URL("invalid:");
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new RegistryError(
      `bearer challenge has realm "${
        challenge.params.realm ?? ""
      }", which is not an http(s) URL: ` +
        "check the registry's auth configuration",
      { method: "GET", url: challenge.params.realm ?? "" },
    );
  }
  if (challenge.params.service) url.searchParams.append("service", challenge.params.service);
  for (const scope of scopes) url.searchParams.append("scope", scope);
  return url;
}

/**
 * Read a whole response body, at most `limit` bytes.
 *
 * @throws {RangeError} when the body is longer.
 */
export async function readLimited(response: Response, limit: number): Promise<Uint8Array> {
  const declared = Number(response.headers.get("content-length") ?? NaN);
  if (declared > limit) {
    await response.body?.cancel().catch(() => {});
    throw new RangeError(
      `response of ${
        redactUrl(response.url) || "the server"
      } has ${declared} bytes, more than the limit of ${limit}`,
    );
  }
  if (!response.body) return new Uint8Array(0);

  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    length += value.byteLength;
    if (length > limit) {
      await reader.cancel().catch(() => {});
      throw new RangeError(
        `response of ${
          redactUrl(response.url) || "the server"
        } is longer than the limit of ${limit} bytes`,
      );
    }
    chunks.push(value);
  }

  const bytes = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return bytes;
}
