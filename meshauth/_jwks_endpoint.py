"""A key registry read over HTTP: :class:`JWKSEndpoint`.

The caching policy is written once, as two generators that say what they need
and receive the answer:

* :meth:`JWKSEndpoint._lookup_flow` decides, for one ``kid``, whether the
  cached set answers, whether a fetch is needed (cold or too stale), whether a
  background refresh should start, and whether an unknown ``kid`` deserves a
  refetch (cooldown, negative cache);
* :meth:`JWKSEndpoint._fetch_flow` is one fetch: it yields the request to send
  (or a back-off pause, decided by a ``tenacity`` policy) and judges each
  response: status, redirects, content type, size, private members, document.

Two small drivers run them: ``get_key`` with an ``httpx.Client`` and threads,
``aget_key`` with an ``httpx.AsyncClient`` and tasks. Only locks, sleeps and
the I/O calls exist twice. A fetch in progress is shared by every caller,
whichever driver started it (single flight), and callers whose ``kid`` is
cached never wait for a refresh.

A 10,000-key document is indexed by ``kid`` without being parsed: each key is
strictly parsed, validated and turned into a ``cryptography`` object on first
use (see :class:`RawKeySet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import math
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, Final

import httpx
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from tenacity import (
    DoAttempt,
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from ._exceptions import ConfigurationError, KeysUnavailable
from ._keys import KeyRecord
from ._keyset import REGISTRY, KeySet, KeySetParser
from ._registry import DEFAULT_MAX_BYTES
from ._telemetry import Telemetry, audit

__all__ = ["JWKSEndpoint"]

logger = logging.getLogger("meshauth")

JWKS_MEDIA_TYPE: Final = "application/jwk-set+json"
_ACCEPTED_MEDIA_TYPES: Final = frozenset({JWKS_MEDIA_TYPE, "application/json"})
_ACCEPT: Final = f"{JWKS_MEDIA_TYPE}, application/json;q=0.9"
_USER_AGENT: Final = "meshauth/0.1.0"
_NEVER: Final = float("-inf")
_MAX_PROBLEMS_SHOWN: Final = 20
_NEGATIVE_CACHE_SIZE: Final = 10_000
_DETAIL_LIMIT: Final = 300


# -- HTTP helpers -------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _display(url: httpx.URL) -> str:
    """The URL without user info, query or fragment (safe for logs and spans)."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.path}"


def _max_age(headers: httpx.Headers) -> float | None:
    """Freshness lifetime from ``Cache-Control`` (and ``Age``), or ``None`` if unstated."""
    max_age: float | None = None
    for directive in headers.get_list("cache-control", split_commas=True):
        name, _, value = directive.partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            return 0.0
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isdigit():
                max_age = float(value)
    if max_age is not None:
        age = headers.get("age", "").strip()
        if age.isdigit():
            max_age = max(0.0, max_age - float(age))
    return max_age


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


class _FetchFailed(Exception):
    """One failed fetch attempt; ``reason`` is the stable code reported in telemetry."""

    def __init__(self, reason: str, detail: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = _short(detail)
        self.retryable = retryable
        self.status = status


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, _FetchFailed) and exc.retryable


def _too_large(limit: int) -> _FetchFailed:
    return _FetchFailed("too_large", f"the response body exceeds {limit} bytes", retryable=False)


class _BodyReader:
    """Accumulates a response body chunk by chunk, never holding more than the limit (decoded)."""

    __slots__ = ("_chunks", "_decoder", "_limit", "_size")

    def __init__(self, headers: httpx.Headers, limit: int, *, decoded: bool = False) -> None:
        encoding = "" if decoded else headers.get("content-encoding", "").strip().lower()
        self._decoder: Any = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
        elif encoding not in ("", "identity"):
            raise _FetchFailed(
                "unsupported_encoding", f"unsupported Content-Encoding {encoding[:32]!r}", retryable=False
            )
        length = headers.get("content-length", "").strip()
        if self._decoder is None and not decoded and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        self._chunks: list[bytes] = []
        self._limit = limit
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._decoder is not None:
            try:
                # max_length bounds the output of this call: a compression bomb
                # stops here instead of filling memory.
                chunk = self._decoder.decompress(chunk, self._limit - self._size + 1)
            except zlib.error:
                raise _FetchFailed("invalid_encoding", "the compressed body is corrupt", retryable=True) from None
            if self._decoder.unconsumed_tail:
                raise _too_large(self._limit)
        self._size += len(chunk)
        if self._size > self._limit:
            raise _too_large(self._limit)
        self._chunks.append(chunk)

    def finish(self) -> bytes:
        if self._decoder is not None and not self._decoder.eof:
            raise _FetchFailed("invalid_encoding", "the compressed body is truncated", retryable=True)
        return b"".join(self._chunks)


# -- the fetch and lookup flows: values they exchange with the drivers ---------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Send:
    """Fetch command: send one GET with these headers."""

    headers: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class _Sleep:
    """Fetch command: pause before the next attempt."""

    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    """What the driver got: a status, headers and a bounded body, or an error."""

    status: int | None = None
    headers: httpx.Headers = dataclasses.field(default_factory=httpx.Headers)
    body: bytes = b""
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Fetched:
    keys: KeySet
    etag: str | None
    max_age: float | None
    digest: bytes
    status: int = 200


@dataclasses.dataclass(frozen=True, slots=True)
class _NotModified:
    etag: str | None
    max_age: float | None
    status: int = 304


@dataclasses.dataclass(frozen=True, slots=True)
class _Need:
    """Lookup command: a fetch is wanted (``wait``: in the foreground)."""

    trigger: str  # cold | stale | refresh | unknown_kid | manual
    generation: int | None  # fetches completed when the caller looked; None: always fetch
    wait: bool


_Outcome = _Fetched | _NotModified | _FetchFailed


class _Aborted:
    """A fetch interrupted by cancellation or shutdown: no verdict on the endpoint."""

    reason = "aborted"


_ABORTED: Final = _Aborted()


@dataclasses.dataclass(frozen=True, slots=True)
class _Snapshot:
    """The key set in service and its timers (monotonic seconds)."""

    keys: KeySet
    etag: str | None
    digest: bytes
    max_age: float
    good_at: float
    refresh_at: float
    expires_at: float
    usable_until: float
    fetched_wall: float
    changed_wall: float


class _Flight:
    """One fetch in progress, awaited by threads and by tasks of any event loop."""

    __slots__ = ("_lock", "_waiters", "done", "loop", "ok", "trigger")

    def __init__(self, trigger: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.trigger = trigger
        self.loop = loop
        self.ok = False
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self, ok: bool) -> None:
        with self._lock:
            self.ok = ok
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    async def wait_async(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.done.is_set():
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# 0.5 s, 1 s, 2 s ... capped at 4 s, plus up to 0.5 s of jitter so that a fleet
# of verifiers does not retry in lockstep. (Composed rather than
# wait_exponential_jitter, whose arguments changed across tenacity versions.)
_DEFAULT_RETRY_WAIT: Final = wait_exponential(multiplier=0.5, max=4.0) + wait_random(0, 0.5)
_MAX_DEFAULT_SLEEP: Final = 4.5


class JWKSEndpoint:
    """A key source that reads the registry from an HTTPS JWKS endpoint.

    >>> import httpx, meshauth
    >>> key = meshauth.SigningKey.generate()
    >>> document = {"keys": [key.public_jwk(iss="orders")]}
    >>> transport = httpx.MockTransport(lambda request: httpx.Response(200, json=document))
    >>> keys = JWKSEndpoint("https://registry.internal/jwks.json", client=httpx.Client(transport=transport))
    >>> keys.get_key(key.kid).owner
    'orders'

    Usable by :meth:`Verifier.verify` (``get_key``, fetching with an
    ``httpx.Client``) and :meth:`Verifier.averify` (``aget_key``, fetching with
    an ``httpx.AsyncClient``, never blocking the event loop). The policy:

    * freshness from ``Cache-Control: max-age`` (``Age`` subtracted), clamped to
      ``[min_max_age, max_max_age]``, ``default_max_age`` when unstated;
      revalidation with ``If-None-Match`` (a ``304`` renews the set);
    * single flight: however many threads and tasks find the cache cold, one
      fetch runs and the others wait for it;
    * refresh ahead: after ``1 - refresh_ahead`` of the lifetime, a lookup of a
      cached ``kid`` starts a background refresh and returns at once;
    * unknown ``kid``: one refetch per ``cooldown`` seconds at most (counting
      every fetch), a ``kid`` found absent is not looked for again for
      ``negative_ttl`` seconds, and such a lookup waits for the refetch one
      ``timeout`` at most, so a flood of random kids costs nothing;
    * failures (unreachable, timeout, 5xx, garbage) are retried ``retries``
      times with exponential backoff and jitter (``tenacity``), then the last
      good set stays in service for ``max_stale`` seconds after it was last
      fetched (never less than its max-age); beyond that, or with no good set at all,
      :class:`~meshauth.KeysUnavailable` (never a token error). Further
      attempts back off from 1 s up to ``cooldown``;
    * ``https`` only, except loopback hosts or ``allow_http=True``; redirects
      are failures; the body is limited to ``max_bytes`` (also decompressed);
      the content type must be ``application/jwk-set+json`` or
      ``application/json``; a document with any private key member is refused
      whole; a bad key among good ones is skipped and reported.

    ``clock`` (POSIX seconds) stamps :meth:`status`; cache ages use
    ``monotonic``. Without ``client``/``async_client`` each fetch uses a
    short-lived client of its own (fetches are minutes apart, so nothing is
    lost by not pooling). With only ``client``, async callers fetch with it in
    a worker thread. The URL is configuration: nothing from a token is ever
    fetched.
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
        retry_wait: wait_base | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        parser: KeySetParser = REGISTRY,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigurationError(f"not a valid URL: {exc}", reason="invalid_url") from None
        if parsed.scheme not in ("https", "http") or not parsed.host:
            raise ConfigurationError(
                "the registry URL must be an absolute https URL",
                reason="invalid_url",
                expected="https://host/path",
                actual=parsed.scheme or "relative URL",
            )
        loopback = _is_loopback(parsed.host)
        if parsed.scheme == "http" and not (loopback or allow_http):
            raise ConfigurationError(
                f"refusing plain http for {parsed.host!r}: keys fetched without TLS can be replaced in transit "
                "(use https, or allow_http=True on a trusted network)",
                reason="invalid_url",
                expected="https",
                actual="http",
            )
        for name, value in (
            ("cooldown", cooldown),
            ("max_stale", max_stale),
            ("min_max_age", min_max_age),
            ("negative_ttl", negative_ttl),
        ):
            if not value >= 0:
                raise ConfigurationError(f"{name} must be >= 0", reason="invalid_configuration", actual=value)
        if not timeout > 0 or not max_bytes > 0 or retries < 1:
            raise ConfigurationError(
                "timeout and max_bytes must be positive and retries >= 1", reason="invalid_configuration"
            )
        if not min_max_age <= default_max_age <= max_max_age or max_max_age <= 0:
            raise ConfigurationError(
                "expected 0 <= min_max_age <= default_max_age <= max_max_age, max_max_age > 0",
                reason="invalid_configuration",
            )
        if not 0 <= refresh_ahead < 1:
            raise ConfigurationError("refresh_ahead must be in [0, 1)", reason="invalid_configuration")
        self.url = str(parsed)
        self.source = _display(parsed)
        self.cooldown = float(cooldown)
        self.max_stale = float(max_stale)
        self.timeout = float(timeout)
        self.max_bytes = int(max_bytes)
        self.min_max_age = float(min_max_age)
        self.max_max_age = float(max_max_age)
        self.default_max_age = float(default_max_age)
        self.refresh_ahead = float(refresh_ahead)
        self.negative_ttl = float(negative_ttl)
        self.retries = int(retries)
        self.parser = parser
        self._host = parsed.host
        self._port = parsed.port
        # A proxy cannot serve a loopback address; ignore proxy settings there.
        self._trust_env = not loopback
        self._clock = clock
        self._monotonic = monotonic
        self._client = client
        self._async_client = async_client
        self._retry_wait: wait_base = retry_wait if retry_wait is not None else _DEFAULT_RETRY_WAIT
        sleep_cap = _MAX_DEFAULT_SLEEP if retry_wait is None else 10.0
        # How long a caller waits for somebody else's fetch before giving up on it.
        self._wait_limit = self.retries * (3 * self.timeout + sleep_cap) + 1.0
        self._ssl_context: ssl.SSLContext | None = None
        telemetry = Telemetry(tracer_provider, meter_provider)
        self._tracer = telemetry.tracer
        self._fetch_counter = telemetry.meter.create_counter(
            "meshauth.jwks.fetches", unit="{fetch}", description="JWKS fetches by outcome and reason"
        )
        self._fetch_duration = telemetry.meter.create_histogram(
            "meshauth.jwks.fetch.duration", unit="s", description="Time to fetch the JWKS, retries included"
        )
        # Read at collection time only: costs nothing on the verify path.
        telemetry.meter.create_observable_gauge(
            "meshauth.jwks.age",
            callbacks=[self._observe_age],
            unit="s",
            description="Age of the key set in service (time since its last good fetch)",
        )

        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._flight: _Flight | None = None
        self._generation = 0
        self._last_started = _NEVER
        self._retry_at = _NEVER
        self._failures = 0
        self._fetches = 0
        self._last_error: str | None = None
        self._last_reason: str | None = None
        self._last_attempt_wall: float | None = None
        self._negative: dict[str, float] = {}
        self._document: tuple[KeySet, dict[str, Any]] | None = None
        self._threads: set[threading.Thread] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._logged_error: str | None = None

    # -- the key source protocol ------------------------------------------------------

    def get_key(self, kid: str) -> KeyRecord | None:
        """The record for ``kid`` or ``None``; may fetch (blocking) when the cache is cold."""
        record = self._served(kid)
        if record is not None:
            return record
        flow = self._lookup_flow(kid)
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                result: KeyRecord | None = stop.value
                return result
            self._fetch_sync(need)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        """Async :meth:`get_key`: fetches without blocking the event loop."""
        record = self._served(kid)
        if record is not None:
            return record
        flow = self._lookup_flow(kid)
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                result: KeyRecord | None = stop.value
                return result
            await self._fetch_async(need)

    def _served(self, kid: str) -> KeyRecord | None:
        """The cached record for ``kid`` when no lookup flow is needed (the hot path), else None."""
        snapshot = self._snapshot
        if snapshot is not None:
            now = self._monotonic()
            # Fresh, or no refresh may start (backing off, closed) and still usable.
            if now < snapshot.refresh_at or (now < self._retry_at and now < snapshot.usable_until):
                return snapshot.keys.get(kid)
        return None

    # -- the lookup policy (written once) -------------------------------------------------

    def _usable_flow(self) -> Generator[_Need, None, _Snapshot]:
        """Make sure a usable set is in service; start a background refresh when one is due."""
        generation = self._generation  # read before the snapshot: see _claim
        snapshot = self._snapshot
        now = self._monotonic()
        if snapshot is None or now >= snapshot.usable_until:
            yield _Need("cold" if snapshot is None else "stale", generation, wait=True)
            snapshot = self._snapshot
            if snapshot is None or self._monotonic() >= snapshot.usable_until:
                raise self._unavailable()
        elif now >= snapshot.refresh_at:
            yield _Need("refresh", generation, wait=False)
        return snapshot

    def _lookup_flow(self, kid: str) -> Generator[_Need, None, KeyRecord | None]:
        snapshot = yield from self._usable_flow()
        record = snapshot.keys.get(kid)
        if record is not None:
            return record
        if self._negative.get(kid, _NEVER) > self._monotonic():
            return None
        generation = self._generation
        snapshot = self._snapshot or snapshot
        record = snapshot.keys.get(kid)
        if record is not None:
            return record
        # Join a fetch in progress, or refetch if the cooldown allows: a rotated
        # key is picked up without waiting for the set to expire.
        yield _Need("unknown_kid", generation, wait=True)
        snapshot = self._snapshot or snapshot
        record = snapshot.keys.get(kid)
        if record is None:
            self._remember_absent(kid)
        return record

    def _remember_absent(self, kid: str) -> None:
        negative = self._negative
        if len(negative) >= _NEGATIVE_CACHE_SIZE:
            negative.clear()
        negative[kid] = self._monotonic() + self.negative_ttl

    def _may_start(self, trigger: str, now: float) -> bool:
        if self._closed:
            return False
        if trigger == "manual":
            return True
        if now < self._retry_at:
            return False
        if trigger == "unknown_kid":
            return now - self._last_started >= self.cooldown
        return True

    def _claim(self, need: _Need, loop: asyncio.AbstractEventLoop | None) -> tuple[_Flight | None, bool]:
        """The flight to wait for and whether this caller must run it."""
        with self._lock:
            flight = self._flight
            if flight is not None:
                return flight, False
            now = self._monotonic()
            # A fetch that completed after the caller looked at the cache
            # already answered its question: look again instead of refetching.
            if need.generation is not None and need.generation != self._generation:
                return None, False
            if not self._may_start(need.trigger, now):
                return None, False
            flight = _Flight(need.trigger, loop)
            self._flight = flight
            self._last_started = now
            self._fetches += 1
            return flight, True

    def _unavailable(self) -> KeysUnavailable:
        why = f" (last error: {self._last_error})" if self._last_error else ""
        if self._snapshot is None:
            return KeysUnavailable(f"{self.source}: no key set could be fetched yet{why}")
        return KeysUnavailable(f"{self.source}: the last good key set is older than max_stale{why}")

    # -- sync driver ---------------------------------------------------------------------

    def _patience(self, need: _Need) -> float:
        """How long a caller waits for a fetch (whoever runs it)."""
        if need.trigger == "unknown_kid":
            # A token with an unknown kid waits for one request's worth at most:
            # with a slow registry, a flood of such tokens must not pin every
            # worker for the whole retry sequence.
            return self.timeout
        return self._wait_limit

    def _fetch_sync(self, need: _Need) -> None:
        flight, owner = self._claim(need, None)
        if flight is None:
            return
        if owner and need.wait and need.trigger != "unknown_kid":
            self._fly_sync(flight)  # nothing to serve without it: run it here
            return
        if owner:
            thread = threading.Thread(target=self._fly_sync, args=(flight,), name="meshauth-jwks-refresh", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        if need.wait:
            if flight.loop is not None and flight.loop is _running_loop():
                return  # blocking here would stall the loop that runs that fetch
            flight.done.wait(self._patience(need))

    def _fly_sync(self, flight: _Flight) -> None:
        span, started = self._begin(flight)
        result: _Outcome | _Aborted = _ABORTED
        try:
            result = self._drive_sync(self._fetch_flow())
        except Exception as exc:
            logger.exception("meshauth registry %s: unexpected error while fetching", self.source)
            result = _FetchFailed("internal_error", f"unexpected {type(exc).__name__}", retryable=False)
        finally:
            self._complete(flight, result, span, started)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _drive_sync(self, flow: Generator[_Send | _Sleep, _Reply | None, _Outcome]) -> _Outcome:
        reply: _Reply | None = None
        while True:
            try:
                command = flow.send(reply)
            except StopIteration as stop:
                outcome: _Outcome = stop.value
                return outcome
            if isinstance(command, _Sleep):
                if command.seconds > 0:
                    time.sleep(command.seconds)
                reply = None
            else:
                reply = self._send_sync(command)

    def _send_sync(self, command: _Send) -> _Reply:
        client = self._client if self._client is not None else self._new_client()
        try:
            request = client.build_request("GET", self.url, headers=command.headers, timeout=self.timeout)
            response = client.send(request, stream=True, follow_redirects=False)
            try:
                body = b""
                if response.status_code == 200:
                    reader = _BodyReader(response.headers, self.max_bytes, decoded=response.is_stream_consumed)
                    if response.is_stream_consumed:  # already in memory (a mock transport)
                        reader.feed(response.content)
                    else:
                        deadline = time.monotonic() + 2 * self.timeout
                        for chunk in response.iter_raw():
                            reader.feed(chunk)
                            if time.monotonic() > deadline:
                                raise _FetchFailed("timeout", "the body took too long to arrive", retryable=True)
                    body = reader.finish()
                return _Reply(response.status_code, response.headers, body)
            finally:
                response.close()
        except Exception as exc:
            return _Reply(error=exc)
        finally:
            if client is not self._client:
                client.close()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(verify=self._ssl(), trust_env=self._trust_env, timeout=self.timeout)

    def _ssl(self) -> ssl.SSLContext:
        # Loading the CA bundle takes milliseconds: once per endpoint, not per fetch.
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context(trust_env=self._trust_env)
        return self._ssl_context

    # -- async driver --------------------------------------------------------------------

    async def _fetch_async(self, need: _Need) -> None:
        loop = asyncio.get_running_loop()
        flight, owner = self._claim(need, loop)
        if flight is None:
            return
        if owner:
            # A task, not an await: a cancelled caller must not abort the fetch
            # the other callers are waiting for.
            task = loop.create_task(self._fly_async(flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if need.wait:
            await flight.wait_async(self._patience(need))

    async def _fly_async(self, flight: _Flight) -> None:
        span, started = self._begin(flight)
        result: _Outcome | _Aborted = _ABORTED
        try:
            if self._async_client is None and self._client is not None:
                result = await asyncio.to_thread(self._drive_sync, self._fetch_flow())
            else:
                result = await self._drive_async(self._fetch_flow())
        except Exception as exc:
            logger.exception("meshauth registry %s: unexpected error while fetching", self.source)
            result = _FetchFailed("internal_error", f"unexpected {type(exc).__name__}", retryable=False)
        finally:
            self._complete(flight, result, span, started)

    async def _drive_async(self, flow: Generator[_Send | _Sleep, _Reply | None, _Outcome]) -> _Outcome:
        reply: _Reply | None = None
        while True:
            try:
                command = flow.send(reply)
            except StopIteration as stop:
                outcome: _Outcome = stop.value
                return outcome
            if isinstance(command, _Sleep):
                if command.seconds > 0:
                    await asyncio.sleep(command.seconds)
                reply = None
            else:
                reply = await self._send_async(command)

    async def _send_async(self, command: _Send) -> _Reply:
        client = self._async_client
        if client is None:
            client = httpx.AsyncClient(verify=self._ssl(), trust_env=self._trust_env, timeout=self.timeout)
        try:
            request = client.build_request("GET", self.url, headers=command.headers, timeout=self.timeout)
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                body = b""
                if response.status_code == 200:
                    reader = _BodyReader(response.headers, self.max_bytes, decoded=response.is_stream_consumed)
                    if response.is_stream_consumed:  # already in memory (a mock transport)
                        reader.feed(response.content)
                    else:
                        deadline = time.monotonic() + 2 * self.timeout
                        async for chunk in response.aiter_raw():
                            reader.feed(chunk)
                            if time.monotonic() > deadline:
                                raise _FetchFailed("timeout", "the body took too long to arrive", retryable=True)
                    body = reader.finish()
                return _Reply(response.status_code, response.headers, body)
            finally:
                await response.aclose()
        except Exception as exc:
            return _Reply(error=exc)
        finally:
            if client is not self._async_client:
                await client.aclose()

    # -- one fetch (written once) ---------------------------------------------------------

    def _fetch_flow(self) -> Generator[_Send | _Sleep, _Reply | None, _Outcome]:
        """Yield requests and pauses; return the verdict on the endpoint's answer."""
        snapshot = self._snapshot
        etag = snapshot.etag if snapshot is not None else None
        headers = {"Accept": _ACCEPT, "Accept-Encoding": "gzip", "User-Agent": _USER_AGENT}
        if etag:
            headers["If-None-Match"] = etag
        send = _Send(headers)
        retrying = Retrying(
            stop=stop_after_attempt(self.retries),
            wait=self._retry_wait,
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        retrying.begin()
        state = RetryCallState(retrying, fn=None, args=(), kwargs={})
        while True:
            try:
                action = retrying.iter(state)
            except _FetchFailed as failure:  # not retryable, or out of attempts
                return failure
            if isinstance(action, DoAttempt):
                reply = yield send
                assert reply is not None
                try:
                    outcome = self._judge(reply, etag)
                except _FetchFailed as failure:
                    state.set_exception((type(failure), failure, failure.__traceback__))
                else:
                    state.set_result(outcome)
            elif isinstance(action, DoSleep):
                state.prepare_for_next_attempt()
                yield _Sleep(float(action))
            else:
                result: _Fetched | _NotModified = action
                return result

    def _judge(self, reply: _Reply, etag: str | None) -> _Fetched | _NotModified:
        error = reply.error
        if error is not None:
            if isinstance(error, _FetchFailed):
                raise error
            if isinstance(error, httpx.TimeoutException):
                raise _FetchFailed("timeout", f"timed out ({type(error).__name__})", retryable=True)
            raise _FetchFailed("unreachable", f"{type(error).__name__}: {error}", retryable=True)
        status = reply.status
        assert status is not None
        headers = reply.headers
        if status == 304:
            if etag is None:
                raise _FetchFailed(
                    "unexpected_not_modified",
                    "304 Not Modified to an unconditional request",
                    retryable=False,
                    status=304,
                )
            return _NotModified(headers.get("etag") or etag, _max_age(headers))
        if 300 <= status < 400:
            raise _FetchFailed(
                "redirect",
                f"the endpoint answered {status}; redirects are never followed",
                retryable=False,
                status=status,
            )
        if status != 200:
            raise _FetchFailed(
                "http_error",
                f"the endpoint answered HTTP {status}",
                retryable=status >= 500 or status in (408, 429),
                status=status,
            )
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type not in _ACCEPTED_MEDIA_TYPES:
            raise _FetchFailed(
                "bad_content_type",
                f"Content-Type {media_type[:64]!r} is not {JWKS_MEDIA_TYPE} or application/json",
                retryable=True,
                status=status,
            )
        digest = hashlib.sha256(reply.body).digest()
        snapshot = self._snapshot
        if snapshot is not None and snapshot.digest == digest:
            # The same document (a server without ETags): keep the parsed set,
            # so that records, and the verifier's cache keyed on them, survive.
            return _NotModified(headers.get("etag") or snapshot.etag, _max_age(headers), status=200)
        try:
            keys = self.parser.parse(reply.body, self.source, strict=False)
        except ConfigurationError as exc:
            # A leaked private key will not go away by asking again.
            raise _FetchFailed(
                exc.reason, exc.detail, retryable=exc.reason == self.parser.reason, status=status
            ) from None
        return _Fetched(keys, headers.get("etag"), _max_age(headers), digest)

    # -- applying a verdict -----------------------------------------------------------------

    def _begin(self, flight: _Flight) -> tuple[Span, float]:
        attributes: dict[str, str | int] = {"server.address": self._host, "meshauth.jwks.trigger": flight.trigger}
        if self._port is not None:
            attributes["server.port"] = self._port
        span = self._tracer.start_span("meshauth.jwks.fetch", kind=SpanKind.CLIENT, attributes=attributes)
        return span, time.perf_counter()

    def _lifetime(self, max_age: float | None, previous: float | None) -> float:
        if max_age is None:
            max_age = previous if previous is not None else self.default_max_age
        return min(max(max_age, self.min_max_age), self.max_max_age)

    def _complete(self, flight: _Flight, result: _Outcome | _Aborted, span: Span, started: float) -> None:
        now = self._monotonic()
        wall = self._clock()
        changed = False
        with self._lock:
            previous = self._snapshot
            if isinstance(result, _Fetched | _NotModified):
                if isinstance(result, _Fetched):
                    keys, digest, changed_wall = result.keys, result.digest, wall
                    ttl = self._lifetime(result.max_age, None)
                    changed = True
                else:
                    assert previous is not None
                    keys, digest, changed_wall = previous.keys, previous.digest, previous.changed_wall
                    # A 304 without Cache-Control keeps the lifetime the set had.
                    ttl = self._lifetime(result.max_age, previous.max_age)
                self._snapshot = _Snapshot(
                    keys=keys,
                    etag=result.etag,
                    digest=digest,
                    max_age=ttl,
                    good_at=now,
                    refresh_at=now + ttl * (1 - self.refresh_ahead),
                    expires_at=now + ttl,
                    usable_until=now + max(ttl, self.max_stale),
                    fetched_wall=wall,
                    changed_wall=changed_wall,
                )
                if changed:
                    self._negative = {}
                self._failures = 0
                self._retry_at = math.inf if self._closed else _NEVER
                self._last_error = None
            elif isinstance(result, _FetchFailed):
                self._failures += 1
                backoff = min(max(self.cooldown, 1.0), 2.0 ** min(self._failures - 1, 16))
                self._retry_at = now + backoff
                self._last_error = f"{result.reason}: {result.detail}"
            if not isinstance(result, _Aborted):
                self._last_attempt_wall = wall
                self._last_reason = result.reason if isinstance(result, _FetchFailed) else None
            self._flight = None
            self._generation += 1
        try:
            self._record(result, span, started, changed)
        finally:
            # Whatever telemetry does, the callers waiting for this fetch are released.
            flight.finish(isinstance(result, _Fetched | _NotModified))

    def _record(self, result: _Outcome | _Aborted, span: Span, started: float, changed: bool) -> None:
        status: int | None
        if isinstance(result, _Fetched | _NotModified):
            outcome, reason, status = "accepted", ("ok" if changed else "not_modified"), result.status
        else:
            outcome, reason = "rejected", result.reason
            status = result.status if isinstance(result, _FetchFailed) else None
        snapshot = self._snapshot
        if span.is_recording():
            span.set_attribute("meshauth.outcome", outcome)
            span.set_attribute("meshauth.reason", reason)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if snapshot is not None:
                span.set_attribute("meshauth.jwks.keys", len(snapshot.keys))
            if outcome == "rejected":
                span.set_attribute("error.type", reason)
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        attributes = {"meshauth.outcome": outcome, "meshauth.reason": reason}
        self._fetch_counter.add(1, attributes)
        self._fetch_duration.record(time.perf_counter() - started, attributes)
        if isinstance(result, _FetchFailed):
            message = self._last_error
            if message != self._logged_error:
                keeping = "keeping the last good set" if snapshot is not None else "no key set yet"
                logger.warning("meshauth registry %s: fetch failed, %s: %s", self.source, keeping, message)
            self._logged_error = message
            audit(
                "jwks.refresh",
                "rejected",
                result.reason,
                span=span,
                level=logging.WARNING,
                source=self.source,
                detail=result.detail,
            )
        elif changed and snapshot is not None:
            self._logged_error = None
            problems = len(snapshot.keys.problems)
            audit("jwks.refresh", "accepted", "ok", span=span, source=self.source, keys=len(snapshot.keys))
            logger.info(
                "meshauth registry %s: loaded %d keys%s",
                self.source,
                len(snapshot.keys),
                f" ({problems} skipped)" if problems else "",
            )

    # -- management ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch now (or join the fetch in progress); return whether it succeeded."""
        flight, owner = self._claim(_Need("manual", None, wait=True), None)
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
        flight, owner = self._claim(_Need("manual", None, wait=True), loop)
        if flight is None:
            return False
        if owner:
            task = loop.create_task(self._fly_async(flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await flight.wait_async(self._wait_limit)
        return flight.ok

    @property
    def keyset(self) -> KeySet | None:
        """The key set in service, without fetching (``None`` before the first fetch)."""
        snapshot = self._snapshot
        return snapshot.keys if snapshot is not None else None

    def _document_for(self, snapshot: _Snapshot) -> dict[str, Any]:
        cached = self._document
        if cached is None or cached[0] is not snapshot.keys:
            cached = (snapshot.keys, snapshot.keys.to_jwks())
            self._document = cached
        return {"keys": [dict(jwk) for jwk in cached[1]["keys"]]}

    def to_jwks(self) -> dict[str, Any]:
        """The valid keys in service as a registry document (fetches if cold)."""
        flow = self._usable_flow()
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                return self._document_for(stop.value)
            self._fetch_sync(need)

    async def ato_jwks(self) -> dict[str, Any]:
        """Async :meth:`to_jwks` (the first rendering of a new set runs in a worker thread)."""
        flow = self._usable_flow()
        while True:
            try:
                need = next(flow)
            except StopIteration as stop:
                snapshot: _Snapshot = stop.value
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
        snapshot = self._snapshot
        return list(snapshot.keys.problems) if snapshot is not None else []

    def status(self) -> dict[str, Any]:
        """Readiness information: key count, age, freshness, last fetch and last error."""
        snapshot = self._snapshot
        now = self._monotonic()
        ready = snapshot is not None and now < snapshot.usable_until
        info: dict[str, Any] = {
            "source": self.source,
            "ready": ready,
            "keys": len(snapshot.keys) if snapshot is not None else 0,
            "age": now - snapshot.good_at if snapshot is not None else None,
            "fresh": snapshot is not None and now < snapshot.expires_at,
            "max_age": snapshot.max_age if snapshot is not None else None,
            "etag": snapshot.etag if snapshot is not None else None,
            "last_fetch": self._last_attempt_wall,
            "last_success": snapshot.fetched_wall if snapshot is not None else None,
            "last_change": snapshot.changed_wall if snapshot is not None else None,
            "last_error": self._last_error,
            "last_reason": self._last_reason,
            "consecutive_failures": self._failures,
            "fetches": self._fetches,
            "problems": list(snapshot.keys.problems[:_MAX_PROBLEMS_SHOWN]) if snapshot is not None else [],
        }
        return info

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        if snapshot is not None:
            yield Observation(self._monotonic() - snapshot.good_at, {"server.address": self._host})

    def close(self) -> None:
        """Stop fetching (the set in service stays usable until it is too stale); wait for refresh threads."""
        self._closed = True
        self._retry_at = math.inf
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(self._wait_limit)

    async def aclose(self) -> None:
        """Stop fetching and cancel refresh tasks of the running loop."""
        self._closed = True
        self._retry_at = math.inf
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop and task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with self._lock:
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
        snapshot = self._snapshot
        count = len(snapshot.keys) if snapshot is not None else 0
        return f"JWKSEndpoint({self.source!r}, keys={count})"
