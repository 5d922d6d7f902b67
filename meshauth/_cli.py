"""The ``meshauth`` command-line tool: keys, the registry, tokens.

Exit codes are part of the interface, so scripts can branch on them:

* ``0``: done (the token verified, the registry passed its checks, ...);
* ``1``: rejected (a token that does not verify, a registry with rotation
  errors, a token ``inspect`` finds malformed);
* ``2``: a usage or configuration error (bad arguments, an unreadable key,
  registry or file), including a registry that cannot be read at all: the
  token was then not judged.

Every command that a program would read takes ``--json``. Errors go to stderr.
Tokens are printed only where printing them is the point (``mint``); key
material and signatures never are.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import importlib
import json
import math
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Final

from . import __version__
from ._exceptions import ConfigurationError, KeysUnavailable, MalformedToken, TokenError
from ._identity import DEFAULT_TTL, ServiceIdentity
from ._jws import MAX_DEPTH, _depth, b64url_decode, loads_object, strict_json_loads
from ._keys import ALGORITHMS, KeyRecord, SigningKey, check_jwk
from ._principal import Principal
from ._registry import DEFAULT_MAX_BYTES, JWKSFile, KeySet, KeySource, parse_registry_document
from ._verify import (
    FORBIDDEN_HEADER_MEMBERS,
    MAX_LEEWAY,
    REQUIRED_CLAIMS,
    RESPONSE_TOKEN_TYPE,
    SERVICE_TOKEN_TYPE,
    Verifier,
    _numeric_date,
    _typ_matches,
    parse_actor_chain,
)

__all__ = ["EXIT_OK", "EXIT_REJECTED", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK: Final = 0
EXIT_REJECTED: Final = 1
EXIT_USAGE: Final = 2

# The verifier's defaults, repeated in help texts and checks.
DEFAULT_LEEWAY: Final = 30
DEFAULT_MAX_LIFETIME: Final = 900
DEFAULT_MAX_TOKEN_BYTES: Final = 8192
DEFAULT_MAX_AGE: Final = 300
# A token pasted or piped in is read up to this size; the verifier refuses far less.
_MAX_INPUT_BYTES: Final = 1 << 20
_PUBLIC_FILE_MODE: Final = 0o644
# A service name becomes a file name in keygen: no separators, no dot files.
_FILE_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RELATIVE_TIME = re.compile(r"\+(\d+)([smhd])")
_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_UNIT_SECONDS: Final = dict(_UNITS)
_UNVERIFIED_BANNER: Final = "UNVERIFIED: signature not checked"


class _UsageError(Exception):
    """A problem with the command line or the files it names (exit 2)."""


# -- small formatting helpers -------------------------------------------------------


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _safe(text: object) -> str:
    """``text`` for a terminal: control characters of untrusted input are escaped."""
    value = str(text)
    return value if value.isprintable() else json.dumps(value)[1:-1]


def _print_fields(fields: Sequence[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        _out(f"{name:<{width}}  {value}")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    for row in [headers, *rows]:
        _out("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _print_json(value: Any) -> None:
    # ensure_ascii (the default): hostile claims cannot smuggle terminal escape sequences through.
    _out(json.dumps(value, indent=2, default=str))


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _iso(timestamp: float) -> str:
    """POSIX seconds as an ISO-8601 UTC date."""
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return f"{timestamp} (out of range)"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    """``4m 12s``, ``3h``, ``2d 5h``: the two leading units, the second only if non-zero."""
    rest = round(abs(seconds))
    parts: list[tuple[int, str]] = []
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        parts.append((count, unit))
    for index, (count, unit) in enumerate(parts):
        if count:
            text = f"{count}{unit}"
            if index + 1 < len(parts) and parts[index + 1][0]:
                text += f" {parts[index + 1][0]}{parts[index + 1][1]}"
            return text
    return "0s"


def _relative(timestamp: float, now: float) -> str:
    return f"in {_duration(timestamp - now)}" if timestamp > now else f"{_duration(now - timestamp)} ago"


def _expiry(timestamp: float, now: float) -> str:
    if timestamp > now:
        return f"expires in {_duration(timestamp - now)}"
    return f"expired {_duration(now - timestamp)} ago"


def _timestamp_arg(text: str) -> int:
    """An argparse type: POSIX seconds, ``+30d`` (from now) or an ISO-8601 date (UTC unless stated)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    relative = _RELATIVE_TIME.fullmatch(text)
    if relative:
        return int(time.time()) + int(relative[1]) * _UNIT_SECONDS[relative[2]]
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use POSIX seconds, +N[smhd] or an ISO-8601 date such as 2030-01-31T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    value = int(moment.timestamp())
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} lies before 1970")
    return value


def _bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type converting with ``kind`` and checking ``low <= value <= high``."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is outside {low:g}..{high:g}")
        return value

    convert.__name__ = kind.__name__
    return convert


# -- files ---------------------------------------------------------------------------


def _read_file(path: str, what: str, limit: int = _MAX_INPUT_BYTES) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise _UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    if len(data) > limit:
        raise _UsageError(f"{what} {path!r} is larger than {limit} bytes")
    return data


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte on; never replaces a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` in one step: readers see the old file or the new one, never half of it.

    The temporary file is created 0600 by ``mkstemp`` and only widened to ``mode``
    before the rename, so a private key is never readable by others, even briefly.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _password(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise _UsageError(f"environment variable {variable} (--password-env) is not set or empty")
    return value


def _load_signing_key(path: str, password_env: str | None) -> SigningKey:
    key = SigningKey.from_file(path, _password(password_env))
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            _err(f"warning: private key {path} is accessible by other users (mode {mode:04o}); chmod 600 it")
    return key


def _read_token(argument: str) -> str:
    """The token argument, or stdin for ``-``; surrounding whitespace and a ``Bearer`` prefix are dropped."""
    text = sys.stdin.read(_MAX_INPUT_BYTES) if argument == "-" else argument
    text = text.strip()
    if text[:7].lower() == "bearer ":
        text = text[7:].strip()
    if not text:
        raise _UsageError("no token given" + (" on stdin" if argument == "-" else ""))
    return text


def _optional_module(name: str, feature: str) -> ModuleType:
    """Import a module that an optional feature needs, or explain what is missing (exit 2)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise _UsageError(f"{feature} not available in this installation ({name} is missing)") from None
        raise _UsageError(
            f"{feature} not available: it needs the {exc.name!r} package (pip install 'meshauth[gateway]')"
        ) from None


# -- keygen ----------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    service: str = args.service
    if not _FILE_SAFE_NAME.fullmatch(service):
        raise _UsageError(
            f"service name {service!r} cannot name a key file: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    password = _password(args.password_env)
    os.makedirs(args.out, mode=0o700, exist_ok=True)
    pem_path = os.path.join(args.out, f"{service}.pem")
    jwk_path = os.path.join(args.out, f"{service}.jwk.json")
    if not args.force:
        existing = [path for path in (pem_path, jwk_path) if os.path.lexists(path)]
        if existing:
            raise _UsageError(f"{existing[0]} already exists; refusing to overwrite a key (use --force to replace it)")
    key = SigningKey.generate(args.alg)
    jwk = key.public_jwk(iss=service)
    jwk_data = (json.dumps(jwk, indent=2) + "\n").encode("utf-8")
    pem = key.to_pem(password)
    try:
        if args.force:
            _write_atomic(pem_path, pem, 0o600)
            _write_atomic(jwk_path, jwk_data, _PUBLIC_FILE_MODE)
        else:
            _write_new(pem_path, pem, 0o600)
            _write_new(jwk_path, jwk_data, _PUBLIC_FILE_MODE)
    except FileExistsError as exc:
        raise _UsageError(f"{exc.filename} appeared meanwhile; refusing to overwrite it (use --force)") from None
    if args.json:
        _print_json(
            {"service": service, "kid": key.kid, "alg": key.alg, "private_key": pem_path, "public_jwk": jwk_path}
        )
        return EXIT_OK
    _print_fields(
        [
            ("service", service),
            ("alg", key.alg),
            ("kid", key.kid),
            ("private key", f"{pem_path} (mode 0600{', encrypted' if password else ''}; keep it secret)"),
            ("public JWK", jwk_path),
            ("next", f"meshauth registry add registry.json {jwk_path}"),
        ]
    )
    return EXIT_OK


# -- registry ----------------------------------------------------------------------------


def _read_registry(path: str, *, missing_ok: bool = False) -> dict[str, Any]:
    """The registry document at ``path`` (strict JSON), or an empty one if absent and ``missing_ok``."""
    if missing_ok and not os.path.lexists(path):
        return {"keys": []}
    data = _read_file(path, "registry file", DEFAULT_MAX_BYTES)
    return dict(parse_registry_document(data, path))


def _write_registry(path: str, document: Mapping[str, Any]) -> KeySet:
    """Validate ``document`` exactly as a verifier will load it, then write it atomically.

    Nothing invalid (a duplicate, a private member) ever reaches the file.
    """
    keyset = KeySet.from_jwks(document, source=path, strict=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = _PUBLIC_FILE_MODE
    _write_atomic(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"), mode)
    return keyset


def _jwks_from_file(path: str) -> list[Any]:
    """The JWK(s) in ``path``: one JWK object, or a JWKS document."""
    data = _read_file(path, "JWK file")
    try:
        document = strict_json_loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _UsageError(f"{path}: not a valid JSON document ({exc})") from None
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        return list(document["keys"])
    return [document]


def _key_status(record: KeyRecord, now: float) -> str:
    if record.not_before is not None and now < record.not_before:
        return "not-yet"
    if record.expires is not None and now > record.expires:
        return "expired"
    return "valid"


def _key_summary(record: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "kid": record.kid,
        "service": record.owner,
        "alg": record.alg,
        "nbf": record.not_before,
        "exp": record.expires,
        "status": _key_status(record, now),
    }


def _cmd_registry_add(args: argparse.Namespace) -> int:
    if not args.jwk_files and args.key is None:
        raise _UsageError("nothing to add: name JWK files, or --key PEM with --service NAME")
    if (args.key is None) != (args.service is None):
        raise _UsageError("--key and --service go together")
    candidates: list[tuple[str, Any]] = []
    for path in args.jwk_files:
        candidates.extend((path, jwk) for jwk in _jwks_from_file(path))
    if args.key is not None:
        key = _load_signing_key(args.key, args.password_env)
        candidates.append((args.key, key.public_jwk(iss=args.service)))
    document = _read_registry(args.file, missing_ok=True)
    present = {jwk.get("kid") for jwk in document["keys"] if isinstance(jwk, Mapping)}
    if args.nbf is not None and args.exp is not None and args.exp <= args.nbf:
        raise _UsageError(f"--exp ({_iso(args.exp)}) must be later than --nbf ({_iso(args.nbf)})")
    if args.exp is not None and args.exp <= time.time() and not args.force:
        raise _UsageError(
            f"--exp {_iso(args.exp)} is {int(time.time() - args.exp)} s in the past: the key would never verify "
            "(give a later --exp, e.g. +90d, or --force to add it anyway)"
        )
    added: list[Mapping[str, Any]] = []
    window = {name: value for name, value in (("nbf", args.nbf), ("exp", args.exp)) if value is not None}
    for where, jwk in candidates:
        entry = {**jwk, **window} if isinstance(jwk, Mapping) else jwk
        # Each new entry is checked on its own first, so the message names the
        # file it came from (a private JWK is refused here, never written).
        kid = check_jwk(entry, where)[0]
        if kid in present:
            raise _UsageError(f"{where}: kid {kid} is already in {args.file}; nothing was changed")
        present.add(kid)
        added.append(entry)
    document["keys"] = [*document["keys"], *added]
    keyset = _write_registry(args.file, document)
    now = time.time()
    new_kids = {entry["kid"] for entry in added}
    summaries = [_key_summary(record, now) for record in keyset if record.kid in new_kids]
    if args.json:
        _print_json({"file": args.file, "added": summaries})
        return EXIT_OK
    for summary in summaries:
        _out(f"added {summary['kid']} ({summary['service']}, {summary['alg']}, {summary['status']}) to {args.file}")
    return EXIT_OK


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    document = _read_registry(args.file)
    keys = document["keys"]
    kids = [jwk.get("kid") if isinstance(jwk, Mapping) else None for jwk in keys]
    missing = [kid for kid in args.kids if kid not in kids]
    if missing:
        raise _UsageError(f"kid {missing[0]} is not in {args.file}; nothing was changed")
    removed = [jwk for jwk in keys if isinstance(jwk, Mapping) and jwk.get("kid") in args.kids]
    document["keys"] = [jwk for jwk in keys if not (isinstance(jwk, Mapping) and jwk.get("kid") in args.kids)]
    _write_registry(args.file, document)
    summaries = [{"kid": jwk.get("kid"), "service": jwk.get("iss")} for jwk in removed]
    if args.json:
        _print_json({"file": args.file, "removed": summaries})
        return EXIT_OK
    for summary in summaries:
        _out(f"removed {summary['kid']} ({_safe(summary['service'])}) from {args.file}")
    _out("tokens signed with a removed key stop verifying once services reload the registry")
    return EXIT_OK


def _cmd_registry_list(args: argparse.Namespace) -> int:
    document = _read_registry(args.file)
    # Not strict: a listing should still show the good keys of a broken file.
    keyset = KeySet.from_jwks(document, source=args.file, strict=False)
    now = time.time()
    summaries = [_key_summary(record, now) for record in keyset]
    if args.json:
        _print_json({"file": args.file, "keys": summaries, "problems": keyset.problems})
    elif summaries:
        _print_table(
            ("KID", "SERVICE", "ALG", "STATUS", "NOT BEFORE", "EXPIRES"),
            [
                (
                    s["kid"],
                    _safe(s["service"]),
                    s["alg"],
                    s["status"],
                    "-" if s["nbf"] is None else _iso(s["nbf"]),
                    "-" if s["exp"] is None else _iso(s["exp"]),
                )
                for s in summaries
            ],
        )
    else:
        _out(f"{args.file}: no keys")
    for problem in keyset.problems:
        _err(f"warning: skipped an invalid entry: {problem}")
    return EXIT_OK


def _cmd_registry_check(args: argparse.Namespace) -> int:
    rotation = _optional_module("meshauth._rotation", "registry check")
    document = _read_registry(args.file)
    findings = rotation.check_registry(
        document,
        now=time.time(),
        max_token_lifetime=args.max_token_lifetime,
        leeway=args.leeway,
        max_age=args.max_age,
        services=args.services or None,
        previous=_read_registry(args.previous) if args.previous else None,
    )
    rows = [
        {
            "severity": finding.severity,
            "code": finding.code,
            "service": finding.service,
            "kid": finding.kid,
            "message": finding.message,
        }
        for finding in findings
    ]
    errors = sum(1 for row in rows if row["severity"] == "error")
    warnings = len(rows) - errors
    if args.json:
        _print_json({"file": args.file, "ok": errors == 0, "errors": errors, "warnings": warnings, "findings": rows})
    else:
        if rows:
            _print_table(
                ("SEVERITY", "CODE", "SERVICE", "KID", "MESSAGE"),
                [
                    (
                        str(row["severity"]).upper(),
                        str(row["code"]),
                        _safe(row["service"] or "-"),
                        _safe(row["kid"] or "-"),
                        _safe(row["message"]),
                    )
                    for row in rows
                ],
            )
        verdict = "FAILED" if errors else "ok"
        _out(f"{args.file}: {verdict} ({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})")
    return EXIT_REJECTED if errors else EXIT_OK


def _cmd_registry_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: PLC0415 - optional dependency, only this command needs it
    except ModuleNotFoundError:
        raise _UsageError("registry serve needs uvicorn: pip install 'meshauth[gateway]'") from None
    publish = _optional_module("meshauth._publish", "registry serve")
    source = JWKSFile(args.file)  # fails now, not on the first request, if the file is bad
    app = publish.jwks_app(source, max_age=args.max_age)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # Binding here (not in uvicorn) gives the real port for --port 0 before serving starts.
    listener = socket.create_server((args.host, args.port), family=family)
    with listener:
        port = listener.getsockname()[1]
        host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
        url = f"http://{host}:{port}{publish.DEFAULT_PATH}"
        _out(f"serving {args.file} at {url} (max-age {args.max_age} s; Ctrl-C to stop)")
        config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none")
        uvicorn.Server(config).run(sockets=[listener])
    return EXIT_OK


# -- tokens ------------------------------------------------------------------------------


def _cmd_mint(args: argparse.Namespace) -> int:
    key = _load_signing_key(args.key, args.password_env)
    if args.ttl > DEFAULT_MAX_LIFETIME:
        _err(f"warning: verifiers reject tokens living over {DEFAULT_MAX_LIFETIME} s by default (--ttl {args.ttl})")
    try:
        identity = ServiceIdentity(args.service, key, ttl=args.ttl)
        token = identity.mint(args.aud, subject=args.subject, actors=tuple(args.actor), scope=args.scope)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    # The token alone on stdout, so that TOKEN=$(meshauth mint ...) works.
    _out(token)
    return EXIT_OK


def _open_registry(location: str, *, allow_http: bool) -> KeySource:
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
        "actors": list(principal.actors),
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
            ("actors", " <- ".join(_safe(a) for a in principal.actors) or "- (direct call)"),
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


def _profile_problems(header: Any, claims: Any, problems: list[str]) -> tuple[str, ...]:
    """What the verifier would object to before the signature, and the actor chain if readable."""
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
        return ()
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        problems.append(f"claims: required claims missing: {missing}")
    for name in ("iat", "exp", "nbf"):
        if name in claims:
            try:
                _numeric_date(claims, name)
            except TokenError as exc:
                problems.append(f"claims: {exc.detail} (found {exc.actual!r})")
    if "act" in claims and isinstance(claims.get("iss"), str):
        try:
            return parse_actor_chain(claims["act"], claims["iss"], max_actors=16)
        except TokenError as exc:
            problems.append(f"claims: {exc}")
    return ()


def _time_fields(claims: Mapping[str, Any], now: float) -> dict[str, dict[str, Any]]:
    times: dict[str, dict[str, Any]] = {}
    for name in ("iat", "nbf", "exp"):
        value: Any = claims.get(name)
        if _is_number(value):
            relative = _expiry(value, now) if name == "exp" else _relative(value, now)
            times[name] = {"timestamp": value, "utc": _iso(value), "relative": relative}
    return times


def _cmd_inspect(args: argparse.Namespace) -> int:
    token = _read_token(args.token)
    now = time.time()
    problems: list[str] = []
    size = len(token.encode("utf-8"))
    if size > DEFAULT_MAX_TOKEN_BYTES:
        problems.append(f"token: {size} bytes, over the verifier's default limit of {DEFAULT_MAX_TOKEN_BYTES}")
    segments = token.split(".")
    header: Any = None
    claims: Any = None
    signature_bytes: int | None = None
    if len(segments) == 5:
        problems.append("token: five segments, an encrypted JWE; meshauth tokens are signed JWS (three segments)")
    else:
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
    actors = _profile_problems(header, claims, problems)
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
                "actors": list(actors),
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
    if actors:
        fields.append(("actors", " <- ".join(_safe(a) for a in actors)))
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


# -- optional commands ------------------------------------------------------------------------


def _run_demo(argv: list[str]) -> int:
    """``meshauth demo ...``: hands its arguments to ``meshauth._demo.main`` (its own parser)."""
    try:
        demo = importlib.import_module("meshauth._demo")
    except ModuleNotFoundError as exc:
        missing = "" if exc.name == "meshauth._demo" else f": it needs the {exc.name!r} package"
        _err(f"demo not available{missing}")
        return EXIT_USAGE
    return int(demo.main(argv))


def _cmd_gateway(args: argparse.Namespace) -> int:
    gateway = _optional_module("meshauth.gateway", "gateway")
    result = gateway.serve(args.config)
    return EXIT_OK if result is None else int(result)


# -- the parser ------------------------------------------------------------------------------


def _command(subparsers: Any, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"example:\n{example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object for programs")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``meshauth`` command."""
    parser = argparse.ArgumentParser(
        prog="meshauth",
        description="Service-to-service authentication with JWTs: keys, the key registry, tokens.",
        epilog=(
            "exit codes: 0 ok, 1 rejected, 2 usage or configuration error\n\n"
            "example:\n"
            "  meshauth keygen --service orders --out keys\n"
            "  meshauth registry add registry.json keys/orders.jwk.json\n"
            '  meshauth verify "$(meshauth mint --key keys/orders.pem --service orders --aud payments)" \\\n'
            "      --registry registry.json --aud payments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshauth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = _command(
        commands,
        "keygen",
        "generate a service's signing key",
        "Generate a signing key for a service: DIR/NAME.pem (private, mode 0600) and\n"
        "DIR/NAME.jwk.json (the public JWK to add to the registry).",
        "  meshauth keygen --service orders --alg ES256 --out keys",
    )
    keygen.add_argument("--service", required=True, metavar="NAME", help="the service that owns the key")
    keygen.add_argument("--alg", choices=ALGORITHMS, default="ES256", help="signature algorithm (default ES256)")
    keygen.add_argument("--out", required=True, metavar="DIR", help="directory for the two files (created 0700)")
    keygen.add_argument("--force", action="store_true", help="replace existing files")
    keygen.add_argument("--password-env", metavar="VAR", help="encrypt the PEM with the password in this variable")
    _add_json(keygen)
    keygen.set_defaults(run=_cmd_keygen)

    registry = _command(
        commands,
        "registry",
        "maintain, check and serve a registry JWKS file",
        "Maintain the key registry: a JWKS file listing every service's public keys.",
        "  meshauth registry add registry.json keys/orders.jwk.json\n  meshauth registry list registry.json",
    )
    actions = registry.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = _command(
        actions,
        "add",
        "add public keys (created if absent)",
        "Add public keys to a registry file, creating it if absent. The result is\n"
        "validated before it is written (atomically): duplicates and private keys are refused.",
        "  meshauth registry add registry.json keys/orders.jwk.json --nbf 2030-01-01 --exp +90d\n"
        "  meshauth registry add registry.json --key keys/orders.pem --service orders",
    )
    add.add_argument("file", metavar="FILE", help="the registry JWKS file")
    add.add_argument("jwk_files", nargs="*", metavar="JWK_FILE", help="public JWK (or JWKS) files, e.g. from keygen")
    add.add_argument("--key", metavar="PEM", help="add the public half of this private key ...")
    add.add_argument("--service", metavar="NAME", help="... as owned by this service")
    add.add_argument("--password-env", metavar="VAR", help="the PEM's password is in this variable")
    window = "POSIX seconds, +N[smhd] from now, or an ISO-8601 date (UTC unless stated)"
    add.add_argument("--nbf", type=_timestamp_arg, metavar="TIME", help=f"key valid from: {window}")
    add.add_argument("--exp", type=_timestamp_arg, metavar="TIME", help=f"key valid until: {window}")
    add.add_argument("--force", action="store_true", help="add a key even if its --exp has already passed")
    _add_json(add)
    add.set_defaults(run=_cmd_registry_add)

    remove = _command(
        actions,
        "remove",
        "remove keys by kid (revokes them)",
        "Remove keys from a registry file. Removing a key revokes it: tokens signed\n"
        "with it stop verifying once services reload the registry.",
        "  meshauth registry remove registry.json 3kQ0...kid",
    )
    remove.add_argument("file", metavar="FILE", help="the registry JWKS file")
    remove.add_argument("kids", nargs="+", metavar="KID", help="key ids to remove (see registry list)")
    _add_json(remove)
    remove.set_defaults(run=_cmd_registry_remove)

    listing = _command(
        actions,
        "list",
        "list keys and their validity",
        "List the keys of a registry file: kid, owning service, algorithm, validity\nwindow and status "
        "(valid, not-yet, expired) now.",
        "  meshauth registry list registry.json --json",
    )
    listing.add_argument("file", metavar="FILE", help="the registry JWKS file")
    _add_json(listing)
    listing.set_defaults(run=_cmd_registry_list)

    check = _command(
        actions,
        "check",
        "check the key rotation invariants",
        "Check a registry against the key rotation rules (exit 1 on any error finding).",
        "  meshauth registry check registry.json --max-age 300\n"
        "  meshauth registry check new.json --previous published.json --service orders --service payments",
    )
    check.add_argument("file", metavar="FILE", help="the registry JWKS file")
    check.add_argument(
        "--previous",
        metavar="FILE",
        help="the registry currently published: also check the keys this change adds or removes",
    )
    check.add_argument(
        "--service",
        dest="services",
        action="append",
        metavar="NAME",
        help="a service that must have a valid key (repeatable)",
    )
    check.add_argument(
        "--max-token-lifetime",
        type=_bounded(int, 1, 86400),
        default=DEFAULT_MAX_LIFETIME,
        metavar="S",
        help=f"longest token lifetime verifiers accept (default {DEFAULT_MAX_LIFETIME})",
    )
    check.add_argument(
        "--leeway",
        type=_bounded(float, 0, MAX_LEEWAY),
        default=DEFAULT_LEEWAY,
        metavar="S",
        help=f"verifiers' clock leeway (default {DEFAULT_LEEWAY})",
    )
    check.add_argument(
        "--max-age",
        type=_bounded(int, 0, 7 * 86400),
        default=DEFAULT_MAX_AGE,
        metavar="S",
        help=f"how long clients may cache the registry (default {DEFAULT_MAX_AGE})",
    )
    _add_json(check)
    check.set_defaults(run=_cmd_registry_check)

    serve = _command(
        actions,
        "serve",
        "serve the registry over HTTP",
        "Serve a registry file as a JWKS endpoint (application/jwk-set+json, ETag,\n"
        "Cache-Control). The file is re-read when it changes. Needs uvicorn (meshauth[gateway]).",
        "  meshauth registry serve registry.json --port 8900",
    )
    serve.add_argument("file", metavar="FILE", help="the registry JWKS file")
    serve.add_argument("--port", type=_bounded(int, 0, 65535), required=True, metavar="N", help="0: any free port")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--max-age",
        type=_bounded(int, 0, 7 * 86400),
        default=DEFAULT_MAX_AGE,
        metavar="S",
        help=f"Cache-Control max-age in seconds (default {DEFAULT_MAX_AGE})",
    )
    serve.set_defaults(run=_cmd_registry_serve)

    mint = _command(
        commands,
        "mint",
        "mint a service token (prints the token only)",
        "Mint a service token signed with a service's private key. Only the token is\n"
        "printed, so that $(meshauth mint ...) works.",
        "  meshauth mint --key keys/orders.pem --service orders --aud payments\n"
        "  meshauth mint --key keys/gateway.pem --service gateway --aud orders --subject alice --scope orders:read",
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
    mint.add_argument("--subject", metavar="U", help="act for this principal (an end user): a delegated token")
    mint.add_argument(
        "--actor",
        action="append",
        default=[],
        metavar="A",
        help="an earlier actor of the delegation chain, newest first (repeatable)",
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
    verify.add_argument("--registry", required=True, metavar="FILE|URL", help="registry JWKS file or https URL")
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

    # Listed for the overview only: main() hands "demo ..." to meshauth._demo untouched.
    _command(
        commands,
        "demo",
        "run the end-to-end demo",
        "Run the one-command demo (its own options: meshauth demo --help).",
        "  meshauth demo",
    )

    gateway = _command(
        commands,
        "gateway",
        "run the delegating API gateway",
        "Run the gateway described by a TOML configuration file. Needs meshauth[gateway].",
        "  meshauth gateway --config gateway.toml",
    )
    gateway.add_argument("--config", required=True, metavar="FILE", help="the gateway's TOML configuration")
    gateway.set_defaults(run=_cmd_gateway)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshauth`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        return _run_demo(arguments[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # argparse: 0 after --help/--version, 2 on a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except _UsageError as exc:
        _err(f"error: {exc}")
    except KeysUnavailable as exc:
        _err(f"error: registry unavailable, the token was not judged: {exc}")
    except ConfigurationError as exc:
        _err(f"error: {exc}")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _err(f"error: {where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE
