"""Service names: one syntax everywhere a service is named.

Policies, route configurations and ``delegators`` treat caller names as
shell-style globs, so a name holding ``*``, ``?`` or ``[`` could match other
services. Registry keys, identities, the gateway's configuration and the CLI
all accept only names of this syntax: a name can never act as a glob.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["SERVICE_NAME", "service_name_problem"]

SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SYNTAX: Final = "1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def service_name_problem(value: object) -> str | None:
    """Why ``value`` is not a service name (for an error message), or None if it is one."""
    if not isinstance(value, str):
        return f"a service name is a string ({_SYNTAX}), found {type(value).__name__}"
    if SERVICE_NAME.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a service name is {_SYNTAX}, found {shown!r}"
    return None
