"""Outbound authentication for services on ``requests`` (``pip install 'meshauth[requests]'``).

The same behaviour as :class:`meshauth.ServiceAuth` for ``httpx``: a
service token per call, audience by name, host mapping or callable, one retry
after a ``401`` that a new token cures, and a log line saying what to fix for
one it does not.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ._challenge import read_challenge, warn_refused
from ._exceptions import BodyMismatch, ConfigurationError
from ._httpx import audience_of_host, normalize_scope, response_verifier, split_audience
from ._identity import ServiceIdentity
from ._mutual import NONCE_HEADER, RESPONSE_HEADER, ResponseVerifier, new_nonce
from ._principal import Principal
from ._registry import KeySource
from ._response_body import check_digest, require_binding
from ._txn import TXN_TOKEN_HEADER

try:
    import requests
    import urllib3
    from requests.auth import AuthBase
    from requests.hooks import default_hooks
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("meshauth.requests needs the 'requests' extra: pip install 'meshauth[requests]'") from exc

__all__ = ["ServiceAuth"]

RequestsAudience = str | Mapping[str, str] | Callable[[requests.PreparedRequest], str]
# A bound body is at most the callee's sign_body_limit (1 MiB by default); anything far beyond
# is not what was signed, and is not buffered to find that out.
MAX_BOUND_BODY = 64 * 1024 * 1024


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

    ``verify_responses`` (a key source or a :class:`~meshauth.ResponseVerifier`)
    turns on mutual authentication as for ``httpx``: each attempt sends a new
    ``Meshauth-Nonce``, and the answer must carry a response token from the
    audience for that nonce and the status received, binding the body bytes
    as sent (``BodyMismatch``, ``UnboundBody`` unless
    ``allow_unbound_body=True``); the error is raised from the call and the
    unauthenticated response is never handed out.
    """

    def __init__(
        self,
        identity: ServiceIdentity,
        audience: RequestsAudience,
        *,
        scope: str | None = None,
        fresh_tokens: bool = False,
        on_behalf_of: Principal | None = None,
        verify_responses: KeySource | ResponseVerifier | None = None,
        allow_unbound_body: bool = False,
    ) -> None:
        if not isinstance(identity, ServiceIdentity):
            raise TypeError("identity must be a meshauth.ServiceIdentity")
        self.identity = identity
        self.response_verifier = response_verifier(
            identity, verify_responses, clock=identity.clock, tracer_provider=None, meter_provider=None
        )
        self.allow_unbound_body = allow_unbound_body
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
        if self.response_verifier is not None:
            request.headers[NONCE_HEADER] = new_nonce()
        request.register_hook("response", self._after)  # type: ignore[no-untyped-call]
        return request

    def _after(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """Response hook: retry once after a 401 a new token cures; then check the answer's proof."""
        answer = self._retried(response, **kwargs)
        if self.response_verifier is not None:
            try:
                self._check(answer)
            except BaseException:
                answer.close()  # an unauthenticated answer is never handed out, not even its body
                raise
        return answer

    def _check(self, response: requests.Response) -> None:
        assert self.response_verifier is not None
        assert response.request is not None
        service = self.audience_for(response.request)
        proof = self.response_verifier.verify_response(
            response.headers.get(RESPONSE_HEADER),
            service=service,
            nonce=str(response.request.headers.get(NONCE_HEADER, "")),
            status=response.status_code,
        )
        digest = require_binding(proof, service, allow_unbound=self.allow_unbound_body)
        if digest is not None:
            _check_body(response, digest, service)

    def _retried(self, response: requests.Response, **kwargs: Any) -> requests.Response:
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
        if self.response_verifier is not None:
            retry.headers[NONCE_HEADER] = new_nonce()  # the first attempt's answer must not pass for this one
        response.content  # noqa: B018 - read the body so the connection returns to the pool
        response.close()
        second: requests.Response = response.connection.send(retry, **kwargs)
        second.history.append(response)
        second.request = retry
        return second


def _check_body(response: requests.Response, digest: str, service: str) -> None:
    """Hash the body bytes as sent (before any content decoding), then let requests read them as usual."""
    raw = response.raw
    # requests marks a body it has read in _content_consumed (not in its type stubs).
    if getattr(response, "_content_consumed", False) or not isinstance(raw, urllib3.HTTPResponse):
        check_digest(digest, hashlib.sha256(response.content).digest(), service)
        return
    received, size, hashed = [], 0, hashlib.sha256()
    try:
        for chunk in raw.stream(65536, decode_content=False):
            size += len(chunk)
            if size > MAX_BOUND_BODY:
                raise BodyMismatch(
                    f"the body from {service!r} grows past {MAX_BOUND_BODY} bytes: not the body that was signed",
                    expected=f"<= {MAX_BOUND_BODY} bytes",
                    actual="more",
                )
            hashed.update(chunk)
            received.append(chunk)
    # The exceptions requests raises when it reads a body itself (Response.iter_content).
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    check_digest(digest, hashed.digest(), service)
    # The verified bytes replace the consumed stream; requests decodes them (gzip, ...) as it would have.
    response.raw = urllib3.HTTPResponse(
        body=io.BytesIO(b"".join(received)),
        headers=raw.headers,
        status=raw.status,
        preload_content=False,
        decode_content=True,
    )
