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
 * Images can also come from disk: `oci:DIR[:TAG]` names an OCI image layout
 * and `docker-archive:FILE[:NAME]` an archive written by `docker save`.
 *
 * @example
 * ```ts
 * import * as fs from "node:fs";
 * import { Writable } from "node:stream";
 * import { exportTar, inspect, listTags, track } from "./mod.ts";
 *
 * const { digest } = await track("127.0.0.1:5000/base:1.0");
 * const info = await inspect("oci:./layout:1.0", { platform: "linux/arm64" });
 * console.log(info.platforms, info.config?.document.created, await listTags("127.0.0.1:5000/base"));
 * const out = Writable.toWeb(fs.createWriteStream("rootfs.tar")) as WritableStream<Uint8Array>;
 * await exportTar("docker-archive:./base.tar", out);
 * ```
 *
 * `fetchImage` is also exported as `fetch`. Importing it under that name
 * hides the global `fetch` in the importing module, so prefer `fetchImage`
 * or a namespace import (`import * as ocistage from ...; ocistage.fetch(...)`).
 *
 * @module
 */
export { fetchImage, fetchImage as fetch, stage, track } from "./src/stage.ts";
export type { FetchOptions, FetchResult, PullOptions, StageOptions, StageResult, TrackResult } from "./src/stage.ts";
export { exportTar } from "./src/export.ts";
export type { ExportOptions, ExportResult } from "./src/export.ts";
export { inspect, listTags } from "./src/inspect.ts";
export type { InspectOptions, InspectResult, OfferedPlatform } from "./src/inspect.ts";
export { isLocalSource, openImageSource, parseSourceLocation } from "./src/image-source.ts";
export type { ImageSource, ImageSourceOptions, SourceBlobOptions, SourceLocation } from "./src/image-source.ts";
export { BlobCache, defaultCacheDir } from "./src/cache.ts";
export type { BlobDescriptor } from "./src/cache.ts";
export { createSha256, parseDigest } from "./src/digest.ts";
export type { Digest, HasherBackend, Sha256 } from "./src/digest.ts";
export { formatPlatform, formatReference, hostPlatform, parsePlatform, parseReference } from "./src/reference.ts";
export type { ImageReference, Platform } from "./src/reference.ts";
export { RegistryClient } from "./src/registry/client.ts";
export type { RegistryClientOptions } from "./src/registry/client.ts";
export { ForeignLayerError, RegistryError } from "./src/registry/errors.ts";
export {
  chainCredentials,
  credentialsExcept,
  dockerConfigCredentials,
  environmentCredentials,
  staticCredentials,
} from "./src/registry/auth.ts";
export type { CredentialResolver, Credentials } from "./src/registry/auth.ts";
export { parseMirrorsFile } from "./src/mirrors.ts";
export type { MirrorMap } from "./src/mirrors.ts";
export { LayerApplier } from "./src/layer/apply.ts";
export { DockerSource } from "./src/source.ts";
export type { DockerSourceOptions } from "./src/source.ts";
export { parseElement, setRef } from "./src/element.ts";
export type { DockerSourceConfig } from "./src/element.ts";
export {
  DigestMismatchError,
  ElementError,
  ImageNotFoundError,
  InvalidReferenceError,
  LayerError,
  ManifestError,
  PlatformNotFoundError,
  TargetNotEmptyError,
} from "./src/errors.ts";
export type { DownloadEvent, EventHandler, LayerEvent, ProgressEvent, RetryEvent, WarningEvent } from "./src/progress.ts";
