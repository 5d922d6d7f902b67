"""``meshauth doctor``: check a service's key, registry, clock and policy; one line per check."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._doctor import FAIL, DoctorSettings, report_lines, run_checks
from ._common import EXIT_OK, EXIT_REJECTED, _add_json, _command, _out, _password, _print_json, _safe

__all__ = ["add_parser"]


def _cmd_doctor(args: argparse.Namespace) -> int:
    settings = DoctorSettings.from_env(
        os.environ,
        service=args.service,
        key_file=args.key_file,
        password=_password(args.password_env) if args.password_env else None,
        registry=args.registry,
        policy=args.policy,
    )
    checks = run_checks(settings)
    healthy = all(check.status != FAIL for check in checks)
    if args.json:
        _print_json({"ok": healthy, "checks": [check.as_dict() for check in checks]})
    else:
        for line in report_lines(checks, _safe):
            _out(line)
    return EXIT_OK if healthy else EXIT_REJECTED


def add_parser(commands: Any) -> None:
    """Register ``doctor`` on the ``meshauth`` subparsers."""
    doctor = _command(
        commands,
        "doctor",
        "check a service's key, registry, clock and policy",
        "Check the settings a service runs with and print one line per check, with a fix\n"
        "for each failure: the key file (exists, parses, mode 0600), the key in the registry\n"
        "(present, owned by this service, within its validity window), the registry\n"
        "(reachable, fresh), this host's clock against the registry server's Date header,\n"
        "and the policy (loads; every caller it names has a key in the registry).\n"
        "Settings come from MESHAUTH_SERVICE, MESHAUTH_KEY_FILE, MESHAUTH_KEY_PASSWORD,\n"
        "MESHAUTH_REGISTRY and MESHAUTH_POLICY; flags override them. Exit 0 when every\n"
        "check passes (or is skipped), 1 when one fails.",
        "  meshauth doctor --service orders --key-file keys/orders.pem --registry registry.json\n"
        "  MESHAUTH_REGISTRY=https://registry.internal/.well-known/jwks.json meshauth doctor --json",
    )
    doctor.add_argument("--service", metavar="NAME", help="this service's name (MESHAUTH_SERVICE)")
    doctor.add_argument("--key-file", metavar="PEM", help="its private key (MESHAUTH_KEY_FILE)")
    doctor.add_argument("--password-env", metavar="VAR", help="the PEM's password is in this variable")
    doctor.add_argument("--registry", metavar="FILE|URL", help="the key registry (MESHAUTH_REGISTRY)")
    doctor.add_argument("--policy", metavar="FILE", help="the service's policy file (MESHAUTH_POLICY)")
    _add_json(doctor)
    doctor.set_defaults(run=_cmd_doctor)
