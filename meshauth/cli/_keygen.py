"""``meshauth keygen``: a service's signing key pair."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .._files import write_atomic as _write_atomic
from .._keys import ALGORITHMS, SigningKey
from .._names import service_name_problem
from ._common import (
    _PUBLIC_FILE_MODE,
    EXIT_OK,
    _add_json,
    _command,
    _exclusive,
    _password,
    _print_fields,
    _print_json,
    _UsageError,
    _write_new,
)


def _cmd_keygen(args: argparse.Namespace) -> int:
    service: str = args.service
    problem = service_name_problem(service)
    if problem is not None:
        raise _UsageError(problem)
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
        with _exclusive(pem_path, jwk_path):
            write = _write_atomic if args.force else _write_new
            write(pem_path, pem, 0o600)
            write(jwk_path, jwk_data, _PUBLIC_FILE_MODE)
    except FileExistsError as exc:
        where = exc.filename2 or exc.filename
        raise _UsageError(f"{where} appeared meanwhile; refusing to overwrite it (use --force)") from None
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


def add_parser(commands: Any) -> None:
    """Register ``keygen`` on the ``meshauth`` subparsers."""
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
