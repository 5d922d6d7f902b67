"""Key rotation: the safe procedure, a planner and a registry checker.

A verifier accepts a token while the token's key is in its cached registry and
inside the key's ``nbf``/``exp`` window (plus leeway). Verifiers refresh their
copy at most every ``max_age`` seconds (the ``Cache-Control`` of the registry
endpoint, or the check interval of a registry file). Hence the procedure for a
service rotating from key A to key B:

1. **publish** B (optionally with ``nbf`` = the planned switch time);
2. **wait** at least ``max_age`` (every verifier now holds B), then **switch**
   the service to sign with B;
3. give A an ``exp`` of at least switch + ``max_token_lifetime`` + ``leeway``
   (tokens signed with A just before the switch stay valid to their end);
4. **remove** A once that ``exp`` (+ leeway) has passed.

Removing a key earlier is a revocation: every token it signed stops verifying
at once (which is what you want when the key leaked).

:func:`plan_rotation` computes these instants; :func:`check_registry` checks a
registry document against the invariants and reports :class:`Finding` values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ._exceptions import ConfigurationError
from ._keys import _PRIVATE_MEMBERS, check_jwk
from ._registry import parse_registry_document

__all__ = ["Finding", "RotationPlan", "check_registry", "plan_rotation"]

Severity = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a registry document.

    ``code`` is stable: ``invalid_registry``, ``invalid_key``,
    ``private_key_members``, ``duplicate_kid``, ``invalid_window``,
    ``no_valid_key``, ``key_expires_soon``, ``expires_too_early``,
    ``removed_too_early``, ``not_yet_published_long_enough``,
    ``expired_key``, ``unexpected_service``.
    """

    severity: Severity
    code: str
    service: str | None
    kid: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(
            part for part in (self.service and f"service={self.service}", self.kid and f"kid={self.kid}") if part
        )
        return f"{self.severity}: {self.code}{' ' + where if where else ''}: {self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class RotationPlan:
    """The instants (POSIX seconds) of one safe rotation from an old key to a new one."""

    publish_at: int
    """Add the new key to the registry (with ``nbf = sign_from``)."""
    sign_from: int
    """Switch the service to the new key: every verifier has it by then."""
    old_key_exp: int
    """Set this ``exp`` on the old key: its last tokens have expired by then."""
    remove_after: int
    """Remove the old key from the registry after this instant."""


def plan_rotation(
    *,
    now: float,
    max_token_lifetime: int = 900,
    leeway: int = 30,
    max_age: int = 300,
    margin: int = 60,
) -> RotationPlan:
    """Plan a rotation starting ``now``; ``margin`` pads each wait for slow refreshes and clock skew.

    >>> plan = plan_rotation(now=1_800_000_000, max_token_lifetime=900, leeway=30, max_age=300, margin=60)
    >>> plan.sign_from - plan.publish_at, plan.old_key_exp - plan.sign_from, plan.remove_after - plan.old_key_exp
    (360, 990, 90)
    """
    publish_at = math.ceil(now)
    sign_from = publish_at + max_age + margin
    old_key_exp = sign_from + max_token_lifetime + leeway + margin
    remove_after = old_key_exp + leeway + margin
    return RotationPlan(publish_at, sign_from, old_key_exp, remove_after)


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    service: str
    nbf: float
    exp: float


def _parse(document: Any, findings: list[Finding], label: str) -> list[_Key] | None:
    try:
        doc = parse_registry_document(document, label)
    except ConfigurationError as exc:
        findings.append(Finding("error", "invalid_registry", None, None, exc.detail))
        return None
    keys: list[_Key] = []
    seen: set[str] = set()
    for index, jwk in enumerate(doc["keys"]):
        where = f"{label}: keys[{index}]"
        if isinstance(jwk, Mapping):
            private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
            kid_value = jwk.get("kid")
            service_value = jwk.get("iss")
            kid_text = kid_value if isinstance(kid_value, str) else None
            service_text = service_value if isinstance(service_value, str) else None
            if private:
                findings.append(
                    Finding(
                        "error",
                        "private_key_members",
                        service_text,
                        kid_text,
                        f"{where} publishes private key members {private}: the key is compromised; "
                        "remove it and rotate the service to a new key now",
                    )
                )
                continue
        try:
            kid, _alg, service = check_jwk(jwk, where)
        except ConfigurationError as exc:
            findings.append(Finding("error", "invalid_key", None, None, exc.detail))
            continue
        if kid in seen:
            findings.append(Finding("error", "duplicate_kid", service, kid, f"{where}: kid appears more than once"))
            continue
        seen.add(kid)
        nbf = float(jwk["nbf"]) if "nbf" in jwk else -math.inf
        exp = float(jwk["exp"]) if "exp" in jwk else math.inf
        if exp <= nbf:
            findings.append(
                Finding("error", "invalid_window", service, kid, f"{where}: 'exp' is not after 'nbf': never valid")
            )
            continue
        keys.append(_Key(kid, service, nbf, exp))
    return keys


def _when(instant: float, now: float) -> str:
    if math.isinf(instant):
        return "never"
    delta = instant - now
    sign = "in " if delta >= 0 else ""
    suffix = "" if delta >= 0 else " ago"
    return f"{int(instant)} ({sign}{_span(abs(delta))}{suffix})"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def check_registry(
    document: Mapping[str, Any] | bytes | str,
    *,
    now: float,
    max_token_lifetime: int = 900,
    leeway: int = 30,
    max_age: int = 300,
    services: Iterable[str] | None = None,
    previous: Mapping[str, Any] | bytes | str | None = None,
    warn_within: float = 86400,
) -> list[Finding]:
    """Check a registry document against the rotation invariants at ``now``.

    ``max_token_lifetime`` and ``leeway`` are the verifiers' settings,
    ``max_age`` the longest time a verifier may keep an old copy of the
    registry. ``services`` names services that must have a key. ``previous``
    is the document currently published: with it, keys added or removed by
    this change are checked too (``not_yet_published_long_enough``,
    ``removed_too_early``). Findings are sorted, errors first.

    A key can sign from its ``nbf`` until ``exp - max_token_lifetime -
    leeway`` (a token signed later would outlive its key). For each service:

    * ``no_valid_key`` (error): no key a verifier would accept now;
    * ``key_expires_soon``: signing coverage (the union of these windows)
      ends before ``now + max_age`` (error: a successor published now would
      reach verifiers too late) or within ``warn_within`` (warning);
    * ``expires_too_early`` (error): a successor is published but starts
      after its predecessor's signing window ends: the old key's ``exp`` must
      be at least the successor's ``nbf + max_token_lifetime + leeway``;
    * ``expired_key`` (warning): past ``exp + leeway``, it can be removed.
    """
    findings: list[Finding] = []
    keys = _parse(document, findings, "registry")
    if keys is None:
        return findings
    rules = _Rules(now, max_token_lifetime + leeway, leeway, max_age, warn_within)
    by_service: dict[str, list[_Key]] = {}
    for key in keys:
        by_service.setdefault(key.service, []).append(key)
    if services is not None:
        findings += _check_listed(by_service, list(dict.fromkeys(services)))
    for service, service_keys in by_service.items():
        findings += _check_service(service, service_keys, rules)
    if previous is not None:
        findings += _check_change(keys, previous, by_service, rules)
    findings.sort(key=lambda f: (f.severity != "error", f.service or "", f.code, f.kid or ""))
    return findings


@dataclasses.dataclass(frozen=True, slots=True)
class _Rules:
    """The verifiers' settings a registry is checked against, at ``now``."""

    now: float
    tail: int  # max_token_lifetime + leeway: how long a token may outlive its signing
    leeway: int
    max_age: int
    warn_within: float

    def valid_now(self, key: _Key) -> bool:
        return key.nbf - self.leeway <= self.now <= key.exp + self.leeway


def _check_listed(by_service: Mapping[str, list[_Key]], expected: list[str]) -> list[Finding]:
    """Services that must have a key and have none; services with keys that nobody listed."""
    findings = [
        Finding("error", "no_valid_key", name, None, "the registry has no key for this service")
        for name in expected
        if name not in by_service
    ]
    findings += [
        Finding("warning", "unexpected_service", name, None, "the registry has keys for an unlisted service")
        for name in by_service
        if name not in expected
    ]
    return findings


def _check_service(service: str, keys: list[_Key], rules: _Rules) -> list[Finding]:
    """Expired keys, a service with no valid key, and the end of its signing coverage."""
    now = rules.now
    findings = [
        Finding(
            "warning",
            "expired_key",
            service,
            key.kid,
            f"expired {_when(key.exp, now)}; no token signed with it verifies: it can be removed",
        )
        for key in keys
        if key.exp + rules.leeway < now
    ]
    if not any(rules.valid_now(key) for key in keys):
        message = "no key of this service is valid now: verifiers reject all its tokens"
        return [*findings, Finding("error", "no_valid_key", service, None, message)]
    windows = sorted(
        ((key.nbf, key.exp - rules.tail, key) for key in keys if key.exp - rules.tail > key.nbf),
        key=lambda window: (window[0], window[1]),
    )
    covered_until, last = _coverage(windows, now)
    if math.isinf(covered_until):
        return findings
    successor = next((w[2] for w in windows if w[0] > covered_until), None)
    if successor is not None and last is not None:
        message = (
            f"expires {_when(last.exp, now)} but its successor {successor.kid} only becomes valid "
            f"{_when(successor.nbf, now)}: tokens signed just before the switch would outlive the key; "
            f"set exp >= {int(successor.nbf + rules.tail)} (successor nbf + max_token_lifetime + leeway)"
        )
        return [*findings, Finding("error", "expires_too_early", service, last.kid, message)]
    return findings + _coverage_findings(service, covered_until, last, rules)


def _coverage(windows: list[tuple[float, float, _Key]], now: float) -> tuple[float, _Key | None]:
    """How far from ``now`` the signing windows cover without a gap, and the key that covers last."""
    covered_until, last = now, None
    while True:
        covering = [w for w in windows if w[0] <= covered_until < w[1]]
        if not covering:
            return covered_until, last
        _start, end, last = max(covering, key=lambda w: w[1])
        covered_until = end
        if math.isinf(end):
            return covered_until, last


def _coverage_findings(service: str, covered_until: float, last: _Key | None, rules: _Rules) -> list[Finding]:
    now, max_age = rules.now, rules.max_age
    subject = last.kid if last is not None else None
    if covered_until < now + max_age:
        message = (
            f"no key can sign safely after {_when(covered_until, now)} (exp - max_token_lifetime - "
            f"leeway) and a key published now reaches every verifier only after {max_age} s: "
            "publish a successor now and extend the current key's exp if you can"
        )
        return [Finding("error", "key_expires_soon", service, subject, message)]
    if covered_until < now + rules.warn_within:
        message = (
            f"signing coverage ends {_when(covered_until, now)}: publish a successor before "
            f"{int(covered_until - max_age)} and switch to it after {max_age} s"
        )
        return [Finding("warning", "key_expires_soon", service, subject, message)]
    return []


def _check_change(
    keys: list[_Key], previous: Mapping[str, Any] | bytes | str, by_service: Mapping[str, list[_Key]], rules: _Rules
) -> list[Finding]:
    """Keys this change removes too early or adds too late, against the registry published now."""
    now, max_age = rules.now, rules.max_age
    old_keys = _parse(previous, [], "previous registry") or []
    current = {key.kid: key for key in keys}
    before = {key.kid: key for key in old_keys}
    findings = [
        Finding(
            "error",
            "removed_too_early",
            key.service,
            kid,
            "removed while tokens signed with it may still be valid "
            f"(its exp is {_when(key.exp, now)}): this revokes them at once; right after a leak, "
            "otherwise set exp = last use + max_token_lifetime + leeway and remove it after that",
        )
        for kid, key in before.items()
        if kid not in current and key.exp + rules.leeway > now
    ]
    findings += [
        Finding(
            "warning",
            "not_yet_published_long_enough",
            key.service,
            kid,
            f"new key: verifiers may not have it before {int(now + max_age)} (now + max_age); "
            f"do not sign with it earlier (or set nbf >= {int(now + max_age)})",
        )
        for kid, key in current.items()
        if kid not in before and key.nbf < now + max_age
    ]
    for service, service_keys in by_service.items():
        valid_old = [k for k in service_keys if k.kid in before and rules.valid_now(k)]
        valid_new = [k for k in service_keys if k.kid not in before and rules.valid_now(k)]
        if valid_new and not valid_old:
            message = (
                "the only key valid now was just published: verifiers with a cached registry reject "
                f"the service's tokens for up to {max_age} s; keep the previous key until then"
            )
            findings.append(Finding("error", "not_yet_published_long_enough", service, valid_new[0].kid, message))
    return findings
