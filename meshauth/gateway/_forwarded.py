"""What a trusted proxy says about the client: ``X-Forwarded-For``, ``-Proto`` and ``-Host``.

Each proxy *appends* to these headers, so only the rightmost values were
written by a proxy the gateway trusts; everything to their left came from
the client and may be forged. The rules (DESIGN section 8):

* the client address is the rightmost ``X-Forwarded-For`` hop that is not a
  trusted proxy, looking at no more than ``max_hops`` entries from the right
  (a header of 6,000 entries costs no more than one of ten);
* addresses are compared in normal form: brackets and ports removed,
  IPv4-mapped IPv6 (``::ffff:10.0.0.1``) read as IPv4;
* ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are taken from the
  rightmost value only, and only when valid (``http``/``https``; host syntax).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "DEFAULT_MAX_HOPS",
    "client_address",
    "forwarded_host",
    "forwarded_proto",
    "normal_address",
    "rightmost_entries",
]

DEFAULT_MAX_HOPS: Final = 10
_PROTOS: Final = frozenset({"http", "https"})
# RFC 3986 host (reg-name, IPv4, or a bracketed IPv6 literal) with an optional port.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_MAX_HOST: Final = 255

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def normal_address(text: str) -> Address | None:
    """An address in normal form, or None if ``text`` is not one.

    >>> normal_address("[::ffff:10.0.0.1]:443")
    IPv4Address('10.0.0.1')
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def rightmost_entries(headers: Sequence[bytes], count: int) -> list[str]:
    """The last ``count`` comma-separated entries of a repeated header, in order, stripped.

    The entries are cut off from the right of the last header line, then of
    the lines before it, and only they are decoded: the work depends on
    ``count``, not on how long the header is.
    """
    entries: list[str] = []
    for value in reversed(headers):
        end = len(value)
        while len(entries) < count:
            comma = value.rfind(b",", 0, end)
            entries.append(value[comma + 1 : end].decode("latin-1").strip())
            if comma < 0:
                break
            end = comma
        if len(entries) >= count:
            break
    entries.reverse()
    return entries


def client_address(
    headers: Sequence[bytes], peer: str, is_trusted: Callable[[Address], bool], *, max_hops: int = DEFAULT_MAX_HOPS
) -> str:
    """The client a chain of trusted proxies served (the peer itself must be trusted).

    Walks ``X-Forwarded-For`` from the right over at most ``max_hops``
    entries and returns the first one that is not a trusted proxy, in normal
    form. A malformed entry ends the walk: what lies left of it cannot be
    trusted either, and the peer is answered for.
    """
    hops = rightmost_entries(headers, max_hops)
    last = peer
    for hop in reversed(hops):
        address = normal_address(hop)
        if address is None:
            return last
        if not is_trusted(address):
            return str(address)
        last = str(address)
    return last


def forwarded_proto(headers: Sequence[bytes]) -> str | None:
    """The rightmost ``X-Forwarded-Proto`` value if it is ``http`` or ``https``, else None."""
    values = rightmost_entries(headers, 1)
    if not values:
        return None
    proto = values[-1].lower()
    return proto if proto in _PROTOS else None


def forwarded_host(headers: Sequence[bytes]) -> str | None:
    """The rightmost ``X-Forwarded-Host`` value if it has host syntax, else None."""
    values = rightmost_entries(headers, 1)
    if not values:
        return None
    host = values[-1]
    return host if len(host) <= _MAX_HOST and _HOST.fullmatch(host) else None
