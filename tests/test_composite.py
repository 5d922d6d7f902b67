"""CompositeKeys: several key sources behind one (fallbacks, multiple registries)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from meshauth import (
    ConfigurationError,
    JWKSFile,
    KeyRecord,
    KeysUnavailable,
    ServiceIdentity,
    SigningKey,
    StaticKeys,
    UnknownKey,
    Verifier,
)
from meshauth._composite import CompositeKeys
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth.testing import FakeClock, MemoryKeys

ORDERS = SigningKey.generate("ES256")
BILLING = SigningKey.generate("EdDSA")


class Down:
    """A source whose registry cannot be read."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or KeysUnavailable("registry down")
        self.closed = False

    def get_key(self, kid: str) -> KeyRecord | None:
        raise self.error

    async def aget_key(self, kid: str) -> KeyRecord | None:
        raise self.error

    def to_jwks(self) -> dict[str, Any]:
        raise self.error

    def close(self) -> None:
        self.closed = True


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_first_source_that_knows_the_kid_wins() -> None:
    first = MemoryKeys([ORDERS.record("orders")])
    second = MemoryKeys([ORDERS.record("impostor"), BILLING.record("billing")])
    keys = CompositeKeys(first, second)
    assert keys.get_key(ORDERS.kid).owner == "orders"
    assert keys.get_key(BILLING.kid).owner == "billing"
    assert keys.get_key("unknown") is None


def test_an_unavailable_endpoint_falls_back_to_a_local_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"keys": [ORDERS.public_jwk(iss="orders")]}))
    endpoint = JWKSEndpoint(
        f"http://127.0.0.1:{closed_port()}/jwks.json", clock=clock, monotonic=clock, retries=1, timeout=1.0
    )
    keys = CompositeKeys(endpoint, JWKSFile(path))
    verifier = Verifier("payments", keys, clock=clock)
    assert verifier.verify(ServiceIdentity("orders", ORDERS, clock=clock).mint("payments")).caller == "orders"
    status = keys.status()
    assert status["ready"] is True and status["keys"] == 1
    assert [part["ready"] for part in status["sources"]] == [False, True]
    assert "unreachable" in status["last_error"]
    endpoint.close()


def test_unknown_kid_when_some_source_could_be_read() -> None:
    keys = CompositeKeys(Down(), MemoryKeys([ORDERS.record("orders")]))
    assert keys.get_key(BILLING.kid) is None
    verifier = Verifier("payments", keys)
    with pytest.raises(UnknownKey):
        verifier.verify(ServiceIdentity("billing", BILLING).mint("payments"))


def test_keys_unavailable_only_when_every_source_is() -> None:
    keys = CompositeKeys(Down(), Down(RuntimeError("boom")))
    with pytest.raises(KeysUnavailable, match="every key source is unavailable") as caught:
        keys.get_key(ORDERS.kid)
    assert "registry down" in caught.value.detail and "RuntimeError" in caught.value.detail
    verifier = Verifier("payments", keys)
    with pytest.raises(KeysUnavailable):
        verifier.verify(ServiceIdentity("orders", ORDERS).mint("payments"))
    assert keys.status()["ready"] is True  # Down has no status(): reported as a plain source
    with pytest.raises(KeysUnavailable):
        keys.to_jwks()


def test_an_unexpected_failure_falls_through_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshauth")
    keys = CompositeKeys(Down(RuntimeError("boom")), MemoryKeys([ORDERS.record("orders")]))
    assert keys.get_key(ORDERS.kid).owner == "orders"
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)


def test_other_meshauth_errors_are_not_swallowed() -> None:
    keys = CompositeKeys(Down(ConfigurationError("bad settings")), MemoryKeys([ORDERS.record("orders")]))
    with pytest.raises(ConfigurationError):
        keys.get_key(ORDERS.kid)


def test_async_lookups() -> None:
    keys = CompositeKeys(Down(), MemoryKeys(), StaticKeys([ORDERS.record("orders")]))

    async def main() -> tuple[Any, Any]:
        return await keys.aget_key(ORDERS.kid), await keys.aget_key(BILLING.kid)

    found, missing = asyncio.run(main())
    assert found.owner == "orders" and missing is None

    async def all_down() -> None:
        await CompositeKeys(Down(), Down()).aget_key(ORDERS.kid)

    with pytest.raises(KeysUnavailable):
        asyncio.run(all_down())


def test_to_jwks_merges_readable_sources_first_wins() -> None:
    keys = CompositeKeys(
        Down(),
        MemoryKeys([ORDERS.record("orders")]),
        MemoryKeys([ORDERS.record("impostor"), BILLING.record("billing")]),
    )
    document = keys.to_jwks()
    assert [(jwk["kid"], jwk["iss"]) for jwk in document["keys"]] == [
        (ORDERS.kid, "orders"),
        (BILLING.kid, "billing"),
    ]


def test_close_and_aclose_reach_the_sources() -> None:
    down = Down()
    keys = CompositeKeys(down, MemoryKeys())
    keys.close()
    assert down.closed
    down.closed = False
    asyncio.run(keys.aclose())
    assert down.closed
    assert repr(keys) == "CompositeKeys(Down, MemoryKeys)"


def test_needs_a_source() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        CompositeKeys()
