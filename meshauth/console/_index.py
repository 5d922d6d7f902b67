"""The console's view of its audit logs: counters kept as lines arrive, pages read on demand.

Memory stays bounded whatever the size of the logs: the follower keeps only
counters (lines, malformed lines, outcomes per minute over the last hour, the
callers seen, capped), and every list of decisions is read from the files when
it is asked for, newest first, with the filters searched as byte strings before
a line is parsed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ._logs import AuditLog, Line, Segment, complete_end, lines_backward, offset_before, parse_record, record_time

__all__ = ["FILTERS", "AuditIndex", "Page"]

# query parameter -> record field; every filter is a substring match, except ``outcome`` (exact)
FILTERS: Mapping[str, str] = {
    "outcome": "outcome",
    "reason": "reason",
    "caller": "caller",
    "subject": "subject",
    "audience": "audience",
    "method": "method",
    "path": "path",
    "rule": "rule",
    "trace": "trace_id",
    "transaction": "transaction",
    "event": "event",
}
EXACT = frozenset({"outcome"})
CHART_MINUTES = 60
MAX_CALLERS = 10_000
MAX_BARS_PER_MINUTE = 48
SEARCH_PRIORITY = 5.0  # seconds the follower waits at most for running searches
MAX_TRANSACTION = 1000
FOLLOW_BYTES = 2 << 20  # per log and call of follow(): a huge log is counted in slices
CURSOR = re.compile(r"\A\d{1,4}:\d{1,9}:\d{1,15}(?:,\d{1,4}:\d{1,9}:\d{1,15})*\Z")


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of decisions, newest first, and the cursor of the next page (``None``: no more)."""

    decisions: list[dict[str, Any]]
    next: str | None
    partial: bool  # the search stopped at its time limit before filling the page


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _needles(text: str) -> tuple[bytes, ...]:
    """How ``text`` can appear inside a JSON string on a line: escaped with and without ``ensure_ascii``."""
    forms = {json.dumps(text, ensure_ascii=False)[1:-1].encode(), json.dumps(text)[1:-1].encode()}
    return tuple(sorted(forms))


def matches(record: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    """Whether ``record`` passes every filter (query names of :data:`FILTERS`)."""
    for name, wanted in filters.items():
        found = _text(record.get(FILTERS[name]))
        if (found != wanted) if name in EXACT else (wanted not in found):
            return False
    return True


_Facts = tuple[str | None, float | None, tuple[str, str]]  # caller, time, (outcome, reason)


def _facts(data: bytes) -> _Facts | None:
    """What the counters need from one line (``None``: a malformed line)."""
    record = parse_record(data)
    if record is None:
        return None
    caller = record.get("caller")
    return (
        caller if isinstance(caller, str) else None,
        record_time(record),
        (_text(record.get("outcome")), _text(record.get("reason"))),
    )


class _Scan:
    """One log read backwards from a position: the current segment first, then older ones."""

    def __init__(
        self,
        log: AuditLog,
        start: tuple[int, int] | None,
        needles: tuple[tuple[bytes, ...], ...],
        before: float | None = None,
    ) -> None:
        self.log = log
        segments = log.segments()

        def end(segment: Segment) -> int:
            last = complete_end(segment)
            return last if before is None or start is not None else offset_before(segment, last, before)

        if start is None:
            start = (segments[0].serial, end(segments[0])) if segments else (0, 0)
        self.position = start  # everything above it was returned or rejected
        self._plan: list[tuple[Segment, int]] = []
        for segment in segments:
            if segment.serial == start[0]:
                self._plan.append((segment, start[1]))
            elif segment.serial < start[0]:
                self._plan.append((segment, end(segment)))
        self._needles = needles

    def lines(self, deadline: float, clock: Callable[[], float]) -> Iterator[Line]:
        for segment, end in self._plan:

            def reached(offset: int, serial: int = segment.serial) -> None:
                self.position = (serial, offset)
                if clock() > deadline:
                    raise TimeoutError

            for line in lines_backward(segment, end, self._needles, reached):
                self.position = (line.serial, line.end)
                yield line
                self.position = (line.serial, line.start)
                if clock() > deadline:
                    raise TimeoutError
            self.position = (segment.serial, 0)
        self.position = (0, 0)


def _parse_cursor(cursor: str | None, count: int) -> list[tuple[int, int] | None]:
    starts: list[tuple[int, int] | None] = [None] * count
    if cursor:
        for part in cursor.split(","):
            number, serial, offset = (int(piece) for piece in part.split(":"))
            if number < count:
                starts[number] = (serial, offset)
    return starts


class AuditIndex:
    """Audit logs followed together; counters for the chart and the keys view, pages on demand."""

    def __init__(self, paths: Sequence[str], *, clock: Callable[[], float] = time.time) -> None:
        self.logs = [AuditLog(path, number) for number, path in enumerate(paths)]
        self.clock = clock
        self.version = 0  # changes whenever a line is counted
        self._minutes: dict[int, dict[tuple[str, str], int]] = {}
        self._callers: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._searches = 0

    def open(self) -> None:
        """Open each log that exists (before following starts, so the first page already has them)."""
        for log in self.logs:
            log.sync()

    def close(self) -> None:
        """Close every file."""
        for log in self.logs:
            log.close()

    # -- following -------------------------------------------------------------------------------

    def follow(self, budget: int = FOLLOW_BYTES) -> bool:
        """Count what was appended to each log; return whether any log has more to read."""
        more = False
        for log in self.logs:
            log.sync()
            for segment in reversed(log.segments()):
                self._yield_to_searches()
                already = segment.counted
                self._tally(log, [_facts(data) for data in log.read_new(segment, budget) if data.strip()])
                more = more or segment.counted - already >= budget
        return more

    def _yield_to_searches(self) -> None:
        """Wait while a page or transaction is being searched: a person waits for those, not for the counts."""
        with self._idle:
            self._idle.wait_for(lambda: self._searches == 0, timeout=SEARCH_PRIORITY)

    @contextlib.contextmanager
    def _search(self) -> Iterator[None]:
        with self._idle:
            self._searches += 1
        try:
            yield
        finally:
            with self._idle:
                self._searches -= 1
                self._idle.notify_all()

    def _tally(self, log: AuditLog, batch: list[_Facts | None]) -> None:
        """Add one batch of lines to the counters (one lock for the batch: the lines were parsed outside it)."""
        oldest = self.clock() - (CHART_MINUTES + 1) * 60
        with self._lock:
            self.version += len(batch)
            log.lines += len(batch)
            for facts in batch:
                if facts is None:
                    log.malformed += 1
                    continue
                caller, when, key = facts
                if caller is not None and (caller in self._callers or len(self._callers) < MAX_CALLERS):
                    self._callers[caller] = self._callers.get(caller, 0) + 1
                if when is None or when < oldest:
                    continue
                bucket = self._minutes.setdefault(int(when // 60), {})
                if key not in bucket and len(bucket) >= MAX_BARS_PER_MINUTE:  # a flood of invented reasons
                    key = (key[0], "(other reasons)")
                bucket[key] = bucket.get(key, 0) + 1

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Each log's state and counters, and the version (it changes when a line arrives)."""
        logs = []
        for log in self.logs:
            segments = log.segments()
            size = sum(segment.size() for segment in segments)
            uncounted = sum(log.uncounted(segment) for segment in segments)
            logs.append(
                {
                    "number": log.number,
                    "path": log.path,
                    "state": log.state,
                    "lines": log.lines,
                    "malformed": log.malformed,
                    "rotations": log.rotations,
                    "indexed": 0.0
                    if log.state == "waiting"
                    else 1.0
                    if uncounted == 0
                    else round(1 - uncounted / size, 4),
                }
            )
        return {"version": self.version, "now": self.clock(), "logs": logs}

    def callers(self) -> dict[str, int]:
        """Callers seen in the logs so far (at most ``MAX_CALLERS`` names), with their decision counts."""
        with self._lock:
            return dict(self._callers)

    def chart(self) -> dict[str, Any]:
        """Decisions per minute over the last hour, by outcome and reason."""
        now_minute = int(self.clock() // 60)
        first = now_minute - CHART_MINUTES + 1
        with self._lock:
            for minute in [m for m in self._minutes if m < first]:
                del self._minutes[minute]
            minutes = [
                {
                    "minute": minute * 60,
                    "counts": [
                        {"outcome": outcome, "reason": reason, "count": count}
                        for (outcome, reason), count in sorted(self._minutes.get(minute, {}).items())
                    ],
                }
                for minute in range(first, now_minute + 1)
            ]
        return {"start": first * 60, "minutes": minutes}

    def decisions(
        self,
        filters: Mapping[str, str],
        *,
        before: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
        time_limit: float = 1.0,
    ) -> Page:
        """A page of decisions passing ``filters`` (and at or before ``before``), newest first across every log."""
        needles = tuple(_needles(value) for value in filters.values() if value)
        starts = _parse_cursor(cursor, len(self.logs))
        with self._search():
            scans = [_Scan(log, start, needles, before) for log, start in zip(self.logs, starts, strict=True)]
            return self._merge(scans, filters, before, limit, time.monotonic() + time_limit)

    def _merge(
        self, scans: list[_Scan], filters: Mapping[str, str], before: float | None, limit: int, deadline: float
    ) -> Page:
        """Take the newest of the logs' next decisions until the page is full, the logs end or time is up."""
        heads: list[tuple[float, int, dict[str, Any]]] = []
        streams = [self._records(scan, filters, deadline, before) for scan in scans]
        pending: dict[int, Line] = {}
        last: dict[int, float] = {}  # each log's last time: a record without one keeps its place in its file
        decisions: list[dict[str, Any]] = []
        partial = False
        try:
            for number, stream in enumerate(streams):
                self._advance(number, stream, heads, pending, last)
            while heads and len(decisions) < limit:
                _, number, item = heapq.heappop(heads)
                del pending[number]
                decisions.append(item)
                self._advance(number, streams[number], heads, pending, last)
        except TimeoutError:
            partial = True
        positions = []
        for number, scan in enumerate(scans):
            line = pending.get(number)
            serial, offset = (line.serial, line.end) if line is not None else scan.position
            positions.append(f"{number}:{serial}:{offset}")
        exhausted = not heads and not partial
        return Page(decisions, None if exhausted else ",".join(positions), partial)

    @staticmethod
    def _advance(
        number: int,
        stream: Iterator[tuple[Line, dict[str, Any]]],
        heads: list[tuple[float, int, dict[str, Any]]],
        pending: dict[int, Line],
        last: dict[int, float],
    ) -> None:
        found = next(stream, None)
        if found is not None:
            line, item = found
            pending[number] = line
            when = item["time"] if item["time"] is not None else last.get(number, math.inf)
            last[number] = when
            heapq.heappush(heads, (-when, number, item))

    def _records(
        self, scan: _Scan, filters: Mapping[str, str], deadline: float, before: float | None
    ) -> Iterator[tuple[Line, dict[str, Any]]]:
        for line in scan.lines(deadline, time.monotonic):
            record = parse_record(line.data)
            if record is None or not matches(record, filters):
                continue
            item = self._item(scan.log, line, record)
            if before is None or (item["time"] is not None and item["time"] <= before):
                yield line, item

    @staticmethod
    def _item(log: AuditLog, line: Line, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "log": log.number,
            "id": f"{log.number}:{line.serial}:{line.start}",
            "time": record_time(record),
            "record": record,
        }

    def transaction(self, identifier: str, *, time_limit: float = 5.0) -> dict[str, Any]:
        """Every decision whose transaction or trace id is ``identifier``, across all logs, oldest first."""
        needles = (_needles(identifier),)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + time_limit
        partial = False
        with self._search():
            for log in self.logs:
                scan = _Scan(log, None, needles)
                try:
                    for line in scan.lines(deadline, time.monotonic):
                        record = parse_record(line.data)
                        if record is not None and identifier in (record.get("transaction"), record.get("trace_id")):
                            found.append(self._item(log, line, record))
                            if len(found) >= MAX_TRANSACTION:
                                raise TimeoutError
                except TimeoutError:
                    partial = True
                    break
        found.sort(key=lambda item: (item["time"] or 0.0, item["log"]))
        return {"id": identifier, "decisions": found, "partial": partial}
