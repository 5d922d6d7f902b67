"""WSGI middleware: authenticate every inbound request before the app sees it (PEP 3333)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from opentelemetry import trace
from opentelemetry.trace import Span

from ._exceptions import MissingCredentials
from ._identity import ServiceIdentity
from ._middleware import (
    PRINCIPAL_KEY,
    ErrorHook,
    RequestGuard,
    wsgi_raw_path,
)
from ._policy import Decision, Policy
from ._principal import Principal
from ._proof import DEFAULT_SIGN_BODY_LIMIT, RESPONSE_HEADER, WsgiProof, bearer_text, unverified_caller
from ._telemetry import AUDIT_LOGGER
from ._verify import Verifier

__all__ = ["PRINCIPAL_KEY", "MeshAuthMiddleware"]

if TYPE_CHECKING:
    pass


class MeshAuthMiddleware:
    """Authenticates (and optionally authorizes) every request of a WSGI app.

    >>> from meshauth.testing import Mesh
    >>> def app(environ, start_response):
    ...     start_response("200 OK", [("Content-Type", "text/plain")])
    ...     return [environ["meshauth.principal"].caller.encode()]
    >>> mesh = Mesh(["orders", "payments"])
    >>> app = MeshAuthMiddleware(app, mesh.verifier("payments"), exclude=["/healthz"])

    The same rules, statuses, headers and bodies as
    :class:`meshauth.asgi.MeshAuthMiddleware`, with ``verifier.verify`` and
    ``environ["meshauth.principal"]``. ``exclude`` is matched against
    ``PATH_INFO``. The policy judges the path the app routes: ``PATH_INFO``
    under ``mount`` (the prefix the server mounts the app at, default ``""``).
    A ``SCRIPT_NAME`` other than ``mount`` is refused (``400 bad_path``), since
    some servers take it from a request header; where the server gives the raw
    target (``RAW_URI``, ``REQUEST_URI``) it must be canonical and agree with
    ``mount + PATH_INFO``. WSGI servers join a
    repeated header with commas, so an ``Authorization`` value holding a comma
    counts as repeated (``duplicate_authorization``); so does a
    ``Meshauth-Nonce`` holding one.

    With ``identity``, ``start_response`` is wrapped to add the
    ``Meshauth-Response`` header to whatever the app sends (also when it
    calls ``start_response`` again with ``exc_info``); the app's iterable is
    returned as is, so its ``close()`` reaches the server untouched.

    .. note::
       Some servers (Apache mod_wsgi) drop the ``Authorization`` header unless
       told to pass it on (``WSGIPassAuthorization On``).
    """

    __slots__ = ("_exclude", "_guard", "_identity", "_mount", "_policy", "_sign_body_limit", "_verifier", "app")

    def __init__(
        self,
        app: WSGIApplication,
        verifier: Verifier,
        *,
        policy: Policy | None = None,
        exclude: Iterable[str] = (),
        identity: ServiceIdentity | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        on_error: ErrorHook | None = None,
        retry_after: int = 5,
        mount: str = "",
        sign_body_limit: int = DEFAULT_SIGN_BODY_LIMIT,
    ) -> None:
        self.app = app
        self._sign_body_limit = sign_body_limit
        if mount and (not mount.startswith("/") or mount.endswith("/")):
            raise ValueError(f"mount is '' or a path like '/api' (no trailing '/'), found {mount!r}")
        self._mount = mount
        self._guard = RequestGuard(
            verifier,
            policy=policy,
            exclude=exclude,
            identity=identity,
            tracer_provider=tracer_provider,
            on_error=on_error,
            retry_after=retry_after,
        )
        self._verifier = verifier
        self._policy = policy
        self._identity = identity
        self._exclude = self._guard.has_exclusions

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        guard = self._guard
        if self._exclude and guard.excluded(environ.get("PATH_INFO") or "/"):
            return self.app(environ, start_response)

        authorization = environ.get("HTTP_AUTHORIZATION")
        nonce_value = environ.get("HTTP_MESHAUTH_NONCE")
        method = environ.get("REQUEST_METHOD") or "GET"
        principal: Principal | None = None
        nonce: str | None = None
        try:
            path = guard.wsgi_path(environ, self._mount)
            # Read first, so that every answer to this request, refusals included, is signed;
            # a bad nonce is reported once the caller is known (for the audit record).
            raw_nonce = _latin1(nonce_value) if nonce_value is not None and self._identity is not None else None
            nonce, bad_nonce = guard.read_nonce(raw_nonce, raw_nonce is not None and b"," in raw_nonce)
            if authorization is None:
                raise MissingCredentials("the request has no bearer credentials")
            # PEP 3333: header values are latin-1 "bytes as str"; encoding recovers the bytes.
            token = guard.bearer(_latin1(authorization), folded=True)
            raw_txn = environ.get("HTTP_TXN_TOKEN")
            txn_token = guard.txn_token(None if raw_txn is None else _latin1(raw_txn))
            principal = self._verifier.verify(token, txn_token, audit=False)
            if bad_nonce is not None:
                raise bad_nonce
        except Exception as exc:
            return self._refuse(environ, start_response, exc, principal=principal, nonce=nonce)

        decision: Decision | None = None
        span: Span | None = None
        policy = self._policy
        if policy is not None:
            decision, denied, span = guard.authorize(policy, principal, method, path)
            if denied is not None:
                return self._refuse(environ, start_response, denied, principal=principal, span=span, nonce=nonce)

        environ[PRINCIPAL_KEY] = principal
        if AUDIT_LOGGER.isEnabledFor(logging.INFO):
            guard.audit_accepted(
                principal,
                decision,
                span,
                method=method,
                path=path,
                client=_client(environ),
                traceparent=environ.get("HTTP_TRACEPARENT"),
            )
        if nonce is not None:
            assert self._identity is not None
            proof = WsgiProof(self._identity, principal.caller, nonce, self._sign_body_limit, head=method == "HEAD")
            return proof.run(lambda capture: self.app(environ, capture), start_response)
        return self.app(environ, start_response)

    def _refuse(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        exc: Exception,
        *,
        principal: Principal | None,
        span: Span | None = None,
        nonce: str | None = None,
    ) -> list[bytes]:
        guard = self._guard
        reply = guard.reply(exc)
        guard.audit_refused(
            exc,
            reply,
            principal=principal,
            span=span,
            method=environ.get("REQUEST_METHOD") or "GET",
            path=wsgi_raw_path(environ),
            client=_client(environ),
            traceparent=environ.get("HTTP_TRACEPARENT"),
        )
        headers = list(reply.headers)
        if nonce is not None and self._identity is not None:
            # Refusals are signed too: the caller can tell the callee's 401/403/503 from a forged one.
            if principal is not None:
                caller = principal.caller
            else:
                authorization = environ.get("HTTP_AUTHORIZATION")
                caller = unverified_caller(bearer_text(authorization if isinstance(authorization, str) else None))
            token = self._identity.mint_response(caller, nonce, status=reply.status, body=reply.body)
            headers.append((RESPONSE_HEADER, token))
        start_response(reply.status_line, headers)
        return [reply.body]


def _latin1(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    # Characters outside latin-1 are not PEP 3333 form; as UTF-8 they stay non-ASCII and are refused.
    text = str(value)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _client(environ: WSGIEnvironment) -> str | None:
    client = environ.get("REMOTE_ADDR")
    return client if isinstance(client, str) and client else None
