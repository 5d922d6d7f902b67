"""HTTP/1.1 heads and body framing of the gateway (meshauth.gateway._http11): the grammar and the framing rules."""

from __future__ import annotations

import pytest

from meshauth.gateway._http11 import (
    BodyReader,
    LocalProtocolError,
    ProtocolError,
    encode_request,
    encode_response,
    head_end,
    parse_request,
    parse_response,
)


def test_a_request_head_is_parsed_into_lower_case_names_and_trimmed_values() -> None:
    head = parse_request(b"GET /orders/1?x=1 HTTP/1.1\r\nHost: gw\r\nX-Thing:  a b \t\r\nContent-Length: 0")
    assert (head.method, head.target, head.version) == (b"GET", b"/orders/1?x=1", b"1.1")
    assert head.headers == [(b"host", b"gw"), (b"x-thing", b"a b"), (b"content-length", b"0")]
    assert head.content_length == 0 and not head.chunked and head.keep_alive and not head.expect_continue


@pytest.mark.parametrize(
    ("head", "status", "words"),
    [
        (b"GET /x HTTP/2.0\r\nHost: gw", 505, "not supported"),
        (b"GET  /x HTTP/1.1\r\nHost: gw", 400, "request line"),
        (b"GET /x\r\nHost: gw", 400, "request line"),
        (b"G(T /x HTTP/1.1\r\nHost: gw", 400, "request line"),
        (b"GET /x HTTP/1.1", 400, "Host"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b", 400, "multiple Host"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n folded", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX A: 1", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw:80\r\nNo-Colon", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\n: empty-name", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A : 1", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: a\x0bb", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: a\rb", 400, "header line"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2", 400, "conflicting"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1, 2", 400, "Content-Length"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: -1", 400, "Content-Length"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: " + b"9" * 5000, 400, "Content-Length"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked", 501, "chunked"),
        (b"GET /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 501, "multiple"),
    ],
)
def test_a_request_head_outside_the_grammar_is_refused(head: bytes, status: int, words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as caught:
        parse_request(head)
    assert caught.value.status == status


def test_framing_and_connection_rules_of_a_request() -> None:
    same_length_twice = parse_request(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 3")
    assert same_length_twice.content_length == 3
    assert [name for name, _ in same_length_twice.headers] == [b"host", b"content-length"]
    assert parse_request(b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked").chunked
    assert not parse_request(b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, Close").keep_alive
    old = parse_request(b"GET /x HTTP/1.0\r\nExpect: 100-continue")  # no Host needed, no keep-alive
    assert not old.keep_alive and not old.expect_continue
    assert parse_request(b"POST /x HTTP/1.1\r\nHost: gw\r\nExpect: 100-Continue").expect_continue


def test_a_response_head_may_omit_its_reason_and_end_lines_with_a_bare_lf() -> None:
    data = b"HTTP/1.1 204\nX-A: 1\n\nrest"
    end, rest = head_end(data)
    head = parse_response(data[:end])
    assert (head.status, head.headers, data[rest:]) == (204, [(b"x-a", b"1")], b"rest")
    assert not parse_response(b"HTTP/1.0 200 OK").keep_alive
    for bad in (b"HTTP/1.1 200 OK\r\nX-A: a\rb", b"HTTP/1.1 200 OK\nX-A: 1\r\nX-B:\x00"):
        with pytest.raises(ProtocolError, match="header line"):
            parse_response(bad)
    with pytest.raises(ProtocolError, match="status line"):
        parse_response(b"HTTP/1.1 2000 OK")
    assert head_end(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n") == (-1, -1)


def pieces(reader: BodyReader, *feeds: bytes) -> list[bytes]:
    out: list[bytes] = []
    for data in feeds:
        reader.feed(data)
        while (piece := reader.next()) is not None:
            out.append(piece)
    return out


def test_a_chunked_body_split_anywhere_decodes_to_the_same_bytes() -> None:
    wire = b"3\r\nabc\r\n5;name=value\r\ndefgh\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next"
    for cut in range(len(wire) + 1):
        reader = BodyReader(None, chunked=True)
        assert b"".join(pieces(reader, wire[:cut], wire[cut:])) == b"abcdefgh", cut
        assert reader.done and reader.leftover == b"GET /next"


def test_the_last_chunk_is_known_with_the_last_piece_when_it_has_arrived() -> None:
    reader = BodyReader(None, chunked=True)
    reader.feed(b'b\r\n{"ok":true}\r\n0\r\n\r\n')
    assert reader.next() == b'{"ok":true}' and reader.done


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"3\r\nabcXY", "CRLF"),
        (b"zz\r\n", "chunk header"),
        (b"3;\x01\r\nabc\r\n", "chunk header"),
        (b"1" * 5000, "too long"),
        (b"0\r\nbad trailer\r\n\r\n", "trailer"),
    ],
)
def test_a_broken_chunked_body_is_a_protocol_error(wire: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        pieces(BodyReader(None, chunked=True), wire)


def test_sized_and_close_delimited_bodies() -> None:
    sized = BodyReader(5)
    assert pieces(sized, b"abc", b"defg") == [b"abc", b"de"] and sized.done and sized.leftover == b"fg"
    cut_short = BodyReader(5)
    pieces(cut_short, b"abc")
    with pytest.raises(ProtocolError, match="inside the body"):
        cut_short.eof()
    until_close = BodyReader(None)
    assert pieces(until_close, b"abc", b"def") == [b"abc", b"def"] and not until_close.done
    until_close.eof()
    assert until_close.done and until_close.until_close
    assert BodyReader(0).done
    head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10")
    assert BodyReader.for_response(head, b"HEAD").done  # a HEAD response has no body, whatever it declares


def test_a_response_is_framed_for_its_request() -> None:
    head, writer, close = encode_response(
        200,
        [(b"content-type", b"text/plain"), (b"content-length", b"3")],
        method=b"GET",
        version=b"1.1",
        keep_alive=True,
    )
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\n" and not close
    assert writer.data(b"abc") + writer.end() == b"abc"
    head, writer, close = encode_response(200, [], method=b"GET", version=b"1.1", keep_alive=True)
    assert b"transfer-encoding: chunked\r\n" in head and not close
    assert writer.data(b"abc") + writer.data(b"") + writer.end() == b"3\r\nabc\r\n0\r\n\r\n"
    head, writer, close = encode_response(200, [], method=b"GET", version=b"1.0", keep_alive=False)
    assert b"connection: close\r\n" in head and b"transfer-encoding" not in head and close
    assert writer.data(b"abc") + writer.end() == b"abc"  # up to the close
    head, writer, close = encode_response(
        200, [(b"content-length", b"3")], method=b"HEAD", version=b"1.1", keep_alive=True
    )
    assert b"content-length: 3\r\n" in head and writer.data(b"abc") + writer.end() == b""
    head, _, close = encode_response(
        401, [(b"connection", b"keep-alive, x-a")], method=b"GET", version=b"1.1", keep_alive=False
    )
    assert b"HTTP/1.1 401 Unauthorized\r\n" in head and b"connection: close, x-a\r\n" in head and close


def test_a_response_the_gateway_could_get_wrong_is_refused() -> None:
    _, writer, _ = encode_response(200, [(b"content-length", b"3")], method=b"GET", version=b"1.1", keep_alive=True)
    with pytest.raises(LocalProtocolError, match="more body"):
        writer.data(b"abcd")
    _, writer, _ = encode_response(200, [(b"content-length", b"3")], method=b"GET", version=b"1.1", keep_alive=True)
    writer.data(b"ab")
    with pytest.raises(LocalProtocolError, match="less body"):
        writer.end()
    for headers in (
        [(b"x-a", b"a\r\nx-injected: 1")],
        [(b"x-a", b"a\nx-injected: 1")],
        [(b"x a", b"1")],
        [(b"x-b", b"1"), (b"x-a:x-c", b"1")],
        [(b"x-a", b"\x00")],
        [(b"", b"1")],
    ):
        with pytest.raises(LocalProtocolError, match="illegal"):
            encode_response(200, headers, method=b"GET", version=b"1.1", keep_alive=True)


def test_a_request_upstream_is_sized_chunked_or_bodiless() -> None:
    head, writer = encode_request(b"POST", b"/x", [(b"Host", b"up"), (b"Content-Length", b"3")], chunked=True)
    assert head == b"POST /x HTTP/1.1\r\nhost: up\r\ncontent-length: 3\r\n\r\n"
    assert writer.data(b"abc") + writer.end() == b"abc"
    head, writer = encode_request(b"POST", b"/x", [(b"host", b"up"), (b"transfer-encoding", b"chunked")], chunked=True)
    assert head.count(b"transfer-encoding") == 1 and writer.data(b"ab") + writer.end() == b"2\r\nab\r\n0\r\n\r\n"
    head, writer = encode_request(b"GET", b"/x?a=1", [(b"host", b"up")], chunked=False)
    assert head == b"GET /x?a=1 HTTP/1.1\r\nhost: up\r\n\r\n" and writer.end() == b""
    for method, target in ((b"GET", b"http://elsewhere/"), (b"GET", b"/a b"), (b"G T", b"/")):
        with pytest.raises(LocalProtocolError):
            encode_request(method, target, [(b"host", b"up")], chunked=False)
