"""Outbound authentication for services on ``requests`` (``pip install 'meshauth[requests]'``).

The same behaviour as :class:`meshauth.ServiceAuth` for ``httpx``: a
service token per call, audience by name, host mapping or callable, one retry
after a ``401`` that a new token cures, and a log line saying what to fix for
one it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ._challenge import read_challenge, warn_refused
from ._exceptions import ConfigurationError
from ._httpx import audience_of_host, normalize_scope, split_audience
from ._identity import ServiceIdentity
from ._principal import Principal
from ._txn import TXN_TOKEN_HEADER

try:
    import requests
    from requests.auth import AuthBase
    from requests.hooks import default_hooks
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("meshauth.requests needs the 'requests' extra: pip install 'meshauth[requests]'") from exc

__all__ = ["ServiceAuth"]

RequestsAudience = str | Mapping[str, str] | Callable[[requests.PreparedRequest], str]


class ServiceAuth(AuthBase):
    """Authenticate outgoing ``requests`` calls as a service of the mesh.

    >>> import requests
    >>> from meshauth.testing import Mesh
    >>> from meshauth.requests import ServiceAuth
    >>> mesh = Mesh(["orders", "payments"])
    >>> session = requests.Session()
    >>> session.auth = ServiceAuth(mesh.identity("orders"), audience="payments")

    ``audience``: a service name, a mapping from host (``"host:port"`` tried
    first) to service name, or a callable taking the ``PreparedRequest``; an
    unknown host raises :class:`~meshauth.ConfigurationError`
    (``unknown_audience``) before anything is sent. A ``401`` with
    ``error="invalid_token"`` and a reason a new token cures (``expired``,
    ``unknown_kid``, ``key_expired``, ``replayed``, ``bad_signature``) is
    retried once with a new token when the body can be sent again; any other
    reason is logged on the ``meshauth`` logger with the realm that answered
    and the audience used. ``on_behalf_of`` (the inbound request's
    :class:`~meshauth.Principal`) forwards the principal's Txn-Token unchanged
    and binds each call's token to it (``tth``).
    """

    def __init__(
        self,
        identity: ServiceIdentity,
        audience: RequestsAudience,
        *,
        scope: str | None = None,
        fresh_tokens: bool = False,
        on_behalf_of: Principal | None = None,
    ) -> None:
        if not isinstance(identity, ServiceIdentity):
            raise TypeError("identity must be a meshauth.ServiceIdentity")
        self.identity = identity
        self.scope = normalize_scope(scope)
        self.on_behalf_of = on_behalf_of
        self.fresh_tokens = bool(fresh_tokens)
        self._audience, self._hosts, self._audience_of = split_audience(audience)

    def audience_for(self, request: requests.PreparedRequest) -> str:
        """The service name ``request`` is meant for (``unknown_audience`` if none)."""
        if self._audience is not None:
            return self._audience
        if self._hosts is not None:
            url = urlsplit(request.url or "")
            return audience_of_host(self._hosts, url.scheme, url.hostname or "", url.port)
        assert self._audience_of is not None
        audience = self._audience_of(request)
        if not isinstance(audience, str) or not audience:
            raise ConfigurationError(
                "the audience callable returned no service name", reason="unknown_audience", expected="a non-empty str"
            )
        return audience

    def _token(self, audience: str, *, renew: str | None = None) -> str:
        txn_token = None if self.on_behalf_of is None else self.on_behalf_of.txn_token
        if self.fresh_tokens:
            return self.identity.mint(audience, scope=self.scope, txn_token=txn_token)
        if renew is not None and self.identity.token_for(audience, scope=self.scope, txn_token=txn_token) == renew:
            # Drop the cached token only if it is still the rejected one (another call may have renewed it).
            self.identity.invalidate(audience)
        return self.identity.token_for(audience, scope=self.scope, txn_token=txn_token)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        audience = self.audience_for(request)
        request.headers["Authorization"] = "Bearer " + self._token(audience)
        txn_token = getattr(self.on_behalf_of, "txn_token", None)
        if isinstance(txn_token, str) and txn_token:
            request.headers[TXN_TOKEN_HEADER] = txn_token
        request.register_hook("response", self._after)  # type: ignore[no-untyped-call]
        return request

    def _after(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """Response hook: retry once after a 401 a new token cures."""
        request = response.request
        if response.status_code != 401 or request is None:
            return response
        audience = self.audience_for(request)
        challenge = read_challenge([response.headers.get("WWW-Authenticate", "")])
        if not challenge.curable:
            if challenge.invalid_token:
                target = urlsplit(request.url or "").netloc.rpartition("@")[2]
                warn_refused(challenge, caller=self.identity.name, audience=audience, target=target)
            return response
        if not isinstance(request.body, bytes | str | None):
            return response  # a streamed or file body may be consumed: never sent twice
        rejected = str(request.headers.get("Authorization", "")).removeprefix("Bearer ")
        retry = request.copy()
        retry.hooks = default_hooks()  # the retry's own 401 comes back as it is
        retry.headers["Authorization"] = "Bearer " + self._token(audience, renew=rejected)
        response.content  # noqa: B018 - read the body so the connection returns to the pool
        response.close()
        second: requests.Response = response.connection.send(retry, **kwargs)
        second.history.append(response)
        second.request = retry
        return second
