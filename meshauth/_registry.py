"""Key registries: the shared JWKS document and the sources that serve it.

A *key source* is anything with ``get_key(kid)`` and ``aget_key(kid)``
returning a :class:`~meshauth.KeyRecord` or ``None``; a source that cannot read
its registry at all raises :class:`~meshauth.KeysUnavailable` instead, so an
outage is never reported as a bad token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from ._exceptions import ConfigurationError
from ._keys import KeyRecord
from ._keyset import REGISTRY, KeySet, KeySetParser, parse_registry_document

__all__ = ["JWKSFile", "KeySet", "KeySource", "StaticKeys", "parse_registry_document"]

logger = logging.getLogger("meshauth")

DEFAULT_MAX_BYTES = 16 * 1024 * 1024

_T = TypeVar("_T", bound=Sized)


@runtime_checkable
class KeySource(Protocol):
    """Where a :class:`~meshauth.Verifier` looks up public keys by ``kid``."""

    def get_key(self, kid: str) -> KeyRecord | None:
        """The record for ``kid``, or ``None``; raises ``KeysUnavailable`` on outage."""
        ...

    async def aget_key(self, kid: str) -> KeyRecord | None:
        """Async form of :meth:`get_key` (may perform I/O without blocking the loop)."""
        ...


class StaticKeys:
    """A fixed key registry held in memory.

    >>> from meshauth import SigningKey
    >>> key = SigningKey.generate()
    >>> keys = StaticKeys.from_jwks({"keys": [key.public_jwk(iss="orders")]})
    >>> keys.get_key(key.kid).owner
    'orders'
    """

    def __init__(self, records: Iterable[KeyRecord] | KeySet = ()) -> None:
        self.keyset = records if isinstance(records, KeySet) else KeySet(records, source="static keys")

    @classmethod
    def from_jwks(
        cls,
        document: bytes | str | Mapping[str, Any],
        *,
        source: str = "registry",
        parser: KeySetParser = REGISTRY,
    ) -> StaticKeys:
        """Load and strictly validate a JWKS document (bytes, text or mapping).

        ``parser`` says what the document is: the meshauth registry (default)
        or an identity provider's key set (``IdPKeyParser``).
        """
        return cls(parser.parse(document, source, strict=True))

    @property
    def problems(self) -> list[str]:
        """Keys of the document that were skipped, and why."""
        return self.keyset.problems

    def get_key(self, kid: str) -> KeyRecord | None:
        return self.keyset.get(kid)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return self.keyset.get(kid)

    def to_jwks(self) -> dict[str, Any]:
        return self.keyset.to_jwks()

    def __len__(self) -> int:
        return len(self.keyset)

    def status(self) -> dict[str, Any]:
        """Readiness information (always ready)."""
        return {"source": "static", "keys": len(self.keyset), "last_error": None, "ready": True}


class WatchedFile(Generic[_T]):
    """A key-set file, parsed, and parsed again when the file changes.

    The mechanism behind :class:`JWKSFile`; a subclass names its file in the class attributes below and turns the
    file's bytes into a value in :meth:`_parse` (raising
    :class:`~meshauth.ConfigurationError` for a bad document). The first load
    happens in the constructor and raises on failure. After that the file is
    checked at most once per ``check_interval`` seconds (a ``stat`` call, no
    read unless its mtime, size or inode changed); a version that fails to load
    is refused: :attr:`current` keeps the last good value and the problem is
    kept in :attr:`last_error` and logged once.
    """

    _kind: str  # "registry": in errors as "cannot read registry file ..."
    _label: str  # "meshauth registry": in log lines as "meshauth registry <path>: ..."
    _reason: str  # the ConfigurationError reason for an unreadable or oversized file
    _logger: ClassVar[logging.Logger]

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float,
        max_bytes: int,
        monotonic: Callable[[], float],
    ) -> None:
        self.path = os.fspath(path)
        self.check_interval = check_interval
        self.max_bytes = max_bytes
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self.last_error: str | None = None
        self.loaded_at: float | None = None
        self._value = self._load()
        self._next_check = monotonic() + check_interval

    def _parse(self, data: bytes) -> _T:
        raise NotImplementedError

    @property
    def current(self) -> _T:
        """The value in service (after a reload check at most every ``check_interval``)."""
        if self._monotonic() >= self._next_check:
            self._maybe_reload()
        return self._value

    def reload(self) -> None:
        """Check the file now, regardless of ``check_interval``."""
        self._next_check = self._monotonic()
        self._maybe_reload()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> _T:
        try:
            signature = self._stat()
            if signature[1] > self.max_bytes:
                raise ConfigurationError(
                    f"{self.path}: {self._kind} file is larger than {self.max_bytes} bytes", reason=self._reason
                )
            with open(self.path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read {self._kind} file {self.path!r}: {exc.strerror}", reason=self._reason
            ) from None
        value = self._parse(data)
        self._signature = signature
        self.loaded_at = time.time()
        return value

    def _maybe_reload(self) -> None:
        with self._lock:
            now = self._monotonic()
            if now < self._next_check:
                return
            self._next_check = now + self.check_interval
            try:
                changed = self._stat() != self._signature
            except OSError as exc:
                self._report(f"cannot stat {self._kind} file {self.path!r}: {exc.strerror}")
                return
            if not changed:
                return
            try:
                self._value = self._load()
            except ConfigurationError as exc:
                self._report(exc.detail)
                return
            self.last_error = None
            self._logger.info("%s reloaded from %s (%d keys)", self._label, self.path, len(self._value))

    def _report(self, message: str) -> None:
        if message != self.last_error:
            self._logger.warning("%s %s: keeping the last good key set: %s", self._label, self.path, message)
        self.last_error = message


class JWKSFile(WatchedFile[KeySet]):
    """A registry read from a JWKS file, reloaded when the file changes.

    The file is checked at most once per ``check_interval`` seconds (a ``stat``
    call, no read unless it changed). A new version that does not parse or
    validate is refused: the last good set stays in service and the problem is
    logged and shown by :meth:`status`. The first load happens in the
    constructor and raises :class:`~meshauth.ConfigurationError` on failure, so
    a misconfigured service fails at start-up.

    ``parser`` says what the file holds: the meshauth registry (default) or an
    identity provider's key set (``IdPKeyParser``, which skips the keys it
    cannot use and lists them in ``keyset.problems``).
    """

    _kind = "registry"
    _label = "meshauth registry"
    _reason = "invalid_registry"
    _logger = logger

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float = 1.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
        parser: KeySetParser = REGISTRY,
    ) -> None:
        self.parser = parser
        self._reason = parser.reason
        self._kind = parser.kind
        self._label = f"meshauth {parser.kind}"
        super().__init__(path, check_interval=check_interval, max_bytes=max_bytes, monotonic=monotonic)

    def _parse(self, data: bytes) -> KeySet:
        return self.parser.parse(data, self.path, strict=True)

    @property
    def keyset(self) -> KeySet:
        """The key set in service (after a reload check)."""
        return self.current

    def get_key(self, kid: str) -> KeyRecord | None:
        # self.current inlined: this runs on every verification, cached tokens included.
        if self._monotonic() >= self._next_check:
            self._maybe_reload()
        return self._value.get(kid)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return self.get_key(kid)

    def to_jwks(self) -> dict[str, Any]:
        return self.keyset.to_jwks()

    def status(self) -> dict[str, Any]:
        """Readiness information: key count, last error, load time."""
        keyset = self.keyset
        return {
            "source": self.path,
            "keys": len(keyset),
            "last_error": self.last_error,
            "loaded_at": self.loaded_at,
            "ready": True,
        }
