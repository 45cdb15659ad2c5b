/**
 * BuildStream element files: read and validate `kind: docker` sources, and
 * write a new `ref` back into the file without touching anything else.
 *
 * The accepted keys follow the `docker` source of buildstream-plugins
 * (`registry-url`, `image`, `track`, `ref`, `architecture`, `os`, `version`)
 * plus the keys BuildStream 2 allows on every source (`kind`, `directory`).
 *
 * Scalars are read the way BuildStream 2 reads them (`Representer` in its
 * `_yaml.pyx`): as strings with surrounding whitespace removed, so
 * `track: 3.10` is the tag "3.10", a `ref` made only of digits keeps its
 * leading zeros, and `~` or `null` is a string, not a null. An empty value
 * counts as absent. Anchors, aliases and tags outside the YAML core set are
 * rejected, as BuildStream rejects them. Duplicate keys are rejected too,
 * although BuildStream keeps the last value without a warning.
 *
 * @example
 * ```ts
 * const text = "kind: docker\nimage: library/alpine\ntrack: latest\n";
 * const [source] = parseElement(text, "alpine.bst");
 * const updated = setRef(text, source.index, "6c9f6f68a131ec6381da82f2bff978083ed7f4f7991d931bfa767b7965ebc94b");
 * // updated === text plus the line "ref: 6c9f6f68...", inserted after "track: latest"
 * ```
 *
 * @module
 */
import {
  type Document,
  isAlias,
  isMap,
  isScalar,
  isSeq,
  LineCounter,
  type Node,
  type Pair,
  type ParsedNode,
  parseDocument,
  Scalar,
  visit,
  type YAMLMap,
  type YAMLSeq,
} from "yaml";
import { ElementError } from "./errors.ts";

/** The registry that BuildStream's docker source uses when `registry-url` is absent. */
export const DEFAULT_REGISTRY_URL = "https://registry.hub.docker.com";

/** One `kind: docker` source, validated. */
export interface DockerSourceConfig {
  /** Registry endpoint, as written. Default: {@link DEFAULT_REGISTRY_URL}. */
  registryUrl: string;
  /** Repository path on the registry, such as "library/alpine". */
  image: string;
  /** Tag to follow when tracking, if set. */
  track?: string;
  /** Manifest digest as 64 lowercase hex digits (no "sha256:" prefix), if set. */
  ref?: string;
  /** Platform architecture override, such as "arm64". When absent, the host's architecture applies. */
  architecture?: string;
  /** Platform OS override, such as "linux". When absent, the host's OS applies. */
  os?: string;
  /** Subdirectory of the element's staging area that receives the image. */
  directory?: string;
  /** Version string the source reports to BuildStream. ocistage only carries it. */
  version?: string;
  /** Position of this source in the element's `sources` list, 0-based. A bare source mapping has index 0. */
  index: number;
  /** 1-based line where the source mapping starts. */
  line: number;
}

/** Keys BuildStream accepts on every source, whatever its kind. */
const COMMON_SOURCE_KEYS = ["kind", "directory"];

/** Keys of the buildstream-plugins docker source, without the deprecated `url`. */
const DOCKER_SOURCE_KEYS = [
  "registry-url",
  "image",
  "track",
  "ref",
  "architecture",
  "os",
  "version",
];

const VALID_KEYS = [...COMMON_SOURCE_KEYS, ...DOCKER_SOURCE_KEYS];

const REF_HEX = /^[a-f0-9]{64}$/;

// One path component of a repository name, as the distribution spec defines it.
const NAME_COMPONENT = "[a-z0-9]+(?:(?:\\.|_|__|-+)[a-z0-9]+)*";
const IMAGE_NAME = new RegExp(`^${NAME_COMPONENT}(?:/${NAME_COMPONENT})*$`);

const CORE_TAG_PREFIX = "tag:yaml.org,2002:";

/** The parsed text with everything needed to report lines and splice values. */
interface LoadedElement {
  text: string;
  file?: string;
  lines: LineCounter;
  sources: LoadedSource[];
}

interface LoadedSource {
  config: DockerSourceConfig;
  map: YAMLMap<ParsedNode, ParsedNode | null>;
}

/**
 * Parse a BuildStream element and return its docker sources in order.
 *
 * `text` is either a whole element with a `sources` list, where every
 * `kind: docker` source is returned and other kinds are skipped, or a bare
 * source mapping with `kind: docker`. A kind written with a plugin prefix,
 * such as `buildstream-plugins:docker`, counts as docker too.
 *
 * `ref` must be exactly 64 lowercase hex digits. A leading "sha256:" is
 * rejected, not stripped, because BuildStream adds that prefix itself and
 * would read such a file as a different digest.
 *
 * @param text The file contents.
 * @param file Path shown in error messages and stored on errors.
 * @throws {ElementError} on invalid YAML, duplicate keys, aliases, unknown
 * keys, the deprecated `url` key, values that are not strings, a missing
 * `image`, a missing `ref` and `track`, a malformed `ref`, `image` or
 * `registry-url`, or when the file has no docker source at all.
 */
export function parseElement(text: string, file?: string): DockerSourceConfig[] {
  return loadElement(text, file).sources.map((source) => source.config);
}

/**
 * Write `digestHex` as the `ref` of the docker source at `index` and return
 * the new text.
 *
 * Only the `ref` value changes. Comments, quoting style, line endings and
 * every other byte stay as they were. A quoted ref stays quoted with the same
 * quote character. When the source has no `ref`, a `ref:` line is inserted
 * right after the `track:` line with the same indentation (in a flow mapping,
 * `, ref: <hex>` follows the track value).
 *
 * @param text The element file contents, which must pass {@link parseElement}.
 * @param index The `index` of a source that {@link parseElement} returned.
 * @param digestHex The manifest digest, as 64 lowercase hex digits or as `sha256:<hex>`.
 * @throws {TypeError} when `digestHex` is not a sha256 digest.
 * @throws {RangeError} when no docker source has that index.
 * @throws {ElementError} when the text is not a valid element, or when the
 * existing `ref` cannot be rewritten in place.
 */
export function setRef(text: string, index: number, digestHex: string): string {
  const hex = digestToHex(digestHex);
  const element = loadElement(text);

  const source = element.sources.find((candidate) => candidate.config.index === index);
  if (!source) {
    const indexes = element.sources.map((candidate) => candidate.config.index).join(", ");
    throw new RangeError(
      `no docker source at index ${index}: the element has docker sources at index ${indexes}, so pass one of those`,
    );
  }

  const updated = spliceRef(element, source, hex);

  // Read the result back so a splice that produced something else is caught here.
  let written: string | undefined;
  let cause: unknown;
  try {
    written = loadElement(updated).sources.find((candidate) => candidate.config.index === index)
      ?.config.ref;
  } catch (error) {
    cause = error;
  }
  if (written !== hex) {
    throw new ElementError(
      `failed to write ref "${hex}" into the docker source at ` +
        `${where(element, source.config.line)}: set the ref by hand`,
      { line: source.config.line, key: "ref", cause },
    );
  }
  return updated;
}

/**
 * Return the unique key BuildStream derives for a docker source: the
 * registry URL as written, the image, and the digest as `sha256:<hex>`.
 *
 * @param digest The manifest digest, as 64 lowercase hex digits or as `sha256:<hex>`.
 * @throws {TypeError} when `digest` is not a sha256 digest.
 */
export function uniqueKey(source: DockerSourceConfig, digest: string): [string, string, string] {
  return [source.registryUrl, source.image, `sha256:${digestToHex(digest)}`];
}

function digestToHex(digest: string): string {
  const hex = digest.startsWith("sha256:") ? digest.slice("sha256:".length) : digest;
  if (!REF_HEX.test(hex)) {
    throw new TypeError(
      `invalid digest "${digest}": expected 64 lowercase hex digits, optionally prefixed with "sha256:"`,
    );
  }
  return hex;
}

function loadElement(text: string, file?: string): LoadedElement {
  const lines = new LineCounter();
  const doc = parseDocument(text, {
    schema: "failsafe",
    uniqueKeys: false,
    keepSourceTokens: true,
    prettyErrors: false,
    lineCounter: lines,
  });
  const element: LoadedElement = { text, file, lines, sources: [] };

  const syntaxError = doc.errors[0];
  if (syntaxError) {
    const line = lines.linePos(syntaxError.pos[0]).line;
    const detail = syntaxError.code === "MULTIPLE_DOCS"
      ? "the file contains more than one YAML document: keep only the element"
      : `${syntaxError.message.split("\n")[0]}: fix the syntax`;
    throw new ElementError(`invalid YAML in ${where(element, line)}: ${detail}`, {
      file,
      line,
      cause: syntaxError,
    });
  }

  checkStructure(element, doc);
  element.sources = findDockerSources(element, doc);
  return element;
}

/** Reject anchors, aliases, non-core tags and duplicate keys anywhere in the file. */
function checkStructure(element: LoadedElement, doc: Document.Parsed): void {
  const checkNode = (node: Scalar | YAMLMap | YAMLSeq) => {
    if (node.anchor !== undefined) {
      const line = lineOf(element, node);
      throw new ElementError(
        `unsupported anchor "&${node.anchor}" in ${where(element, line)}: ` +
          `BuildStream does not accept anchors and aliases, so write the value out`,
        { file: element.file, line },
      );
    }
    if (node.tag !== undefined && !node.tag.startsWith(CORE_TAG_PREFIX)) {
      const line = lineOf(element, node);
      throw new ElementError(
        `unsupported tag "${node.tag}" in ${where(element, line)}: ` +
          `BuildStream accepts only YAML core tags, so remove the tag`,
        { file: element.file, line },
      );
    }
  };

  visit(doc, {
    Scalar(_, scalar) {
      checkNode(scalar);
    },
    Seq(_, seq) {
      checkNode(seq);
    },
    Alias(_, alias) {
      const line = lineOf(element, alias);
      throw new ElementError(
        `unsupported alias "*${alias.source}" in ${where(element, line)}: ` +
          `BuildStream does not accept anchors and aliases, so write the value out`,
        { file: element.file, line },
      );
    },
    Map(_, map) {
      checkNode(map);
      const seen = new Set<string>();
      for (const pair of map.items) {
        if (!isScalar(pair.key)) continue;
        const key = String(pair.key.value);
        if (seen.has(key)) {
          const line = lineOf(element, pair.key);
          const place = where(element, line);
          throw new ElementError(
            `duplicate key "${key}" in ${place}: keep only one "${key}" in this mapping`,
            { file: element.file, line, key },
          );
        }
        seen.add(key);
      }
    },
  });
}

function findDockerSources(element: LoadedElement, doc: Document.Parsed): LoadedSource[] {
  const root = doc.contents;
  if (root === null) {
    throw noDockerSource(element, 1, []);
  }
  if (!isMap(root)) {
    const line = lineOf(element, root);
    throw new ElementError(
      `invalid element in ${where(element, line)}: the top level is not a mapping: ` +
        `write an element with "sources:" or a single source mapping`,
      { file: element.file, line },
    );
  }

  const sourcesPair = findPair(root, "sources");
  if (!sourcesPair) {
    if (!isDockerKind(kindOf(element, root))) {
      throw noDockerSource(element, lineOf(element, root), []);
    }
    return [{ config: validateSource(element, root, 0), map: root }];
  }

  const list = sourcesPair.value;
  const sourcesLine = lineOf(element, sourcesPair.key as Node);
  if (list === null || (isScalar(list) && isEmptyValue(list))) {
    throw noDockerSource(element, sourcesLine, []);
  }
  if (!isSeq(list)) {
    throw wrongType(element, "sources", list, "a list of source mappings");
  }

  const kinds: string[] = [];
  const found: LoadedSource[] = [];
  list.items.forEach((item, index) => {
    if (!isMap(item)) {
      throw wrongType(element, `sources[${index}]`, item, "a source mapping");
    }
    const kind = kindOf(element, item);
    if (kind === undefined) {
      const line = lineOf(element, item);
      throw new ElementError(
        `missing key "kind" in source ${index} at ${where(element, line)}: ` +
          `add "kind: docker" or the kind of this source`,
        { file: element.file, line, key: "kind" },
      );
    }
    kinds.push(kind);
    if (isDockerKind(kind)) found.push({ config: validateSource(element, item, index), map: item });
  });

  if (found.length === 0) throw noDockerSource(element, sourcesLine, kinds);
  return found;
}

function noDockerSource(element: LoadedElement, line: number, kinds: string[]): ElementError {
  const seen = kinds.length
    ? `it has sources of kind ${kinds.map((kind) => `"${kind}"`).join(", ")}`
    : "it has none";
  return new ElementError(
    `no docker source in ${where(element, line)}: ${seen}: add a source with "kind: docker"`,
    { file: element.file, line },
  );
}

function isDockerKind(kind: string | undefined): boolean {
  return kind === "docker" || (kind !== undefined && kind.endsWith(":docker"));
}

function kindOf(element: LoadedElement, map: YAMLMap<unknown, unknown>): string | undefined {
  const pair = findPair(map, "kind");
  if (!pair) return undefined;
  return scalarValue(element, "kind", pair.value as ParsedNode | null);
}

/** Check every key of one docker source mapping and build its config. */
function validateSource(
  element: LoadedElement,
  map: YAMLMap<ParsedNode, ParsedNode | null>,
  index: number,
): DockerSourceConfig {
  const line = lineOf(element, map);
  const values = new Map<string, string>();

  for (const pair of map.items) {
    const key = checkKey(element, pair);
    const value = scalarValue(element, key, pair.value);
    if (value !== undefined) values.set(key, value);
  }

  const image = values.get("image");
  if (image === undefined) {
    throw new ElementError(
      `missing key "image" in docker source at ${where(element, line)}: ` +
        `add "image:" with a repository such as "library/alpine"`,
      { file: element.file, line, key: "image" },
    );
  }
  checkImage(element, map, image);

  const ref = values.get("ref");
  const track = values.get("track");
  if (ref === undefined && track === undefined) {
    throw new ElementError(
      `missing keys "ref" and "track" in docker source at ${where(element, line)}: ` +
        `add "track:" with a tag, then run "ocistage track" to fill in "ref"`,
      { file: element.file, line, key: "ref" },
    );
  }
  if (ref !== undefined) checkRef(element, map, ref);

  const registryUrl = values.get("registry-url") ?? DEFAULT_REGISTRY_URL;
  checkRegistryUrl(element, map, registryUrl);

  const config: DockerSourceConfig = { registryUrl, image, index, line };
  if (track !== undefined) config.track = track;
  if (ref !== undefined) config.ref = ref;
  for (const key of ["architecture", "os", "directory", "version"] as const) {
    const value = values.get(key);
    if (value !== undefined) config[key] = value;
  }
  return config;
}

/** Return the key of a source pair, or throw for a key the docker source does not accept. */
function checkKey(element: LoadedElement, pair: Pair<ParsedNode, ParsedNode | null>): string {
  const keyNode = pair.key;
  const line = lineOf(element, keyNode);
  if (!isScalar(keyNode)) {
    throw new ElementError(
      `invalid key in docker source at ${where(element, line)}: ` +
        `keys must be plain strings, so rewrite the key as one`,
      { file: element.file, line },
    );
  }

  const key = String(keyNode.value);
  if (VALID_KEYS.includes(key)) return key;

  if (key === "url") {
    throw new ElementError(
      `deprecated key "url" in docker source at ${where(element, line)}: ` +
        `replace it with "registry-url" (the scheme and host) and "image" (the repository path)`,
      { file: element.file, line, key },
    );
  }
  if (key.startsWith("(") && key.endsWith(")")) {
    throw new ElementError(
      `unsupported directive "${key}" in docker source at ${where(element, line)}: ` +
        `ocistage reads element files without project options, so write the resolved keys instead`,
      { file: element.file, line, key },
    );
  }
  throw new ElementError(
    `unknown key "${key}" in docker source at ${where(element, line)}: ` +
      `remove it or use one of ${VALID_KEYS.map((valid) => `"${valid}"`).join(", ")}`,
    { file: element.file, line, key },
  );
}

/** Return a scalar value as a trimmed string, undefined when it is empty, or throw for a collection. */
function scalarValue(
  element: LoadedElement,
  key: string,
  node: ParsedNode | null,
): string | undefined {
  if (node === null) return undefined;
  if (!isScalar(node)) throw wrongType(element, key, node, "a string");
  if (isEmptyValue(node)) return undefined;
  return String(node.value).trim();
}

function isEmptyValue(node: Scalar): boolean {
  return String(node.value).trim() === "";
}

function wrongType(
  element: LoadedElement,
  key: string,
  node: ParsedNode,
  expected: string,
): ElementError {
  const line = lineOf(element, node);
  const actual = isMap(node)
    ? "a mapping"
    : isSeq(node)
    ? "a list"
    : `the string "${String((node as Scalar).value)}"`;
  return new ElementError(
    `invalid value for "${key}" at ${where(element, line)}: ` +
      `expected ${expected}, found ${actual}: change the value`,
    { file: element.file, line, key },
  );
}

function checkRef(
  element: LoadedElement,
  map: YAMLMap<ParsedNode, ParsedNode | null>,
  ref: string,
): void {
  if (REF_HEX.test(ref)) return;

  const line = valueLine(element, map, "ref");
  const hint = ref.startsWith("sha256:")
    ? `remove the "sha256:" prefix, because BuildStream adds it itself`
    : `write the manifest digest as 64 lowercase hex digits, or remove "ref" and run "ocistage track"`;
  throw new ElementError(
    `invalid ref "${ref}" in docker source at ${where(element, line)}: ${hint}`,
    { file: element.file, line, key: "ref" },
  );
}

function checkImage(
  element: LoadedElement,
  map: YAMLMap<ParsedNode, ParsedNode | null>,
  image: string,
): void {
  if (IMAGE_NAME.test(image)) return;

  const line = valueLine(element, map, "image");
  let hint =
    `use a repository path of lowercase letters, digits, ".", "_", "-" and "/", such as "library/alpine"`;
  if (image.includes("@")) {
    hint = `remove the digest from "image" and put its hex digits in "ref"`;
  } else if (/:[^/]*$/.test(image)) {
    hint = `remove the tag from "image" and put it in "track"`;
  }
  throw new ElementError(
    `invalid image "${image}" in docker source at ${where(element, line)}: ${hint}`,
    { file: element.file, line, key: "image" },
  );
}

function checkRegistryUrl(
  element: LoadedElement,
  map: YAMLMap<ParsedNode, ParsedNode | null>,
  registryUrl: string,
): void {
  let protocol = "";
  try {
    protocol = new URL(registryUrl).protocol;
  } catch {
    // An unparsable URL falls through to the error below.
  }
  if (protocol === "https:" || protocol === "http:") return;

  const line = valueLine(element, map, "registry-url");
  throw new ElementError(
    `invalid registry-url "${registryUrl}" in docker source at ${where(element, line)}: ` +
      `write a full http:// or https:// URL, because ocistage does not resolve project URL aliases`,
    { file: element.file, line, key: "registry-url" },
  );
}

/** Compute the new text with the ref of `source` replaced or inserted. */
function spliceRef(element: LoadedElement, source: LoadedSource, hex: string): string {
  const { text } = element;
  const refPair = findPair(source.map, "ref");
  if (refPair) return replaceRefValue(element, source, refPair, hex);

  // validateSource guarantees a track value when ref is absent.
  const trackPair = findPair(source.map, "track")!;
  const trackValue = trackPair.value!;
  const valueEnd = trackValue.range[1];

  if (source.map.flow) {
    return text.slice(0, valueEnd) + `, ref: ${hex}` + text.slice(valueEnd);
  }

  // Block scalars end after their line break, plain and quoted ones before it,
  // so searching from the last value character finds the end of the track line.
  const keyStart = (trackPair.key as ParsedNode).range[0];
  const indent = " ".repeat(keyStart - (text.lastIndexOf("\n", keyStart - 1) + 1));
  const lineEnd = text.indexOf("\n", valueEnd - 1);
  if (lineEnd === -1) {
    return text + lineBreakOf(text) + `${indent}ref: ${hex}`;
  }
  const lineBreak = text[lineEnd - 1] === "\r" ? "\r\n" : "\n";
  return text.slice(0, lineEnd + 1) + `${indent}ref: ${hex}${lineBreak}` + text.slice(lineEnd + 1);
}

function replaceRefValue(
  element: LoadedElement,
  source: LoadedSource,
  refPair: Pair<ParsedNode, ParsedNode | null>,
  hex: string,
): string {
  const { text } = element;
  const value = refPair.value;

  if (value === null) {
    // A key with no value at all, such as `{ref}` in a flow mapping.
    const keyEnd = refPair.key.range[1];
    return text.slice(0, keyEnd) + `: ${hex}` + text.slice(keyEnd);
  }
  if (!isScalar(value)) {
    throw new ElementError(
      `failed to write ref "${hex}" at ${where(element, source.config.line)}: ` +
        `the existing ref is not a string: set the ref by hand`,
      { file: element.file, line: source.config.line, key: "ref" },
    );
  }

  const [start, end] = value.range;
  const old = text.slice(start, end);
  let replacement: string;
  switch (value.type) {
    case Scalar.QUOTE_DOUBLE:
      replacement = `"${hex}"`;
      break;
    case Scalar.QUOTE_SINGLE:
      replacement = `'${hex}'`;
      break;
    case Scalar.BLOCK_FOLDED:
    case Scalar.BLOCK_LITERAL:
      // A block scalar's range includes its header and trailing line breaks,
      // so the line breaks are kept and the next key stays on its own line.
      replacement = hex + (/\r?\n[ \t\r\n]*$/.exec(old)?.[0] ?? "");
      break;
    default:
      replacement = hex;
  }

  // An empty value sits right after the colon or right before a comment,
  // and YAML needs a space on each side of the new value there.
  if (old === "") {
    if (text[start - 1] !== " " && text[start - 1] !== "\t") replacement = ` ${replacement}`;
    if (text[end] === "#") replacement = `${replacement} `;
  }
  return text.slice(0, start) + replacement + text.slice(end);
}

function findPair<K, V>(map: YAMLMap<K, V>, key: string): Pair<K, V> | undefined {
  return map.items.find((pair) => isScalar(pair.key) && String(pair.key.value) === key);
}

function valueLine(
  element: LoadedElement,
  map: YAMLMap<ParsedNode, ParsedNode | null>,
  key: string,
): number {
  const pair = findPair(map, key);
  const node = pair?.value ?? pair?.key;
  return node ? lineOf(element, node) : lineOf(element, map);
}

function lineOf(element: LoadedElement, node: Node): number {
  const offset = node.range?.[0] ?? 0;
  return element.lines.linePos(offset).line;
}

function lineBreakOf(text: string): string {
  const first = text.indexOf("\n");
  return first > 0 && text[first - 1] === "\r" ? "\r\n" : "\n";
}

function where(element: LoadedElement, line: number): string {
  return element.file ? `"${element.file}" line ${line}` : `line ${line}`;
}
