"""Transaction Tokens (DESIGN section 9): issuing, verifying, binding (tth), caching, interoperability."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from typing import Any

import jwt
import pytest

import meshauth
from meshauth.testing import FakeClock, Mesh


@pytest.fixture
def txn_mesh(clock: FakeClock) -> Mesh:
    return Mesh(["gateway", "orders", "payments", "billing"], clock=clock)


def _issue(mesh: Mesh, issuer: str = "gateway", **kwargs: Any) -> str:
    return mesh.identity(issuer).issue_txn_token("alice", scope="orders:read", **kwargs)


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")

    def part(segment: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))  # type: ignore[no-any-return]

    return part(header), part(payload)


def _reason(verify: Any, *args: Any) -> str:
    error: meshauth.TokenError | None = None
    try:
        verify(*args)
    except meshauth.TokenError as exc:
        error = exc
    if error is None:
        return "accepted"
    for arg in args:
        if isinstance(arg, str):
            assert arg not in str(error) and arg.rsplit(".", 1)[-1] not in str(error)
    return error.reason


def test_issue_txn_token_has_the_profile_header_and_claims(txn_mesh: Mesh, clock: FakeClock) -> None:
    token = _issue(txn_mesh, context={"groups": ["staff"]}, request_context={"req_ip": "192.0.2.1"}, ttl=120)
    header, claims = _decode(token)
    assert header == {"alg": "ES256", "kid": txn_mesh.signing_keys["gateway"].kid, "typ": "txntoken+jwt"}
    assert claims["iss"] == "gateway" and claims["aud"] == "meshauth" and claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 120 and claims["iat"] == int(clock())
    assert claims["scope"] == "orders:read" and claims["req_wl"] == "gateway"
    assert claims["tctx"] == {"groups": ["staff"]} and claims["rctx"] == {"req_ip": "192.0.2.1"}
    assert len(base64.urlsafe_b64decode(claims["txn"] + "==")) >= 16  # >= 128 random bits
    assert claims["txn"] != _decode(_issue(txn_mesh))[1]["txn"]
    with pytest.raises(ValueError, match="lives"):
        txn_mesh.identity("gateway").issue_txn_token("alice", ttl=301)
    with pytest.raises(ValueError, match="subject"):
        txn_mesh.identity("gateway").issue_txn_token("")


def test_token_for_binds_and_caches_per_txn_token(txn_mesh: Mesh) -> None:
    orders = txn_mesh.identity("orders")
    first, second = _issue(txn_mesh), _issue(txn_mesh)
    bound = orders.token_for("payments", txn_token=first)
    expected = base64.urlsafe_b64encode(hashlib.sha256(first.encode("ascii")).digest()).rstrip(b"=").decode()
    assert _decode(bound)[1]["tth"] == expected
    assert orders.token_for("payments", txn_token=first) == bound
    assert orders.token_for("payments", txn_token=second) != bound
    assert orders.token_for("payments", scope="x", txn_token=first) != bound
    assert "tth" not in _decode(orders.token_for("payments"))[1]


def test_verify_inside_a_transaction(txn_mesh: Mesh, telemetry: Any, audit_log: Any) -> None:
    txn = _issue(txn_mesh, context={"groups": ["staff"], "idp": "https://idp"})
    verifier = txn_mesh.verifier(
        "payments", tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )
    principal = verifier.verify(txn_mesh.identity("orders").token_for("payments", txn_token=txn), txn)
    assert (principal.caller, principal.subject, principal.txn_issuer) == ("orders", "alice", "gateway")
    assert principal.transaction == _decode(txn)[1]["txn"] and principal.delegated
    assert principal.context == {"groups": ("staff",), "idp": "https://idp"}
    assert principal.scopes == frozenset({"orders:read"}) and principal.txn_token == txn
    assert txn not in repr(principal)
    (span,) = telemetry.spans("meshauth.verify")
    assert span.attributes["meshauth.transaction"] == principal.transaction
    assert span.attributes["meshauth.txn_issuer"] == "gateway"
    (record,) = audit_log.fields()
    assert (record["transaction"], record["txn_issuer"], record["subject"]) == (
        principal.transaction,
        "gateway",
        "alice",
    )
    assert txn not in json.dumps(record)
    plain = verifier.verify(txn_mesh.identity("orders").token_for("payments"))
    assert (plain.subject, plain.transaction, plain.txn_token, plain.context) == ("orders", None, None, {})


def test_bad_txn_tokens_each_get_their_reason(txn_mesh: Mesh, clock: FakeClock) -> None:
    verifier = txn_mesh.verifier("payments")
    orders = txn_mesh.identity("orders")

    def hop(txn: str | None, *, bind: str | None = None) -> str:
        token = orders.mint("payments", txn_token=bind if bind is not None else txn)
        return _reason(verifier.verify, token, txn)

    good = _issue(txn_mesh)
    assert hop(good) == "accepted"
    assert hop(_issue(txn_mesh, issuer="billing")) == "untrusted_txn_issuer"
    assert hop(_issue(txn_mesh, trust_domain="elsewhere")) == "wrong_audience"
    assert hop(txn_mesh.identity("gateway").issue_txn_token("alice", ttl=5)) == "accepted"
    expired = txn_mesh.identity("gateway").issue_txn_token("alice", ttl=10)
    clock.advance(60)
    assert hop(expired) == "expired"
    long_lived = meshauth.ServiceIdentity("gateway", txn_mesh.signing_keys["gateway"], clock=clock)
    strict = meshauth.Verifier("payments", txn_mesh.keys, clock=clock, max_txn_lifetime=60)
    long_txn = long_lived.issue_txn_token("alice", ttl=120)
    assert _reason(strict.verify, orders.mint("payments", txn_token=long_txn), long_txn) == "lifetime_too_long"
    # tth: missing, wrong, and a bound service token whose Txn-Token did not come.
    txn = _issue(txn_mesh)
    assert _reason(verifier.verify, orders.mint("payments"), txn) == "txn_mismatch"
    assert hop(txn, bind=_issue(txn_mesh)) == "txn_mismatch"
    assert _reason(verifier.verify, orders.mint("payments", txn_token=txn), None) == "missing_txn_token"
    # Kinds never cross: a Txn-Token as the service token, a service token as the Txn-Token.
    assert _reason(verifier.verify, txn) == "wrong_type"
    service = orders.mint("payments")
    assert _reason(verifier.verify, orders.mint("payments", txn_token=service), service) == "wrong_type"
    # A Txn-Token whose iss is not the owner of its key.
    key = txn_mesh.signing_keys["billing"]
    header = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "kid": key.kid, "typ": "txntoken+jwt"}).encode())
    now = int(clock())
    body = {"iss": "gateway", "aud": "meshauth", "iat": now, "exp": now + 60, "txn": "t" * 22, "sub": "ceo"}
    payload = base64.urlsafe_b64encode(json.dumps(body).encode())
    signing_input = (header.rstrip(b"=") + b"." + payload.rstrip(b"=")).decode()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(key.sign(signing_input.encode())).rstrip(b'=').decode()}"
    assert hop(forged) == "issuer_mismatch"
    assert _reason(verifier.verify, orders.mint("payments", txn_token=good), 42) == "malformed"


def test_the_second_hop_reuses_the_txn_token_verification(txn_mesh: Mesh) -> None:
    verifier = txn_mesh.verifier("payments")
    txn = _issue(txn_mesh)
    calls = []
    original = txn_mesh.keys.get_key

    def counting(kid: str) -> Any:
        calls.append(kid)
        return original(kid)

    txn_mesh.keys.get_key = counting  # type: ignore[method-assign]
    first = verifier.verify(txn_mesh.identity("orders").mint("payments", txn_token=txn), txn)
    looked_up = len(calls)
    second = verifier.verify(txn_mesh.identity("billing").mint("payments", txn_token=txn), txn)
    # The new service token needs its key; the Txn-Token's verification comes from the cache (one validity check).
    assert looked_up == 2 and len(calls) == 4 and calls[2] != calls[3]
    assert first.transaction == second.transaction and second.caller == "billing"


def test_many_threads_and_tasks_on_one_transaction(txn_mesh: Mesh) -> None:
    verifier = txn_mesh.verifier("payments")
    orders = txn_mesh.identity("orders")
    txns = [_issue(txn_mesh) for _ in range(4)]
    results: list[tuple[str | None, str | None]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        txn = txns[index % 4]
        principal = verifier.verify(orders.token_for("payments", txn_token=txn), txn)
        with lock:
            results.append((principal.transaction, _decode(txn)[1]["txn"]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def one(txn: str) -> meshauth.Principal:
        return await verifier.averify(await orders.atoken_for("payments", txn_token=txn), txn)

    async def tasks() -> list[meshauth.Principal]:
        return await asyncio.gather(*(one(t) for t in txns * 8))

    assert len(results) == 32 and all(got == want for got, want in results)
    assert [p.transaction for p in asyncio.run(tasks())] == [_decode(t)[1]["txn"] for t in txns * 8]
    assert len({orders.token_for("payments", txn_token=t) for t in txns}) == 4


def test_pyjwt_verifies_a_meshauth_txn_token_with_the_registry_jwks(txn_mesh: Mesh) -> None:
    gateway = meshauth.ServiceIdentity("gateway", txn_mesh.signing_keys["gateway"], clock=time.time)
    token = gateway.issue_txn_token("alice", scope="orders:read", context={"groups": ["staff"]})
    jwks = jwt.PyJWKSet.from_dict(txn_mesh.keys.to_jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, jwks[kid].key, algorithms=["ES256"], audience="meshauth", issuer="gateway")
    assert claims["sub"] == "alice" and claims["tctx"] == {"groups": ["staff"]}
    assert jwt.get_unverified_header(token)["typ"] == "txntoken+jwt"


def test_issuing_is_traced_as_meshauth_txn_issue(txn_mesh: Mesh, telemetry: Any) -> None:
    gateway = meshauth.ServiceIdentity(
        "gateway", txn_mesh.signing_keys["gateway"], clock=txn_mesh.clock, tracer_provider=telemetry.tracer_provider
    )
    token = gateway.issue_txn_token("alice", txn="my-transaction-id-0001")
    (span,) = telemetry.spans("meshauth.txn.issue")
    attributes = dict(span.attributes)
    assert attributes["meshauth.txn_issuer"] == "gateway" and attributes["meshauth.subject"] == "alice"
    assert attributes["meshauth.transaction"] == "my-transaction-id-0001" == _decode(token)[1]["txn"]
    assert attributes["meshauth.audience"] == "meshauth"
    assert token not in json.dumps(attributes) and token.rsplit(".", 1)[1] not in json.dumps(attributes)


def test_a_txn_token_as_bytes_is_read_as_ascii(txn_mesh: Mesh) -> None:
    txn = _issue(txn_mesh)
    verifier = txn_mesh.verifier("payments")
    principal = verifier.verify(txn_mesh.identity("orders").mint("payments", txn_token=txn), txn.encode("ascii"))  # type: ignore[arg-type]
    assert principal.txn_token == txn and type(principal.txn_token) is str
    bound = txn_mesh.identity("orders").mint("payments", txn_token=txn)
    assert _reason(verifier.verify, bound, "é".encode() + txn.encode()) == "malformed"
