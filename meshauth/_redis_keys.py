"""``RedisKeys``: the shared registry on Redis, held in memory and followed through the events stream."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics, trace

from ._exceptions import ConfigurationError, KeysUnavailable, MeshAuthError
from ._jws import strict_json_loads
from ._keys import KeyRecord, jwk_thumbprint, parse_jwk
from ._redis_common import (
    EVENT_OPS,
    SERVICE_NAME,
    Namespace,
    backoff,
    connect,
    dedicated,
    describe,
    is_cluster,
    redis_errors,
    wait_for_redis,
)
from ._redis_snapshot import load_snapshot, save_snapshot
from ._registry import KeySet
from ._telemetry import Telemetry

__all__ = ["RedisKeys"]

logger = logging.getLogger("meshauth.redis")

_Entries = dict[str, tuple[bytes, KeyRecord]]  # kid -> (the hash value as stored, its record)
# In-memory tombstones outlive the key's exp by this much, so a revoked kid that
# reappears after a Redis restart is refused as long as it could still verify.
_TOMBSTONE_MARGIN = 3600


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _stream_id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


class RedisKeys:
    """A key source reading the registry that publishers keep in Redis (DESIGN section 10).

    >>> keys = RedisKeys("redis://127.0.0.1:6379/0")            # doctest: +SKIP
    >>> verifier = meshauth.Verifier("payments", keys)           # doctest: +SKIP

    The constructor loads every service's keys (waiting at most
    ``startup_timeout`` seconds for Redis, then raising
    :class:`~meshauth.KeysUnavailable`); a background thread then follows the
    events stream with a blocking read on its own connection and re-reads the
    hash of each service an event names (events are hints, never keys), and
    reloads everything every ``resync`` seconds. Lookups are dictionary reads:
    no Redis command runs on the verification path.

    Authority: a key found in ``{ns}:keys:X`` is used only for service ``X``;
    an entry whose ``iss`` is not ``X``, that is not a valid public JWK, whose
    ``kid`` is not its RFC 7638 thumbprint or lacks ``nbf``/``exp`` is ignored
    and reported in :attr:`problems`. Kids in ``{ns}:revoked`` are never used,
    even if they reappear (this process remembers them).

    Outage: the last good key set keeps serving for ``max_stale`` seconds;
    meanwhile an unknown ``kid`` raises :class:`~meshauth.KeysUnavailable`
    (it may be a key published during the outage), and after ``max_stale``
    every lookup does. With ``snapshot=PATH`` the key set in service (public
    keys and tombstones) is also kept in a local file, and a verifier that
    starts while Redis is down serves that file instead of failing (the file's
    age counts towards ``max_stale``).
    """

    def __init__(
        self,
        client_or_url: Any,
        namespace: str = "meshauth",
        resync: float = 60,
        max_stale: float = 86400,
        *,
        block: float = 1.0,
        startup_timeout: float = 10.0,
        timeout: float = 2.0,
        follow: bool = True,
        snapshot: str | os.PathLike[str] | None = None,
        max_events: int = 1000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if resync <= 0 or max_stale < 0 or block <= 0:
            raise ValueError("resync and block must be positive and max_stale non-negative")
        self.ns = Namespace(namespace)
        self.client = connect(client_or_url, timeout=timeout)
        self.where = describe(self.client)
        self.resync = resync
        self.max_stale = max_stale
        self.block = block
        self.max_events = max_events
        self._clock = clock
        self._monotonic = monotonic
        telemetry = Telemetry(tracer_provider, meter_provider)
        self._tracer = telemetry.tracer
        self._propagation = telemetry.meter.create_histogram(
            "meshauth.registry.propagation", unit="s", description="From a registry change in Redis to applied here"
        )
        self._services: dict[str, _Entries] = {}
        self._revoked: dict[str, int] = {}
        self._index = KeySet(source=f"{self.where} namespace {namespace}")
        self._last_id = "0-0"
        self._last_good = monotonic()
        self._failing: str | None = None
        self._gap = False  # a connection broke since the last read: check the stream before resuming
        self._next_resync = 0.0
        self.problems: collections.deque[str] = collections.deque(maxlen=100)
        self.synced_at: float | None = None
        self._lock = threading.Lock()  # one writer at a time: the thread, or reload() from a caller
        self._stop = threading.Event()
        self.snapshot = snapshot
        self._saved: KeySet | None = None  # the index last written to the snapshot
        self._timeout = timeout
        self._blocking: Any = None  # the blocking read's own client, made on first use
        self._start(startup_timeout)
        self._thread: threading.Thread | None = None
        if follow:
            self._thread = threading.Thread(target=self._run, name=f"meshauth-redis-keys-{namespace}", daemon=True)
            self._thread.start()

    # -- key source ---------------------------------------------------------------------

    def get_key(self, kid: str) -> KeyRecord | None:
        record = self._index.get(kid)
        if self._failing is None:
            return record
        return self._degraded(kid, record)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return self.get_key(kid)

    def _degraded(self, kid: str, record: KeyRecord | None) -> KeyRecord | None:
        age = self._monotonic() - self._last_good
        if age > self.max_stale:
            raise KeysUnavailable(
                f"{self.where} unreachable for {age:.0f} s, beyond max_stale",
                expected=f"a key set read within {self.max_stale:.0f} s",
                actual=self._failing,
            )
        if record is None:
            raise KeysUnavailable(
                f"kid not in the last key set read {age:.0f} s ago, and {self.where} is failing",
                expected="a kid the registry could be asked about",
                actual=self._failing,
                kid=kid[:64],
            )
        return record

    @property
    def keyset(self) -> KeySet:
        """The key set in service (a new object after every change)."""
        return self._index

    def to_jwks(self) -> dict[str, Any]:
        return self._index.to_jwks()

    def services(self) -> dict[str, list[KeyRecord]]:
        """The keys in service, by owning service."""
        by_service: dict[str, list[KeyRecord]] = {}
        for record in self._index:
            by_service.setdefault(record.owner, []).append(record)
        return by_service

    def __len__(self) -> int:
        return len(self._index)

    def status(self) -> dict[str, Any]:
        """Readiness information: key count, last error, time since the last good read."""
        return {
            "source": f"{self.where} namespace {self.ns.name}",
            "keys": len(self._index),
            "last_error": self._failing,
            "age": self._monotonic() - self._last_good,
            "ready": self._failing is None or self._monotonic() - self._last_good <= self.max_stale,
        }

    def close(self) -> None:
        """Stop following the stream and close this source's connections."""
        self._stop.set()
        blocking = self._blocking
        if blocking is not None:
            blocking.connection_pool.disconnect()  # wakes the blocking read
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.block + 5)
        if blocking is not None:
            blocking.close()

    def __enter__(self) -> RedisKeys:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading Redis --------------------------------------------------------------------

    def _start(self, startup_timeout: float) -> None:
        try:
            wait_for_redis(
                self.reload,
                startup_timeout,
                lambda exc: KeysUnavailable(
                    f"cannot load the key registry from {self.where} within {startup_timeout:g} s: {exc.detail}",
                    expected="a reachable Redis server",
                    actual=exc.detail,
                ),
            )
        except KeysUnavailable as exc:
            if self.snapshot is None or not os.path.exists(self.snapshot):
                raise
            self._start_from_snapshot(exc)
        self._save_snapshot()

    def _start_from_snapshot(self, error: KeysUnavailable) -> None:
        """Serve the snapshot as the last good set (its age counts towards ``max_stale``)."""
        assert self.snapshot is not None
        self._index, self._revoked, saved_at = load_snapshot(self.snapshot, self.ns.name)
        self._saved = self._index
        for record in self._index:  # as if read from each service's hash: events update them one by one
            self._services.setdefault(record.owner, {})[record.kid] = (b"", record)
        self._last_good = self._monotonic() - max(0.0, self._clock() - saved_at)
        self._failing = error.detail
        self._gap = True
        logger.warning(
            "meshauth registry %s: %s; serving the snapshot %s (%d keys) until Redis answers",
            self.where,
            error.detail,
            os.fspath(self.snapshot),
            len(self._index),
        )

    def _save_snapshot(self) -> None:
        if self.snapshot is None or self._index is self._saved or self._failing is not None:
            return
        index = self._index
        try:
            save_snapshot(self.snapshot, index, self._revoked, self.ns.name, self._clock())
        except OSError as exc:
            self._report(f"cannot write the snapshot {os.fspath(self.snapshot)!r}: {exc.strerror}")
            return
        self._saved = index

    def reload(self) -> None:
        """Read every service's keys now (the background thread does this every ``resync`` s)."""
        with self._tracer.start_as_current_span("meshauth.registry.sync") as span:
            span.set_attribute("meshauth.registry.mode", "full")
            try:
                self._reload()
            except MeshAuthError as exc:
                span.set_attribute("meshauth.outcome", "unavailable")
                span.set_attribute("meshauth.reason", exc.reason)
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.reason))
                raise
            span.set_attribute("meshauth.outcome", "accepted")
            span.set_attribute("meshauth.registry.keys", len(self._index))

    def _reload(self) -> None:
        ns = self.ns
        with redis_errors(self.client, "SMEMBERS/HGETALL/XREVRANGE", f"{{{ns.name}}}:*"):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.xrevrange(ns.events, count=1)
                pipe.smembers(ns.services)
                pipe.hgetall(ns.revoked)
                last, members, revoked = pipe.execute()
            names = sorted(n for n in (_text(m) for m in members) if SERVICE_NAME.fullmatch(n))
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(ns.keys(name))
                hashes = pipe.execute() if names else []
        with self._lock:
            if not names and self._services and not last:
                # Redis lost everything (restarted empty): keep serving what we had while
                # publishers republish; their events and the next reload bring it back.
                self._report(f"{self.where} holds no registry (restarted empty?): keeping the last key set")
            else:
                self._services = {
                    name: self._parse_hash(name, raw, self._services.get(name, {}))
                    for name, raw in zip(names, hashes, strict=True)
                }
            self._merge_revoked(revoked)
            self._last_id = _text(last[0][0]) if last else "0-0"
            self._rebuild()
            self._healthy()
            self._next_resync = self._monotonic() + self.resync

    def _follow(self) -> None:
        """One blocking read of the events stream, then re-read what the events name."""
        ns = self.ns
        if self._gap:
            self._check_gap()
            if self._gap:
                return
        if self._blocking is None:
            self._blocking = dedicated(self.client, timeout=self._timeout + self.block, key=ns.events)
        with redis_errors(self._blocking, "XREAD", ns.events):
            response = self._blocking.xread(
                {ns.events: self._last_id}, count=self.max_events, block=max(1, int(self.block * 1000))
            )
        if not response:
            self._healthy()
            return
        entries = response[0][1]
        named: set[str] = set()
        for entry_id, fields in entries:
            service = self._event_service(entry_id, fields)
            if service is not None:
                named.add(service)
        with self._tracer.start_as_current_span("meshauth.registry.sync") as span:
            span.set_attribute("meshauth.registry.mode", "events")
            span.set_attribute("meshauth.registry.events", len(entries))
            self._reread(sorted(named), _text(entries[-1][0]))
        now = self._clock()
        for entry_id, _ in entries:
            self._propagation.record(max(0.0, now - _stream_id(entry_id)[0] / 1000))

    def _event_service(self, entry_id: Any, fields: Mapping[Any, Any]) -> str | None:
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        service, op = decoded.get("service", ""), decoded.get("op")
        if not SERVICE_NAME.fullmatch(service) or op not in EVENT_OPS:
            self._report(f"events entry {_text(entry_id)} ignored: not a registry event")
            return None
        return service

    def _reread(self, names: list[str], last_id: str) -> None:
        ns = self.ns
        where = ns.keys(names[0]) if names else ns.revoked
        with redis_errors(self.client, "HGETALL", where), self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(ns.revoked)
            for name in names:
                pipe.hgetall(ns.keys(name))
            revoked, *hashes = pipe.execute()
        with self._lock:
            services = dict(self._services)
            for name, raw in zip(names, hashes, strict=True):
                if raw:
                    services[name] = self._parse_hash(name, raw, services.get(name, {}))
                else:
                    services.pop(name, None)
            self._services = services
            self._merge_revoked(revoked)
            self._last_id = last_id
            self._rebuild()
            self._healthy()

    def _check_gap(self) -> None:
        """After a reconnect: resume from the last id, or reload if the stream lost entries since."""
        with redis_errors(self.client, "XINFO STREAM", self.ns.events):
            try:
                info = self.client.xinfo_stream(self.ns.events)
            except Exception as exc:
                if "no such key" not in str(exc).lower():
                    raise
                info = None
        last = _stream_id(self._last_id)
        trimmed = info is None and last != (0, 0)
        if info is not None:
            # Trimming moves the first entry past our position (XDEL raises max-deleted-entry-id);
            # a last id below ours means the stream was recreated.
            first = info.get("first-entry")
            trimmed = (
                (bool(first) and _stream_id(first[0]) > last)
                or _stream_id(info.get("max-deleted-entry-id") or "0-0") > last
                or _stream_id(info.get("last-generated-id") or "0-0") < last
            )
        if trimmed:
            self.reload()
        self._gap = False

    # -- building the key set -------------------------------------------------------------

    def _parse_hash(self, service: str, raw: Mapping[Any, Any], previous: _Entries) -> _Entries:
        entries: _Entries = {}
        for field, value in raw.items():
            kid = _text(field)
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            known = previous.get(kid)
            if known is not None and known[0] == data:
                entries[kid] = known  # unchanged: keep the very same record
                continue
            record = self._parse_entry(service, kid, data)
            if record is not None:
                entries[kid] = (data, record)
        return entries

    def _parse_entry(self, service: str, kid: str, data: bytes) -> KeyRecord | None:
        where = f"{{{self.ns.name}}}:keys:{service} field {kid[:64]!r}"
        try:
            jwk = strict_json_loads(data.decode("utf-8"))
            record = parse_jwk(jwk, where)
        except ConfigurationError as exc:
            self._report(f"{where} ignored: {exc.detail}")
            return None
        except (ValueError, RecursionError):
            self._report(f"{where} ignored: not a JSON object")
            return None
        problem = None
        if record.owner != service:
            problem = f"its iss {record.owner[:64]!r} is not the service of the hash"
        elif record.kid != kid or record.kid != jwk_thumbprint(jwk):
            problem = "its kid is not the field name and the key's RFC 7638 thumbprint"
        elif record.not_before is None or record.expires is None:
            problem = "a key published on Redis needs nbf and exp"
        if problem is not None:
            self._report(f"{where} ignored: {problem}")
            return None
        return record

    def _merge_revoked(self, raw: Mapping[Any, Any]) -> None:
        now = self._clock()
        merged = {kid: exp for kid, exp in self._revoked.items() if exp + _TOMBSTONE_MARGIN > now}
        for field, value in raw.items():
            try:
                merged[_text(field)] = int(_text(value))
            except ValueError:
                merged[_text(field)] = int(now) + _TOMBSTONE_MARGIN  # unreadable exp: keep it revoked
        self._revoked = merged

    def _rebuild(self) -> None:
        """Publish a new index: revoked kids out, a kid claimed by two services out (fail closed)."""
        owners: dict[str, list[KeyRecord]] = {}
        for entries in self._services.values():
            for kid, (_, record) in entries.items():
                if kid not in self._revoked:
                    owners.setdefault(kid, []).append(record)
        records: list[KeyRecord] = []
        for kid, claimed in owners.items():
            if len(claimed) == 1:
                records.append(claimed[0])
                continue
            current = self._index.get(kid)
            if current is not None and any(r is current for r in claimed):
                records.append(current)  # the first owner seen keeps it; the copy is reported
            names = sorted(r.owner for r in claimed)
            self._report(f"kid {kid[:64]!r} is published by several services {names}: only the first owner counts")
        if self._same(records):
            return
        self._index = KeySet(records, source=self._index.source)

    def _same(self, records: Iterable[KeyRecord]) -> bool:
        current = self._index
        count = 0
        for record in records:
            count += 1
            if current.get(record.kid) is not record:
                return False
        return count == len(current)

    def _healthy(self) -> None:
        if self._failing is not None:
            logger.info("meshauth registry %s: reachable again", self.where)
        self._failing = None
        self._last_good = self._monotonic()
        self.synced_at = self._clock()

    def _report(self, problem: str) -> None:
        if problem not in self.problems:
            logger.warning("meshauth registry %s: %s", self.where, problem)
            self.problems.append(problem)

    # -- the background thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._blocking is not None:
                self._blocking.close()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._monotonic() >= self._next_resync:
                    self.reload()
                else:
                    self._follow()
                failures = 0
                self._save_snapshot()
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures += 1
                self._failed(exc, failures)

    def _failed(self, exc: Exception, failures: int) -> None:
        detail = exc.detail if isinstance(exc, MeshAuthError) else f"{type(exc).__name__}: {exc}"
        if self._failing is None:
            logger.warning("meshauth registry %s: serving the last key set: %s", self.where, detail)
        self._failing = detail
        self._gap = True
        if is_cluster(self.client) and self._blocking is not None:
            self._blocking.close()  # the slot may have moved to another node: ask again
            self._blocking = None
        # Exponential backoff with jitter, so many verifiers do not reconnect in step.
        self._stop.wait(backoff(failures, base=0.1, cap=10.0, doublings=8))
