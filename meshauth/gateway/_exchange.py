"""What each step of a proxied request established, and the request's audit record.

Each step of :class:`~meshauth.gateway.Gateway` returns a frozen value (the
request, the verified token, the admission with its delegated token, the
result); the one ``gateway.request`` audit record is built from them at the
end, once, by :meth:`AuditRecord.of`. Nothing is filled in by side effects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any, Final

from .._exceptions import MeshAuthError
from .._idp_tokens import UserPrincipal
from .._policy import Decision, Policy
from .._principal import Principal
from .._telemetry import audit
from ._tracing import RequestTrace

__all__ = ["AUDIT_EVENT", "Admission", "AuditRecord", "Request", "Result", "SentTracker", "Verified"]

AUDIT_EVENT: Final = "gateway.request"
_MAX_AUDIT_PATH: Final = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """The request as it arrived: method, raw path, client address and trace."""

    method: str
    path: str
    client: str | None
    trace: RequestTrace
    started: float = dataclasses.field(default_factory=perf_counter)


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """The verified token: an end user's (``user``) or a meshauth service's (``service``)."""

    user: UserPrincipal | None = None
    service: Principal | None = None

    @property
    def subject(self) -> str:
        return self.user.subject if self.user is not None else self.service.subject if self.service else ""

    @property
    def scopes(self) -> frozenset[str]:
        return self.user.scopes if self.user is not None else self.service.scopes if self.service else frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """The request may pass: the gateway's service token for the upstream and the Txn-Token it is bound to."""

    delegated: str = dataclasses.field(repr=False)
    user_token: str | None = dataclasses.field(repr=False)
    txn_token: str | None = dataclasses.field(repr=False)
    transaction: str | None = None
    txn_issuer: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """How the request ended: the status sent and the audit outcome, reason and detail."""

    status: int
    outcome: str
    reason: str
    detail: str | None = None
    span_id: str | None = None
    """The upstream call's span, when an OpenTelemetry SDK records it."""


class SentTracker:
    """Wraps ``send`` to know whether the response has started (then no error reply can follow)."""

    __slots__ = ("_send", "started")

    def __init__(self, send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRecord:
    """The one ``gateway.request`` record of a request (DESIGN section 6 fields)."""

    outcome: str
    reason: str
    status: int
    method: str
    path: str
    client: str | None
    trace_id: str | None
    span_id: str | None
    duration_ms: float
    route: str | None = None
    audience: str | None = None
    caller: str | None = None
    issuer: str | None = None
    subject: str | None = None
    transaction: str | None = None
    txn_issuer: str | None = None
    kid: str | None = None
    jti: str | None = None
    detail: str | None = None
    rule: str | int | None = None
    """The policy rule that allowed the request (its name, else its index)."""
    policy_sha256: str | None = None
    """The digest of the route policy that judged the request (``meshauth.Policy.sha256``)."""

    @classmethod
    def of(
        cls,
        request: Request,
        result: Result,
        *,
        route: str | None = None,
        audience: str | None = None,
        verified: Verified | None = None,
        admission: Admission | None = None,
        error: MeshAuthError | None = None,
        decision: Decision | None = None,
        policy: Policy | None = None,
    ) -> AuditRecord:
        """The record from what the steps returned; the refusal, if any, adds what it knew (kid, issuer)."""
        user = verified.user if verified is not None else None
        service = verified.service if verified is not None else None
        principal: UserPrincipal | Principal | None = user or service
        return cls(
            outcome=result.outcome,
            reason=result.reason,
            status=result.status,
            method=request.method,
            path=request.path[:_MAX_AUDIT_PATH],
            client=request.client,
            trace_id=request.trace.trace_id,
            span_id=result.span_id or request.trace.hop_id,
            duration_ms=round((perf_counter() - request.started) * 1000, 3),
            route=route,
            audience=audience,
            caller=service.caller if service is not None else error.caller if error is not None else None,
            issuer=user.issuer if user is not None else error.issuer if error is not None else None,
            subject=principal.subject if principal is not None else None,
            transaction=admission.transaction if admission is not None else None,
            txn_issuer=admission.txn_issuer if admission is not None else None,
            kid=principal.kid if principal is not None else (error.kid[:256] if error and error.kid else None),
            jti=principal.token_id if principal is not None else None,
            detail=result.detail,
            rule=decision.rule_label if decision is not None and decision.allowed else None,
            policy_sha256=policy.sha256 if policy is not None else None,
        )

    def write(self) -> None:
        """Write the record to the ``meshauth.audit`` logger."""
        fields: dict[str, Any] = {
            "caller": self.caller,
            "subject": self.subject,
            "transaction": self.transaction,
            "txn_issuer": self.txn_issuer,
            "audience": self.audience,
            "kid": self.kid,
            "jti": self.jti,
            "method": self.method,
            "path": self.path,
            "client": self.client,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "status": self.status,
            "route": self.route,
            "duration_ms": self.duration_ms,
        }
        if self.issuer is not None:
            fields["issuer"] = self.issuer
        if self.detail is not None:
            fields["detail"] = self.detail
        if self.rule is not None:
            fields["rule"] = self.rule
        if self.policy_sha256 is not None:
            fields["policy_sha256"] = self.policy_sha256
        audit(AUDIT_EVENT, self.outcome, self.reason, **fields)
