"""The caller's side of body binding: the bytes received must be the bytes the callee signed.

A response token's ``body_sha256`` is checked on the raw bytes as they arrive
(after any content-encoding, as the callee sent them). The check wraps the
response's byte stream, so it also works with ``client.stream(...)``: a body
that differs raises :class:`~meshauth.BodyMismatch` when its last byte has
been read, before ``response.read()`` hands it out whole.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from ._exceptions import BodyMismatch, UnboundBody
from ._jws import b64url_encode
from ._principal import Principal

__all__ = ["bind_body", "check_digest", "require_binding"]


def require_binding(proof: Principal, service: str, *, allow_unbound: bool) -> str | None:
    """The ``body_sha256`` the response token binds; ``None`` for an unbound body the caller allows."""
    digest = proof.claims.get("body_sha256")
    if digest is None and not allow_unbound:
        raise UnboundBody(
            f"the response from {service!r} is signed without binding its body (a streamed or large answer); "
            "pass allow_unbound_body=True to ServiceAuth to accept such answers",
            expected="body_sha256 in the response token",
            actual="no body binding",
        )
    return None if digest is None else str(digest)


def bind_body(response: httpx.Response, proof: Principal, service: str, *, allow_unbound: bool) -> None:
    """Check (now, or as the body arrives) that ``response``'s body is the one ``proof`` binds."""
    digest = require_binding(proof, service, allow_unbound=allow_unbound)
    if digest is None:
        return
    if response.is_stream_consumed:  # read already (an in-memory transport)
        check_digest(digest, hashlib.sha256(response.content).digest(), service)
        return
    response.stream = _DigestingStream(response.stream, digest, service)


def check_digest(expected: str, received: bytes, service: str) -> None:
    """``BodyMismatch`` unless ``received`` (a SHA-256 digest) is the signed ``body_sha256``."""
    found = b64url_encode(received)
    if not hmac.compare_digest(found.encode("ascii"), expected.encode("ascii")):
        raise BodyMismatch(
            f"the body received is not the body {service!r} signed: it was changed on the way",
            expected="the body_sha256 of the response token",
            actual="another digest",
        )


class _DigestingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The response's byte stream, hashed as it passes; compared with the signed digest at its end."""

    def __init__(self, inner: Any, digest: str, service: str) -> None:
        self._inner = inner
        self._digest = digest
        self._service = service
        self._hash = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._hash.update(chunk)
            yield chunk
        check_digest(self._digest, self._hash.digest(), self._service)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._hash.update(chunk)
            yield chunk
        check_digest(self._digest, self._hash.digest(), self._service)

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        await self._inner.aclose()
