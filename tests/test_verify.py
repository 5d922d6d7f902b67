"""Verifier: the happy paths, the verified-token cache, key sources, telemetry and audit.

Hostile inputs live in test_attacks.py and test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import meshauth
from meshauth._jws import b64url_encode
from meshauth.testing import FakeClock, MemoryKeys, Mesh


def test_verify_returns_the_principal(mesh: Mesh, clock: FakeClock) -> None:
    token = mesh.identity("orders").token_for("payments", scope="charges:write refunds")
    principal = mesh.verifier("payments").verify(token)
    assert principal.caller == principal.subject == "orders"
    assert principal.transaction is None and principal.txn_issuer is None and not principal.delegated
    assert principal.audience == "payments"
    assert principal.scopes == {"charges:write", "refunds"}
    assert principal.scope == "charges:write refunds"
    assert principal.kid == mesh.signing_keys["orders"].kid and principal.alg == "ES256"
    assert principal.expires_at == int(clock()) + 300
    assert principal.claims["jti"] == principal.token_id
    with pytest.raises(TypeError):
        principal.claims["iss"] = "x"  # type: ignore[index]


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_both_algorithms(alg: str, clock: FakeClock) -> None:
    mesh = Mesh(["orders", "payments"], alg=alg, clock=clock)
    assert mesh.verifier("payments").verify(mesh.identity("orders").mint("payments")).alg == alg


def test_bytes_tokens_are_accepted(mesh: Mesh) -> None:
    token = mesh.identity("orders").mint("payments")
    assert mesh.verifier("payments").verify(token.encode()).caller == "orders"  # type: ignore[arg-type]


def test_errors_say_what_was_expected_and_found(mesh: Mesh) -> None:
    token = mesh.identity("orders").mint("payments")
    with pytest.raises(meshauth.WrongAudience) as info:
        mesh.verifier("billing").verify(token)
    error = info.value
    assert isinstance(error, meshauth.TokenError) and isinstance(error, meshauth.MeshAuthError)
    assert error.reason == "wrong_audience"
    assert error.expected == "billing" and error.actual == "payments"
    assert "expected 'billing', found 'payments'" in str(error)
    assert error.kid == mesh.signing_keys["orders"].kid


def test_leeway_is_bounded() -> None:
    with pytest.raises(ValueError, match="leeway"):
        meshauth.Verifier("payments", MemoryKeys(), leeway=301)
    with pytest.raises(ValueError, match="audience"):
        meshauth.Verifier("", MemoryKeys())


def test_expiry_and_leeway(mesh: Mesh, clock: FakeClock) -> None:
    token = mesh.identity("orders").mint("payments", ttl=60)
    verifier = mesh.verifier("payments", leeway=30)
    verifier.verify(token)
    clock.advance(60 + 29)
    assert verifier.verify(token).caller == "orders"  # from the cache, still inside the leeway
    clock.advance(1)
    with pytest.raises(meshauth.TokenExpired):
        verifier.verify(token)


def test_token_from_the_future(mesh: Mesh, clock: FakeClock) -> None:
    future = FakeClock(clock() + 120)  # a signer whose clock runs ahead
    token = meshauth.ServiceIdentity("orders", mesh.signing_keys["orders"], clock=future).mint("payments")
    with pytest.raises(meshauth.TokenNotYetValid) as info:
        mesh.verifier("payments").verify(token)
    # When, by how much, and what to do about it, in words.
    assert "issued 120 s in the future" in info.value.detail
    assert "caller's clock is ahead" in info.value.detail and "leeway 30 s" in info.value.detail
    assert info.value.detail.endswith("check NTP")
    assert re.search(r"\(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, now \d{4}-", info.value.detail)
    clock.advance(100)
    assert mesh.verifier("payments", leeway=30).verify(token).caller == "orders"


def test_lifetime_limit(mesh: Mesh) -> None:
    token = mesh.identity("orders").mint("payments", ttl=901)
    with pytest.raises(meshauth.LifetimeTooLong) as info:
        mesh.verifier("payments").verify(token)
    assert "901 s" in str(info.value)
    assert mesh.verifier("payments", max_lifetime=1000).verify(token)


def test_cached_token_is_dropped_when_its_key_is_revoked(mesh: Mesh) -> None:
    token = mesh.identity("orders").token_for("payments")
    verifier = mesh.verifier("payments")
    assert verifier.verify(token) is verifier.verify(token)  # second answer from the cache
    mesh.keys.revoke(mesh.signing_keys["orders"].kid)
    with pytest.raises(meshauth.UnknownKey):
        verifier.verify(token)


def test_cached_token_is_dropped_when_its_key_record_is_replaced(mesh: Mesh) -> None:
    token = mesh.identity("orders").token_for("payments")
    verifier = mesh.verifier("payments")
    verifier.verify(token)
    key = mesh.signing_keys["orders"]
    mesh.keys.add_key(key, "billing")  # same kid, now registered to another owner
    with pytest.raises(meshauth.IssuerMismatch):
        verifier.verify(token)


def test_key_validity_window_ends_cached_and_new_verifications(clock: FakeClock) -> None:
    keys = MemoryKeys()
    key = meshauth.SigningKey.generate()
    keys.add_key(key, "orders", expires=int(clock()) + 100)
    identity = meshauth.ServiceIdentity("orders", key, clock=clock)
    verifier = meshauth.Verifier("payments", keys, clock=clock, leeway=0)
    token = identity.token_for("payments")
    verifier.verify(token)
    clock.advance(101)
    with pytest.raises(meshauth.KeyExpired) as info:
        verifier.verify(token)
    expired_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(clock()) - 101 + 100))
    assert info.value.reason == "key_expired"
    assert f"of 'orders' expired {expired_at} (1 s ago, leeway 0 s)" in info.value.detail
    assert key.kid[:13] in info.value.detail


def test_cache_is_bounded(mesh: Mesh) -> None:
    verifier = mesh.verifier("payments", cache_size=8)
    orders = mesh.identity("orders")
    for _ in range(20):
        verifier.verify(orders.mint("payments"))
    assert len(verifier._verified) <= 8
    verifier.clear_cache()
    assert not verifier._verified


def test_cache_can_be_disabled(mesh: Mesh) -> None:
    verifier = mesh.verifier("payments", cache_size=0)
    token = mesh.identity("orders").mint("payments")
    assert verifier.verify(token) is not verifier.verify(token)


class FailingKeys:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_key(self, kid: str) -> meshauth.KeyRecord | None:
        raise self.error

    async def aget_key(self, kid: str) -> meshauth.KeyRecord | None:
        raise self.error


@pytest.mark.parametrize("error", [meshauth.KeysUnavailable("registry down"), OSError("disk gone")])
def test_unreadable_registry_is_keys_unavailable_not_a_bad_token(mesh: Mesh, error: Exception) -> None:
    token = mesh.identity("orders").mint("payments")
    verifier = meshauth.Verifier("payments", FailingKeys(error), clock=mesh.clock)
    with pytest.raises(meshauth.KeysUnavailable) as info:
        verifier.verify(token)
    assert not isinstance(info.value, meshauth.TokenError)
    with pytest.raises(meshauth.KeysUnavailable):
        asyncio.run(verifier.averify(token))


def test_averify_uses_the_async_lookup(mesh: Mesh) -> None:
    class AsyncOnly(MemoryKeys):
        def get_key(self, kid: str) -> meshauth.KeyRecord | None:
            raise AssertionError("sync lookup used from averify")

    keys = AsyncOnly()
    keys.add_key(mesh.signing_keys["orders"], "orders")
    verifier = meshauth.Verifier("payments", keys, clock=mesh.clock)
    token = mesh.identity("orders").mint("payments")

    async def twice() -> tuple[meshauth.Principal, meshauth.Principal]:
        return await verifier.averify(token), await verifier.averify(token)

    first, second = asyncio.run(twice())
    assert first is second and first.caller == "orders"


def test_verify_span_and_metrics(mesh: Mesh, telemetry) -> None:  # type: ignore[no-untyped-def]
    verifier = meshauth.Verifier(
        "payments",
        mesh.keys,
        clock=mesh.clock,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    token = mesh.identity("orders").mint("payments")
    verifier.verify(token)
    with pytest.raises(meshauth.WrongAudience):
        meshauth.Verifier(
            "billing",
            mesh.keys,
            clock=mesh.clock,
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
        ).verify(token)
    accepted, rejected = telemetry.spans("meshauth.verify")
    assert accepted.attributes["meshauth.outcome"] == "accepted"
    assert accepted.attributes["meshauth.caller"] == "orders"
    assert accepted.attributes["meshauth.audience"] == "payments"
    assert accepted.attributes["meshauth.kid"] == mesh.signing_keys["orders"].kid
    assert accepted.attributes["meshauth.alg"] == "ES256"
    assert accepted.status.status_code != StatusCode.ERROR
    assert rejected.attributes["meshauth.outcome"] == "rejected"
    assert rejected.attributes["meshauth.reason"] == "wrong_audience"
    assert rejected.attributes["error.type"] == "WrongAudience"
    assert rejected.attributes["meshauth.caller"] == "orders"
    assert rejected.status.status_code == StatusCode.ERROR
    outcomes = {
        (p.attributes["meshauth.outcome"], p.attributes["meshauth.reason"]): p.value
        for p in telemetry.metric_points("meshauth.verify.outcomes")
    }
    assert outcomes == {("accepted", "ok"): 1, ("rejected", "wrong_audience"): 1}
    durations = telemetry.metric_points("meshauth.verify.duration")
    assert sum(p.count for p in durations) == 2
    for span in telemetry.spans():
        for value in span.attributes.values():
            assert token not in str(value)


def test_verify_span_is_a_child_of_the_current_span(mesh: Mesh, telemetry) -> None:  # type: ignore[no-untyped-def]
    verifier = meshauth.Verifier("payments", mesh.keys, clock=mesh.clock, tracer_provider=telemetry.tracer_provider)
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server") as server:
        verifier.verify(mesh.identity("orders").mint("payments"))
    (verify,) = telemetry.spans("meshauth.verify")
    assert verify.parent is not None and verify.parent.span_id == server.get_span_context().span_id
    assert verify.context.trace_id == server.get_span_context().trace_id


def test_one_audit_record_per_verify_call(mesh: Mesh, audit_log) -> None:  # type: ignore[no-untyped-def]
    txn = mesh.identity("gateway").issue_txn_token("alice")
    token = mesh.identity("gateway").mint("payments", txn_token=txn)
    verifier = mesh.verifier("payments")
    verifier.verify(token, txn)
    verifier.verify(token, txn)
    with pytest.raises(meshauth.TokenError):
        verifier.verify(token[:-4] + "AAAA")
    verifier.verify(token, txn, audit=False)
    with pytest.raises(meshauth.TokenError):
        verifier.verify(token[:-4] + "AAAA", audit=False)
    records = audit_log.records()
    assert [r.meshauth["outcome"] for r in records] == ["accepted", "accepted", "rejected"]  # type: ignore[attr-defined]
    accepted = records[0].meshauth  # type: ignore[attr-defined]
    assert accepted["event"] == "verify" and accepted["reason"] == "ok"
    assert accepted["caller"] == "gateway" and accepted["subject"] == "alice"
    assert accepted["txn_issuer"] == "gateway" and accepted["transaction"] and accepted["audience"] == "payments"
    assert accepted["jti"] and accepted["kid"] == mesh.signing_keys["gateway"].kid
    assert {"method", "path", "client", "trace_id", "span_id", "time"} <= set(accepted)
    rejected = records[2].meshauth  # type: ignore[attr-defined]
    assert rejected["reason"] == "bad_signature"
    signature = token.rsplit(".", 1)[1]
    for record in records:
        text = record.getMessage() + repr(record.meshauth)  # type: ignore[attr-defined]
        assert token not in text and signature not in text and signature[:-4] not in text


def test_audit_record_carries_the_trace_id(mesh: Mesh, telemetry, audit_log) -> None:  # type: ignore[no-untyped-def]
    verifier = meshauth.Verifier("payments", mesh.keys, clock=mesh.clock, tracer_provider=telemetry.tracer_provider)
    verifier.verify(mesh.identity("orders").mint("payments"))
    (span,) = telemetry.spans("meshauth.verify")
    (record,) = audit_log.records()
    assert record.meshauth["trace_id"] == format(span.context.trace_id, "032x")
    assert record.meshauth["span_id"] == format(span.context.span_id, "016x")


def test_unexpected_internal_errors_fail_closed(mesh: Mesh) -> None:
    verifier = mesh.verifier("payments")

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("defect")

    verifier.check_claims = explode  # type: ignore[method-assign,assignment]
    with pytest.raises(meshauth.MalformedToken, match="could not be processed") as info:
        verifier.verify(mesh.identity("orders").mint("payments"))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_fast_principal_construction_equals_the_dataclass() -> None:
    from meshauth._principal import make_principal

    args = ("orders", "payments", frozenset({"a"}), "j", 1, 2, "k", "ES256", {"x": 1})
    fast, slow = make_principal(*args), meshauth.Principal(args[0], args[0], *args[1:])
    assert fast == slow and repr(fast) == repr(slow) and hash(fast) == hash(slow)
    with pytest.raises(AttributeError):
        fast.caller = "mallory"  # type: ignore[misc]


def test_spans_cost_nothing_while_no_tracing_sdk_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from meshauth._telemetry import Telemetry

    telemetry = Telemetry()
    assert telemetry.start_span("meshauth.verify") is trace.INVALID_SPAN
    installed = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: installed)
    telemetry._next_check = 0.0  # the once-a-second re-check is due
    telemetry.start_span("meshauth.verify").end()
    assert telemetry._off is False  # an SDK is installed now: spans go to the tracer again
    assert Telemetry(tracer_provider=installed).start_span("meshauth.verify").is_recording()


def test_many_threads_and_tasks_share_one_verifier(mesh: Mesh) -> None:
    """Concurrent verifications with a small cache (constant eviction) never fail or mix principals."""
    import threading

    verifier = mesh.verifier("payments", cache_size=16)
    callers = ["orders", "billing", "gateway"]
    tokens = [(caller, mesh.identity(caller).mint("payments")) for caller in callers for _ in range(20)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(offset: int) -> None:
        try:
            barrier.wait(5)
            for round_ in range(10):
                for index in range(len(tokens)):
                    caller, token = tokens[(index + offset + round_) % len(tokens)]
                    assert verifier.verify(token).caller == caller
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(16)]
    for thread in threads:
        thread.start()

    async def tasks() -> None:
        async def one(caller: str, token: str) -> None:
            assert (await verifier.averify(token)).caller == caller

        await asyncio.gather(*(one(caller, token) for caller, token in tokens * 5))

    asyncio.run(tasks())
    for thread in threads:
        thread.join(30)
    assert errors == []
    # Inserts below the limit take no lock, so racing threads may each add one more.
    assert len(verifier._verified) <= 16 + len(threads)


def test_messages_say_when_by_how_much_and_what_to_do(mesh: Mesh, clock: FakeClock) -> None:
    def iso(ts: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))

    now = int(clock())
    orders = mesh.identity("orders")
    verifier = mesh.verifier("payments")
    # A token not valid before a time: when, how far ahead, with the leeway.
    with pytest.raises(meshauth.TokenNotYetValid) as early:
        verifier.verify(_signed(mesh, {"nbf": now + 90}))
    assert f"not valid before {iso(now + 90)}, 90 s from now (now {iso(now)}, leeway 30 s)" in early.value.detail
    # An expired token: when, how long ago.
    token = orders.mint("payments")
    clock.advance(300 + 45)
    with pytest.raises(meshauth.TokenExpired) as late:
        verifier.verify(token)
    assert f"the token expired {iso(now + 300)}, 45 s ago (now {iso(now + 345)}, leeway 30 s)" in late.value.detail
    assert late.value.expected == f"exp after {iso(now + 315)}" and late.value.actual == f"exp {iso(now + 300)}"
    assert "None" not in str(late.value)


def test_unknown_kid_names_the_claimed_issuer_and_the_registry(mesh: Mesh) -> None:
    stranger = meshauth.ServiceIdentity("orders", meshauth.SigningKey.generate(), clock=mesh.clock)
    with pytest.raises(meshauth.UnknownKey) as info:
        mesh.verifier("payments").verify(stranger.mint("payments"))
    detail = info.value.detail
    assert f"no key {stranger.key.kid!r} in " in detail
    assert "the token claims to come from 'orders' (unverified)" in detail
    assert info.value.actual == stranger.key.kid and "expected None" not in str(info.value)


def test_unknown_kid_gives_the_key_sets_size_and_age(tmp_path: Any, clock: FakeClock) -> None:
    key = meshauth.SigningKey.generate()
    path = tmp_path / "registry.json"
    path.write_text(
        json.dumps({"keys": [key.public_jwk(iss="orders"), meshauth.SigningKey.generate().public_jwk(iss="billing")]})
    )
    verifier = meshauth.Verifier("payments", meshauth.JWKSFile(path), clock=clock)
    stranger = meshauth.ServiceIdentity("orders", meshauth.SigningKey.generate(), clock=clock)
    with pytest.raises(meshauth.UnknownKey) as info:
        verifier.verify(stranger.mint("payments"))
    assert re.search(r" in 2 keys, read \d+ s ago; the token claims to come from 'orders'", info.value.detail)


def test_a_key_not_valid_yet_says_when_it_will_be(clock: FakeClock) -> None:
    keys = MemoryKeys()
    key = meshauth.SigningKey.generate()
    keys.add_key(key, "shipping", not_before=int(clock()) + 120)
    token = meshauth.ServiceIdentity("shipping", key, clock=clock).mint("payments")
    with pytest.raises(meshauth.KeyExpired) as info:
        meshauth.Verifier("payments", keys, clock=clock).verify(token)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(clock()) + 120))
    assert f"of 'shipping' is not valid before {when} (in 120 s, leeway 30 s)" in info.value.detail


def _signed(mesh: Mesh, extra: dict[str, Any]) -> str:
    """A service token from orders with extra claims, signed with its registered key."""
    now = int(mesh.clock())
    key = mesh.signing_keys["orders"]
    header = {"alg": "ES256", "kid": key.kid, "typ": "meshauth+jwt"}
    claims = {"iss": "orders", "sub": "orders", "aud": "payments", "iat": now, "exp": now + 300, "jti": "j" * 22}
    signing_input = ".".join(b64url_encode(json.dumps(part).encode()) for part in (header, {**claims, **extra}))
    return f"{signing_input}.{b64url_encode(key.sign(signing_input.encode()))}"
