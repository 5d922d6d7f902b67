"""Property-based fuzzing of the verifier (hypothesis).

Two properties run through every test here:

* only a :class:`meshauth.TokenError` ever escapes ``verify()``, and never the
  verifier's fail-closed catch-all ("token could not be processed"), which
  would mean an internal exception was masked as ``malformed``;
* a token that was changed in any way is never accepted, while a re-signed
  token is judged exactly as a small reference model of DESIGN section 2 says.

"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshauth import MalformedToken, Principal, TokenError, Verifier
from meshauth.testing import FakeClock, Mesh

FORBIDDEN = ("jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "cty", "enc")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
MAX_DEPTH = 16
LEEWAY = 30
MAX_LIFETIME = 900
ACCEPT = "accept"

FUZZ = settings(max_examples=300, deadline=None)
FUZZ_SMALL = settings(max_examples=150, deadline=None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def enc(obj: Any) -> bytes:
    # ensure_ascii keeps lone surrogates from hypothesis text encodable (as \\ud800).
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


@dataclasses.dataclass
class Env:
    mesh: Mesh
    clock: FakeClock
    verifier: Verifier
    tokens: dict[str, str]  # alg -> a valid token for payments

    @property
    def now(self) -> int:
        return int(self.clock())

    def signer(self, alg: str) -> str:
        return "orders" if alg == "ES256" else "ledger"

    def header(self, alg: str = "ES256") -> dict[str, Any]:
        key = self.mesh.signing_keys[self.signer(alg)]
        return {"alg": key.alg, "kid": key.kid, "typ": "meshauth+jwt"}

    def claims(self, issuer: str = "orders") -> dict[str, Any]:
        now = self.now
        return {"iss": issuer, "sub": issuer, "aud": "payments", "iat": now, "exp": now + 300, "jti": "fuzz-jti-0001"}

    def sign(self, header: Any, claims: Any, alg: str = "ES256") -> str:
        signing_input = f"{b64(enc(header))}.{b64(enc(claims))}"
        signature = self.mesh.signing_keys[self.signer(alg)].sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def env() -> Env:
    clock = FakeClock()
    mesh = Mesh(["orders", "payments", "gateway"], clock=clock)
    mesh.add_service("ledger", alg="EdDSA")
    verifier = Verifier("payments", mesh.keys, clock=clock, leeway=LEEWAY, max_lifetime=MAX_LIFETIME)
    tokens = {
        "ES256": mesh.identity("orders").mint("payments"),
        "EdDSA": mesh.identity("ledger").mint("payments"),
    }
    return Env(mesh, clock, verifier, tokens)


def outcome(verifier: Verifier, token: Any) -> Principal | TokenError:
    """Verify, and fail the test on anything but a Principal or a clean TokenError."""
    # Any exception other than a TokenError propagates and fails the test.
    try:
        return verifier.verify(token)
    except TokenError as exc:
        error = exc
    assert "could not be processed" not in error.detail, f"internal defect masked as malformed: {error.detail}"
    return error


def reason_of(result: Principal | TokenError) -> str:
    return ACCEPT if isinstance(result, Principal) else result.reason


# -- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
NOW = int(FakeClock()())
numeric_dates = (
    st.integers(min_value=NOW - 2 * MAX_LIFETIME, max_value=NOW + 2 * MAX_LIFETIME)
    | st.sampled_from([0, -1, 2**53, 2**53 + 1, NOW - LEEWAY, NOW + LEEWAY, NOW + LEEWAY + 1])
    | st.integers(min_value=-(2**60), max_value=2**60)
)
names = st.sampled_from(["orders", "payments", "gateway", "billing", "alice", "", " ", "ORDERS", "orders\x00"])
actor_chains = st.recursive(
    st.none(),
    lambda child: st.fixed_dictionaries(
        {"sub": names | json_scalars},
        optional={"act": child, "extra": json_scalars},
    ),
    max_leaves=7,
)


# -- arbitrary input ------------------------------------------------------------------------------


@FUZZ
@given(text=st.text(max_size=400) | st.from_regex(r"[A-Za-z0-9_.=+/ -]{0,600}", fullmatch=True))
def test_arbitrary_text_is_only_ever_a_token_error(env: Env, text: str) -> None:
    result = outcome(env.verifier, text)
    assert isinstance(result, TokenError)


@FUZZ
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_are_only_ever_a_token_error(env: Env, data: bytes) -> None:
    result = outcome(env.verifier, data)
    assert isinstance(result, TokenError)


@FUZZ
@given(segments=st.lists(st.binary(max_size=120), min_size=1, max_size=5))
def test_jws_shaped_garbage_is_only_ever_a_token_error(env: Env, segments: list[bytes]) -> None:
    result = outcome(env.verifier, ".".join(b64(segment) for segment in segments))
    assert isinstance(result, TokenError)
    if len(segments) != 3:
        assert isinstance(result, MalformedToken)


@FUZZ_SMALL
@given(header=json_values, payload=json_values, alg=st.sampled_from(["ES256", "EdDSA"]))
def test_validly_signed_random_json_is_only_ever_a_token_error(env: Env, header: Any, payload: Any, alg: str) -> None:
    result = outcome(env.verifier, env.sign(header, payload, alg))
    # A random header has no usable kid, so nothing here can be accepted.
    assert isinstance(result, TokenError)


# -- mutations of a valid token --------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, token: str) -> str:
    """Apply one to three random edits to ``token``."""
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "swap", "duplicate", "drop", "truncate", "bitflip"]))
        segments = token.split(".")
        if op in ("swap", "duplicate", "drop") and len(segments) >= 2:
            i = draw(st.integers(min_value=0, max_value=len(segments) - 1))
            j = draw(st.integers(min_value=0, max_value=len(segments) - 1))
            if op == "swap":
                segments[i], segments[j] = segments[j], segments[i]
            elif op == "duplicate":
                segments.insert(j, segments[i])
            else:
                del segments[i]
            token = ".".join(segments)
            continue
        if not token:
            token = draw(st.text(alphabet=ALPHABET + ".", max_size=4))
            continue
        at = draw(st.integers(min_value=0, max_value=len(token) - 1))
        char = draw(st.sampled_from(ALPHABET + ".=+/ \n\x00") | st.characters())
        if op == "replace":
            token = token[:at] + char + token[at + 1 :]
        elif op == "insert":
            token = token[:at] + char + token[at:]
        elif op == "delete":
            width = draw(st.integers(min_value=1, max_value=8))
            token = token[:at] + token[at + width :]
        elif op == "truncate":
            token = token[:at]
        elif token[at] in ALPHABET:  # bitflip: flip one bit of the 6-bit value
            value = ALPHABET.index(token[at]) ^ (1 << draw(st.integers(min_value=0, max_value=5)))
            token = token[:at] + ALPHABET[value] + token[at + 1 :]
    return token


@FUZZ
@given(data=st.data(), alg=st.sampled_from(["ES256", "EdDSA"]))
def test_a_changed_token_is_never_accepted(env: Env, data: st.DataObject, alg: str) -> None:
    original = env.tokens[alg]
    token = data.draw(mutated(original), label="mutated token")
    result = outcome(env.verifier, token)
    if token == original:
        assert isinstance(result, Principal)
    else:
        assert isinstance(result, TokenError), "a modified token string was accepted"


@FUZZ
@given(
    extras=st.dictionaries(
        st.sampled_from(FORBIDDEN) | st.text(max_size=10).filter(lambda name: name not in ("alg", "kid", "typ")),
        json_values,
        max_size=4,
    ),
    resign=st.booleans(),
    alg=st.sampled_from(["ES256", "EdDSA"]),
)
def test_header_with_random_extra_members(env: Env, extras: dict[str, Any], resign: bool, alg: str) -> None:
    header = {**env.header(alg), **extras}
    original = env.tokens[alg]
    if resign:
        token = env.sign(header, env.claims("orders" if alg == "ES256" else "ledger"), alg)
    else:
        token = b64(enc(header)) + original[original.index(".") :]
    result = outcome(env.verifier, token)
    if set(extras) & set(FORBIDDEN) or json_depth(header) > MAX_DEPTH:
        expected = "malformed"
    elif resign:
        expected = ACCEPT  # other unknown header members are ignored (RFC 7515)
    else:
        expected = ACCEPT if not extras else "bad_signature"
    assert reason_of(result) == expected


# -- a reference model for one claim at a time -----------------------------------------------------


def _is_date(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**53


def _is_name(value: Any, limit: int) -> bool:
    return type(value) is str and 0 < len(value) <= limit


def expected_plain(name: str, value: Any, now: int) -> set[str]:
    """Acceptable outcomes for a plain orders -> payments token with ``name`` set to ``value``."""
    iat, exp = now, now + 300
    if name == "iss":
        if not _is_name(value, 256):
            return {"invalid_claim"}
        # Both rules break (iss != key owner, sub != iss without act); DESIGN
        # does not order claim checks, so either reason is right.
        return {ACCEPT} if value == "orders" else {"issuer_mismatch", "invalid_claim"}
    if name == "sub":
        return {ACCEPT} if value == "orders" else {"invalid_claim"}
    if name == "aud":
        if isinstance(value, list):
            if len(value) != 1:
                return {"wrong_audience"}
            value = value[0]
        if not isinstance(value, str):
            return {"invalid_claim"}
        return {ACCEPT} if value == "payments" else {"wrong_audience"}
    if name == "jti":
        return {ACCEPT} if _is_name(value, 256) else {"invalid_claim"}
    if name == "scope":
        return {ACCEPT} if isinstance(value, str) else {"invalid_claim"}
    if name == "act":
        return {"invalid_claim"}  # 'act' on a token whose sub == iss
    if name in ("iat", "exp", "nbf"):
        if not _is_date(value):
            return {"invalid_claim"}
        if name == "iat":
            iat = value
        elif name == "exp":
            exp = value
        if exp < iat:
            return {"invalid_claim"}
        if exp - iat > MAX_LIFETIME:
            return {"lifetime_too_long"}
        if now >= exp + LEEWAY:
            return {"expired"}
        if iat > now + LEEWAY or (name == "nbf" and value > now + LEEWAY):
            return {"not_yet_valid"}
        return {ACCEPT}
    return {ACCEPT}  # an unknown claim is carried, not judged


CLAIM_NAMES = ["iss", "sub", "aud", "iat", "exp", "nbf", "jti", "scope", "act", "x-custom"]


@st.composite
def claim_values(draw: st.DrawFn, name: str) -> Any:
    if name in ("iat", "exp", "nbf"):
        return draw(numeric_dates | json_values)
    if name in ("iss", "sub", "aud"):
        return draw(names | st.lists(names, max_size=3) | json_values)
    if name == "jti":
        return draw(st.text(min_size=0, max_size=300) | json_values)
    return draw(json_values)


@FUZZ
@given(data=st.data(), name=st.sampled_from(CLAIM_NAMES))
def test_one_claim_with_a_random_value(env: Env, data: st.DataObject, name: str) -> None:
    value = data.draw(claim_values(name), label=name)
    claims = {**env.claims(), name: value}
    result = outcome(env.verifier, env.sign(env.header(), claims))
    expected = {"malformed"} if json_depth(claims) > MAX_DEPTH else expected_plain(name, value, env.now)
    assert reason_of(result) in expected, f"{name}={value!r}"
    if isinstance(result, Principal):
        assert (result.caller, result.subject, result.audience, result.transaction) == (
            "orders",
            "orders",
            "payments",
            None,
        )


@FUZZ
@given(act=actor_chains | json_values)
def test_random_actor_chains(env: Env, act: Any) -> None:
    """Version 2: a service token carrying a user or any 'act' at all is refused."""
    claims = {**env.claims(), "sub": "alice", "act": act}
    result = outcome(env.verifier, env.sign(env.header(), claims))
    expected = {"malformed"} if json_depth(claims) > MAX_DEPTH else {"invalid_claim"}
    assert reason_of(result) in expected, f"act={act!r}"


def thaw(value: Any) -> Any:
    """Principal.claims is read-only all the way down (mappings and tuples): back to JSON shapes."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@FUZZ_SMALL
@given(
    claims=st.dictionaries(
        st.sampled_from(CLAIM_NAMES), names | numeric_dates | json_values, min_size=0, max_size=len(CLAIM_NAMES)
    )
)
def test_random_claim_sets_are_a_principal_or_a_token_error(env: Env, claims: dict[str, Any]) -> None:
    result = outcome(env.verifier, env.sign(env.header(), claims))
    if isinstance(result, Principal):
        assert result.caller == claims["iss"] == "orders"
        assert result.audience == "payments"
        assert thaw(result.claims) == claims
