"""A key set read over HTTP: :class:`JWKSEndpoint`, for the registry and for identity providers.

The policy is written once, without I/O, in :mod:`meshauth._jwks_cache` (when
to fetch, what to answer) and :mod:`meshauth._jwks_http` (what a usable answer
is); the key index is :mod:`meshauth._keyset`. This module holds the two
drivers that run those flows, ``get_key`` with an ``httpx.Client`` and
threads, ``aget_key`` with an ``httpx.AsyncClient`` and tasks; only locks,
sleeps and the I/O calls exist twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
from opentelemetry import metrics, trace
from opentelemetry.trace import Span

from ._exceptions import ConfigurationError, KeysUnavailable
from ._jwks_cache import (
    Backoff,
    Flight,
    Flow,
    Freshness,
    KeyCache,
    Need,
    Outcome,
    Snapshot,
    drive_async,
    drive_sync,
    fetch_flow,
)
from ._jwks_http import (
    JWKS_MEDIA_TYPE,
    Fetched,
    FetchFailed,
    Getter,
    NotModified,
    Reply,
    check_url,
    display_url,
    judge_jwks,
)
from ._jwks_telemetry import FetchTelemetry
from ._keys import KeyRecord
from ._keyset import REGISTRY, KeySet, KeySetParser
from ._registry import DEFAULT_MAX_BYTES
from ._telemetry import Telemetry

__all__ = ["JWKSEndpoint"]

logger = logging.getLogger("meshauth")

_ACCEPT: Final = f"{JWKS_MEDIA_TYPE}, application/json;q=0.9"
_USER_AGENT: Final = "meshauth/0.1.0"
_MAX_PROBLEMS_SHOWN: Final = 20
_USUAL_PATH: Final = "/.well-known/jwks.json"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_settings(policy: Freshness, timeout: float, max_bytes: int, retries: int) -> None:
    for name in ("cooldown", "max_stale", "min_max_age", "negative_ttl"):
        value = getattr(policy, name)
        if not value >= 0:
            raise ConfigurationError(f"{name} must be >= 0", reason="invalid_configuration", actual=value)
    if not timeout > 0 or not max_bytes > 0 or retries < 1:
        raise ConfigurationError(
            "timeout and max_bytes must be positive and retries >= 1", reason="invalid_configuration"
        )
    if not policy.min_max_age <= policy.default_max_age <= policy.max_max_age or policy.max_max_age <= 0:
        raise ConfigurationError(
            "expected 0 <= min_max_age <= default_max_age <= max_max_age, max_max_age > 0",
            reason="invalid_configuration",
        )
    if not 0 <= policy.refresh_ahead < 1:
        raise ConfigurationError("refresh_ahead must be in [0, 1)", reason="invalid_configuration")


class JWKSEndpoint:
    """A key source that reads a JWKS from an HTTPS URL: the meshauth registry, or an IdP's keys.

    >>> import httpx, meshauth
    >>> key = meshauth.SigningKey.generate()
    >>> document = {"keys": [key.public_jwk(iss="orders")]}
    >>> transport = httpx.MockTransport(lambda request: httpx.Response(200, json=document))
    >>> keys = JWKSEndpoint("https://registry.internal/jwks.json", client=httpx.Client(transport=transport))
    >>> keys.get_key(key.kid).owner
    'orders'

    Usable by :meth:`Verifier.verify` (``get_key``, fetching with an
    ``httpx.Client``) and :meth:`Verifier.averify` (``aget_key``, fetching with
    an ``httpx.AsyncClient``, never blocking the event loop). ``parser`` says
    what the document is: the meshauth registry (default) or an identity
    provider's key set (:class:`~meshauth.IdPKeyParser`). The policy:

    * freshness from ``Cache-Control: max-age`` (``Age`` subtracted), clamped to
      ``[min_max_age, max_max_age]``, ``default_max_age`` when unstated;
      revalidation with ``If-None-Match`` (a ``304`` renews the set);
    * single flight: however many threads and tasks find the cache cold, one
      fetch runs and the others wait for it;
    * refresh ahead: after ``1 - refresh_ahead`` of the lifetime, a lookup of a
      cached ``kid`` starts a background refresh and returns at once;
    * past its max-age, the set is refreshed *before* it answers again (unless a
      fetch is already in flight), so a revoked key is not accepted even by a
      verifier that was idle; only a failed refresh falls back to the last good
      set, for ``max_stale`` seconds after its last good fetch;
    * unknown ``kid``: one refetch per ``cooldown`` seconds at most, a ``kid``
      found absent is not looked for again for ``negative_ttl`` seconds, and
      such a lookup waits for the refetch one ``timeout`` at most; while the
      endpoint is failing (or backing off after a failure) an unknown ``kid``
      raises :class:`~meshauth.KeysUnavailable`, not ``unknown_kid``;
    * failures (unreachable, timeout, 5xx, garbage) are retried ``retries``
      times with exponential backoff and jitter (``retry_wait(attempt)``
      seconds); with no usable set, :class:`~meshauth.KeysUnavailable` (never
      a token error); further fetches back off from 1 s up to ``cooldown``;
    * ``https`` only, except loopback hosts or ``allow_http=True``; redirects
      are failures; the body is limited to ``max_bytes`` (decoded bytes,
      counted as they stream); the content type must be
      ``application/jwk-set+json`` or ``application/json``; a document with any
      private key member is refused whole; a bad key among good ones is skipped
      and reported.

    ``require_on_start=True`` fetches in the constructor and raises
    :class:`~meshauth.KeysUnavailable` naming the URL and the problem (see
    :meth:`warm`), so a service with a wrong registry URL fails at start-up.
    ``clock`` (POSIX seconds) stamps :meth:`status`; cache ages use
    ``monotonic``. Without ``client``/``async_client`` each fetch uses a
    short-lived client of its own. With only ``client``, async callers fetch
    with it in a worker thread. The URL is configuration: nothing from a token
    is ever fetched.
    """

    def __init__(
        self,
        url: str,
        *,
        allow_http: bool = False,
        cooldown: float = 30.0,
        max_stale: float = 86400.0,
        timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        min_max_age: float = 60.0,
        max_max_age: float = 3600.0,
        default_max_age: float = 300.0,
        refresh_ahead: float = 0.1,
        negative_ttl: float = 5.0,
        retries: int = 3,
        retry_wait: Callable[[int], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        parser: KeySetParser = REGISTRY,
        require_on_start: bool = False,
    ) -> None:
        parsed = check_url(url, allow_http=allow_http)
        policy = Freshness(
            cooldown=float(cooldown),
            max_stale=float(max_stale),
            min_max_age=float(min_max_age),
            max_max_age=float(max_max_age),
            default_max_age=float(default_max_age),
            refresh_ahead=float(refresh_ahead),
            negative_ttl=float(negative_ttl),
        )
        _check_settings(policy, timeout, max_bytes, retries)
        self.url = str(parsed)
        self.source = display_url(parsed)
        self.timeout = float(timeout)
        self.max_bytes = int(max_bytes)
        self.retries = int(retries)
        self.parser = parser
        self._cache = KeyCache(self.source, policy, monotonic)
        self._clock = clock
        self._monotonic = monotonic
        self._http = Getter(
            parsed, timeout=self.timeout, max_bytes=self.max_bytes, client=client, async_client=async_client
        )
        backoff = Backoff()
        self._retry_wait: Callable[[int], float] = retry_wait if retry_wait is not None else backoff
        longest = backoff.cap + backoff.jitter if retry_wait is None else 10.0
        # How long a caller waits for somebody else's fetch before giving up on it.
        self._wait_limit = self.retries * (3 * self.timeout + longest) + 1.0
        self._telemetry = FetchTelemetry(self._cache, parsed, Telemetry(tracer_provider, meter_provider))
        self._document: tuple[KeySet, dict[str, Any]] | None = None
        self._threads: set[threading.Thread] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        if require_on_start:
            self.warm()

    @property
    def cooldown(self) -> float:
        return self._cache.policy.cooldown

    @property
    def max_stale(self) -> float:
        return self._cache.policy.max_stale

    # -- the key source protocol: two short drivers of KeyCache.lookup_flow ----------------

    def get_key(self, kid: str) -> KeyRecord | None:
        """The record for ``kid`` or ``None``; may fetch (blocking) first."""
        record = self._cache.served(kid)
        if record is not None:
            return record
        flow = self._cache.lookup_flow(kid)
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                result: KeyRecord | None = stop.value
                return result
            self._fetch_sync(need)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        """Async :meth:`get_key`: fetches without blocking the event loop."""
        record = self._cache.served(kid)
        if record is not None:
            return record
        flow = self._cache.lookup_flow(kid)
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                result: KeyRecord | None = stop.value
                return result
            await self._fetch_async(need)

    # -- running a fetch: threads ---------------------------------------------------------

    def _patience(self, need: Need) -> float:
        """How long a caller waits for a fetch (whoever runs it)."""
        # A token with an unknown kid waits for one request's worth at most: with
        # a slow registry, a flood of such tokens must not pin every worker.
        return self.timeout if need.trigger == "unknown_kid" else self._wait_limit

    def _fetch_sync(self, need: Need) -> None:
        flight, owner = self._cache.claim(need, None)
        if flight is None:
            return
        if owner and need.wait and need.trigger != "unknown_kid":
            self._fly_sync(flight)  # nothing to serve without it: run it here
            return
        if owner:
            thread = threading.Thread(target=self._fly_sync, args=(flight,), name="meshauth-jwks-refresh", daemon=True)
            with self._cache.lock:
                self._threads.add(thread)
            thread.start()
        if need.wait:
            if flight.loop is not None and flight.loop is _running_loop():
                return  # blocking here would stall the loop that runs that fetch
            flight.done.wait(self._patience(need))

    def _fly_sync(self, flight: Flight) -> None:
        try:
            self._fly(flight, self._drive_sync)
        finally:
            with self._cache.lock:
                self._threads.discard(threading.current_thread())

    def _drive_sync(self, flow: Flow[Outcome]) -> Outcome:
        return drive_sync(flow, self._http.get, time.sleep)

    # -- running a fetch: tasks -------------------------------------------------------------

    async def _fetch_async(self, need: Need) -> None:
        loop = asyncio.get_running_loop()
        flight, owner = self._cache.claim(need, loop)
        if flight is None:
            return
        if owner:
            # A task, not an await: a cancelled caller must not abort the fetch
            # the other callers are waiting for.
            self._start_task(loop, flight)
        if need.wait:
            await flight.wait_async(self._patience(need))

    def _start_task(self, loop: asyncio.AbstractEventLoop, flight: Flight) -> None:
        task = loop.create_task(self._fly_async(flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fly_async(self, flight: Flight) -> None:
        if self._http.async_client is None and self._http.client is not None:
            await asyncio.to_thread(self._fly, flight, self._drive_sync)
            return
        span, started = self._telemetry.begin(flight)
        result: Outcome | None = None  # None: cancelled, no verdict on the endpoint
        try:
            result = await drive_async(self._new_flow(), self._http.aget)
        except Exception as exc:
            result = self._internal_error(exc)
        finally:
            self._complete(flight, result, span, started)

    # -- one fetch: its flow, its verdict applied --------------------------------------------

    def _new_flow(self) -> Flow[Outcome]:
        snapshot = self._cache.snapshot
        etag = snapshot.etag if snapshot is not None else None
        digest = snapshot.digest if snapshot is not None else None
        headers = {"Accept": _ACCEPT, "Accept-Encoding": "gzip", "User-Agent": _USER_AGENT}
        if etag:
            headers["If-None-Match"] = etag

        def judge(reply: Reply) -> Fetched | NotModified:
            return judge_jwks(reply, etag=etag, digest=digest, parser=self.parser, source=self.source)

        return fetch_flow(headers, self.retries, self._retry_wait, judge)

    def _fly(self, flight: Flight, drive: Callable[[Flow[Outcome]], Outcome]) -> None:
        span, started = self._telemetry.begin(flight)
        result: Outcome | None = None
        try:
            result = drive(self._new_flow())
        except Exception as exc:
            result = self._internal_error(exc)
        finally:
            self._complete(flight, result, span, started)

    def _internal_error(self, exc: Exception) -> FetchFailed:
        logger.exception("meshauth registry %s: unexpected error while fetching", self.source)
        return FetchFailed("internal_error", f"unexpected {type(exc).__name__}", retryable=False)

    def _complete(self, flight: Flight, result: Outcome | None, span: Span, started: float) -> None:
        changed = self._cache.complete(result, self._clock())
        try:
            self._telemetry.record(result, span, started, changed)
        finally:
            # Whatever telemetry does, the callers waiting for this fetch are released.
            flight.finish(isinstance(result, Fetched | NotModified))

    # -- management -------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch now (or join the fetch in progress); return whether it succeeded."""
        flight, owner = self._cache.claim(Need("manual", None, wait=True), None)
        if flight is None:
            return False
        if owner:
            self._fly_sync(flight)
        else:
            if flight.loop is not None and flight.loop is _running_loop():
                return False
            flight.done.wait(self._wait_limit)
        return flight.ok

    async def arefresh(self) -> bool:
        """Async :meth:`refresh`."""
        loop = asyncio.get_running_loop()
        flight, owner = self._cache.claim(Need("manual", None, wait=True), loop)
        if flight is None:
            return False
        if owner:
            self._start_task(loop, flight)
        await flight.wait_async(self._wait_limit)
        return flight.ok

    def warm(self) -> None:
        """Fetch now and raise :class:`~meshauth.KeysUnavailable` if no key set could be had.

        For start-up (also ``require_on_start=True``): a wrong URL or an
        unreachable registry fails the service at once, with the URL and the
        problem in the message, instead of answering every request 503.
        """
        if not self.refresh():
            raise self._start_failure()

    async def awarm(self) -> None:
        """Async :meth:`warm`."""
        if not await self.arefresh():
            raise self._start_failure()

    def _start_failure(self) -> KeysUnavailable:
        failure = self._cache.last_failure
        why = self._cache.last_error or "the fetch did not complete"
        hint = ""
        if failure is not None and failure.status == 404 and not self.source.endswith(_USUAL_PATH):
            hint = f"; key sets are usually served at {_USUAL_PATH}: is the path right?"
        return KeysUnavailable(f"{self.source}: cannot fetch the key set at start-up: {why}{hint}")

    @property
    def keyset(self) -> KeySet | None:
        """The key set in service, without fetching (``None`` before the first fetch)."""
        snapshot = self._cache.snapshot
        return snapshot.keys if snapshot is not None else None

    def _document_for(self, snapshot: Snapshot) -> dict[str, Any]:
        cached = self._document
        if cached is None or cached[0] is not snapshot.keys:
            cached = (snapshot.keys, snapshot.keys.to_jwks())
            self._document = cached
        return {"keys": [dict(jwk) for jwk in cached[1]["keys"]]}

    def to_jwks(self) -> dict[str, Any]:
        """The valid keys in service as a registry document (fetches if cold)."""
        flow = self._cache.usable_flow()
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                return self._document_for(stop.value)
            self._fetch_sync(need)

    async def ato_jwks(self) -> dict[str, Any]:
        """Async :meth:`to_jwks` (the first rendering of a new set runs in a worker thread)."""
        flow = self._cache.usable_flow()
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                snapshot: Snapshot = stop.value
                break
            await self._fetch_async(need)
        cached = self._document
        if cached is not None and cached[0] is snapshot.keys:
            return self._document_for(snapshot)
        # Parsing every key of a large set takes a while: not on the event loop.
        return await asyncio.to_thread(self._document_for, snapshot)

    def validate(self) -> list[str]:
        """Parse every key of the set in service now; return the problems found so far."""
        self.to_jwks()
        snapshot = self._cache.snapshot
        return list(snapshot.keys.problems) if snapshot is not None else []

    def status(self) -> dict[str, Any]:
        """Readiness information: key count, age, freshness, last fetch and last error."""
        cache = self._cache
        snapshot = cache.snapshot
        now = self._monotonic()
        return {
            "source": self.source,
            "ready": snapshot is not None and now < snapshot.usable_until,
            "keys": len(snapshot.keys) if snapshot is not None else 0,
            "age": now - snapshot.good_at if snapshot is not None else None,
            "fresh": snapshot is not None and now < snapshot.expires_at,
            "max_age": snapshot.max_age if snapshot is not None else None,
            "etag": snapshot.etag if snapshot is not None else None,
            "last_fetch": cache.last_attempt_wall,
            "last_success": snapshot.fetched_wall if snapshot is not None else None,
            "last_change": snapshot.changed_wall if snapshot is not None else None,
            "last_error": cache.last_error,
            "last_reason": cache.last_reason,
            "consecutive_failures": cache.failures,
            "fetches": cache.fetches,
            "problems": list(snapshot.keys.problems[:_MAX_PROBLEMS_SHOWN]) if snapshot is not None else [],
        }

    def close(self) -> None:
        """Stop fetching (the set in service stays usable until it is too stale); wait for refresh threads."""
        self._cache.close()
        with self._cache.lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(self._wait_limit)

    async def aclose(self) -> None:
        """Stop fetching and cancel refresh tasks of the running loop."""
        self._cache.close()
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop and task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with self._cache.lock:
            threads = list(self._threads)
        for thread in threads:
            await asyncio.to_thread(thread.join, self._wait_limit)

    def __enter__(self) -> JWKSEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> JWKSEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        snapshot = self._cache.snapshot
        count = len(snapshot.keys) if snapshot is not None else 0
        return f"JWKSEndpoint({self.source!r}, keys={count})"
