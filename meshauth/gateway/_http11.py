"""HTTP/1.1 message heads and body framing (RFC 9112) for the gateway's server and its upstream client.

One parser judges every head the gateway reads, from a client or from an
upstream, and one encoder writes every head it sends; no general-purpose
protocol state machine sits in between. The grammar is the one h11 enforces
(the same token, field-value, request-line and status-line expressions), and
so are the framing rules: a ``Content-Length`` is digits (repeated only with
the same value), ``Transfer-Encoding`` is exactly ``chunked`` (else ``501``),
an HTTP/1.1 request has exactly one ``Host``. The server adds its own checks
on top (``_server``): bare CR/LF, obs-fold, target form, ambiguous framing.

A head is parsed once into a :class:`Head`; a body is decoded by a
:class:`BodyReader` fed with the bytes that follow it, and encoded by a
:class:`BodyWriter`, which refuses to send more or fewer bytes than a
``Content-Length`` declared.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

__all__ = [
    "BodyReader",
    "BodyWriter",
    "Head",
    "LocalProtocolError",
    "ProtocolError",
    "encode_request",
    "encode_response",
    "head_end",
    "parse_request",
    "parse_response",
]

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR: Final = rb"[^\x00\s]"
_FIELD_CONTENT: Final = _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR + rb"+)*"
# Every byte a header value may hold (not NUL, CR, LF, VT, FF: h11's field-vchar, spaces and tabs).
_VALUE_BYTES: Final = bytes(set(range(256)) - {0x00, 0x0A, 0x0B, 0x0C, 0x0D})
_HEADER_FIELD: Final = re.compile(_TOKEN + rb":[ \t]*(?:" + _FIELD_CONTENT + rb")?[ \t]*")
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|" + _FIELD_VCHAR + rb")*))?")
_NAME: Final = re.compile(_TOKEN)
_NAMES: Final = re.compile(_TOKEN + rb"(?::" + _TOKEN + rb")*")
_TARGET: Final = re.compile(rb"/[\x21-\x7e]*")
# A length of up to 18 digits (below 2**63); a longer one is refused rather than parsed.
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
# Chunk extensions are skipped, but may hold no control characters (a bare CR among them).
_CHUNK_HEADER: Final = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")
# The end of a head: a blank line (an upstream may end its lines with a bare LF, as h11 allows).
_BLANK_LINE: Final = re.compile(rb"\r?\n\r?\n")
_LINE_END: Final = re.compile(rb"\r?\n")
_MAX_CHUNK_LINE: Final = 4096
_MAX_TRAILERS: Final = 16384
_SUPPORTED: Final = frozenset({b"1.0", b"1.1"})
_PHRASES: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is the answer a server gives (400, 501, 505)."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class LocalProtocolError(Exception):
    """The gateway itself was about to break HTTP/1.1 (a body longer or shorter than its Content-Length)."""


@dataclasses.dataclass(slots=True)
class Head:
    """A parsed request or response head; header names are lower-case, values trimmed."""

    version: bytes
    headers: list[tuple[bytes, bytes]]
    method: bytes = b""
    target: bytes = b""
    status: int = 0
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    """Neither side said ``Connection: close`` and the peer speaks HTTP/1.1."""
    expect_continue: bool = False


def head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Where a head ends in ``data``: (end of its last line, start of what follows), or (-1, -1)."""
    match = _BLANK_LINE.search(data, start)
    if match is None:
        return -1, -1
    return match.start(), match.end()


def _split_fields(block: bytes, lines: list[bytes], separators: int) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of header lines, checked against h11's ``header_field`` grammar.

    ``block`` is the lines with their separators, ``separators`` the bytes
    those take. Not one pattern match per line, which costs a pass of the
    regular expression engine over every byte of every token: a value is any
    bytes but NUL, CR, LF, VT and FF (then trimmed of spaces and tabs), a name
    a token. The names are matched together; the forbidden bytes are found by
    deleting every other byte (one pass in C): what is left must be the
    separators, nothing more.
    """
    pairs = [line.partition(b":") for line in lines]
    joined = b":".join([name for name, _, _ in pairs])
    if (
        len(block.translate(None, _VALUE_BYTES)) != separators
        or _NAMES.fullmatch(joined) is None
        or joined.count(b":") != len(pairs) - 1
        or not all(colon for _, colon, _ in pairs)
    ):
        raise _illegal_line(lines)
    return [(name.lower(), value.strip(b" \t")) for name, _, value in pairs]


def _illegal_line(lines: Iterable[bytes]) -> ProtocolError:
    bad = next((line for line in lines if _HEADER_FIELD.fullmatch(line) is None), b"")
    return ProtocolError(f"illegal header line: {bad[:100]!r}")


def _fields(fields: Iterable[tuple[bytes, bytes]], head: Head) -> int:
    """Header fields into ``head``, with the framing rules applied; the number of ``Host`` headers."""
    headers = head.headers
    hosts = 0
    for name, value in fields:
        if name == b"content-length":
            values = {item.strip() for item in value.split(b",")}
            length = values.pop() if len(values) == 1 else b""
            if not _DIGITS.fullmatch(length):
                raise ProtocolError("bad Content-Length")
            if head.content_length is not None:
                if head.content_length != int(length):
                    raise ProtocolError("conflicting Content-Length headers")
                continue  # the same length twice: kept once
            head.content_length = int(length)
            headers.append((name, length))
            continue
        elif name == b"transfer-encoding":
            if head.chunked:
                raise ProtocolError("multiple Transfer-Encoding headers", 501)
            if value.lower() != b"chunked":
                raise ProtocolError("Only Transfer-Encoding: chunked is supported", 501)
            head.chunked = True
            headers.append((name, b"chunked"))
            continue
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            if b"close" in _tokens(value):
                head.keep_alive = False
        elif name == b"expect":
            head.expect_continue = b"100-continue" in _tokens(value)
        headers.append((name, value))
    return hosts


def _tokens(value: bytes) -> set[bytes]:
    return {item.strip().lower() for item in value.split(b",")}


def parse_request(data: bytes) -> Head:
    """A request head (without its blank line); ``ProtocolError`` if it breaks the grammar."""
    first, _, block = data.partition(b"\r\n")
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise ProtocolError(f"illegal request line: {first[:100]!r}")
    version = match[3]
    if version not in _SUPPORTED:
        raise ProtocolError(f"HTTP/{version.decode('ascii')} is not supported", 505)
    head = Head(version, [], method=match[1], target=match[2])
    lines = block.split(b"\r\n")
    hosts = _fields(_split_fields(block, lines, 2 * (len(lines) - 1)) if block else (), head)
    if hosts > 1:
        raise ProtocolError("Found multiple Host: headers")
    if hosts == 0 and version == b"1.1":
        raise ProtocolError("Missing mandatory Host: header")
    if version != b"1.1":
        head.keep_alive = False
        head.expect_continue = False
    return head


def parse_response(data: bytes) -> Head:
    """A response head (without its blank line); ``ProtocolError`` if it breaks the grammar."""
    end = data.find(b"\n")
    first, block = (data, b"") if end < 0 else (data[:end], data[end + 1 :])
    first = first.removesuffix(b"\r")
    match = _STATUS_LINE.fullmatch(first)
    if match is None:
        raise ProtocolError(f"illegal status line: {first[:100]!r}")
    head = Head(match[1], [], status=int(match[2]))
    crlf = block.count(b"\r\n")
    lines = block.split(b"\r\n") if block.count(b"\n") == crlf else _LINE_END.split(block)
    _fields(_split_fields(block, lines, len(lines) - 1 + crlf) if block else (), head)
    if head.version != b"1.1":
        head.keep_alive = False
    return head


def _has_no_body(method: bytes, status: int) -> bool:
    return status < 200 or status in {204, 304} or method == b"HEAD" or (method == b"CONNECT" and status < 300)


class BodyReader:
    """Decodes one body from the bytes fed to it: by ``Content-Length``, chunked, or up to the close.

    ``next()`` returns the next non-empty piece of the body, or ``None`` when
    it needs more bytes or the body is complete (``done``). Bytes after the
    body (a pipelined request) are kept in ``leftover``.
    """

    __slots__ = ("_buffer", "_mode", "_remaining", "_trailers", "done")

    def __init__(self, length: int | None, *, chunked: bool = False) -> None:
        self._buffer = b""
        self._mode = "size" if chunked else "length" if length is not None else "close"
        self._remaining = length or 0
        self._trailers = 0
        self.done = self._mode == "length" and self._remaining == 0

    @classmethod
    def for_request(cls, head: Head) -> BodyReader:
        return cls(head.content_length if head.content_length is not None else 0, chunked=head.chunked)

    @classmethod
    def for_response(cls, head: Head, method: bytes) -> BodyReader:
        if _has_no_body(method, head.status):
            return cls(0)
        return cls(head.content_length, chunked=head.chunked)

    @property
    def leftover(self) -> bytes:
        return self._buffer if self.done else b""

    @property
    def until_close(self) -> bool:
        """The body ends only when the peer closes the connection (no framing at all)."""
        return self._mode == "close"

    def feed(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data

    def eof(self) -> None:
        """The peer closed: the end of a close-delimited body, a ``ProtocolError`` inside any other."""
        if self.done:
            return
        if self._mode != "close":
            raise ProtocolError("the peer closed the connection inside the body")
        self.done = True

    def next(self) -> bytes | None:
        if self.done:
            return None
        if self._mode == "length":
            return self._sized()
        if self._mode == "close":
            data, self._buffer = self._buffer, b""
            return data or None
        return self._chunked()

    def _sized(self) -> bytes | None:
        buffer = self._buffer
        if not buffer:
            return None
        if len(buffer) <= self._remaining:
            data, self._buffer = buffer, b""
        else:
            data, self._buffer = buffer[: self._remaining], buffer[self._remaining :]
        self._remaining -= len(data)
        self.done = self._remaining == 0
        return data

    def _chunked(self) -> bytes | None:
        self._settle()
        buffer = self._buffer
        if self.done or self._mode != "data" or not buffer:
            return None
        data = buffer[: self._remaining] if len(buffer) > self._remaining else buffer
        self._buffer = buffer[len(data) :]
        self._remaining -= len(data)
        if self._remaining == 0:
            # Read on through the chunk's CRLF (and the last chunk, if it is here): the
            # caller then knows, with this piece in hand, whether it ends the body.
            self._mode = "crlf"
            self._settle()
        return data

    def _settle(self) -> None:
        """Consume the framing between chunk data (CRLF, chunk sizes, trailers) as far as it has arrived."""
        while not self.done:
            mode = self._mode
            if mode == "data":
                return
            if mode == "crlf":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise ProtocolError("missing CRLF after a chunk")
                self._buffer = self._buffer[2:]
                self._mode = "size"
                continue
            line = self._line(_MAX_CHUNK_LINE if mode == "size" else _MAX_TRAILERS - self._trailers)
            if line is None:
                return
            if mode == "size":
                match = _CHUNK_HEADER.fullmatch(line)
                if match is None:
                    raise ProtocolError("illegal chunk header")
                self._remaining = int(match[1], 16)
                self._mode = "data" if self._remaining else "trailers"
            elif not line:
                self.done = True
            elif _HEADER_FIELD.fullmatch(line) is None:
                raise ProtocolError("illegal trailer line")
            else:
                self._trailers += len(line) + 2

    def _line(self, limit: int) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > limit:
                raise ProtocolError("a chunk header or trailer line is too long")
            return None
        if end > limit:
            raise ProtocolError("a chunk header or trailer line is too long")
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line


class BodyWriter:
    """Encodes one body as its head declared: sized, chunked, up to the close, or none at all."""

    __slots__ = ("_mode", "_remaining")

    def __init__(self, mode: str, length: int = 0) -> None:
        self._mode = mode  # "length", "chunked", "close" or "none"
        self._remaining = length

    def data(self, data: bytes) -> bytes:
        if not data or self._mode == "none":
            return b""
        if self._mode == "chunked":
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self._mode == "length":
            if len(data) > self._remaining:
                raise LocalProtocolError("more body than the Content-Length declared")
            self._remaining -= len(data)
        return data

    def end(self) -> bytes:
        if self._mode == "chunked":
            return b"0\r\n\r\n"
        if self._mode == "length" and self._remaining:
            raise LocalProtocolError("less body than the Content-Length declared")
        return b""


def _lower_names(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with lower-case names; a name that is not a token is refused."""
    fields = [(name.lower(), value) for name, value in headers]
    if fields:
        # One pattern call for all names; the count catches a name that holds the separator itself.
        joined = b":".join([name for name, _ in fields])
        if _NAMES.fullmatch(joined) is None or joined.count(b":") != len(fields) - 1:
            raise LocalProtocolError("an illegal header name")
    return fields


def _head_bytes(first: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The head; refused if a value holds a CR, LF or NUL (which could end a line or the head).

    The values were parsed with the full grammar when they came in, or are the
    gateway's own: only what would split the head is looked for, by counting
    line ends in the built head rather than matching each value.
    """
    parts = [first]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    lines = len(headers) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\x00" in head:
        raise LocalProtocolError("an illegal header value (a CR, LF or NUL)")
    return head


def encode_response(
    status: int, headers: Iterable[tuple[bytes, bytes]], *, method: bytes, version: bytes, keep_alive: bool
) -> tuple[bytes, BodyWriter, bool]:
    """The head of a response to a ``method`` request, its body's encoder, and whether to close after it.

    The framing follows the request: no body for ``HEAD``, 1xx, 204 and 304;
    a ``Content-Length`` as declared; otherwise chunked for an HTTP/1.1 client
    and up to the close for an HTTP/1.0 one. ``Connection: close`` is added
    whenever the connection ends with this response.
    """
    fields = _lower_names(headers)
    declared: int | None = None
    chunked = False
    connection: list[bytes] = []
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        if name == b"content-length":
            if not _DIGITS.fullmatch(value) or (declared is not None and declared != int(value)):
                raise LocalProtocolError("a bad Content-Length")
            if declared is None:
                declared = int(value)
                out.append((name, value))
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise LocalProtocolError("only Transfer-Encoding: chunked can be sent")
            chunked = True
        elif name == b"connection":
            connection += [token for token in _tokens(value) if token]
        else:
            out.append((name, value))
    close = not keep_alive or b"close" in connection
    if _has_no_body(method, status):
        writer = BodyWriter("none")
        if chunked:
            out.append((b"transfer-encoding", b"chunked"))
    elif declared is not None and not chunked:
        writer = BodyWriter("length", declared)
    else:
        out = [(name, value) for name, value in out if name != b"content-length"]
        if version == b"1.1":
            writer = BodyWriter("chunked")
            out.append((b"transfer-encoding", b"chunked"))
        else:
            writer, close = BodyWriter("close"), True
    if close:
        connection = [token for token in connection if token != b"keep-alive"]
        if b"close" not in connection:
            connection.append(b"close")
    if connection:
        out.append((b"connection", b", ".join(sorted(set(connection)))))
    first = b"HTTP/1.1 %d %b\r\n" % (status, _PHRASES.get(status, b""))
    return _head_bytes(first, out), writer, close


def encode_request(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], *, chunked: bool
) -> tuple[bytes, BodyWriter]:
    """The head of a request and its body's encoder.

    A ``Content-Length`` among ``headers`` sizes the body; with ``chunked``
    (and no length) the body goes chunked; otherwise the request has none.
    """
    fields = _lower_names(headers)
    if not _NAME.fullmatch(method) or not _TARGET.fullmatch(target):
        raise LocalProtocolError("an illegal request line")
    length = next((value for name, value in fields if name == b"content-length"), None)
    fields = [(name, value) for name, value in fields if name != b"transfer-encoding"]
    if length is not None:
        if not _DIGITS.fullmatch(length):
            raise LocalProtocolError("a bad Content-Length")
        writer = BodyWriter("length", int(length))
    elif chunked:
        writer = BodyWriter("chunked")
        fields.append((b"transfer-encoding", b"chunked"))
    else:
        writer = BodyWriter("none")
    return _head_bytes(b"%b %b HTTP/1.1\r\n" % (method, target), fields), writer
