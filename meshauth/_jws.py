"""Strict codecs for the compact JWS wire format.

Everything here runs *before* any cryptography, on attacker-controlled input,
so each function either returns a well-formed value or raises
:class:`~meshauth.MalformedToken` (:func:`split_compact` also
:class:`~meshauth.TokenTooLarge`); no ``ValueError``, ``UnicodeError``,
``binascii.Error`` or ``RecursionError`` escapes.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ._exceptions import MalformedToken, TokenTooLarge

__all__ = [
    "MAX_DEPTH",
    "b64url_decode",
    "b64url_decode_or_none",
    "b64url_encode",
    "body_digest",
    "der_to_raw",
    "dumps",
    "loads_object",
    "raw_to_der",
    "split_compact",
    "strict_json_loads",
    "token_too_large",
]

MAX_DEPTH = 16

# One pass over the whole token: three non-empty base64url segments, nothing else
# (no padding, whitespace or extra dots). The header and payload must not be
# empty; the signature may not be either.
COMPACT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]*")

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# For a segment whose length is 2 or 3 mod 4 the last character carries unused
# low bits; canonical encoders leave them zero. Accepting other values would let
# one signature stand for several token strings (token-cache and replay-cache
# bypasses), so they are rejected.
_LOW_BITS = {c: i for i, c in enumerate(_ALPHABET)}
_MASK = {2: 0x0F, 3: 0x03}
_PAD = ("", "", "==", "=")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def token_too_large(size: int, max_bytes: int) -> TokenTooLarge:
    """The error for a token of ``size`` bytes over the ``max_bytes`` limit."""
    return TokenTooLarge("token exceeds the size limit", expected=f"<= {max_bytes} bytes", actual=size)


def split_compact(token: str, max_bytes: int, pattern: re.Pattern[str] = COMPACT_RE) -> tuple[str, str, str]:
    """Check ``token``'s size, then its compact-JWS syntax; return the three segments.

    The size is checked first, before anything else looks at the token. The
    segments are then known to be base64url characters only (decode them with
    ``checked=True``). ``pattern`` replaces :data:`COMPACT_RE` for a caller
    with other rules on empty segments.

    Raises:
        TokenTooLarge: longer than ``max_bytes``.
        MalformedToken: not three segments, or a segment that is empty or
            holds a character outside the base64url alphabet.
    """
    if len(token) > max_bytes:
        raise token_too_large(len(token), max_bytes)
    if not pattern.fullmatch(token):
        dots = token.count(".")
        if dots != 2:
            raise MalformedToken("a compact JWS has exactly three segments", expected=3, actual=dots + 1)
        raise MalformedToken(
            "token segments are not base64url",
            expected="[A-Za-z0-9_-]+ segments",
            actual="other characters, padding or an empty segment",
        )
    header, payload, signature = token.split(".")
    return header, payload, signature


def b64url_decode_or_none(segment: str) -> bytes | None:
    """Fast strict decode for the verifier's hot path: the bytes, or ``None`` if anything is off.

    The caller has already ruled out ``+``, ``/`` and ``=`` in the token; this
    refuses an empty segment, an impossible length, non-zero trailing bits and
    (through ``a2b_base64``'s strict mode) any other character. A ``None``
    sends the token down the slow path, which says exactly what is wrong.
    """
    rem = len(segment) & 3
    if rem == 1 or not segment or (rem and _LOW_BITS.get(segment[-1], 1) & _MASK[rem]):
        return None
    try:
        return binascii.a2b_base64((segment + _PAD[rem]).encode("ascii").translate(_TO_STANDARD), strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError covers UnicodeEncodeError
        return None


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    # binascii directly: base64.urlsafe_b64encode adds two Python calls around the same C work.
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str, what: str = "segment", *, checked: bool = False) -> bytes:
    """Decode unpadded, canonical base64url; ``checked`` skips the alphabet test.

    Raises:
        MalformedToken: padding, whitespace, a character outside the alphabet,
            an impossible length, or non-zero trailing bits.
    """
    if not checked and not _SEGMENT_RE.fullmatch(segment):
        raise MalformedToken(f"{what} is not base64url", expected="[A-Za-z0-9_-]", actual="other characters")
    rem = len(segment) % 4
    if rem == 1:
        raise MalformedToken(
            f"{what} has an impossible base64url length", expected="length % 4 != 1", actual=len(segment)
        )
    if rem and _LOW_BITS[segment[-1]] & _MASK[rem]:
        raise MalformedToken(
            f"{what} is not canonical base64url", expected="zero trailing bits", actual="non-zero bits"
        )
    try:
        return binascii.a2b_base64((segment + _PAD[rem]).encode("ascii").translate(_TO_STANDARD))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - excluded by the checks above
        raise MalformedToken(f"{what} is not base64url") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


class _DuplicateMember(ValueError):
    """A JSON object names the same member twice (RFC 7515 section 5.2 says reject)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateMember(f"duplicate member name {dup[:40]!r}")
    return obj


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


_scan_once = _decoder.scan_once  # type: ignore[attr-defined]  # set by JSONDecoder.__init__, untyped


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that rejects duplicate members and NaN/Infinity (raises ValueError)."""
    return _decoder.decode(text)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (hostile input must not recurse)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads_object(data: bytes, what: str = "segment") -> dict[str, Any]:
    """Parse strict UTF-8 JSON that must be an object.

    Rejects: invalid UTF-8 (including UTF-16/32 and a BOM), duplicate member
    names, ``NaN``/``Infinity``, nesting deeper than :data:`MAX_DEPTH`, trailing
    data, and any top-level value other than an object.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedToken(f"{what} is not UTF-8", expected="UTF-8 JSON", actual="invalid bytes") from exc
    try:
        # scan_once is the C scanner without decode()'s Python wrapper; it
        # refuses leading whitespace, and trailing data is refused below.
        obj, end = _scan_once(text, 0)
        if end != len(text):
            obj = _decoder.decode(text)
    except StopIteration:
        raise MalformedToken(f"{what} is not valid JSON", expected="a JSON object", actual="no JSON value") from None
    except _DuplicateMember as exc:
        raise MalformedToken(
            f"{what} has a duplicate member", expected="unique member names", actual=_clip(str(exc))
        ) from None
    except RecursionError:
        raise MalformedToken(
            f"{what} is nested too deeply", expected=f"depth <= {MAX_DEPTH}", actual="deeper"
        ) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integer literals
        raise MalformedToken(f"{what} is not valid JSON", expected="a JSON object", actual=_clip(str(exc))) from None
    if type(obj) is not dict:
        raise MalformedToken(f"{what} is not a JSON object", expected="object", actual=type(obj).__name__)
    # '{' and '[' counted in the raw text bound the depth from above, so the
    # walk only runs for documents that might be too deep.
    if text.count("{") + text.count("[") > MAX_DEPTH:
        depth = _depth(obj)
        if depth > MAX_DEPTH:
            raise MalformedToken(f"{what} is nested too deeply", expected=f"depth <= {MAX_DEPTH}", actual=depth)
    return obj


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# One encoder for every token (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(obj: Any) -> bytes:
    """Compact, deterministic JSON for minting."""
    return _ENCODER.encode(obj).encode("utf-8")


def raw_to_der(signature: bytes, size: int = 32) -> bytes:
    """JWS ECDSA signature (``r || s``, RFC 7518 section 3.4) to DER for cryptography.

    Built with byte operations: two minimal big-endian INTEGERs in a SEQUENCE
    (short-form lengths suffice for P-256), the same bytes
    ``encode_dss_signature`` produces, in half the time.
    """
    r = signature[:size].lstrip(b"\x00") or b"\x00"
    s = signature[size:].lstrip(b"\x00") or b"\x00"
    if r[0] & 0x80:
        r = b"\x00" + r
    if s[0] & 0x80:
        s = b"\x00" + s
    lr, ls = len(r), len(s)
    return b"\x30" + bytes((lr + ls + 4, 2, lr)) + r + bytes((2, ls)) + s


def der_to_raw(signature: bytes, size: int = 32) -> bytes:
    """DER ECDSA signature from cryptography to the fixed-size JWS form."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def body_digest(body: bytes) -> str:
    """``body_sha256`` of a response token: unpadded base64url of SHA-256 over the body bytes as sent."""
    return b64url_encode(hashlib.sha256(body).digest())
