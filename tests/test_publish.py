"""jwks_app: the registry publishing endpoint (ASGI), in process and on a real loopback server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshauth import JWKSFile, KeysUnavailable, ServiceIdentity, SigningKey, StaticKeys, Verifier
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth._publish import JWKSApp, jwks_app
from meshauth.testing import FakeClock, MemoryKeys

ORDERS = SigningKey.generate("ES256")
BILLING = SigningKey.generate("EdDSA")
PATH = "/.well-known/jwks.json"


def no_wait(attempt: int) -> float:
    return 0.0


def request(app: Any, method: str = "GET", path: str = PATH, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry.test") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(go())


class CountingKeys:
    """A source with a key set identity (like StaticKeys/JWKSFile) that counts renders."""

    def __init__(self, *records: Any) -> None:
        self.inner = StaticKeys(list(records))
        self.renders = 0

    @property
    def keyset(self) -> Any:
        return self.inner.keyset

    def replace(self, *records: Any) -> None:
        self.inner = StaticKeys(list(records))

    def to_jwks(self) -> dict[str, Any]:
        self.renders += 1
        return self.inner.to_jwks()


def test_serves_the_document_with_cache_headers() -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders"), BILLING.record("billing")]), max_age=120)
    response = request(app)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jwk-set+json"
    assert response.headers["cache-control"] == "public, max-age=120"
    assert response.headers["etag"].startswith('"') and response.headers["etag"].endswith('"')
    document = response.json()
    assert sorted(jwk["kid"] for jwk in document["keys"]) == sorted([ORDERS.kid, BILLING.kid])
    assert all("d" not in jwk for jwk in document["keys"])
    # what it serves is a registry any verifier accepts
    assert StaticKeys.from_jwks(response.content).get_key(ORDERS.kid).owner == "orders"


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
def test_if_none_match_gets_304_without_a_body(form: str) -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders")]))
    etag = request(app).headers["etag"]
    response = request(app, headers={"If-None-Match": form.format(etag=etag)})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "public, max-age=300"


def test_a_stale_etag_gets_the_new_document() -> None:
    source = MemoryKeys([ORDERS.record("orders")])
    app = jwks_app(source)
    old = request(app).headers["etag"]
    source.add(BILLING.record("billing"))
    response = request(app, headers={"If-None-Match": old})
    assert response.status_code == 200
    assert response.headers["etag"] != old
    assert len(response.json()["keys"]) == 2


def test_head_has_the_headers_and_no_body() -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders")]))
    get, head = request(app), request(app, "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == get.headers["etag"]
    assert head.headers["content-length"] == str(len(get.content))


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", PATH, 405), ("DELETE", PATH, 405), ("GET", "/jwks.json", 404), ("GET", "/", 404)],
)
def test_other_methods_and_paths(method: str, path: str, status: int) -> None:
    response = request(jwks_app(StaticKeys([ORDERS.record("orders")])), method, path)
    assert response.status_code == status
    assert response.headers["cache-control"] == "no-store"
    if status == 405:
        assert response.headers["allow"] == "GET, HEAD"


def test_health() -> None:
    response = request(jwks_app(StaticKeys([ORDERS.record("orders")])), path="/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "keys": 1}


def test_custom_path_and_no_health_route() -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders")]), path="/keys", health_path=None)
    assert request(app, path="/keys").status_code == 200
    assert request(app, path="/healthz").status_code == 404


def test_mounted_under_a_root_path() -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders")]))

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app, root_path="/registry")
        async with httpx.AsyncClient(transport=transport, base_url="http://registry.test") as client:
            return [(await client.get("/registry" + PATH)).status_code, (await client.get(PATH)).status_code]

    assert asyncio.run(go()) == [200, 200]


def test_serializes_again_only_when_the_key_set_changes() -> None:
    source = CountingKeys(ORDERS.record("orders"))
    app = jwks_app(source)
    etags = {request(app).headers["etag"] for _ in range(5)}
    assert len(etags) == 1 and source.renders == 1
    source.replace(ORDERS.record("orders"), BILLING.record("billing"))
    assert request(app).headers["etag"] not in etags
    assert source.renders == 2


def test_a_changed_registry_file_is_published(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"keys": [ORDERS.public_jwk(iss="orders")]}))
    source = JWKSFile(path, check_interval=1, monotonic=clock)
    app = jwks_app(source)
    first = request(app)
    path.write_text(json.dumps({"keys": [ORDERS.public_jwk(iss="orders"), BILLING.public_jwk(iss="billing")]}))
    clock.advance(2)
    second = request(app)
    assert first.headers["etag"] != second.headers["etag"]
    assert len(second.json()["keys"]) == 2


def test_an_unreadable_source_is_503_and_never_leaks() -> None:
    class Down:
        def to_jwks(self) -> dict[str, Any]:
            raise KeysUnavailable("upstream registry down")

    app = jwks_app(Down())
    response = request(app)
    assert response.status_code == 503
    assert response.json() == {"error": "keys_unavailable", "reason": "keys_unavailable"}
    assert response.headers["cache-control"] == "no-store"
    assert request(app, path="/healthz").status_code == 503


def test_a_source_rendering_private_members_is_never_published() -> None:
    class Leaky:
        def to_jwks(self) -> dict[str, Any]:
            jwk = ORDERS.public_jwk(iss="orders")
            jwk["d"] = "c2VjcmV0"
            return {"keys": [jwk]}

    response = request(jwks_app(Leaky()))
    assert response.status_code == 500
    assert b"c2VjcmV0" not in response.content


def test_republishes_an_endpoint_without_blocking_the_loop(clock: FakeClock) -> None:
    document = {"keys": [ORDERS.public_jwk(iss="orders")]}
    upstream = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=document)))
    endpoint = JWKSEndpoint(
        "https://registry.example.com/jwks.json", async_client=upstream, clock=clock, monotonic=clock
    )
    app = jwks_app(endpoint, max_age=60)
    assert isinstance(app, JWKSApp)
    response = request(app)
    assert response.status_code == 200
    assert [jwk["kid"] for jwk in response.json()["keys"]] == [ORDERS.kid]


def test_lifespan_and_other_scopes() -> None:
    app = jwks_app(StaticKeys([ORDERS.record("orders")]))
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> None:
        await app({"type": "lifespan"}, receive, send)
        await app({"type": "websocket", "path": PATH}, receive, send)

    asyncio.run(go())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_max_age_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match="max_age"):
        jwks_app(StaticKeys(), max_age=-1)


# -- end to end: a real server, a real JWKSEndpoint ------------------------------------------------


def test_an_endpoint_reads_the_published_registry_with_revalidation(
    serve_asgi: Callable[..., str], clock: FakeClock
) -> None:
    registry = MemoryKeys([ORDERS.record("orders")])
    base = serve_asgi(jwks_app(registry, max_age=60), lifespan="on")  # startup fails unless the app speaks lifespan
    seen: list[tuple[int, str | None]] = []

    def record(response: httpx.Response) -> None:
        seen.append((response.status_code, response.request.headers.get("if-none-match")))

    client = httpx.Client(event_hooks={"response": [record]})
    endpoint = JWKSEndpoint(base + PATH, client=client, clock=clock, monotonic=clock, retry_wait=no_wait)
    verifier = Verifier("payments", endpoint, clock=clock)
    try:
        assert verifier.verify(ServiceIdentity("orders", ORDERS, clock=clock).mint("payments")).caller == "orders"
        assert endpoint.status()["max_age"] == 60
        clock.advance(61)
        assert endpoint.refresh() is True  # unchanged: 304
        registry.add(BILLING.record("billing"))
        clock.advance(61)
        assert endpoint.refresh() is True  # changed: 200
        billing = ServiceIdentity("billing", BILLING, clock=clock).mint("payments")
        assert verifier.verify(billing).caller == "billing"
    finally:
        endpoint.close()
        client.close()
    assert [status for status, _ in seen] == [200, 304, 200]
    assert seen[0][1] is None and seen[1][1] is not None and seen[2][1] == seen[1][1]
