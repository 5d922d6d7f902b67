"""Writing files so that readers see the old version or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write ``path`` in one step: replace it (``replace=True``) or create it, never overwriting.

    The data goes to a temporary file next to ``path`` (created 0600 by
    ``mkstemp``, flushed to disk, only then widened to ``mode``), which is
    renamed over ``path`` or hard-linked to it (``FileExistsError`` if it
    exists). A process killed at any point leaves no empty or partial
    ``path``, only a ``.NAME.*.tmp`` file; a private key is never readable by
    others, even briefly.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
