"""Measure meshauth against the performance budgets of DESIGN section 7, in one process.

Run from the repository root::

    python benchmarks/run.py                  # full run, ~25 s on 2 cores
    python benchmarks/run.py --quick --check  # smoke run (< 20 s), exit 1 if a budget fails
    python benchmarks/run.py --json results.json --rounds 31
    python benchmarks/run.py --profile        # where the microseconds of verify() go

Every comparison is measured in interleaved rounds (A, B, A, B, ... in a
rotating order); each round times a batch of calls per operation with the
garbage collector off; the table shows the median (and min) per call, and each
ratio is the median of the per-round ratios. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import dataclasses
import hashlib
import io
import json
import logging
import pstats
import secrets
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from itertools import repeat
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

import meshauth
from meshauth import JWKSEndpoint, KeySet, ServiceAuth, ServiceIdentity, SigningKey, StaticKeys, Verifier, _jws
from meshauth._keyset import load_keys
from meshauth.asgi import MeshAuthMiddleware

try:  # an optional peer, as in the 'test' extra
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey
except ImportError:
    jose_jwt = ECKey = None  # type: ignore[assignment,misc]

if __package__:
    from ._floor import bare_hops, bare_verifications
    from ._harness import (
        Operation,
        Row,
        Samples,
        describe,
        format_table,
        interleave,
        machine_description,
        markdown_report,
        ratio,
    )
    from .bench_gateway import gateway_rows
    from .bench_redis import DEFAULT_URL as REDIS_URL
    from .bench_redis import bench_revocation
else:  # run as a script: benchmarks/ is on sys.path
    from _floor import bare_hops, bare_verifications  # type: ignore[no-redef]
    from _harness import (  # type: ignore[no-redef]
        Operation,
        Row,
        Samples,
        describe,
        format_table,
        interleave,
        machine_description,
        markdown_report,
        ratio,
    )
    from bench_gateway import gateway_rows  # type: ignore[no-redef]
    from bench_redis import DEFAULT_URL as REDIS_URL  # type: ignore[no-redef]
    from bench_redis import bench_revocation  # type: ignore[no-redef]

AUDIENCE = "payments"
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
JWKS_KEYS = 10_000
CONCURRENT_VERIFIERS = 50
MISSING = "n/a (module missing)"
# DESIGN 7 rows whose parts are not built yet: listed by --check as pending, never as met.
PENDING: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Scale:
    """Batch sizes (calls per timed batch) and round counts of one run."""

    rounds: int
    verify_batch: int  # full (new-token) verifications, signatures
    fast_batch: int  # cached verifications, cached token_for
    http_batch: int  # auth flows, client requests, ASGI requests
    full_cache_batch: int  # verifications against a full verified-token cache
    jwks_rounds: int  # 10,000-key loads are slow: fewer rounds
    lookup_batch: int  # kid lookups


QUICK = Scale(
    rounds=9, verify_batch=30, fast_batch=1000, http_batch=200, full_cache_batch=8, jwks_rounds=3, lookup_batch=1000
)
FULL = Scale(
    rounds=61, verify_batch=50, fast_batch=2000, http_batch=300, full_cache_batch=20, jwks_rounds=7, lookup_batch=2000
)


# -- helpers -----------------------------------------------------------------------------


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _split(token: str) -> tuple[bytes, bytes]:
    """(signing input, raw signature) of a compact JWS, decoded independently of meshauth."""
    signing_input, _, signature = token.rpartition(".")
    return signing_input.encode("ascii"), _b64url(signature)


def _der(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _row(
    section: str, operation: str, samples: Samples, baseline: Samples | None = None, label: str = "", **kw: Any
) -> Row:
    return Row(
        section,
        operation,
        samples.median_us,
        samples.min_us,
        ratio(samples, baseline) if baseline is not None else None,
        label if baseline is not None else "",
        **kw,
    )


def _preflight(candidates: Sequence[Operation]) -> tuple[list[Operation], dict[str, str]]:
    """Run each operation of a module another issue delivers once; keep those that work.

    A module that is missing or broken then shows as its rows' note or error,
    and the rest of the group is still measured.
    """
    working: list[Operation] = []
    errors: dict[str, str] = {}
    for op in candidates:
        try:
            if op.setup is not None:
                op.setup()
            op.run()
        except Exception as exc:
            errors[op.name] = _clip(f"{type(exc).__name__}: {exc}")
        else:
            working.append(op)
    return working, errors


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _measured_row(
    section: str,
    operation: str,
    samples: dict[str, Samples],
    name: str,
    *,
    errors: dict[str, str],
    baseline: Samples,
    label: str,
    **kw: Any,
) -> Row:
    """The row of an optional operation: measured, failed (error) or missing (note)."""
    if name in samples:
        return _row(section, operation, samples[name], baseline, label, **kw)
    budget = {"budget": kw["budget"]} if "budget" in kw else {}
    if name in errors:
        return Row(section, operation, baseline=label, error=errors[name], **budget)
    return Row(section, operation, baseline=label, note=MISSING, **budget)


def _difference_us(a: Samples, b: Samples) -> float:
    """Median over rounds of ``a - b`` within each round, in us."""
    return statistics.median(x - y for x, y in zip(a.per_call_ns, b.per_call_ns, strict=True)) / 1000


class _NullSpan:
    """A span that does nothing at all ("telemetry compiled out")."""

    __slots__ = ()

    def end(self, *args: Any) -> None:
        return None

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, *args: Any) -> None:
        return None

    def set_status(self, *args: Any) -> None:
        return None


class _NullInstrument:
    __slots__ = ()

    def record(self, *args: Any) -> None:
        return None

    def add(self, *args: Any) -> None:
        return None


class _NullTelemetry:
    """Stands in for ``meshauth._telemetry.Telemetry``: no tracer, no meter, no audit."""

    span = _NullSpan()
    verify_duration = verify_outcomes = _NullInstrument()

    @property
    def tracer(self) -> _NullTelemetry:
        return self

    def start_span(self, *args: Any, **kwargs: Any) -> _NullSpan:
        return self.span


class NoTelemetryVerifier(Verifier):
    """A Verifier with telemetry stubbed out, for the benchmark only.

    The accepted path's span attributes, span end, two metric calls and the
    audit-level check are skipped entirely, and ``start_span`` returns a
    constant; what remains is the verification itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.telemetry = _NullTelemetry()  # type: ignore[assignment]

    def _accepted(self, span: Any, principal: Any, started: float, write_audit: bool) -> None:
        return None


@dataclasses.dataclass
class Fixture:
    """Keys, identities and registries shared by the groups."""

    es_private: ec.EllipticCurvePrivateKey
    ed_private: ed25519.Ed25519PrivateKey
    es_key: SigningKey
    ed_key: SigningKey
    keys: StaticKeys
    orders: ServiceIdentity  # ES256
    ledger: ServiceIdentity  # EdDSA

    @classmethod
    def build(cls) -> Fixture:
        es_private = ec.generate_private_key(ec.SECP256R1())
        ed_private = ed25519.Ed25519PrivateKey.generate()
        es_key, ed_key = SigningKey(es_private), SigningKey(ed_private)
        keys = StaticKeys.from_jwks({"keys": [es_key.public_jwk(iss="orders"), ed_key.public_jwk(iss="ledger")]})
        # ttl = the verifier's default max_lifetime: tokens stay valid for a long run.
        orders = ServiceIdentity("orders", es_key, ttl=900)
        ledger = ServiceIdentity("ledger", ed_key, ttl=900)
        return cls(es_private, ed_private, es_key, ed_key, keys, orders, ledger)


def _verify_all(verifier: Verifier, tokens: Sequence[str]) -> Callable[[], None]:
    def run() -> None:
        verify = verifier.verify
        for token in tokens:
            verify(token)

    return run


def _repeat_call(function: Callable[..., object], calls: int, *args: Any) -> Callable[[], None]:
    def run() -> None:
        for _ in repeat(None, calls):
            function(*args)

    return run


# -- ES256 verification -------------------------------------------------------------------


def bench_verify(fx: Fixture, scale: Scale) -> list[Row]:
    # Long on purpose: one section's operations are measured interleaved, round by round, and
    # each row reads its numbers from that one run; split up, the ratios would mix runs.
    section = "ES256 verify (DESIGN 7 rows 1-2)"
    n = scale.verify_batch
    tokens = [fx.orders.mint(AUDIENCE) for _ in range(n)]
    pairs = [(_der(sig), data) for data, sig in map(_split, tokens)]
    public_key = fx.es_private.public_key()

    def raw_verify() -> None:
        verify = public_key.verify
        for der, data in pairs:
            verify(der, data, ECDSA_SHA256)

    new = Verifier(AUDIENCE, fx.keys)
    no_cache = Verifier(AUDIENCE, fx.keys, cache_size=0)
    new_quiet = NoTelemetryVerifier(AUDIENCE, fx.keys)
    cached = Verifier(AUDIENCE, fx.keys)
    cached_quiet = NoTelemetryVerifier(AUDIENCE, fx.keys)
    token = tokens[0]

    decode = jwt.decode
    required: Any = {"require": ["iss", "sub", "aud", "iat", "exp", "jti"]}

    def pyjwt_decode() -> None:
        for t in tokens:
            decode(t, public_key, algorithms=["ES256"], audience=AUDIENCE, issuer="orders", options=required)

    ops = [
        Operation("raw", raw_verify, n),
        Operation("new", _verify_all(new, tokens), n, setup=new.clear_cache),
        Operation("no_cache", _verify_all(no_cache, tokens), n),
        Operation("new_quiet", _verify_all(new_quiet, tokens), n, setup=new_quiet.clear_cache),
        Operation("cached", _repeat_call(cached.verify, scale.fast_batch, token), scale.fast_batch),
        Operation("cached_quiet", _repeat_call(cached_quiet.verify, scale.fast_batch, token), scale.fast_batch),
        Operation("pyjwt", pyjwt_decode, n),
        Operation("floor", bare_verifications({fx.es_key.kid: public_key}, AUDIENCE, tokens, time.time), n),
    ]
    joserfc = _joserfc_decoder(fx, tokens)
    if joserfc is not None:
        ops.append(Operation("joserfc", joserfc, n))
    s = interleave(ops, scale.rounds)
    raw = s["raw"]
    label = "raw ES256 verify"
    rows = [
        _row(section, "cryptography ES256 verify (DER sig, prebuilt key)", raw, raw, label),
        _row(
            section,
            "meshauth verify, new token",
            s["new"],
            raw,
            label,
            budget=1.20,
            note=f"{n} distinct pre-minted tokens; verified-token cache on, emptied (untimed) before each batch; "
            f"added to the raw verify: {_difference_us(s['new'], raw):.1f} us",
        ),
        _row(section, "meshauth verify, new token, cache_size=0", s["no_cache"], raw, label),
        _row(
            section,
            "floor: bare verify (no strict checks, telemetry or cache)",
            s["floor"],
            raw,
            label,
            note="the least Python any ES256 JWS verifier runs (benchmarks/_floor.py); "
            f"meshauth adds {_difference_us(s['new'], s['floor']):.1f} us to it",
        ),
        _row(
            section,
            "meshauth verify, cached token (same token again)",
            s["cached"],
            raw,
            label,
            budget=0.02,
        ),
        _row(
            section,
            "PyJWT jwt.decode (aud, iss, required claims)",
            s["pyjwt"],
            raw,
            label,
            note=f"meshauth new-token verify / PyJWT decode = {ratio(s['new'], s['pyjwt']):.2f}x",
        ),
    ]
    if "joserfc" in s:
        rows.append(
            _row(
                section,
                "joserfc jwt.decode + JWTClaimsRegistry.validate",
                s["joserfc"],
                raw,
                label,
                note=f"meshauth new-token verify / joserfc = {ratio(s['new'], s['joserfc']):.2f}x",
            )
        )
    else:
        rows.append(Row(section, "joserfc jwt.decode + JWTClaimsRegistry.validate", note="n/a (joserfc missing)"))
    section = "telemetry overhead (no-op OpenTelemetry API vs stubbed out)"
    rows += [
        _row(
            section,
            "verify, new token: default telemetry / none",
            s["new"],
            s["new_quiet"],
            "telemetry stubbed out",
            budget=1.05,
            note=f"stubbed-out verifier: {s['new_quiet'].median_us:.2f} us",
        ),
        _row(
            section,
            "verify, cached token: default telemetry / none",
            s["cached"],
            s["cached_quiet"],
            "telemetry stubbed out",
            note=f"stubbed-out verifier: {s['cached_quiet'].median_us:.3f} us; "
            f"telemetry share of the cached path: {s['cached'].median_us - s['cached_quiet'].median_us:.3f} us",
        ),
    ]
    return rows


def _verify_pairs(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> Callable[[], None]:
    def run() -> None:
        verify = verifier.verify
        for token, txn_token in pairs:
            verify(token, txn_token)

    return run


def bench_txn(fx: Fixture, scale: Scale) -> list[Row]:
    """DESIGN 7 row 3: a new service token and a new Txn-Token bound to it, against one raw ES256 verify."""
    section = "one hop inside a transaction (DESIGN 7 row 3)"
    n = scale.verify_batch
    # orders issues the Txn-Tokens here (the verifier trusts it as an issuer): the same key type and
    # size as the gateway's, so the cost is the one of a real hop.
    txns = [
        fx.orders.issue_txn_token(f"user-{i}", scope="orders:read", context={"groups": ["staff"]}) for i in range(n)
    ]
    pairs = [(fx.orders.mint(AUDIENCE, txn_token=txn), txn) for txn in txns]
    second_hop = [(fx.orders.mint(AUDIENCE, txn_token=txns[0]), txns[0]) for _ in range(n)]
    raw_pairs = [(_der(sig), data) for data, sig in map(_split, [token for token, _ in pairs])]
    public_key = fx.es_private.public_key()

    def raw_verify() -> None:
        verify = public_key.verify
        for der, data in raw_pairs:
            verify(der, data, ECDSA_SHA256)

    # Txn-Tokens live at most 300 s: the verifiers' clock stays at minting time for a long run.
    minted_at = time.time()
    hop = Verifier(AUDIENCE, fx.keys, txn_issuers=("orders",), clock=lambda: minted_at)
    second = Verifier(AUDIENCE, fx.keys, txn_issuers=("orders",), clock=lambda: minted_at)

    def warm_second() -> None:
        second.clear_cache()
        second.verify(fx.orders.mint(AUDIENCE, txn_token=txns[0]), txns[0])  # the Txn-Token is known now

    s = interleave(
        [
            Operation("raw", raw_verify, n),
            Operation("hop", _verify_pairs(hop, pairs), n, setup=hop.clear_cache),
            Operation("second", _verify_pairs(second, second_hop), n, setup=warm_second),
            Operation(
                "floor", bare_hops({fx.es_key.kid: public_key}, AUDIENCE, "meshauth", pairs, lambda: minted_at), n
            ),
        ],
        scale.rounds,
    )
    raw, label = s["raw"], "raw ES256 verify"
    return [
        _row(section, "cryptography ES256 verify (DER sig, prebuilt key)", raw, raw, label),
        _row(
            section,
            "verify, new service token + new Txn-Token",
            s["hop"],
            raw,
            label,
            budget=2.3,
            note=f"{n} distinct pairs, both signatures checked, then tth; caches emptied (untimed) before each "
            f"batch; added to two raw verifies: {s['hop'].median_us - 2 * raw.median_us:.1f} us",
        ),
        _row(
            section,
            "verify, new service token + Txn-Token already verified (the next hop)",
            s["second"],
            raw,
            label,
            note="the Txn-Token's verification comes from the verifier's cache",
        ),
        _row(
            section,
            "floor: bare hop (two bare verifies and tth)",
            s["floor"],
            raw,
            label,
            note="the least Python any implementation runs for a hop (benchmarks/_floor.py); "
            f"meshauth adds {_difference_us(s['hop'], s['floor']):.1f} us to it",
        ),
    ]


def _joserfc_decoder(fx: Fixture, tokens: Sequence[str]) -> Callable[[], None] | None:
    if jose_jwt is None:
        return None
    key = ECKey.import_key(fx.es_key.public_jwk(iss="orders"))
    essential: Any = {"essential": True}
    claims = jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": "orders"},
        aud={"essential": True, "value": AUDIENCE},
        sub=essential,
        jti=essential,
        iat=essential,
        exp=essential,
    )

    def run() -> None:
        decode = jose_jwt.decode
        validate = claims.validate
        for t in tokens:
            validate(decode(t, key, algorithms=["ES256"]).claims)

    return run


# -- the verified-token cache under pressure -------------------------------------------------------


def bench_full_cache(fx: Fixture, scale: Scale) -> list[Row]:
    """New tokens while the verified-token cache is full of still-valid entries."""
    section = "ES256 verify, verified-token cache full (4096 live entries)"
    n = scale.full_cache_batch
    verifier = Verifier(AUDIENCE, fx.keys)
    for _ in range(verifier.cache_size):
        verifier.verify(fx.orders.mint(AUDIENCE))
    # Each batch needs tokens the cache has never seen: one chunk per batch.
    chunks = [[fx.orders.mint(AUDIENCE) for _ in range(n)] for _ in range(scale.rounds + 1)]
    public_key = fx.es_private.public_key()
    raw_chunks = [[(_der(sig), data) for data, sig in map(_split, chunk)] for chunk in chunks]
    mesh_iter: Iterator[list[str]] = iter(chunks)
    raw_iter: Iterator[list[tuple[bytes, bytes]]] = iter(raw_chunks)
    current: dict[str, Any] = {}

    def mesh_setup() -> None:
        current["mesh"] = next(mesh_iter)

    def raw_setup() -> None:
        current["raw"] = next(raw_iter)

    def mesh_run() -> None:
        verify = verifier.verify
        for token in current["mesh"]:
            verify(token)

    def raw_run() -> None:
        verify = public_key.verify
        for der, data in current["raw"]:
            verify(der, data, ECDSA_SHA256)

    s = interleave(
        [Operation("raw", raw_run, n, setup=raw_setup), Operation("full", mesh_run, n, setup=mesh_setup)],
        scale.rounds,
    )
    return [
        _row(
            section,
            "meshauth verify, new token, cache full",
            s["full"],
            s["raw"],
            "raw ES256 verify",
            note="each insert into a full cache scans all entries for stale ones (see docs/performance.md)",
        )
    ]


# -- signing -----------------------------------------------------------------------------


def bench_sign(fx: Fixture, scale: Scale) -> list[Row]:
    section = "ES256 sign / token_for (DESIGN 7 row 4)"
    n = scale.verify_batch
    inputs = [_split(fx.orders.mint(AUDIENCE))[0] for _ in range(n)]
    private = fx.es_private

    def raw_sign() -> None:
        sign = private.sign
        for data in inputs:
            sign(data, ECDSA_SHA256)

    cached = ServiceIdentity("orders", fx.es_key, ttl=900)
    cached.token_for(AUDIENCE)
    fresh = ServiceIdentity("orders", fx.es_key, ttl=900)

    def token_for_fresh() -> None:
        invalidate, token_for = fresh.invalidate, fresh.token_for
        for _ in repeat(None, n):
            invalidate(AUDIENCE)
            token_for(AUDIENCE)

    encode = jwt.encode
    headers = {"kid": fx.es_key.kid, "typ": "meshauth+jwt"}

    def pyjwt_encode() -> None:
        for _ in repeat(None, n):
            now = int(time.time())
            claims = {
                "iss": "orders",
                "sub": "orders",
                "aud": AUDIENCE,
                "iat": now,
                "exp": now + 300,
                "jti": secrets.token_urlsafe(16),
            }
            encode(claims, private, algorithm="ES256", headers=headers)

    ops = [
        Operation("raw", raw_sign, n),
        Operation("cached", _repeat_call(cached.token_for, scale.fast_batch, AUDIENCE), scale.fast_batch),
        Operation("fresh", token_for_fresh, n),
        Operation("mint", _repeat_call(fx.orders.mint, n, AUDIENCE), n),
        Operation("pyjwt", pyjwt_encode, n),
    ]
    s = interleave(ops, scale.rounds)
    raw = s["raw"]
    label = "raw ES256 sign"
    return [
        _row(section, "cryptography ES256 sign (DER, prebuilt key)", raw, raw, label),
        _row(section, "ServiceIdentity.token_for, cached", s["cached"], raw, label, budget=0.05),
        _row(section, "ServiceIdentity.token_for, fresh (after invalidate)", s["fresh"], raw, label),
        _row(section, "ServiceIdentity.mint", s["mint"], raw, label),
        _row(
            section,
            "PyJWT jwt.encode (same claims and header)",
            s["pyjwt"],
            raw,
            label,
            note=f"ServiceIdentity.mint / PyJWT encode = {ratio(s['mint'], s['pyjwt']):.2f}x",
        ),
    ]


# -- response tokens ---------------------------------------------------------------------------


def bench_response(fx: Fixture, scale: Scale) -> list[Row]:
    """Signing an answer (mutual authentication): what binding its body adds to one ES256 signature."""
    section = "response tokens: signing with the body bound (mutual authentication, no DESIGN 7 row)"
    n = scale.verify_batch
    payments = ServiceIdentity("payments", fx.es_key, ttl=900)
    nonce = "n" * 22
    small, large = secrets.token_bytes(1024), secrets.token_bytes(64 * 1024)
    inputs = [_split(payments.mint_response("orders", nonce, status=200, body=small))[0] for _ in range(n)]
    private = fx.es_private
    sha256 = hashlib.sha256

    def raw_sign_and_hash(body: bytes) -> Callable[[], None]:
        def run() -> None:
            sign = private.sign
            for data in inputs:
                sha256(body).digest()
                sign(data, ECDSA_SHA256)

        return run

    def hash_only(body: bytes) -> Callable[[], None]:
        def run() -> None:
            for _ in repeat(None, n):
                sha256(body).digest()

        return run

    def mint(body: bytes | None) -> Callable[[], None]:
        def run() -> None:
            sign = payments.mint_response
            for _ in repeat(None, n):
                sign("orders", nonce, status=200, body=body)

        return run

    s = interleave(
        [
            Operation("raw", raw_sign_and_hash(b""), n),
            Operation("raw_1k", raw_sign_and_hash(small), n),
            Operation("raw_64k", raw_sign_and_hash(large), n),
            Operation("sha_64k", hash_only(large), n),
            Operation("unbound", mint(None), n),
            Operation("bound_1k", mint(small), n),
            Operation("bound_64k", mint(large), n),
        ],
        scale.rounds,
    )
    added = s["bound_64k"].median_us - s["unbound"].median_us
    return [
        _row(section, "cryptography ES256 sign", s["raw"], s["raw"], "raw sign"),
        _row(section, "ServiceIdentity.mint_response, body not bound", s["unbound"], s["raw"], "raw sign"),
        _row(section, "cryptography ES256 sign + SHA-256 of 1 KiB", s["raw_1k"], s["raw_1k"], "sign + SHA-256"),
        _row(section, "ServiceIdentity.mint_response, 1 KiB body bound", s["bound_1k"], s["raw_1k"], "sign + SHA-256"),
        _row(section, "cryptography ES256 sign + SHA-256 of 64 KiB", s["raw_64k"], s["raw_64k"], "sign + SHA-256"),
        _row(
            section,
            "ServiceIdentity.mint_response, 64 KiB body bound",
            s["bound_64k"],
            s["raw_64k"],
            "sign + SHA-256",
            note=f"binding the body adds {added:.1f} us to the unbound token; SHA-256 of the 64 KiB alone "
            f"{s['sha_64k'].median_us:.1f} us",
        ),
    ]


# -- Ed25519 -----------------------------------------------------------------------------------


def bench_eddsa(fx: Fixture, scale: Scale) -> list[Row]:
    section = "EdDSA (Ed25519), no budget"
    n = scale.verify_batch
    tokens = [fx.ledger.mint(AUDIENCE) for _ in range(n)]
    pairs = [(sig, data) for data, sig in map(_split, tokens)]
    public_key = fx.ed_private.public_key()
    private = fx.ed_private

    def raw_verify() -> None:
        verify = public_key.verify
        for sig, data in pairs:
            verify(sig, data)

    def raw_sign() -> None:
        sign = private.sign
        for _, data in pairs:
            sign(data)

    verifier = Verifier(AUDIENCE, fx.keys)
    decode = jwt.decode

    def pyjwt_decode() -> None:
        for t in tokens:
            decode(t, public_key, algorithms=["EdDSA"], audience=AUDIENCE)

    s = interleave(
        [
            Operation("raw_verify", raw_verify, n),
            Operation("verify", _verify_all(verifier, tokens), n, setup=verifier.clear_cache),
            Operation("pyjwt", pyjwt_decode, n),
            Operation("raw_sign", raw_sign, n),
            Operation("mint", _repeat_call(fx.ledger.mint, n, AUDIENCE), n),
        ],
        scale.rounds,
    )
    return [
        _row(section, "cryptography Ed25519 verify", s["raw_verify"], s["raw_verify"], "raw Ed25519 verify"),
        _row(section, "meshauth verify, new EdDSA token", s["verify"], s["raw_verify"], "raw Ed25519 verify"),
        _row(section, "PyJWT jwt.decode, EdDSA", s["pyjwt"], s["raw_verify"], "raw Ed25519 verify"),
        _row(section, "cryptography Ed25519 sign", s["raw_sign"], s["raw_sign"], "raw Ed25519 sign"),
        _row(section, "ServiceIdentity.mint, EdDSA", s["mint"], s["raw_sign"], "raw Ed25519 sign"),
    ]


# -- ServiceAuth -----------------------------------------------------------------------------


class ConstantHeaderAuth(httpx.Auth):
    """The baseline: the cheapest useful auth, one fixed header."""

    def __init__(self, value: str) -> None:
        self.value = value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.value
        yield request


def _flow_runner(auth: httpx.Auth, calls: int) -> Callable[[], None]:
    request = httpx.Request("GET", "https://payments.internal/charges")
    response = httpx.Response(200)

    def run() -> None:
        flow_of = auth.sync_auth_flow
        for _ in repeat(None, calls):
            flow = flow_of(request)
            next(flow)
            try:  # noqa: SIM105 - contextlib.suppress would cost more than some flows being timed
                flow.send(response)
            except StopIteration:
                pass

    return run


def _client_runner(client: httpx.Client, calls: int) -> Callable[[], None]:
    def run() -> None:
        get = client.get
        for _ in repeat(None, calls):
            get("https://payments.internal/charges")

    return run


def bench_service_auth(fx: Fixture, scale: Scale) -> list[Row]:
    section = "ServiceAuth per request (DESIGN 7 row 5)"
    auth_class = ServiceAuth
    n = scale.http_batch
    identity = ServiceIdentity("orders", fx.es_key, ttl=900)
    # The baseline's header is as long as a real one: header encoding costs the same.
    trivial = ConstantHeaderAuth("Bearer " + identity.token_for(AUDIENCE))
    service = auth_class(identity, audience=AUDIENCE)
    response = httpx.Response(200)
    transport = httpx.MockTransport(lambda request: response)
    with (
        httpx.Client(auth=trivial, transport=transport) as trivial_client,
        httpx.Client(auth=service, transport=transport) as service_client,
    ):
        s = interleave(
            [
                Operation("trivial_flow", _flow_runner(trivial, n), n),
                Operation("flow", _flow_runner(service, n), n),
                Operation("trivial_client", _client_runner(trivial_client, n), n),
                Operation("client", _client_runner(service_client, n), n),
            ],
            scale.rounds,
        )
    return [
        _row(section, "trivial httpx.Auth: sync_auth_flow(request)", s["trivial_flow"], s["trivial_flow"], "trivial"),
        _row(
            section,
            "ServiceAuth: sync_auth_flow(request)",
            s["flow"],
            s["trivial_flow"],
            "trivial auth flow",
            budget=2.0,
            note="the auth's own cost: the flow generator driven directly, one 200 response, cached token",
        ),
        _row(section, "trivial httpx.Auth: Client.get, MockTransport", s["trivial_client"], s["trivial_client"], ""),
        _row(
            section,
            "ServiceAuth: Client.get, MockTransport",
            s["client"],
            s["trivial_client"],
            "trivial auth, Client",
            note=f"added per request: {s['client'].median_us - s['trivial_client'].median_us:.2f} us",
        ),
    ]


# -- ASGI middleware --------------------------------------------------------------------------


_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def _bare_app(scope: Any, receive: Any, send: Any) -> None:
    await send(_START)
    await send(_BODY)


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _charge_scope(token: str) -> dict[str, Any]:
    """An ASGI scope of a POST /charges/c_42 carrying ``token``, as a server would build it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/charges/c_42",
        "raw_path": b"/charges/c_42",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"payments.internal:8002"),
            (b"user-agent", b"python-httpx/0.28.1"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/json"),
            (b"content-length", b"17"),
            (b"authorization", b"Bearer " + token.encode("ascii")),
        ],
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8002),
    }


def bench_asgi(fx: Fixture, scale: Scale) -> list[Row]:
    section = "ASGI middleware per request (DESIGN 7 row 6: <= 10 us added)"
    middleware = MeshAuthMiddleware
    n = scale.http_batch
    token = ServiceIdentity("orders", fx.es_key, ttl=900).token_for(AUDIENCE)
    policy = meshauth.Policy.from_dict(
        {"rules": [{"callers": ["orders"], "methods": ["POST"], "paths": ["/charges", "/charges/*"]}]}
    )
    apps = {
        "bare": _bare_app,
        "verify": middleware(_bare_app, Verifier(AUDIENCE, fx.keys)),
        "policy": middleware(_bare_app, Verifier(AUDIENCE, fx.keys), policy=policy),
    }
    scope = _charge_scope(token)
    loop = asyncio.new_event_loop()

    def runner(app: Any) -> Callable[[], None]:
        async def many() -> None:
            for _ in repeat(None, n):
                # A copy per request, as a server builds a new scope per request.
                await app(dict(scope), _receive, _send)

        return lambda: loop.run_until_complete(many())

    try:
        s = interleave([Operation(name, runner(app), n) for name, app in apps.items()], scale.rounds)
    finally:
        loop.close()
    bare = s["bare"]
    added = s["verify"].median_us - bare.median_us
    return [
        _row(section, "bare ASGI app", bare, bare, "bare app"),
        Row(
            section,
            "MeshAuthMiddleware(verifier), cached token: us added per request",
            ratio=round(added, 2),
            baseline="us added",
            budget=10.0,
            unit=" us",
        ),
        _row(
            section,
            "MeshAuthMiddleware(verifier), cached token",
            s["verify"],
            bare,
            "bare app",
            note=f"added per request: {s['verify'].median_us - bare.median_us:.2f} us",
        ),
        _row(
            section,
            "MeshAuthMiddleware(verifier, policy), cached token",
            s["policy"],
            bare,
            "bare app",
            note=f"added per request: {s['policy'].median_us - bare.median_us:.2f} us",
        ),
    ]


# -- JWKS ------------------------------------------------------------------------------------


def jwks_document(count: int) -> dict[str, Any]:
    """A registry of ``count`` distinct ES256 keys owned by 100 services."""
    return {
        "keys": [
            SigningKey(ec.generate_private_key(ec.SECP256R1())).public_jwk(iss=f"svc-{i % 100}") for i in range(count)
        ]
    }


def _jwks_response(body: bytes) -> httpx.Response:
    return httpx.Response(
        200, content=body, headers={"Content-Type": "application/jwk-set+json", "Cache-Control": "max-age=300"}
    )


def bench_jwks(doc: dict[str, Any], scale: Scale) -> list[Row]:
    # Long on purpose: one section's operations are measured interleaved, round by round, and
    # each row reads its numbers from that one run; split up, the ratios would mix runs.
    section = f"JWKS with {JWKS_KEYS:,} keys: cold load (DESIGN 7 row 5)"
    body = json.dumps(doc).encode("utf-8")
    from_dict = jwt.PyJWKSet.from_dict
    endpoint_class = JWKSEndpoint
    first_kid = doc["keys"][0]["kid"]

    class _MockedPyJWKClient(jwt.PyJWKClient):
        """PyJWKClient with the same body instead of a urllib request."""

        def fetch_data(self) -> Any:
            data = json.loads(body)
            if self.jwk_set_cache is not None:  # as PyJWKClient.fetch_data does
                self.jwk_set_cache.put(data)
            return data

    def pyjwt_client_cold() -> None:
        _MockedPyJWKClient("https://registry.internal/jwks").get_signing_key(first_kid)

    ops = [
        Operation("pyjwt", lambda: from_dict(doc), 1),
        Operation("lazy", lambda: KeySet.from_jwks(doc, lazy=True), 1),
        Operation("strict", lambda: KeySet.from_jwks(doc), 1),
        Operation("pyjwt_client", pyjwt_client_cold, 1),
    ]
    client = httpx.Client(transport=httpx.MockTransport(lambda request: _jwks_response(body)))

    def endpoint_cold() -> None:
        with endpoint_class("https://registry.internal/jwks", client=client) as endpoint:
            if endpoint.get_key(first_kid) is None:
                raise LookupError("the endpoint did not find a kid of the document")

    optional = [Operation("load_keys", lambda: load_keys(body), 1), Operation("endpoint", endpoint_cold, 1)]
    try:
        working, errors = _preflight(optional)
        s = interleave(ops + working, min(scale.rounds, scale.jwks_rounds))
    finally:
        client.close()
    pyjwt = s["pyjwt"]
    label = "PyJWKSet.from_dict"
    return [
        _row(section, "PyJWKSet.from_dict(doc) (what PyJWKClient does)", pyjwt, pyjwt, label),
        _measured_row(
            section,
            "JWKSEndpoint's load: load_keys(body bytes)",
            s,
            "load_keys",
            errors=errors,
            baseline=pyjwt,
            label=label,
            budget=0.1,
            note="from the fetched bytes (PyJWT's side starts from the decoded dict); keys parsed on first use",
        ),
        _row(
            section,
            "KeySet.from_jwks(doc, lazy=True) (StaticKeys, JWKSFile)",
            s["lazy"],
            pyjwt,
            label,
            note="each key's structure checked at load, key objects built on first use",
        ),
        _row(section, "KeySet.from_jwks(doc), every key object built", s["strict"], pyjwt, label),
        _row(
            section,
            "PyJWKClient cold: new client + get_signing_key (mocked fetch)",
            s["pyjwt_client"],
            pyjwt,
            label,
        ),
        _measured_row(
            section,
            "JWKSEndpoint cold: new endpoint + get_key (MockTransport)",
            s,
            "endpoint",
            errors=errors,
            baseline=s["pyjwt_client"],
            label="PyJWKClient cold",
        ),
    ]


def bench_lookup(doc: dict[str, Any], scale: Scale) -> list[Row]:
    section = "kid lookup, 10 vs 10,000 keys (DESIGN 7 row 7)"
    n = scale.lookup_batch
    small_doc = {"keys": doc["keys"][:10]}
    small_kids = [jwk["kid"] for jwk in small_doc["keys"]]
    large_kids = [jwk["kid"] for jwk in doc["keys"][:: len(doc["keys"]) // 100]]
    small_list = (small_kids * (n // len(small_kids) + 1))[:n]
    large_list = (large_kids * (n // len(large_kids) + 1))[:n]

    def lookups(get: Callable[[str], object], kids: list[str]) -> Callable[[], None]:
        def run() -> None:
            for kid in kids:
                get(kid)

        return run

    small, large = KeySet.from_jwks(small_doc, lazy=True), KeySet.from_jwks(doc, lazy=True)
    ops = [
        Operation("small", lookups(small.get, small_list), n),
        Operation("large", lookups(large.get, large_list), n),
    ]
    endpoint_class = JWKSEndpoint
    clients: list[httpx.Client] = []
    endpoints: list[Any] = []
    errors: dict[str, str] = {}
    if endpoint_class is not None:
        try:
            for document in (small_doc, doc):
                body = json.dumps(document).encode("utf-8")
                client = httpx.Client(transport=httpx.MockTransport(lambda request, body=body: _jwks_response(body)))
                clients.append(client)
                endpoints.append(endpoint_class("https://registry.internal/jwks", client=client))
        except Exception as exc:
            errors = dict.fromkeys(("ep_small", "ep_large"), _clip(f"{type(exc).__name__}: {exc}"))
        else:
            working, errors = _preflight(
                [
                    Operation("ep_small", lookups(endpoints[0].get_key, small_list), n),
                    Operation("ep_large", lookups(endpoints[1].get_key, large_list), n),
                ]
            )
            ops += working
    pyjwt_client = jwt.PyJWKClient("https://registry.invalid/jwks", cache_jwk_set=True, lifespan=3600)
    assert pyjwt_client.jwk_set_cache is not None
    pyjwt_client.jwk_set_cache.put(jwt.PyJWKSet.from_dict(doc))  # warm: no fetch, only the lookup
    last_kid = doc["keys"][-1]["kid"]
    pyjwt_calls = 10
    ops.append(Operation("pyjwt", _repeat_call(pyjwt_client.get_signing_key, pyjwt_calls, last_kid), pyjwt_calls))
    try:
        # The warm-up round fetches (endpoints) and builds the looked-up keys once:
        # lookups, not parses, are timed.
        s = interleave(ops, scale.rounds)
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for client in clients:
            client.close()
    o1 = "O(1): the same dict lookup at both sizes (the budget allows noise; an O(N) scan would be ~1000x)"
    rows = [
        _row(section, "KeySet.get, 10 keys", s["small"], s["small"], "10 keys"),
        _row(section, "KeySet.get, 10,000 keys", s["large"], s["small"], "KeySet.get, 10 keys", budget=2.0, note=o1),
    ]
    if "ep_small" in s and "ep_large" in s:
        rows += [
            _row(section, "JWKSEndpoint.get_key, 10 keys (warm)", s["ep_small"], s["ep_small"], "10 keys"),
            _row(
                section,
                "JWKSEndpoint.get_key, 10,000 keys (warm)",
                s["ep_large"],
                s["ep_small"],
                "get_key, 10 keys",
                budget=2.0,
            ),
        ]
    else:
        error = errors.get("ep_large") or errors.get("ep_small", "")
        note = "" if error else MISSING
        rows += [
            Row(section, "JWKSEndpoint.get_key, 10 keys (warm)", note=note, error=error),
            Row(section, "JWKSEndpoint.get_key, 10,000 keys (warm)", budget=2.0, note=note, error=error),
        ]
    rows.append(
        _row(
            section,
            "PyJWKClient.get_signing_key, 10,000 keys, warm cache",
            s["pyjwt"],
            s["large"],
            "KeySet.get, 10k keys",
            note="last kid of the set: PyJWKClient filters and scans the whole key list on every call",
        )
    )
    return rows


def bench_concurrent_fetch(doc: dict[str, Any]) -> list[Row]:
    """50 threads verify on a cold JWKSEndpoint: how many fetches reach the registry?"""
    section = "50 concurrent verifiers, cold cache (DESIGN 7 row 8)"
    operation = f"{CONCURRENT_VERIFIERS} threads verify at once: registry fetches"
    endpoint_class = JWKSEndpoint
    failed_operation = f"{CONCURRENT_VERIFIERS} threads verify at once: verifications that failed"
    key = SigningKey.generate("ES256")
    small_doc = {"keys": [key.public_jwk(iss="orders"), *doc["keys"][:99]]}
    body = json.dumps(small_doc).encode("utf-8")
    fetches = 0
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal fetches
        with lock:
            fetches += 1
        time.sleep(0.05)  # a slow registry widens the race window
        return _jwks_response(body)

    token = ServiceIdentity("orders", key).token_for(AUDIENCE)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(transport=httpx.MockTransport(handler)))
        endpoint = endpoint_class("https://registry.internal/jwks", client=client)
        stack.callback(endpoint.close)
        verifier = Verifier(AUDIENCE, endpoint)
        barrier = threading.Barrier(CONCURRENT_VERIFIERS)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait(timeout=30)
                verifier.verify(token)
            except BaseException as exc:  # reported in the row, not raised in a thread
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENT_VERIFIERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    note = "JWKSEndpoint over httpx.MockTransport counting requests; 50 ms per fetch"
    failed = f"first: {type(errors[0]).__name__}" if errors else ""
    return [
        Row(section, operation, ratio=float(fetches), baseline="fetch count", budget=1, compare="==", note=note),
        Row(section, failed_operation, ratio=float(len(errors)), baseline="count", budget=0, compare="==", note=failed),
    ]


# -- profile ----------------------------------------------------------------------------------


def _pipeline(fx: Fixture, tokens: Sequence[str]) -> list[tuple[str, Operation]]:
    """Cumulative slices of verify() over distinct tokens: each adds one stage to the previous."""
    # Long on purpose: one section's operations are measured interleaved, round by round, and
    # each row reads its numbers from that one run; split up, the ratios would mix runs.
    n = len(tokens)
    public_key = fx.es_private.public_key()
    parts = [_split(t) for t in tokens]
    pairs = [(_der(sig), data) for data, sig in parts]
    verifier = Verifier(AUDIENCE, fx.keys)
    # The engine's stages (meshauth._engine.Engine.begin and .finish), one at a time.
    parse, check_claims, profile = verifier.parse, verifier.check_claims, verifier.profile
    keys = fx.keys

    def lookup(header: tuple[str, str | None], claims: dict[str, Any]) -> Any:
        found = keys.get_key(header[1] or "")
        return verifier.check_key(profile, keys, header[0], header[1], found, claims)

    record = fx.keys.get_key(fx.es_key.kid)
    assert record is not None

    def p0() -> None:
        verify = public_key.verify
        for der, data in pairs:
            verify(der, data, ECDSA_SHA256)

    def p1() -> None:
        verify = public_key.verify
        for data, sig in parts:
            verify(_jws.raw_to_der(sig), data, ECDSA_SHA256)

    def p2() -> None:
        check = record.verify_signature
        for t in tokens:
            _, _, signing_input, signature = parse(t)
            check(signature, signing_input)

    def p3() -> None:
        for t in tokens:
            header, payload, signing_input, signature = parse(t)
            lookup(header, payload).verify_signature(signature, signing_input)

    def p4() -> None:
        for t in tokens:
            header, payload, signing_input, signature = parse(t)
            found = lookup(header, payload)
            found.verify_signature(signature, signing_input)
            check_claims(profile, payload, found, None)

    no_cache = NoTelemetryVerifier(AUDIENCE, fx.keys, cache_size=0)
    quiet = NoTelemetryVerifier(AUDIENCE, fx.keys)
    default = Verifier(AUDIENCE, fx.keys)
    return [
        ("raw cryptography verify, DER prepared", Operation("p0", p0, n)),
        ("+ JWS r||s -> DER (raw_to_der)", Operation("p1", p1, n)),
        ("+ parse (regex, split, base64url, strict JSON) + sig length check", Operation("p2", p2, n)),
        ("+ key lookup, check_key (kid, key validity window, alg)", Operation("p3", p3, n)),
        ("+ check_claims (profile claim rules, Principal)", Operation("p4", p4, n)),
        (
            "+ verify() frame, Engine.run (telemetry stubbed, cache_size=0)",
            Operation("p5", _verify_all(no_cache, tokens), n),
        ),
        ("+ verified-token cache insert", Operation("p6", _verify_all(quiet, tokens), n, setup=quiet.clear_cache)),
        (
            "+ telemetry (no-op OpenTelemetry API) = Verifier.verify",
            Operation("p7", _verify_all(default, tokens), n, setup=default.clear_cache),
        ),
    ]


def _micro_stages(fx: Fixture, calls: int) -> list[tuple[str, Operation]]:
    """Single stages of verify(), each in a hot loop on one token."""
    verifier = Verifier(AUDIENCE, fx.keys)
    token = fx.orders.mint(AUDIENCE)
    profile = verifier.profile
    header, payload, _, signature = verifier.parse(token)
    found = fx.keys.get_key(header[1] or "")

    def lookup() -> Any:
        return verifier.check_key(profile, fx.keys, header[0], header[1], found, payload)

    record = lookup()
    payload_b64 = token.split(".")[1]
    payload_bytes = _jws.b64url_decode(payload_b64, checked=True)
    principal, until = verifier.check_claims(profile, payload, record, None)
    fields = {f.name: getattr(principal, f.name) for f in dataclasses.fields(principal)}
    principal_class = type(principal)
    telemetry = verifier.telemetry
    started = time.perf_counter()
    stages: list[tuple[str, Callable[[], object]]] = [
        ("(empty call: loop + lambda overhead, subtracted below)", lambda: None),
        ("raw_to_der(signature)", lambda: _jws.raw_to_der(signature)),
        ("parse(token), header cached", lambda: verifier.parse(token)),
        ("  COMPACT_RE.fullmatch(token)", lambda: _jws.COMPACT_RE.fullmatch(token)),
        ("  b64url_decode(payload)", lambda: _jws.b64url_decode(payload_b64, checked=True)),
        ("  loads_object(payload): strict JSON", lambda: _jws.loads_object(payload_bytes)),
        ("  json.loads(payload): stdlib, for scale", lambda: json.loads(payload_bytes)),
        ("get_key + check_key", lookup),
        ("check_claims(payload, record)", lambda: verifier.check_claims(profile, payload, record, None)),
        ("  Principal(...) alone", lambda: principal_class(**fields)),
        ("cache insert, same key", lambda: verifier._cache.put(token, (principal, until, record, fx.keys))),
        ("tracer.start_span (no-op API)", lambda: telemetry.tracer.start_span("meshauth.verify")),
        (
            "start_span + _accepted (no-op API)",
            lambda: verifier._accepted(telemetry.tracer.start_span("meshauth.verify"), principal, started, True),
        ),
        ("cached verify(token)", lambda: verifier.verify(token)),
    ]
    return [
        (name, Operation(f"m{i}", _repeat_call(function, calls), calls)) for i, (name, function) in enumerate(stages)
    ]


def _breakdown(fx: Fixture, tokens: Sequence[str], scale: Scale, out: io.StringIO) -> None:
    rounds = scale.rounds
    pipeline = _pipeline(fx, tokens)
    micro = _micro_stages(fx, scale.fast_batch // 4)
    s = interleave([op for _, op in pipeline], rounds)
    print(
        f"verify() of a new ES256 token, built up stage by stage over {len(tokens)} distinct tokens\n"
        f"(interleaved, {rounds} rounds; median us per token; delta = median of per-round differences):",
        file=out,
    )
    previous: Samples | None = None
    raw = s["p0"]
    for name, op in pipeline:
        current = s[op.name]
        delta = _difference_us(current, previous) if previous is not None else 0.0
        print(f"  {name:<66} {current.median_us:8.2f}  {delta:+7.2f}  ({ratio(current, raw):.3f}x raw)", file=out)
        previous = current
    m = interleave([op for _, op in micro], rounds)
    empty = m["m0"].median_us
    print(
        f"\nSingle stages in a hot loop on one token (median us per call, minus {empty:.3f} us loop overhead):",
        file=out,
    )
    for name, op in micro[1:]:
        print(f"  {name:<50} {m[op.name].median_us - empty:8.3f}", file=out)


def profile(fx: Fixture, scale: Scale) -> str:
    """Where the time of a new-token verify goes: in-situ slices, hot-loop stages, cProfile."""
    out = io.StringIO()
    try:
        _breakdown(fx, [fx.orders.mint(AUDIENCE) for _ in range(scale.verify_batch)], scale, out)
    except Exception as exc:  # the private stages changed: say so, keep the rest
        print(f"(stage breakdown unavailable, Verifier internals changed: {type(exc).__name__}: {exc})", file=out)
    tokens = [fx.orders.mint(AUDIENCE) for _ in range(1000)]
    verifier = Verifier(AUDIENCE, fx.keys)
    verifier.verify(tokens[0])  # the header cache is warm, as in a running service
    profiler = cProfile.Profile()
    profiler.enable()
    for token in tokens[1:]:
        verifier.verify(token)
    profiler.disable()
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(16)
    print(
        f"\ncProfile of {len(tokens) - 1} verifications of distinct new tokens "
        "(tottime order; cProfile inflates Python call costs):",
        file=out,
    )
    print("\n".join(line for line in stats.getvalue().splitlines() if line.strip()), file=out)
    return out.getvalue()


# -- main --------------------------------------------------------------------------------------


def bench_redis_revocation(scale: Scale) -> list[Row]:
    """DESIGN 7 row 11: from ``revoke`` until 8 verifier processes dropped the key (a Redis at REDIS_URL).

    Without a reachable Redis the group raises: an ERROR row, which fails ``--check``.
    """
    section = "Redis registry: revocation applied by 8 verifier processes (DESIGN 7 row 11)"
    figures = bench_revocation(REDIS_URL, revocations=max(5, min(20, scale.rounds)))
    p99 = figures["revocation_all_p99_s"]
    return [
        Row(
            section,
            "revocation applied by every verifier, p99 (s)",
            ratio=round(p99, 4),
            baseline="seconds",
            budget=1.0,
            unit=" s",
            note=f"p50 {figures['revocation_all_p50_s'] * 1000:.1f} ms over {figures['revocations']} revocations",
        )
    ]


def run_all(scale: Scale, *, log: Callable[[str], None]) -> list[Row]:
    fx = Fixture.build()
    rows: list[Row] = []
    groups: list[tuple[str, Callable[[], list[Row]]]] = [
        ("ES256 verify", lambda: bench_verify(fx, scale)),
        ("one hop inside a transaction", lambda: bench_txn(fx, scale)),
        ("ES256 sign", lambda: bench_sign(fx, scale)),
        ("response signing", lambda: bench_response(fx, scale)),
        ("EdDSA", lambda: bench_eddsa(fx, scale)),
        ("ServiceAuth", lambda: bench_service_auth(fx, scale)),
        ("ASGI middleware", lambda: bench_asgi(fx, scale)),
        ("full verified-token cache", lambda: bench_full_cache(fx, scale)),
    ]
    for name, group in groups:
        log(f"measuring {name} ...")
        rows += _guarded(name, group)
    log(f"generating a {JWKS_KEYS:,}-key registry ...")
    doc = jwks_document(JWKS_KEYS)
    log("measuring JWKS loads and lookups ...")
    rows += _guarded("JWKS loads", lambda: bench_jwks(doc, scale))
    rows += _guarded("kid lookups", lambda: bench_lookup(doc, scale))
    log("measuring concurrent cold-cache verification ...")
    rows += _guarded("50 concurrent verifiers", lambda: bench_concurrent_fetch(doc))
    log(f"measuring Redis revocation with 8 verifier processes ({REDIS_URL}) ...")
    rows += _guarded("Redis registry", lambda: bench_redis_revocation(scale))
    log("measuring the gateway against a plain uvicorn app (three processes on loopback) ...")
    rows += _guarded("gateway", lambda: gateway_rows(quick=scale.rounds <= QUICK.rounds))
    return rows


def _guarded(name: str, group: Callable[[], list[Row]]) -> list[Row]:
    """The group's rows, or one ERROR row (a failed check) when the group raised."""
    try:
        return group()
    except Exception as exc:
        traceback.print_exc()
        return [Row(name, f"{name}: the measurement raised", error=_clip(f"{type(exc).__name__}: {exc}"))]


def failures(rows: Sequence[Row], margin: float) -> list[Row]:
    """The rows that fail ``--check``.

    A budget row over its budget (times ``margin``), a measurement that raised
    (even on a row without a budget), and a budget row that could not be
    measured: "n/a" is a failure, not a pass.
    """
    return [
        row
        for row in rows
        if row.error or row.passed(margin) is False or (row.budget is not None and row.passed(margin) is None)
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few rounds (< 20 s)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a budget row fails, errs or cannot be measured"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the machine and the rows as JSON")
    parser.add_argument("--rounds", type=int, metavar="N", help="interleaved rounds per comparison")
    parser.add_argument(
        "--margin",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply '<=' budgets by F for --check (e.g. 1.5 on a noisy CI runner); default 1",
    )
    parser.add_argument("--profile", action="store_true", help="also break down and cProfile the verify path")
    parser.add_argument(
        "--markdown",
        nargs="+",
        metavar="JSON",
        help="print a Markdown table of saved --json runs (one column each) and exit; nothing is measured",
    )
    return parser


def _summary(rows: Sequence[Row], failed: Sequence[Row], margin: float, elapsed: float) -> dict[str, Any]:
    """Print the verdict line and the pending budgets; return the counts for the JSON report."""
    budget_rows = [row for row in rows if row.budget is not None]
    met = [row for row in budget_rows if row.passed(margin) is True]
    unmeasured = [row for row in budget_rows if row.passed(margin) is None]
    errors = [row for row in rows if row.error]
    print(
        f"\n{len(met)} of {len(budget_rows)} budgets met, "
        f"{len(failed)} missed or failed, {len(unmeasured)} not measured, {len(errors)} errors; {elapsed:.1f} s"
    )
    if PENDING:
        print(f"\npending: {len(PENDING)} DESIGN 7 budgets not yet measured by this command (never counted as met):")
    for item in PENDING:
        print(f"  - {item}")
    return {
        "total": len(budget_rows),
        "failed": len(failed),
        "unmeasured": len(unmeasured),
        "errors": len(errors),
        "pending": list(PENDING),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.markdown:
        results = []
        for path in args.markdown:
            with open(path, encoding="utf-8") as handle:
                results.append(json.load(handle))
        print(markdown_report(results))
        return 0
    scale = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        scale = dataclasses.replace(scale, rounds=args.rounds)
    # The default: no audit handler, no OpenTelemetry SDK. A benchmark must not
    # inherit a logging configuration from the environment.
    logging.getLogger("meshauth.audit").setLevel(logging.WARNING)

    machine = machine_description()
    print("meshauth benchmarks: DESIGN section 7 budgets")
    print(describe(machine))
    print(
        f"mode: {'quick' if args.quick else 'full'}, {scale.rounds} interleaved rounds "
        f"(JWKS loads: {min(scale.rounds, scale.jwks_rounds)}); median and min per call; "
        "ratio = median of per-round ratios\n",
        flush=True,
    )
    started = time.perf_counter()
    rows = run_all(scale, log=lambda message: print(message, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - started
    print(format_table(rows, args.margin))
    failed = failures(rows, args.margin)
    counts = _summary(rows, failed, args.margin, elapsed)
    profile_text = None
    if args.profile:
        profile_text = profile(Fixture.build(), scale)
        print("\n" + profile_text)
    if args.json:
        result = {
            "machine": machine,
            "mode": "quick" if args.quick else "full",
            "scale": dataclasses.asdict(scale),
            "margin": args.margin,
            "seconds": round(elapsed, 2),
            "rows": [row.as_dict(args.margin) for row in rows],
            "budgets": counts,
            "profile": profile_text,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    if args.check and failed:
        print("budget missed: " + "; ".join(row.operation for row in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
