"""X-Forwarded-* from trusted proxies (meshauth.gateway._forwarded): rightmost values, capped, normal form."""

from __future__ import annotations

import gc
import ipaddress
import time
import tracemalloc

import pytest

from meshauth.gateway._forwarded import client_address, forwarded_host, forwarded_proto, normal_address

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in network for network in TRUSTED)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("[::ffff:10.0.0.1]:8443", "10.0.0.1"),
        ("10.0.0.1:443", "10.0.0.1"),
        ("[::1]", "::1"),
        ("[::1]:80", "::1"),
        (" 203.0.113.9 ", "203.0.113.9"),
    ],
)
def test_addresses_compare_in_normal_form(text: str, normal: str) -> None:
    assert str(normal_address(text)) == normal


@pytest.mark.parametrize("text", ["", "unknown", "[::1", "10.0.0.1.5", "javascript:1"])
def test_what_is_not_an_address(text: str) -> None:
    assert normal_address(text) is None


def test_the_client_is_the_rightmost_untrusted_hop() -> None:
    # The client forged "1.1.1.1"; the trusted proxy appended the address it really saw.
    assert client_address([b"1.1.1.1, 203.0.113.9"], "10.0.0.2", trusted) == "203.0.113.9"
    assert client_address([b"1.1.1.1", b"203.0.113.9, ::ffff:10.0.0.3"], "10.0.0.2", trusted) == "203.0.113.9"
    assert client_address([b"[::ffff:10.0.0.4]:99, 10.0.0.3"], "10.0.0.2", trusted) == "10.0.0.4"
    assert client_address([], "10.0.0.2", trusted) == "10.0.0.2"
    assert client_address([b"garbage, 10.0.0.3"], "10.0.0.2", trusted) == "10.0.0.3"


def test_the_walk_looks_at_no_more_than_max_hops_entries() -> None:
    chain = ", ".join(["203.0.113.1"] + ["10.0.0.9"] * 6000).encode()
    started = time.perf_counter()
    for _ in range(100):
        assert client_address([chain], "10.0.0.2", trusted, max_hops=10) == "10.0.0.9"
    assert client_address([chain], "10.0.0.2", trusted, max_hops=6001) == "203.0.113.1"
    assert time.perf_counter() - started < 5  # bounded work, not a timing budget


def test_the_cap_counts_entries_across_repeated_header_lines() -> None:
    lines = [b"203.0.113.1, 10.0.0.5", b"10.0.0.6", b"10.0.0.7 ,10.0.0.8"]
    assert client_address(lines, "10.0.0.2", trusted, max_hops=4) == "10.0.0.5"
    assert client_address(lines, "10.0.0.2", trusted, max_hops=5) == "203.0.113.1"
    assert client_address([b"203.0.113.1", b"", b"10.0.0.8"], "10.0.0.2", trusted, max_hops=3) == "10.0.0.8"
    assert client_address([b"203.0.113.1, 10.0.0.5,"], "10.0.0.2", trusted) == "10.0.0.2"  # empty: malformed


def test_a_long_header_is_not_decoded_or_split_as_a_whole() -> None:
    """The walk's memory does not grow with the header: only the entries within the cap are cut off."""
    chain = ", ".join(["203.0.113.1"] + ["10.0.0.9"] * 100_000).encode()  # about 1 MB
    proto, host = b"http, " * 100_000 + b"https", b"evil.example, " * 100_000 + b"gw.example"
    gc.collect()  # earlier tests' garbage (and its finalizers) is not counted
    gc.disable()
    tracemalloc.start()
    try:
        assert client_address([chain], "10.0.0.2", trusted, max_hops=100) == "10.0.0.9"
        assert (forwarded_proto([proto]), forwarded_host([host])) == ("https", "gw.example")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert peak < len(chain) // 4, peak  # splitting the whole header once would take several times its size


@pytest.mark.parametrize(
    ("values", "proto"),
    [
        ([b"https"], "https"),
        ([b"https, http"], "http"),
        ([b"javascript, http"], "http"),
        ([b"http", b"javascript"], None),
        ([b"HTTPS"], "https"),
        ([], None),
    ],
)
def test_proto_is_the_rightmost_value_if_valid(values: list[bytes], proto: str | None) -> None:
    assert forwarded_proto(values) == proto


@pytest.mark.parametrize(
    ("values", "host"),
    [
        ([b"evil.example, gw.example"], "gw.example"),
        ([b"gw.example:8443"], "gw.example:8443"),
        ([b"[::1]:8080"], "[::1]:8080"),
        ([b"gw.example, evil/../x"], None),
        ([b"a b"], None),
        ([b"x" * 300], None),
    ],
)
def test_host_is_the_rightmost_value_if_it_has_host_syntax(values: list[bytes], host: str | None) -> None:
    assert forwarded_host(values) == host
