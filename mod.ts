/**
 * ocistage: pull container images from Docker/OCI registries and stage their
 * root filesystem into a directory. Runs on Deno, Bun and Node.
 *
 * @example
 * ```ts
 * import { stage } from "./mod.ts";
 *
 * const result = await stage("127.0.0.1:5000/base:1.0", "./rootfs", {
 *   platform: "linux/amd64",
 *   onEvent: (event) => event.type === "warning" && console.warn(event.message),
 * });
 * console.log(result.digest);
 * ```
 *
 * @module
 */
export { fetchImage, stage, track } from "./src/stage.ts";
export type { FetchOptions, FetchResult, PullOptions, StageOptions, StageResult, TrackResult } from "./src/stage.ts";
export { BlobCache, defaultCacheDir } from "./src/cache.ts";
export type { BlobDescriptor } from "./src/cache.ts";
export { createSha256, parseDigest } from "./src/digest.ts";
export type { Digest, HasherBackend, Sha256 } from "./src/digest.ts";
export { formatPlatform, formatReference, hostPlatform, parsePlatform, parseReference } from "./src/reference.ts";
export type { ImageReference, Platform } from "./src/reference.ts";
export { RegistryClient } from "./src/registry/client.ts";
export type { RegistryClientOptions } from "./src/registry/client.ts";
export { RegistryError } from "./src/registry/errors.ts";
export { LayerApplier } from "./src/layer/apply.ts";
export { DockerSource } from "./src/source.ts";
export type { DockerSourceOptions } from "./src/source.ts";
export { parseElement, setRef } from "./src/element.ts";
export type { DockerSourceConfig } from "./src/element.ts";
export {
  DigestMismatchError,
  ElementError,
  InvalidReferenceError,
  LayerError,
  ManifestError,
  PlatformNotFoundError,
  TargetNotEmptyError,
} from "./src/errors.ts";
export type { EventHandler, ProgressEvent, WarningEvent } from "./src/progress.ts";
