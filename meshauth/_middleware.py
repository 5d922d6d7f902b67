"""Request authentication shared by the ASGI and WSGI middleware (no framework imports).

Both middleware classes run the same steps on every request that is not
excluded, in this order, and call the app only when all of them pass:

1. credentials: exactly one ``Authorization`` header, scheme ``Bearer``
   (case-insensitive), one space, a token68 token, within the size limit;
2. the token: :meth:`Verifier.verify` / :meth:`Verifier.averify`;
3. the ``Meshauth-Nonce`` header, when mutual authentication is on;
0. the path: the raw path must already be canonical (:func:`meshauth.canonical_path`),
   so the policy judges exactly the path the app routes; else ``400 bad_path``;
4. the policy: :meth:`Policy.decide` on that path.

A failure becomes a small JSON response (see :func:`default_reply`, or the
``on_error`` hook) and one audit record; so does a success. This module holds
the framework-free parts: header parsing, path recovery, the error replies, the
``meshauth.authorize`` span and the audit record.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import http
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span

from ._exceptions import (
    AccessDenied,
    BadPath,
    DuplicateAuthorization,
    InvalidNonce,
    MalformedToken,
    MeshAuthError,
    MissingCredentials,
    TokenError,
    TokenTooLarge,
    Unavailable,
    WrongScheme,
)
from ._identity import ServiceIdentity
from ._jws import token_too_large
from ._paths import PATH_SAFE as _PATH_SAFE
from ._paths import decoded_path, routed_path
from ._policy import WEBSOCKET, Decision, Policy
from ._principal import Principal
from ._registry import KeySet
from ._telemetry import AUDIT_LOGGER, audit, mark_rejected
from ._verify import Verifier

__all__ = [
    "DUPLICATE_AUTHORIZATION",
    "INVALID_NONCE",
    "MISSING_CREDENTIALS",
    "PRINCIPAL_KEY",
    "WRONG_SCHEME",
    "ErrorHook",
    "Refusal",
    "Reply",
    "RequestGuard",
    "Requirement",
    "asgi_judged_path",
    "asgi_method",
    "asgi_raw_path",
    "default_reply",
    "quoted_string",
    "wsgi_judged_path",
    "wsgi_raw_path",
]

PRINCIPAL_KEY: Final = "meshauth.principal"

# Reason codes the middleware adds to the verifier's (all appear as
# ``error_description`` or in the JSON body and the audit record).
MISSING_CREDENTIALS: Final = "missing_credentials"
WRONG_SCHEME: Final = "wrong_scheme"
DUPLICATE_AUTHORIZATION: Final = "duplicate_authorization"
INVALID_NONCE: Final = "invalid_nonce"
INSUFFICIENT_SCOPE: Final = "insufficient_scope"
INTERNAL_ERROR: Final = "internal_error"

_BEARER_PREFIX_LEN: Final = len("Bearer ")
# RFC 7235 token68; the verifier applies the stricter JWS syntax afterwards.
_TOKEN68: Final = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_MAX_NONCE: Final = 256
_MAX_AUDIT_PATH: Final = 1024

logger = logging.getLogger("meshauth")
# Start-up advice about the configuration (policy names, missing policy), apart from per-request logs.
setup_logger = logging.getLogger("meshauth.setup")

ErrorHook = Callable[[BaseException], "tuple[int, Sequence[tuple[str, str]], bytes] | None"]
"""``on_error(exc) -> (status, headers, body) | None``: replace the default error reply; None keeps it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """An error response the middleware sends instead of calling the app."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status_line(self) -> str:
        """The WSGI status string, e.g. ``"401 Unauthorized"``."""
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        return f"{self.status} {phrase}"

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]


def quoted_string(text: str) -> str:
    """``text`` as an RFC 9110 quoted-string; characters a header cannot carry become ``?``."""
    printable = "".join(c if c == "\t" or " " <= c <= "~" else "?" for c in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _json_body(error: str, reason: str) -> bytes:
    return json.dumps({"error": error, "reason": reason}, separators=(",", ":")).encode("ascii")


def default_reply(exc: BaseException, realm: str, *, retry_after: int = 5) -> Reply:
    """The response meshauth sends for a failed request (DESIGN section 5).

    ===========================  ======  =========================================================
    failure                      status  ``WWW-Authenticate``
    ===========================  ======  =========================================================
    no credentials               401     ``Bearer realm="svc"``
    bad header or token          401     ``Bearer realm="svc", error="invalid_token", ...``
    invalid ``Meshauth-Nonce``   400     none
    non-canonical path           400     none (reason ``bad_path``)
    policy: scopes missing       403     ``Bearer realm="svc", error="insufficient_scope"``
    policy: other denial         403     none
    registry unreadable          503     none (``Retry-After`` instead)
    anything else                500     none
    ===========================  ======  =========================================================

    The body is ``{"error": ..., "reason": ...}``; it never echoes the token.
    """
    # The status and error code come from the error's class (MeshAuthError.status
    # and .error): one table for the middlewares and the gateway.
    if not isinstance(exc, MeshAuthError):
        status, error = 500, "server_error"
    else:
        status, error = exc.status, exc.error
    headers: list[tuple[str, str]] = []
    quoted_realm = quoted_string(realm)
    if isinstance(exc, MissingCredentials):
        headers.append(("WWW-Authenticate", f"Bearer realm={quoted_realm}"))
    elif isinstance(exc, TokenError):
        description = quoted_string(exc.reason)
        headers.append(
            ("WWW-Authenticate", f'Bearer realm={quoted_realm}, error="invalid_token", error_description={description}')
        )
    elif isinstance(exc, Unavailable):
        headers.append(("Retry-After", str(retry_after)))
    elif isinstance(exc, AccessDenied) and exc.reason == INSUFFICIENT_SCOPE:
        error = INSUFFICIENT_SCOPE
        headers.append(("WWW-Authenticate", f'Bearer realm={quoted_realm}, error="insufficient_scope"'))
    reason = exc.reason if isinstance(exc, MeshAuthError) else INTERNAL_ERROR
    body = _json_body(error, reason)
    headers += [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    return Reply(status, tuple(headers), body)


def credentials_error(value: bytes, limit: int, *, folded: bool = False) -> TokenError:
    """Why an ``Authorization`` value is not ``Bearer <token68>``; never quotes the value.

    ``folded`` marks a WSGI value, where servers join repeated headers with commas.
    """
    if len(value) > limit:
        return TokenTooLarge(
            "the Authorization header exceeds the size limit", expected=f"<= {limit} bytes", actual=len(value)
        )
    if folded and b"," in value:
        return DuplicateAuthorization("more than one Authorization header", expected=1)
    if not value.isascii():
        return MalformedToken("the Authorization header is not ASCII")
    scheme, _, credentials = value.partition(b" ")
    if scheme.lower() != b"bearer":
        # The scheme is not quoted back: a bare token would land in logs.
        return WrongScheme("the Authorization scheme is not Bearer", expected="Bearer")
    if not credentials.strip():
        return MalformedToken("the bearer token is empty")
    if _TOKEN68.fullmatch(credentials) is None:
        return MalformedToken("the bearer token is not token68 syntax", expected="Bearer <token68>")
    return MalformedToken("the Authorization header is malformed", expected="Bearer <token68>")


def txn_token_value(value: bytes | None, *, repeated: bool, limit: int) -> str | None:
    """A request's ``Txn-Token`` header: sent at most once, one ASCII compact JWS within ``limit`` bytes.

    Two headers (or two values folded with a comma) are ``malformed``; the
    token itself is checked by the verifier.
    """
    if value is None and not repeated:
        return None
    if repeated or value is None or b"," in value:
        raise MalformedToken("the Txn-Token header must be sent exactly once", expected="1 header", actual="several")
    value = value.strip()
    if len(value) > limit:
        raise token_too_large(len(value), limit)
    if not value or not value.isascii() or b" " in value:
        raise MalformedToken("the Txn-Token header is not one compact JWS")
    return value.decode("ascii")


def wsgi_raw_path(environ: Mapping[str, Any]) -> str:
    """The still-encoded request path of a WSGI request (query included if present).

    ``REQUEST_URI`` (set by uWSGI, gunicorn and others) is used when present;
    otherwise ``SCRIPT_NAME + PATH_INFO`` is re-encoded from the PEP 3333
    latin-1 "bytes as str" form, so the policy decodes exactly what the app routes.
    """
    uri = environ.get("REQUEST_URI")
    if isinstance(uri, str) and uri:
        if uri[0] != "/" and "://" in uri[:16]:
            # absolute-form request target (RFC 9112 section 3.2.2)
            parts = urlsplit(uri)
            return (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return uri
    script = environ.get("SCRIPT_NAME", "")
    info = environ.get("PATH_INFO", "")
    decoded = (script if isinstance(script, str) else "") + (info if isinstance(info, str) else "")
    try:
        raw = decoded.encode("latin-1")
    except UnicodeEncodeError:
        # Not PEP 3333 form: encode as UTF-8 so the policy still sees every byte.
        raw = decoded.encode("utf-8", "surrogateescape")
    return quote(raw, safe=_PATH_SAFE) or "/"


def _without_query(target: str) -> str:
    query = target.find("?")
    return target if query < 0 else target[:query]


def _agree(raw: str, decoded: str) -> None:
    """Refuse a raw target that does not decode to the path the app will route."""
    if unquote(raw, errors="surrogateescape") != decoded:
        raise BadPath(
            "the raw request target and the decoded path the app routes disagree",
            expected=raw[:80],
            actual=decoded[:80],
        )


def asgi_judged_path(scope: Mapping[str, Any]) -> str:
    """The path an ASGI app will route, in canonical form; :class:`BadPath` if it is not canonical.

    ``raw_path`` is judged when the server gives it (and must decode to
    ``path``), else ``path`` encoded again.
    """
    raw = scope.get("raw_path")
    path = scope.get("path", "")
    decoded = path if isinstance(path, str) else ""
    if isinstance(raw, bytes) and raw:
        # latin-1 keeps every byte; non-ASCII then makes the check refuse the path.
        target = _without_query(raw.decode("latin-1"))
        judged = routed_path(target)
        _agree(target, decoded)
        return judged
    return decoded_path(decoded or "/")


def wsgi_judged_path(environ: Mapping[str, Any], mount: str = "") -> str:
    """The path a WSGI app will route: ``mount + PATH_INFO``, canonical, or :class:`BadPath`.

    ``SCRIPT_NAME`` must equal ``mount``: some servers (gunicorn) take it from
    a request header, and an app routes on ``PATH_INFO`` alone, so a request
    could otherwise be judged on one path and routed on another. Where the
    server gives the raw target (``RAW_URI``, ``REQUEST_URI``), it must be
    canonical and decode to ``mount + PATH_INFO``.
    """
    script = environ.get("SCRIPT_NAME") or ""
    if script != mount:
        raise BadPath(
            f"SCRIPT_NAME {script[:80]!r} is not this middleware's mount {mount!r} "
            "(set mount= to where the app is mounted)",
            expected=mount,
            actual=script[:80],
        )
    info = environ.get("PATH_INFO") or ""
    decoded = _pep3333_text(mount + (info if isinstance(info, str) else "")) or "/"
    for name in ("RAW_URI", "REQUEST_URI"):
        target = environ.get(name)
        if isinstance(target, str) and target:
            if target[0] != "/" and "://" in target[:16]:
                target = urlsplit(target).path or "/"  # absolute-form (RFC 9112 section 3.2.2)
            target = _without_query(target)
            judged = routed_path(target)
            _agree(target, decoded)
            return judged
    return decoded_path(decoded)


def _pep3333_text(value: str) -> str:
    """A PEP 3333 "bytes as latin-1" string as the text the app sees (UTF-8)."""
    try:
        return value.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value  # already text (not PEP 3333 form)


def asgi_method(scope: Mapping[str, Any]) -> str:
    """The method the policy judges: a websocket handshake is ``WEBSOCKET``."""
    if scope["type"] == "websocket":
        return WEBSOCKET
    method = scope.get("method", "GET")
    return method if isinstance(method, str) else "GET"


def asgi_raw_path(scope: Mapping[str, Any]) -> str:
    """The still-encoded request path of an ASGI request (``raw_path``, else ``path`` re-encoded)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        # latin-1 keeps every byte; non-ASCII then makes the policy refuse the path.
        return raw.decode("latin-1")
    path = scope.get("path", "")
    text = path if isinstance(path, str) else ""
    return quote(text.encode("utf-8", "surrogateescape"), safe=_PATH_SAFE) or "/"


def _compile_exclude(patterns: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact: set[str] = set()
    prefixes: list[str] = []
    if isinstance(patterns, str):
        raise TypeError("exclude is an iterable of paths, not a single string")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise ValueError(f"exclude entries are paths starting with '/', found {pattern!r}")
        if pattern.endswith("/*"):
            stem = pattern[:-1]
            if "*" in stem:
                raise ValueError(f"only a trailing '/*' is supported in exclude, found {pattern!r}")
            prefixes.append(stem)
        elif "*" in pattern:
            raise ValueError(f"only a trailing '/*' is supported in exclude, found {pattern!r}")
        else:
            exact.add(pattern)
    return frozenset(exact), tuple(prefixes)


def _plain_suffix(rest: str) -> bool:
    """No dot-segment, backslash or NUL below an excluded prefix: no climbing out of it."""
    if "\\" in rest or "\x00" in rest:
        return False
    return not any(segment in (".", "..") for segment in rest.split("/"))


class RequestGuard:
    """The framework-free state and steps of one middleware instance."""

    __slots__ = (
        "_exact",
        "_judged",
        "_prefixes",
        "_replies",
        "audience",
        "identity",
        "limit",
        "on_error",
        "policy",
        "retry_after",
        "tracer",
        "verifier",
    )

    def __init__(
        self,
        verifier: Verifier,
        *,
        policy: Policy | None,
        exclude: Iterable[str],
        identity: ServiceIdentity | None,
        tracer_provider: trace.TracerProvider | None,
        on_error: ErrorHook | None,
        retry_after: int,
    ) -> None:
        if not isinstance(verifier, Verifier):
            raise TypeError("verifier must be a meshauth.Verifier")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError("policy must be a meshauth.Policy (see Policy.from_dict)")
        if identity is not None and not isinstance(identity, ServiceIdentity):
            raise TypeError("identity must be a meshauth.ServiceIdentity")
        if not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError("retry_after is a non-negative number of seconds")
        self.verifier = verifier
        self.policy = policy
        self.identity = identity
        self.on_error = on_error
        self.retry_after = retry_after
        self.audience = verifier.audience
        self.limit = verifier.max_token_bytes + _BEARER_PREFIX_LEN
        self._exact, self._prefixes = _compile_exclude(exclude)
        self._judged: dict[tuple[object, ...], str] = {}
        if policy is not None:
            _warn_unknown_callers(policy, verifier)
        elif verifier.txn_issuers:
            # Without a policy nothing checks which callers may act inside a user's transaction.
            setup_logger.warning(
                "meshauth middleware for %r accepts requests inside users' transactions (Txn-Tokens from %s) but "
                "has no policy: any service in the registry that holds a forwarded Txn-Token may act in it here; "
                "pass policy= with 'delegators', or Verifier(txn_issuers=()) if this service takes no such calls",
                verifier.audience,
                sorted(verifier.txn_issuers),
            )
        self.tracer = (
            trace.get_tracer("meshauth", "0.1.0", tracer_provider=tracer_provider)
            if tracer_provider is not None
            else verifier.telemetry.tracer
        )
        # Default replies per reason, built on first use (the set of reasons is small and fixed).
        self._replies: dict[tuple[type[BaseException], str], Reply] = {}

    # -- request steps -------------------------------------------------------------

    def asgi_path(self, scope: Mapping[str, Any]) -> str:
        """:func:`asgi_judged_path`, remembered per (raw_path, path): judging costs more than the lookup."""
        key = (scope.get("raw_path"), scope.get("path"))
        judged = self._judged.get(key)
        if judged is None:
            judged = asgi_judged_path(scope)  # raises BadPath; refusals are not remembered
            _remember_path(self._judged, key, judged)
        return judged

    def wsgi_path(self, environ: Mapping[str, Any], mount: str) -> str:
        """:func:`wsgi_judged_path`, remembered per (SCRIPT_NAME, PATH_INFO, raw target)."""
        key = (environ.get("SCRIPT_NAME"), environ.get("PATH_INFO"), environ.get("RAW_URI"), environ.get("REQUEST_URI"))
        judged = self._judged.get(key)
        if judged is None:
            judged = wsgi_judged_path(environ, mount)
            _remember_path(self._judged, key, judged)
        return judged

    @property
    def has_exclusions(self) -> bool:
        """True if some paths skip authentication."""
        return bool(self._exact or self._prefixes)

    def excluded(self, path: str) -> bool:
        """True if ``path`` (as the app routes it) skips authentication."""
        if path in self._exact:
            return True
        prefixes = self._prefixes
        if prefixes and path.startswith(prefixes):
            for prefix in prefixes:
                if path.startswith(prefix) and _plain_suffix(path[len(prefix) :]):
                    return True
        return False

    def bearer(self, value: bytes, *, folded: bool = False) -> str:
        """The token of an ``Authorization`` value; raises a TokenError naming what is wrong."""
        # The full token68 check is left to the verifier, whose compact-JWS
        # syntax check is stricter and runs on every token it has not seen:
        # a cached token skips a second scan of a few hundred bytes.
        if len(value) <= self.limit and value[:_BEARER_PREFIX_LEN].lower() == b"bearer ":
            token = value[_BEARER_PREFIX_LEN:]
            if token and token.isascii() and b" " not in token and not (folded and b"," in token):
                return token.decode("ascii")
        raise credentials_error(value, self.limit, folded=folded)

    def read_nonce(self, value: bytes | None, repeated: bool) -> tuple[str | None, MeshAuthError | None]:
        """The request's nonce (None without one), or the error a bad one gets, to raise later."""
        if value is None:
            return None, None
        try:
            return self.nonce(value, repeated=repeated), None
        except MeshAuthError as exc:
            return None, exc

    @staticmethod
    def nonce(value: bytes, *, repeated: bool = False) -> str:
        """A validated ``Meshauth-Nonce``: 1 to 256 token68 characters, sent once."""
        if repeated or len(value) > _MAX_NONCE or _TOKEN68.fullmatch(value) is None:
            raise InvalidNonce("the Meshauth-Nonce header must be sent once, as 1 to 256 base64url/token68 characters")
        return value.decode("ascii")

    def txn_token(self, value: bytes | None, *, repeated: bool = False) -> str | None:
        """The request's ``Txn-Token`` header, if any (see :func:`txn_token_value`)."""
        return txn_token_value(value, repeated=repeated, limit=self.verifier.max_token_bytes)

    def authorize(
        self, policy: Policy, principal: Principal, method: str, raw_path: str
    ) -> tuple[Decision, AccessDenied | None, Span]:
        """Ask the policy, inside a ``meshauth.authorize`` span; the error is None when allowed."""
        span = self.tracer.start_span("meshauth.authorize")
        decision = policy.decide(principal, method, raw_path)
        denied: AccessDenied | None = None
        if not decision.allowed:
            denied = AccessDenied(decision.detail, reason=decision.reason)
        if span.is_recording():
            span.set_attribute("meshauth.caller", principal.caller)
            span.set_attribute("meshauth.subject", principal.subject)
            if principal.transaction is not None:
                span.set_attribute("meshauth.transaction", principal.transaction)
                span.set_attribute("meshauth.txn_issuer", principal.txn_issuer or "")
            if denied is None:
                span.set_attribute("meshauth.outcome", "accepted")
                span.set_attribute(
                    "meshauth.reason",
                    decision.reason if decision.would_allow else f"audit_would_deny:{decision.reason}",
                )
        if denied is not None:
            mark_rejected(span, denied, denied.reason, outcome="denied")
        span.end()
        return decision, denied, span

    # -- replies -------------------------------------------------------------------

    def reply(self, exc: BaseException) -> Reply:
        """The response for a failed request: the ``on_error`` hook's, else the default."""
        if not isinstance(exc, MeshAuthError):
            # Only the type: an unexpected exception's message could quote request data.
            logger.error("meshauth middleware failed while checking a request (%s)", type(exc).__name__)
        if self.on_error is not None:
            try:
                custom = self.on_error(exc)
                if custom is not None:
                    status, headers, body = custom
                    return Reply(int(status), tuple((str(k), str(v)) for k, v in headers), bytes(body))
            except Exception as hook_error:
                # A broken hook must not turn a refusal into a crash: use the default.
                logger.warning(
                    "meshauth on_error hook failed (%s); sending the default reply", type(hook_error).__name__
                )
        key = (type(exc), exc.reason if isinstance(exc, MeshAuthError) else "")
        cached = self._replies.get(key)
        if cached is None:
            cached = default_reply(exc, self.audience, retry_after=self.retry_after)
            if len(self._replies) < 64:
                self._replies[key] = cached
        return cached

    # -- audit ---------------------------------------------------------------------

    def audit_accepted(
        self,
        principal: Principal,
        decision: Decision | None,
        span: Span | None,
        *,
        method: str,
        path: str,
        client: str | None,
        traceparent: str | None = None,
    ) -> None:
        """One ``request`` audit record for a request handed to the app."""
        if not AUDIT_LOGGER.isEnabledFor(logging.INFO):
            return
        extra: dict[str, Any] = {}
        if decision is None:
            reason = "ok"
        elif decision.would_allow:
            reason = decision.reason
            extra["rule"] = decision.rule_label
        else:
            reason = f"audit_would_deny:{decision.reason}"
            extra["would_deny"] = True
        if self.policy is not None:
            extra["policy_sha256"] = self.policy.sha256
        audit(
            "request",
            "accepted",
            reason,
            span=span,
            caller=principal.caller,
            subject=principal.subject,
            transaction=principal.transaction,
            txn_issuer=principal.txn_issuer,
            audience=self.audience,
            kid=principal.kid,
            jti=principal.token_id,
            method=method,
            path=_audit_path(path),
            client=client,
            traceparent=traceparent,
            **extra,
        )

    def audit_refused(
        self,
        exc: BaseException,
        reply: Reply,
        *,
        principal: Principal | None,
        span: Span | None,
        method: str,
        path: str,
        client: str | None,
        traceparent: str | None = None,
    ) -> None:
        """One ``request`` audit record for a refused request (``rejected`` or ``denied``)."""
        if not AUDIT_LOGGER.isEnabledFor(logging.INFO):
            return
        if isinstance(exc, MeshAuthError):
            reason, detail = exc.reason, exc.detail
            kid = exc.kid[:256] if exc.kid else None
        else:
            reason, detail, kid = INTERNAL_ERROR, type(exc).__name__, None
        fields: dict[str, Any] = {"audience": self.audience, "kid": kid, "status": reply.status, "detail": detail}
        if principal is not None:
            fields.update(
                caller=principal.caller,
                subject=principal.subject,
                transaction=principal.transaction,
                txn_issuer=principal.txn_issuer,
                kid=principal.kid,
                jti=principal.token_id,
            )
        else:
            caller = getattr(exc, "caller", None)
            if isinstance(caller, str):
                fields["caller"] = caller
        if self.policy is not None:
            fields["policy_sha256"] = self.policy.sha256
        outcome = "denied" if isinstance(exc, AccessDenied) else "rejected"
        audit(
            "request",
            outcome,
            reason,
            span=span,
            method=method,
            path=_audit_path(path),
            client=client,
            traceparent=traceparent,
            **fields,
        )


_JUDGED_PATHS: Final = 1024
_JUDGED_KEY_CHARS: Final = 512


def _remember_path(cache: dict[tuple[object, ...], str], key: tuple[object, ...], judged: str) -> None:
    """A small bounded cache: cleared when full (no iteration over a dict other threads write to)."""
    if len(judged) > _JUDGED_KEY_CHARS:
        return  # long unique paths would pin memory for nothing
    if len(cache) >= _JUDGED_PATHS:
        cache.clear()
    cache[key] = judged


def _warn_unknown_callers(policy: Policy, verifier: Verifier) -> None:
    """Log, at start-up, callers the policy names that own no key in an already loaded registry."""
    keys: object = verifier.keys
    try:
        # StaticKeys, JWKSFile and JWKSEndpoint show their current snapshot; a registry not
        # loaded yet is not fetched for this (``meshauth doctor`` checks names against any registry).
        snapshot = keys if isinstance(keys, KeySet) else getattr(keys, "keyset", None)
    except Exception:  # an unreadable registry is reported when it is used, not here
        return
    if isinstance(snapshot, KeySet):
        for problem in policy.unknown_callers(record.owner for record in snapshot):
            setup_logger.warning("meshauth policy %s: %s", policy.source, problem)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a route-level requirement refused a request (for the framework helpers)."""

    status: int
    error: str
    reason: str
    www_authenticate: str | None

    @property
    def body(self) -> dict[str, str]:
        return {"error": self.error, "reason": self.reason}


@dataclasses.dataclass(frozen=True, slots=True)
class Requirement:
    """Route-level checks on an already authenticated principal: caller globs and scopes."""

    callers: tuple[str, ...] | None = None
    scopes: frozenset[str] = frozenset()

    @classmethod
    def build(cls, callers: Iterable[str] | None, scopes: Iterable[str] | None) -> Requirement:
        if isinstance(callers, str) or isinstance(scopes, str):
            raise TypeError("callers and scopes are lists of strings, not a single string")
        caller_list = None if callers is None else tuple(callers)
        if caller_list is not None and not all(isinstance(c, str) and c for c in caller_list):
            raise ValueError("callers are non-empty service names or globs")
        scope_set = frozenset(scopes or ())
        if not all(isinstance(s, str) and s and " " not in s for s in scope_set):
            raise ValueError("scopes are non-empty strings without spaces")
        return cls(caller_list, scope_set)

    def refusal(self, principal: object, realm: str | None) -> Refusal | None:
        """None if ``principal`` meets the requirement, else the 401/403 to send."""
        prefix = f"Bearer realm={quoted_string(realm)}" if realm else "Bearer"
        if not isinstance(principal, Principal):
            return Refusal(MissingCredentials.status, MissingCredentials.error, MissingCredentials.reason, prefix)
        if self.callers is not None and not any(fnmatch.fnmatchcase(principal.caller, c) for c in self.callers):
            return Refusal(AccessDenied.status, AccessDenied.error, "caller_not_allowed", None)
        if not self.scopes <= principal.scopes:
            needed = quoted_string(" ".join(sorted(self.scopes)))
            separator = ", " if realm else " "
            return Refusal(
                AccessDenied.status,
                INSUFFICIENT_SCOPE,
                INSUFFICIENT_SCOPE,
                f'{prefix}{separator}error="insufficient_scope", scope={needed}',
            )
        return None


def asgi_traceparent(scope: Mapping[str, Any]) -> str | None:
    """The request's ``traceparent`` header (read only when an audit record is written)."""
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            return bytes(value).decode("latin-1")
    return None


def _audit_path(raw_path: str) -> str:
    # The query is never logged: it may carry secrets (e.g. ?access_token=...).
    query = raw_path.find("?")
    if query >= 0:
        raw_path = raw_path[:query]
    return raw_path[:_MAX_AUDIT_PATH]
