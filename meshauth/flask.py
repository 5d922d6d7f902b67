"""Flask extension: meshauth's WSGI middleware, ``g.meshauth_principal`` and a ``require`` decorator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from opentelemetry import trace

from ._identity import ServiceIdentity
from ._middleware import PRINCIPAL_KEY, ErrorHook, Requirement
from ._policy import Policy
from ._principal import Principal
from ._verify import Verifier
from .wsgi import MeshAuthMiddleware

__all__ = ["MeshAuth", "current_principal", "require"]

_View = TypeVar("_View", bound=Callable[..., ResponseReturnValue])


class MeshAuth:
    """Puts :class:`meshauth.wsgi.MeshAuthMiddleware` in front of a Flask app.

    >>> from flask import Flask
    >>> from meshauth.testing import Mesh
    >>> mesh = Mesh(["orders", "payments"])
    >>> app = Flask("payments")
    >>> auth = MeshAuth(app, verifier=mesh.verifier("payments"), exclude=["/healthz"])
    >>> @app.post("/charges")
    ... @auth.require(callers=["orders"])
    ... def charge():
    ...     return {"caller": current_principal().caller}

    ``init_app`` wraps ``app.wsgi_app`` (so every request is authenticated
    before Flask routes it, with the statuses and bodies of the middleware)
    and sets ``flask.g.meshauth_principal`` in a ``before_request`` hook
    (None on excluded paths). Supports the application-factory pattern:
    ``auth = MeshAuth(verifier=...)`` then ``auth.init_app(app)``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        verifier: Verifier,
        policy: Policy | None = None,
        identity: ServiceIdentity | None = None,
        exclude: Iterable[str] = (),
        tracer_provider: trace.TracerProvider | None = None,
        on_error: ErrorHook | None = None,
        mount: str = "",
    ) -> None:
        self.verifier = verifier
        self.mount = mount
        self.policy = policy
        self.identity = identity
        self.exclude = tuple(exclude)
        self.tracer_provider = tracer_provider
        self.on_error = on_error
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Install the middleware and the ``before_request`` hook on ``app``."""
        if "meshauth" in app.extensions:
            raise RuntimeError("MeshAuth is already installed on this app")
        middleware = MeshAuthMiddleware(
            app.wsgi_app,
            self.verifier,
            policy=self.policy,
            identity=self.identity,
            exclude=self.exclude,
            tracer_provider=self.tracer_provider,
            on_error=self.on_error,
            mount=self.mount,
        )
        # Flask's documented way to add WSGI middleware is to replace wsgi_app.
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.before_request(_load_principal)
        app.extensions["meshauth"] = self

    def require(
        self, callers: Iterable[str] | None = None, scopes: Iterable[str] | None = None
    ) -> Callable[[_View], _View]:
        """Same as :func:`meshauth.flask.require`."""
        return require(callers, scopes)


def _load_principal() -> None:
    g.meshauth_principal = request.environ.get(PRINCIPAL_KEY)


def current_principal() -> Principal | None:
    """The principal of the current request (None on an excluded path)."""
    principal = g.get("meshauth_principal")
    return principal if isinstance(principal, Principal) else None


def require(callers: Iterable[str] | None = None, scopes: Iterable[str] | None = None) -> Callable[[_View], _View]:
    """A view decorator: refuse the request unless an authenticated caller matches.

    401 (JSON, ``WWW-Authenticate: Bearer realm=...``) without a principal,
    403 ``forbidden``/``caller_not_allowed`` when the caller matches none of
    the ``callers`` globs, 403 ``insufficient_scope`` when a scope is missing.
    """
    requirement = Requirement.build(callers, scopes)

    def decorate(view: _View) -> _View:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            extension = current_app.extensions.get("meshauth")
            realm = extension.verifier.audience if isinstance(extension, MeshAuth) else None
            refusal = requirement.refusal(current_principal(), realm)
            if refusal is not None:
                response = jsonify(refusal.body)
                response.status_code = refusal.status
                if refusal.www_authenticate:
                    response.headers["WWW-Authenticate"] = refusal.www_authenticate
                return response
            return view(*args, **kwargs)

        return cast(_View, guarded)

    return decorate
