"""The gateway's configuration file: parsed once, validated strictly, frozen.

Every problem is a start-up error (:class:`~meshauth.ConfigurationError`,
reason ``invalid_config``) whose message names the file and the key, e.g.
``gateway.toml: routes[1].upstream: expected an http(s) URL, found 'ftp://x'``.
Relative paths resolve against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from .._discovery import discovery_url
from .._exceptions import ConfigurationError
from .._idp_keys import IDP_ALGORITHMS, IdPKeyParser
from .._idp_tokens import DEFAULT_IDP_TOKEN_BYTES
from .._jwks_http import check_url
from .._keys import SigningKey
from .._names import service_name_problem
from .._registry import JWKSFile
from ._forwarded import DEFAULT_MAX_HOPS
from ._server_config import Limits, TelemetrySettings, parse_limits, parse_telemetry, parse_workers

__all__ = [
    "IDP_ALGORITHMS",
    "GatewayConfig",
    "IssuerConfig",
    "RouteConfig",
    "Timeout",
    "is_url",
    "load_config",
    "parse_config",
]

REASON: Final = "invalid_config"
DEFAULT_LISTEN: Final = "127.0.0.1:8080"
DEFAULT_MAX_TOKEN_BYTES: Final = 8192
DEFAULT_NAMESPACE: Final = "meshauth"
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_LEEWAY: Final = 300
_MAX_TIMEOUT: Final = 3600.0

_TOP_LEVEL: Final = (
    "audit_log",
    "issuers",
    "key_file",
    "limits",
    "listen",
    "max_forwarded_hops",
    "max_token_bytes",
    "registry",
    "registry_namespace",
    "routes",
    "service",
    "telemetry",
    "timeout",
    "trusted_proxies",
    "workers",
)
_ISSUER_KEYS: Final = (
    "algorithms",
    "audience",
    "audience_claim",
    "discovery",
    "groups_claim",
    "issuer",
    "jwks",
    "leeway",
    "max_token_bytes",
    "require",
    "scope_claims",
)
_CLAIM_PATH: Final = re.compile(r"[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*")
_ROUTE_KEYS: Final = (
    "accept_service_tokens",
    "callers",
    "forward_user_token",
    "groups",
    "issuers",
    "methods",
    "prefix",
    "scopes",
    "service",
    "strip_prefix",
    "subjects",
    "timeout",
    "upstream",
)
_TIMEOUT_KEYS: Final = ("connect", "read")
# An upper-case RFC 9110 method token.
_METHOD: Final = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~-]+")
# A prefix is plain path segments: nothing a normalized path could not start with.
_PREFIX_SEGMENT: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]+")
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclasses.dataclass(frozen=True, slots=True)
class Timeout:
    """Upstream timeouts in seconds: connecting, and waiting for each read or write."""

    connect: float = 5.0
    read: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One external identity provider whose user tokens the gateway accepts (DESIGN section 8)."""

    issuer: str
    jwks: str
    """An absolute file path or an http(s) URL; empty with ``discovery``."""
    audience: str | tuple[str, ...]
    """The audience the gateway expects; with several, any one of them."""
    algorithms: tuple[str, ...]
    leeway: float = 30.0
    discovery: bool = False
    """Find the key set's URL in ``<issuer>/.well-known/openid-configuration`` (OpenID Connect discovery)."""
    audience_claim: str = "aud"
    """The claim holding the audience: ``client_id`` for Cognito access tokens."""
    groups_claim: str = "groups"
    """A dotted path: ``realm_access.roles`` (Keycloak), ``cognito:groups``, ``roles`` (Entra app roles)."""
    scope_claims: tuple[str, ...] = ("scope", "scp")
    """Claims whose values together are the user's scopes (Auth0 adds ``permissions``)."""
    require: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Exact claim values a token must carry (a list allows any of them): ``{"token_use": "access"}``."""
    max_token_bytes: int = DEFAULT_IDP_TOKEN_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: a path prefix, the upstream behind it and who may use it.

    ``None`` in a list field means "not restricted" (the key was absent).
    """

    prefix: str
    upstream: str
    service: str
    methods: tuple[str, ...] | None = None
    issuers: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    scopes: tuple[str, ...] | None = None
    callers: tuple[str, ...] | None = None
    strip_prefix: bool = False
    accept_service_tokens: bool = False
    forward_user_token: bool = False
    timeout: Timeout | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole gateway configuration (see DESIGN section 8 and ``docs/gateway.md``).

    Build it with :func:`load_config` (a TOML file) or :func:`parse_config`
    (a mapping); both validate everything and load the signing key, so a
    value of this class is ready to serve.

    >>> import meshauth
    >>> from meshauth.gateway import GatewayConfig, IssuerConfig, RouteConfig
    >>> config = GatewayConfig(
    ...     service="gateway", key_file="unused.pem", registry="registry.json",
    ...     issuers=(IssuerConfig("https://idp.example.com", "idp.json", "api", ("RS256",)),),
    ...     routes=(RouteConfig("/orders", "http://127.0.0.1:8001", "orders"),),
    ...     signing_key=meshauth.SigningKey.generate())
    >>> config.listen
    '127.0.0.1:8080'
    """

    service: str
    key_file: str | None
    """The gateway's signing key; ``None`` with a Redis registry (each process then publishes its own)."""
    registry: str = dataclasses.field(repr=False)
    """An absolute file path, an http(s) URL or a ``redis://`` URL (which may hold a password: not in the repr)."""
    issuers: tuple[IssuerConfig, ...]
    routes: tuple[RouteConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    audit_log: str | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_forwarded_hops: int = DEFAULT_MAX_HOPS
    timeout: Timeout = Timeout()
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    source: str = "<config>"
    workers: int = 1
    limits: Limits = dataclasses.field(default_factory=Limits)
    telemetry: TelemetrySettings = dataclasses.field(default_factory=TelemetrySettings)
    signing_key: SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)
    registry_namespace: str = "meshauth"
    """The namespace of a Redis registry."""

    @property
    def listen(self) -> str:
        """``host:port`` as written in the configuration (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def issuer(self, name: str) -> IssuerConfig | None:
        """The issuer configured under ``name``, if any."""
        for issuer in self.issuers:
            if issuer.issuer == name:
                return issuer
        return None


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway TOML file; raise ``ConfigurationError`` naming key and file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        _fail(source, "", f"cannot read the configuration file: {exc.strerror or exc}")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        _fail(source, "", f"not UTF-8 (byte offset {exc.start})")
    except tomllib.TOMLDecodeError as exc:
        _fail(source, "", f"invalid TOML: {exc}")
    return parse_config(document, source=source, base_dir=Path(source).resolve().parent)


def parse_config(
    document: Mapping[str, Any],
    *,
    source: str = "<config>",
    base_dir: str | os.PathLike[str] = ".",
    check_files: bool = True,
) -> GatewayConfig:
    """Validate a configuration mapping (the TOML document's shape).

    With ``check_files`` (the default) the signing key, the registry file and
    the issuers' JWKS files are read now, so that a missing or unreadable one
    fails at start-up rather than on the first request.
    """
    loader = _Loader(source, Path(base_dir).resolve())
    return loader.load(document, check_files=check_files)


def issuer_key_parser(issuer: IssuerConfig) -> IdPKeyParser:
    """How the issuer's JWKS is read: keys owned by the issuer, for its algorithms only."""
    return IdPKeyParser(issuer.issuer, issuer.algorithms)


def is_redis(value: str) -> bool:
    """Whether a ``registry`` value names a Redis server (DESIGN section 10)."""
    return value.startswith(("redis://", "rediss://", "unix://"))


def is_url(value: str) -> bool:
    """Whether a ``registry`` or ``jwks`` value names a URL rather than a file."""
    return value.startswith(("http://", "https://")) or "://" in value[:16]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is the local machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Loader:
    """Validation state: the file name for messages and the base for relative paths."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, where: str, message: str) -> NoReturn:
        _fail(self.source, where, message)

    # -- the document ------------------------------------------------------------

    def load(self, document: Mapping[str, Any], *, check_files: bool) -> GatewayConfig:
        if not isinstance(document, Mapping):
            self.fail("", f"expected a table, found {_type_name(document)}")
        self.unknown_keys(document, _TOP_LEVEL, "")
        for required in ("service", "registry", "issuers", "routes"):
            if required not in document:
                self.fail(required, "this key is required")
        host, port = self.listen(document.get("listen", DEFAULT_LISTEN))
        service = self.name(document["service"], "service")
        registry, namespace = self.registry(document)
        key_file = None if is_redis(registry) else self.path(document.get("key_file"), "key_file")
        audit_log = self.path(document["audit_log"], "audit_log") if "audit_log" in document else None
        issuers = self.issuers(document["issuers"])
        routes = self.routes(document["routes"], issuers)
        trusted = self.networks(document.get("trusted_proxies", []), "trusted_proxies")
        max_hops = self.integer(document.get("max_forwarded_hops", DEFAULT_MAX_HOPS), "max_forwarded_hops")
        if not 1 <= max_hops <= 100:
            self.fail("max_forwarded_hops", f"expected 1 to 100 entries, found {max_hops}")
        timeout = self.timeout(document["timeout"], "timeout") if "timeout" in document else Timeout()
        max_token_bytes = self.integer(document.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES), "max_token_bytes")
        if not 256 <= max_token_bytes <= 65536:
            self.fail("max_token_bytes", f"expected a size between 256 and 65536 bytes, found {max_token_bytes}")

        signing_key = None
        if check_files:
            if audit_log is not None and not os.path.isdir(os.path.dirname(audit_log)):
                self.fail("audit_log", f"the directory {os.path.dirname(audit_log)!r} does not exist")
            if key_file is not None:
                signing_key = self.signing_key(key_file)
            if not is_url(registry) and signing_key is not None:
                self.check_registry(registry, service, signing_key)
            for index, issuer in enumerate(issuers):
                if not issuer.discovery and not is_url(issuer.jwks):
                    self.check_issuer_keys(issuer, f"issuers[{index}].jwks")
        return GatewayConfig(
            service=service,
            key_file=key_file,
            registry=registry,
            registry_namespace=namespace,
            issuers=issuers,
            routes=routes,
            host=host,
            port=port,
            audit_log=audit_log,
            trusted_proxies=trusted,
            max_forwarded_hops=max_hops,
            timeout=timeout,
            max_token_bytes=max_token_bytes,
            source=self.source,
            workers=parse_workers(document.get("workers", 1), self.fail),
            limits=parse_limits(document.get("limits", {}), self.fail),
            telemetry=parse_telemetry(document.get("telemetry", {}), self.fail),
            signing_key=signing_key,
        )

    def registry(self, document: Mapping[str, Any]) -> tuple[str, str]:
        """``registry`` (a file, an http(s) URL or a Redis URL) and, for Redis, its namespace."""
        value = document["registry"]
        if isinstance(value, str) and is_redis(value):
            parts = urlsplit(value)
            if parts.scheme != "unix" and not parts.hostname:
                self.fail("registry", "expected redis://[USER:PASSWORD@]HOST[:PORT][/DB], found a URL without a host")
            if "key_file" in document:
                self.fail(
                    "key_file",
                    "with a Redis registry the gateway generates its keys in memory and publishes them there "
                    "(one per process, renewed and rotated): remove key_file",
                )
            namespace = self.string(document.get("registry_namespace", DEFAULT_NAMESPACE), "registry_namespace")
            if not _NAMESPACE.fullmatch(namespace):
                self.fail(
                    "registry_namespace", f"expected 1-64 characters from A-Z a-z 0-9 . _ -, found {_clip(namespace)}"
                )
            return value, namespace
        if "registry_namespace" in document:
            self.fail("registry_namespace", "only a redis:// registry has a namespace")
        if "key_file" not in document:
            self.fail("key_file", "this key is required (unless the registry is redis://...)")
        return self.location(value, "registry"), DEFAULT_NAMESPACE

    def issuers(self, value: object) -> tuple[IssuerConfig, ...]:
        tables = self.tables(value, "issuers")
        issuers: list[IssuerConfig] = []
        seen: set[str] = set()
        for index, table in enumerate(tables):
            where = f"issuers[{index}]"
            self.unknown_keys(table, _ISSUER_KEYS, where)
            for required in ("issuer", "audience", "algorithms"):
                if required not in table:
                    self.fail(f"{where}.{required}", "this key is required")
            name = self.string(table["issuer"], f"{where}.issuer")
            discovery = self.boolean(table, "discovery", where)
            jwks = self.issuer_keys(table, name, discovery, where)
            if name in seen:
                self.fail(f"{where}.issuer", f"issuer {name!r} is configured twice")
            seen.add(name)
            algorithms = self.strings(table["algorithms"], f"{where}.algorithms")
            for alg in algorithms:
                if alg not in IDP_ALGORITHMS:
                    self.fail(
                        f"{where}.algorithms",
                        f"expected algorithms from {', '.join(IDP_ALGORITHMS)}, found {_clip(alg)}",
                    )
            if len(set(algorithms)) != len(algorithms):
                self.fail(f"{where}.algorithms", "an algorithm is listed twice")
            leeway = self.number(table.get("leeway", 30), f"{where}.leeway")
            if not 0 <= leeway <= MAX_LEEWAY:
                self.fail(f"{where}.leeway", f"expected 0 to {MAX_LEEWAY} seconds, found {leeway:g}")
            issuers.append(
                IssuerConfig(
                    issuer=name,
                    jwks=jwks,
                    audience=self.audience(table["audience"], f"{where}.audience"),
                    algorithms=algorithms,
                    leeway=leeway,
                    discovery=discovery,
                    **self.issuer_claims(table, where),
                )
            )
        return tuple(issuers)

    def audience(self, value: object, where: str) -> str | tuple[str, ...]:
        if isinstance(value, str):
            return self.string(value, where)
        return self.strings(value, where)

    def issuer_claims(self, table: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The issuer options that say where a provider puts audience, groups and scopes."""
        options: dict[str, Any] = {}
        for key in ("audience_claim", "groups_claim"):
            if key in table:
                path = self.string(table[key], f"{where}.{key}")
                if not _CLAIM_PATH.fullmatch(path):
                    self.fail(f"{where}.{key}", f"expected a claim name or dotted path, found {_clip(path)}")
                options[key] = path
        if "scope_claims" in table:
            options["scope_claims"] = self.strings(table["scope_claims"], f"{where}.scope_claims", allow_empty=True)
        if "require" in table:
            require = table["require"]
            if not isinstance(require, Mapping):
                self.fail(f"{where}.require", "expected a table of claim = value (or a list of values)")
            for claim, wanted in require.items():
                values = wanted if isinstance(wanted, list) else [wanted]
                if not values or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
                    self.fail(f"{where}.require.{claim}", "expected a string or number, or a list of them")
            options["require"] = MappingProxyType(
                {claim: tuple(v) if isinstance(v, list) else v for claim, v in require.items()}
            )
        if "max_token_bytes" in table:
            size = table["max_token_bytes"]
            if type(size) is not int or not 1024 <= size <= 1 << 20:
                self.fail(f"{where}.max_token_bytes", f"expected an integer from 1024 to 1048576, found {size!r}")
            options["max_token_bytes"] = size
        return options

    def issuer_keys(self, table: Mapping[str, Any], issuer: str, discovery: bool, where: str) -> str:
        """The ``jwks`` location, or ``""`` with ``discovery = true`` (exactly one of them)."""
        if discovery:
            if "jwks" in table:
                self.fail(f"{where}.jwks", "give either jwks or discovery = true, not both")
            try:
                check_url(discovery_url(issuer), allow_http=False, what="issuer's discovery URL")
            except ConfigurationError as exc:
                self.fail(f"{where}.issuer", f"discovery needs an https issuer URL: {exc.detail}")
            return ""
        if "jwks" not in table:
            self.fail(f"{where}.jwks", "this key is required (or discovery = true)")
        return self.location(table["jwks"], f"{where}.jwks")

    def routes(self, value: object, issuers: Sequence[IssuerConfig]) -> tuple[RouteConfig, ...]:
        tables = self.tables(value, "routes")
        known_issuers = [issuer.issuer for issuer in issuers]
        routes: list[RouteConfig] = []
        prefixes: set[str] = set()
        for index, table in enumerate(tables):
            where = f"routes[{index}]"
            self.unknown_keys(table, _ROUTE_KEYS, where)
            for required in ("prefix", "upstream", "service"):
                if required not in table:
                    self.fail(f"{where}.{required}", "this key is required")
            prefix = self.prefix(table["prefix"], f"{where}.prefix")
            if prefix in prefixes:
                self.fail(f"{where}.prefix", f"the prefix {prefix!r} is routed twice")
            prefixes.add(prefix)
            accept_service_tokens = self.boolean(table, "accept_service_tokens", where)
            route_issuers: tuple[str, ...] | None = None
            if "issuers" in table:
                route_issuers = self.strings(table["issuers"], f"{where}.issuers", allow_empty=accept_service_tokens)
                for name in route_issuers:
                    if name not in known_issuers:
                        self.fail(
                            f"{where}.issuers",
                            f"unknown issuer {_clip(name)} (configured issuers: {', '.join(map(repr, known_issuers))})",
                        )
            methods = None
            if "methods" in table:
                methods = self.strings(table["methods"], f"{where}.methods")
                for method in methods:
                    if not _METHOD.fullmatch(method):
                        self.fail(f"{where}.methods", f"expected upper-case HTTP methods, found {_clip(method)}")
            scopes = self.optional_strings(table, "scopes", where)
            for scope in scopes or ():
                if any(ch.isspace() for ch in scope):
                    self.fail(f"{where}.scopes", f"expected single scopes without spaces, found {_clip(scope)}")
            callers = self.optional_strings(table, "callers", where)
            if callers is not None and not accept_service_tokens:
                self.fail(f"{where}.callers", "only meaningful with accept_service_tokens = true")
            routes.append(
                RouteConfig(
                    prefix=prefix,
                    upstream=self.upstream(table["upstream"], f"{where}.upstream"),
                    service=self.name(table["service"], f"{where}.service"),
                    methods=methods,
                    issuers=route_issuers,
                    subjects=self.optional_strings(table, "subjects", where),
                    groups=self.optional_strings(table, "groups", where),
                    scopes=scopes,
                    callers=callers,
                    strip_prefix=self.boolean(table, "strip_prefix", where),
                    accept_service_tokens=accept_service_tokens,
                    forward_user_token=self.boolean(table, "forward_user_token", where),
                    timeout=self.timeout(table["timeout"], f"{where}.timeout") if "timeout" in table else None,
                )
            )
        return tuple(routes)

    # -- files -------------------------------------------------------------------

    def signing_key(self, key_file: str) -> SigningKey:
        try:
            return SigningKey.from_file(key_file)
        except ConfigurationError as exc:
            self.fail("key_file", exc.detail)

    def check_registry(self, registry: str, service: str, key: SigningKey) -> None:
        try:
            keys = JWKSFile(registry)
        except ConfigurationError as exc:
            self.fail("registry", exc.detail)
        record = keys.get_key(key.kid)
        if record is None or record.owner != service:
            owner = "absent" if record is None else f"owned by {record.owner!r}"
            self.fail(
                "key_file",
                f"the gateway's key (kid {key.kid!r}) must be in the registry {registry!r} as owned by "
                f"{service!r}, found {owner}: upstream services could not verify its tokens",
            )

    def check_issuer_keys(self, issuer: IssuerConfig, where: str) -> None:
        try:
            keys = JWKSFile(issuer.jwks, parser=issuer_key_parser(issuer))
        except ConfigurationError as exc:
            self.fail(where, exc.detail)
        if not len(keys.keyset):
            self.fail(
                where,
                f"no key in {issuer.jwks!r} can verify the configured algorithms {list(issuer.algorithms)}",
            )

    # -- values ------------------------------------------------------------------

    def unknown_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                place = f"{where}.{key}" if where else str(key)
                self.fail(place, f"unknown key (expected one of {', '.join(allowed)})")

    def tables(self, value: object, where: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"expected one or more [[{where}]] tables, found {_describe(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                self.fail(f"{where}[{index}]", f"expected a table, found {_describe(item)}")
        return value

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string, found {_describe(value)}")
        return value

    def name(self, value: object, where: str) -> str:
        text = self.string(value, where)
        problem = service_name_problem(text)
        if problem is not None:
            self.fail(where, problem)
        return text

    def strings(self, value: object, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(where, f"expected a list of strings, found {_describe(value)}")
        if not value and not allow_empty:
            self.fail(where, "expected a non-empty list (an empty list can never match)")
        for item in value:
            if not isinstance(item, str) or not item:
                self.fail(where, f"expected non-empty strings, found {_describe(item)}")
        return tuple(value)

    def optional_strings(self, table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
        if key not in table:
            return None
        return self.strings(table[key], f"{where}.{key}")

    def boolean(self, table: Mapping[str, Any], key: str, where: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key}", f"expected true or false, found {_describe(value)}")
        return value

    def number(self, value: object, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(where, f"expected a number, found {_describe(value)}")
        return float(value)

    def integer(self, value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, found {_describe(value)}")
        return value

    def path(self, value: object, where: str) -> str:
        text = self.string(value, where)
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(text)))

    def location(self, value: object, where: str) -> str:
        """A file path (made absolute) or an https URL (http only on loopback)."""
        text = self.string(value, where)
        if not is_url(text):
            return self.path(text, where)
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(where, f"expected a file path or an http(s) URL, found {_clip(text)}")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            self.fail(where, f"expected an https URL (plain http only on loopback), found {_clip(text)}")
        if parts.username or parts.password:
            self.fail(where, "credentials in the URL are not allowed")
        return text

    def upstream(self, value: object, where: str) -> str:
        text = value if isinstance(value, str) else None
        parts = urlsplit(text) if text else None
        if text is None or parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(where, f"expected an http(s) URL, found {_clip(value)}")
        if parts.query or parts.fragment or "?" in text or "#" in text:
            self.fail(where, f"expected a base URL without query or fragment, found {_clip(text)}")
        if parts.username or parts.password:
            self.fail(where, "credentials in the URL are not allowed")
        try:
            _ = parts.port
        except ValueError:
            self.fail(where, f"expected a valid port, found {_clip(text)}")
        return text.rstrip("/")

    def prefix(self, value: object, where: str) -> str:
        text = value if isinstance(value, str) else None
        if text is None or not text.startswith("/"):
            self.fail(where, f"expected a path prefix starting with '/', found {_clip(value)}")
        if text == "/":
            return text
        if text.endswith("/"):
            self.fail(where, f"expected a prefix without a trailing '/' (e.g. '/orders'), found {_clip(text)}")
        for segment in text[1:].split("/"):
            if segment in ("", ".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
                self.fail(
                    where,
                    f"expected plain path segments (no empty, '.', '..', '%', '?' or '#'), found {_clip(text)}",
                )
        return text

    def listen(self, value: object) -> tuple[str, int]:
        text = self.string(value, "listen")
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            self.fail("listen", f"expected 'host:port', found {_clip(text)}")
        if host.startswith("["):
            if not host.endswith("]"):
                self.fail("listen", f"expected '[ipv6]:port', found {_clip(text)}")
            host = host[1:-1]
        elif ":" in host:
            self.fail("listen", f"expected an IPv6 host in brackets ('[::1]:8080'), found {_clip(text)}")
        port = int(port_text)
        if not 0 <= port <= 65535:
            self.fail("listen", f"expected a port between 0 and 65535, found {port}")
        return host, port

    def networks(self, value: object, where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = self.strings(value, where, allow_empty=True)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.fail(where, f"expected IP addresses or CIDR networks, found {_clip(item)}")
        return tuple(networks)

    def timeout(self, value: object, where: str) -> Timeout:
        if isinstance(value, Mapping):
            self.unknown_keys(value, _TIMEOUT_KEYS, where)
            default = Timeout()
            connect = self.number(value.get("connect", default.connect), f"{where}.connect")
            read = self.number(value.get("read", default.read), f"{where}.read")
        else:
            connect = read = self.number(value, where)
        for name, seconds in (("connect", connect), ("read", read)):
            if not 0 < seconds <= _MAX_TIMEOUT:
                self.fail(
                    where if not isinstance(value, Mapping) else f"{where}.{name}",
                    f"expected a positive number of seconds up to {_MAX_TIMEOUT:g}, found {seconds:g}",
                )
        return Timeout(connect=connect, read=read)


def _fail(source: str, where: str, message: str) -> NoReturn:
    place = f"{source}: {where}: " if where else f"{source}: "
    raise ConfigurationError(place + message, reason=REASON)


def _type_name(value: object) -> str:
    return type(value).__name__


def _describe(value: object) -> str:
    if isinstance(value, str | int | float | bool):
        return _clip(value)
    return _type_name(value)


def _clip(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
