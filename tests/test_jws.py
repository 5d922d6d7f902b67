"""The strict codecs of the compact JWS format."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshauth import MalformedToken
from meshauth._jws import b64url_decode, b64url_decode_or_none, b64url_encode, loads_object

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(st.binary(max_size=200))
def test_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data)) == data
    assert b64url_decode_or_none(b64url_encode(data)) == (data if data else None)


@settings(max_examples=500)
@given(st.text(alphabet=ALPHABET + " \n\t.!é\x00", max_size=40))
def test_fast_decoder_agrees_with_the_exact_one(segment: str) -> None:
    """The hot-path decoder accepts exactly what the exact decoder accepts (bar the empty segment)."""
    try:
        exact: bytes | None = b64url_decode(segment)
    except MalformedToken:
        exact = None
    fast = b64url_decode_or_none(segment)
    assert fast == (exact if segment else None)


@pytest.mark.parametrize(
    ("segment", "problem"),
    [("QQ=", "not base64url"), ("Q Q", "not base64url"), ("QUJDR", "impossible"), ("QR", "not canonical")],
)
def test_exact_decoder_says_what_is_wrong(segment: str, problem: str) -> None:
    with pytest.raises(MalformedToken, match=problem):
        b64url_decode(segment)
    assert b64url_decode_or_none(segment) is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"a":1,"a":2}', "duplicate member"),
        (b'{"a":NaN}', "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b"\xff", "not UTF-8"),
        (b'{"a":1} x', "not valid JSON"),
        (b" {}", "not valid JSON"),
        (b"{" * 17 + b"}" * 17, "not valid JSON|nested too deeply"),
    ],
)
def test_strict_json(data: bytes, problem: str) -> None:
    with pytest.raises(MalformedToken, match=problem):
        loads_object(data)


def test_depth_limit_is_exact() -> None:
    nested = '{"a":' * 15 + "1" + "}" * 15
    assert loads_object(nested.encode())  # 15 objects deep
    too_deep = '{"a":' * 17 + "1" + "}" * 17
    with pytest.raises(MalformedToken, match="nested too deeply"):
        loads_object(too_deep.encode())
