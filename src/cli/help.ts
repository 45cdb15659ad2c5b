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
  --json                        the result as one JSON object on standard
                                output (for export to standard output, on
                                standard error), and progress as one JSON
                                object per line on standard error
  -q, --quiet                   no progress or warnings on standard error
  -h, --help                    this help
  --version                     print the version

Progress goes to standard error: a bar per blob with bytes, rate and time
left when it is a terminal, else one line per finished step.

Credentials are also read from OCISTAGE_USERNAME and OCISTAGE_PASSWORD, and
from docker's config.json ($DOCKER_CONFIG or ~/.docker), credential helpers
included. Mirrors get credentials only from config.json, by their own host;
--username and OCISTAGE_USERNAME are never sent to them. Tags are always
resolved at the registry itself.
`;

const SOURCES = `IMAGE is a registry reference such as alpine, alpine:3.20,
127.0.0.1:5000/team/base:1.0 or name@sha256:<hex>, or a local image:
  oci:DIR[:TAG]                 an OCI image layout (skopeo, umoci, or
                                ocistage's cache); TAG is the entry's
                                org.opencontainers.image.ref.name, needed
                                when the layout contains several images
  docker-archive:FILE[:NAME]    an uncompressed "docker save" archive; NAME
                                is one of its RepoTags, needed when the
                                archive contains several images
Local images are verified and copied into the cache like downloads.
ELEMENT is a BuildStream element file (.bst, .yml, .yaml) with "kind: docker"
sources.
`;

/** The short usage shown with a usage error. */
export const USAGE = `usage: ocistage track|fetch|inspect IMAGE|ELEMENT [options]
       ocistage stage IMAGE|ELEMENT DIR [options]
       ocistage export IMAGE|ELEMENT [-o FILE] [options]
       ocistage key ELEMENT
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
  ocistage export IMAGE|ELEMENT        write the flattened root filesystem as
                                       one tar archive (-o FILE or stdout)
  ocistage inspect IMAGE|ELEMENT       show the manifest, config and offered
                                       platforms; --tags lists the tags
  ocistage key ELEMENT                 print each docker source's unique key

${SOURCES}
Run "ocistage COMMAND --help" for the options of one command.
Exit codes: 0 success, 1 failure, 2 usage error.
${COMMON}`,
  track: `Usage: ocistage track IMAGE|ELEMENT [options]

Resolve IMAGE's tag to the digest of the manifest for one platform and print
it. On an element file, resolve each docker source's "track" tag and write
the new "ref" back into the file, changing only that line.

${SOURCES}${COMMON}`,
  fetch: `Usage: ocistage fetch IMAGE|ELEMENT [options]

Download the manifest, the config and every layer into the cache. Each blob
is checked against its size and sha256 while it streams and renamed into
place only when it matches; blobs already cached are not downloaded again,
and an interrupted download resumes. Prints the manifest digest.

${SOURCES}${COMMON}`,
  stage: `Usage: ocistage stage IMAGE|ELEMENT DIR [options]

Fetch the image and apply its layers in order into DIR, which must be new or
empty. Whiteouts are applied, device nodes and everything under dev/ are
dropped, every file is made owner-readable and every directory owner-
writable, and nothing is written outside DIR.

  --decode-worker               read and decompress layers in a worker
                                thread while files are written: on Deno
                                about 20% faster, with up to about 90 MiB
                                more memory; no speed gain on Node and Bun
  --write-hidden                also write the files that an upper layer
                                removes or replaces; by default they are
                                left out, found from the layers' changes
                                that earlier stages recorded in the cache
                                and from a small top layer read ahead

${SOURCES}${COMMON}`,
  export: `Usage: ocistage export IMAGE|ELEMENT [-o FILE] [options]

Write the image's flattened root filesystem as one tar archive, like
"crane export": whiteouts are applied and the files they hide are left out.
The image is staged into a temporary directory first ($TMPDIR, else /tmp),
which needs room for the unpacked image and is removed afterwards. The
archive therefore holds what "stage" keeps: no device nodes, FIFOs or
entries under dev/, files owner-readable, directories owner-writable.
Regular files, directories, symlinks and hardlinks keep their mode and
mtime (whole seconds); owners are kept when running as root, else 0.

  -o, --output FILE             write the archive to FILE, replaced only
                                when complete (default: standard output,
                                which must not be a terminal; "-" means
                                standard output)
  --decode-worker               as for stage
  --write-hidden                as for stage

${SOURCES}${COMMON}`,
  inspect: `Usage: ocistage inspect IMAGE|ELEMENT [--tags] [--json] [options]

Show what the reference names (an index or a manifest) with its digest, the
platforms an index offers, and for one platform (--platform, default this
host's when offered) the manifest, the layers with their sizes in bytes as
stored, and the config: created time, entrypoint, command, environment,
working directory, user and labels. Nothing is stored in the cache. A tag
that the registry does not have is reported with the tags it does have.

  --tags                        also list the tags: the repository's tags on
                                a registry, ref names in an OCI layout,
                                RepoTags in a docker archive. With a bare
                                repository or layout (no tag), only the
                                tags are listed
  --json                        print the result as one JSON object, with
                                the full manifest and config documents; on
                                an element, one entry per source with its
                                unique key

${SOURCES}${COMMON}`,
  key: `Usage: ocistage key ELEMENT [--json]

Print the unique key of each docker source of ELEMENT, one JSON array per
line: [registry-url, image, "sha256:<ref>"], the key BuildStream derives
for the source. Every source needs a ref: run "ocistage track ELEMENT"
first. Nothing is downloaded.
`,
};
