/**
 * Progress and warning events. The library never prints: callers pass an
 * `onEvent` callback and render the events themselves (the CLI does so).
 *
 * @module
 */

/** A warning about content that was dropped or changed while staging. */
export interface WarningEvent {
  type: "warning";
  /** Stable identifier of the warning kind, such as "device-dropped". */
  code: string;
  /** A full sentence for people. */
  message: string;
  /** How many entries this warning covers. */
  count: number;
  /** Layer digest, when the warning concerns one layer. */
  layer?: string;
}

/** Bytes of a blob received from a registry (emitted per chunk batch). */
export interface DownloadEvent {
  type: "download";
  digest: string;
  /** Bytes received so far, including bytes resumed from a partial file. */
  received: number;
  /** Total size from the descriptor. */
  total: number;
  /** True once the blob is verified and stored. */
  done: boolean;
  /** True when the blob was already in the cache and nothing was downloaded. */
  cached?: boolean;
}

/** A retry of a registry request after a retryable failure. */
export interface RetryEvent {
  type: "retry";
  /** Method and URL (credentials removed). */
  request: string;
  attempt: number;
  /** Milliseconds until the next attempt. */
  delayMs: number;
  /** The error that caused the retry, as a message. */
  reason: string;
}

/** A layer applied to the stage target. */
export interface LayerEvent {
  type: "layer";
  digest: string;
  /** 0-based position of the layer in the manifest, lowest first. */
  index: number;
  count: number;
  /** Compressed bytes consumed so far. */
  read: number;
  total: number;
  done: boolean;
  /** On the final event: files and hardlinks left out because an upper layer removes or replaces them (`LayerStats.hidden`). */
  hidden?: number;
}

/** Any event the library reports. */
export type ProgressEvent = WarningEvent | DownloadEvent | RetryEvent | LayerEvent;

/** The callback type that library options take as `onEvent`. */
export type EventHandler = (event: ProgressEvent) => void;
