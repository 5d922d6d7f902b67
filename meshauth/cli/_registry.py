"""``meshauth registry ...``: maintain, check and serve a registry JWKS file."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import time
from collections.abc import Mapping
from typing import Any

from .._files import write_atomic as _write_atomic
from .._jws import strict_json_loads
from .._keys import KeyRecord, check_jwk
from .._names import service_name_problem
from .._registry import DEFAULT_MAX_BYTES, JWKSFile, KeySet, parse_registry_document
from .._verify import (
    MAX_LEEWAY,
)
from . import _redis
from ._common import (
    _PUBLIC_FILE_MODE,
    DEFAULT_LEEWAY,
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_LIFETIME,
    EXIT_OK,
    EXIT_REJECTED,
    _add_json,
    _bounded,
    _command,
    _err,
    _exclusive,
    _iso,
    _load_signing_key,
    _optional_module,
    _out,
    _print_json,
    _print_table,
    _read_file,
    _safe,
    _timestamp_arg,
    _UsageError,
)


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
    problem = service_name_problem(args.service) if args.service is not None else None
    if problem is not None:
        raise _UsageError(f"--service: {problem}")
    candidates: list[tuple[str, Any]] = []
    for path in args.jwk_files:
        candidates.extend((path, jwk) for jwk in _jwks_from_file(path))
    if args.key is not None:
        key = _load_signing_key(args.key, args.password_env)
        candidates.append((args.key, key.public_jwk(iss=args.service)))
    if args.nbf is not None and args.exp is not None and args.exp <= args.nbf:
        raise _UsageError(f"--exp ({_iso(args.exp)}) must be later than --nbf ({_iso(args.nbf)})")
    if args.exp is not None and args.exp <= time.time() and not args.force:
        raise _UsageError(
            f"--exp {_iso(args.exp)} is {int(time.time() - args.exp)} s in the past: the key would never verify "
            "(give a later --exp, e.g. +90d, or --force to add it anyway)"
        )
    with _exclusive(args.file):  # the whole read-modify-write: concurrent adds queue, none is lost
        added, keyset = _add_entries(args, candidates)
    now = time.time()
    new_kids = {entry["kid"] for entry in added}
    summaries = [_key_summary(record, now) for record in keyset if record.kid in new_kids]
    if args.json:
        _print_json({"file": args.file, "added": summaries})
        return EXIT_OK
    for summary in summaries:
        _out(f"added {summary['kid']} ({summary['service']}, {summary['alg']}, {summary['status']}) to {args.file}")
    return EXIT_OK


def _add_entries(args: argparse.Namespace, candidates: list[tuple[str, Any]]) -> tuple[list[Any], KeySet]:
    document = _read_registry(args.file, missing_ok=True)
    present = {jwk.get("kid") for jwk in document["keys"] if isinstance(jwk, Mapping)}
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
    return added, _write_registry(args.file, document)


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    with _exclusive(args.file):
        removed = _remove_entries(args)
    summaries = [{"kid": jwk.get("kid"), "service": jwk.get("iss")} for jwk in removed]
    if args.json:
        _print_json({"file": args.file, "removed": summaries})
        return EXIT_OK
    for summary in summaries:
        _out(f"removed {summary['kid']} ({_safe(summary['service'])}) from {args.file}")
    _out("tokens signed with a removed key stop verifying once services reload the registry")
    return EXIT_OK


def _remove_entries(args: argparse.Namespace) -> list[Any]:
    document = _read_registry(args.file)
    keys = document["keys"]
    kids = [jwk.get("kid") if isinstance(jwk, Mapping) else None for jwk in keys]
    missing = [kid for kid in args.kids if kid not in kids]
    if missing:
        raise _UsageError(f"kid {missing[0]} is not in {args.file}; nothing was changed")
    removed = [jwk for jwk in keys if isinstance(jwk, Mapping) and jwk.get("kid") in args.kids]
    document["keys"] = [jwk for jwk in keys if not (isinstance(jwk, Mapping) and jwk.get("kid") in args.kids)]
    _write_registry(args.file, document)
    return removed


def _file(args: argparse.Namespace) -> str:
    if args.file is None:
        raise _UsageError(f"registry {args.action}: name the registry FILE, or give --redis URL before the action")
    return str(args.file)


def _cmd_registry_list(args: argparse.Namespace) -> int:
    if args.redis:
        return _redis.cmd_list(args)
    document = _read_registry(_file(args))
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


# What `registry --redis URL serve` tells HTTP clients to cache: revocation reaches them within it.
REDIS_SERVE_MAX_AGE = 30


def _cmd_registry_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: PLC0415 - optional dependency, only this command needs it
    except ModuleNotFoundError:
        raise _UsageError("registry serve needs uvicorn: pip install 'meshauth[gateway]'") from None
    publish = _optional_module("meshauth._publish", "registry serve")
    address = _listen_address(args)
    # Either source fails now, not on the first request, if it cannot be read.
    source, what = _redis.serve_source(args) if args.redis else (JWKSFile(_file(args)), _file(args))
    if args.max_age is None:  # HTTP clients keep a copy this long: short for the Redis registry's fast changes
        args.max_age = REDIS_SERVE_MAX_AGE if args.redis else DEFAULT_MAX_AGE
    app = publish.jwks_app(source, max_age=args.max_age)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    # Binding here (not in uvicorn) gives the real port for --port 0 before serving starts.
    listener = socket.create_server(address, family=family)
    try:
        with listener:
            port = listener.getsockname()[1]
            host = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
            url = f"http://{host}:{port}{publish.DEFAULT_PATH}"
            _out(f"serving {what} at {url} (max-age {args.max_age} s; Ctrl-C to stop)")
            config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none")
            uvicorn.Server(config).run(sockets=[listener])
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return EXIT_OK


def _listen_address(args: argparse.Namespace) -> tuple[str, int]:
    if args.listen is None:
        if args.port is None:
            raise _UsageError("registry serve: give --port N (or --listen HOST:PORT)")
        return str(args.host), int(args.port)
    host, sep, port = str(args.listen).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _UsageError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8900")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_parser(commands: Any) -> None:
    """Register ``registry`` and its actions on the ``meshauth`` subparsers."""
    # Long but flat: one argparse declaration after another, the command's own reference; splitting
    # it would scatter the options of one command across functions.
    registry = _command(
        commands,
        "registry",
        "maintain, check and serve a registry JWKS file (or the Redis registry)",
        "Maintain the key registry: a JWKS file listing every service's public keys,\n"
        "or (with --redis URL) the registry that replicas keep on Redis.",
        "  meshauth registry add registry.json keys/orders.jwk.json\n  meshauth registry list registry.json\n"
        "  meshauth registry --redis redis://127.0.0.1:6379/0 list",
    )
    actions = registry.add_subparsers(dest="action", metavar="ACTION", required=True)
    _redis.add_actions(registry, actions)

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
    remove.add_argument(
        "kids",
        nargs="+",
        metavar="KID",
        help="key ids to remove (see registry list); put them after -- when one starts with -",
    )
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
    listing.add_argument("file", nargs="?", metavar="FILE", help="the registry JWKS file (not with --redis)")
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
        "Serve a registry file, or the Redis registry (--redis URL), as a JWKS endpoint\n"
        "(application/jwk-set+json, ETag, Cache-Control), following changes. Needs uvicorn\n"
        "(meshauth[gateway]).",
        "  meshauth registry serve registry.json --port 8900\n"
        "  meshauth registry --redis redis://127.0.0.1:6379/0 serve --listen 127.0.0.1:8900",
    )
    serve.add_argument("file", nargs="?", metavar="FILE", help="the registry JWKS file (not with --redis)")
    serve.add_argument("--port", type=_bounded(int, 0, 65535), metavar="N", help="0: any free port")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address and port to bind (instead of --host/--port)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--max-age",
        type=_bounded(int, 0, 7 * 86400),
        default=None,
        metavar="S",
        help=f"Cache-Control max-age in seconds (default {DEFAULT_MAX_AGE}; {REDIS_SERVE_MAX_AGE} with --redis)",
    )
    serve.set_defaults(run=_cmd_registry_serve)
