"""Key sets: a JWKS document indexed by ``kid``, and the parsers that build one.

:class:`KeySet` is an immutable snapshot of a key set; :class:`RawKeySet`
indexes a large registry document without parsing it (each key is built on
first use). A *key-set parser* turns a document into a :class:`KeySet`; two
exist, both frozen values a key source takes as ``parser=``:

* :data:`REGISTRY` (the default): the meshauth registry of DESIGN section 3,
  service keys only (ES256/EdDSA, ``iss`` naming the owning service);
* :class:`meshauth._idp_keys.IdPKeyParser`: an identity provider's JWKS
  (RSA, EC P-256, Ed25519; keys it cannot use are skipped with a note).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

from ._exceptions import ConfigurationError
from ._jws import strict_json_loads
from ._keys import _PRIVATE_MEMBERS, KeyRecord, check_jwk, parse_jwk

__all__ = [
    "REGISTRY",
    "KeySet",
    "KeySetParser",
    "RawKeySet",
    "RegistryParser",
    "load_keys",
    "parse_registry_document",
    "refuse_private_members",
]

logger = logging.getLogger("meshauth")


def parse_registry_document(
    data: bytes | str | Mapping[str, Any], source: str = "registry", reason: str = "invalid_registry"
) -> Mapping[str, Any]:
    """Strictly parse a JWKS document (bytes, text or an already-decoded mapping)."""
    if isinstance(data, Mapping):
        doc: Any = data
    else:
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            doc = strict_json_loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigurationError(f"{source}: not a valid JSON document ({str(exc)[:200]})", reason=reason) from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ConfigurationError(
            f"{source}: a JWKS document is an object with a 'keys' array",
            reason=reason,
            expected='{"keys": [...]}',
            actual=type(doc).__name__,
        )
    return doc


class KeySet:
    """An immutable snapshot of a registry document, indexed by ``kid``.

    Lookup is one dictionary access. With ``lazy=True`` each key's structure is
    checked on load but its ``cryptography`` object is built on first use, so a
    registry of thousands of keys loads quickly; a key that then turns out to be
    invalid is treated as absent and listed in :attr:`problems`.
    """

    __slots__ = ("_entries", "_lock", "_records", "problems", "source")

    def __init__(
        self,
        records: Iterable[KeyRecord] = (),
        *,
        source: str = "registry",
        _entries: Mapping[str, Any] | None = None,
        problems: Iterable[str] = (),
    ) -> None:
        self._records: dict[str, KeyRecord | None] = {}
        # kid -> the not-yet-built entry (a JWK mapping here; subclasses may keep text)
        self._entries: Mapping[str, Any] = _entries or {}
        self._lock = threading.Lock()
        self.source = source
        self.problems: list[str] = list(problems)
        for record in records:
            if record.kid in self._records or record.kid in self._entries:
                raise ConfigurationError(f"{source}: duplicate kid {record.kid!r}", reason="invalid_registry")
            self._records[record.kid] = record

    @classmethod
    def from_jwks(
        cls,
        document: bytes | str | Mapping[str, Any],
        *,
        source: str = "registry",
        strict: bool = True,
        lazy: bool = False,
    ) -> KeySet:
        """Load a JWKS document.

        ``strict`` rejects the whole document on the first bad key (naming it);
        otherwise bad keys are skipped and described in :attr:`problems`.
        A duplicate ``kid`` is always an error: which of the two was meant?
        """
        doc = parse_registry_document(document, source)
        entries: dict[str, Mapping[str, Any]] = {}
        records: list[KeyRecord] = []
        problems: list[str] = []
        seen: set[str] = set()
        for index, jwk in enumerate(doc["keys"]):
            where = f"{source}: keys[{index}]"
            try:
                if lazy:
                    kid = check_jwk(jwk, where)[0]
                else:
                    record = parse_jwk(jwk, where)
                    kid = record.kid
            except ConfigurationError as exc:
                if strict:
                    raise
                problems.append(exc.detail)
                continue
            if kid in seen:
                raise ConfigurationError(f"{where}: duplicate kid {kid[:64]!r}", reason="invalid_registry")
            seen.add(kid)
            if lazy:
                entries[kid] = jwk
            else:
                records.append(record)
        return cls(records, source=source, _entries=entries, problems=problems)

    def get(self, kid: str) -> KeyRecord | None:
        """The record for ``kid``, or ``None``."""
        record = self._records.get(kid)
        if record is not None:
            return record
        if kid in self._entries and kid not in self._records:  # a key found invalid stays None
            return self._materialize(kid)
        return None

    def _materialize(self, kid: str) -> KeyRecord | None:
        with self._lock:
            if kid in self._records:
                return self._records[kid]
            record: KeyRecord | None = None
            try:
                record = self._build(kid, self._entries[kid], f"{self.source}: kid {kid[:64]!r}")
            except ConfigurationError as exc:
                self.problems.append(exc.detail)
                logger.warning("meshauth registry: skipping a bad key: %s", exc.detail)
            self._records[kid] = record
            return record

    def _build(self, kid: str, entry: Any, where: str) -> KeyRecord:
        """Validate one entry and build its record; raise ``ConfigurationError`` naming the key."""
        return parse_jwk(entry, where)

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, str) and self.get(kid) is not None

    def __len__(self) -> int:
        return len(self._entries) + sum(
            1 for r in self._records.values() if r is not None and r.kid not in self._entries
        )

    def kids(self) -> list[str]:
        """Every ``kid`` in the set, in document order."""
        return list(self._entries) + [k for k, r in self._records.items() if r is not None and k not in self._entries]

    def __iter__(self) -> Iterator[KeyRecord]:
        for kid in self.kids():
            record = self.get(kid)
            if record is not None:
                yield record

    def to_jwks(self) -> dict[str, Any]:
        """The registry document (public members only)."""
        return {"keys": [dict(record.jwk) for record in self]}


# -- the key index ---------------------------------------------------------------

_WS: Final = " \t\r\n"
_HEAD: Final = re.compile(r'[ \t\r\n]*\{[ \t\r\n]*"keys"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*')
# Matches every JSON string naming a private JWK member ("d", "p", "q", "dp",
# "dq", "qi", "oth", "k") and a few harmless ones; a match only sends the
# document down the exact (slower) path, which decides.
_MAYBE_PRIVATE: Final = re.compile(r'"[dpqko][pqith]{0,2}"')


class RawKeySet(KeySet):
    """A registry document indexed by ``kid``, each key parsed from its text on first use.

    Loading only locates each key object and its ``kid`` in the text, so a
    10,000-key document is ready in a few milliseconds; lookup is one dict
    access. On first use a key is strictly parsed as JSON, checked to carry
    exactly the indexed ``kid``, validated and built (once, under a lock). A
    key that fails is treated as absent and described in :attr:`problems`.
    """

    __slots__ = ()

    def __init__(self, raw: dict[str, str], *, source: str = "registry") -> None:
        super().__init__(source=source, _entries=raw)

    def _build(self, kid: str, entry: Any, where: str) -> KeyRecord:
        try:
            jwk = strict_json_loads("{" + entry + "}")
        except (ValueError, RecursionError):
            raise ConfigurationError(f"{where} is not valid JSON", reason="invalid_registry") from None
        if not isinstance(jwk, dict) or jwk.get("kid") != kid:
            raise ConfigurationError(f"{where} is not a well-formed key object", reason="invalid_registry")
        return parse_jwk(jwk, where)


def _fast_index(text: str) -> dict[str, str] | None:
    """Locate each key of a plainly laid out JWKS; ``None`` sends the text to the exact path.

    Accepted layout: one top-level member ``keys``, an array of flat objects
    (no ``{`` or ``}`` inside a key, even in strings) separated identically, no
    backslash anywhere, each key with a ``"kid"`` string written ``"kid": "``
    or ``"kid":"``, no duplicate or empty ``kid`` and no member name that may
    be private. Anything else, valid or not, is left to the exact parser.
    The one difference with it: malformed JSON *inside* a key object (a
    duplicate member, a stray quote) makes that key bad, found on first use,
    instead of refusing the whole document.

    Returns ``kid -> the key object's text without its braces``. Every step is
    a C-level string operation over the whole text, except one short loop per
    key: this is what makes a 10,000-key document load in milliseconds.
    """
    if "\\" in text or _MAYBE_PRIVATE.search(text) is not None:
        return None
    head = _HEAD.match(text)
    if head is None:
        return None
    rest = text[head.end() :].rstrip(_WS)
    if not rest.endswith("}"):
        return None
    rest = rest[:-1].rstrip(_WS)
    if not rest.endswith("]"):
        return None
    inner = rest[:-1].rstrip(_WS)
    if not inner:
        return {}
    if inner[0] != "{" or inner[-1] != "}":
        return None
    first_close = inner.find("}")
    next_open = inner.find("{", first_close)
    if next_open < 0:
        parts = [inner[1:-1]]
    else:
        gap = inner[first_close + 1 : next_open]
        if gap.strip(_WS) != ",":
            return None
        parts = inner[1:-1].split("}" + gap + "{")
    count = len(parts)
    # inner is "{" + separator.join(parts) + "}": with exactly one "{" and one
    # "}" per part, no part holds a brace, so each part is one whole key object.
    if inner.count("{") != count or inner.count("}") != count:
        return None
    return _by_kid(parts)


def _by_kid(parts: list[str]) -> dict[str, str] | None:
    """``kid -> key text`` for flat key objects, or ``None`` (no kid, odd layout, duplicates)."""
    entries: dict[str, str] = {}
    for part in parts:
        at = part.find('"kid": "')
        if at >= 0:
            at += 8
        else:
            at = part.find('"kid":"')
            if at < 0:
                return None
            at += 7
        close = part.find('"', at)
        if close < 0:
            return None
        entries[part[at:close]] = part
    if len(entries) != len(parts) or "" in entries:
        return None  # a duplicate or empty kid: the exact parser says which
    return entries


def refuse_private_members(document: Mapping[str, Any], source: str) -> None:
    """Refuse the whole document when any key carries a private member (a leaked secret)."""
    for index, jwk in enumerate(document["keys"]):
        if isinstance(jwk, Mapping):
            private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
            if private:
                kid = jwk.get("kid")
                label = f" (kid {kid[:64]!r})" if isinstance(kid, str) else ""
                raise ConfigurationError(
                    f"{source}: keys[{index}]{label} carries private key members; the whole document is "
                    "refused (treat that key as compromised and replace it)",
                    reason="private_key_members",
                    expected="public members only",
                    actual=private,
                )


def load_keys(body: bytes | str, source: str = "registry") -> KeySet:
    """Load a registry document the way :class:`JWKSEndpoint` does.

    Returns a key index (``get(kid)``, ``problems``, ``kids()``, ``to_jwks()``).
    Raises :class:`~meshauth.ConfigurationError` with reason
    ``invalid_registry`` (not UTF-8, not JSON, not a JWKS, duplicate ``kid``)
    or ``private_key_members`` (any key carries a private member: the whole
    document is refused). Bad keys among good ones are skipped and reported.
    """
    if isinstance(body, bytes | bytearray):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{source}: the document is not UTF-8", reason="invalid_registry") from None
    else:
        text = body
    entries = _fast_index(text)
    if entries is not None:
        return RawKeySet(entries, source=source)
    document = parse_registry_document(text, source)
    refuse_private_members(document, source)
    keyset = KeySet.from_jwks(document, source=source, strict=False, lazy=True)
    for problem in keyset.problems:  # found at load; later ones are logged as they are found
        logger.warning("meshauth registry: skipping a bad key: %s", problem)
    return keyset


class KeySetParser(Protocol):
    """Turns a JWKS document into a :class:`KeySet` (a frozen value a key source is given).

    ``strict`` (files and in-memory sets) refuses the whole document on the
    first bad key; otherwise (documents fetched over HTTP) bad keys are
    skipped and described in :attr:`KeySet.problems`. A document with a
    private key member is refused either way.
    """

    @property
    def reason(self) -> str:
        """The :class:`~meshauth.ConfigurationError` reason for a document that is not a key set."""
        ...

    @property
    def kind(self) -> str:
        """What the document is, in messages: ``"registry"``, ``"JWKS"``."""
        ...

    def parse(self, document: bytes | str | Mapping[str, Any], source: str, *, strict: bool) -> KeySet:
        """The key set, or :class:`~meshauth.ConfigurationError` naming what is wrong."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryParser:
    """The meshauth key registry (DESIGN section 3): service keys, ES256 or EdDSA, with ``iss``."""

    reason: str = "invalid_registry"
    kind: str = "registry"

    def parse(self, document: bytes | str | Mapping[str, Any], source: str, *, strict: bool) -> KeySet:
        if strict:
            return KeySet.from_jwks(document, source=source, strict=True)
        if isinstance(document, Mapping):
            refuse_private_members(parse_registry_document(document, source), source)
            return KeySet.from_jwks(document, source=source, strict=False, lazy=True)
        return load_keys(document, source)


REGISTRY: Final = RegistryParser()
