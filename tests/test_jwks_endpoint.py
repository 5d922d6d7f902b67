"""JWKSEndpoint against a real loopback HTTP server (and respx/MockTransport for edge cases).

The server is a ``ThreadingHTTPServer`` on 127.0.0.1 whose answers the tests
script: document, status, headers, one-off answers, a gate that holds requests
until released, hanging or dropped connections. Time is a FakeClock passed as
both ``clock`` and ``monotonic``; nothing sleeps to wait for an expiry.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwks_server import ORDERS, WAIT, JWKSServer, body_of, jwks, no_wait, settle

from meshauth import (
    ConfigurationError,
    KeySet,
    KeysUnavailable,
    ServiceIdentity,
    SigningKey,
    TokenError,
    UnknownKey,
    Verifier,
)
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth._jwks_http import max_age as _max_age
from meshauth._keyset import RawKeySet, load_keys
from meshauth.testing import FakeClock

# -- keys and tokens (generated once: EC key generation is the slow part) ---------------------

ORDERS_NEXT = SigningKey.generate("EdDSA")
BILLING = SigningKey.generate("ES256")


def forged_token(kid: str) -> str:
    """A well-formed service token naming ``kid``; its signature is noise (lookup fails first)."""

    def enc(value: dict[str, Any]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = enc({"alg": "ES256", "kid": kid, "typ": "meshauth+jwt"})
    payload = enc({"iss": "orders", "sub": "orders", "aud": "payments", "iat": 1, "exp": 2, "jti": kid})
    signature = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


def token_of(key: SigningKey, clock: FakeClock, service: str = "orders") -> str:
    return ServiceIdentity(service, key, clock=clock).mint("payments")


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://registry.example.com/jwks.json",
        "http://10.0.0.5/jwks.json",
        "ftp://registry.example.com/jwks.json",
        "/.well-known/jwks.json",
        "https:///jwks.json",
        "file:///etc/jwks.json",
    ],
)
def test_plain_http_to_other_hosts_and_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        JWKSEndpoint(url)
    assert caught.value.reason == "invalid_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://registry.example.com/jwks.json",
        "http://127.0.0.1:8080/jwks.json",
        "http://127.8.9.10/jwks.json",
        "http://[::1]:8080/jwks.json",
        "http://localhost/jwks.json",
    ],
)
def test_https_and_loopback_are_allowed(url: str) -> None:
    endpoint = JWKSEndpoint(url)
    assert endpoint.status()["ready"] is False


def test_allow_http_permits_plain_http_on_a_trusted_network() -> None:
    endpoint = JWKSEndpoint("http://registry.mesh.internal/jwks.json", allow_http=True)
    assert endpoint.source == "http://registry.mesh.internal/jwks.json"


def test_user_info_and_query_never_reach_logs_or_status() -> None:
    endpoint = JWKSEndpoint("https://user:secret@registry.example.com:8443/jwks.json?token=abc")
    assert endpoint.source == "https://registry.example.com:8443/jwks.json"
    assert "secret" not in repr(endpoint) and "abc" not in str(endpoint.status())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"retries": 0},
        {"max_bytes": 0},
        {"cooldown": -1},
        {"min_max_age": 600, "default_max_age": 300},
        {"refresh_ahead": 1.0},
    ],
)
def test_invalid_settings_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        JWKSEndpoint("https://registry.example.com/jwks.json", **kwargs)


# -- fetching and caching ----------------------------------------------------------------------


def test_cold_fetch_then_answers_from_cache(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    for _ in range(20):
        assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"
    assert server.count() == 1
    headers = server.last_headers()
    assert "application/jwk-set+json" in headers["accept"]
    assert "if-none-match" not in headers
    status = endpoint.status()
    assert status["ready"] and status["fresh"] and status["keys"] == 1 and status["fetches"] == 1
    assert status["last_error"] is None and status["last_success"] == clock()


def test_max_age_is_honoured_and_refresh_starts_ahead_of_expiry(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), max_age=120)
    endpoint = make_endpoint()
    assert endpoint.get_key(ORDERS.kid) is not None
    clock.advance(100)  # before 90 % of the lifetime: no fetch
    assert endpoint.get_key(ORDERS.kid) is not None
    assert server.count() == 1
    clock.advance(10)  # 110 s > 108 s: a background refresh, the caller is answered from cache
    assert endpoint.get_key(ORDERS.kid) is not None
    settle(endpoint)
    assert server.count() == 2
    assert endpoint.status()["age"] == 0


def test_etag_revalidation_with_304_keeps_the_set(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), max_age=60, etag='"v1"')
    endpoint = make_endpoint()
    record = endpoint.get_key(ORDERS.kid)
    clock.advance(61)
    assert endpoint.refresh() is True
    assert server.last_headers()["if-none-match"] == '"v1"'
    assert server.count() == 2
    assert endpoint.get_key(ORDERS.kid) is record  # the very same parsed record: nothing re-parsed
    status = endpoint.status()
    assert status["fresh"] and status["etag"] == '"v1"' and status["last_change"] < status["last_success"]


def test_an_unchanged_document_without_etag_keeps_the_parsed_set(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    record = endpoint.get_key(ORDERS.kid)
    changed = endpoint.status()["last_change"]
    clock.advance(400)
    assert endpoint.refresh() is True
    assert server.count() == 2
    assert endpoint.get_key(ORDERS.kid) is record  # same bytes: nothing re-parsed
    assert endpoint.status()["last_change"] == changed
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"


@pytest.mark.parametrize(
    ("header", "settings", "expected"),
    [
        ("max-age=1", {"min_max_age": 60}, 60.0),
        ("max-age=1000000", {"max_max_age": 3600}, 3600.0),
        ("no-store", {"min_max_age": 30, "default_max_age": 300}, 30.0),
        (None, {"default_max_age": 200}, 200.0),
    ],
)
def test_max_age_floor_ceiling_and_default(
    server: JWKSServer,
    make_endpoint: Callable[..., JWKSEndpoint],
    header: str | None,
    settings: dict[str, float],
    expected: float,
) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), max_age=None)
    if header is not None:
        server.headers["Cache-Control"] = header
    endpoint = make_endpoint(**settings)
    endpoint.get_key(ORDERS.kid)
    assert endpoint.status()["max_age"] == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Cache-Control": "public, max-age=300"}, 300.0),
        ({"Cache-Control": 'max-age="120"'}, 120.0),
        ({"Cache-Control": "max-age=300", "Age": "100"}, 200.0),
        ({"Cache-Control": "max-age=300", "Age": "1000"}, 0.0),
        ({"Cache-Control": "no-cache"}, 0.0),
        ({"Cache-Control": "max-age=abc"}, None),
        ({}, None),
    ],
)
def test_cache_control_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert _max_age(httpx.Headers(headers)) == expected


# -- single flight -----------------------------------------------------------------------------


def test_fifty_threads_on_a_cold_cache_cause_one_fetch(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    token = token_of(ORDERS, clock)
    server.hold()
    start = threading.Barrier(51, timeout=WAIT)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            results.append(verifier.verify(token).caller)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    start.wait()
    server.wait_for(lambda: server.held == 1)
    time.sleep(0.05)  # let the other 49 reach the wait (not needed for the assertion)
    server.release()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert results == ["orders"] * 50
    assert server.count() == 1


def test_fifty_tasks_on_a_cold_cache_cause_one_fetch(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    token = token_of(ORDERS, clock)

    async def main() -> list[str]:
        principals = await asyncio.gather(*(verifier.averify(token) for _ in range(50)))
        return [p.caller for p in principals]

    assert asyncio.run(main()) == ["orders"] * 50
    assert server.count() == 1


def test_async_callers_join_a_fetch_started_by_a_thread(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]
) -> None:
    endpoint = make_endpoint()
    server.hold()
    found: list[Any] = []
    thread = threading.Thread(target=lambda: found.append(endpoint.get_key(ORDERS.kid)))
    thread.start()
    server.wait_for(lambda: server.held == 1)

    async def main() -> list[Any]:
        waiting = asyncio.gather(*(endpoint.aget_key(ORDERS.kid) for _ in range(20)))
        await asyncio.sleep(0.01)
        server.release()
        return list(await waiting)

    records = asyncio.run(main())
    thread.join(WAIT)
    assert all(r is not None and r.kid == ORDERS.kid for r in [*records, *found])
    assert server.count() == 1


def test_a_cancelled_async_caller_does_not_abort_the_shared_fetch(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]
) -> None:
    endpoint = make_endpoint()
    server.hold()

    async def main() -> Any:
        first = asyncio.ensure_future(endpoint.aget_key(ORDERS.kid))
        second = asyncio.ensure_future(endpoint.aget_key(ORDERS.kid))
        await asyncio.to_thread(server.wait_for, lambda: server.held == 1)
        first.cancel()
        server.release()
        return await second

    assert asyncio.run(main()).kid == ORDERS.kid
    assert server.count() == 1


# -- background refresh: cached kids never wait ------------------------------------------------


def test_a_cached_kid_is_answered_while_the_refresh_is_still_in_flight(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    verifier.verify(token_of(ORDERS, clock))
    clock.advance(295)  # past 90 % of max-age=300
    server.hold()
    # The server holds the refresh; these calls must not wait for it.
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"
    server.wait_for(lambda: server.held == 1)
    assert endpoint.get_key(ORDERS.kid) is not None
    assert server.held == 1  # still held: the answers above did not wait for it
    server.release()
    settle(endpoint)
    assert server.count() == 2
    assert endpoint.status()["age"] == 0


def test_async_cached_kid_is_answered_while_the_refresh_task_is_in_flight(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()

    async def main() -> None:
        assert await endpoint.aget_key(ORDERS.kid) is not None
        clock.advance(295)
        server.hold()
        assert await endpoint.aget_key(ORDERS.kid) is not None  # starts the refresh task, does not wait
        await asyncio.to_thread(server.wait_for, lambda: server.held == 1)
        assert await endpoint.aget_key(ORDERS.kid) is not None
        assert server.held == 1
        server.release()
        assert await endpoint.arefresh() is True  # joins the refresh in flight

    asyncio.run(main())
    assert server.count() == 2


# -- unknown kids ------------------------------------------------------------------------------


def test_a_rotated_key_is_picked_up_by_one_refetch(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    verifier.verify(token_of(ORDERS, clock))
    server.publish(ORDERS.public_jwk(iss="orders"), ORDERS_NEXT.public_jwk(iss="orders"))
    clock.advance(31)  # past the cooldown, long before max-age
    assert verifier.verify(token_of(ORDERS_NEXT, clock)).caller == "orders"
    assert server.count() == 2


def test_unknown_kids_refetch_at_most_once_per_cooldown(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(cooldown=30)
    endpoint.get_key(ORDERS.kid)
    assert endpoint.get_key("unknown-1") is None  # fetched 0 s ago: within the cooldown
    assert server.count() == 1
    clock.advance(31)
    assert endpoint.get_key("unknown-2") is None
    assert server.count() == 2
    clock.advance(10)
    assert endpoint.get_key("unknown-3") is None
    assert server.count() == 2


def test_the_negative_cache_spares_repeated_unknown_kids(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(cooldown=0, negative_ttl=5)
    endpoint.get_key(ORDERS.kid)
    assert endpoint.get_key("gone") is None
    assert server.count() == 2  # no cooldown: one refetch
    assert endpoint.get_key("gone") is None
    assert server.count() == 2  # remembered as absent
    clock.advance(6)
    assert endpoint.get_key("gone") is None
    assert server.count() == 3


def test_a_kid_known_absent_does_not_wait_for_a_fetch_in_flight(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(cooldown=0, negative_ttl=600)
    endpoint.get_key(ORDERS.kid)
    assert endpoint.get_key("gone") is None
    clock.advance(295)
    server.hold()
    endpoint.get_key(ORDERS.kid)  # starts a background refresh, held by the server
    server.wait_for(lambda: server.held == 1)
    assert endpoint.get_key("gone") is None
    assert server.held == 1
    server.release()
    settle(endpoint)


def test_an_unknown_kid_waits_one_request_at_most_for_a_slow_registry(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(timeout=0.5, retries=3)
    endpoint.get_key(ORDERS.kid)
    clock.advance(31)
    server.hold()
    assert endpoint.get_key("new-kid") is None
    # Answered (unknown) while the refetch and its retries are still running.
    assert endpoint._cache.flight is not None
    server.release()
    settle(endpoint)


def test_a_flood_of_random_kids_costs_one_fetch_per_cooldown(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(cooldown=30)
    verifier = Verifier("payments", endpoint, clock=clock)
    tokens = [forged_token(secrets.token_urlsafe(16)) for _ in range(1000)]
    failures: list[str] = []

    def flood(batch: list[str]) -> None:
        for token in batch:
            try:
                verifier.verify(token)
            except TokenError as exc:
                failures.append(exc.reason)

    threads = [threading.Thread(target=flood, args=(tokens[i::10],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert failures == ["unknown_kid"] * 1000
    assert server.count() == 1  # the cold fetch; the flood fell within its cooldown
    clock.advance(31)
    flood([forged_token(secrets.token_urlsafe(16)) for _ in range(1000)])
    assert server.count() == 2
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"


# -- outages -----------------------------------------------------------------------------------


def test_outage_serves_the_last_good_set_until_max_stale_then_keys_unavailable(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint(max_stale=3600, retries=3)
    verifier = Verifier("payments", endpoint, clock=clock)
    verifier.verify(token_of(ORDERS, clock))
    server.fail_with(500)
    clock.advance(400)  # expired: refreshes fail, the last good set stays in service
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"
    settle(endpoint)
    assert server.count() == 1 + 3  # three attempts (tenacity), then give up
    status = endpoint.status()
    assert status["ready"] and not status["fresh"]
    assert status["last_reason"] == "http_error" and "500" in status["last_error"]
    assert status["consecutive_failures"] == 1
    clock.advance(3300)  # 3700 s since the last good fetch: beyond max_stale
    with pytest.raises(KeysUnavailable) as caught:
        verifier.verify(token_of(ORDERS, clock))
    assert not isinstance(caught.value, TokenError)
    assert caught.value.reason == "keys_unavailable"
    assert endpoint.status()["ready"] is False
    server.fail_with(200)  # recovery
    clock.advance(30)  # past the failure backoff
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"
    status = endpoint.status()
    assert status["ready"] and status["last_error"] is None and status["consecutive_failures"] == 0


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("close", "unreachable"),
        ("hang", "timeout"),
        ((200, {"Content-Type": "application/jwk-set+json"}, b"<html>oops</html>"), "invalid_registry"),
        ((200, {"Content-Type": "text/html"}, b'{"keys": []}'), "bad_content_type"),
        ((200, {"Content-Type": "application/json"}, b'{"keys": 3}'), "invalid_registry"),
        ((200, {"Content-Type": "application/json"}, b"\xff\xfe"), "invalid_registry"),
        ((503, {}, b""), "http_error"),
        ((404, {}, b""), "http_error"),
    ],
    ids=["dropped", "timeout", "not-json", "content-type", "not-a-jwks", "not-utf8", "503", "404"],
)
def test_failed_fetches_keep_the_last_good_set(
    server: JWKSServer,
    make_endpoint: Callable[..., JWKSEndpoint],
    clock: FakeClock,
    script: Any,
    reason: str,
) -> None:
    endpoint = make_endpoint(timeout=0.3, retries=1)
    record = endpoint.get_key(ORDERS.kid)
    server.one_off.append(script)
    clock.advance(400)
    assert endpoint.refresh() is False
    assert endpoint.get_key(ORDERS.kid) is record
    assert endpoint.status()["last_reason"] == reason


def test_transient_failures_are_retried_then_succeed(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]
) -> None:
    server.one_off += [(503, {}, b""), "close"]
    endpoint = make_endpoint(retries=3)
    assert endpoint.get_key(ORDERS.kid) is not None
    assert server.count() == 3


@pytest.mark.parametrize("script", [(404, {}, b""), (302, {"Location": "/moved"}, b"")], ids=["404", "redirect"])
def test_permanent_failures_are_not_retried(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], script: Any
) -> None:
    server.one_off.append(script)
    endpoint = make_endpoint(retries=3)
    with pytest.raises(KeysUnavailable):
        endpoint.get_key(ORDERS.kid)
    assert server.count() == 1
    assert server.count("/moved") == 0  # redirects are never followed


def test_a_cold_outage_is_keys_unavailable_and_backs_off(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    server.fail_with(500)
    endpoint = make_endpoint(retries=2, cooldown=30)
    verifier = Verifier("payments", endpoint, clock=clock)
    token = token_of(ORDERS, clock)
    with pytest.raises(KeysUnavailable, match="no key set could be fetched yet"):
        verifier.verify(token)
    assert server.count() == 2
    for _ in range(10):  # within the backoff: no fetch storm
        with pytest.raises(KeysUnavailable):
            verifier.verify(token)
    assert server.count() == 2
    clock.advance(1.5)
    with pytest.raises(KeysUnavailable):
        verifier.verify(token)
    assert server.count() == 4
    server.fail_with(200)
    clock.advance(2.5)  # the second failure doubled the backoff to 2 s
    assert verifier.verify(token).caller == "orders"


def test_async_outage_is_keys_unavailable_not_a_token_error(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    server.fail_with(502)
    endpoint = make_endpoint(retries=1)
    verifier = Verifier("payments", endpoint, clock=clock)

    async def main() -> None:
        with pytest.raises(KeysUnavailable):
            await verifier.averify(token_of(ORDERS, clock))
        server.fail_with(200)
        clock.advance(2)
        assert (await verifier.averify(token_of(ORDERS, clock))).caller == "orders"

    asyncio.run(main())


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["normal", "chunked"], ids=["content-length", "chunked"])
def test_a_huge_body_is_refused(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock, mode: str
) -> None:
    endpoint = make_endpoint(max_bytes=4096)
    record = endpoint.get_key(ORDERS.kid)
    huge = body_of(jwks(*(SigningKey.generate("EdDSA").public_jwk(iss="orders") for _ in range(50))))
    assert len(huge) > 4096
    server.mode = mode
    server.body = huge
    clock.advance(400)
    assert endpoint.refresh() is False
    assert endpoint.status()["last_reason"] == "too_large"
    assert endpoint.get_key(ORDERS.kid) is record


def test_a_compression_bomb_is_refused_without_inflating_it(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]
) -> None:
    bomb = gzip.compress(b'{"keys": [' + b" " * 5_000_000 + b"]}")
    assert len(bomb) < 10_000
    server.one_off.append((200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, bomb))
    endpoint = make_endpoint(max_bytes=100_000)
    with pytest.raises(KeysUnavailable, match="too_large"):
        endpoint.get_key(ORDERS.kid)


def test_a_gzip_encoded_document_is_accepted(server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]) -> None:
    document = gzip.compress(body_of(jwks(ORDERS.public_jwk(iss="orders"))))
    server.one_off.append((200, {"Content-Type": "application/jwk-set+json", "Content-Encoding": "gzip"}, document))
    assert make_endpoint().get_key(ORDERS.kid) is not None


def test_a_document_with_private_members_is_refused_whole(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    endpoint.get_key(ORDERS.kid)
    leaked = BILLING.public_jwk(iss="billing")
    leaked["d"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    server.publish(ORDERS.public_jwk(iss="orders"), ORDERS_NEXT.public_jwk(iss="orders"), leaked)
    clock.advance(400)
    assert endpoint.refresh() is False
    status = endpoint.status()
    assert status["last_reason"] == "private_key_members"
    assert "AAAA" not in status["last_error"]
    assert endpoint.get_key(ORDERS.kid) is not None  # the last good set
    # Nothing of the refused document; while the registry fails, an unknown kid is an outage.
    with pytest.raises(KeysUnavailable, match="not in the last good key set"):
        endpoint.get_key(ORDERS_NEXT.kid)


def test_a_bad_key_among_good_ones_is_skipped_and_reported(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    bad = BILLING.public_jwk(iss="billing")
    bad["x"] = bad["x"][:-4]  # not a 32-byte coordinate
    server.publish(ORDERS.public_jwk(iss="orders"), bad, ORDERS_NEXT.public_jwk(iss="orders"))
    endpoint = make_endpoint()
    verifier = Verifier("payments", endpoint, clock=clock)
    assert verifier.verify(token_of(ORDERS, clock)).caller == "orders"
    assert verifier.verify(token_of(ORDERS_NEXT, clock)).caller == "orders"
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(BILLING, clock, "billing"))
    problems = endpoint.status()["problems"]
    assert len(problems) == 1 and BILLING.kid in problems[0] and "'x'" in problems[0]


def test_bad_keys_in_an_unusual_layout_are_reported_at_load(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]
) -> None:
    document = {"keys": [ORDERS.public_jwk(iss="orders"), {"kid": 7, "kty": "EC"}, {"nested": {"a": 1}}]}
    server.one_off.append((200, {"Content-Type": "application/json"}, json.dumps(document, indent=2).encode()))
    endpoint = make_endpoint()
    assert endpoint.get_key(ORDERS.kid) is not None
    assert len(endpoint.status()["problems"]) == 2
    assert endpoint.validate() == endpoint.status()["problems"]


def test_validate_parses_every_key_now(server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]) -> None:
    bad = BILLING.public_jwk(iss="billing")
    bad["alg"] = "RS256"
    server.publish(ORDERS.public_jwk(iss="orders"), bad)
    endpoint = make_endpoint()
    endpoint.get_key(ORDERS.kid)
    assert endpoint.status()["problems"] == []  # found lazily...
    problems = endpoint.validate()  # ...or on demand
    assert len(problems) == 1 and "unsupported 'alg'" in problems[0]
    assert [jwk["kid"] for jwk in endpoint.to_jwks()["keys"]] == [ORDERS.kid]


def test_duplicate_kids_refuse_the_document(server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), ORDERS.public_jwk(iss="billing"))
    endpoint = make_endpoint()
    with pytest.raises(KeysUnavailable, match="duplicate kid"):
        endpoint.get_key(ORDERS.kid)


# -- the lazy index agrees with the exact parser -------------------------------------------------

_POOL = [SigningKey.generate("EdDSA").public_jwk(iss="svc") for _ in range(4)]


def _exact_kids(text: str) -> list[str]:
    return KeySet.from_jwks(text, strict=False, lazy=True).kids()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kids=st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=4, unique=True),
    layout=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}, {"indent": "\t"}, {"ensure_ascii": False}]),
)
def test_the_fast_index_finds_exactly_what_the_exact_parser_finds(kids: list[str], layout: dict[str, Any]) -> None:
    document = {"keys": [{**_POOL[i], "kid": kid} for i, kid in enumerate(kids)]}
    text = json.dumps(document, **layout)
    loaded = load_keys(text.encode("utf-8"), "test")
    assert loaded.kids() == _exact_kids(text)
    for kid in kids:
        record = loaded.get(kid)
        assert record is not None and record.kid == kid and record.owner == "svc"


@pytest.mark.parametrize(
    "text",
    [
        '{"keys": [{"kid": "a", "alg": "EdDSA", "x": "}{"}]}',  # braces in strings: exact path
        '{"keys": [{"kid": "a\\u0062"}]}',  # escaped kid: exact path
        '{"other": 1, "keys": []}',
        '{"keys": []}',
        '{"keys":[]} ',
    ],
)
def test_odd_layouts_load_like_the_exact_parser(text: str) -> None:
    loaded = load_keys(text, "test")
    assert sorted(loaded.kids()) == sorted(_exact_kids(text))
    for kid in loaded.kids():
        assert loaded.get(kid) is None  # none of these keys is valid
    assert isinstance(load_keys('{"keys": []}'), RawKeySet)


def test_malformed_json_inside_one_key_object_makes_only_that_key_bad() -> None:
    # The exact parser refuses the whole document for a duplicate member; the
    # lazy index finds it when the key is used, and skips that key only.
    good = ORDERS_NEXT.public_jwk(iss="orders")
    text = json.dumps({"keys": [good]})[:-2] + ', {"kid": "a", "kid": "b", "alg": "EdDSA"}]}'
    loaded = load_keys(text, "test")
    assert loaded.get(ORDERS_NEXT.kid) is not None
    assert loaded.get("a") is None
    assert len(loaded.problems) == 1 and "'a'" in loaded.problems[0]


@pytest.mark.parametrize(
    "text",
    [
        '{"keys": [{"kid": "a"},, {"kid": "b"}]}',
        '{"keys": [{"kid": "a"} {"kid": "b"}]}',
        '{"keys": [{"kid": "a"}, {"kid": "b"}}',
        '{"keys": [{"kid": "a", "d": "secret"}]}',
        '{"keys": [{"kid": "a"}]} trailing',
        "[]",
        "",
    ],
)
def test_malformed_documents_are_refused_as_the_exact_parser_does(text: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_keys(text, "test")
    assert caught.value.reason in ("invalid_registry", "private_key_members")


# -- telemetry and audit -----------------------------------------------------------------------


def test_fetches_are_traced_counted_and_audited(
    server: JWKSServer,
    make_endpoint: Callable[..., JWKSEndpoint],
    clock: FakeClock,
    telemetry: Any,
    audit_log: Any,
) -> None:
    endpoint = make_endpoint(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider, retries=1
    )
    endpoint.get_key(ORDERS.kid)
    server.fail_with(503)
    clock.advance(400)
    endpoint.refresh()
    spans = telemetry.spans("meshauth.jwks.fetch")
    assert [s.attributes["meshauth.outcome"] for s in spans] == ["accepted", "rejected"]
    ok, failed = spans
    assert ok.attributes["server.address"] == "127.0.0.1"
    assert ok.attributes["http.response.status_code"] == 200
    assert ok.attributes["meshauth.reason"] == "ok" and ok.attributes["meshauth.jwks.trigger"] == "cold"
    assert failed.attributes["meshauth.reason"] == "http_error"
    assert failed.attributes["http.response.status_code"] == 503
    assert failed.status.status_code.name == "ERROR"
    for span in spans:  # no key material anywhere
        assert ORDERS.public_jwk(iss="orders")["x"] not in str(dict(span.attributes))
    points = {
        (p.attributes["meshauth.outcome"], p.attributes["meshauth.reason"]): p.value
        for p in telemetry.metric_points("meshauth.jwks.fetches")
    }
    assert points == {("accepted", "ok"): 1, ("rejected", "http_error"): 1}
    (age,) = telemetry.metric_points("meshauth.jwks.age")  # the last good set is 400 s old now
    assert age.value == pytest.approx(400, abs=1) and age.attributes == {"server.address": "127.0.0.1"}
    events = [(f["event"], f["outcome"], f["reason"]) for f in audit_log.fields()]
    assert events == [("jwks.refresh", "accepted", "ok"), ("jwks.refresh", "rejected", "http_error")]


def test_a_failure_is_logged_once_not_per_attempt(
    server: JWKSServer,
    make_endpoint: Callable[..., JWKSEndpoint],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meshauth")
    endpoint = make_endpoint(retries=1)
    endpoint.get_key(ORDERS.kid)
    server.fail_with(500)
    for _ in range(3):
        clock.advance(400)
        endpoint.refresh()
    warnings = [r for r in caplog.records if r.name == "meshauth" and "fetch failed" in r.getMessage()]
    assert len(warnings) == 1


# -- respx / MockTransport edge cases ------------------------------------------------------------


@respx.mock
def test_async_fetches_use_httpx_async_client(clock: FakeClock) -> None:
    route = respx.get("https://registry.example.com/jwks.json").mock(
        return_value=httpx.Response(
            200, json=jwks(ORDERS.public_jwk(iss="orders")), headers={"Content-Type": "application/jwk-set+json"}
        )
    )
    endpoint = JWKSEndpoint("https://registry.example.com/jwks.json", clock=clock, monotonic=clock)

    async def main() -> Any:
        return await endpoint.aget_key(ORDERS.kid)

    assert asyncio.run(main()).kid == ORDERS.kid
    assert route.call_count == 1
    assert route.calls[0].request.headers["user-agent"].startswith("meshauth/")


@respx.mock
def test_an_unexpected_304_is_a_failure(clock: FakeClock) -> None:
    respx.get("https://registry.example.com/jwks.json").mock(return_value=httpx.Response(304))
    endpoint = JWKSEndpoint("https://registry.example.com/jwks.json", clock=clock, monotonic=clock)
    with pytest.raises(KeysUnavailable, match="unexpected_not_modified"):
        endpoint.get_key(ORDERS.kid)


@respx.mock
def test_a_transport_error_is_retried(clock: FakeClock) -> None:
    document = jwks(ORDERS.public_jwk(iss="orders"))
    route = respx.get("https://registry.example.com/jwks.json").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json=document)]
    )
    endpoint = JWKSEndpoint("https://registry.example.com/jwks.json", clock=clock, monotonic=clock, retry_wait=no_wait)
    assert endpoint.get_key(ORDERS.kid) is not None
    assert route.call_count == 2


class _Streamed(httpx.SyncByteStream):
    """A body delivered in chunks, as a real transport does (not already in memory)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks


@pytest.mark.parametrize("encoding", ["br", "compress"])
def test_an_unsupported_content_encoding_is_refused(clock: FakeClock, encoding: str) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        return httpx.Response(200, headers=headers, stream=_Streamed(b"..."))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    endpoint = JWKSEndpoint("https://registry.example.com/jwks.json", clock=clock, monotonic=clock, client=client)
    with pytest.raises(KeysUnavailable, match="unsupported_encoding"):
        endpoint.get_key(ORDERS.kid)
    assert calls == 1  # not retried: asking again will not change the encoding


def test_a_corrupt_or_truncated_gzip_body_is_refused(clock: FakeClock) -> None:
    document = gzip.compress(body_of(jwks(ORDERS.public_jwk(iss="orders"))))
    bodies = [_Streamed(document[:20]), _Streamed(b"not gzip at all")]

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return httpx.Response(200, headers=headers, stream=bodies.pop(0))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    endpoint = JWKSEndpoint(
        "https://registry.example.com/jwks.json", clock=clock, monotonic=clock, client=client, retries=1
    )
    for _ in range(2):
        assert endpoint.refresh() is False
        assert endpoint.status()["last_reason"] == "invalid_encoding"


def test_with_only_a_sync_client_async_callers_fetch_in_a_thread(clock: FakeClock) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(threading.current_thread().name)
        return httpx.Response(200, json=jwks(ORDERS.public_jwk(iss="orders")))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    endpoint = JWKSEndpoint("https://registry.example.com/jwks.json", client=client, clock=clock, monotonic=clock)

    async def main() -> Any:
        return await endpoint.aget_key(ORDERS.kid)

    assert asyncio.run(main()).kid == ORDERS.kid
    assert len(calls) == 1 and calls[0] != threading.main_thread().name


def test_to_jwks_republishes_the_valid_keys(server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint]) -> None:
    server.publish(ORDERS.public_jwk(iss="orders"), ORDERS_NEXT.public_jwk(iss="orders"))
    endpoint = make_endpoint()
    document = endpoint.to_jwks()
    assert [jwk["kid"] for jwk in document["keys"]] == [ORDERS.kid, ORDERS_NEXT.kid]
    document["keys"].clear()  # a copy: the endpoint's cache is untouched
    assert len(endpoint.to_jwks()["keys"]) == 2
    assert endpoint.keyset is not None and len(endpoint.keyset) == 2


def test_close_stops_fetching_but_keeps_serving(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()
    endpoint.get_key(ORDERS.kid)
    endpoint.close()
    clock.advance(400)
    assert endpoint.get_key(ORDERS.kid) is not None
    assert endpoint.refresh() is False
    assert server.count() == 1


def test_async_context_manager_cancels_refresh_tasks(
    server: JWKSServer, make_endpoint: Callable[..., JWKSEndpoint], clock: FakeClock
) -> None:
    endpoint = make_endpoint()

    async def main() -> None:
        async with endpoint:
            await endpoint.aget_key(ORDERS.kid)
            clock.advance(295)
            server.hold()
            await endpoint.aget_key(ORDERS.kid)  # starts a refresh task, held by the server
            await asyncio.to_thread(server.wait_for, lambda: server.held == 1)
        assert not endpoint._tasks

    asyncio.run(main())
    server.release()
    assert endpoint.status()["last_error"] is None  # a cancelled refresh is not an endpoint failure


def test_a_port_that_refuses_connections_is_unreachable(clock: FakeClock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = JWKSEndpoint(f"http://127.0.0.1:{port}/jwks.json", clock=clock, monotonic=clock, retries=1, timeout=1.0)
    with pytest.raises(KeysUnavailable, match="unreachable"):
        endpoint.get_key(ORDERS.kid)
