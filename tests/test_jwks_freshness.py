"""JWKSEndpoint freshness and outages (DESIGN section 5) against a real loopback registry.

Revocation is bounded by max-age even for an idle verifier; only a failed
refresh falls back to the last good set (for ``max_stale``); an unknown kid
while the registry fails is an outage (503), not ``unknown_kid``; a wrong
registry URL fails at start-up when asked to; a compression bomb stays small.
"""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jwks_server import ORDERS, PATH, JWKSServer, gzip_bomb, no_wait, settle

from meshauth import (
    IdPKeyParser,
    KeysUnavailable,
    ServiceIdentity,
    SigningKey,
    TokenError,
    UnknownKey,
    Verifier,
)
from meshauth._jwks_cache import Backoff
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import FakeClock

BILLING = SigningKey.generate("ES256")
SHIPPING = SigningKey.generate("EdDSA")


def token_of(key: SigningKey, clock: FakeClock, service: str) -> str:
    return ServiceIdentity(service, key, clock=clock).mint("payments")


def publish_both(server: JWKSServer) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), BILLING.public_jwk(iss="billing"), max_age=300)


# -- revocation is bounded by max-age, also for an idle verifier ------------------------------------


def test_a_revoked_key_is_refused_by_a_verifier_idle_past_max_age(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    publish_both(server)
    verifier = Verifier("payments", make_endpoint(), clock=clock)
    billing_token = token_of(BILLING, clock, "billing")
    assert verifier.verify(billing_token).caller == "billing"
    server.publish(ORDERS.public_jwk(iss="orders"), max_age=300)  # billing's key is revoked
    clock.advance(301)  # idle past max-age: no lookup started a refresh meanwhile
    with pytest.raises(UnknownKey):
        verifier.verify(billing_token)  # the very token verified before (it was cached)
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(BILLING, clock, "billing"))
    assert server.count() == 2  # the refresh ran before the first answer, once
    assert verifier.verify(token_of(ORDERS, clock, "orders")).caller == "orders"


def test_async_a_revoked_key_is_refused_past_max_age(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    publish_both(server)
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    billing_token = token_of(BILLING, clock, "billing")

    async def scenario() -> None:
        assert (await verifier.averify(billing_token)).caller == "billing"
        server.publish(ORDERS.public_jwk(iss="orders"), max_age=300)
        clock.advance(301)
        with pytest.raises(UnknownKey):
            await verifier.averify(billing_token)
        await endpoint.aclose()

    asyncio.run(scenario())
    assert server.count() == 2


def test_only_a_failed_refresh_falls_back_to_the_last_good_set_for_max_stale(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    publish_both(server)
    endpoint = make_endpoint(max_stale=3600, retries=2)
    verifier = Verifier("payments", endpoint, clock=clock)
    verifier.verify(token_of(BILLING, clock, "billing"))
    server.fail_with(503)
    clock.advance(301)
    # The foreground refresh fails (two attempts): the last good set answers.
    assert verifier.verify(token_of(BILLING, clock, "billing")).caller == "billing"
    assert server.count() == 1 + 2
    status = endpoint.status()
    assert status["ready"] and not status["fresh"] and status["last_reason"] == "http_error"
    # Backing off: the last good set answers without a fetch per request.
    assert verifier.verify(token_of(ORDERS, clock, "orders")).caller == "orders"
    assert server.count() == 3
    clock.advance(3600)  # beyond max_stale since the last good fetch
    with pytest.raises(KeysUnavailable) as caught:
        verifier.verify(token_of(ORDERS, clock, "orders"))
    assert not isinstance(caught.value, TokenError)


def test_a_cached_kid_past_max_age_does_not_wait_for_a_fetch_in_flight(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    publish_both(server)
    endpoint = make_endpoint()
    record = endpoint.get_key(ORDERS.kid)
    server.hold()
    clock.advance(280)  # refresh-ahead window: a background refresh starts and hangs at the gate
    assert endpoint.get_key(ORDERS.kid) is record
    server.wait_for(lambda: server.held == 1)
    clock.advance(30)  # now past max-age, with that fetch still in flight
    done = threading.Event()
    answers: list[Any] = []

    def lookup() -> None:
        answers.append(endpoint.get_key(ORDERS.kid))
        done.set()

    threading.Thread(target=lookup, daemon=True).start()
    assert done.wait(5.0), "a cached kid waited for the fetch in flight"
    assert answers == [record] and server.held == 1
    server.release()
    settle(endpoint)
    assert server.count() == 2


# -- an unknown kid while the registry fails is an outage, not a bad token ---------------------------


@pytest.mark.parametrize("failure", ["status", "dropped"])
def test_an_unknown_kid_while_the_registry_is_down_is_keys_unavailable(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock, failure: str
) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), max_age=300)
    verifier = Verifier("payments", make_endpoint(retries=1), clock=clock)
    verifier.verify(token_of(ORDERS, clock, "orders"))
    if failure == "status":
        server.fail_with(500)
    else:
        server.mode = "close"
    clock.advance(60)  # fresh set, cooldown over: the new kid triggers a refetch, which fails
    with pytest.raises(KeysUnavailable, match="not in the last good key set") as caught:
        verifier.verify(token_of(BILLING, clock, "billing"))
    assert caught.value.reason == "keys_unavailable" and not isinstance(caught.value, TokenError)
    fetches = server.count()
    # Backing off after the failure: no fetch, and still an outage, not unknown_kid.
    with pytest.raises(KeysUnavailable):
        verifier.verify(token_of(BILLING, clock, "billing"))
    assert server.count() == fetches
    # Cached kids are unaffected; once the registry answers again, unknown is unknown.
    assert verifier.verify(token_of(ORDERS, clock, "orders")).caller == "orders"
    server.fail_with(200)
    server.mode = "normal"
    clock.advance(60)
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(SHIPPING, clock, "shipping"))


def test_an_unknown_kid_during_an_outage_answers_503_through_the_middleware(
    server: JWKSServer, clock: FakeClock
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> list[httpx.Response]:
        endpoint = JWKSEndpoint(server.url, clock=clock, monotonic=clock, retry_wait=no_wait, retries=1)
        middleware = MeshAuthMiddleware(app, Verifier("payments", endpoint, clock=clock))
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://payments") as client:

            async def call(key: SigningKey, service: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token_of(key, clock, service)}"}
                return await client.get("/charges", headers=headers)

            responses = [await call(ORDERS, "orders")]
            server.fail_with(502)
            clock.advance(60)
            responses += [await call(BILLING, "billing"), await call(ORDERS, "orders")]
        await endpoint.aclose()
        return responses

    ok, outage, cached = asyncio.run(scenario())
    assert ok.status_code == 200 and cached.status_code == 200
    assert outage.status_code == 503 and "retry-after" in outage.headers
    assert outage.json()["reason"] == "keys_unavailable"


# -- start-up: a wrong registry URL fails at once -----------------------------------------------------


def test_require_on_start_fails_fast_with_a_hint_about_the_usual_path(server: JWKSServer, clock: FakeClock) -> None:
    wrong = server.url.replace(PATH, "/jwks")
    server.one_off.append((404, {}, b""))
    with pytest.raises(KeysUnavailable) as caught:
        JWKSEndpoint(wrong, clock=clock, monotonic=clock, retry_wait=no_wait, require_on_start=True)
    message = str(caught.value)
    assert wrong in message and "HTTP 404" in message and "/.well-known/jwks.json" in message
    endpoint = JWKSEndpoint(server.url, clock=clock, monotonic=clock, require_on_start=True)
    assert endpoint.status()["keys"] == 1 and server.count() == 1


def test_warm_names_an_unreachable_registry(clock: FakeClock) -> None:
    endpoint = JWKSEndpoint(
        "http://127.0.0.1:9/.well-known/jwks.json", clock=clock, monotonic=clock, retry_wait=no_wait, retries=1
    )
    with pytest.raises(KeysUnavailable, match=r"127\.0\.0\.1:9/.well-known/jwks.json: cannot fetch .*unreachable"):
        endpoint.warm()

    async def scenario() -> None:
        with pytest.raises(KeysUnavailable, match="unreachable") as caught:
            await endpoint.awarm()
        assert "/.well-known/jwks.json" in str(caught.value) and "is the path right" not in str(caught.value)

    asyncio.run(scenario())


# -- bounded memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parser", ["registry", "idp"])
def test_a_one_mebibyte_gzip_bomb_is_refused_in_bounded_memory(
    server: JWKSServer, clock: FakeClock, parser: str
) -> None:
    bomb = gzip_bomb(1 << 20)  # inflates to about 1 GiB
    assert 900_000 < len(bomb) < 1_100_000
    server.one_off.append((200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, bomb))
    options: dict[str, Any] = {} if parser == "registry" else {"parser": IdPKeyParser("https://idp.example.com")}
    endpoint = JWKSEndpoint(server.url, clock=clock, monotonic=clock, retries=1, **options)  # default 16 MiB limit
    tracemalloc.start()
    try:
        assert endpoint.refresh() is False
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert endpoint.status()["last_reason"] == "too_large"
    # At most the 16 MiB limit (plus one decoding step) is ever held: far from the gigabyte.
    assert peak < 18 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    with pytest.raises(KeysUnavailable, match="exceeds 16777216 bytes"):
        endpoint.get_key(ORDERS.kid)


def test_the_default_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff()
    for attempt, low in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)):
        pauses = [backoff(attempt) for _ in range(50)]
        assert all(low <= pause <= low + 0.5 for pause in pauses)
    assert len({backoff(1) for _ in range(50)}) > 1  # jittered
