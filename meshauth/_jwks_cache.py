"""The JWKS cache policy, written once and free of I/O.

:class:`KeyCache` holds the key set in service and its timers, and says, as
generators, what a caller needs:

* :meth:`KeyCache.lookup_flow` for one ``kid``: the cached set answers, or a
  fetch is needed first (cold, past max-age, past ``max_stale``), or a
  background refresh should start (refresh ahead), or an unknown ``kid``
  deserves a refetch (cooldown, negative cache); it yields :class:`Need` and
  returns the record, ``None`` (unknown), or raises
  :class:`~meshauth.KeysUnavailable`;
* :func:`fetch_flow` is one fetch with retries: it yields the request to send
  (:class:`Send`) or a pause (:class:`Sleep`) and receives each
  :class:`~meshauth._jwks_http.Reply`.

:class:`~meshauth.JWKSEndpoint` drives both, with threads or with tasks; a
fetch in progress is one :class:`Flight`, shared by every caller (single
flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import threading
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Final, TypeVar

from ._exceptions import KeysUnavailable
from ._jwks_http import Fetched, FetchFailed, NotModified, Reply
from ._keys import KeyRecord
from ._keyset import KeySet

__all__ = [
    "Backoff",
    "Flight",
    "KeyCache",
    "Need",
    "Send",
    "Sleep",
    "Snapshot",
    "drive_async",
    "drive_sync",
    "fetch_flow",
]

NEVER: Final = float("-inf")
_NEGATIVE_CACHE_SIZE: Final = 10_000

Outcome = Fetched | NotModified | FetchFailed
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Fetch command: send one GET with these headers."""

    headers: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Sleep:
    """Fetch command: pause before the next attempt."""

    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Need:
    """Lookup command: a fetch is wanted.

    ``wait``: the caller waits for a fetch it starts; ``join``: it also waits
    for one somebody else started. ``generation`` is the count of completed
    fetches when the caller looked (``None``: fetch regardless).
    """

    trigger: str  # cold | stale | expired | refresh | unknown_kid | manual
    generation: int | None
    wait: bool
    join: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses between the attempts of one fetch: ``base * 2**(n-1)``, at most ``cap``, plus jitter.

    The jitter (uniform in ``[0, jitter]``) keeps a fleet of verifiers from
    retrying in lockstep.
    """

    base: float = 0.5
    cap: float = 4.0
    jitter: float = 0.5

    def __call__(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** (attempt - 1)) + random.uniform(0, self.jitter)  # noqa: S311 - not crypto


def fetch_flow(
    headers: dict[str, str],
    retries: int,
    pause: Callable[[int], float],
    judge: Callable[[Reply], _T],
) -> Generator[Send | Sleep, Reply | None, _T | FetchFailed]:
    """One fetch: up to ``retries`` attempts, pausing ``pause(attempt)`` after each retryable failure.

    ``judge`` turns a reply into a result or raises :class:`FetchFailed`.
    """
    attempt = 1
    while True:
        reply = yield Send(headers)
        assert reply is not None
        try:
            return judge(reply)
        except FetchFailed as failure:
            if not failure.retryable or attempt >= retries:
                return failure
        yield Sleep(pause(attempt))
        attempt += 1


Flow = Generator[Send | Sleep, Reply | None, _T]


def drive_sync(flow: Flow[_T], get: Callable[[Mapping[str, str]], Reply], sleep: Callable[[float], None]) -> _T:
    """Run a fetch flow with blocking I/O."""
    reply: Reply | None = None
    while True:
        try:
            command = flow.send(reply)
        except StopIteration as stop:
            result: _T = stop.value
            return result
        if isinstance(command, Sleep):
            sleep(max(command.seconds, 0.0))
            reply = None
        else:
            reply = get(command.headers)


async def drive_async(flow: Flow[_T], aget: Callable[[Mapping[str, str]], Awaitable[Reply]]) -> _T:
    """Run a fetch flow on the event loop."""
    reply: Reply | None = None
    while True:
        try:
            command = flow.send(reply)
        except StopIteration as stop:
            result: _T = stop.value
            return result
        if isinstance(command, Sleep):
            await asyncio.sleep(max(command.seconds, 0.0))
            reply = None
        else:
            reply = await aget(command.headers)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
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


class Flight:
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


@dataclasses.dataclass(frozen=True, slots=True)
class Freshness:
    """How long a key set is trusted, and how often it may be fetched (seconds)."""

    cooldown: float
    max_stale: float
    min_max_age: float
    max_max_age: float
    default_max_age: float
    refresh_ahead: float
    negative_ttl: float

    def lifetime(self, max_age: float | None, previous: float | None) -> float:
        """The served max-age (else the previous one, else the default), clamped."""
        if max_age is None:
            max_age = previous if previous is not None else self.default_max_age
        return min(max(max_age, self.min_max_age), self.max_max_age)


class KeyCache:
    """The key set in service, its timers, and the policy deciding when to fetch (no I/O here)."""

    def __init__(self, source: str, policy: Freshness, monotonic: Callable[[], float]) -> None:
        self.source = source
        self.policy = policy
        self.monotonic = monotonic
        self.lock = threading.Lock()
        self.snapshot: Snapshot | None = None
        self.flight: Flight | None = None
        self.generation = 0
        self.last_started = NEVER
        self.retry_at = NEVER
        self.failures = 0
        self.fetches = 0
        self.last_error: str | None = None
        self.last_reason: str | None = None
        self.last_failure: FetchFailed | None = None
        self.last_attempt_wall: float | None = None
        self.negative: dict[str, float] = {}
        self.closed = False

    def served(self, kid: str) -> KeyRecord | None:
        """The cached record for ``kid`` when no lookup flow is needed (the hot path), else None."""
        snapshot = self.snapshot
        if snapshot is not None:
            now = self.monotonic()
            # Fresh; or a refresh failed and backs off: the last good set, while usable.
            if now < snapshot.refresh_at or (now < self.retry_at and now < snapshot.usable_until):
                return snapshot.keys.get(kid)
        return None

    def usable_flow(self) -> Generator[Need, None, Snapshot]:
        """Make sure a usable set is in service, fetching first when it is past its max-age."""
        generation = self.generation  # read before the snapshot: see claim()
        snapshot = self.snapshot
        now = self.monotonic()
        if snapshot is None or now >= snapshot.usable_until:
            yield Need("cold" if snapshot is None else "stale", generation, wait=True)
            snapshot = self.snapshot
            if snapshot is None or self.monotonic() >= snapshot.usable_until:
                raise self.unavailable()
        elif now >= snapshot.expires_at:
            # Past max-age: refresh before answering, so that a revoked key is not
            # used again. A fetch already in flight is not waited for (callers
            # with a cached kid never wait); a failed one leaves the last good set.
            yield Need("expired", generation, wait=True, join=False)
            snapshot = self.snapshot or snapshot
        elif now >= snapshot.refresh_at:
            yield Need("refresh", generation, wait=False)
        return snapshot

    def lookup_flow(self, kid: str) -> Generator[Need, None, KeyRecord | None]:
        snapshot = yield from self.usable_flow()
        record = snapshot.keys.get(kid)
        if record is not None:
            return record
        if self.negative.get(kid, NEVER) > self.monotonic():
            self._check_absent(kid)
            return None
        generation = self.generation
        snapshot = self.snapshot or snapshot
        record = snapshot.keys.get(kid)
        if record is not None:
            return record
        # Join a fetch in progress, or refetch if the cooldown allows: a rotated
        # key is picked up without waiting for the set to expire.
        yield Need("unknown_kid", generation, wait=True)
        snapshot = self.snapshot or snapshot
        record = snapshot.keys.get(kid)
        if record is None:
            self._remember_absent(kid)
            self._check_absent(kid)
        return record

    def _check_absent(self, kid: str) -> None:
        """An unknown ``kid`` is ``unknown_kid`` only when the registry was read successfully."""
        if self.failures:
            raise KeysUnavailable(
                f"{self.source}: kid {kid[:64]!r} is not in the last good key set and the registry cannot be "
                f"read to look for it (last error: {self.last_error})",
                kid=kid[:64],
            )

    def _remember_absent(self, kid: str) -> None:
        negative = self.negative
        if len(negative) >= _NEGATIVE_CACHE_SIZE:
            negative.clear()
        negative[kid] = self.monotonic() + self.policy.negative_ttl

    def _may_start(self, trigger: str, now: float) -> bool:
        if self.closed:
            return False
        if trigger == "manual":
            return True
        if now < self.retry_at:
            return False
        if trigger == "unknown_kid":
            return now - self.last_started >= self.policy.cooldown
        return True

    def claim(self, need: Need, loop: asyncio.AbstractEventLoop | None) -> tuple[Flight | None, bool]:
        """The flight to wait for (``None``: none) and whether this caller must run it."""
        with self.lock:
            flight = self.flight
            if flight is not None:
                return (flight if need.join else None), False
            now = self.monotonic()
            # A fetch that completed after the caller looked at the cache
            # already answered its question: look again instead of refetching.
            if need.generation is not None and need.generation != self.generation:
                return None, False
            if not self._may_start(need.trigger, now):
                return None, False
            flight = Flight(need.trigger, loop)
            self.flight = flight
            self.last_started = now
            self.fetches += 1
            return flight, True

    def unavailable(self) -> KeysUnavailable:
        why = f" (last error: {self.last_error})" if self.last_error else ""
        if self.snapshot is None:
            return KeysUnavailable(f"{self.source}: no key set could be fetched yet{why}")
        return KeysUnavailable(f"{self.source}: the last good key set is older than max_stale{why}")

    def complete(self, result: Outcome | None, wall: float) -> bool:
        """Apply a fetch's verdict (``None``: aborted, no verdict); return whether the set changed."""
        now = self.monotonic()
        with self.lock:
            changed = False
            if isinstance(result, Fetched | NotModified):
                changed = self._renew(result, now, wall)
            elif isinstance(result, FetchFailed):
                self.failures += 1
                self.retry_at = now + min(max(self.policy.cooldown, 1.0), 2.0 ** min(self.failures - 1, 16))
                self.last_error = f"{result.reason}: {result.detail}"
                self.last_failure = result
            if result is not None:
                self.last_attempt_wall = wall
                self.last_reason = result.reason if isinstance(result, FetchFailed) else None
            self.flight = None
            self.generation += 1
            return changed

    def _renew(self, result: Fetched | NotModified, now: float, wall: float) -> bool:
        previous = self.snapshot
        if isinstance(result, Fetched):
            keys, digest, changed_wall = result.keys, result.digest, wall
            ttl = self.policy.lifetime(result.max_age, None)
        else:
            assert previous is not None
            keys, digest, changed_wall = previous.keys, previous.digest, previous.changed_wall
            # A 304 without Cache-Control keeps the lifetime the set had.
            ttl = self.policy.lifetime(result.max_age, previous.max_age)
        self.snapshot = Snapshot(
            keys=keys,
            etag=result.etag,
            digest=digest,
            max_age=ttl,
            good_at=now,
            refresh_at=now + ttl * (1 - self.policy.refresh_ahead),
            expires_at=now + ttl,
            usable_until=now + max(ttl, self.policy.max_stale),
            fetched_wall=wall,
            changed_wall=changed_wall,
        )
        if isinstance(result, Fetched):
            self.negative = {}
        self.failures = 0
        self.retry_at = math.inf if self.closed else NEVER
        self.last_error = None
        self.last_failure = None
        return isinstance(result, Fetched)

    def close(self) -> None:
        self.closed = True
        self.retry_at = math.inf
