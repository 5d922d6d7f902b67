"""The upstream side of the gateway: which headers go upstream, and how bodies stream both ways.

The gateway drops every inbound identity, forwarding and hop-by-hop header
(DESIGN section 8), sets its own ``X-Forwarded-*`` (reading a trusted proxy's
rightmost values only), the delegated token and the trace headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

import httpx

from ._forwarded import client_address, forwarded_host, forwarded_proto, normal_address, rightmost_entries
from ._upstream_client import UpstreamResponse, UpstreamTransport

__all__ = [
    "HOP_BY_HOP",
    "ClientGone",
    "ForwardingHeaders",
    "UpstreamTransport",
    "connection_tokens",
    "request_body",
    "upstream_transport",
    "via_httpx",
    "watch_disconnect",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 section 7.6.1, plus the non-standard ones still seen in the wild.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Inbound headers never forwarded: identity and trace headers the gateway sets
# itself (a client-sent copy would be a forgery), the Host it rewrites, and
# Expect (the server already answered 100-continue).
_NOT_FORWARDED: Final = HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-authorization",
    b"x-real-ip",
    b"x-client-ip",
    b"true-client-ip",
    b"x-original-url",
    b"x-rewrite-url",
    b"proxy-authorization",
    b"txn-token",
    b"traceparent",
    b"tracestate",
}
# Every X-Forwarded-* (Prefix, Port, ...) and X-Meshauth-* header is the gateway's to set, never the client's.
_DROPPED_PREFIXES: Final = (b"meshauth-", b"x-meshauth-", b"x-forwarded-")


class ClientGone(Exception):
    """The client disconnected, or the server cut its request body short, while it was being forwarded."""

    def __init__(self, message: MutableMapping[str, Any]) -> None:
        reason = message.get("meshauth.reason")
        status = message.get("meshauth.status")
        super().__init__(reason)
        # A server that cut the body short (too slow, too large) says why in the disconnect message.
        self.reason = reason if isinstance(reason, str) else "client_disconnected"
        self.status = status if isinstance(status, int) else 499
        self.outcome = "rejected" if isinstance(status, int) else "error"


class ForwardingHeaders:
    """The headers of an upstream request, built from the inbound ones and the trusted proxies."""

    __slots__ = ("_cache", "max_hops", "trusted")

    def __init__(self, trusted: Sequence[Network], max_hops: int) -> None:
        self.trusted = tuple(trusted)
        self.max_hops = max_hops
        self._cache: dict[str, bool] = {}

    def request_headers(
        self,
        scope: Scope,
        delegated: str,
        user_token: str | None,
        trace_headers: list[tuple[bytes, bytes]],
        txn_token: str | None = None,
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The upstream request's headers and whether the request has a body.

        Hop-by-hop headers, those named by ``Connection`` and every header the gateway sets
        itself are dropped; the gateway's own (forwarding, trace, tokens) are appended.
        """
        inbound: list[tuple[bytes, bytes]] = scope["headers"]
        named: frozenset[bytes] = frozenset()
        forwarded_for: list[bytes] = []
        proto_values: list[bytes] = []
        host_values: list[bytes] = []
        host: bytes | None = None
        has_body = False
        injected = {name for name, _ in trace_headers}
        out: list[tuple[bytes, bytes]] = []
        for raw_name, value in inbound:
            name = raw_name.lower()
            if name == b"connection":
                named = named | connection_tokens([value.decode("latin-1")])
        for raw_name, value in inbound:
            name = raw_name.lower()
            if name == b"content-length":
                has_body = True  # even when Connection names it: the body is there all the same
            # CGI-style servers (WSGI among them) read "X_Forwarded_For" as "X-Forwarded-For":
            # a dropped name is dropped in its underscore spelling too.
            key = name.replace(b"_", b"-") if b"_" in name else name
            if key in _NOT_FORWARDED or key.startswith(_DROPPED_PREFIXES) or key in named or key in injected:
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif name == b"host":
                    host = value
                elif name == b"x-forwarded-proto":
                    proto_values.append(value)
                elif name == b"x-forwarded-host":
                    host_values.append(value)
                elif name == b"transfer-encoding":
                    has_body = True
                continue
            out.append((name, value))
        self._forwarded(out, scope, forwarded_for, proto_values, host_values, host)
        out.extend(trace_headers)
        out.append((b"authorization", b"Bearer " + delegated.encode("ascii")))
        if user_token is not None:
            out.append((b"x-forwarded-authorization", b"Bearer " + user_token.encode("ascii")))
        if txn_token is not None:
            out.append((b"txn-token", txn_token.encode("ascii")))
        return out, has_body

    def _forwarded(  # noqa: PLR0917 - the values request_headers collected, in its order
        self,
        out: list[tuple[bytes, bytes]],
        scope: Scope,
        forwarded_for: list[bytes],
        proto_values: list[bytes],
        host_values: list[bytes],
        host: bytes | None,
    ) -> None:
        """Append the X-Forwarded-For/-Proto/-Host the gateway writes (DESIGN section 8)."""
        peer = scope.get("client")
        peer_host = peer[0] if peer else ""
        if self.trusted and peer_host and self.is_trusted(peer_host):
            # Only the rightmost values were written by trusted proxies (DESIGN section 8).
            hops = rightmost_entries(forwarded_for, self.max_hops)
            chain = ", ".join([*hops, peer_host]).encode("latin-1")
            out.append((b"x-forwarded-for", chain))
            proto = forwarded_proto(proto_values)
            out.append((b"x-forwarded-proto", (proto or scope.get("scheme", "http")).encode("latin-1")))
            proxied_host = forwarded_host(host_values)
            if proxied_host or host:
                out.append((b"x-forwarded-host", proxied_host.encode("latin-1") if proxied_host else host or b""))
            return
        if peer_host:
            out.append((b"x-forwarded-for", peer_host.encode("latin-1")))
        out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
        if host:
            out.append((b"x-forwarded-host", host))

    def original_client(self, headers: list[tuple[bytes, bytes]], peer: str) -> str:
        """The address a trusted proxy says it served: the rightmost untrusted hop of X-Forwarded-For."""
        values = [value for name, value in headers if name.lower() == b"x-forwarded-for"]
        return client_address(values, peer, self.is_trusted_address, max_hops=self.max_hops)[:64]

    def is_trusted(self, host: str) -> bool:
        known = self._cache.get(host)
        if known is None:
            address = normal_address(host)
            known = address is not None and self.is_trusted_address(address)
            if len(self._cache) >= 1024:
                self._cache.clear()
            self._cache[host] = known
        return known

    def is_trusted_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.trusted)


def connection_tokens(values: list[str]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration, RFC 9110 7.6.1)."""
    names: set[bytes] = set()
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if name:
                names.add(name.encode("latin-1"))
    return frozenset(names)


class _HttpxAnswer(UpstreamResponse):
    """The answer of any other httpx transport (tests pass ``httpx.ASGITransport`` or ``MockTransport``)."""

    __slots__ = ("_response",)

    def __init__(self, response: httpx.Response) -> None:
        value = response.headers.get("content-length", "")
        headers = [(name.lower(), value) for name, value in response.headers.raw]
        super().__init__(response.status_code, headers, int(value) if value.isdigit() else -1)
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        response = self._response
        left = self.length  # -1 without a Content-Length: never reached by subtracting
        # A transport may hand back a response it already read (httpx.MockTransport).
        source = _already_read(response) if response.is_stream_consumed else response.aiter_raw()
        async for chunk in source:
            left -= len(chunk)
            self.complete = left == 0
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


async def _already_read(response: httpx.Response) -> AsyncIterator[bytes]:
    yield response.content


async def via_httpx(
    transport: httpx.AsyncBaseTransport,
    method: str,
    url: httpx.URL,
    headers: list[tuple[bytes, bytes]],
    *,
    body: AsyncIterator[bytes] | None,
    timeouts: dict[str, float],
) -> UpstreamResponse:
    """One upstream call through an httpx transport other than the gateway's own."""
    request = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": timeouts})
    return _HttpxAnswer(await transport.handle_async_request(request))


async def request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone(message)
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def upstream_transport() -> httpx.AsyncBaseTransport:
    # Upstreams are internal: no HTTP(S)_PROXY from the environment applies
    # (a transport never reads it), and no retries behind the client's back.
    return UpstreamTransport(max_idle=128, keepalive_expiry=30)
