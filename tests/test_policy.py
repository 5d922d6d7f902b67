"""Tests for meshauth._policy: matching, delegation, path normalization, loading."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshauth
from meshauth._exceptions import AccessDenied, ConfigurationError
from meshauth._policy import Decision, Policy
from meshauth._principal import Principal
from meshauth.testing import Mesh
from tests.test_paths import CANONICAL, REFUSED


def principal(
    caller: str = "orders",
    *,
    subject: str | None = None,
    transaction: str | None = None,
    scopes: tuple[str, ...] = (),
) -> Principal:
    """A Principal as the verifier would build it (inside a transaction when the subject is a user)."""
    subject = caller if subject is None else subject
    if transaction is None and subject != caller:
        transaction = "txn-1"
    return Principal(
        caller=caller,
        subject=subject,
        transaction=transaction,
        txn_issuer="gateway" if transaction is not None else None,
        audience="payments",
        scopes=frozenset(scopes),
        token_id="jti-1",
        issued_at=0,
        expires_at=300,
        kid="kid-1",
        alg="ES256",
        claims={},
    )


CHARGES = {
    "default": "deny",
    "mode": "enforce",
    "delegators": ["gateway"],
    "rules": [
        {
            "callers": ["orders", "billing-*"],
            "methods": ["POST"],
            "paths": ["/charges", "/charges/*"],
            "subjects": ["*"],
            "scopes": ["charges:write"],
        },
    ],
}


def policy_of(*rules: dict[str, Any], **top: Any) -> Policy:
    return Policy.from_dict({"rules": list(rules), **top})


# -- Decision ------------------------------------------------------------------


def test_decision_is_frozen_with_slots() -> None:
    decision = policy_of({}).decide(principal(), "GET", "/x")
    assert decision == Decision(
        allowed=True,
        would_allow=True,
        rule=0,
        reason="allowed",
        detail=decision.detail,
        mode="enforce",
        path="/x",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    assert not hasattr(decision, "__dict__")


# -- the example policy from the design ----------------------------------------


@pytest.mark.parametrize(
    ("caller", "method", "path", "scopes", "allowed"),
    [
        ("orders", "POST", "/charges", ("charges:write",), True),
        ("orders", "POST", "/charges/c_1", ("charges:write",), True),
        ("billing-eu", "POST", "/charges/c_1", ("charges:write", "other"), True),
        ("billing-", "POST", "/charges", ("charges:write",), True),
        ("billing", "POST", "/charges", ("charges:write",), False),
        ("Orders", "POST", "/charges", ("charges:write",), False),
        ("orders", "GET", "/charges", ("charges:write",), False),
        ("orders", "post", "/charges", ("charges:write",), False),
        ("orders", "POST", "/charges/c_1/refunds", ("charges:write",), False),
        ("orders", "POST", "/charges/", ("charges:write",), True),
        ("orders", "POST", "/chargesX", ("charges:write",), False),
        ("orders", "POST", "/charges", (), False),
        ("orders", "POST", "/charges", ("charges:read",), False),
    ],
)
def test_example_policy(caller: str, method: str, path: str, scopes: tuple[str, ...], allowed: bool) -> None:
    decision = Policy.from_dict(CHARGES).decide(principal(caller, scopes=scopes), method, path)
    assert decision.allowed is allowed
    assert decision.would_allow is allowed
    assert decision.mode == "enforce"
    if allowed:
        assert (decision.rule, decision.reason) == (0, "allowed")
    elif "charges:write" not in scopes and (caller, method, path) == ("orders", "POST", "/charges"):
        assert (decision.rule, decision.reason) == (None, "insufficient_scope")
        assert "charges:write" in decision.detail
    else:
        assert (decision.rule, decision.reason) == (None, "no_matching_rule")


def test_no_matching_rule_detail_says_who_what_where() -> None:
    decision = Policy.from_dict(CHARGES).decide(principal("search"), "DELETE", "/charges/c_1")
    assert decision.reason == "no_matching_rule"
    assert "'search'" in decision.detail
    assert "DELETE" in decision.detail
    assert "/charges/c_1" in decision.detail


# -- each rule field on its own ------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "who", "method", "path", "allowed"),
    [
        # callers: globs, case-sensitive, exact otherwise
        ({"callers": ["orders"]}, principal("orders"), "GET", "/", True),
        ({"callers": ["orders"]}, principal("orders-2"), "GET", "/", False),
        ({"callers": ["orders"]}, principal("ORDERS"), "GET", "/", False),
        ({"callers": ["billing-*"]}, principal("billing-eu"), "GET", "/", True),
        ({"callers": ["billing-*"]}, principal("xbilling-eu"), "GET", "/", False),
        ({"callers": ["svc-?"]}, principal("svc-1"), "GET", "/", True),
        ({"callers": ["svc-?"]}, principal("svc-12"), "GET", "/", False),
        ({"callers": ["svc-[ab]"]}, principal("svc-b"), "GET", "/", True),
        ({"callers": ["svc-[ab]"]}, principal("svc-c"), "GET", "/", False),
        ({"callers": ["a", "b*"]}, principal("bee"), "GET", "/", True),
        ({"callers": ["*"]}, principal("anything"), "GET", "/", True),
        # subjects
        ({"subjects": ["alice"]}, principal("gateway", subject="alice"), "GET", "/", True),
        ({"subjects": ["alice"]}, principal("gateway", subject="bob"), "GET", "/", False),
        ({"subjects": ["user:*"]}, principal("gateway", subject="user:42"), "GET", "/", True),
        ({"subjects": ["alice"]}, principal("orders"), "GET", "/", False),
        # methods: exact, upper case, "*" for any
        ({"methods": ["GET", "HEAD"]}, principal(), "HEAD", "/", True),
        ({"methods": ["GET"]}, principal(), "get", "/", False),
        ({"methods": ["GET"]}, principal(), "GETX", "/", False),
        ({"methods": ["GET"]}, principal(), "", "/", False),
        ({"methods": ["*"]}, principal(), "PURGE", "/", True),
        # paths
        ({"paths": ["/a"]}, principal(), "GET", "/a", True),
        ({"paths": ["/a"]}, principal(), "GET", "/a/", False),
        ({"paths": ["/a/*"]}, principal(), "GET", "/a/b", True),
        ({"paths": ["/a/*"]}, principal(), "GET", "/a/", True),
        ({"paths": ["/a/*"]}, principal(), "GET", "/a/b/c", False),
        ({"paths": ["/a/*/c"]}, principal(), "GET", "/a/b/c", True),
        ({"paths": ["/a/*/c"]}, principal(), "GET", "/a/b/x/c", False),
        ({"paths": ["/a/**"]}, principal(), "GET", "/a/b/c/d", True),
        ({"paths": ["/a/**"]}, principal(), "GET", "/a", False),
        ({"paths": ["/a/**/z"]}, principal(), "GET", "/a/b/c/z", True),
        ({"paths": ["/**"]}, principal(), "GET", "/anything/at/all", True),
        ({"paths": ["/v?/x"]}, principal(), "GET", "/v1/x", True),
        ({"paths": ["/v?/x"]}, principal(), "GET", "/v/x", False),
        ({"paths": ["/a?b"]}, principal(), "GET", "/a/b", False),
        ({"paths": ["/v[0-9]/x"]}, principal(), "GET", "/v7/x", True),
        ({"paths": ["/v[0-9]/x"]}, principal(), "GET", "/vx/x", False),
        ({"paths": ["/a[!x]b"]}, principal(), "GET", "/a/b", False),
        ({"paths": ["/a[!x]b"]}, principal(), "GET", "/ayb", True),
        ({"paths": ["/a.b"]}, principal(), "GET", "/axb", False),
        ({"paths": ["/a+(b)"]}, principal(), "GET", "/a+(b)", True),
        ({"paths": ["/caf%C3%A9/*"]}, principal(), "GET", "/caf%c3%a9/x", True),
        # scopes: all required, extra ones fine
        ({"scopes": ["a", "b"]}, principal(scopes=("a", "b", "c")), "GET", "/", True),
        ({"scopes": ["a", "b"]}, principal(scopes=("a",)), "GET", "/", False),
        ({"scopes": ["a"]}, principal(), "GET", "/", False),
        # absent fields match anything
        ({}, principal("who", scopes=("x",)), "WHATEVER", "/any/path", True),
    ],
)
def test_rule_fields(rule: dict[str, Any], who: Principal, method: str, path: str, allowed: bool) -> None:
    delegators = ["gateway"]
    decision = policy_of(rule, delegators=delegators).decide(who, method, path)
    assert decision.allowed is allowed, decision
    # A rule that matched in every respect but its scopes reports the shortfall.
    refused = "insufficient_scope" if set(rule) == {"scopes"} else "no_matching_rule"
    assert decision.reason == ("allowed" if allowed else refused)


def test_every_present_field_must_match() -> None:
    policy = policy_of({"callers": ["orders"], "methods": ["GET"], "paths": ["/a"]})
    assert policy.decide(principal("orders"), "GET", "/a").allowed
    assert not policy.decide(principal("orders"), "GET", "/b").allowed
    assert not policy.decide(principal("orders"), "PUT", "/a").allowed
    assert not policy.decide(principal("billing"), "GET", "/a").allowed


# -- order and default -----------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    policy = policy_of(
        {"callers": ["billing"]},
        {"paths": ["/x/**"]},
        {"callers": ["orders"], "paths": ["/x/*"]},
    )
    assert policy.decide(principal("orders"), "GET", "/x/y").rule == 1
    assert policy.decide(principal("billing"), "GET", "/x/y").rule == 0
    decision = policy.decide(principal("orders"), "GET", "/x/y")
    assert "rules[1]" in decision.detail


@pytest.mark.parametrize(
    ("default", "allowed", "reason"),
    [("deny", False, "no_matching_rule"), ("allow", True, "default_allow")],
)
def test_default(default: str, allowed: bool, reason: str) -> None:
    policy = policy_of({"callers": ["billing"]}, default=default)
    decision = policy.decide(principal("orders"), "GET", "/x")
    assert (decision.allowed, decision.would_allow, decision.rule) == (allowed, allowed, None)
    assert decision.reason == reason
    assert policy.decide(principal("orders"), "GET", "/x") == decision  # cached or not, the same
    assert policy.decide(principal("billing"), "GET", "/x").reason == "allowed"


def test_defaults_when_keys_are_absent() -> None:
    policy = Policy.from_dict({})
    assert (policy.default, policy.mode, policy.delegators, len(policy)) == (
        "deny",
        "enforce",
        (),
        0,
    )
    assert policy.decide(principal(), "GET", "/").reason == "no_matching_rule"


# -- audit mode ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "path", "reason"),
    [
        (principal("search"), "/charges", "no_matching_rule"),
        (principal("evil", subject="alice"), "/charges", "delegation_not_allowed"),
        (principal("orders", scopes=("charges:write",)), "/charges%2F..", "bad_path"),
        (principal("orders", scopes=("charges:write",)), "/../charges", "bad_path"),
    ],
)
def test_audit_mode_never_denies_but_records(who: Principal, path: str, reason: str) -> None:
    policy = Policy.from_dict({**CHARGES, "mode": "audit"})
    decision = policy.decide(who, "POST", path)
    assert decision.allowed is True
    assert decision.would_allow is False
    assert decision.reason == reason
    assert decision.mode == "audit"
    assert decision.detail
    assert policy.check(who, "POST", path) == decision


def test_audit_mode_allowed_request_is_plain_allowed() -> None:
    policy = Policy.from_dict({**CHARGES, "mode": "audit"})
    decision = policy.decide(principal(scopes=("charges:write",)), "POST", "/charges")
    assert (decision.allowed, decision.would_allow, decision.reason, decision.rule) == (
        True,
        True,
        "allowed",
        0,
    )


# -- delegation ------------------------------------------------------------------


def test_gateway_may_delegate() -> None:
    alice = principal("gateway", subject="alice", scopes=("charges:write",))
    policy = policy_of({"callers": ["gateway"], "subjects": ["alice"]}, delegators=["gateway"])
    decision = policy.decide(alice, "GET", "/x")
    assert (decision.allowed, decision.reason) == (True, "allowed")


def test_unknown_delegator_is_denied_before_rules_and_default() -> None:
    mallory = principal("orders", subject="alice")
    policy = policy_of({}, delegators=["gateway"], default="allow")
    decision = policy.decide(mallory, "GET", "/x")
    assert (decision.allowed, decision.would_allow) == (False, False)
    assert decision.reason == "delegation_not_allowed"
    assert decision.rule is None
    assert decision.path == "/x"
    assert "'orders'" in decision.detail


def test_only_the_immediate_caller_counts_inside_a_transaction() -> None:
    # Who the user is comes from the Txn-Token; the policy judges who is acting in the transaction now.
    via_orders = principal("orders", subject="alice")
    policy = policy_of({}, delegators=["gateway", "orders"])
    assert policy.decide(via_orders, "GET", "/x").reason == "allowed"
    only_gateway = policy_of({}, delegators=["gateway"])
    decision = only_gateway.decide(via_orders, "GET", "/x")
    assert decision.reason == "delegation_not_allowed" and "'orders'" in decision.detail
    # A service calling inside a transaction for a user equal to its own name is still inside a transaction.
    itself = principal("orders", subject="orders", transaction="txn-2")
    assert only_gateway.decide(itself, "GET", "/x").reason == "delegation_not_allowed"


def test_delegator_globs() -> None:
    policy = policy_of({}, delegators=["gateway-*"])
    assert policy.decide(principal("gateway-eu", subject="alice"), "GET", "/").allowed
    assert not policy.decide(principal("gateway", subject="alice"), "GET", "/").allowed


@pytest.mark.parametrize("delegators", [None, []])
def test_no_delegators_means_no_delegation(delegators: list[str] | None) -> None:
    top = {} if delegators is None else {"delegators": delegators}
    policy = policy_of({}, default="allow", **top)
    decision = policy.decide(principal("gateway", subject="alice"), "GET", "/")
    assert decision.reason == "delegation_not_allowed"


def test_plain_call_ignores_delegators() -> None:
    policy = policy_of({"callers": ["orders"]}, delegators=[])
    assert policy.decide(principal("orders"), "GET", "/").allowed


def test_a_user_subject_without_a_transaction_is_refused() -> None:
    # Cannot come out of the verifier (sub must equal iss); must not pass as a plain call.
    odd = Principal(
        caller="gateway", subject="alice", audience="payments", scopes=frozenset(), token_id="j",
        issued_at=0, expires_at=300, kid="k", alg="ES256", claims={},
    )  # fmt: skip
    decision = policy_of({}, delegators=["*"]).decide(odd, "GET", "/")
    assert decision.reason == "delegation_not_allowed"


# -- path normalization and path-confusion attacks -------------------------------


@pytest.mark.parametrize(("raw", "normalized"), CANONICAL)
def test_path_normalization(raw: str, normalized: str) -> None:
    decision = policy_of({}).decide(principal(), "GET", raw)
    assert (decision.allowed, decision.path) == (True, normalized)


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_invalid_paths_are_denied_even_by_default_allow(raw: str, why: str) -> None:
    policy = policy_of({"paths": ["/**"]}, default="allow")
    decision = policy.decide(principal(), "GET", raw)
    assert (decision.allowed, decision.would_allow) == (False, False)
    assert decision.reason == "bad_path"
    assert decision.path is None
    assert why in decision.detail


def test_encoded_dot_dot_cannot_escape_a_prefix_rule() -> None:
    policy = Policy.from_dict(CHARGES)
    orders = principal("orders", scopes=("charges:write",))
    decision = policy.decide(orders, "POST", "/charges/%2e%2e/admin")
    assert decision.path == "/admin"
    assert decision.reason == "no_matching_rule"
    assert not policy.decide(orders, "POST", "/charges%2Fadmin").allowed


def test_normalization_is_cached_and_stays_correct() -> None:
    policy = policy_of({"paths": ["/ok/*"]})
    for _ in range(3):
        assert policy.decide(principal(), "GET", "/ok/%2e/x").path == "/ok/x"
        assert policy.decide(principal(), "GET", "/ok/%2e%2e/%2e%2e").reason == "bad_path"
    # More distinct paths than the cache holds, then the first ones again.
    for i in range(3000):
        assert policy.decide(principal(), "GET", f"/ok/{i}").allowed
    assert policy.decide(principal(), "GET", "/ok/0").path == "/ok/0"
    long_path = "/ok/" + "a" * 5000
    assert policy.decide(principal(), "GET", long_path).allowed


def test_concurrent_decisions() -> None:
    policy = policy_of({"paths": ["/ok/*"]})
    failures: list[str] = []

    def work(offset: int) -> None:
        for i in range(2000):
            path = f"/ok/{(i + offset) % 1500}"
            if policy.decide(principal(), "GET", path).path != path:
                failures.append(path)

    threads = [threading.Thread(target=work, args=(n * 97,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@settings(max_examples=300, deadline=None)
@given(method=st.text(max_size=12), raw_path=st.text(max_size=60))
def test_decide_never_raises(method: str, raw_path: str) -> None:
    policy = Policy.from_dict(CHARGES)
    for who in (principal(), principal("gateway", subject="alice")):
        decision = policy.decide(who, method, raw_path)
        assert isinstance(decision, Decision)
        assert decision.allowed is decision.would_allow
        if decision.path is not None:
            assert decision.path.startswith("/")
            assert "/./" not in decision.path + "/"
            assert "/../" not in decision.path + "/"


@settings(max_examples=300, deadline=None)
@given(
    raw_path=st.text(
        alphabet=st.sampled_from(["/", ".", "%", "2", "e", "E", "f", "a", "0", "5", "c", "?"]),
        max_size=30,
    )
)
def test_decide_never_raises_on_path_like_text(raw_path: str) -> None:
    decision = policy_of({"paths": ["/**"]}, default="allow").decide(principal(), "GET", raw_path)
    assert decision.reason in {"allowed", "bad_path"}


# -- check() ---------------------------------------------------------------------


def test_check_returns_the_decision_when_allowed() -> None:
    orders = principal("orders", scopes=("charges:write",))
    decision = Policy.from_dict(CHARGES).check(orders, "POST", "/charges/c_9")
    assert (decision.allowed, decision.rule, decision.path) == (True, 0, "/charges/c_9")


@pytest.mark.parametrize(
    ("who", "path", "reason"),
    [
        (principal("search"), "/charges", "no_matching_rule"),
        (principal("orders", subject="alice"), "/charges", "delegation_not_allowed"),
        (principal("orders"), "/charges%2fx", "bad_path"),
    ],
)
def test_check_raises_access_denied_with_the_reason(who: Principal, path: str, reason: str) -> None:
    with pytest.raises(AccessDenied) as caught:
        Policy.from_dict(CHARGES).check(who, "POST", path)
    assert caught.value.reason == reason
    assert caught.value.detail
    assert str(caught.value).startswith(f"{reason}: ")
    assert "jti-1" not in str(caught.value)


def test_hostile_input_does_not_bloat_the_detail() -> None:
    decision = Policy.from_dict(CHARGES).decide(principal(), "X" * 10_000, "/" + "a" * 10_000)
    assert decision.reason == "no_matching_rule"
    assert len(decision.detail) < 400


# -- loading: dict ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"rules": [], "version": 1}, "<dict>: unknown key 'version'"),
        ({"default": "permit"}, "<dict>: default: expected 'allow' or 'deny', found 'permit'"),
        ({"default": True}, "<dict>: default: expected 'allow' or 'deny', found True"),
        ({"mode": "Audit"}, "<dict>: mode: expected 'audit' or 'enforce', found 'Audit'"),
        ({"delegators": "gateway"}, "<dict>: delegators: expected a list of strings, found str"),
        ({"delegators": [1]}, "<dict>: delegators: expected non-empty strings, found int"),
        ({"rules": {"callers": ["a"]}}, "<dict>: rules: expected a list of rules, found dict"),
        ({"rules": ["orders"]}, "<dict>: rules[0]: expected a table of rule fields, found str"),
        (
            {"rules": [{}, {"caller": ["orders"]}]},
            "<dict>: rules[1]: unknown field 'caller' (expected one of callers,",
        ),
        (
            {"rules": [{}, {}, {"methods": ["post"]}]},
            "<dict>: rules[2].methods: expected upper-case HTTP methods, found 'post'",
        ),
        (
            {"rules": [{"methods": ["GET POST"]}]},
            "<dict>: rules[0].methods: expected HTTP method names (or '*'), found 'GET POST'",
        ),
        (
            {"rules": [{"methods": "GET"}]},
            "rules[0].methods: expected a list of strings, found str",
        ),
        ({"rules": [{"callers": []}]}, "<dict>: rules[0].callers: expected a non-empty list"),
        ({"rules": [{"subjects": []}]}, "rules[0].subjects: expected a non-empty list"),
        ({"rules": [{"paths": []}]}, "rules[0].paths: expected a non-empty list"),
        ({"rules": [{"scopes": []}]}, "rules[0].scopes: expected a non-empty list"),
        ({"rules": [{"methods": []}]}, "rules[0].methods: expected a non-empty list"),
        ({"rules": [{"callers": [""]}]}, "rules[0].callers: expected non-empty strings"),
        ({"rules": [{"callers": [None]}]}, "rules[0].callers: expected non-empty strings"),
        (
            {"rules": [{"paths": ["charges/*"]}]},
            "rules[0].paths: expected path patterns starting with '/', found 'charges/*'",
        ),
        ({"rules": [{"paths": ["/a/../b"]}]}, "rules[0].paths: path patterns cannot contain '.'"),
        ({"rules": [{"paths": ["/a\\b"]}]}, "rules[0].paths: path patterns cannot contain a back"),
        ({"rules": [{"paths": ["/v[0-9"]}]}, "rules[0].paths: invalid path pattern: unclosed '['"),
        (
            {"rules": [{"paths": ["/[a/b]"]}]},
            "invalid path pattern: a '[...]' class cannot match '/'",
        ),
        ({"rules": [{"paths": ["/x", "/[z-a]"]}]}, "bad character range z-a, found '/[z-a]'"),
        (
            {"rules": [{"scopes": ["a b"]}]},
            "rules[0].scopes: expected single scopes without spaces, found 'a b'",
        ),
    ],
)
def test_invalid_dict_policies(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Policy.from_dict(document)
    assert caught.value.reason == "invalid_policy"
    assert message in str(caught.value)


def test_from_dict_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigurationError, match=r"<dict>: expected a mapping, found list"):
        Policy.from_dict([("rules", [])])  # type: ignore[arg-type]


def test_dict_source_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"^invalid_policy: svc\.yaml: mode: "):
        Policy.from_dict({"mode": "loud"}, source="svc.yaml")


def test_constructor_accepts_a_document() -> None:
    policy = Policy(CHARGES)
    assert policy.delegators == ("gateway",)
    assert "rules=1" in repr(policy)


def test_tuples_are_accepted_in_dict_documents() -> None:
    policy = Policy.from_dict({"rules": ({"methods": ("GET",)},)})
    assert policy.decide(principal(), "GET", "/").allowed


def test_character_class_edge_cases_compile_without_warnings() -> None:
    policy = policy_of({"paths": ["/[]x]", "/[&&|~~]", "/[-a]", "/[a-]"]})
    for path in ("/]", "/x", "/&", "/~", "/-", "/a"):
        assert policy.decide(principal(), "GET", path).allowed, path
    assert not policy.decide(principal(), "GET", "/b").allowed


# -- loading: TOML / JSON / files -----------------------------------------------

TOML = """
default = "deny"
mode = "enforce"
delegators = ["gateway"]

[[rules]]
callers = ["orders", "billing-*"]
methods = ["POST"]
paths = ["/charges", "/charges/*"]
subjects = ["*"]
scopes = ["charges:write"]

[[rules]]
paths = ["/healthz"]
"""


def test_from_toml() -> None:
    policy = Policy.from_toml(TOML)
    orders = principal("orders", scopes=("charges:write",))
    assert policy.decide(orders, "POST", "/charges/c_1").rule == 0
    assert policy.decide(principal("x"), "GET", "/healthz").rule == 1
    assert not policy.decide(principal("x"), "GET", "/charges").allowed


def test_toml_rule_error_names_the_rule_and_field() -> None:
    text = TOML + '\n[[rules]]\nmethods = ["GET"]\n\n[[rules]]\nmethods = ["post"]\n'
    with pytest.raises(ConfigurationError) as caught:
        Policy.from_toml(text, source="policy.toml")
    assert "policy.toml: rules[3].methods: expected upper-case HTTP methods, found 'post'" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('default = "deny"\nmode = \n', "line 2"),
        ('default = "deny"\n\n[[rules]]\ncallers = [orders]\n', "line 4"),
        ('default = "deny"\n[[rules]]\ncallers = ["a"\n', "line 4"),
    ],
)
def test_toml_syntax_error_names_the_line(text: str, line: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Policy.from_toml(text, source="policy.toml")
    assert caught.value.reason == "invalid_policy"
    assert str(caught.value).startswith("invalid_policy: policy.toml: invalid TOML: ")
    assert line in str(caught.value)


def test_toml_tables_instead_of_lists_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"rules: expected a list of rules, found dict"):
        Policy.from_toml('[rules]\ncallers = ["a"]\n')


def test_from_json() -> None:
    policy = Policy.from_json(json.dumps(CHARGES))
    assert policy.decide(principal("billing-x", scopes=("charges:write",)), "POST", "/charges").allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "default": "deny",\n  "rules": [,]\n}', "p.json: invalid JSON at line 3, column"),
        ("", "p.json: invalid JSON at line 1, column 1"),
        ("[]", "p.json: expected a JSON object, found list"),
        ('{"mode": "audit", "mode": "enforce"}', "p.json: invalid JSON: duplicate key 'mode'"),
        (
            '{"rules": [{"paths": ["/a"]}, {"paths": "/b"}]}',
            "p.json: rules[1].paths: expected a list",
        ),
        ('{"rules": [{"methods": ["*", "get"]}]}', "p.json: rules[0].methods: expected upper-case"),
    ],
)
def test_invalid_json(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Policy.from_json(text, source="p.json")
    assert caught.value.reason == "invalid_policy"
    assert message in str(caught.value)


def test_from_file_picks_the_format_by_suffix(tmp_path: Path) -> None:
    toml_file = tmp_path / "policy.toml"
    toml_file.write_text(TOML, encoding="utf-8")
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps(CHARGES), encoding="utf-8")
    for path in (toml_file, str(json_file)):
        policy = Policy.from_file(path)
        assert policy.source == str(path)
        assert policy.decide(principal(scopes=("charges:write",)), "POST", "/charges").allowed


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[[rules]]\nmethods = ["post"]\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"policy\.toml: rules\[0\]\.methods: "):
        Policy.from_file(bad)

    with pytest.raises(ConfigurationError, match=r"missing\.json: cannot read policy file"):
        Policy.from_file(tmp_path / "missing.json")

    other = tmp_path / "policy.yaml"
    other.write_text("default: deny\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"policy\.yaml: expected a \.toml or \.json"):
        Policy.from_file(other)

    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"rules": [{"callers": ["caf\xe9"]}]}')
    with pytest.raises(ConfigurationError, match=r"latin\.json: not UTF-8"):
        Policy.from_file(latin)


def test_the_policy_judges_the_shared_canonical_path() -> None:
    from meshauth import canonical_path

    decision = policy_of({}).decide(principal(), "GET", "/charges/%2e%2e/%7Eadmin")
    assert decision.path == canonical_path("/charges/%2e%2e/%7Eadmin") == "/~admin"


# -- methods, names, digests (DESIGN section 4) ------------------------------------------


def test_head_is_allowed_wherever_get_is() -> None:
    policy = policy_of({"methods": ["GET"], "paths": ["/healthz"]})
    assert policy.decide(principal(), "HEAD", "/healthz").allowed
    assert not policy.decide(principal(), "POST", "/healthz").allowed


@pytest.mark.parametrize(
    ("methods", "allowed"),
    [(None, False), (["GET"], False), (["*"], False), (["WEBSOCKET"], True), (["*", "WEBSOCKET"], True)],
)
def test_a_websocket_needs_a_rule_naming_it(methods: list[str] | None, allowed: bool) -> None:
    rule: dict[str, Any] = {"paths": ["/events"]}
    if methods is not None:
        rule["methods"] = methods
    decision = policy_of(rule).decide(principal(), "WEBSOCKET", "/events")
    assert decision.allowed is allowed
    assert policy_of(rule).decide(principal(), "GET", "/events").allowed is (methods != ["WEBSOCKET"])


@pytest.mark.parametrize("pattern", ["/invoices/", "/a//b", "//x", "/a/**/"])
def test_path_patterns_with_a_trailing_slash_or_empty_segment_do_not_load(pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot end with '/' or hold an empty segment"):
        policy_of({"paths": [pattern]})


def test_rules_have_names_and_the_policy_a_digest() -> None:
    document = {"rules": [{"name": "orders may charge", "callers": ["orders"]}, {"callers": ["search"]}]}
    policy = Policy.from_dict(document)
    named = policy.decide(principal("orders"), "GET", "/x")
    unnamed = policy.decide(principal("search"), "GET", "/x")
    assert (named.rule, named.rule_name, named.rule_label) == (0, "orders may charge", "orders may charge")
    assert (unnamed.rule, unnamed.rule_name, unnamed.rule_label) == (1, None, 1)
    assert "orders may charge" in named.detail
    assert len(policy.sha256) == 64
    assert Policy.from_dict(json.loads(json.dumps(document))).sha256 == policy.sha256
    assert Policy.from_dict({"rules": [{"callers": ["orders"]}]}).sha256 != policy.sha256


@pytest.mark.parametrize("name", ["", "  ", 7, "x" * 129])
def test_bad_rule_names_do_not_load(name: object) -> None:
    with pytest.raises(ConfigurationError, match="rule name"):
        Policy.from_dict({"rules": [{"name": name, "callers": ["orders"]}]})


def test_unknown_callers_are_named_with_a_suggestion() -> None:
    policy = Policy.from_dict(
        {"delegators": ["gatewy"], "rules": [{"callers": ["ordres", "orders"]}, {"callers": ["bill*", "pay*"]}]}
    )
    assert policy.unknown_callers(["orders", "payments", "gateway"]) == [
        "rules[0].callers: 'ordres' has no key in the registry (did you mean 'orders'?)",
        "rules[1].callers: 'bill*' matches no service in the registry",
        "delegators: 'gatewy' has no key in the registry (did you mean 'gateway'?)",
    ]
    assert Policy.from_dict({"rules": [{"callers": ["orders"]}]}).unknown_callers(["orders"]) == []


def test_the_middleware_warns_at_start_up_about_unknown_callers(caplog: pytest.LogCaptureFixture) -> None:
    import meshauth
    from meshauth.asgi import MeshAuthMiddleware

    jwks = {"keys": [meshauth.SigningKey.generate().public_jwk(iss=name) for name in ("orders", "payments")]}
    verifier = meshauth.Verifier("payments", meshauth.StaticKeys.from_jwks(jwks))
    policy = Policy.from_dict({"rules": [{"callers": ["ordres"]}]}, source="policy.toml")
    with caplog.at_level("WARNING", logger="meshauth"):
        MeshAuthMiddleware(lambda *a: None, verifier, policy=policy)
    assert "policy.toml: rules[0].callers: 'ordres' has no key in the registry (did you mean 'orders'?)" in caplog.text


# -- end users from identity providers (the gateway's routes) ----------------------------------


def _user(issuer: str = "https://idp.example.com", subject: str = "alice", groups: tuple[str, ...] = ("staff",)) -> Any:
    from meshauth.gateway import UserPrincipal

    return UserPrincipal(
        issuer, subject, "api", frozenset(groups), frozenset({"orders:read"}), None, 0, "k", "RS256", {}
    )


def test_issuers_and_groups_judge_end_users() -> None:
    policy = meshauth.Policy.from_dict(
        {
            "rules": [
                {
                    "name": "staff of our IdP",
                    "issuers": ["https://idp.example.com"],
                    "subjects": ["alice", "bob"],
                    "groups": ["staff", "admins"],
                    "scopes": ["orders:read"],
                }
            ]
        }
    )
    assert policy.decide(_user(), "GET", "/orders").rule_name == "staff of our IdP"
    for user, field in [
        (_user(issuer="https://evil.example.com"), "issuers"),
        (_user(subject="mallory"), "subjects"),
        (_user(groups=("contractors",)), "groups"),
    ]:
        decision = policy.decide(user, "GET", "/orders")
        assert (decision.allowed, decision.reason, decision.refused_by) == (False, "no_matching_rule", field)
        assert f"(refused by its {field})" in decision.detail and "user " in decision.detail


def test_a_rule_for_services_never_admits_an_end_user_and_the_reverse() -> None:
    services = meshauth.Policy.from_dict({"rules": [{"callers": ["*"]}]})
    denied = services.decide(_user(), "GET", "/orders")
    assert not denied.allowed and denied.refused_by == "callers"
    users = meshauth.Policy.from_dict({"rules": [{"issuers": ["https://idp.example.com"]}]})
    mesh = Mesh(["orders", "payments"])
    principal = meshauth.Verifier("payments", mesh.keys, clock=mesh.clock).verify(
        mesh.identity("orders").mint("payments")
    )
    refused = users.decide(principal, "GET", "/orders")
    assert not refused.allowed and refused.refused_by == "issuers"


def test_end_users_are_not_judged_by_the_delegation_rule() -> None:
    # The IdP vouches for the user: no delegators needed, unlike a service acting for someone.
    policy = meshauth.Policy.from_dict({"rules": [{"subjects": ["alice"]}]})
    assert policy.decide(_user(), "GET", "/").allowed
