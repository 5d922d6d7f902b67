"""A local copy of the Redis registry, so a verifier can start while Redis is down."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ._exceptions import ConfigurationError
from ._files import write_atomic
from ._jws import strict_json_loads
from ._registry import DEFAULT_MAX_BYTES, KeySet

__all__ = ["load_snapshot", "save_snapshot"]


def save_snapshot(
    path: str | os.PathLike[str], keyset: KeySet, revoked: Mapping[str, int], namespace: str, saved_at: float
) -> None:
    """Write the key set in service and the tombstones (public data only), replacing ``path`` atomically."""
    document = {
        "namespace": namespace,
        "saved_at": int(saved_at),
        "keys": [dict(record.jwk) for record in keyset],
        "revoked": dict(revoked),
    }
    write_atomic(path, json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8"), 0o644)


def load_snapshot(path: str | os.PathLike[str], namespace: str) -> tuple[KeySet, dict[str, int], float]:
    """The key set, tombstones and save time of a snapshot of ``namespace``; ``ConfigurationError`` if unusable."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as handle:
            data = handle.read(DEFAULT_MAX_BYTES + 1)
        document: Any = strict_json_loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigurationError(
            f"registry snapshot {where!r} is unreadable: {exc}", reason="invalid_registry"
        ) from None
    if not isinstance(document, dict) or document.get("namespace") != namespace:
        raise ConfigurationError(
            f"registry snapshot {where!r} is not a snapshot of namespace {namespace!r}",
            reason="invalid_registry",
            expected=namespace,
            actual=str(document.get("namespace") if isinstance(document, dict) else type(document).__name__),
        )
    revoked = document.get("revoked")
    saved_at = document.get("saved_at")
    if not isinstance(revoked, dict) or not all(type(v) is int for v in revoked.values()) or type(saved_at) is not int:
        raise ConfigurationError(f"registry snapshot {where!r} is malformed", reason="invalid_registry")
    keyset = KeySet.from_jwks({"keys": document.get("keys")}, source=where, strict=True)
    return KeySet([r for r in keyset if r.kid not in revoked], source=where), revoked, float(saved_at)
