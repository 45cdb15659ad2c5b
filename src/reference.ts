/**
 * Image references (`[registry[:port]/]repository[:tag][@digest]`) and
 * platforms (`os/arch[/variant]`).
 *
 * References follow the grammar of the distribution project's `reference`
 * package with Docker's normalisation: a name without a registry lives on
 * Docker Hub (`docker.io`), and a single-component Hub name gets `library/`.
 *
 * @example
 * ```ts
 * const ref = parseReference("alpine");
 * formatReference(ref); // "docker.io/library/alpine:latest"
 * registryBaseUrl(ref.registry); // "https://registry-1.docker.io"
 * ```
 *
 * @module
 */
import process from "node:process";
import { type Digest, parseDigest } from "./digest.ts";
import { InvalidReferenceError } from "./errors.ts";

/** A parsed image reference. A digest, when present, wins over the tag. */
export interface ImageReference {
  /** `"docker.io"` for Docker Hub, else `host[:port]` as written. */
  registry: string;
  /** Repository path inside the registry, such as `"library/alpine"`. */
  repository: string;
  /** Tag, such as `"3.20"`; `"latest"` when the input had neither tag nor digest. */
  tag?: string;
  /** Manifest digest, when the input pinned one with `@sha256:...`. */
  digest?: Digest;
}

/** The registry name that stands for Docker Hub in references. */
export const DOCKER_HUB = "docker.io";

/** The Docker Hub API endpoint (the Hub website's host does not serve `/v2/`). */
const DOCKER_HUB_API = "https://registry-1.docker.io";

/** Host names that also mean Docker Hub, as they appear in registry URLs and docker config. */
const DOCKER_HUB_ALIASES = new Set([
  "docker.io",
  "index.docker.io",
  "registry-1.docker.io",
  "registry.hub.docker.com",
]);

const EXPECTED_FORM =
  'expected [registry[:port]/]repository[:tag][@sha256:digest], such as "alpine:3.20" or ' +
  '"127.0.0.1:5000/team/app@sha256:<64 hex digits>"';

const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN = new RegExp(
  `^(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[a-fA-F0-9:.]+\\])(?::[0-9]+)?$`,
);
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const HEX64 = /^[a-f0-9]{64}$/;
const MAX_NAME_LENGTH = 255;

/**
 * Parse an image reference, applying Docker Hub defaults.
 *
 * `"alpine"` becomes `docker.io/library/alpine:latest`. The tag defaults to
 * `"latest"` only when the input has no digest. The first path component is a
 * registry when it contains `.` or `:` or is `localhost`.
 *
 * @throws {InvalidReferenceError} naming the input and the expected form.
 */
export function parseReference(input: string): ImageReference {
  const fail = (reason: string, cause?: unknown): never => {
    throw new InvalidReferenceError(
      input,
      `invalid image reference "${input}": ${reason}; ${EXPECTED_FORM}`,
      cause === undefined ? undefined : { cause },
    );
  };

  if (input.length === 0) fail("the reference is empty");
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(input)) {
    fail("remove the URL scheme, because references name a registry host, not a URL");
  }

  const at = input.indexOf("@");
  const namePart = at === -1 ? input : input.slice(0, at);
  let digest: Digest | undefined;
  if (at !== -1) {
    try {
      digest = parseDigest(input.slice(at + 1));
    } catch (error) {
      fail(`the digest is invalid (${(error as Error).message})`, error);
    }
  }

  const lastSlash = namePart.lastIndexOf("/");
  const colon = namePart.lastIndexOf(":");
  let name = namePart;
  let tag: string | undefined;
  if (colon > lastSlash) {
    name = namePart.slice(0, colon);
    tag = namePart.slice(colon + 1);
    if (!TAG.test(tag)) {
      fail(`tag "${tag}" is invalid: use at most 128 letters, digits, "_", "." or "-"`);
    }
  }

  const { registry, repository } = splitName(name, fail);
  if (registry.length + 1 + repository.length > MAX_NAME_LENGTH) {
    fail(`the name is longer than ${MAX_NAME_LENGTH} characters`);
  }

  const ref: ImageReference = { registry, repository };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  if (tag === undefined && digest === undefined) ref.tag = "latest";
  return ref;
}

/** Split a name into registry and repository, validating both. */
function splitName(
  name: string,
  fail: (reason: string) => never,
): { registry: string; repository: string } {
  const slash = name.indexOf("/");
  const first = slash === -1 ? "" : name.slice(0, slash);
  const hasRegistry = slash !== -1 &&
    (first.includes(".") || first.includes(":") || first === "localhost" ||
      first !== first.toLowerCase());

  let registry = DOCKER_HUB;
  let repository = name;
  if (hasRegistry) {
    registry = first;
    repository = name.slice(slash + 1);
    if (!DOMAIN.test(registry)) fail(`registry "${registry}" is not a valid host[:port]`);
    if (registry === "index.docker.io") registry = DOCKER_HUB;
  } else if (HEX64.test(name)) {
    fail("a 64-digit hex string is an image ID, not a repository name");
  }

  validateRepository(repository, fail);
  if (registry === DOCKER_HUB && !repository.includes("/")) repository = `library/${repository}`;
  return { registry, repository };
}

function validateRepository(repository: string, fail: (reason: string) => never): void {
  if (repository.length === 0) fail("the repository name is empty");
  if (repository !== repository.toLowerCase()) fail("the repository name must be lowercase");
  for (const component of repository.split("/")) {
    if (!PATH_COMPONENT.test(component)) {
      fail(
        `repository component "${component}" is invalid: use lowercase letters and digits, ` +
          'joined by ".", "_", "__" or dashes',
      );
    }
  }
}

/**
 * Format a reference as `registry/repository[:tag][@digest]`, always with the
 * registry, so the result parses back to the same reference.
 */
export function formatReference(ref: ImageReference): string {
  let text = `${ref.registry}/${ref.repository}`;
  if (ref.tag !== undefined) text += `:${ref.tag}`;
  if (ref.digest !== undefined) text += `@${ref.digest}`;
  return text;
}

/** Options that decide how a registry name maps to a base URL. */
export interface RegistryUrlOptions {
  /** Use `http://` for every registry (default false: only loopback hosts use HTTP). */
  plainHttp?: boolean;
  /**
   * An explicit registry URL such as `"http://10.0.0.5:5000"` or the BuildStream
   * default `"https://registry.hub.docker.com"`. It applies only to the registry
   * it names; its scheme decides between HTTP and HTTPS.
   */
  registryUrl?: string;
}

/**
 * Return the base URL (scheme, host and port, no trailing slash) of a
 * registry's API. Docker Hub maps to `https://registry-1.docker.io`.
 * Plain HTTP is used only for `localhost`, `127.0.0.1` and `[::1]`, for an
 * explicit `http://` registry URL, or with `plainHttp`.
 *
 * @throws {InvalidReferenceError} when `registryUrl` is not an http(s) URL.
 */
export function registryBaseUrl(registry: string, options: RegistryUrlOptions = {}): string {
  if (options.registryUrl !== undefined) {
    const explicit = parseRegistryUrl(options.registryUrl);
    if (explicit.registry === registry) {
      if (explicit.registry === DOCKER_HUB) return DOCKER_HUB_API;
      return explicit.origin;
    }
  }
  if (registry === DOCKER_HUB) return DOCKER_HUB_API;

  const host = registry.replace(/:[0-9]+$/, "");
  const loopback = host === "localhost" || host === "127.0.0.1" || host === "[::1]";
  return `${options.plainHttp || loopback ? "http" : "https"}://${registry}`;
}

/** Registry name (as in references) and origin of an explicit registry URL. */
function parseRegistryUrl(registryUrl: string): { registry: string; origin: string } {
  const fail = (reason: string): never => {
    throw new InvalidReferenceError(
      registryUrl,
      `invalid registry URL "${registryUrl}": ${reason}; expected http(s)://host[:port], ` +
        'such as "https://registry.hub.docker.com"',
    );
  };

  let url: URL | undefined;
  try {
    url = new URL(registryUrl);
  } catch {
    fail("it is not a URL");
  }
  if (url!.protocol !== "https:" && url!.protocol !== "http:") {
    fail(`scheme "${url!.protocol}" is not supported`);
  }
  if (!/^\/(?:v[12]\/?)?$/.test(url!.pathname) || url!.search || url!.username) {
    fail("remove the path, query and credentials");
  }

  const registry = DOCKER_HUB_ALIASES.has(url!.hostname) ? DOCKER_HUB : url!.host;
  return { registry, origin: url!.origin };
}

/**
 * Build a reference from a BuildStream-style registry URL and image name.
 *
 * `tagOrDigest` is a digest when it contains `:` (`"sha256:..."`), else a tag.
 * Docker Hub URLs (`https://registry.hub.docker.com`, `https://index.docker.io`,
 * `https://registry-1.docker.io`) give registry `"docker.io"`.
 *
 * @example
 * ```ts
 * referenceFromRegistryUrl("https://registry.hub.docker.com", "library/alpine", "3.20");
 * // { registry: "docker.io", repository: "library/alpine", tag: "3.20" }
 * ```
 *
 * @throws {InvalidReferenceError} for a bad URL, image name, tag or digest.
 */
export function referenceFromRegistryUrl(
  registryUrl: string,
  image: string,
  tagOrDigest?: string,
): ImageReference {
  const { registry } = parseRegistryUrl(registryUrl);
  const input = `${registry}/${image}`;
  const fail = (reason: string): never => {
    throw new InvalidReferenceError(
      image,
      `invalid image "${image}" for registry "${registryUrl}": ${reason}; ` +
        'expected a repository path such as "library/alpine"',
    );
  };

  if (image.includes(":") || image.includes("@")) fail("put the tag or digest in its own field");
  validateRepository(image, fail);
  const repository = registry === DOCKER_HUB && !image.includes("/") ? `library/${image}` : image;
  if (input.length > MAX_NAME_LENGTH) fail(`the name is longer than ${MAX_NAME_LENGTH} characters`);

  if (tagOrDigest === undefined) return { registry, repository, tag: "latest" };
  if (tagOrDigest.includes(":")) {
    try {
      return { registry, repository, digest: parseDigest(tagOrDigest) };
    } catch (error) {
      throw new InvalidReferenceError(
        tagOrDigest,
        `invalid digest "${tagOrDigest}" for image "${image}": ${(error as Error).message}`,
        { cause: error },
      );
    }
  }
  if (!TAG.test(tagOrDigest)) {
    throw new InvalidReferenceError(
      tagOrDigest,
      `invalid tag "${tagOrDigest}" for image "${image}": ` +
        'use at most 128 letters, digits, "_", "." or "-"',
    );
  }
  return { registry, repository, tag: tagOrDigest };
}

/** A platform as container images name it (OCI image index `platform`). */
export interface Platform {
  /** Operating system, such as `"linux"`. */
  os: string;
  /** CPU architecture in Go's naming, such as `"amd64"` or `"arm64"`. */
  architecture: string;
  /** CPU variant, such as `"v7"` for 32-bit ARM. */
  variant?: string;
}

/** Architecture spellings from `uname -m` and distributions, mapped to Go's names. */
const ARCHITECTURE_ALIASES: Record<string, string> = {
  x86_64: "amd64",
  "x86-64": "amd64",
  aarch64: "arm64",
  i386: "386",
  i686: "386",
  armhf: "arm",
  armel: "arm",
};

/**
 * Parse `os/arch[/variant]`, such as `"linux/arm64"` or `"linux/arm/v7"`.
 * Case is folded to lowercase and `uname`-style architecture names are
 * mapped (`x86_64` to `amd64`, `aarch64` to `arm64`).
 *
 * @throws {InvalidReferenceError} for any other form.
 */
export function parsePlatform(s: string): Platform {
  const parts = s.toLowerCase().split("/");
  if (parts.length < 2 || parts.length > 3 || parts.some((part) => !/^[a-z0-9._-]+$/.test(part))) {
    throw new InvalidReferenceError(
      s,
      `invalid platform "${s}": expected os/arch[/variant], such as "linux/amd64" or "linux/arm/v7"`,
    );
  }

  const [os, arch, variant] = parts;
  const platform: Platform = { os, architecture: ARCHITECTURE_ALIASES[arch] ?? arch };
  if (arch === "armhf") platform.variant = "v7";
  if (arch === "armel") platform.variant = "v6";
  if (variant !== undefined) platform.variant = variant;
  return platform;
}

/** Format a platform as `os/arch[/variant]`. */
export function formatPlatform(p: Platform): string {
  return p.variant ? `${p.os}/${p.architecture}/${p.variant}` : `${p.os}/${p.architecture}`;
}

/** Node-style `process.arch` values mapped to Go's architecture names. */
const PROCESS_ARCHITECTURES: Record<string, string> = {
  x64: "amd64",
  arm64: "arm64",
  arm: "arm",
  ia32: "386",
  s390x: "s390x",
  riscv64: "riscv64",
  loong64: "loong64",
  mips: "mips",
  mipsel: "mipsle",
};

/**
 * Return the platform of the running process.
 *
 * The OS is `"windows"` on Windows and `"linux"` elsewhere, because container
 * images target Linux and macOS runs them in a Linux VM. 32-bit ARM takes its
 * variant from the runtime's build configuration (`arm_version`) when it
 * exposes one, else `"v7"`.
 */
export function hostPlatform(): Platform {
  const os = process.platform === "win32" ? "windows" : "linux";
  let architecture = PROCESS_ARCHITECTURES[process.arch] ?? process.arch;
  if (process.arch === "ppc64") architecture = isLittleEndian() ? "ppc64le" : "ppc64";

  if (architecture !== "arm") return { os, architecture };
  const variables = (process.config as { variables?: Record<string, unknown> } | undefined)
    ?.variables;
  const armVersion = variables?.arm_version;
  const variant = typeof armVersion === "string" || typeof armVersion === "number"
    ? `v${armVersion}`
    : "v7";
  return { os, architecture, variant: /^v[5-8]$/.test(variant) ? variant : "v7" };
}

function isLittleEndian(): boolean {
  return new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
}

/**
 * Default variants: an `arm64` entry without a variant is `v8`, and `amd64`
 * without one is `v1`. `arm` without a variant is left open on the index
 * side, because images label it inconsistently.
 */
const DEFAULT_VARIANTS: Record<string, string> = { arm64: "v8", amd64: "v1" };

/** Normalise a platform for comparison: lowercase, Go arch names, default variants. */
export function normalizePlatform(p: Platform): Platform {
  const os = p.os.toLowerCase();
  const architecture = ARCHITECTURE_ALIASES[p.architecture.toLowerCase()] ??
    p.architecture.toLowerCase();
  const variant = p.variant?.toLowerCase() || DEFAULT_VARIANTS[architecture];
  return variant ? { os, architecture, variant } : { os, architecture };
}

/**
 * Rank how well an index entry's platform serves a requested platform: 0 is an
 * exact match, larger is worse, and `undefined` means it cannot run.
 *
 * OS and architecture must be equal. A missing requested `arm` variant means
 * `v7`. Among variants, an equal one ranks first, then an entry without a
 * variant, then the closest lower `vN`; a higher variant never matches,
 * because the host CPU may lack its instructions.
 */
export function rankPlatform(candidate: Platform, requested: Platform): number | undefined {
  const have = normalizePlatform(candidate);
  const want = normalizePlatform(requested);
  if (have.os !== want.os || have.architecture !== want.architecture) return undefined;

  const wantVariant = want.variant ?? (want.architecture === "arm" ? "v7" : undefined);
  if (have.variant === wantVariant) return 0;
  if (have.variant === undefined) return 1;

  const haveLevel = variantLevel(have.variant);
  const wantLevel = wantVariant === undefined ? undefined : variantLevel(wantVariant);
  if (haveLevel === undefined || wantLevel === undefined || haveLevel > wantLevel) return undefined;
  return 1 + (wantLevel - haveLevel);
}

function variantLevel(variant: string): number | undefined {
  const match = /^v([0-9]+)$/.exec(variant);
  return match ? Number(match[1]) : undefined;
}

/** Return true when an index entry's platform can serve the requested platform (see {@link rankPlatform}). */
export function platformMatches(candidate: Platform, requested: Platform): boolean {
  return rankPlatform(candidate, requested) !== undefined;
}
