"""Shared pieces of the ``meshauth`` commands: output, times, files, argparse types."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, Final

from .._files import write_atomic as _write_atomic
from .._keys import SigningKey

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
    """Create ``path`` complete or not at all; never replaces a file (``FileExistsError``).

    The data goes to a temporary file first, which is then hard-linked into
    place: a run killed at any point leaves no empty or partial ``path``
    behind, only a temporary file that the next run under :func:`_exclusive`
    removes.
    """
    _write_atomic(path, data, mode, replace=False)


@contextlib.contextmanager
def _exclusive(*paths: str) -> Iterator[None]:
    """Hold an exclusive lock for writing ``paths`` (one lock file per directory and first name).

    Every writer of these files holds the lock for its whole read-modify-write,
    so concurrent runs queue instead of losing each other's changes. Temporary
    files that a killed run left next to ``paths`` are removed: no live writer
    can own them while we hold the lock.
    """
    first = os.path.abspath(paths[0])
    directory = os.path.dirname(first)
    lock_path = os.path.join(directory, f".{os.path.basename(first)}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for path in paths:
            prefix = f".{os.path.basename(path)}."
            for name in os.listdir(directory):
                if name.startswith(prefix) and name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
