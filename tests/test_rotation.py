"""Key rotation: the registry checker, the planner, and a rotation under continuous traffic."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshauth import MeshAuthError, ServiceIdentity, SigningKey, Verifier
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth._publish import jwks_app
from meshauth._rotation import Finding, RotationPlan, check_registry, plan_rotation
from meshauth.testing import FakeClock, MemoryKeys

NOW = 1_800_000_000
LIFETIME, LEEWAY, MAX_AGE = 900, 30, 300
TAIL = LIFETIME + LEEWAY
OLD = SigningKey.generate("ES256")
NEW = SigningKey.generate("EdDSA")
BILLING = SigningKey.generate("ES256")


def no_wait(attempt: int) -> float:
    return 0.0


def jwk(key: SigningKey, service: str = "orders", **window: int) -> dict[str, Any]:
    return key.public_jwk(iss=service, **window)


def check(*keys: dict[str, Any], **kwargs: Any) -> list[Finding]:
    kwargs.setdefault("now", NOW)
    return check_registry({"keys": list(keys)}, **kwargs)


def codes(findings: list[Finding]) -> list[tuple[str, str, str | None]]:
    return [(f.severity, f.code, f.kid) for f in findings]


# -- the checker ---------------------------------------------------------------------------------


def test_a_healthy_registry_has_no_findings() -> None:
    assert check(jwk(OLD), jwk(BILLING, "billing"), services=["orders", "billing"]) == []


def test_a_service_without_a_key_valid_now() -> None:
    findings = check(jwk(OLD, nbf=NOW + 600), services=["orders", "payments"])
    assert ("error", "no_valid_key", None) in codes(findings)
    assert {f.service for f in findings if f.code == "no_valid_key"} == {"orders", "payments"}


def test_a_key_whose_tokens_would_outlive_it_is_an_error() -> None:
    # exp - max_token_lifetime - leeway is 100 s away: less than max_age to publish a successor
    findings = check(jwk(OLD, exp=NOW + TAIL + 100))
    assert codes(findings) == [("error", "key_expires_soon", OLD.kid)]
    assert "publish a successor now" in findings[0].message


def test_a_key_expiring_within_warn_within_is_a_warning() -> None:
    findings = check(jwk(OLD, exp=NOW + TAIL + 3600))
    assert codes(findings) == [("warning", "key_expires_soon", OLD.kid)]
    assert check(jwk(OLD, exp=NOW + TAIL + 3600), warn_within=600) == []


def test_a_successor_starting_after_the_old_key_can_no_longer_sign() -> None:
    findings = check(jwk(OLD, exp=NOW + 2000), jwk(NEW, nbf=NOW + 1500))
    assert codes(findings) == [("error", "expires_too_early", OLD.kid)]
    assert f"exp >= {NOW + 1500 + TAIL}" in findings[0].message


def test_a_rotation_in_progress_following_the_procedure_is_clean() -> None:
    switch = NOW + MAX_AGE + 60
    assert check(jwk(OLD, exp=switch + TAIL), jwk(NEW, nbf=switch)) == []


def test_removing_a_key_that_may_still_sign_tokens_is_flagged() -> None:
    before = {"keys": [jwk(OLD), jwk(NEW)]}
    findings = check(jwk(NEW), previous=before)
    assert ("error", "removed_too_early", OLD.kid) in codes(findings)
    expired = {"keys": [jwk(OLD, exp=NOW - 100), jwk(NEW)]}
    assert check(jwk(NEW), previous=expired) == []


def test_a_new_key_is_flagged_until_it_can_be_in_every_cache() -> None:
    before = {"keys": [jwk(OLD)]}
    findings = check(jwk(OLD), jwk(NEW), previous=before)
    assert codes(findings) == [("warning", "not_yet_published_long_enough", NEW.kid)]
    assert check(jwk(OLD), jwk(NEW, nbf=NOW + MAX_AGE), previous=before) == []


def test_swapping_keys_in_one_step_is_an_error() -> None:
    findings = check(jwk(NEW), previous={"keys": [jwk(OLD)]})
    assert ("error", "not_yet_published_long_enough", NEW.kid) in codes(findings)
    assert ("error", "removed_too_early", OLD.kid) in codes(findings)


def test_an_expired_key_can_be_removed() -> None:
    findings = check(jwk(OLD, exp=NOW - 3600), jwk(NEW))
    assert codes(findings) == [("warning", "expired_key", OLD.kid)]


def test_structural_problems() -> None:
    leaked = jwk(BILLING, "billing")
    leaked["d"] = "c2VjcmV0"
    bad_alg = {**jwk(NEW), "alg": "RS256"}
    findings = check(jwk(OLD), leaked, bad_alg, jwk(OLD), jwk(BILLING, "ledger", nbf=NOW + 10, exp=NOW + 5))
    found = codes(findings)
    assert ("error", "private_key_members", BILLING.kid) in found
    assert ("error", "duplicate_kid", OLD.kid) in found
    assert ("error", "invalid_window", BILLING.kid) in found
    assert any(code == "invalid_key" for _, code, _ in found)
    assert all("c2VjcmV0" not in f.message for f in findings)


@pytest.mark.parametrize("document", [b"not json", {"keys": 3}, "[]"])
def test_an_unreadable_document(document: Any) -> None:
    assert codes(check_registry(document, now=NOW)) == [("error", "invalid_registry", None)]


def test_unlisted_services_and_ordering() -> None:
    findings = check(jwk(OLD), jwk(BILLING, "billing", exp=NOW - 3600), services=["orders"])
    assert [f.severity for f in findings] == sorted(f.severity for f in findings)  # errors first
    assert ("warning", "unexpected_service", None) in codes(findings)
    assert str(findings[0]).startswith("error: no_valid_key service=billing")


def test_plan_rotation_orders_the_steps() -> None:
    plan = plan_rotation(now=NOW + 0.5, max_token_lifetime=LIFETIME, leeway=LEEWAY, max_age=MAX_AGE, margin=60)
    assert plan == RotationPlan(
        publish_at=NOW + 1,
        sign_from=NOW + 1 + MAX_AGE + 60,
        old_key_exp=NOW + 1 + MAX_AGE + 60 + TAIL + 60,
        remove_after=NOW + 1 + MAX_AGE + 60 + TAIL + 60 + LEEWAY + 60,
    )


def test_following_the_plan_keeps_the_checker_quiet_at_every_step() -> None:
    plan = plan_rotation(now=NOW, max_token_lifetime=LIFETIME, leeway=LEEWAY, max_age=MAX_AGE)
    stages = [
        (plan.publish_at - 1, [jwk(OLD)]),
        (plan.publish_at, [jwk(OLD), jwk(NEW, nbf=plan.sign_from)]),
        (plan.sign_from, [jwk(OLD, exp=plan.old_key_exp), jwk(NEW, nbf=plan.sign_from)]),
        (plan.remove_after, [jwk(NEW, nbf=plan.sign_from)]),
    ]
    previous: list[dict[str, Any]] | None = None
    for now, keys in stages:
        findings = check_registry(
            {"keys": keys},
            now=now,
            max_token_lifetime=LIFETIME,
            leeway=LEEWAY,
            max_age=MAX_AGE,
            previous={"keys": previous} if previous is not None else None,
        )
        assert [f for f in findings if f.severity == "error"] == [], now
        previous = keys


# -- rotation under continuous traffic -----------------------------------------------------------


class Traffic:
    """A thread that keeps minting and verifying tokens, also re-verifying tokens minted a while ago."""

    def __init__(self, clock: FakeClock, verifier: Verifier, signer: ServiceIdentity) -> None:
        self.clock = clock
        self.verifier = verifier
        self.signer = signer
        self.failures: list[str] = []
        self.verified: collections.Counter[str] = collections.Counter()
        self.late: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.deque[tuple[str, float]] = collections.deque()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="traffic", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            token = self.signer.mint("payments")
            self.check(token)
            self.in_flight.append((token, self.clock()))
            # Each token is presented again two minutes later, like a slow or
            # retried request: tokens signed just before the switch must still
            # verify after it.
            while self.in_flight and self.clock() - self.in_flight[0][1] >= 120:
                self.check(self.in_flight.popleft()[0], late=True)
            time.sleep(0.0005)

    def check(self, token: str, *, late: bool = False) -> None:
        try:
            principal = self.verifier.verify(token)
        except MeshAuthError as exc:
            self.failures.append(f"{exc.reason}: {exc.detail}")
        else:
            self.verified[principal.kid] += 1
            if late:
                self.late[principal.kid] += 1

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 10
        target = sum(self.verified.values()) + count
        while sum(self.verified.values()) < target and not self.failures:
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.002)


def test_rotation_under_continuous_traffic_fails_no_verification(
    serve_asgi: Callable[..., str], clock: FakeClock
) -> None:
    max_age = 60
    registry = MemoryKeys([OLD.record("orders")])
    url = serve_asgi(jwks_app(registry, max_age=max_age)) + "/.well-known/jwks.json"
    endpoint = JWKSEndpoint(url, clock=clock, monotonic=clock, retry_wait=no_wait, min_max_age=max_age)
    verifier = Verifier("payments", endpoint, clock=clock, max_lifetime=LIFETIME, leeway=LEEWAY)
    traffic = Traffic(clock, verifier, ServiceIdentity("orders", OLD, clock=clock))

    def audit_registry(previous: dict[str, Any]) -> dict[str, Any]:
        document = registry.to_jwks()
        findings = check_registry(
            document,
            now=clock(),
            max_token_lifetime=LIFETIME,
            leeway=LEEWAY,
            max_age=max_age,
            services=["orders"],
            previous=previous,
        )
        assert [f for f in findings if f.severity == "error"] == []
        return document

    def elapse(seconds: int) -> None:
        for _ in range(seconds // 5):
            clock.advance(5)
            traffic.wait_for(3)

    traffic.thread.start()
    try:
        traffic.wait_for(20)
        document = registry.to_jwks()
        # 1. publish the new key
        registry.add(NEW.record("orders"))
        document = audit_registry(document)
        # 2. wait max_age (+ margin): every verifier cache now holds it
        elapse(max_age + 20)
        deadline = time.monotonic() + 10
        while endpoint.keyset is None or NEW.kid not in endpoint.keyset.kids():
            assert time.monotonic() < deadline, "the endpoint never refreshed"
            traffic.wait_for(1)
        # 3. switch the signer; 4. bound the old key's life by the last token it signed
        switch = clock()
        traffic.signer = ServiceIdentity("orders", NEW, clock=clock)
        registry.add(OLD.record("orders", expires=int(switch) + LIFETIME + LEEWAY))
        document = audit_registry(document)
        late_before_switch = traffic.late[OLD.kid]
        elapse(LIFETIME + LEEWAY + LEEWAY + 10)
        # 5. remove the old key once no token it signed can verify any more
        registry.revoke(OLD.kid)
        audit_registry(document)
        elapse(2 * max_age)
    finally:
        traffic.stop.set()
        traffic.thread.join(10)
        endpoint.close()
    assert traffic.failures == []
    assert traffic.verified[OLD.kid] > 50 and traffic.verified[NEW.kid] > 50
    assert traffic.late[OLD.kid] > late_before_switch  # old tokens still verified after the switch
    assert traffic.late[NEW.kid] > 0
    status = endpoint.status()
    assert status["ready"] and status["keys"] == 1 and status["last_error"] is None


def test_skipping_the_wait_is_what_the_procedure_prevents(serve_asgi: Callable[..., str], clock: FakeClock) -> None:
    """Counter-check: signing with a key published a moment ago fails until the cooldown allows a refetch."""
    registry = MemoryKeys([OLD.record("orders")])
    url = serve_asgi(jwks_app(registry, max_age=60)) + "/.well-known/jwks.json"
    endpoint = JWKSEndpoint(url, clock=clock, monotonic=clock, retry_wait=no_wait, cooldown=30)
    verifier = Verifier("payments", endpoint, clock=clock)
    try:
        verifier.verify(ServiceIdentity("orders", OLD, clock=clock).mint("payments"))
        registry.add(NEW.record("orders"))
        early = ServiceIdentity("orders", NEW, clock=clock).mint("payments")
        with pytest.raises(MeshAuthError) as caught:
            verifier.verify(early)  # within the cooldown of the last fetch: rejected
        assert caught.value.reason == "unknown_kid"
        clock.advance(31)
        assert verifier.verify(ServiceIdentity("orders", NEW, clock=clock).mint("payments")).caller == "orders"
    finally:
        endpoint.close()
