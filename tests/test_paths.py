"""The canonical request path (meshauth._paths): one form for the Policy, the middlewares and the gateway."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshauth
from meshauth import BadPath, canonical_path
from meshauth._paths import decoded_path, routed_path

CANONICAL = [
    ("/charges", "/charges"),
    ("/charges/%2e%2e/admin", "/admin"),
    ("/charges/%2E%2E/admin", "/admin"),
    ("/charges/.%2e/admin", "/admin"),
    ("/charges/../admin", "/admin"),
    ("/a/./b", "/a/b"),
    ("/a/%2e/b", "/a/b"),
    ("/a/b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/..", "/"),
    ("/.", "/"),
    ("/", "/"),
    ("/a/b/", "/a/b/"),
    ("/a/.b/..c", "/a/.b/..c"),
    ("/%41%42c", "/ABc"),
    ("/%7Ealice", "/~alice"),
    # Reserved and non-ASCII escapes stay encoded (upper-case hex), never decoded.
    ("/a%20b", "/a%20b"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/a%3Fb", "/a%3Fb"),
    ("/a%3bb", "/a%3Bb"),
    ("/a%252e%252e", "/a%252e%252e"),
    ("/%ff", "/%FF"),
    ("/charges?x=1", "/charges"),
    ("/charges?next=/../admin%2F", "/charges"),
    ("/charges/%2e%2e/admin?q", "/admin"),
]

REFUSED = [
    ("", "start with '/'"),
    ("?x=1", "start with '/'"),
    ("charges", "start with '/'"),
    ("*", "start with '/'"),
    ("http://host/charges", "start with '/'"),
    ("/charges%2Fadmin", "encoded slash"),
    ("/charges%2fadmin", "encoded slash"),
    ("/a%5Cb", "encoded backslash"),
    ("/a%5cb", "encoded backslash"),
    ("/a\\b", "character '\\\\'"),
    ("/a\x00b", "character"),
    ("/a%00b", "encoded NUL"),
    ("/a b", "character ' '"),
    ("/a\tb", "character"),
    ("/%zz", "invalid percent-encoding"),
    ("/a%", "invalid percent-encoding"),
    ("/a%2", "invalid percent-encoding"),
    ("/a%g0", "invalid percent-encoding"),
    ("/caf\u00e9", "non-ASCII"),
    ("/%2e%2e/x", "above the root"),
    ("/../admin", "above the root"),
    ("/..", "above the root"),
    ("/a/../../b", "above the root"),
    ("/a/%2e%2e/%2e%2e/b", "above the root"),
    # Forms other servers route elsewhere (nginx, IIS, Tomcat, Jetty).
    ("//admin/users", "empty segment"),
    ("/a//b", "empty segment"),
    ("/admin./users", "ending in '.'"),
    ("/admin%2e/users", "ending in '.'"),
    ("/a/.../b", "ending in '.'"),
    ("/admin;x/users", "';'"),
    ("/orders/..;/admin", "dot-segment with parameters"),
    ("/orders/..%3B/admin", "dot-segment with parameters"),
    ("/orders/.;x/admin", "dot-segment with parameters"),
]


@pytest.mark.parametrize(("raw", "canonical"), CANONICAL)
def test_canonical_form(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_refused_paths_say_why(raw: str, why: str) -> None:
    with pytest.raises(BadPath) as info:
        canonical_path(raw)
    assert info.value.reason == "bad_path"
    assert why in info.value.detail
    assert "None" not in str(info.value)


def test_path_parameters_only_when_allowed() -> None:
    assert canonical_path("/files;v=2/x", allow_path_parameters=True) == "/files;v=2/x"
    with pytest.raises(BadPath, match="dot-segment with parameters"):
        canonical_path("/a/..;/admin", allow_path_parameters=True)


@pytest.mark.parametrize(
    "raw",
    ["/admin/../public", "/admin/%2e%2e/public", "/admin/.%2e/public", "/admin/x/../../public", "/%7Ea", "/a/./b"],
)
def test_routed_path_refuses_what_canonicalisation_would_change(raw: str) -> None:
    with pytest.raises(BadPath, match="not in canonical form") as info:
        routed_path(raw)
    assert info.value.expected == canonical_path(raw)


def test_routed_path_keeps_canonical_paths_and_ignores_hex_case() -> None:
    assert routed_path("/charges/42?x=/..") == "/charges/42"
    assert routed_path("/a%3bb") == "/a%3Bb"


@pytest.mark.parametrize(("decoded", "ok"), [("/a b/caf\u00e9", True), ("/a/../b", False), ("/a//b", False)])
def test_decoded_path_is_encoded_again_then_judged(decoded: str, ok: bool) -> None:
    if ok:
        assert decoded_path(decoded) == "/a%20b/caf%C3%A9"
    else:
        with pytest.raises(BadPath):
            decoded_path(decoded)


def test_bad_path_is_public() -> None:
    assert issubclass(meshauth.BadPath, meshauth.MeshAuthError)
    assert meshauth.BadPath.reason == "bad_path"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("/.%2eEfF;3bB5cC0a?~ ")), max_size=30))
def test_canonical_paths_are_fixed_points(raw: str) -> None:
    try:
        canonical = canonical_path(raw)
    except BadPath:
        return
    assert canonical_path(canonical) == canonical
    segments = canonical.split("/")[1:]
    assert "." not in segments and ".." not in segments
    assert all(segment or index == len(segments) - 1 for index, segment in enumerate(segments))
