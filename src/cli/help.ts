/**
 * Help texts of the CLI, one per command.
 *
 * @module
 */

const COMMON = `
Registry and cache options:
  --platform OS/ARCH[/VARIANT]  platform to pick from a multi-platform image
                                (default: this host's, e.g. linux/amd64)
  --cache DIR                   blob cache, an OCI image layout (default:
                                $OCISTAGE_CACHE, $XDG_CACHE_HOME/ocistage or
                                ~/.cache/ocistage)
  --username NAME               registry user name; the password or token is
  --password-stdin              read from standard input
  --plain-http                  use http:// for the registry (always used for
                                localhost, 127.0.0.1 and [::1])
  --registry-url URL            override an element's registry-url
  --concurrency N               layers downloaded at once, 1 to 64 (default 3)
  --hasher auto|native|wasm     sha256 backend (default auto: node:crypto,
                                else hash-wasm)
  --allow-foreign-urls          fetch foreign layers from the URLs their
                                descriptors list (off by default)
  --mirror REGISTRY=LOCATION    try a mirror first for manifests by digest
                                and blobs, then REGISTRY itself; repeatable,
                                tried in order (docker.io=https://mirror.example,
                                quay.io=127.0.0.1:5001/quay)
  --mirrors-file FILE           YAML or JSON file with a "mirrors" mapping of
                                registry to location(s), tried after the
                                --mirror flags (default: $OCISTAGE_MIRRORS)

Output options:
  --json                        machine-readable result on standard output
  -q, --quiet                   no progress or warnings on standard error
  -h, --help                    this help

Credentials are also read from OCISTAGE_USERNAME and OCISTAGE_PASSWORD, and
from docker's config.json ($DOCKER_CONFIG or ~/.docker), credential helpers
included. Mirrors get credentials only from config.json, by their own host;
--username and OCISTAGE_USERNAME are never sent to them. Tags are always
resolved at the registry itself.
`;

/** The short usage shown with a usage error. */
export const USAGE = `usage: ocistage track|fetch IMAGE|ELEMENT [options]
       ocistage stage IMAGE|ELEMENT DIR [options]
Run "ocistage --help" for details.
`;

/** Full help texts by command; `main` is the overview. */
export const HELP: Record<string, string> = {
  main: `ocistage: pull container images and stage their root filesystem

Usage:
  ocistage track IMAGE|ELEMENT         print the manifest digest of a tag for
                                       one platform; on an element file,
                                       write the new ref into it
  ocistage fetch IMAGE|ELEMENT         download manifest and layers into the
                                       cache, verifying every sha256
  ocistage stage IMAGE|ELEMENT DIR     fetch, then apply the layers into DIR
                                       (a new or empty directory)

IMAGE is a reference such as alpine, alpine:3.20,
127.0.0.1:5000/team/base:1.0 or name@sha256:<hex>. ELEMENT is a BuildStream
element file (.bst, .yml, .yaml) with a "kind: docker" source.

Exit codes: 0 success, 1 failure, 2 usage error.
${COMMON}`,
  track: `Usage: ocistage track IMAGE|ELEMENT [options]

Resolve IMAGE's tag to the digest of the manifest for one platform and print
it. On an element file, resolve each docker source's "track" tag and write
the new "ref" back into the file, changing only that line.
${COMMON}`,
  fetch: `Usage: ocistage fetch IMAGE|ELEMENT [options]

Download the manifest, the config and every layer into the cache. Each blob
is checked against its size and sha256 while it streams and renamed into
place only when it matches; blobs already cached are not downloaded again,
and an interrupted download resumes. Prints the manifest digest.
${COMMON}`,
  stage: `Usage: ocistage stage IMAGE|ELEMENT DIR [options]

Fetch the image and apply its layers in order into DIR, which must be new or
empty. Whiteouts are applied, device nodes and everything under dev/ are
dropped, every file is made owner-readable and every directory owner-
writable, and nothing is written outside DIR.
${COMMON}`,
};
