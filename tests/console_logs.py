"""Helpers for the console tests: audit logs written by meshauth's own audit logger, a running console."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import meshauth.audit
from meshauth.console import AuditIndex, ConsoleServer, RegistryView

FIELDS = [
    "event",
    "outcome",
    "reason",
    "detail",
    "caller",
    "subject",
    "transaction",
    "txn_issuer",
    "audience",
    "kid",
    "jti",
    "method",
    "path",
    "client",
    "rule",
    "policy_sha256",
    "trace_id",
    "span_id",
    "time",
]


def decision(time: float, **fields: Any) -> dict[str, Any]:
    """An audit record with every DESIGN section 6 field (``None`` unless given)."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update({"event": "request", "outcome": "accepted", "reason": "allowed", "time": time})
    record.update(fields)
    return record


class AuditFile:
    """An audit log file written through ``meshauth.audit.configure`` (a real FileHandler + JsonFormatter)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handler: logging.Handler | None = None

    def open(self) -> AuditFile:
        self._handler = meshauth.audit.configure(self.path)
        return self

    def write(self, *records: dict[str, Any]) -> None:
        assert self._handler is not None
        for record in records:
            # only this file's handler: other tests' handlers on the shared logger never see these records
            entry = meshauth.audit.AUDIT_LOGGER.makeRecord(
                "meshauth.audit", logging.INFO, __file__, 0, "%s %s", (record["event"], record["outcome"]), None
            )
            entry.meshauth = record
            self._handler.handle(entry)
        self._handler.flush()

    def close(self) -> None:
        if self._handler is not None:
            meshauth.audit.AUDIT_LOGGER.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


@contextlib.contextmanager
def audit_files(*paths: Path) -> Iterator[list[AuditFile]]:
    files = [AuditFile(path).open() for path in paths]
    try:
        yield files
    finally:
        for file in files:
            file.close()


@contextlib.contextmanager
def running_console(
    paths: Sequence[Path], registry: RegistryView | None = None, *, clock: Callable[[], float] | None = None
) -> Iterator[ConsoleServer]:
    """A console on a free loopback port, following ``paths``; stopped on exit."""
    index = AuditIndex([str(path) for path in paths], **({"clock": clock} if clock is not None else {}))
    server = ConsoleServer(index, registry).start()
    try:
        server.wait_indexed()
        yield server
    finally:
        server.stop()
