import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { DEFAULT_REGISTRY_URL, parseElement, setRef, uniqueKey } from "../src/element.ts";
import { ElementError } from "../src/errors.ts";

function hexOf(seed: string): string {
  return createHash("sha256").update(seed).digest("hex");
}

const OLD = hexOf("old manifest");
const NEW = hexOf("new manifest");
const FILE = "elements/base/alpine.bst";

/** Split into lines while keeping each line's ending, so CRLF differences show up. */
function linesOf(text: string): string[] {
  return text.split(/(?<=\n)/);
}

/** Assert that `after` differs from `before` only in the line at `lineIndex`, which must now read `expected`. */
function assertOnlyLineReplaced(
  before: string,
  after: string,
  lineIndex: number,
  expected: string,
): void {
  const beforeLines = linesOf(before);
  const afterLines = linesOf(after);
  assert.equal(afterLines.length, beforeLines.length);
  assert.equal(afterLines[lineIndex], expected);
  afterLines.splice(lineIndex, 1);
  beforeLines.splice(lineIndex, 1);
  assert.deepEqual(afterLines, beforeLines);
}

/** Assert that `after` is `before` with exactly one new line, `expected`, at `lineIndex`. */
function assertOnlyLineInserted(
  before: string,
  after: string,
  lineIndex: number,
  expected: string,
): void {
  const afterLines = linesOf(after);
  assert.equal(afterLines[lineIndex], expected);
  afterLines.splice(lineIndex, 1);
  assert.equal(afterLines.join(""), before);
}

const ELEMENT_WITH_COMMENTS = `# The base image for the sandbox.
kind: import

sources:
# Pinned by ocistage track.
- kind: docker
  registry-url: https://registry.hub.docker.com   # Docker Hub
  image: library/alpine
  track: "3.19"          # keep on the 3.19 series
  ref: ${OLD}  # manifest for amd64
  architecture: amd64
  os: linux

config:
  source: /
`;

test("parseElement() reads a docker source with comments", () => {
  const sources = parseElement(ELEMENT_WITH_COMMENTS, FILE);

  assert.deepEqual(sources, [{
    registryUrl: "https://registry.hub.docker.com",
    image: "library/alpine",
    track: "3.19",
    ref: OLD,
    architecture: "amd64",
    os: "linux",
    index: 0,
    line: 6,
  }]);
});

test("setRef() replaces only the ref line", () => {
  const updated = setRef(ELEMENT_WITH_COMMENTS, 0, NEW);

  assertOnlyLineReplaced(
    ELEMENT_WITH_COMMENTS,
    updated,
    9,
    `  ref: ${NEW}  # manifest for amd64\n`,
  );
  assert.equal(parseElement(updated)[0].ref, NEW);
});

test("setRef() with the same digest changes nothing", () => {
  assert.equal(setRef(ELEMENT_WITH_COMMENTS, 0, OLD), ELEMENT_WITH_COMMENTS);
});

test("setRef() accepts a sha256: digest", () => {
  const updated = setRef(ELEMENT_WITH_COMMENTS, 0, `sha256:${NEW}`);

  assertOnlyLineReplaced(
    ELEMENT_WITH_COMMENTS,
    updated,
    9,
    `  ref: ${NEW}  # manifest for amd64\n`,
  );
});

test("setRef() keeps flow style", () => {
  const text = `kind: import
sources: [{kind: docker, image: library/debian, track: bookworm, ref: ${OLD}}]
`;
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(
    text,
    updated,
    1,
    `sources: [{kind: docker, image: library/debian, track: bookworm, ref: ${NEW}}]\n`,
  );
});

test("setRef() keeps double quotes", () => {
  const text = `kind: docker\nimage: library/alpine\nref: "${OLD}"\n`;
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(text, updated, 2, `ref: "${NEW}"\n`);
});

test("setRef() keeps single quotes", () => {
  const text = `kind: docker\nimage: library/alpine\nref: '${OLD}' # pinned\ntrack: edge\n`;
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(text, updated, 2, `ref: '${NEW}' # pinned\n`);
});

test("setRef() keeps CRLF line endings", () => {
  const text = [
    "kind: import",
    "sources:",
    "- kind: docker",
    "  image: library/alpine",
    "  track: latest",
    `  ref: ${OLD}`,
    "",
  ].join("\r\n");
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(text, updated, 5, `  ref: ${NEW}\r\n`);
});

test("setRef() inserts ref with CRLF", () => {
  const text =
    "kind: import\r\nsources:\r\n- kind: docker\r\n  image: library/alpine\r\n  track: latest\r\n";
  const updated = setRef(text, 0, NEW);

  assertOnlyLineInserted(text, updated, 5, `  ref: ${NEW}\r\n`);
});

const SEVERAL_SOURCES = `kind: import
sources:
- kind: docker
  image: library/alpine
  track: latest
  ref: ${OLD}
- kind: git
  url: https://example.invalid/repo.git
  ref: 0123456789abcdef0123456789abcdef01234567
- kind: docker
  registry-url: http://127.0.0.1:5000
  image: team/tools
  track: v2
  ref: ${OLD}
  directory: opt/tools
`;

test("parseElement() returns every docker source", () => {
  const sources = parseElement(SEVERAL_SOURCES, FILE);

  assert.equal(sources.length, 2);
  assert.equal(sources[0].index, 0);
  assert.equal(sources[0].line, 3);
  assert.equal(sources[0].image, "library/alpine");
  assert.equal(sources[1].index, 2);
  assert.equal(sources[1].line, 10);
  assert.equal(sources[1].registryUrl, "http://127.0.0.1:5000");
  assert.equal(sources[1].image, "team/tools");
  assert.equal(sources[1].directory, "opt/tools");
});

test("setRef() changes only the chosen source", () => {
  const updated = setRef(SEVERAL_SOURCES, 2, NEW);

  assertOnlyLineReplaced(SEVERAL_SOURCES, updated, 13, `  ref: ${NEW}\n`);
  const sources = parseElement(updated);
  assert.equal(sources[0].ref, OLD);
  assert.equal(sources[1].ref, NEW);
});

test("setRef() rejects an index without a docker source", () => {
  assert.throws(() => setRef(SEVERAL_SOURCES, 1, NEW), RangeError);
  assert.throws(() => setRef(SEVERAL_SOURCES, 3, NEW), RangeError);
});

test("setRef() rejects an invalid digest", () => {
  assert.throws(() => setRef(SEVERAL_SOURCES, 0, "abc"), TypeError);
  assert.throws(() => setRef(SEVERAL_SOURCES, 0, NEW.toUpperCase()), TypeError);
  assert.throws(() => setRef(SEVERAL_SOURCES, 0, `sha512:${NEW}`), TypeError);
});

test("parseElement() reads a bare source mapping", () => {
  const text = `kind: docker\nimage: library/busybox\ntrack: "1.36"\nref: ${OLD}\n`;
  const sources = parseElement(text);

  assert.deepEqual(sources, [{
    registryUrl: DEFAULT_REGISTRY_URL,
    image: "library/busybox",
    track: "1.36",
    ref: OLD,
    index: 0,
    line: 1,
  }]);
});

test("setRef() rewrites a bare source mapping", () => {
  const text = `kind: docker\nimage: library/busybox\ntrack: "1.36"\nref: ${OLD}\n`;
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(text, updated, 3, `ref: ${NEW}\n`);
});

test("setRef() inserts ref after track", () => {
  const text = `kind: import
sources:
- kind: docker
  image: library/alpine
  track: latest   # follow the newest release
  os: linux
config:
  source: /
`;
  const updated = setRef(text, 0, NEW);

  assertOnlyLineInserted(text, updated, 5, `  ref: ${NEW}\n`);
});

test("setRef() inserts ref at end of file", () => {
  const text = "kind: docker\nimage: library/alpine\ntrack: latest";
  const updated = setRef(text, 0, NEW);

  assert.equal(updated, `${text}\nref: ${NEW}`);
});

test("setRef() inserts ref when track starts the item", () => {
  const text = "sources:\n- track: latest\n  kind: docker\n  image: library/alpine\n";
  const updated = setRef(text, 0, NEW);

  assertOnlyLineInserted(text, updated, 2, `  ref: ${NEW}\n`);
});

test("setRef() inserts ref after a block scalar track", () => {
  const text = "sources:\n- kind: docker\n  track: >-\n    latest\n  image: library/alpine\n";
  const updated = setRef(text, 0, NEW);

  assertOnlyLineInserted(text, updated, 4, `  ref: ${NEW}\n`);
});

test("setRef() inserts ref into a flow mapping", () => {
  const text = "sources:\n- {kind: docker, image: library/alpine, track: latest}\n";
  const updated = setRef(text, 0, NEW);

  assertOnlyLineReplaced(
    text,
    updated,
    1,
    `- {kind: docker, image: library/alpine, track: latest, ref: ${NEW}}\n`,
  );
});

test("setRef() fills an empty ref", () => {
  const cases: Array<[string, string]> = [
    ["ref:\n", `ref: ${NEW}\n`],
    ["ref:", `ref: ${NEW}`],
    ["ref: # pending\n", `ref: ${NEW} # pending\n`],
    ["ref: ''\n", `ref: '${NEW}'\n`],
  ];
  for (const [refLine, expected] of cases) {
    const text = `kind: docker\nimage: library/alpine\ntrack: latest\n${refLine}`;
    const updated = setRef(text, 0, NEW);

    assertOnlyLineReplaced(text, updated, 3, expected);
    assert.equal(parseElement(updated)[0].ref, NEW);
  }
});

test("setRef() replaces a block scalar ref", () => {
  const text = `kind: docker\nimage: library/alpine\nref: >-\n  ${OLD}\nos: linux\n`;
  const updated = setRef(text, 0, NEW);

  assert.equal(updated, `kind: docker\nimage: library/alpine\nref: ${NEW}\nos: linux\n`);
});

test("parseElement() keeps scalars as strings", () => {
  const digits = "0".repeat(60) + "1234";
  const text =
    `kind: docker\nimage: library/python\ntrack: 3.10\nref: ${digits}\nversion: !!str 1.20\n`;
  const [source] = parseElement(text);

  assert.equal(source.track, "3.10");
  assert.equal(source.ref, digits);
  assert.equal(source.version, "1.20");
});

test("parseElement() treats empty values as absent", () => {
  const text =
    "kind: docker\nimage: library/alpine\ntrack: latest\nref:\narchitecture: ''\nos: \"  \"\n";
  const [source] = parseElement(text);

  assert.equal(source.ref, undefined);
  assert.equal(source.architecture, undefined);
  assert.equal(source.os, undefined);
  assert.equal(source.registryUrl, DEFAULT_REGISTRY_URL);
});

test("parseElement() reads null words as strings", () => {
  const text = "kind: docker\nimage: library/alpine\ntrack: null\nos: ~\n";
  const [source] = parseElement(text);

  assert.equal(source.track, "null");
  assert.equal(source.os, "~");
});

test("parseElement() trims scalar values", () => {
  const text = `kind: docker\nimage: library/alpine\ntrack: |\n  latest\nref: >\n  ${OLD}\n`;
  const [source] = parseElement(text);

  assert.equal(source.track, "latest");
  assert.equal(source.ref, OLD);
});

test("parseElement() accepts a plugin-prefixed kind", () => {
  const text =
    "sources:\n- kind: buildstream-plugins:docker\n  image: library/alpine\n  track: latest\n";
  const [source] = parseElement(text);

  assert.equal(source.image, "library/alpine");
});

test("uniqueKey() returns registry, image and digest", () => {
  const [first, second] = parseElement(SEVERAL_SOURCES);

  assert.deepEqual(uniqueKey(first, NEW), [
    DEFAULT_REGISTRY_URL,
    "library/alpine",
    `sha256:${NEW}`,
  ]);
  assert.deepEqual(uniqueKey(second, `sha256:${NEW}`), [
    "http://127.0.0.1:5000",
    "team/tools",
    `sha256:${NEW}`,
  ]);
  assert.throws(() => uniqueKey(first, "sha256:abc"), TypeError);
});

interface ErrorCase {
  name: string;
  text: string;
  line: number;
  key?: string;
  message: RegExp;
}

const DOCKER_HEAD = "kind: import\nsources:\n- kind: docker\n  image: library/alpine\n";

const ERROR_CASES: ErrorCase[] = [
  {
    name: "unknown key",
    text: `${DOCKER_HEAD}  track: latest\n  tag: latest\n`,
    line: 6,
    key: "tag",
    message: /unknown key "tag".*"registry-url"/,
  },
  {
    name: "deprecated url key",
    text: "kind: docker\nurl: https://registry.hub.docker.com/library/alpine\ntrack: latest\n",
    line: 2,
    key: "url",
    message: /deprecated key "url".*"registry-url".*"image"/,
  },
  {
    name: "missing ref and track",
    text: `kind: import\n\nsources:\n- kind: docker\n  image: library/alpine\n  os: linux\n`,
    line: 4,
    key: "ref",
    message: /missing keys "ref" and "track"/,
  },
  {
    name: "missing image",
    text: "kind: docker\ntrack: latest\n",
    line: 1,
    key: "image",
    message: /missing key "image"/,
  },
  {
    name: "short ref",
    text: `${DOCKER_HEAD}  ref: ${OLD.slice(0, 12)}\n`,
    line: 5,
    key: "ref",
    message: /invalid ref ".{12}".*64 lowercase hex/,
  },
  {
    name: "uppercase ref",
    text: `${DOCKER_HEAD}  ref: ${OLD.toUpperCase()}\n`,
    line: 5,
    key: "ref",
    message: /invalid ref/,
  },
  {
    name: "sha256: prefix in ref",
    text: `${DOCKER_HEAD}  track: latest\n  ref: sha256:${OLD}\n`,
    line: 6,
    key: "ref",
    message: /remove the "sha256:" prefix/,
  },
  {
    name: "mapping as image",
    text: "kind: docker\nimage:\n  name: alpine\ntrack: latest\n",
    line: 3,
    key: "image",
    message: /invalid value for "image".*expected a string, found a mapping/,
  },
  {
    name: "list as track",
    text: `${DOCKER_HEAD}  track: [latest, edge]\n`,
    line: 5,
    key: "track",
    message: /invalid value for "track".*found a list/,
  },
  {
    name: "sources that are not a list",
    text: "kind: import\nsources:\n  kind: docker\n",
    line: 3,
    key: "sources",
    message: /invalid value for "sources".*a list of source mappings/,
  },
  {
    name: "source that is not a mapping",
    text: "kind: import\nsources:\n- docker\n",
    line: 3,
    key: "sources[0]",
    message: /invalid value for "sources\[0\]".*found the string "docker"/,
  },
  {
    name: "source without kind",
    text: "kind: import\nsources:\n- image: library/alpine\n  track: latest\n",
    line: 3,
    key: "kind",
    message: /missing key "kind" in source 0/,
  },
  {
    name: "invalid YAML",
    text: `${DOCKER_HEAD}  track: latest: edge\n  ref: x\n`,
    line: 5,
    message: /invalid YAML.*fix the syntax/,
  },
  {
    name: "second YAML document",
    text: `${DOCKER_HEAD}  track: latest\n---\nkind: docker\n`,
    line: 6,
    message: /more than one YAML document/,
  },
  {
    name: "duplicate key",
    text: `${DOCKER_HEAD}  track: latest\n  ref: ${OLD}\n  ref: ${NEW}\n`,
    line: 7,
    key: "ref",
    message: /duplicate key "ref"/,
  },
  {
    name: "anchor and alias",
    text: `tag: &tag latest\nsources:\n- kind: docker\n  image: library/alpine\n  track: *tag\n`,
    line: 1,
    message: /unsupported anchor "&tag"/,
  },
  {
    name: "tilde as ref",
    text: `${DOCKER_HEAD}  track: latest\n  ref: ~\n`,
    line: 6,
    key: "ref",
    message: /invalid ref "~"/,
  },
  {
    name: "unused anchor",
    text:
      `kind: import\nsources:\n- kind: docker\n  image: &name library/alpine\n  track: latest\n`,
    line: 4,
    message: /unsupported anchor "&name"/,
  },
  {
    name: "custom tag",
    text: `${DOCKER_HEAD}  track: !env TAG\n`,
    line: 5,
    message: /unsupported tag "!env"/,
  },
  {
    name: "element without docker source",
    text:
      "kind: import\nsources:\n- kind: git\n  url: https://example.invalid/r.git\n  track: main\n",
    line: 2,
    message: /no docker source.*"git"/,
  },
  {
    name: "bare mapping of another kind",
    text: "kind: tar\nurl: https://example.invalid/a.tar\n",
    line: 1,
    message: /no docker source/,
  },
  {
    name: "empty file",
    text: "# nothing here\n",
    line: 1,
    message: /no docker source/,
  },
  {
    name: "top level list",
    text: "- kind: docker\n  image: library/alpine\n",
    line: 1,
    message: /top level is not a mapping/,
  },
  {
    name: "tag inside image",
    text: "kind: docker\nimage: library/alpine:3.19\nref: " + OLD + "\n",
    line: 2,
    key: "image",
    message: /remove the tag from "image"/,
  },
  {
    name: "digest inside image",
    text: `kind: docker\nimage: library/alpine@sha256:${OLD}\ntrack: latest\n`,
    line: 2,
    key: "image",
    message: /remove the digest from "image"/,
  },
  {
    name: "registry-url alias",
    text: "kind: docker\nregistry-url: 'dockerhub:'\nimage: library/alpine\ntrack: latest\n",
    line: 2,
    key: "registry-url",
    message: /invalid registry-url "dockerhub:"/,
  },
  {
    name: "conditional directive",
    text:
      `${DOCKER_HEAD}  track: latest\n  (?):\n  - arch == "aarch64":\n      architecture: arm64\n`,
    line: 6,
    key: "(?)",
    message: /unsupported directive "\(\?\)"/,
  },
];

for (const errorCase of ERROR_CASES) {
  test(`parseElement() rejects ${errorCase.name}`, () => {
    let caught: unknown;
    try {
      parseElement(errorCase.text, FILE);
    } catch (error) {
      caught = error;
    }

    assert.ok(caught instanceof ElementError, `expected an ElementError, got ${String(caught)}`);
    assert.equal(caught.file, FILE);
    assert.equal(caught.line, errorCase.line);
    assert.equal(caught.key, errorCase.key);
    assert.match(caught.message, errorCase.message);
    assert.ok(
      caught.message.includes(`"${FILE}" line ${errorCase.line}`),
      `message names file and line: ${caught.message}`,
    );
  });
}

test("setRef() rejects an invalid element", () => {
  const text =
    "kind: docker\nimage: library/alpine\ntrack: latest\nurl: https://registry.hub.docker.com/x\n";

  assert.throws(() => setRef(text, 0, NEW), (error: unknown) => {
    assert.ok(error instanceof ElementError);
    assert.equal(error.key, "url");
    assert.equal(error.line, 4);
    return true;
  });
});
