/**
 * Registry mirrors: other registries that serve copies of a registry's
 * content, tried first when content is requested by digest.
 *
 * A mirror is named by a location `[http(s)://]host[:port][/path]`. Without
 * a scheme it is reached over HTTPS, except on `localhost`, `127.0.0.1` and
 * `[::1]`, which use HTTP. A path is a namespace: repository `library/alpine`
 * of a mirror at `mirror.example/hub` is `hub/library/alpine` there.
 *
 * Only requests by digest go to mirrors (manifests by digest and blobs), as
 * with `mirror-by-digest-only` in containers-registries.conf(5). A digest
 * lets the client check what a mirror returns, but a tag on a mirror may
 * point at stale or different content, so tags are always resolved at the
 * registry itself.
 *
 * A mirrors file is YAML (JSON is valid YAML too):
 *
 * ```yaml
 * mirrors:
 *   docker.io:
 *     - https://mirror.example
 *     - 127.0.0.1:5001/hub
 *   ghcr.io: https://ghcr-cache.example
 * ```
 *
 * @module
 */
import { parse as parseYaml } from "yaml";

/** Mirror locations per registry, keyed by registry name as in references (`"docker.io"` for Docker Hub). */
export type MirrorMap = Record<string, string[]>;

/** A parsed mirror location. */
export interface Mirror {
  /** `host[:port]`, the name under which credentials and auth state are kept. */
  host: string;
  /** Origin to send requests to, such as `"https://mirror.example"`. */
  origin: string;
  /** Namespace prepended to repository names, without slashes at either end (often empty). */
  prefix: string;
  /** The location as given. */
  location: string;
}

/** Host names that mean Docker Hub in a mirror map's keys. */
const DOCKER_HUB_NAMES = new Set([
  "docker.io",
  "index.docker.io",
  "registry-1.docker.io",
  "registry.hub.docker.com",
]);

const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);

/**
 * Parse a mirror location `[http(s)://]host[:port][/path]`.
 *
 * @throws {TypeError} for other schemes, credentials, queries or fragments in the location.
 */
export function parseMirror(location: string): Mirror {
  const fail = (reason: string): never => {
    throw new TypeError(
      `invalid mirror location "${location}": ${reason}; expected [http(s)://]host[:port][/path], ` +
        'such as "https://mirror.example" or "127.0.0.1:5001/hub"',
    );
  };

  const text = location.trim();
  const explicitScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(text);
  let url: URL | undefined;
  try {
    url = new URL(explicitScheme ? text : `https://${text}`);
  } catch {
    fail("it is not a host or URL");
  }
  if (url!.protocol !== "https:" && url!.protocol !== "http:") {
    fail(`scheme "${url!.protocol}" is not supported`);
  }
  if (url!.username || url!.password) {
    fail("it contains credentials; put them in docker's config.json under the mirror's host");
  }
  if (url!.search || url!.hash) fail("remove the query and fragment");
  if (!url!.host) fail("the host is missing");

  const useHttp = url!.protocol === "http:" || (!explicitScheme && LOOPBACK.has(url!.hostname));
  const origin = `${useHttp ? "http" : "https"}://${url!.host}`;
  const prefix = decodeURIComponent(url!.pathname).replace(/^\/+|\/+$/g, "");
  return { host: url!.host, origin, prefix, location };
}

/** Return the registry name a mirror map key stands for: `"docker.io"` for Docker Hub's names, else the key in lowercase. */
export function mirrorRegistryKey(registry: string): string {
  const host = registry.trim().replace(/^https?:\/\//i, "").replace(/\/+$/, "").toLowerCase();
  return DOCKER_HUB_NAMES.has(host) ? "docker.io" : host;
}

/**
 * Return the parsed mirrors of a registry, in order, from a mirror map whose
 * keys may use any of Docker Hub's names.
 *
 * @throws {TypeError} when a location is invalid.
 */
export function mirrorsFor(mirrors: MirrorMap | undefined, registry: string): Mirror[] {
  if (!mirrors) return [];
  const registryKey = mirrorRegistryKey(registry);
  const found: Mirror[] = [];
  for (const [key, locations] of Object.entries(mirrors)) {
    if (mirrorRegistryKey(key) === registryKey) found.push(...locations.map(parseMirror));
  }
  return found;
}

/** Return the `host[:port]` of every mirror in a map, for keeping other registries' credentials away from them. */
export function mirrorHosts(mirrors: MirrorMap | undefined): string[] {
  if (!mirrors) return [];
  return Object.values(mirrors).flat().map((location) => parseMirror(location).host);
}

/**
 * Parse a `--mirror REGISTRY=LOCATION` value and add it to `into`.
 *
 * @throws {TypeError} when the value has no `=` or the location is invalid.
 */
export function addMirrorFlag(into: MirrorMap, value: string): MirrorMap {
  const equals = value.indexOf("=");
  if (equals <= 0 || equals === value.length - 1) {
    throw new TypeError(
      `invalid mirror "${value}": expected REGISTRY=LOCATION, such as ` +
        '"docker.io=https://mirror.example"',
    );
  }
  const registry = mirrorRegistryKey(value.slice(0, equals));
  const location = value.slice(equals + 1);
  parseMirror(location);
  (into[registry] ??= []).push(location);
  return into;
}

/**
 * Parse a mirrors file (YAML or JSON, see the module documentation).
 * `source` names the file in messages.
 *
 * @throws {SyntaxError} when the text is not YAML or not of the expected shape.
 * @throws {TypeError} when a location is invalid.
 */
export function parseMirrorsFile(text: string, source: string): MirrorMap {
  let document: unknown;
  try {
    document = parseYaml(text);
  } catch (error) {
    throw new SyntaxError(
      `mirrors file "${source}" is not valid YAML or JSON (${(error as Error).message}): fix it`,
      { cause: error },
    );
  }
  const shapeError = (reason: string) =>
    new SyntaxError(
      `mirrors file "${source}" ${reason}: expected a "mirrors" mapping of registry names to ` +
        "a location or a list of locations",
    );

  if (document === null || document === undefined) return {};
  if (typeof document !== "object" || Array.isArray(document)) {
    throw shapeError("is not a mapping");
  }
  const unknown = Object.keys(document).filter((key) => key !== "mirrors");
  if (unknown.length > 0) throw shapeError(`has unknown key "${unknown[0]}"`);
  const entries = (document as { mirrors?: unknown }).mirrors ?? {};
  if (entries === null || typeof entries !== "object" || Array.isArray(entries)) {
    throw shapeError('has a "mirrors" value that is not a mapping');
  }

  const map: MirrorMap = {};
  for (const [registry, value] of Object.entries(entries)) {
    const locations = typeof value === "string" ? [value] : value;
    if (!Array.isArray(locations) || locations.some((item) => typeof item !== "string")) {
      throw shapeError(`has a value for "${registry}" that is neither a string nor a list of strings`);
    }
    for (const location of locations as string[]) parseMirror(location);
    (map[mirrorRegistryKey(registry)] ??= []).push(...(locations as string[]));
  }
  return map;
}

/** Merge mirror maps; the locations of earlier maps come first. */
export function mergeMirrors(...maps: (MirrorMap | undefined)[]): MirrorMap {
  const merged: MirrorMap = {};
  for (const map of maps) {
    for (const [registry, locations] of Object.entries(map ?? {})) {
      const key = mirrorRegistryKey(registry);
      for (const location of locations) {
        if (!(merged[key] ??= []).includes(location)) merged[key].push(location);
      }
    }
  }
  return merged;
}
