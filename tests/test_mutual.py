"""Response tokens: proving which service answered (the verifier side)."""

from __future__ import annotations

import asyncio
import json

import pytest

import meshauth
from meshauth import ResponseAuthError
from meshauth._jws import b64url_decode, b64url_encode, dumps
from meshauth._mutual import ResponseVerifier, new_nonce
from meshauth.testing import FakeClock, Mesh


@pytest.fixture
def checker(mesh: Mesh) -> ResponseVerifier:
    return ResponseVerifier("orders", mesh.keys, clock=mesh.clock)


def test_valid_response(mesh: Mesh, checker: ResponseVerifier) -> None:
    nonce = new_nonce()
    token = mesh.identity("payments").mint_response("orders", nonce)
    principal = checker.verify_response(token, service="payments", nonce=nonce)
    assert principal.caller == "payments" and principal.audience == "orders"
    again = mesh.identity("payments").mint_response("orders", nonce)
    assert asyncio.run(checker.averify_response(again, service="payments", nonce=nonce)).caller == "payments"


def test_nonces_are_random_and_long_enough() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(n) >= 22 for n in nonces)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "missing_response"),
        ("other_nonce", "nonce_mismatch"),
        ("impostor", "wrong_responder"),
        ("other_caller", "wrong_audience"),
        ("service_token", "wrong_type"),
        ("tampered", "bad_signature"),
        ("expired", "expired"),
    ],
)
def test_rejected_responses(mesh: Mesh, clock: FakeClock, checker: ResponseVerifier, case: str, reason: str) -> None:
    nonce = new_nonce()
    payments = mesh.identity("payments")
    token: str | None = {
        "missing": None,
        "other_nonce": payments.mint_response("orders", new_nonce()),
        "impostor": mesh.identity("billing").mint_response("orders", nonce),
        "other_caller": payments.mint_response("gateway", nonce),
        "service_token": payments.mint("orders"),
        "tampered": payments.mint_response("orders", nonce)[:-2] + "AA",
        "expired": payments.mint_response("orders", nonce, ttl=10),
    }[case]
    if case == "expired":
        clock.advance(10 + 31)
    with pytest.raises(meshauth.ResponseAuthError) as info:
        checker.verify_response(token, service="payments", nonce=nonce)
    assert info.value.reason == reason
    assert isinstance(info.value, meshauth.MeshAuthError)
    if token:
        assert token not in str(info.value)


def test_response_token_is_not_a_service_token(mesh: Mesh) -> None:
    response = mesh.identity("payments").mint_response("orders", new_nonce())
    with pytest.raises(meshauth.WrongTokenType):
        mesh.verifier("orders").verify(response)


def test_plain_verify_of_a_response_token_is_refused(mesh: Mesh, checker: ResponseVerifier) -> None:
    response = mesh.identity("payments").mint_response("orders", "n")
    with pytest.raises(meshauth.InvalidClaim, match="verify_response"):
        checker.verify(response)


def test_response_span_name(mesh: Mesh, telemetry) -> None:  # type: ignore[no-untyped-def]
    checker = ResponseVerifier("orders", mesh.keys, clock=mesh.clock, tracer_provider=telemetry.tracer_provider)
    nonce = new_nonce()
    checker.verify_response(mesh.identity("payments").mint_response("orders", nonce), service="payments", nonce=nonce)
    (span,) = telemetry.spans("meshauth.response.verify")
    assert span.attributes["meshauth.outcome"] == "accepted"


def test_a_response_token_is_accepted_once_even_for_a_reused_nonce() -> None:
    mesh = Mesh(["orders", "payments"])
    nonce = new_nonce()
    answer = mesh.identity("payments").mint_response("orders", nonce)
    checker = ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    assert checker.verify_response(answer, service="payments", nonce=nonce).caller == "payments"
    with pytest.raises(ResponseAuthError) as info:
        checker.verify_response(answer, service="payments", nonce=nonce)
    assert info.value.reason == "replayed"
    fresh = mesh.identity("payments").mint_response("orders", nonce)
    assert checker.verify_response(fresh, service="payments", nonce=nonce).caller == "payments"


@pytest.mark.parametrize("digest", ["\u00e9" * 43, "A" * 42, "A" * 42 + "=", 43])
def test_a_body_digest_that_is_not_base64url_sha256_is_invalid_claim(digest: object) -> None:
    mesh = Mesh(["orders", "payments"])
    nonce = new_nonce()
    payments = mesh.identity("payments")
    header, payload, _ = payments.mint_response("orders", nonce, status=200, body=b"x").split(".")
    claims = json.loads(b64url_decode(payload))
    claims["body_sha256"] = digest
    signing_input = f"{header}.{b64url_encode(dumps(claims))}"
    forged = f"{signing_input}.{b64url_encode(payments.key.sign(signing_input.encode()))}"
    checker = ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    with pytest.raises(ResponseAuthError) as info:
        checker.verify_response(forged, service="payments", nonce=nonce, status=200)
    assert info.value.reason == "invalid_claim"
