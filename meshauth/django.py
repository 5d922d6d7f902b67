"""Django integration: middleware and a Django REST framework authentication class.

``pip install 'meshauth[django]'`` (``meshauth[drf]`` for REST framework). Configure in
``settings.py``; every value is an object or the dotted path of one (a
callable taking no arguments is called once to build it)::

    MIDDLEWARE = [..., "meshauth.django.MeshAuthMiddleware", ...]
    MESHAUTH = {
        "VERIFIER": "payments.auth.verifier",   # a meshauth.Verifier (required)
        "POLICY": "payments.auth.policy",       # a meshauth.Policy (optional)
        "EXCLUDE": ["/healthz"],                # paths that skip authentication
        "IDENTITY": "payments.auth.identity",   # sign response tokens (mutual auth)
        "MOUNT": "",                            # WSGI: the SCRIPT_NAME the app is mounted at
        "ON_ERROR": "payments.auth.on_error",   # optional: replace the error replies (see meshauth.asgi)
    }

The middleware runs the same steps, statuses and JSON bodies as
:class:`meshauth.asgi.MeshAuthMiddleware`, writes the same audit record, and
puts the :class:`~meshauth.Principal` on ``request.principal``. It works under
WSGI and ASGI (sync and async views).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from ._exceptions import MeshAuthError, MissingCredentials, TokenError, Unavailable
from ._identity import ServiceIdentity
from ._middleware import (
    ErrorHook,
    Reply,
    RequestGuard,
    asgi_judged_path,
    asgi_raw_path,
    default_reply,
    wsgi_judged_path,
    wsgi_raw_path,
)
from ._mutual import NONCE_HEADER, RESPONSE_HEADER
from ._policy import Decision, Policy
from ._principal import Principal
from ._proof import bearer_text, unverified_caller
from ._telemetry import AUDIT_LOGGER
from ._verify import Verifier

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django import conf
    from django.http import HttpRequest, HttpResponse
    from django.utils.module_loading import import_string
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("meshauth.django needs the 'django' extra: pip install 'meshauth[django]'") from exc

__all__ = ["MeshAuthMiddleware", "MeshAuthentication", "ServiceUser"]

SETTING: Final = "MESHAUTH"
_TXN_META: Final = "HTTP_TXN_TOKEN"
_NONCE_META: Final = "HTTP_" + NONCE_HEADER.upper().replace("-", "_")

GetResponse = Callable[[HttpRequest], Any]


def _setting(name: str, expected: type | None = None) -> Any:
    """``settings.MESHAUTH[name]``, imported if a dotted path, built if a factory."""
    # Read through the module: a LazySettings object at module level would be
    # configured by anything that merely inspects this module (doctest, pydoc).
    config = getattr(conf.settings, SETTING, None)
    if not isinstance(config, Mapping):
        raise MeshAuthError(
            f"settings.{SETTING} is not set: add {SETTING} = {{'VERIFIER': ...}} to the Django settings",
            reason="invalid_configuration",
        )
    value = config.get(name)
    if isinstance(value, str) and expected is not None:
        value = import_string(value)
    if expected is not None and value is not None and not isinstance(value, expected) and callable(value):
        value = value()
    if expected is not None and value is not None and not isinstance(value, expected):
        raise MeshAuthError(
            f"settings.{SETTING}[{name!r}] is not a {expected.__name__}",
            reason="invalid_configuration",
            expected=expected.__name__,
            actual=type(value).__name__,
        )
    return value


def _verifier() -> Verifier:
    verifier = _setting("VERIFIER", Verifier)
    if verifier is None:
        raise MeshAuthError(f"settings.{SETTING}['VERIFIER'] is required", reason="invalid_configuration")
    assert isinstance(verifier, Verifier)
    return verifier


def _guard_from_settings() -> RequestGuard:
    return RequestGuard(
        _verifier(),
        policy=_setting("POLICY", Policy),
        exclude=_setting("EXCLUDE") or (),
        identity=_setting("IDENTITY", ServiceIdentity),
        tracer_provider=None,
        on_error=_hook(_setting("ON_ERROR")),
        retry_after=int(_setting("RETRY_AFTER") or 5),
    )


def _hook(value: Any) -> ErrorHook | None:
    """``MESHAUTH["ON_ERROR"]``: a callable, or the dotted path of one."""
    hook = import_string(value) if isinstance(value, str) else value
    if hook is not None and not callable(hook):
        raise MeshAuthError(f"settings.{SETTING}['ON_ERROR'] is not callable", reason="invalid_configuration")
    return hook  # type: ignore[no-any-return]


def _raw_path(request: HttpRequest) -> str:
    """The still-encoded path, for the audit record."""
    scope = getattr(request, "scope", None)  # Django's ASGIRequest keeps the ASGI scope
    return asgi_raw_path(scope) if isinstance(scope, Mapping) else wsgi_raw_path(request.META)


def _judged_path(request: HttpRequest, mount: str) -> str:
    """The canonical path Django will route (:class:`~meshauth.BadPath` if the raw one is not)."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, Mapping):
        return asgi_judged_path(scope)
    return wsgi_judged_path(request.META, mount)


@dataclasses.dataclass(frozen=True, slots=True)
class _Admitted:
    principal: Principal
    nonce: str | None


def _txn_token(guard: RequestGuard, request: Any) -> str | None:
    """The request's one ``Txn-Token`` header (two arrive folded with a comma: malformed)."""
    value = request.META.get(_TXN_META)
    return guard.txn_token(None if value is None else str(value).encode("latin-1", "replace"))


@dataclasses.dataclass(frozen=True, slots=True)
class _Credentials:
    token: str
    path: str
    txn_token: str | None


class MeshAuthMiddleware:
    """Django middleware: authenticate (and optionally authorize) every request.

    Configured by ``settings.MESHAUTH`` (see the module docstring), read once
    when Django builds its middleware chain. A request whose raw path is not in
    canonical form (dot-segments, ``//``, encoded slashes or dots, ...) is
    refused with 400 ``bad_path``, so the policy never judges a path other than
    the one Django routes; under WSGI a ``SCRIPT_NAME`` other than ``MOUNT``
    is refused too (:func:`meshauth.canonical_path` has the rules).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.guard = _guard_from_settings()
        self.mount = str(_setting("MOUNT") or "")
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self._async:
            return self._acall(request)
        if self.guard.excluded(request.path_info):
            return self.get_response(request)
        try:
            credentials = self._credentials(request)
            principal = self.guard.verifier.verify(credentials.token, credentials.txn_token, audit=False)
        except Exception as exc:
            return self._refuse(request, exc, None)
        admitted = self._admit(request, principal, credentials.path)
        if isinstance(admitted, HttpResponse):
            return admitted
        return self._prove(self.get_response(request), admitted)

    async def _acall(self, request: HttpRequest) -> Any:
        get_response: Callable[[HttpRequest], Awaitable[Any]] = self.get_response
        if self.guard.excluded(request.path_info):
            return await get_response(request)
        try:
            credentials = self._credentials(request)
            principal = await self.guard.verifier.averify(credentials.token, credentials.txn_token, audit=False)
        except Exception as exc:
            return self._refuse(request, exc, None)
        admitted = self._admit(request, principal, credentials.path)
        if isinstance(admitted, HttpResponse):
            return admitted
        return self._prove(await get_response(request), admitted)

    def _credentials(self, request: HttpRequest) -> _Credentials:
        path = _judged_path(request, self.mount)
        authorization = request.META.get("HTTP_AUTHORIZATION")
        if authorization is None:
            raise MissingCredentials("the request has no bearer credentials")
        token = self.guard.bearer(str(authorization).encode("latin-1", "replace"), folded=True)
        return _Credentials(token, path, _txn_token(self.guard, request))

    def _nonce(self, request: HttpRequest) -> tuple[str | None, MeshAuthError | None]:
        """The request's ``Meshauth-Nonce`` (None without one or without ``IDENTITY``), or why it is bad."""
        value = request.META.get(_NONCE_META)
        if value is None or self.guard.identity is None:
            return None, None
        raw = str(value).encode("latin-1", "replace")
        return self.guard.read_nonce(raw, b"," in raw)

    def _admit(self, request: HttpRequest, principal: Principal, path: str) -> _Admitted | HttpResponse:
        """Nonce and policy for an authenticated request: what to send back, or a refusal."""
        guard = self.guard
        nonce, bad_nonce = self._nonce(request)
        if bad_nonce is not None:
            return self._refuse(request, bad_nonce, principal)
        decision: Decision | None = None
        span = None
        if guard.policy is not None:
            decision, denied, span = guard.authorize(guard.policy, principal, request.method or "GET", path)
            if denied is not None:
                return self._refuse(request, denied, principal, span=span, nonce=nonce)
        request.principal = principal
        if AUDIT_LOGGER.isEnabledFor(logging.INFO):
            guard.audit_accepted(principal, decision, span, **_request_fields(request))
        return _Admitted(principal, nonce)

    def _prove(self, response: Any, admitted: _Admitted) -> Any:
        identity = self.guard.identity
        if admitted.nonce is not None and identity is not None:
            # A streamed answer is not known before its headers go out: signed without its body.
            body = None if getattr(response, "streaming", False) else bytes(response.content)
            response[RESPONSE_HEADER] = identity.mint_response(
                admitted.principal.caller, admitted.nonce, status=response.status_code, body=body
            )
        return response

    def _refuse(
        self,
        request: HttpRequest,
        exc: BaseException,
        principal: Principal | None,
        *,
        span: Any = None,
        nonce: str | None = None,
    ) -> HttpResponse:
        guard = self.guard
        reply = guard.reply(exc)
        guard.audit_refused(exc, reply, principal=principal, span=span, **_request_fields(request))
        response = _http_response(reply)
        if nonce is None:
            nonce = self._nonce(request)[0]  # refused before the nonce was read (a 401, 503): still signed
        if nonce is not None and guard.identity is not None:
            caller = (
                principal.caller
                if principal is not None
                else unverified_caller(bearer_text(request.META.get("HTTP_AUTHORIZATION")))
            )
            response[RESPONSE_HEADER] = guard.identity.mint_response(
                caller, nonce, status=reply.status, body=reply.body
            )
        return response


def _request_fields(request: HttpRequest) -> dict[str, Any]:
    remote = request.META.get("REMOTE_ADDR")
    return {
        "method": request.method or "GET",
        "path": _raw_path(request),
        "client": remote if isinstance(remote, str) and remote else None,
        "traceparent": request.META.get("HTTP_TRACEPARENT"),
    }


def _http_response(reply: Reply) -> HttpResponse:
    response = HttpResponse(reply.body, status=reply.status)
    for name, value in reply.headers:
        response[name] = value
    return response


# -- Django REST framework ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceUser:
    """``request.user`` for a request made by a service (``request.auth`` is the Principal)."""

    principal: Principal
    is_authenticated: bool = True
    is_anonymous: bool = False
    is_active: bool = True
    is_staff: bool = False

    @property
    def username(self) -> str:
        return self.principal.caller

    def __str__(self) -> str:
        return self.principal.caller


class MeshAuthentication:
    """A Django REST framework authentication class for meshauth service tokens.

    ``REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": ["meshauth.django.MeshAuthentication"]}``
    with ``settings.MESHAUTH["VERIFIER"]``. It reuses the principal the middleware
    already published, else verifies the ``Authorization`` header itself.
    ``request.user`` is a :class:`ServiceUser`, ``request.auth`` the
    :class:`~meshauth.Principal`. A refused token is a 401 with the middleware's
    body (``{"error": "invalid_token", "reason": ...}``) and ``WWW-Authenticate``
    challenge; an unreadable registry is a 503. Without an ``Authorization``
    header it returns ``None``, so other authentication classes may run.
    """

    def authenticate(self, request: Any) -> tuple[ServiceUser, Principal] | None:
        principal = getattr(request._request, "principal", None)
        if isinstance(principal, Principal):
            return ServiceUser(principal), principal
        authorization = request.META.get("HTTP_AUTHORIZATION")
        if authorization is None:
            return None
        # Only the header parsing and the verifier: policy and exclusions are the middleware's.
        verifier = _verifier()
        guard = RequestGuard(
            verifier, policy=None, exclude=(), identity=None, tracer_provider=None, on_error=None, retry_after=5
        )
        try:
            token = guard.bearer(str(authorization).encode("latin-1", "replace"), folded=True)
            principal = verifier.verify(token, _txn_token(guard, request))
        except TokenError as exc:
            request._meshauth_refusal = exc
            raise _drf_error(exc, verifier.audience) from None
        except Unavailable as exc:
            raise _drf_error(exc, verifier.audience) from None
        return ServiceUser(principal), principal

    def authenticate_header(self, request: Any) -> str:
        """The ``WWW-Authenticate`` value of a 401: the middleware's challenge for the same failure."""
        refusal = getattr(request, "_meshauth_refusal", None)
        realm = _verifier().audience
        exc = refusal if refusal is not None else MissingCredentials("no credentials")
        return dict(default_reply(exc, realm).headers)["WWW-Authenticate"]


def _drf_error(exc: MeshAuthError, realm: str) -> Exception:
    """The REST framework exception carrying the middleware's body for ``exc``."""
    from rest_framework.exceptions import APIException, AuthenticationFailed  # noqa: PLC0415 - drf extra

    body = json.loads(default_reply(exc, realm).body)
    if isinstance(exc, TokenError):
        refused: Exception = AuthenticationFailed(detail=body)
        return refused
    unavailable = APIException(detail=body)
    unavailable.status_code = 503
    return unavailable  # type: ignore[no-any-return]
