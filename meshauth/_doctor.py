"""``meshauth doctor``: check a service's settings and say what to fix, one line per check.

The settings are those of :meth:`ServiceIdentity.from_env` (``MESHAUTH_SERVICE``,
``MESHAUTH_KEY_FILE``, ``MESHAUTH_KEY_PASSWORD``) plus ``MESHAUTH_REGISTRY`` and
``MESHAUTH_POLICY``; flags override them. Each check yields a :class:`Check`; a
check whose input is missing or failed earlier is skipped, never guessed.
"""

from __future__ import annotations

import dataclasses
import difflib
import email.utils
import fnmatch
import json
import os
import stat
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import httpx

from ._exceptions import ConfigurationError, MeshAuthError
from ._keys import KeyRecord, SigningKey
from ._policy import Policy
from ._registry import KeySet

__all__ = ["Check", "DoctorSettings", "report_lines", "run_checks"]

OK: Final = "ok"
FAIL: Final = "fail"
SKIP: Final = "skip"
CLOCK_TOLERANCE: Final = 30  # the verifiers' default leeway, in seconds
_WELL_KNOWN: Final = "/.well-known/jwks.json"
_MAX_REGISTRY_BYTES: Final = 16 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: what was checked, how it went, and how to fix it."""

    name: str
    status: str
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


def report_lines(checks: Sequence[Check], clean: Callable[[object], str] = str) -> list[str]:
    """The report for people: ``STATUS  name  message`` aligned, and a ``fix:`` line under a failure."""
    width = max((len(check.name) for check in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():<4}  {check.name:<{width}}  {clean(check.message)}")
        if check.fix:
            lines.append(f"      {'':<{width}}  fix: {clean(check.fix)}")
    return lines


@dataclasses.dataclass(frozen=True, slots=True)
class DoctorSettings:
    """What to check; ``None`` means "not configured"."""

    service: str | None
    key_file: str | None
    password: str | None
    registry: str | None
    policy: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: str | None) -> DoctorSettings:
        values = {
            "service": environ.get("MESHAUTH_SERVICE") or None,
            "key_file": environ.get("MESHAUTH_KEY_FILE") or None,
            "password": environ.get("MESHAUTH_KEY_PASSWORD") or None,
            "registry": environ.get("MESHAUTH_REGISTRY") or None,
            "policy": environ.get("MESHAUTH_POLICY") or None,
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True)
class _Registry:
    keys: KeySet
    date: float | None  # the server's Date header (HTTP registries)
    fetched_at: float
    freshness: Check


def run_checks(settings: DoctorSettings, *, clock: Callable[[], float] = time.time) -> list[Check]:
    """Every check, in order; the report is the list."""
    return list(_checks(settings, clock))


def _checks(settings: DoctorSettings, clock: Callable[[], float]) -> Iterator[Check]:
    service = settings.service
    if service:
        yield Check("service", OK, f"service name {service!r}")
    else:
        yield Check("service", FAIL, "no service name", "set MESHAUTH_SERVICE (or --service) to this service's name")
    key, check = _key_check(settings)
    yield check
    if key is not None and settings.key_file is not None:
        yield _mode_check(settings.key_file)
    registry, check = _registry_check(settings.registry, clock)
    yield check
    if registry is None:
        yield from (Check(name, SKIP, "no registry to check against") for name in ("key in registry", "clock"))
    else:
        yield registry.freshness
        yield _key_in_registry(key, service, settings, registry.keys, clock())
        yield _clock_check(registry)
    yield _policy_check(settings.policy, registry.keys if registry is not None else None)


def _key_check(settings: DoctorSettings) -> tuple[SigningKey | None, Check]:
    path = settings.key_file
    name = settings.service or "NAME"
    keygen = f"meshauth keygen --service {name} --out {os.path.dirname(path or '') or 'keys'}"
    if not path:
        return None, Check("key file", FAIL, "MESHAUTH_KEY_FILE is not set", f"create a key with `{keygen}`")
    if not os.path.exists(path):
        return None, Check("key file", FAIL, f"{path} does not exist", f"create it with `{keygen}`")
    try:
        key = SigningKey.from_file(path, settings.password)
    except ConfigurationError as exc:
        return None, Check(
            "key file",
            FAIL,
            f"{path} is not a usable private key: {exc.detail}",
            "set MESHAUTH_KEY_PASSWORD if the PEM is encrypted, or create a new key with " + f"`{keygen}`",
        )
    return key, Check("key file", OK, f"{path}: {key.alg} key {key.kid}")


def _mode_check(path: str) -> Check:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return Check(
            "key file mode",
            FAIL,
            f"{path} is mode {mode:04o}: other users can read the private key",
            f"chmod 600 {path}",
        )
    return Check("key file mode", OK, f"{path} is mode {mode:04o}")


def _registry_check(location: str | None, clock: Callable[[], float]) -> tuple[_Registry | None, Check]:
    if not location:
        return None, Check("registry", FAIL, "no registry configured", "set MESHAUTH_REGISTRY (or --registry)")
    if location.startswith(("http://", "https://")):
        return _http_registry(location, clock)
    if location.startswith(("redis://", "rediss://")):
        return None, Check(
            "registry",
            SKIP,
            "a Redis registry is not checked here",
            f"list its keys with `meshauth registry --redis {_without_credentials(location)} list`",
        )
    try:
        with open(location, "rb") as handle:
            data = handle.read(_MAX_REGISTRY_BYTES)
        keys = KeySet.from_jwks(data, source=location)
    except OSError as exc:
        return None, Check("registry", FAIL, f"cannot read {location}: {exc.strerror}", "check MESHAUTH_REGISTRY")
    except MeshAuthError as exc:
        return None, Check("registry", FAIL, f"{location} is not a valid registry: {exc}", "fix or re-export the file")
    age = clock() - os.stat(location).st_mtime
    freshness = Check("registry freshness", OK, f"{location} last changed {_seconds(age)} ago")
    return _Registry(keys, None, clock(), freshness), Check("registry", OK, f"{location}: {len(keys)} keys")


def _http_registry(url: str, clock: Callable[[], float]) -> tuple[_Registry | None, Check]:
    try:
        response = httpx.get(url, timeout=5.0, follow_redirects=False)
    except httpx.HTTPError as exc:
        return None, Check(
            "registry", FAIL, f"{url} is unreachable ({type(exc).__name__})", "check the URL and that it is served"
        )
    fetched_at = clock()
    if response.status_code != 200:
        fix = "check the URL"
        if not url.endswith(_WELL_KNOWN):
            fix += f" (registries are usually served at {_WELL_KNOWN})"
        return None, Check("registry", FAIL, f"{url} answered HTTP {response.status_code}", fix)
    try:
        keys = KeySet.from_jwks(response.content[:_MAX_REGISTRY_BYTES], source=url)
    except MeshAuthError as exc:
        return None, Check(
            "registry", FAIL, f"{url} did not serve a valid registry: {exc}", "check what the URL serves"
        )
    return _Registry(keys, _http_date(response), fetched_at, _http_freshness(url, response)), Check(
        "registry", OK, f"{url}: {len(keys)} keys"
    )


def _http_freshness(url: str, response: httpx.Response) -> Check:
    cache_control = response.headers.get("cache-control", "")
    max_age = next(
        (int(part.split("=", 1)[1]) for part in cache_control.split(",") if part.strip().startswith("max-age=")),
        None,
    )
    age_header = response.headers.get("age", "0")
    age = int(age_header) if age_header.isdigit() else 0
    if max_age is not None and age > max_age:
        return Check(
            "registry freshness",
            FAIL,
            f"{url} came from a cache {age} s old, past its max-age={max_age}",
            "purge or fix the cache in front of the registry: revocations are not reaching verifiers",
        )
    served = f"max-age={max_age}" if max_age is not None else "no max-age (verifiers use their default)"
    return Check("registry freshness", OK, f"served with {served}, age {age} s")


def _http_date(response: httpx.Response) -> float | None:
    value = response.headers.get("date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _key_in_registry(
    key: SigningKey | None, service: str | None, settings: DoctorSettings, keys: KeySet, now: float
) -> Check:
    if key is None:
        return Check("key in registry", SKIP, "no usable key file")
    record = keys.get(key.kid)
    add = f"meshauth registry add {settings.registry} --key {settings.key_file} --service {service or 'NAME'}"
    if record is None:
        return Check("key in registry", FAIL, f"key {key.kid} is not in the registry", f"publish it: `{add}`")
    if service and record.owner != service:
        return Check(
            "key in registry",
            FAIL,
            f"key {key.kid} is registered to {record.owner!r}, not {service!r}",
            "use this service's own key file, or fix the key's 'iss' in the registry",
        )
    return _validity(record, now, add)


def _validity(record: KeyRecord, now: float, add: str) -> Check:
    if record.expires is not None and now > record.expires:
        return Check(
            "key in registry",
            FAIL,
            f"key {record.kid} of {record.owner!r} expired {_iso(record.expires)} "
            f"({_seconds(now - record.expires)} ago)",
            f"create a new key and publish it: `meshauth keygen --service {record.owner}` then `{add}`",
        )
    if record.not_before is not None and now < record.not_before:
        return Check(
            "key in registry",
            FAIL,
            f"key {record.kid} of {record.owner!r} is valid only from {_iso(record.not_before)}",
            "wait, or sign with the current key until then",
        )
    until = f", valid until {_iso(record.expires)}" if record.expires is not None else ""
    return Check("key in registry", OK, f"key {record.kid} is registered to {record.owner!r}{until}")


def _clock_check(registry: _Registry) -> Check:
    if registry.date is None:
        return Check("clock", SKIP, "the registry is a file (or sent no Date header): no clock to compare with")
    # The Date header has one-second resolution: allow that on top of the tolerance.
    skew = registry.fetched_at - registry.date
    if abs(skew) > CLOCK_TOLERANCE + 1:
        direction = "ahead of" if skew > 0 else "behind"
        return Check(
            "clock",
            FAIL,
            f"this host's clock is {abs(skew):.0f} s {direction} the registry server's "
            f"(verifiers allow {CLOCK_TOLERANCE} s)",
            "synchronise the clocks (NTP, e.g. `timedatectl set-ntp true`)",
        )
    return Check("clock", OK, f"within {abs(skew):.0f} s of the registry server's clock")


def _policy_check(path: str | None, keys: KeySet | None) -> Check:
    if not path:
        return Check("policy", SKIP, "no policy configured (MESHAUTH_POLICY or --policy)")
    try:
        policy = Policy.from_file(path)
    except (OSError, MeshAuthError, ValueError) as exc:
        return Check("policy", FAIL, f"{path} does not load: {exc}", "fix the file (see docs/inbound.md, Policy)")
    if keys is None:
        return Check("policy", OK, f"{path}: {len(policy)} rules (callers not checked: no registry)")
    owners = sorted({record.owner for record in keys})
    unknown = [name for name in _caller_names(path) if not any(fnmatch.fnmatchcase(o, name) for o in owners)]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, owners, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return Check(
            "policy",
            FAIL,
            f"{path} names callers with no key in the registry: {', '.join(hints)}",
            "fix the names in the policy, or publish those services' keys",
        )
    return Check("policy", OK, f"{path}: {len(policy)} rules; every caller has a key in the registry")


def _caller_names(path: str) -> list[str]:
    with open(path, "rb") as handle:
        data = handle.read()
    document: Any = tomllib.loads(data.decode("utf-8")) if path.lower().endswith(".toml") else json.loads(data)
    names: list[str] = []
    for rule in document.get("rules", ()) if isinstance(document, Mapping) else ():
        callers = rule.get("callers", ()) if isinstance(rule, Mapping) else ()
        names.extend(c for c in callers if isinstance(c, str) and c not in names)
    return names


def _without_credentials(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
