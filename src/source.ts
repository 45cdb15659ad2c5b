/**
 * `DockerSource`: the operations a build system performs on one
 * `kind: docker` source of a BuildStream element (configure, track, fetch,
 * isCached, stage, uniqueKey).
 *
 * @module
 */
import * as path from "node:path";
import { BlobCache } from "./cache.ts";
import { type Digest, parseDigest } from "./digest.ts";
import { type DockerSourceConfig, uniqueKey } from "./element.ts";
import { ElementError } from "./errors.ts";
import { parseManifest } from "./manifest.ts";
import { hostPlatform, type ImageReference, type Platform, referenceFromRegistryUrl } from "./reference.ts";
import { fetchImage, type FetchResult, stage, type StageOptions, type StageResult, track } from "./stage.ts";

/** Options of {@link DockerSource}: those of {@link stage}, plus a registry URL override. */
export interface DockerSourceOptions extends StageOptions {
  /** Replaces the element's `registry-url`, such as a mirror's. */
  registryUrl?: string;
}

/**
 * One docker source of an element, with the registry and cache options to
 * use for it.
 *
 * @example
 * ```ts
 * const [config] = parseElement(text, "base.bst");
 * const source = new DockerSource(config, { cache: "/var/cache/ocistage" });
 * if (!source.isCached()) await source.fetch();
 * await source.stage("./sysroot");
 * ```
 */
export class DockerSource {
  /** The validated element configuration. */
  readonly config: DockerSourceConfig;
  readonly #options: DockerSourceOptions;

  constructor(config: DockerSourceConfig, options: DockerSourceOptions = {}) {
    this.config = config;
    this.#options = options;
  }

  /** The element's platform: its `os` and `architecture`, else the host's. */
  get platform(): Platform {
    const host = hostPlatform();
    if (!this.config.os && !this.config.architecture) return host;
    const architecture = this.config.architecture ?? host.architecture;
    return { os: this.config.os ?? host.os, architecture, ...(architecture === host.architecture && host.variant ? { variant: host.variant } : {}) };
  }

  /** The pinned digest from `ref`, as `sha256:<hex>`, if the element has one. */
  get digest(): Digest | undefined {
    return this.config.ref ? parseDigest(`sha256:${this.config.ref}`) : undefined;
  }

  #reference(pinned: boolean): ImageReference {
    const registryUrl = this.#options.registryUrl ?? this.config.registryUrl;
    const base = referenceFromRegistryUrl(registryUrl, this.config.image);
    if (pinned) {
      const digest = this.digest;
      if (!digest) {
        throw new ElementError(
          `docker source "${this.config.image}" has no ref: run "ocistage track" on the element first`,
          { line: this.config.line, key: "ref" },
        );
      }
      return { ...base, tag: undefined, digest };
    }
    if (!this.config.track) {
      throw new ElementError(
        `docker source "${this.config.image}" has no track tag to resolve: add "track: TAG"`,
        { line: this.config.line, key: "track" },
      );
    }
    return { ...base, tag: this.config.track, digest: undefined };
  }

  /**
   * The element's `os`/`architecture` win over the caller's platform. Without
   * either, the platform stays as the caller gave it, or unset, so that a
   * single-platform image for another platform gives a warning, not an error.
   */
  #pullOptions(): DockerSourceOptions {
    const stated = this.config.os !== undefined || this.config.architecture !== undefined;
    return {
      ...this.#options,
      platform: stated ? this.platform : this.#options.platform,
      registryUrl: this.#options.registryUrl ?? this.config.registryUrl,
    };
  }

  /** Resolve the `track` tag to the manifest digest of the element's platform. */
  async track(): Promise<Digest> {
    const result = await track(this.#reference(false), this.#pullOptions());
    return result.digest;
  }

  /** Download the pinned manifest and its blobs into the cache. */
  async fetch(): Promise<FetchResult> {
    return await fetchImage(this.#reference(true), this.#pullOptions());
  }

  /** Return true when the pinned manifest, its config and every layer are in the cache. */
  async isCached(): Promise<boolean> {
    const digest = this.digest;
    if (!digest) return false;
    const cache = this.#cache();
    if (!cache.has(digest)) return false;
    try {
      const bytes = await cache.readBytes(digest);
      const manifest = parseManifest(bytes, undefined, digest);
      if (!("layers" in manifest)) return false;
      return [manifest.config, ...manifest.layers].every((blob) => cache.has(blob.digest as Digest, blob.size));
    } catch {
      return false;
    }
  }

  /** Stage the pinned image into `dir`, or into `dir/<directory>` when the source sets `directory`. */
  async stage(dir: string): Promise<StageResult> {
    const target = this.config.directory ? path.join(dir, this.config.directory) : dir;
    return await stage(this.#reference(true), target, this.#pullOptions());
  }

  /** Return the key that identifies the staged content: `[registry-url, image, digest]`. */
  uniqueKey(): [string, string, string] {
    const digest = this.digest;
    if (!digest) {
      throw new ElementError(`docker source "${this.config.image}" has no ref, so it has no unique key: track it first`, {
        line: this.config.line,
        key: "ref",
      });
    }
    return uniqueKey(this.config, digest);
  }

  #cache(): BlobCache {
    const cache = this.#options.cache;
    return cache instanceof BlobCache ? cache : new BlobCache(cache, { hasher: this.#options.hasher });
  }
}
