// meshauth interoperability with Node.js `jose` (panva/jose v6), driven by tests/test_interop_node.py.
//
//   node tests/node_interop.mjs NODE_MODULES < request.json > answer.json
//
// NODE_MODULES is the node_modules directory holding jose. The request is one JSON object
// {"ops": [op, ...]}; the answer is {"jose": version, "results": [result, ...]}, one result per op:
//
//   {"op": "verify", "token", "jwks": {...} | "jwks_url": "http://127.0.0.1:...", "issuer", "audience",
//    "typ", "algorithms", "required": [claim, ...], "owner_check": bool}
//     -> {"ok": true, "header": {...}, "payload": {...}} or {"ok": false, "error": {name, code, claim}}
//     jose.jwtVerify checks the signature, typ, alg, iss, aud, times and required claims. Remote key
//     sets are created once per URL and shared
//     by the ops of one request, as an application would keep one createRemoteJWKSet. With
//     owner_check, the token's iss must also be the registry owner (`iss` member) of its kid.
//
//   {"op": "sign", "alg": "ES256" | "EdDSA", "tokens": [{"typ", "kid", "iss", "sub", "aud", "scope", "ttl"}]}
//     -> {"ok": true, "jwk": {public JWK, kid, alg, use}, "tokens": [compact JWS, ...]}
//     One new key pair per op; kid is its RFC 7638 thumbprint unless a token spec names another
//     kid; a spec's typ null leaves typ out of the header. The private key never leaves Node.
//
// An op that throws answers {"ok": false, "error": ...}; a broken request exits 2 with one line on
// stderr. Only plain http to 127.0.0.1 is fetched. No token or key material is written to stderr.

import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { readFileSync } from 'node:fs';

const nodeModules = process.argv[2];
if (!nodeModules) {
  process.stderr.write('usage: node node_interop.mjs NODE_MODULES < request.json\n');
  process.exit(2);
}
// Resolve jose from the given node_modules (the "default" export condition: its ESM build).
const require = createRequire(join(resolve(nodeModules), 'resolve-from-here.js'));
const josePath = require.resolve('jose');
const jose = await import(pathToFileURL(josePath).href);
const joseVersion = JSON.parse(readFileSync(join(nodeModules, 'jose', 'package.json'), 'utf8')).version;

const remoteSets = new Map();

function remoteSet(url) {
  const parsed = new URL(url);
  if (parsed.protocol !== 'http:' || parsed.hostname !== '127.0.0.1') {
    throw new Error('only http://127.0.0.1 key sets are fetched by this script');
  }
  if (!remoteSets.has(url)) {
    remoteSets.set(url, jose.createRemoteJWKSet(parsed, { timeoutDuration: 5000 }));
  }
  return remoteSets.get(url);
}

async function verify(op) {
  const keys = op.jwks_url ? remoteSet(op.jwks_url) : jose.createLocalJWKSet(op.jwks);
  const { payload, protectedHeader } = await jose.jwtVerify(op.token, keys, {
    issuer: op.issuer,
    audience: op.audience,
    typ: op.typ,
    algorithms: op.algorithms,
    requiredClaims: op.required ?? [],
  });
  if (op.owner_check) {
    // jose does not know the registry's `iss` member (the key's owner): the application checks it,
    // on the document the key set verified with. A kid gone from it meanwhile is refused too.
    const entry = keys.jwks()?.keys.find((jwk) => jwk.kid === protectedHeader.kid);
    if (entry?.iss === undefined || entry.iss !== payload.iss) {
      throw Object.assign(new Error('iss is not the owner of kid'), { name: 'IssuerMismatch', code: 'issuer_mismatch' });
    }
  }
  return { header: protectedHeader, payload };
}

function randomJti() {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString('base64url');
}

async function sign(op) {
  const { publicKey, privateKey } = await jose.generateKeyPair(op.alg, { extractable: true });
  const exported = await jose.exportJWK(publicKey);
  const kid = await jose.calculateJwkThumbprint(exported, 'sha256');
  const jwk = { ...exported, kid, alg: op.alg, use: 'sig' };
  const tokens = [];
  for (const spec of op.tokens) {
    const header = { alg: op.alg, kid: spec.kid ?? kid };
    if (spec.typ !== null) header.typ = spec.typ ?? 'meshauth+jwt';
    const claims = spec.scope === undefined ? {} : { scope: spec.scope };
    tokens.push(
      await new jose.SignJWT(claims)
        .setProtectedHeader(header)
        .setIssuer(spec.iss)
        .setSubject(spec.sub ?? spec.iss)
        .setAudience(spec.aud)
        .setIssuedAt()
        .setExpirationTime(spec.ttl ?? '5m')
        .setJti(randomJti())
        .sign(privateKey),
    );
  }
  return { jwk, tokens };
}

const OPS = { verify, sign };

async function run(op) {
  const handler = OPS[op.op];
  if (!handler) return { ok: false, error: { name: 'UnknownOp', code: null, claim: null } };
  try {
    return { ok: true, ...(await handler(op)) };
  } catch (error) {
    return { ok: false, error: { name: error.name, code: error.code ?? null, claim: error.claim ?? null } };
  }
}

let request;
try {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  request = JSON.parse(Buffer.concat(chunks).toString('utf8'));
} catch {
  process.stderr.write('node_interop: the request on stdin is not JSON\n');  // no excerpt: it holds tokens
  process.exit(2);
}
const results = [];
for (const op of request.ops) results.push(await run(op)); // in order: later ops may rely on a warm key set
process.stdout.write(JSON.stringify({ jose: joseVersion, results }) + '\n');
