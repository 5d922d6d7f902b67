"""OpenID Connect discovery (DESIGN section 8) against a loopback identity provider, and in the gateway."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwks_server import gzip_bomb, no_wait

import meshauth
from meshauth import KeysUnavailable
from meshauth._discovery import DISCOVERY_PATH, DiscoveredKeys
from meshauth.gateway import create_app, parse_config
from meshauth.gateway._sources import open_issuer_keys
from meshauth.testing import FakeClock

AUDIENCE = "api-gateway"
JSON = {"Content-Type": "application/json"}
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class IdP:
    """A scripted identity provider: each path answers (status, headers, body)."""

    def __init__(self) -> None:
        self.base = ""
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: collections.Counter[str] = collections.Counter()

    def publish(self, *, issuer: str | None = None, jwks_uri: str | None = None, max_age: int = 3600) -> None:
        document = {"issuer": issuer or self.base, "jwks_uri": jwks_uri or self.base + "/keys"}
        cache = {"Cache-Control": f"max-age={max_age}"}
        self.routes[DISCOVERY_PATH] = (200, {**JSON, **cache}, json.dumps(document).encode())
        jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE.public_key(), as_dict=True), "kid": "k1", "alg": "RS256"}
        self.routes["/keys"] = (200, {**JSON, **cache}, json.dumps({"keys": [jwk]}).encode())

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.base, "sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, PRIVATE, algorithm="RS256", headers={"kid": "k1"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.hits[path] += 1
        status, headers, body = self.routes.get(path, (404, {}, b""))
        raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        await send(
            {"type": "http.response.start", "status": status, "headers": [*raw, (b"content-length", b"%d" % len(body))]}
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def idp(serve_asgi: Callable[..., str]) -> IdP:
    provider = IdP()
    provider.base = serve_asgi(provider, lifespan="off")
    provider.publish()
    return provider


def discovered(idp: IdP, clock: FakeClock, **options: Any) -> DiscoveredKeys:
    return DiscoveredKeys(idp.base, clock=clock, monotonic=clock, retry_wait=no_wait, retries=1, **options)


def test_discovery_finds_the_key_set_and_caches_both_documents(idp: IdP, clock: FakeClock) -> None:
    keys = discovered(idp, clock)
    assert keys.keyset is None
    record = keys.get_key("k1")
    assert record is not None and (record.alg, record.owner) == ("RS256", idp.base)
    assert keys.keyset is not None and keys.keyset.kids() == ["k1"]
    assert keys.get_key("k1") is record and keys.get_key("k2") is None
    assert idp.hits == {DISCOVERY_PATH: 1, "/keys": 1}
    status = keys.status()
    assert status["ready"] and status["jwks_uri"] == idp.base + "/keys" and status["discovery_error"] is None
    clock.advance(3601)  # both documents are past their max-age
    assert keys.get_key("k1") is record  # the same key set (same bytes): the same record
    assert idp.hits == {DISCOVERY_PATH: 2, "/keys": 2}

    async def scenario() -> None:
        assert await keys.aget_key("k1") is record
        await keys.aclose()

    asyncio.run(scenario())
    assert idp.hits[DISCOVERY_PATH] == 2


def _bad(idp: IdP, case: str) -> None:
    html = b"<!doctype html><title>Sign in</title>"
    if case == "redirect":
        idp.routes[DISCOVERY_PATH] = (302, {"Location": "https://evil.example/.well-known/openid-configuration"}, b"")
    elif case == "html":
        idp.routes[DISCOVERY_PATH] = (200, {"Content-Type": "text/html"}, html)
    elif case == "html-as-json":
        idp.routes[DISCOVERY_PATH] = (200, JSON, html)
    elif case == "other-issuer":
        idp.publish(issuer="https://evil.example")
    elif case == "bomb":
        idp.routes[DISCOVERY_PATH] = (200, {**JSON, "Content-Encoding": "gzip"}, gzip_bomb(1 << 20))
    elif case == "plain-http-jwks":
        idp.publish(jwks_uri="http://idp.example.com/keys")
    elif case == "jwks-redirect":
        idp.routes["/keys"] = (301, {"Location": "https://evil.example/keys"}, b"")
    elif case == "jwks-bomb":
        idp.routes["/keys"] = (200, {**JSON, "Content-Encoding": "gzip"}, gzip_bomb(1 << 20))
    elif case == "jwks-html":
        idp.routes["/keys"] = (200, JSON, html)


BAD_INPUT = {
    "redirect": "redirect: the server answered 302; redirects are never followed",
    "html": "bad_content_type: Content-Type 'text/html' is not application/json",
    "html-as-json": "invalid_discovery: the discovery document is not JSON",
    "other-issuer": "issuer_mismatch: the discovery document names issuer 'https://evil.example', not the configured",
    "bomb": "too_large: the response body exceeds 1048576 bytes",
    "plain-http-jwks": "invalid_discovery: refusing plain http for 'idp.example.com'",
    "jwks-redirect": "redirect: the server answered 301; redirects are never followed",
    "jwks-bomb": "too_large: the response body exceeds 16777216 bytes",
    "jwks-html": "invalid_jwks: ",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_discovery_input_is_refused_with_a_reason_in_bounded_memory(idp: IdP, clock: FakeClock, case: str) -> None:
    _bad(idp, case)
    keys = discovered(idp, clock)
    tracemalloc.start()
    try:
        with pytest.raises(KeysUnavailable) as caught:
            keys.get_key("k1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert BAD_INPUT[case] in message, message
    assert not isinstance(caught.value, meshauth.TokenError)
    assert peak < 18 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert "evil.example/keys" not in str(idp.hits)  # nothing from an answer is fetched blindly
    # Fixed at the provider: found again once the back-off is over.
    idp.publish()
    clock.advance(31)
    assert keys.get_key("k1") is not None


def test_a_failed_rediscovery_keeps_the_key_set_in_service(idp: IdP, clock: FakeClock) -> None:
    keys = discovered(idp, clock)
    record = keys.get_key("k1")
    idp.publish(issuer="https://evil.example")
    clock.advance(3601)
    assert keys.get_key("k1") is record
    assert keys.status()["discovery_error"].startswith("issuer_mismatch")


def test_plain_http_issuers_are_refused_except_on_loopback() -> None:
    with pytest.raises(meshauth.ConfigurationError, match="plain http"):
        DiscoveredKeys("http://login.example.com")
    assert DiscoveredKeys("https://login.example.com/tenant/v2.0/").url == (
        "https://login.example.com/tenant/v2.0/.well-known/openid-configuration"
    )


# -- the gateway --------------------------------------------------------------------------------------


def gateway_config(tmp_path: Path, issuer: str, issuer_table: str) -> Any:
    key = meshauth.SigningKey.generate()
    (tmp_path / "gateway.pem").write_bytes(key.to_pem())
    (tmp_path / "registry.json").write_text(json.dumps({"keys": [key.public_jwk(iss="gateway")]}))
    text = f"""
service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"

[[issuers]]
issuer = "{issuer}"
audience = "{AUDIENCE}"
algorithms = ["RS256"]
{issuer_table}

[[routes]]
prefix = "/orders"
upstream = "http://orders.internal"
service = "orders"
"""
    return parse_config(tomllib.loads(text), base_dir=tmp_path, source="gateway.toml")


def test_issuer_config_discovery_or_jwks(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "https://login.example.com", "discovery = true")
    (issuer,) = config.issuers
    assert issuer.discovery and issuer.jwks == ""
    assert isinstance(open_issuer_keys(issuer), DiscoveredKeys)
    for table, message in (
        ('discovery = true\njwks = "keys.json"', "either jwks or discovery"),
        ("", "jwks: this key is required (or discovery = true)"),
        ('discovery = "yes"', "expected true or false"),
    ):
        with pytest.raises(meshauth.ConfigurationError, match=re.escape(message)):
            gateway_config(tmp_path, "https://login.example.com", table)
    with pytest.raises(meshauth.ConfigurationError, match="discovery needs an https issuer URL"):
        gateway_config(tmp_path, "http://login.example.com", "discovery = true")


def test_the_gateway_verifies_users_through_discovery_and_lives_on_bad_input(idp: IdP, tmp_path: Path) -> None:
    config = gateway_config(tmp_path, idp.base, "discovery = true")

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"orders"})

    def run(bad: str | None) -> list[httpx.Response]:
        if bad is not None:
            _bad(idp, bad)
        gateway = create_app(config, upstream_transport=httpx.ASGITransport(app=upstream), configure_audit=False)

        async def main() -> list[httpx.Response]:
            async with gateway:
                transport = httpx.ASGITransport(app=gateway)
                async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
                    headers = {"Authorization": f"Bearer {idp.token()}"}
                    return [await client.get("/orders", headers=headers), await client.get("/healthz")]

        return asyncio.run(main())

    ok, health = run(None)
    assert ok.status_code == 200 and ok.text == "orders" and health.status_code == 200
    for bad in ("other-issuer", "bomb", "redirect", "html-as-json"):
        refused, health = run(bad)
        assert refused.status_code == 503 and refused.json()["reason"] == "keys_unavailable", bad
        assert health.status_code == 200  # the gateway lives on
        idp.publish()
