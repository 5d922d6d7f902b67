"""``meshauth mint``, ``verify`` and ``inspect``: tokens on the command line."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from .._exceptions import MalformedToken, TokenError
from .._identity import DEFAULT_TTL, ServiceIdentity
from .._jws import MAX_DEPTH, _depth, b64url_decode, loads_object
from .._keys import ALGORITHMS
from .._principal import Principal
from .._registry import JWKSFile, KeySource
from .._verify import (
    FORBIDDEN_HEADER_MEMBERS,
    MAX_LEEWAY,
    REQUIRED_CLAIMS,
    RESPONSE_TOKEN_TYPE,
    SERVICE_TOKEN_TYPE,
    Verifier,
    _numeric_date,
    _typ_matches,
)
from ._common import (
    _UNVERIFIED_BANNER,
    DEFAULT_LEEWAY,
    DEFAULT_MAX_LIFETIME,
    DEFAULT_MAX_TOKEN_BYTES,
    EXIT_OK,
    EXIT_REJECTED,
    _add_json,
    _bounded,
    _command,
    _duration,
    _err,
    _expiry,
    _is_number,
    _iso,
    _load_signing_key,
    _optional_module,
    _out,
    _print_fields,
    _print_json,
    _read_token,
    _relative,
    _safe,
    _UsageError,
)
from ._redis import redis_module


def _cmd_mint(args: argparse.Namespace) -> int:
    key = _load_signing_key(args.key, args.password_env)
    if args.ttl > DEFAULT_MAX_LIFETIME:
        _err(f"warning: verifiers reject tokens living over {DEFAULT_MAX_LIFETIME} s by default (--ttl {args.ttl})")
    try:
        identity = ServiceIdentity(args.service, key, ttl=args.ttl)
        token = identity.mint(args.aud, scope=args.scope)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    # The token alone on stdout, so that TOKEN=$(meshauth mint ...) works.
    _out(token)
    return EXIT_OK


def _open_registry(location: str, *, allow_http: bool) -> KeySource:
    if location.startswith(("redis://", "rediss://", "unix://")):
        redis_keys: KeySource = redis_module().RedisKeys(location, follow=False)
        return redis_keys
    if location.startswith(("https://", "http://")):
        endpoint = _optional_module("meshauth._jwks_endpoint", "URL registries")
        source: KeySource = endpoint.JWKSEndpoint(location, allow_http=allow_http)
        return source
    return JWKSFile(location)


def _principal_json(principal: Principal, now: float) -> dict[str, Any]:
    return {
        "accepted": True,
        "caller": principal.caller,
        "subject": principal.subject,
        "transaction": principal.transaction,
        "audience": principal.audience,
        "scopes": sorted(principal.scopes),
        "kid": principal.kid,
        "alg": principal.alg,
        "token_id": principal.token_id,
        "issued_at": principal.issued_at,
        "expires_at": principal.expires_at,
        "expires_in": round(principal.expires_at - now),
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    token = _read_token(args.token)
    keys = _open_registry(args.registry, allow_http=args.allow_http)
    try:
        verifier = Verifier(args.aud, keys, leeway=args.leeway, max_lifetime=args.max_lifetime)
        try:
            # A command-line check is not a request decision: no audit record.
            principal = verifier.verify(token, audit=False)
        except TokenError as exc:
            _err(f"rejected: {exc}")
            if args.json:
                _print_json(
                    {
                        "accepted": False,
                        "reason": exc.reason,
                        "detail": exc.detail,
                        "expected": exc.expected,
                        "actual": exc.actual,
                        "kid": exc.kid,
                    }
                )
            return EXIT_REJECTED
    finally:
        close = getattr(keys, "close", None)
        if callable(close):
            close()
    now = time.time()
    if args.json:
        _print_json(_principal_json(principal, now))
        return EXIT_OK
    _print_fields(
        [
            ("accepted", "signature, key and claims verified"),
            ("caller", _safe(principal.caller)),
            ("subject", _safe(principal.subject)),
            ("audience", _safe(principal.audience)),
            ("scopes", _safe(principal.scope) or "-"),
            ("kid", principal.kid),
            ("alg", principal.alg),
            ("issued", f"{_iso(principal.issued_at)} ({_relative(principal.issued_at, now)})"),
            ("expires", f"{_iso(principal.expires_at)} ({_expiry(principal.expires_at, now)})"),
            ("token id", _safe(principal.token_id)),
        ]
    )
    return EXIT_OK


# -- inspect -------------------------------------------------------------------------------


def _decode_segment(segment: str, what: str, problems: list[str]) -> bytes | None:
    """Strict base64url first; if that fails, say why and try the lenient forms people paste."""
    try:
        return b64url_decode(segment, what)
    except MalformedToken as exc:
        problems.append(exc.detail)
    cleaned = re.sub(r"\s", "", segment).rstrip("=").translate(str.maketrans("+/", "-_"))
    try:
        return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        problems.append(f"{what}: cannot be decoded even leniently")
        return None


def _decode_json(data: bytes, what: str, problems: list[str]) -> Any:
    try:
        return loads_object(data, what)
    except MalformedToken as exc:
        problems.append(f"{exc.detail} (expected {exc.expected}, found {exc.actual})")
    try:
        value = json.loads(data.decode("utf-8", errors="replace"), strict=False)
    except (ValueError, RecursionError):
        return None
    # Printing recurses: a value nested this deep is described, not shown.
    return value if _depth(value) <= MAX_DEPTH else f"(not shown: nested deeper than {MAX_DEPTH} levels)"


def _profile_problems(header: Any, claims: Any, problems: list[str]) -> None:
    """What the verifier would object to before the signature."""
    if isinstance(header, dict):
        forbidden = sorted(FORBIDDEN_HEADER_MEMBERS.intersection(header))
        if forbidden:
            problems.append(f"header: forbidden members {forbidden} (a verifier rejects the token)")
        typ = header.get("typ")
        if not (_typ_matches(typ, SERVICE_TOKEN_TYPE) or _typ_matches(typ, RESPONSE_TOKEN_TYPE)):
            problems.append(f"header: typ {typ!r} is not {SERVICE_TOKEN_TYPE!r} or {RESPONSE_TOKEN_TYPE!r}")
        if header.get("alg") not in ALGORITHMS:
            problems.append(f"header: alg {header.get('alg')!r} is not one of {list(ALGORITHMS)}")
        if not isinstance(header.get("kid"), str) or not header.get("kid"):
            problems.append("header: no 'kid'")
    if not isinstance(claims, dict):
        return
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        problems.append(f"claims: required claims missing: {missing}")
    for name in ("iat", "exp", "nbf"):
        if name in claims:
            try:
                _numeric_date(claims, name)
            except TokenError as exc:
                problems.append(f"claims: {exc.detail} (found {exc.actual!r})")
    if "act" in claims:
        problems.append("claims: 'act' is refused in a service token (users travel in a Txn-Token)")
    if claims.get("sub") != claims.get("iss"):
        problems.append("claims: 'sub' must equal 'iss' in a service token (users travel in a Txn-Token)")


def _time_fields(claims: Mapping[str, Any], now: float) -> dict[str, dict[str, Any]]:
    times: dict[str, dict[str, Any]] = {}
    for name in ("iat", "nbf", "exp"):
        value: Any = claims.get(name)
        if _is_number(value):
            relative = _expiry(value, now) if name == "exp" else _relative(value, now)
            times[name] = {"timestamp": value, "utc": _iso(value), "relative": relative}
    return times


def _decode_token(token: str, problems: list[str]) -> tuple[Any, Any, int | None]:
    """The header and claims (``None`` where undecodable) and the signature's size, unverified."""
    segments = token.split(".")
    header: Any = None
    claims: Any = None
    signature_bytes: int | None = None
    if len(segments) == 5:
        problems.append("token: five segments, an encrypted JWE; meshauth tokens are signed JWS (three segments)")
        return header, claims, signature_bytes
    if len(segments) != 3:
        problems.append(f"token: a compact JWS has three segments, found {len(segments)}")
    raw_header = _decode_segment(segments[0], "header", problems)
    if raw_header is not None:
        header = _decode_json(raw_header, "header", problems)
    if len(segments) > 1:
        raw_claims = _decode_segment(segments[1], "payload", problems)
        if raw_claims is not None:
            claims = _decode_json(raw_claims, "payload", problems)
    if len(segments) > 2:
        raw_signature = _decode_segment(segments[2], "signature", problems)
        signature_bytes = None if raw_signature is None else len(raw_signature)
    return header, claims, signature_bytes


def _cmd_inspect(args: argparse.Namespace) -> int:
    token = _read_token(args.token)
    now = time.time()
    problems: list[str] = []
    size = len(token.encode("utf-8"))
    if size > DEFAULT_MAX_TOKEN_BYTES:
        problems.append(f"token: {size} bytes, over the verifier's default limit of {DEFAULT_MAX_TOKEN_BYTES}")
    header, claims, signature_bytes = _decode_token(token, problems)
    _profile_problems(header, claims, problems)
    if signature_bytes == 0:
        problems.append("signature: empty (an unsigned token)")
    elif isinstance(header, dict) and header.get("alg") in ALGORITHMS and signature_bytes not in (None, 64):
        problems.append(f"signature: {signature_bytes} bytes, {header['alg']} signatures are 64")
    times = _time_fields(claims, now) if isinstance(claims, dict) else {}
    if args.json:
        _err(_UNVERIFIED_BANNER)
        _print_json(
            {
                "verified": False,
                "header": header,
                "claims": claims,
                "signature_bytes": signature_bytes,
                "size": size,
                "times": times,
                "problems": problems,
            }
        )
        return EXIT_REJECTED if problems else EXIT_OK
    _out(_UNVERIFIED_BANNER)
    for title, value in (("header", header), ("claims", claims)):
        _out(f"{title}:")
        _out("(could not be decoded)" if value is None else json.dumps(value, indent=2))
    fields: list[tuple[str, object]] = [
        ("signature", "absent" if signature_bytes is None else f"{signature_bytes} bytes (not shown, not checked)"),
        ("size", f"{size} bytes"),
    ]
    labels = {"iat": "issued", "nbf": "not before", "exp": "expires"}
    fields.extend((labels[name], f"{entry['utc']} ({entry['relative']})") for name, entry in times.items())
    if "iat" in times and "exp" in times:
        fields.append(("lifetime", _duration(claims["exp"] - claims["iat"])))
    _print_fields(fields)
    if problems:
        _out("problems:")
        for problem in problems:
            _out(f"  - {_safe(problem)}")
    return EXIT_REJECTED if problems else EXIT_OK


def add_parser(commands: Any) -> None:
    """Register ``mint``, ``verify`` and ``inspect`` on the ``meshauth`` subparsers."""
    # Long but flat: one argparse declaration after another, the command's own reference; splitting
    # it would scatter the options of one command across functions.
    mint = _command(
        commands,
        "mint",
        "mint a service token (prints the token only)",
        "Mint a service token signed with a service's private key. Only the token is\n"
        "printed, so that $(meshauth mint ...) works.",
        "  meshauth mint --key keys/orders.pem --service orders --aud payments\n"
        "  meshauth mint --key keys/orders.pem --service orders --aud payments --scope charges:write",
    )
    mint.add_argument("--key", required=True, metavar="FILE", help="the service's private key (PEM)")
    mint.add_argument("--service", required=True, metavar="NAME", help="the issuing service (iss)")
    mint.add_argument("--aud", "--audience", required=True, metavar="NAME", help="the service being called")
    mint.add_argument(
        "--ttl",
        type=_bounded(int, 6, 86400),
        default=DEFAULT_TTL,
        metavar="S",
        help=f"lifetime in seconds (default {DEFAULT_TTL})",
    )
    mint.add_argument("--scope", metavar="S", help='space-separated scopes, e.g. "orders:read orders:write"')
    mint.add_argument("--password-env", metavar="VAR", help="the PEM's password is in this variable")
    mint.set_defaults(run=_cmd_mint)

    verify = _command(
        commands,
        "verify",
        "verify a token against a registry",
        "Verify a token exactly as a service would: prints the principal, or the reason\n"
        "for the rejection (exit 1). An unreadable registry is exit 2: the token was not judged.",
        '  meshauth verify "$TOKEN" --registry registry.json --aud payments\n'
        "  echo $TOKEN | meshauth verify - --registry https://keys.example.com/jwks.json --aud payments --json",
    )
    verify.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    verify.add_argument(
        "--registry", required=True, metavar="FILE|URL", help="registry JWKS file, https URL or redis:// URL"
    )
    verify.add_argument("--aud", "--audience", required=True, metavar="NAME", help="the verifying service")
    verify.add_argument(
        "--leeway",
        type=_bounded(float, 0, MAX_LEEWAY),
        default=DEFAULT_LEEWAY,
        metavar="S",
        help=f"clock leeway in seconds (default {DEFAULT_LEEWAY})",
    )
    verify.add_argument(
        "--max-lifetime",
        type=_bounded(int, 1, 86400),
        default=DEFAULT_MAX_LIFETIME,
        metavar="S",
        help=f"longest accepted exp - iat (default {DEFAULT_MAX_LIFETIME})",
    )
    verify.add_argument("--allow-http", action="store_true", help="allow a plain-http registry URL off loopback")
    _add_json(verify)
    verify.set_defaults(run=_cmd_verify)

    inspect = _command(
        commands,
        "inspect",
        "decode a token WITHOUT verifying it",
        "Decode a token's header and claims without checking the signature, for debugging.\n"
        "Times are shown as UTC dates; problems with the format are listed (exit 1 if any).\n"
        "The signature itself is never printed.",
        '  meshauth inspect "$TOKEN"\n  pbpaste | meshauth inspect - --json',
    )
    inspect.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    _add_json(inspect)
    inspect.set_defaults(run=_cmd_inspect)
