"""One bounded HTTP GET for a key set or a discovery document, and the verdict on its answer.

Shared by :class:`~meshauth.JWKSEndpoint` and OIDC discovery: the URL rules
(https, plain http only on loopback or when allowed), a GET that never follows
a redirect and never holds more than ``max_bytes`` of body, *decoded* bytes
counted as they stream (a compression bomb stops at the limit), and the
checks of the answer (status, redirect, media type) before a parser sees it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import ssl
import time
import zlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

import httpx

from ._exceptions import ConfigurationError
from ._keyset import KeySet, KeySetParser

__all__ = [
    "JWKS_MEDIA_TYPE",
    "FetchFailed",
    "Fetched",
    "Getter",
    "NotModified",
    "Reply",
    "check_url",
    "display_url",
    "judge_jwks",
    "max_age",
    "send_async",
    "send_sync",
]

JWKS_MEDIA_TYPE: Final = "application/jwk-set+json"
JWKS_MEDIA_TYPES: Final = frozenset({JWKS_MEDIA_TYPE, "application/json"})
_DETAIL_LIMIT: Final = 300
_DECODE_STEP: Final = 256 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def display_url(url: httpx.URL) -> str:
    """The URL without user info, query or fragment (safe for logs and spans)."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.path}"


def check_url(url: str, *, allow_http: bool, what: str = "registry URL") -> httpx.URL:
    """``url`` parsed, or :class:`~meshauth.ConfigurationError`: https only, plain http on loopback or when allowed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(f"{what}: not a valid URL: {exc}", reason="invalid_url") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise ConfigurationError(
            f"the {what} must be an absolute https URL",
            reason="invalid_url",
            expected="https://host/path",
            actual=parsed.scheme or "relative URL",
        )
    if parsed.scheme == "http" and not (is_loopback(parsed.host) or allow_http):
        raise ConfigurationError(
            f"refusing plain http for {parsed.host!r}: keys fetched without TLS can be replaced in transit "
            "(use https, or allow_http=True on a trusted network)",
            reason="invalid_url",
            expected="https",
            actual="http",
        )
    return parsed


def max_age(headers: httpx.Headers) -> float | None:
    """Freshness lifetime from ``Cache-Control`` (and ``Age``), or ``None`` if unstated."""
    found: float | None = None
    for directive in headers.get_list("cache-control", split_commas=True):
        name, _, value = directive.partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            return 0.0
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isdigit():
                found = float(value)
    if found is not None:
        age = headers.get("age", "").strip()
        if age.isdigit():
            found = max(0.0, found - float(age))
    return found


class FetchFailed(Exception):
    """One failed fetch attempt; ``reason`` is the stable code reported in telemetry."""

    def __init__(self, reason: str, detail: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail if len(detail) <= _DETAIL_LIMIT else detail[: _DETAIL_LIMIT - 3] + "..."
        self.retryable = retryable
        self.status = status


def _too_large(limit: int) -> FetchFailed:
    return FetchFailed("too_large", f"the response body exceeds {limit} bytes", retryable=False)


class BodyReader:
    """Accumulates a response body chunk by chunk, never holding more than the limit (decoded).

    It reads the *raw* stream and decodes ``gzip``/``deflate`` itself with a
    bound on each call's output, so a small compressed body that would inflate
    to gigabytes is refused after ``limit + 1`` decoded bytes.
    """

    __slots__ = ("_chunks", "_decoder", "_limit", "_size")

    def __init__(self, headers: httpx.Headers, limit: int, *, decoded: bool = False) -> None:
        encoding = "" if decoded else headers.get("content-encoding", "").strip().lower()
        self._decoder: Any = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
        elif encoding not in ("", "identity"):
            raise FetchFailed(
                "unsupported_encoding", f"unsupported Content-Encoding {encoding[:32]!r}", retryable=False
            )
        length = headers.get("content-length", "").strip()
        if self._decoder is None and not decoded and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        self._chunks: list[bytes] = []
        self._limit = limit
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            self._keep(chunk)
            return
        data = chunk
        while data and not decoder.eof:
            try:
                # Bounded output per call: a compression bomb costs at most the
                # limit plus one step, never what it would inflate to.
                output = decoder.decompress(data, min(self._limit - self._size + 1, _DECODE_STEP))
            except zlib.error:
                raise FetchFailed("invalid_encoding", "the compressed body is corrupt", retryable=True) from None
            self._keep(output)
            data = decoder.unconsumed_tail

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            raise _too_large(self._limit)
        self._chunks.append(chunk)

    def feed_all(self, chunks: Iterable[bytes], deadline: float) -> None:
        for chunk in chunks:
            self.feed(chunk)
            if time.monotonic() > deadline:
                raise FetchFailed("timeout", "the body took too long to arrive", retryable=True)

    def finish(self) -> bytes:
        if self._decoder is not None and not self._decoder.eof:
            raise FetchFailed("invalid_encoding", "the compressed body is truncated", retryable=True)
        return b"".join(self._chunks)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """What one GET got: a status, headers and a bounded body, or an error."""

    status: int | None = None
    headers: httpx.Headers = dataclasses.field(default_factory=httpx.Headers)
    body: bytes = b""
    error: BaseException | None = None


def _reader(response: httpx.Response, max_bytes: int) -> BodyReader | None:
    if response.status_code != 200:
        return None
    reader = BodyReader(response.headers, max_bytes, decoded=response.is_stream_consumed)
    if response.is_stream_consumed:  # already in memory (a mock transport)
        reader.feed(response.content)
    return reader


def send_sync(client: httpx.Client, url: str, headers: Mapping[str, str], seconds: float, max_bytes: int) -> Reply:
    """GET ``url`` without following redirects; a 200 body is read up to ``max_bytes`` (decoded).

    ``seconds`` bounds each network operation; the whole body must arrive
    within twice that.
    """
    try:
        request = client.build_request("GET", url, headers=headers, timeout=seconds)
        response = client.send(request, stream=True, follow_redirects=False)
        try:
            reader = _reader(response, max_bytes)
            if reader is not None and not response.is_stream_consumed:
                reader.feed_all(response.iter_raw(), time.monotonic() + 2 * seconds)
            return Reply(response.status_code, response.headers, reader.finish() if reader is not None else b"")
        finally:
            response.close()
    except Exception as exc:
        return Reply(error=exc)


async def send_async(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], seconds: float, max_bytes: int
) -> Reply:
    """Async :func:`send_sync`."""
    try:
        request = client.build_request("GET", url, headers=headers, timeout=seconds)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            reader = _reader(response, max_bytes)
            if reader is not None and not response.is_stream_consumed:
                deadline = time.monotonic() + 2 * seconds
                async for chunk in response.aiter_raw():
                    reader.feed_all((chunk,), deadline)
            return Reply(response.status_code, response.headers, reader.finish() if reader is not None else b"")
        finally:
            await response.aclose()
    except Exception as exc:
        return Reply(error=exc)


class Getter:
    """GETs one URL with the caller's clients, or with short-lived ones of its own.

    Fetches are minutes apart, so nothing is lost by not pooling; a proxy from
    the environment is ignored for loopback hosts (it could not reach them).
    """

    def __init__(
        self,
        url: httpx.URL,
        *,
        timeout: float,
        max_bytes: int,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = str(url)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.client = client
        self.async_client = async_client
        self._trust_env = not is_loopback(url.host)
        self._ssl_context: ssl.SSLContext | None = None

    def _ssl(self) -> ssl.SSLContext:
        # Loading the CA bundle takes milliseconds: once per URL, not per fetch.
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context(trust_env=self._trust_env)
        return self._ssl_context

    def get(self, headers: Mapping[str, str]) -> Reply:
        client = self.client
        if client is None:
            client = httpx.Client(verify=self._ssl(), trust_env=self._trust_env, timeout=self.timeout)
        try:
            return send_sync(client, self.url, headers, self.timeout, self.max_bytes)
        finally:
            if client is not self.client:
                client.close()

    async def aget(self, headers: Mapping[str, str]) -> Reply:
        client = self.async_client
        if client is None:
            client = httpx.AsyncClient(verify=self._ssl(), trust_env=self._trust_env, timeout=self.timeout)
        try:
            return await send_async(client, self.url, headers, self.timeout, self.max_bytes)
        finally:
            if client is not self.async_client:
                await client.aclose()


def check_reply(reply: Reply, media_types: Collection[str], *, not_modified_ok: bool = False) -> int:
    """The status of a usable answer (200, or 304 when allowed); :class:`FetchFailed` otherwise."""
    error = reply.error
    if error is not None:
        if isinstance(error, FetchFailed):
            raise error
        if isinstance(error, httpx.TimeoutException):
            raise FetchFailed("timeout", f"timed out ({type(error).__name__})", retryable=True)
        raise FetchFailed("unreachable", f"{type(error).__name__}: {error}", retryable=True)
    status = reply.status
    assert status is not None
    if status == 304:
        if not not_modified_ok:
            raise FetchFailed(
                "unexpected_not_modified", "304 Not Modified to an unconditional request", retryable=False, status=304
            )
        return status
    if 300 <= status < 400:
        raise FetchFailed(
            "redirect", f"the server answered {status}; redirects are never followed", retryable=False, status=status
        )
    if status != 200:
        raise FetchFailed(
            "http_error",
            f"the server answered HTTP {status}",
            retryable=status >= 500 or status in (408, 429),
            status=status,
        )
    media_type = reply.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in media_types:
        raise FetchFailed(
            "bad_content_type",
            f"Content-Type {media_type[:64]!r} is not {' or '.join(sorted(media_types))}",
            retryable=True,
            status=status,
        )
    return status


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    """A new key set."""

    keys: KeySet
    etag: str | None
    max_age: float | None
    digest: bytes
    status: int = 200


@dataclasses.dataclass(frozen=True, slots=True)
class NotModified:
    """The key set in service is still current (a 304, or the same bytes again)."""

    etag: str | None
    max_age: float | None
    status: int = 304


def judge_jwks(
    reply: Reply, *, etag: str | None, digest: bytes | None, parser: KeySetParser, source: str
) -> Fetched | NotModified:
    """The verdict on a key-set answer; :class:`FetchFailed` when it cannot be used.

    ``etag`` and ``digest`` describe the set in service (``None`` when cold):
    a 304, or the very same bytes from a server without ETags, keep it.
    """
    status = check_reply(reply, JWKS_MEDIA_TYPES, not_modified_ok=etag is not None)
    headers = reply.headers
    if status == 304:
        return NotModified(headers.get("etag") or etag, max_age(headers))
    body_digest = hashlib.sha256(reply.body).digest()
    if body_digest == digest:
        # The same document: keep the parsed set, so that records, and the
        # verifier's cache keyed on them, survive.
        return NotModified(headers.get("etag") or etag, max_age(headers), status=200)
    try:
        keys = parser.parse(reply.body, source, strict=False)
    except ConfigurationError as exc:
        # A leaked private key will not go away by asking again.
        raise FetchFailed(exc.reason, exc.detail, retryable=exc.reason == parser.reason, status=status) from None
    return Fetched(keys, headers.get("etag"), max_age(headers), body_digest)
