"""Request paths in one canonical form, shared by the Policy, the middlewares and the gateway.

An authorization decision is only as good as the path it judges. Servers and
frameworks disagree about what a raw request target means (Tomcat reads
``/a/..;/b`` as ``/b``, nginx merges ``//``, IIS ignores case and trailing
dots, most apps decode ``%2e%2e`` into ``..`` without removing it), so
meshauth judges one canonical form and refuses anything it cannot judge
without guessing:

* only unreserved characters (RFC 3986 section 2.3) are percent-decoded;
  every other escape stays encoded, with upper-case hex (``%3b`` -> ``%3B``);
* ``%2F`` (slash), ``%5C`` (backslash) and ``%00`` (NUL) are refused: decoded
  they would move segment boundaries or truncate paths;
* dot-segments are removed (RFC 3986 section 5.2.4); one that climbs above
  the root is refused;
* refused as well: an empty segment (``//``), a segment ending in ``.``
  (``/admin.``, ``/admin%2e``), a ``;`` in a segment (unless path parameters
  are allowed, and never in a dot-segment such as ``..;``), raw non-ASCII,
  control characters, space or backslash.

The middlewares cannot change what the app routes on, so they go further
(:func:`routed_path`): a raw path whose canonical form differs from it is
refused, and the policy judges exactly the path the app will route.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote, unquote

from ._exceptions import BadPath

__all__ = ["PATH_SAFE", "canonical_path", "decoded_path", "routed_path"]

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789ABCDEFabcdef")
_REFUSED_ESCAPES: Final = {"2F": "an encoded slash (%2F)", "5C": "an encoded backslash (%5C)", "00": "an encoded NUL"}
# Raw characters a request path never needs: controls, space, backslash, and what ends a path.
_RAW_REFUSED: Final = re.compile(r"[\x00-\x20\x7f\\#?]")
# Characters ``quote`` leaves alone when a decoded path is encoded again (RFC 3986 pchar and "/").
PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
_MAX_SHOWN: Final = 80


def _shown(path: str) -> str:
    return repr(path if len(path) <= _MAX_SHOWN else path[: _MAX_SHOWN - 3] + "...")


def _refuse(path: str, problem: str) -> BadPath:
    return BadPath(f"path {_shown(path)} {problem}")


def canonical_path(raw_path: str, *, allow_path_parameters: bool = False) -> str:
    """The canonical form of a raw (still percent-encoded) request path, without its query.

    Raises :class:`~meshauth.BadPath` (reason ``bad_path``) for a path that
    cannot be judged without guessing how the server behind will read it.

    >>> canonical_path("/orders/%7Ealice/./items/../cart%3b")
    '/orders/~alice/cart%3B'
    """
    query = raw_path.find("?")
    path = raw_path if query < 0 else raw_path[:query]
    if not path.startswith("/"):
        raise _refuse(path, "does not start with '/'")
    if not path.isascii():
        raise _refuse(path, "has raw non-ASCII characters (they must be percent-encoded)")
    bad = _RAW_REFUSED.search(path)
    if bad is not None:
        raise _refuse(path, f"contains the character {bad.group()!r}")
    decoded = _decode_unreserved(path) if "%" in path else path
    return _judge_segments(path, decoded.split("/")[1:], allow_path_parameters=allow_path_parameters)


def _decode_unreserved(path: str) -> str:
    """Decode escapes of unreserved characters; upper-case the hex of the rest."""
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        hex_digits = part[:2]
        if len(hex_digits) < 2 or hex_digits[0] not in _HEX or hex_digits[1] not in _HEX:
            raise _refuse(path, "has invalid percent-encoding")
        upper = hex_digits.upper()
        refused = _REFUSED_ESCAPES.get(upper)
        if refused is not None:
            raise _refuse(path, f"contains {refused}")
        char = chr(int(upper, 16))
        out.append((char if char in _UNRESERVED else "%" + upper) + part[2:])
    return "".join(out)


def _judge_segments(path: str, segments: list[str], *, allow_path_parameters: bool) -> str:
    """Remove dot-segments from already-decoded segments, refusing ambiguous ones."""
    output: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and not output:
                raise _refuse(path, "climbs above the root with '..'")
            if segment == "..":
                output.pop()
            if index == last:
                output.append("")  # "/a/b/.." names a directory: keep the trailing slash
            continue
        if not segment and index != last:
            raise _refuse(path, "has an empty segment ('//')")
        # Fully decoded (as some servers read it), a segment must not be a dot-segment
        # with parameters: "..;" and "..%3B" are ".." to Tomcat and Jetty.
        full = unquote(segment) if "%" in segment else segment
        if ";" in full and full.split(";", 1)[0] in (".", ".."):
            raise _refuse(path, f"has a dot-segment with parameters ({segment[:16]!r})")
        if ";" in segment and not allow_path_parameters:
            raise _refuse(path, "has a ';' in a segment (path parameters are not allowed)")
        if segment.endswith("."):
            raise _refuse(path, f"has a segment ending in '.' ({segment[-16:]!r})")
        output.append(segment)
    return "/" + "/".join(output)


def routed_path(raw_path: str) -> str:
    """``raw_path`` without its query, if it is already canonical (hex case aside).

    For the middlewares, which cannot change the path the app routes: a raw
    path that canonicalisation would change (``.``/``..`` segments, encoded
    unreserved characters such as ``%2e``, ``//``, ...) raises
    :class:`~meshauth.BadPath`, so the policy never judges a path other than
    the one routed.
    """
    query = raw_path.find("?")
    path = raw_path if query < 0 else raw_path[:query]
    canonical = canonical_path(path)
    if canonical != path and canonical != _upper_escapes(path):
        raise BadPath(
            f"path {_shown(path)} is not in canonical form (canonical: {_shown(canonical)}); "
            "the app would route a path other than the one judged",
            expected=canonical[:_MAX_SHOWN],
            actual=path[:_MAX_SHOWN],
        )
    return canonical


def decoded_path(path: str) -> str:
    """The canonical raw form of an already percent-decoded path (WSGI ``PATH_INFO``).

    Used where the server gives no raw target: the decoded path is encoded
    again and must then be canonical, so a decoded ``..``, ``//`` or trailing
    dot is refused here too.
    """
    if "\x00" in path or "\\" in path:
        raise _refuse(path, "contains a NUL or a backslash")
    return routed_path(quote(path.encode("utf-8", "surrogateescape"), safe=PATH_SAFE) or "/")


def _upper_escapes(path: str) -> str:
    if "%" not in path:
        return path
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group().upper(), path)
