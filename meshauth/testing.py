"""Helpers for testing code that uses meshauth: keys, a fake clock, an in-memory mesh.

>>> from meshauth.testing import FakeClock, Mesh
>>> clock = FakeClock()
>>> mesh = Mesh(["orders", "payments"], clock=clock)
>>> token = mesh.identity("orders").token_for("payments")
>>> mesh.verifier("payments").verify(token).caller
'orders'
>>> clock.advance(3600)
>>> mesh.verifier("payments").verify(token)
Traceback (most recent call last):
...
meshauth.TokenExpired: expired: the token expired ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

from ._identity import ServiceIdentity
from ._keys import KeyRecord, SigningKey
from ._registry import KeySet
from ._verify import Verifier

__all__ = ["FakeClock", "LoopbackServer", "MemoryKeys", "Mesh", "ephemeral_key"]

DEFAULT_START = 1_800_000_000.0


class FakeClock:
    """A wall clock that only moves when told to; pass it as ``clock=``."""

    def __init__(self, start: float = DEFAULT_START) -> None:
        self.now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._lock:
            self.now += seconds

    def set(self, now: float) -> None:
        """Jump to an absolute POSIX time."""
        self.now = float(now)


def ephemeral_key(alg: str = "ES256") -> SigningKey:
    """A throw-away signing key."""
    return SigningKey.generate(alg)


class MemoryKeys:
    """A mutable in-memory key registry (a key source) for tests: add and revoke keys."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._records: dict[str, KeyRecord] = {}
        for record in records:
            self.add(record)

    def add(self, record: KeyRecord) -> None:
        self._records[record.kid] = record

    def add_key(self, key: SigningKey, owner: str, **window: Any) -> KeyRecord:
        """Register ``key`` as owned by ``owner`` (``not_before=``/``expires=`` optional)."""
        record = key.record(owner, **window)
        self.add(record)
        return record

    def revoke(self, kid: str) -> None:
        """Remove a key: tokens signed with it stop verifying."""
        self._records.pop(kid, None)

    def get_key(self, kid: str) -> KeyRecord | None:
        return self._records.get(kid)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return self._records.get(kid)

    def to_jwks(self) -> dict[str, Any]:
        return KeySet(self._records.values(), source="memory").to_jwks()


class Mesh:
    """A set of services with ephemeral keys, one shared registry and a shared clock.

    The clock is a :class:`FakeClock` that starts at the real current time
    (whole seconds), so tokens minted on the mesh also verify in an app whose
    :class:`~meshauth.Verifier` runs on the real clock; advance it to test expiry.
    """

    def __init__(
        self,
        services: Iterable[str] = ("orders", "payments"),
        *,
        alg: str = "ES256",
        clock: FakeClock | None = None,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock(int(time.time()))
        self.keys = MemoryKeys()
        self.signing_keys: dict[str, SigningKey] = {}
        self._identities: dict[str, ServiceIdentity] = {}
        self._verifiers: dict[str, Verifier] = {}
        for name in services:
            self.add_service(name, alg=alg)

    def add_service(self, name: str, *, alg: str = "ES256") -> ServiceIdentity:
        key = ephemeral_key(alg)
        self.signing_keys[name] = key
        self.keys.add_key(key, name)
        return self.identity(name)

    def identity(self, name: str, **kwargs: Any) -> ServiceIdentity:
        """The :class:`~meshauth.ServiceIdentity` of ``name`` on the mesh clock (shared unless kwargs)."""
        if kwargs:
            return ServiceIdentity(name, self.signing_keys[name], clock=self.clock, **kwargs)
        if name not in self._identities:
            self._identities[name] = ServiceIdentity(name, self.signing_keys[name], clock=self.clock)
        return self._identities[name]

    def verifier(self, name: str, **kwargs: Any) -> Verifier:
        """A :class:`~meshauth.Verifier` for service ``name`` on the mesh registry and clock (shared unless kwargs)."""
        if kwargs:
            return Verifier(name, self.keys, clock=self.clock, **kwargs)
        if name not in self._verifiers:
            self._verifiers[name] = Verifier(name, self.keys, clock=self.clock)
        return self._verifiers[name]


class LoopbackServer:
    """Runs an ASGI app under uvicorn in a background thread on ``127.0.0.1`` (a free port).

    Needs ``uvicorn`` (the ``gateway`` or ``demo`` extra). ``lifespan`` is
    uvicorn's setting: ``"off"`` for an app that only speaks HTTP, ``"on"`` to
    require the lifespan protocol. ``websockets=True`` serves websocket
    handshakes too (needs the ``websockets`` package). Use it as a context
    manager; ``url`` is the base URL once started::

        with LoopbackServer(app) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(
        self,
        app: Any,
        *,
        startup_timeout: float = 10.0,
        lifespan: Literal["auto", "on", "off"] = "auto",
        websockets: bool = False,
    ) -> None:
        import uvicorn  # noqa: PLC0415 - optional dependency, needed only by this helper

        ws = "websockets-sansio" if websockets else "none"
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan, ws=ws)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="meshauth-loopback", daemon=True)
        self._timeout = startup_timeout
        self.url = ""

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``)."""
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout)

    @property
    def running(self) -> bool:
        """Whether the server thread is alive (``False`` once :meth:`stop` has returned cleanly)."""
        return self._thread.is_alive()

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
