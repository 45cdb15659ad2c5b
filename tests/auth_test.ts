import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  basicAuthorization,
  chainCredentials,
  type Challenge,
  type Credentials,
  dockerConfigCredentials,
  environmentCredentials,
  parseWwwAuthenticate,
  staticCredentials,
  tokenRequestUrl,
  tokenScopes,
} from "../src/registry/auth.ts";
import { RegistryClient } from "../src/registry/client.ts";
import { RegistryError } from "../src/registry/errors.ts";
import type { ImageReference } from "../src/reference.ts";
import { type AuthMode, MemoryRegistry } from "./fixtures/registry.ts";

const C19_HEADER =
  'Bearer realm="https://reg.example/oauth2/token",service="reg.example",scope="repository:testrepository:pull,push"';

const PARSE_CASES: [string, string, Challenge[]][] = [
  ["quoted scope with commas", C19_HEADER, [{
    scheme: "bearer",
    params: {
      realm: "https://reg.example/oauth2/token",
      service: "reg.example",
      scope: "repository:testrepository:pull,push",
    },
  }]],
  [
    "two challenges with escapes",
    'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
    [
      { scheme: "newauth", params: { realm: "apps", type: "1", title: 'Login to "apps"' } },
      { scheme: "basic", params: { realm: "simple" } },
    ],
  ],
  ["equals and commas inside quotes", 'Basic realm="a, b=c", charset="UTF-8"', [
    { scheme: "basic", params: { realm: "a, b=c", charset: "UTF-8" } },
  ]],
  ["token68 then a challenge", "Negotiate abc+/==, Basic realm=x", [
    { scheme: "negotiate", params: {}, token68: "abc+/==" },
    { scheme: "basic", params: { realm: "x" } },
  ]],
  ["scheme without parameters", 'Negotiate, Bearer realm="r"', [
    { scheme: "negotiate", params: {} },
    { scheme: "bearer", params: { realm: "r" } },
  ]],
  ["case and whitespace", 'BEARER Realm = "r" ,  Service = svc', [
    { scheme: "bearer", params: { realm: "r", service: "svc" } },
  ]],
  ["unknown scheme kept", 'Custom foo=bar, Bearer realm="r"', [
    { scheme: "custom", params: { foo: "bar" } },
    { scheme: "bearer", params: { realm: "r" } },
  ]],
  ["unterminated quote", 'Bearer realm="open', [{ scheme: "bearer", params: { realm: "open" } }]],
  ["empty header", "", []],
  ["only commas", " , ,", []],
];

for (const [name, header, expected] of PARSE_CASES) {
  test(`parseWwwAuthenticate() reads ${name}`, () => {
    assert.deepEqual(parseWwwAuthenticate(header), expected);
  });
}

test("tokenRequestUrl() encodes service and scope", () => {
  const [challenge] = parseWwwAuthenticate(C19_HEADER);
  const url = tokenRequestUrl(challenge, tokenScopes(challenge, "repository:testrepository:pull"));
  assert.equal(
    url.href,
    "https://reg.example/oauth2/token?service=reg.example&scope=repository%3Atestrepository%3Apull%2Cpush",
  );
  assert.throws(
    () => tokenRequestUrl({ scheme: "bearer", params: { realm: "file:///etc/passwd" } }, []),
    RegistryError,
  );
});

test("tokenScopes() adds the request scope once", () => {
  const challenge = (scope?: string): Challenge => ({
    scheme: "bearer",
    params: scope === undefined ? { realm: "https://a/t" } : { realm: "https://a/t", scope },
  });
  const table: [string | undefined, string, string[]][] = [
    [undefined, "repository:app:pull", ["repository:app:pull"]],
    ["repository:app:pull", "repository:app:pull", ["repository:app:pull"]],
    ["repository:app:pull,push", "repository:app:pull", ["repository:app:pull,push"]],
    ["repository:other:pull", "repository:app:pull", [
      "repository:other:pull",
      "repository:app:pull",
    ]],
    ["registry:catalog:*", "repository:app:pull", ["registry:catalog:*", "repository:app:pull"]],
    ["repository:reg:5000/app:push", "repository:reg:5000/app:pull", [
      "repository:reg:5000/app:push",
      "repository:reg:5000/app:pull",
    ]],
  ];
  for (const [offered, requested, expected] of table) {
    assert.deepEqual(
      tokenScopes(challenge(offered), requested),
      expected,
      `${offered} + ${requested}`,
    );
  }
});

test("basicAuthorization() encodes UTF-8", () => {
  assert.equal(
    basicAuthorization({ username: "user", password: "pa:ss" }),
    `Basic ${btoa("user:pa:ss")}`,
  );
  assert.equal(basicAuthorization({ username: "jürgen", password: "x" }), "Basic asO8cmdlbjp4");
});

/** Build a fetch for reg.example that replays the exchanges of a bearer challenge. */
function scriptedBearerRegistry(tokenBody: Record<string, unknown>) {
  const seen: { url: string; authorization: string | null }[] = [];
  const handler = (request: Request): Response => {
    seen.push({ url: request.url, authorization: request.headers.get("authorization") });
    const url = new URL(request.url);
    if (url.pathname === "/oauth2/token") return Response.json(tokenBody);
    const expected = `Bearer ${tokenBody.token ?? tokenBody.access_token}`;
    if (request.headers.get("authorization") !== expected) {
      return new Response(null, { status: 401, headers: { "www-authenticate": C19_HEADER } });
    }
    return new Response(JSON.stringify({ name: "testrepository", tags: ["latest"] }), {
      headers: { "content-type": "application/json" },
    });
  };
  const fetchImpl: typeof fetch = (input, init) => {
    const request = new Request(input, init);
    if (new URL(request.url).host !== "reg.example") throw new TypeError("unexpected host");
    return Promise.resolve(handler(request));
  };
  return { seen, fetch: fetchImpl };
}

const TEST_REPOSITORY: ImageReference = {
  registry: "reg.example",
  repository: "testrepository",
  tag: "latest",
};

test("RegistryClient requests the challenged scope", async () => {
  const scripted = scriptedBearerRegistry({ token: "t1" });
  const client = new RegistryClient({ fetch: scripted.fetch });

  assert.deepEqual(await client.listTags(TEST_REPOSITORY), ["latest"]);

  assert.deepEqual(scripted.seen.map((entry) => entry.url), [
    "https://reg.example/v2/testrepository/tags/list",
    "https://reg.example/oauth2/token?service=reg.example&scope=repository%3Atestrepository%3Apull%2Cpush",
    "https://reg.example/v2/testrepository/tags/list",
  ]);
  assert.equal(scripted.seen[1].authorization, null);
  assert.equal(scripted.seen[2].authorization, "Bearer t1");
});

test("RegistryClient accepts access_token", async () => {
  const scripted = scriptedBearerRegistry({ access_token: "abc", expires_in: 300 });
  const client = new RegistryClient({ fetch: scripted.fetch });

  await client.listTags(TEST_REPOSITORY);
  await client.listTags(TEST_REPOSITORY);

  assert.equal(scripted.seen[2].authorization, "Bearer abc");
  assert.equal(scripted.seen.length, 4, "the second call reuses the cached token");
  assert.equal(scripted.seen[3].authorization, "Bearer abc");
});

function bearerSetup(auth: AuthMode, credentials?: Credentials, now?: () => number) {
  const registry = new MemoryRegistry({ auth });
  registry.pushImage("team/app", "1.0", []);
  const client = new RegistryClient({
    fetch: registry.fetch,
    credentials: credentials ? staticCredentials(credentials) : undefined,
    now,
    sleep: () => Promise.resolve(),
  });
  const ref: ImageReference = { registry: "reg.example", repository: "team/app", tag: "1.0" };
  const tokenRequests = () => registry.log.filter((entry) => entry.path.startsWith("/token"));
  return { registry, client, ref, tokenRequests };
}

test("RegistryClient caches tokens per scope", async () => {
  const { registry, client, ref, tokenRequests } = bearerSetup({ type: "bearer" });
  registry.pushImage("team/other", "1.0", []);

  await client.getManifest(ref);
  await client.getManifest(ref);
  await client.getManifest({ ...ref, repository: "team/other" });

  assert.equal(tokenRequests().length, 2);
  assert.match(tokenRequests()[0].path, /scope=repository%3Ateam%2Fapp%3Apull/);
  assert.match(tokenRequests()[1].path, /scope=repository%3Ateam%2Fother%3Apull/);
  // Only the first request meets a 401: later scopes get a token before their first request.
  assert.equal(registry.log.filter((entry) => entry.path.includes("/manifests/")).length, 4);
});

test("RegistryClient refreshes a rejected token once", async () => {
  const { registry, client, ref, tokenRequests } = bearerSetup({ type: "bearer" });
  await client.getManifest(ref);
  registry.revokeTokens();

  await client.getManifest(ref);

  assert.equal(tokenRequests().length, 2);
  const manifestAuth = registry.log
    .filter((entry) => entry.path.includes("/manifests/"))
    .map((entry) => entry.authorization?.slice(0, 7));
  assert.deepEqual(manifestAuth, [undefined, "Bearer ", "Bearer ", "Bearer "]);
});

test("RegistryClient stops after one refresh", async () => {
  const registry = new MemoryRegistry({ auth: { type: "bearer" } });
  registry.pushImage("team/app", "1.0", []);
  const revokingFetch: typeof fetch = async (input, init) => {
    const response = await registry.fetch(input, init);
    if (new URL(new Request(input).url).pathname === "/token") registry.revokeTokens();
    return response;
  };
  const client = new RegistryClient({ fetch: revokingFetch });
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "team/app", tag: "1.0" }),
    (error: unknown) => error instanceof RegistryError && error.status === 401,
  );
  assert.equal(registry.log.length, 3);
});

test("RegistryClient honours expires_in", async () => {
  let clock = 1_000_000;
  const { client, ref, tokenRequests, registry } = bearerSetup(
    { type: "bearer", expiresIn: 60 },
    undefined,
    () => clock,
  );

  await client.getManifest(ref);
  clock += 30_000;
  await client.getManifest(ref);
  assert.equal(tokenRequests().length, 1);

  clock += 31_000;
  await client.getManifest(ref);
  assert.equal(tokenRequests().length, 2);
  const unauthorized = registry.log.filter((entry) =>
    entry.path.includes("/manifests/") && !entry.authorization
  );
  assert.equal(unauthorized.length, 1, "only the first request goes without a token");
});

test("RegistryClient sends credentials to the token endpoint", async () => {
  const auth = { type: "bearer" as const, username: "ci", password: "s3cret" };
  const { client, ref, tokenRequests } = bearerSetup(auth, { username: "ci", password: "s3cret" });

  await client.getManifest(ref);

  assert.equal(tokenRequests()[0].authorization, `Basic ${btoa("ci:s3cret")}`);
});

test("RegistryClient reports rejected token requests", async () => {
  const auth = { type: "bearer" as const, username: "ci", password: "s3cret" };
  const { client, ref, tokenRequests } = bearerSetup(auth, {
    username: "ci",
    password: "wrong-one",
  });

  await assert.rejects(client.getManifest(ref), (error: unknown) => {
    assert.ok(error instanceof RegistryError);
    assert.equal(error.status, 401);
    assert.match(error.message, /token request rejected with status 401/);
    assert.match(error.message, /check the username and password/);
    assert.ok(!error.message.includes("wrong-one"));
    return true;
  });
  assert.equal(tokenRequests().length, 1);
});

test("RegistryClient exchanges identity tokens", async () => {
  const auth = { type: "bearer" as const, identityToken: "refresh-me" };
  const { client, ref, tokenRequests, registry } = bearerSetup(auth, {
    identityToken: "refresh-me",
  });

  await client.getManifest(ref);

  const [tokenRequest] = tokenRequests();
  assert.equal(tokenRequest.method, "POST");
  assert.equal(tokenRequest.path, "/token");
  assert.match(registry.log.at(-1)?.authorization ?? "", /^Bearer /);
});

test("RegistryClient skips unknown schemes", async () => {
  const fetchImpl: typeof fetch = () =>
    Promise.resolve(
      new Response(null, { status: 401, headers: { "www-authenticate": 'Custom realm="x"' } }),
    );
  const client = new RegistryClient({ fetch: fetchImpl });
  await assert.rejects(
    client.getManifest({ registry: "reg.example", repository: "app", tag: "1" }),
    /authentication required \(status 401\)/,
  );
});

test("environmentCredentials() needs both variables", async () => {
  assert.deepEqual(
    await environmentCredentials({ OCISTAGE_USERNAME: "u", OCISTAGE_PASSWORD: "p" })("any.example"),
    { username: "u", password: "p" },
  );
  assert.equal(await environmentCredentials({ OCISTAGE_USERNAME: "u" })("any.example"), undefined);
});

test("chainCredentials() takes the first answer", async () => {
  const none = () => Promise.resolve(undefined);
  const chained = chainCredentials(
    none,
    staticCredentials({ identityToken: "a" }),
    staticCredentials({ identityToken: "b" }),
  );
  assert.deepEqual(await chained("reg.example"), { identityToken: "a" });
});

/** Create a temporary directory with a docker config and fake credential helpers. */
function dockerConfigDir(
  config: unknown,
): { dir: string; env: Record<string, string | undefined>; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), "ocistage-auth-"));
  writeFileSync(
    join(dir, "config.json"),
    typeof config === "string" ? config : JSON.stringify(config),
  );

  const helper = (name: string, script: string) => {
    const path = join(dir, `docker-credential-${name}`);
    writeFileSync(path, `#!/bin/sh\n${script}\n`);
    chmodSync(path, 0o755);
  };
  helper(
    "fake",
    [
      "read -r server || true",
      'case "$server" in',
      '  helper.example) printf \'{"ServerURL":"helper.example","Username":"hu","Secret":"hs"}\' ;;',
      '  token.example) printf \'{"ServerURL":"token.example","Username":"<token>","Secret":"rt"}\' ;;',
      '  https://index.docker.io/v1/) printf \'{"Username":"hub","Secret":"hubpw"}\' ;;',
      '  *) echo "credentials not found in native keychain"; exit 1 ;;',
      "esac",
    ].join("\n"),
  );
  helper("broken", 'echo "keychain locked" >&2; exit 3');

  const env = { DOCKER_CONFIG: dir, PATH: `${dir}:${process.env.PATH ?? ""}`, HOME: dir };
  return { dir, env, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

test("dockerConfigCredentials() reads auths", async () => {
  const { env, cleanup } = dockerConfigDir({
    auths: {
      "https://index.docker.io/v1/": { auth: btoa("hubuser:hub:pw") },
      "reg.example:5000": { auth: btoa("alice:pw") },
      "https://ghcr.io": { identitytoken: "refresh" },
      "empty.example": {},
    },
  });
  try {
    const resolve = dockerConfigCredentials({ env });
    assert.deepEqual(await resolve("docker.io"), { username: "hubuser", password: "hub:pw" });
    assert.deepEqual(await resolve("reg.example:5000"), { username: "alice", password: "pw" });
    assert.deepEqual(await resolve("ghcr.io"), { identityToken: "refresh" });
    assert.equal(await resolve("empty.example"), undefined);
    assert.equal(await resolve("reg.example"), undefined);
  } finally {
    cleanup();
  }
});

test("dockerConfigCredentials() runs credential helpers", async () => {
  const { env, cleanup } = dockerConfigDir({
    credHelpers: {
      "helper.example": "fake",
      "token.example": "fake",
      "locked.example": "broken",
      "gone.example": "missing",
    },
    credsStore: "fake",
  });
  try {
    const resolve = dockerConfigCredentials({ env });
    assert.deepEqual(await resolve("helper.example"), { username: "hu", password: "hs" });
    assert.deepEqual(await resolve("token.example"), { identityToken: "rt" });
    assert.deepEqual(await resolve("docker.io"), { username: "hub", password: "hubpw" });
    assert.equal(await resolve("unknown.example"), undefined);
    await assert.rejects(
      resolve("locked.example"),
      /docker-credential-broken" failed for "locked.example" with exit code 3 \("keychain locked"\)/,
    );
    await assert.rejects(
      resolve("gone.example"),
      /docker-credential-missing" for "gone.example" could not run/,
    );
  } finally {
    cleanup();
  }
});

test("dockerConfigCredentials() handles missing and bad files", async () => {
  const missing = mkdtempSync(join(tmpdir(), "ocistage-auth-"));
  try {
    assert.equal(await dockerConfigCredentials({ configDir: missing })("docker.io"), undefined);
  } finally {
    rmSync(missing, { recursive: true, force: true });
  }

  const bad = dockerConfigDir("{ not json");
  try {
    await assert.rejects(dockerConfigCredentials({ env: bad.env })("docker.io"), SyntaxError);
  } finally {
    bad.cleanup();
  }

  const badAuth = dockerConfigDir({ auths: { "reg.example": { auth: btoa("no-colon") } } });
  try {
    await assert.rejects(
      dockerConfigCredentials({ env: badAuth.env })("reg.example"),
      /not "user:password"/,
    );
  } finally {
    badAuth.cleanup();
  }
});

test("parseWwwAuthenticate() keeps a __proto__ parameter", () => {
  const [challenge] = parseWwwAuthenticate('Bearer __proto__="x", realm="r"');
  assert.ok(Object.hasOwn(challenge.params, "__proto__"), "the __proto__ parameter was dropped");
  assert.equal(Object.getOwnPropertyDescriptor(challenge.params, "__proto__")?.value, "x");
  assert.equal(Object.getPrototypeOf(challenge.params), Object.prototype);
  assert.equal(challenge.params.realm, "r");
});

test("RegistryClient reports insufficient_scope", async () => {
  const auth: AuthMode = {
    type: "bearer",
    username: "ci",
    password: "s3cret",
    grantedRepositories: ["team/app"],
  };
  const { registry, client, ref, tokenRequests } = bearerSetup(auth, {
    username: "ci",
    password: "s3cret",
  });
  registry.pushImage("team/secret", "1.0", []);

  await client.getManifest(ref);
  await assert.rejects(
    client.getManifest({ ...ref, repository: "team/secret" }),
    (error: unknown) => {
      assert.ok(error instanceof RegistryError);
      assert.equal(error.status, 401);
      assert.match(error.message, /access denied \(insufficient_scope\)/);
      assert.match(error.message, /"team\/secret"/);
      assert.match(error.message, /that the account may pull "team\/secret"/);
      assert.doesNotMatch(error.message, /s3cret/);
      return true;
    },
  );

  // The second repository's token requests ask for its own scope only.
  const secretRequests = tokenRequests().slice(1).map((entry) => entry.path);
  assert.equal(secretRequests.length, 2, "one token before the request, one refresh after 401");
  for (const path of secretRequests) {
    assert.match(path, /scope=repository%3Ateam%2Fsecret%3Apull/);
    assert.doesNotMatch(path, /team%2Fapp/);
  }
  const challenges = registry.log.filter((entry) => entry.path.includes("team/secret"));
  assert.equal(challenges.length, 2, "the refreshed token is rejected too, then the client stops");
});

test("RegistryClient answers bearer after an unknown scheme", async () => {
  const seen: string[] = [];
  let tokenUrl: URL | undefined;
  const fetchImpl: typeof fetch = (input, init) => {
    const request = new Request(input, init);
    const url = new URL(request.url);
    seen.push(`${url.pathname} ${request.headers.get("authorization") ?? "-"}`);
    if (url.pathname === "/auth") {
      tokenUrl = url;
      return Promise.resolve(Response.json({ token: "t-9" }));
    }
    if (request.headers.get("authorization") === "Bearer t-9") {
      return Promise.resolve(Response.json({ name: "app", tags: ["1"] }));
    }
    const challenge = 'Custom realm="a, b", Bearer realm="https://reg.example/auth",' +
      'service="reg \\"main\\"",scope="repository:app:pull"';
    return Promise.resolve(
      new Response(null, { status: 401, headers: { "www-authenticate": challenge } }),
    );
  };
  const client = new RegistryClient({ fetch: fetchImpl });

  assert.deepEqual(await client.listTags({ registry: "reg.example", repository: "app" }), ["1"]);
  assert.deepEqual(seen, [
    "/v2/app/tags/list -",
    "/auth -",
    "/v2/app/tags/list Bearer t-9",
  ]);
  assert.equal(tokenUrl?.searchParams.get("service"), 'reg "main"');
  assert.deepEqual(tokenUrl?.searchParams.getAll("scope"), ["repository:app:pull"]);
});
