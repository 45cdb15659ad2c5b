/**
 * The registry as an {@link ImageSource}: a thin adapter over
 * {@link RegistryClient} for one reference.
 *
 * @module
 */
import { formatReference, type ImageReference, type Platform } from "../reference.ts";
import type { Descriptor } from "../manifest.ts";
import type { FetchedManifest, RegistryClient, ResolvedManifest } from "../registry/client.ts";
import type { ImageSource, SourceBlobOptions } from "../image-source.ts";

/** One image reference on a registry. */
export class RegistrySource implements ImageSource {
  readonly name: string;
  readonly cacheName: string;
  readonly reference: ImageReference;
  readonly #client: RegistryClient;

  constructor(client: RegistryClient, reference: ImageReference) {
    this.#client = client;
    this.reference = reference;
    this.name = formatReference(reference);
    this.cacheName = this.name;
  }

  top(): Promise<FetchedManifest> {
    return this.#client.getManifest(this.reference);
  }

  resolve(platform: Platform): Promise<ResolvedManifest> {
    return this.#client.resolve(this.reference, platform);
  }

  openBlob(descriptor: Descriptor, options: SourceBlobOptions = {}): ReadableStream<Uint8Array> {
    return this.#client.openBlob(this.reference, descriptor, { resumeFrom: options.resumeFrom, skipMirrors: options.skipMirrors });
  }

  readBlob(descriptor: Descriptor): Promise<Uint8Array> {
    return this.#client.getBlob(this.reference, descriptor);
  }

  listTags(): Promise<string[]> {
    return this.#client.listTags(this.reference);
  }

  close(): void {}
}
