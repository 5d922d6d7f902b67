"""Declarative per-route authorization: which caller may call which route.

A :class:`Policy` is loaded once (from a dict, TOML or JSON), validated and
compiled at load time, then asked for a :class:`Decision` on every request.
It is pure Python with no I/O outside :meth:`Policy.from_file`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NoReturn, TypeVar

from ._exceptions import AccessDenied, BadPath, ConfigurationError
from ._idp_tokens import UserPrincipal
from ._paths import canonical_path
from ._principal import Principal

__all__ = ["Decision", "Policy"]

_DEFAULTS: Final = ("allow", "deny")
_MODES: Final = ("audit", "enforce")
_TOP_LEVEL_KEYS: Final = ("default", "delegators", "mode", "rules")
_RULE_FIELDS: Final = ("callers", "groups", "issuers", "methods", "name", "paths", "scopes", "subjects")
# A websocket handshake is judged as this method; only a rule naming it opens a socket.
WEBSOCKET: Final = "WEBSOCKET"

# An HTTP method is an RFC 9110 token; meshauth also wants it upper case
# because methods are compared exactly ("post" is not "POST").
_METHOD_TOKEN: Final = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]+")
_ANY_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")

_CACHE_SIZE: Final = 1024
_CACHE_MAX_KEY: Final = 512

_Matcher = Callable[[str], object]


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization check.

    ``allowed`` is the effective verdict: in audit mode it is always True and
    ``would_allow`` keeps what the rules said. ``reason`` is a stable code:
    ``"allowed"``, ``"default_allow"``, ``"no_matching_rule"``,
    ``"insufficient_scope"`` (a rule would match but for missing scopes),
    ``"delegation_not_allowed"`` or ``"bad_path"``. ``rule`` is the index
    of the rule that allowed the request and ``rule_name`` its ``name`` (or
    None), ``path`` the canonical path that was matched (None when the raw
    path was refused).
    """

    allowed: bool
    would_allow: bool
    rule: int | None
    reason: str
    detail: str
    mode: str
    path: str | None
    rule_name: str | None = None
    refused_by: str | None = None
    """For ``no_matching_rule``: the field (``callers``, ``issuers``, ``subjects``, ``groups``) that
    refused the first rule matching the method and path, when one did."""

    @property
    def rule_label(self) -> str | int | None:
        """What audit records call the rule: its ``name``, else its index."""
        return self.rule_name if self.rule_name is not None else self.rule


class _InvalidPath:
    """Why a raw path was rejected; cached like a normalized path."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    """One compiled rule; a None matcher means the field was absent (matches anything)."""

    callers: _Matcher | None
    subjects: _Matcher | None
    methods: frozenset[str] | None
    paths: _Matcher | None
    scopes: frozenset[str] | None
    allowed_detail: str
    name: str | None = None
    websocket: bool = False
    caller_patterns: tuple[str, ...] = ()
    issuers: frozenset[str] | None = None
    groups: frozenset[str] | None = None


class Policy:
    """An authorization policy: which callers may call which routes, for whom.

    Rules are tried in order and the first one that matches allows the request;
    every field a rule has must match, an absent field matches anything. When no
    rule matches, ``default`` decides (``"deny"`` unless set otherwise).

    - ``callers`` / ``subjects``: shell-style globs (case-sensitive) against
      :attr:`Principal.caller` / :attr:`Principal.subject`;
    - ``methods``: exact upper-case HTTP methods, ``"*"`` for any;
    - ``paths``: globs where ``*``, ``?`` and ``[...]`` never match ``/`` and
      ``**`` matches anything, ``/`` included;
    - ``scopes``: all of them must be in :attr:`Principal.scopes`;
    - ``issuers``: exact identity-provider issuers; such a rule judges end users
      verified from an IdP token (the gateway's ``UserPrincipal``, which has an
      ``issuer`` and ``groups``), never a service;
    - ``groups``: at least one of them must be in the user's ``groups``.

    A rule with ``callers`` judges services only. An end user (a principal
    with an ``issuer``) is vouched for by the IdP, so the delegation rule below
    does not apply to it.

    A request inside a user's transaction (it came with a verified Txn-Token)
    is denied with ``"delegation_not_allowed"`` before any rule is tried,
    whatever ``default`` says, unless its immediate caller
    (:attr:`Principal.caller`) matches one of the ``delegators`` globs. Who the
    user is comes from the Txn-Token, which only a trusted issuer can sign.

    :meth:`decide` takes the *raw*, still percent-encoded request path and
    judges its canonical form (:func:`meshauth.canonical_path`, shared with
    the middlewares and the gateway): the query is dropped, only escapes of
    unreserved characters are decoded, and dot-segments are removed. Path
    patterns are written in that form (a space is ``%20``). A path that cannot
    be judged without guessing is denied with ``"bad_path"``, even when
    ``default = "allow"``: not starting with ``/``, raw non-ASCII or control
    characters, ``%2F``/``%5C``/``%00``, bad percent-encoding, ``//``, a segment
    ending in ``.``, a ``;`` in a segment, or dot-segments that climb above the
    root. ``HEAD`` is allowed wherever ``GET`` is; a websocket handshake is
    method ``WEBSOCKET`` and only a rule naming it allows one.

    ``mode = "audit"`` never denies: every decision has ``allowed=True``, while
    ``would_allow`` and ``reason`` record what enforcement would have done.
    This includes invalid paths, which are recorded as would-deny but let
    through, so turning audit on for a new policy cannot break a working app.

    Checks run in this order: path, delegation, rules, default.

    Example::

        policy = Policy.from_dict({
            "delegators": ["gateway"],
            "rules": [
                {"callers": ["orders", "billing-*"], "methods": ["POST"],
                 "paths": ["/charges", "/charges/*"], "scopes": ["charges:write"]},
            ],
        })
        decision = policy.decide(principal, "POST", "/charges/c_42?expand=1")
        decision.allowed, decision.rule, decision.path   # (True, 0, "/charges/c_42")
        policy.check(principal, "DELETE", "/charges")     # raises AccessDenied

    The policy is immutable and safe to share between threads.
    """

    __slots__ = (
        "_allow_by_default",
        "_allowed_by_default",
        "_allowed_by_rule",
        "_audit",
        "_cache",
        "_default",
        "_delegator_patterns",
        "_delegators",
        "_mode",
        "_rules",
        "_sha256",
        "_source",
    )

    def __init__(self, document: Mapping[str, Any], *, source: str = "<dict>") -> None:
        """Validate and compile ``document``; prefer the ``from_*`` constructors."""
        loaded = _load(document, source)
        self._source = source
        self._sha256 = _document_sha256(document)
        self._default: str = loaded.default
        self._mode: str = loaded.mode
        self._allow_by_default = loaded.default == "allow"
        self._audit = loaded.mode == "audit"
        self._delegator_patterns: tuple[str, ...] = loaded.delegator_patterns
        # None: no service may delegate at all.
        self._delegators: _Matcher | None = _compile_names(loaded.delegator_patterns)
        self._rules: tuple[_Rule, ...] = loaded.rules
        self._cache: dict[str, str | _InvalidPath] = {}
        # Decisions are immutable, so allowed ones are reused per (rule, path):
        # building a frozen dataclass costs more than the whole rule walk.
        self._allowed_by_rule: tuple[dict[str, Decision], ...] = tuple({} for _ in self._rules)
        self._allowed_by_default: dict[str, Decision] = {}

    # -- construction ------------------------------------------------------

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Build a policy from a mapping; raise ConfigurationError if it is invalid."""
        return cls(document, source=source)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Policy:
        """Build a policy from a TOML document (rules as ``[[rules]]`` tables)."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message carries "(at line N, column M)", except for an
            # error at the very end ("Unclosed array (at end of document)").
            message = str(exc)
            if "line" not in message:
                last_line = text.count("\n") + 1
                message += f" (the document ends at line {last_line})"
            _fail(source, "", f"invalid TOML: {message}")
        return cls(document, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> Policy:
        """Build a policy from a JSON document; duplicate keys are rejected."""
        try:
            document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as exc:
            _fail(source, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        except _DuplicateKeyError as exc:
            _fail(source, "", f"invalid JSON: duplicate key {exc.key!r}")
        if not isinstance(document, dict):
            _fail(source, "", f"expected a JSON object, found {_type_name(document)}")
        return cls(document, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a ``.toml`` or ``.json`` policy file, chosen by its suffix."""
        source = os.fspath(path)
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in (".toml", ".json"):
            _fail(source, "", f"expected a .toml or .json file, found suffix {suffix or 'none'!r}")
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            _fail(source, "", f"cannot read policy file: {exc.strerror or exc}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(source, "", f"not UTF-8 (byte offset {exc.start})")
        if suffix == ".toml":
            return cls.from_toml(text, source=source)
        return cls.from_json(text, source=source)

    # -- read-only view ----------------------------------------------------

    @property
    def default(self) -> str:
        """``"allow"`` or ``"deny"``: the verdict when no rule matches."""
        return self._default

    @property
    def mode(self) -> str:
        """``"enforce"`` or ``"audit"``."""
        return self._mode

    @property
    def delegators(self) -> tuple[str, ...]:
        """The globs of services allowed to call on behalf of someone else."""
        return self._delegator_patterns

    @property
    def sha256(self) -> str:
        """The SHA-256 (hex) of the policy document, canonical JSON: audit records name it."""
        return self._sha256

    @property
    def source(self) -> str:
        """Where the policy was loaded from, as named in error messages."""
        return self._source

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return (
            f"Policy(source={self._source!r}, default={self._default!r}, mode={self._mode!r}, rules={len(self._rules)})"
        )

    # -- decisions -----------------------------------------------------------

    def decide(self, principal: Principal | UserPrincipal, method: str, raw_path: str) -> Decision:
        """Decide whether ``principal`` may call ``method raw_path``; never raises.

        ``raw_path`` is the request target as received, still percent-encoded
        (ASGI ``raw_path``, the path of WSGI ``REQUEST_URI``); a ``?query`` is
        ignored.
        """
        # Long on purpose: the rules are tried in order and the first match wins, so the loop and
        # the bookkeeping of why earlier rules refused (the denial's reason) read best in one place.
        normalized = self._normalize(raw_path)
        if isinstance(normalized, _InvalidPath):
            return self._deny("bad_path", normalized.detail, None)

        # An end user from an identity provider (the gateway's UserPrincipal) has an
        # issuer and groups and no caller; a service's Principal has neither.
        subject = principal.subject
        if isinstance(principal, UserPrincipal):
            issuer, caller, groups = principal.issuer, None, principal.groups
        else:
            issuer, caller, groups = None, principal.caller, _NO_GROUPS
            in_transaction = principal.transaction is not None or subject != caller
            refused = self._refused_delegation(principal) if in_transaction else None
            if refused is not None:
                return self._deny("delegation_not_allowed", refused, normalized)
        # The field that refused the first rule matching method and path.
        refused_by: str | None = None
        # Scopes a rule wanted that the token lacked, when that rule matched in
        # every other respect: the denial is then "insufficient_scope" (RFC 6750).
        shortfall: frozenset[str] | None = None
        for index, rule in enumerate(self._rules):
            # Cheapest and most selective checks first.
            if rule.methods is not None and method not in rule.methods:
                continue
            if method == WEBSOCKET and not rule.websocket:
                continue  # a two-way socket needs a rule that names it
            if rule.callers is not None and (caller is None or not rule.callers(caller)):
                if refused_by is None and (rule.paths is None or rule.paths(normalized)):
                    refused_by = "callers"
                continue
            if rule.paths is not None and not rule.paths(normalized):
                continue
            if rule.issuers is not None and issuer not in rule.issuers:
                refused_by = refused_by or "issuers"
                continue
            if rule.subjects is not None and not rule.subjects(subject):
                refused_by = refused_by or "subjects"
                continue
            if rule.groups is not None and rule.groups.isdisjoint(groups):
                refused_by = refused_by or "groups"
                continue
            if rule.scopes is not None and not rule.scopes <= principal.scopes:
                if shortfall is None:
                    shortfall = rule.scopes - principal.scopes
                continue
            known = self._allowed_by_rule[index]
            decision = known.get(normalized)
            if decision is None:
                decision = Decision(
                    True, True, index, "allowed", rule.allowed_detail, self._mode, normalized, rule.name
                )
                _remember(known, normalized, decision)
            return decision

        return self._no_rule(principal, method, normalized, shortfall, refused_by)

    def _no_rule(
        self,
        principal: Principal | UserPrincipal,
        method: str,
        normalized: str,
        shortfall: frozenset[str] | None,
        refused_by: str | None,
    ) -> Decision:
        """The decision when no rule allowed the request: the default, or a denial that says why."""
        subject = principal.subject
        issuer = principal.issuer if isinstance(principal, UserPrincipal) else None
        caller = principal.caller if isinstance(principal, Principal) else None
        if self._allow_by_default:
            decision = self._allowed_by_default.get(normalized)
            if decision is None:
                decision = Decision(
                    True,
                    True,
                    None,
                    "default_allow",
                    "no rule matched; default is allow",
                    self._mode,
                    normalized,
                )
                _remember(self._allowed_by_default, normalized, decision)
            return decision
        if shortfall is not None:
            missing = " ".join(sorted(shortfall))
            return self._deny(
                "insufficient_scope",
                f"caller {_clip(caller)} may {_clip(method)} {_clip(normalized)} "
                f"only with scopes it lacks: {_clip(missing)}",
                normalized,
            )
        who = f"caller {_clip(caller)}" if issuer is None else f"user {_clip(subject)} of {_clip(issuer)}"
        detail = (
            f"no rule allows {who}"
            + (f" for subject {_clip(subject)}" if issuer is None and subject != caller else "")
            + f" to {_clip(method)} {_clip(normalized)}"
            + (f" (refused by its {refused_by})" if refused_by else "")
        )
        return self._deny("no_matching_rule", detail, normalized, refused_by)

    def check(self, principal: Principal | UserPrincipal, method: str, raw_path: str) -> Decision:
        """Like :meth:`decide`, but raise AccessDenied when the request is not allowed.

        The exception's ``reason`` is the decision's reason code.
        """
        decision = self.decide(principal, method, raw_path)
        if not decision.allowed:
            raise AccessDenied(decision.detail, reason=decision.reason)
        return decision

    def unknown_callers(self, services: Iterable[str]) -> list[str]:
        """What in this policy names a caller the registry has no key for, with suggestions.

        ``services`` are the names that own keys (e.g. the registry's ``iss``
        values). A literal name not among them, or a glob matching none of them,
        is most likely a typo: such a rule can never match.

        >>> policy = Policy.from_dict({"rules": [{"callers": ["ordres"]}]})
        >>> policy.unknown_callers(["orders", "payments"])
        ["rules[0].callers: 'ordres' has no key in the registry (did you mean 'orders'?)"]
        """
        known = sorted(set(services))
        named = [(f"rules[{i}].callers", rule.caller_patterns) for i, rule in enumerate(self._rules)]
        named.append(("delegators", self._delegator_patterns))
        problems: list[str] = []
        for where, patterns in named:
            for pattern in patterns:
                if _has_magic(pattern):
                    if not any(fnmatch.fnmatchcase(service, pattern) for service in known):
                        problems.append(f"{where}: {pattern!r} matches no service in the registry")
                elif pattern not in known:
                    close = difflib.get_close_matches(pattern, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    problems.append(f"{where}: {pattern!r} has no key in the registry{hint}")
        return problems

    def _deny(self, reason: str, detail: str, path: str | None, refused_by: str | None = None) -> Decision:
        return Decision(self._audit, False, None, reason, detail, self._mode, path, refused_by=refused_by)

    def _refused_delegation(self, principal: Principal) -> str | None:
        """Why a request inside a transaction is refused, or None if its immediate caller may act in one."""
        delegators = self._delegators
        who = f"{_clip(principal.caller)} acting for {_clip(principal.subject)}"
        if delegators is None:
            return f"{who} inside a transaction: no delegators are allowed"
        if principal.transaction is None:
            return f"{who} without a transaction"  # a verified Principal never gets here
        if not delegators(principal.caller):
            return f"{who}: {_clip(principal.caller)} is not among the delegators {list(self._delegator_patterns)!r}"
        return None

    def _normalize(self, raw_path: str) -> str | _InvalidPath:
        query = raw_path.find("?")
        if query >= 0:
            raw_path = raw_path[:query]
        hit = self._cache.get(raw_path)
        if hit is not None:
            return hit
        result = _normalize_path(raw_path)
        _remember(self._cache, raw_path, result)
        return result


_V = TypeVar("_V")


_NO_GROUPS: Final[frozenset[str]] = frozenset()


def _remember(cache: dict[str, _V], key: str, value: _V) -> None:
    """Store in a small bounded cache; long keys are not kept.

    Long keys are skipped so that a flood of huge unique paths cannot pin
    megabytes. A full cache is cleared rather than trimmed: that needs no
    iteration over a dict another thread may be writing to.
    """
    if len(key) > _CACHE_MAX_KEY:
        return
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value


# -- path normalization --------------------------------------------------------


def _normalize_path(path: str) -> str | _InvalidPath:
    try:
        return canonical_path(path)
    except BadPath as exc:
        return _InvalidPath(exc.detail)


# -- loading -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Loaded:
    default: str
    mode: str
    delegator_patterns: tuple[str, ...]
    rules: tuple[_Rule, ...]


def _load(document: Mapping[str, Any], source: str) -> _Loaded:
    if not isinstance(document, Mapping):
        _fail(source, "", f"expected a mapping, found {_type_name(document)}")
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            _fail(
                source,
                "",
                f"unknown key {_clip(key)} (expected one of {', '.join(_TOP_LEVEL_KEYS)})",
            )

    default = _choice(document.get("default", "deny"), _DEFAULTS, source, "default")
    mode = _choice(document.get("mode", "enforce"), _MODES, source, "mode")

    delegators: tuple[str, ...] = ()
    if "delegators" in document:
        # Unlike a rule field, an empty list is meaningful here: nobody may delegate.
        delegators = _string_list(document["delegators"], source, "delegators", allow_empty=True)

    raw_rules = document.get("rules", [])
    if not isinstance(raw_rules, (list, tuple)):
        _fail(source, "rules", f"expected a list of rules, found {_type_name(raw_rules)}")
    rules = tuple(_load_rule(raw, source, f"rules[{index}]", index) for index, raw in enumerate(raw_rules))
    return _Loaded(default, mode, delegators, rules)


def _load_rule(raw: object, source: str, where: str, index: int) -> _Rule:
    if not isinstance(raw, Mapping):
        _fail(source, where, f"expected a table of rule fields, found {_type_name(raw)}")
    for key in raw:
        if key not in _RULE_FIELDS:
            _fail(
                source,
                where,
                f"unknown field {_clip(key)} (expected one of {', '.join(_RULE_FIELDS)})",
            )

    callers: _Matcher | None = None
    subjects: _Matcher | None = None
    paths: _Matcher | None = None
    methods: frozenset[str] | None = None
    scopes: frozenset[str] | None = None
    caller_patterns: tuple[str, ...] = ()
    if "callers" in raw:
        caller_patterns = _string_list(raw["callers"], source, f"{where}.callers")
        callers = _compile_names(caller_patterns)
    if "subjects" in raw:
        subjects = _compile_names(_string_list(raw["subjects"], source, f"{where}.subjects"))
    websocket = False
    if "methods" in raw:
        methods = _load_methods(raw["methods"], source, f"{where}.methods")
        websocket = WEBSOCKET in raw["methods"]
    if "paths" in raw:
        paths = _compile_paths(_string_list(raw["paths"], source, f"{where}.paths"), source, f"{where}.paths")
    name: str | None = None
    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            _fail(source, f"{where}.name", f"expected a rule name of 1 to 128 characters, found {_clip(name)}")
    issuers = frozenset(_string_list(raw["issuers"], source, f"{where}.issuers")) if "issuers" in raw else None
    groups = frozenset(_string_list(raw["groups"], source, f"{where}.groups")) if "groups" in raw else None
    if "scopes" in raw:
        scope_list = _string_list(raw["scopes"], source, f"{where}.scopes")
        for scope in scope_list:
            if " " in scope:
                _fail(
                    source,
                    f"{where}.scopes",
                    f"expected single scopes without spaces, found {scope!r}",
                )
        scopes = frozenset(scope_list)
    label = f"rule {name!r}" if name is not None else f"rules[{index}]"
    return _Rule(
        callers,
        subjects,
        methods,
        paths,
        scopes,
        f"allowed by {label}",
        name,
        websocket,
        caller_patterns,
        issuers,
        groups,
    )


def _load_methods(value: object, source: str, where: str) -> frozenset[str] | None:
    methods = _string_list(value, source, where)
    for method in methods:
        if method == "*":
            continue
        if not _METHOD_TOKEN.fullmatch(method):
            if _ANY_TOKEN.fullmatch(method):
                _fail(source, where, f"expected upper-case HTTP methods, found {method!r}")
            _fail(source, where, f"expected HTTP method names (or '*'), found {method!r}")
    if "*" in methods:
        return None
    if "GET" in methods:
        # Routers answer HEAD wherever they answer GET (health probes use it).
        methods = (*methods, "HEAD")
    return frozenset(methods)


def _compile_names(patterns: Sequence[str]) -> _Matcher | None:
    """Compile service or subject globs into one matcher; None when nothing is listed."""
    if not patterns:
        return None
    if "*" in patterns:
        return _match_any
    globs = [p for p in patterns if _has_magic(p)]
    regex = re.compile("|".join(fnmatch.translate(p) for p in globs)).match if globs else None
    return _literal_or_glob(frozenset(p for p in patterns if not _has_magic(p)), regex)


def _literal_or_glob(literals: frozenset[str], regex: _Matcher | None) -> _Matcher:
    # Most entries are plain names or paths: a set lookup is several times
    # cheaper than a regex match, so the regex only sees what the set missed.
    if regex is None:
        return literals.__contains__
    if not literals:
        return regex
    contains = literals.__contains__

    def match(value: str) -> bool:
        return contains(value) or regex(value) is not None

    return match


def _match_any(_: str) -> bool:
    return True


def _document_sha256(document: Mapping[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=list)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _compile_paths(patterns: Sequence[str], source: str, where: str) -> _Matcher:
    for pattern in patterns:
        problem = _path_pattern_problem(pattern)
        if problem:
            _fail(source, where, f"{problem}, found {pattern!r}")
    parts: list[str] = []
    for pattern in patterns:
        if not _has_magic(pattern):
            continue
        try:
            part = _translate_path_glob(pattern)
            # Compiled alone first so that an error names the pattern at fault.
            re.compile(part)
        except (ValueError, re.error) as exc:
            message = exc.msg if isinstance(exc, re.error) else str(exc)
            _fail(source, where, f"invalid path pattern: {message}, found {pattern!r}")
        parts.append(part)
    # One regex per rule: a single C-level match per request, however many patterns.
    regex = re.compile("(?s:" + "|".join(parts) + ")").fullmatch if parts else None
    return _literal_or_glob(frozenset(p for p in patterns if not _has_magic(p)), regex)


def _path_pattern_problem(pattern: str) -> str | None:
    """Reject patterns no normalized path can ever match: they are mistakes."""
    if not pattern.startswith("/"):
        return "expected path patterns starting with '/'"
    if "\\" in pattern or "\x00" in pattern:
        return "path patterns cannot contain a backslash or NUL (such paths are refused)"
    if any(segment in (".", "..") for segment in pattern.split("/")):
        return "path patterns cannot contain '.' or '..' segments (paths are matched without them)"
    if pattern != "/" and (pattern.endswith("/") or "//" in pattern):
        return (
            "path patterns cannot end with '/' or hold an empty segment "
            "(write '/invoices' or '/invoices/**', not '/invoices/')"
        )
    return None


def _translate_path_glob(pattern: str) -> str:
    """Translate a path glob to a regex: ``*``, ``?``, ``[...]`` stop at ``/``; ``**`` does not."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            out.append(".*" if j - i > 1 else "[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] in "!^"
            if negate:
                j += 1
            start = j
            if j < n and pattern[j] == "]":  # a leading "]" is literal, as in fnmatch
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise ValueError("unclosed '['")
            body = pattern[start:j]
            if "/" in body:
                raise ValueError("a '[...]' class cannot match '/'")
            out.append(("[^/" if negate else "[") + _class_body(body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _class_body(body: str) -> str:
    # Escape every character except the "-" of a range, so that nothing in the
    # pattern can be read as regex syntax (or trip re's nested-set warnings).
    out: list[str] = []
    k, n = 0, len(body)
    while k < n:
        if k + 2 < n and body[k + 1] == "-":
            out.append(re.escape(body[k]) + "-" + re.escape(body[k + 2]))
            k += 3
        else:
            out.append(re.escape(body[k]))
            k += 1
    return "".join(out)


def _choice(value: object, allowed: tuple[str, ...], source: str, where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        expected = " or ".join(repr(a) for a in allowed)
        _fail(source, where, f"expected {expected}, found {_clip(value)}")
    return value


def _string_list(value: object, source: str, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        _fail(source, where, f"expected a list of strings, found {_type_name(value)} {_clip(value)}")
    if not value and not allow_empty:
        _fail(source, where, "expected a non-empty list (an empty list can never match)")
    for item in value:
        if not isinstance(item, str) or not item:
            _fail(source, where, f"expected non-empty strings, found {_type_name(item)} {_clip(item)}")
    return tuple(value)


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A policy with two "default" keys is ambiguous; json would keep the last.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _fail(source: str, where: str, message: str) -> NoReturn:
    place = f"{source}: {where}: " if where else f"{source}: "
    raise ConfigurationError(place + message, reason="invalid_policy")


def _type_name(value: object) -> str:
    return type(value).__name__


def _clip(value: object, limit: int = 80) -> str:
    """Render a value for a message, bounded so hostile input cannot bloat logs."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
