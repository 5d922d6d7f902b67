"""Audit log files as the console reads them: followed forwards, scanned backwards.

Nothing here keeps records in memory. A :class:`AuditLog` holds open file
descriptors (the current file and, after a rotation, the one before it), the
byte offset up to which the follower has counted lines, and counters. Pages of
decisions are read on demand, newest first, with ``os.pread`` from the end of
each file (never ``mmap``: a log truncated under a mapping would crash the
process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["AuditLog", "Line", "Segment", "parse_record", "record_time"]

BLOCK = 1 << 20
MAX_LINE = 1 << 20  # a longer line is skipped as malformed
KEEP_SEGMENTS = 2  # the current file and the one it replaced
RETIRE_AFTER = 60.0  # seconds a dropped file stays open for the searches still reading it


@dataclasses.dataclass(slots=True)
class Segment:
    """One file the log's path pointed to: its open descriptor and how far it is counted."""

    serial: int
    fd: int
    identity: tuple[int, int]
    counted: int = 0  # bytes the follower has read (always at a line boundary)
    complete: int = 0  # end of the last complete line seen
    skipping: bool = False  # inside an overlong line

    def size(self) -> int:
        return os.fstat(self.fd).st_size


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One complete line of a segment: ``start`` is its offset, ``end`` the offset after its newline."""

    serial: int
    start: int
    end: int
    data: bytes


def parse_record(data: bytes) -> dict[str, Any] | None:
    """The audit record on one line, or ``None`` when the line is not a JSON object."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    nested = value.get("meshauth")
    if isinstance(nested, dict):  # a formatter that keeps extra={"meshauth": {...}} nested
        value = {**value, **nested}
        del value["meshauth"]
    return value


def record_time(record: dict[str, Any]) -> float | None:
    """The decision's time in POSIX seconds: ``time``, else the ISO ``timestamp``."""
    value = record.get("time")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    stamp = record.get("timestamp")
    if isinstance(stamp, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.datetime.fromisoformat(stamp)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=datetime.UTC)
            return parsed.timestamp()
    return None


class AuditLog:
    """One audit log path, followed across rotation, truncation and disappearance."""

    def __init__(self, path: str, number: int) -> None:
        self.path = path
        self.number = number
        self.state = "waiting"  # "ok", "missing", "unreadable: ..."
        self.lines = 0
        self.malformed = 0
        self.rotations = 0
        self._segments: list[Segment] = []
        self._retired: list[tuple[float, int]] = []  # (when, fd) of dropped segments, closed later
        self._serial = 0
        self._lock = threading.Lock()

    # -- following -------------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """The open segments, newest first."""
        with self._lock:
            return list(reversed(self._segments))

    def sync(self) -> Segment | None:
        """Notice a new, replaced, truncated or vanished file; return the segment to read."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self.state = "missing"
            return self._segments[-1] if self._segments else None
        except OSError as exc:
            self.state = f"unreadable: {exc.strerror or exc}"
            return self._segments[-1] if self._segments else None
        identity = (status.st_dev, status.st_ino)
        current = self._segments[-1] if self._segments else None
        if current is not None and current.identity == identity and status.st_size >= current.counted:
            self.state = "ok"
            return current
        if current is not None and current.identity == identity:
            self._forget(current)  # truncated in place: its old content is gone
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self.state = f"unreadable: {exc.strerror or exc}"
            return current
        opened = os.fstat(fd)
        if current is not None and current.identity != identity:
            self.rotations += 1
        with self._lock:
            self._segments.append(Segment(self._serial, fd, (opened.st_dev, opened.st_ino)))
            self._serial += 1
            while len(self._segments) > KEEP_SEGMENTS:
                self._retire(self._segments[0])
        self.state = "ok"
        return self._segments[-1]

    def _forget(self, segment: Segment) -> None:
        with self._lock:
            self._retire(segment)

    def _retire(self, segment: Segment) -> None:
        """Drop ``segment``; its descriptor is closed later, so a page being read from it stays valid."""
        self._segments.remove(segment)
        now = time.monotonic()
        self._retired.append((now, segment.fd))
        while self._retired and self._retired[0][0] < now - RETIRE_AFTER:
            os.close(self._retired.pop(0)[1])

    def read_new(self, segment: Segment, limit: int) -> Iterator[bytes]:
        """Complete lines appended since the last call (about ``limit`` bytes of them at most)."""
        size = segment.size()
        while segment.counted < size and limit > 0:
            chunk = os.pread(segment.fd, min(BLOCK, size - segment.counted), segment.counted)
            if not chunk:
                return
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                if len(chunk) < BLOCK:
                    return  # a line still being written
                if not segment.skipping:  # an overlong line: counted once, skipped to its end
                    self.lines += 1
                    self.malformed += 1
                segment.skipping = True
                segment.counted += len(chunk)
                continue
            lines = chunk[:cut].split(b"\n")[:-1]
            if segment.skipping:
                lines, segment.skipping = lines[1:], False
            segment.counted += cut
            segment.complete = max(segment.complete, segment.counted)
            limit -= cut
            yield from lines

    def uncounted(self, segment: Segment) -> int:
        """Bytes of complete lines the follower has not counted yet (0 when only a partial line is left)."""
        pending = segment.size() - segment.counted
        if 0 < pending < BLOCK and b"\n" not in os.pread(segment.fd, pending, segment.counted):
            return 0
        return max(pending, 0)

    def close(self) -> None:
        """Close every descriptor."""
        with self._lock:
            descriptors = [segment.fd for segment in self._segments] + [fd for _, fd in self._retired]
            self._segments, self._retired = [], []
        for fd in descriptors:
            os.close(fd)


def complete_end(segment: Segment) -> int:
    """The offset after the last newline of ``segment`` as it is now."""
    size = segment.size()
    if size <= segment.complete:
        return min(size, segment.complete)
    tail = os.pread(segment.fd, min(size - segment.complete, BLOCK), max(segment.complete, size - BLOCK))
    cut = tail.rfind(b"\n")
    return max(segment.complete, size - len(tail) + cut + 1) if cut >= 0 else segment.complete


def lines_backward(
    segment: Segment,
    end: int,
    needles: tuple[tuple[bytes, ...], ...] = (),
    on_block: Callable[[int], None] | None = None,
) -> Iterator[Line]:
    """Complete lines of ``segment`` ending at or before ``end``, newest first.

    With ``needles`` (groups of alternative byte strings), only lines holding one
    alternative of every group are yielded; the search for the longest group runs
    over whole blocks, so a selective filter skips most lines without parsing them.
    ``on_block(offset)`` is called after each block with the line boundary reached
    (it may raise to stop the scan).
    """
    lead = max(needles, key=lambda group: min(len(n) for n in group)) if needles else ()
    position = end
    carry = b""
    while position > 0:
        start = max(0, position - BLOCK)
        chunk = os.pread(segment.fd, position - start, start)
        if len(chunk) < position - start:
            return  # truncated under us
        buffer = chunk + carry
        cut = 0 if start == 0 else buffer.find(b"\n") + 1
        if cut == 0 and start > 0:
            carry = buffer if len(buffer) <= MAX_LINE else b""
            position = start
            continue
        base = start + cut
        region = buffer[cut:]
        yield from _region_lines(segment.serial, base, region, lead, needles)
        carry = buffer[:cut]
        position = start
        if on_block is not None:
            on_block(base)


def _region_lines(
    serial: int, base: int, region: bytes, lead: tuple[bytes, ...], needles: tuple[tuple[bytes, ...], ...]
) -> Iterator[Line]:
    """The lines of ``region`` (whole lines at file offset ``base``), last first."""
    stop = len(region)
    while stop > 0:
        if lead:
            hit = max(region.rfind(needle, 0, stop) for needle in lead)
            if hit < 0:
                return
            hit = min(hit, stop - 1)  # an empty needle matches at ``stop`` itself
            first = region.rfind(b"\n", 0, hit) + 1
            last = region.find(b"\n", hit)
            if last < 0 or last >= stop:
                last = stop - 1
        else:
            last = stop - 1
            first = region.rfind(b"\n", 0, last) + 1
        data = region[first:last]
        stop = first
        if data.strip() and all(any(needle in data for needle in group) for group in needles):
            yield Line(serial, base + first, base + last + 1, data)


def _first_time(segment: Segment, start: int, stop: int) -> float | None:
    """The time of the first complete, timed record starting at or after ``start`` (and before ``stop``)."""
    data = os.pread(segment.fd, stop - start + 1, start - 1) if start > 0 else b"\n" + os.pread(segment.fd, stop, 0)
    for line in data.split(b"\n")[1:-1]:
        record = parse_record(line)
        when = record_time(record) if record is not None else None
        if when is not None:
            return when
    return None


def offset_before(segment: Segment, end: int, before: float, probe: int = 1 << 16) -> int:
    """A line boundary of ``segment`` after which the records are later than ``before``.

    A bisection over the file, on the assumption that a log is written in time
    order (a record out of order by more than ``probe`` bytes may be missed).
    """
    low, high = 0, end
    while high - low > probe:
        middle = (low + high) // 2
        when = _first_time(segment, middle, min(middle + probe, high))
        if when is None:
            break
        if when <= before:
            low = middle
        else:
            high = middle
    if high in (0, end):
        return high
    tail = os.pread(segment.fd, min(end - high + 1, BLOCK), high - 1)
    newline = tail.find(b"\n")
    return end if newline < 0 else high + newline
