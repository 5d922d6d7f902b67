"""How the public packages present their classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["show_as_public"]


def show_as_public(namespace: Mapping[str, Any], names: Iterable[str], module: str) -> None:
    """Make the public classes of ``module`` show as ``module.X`` in reprs and tracebacks.

    They are defined in private modules (``meshauth._verify``); users import
    them from ``module``, so that is the name they should see (httpx does the same).
    """
    for name in names:
        value = namespace[name]
        if isinstance(value, type) and value.__module__.startswith(("meshauth._", "meshauth.gateway._")):
            value.__module__ = module
