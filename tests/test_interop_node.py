"""Interoperability with Node.js ``jose`` (panva/jose v6), in both directions.

meshauth tokens are ordinary compact JWS and its registry an ordinary JWKS
(DESIGN sections 2 and 3), so a service written in Node verifies them with
``jose.jwtVerify`` and the registry document, read from memory
(``createLocalJWKSet``) or fetched from ``meshauth registry serve``
(``createRemoteJWKSet``), including the Redis registry's in-memory keys
(``registry --redis URL export`` and ``serve``); and a Node service that signs with ``jose.SignJWT``
and publishes its public JWK with its owner is verified by ``meshauth.Verifier``.

Node runs ``tests/node_interop.mjs`` once per test: JSON operations on stdin,
JSON results on stdout. jose is loaded from ``MESHAUTH_NODE_MODULES`` (a
node_modules directory), else ``.ci/node/node_modules`` (``.ci/run`` installs
it there). Without node or jose these tests skip; under
``MESHAUTH_REQUIRE_NODE=1`` (CI) they fail instead. The Redis case also needs
the shared Redis of tests/redis_support.py (``MESHAUTH_REQUIRE_REDIS=1`` likewise).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import meshauth
from meshauth import JWKSFile, KeyRecord, ServiceIdentity, SigningKey, StaticKeys, Verifier
from meshauth.cli import main as meshauth_cli
from tests.edge_mesh import stop_process

ALGS = pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).with_name("node_interop.mjs")
NODE_TIMEOUT = 60.0  # seconds for one node run; a few hundred milliseconds when things work
SERVE_TIMEOUT = 30.0  # seconds for `meshauth registry serve` to print its URL
SERVICE_CLAIMS = ["iss", "sub", "aud", "iat", "exp", "jti"]
NONCE = "n-0123456789abcdef"


# -- finding node and jose ----------------------------------------------------------------------


def missing(reason: str) -> None:
    """Fail under MESHAUTH_REQUIRE_NODE=1, else skip."""
    if os.environ.get("MESHAUTH_REQUIRE_NODE") == "1":
        pytest.fail(f"Node.js jose is required (MESHAUTH_REQUIRE_NODE=1): {reason}")
    pytest.skip(f"no Node.js jose: {reason}")


@dataclass(frozen=True)
class NodeJose:
    """The ``node`` command and the node_modules directory holding jose 6."""

    node: str
    modules: Path
    version: str

    def run(self, *ops: dict[str, Any]) -> list[dict[str, Any]]:
        """Run ``ops`` in one node process; one result per op."""
        completed = subprocess.run(
            [self.node, str(SCRIPT), str(self.modules)],
            input=json.dumps({"ops": list(ops)}),
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
            check=False,
        )
        assert completed.returncode == 0, f"node exited with {completed.returncode}: {completed.stderr}"
        answer = json.loads(completed.stdout)
        assert answer["jose"] == self.version
        results: list[dict[str, Any]] = answer["results"]
        assert len(results) == len(ops)
        return results


@pytest.fixture(scope="module")
def node() -> NodeJose:
    command = shutil.which("node")
    if command is None:
        missing("the `node` command is not on PATH (install Node.js 20 or later)")
    assert command is not None
    modules = Path(os.environ.get("MESHAUTH_NODE_MODULES") or REPO / ".ci" / "node" / "node_modules")
    package = modules / "jose" / "package.json"
    if not package.is_file():
        missing(
            f"jose is not installed in {modules} (npm install --prefix .ci/node --no-audit --no-fund jose@6, "
            "or point MESHAUTH_NODE_MODULES at a node_modules directory holding it)"
        )
    version = str(json.loads(package.read_text("utf-8")).get("version", "?"))
    if not version.startswith("6."):
        missing(f"jose 6 is required, found jose {version} in {modules}")
    return NodeJose(command, modules, version)


# -- keys, registry and the operations node runs -------------------------------------------------


@dataclass(frozen=True)
class MeshKeys:
    """One algorithm's keys: a caller, a Txn-Token issuer and a callee."""

    orders: SigningKey
    gateway: SigningKey
    payments: SigningKey

    def owned(self) -> list[tuple[SigningKey, str]]:
        return [(self.orders, "orders"), (self.gateway, "gateway"), (self.payments, "payments")]


@pytest.fixture(scope="module")
def keys() -> dict[str, MeshKeys]:
    """Keys for both algorithms, generated once for the module."""
    return {alg: MeshKeys(*(SigningKey.generate(alg) for _ in range(3))) for alg in ("ES256", "EdDSA")}


@pytest.fixture(scope="module")
def registry(keys: dict[str, MeshKeys]) -> dict[str, Any]:
    """The registry document meshauth produces for every key, with validity windows (DESIGN section 3)."""
    now = int(time.time())
    entries = [
        key.public_jwk(iss=owner, nbf=now - 60, exp=now + 3600) for mesh in keys.values() for key, owner in mesh.owned()
    ]
    document = StaticKeys.from_jwks({"keys": entries}).to_jwks()
    assert all({"iss", "nbf", "exp", "use", "alg", "kid"} <= set(entry) for entry in document["keys"])
    return document


def _read_line(process: subprocess.Popen[str], deadline: float) -> str:
    """One line of ``process``'s stdout, or an assertion error once ``deadline`` passes."""
    assert process.stdout is not None
    remaining = deadline - time.monotonic()
    readable, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
    assert readable, "meshauth registry serve printed nothing"
    return process.stdout.readline()


@contextlib.contextmanager
def serving(*arguments: str) -> Iterator[str]:
    """``meshauth registry ARGUMENTS`` (a ``serve``) in its own process on 127.0.0.1; yields the URL."""
    command = [sys.executable, "-m", "meshauth", "registry", *arguments, "--port", "0"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        line = _read_line(process, time.monotonic() + SERVE_TIMEOUT)
        assert line.startswith("serving ") and " at http://127.0.0.1:" in line, line
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def served_registry(registry: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``meshauth registry serve`` in its own process on 127.0.0.1, serving the registry file; yields the URL."""
    path = tmp_path_factory.mktemp("node") / "registry.json"
    path.write_text(json.dumps(registry), "utf-8")
    with serving("serve", str(path), "--max-age", "60") as url:
        yield url


def payload_of(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def verify_op(
    token: str, source: dict[str, Any], *, issuer: str, audience: str, typ: str, alg: str, owner_check: bool = True
) -> dict[str, Any]:
    """A jose.jwtVerify run; ``source`` is ``{"jwks": doc}`` or ``{"jwks_url": url}``.

    ``owner_check``: the script also checks that ``iss`` is the registry owner of ``kid``, which
    jose cannot know (see test_jose_alone_does_not_bind_the_issuer_to_the_key_owner).
    """
    required = {"meshauth+jwt": SERVICE_CLAIMS, "txntoken+jwt": ["iss", "aud", "iat", "exp", "txn", "sub"]}
    required["meshauth-response+jwt"] = [*SERVICE_CLAIMS, "nonce", "status"]
    return {
        "op": "verify",
        "token": token,
        **source,
        "issuer": issuer,
        "audience": audience,
        "typ": typ,
        "algorithms": [alg],
        "required": required[typ],
        "owner_check": owner_check,
    }


@dataclass(frozen=True)
class MeshTokens:
    """A service token bound to a Txn-Token, the Txn-Token, and the callee's response token."""

    service: str
    txn: str
    response: str


def mint_all(mesh: MeshKeys) -> MeshTokens:
    txn = ServiceIdentity("gateway", mesh.gateway).issue_txn_token("alice", scope="charges:write")
    service = ServiceIdentity("orders", mesh.orders).mint("payments", scope="charges:write", txn_token=txn)
    response = ServiceIdentity("payments", mesh.payments).mint_response("orders", NONCE, status=201, body=b"{}")
    return MeshTokens(service, txn, response)


def verify_all(tokens: MeshTokens, source: dict[str, Any], alg: str) -> list[dict[str, Any]]:
    """The three ops that verify each kind of token as the receiving side would."""
    return [
        verify_op(tokens.service, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg),
        verify_op(tokens.txn, source, issuer="gateway", audience="meshauth", typ="txntoken+jwt", alg=alg),
        verify_op(tokens.response, source, issuer="payments", audience="orders", typ="meshauth-response+jwt", alg=alg),
    ]


def assert_accepted(result: dict[str, Any], token: str, key: SigningKey, typ: str) -> None:
    """jose accepted ``token``: the header meshauth minted, nothing else, and every claim."""
    assert result["ok"], result
    assert result["header"] == {"alg": key.alg, "kid": key.kid, "typ": typ}
    assert result["payload"] == payload_of(token)


def refusal(result: dict[str, Any]) -> tuple[str, str | None]:
    """jose's error code and, for a claim check, the claim."""
    assert not result["ok"], result
    error: dict[str, Any] = result["error"]
    return error["code"], error["claim"]


# -- meshauth -> jose -----------------------------------------------------------------------------


@ALGS
def test_meshauth_tokens_verify_with_jose_against_the_registry_document(
    node: NodeJose, keys: dict[str, MeshKeys], registry: dict[str, Any], alg: str
) -> None:
    mesh = keys[alg]
    tokens = mint_all(mesh)
    source = {"jwks": registry}
    service, txn, response, *crossed = node.run(
        *verify_all(tokens, source, alg),
        # jose checks typ too: no kind of meshauth token passes as another.
        verify_op(tokens.service, source, issuer="orders", audience="payments", typ="txntoken+jwt", alg=alg),
        verify_op(tokens.response, source, issuer="payments", audience="orders", typ="meshauth+jwt", alg=alg),
        verify_op(tokens.txn, source, issuer="gateway", audience="meshauth", typ="meshauth+jwt", alg=alg),
    )
    assert_accepted(service, tokens.service, mesh.orders, "meshauth+jwt")
    assert service["payload"]["scope"] == "charges:write"
    assert service["payload"]["tth"] == b64url(hashlib.sha256(tokens.txn.encode()).digest())
    assert_accepted(txn, tokens.txn, mesh.gateway, "txntoken+jwt")
    assert txn["payload"]["sub"] == "alice"
    assert_accepted(response, tokens.response, mesh.payments, "meshauth-response+jwt")
    assert (response["payload"]["nonce"], response["payload"]["status"]) == (NONCE, 201)
    assert [refusal(result) for result in crossed] == [("ERR_JWT_CLAIM_VALIDATION_FAILED", "typ")] * 3


@ALGS
def test_meshauth_tokens_verify_with_jose_against_the_served_registry(
    node: NodeJose, keys: dict[str, MeshKeys], registry: dict[str, Any], served_registry: str, alg: str
) -> None:
    served = httpx.get(served_registry, timeout=10)
    assert served.headers["content-type"] == "application/jwk-set+json"
    assert served.json() == registry  # the document meshauth produced, byte for byte in content
    mesh = keys[alg]
    tokens = mint_all(mesh)
    outsider = ServiceIdentity("orders", SigningKey.generate(alg)).mint("payments")  # its key is not registered
    source = {"jwks_url": served_registry}
    *accepted, unknown = node.run(
        *verify_all(tokens, source, alg),
        verify_op(outsider, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg),
    )
    for result, token, key, typ in zip(
        accepted,
        (tokens.service, tokens.txn, tokens.response),
        (mesh.orders, mesh.gateway, mesh.payments),
        ("meshauth+jwt", "txntoken+jwt", "meshauth-response+jwt"),
        strict=True,
    ):
        assert_accepted(result, token, key, typ)
    assert refusal(unknown) == ("ERR_JWKS_NO_MATCHING_KEY", None)


@ALGS
def test_ephemeral_keys_on_redis_verify_with_jose_through_export_and_serve(
    node: NodeJose, redis_namespace: tuple[str, str], alg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica's in-memory key, published on Redis, as a Node verifier sees it (DESIGN section 10)."""
    from meshauth.redis import RedisPublisher

    url, namespace = redis_namespace
    publisher = RedisPublisher(url, namespace)
    me = ServiceIdentity.ephemeral("orders", publisher, alg=alg, background=False)
    token = me.mint("payments", scope="charges:write")

    def op(source: dict[str, Any]) -> dict[str, Any]:
        return verify_op(token, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg)

    try:
        assert meshauth_cli(["registry", "--redis", url, "--namespace", namespace, "export"]) == 0
        exported = json.loads(capsys.readouterr().out)
        assert [(entry["kid"], entry["iss"]) for entry in exported["keys"]] == [(me.key.kid, "orders")]
        with serving("--redis", url, "--namespace", namespace, "serve") as served:
            response = httpx.get(served, timeout=10)
            assert response.headers["cache-control"] == "public, max-age=30"  # the Redis registry's default
            assert response.json() == exported
            from_export, from_serve = node.run(op({"jwks": exported}), op({"jwks_url": served}))
            assert_accepted(from_export, token, me.key, "meshauth+jwt")
            assert_accepted(from_serve, token, me.key, "meshauth+jwt")
            assert publisher.revoke(me.key.kid) == ["orders"]
            deadline = time.monotonic() + 10
            while httpx.get(served, timeout=10).json()["keys"]:  # the server follows the registry
                assert time.monotonic() < deadline, "the served registry still holds the revoked key"
                time.sleep(0.05)
            (revoked,) = node.run(op({"jwks_url": served}))  # a jose key set fetched anew
            assert refusal(revoked) == ("ERR_JWKS_NO_MATCHING_KEY", None)
    finally:
        me.close()


@ALGS
def test_jose_refuses_an_altered_token_and_another_audience(
    node: NodeJose, keys: dict[str, MeshKeys], registry: dict[str, Any], alg: str
) -> None:
    mesh = keys[alg]
    token = ServiceIdentity("orders", mesh.orders).mint("payments", scope="charges:read")
    header, _, signature = token.split(".")
    altered_claims = {**payload_of(token), "scope": "charges:read charges:write"}
    altered = f"{header}.{b64url(json.dumps(altered_claims, separators=(',', ':')).encode())}.{signature}"
    source = {"jwks": registry}
    forged, elsewhere, impostor = node.run(
        verify_op(altered, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg),
        verify_op(token, source, issuer="orders", audience="billing", typ="meshauth+jwt", alg=alg),
        verify_op(token, source, issuer="gateway", audience="payments", typ="meshauth+jwt", alg=alg),
    )
    assert refusal(forged) == ("ERR_JWS_SIGNATURE_VERIFICATION_FAILED", None)
    assert refusal(elsewhere) == ("ERR_JWT_CLAIM_VALIDATION_FAILED", "aud")
    assert refusal(impostor) == ("ERR_JWT_CLAIM_VALIDATION_FAILED", "iss")
    # meshauth reaches the same verdicts.
    keyset = StaticKeys.from_jwks(registry)
    with pytest.raises(meshauth.BadSignature):
        Verifier("payments", keyset).verify(altered)
    with pytest.raises(meshauth.WrongAudience):
        Verifier("billing", keyset).verify(token)


@ALGS
def test_jose_alone_does_not_bind_the_issuer_to_the_key_owner(
    node: NodeJose, keys: dict[str, MeshKeys], registry: dict[str, Any], alg: str
) -> None:
    """A documented difference: jose knows nothing of the registry's ``iss`` member.

    Payments signs a token claiming to come from orders with its own registered
    key. jose checks ``issuer`` against the token's own claim, so it accepts;
    the Node verifier must also compare ``iss`` with the owner of ``kid`` in the
    key set's document (``keys.jwks()``), as meshauth does (``issuer_mismatch``).
    """
    impostor = ServiceIdentity("orders", keys[alg].payments).mint("payments")
    source = {"jwks": registry}
    plain, checked = node.run(
        verify_op(
            impostor, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg, owner_check=False
        ),
        verify_op(impostor, source, issuer="orders", audience="payments", typ="meshauth+jwt", alg=alg),
    )
    assert plain["ok"] and plain["payload"]["iss"] == "orders"
    assert refusal(checked) == ("issuer_mismatch", None)
    with pytest.raises(meshauth.IssuerMismatch):
        Verifier("payments", StaticKeys.from_jwks(registry)).verify(impostor)


# -- jose -> meshauth -----------------------------------------------------------------------------


def register(jwk: dict[str, Any], owner: str, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Add a Node service's public JWK to a registry file with ``meshauth registry add``, as an operator would."""
    jwk_file = path.with_name(f"{owner}.jwk.json")
    jwk_file.write_text(json.dumps({**jwk, "iss": owner}), "utf-8")
    code = meshauth_cli(["registry", "add", str(path), str(jwk_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"added {jwk['kid']} ({owner}, {jwk['alg']}, valid)")


@ALGS
def test_node_signed_service_tokens_verify_with_meshauth(
    node: NodeJose, alg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"iss": "orders", "aud": "payments", "scope": "charges:read charges:write"}
    (signed,) = node.run({"op": "sign", "alg": alg, "tokens": [spec, {**spec, "ttl": "2m"}]})
    assert signed["ok"], signed
    jwk = signed["jwk"]
    assert set(jwk) == ({"kty", "crv", "x", "y"} if alg == "ES256" else {"kty", "crv", "x"}) | {"kid", "alg", "use"}
    registry = tmp_path / "registry.json"
    register(jwk, "orders", registry, capsys)
    record = StaticKeys.from_jwks(json.loads(registry.read_text("utf-8"))).get_key(jwk["kid"])
    assert record is not None
    assert isinstance(record.public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    # jose's calculateJwkThumbprint and meshauth agree on the key id (RFC 7638).
    assert KeyRecord.from_public_key(record.public_key, "orders").kid == jwk["kid"]

    verifier = Verifier("payments", JWKSFile(registry))
    for token in signed["tokens"]:
        principal = verifier.verify(token)
        assert (principal.caller, principal.subject, principal.transaction) == ("orders", "orders", None)
        assert (principal.alg, principal.kid) == (alg, jwk["kid"])
        assert principal.scopes == {"charges:read", "charges:write"}
        assert dict(principal.claims) == payload_of(token)


@ALGS
def test_node_signed_tokens_with_typ_jwt_or_a_wrong_kid_are_refused(
    node: NodeJose, keys: dict[str, MeshKeys], alg: str
) -> None:
    billing = keys[alg].payments  # a registered key of the same algorithm, owned by another service
    base = {"iss": "orders", "aud": "payments"}
    specs: list[tuple[dict[str, Any], type[meshauth.TokenError] | None]] = [
        (base, None),  # the same key and claims with typ and kid right: accepted
        ({**base, "typ": "JWT"}, meshauth.WrongTokenType),
        ({**base, "typ": None}, meshauth.WrongTokenType),  # no typ at all
        ({**base, "kid": "not-a-registered-kid"}, meshauth.UnknownKey),
        ({**base, "kid": billing.kid}, meshauth.BadSignature),  # another key's kid
        ({**base, "iss": "payments", "sub": "payments"}, meshauth.IssuerMismatch),  # not the key's owner
    ]
    (signed,) = node.run({"op": "sign", "alg": alg, "tokens": [spec for spec, _ in specs]})
    assert signed["ok"], signed
    keyset = StaticKeys.from_jwks({"keys": [{**signed["jwk"], "iss": "orders"}, billing.public_jwk(iss="billing")]})
    verifier = Verifier("payments", keyset)
    for token, (_, error) in zip(signed["tokens"], specs, strict=True):
        if error is None:
            assert verifier.verify(token).caller == "orders"
            continue
        with pytest.raises(error) as info:
            verifier.verify(token)
        assert info.value.reason == error.reason
