/**
 * Error classes shared by every part of ocistage.
 *
 * Classes follow the meaning of the failure: `TypeError` subclasses for bad
 * arguments, `SyntaxError` subclasses for malformed input (manifests, tar
 * streams, element files), `RegistryError` for HTTP failures. Messages follow
 * one grammar: what failed, on which value (quoted), then what to do. Wrap a
 * lower-level error with `{ cause }` instead of repeating its text.
 *
 * @module
 */

/** A malformed or unusable image reference or platform string. */
export class InvalidReferenceError extends TypeError {
  override name = "InvalidReferenceError";
  /** The reference or platform string exactly as given. */
  readonly input: string;
  constructor(input: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.input = input;
  }
}

/** Content whose size or sha256 digest differs from the descriptor that named it. */
export class DigestMismatchError extends Error {
  override name = "DigestMismatchError";
  /** The digest the descriptor or reference promised. */
  readonly expected: string;
  /** The digest computed from the bytes received, when the size matched. */
  readonly actual?: string;
  constructor(message: string, expected: string, actual?: string, options?: ErrorOptions) {
    super(message, options);
    this.expected = expected;
    this.actual = actual;
  }
}

/** A manifest or index that cannot be parsed or is not supported. */
export class ManifestError extends SyntaxError {
  override name = "ManifestError";
  /** The manifest digest or reference the document came from, when known. */
  readonly source?: string;
  constructor(message: string, source?: string, options?: ErrorOptions) {
    super(message, options);
    this.source = source;
  }
}

/** No manifest in an index matches the requested platform. */
export class PlatformNotFoundError extends Error {
  override name = "PlatformNotFoundError";
  /** The platform that was requested, as `os/arch[/variant]`. */
  readonly requested: string;
  /** The platforms the index offers, as `os/arch[/variant]`. */
  readonly available: string[];
  constructor(requested: string, available: string[], source?: string) {
    const where = source ? ` in ${source}` : "";
    super(
      `no manifest for platform "${requested}"${where}; the image offers ${
        available.length ? available.map((p) => `"${p}"`).join(", ") : "no platforms"
      }: pass one of them with --platform`,
    );
    this.requested = requested;
    this.available = available;
  }
}

/**
 * A layer that cannot be applied: a malformed tar stream, a forbidden entry
 * (an escaping name, an unsupported type) or a broken compression stream.
 */
export class LayerError extends SyntaxError {
  override name = "LayerError";
  /** Digest of the layer blob, when known. */
  layer?: string;
  /** Entry name inside the tar stream, when the failure concerns one entry. */
  readonly entry?: string;
  constructor(message: string, options?: ErrorOptions & { layer?: string; entry?: string }) {
    super(message, options);
    this.layer = options?.layer;
    this.entry = options?.entry;
  }
}

/** A BuildStream element file or docker source mapping that is invalid. */
export class ElementError extends SyntaxError {
  override name = "ElementError";
  /** Path of the element file, when read from disk. */
  readonly file?: string;
  /** 1-based line of the offending key or value, when known. */
  readonly line?: number;
  /** The offending key, when one is to blame. */
  readonly key?: string;
  constructor(
    message: string,
    options?: ErrorOptions & { file?: string; line?: number; key?: string },
  ) {
    super(message, options);
    this.file = options?.file;
    this.line = options?.line;
    this.key = options?.key;
  }
}

/** A stage target that exists and is not an empty directory. */
export class TargetNotEmptyError extends Error {
  override name = "TargetNotEmptyError";
  readonly path: string;
  constructor(path: string, options: { notDirectory?: boolean } = {}) {
    const problem = options.notDirectory ? "is not a directory" : "is not an empty directory";
    super(`stage target "${path}" ${problem}: choose a new or empty directory`);
    this.path = path;
  }
}

/** An image source that has no image under the requested name or tag, with the names it does offer. */
export class ImageNotFoundError extends Error {
  override name = "ImageNotFoundError";
  /** The source as written, such as `oci:./layout:1.0`. */
  readonly source: string;
  /** The names the source does offer. */
  readonly available: string[];
  constructor(message: string, source: string, available: string[], options?: ErrorOptions) {
    super(message, options);
    this.source = source;
    this.available = available;
  }
}
