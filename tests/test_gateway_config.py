"""The gateway configuration file: a valid file loads; every start-up error names the key and the file."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import meshauth
from meshauth.gateway import GatewayConfig, Timeout, create_app, load_config, parse_config


@pytest.fixture(scope="module")
def idp_jwk() -> dict[str, object]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "idp-1", "use": "sig"}


@pytest.fixture
def setup_dir(tmp_path: Path, idp_jwk: dict[str, object]) -> Path:
    """A directory with the gateway's key, the registry and the IdP key set, as a config refers to them."""
    key = meshauth.SigningKey.generate()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gateway.pem").write_bytes(key.to_pem())
    (tmp_path / "registry.json").write_text(json.dumps({"keys": [key.public_jwk(iss="gateway")]}))
    (tmp_path / "idp-jwks.json").write_text(json.dumps({"keys": [idp_jwk]}))
    return tmp_path


VALID = """
listen = "127.0.0.1:8080"
service = "gateway"
key_file = "keys/gateway.pem"
registry = "registry.json"
audit_log = "audit.jsonl"
trusted_proxies = ["10.0.0.0/8", "::1"]
timeout = {connect = 2, read = 10}
max_token_bytes = 4096

[[issuers]]
issuer = "https://idp.example.com"
jwks = "idp-jwks.json"
audience = "api-gateway"
algorithms = ["RS256", "ES256"]
leeway = 30

[[routes]]
prefix = "/orders"
upstream = "http://127.0.0.1:8001"
service = "orders"
methods = ["GET", "POST"]
issuers = ["https://idp.example.com"]
subjects = ["*"]
groups = ["staff"]
scopes = ["orders:read"]

[[routes]]
prefix = "/billing"
upstream = "https://billing.internal:8443/api/"
service = "billing"
strip_prefix = true
accept_service_tokens = true
callers = ["orders"]
forward_user_token = true
timeout = 3
"""


def write(directory: Path, text: str, name: str = "gateway.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def load_error(directory: Path, text: str) -> str:
    path = write(directory, text)
    with pytest.raises(meshauth.ConfigurationError) as caught:
        load_config(path)
    assert caught.value.reason == "invalid_config"
    message = caught.value.detail
    assert message.startswith(f"{path}: "), message
    return message


def test_valid_config_loads_with_paths_resolved(setup_dir: Path) -> None:
    config = load_config(write(setup_dir, VALID))
    assert isinstance(config, GatewayConfig)
    assert (config.host, config.port, config.listen) == ("127.0.0.1", 8080, "127.0.0.1:8080")
    assert config.service == "gateway"
    assert config.key_file == str(setup_dir / "keys" / "gateway.pem")
    assert config.registry == str(setup_dir / "registry.json")
    assert config.audit_log == str(setup_dir / "audit.jsonl")
    assert config.signing_key is not None and config.signing_key.alg == "ES256"
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert config.timeout == Timeout(connect=2.0, read=10.0)
    assert config.max_token_bytes == 4096
    (issuer,) = config.issuers
    assert issuer.jwks == str(setup_dir / "idp-jwks.json")
    assert issuer.algorithms == ("RS256", "ES256")
    assert config.issuer("https://idp.example.com") is issuer
    orders, billing = config.routes
    assert orders.methods == ("GET", "POST") and orders.groups == ("staff",) and orders.scopes == ("orders:read",)
    assert orders.strip_prefix is False and orders.forward_user_token is False and orders.timeout is None
    assert billing.upstream == "https://billing.internal:8443/api"
    assert billing.strip_prefix and billing.accept_service_tokens and billing.forward_user_token
    assert billing.callers == ("orders",) and billing.timeout == Timeout(connect=3.0, read=3.0)
    assert billing.issuers is None and billing.subjects is None


def test_defaults_and_create_app_from_a_path(setup_dir: Path) -> None:
    minimal = """
service = "gateway"
key_file = "keys/gateway.pem"
registry = "registry.json"
[[issuers]]
issuer = "https://idp.example.com"
jwks = "idp-jwks.json"
audience = "api"
algorithms = ["RS256"]
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:8001"
service = "orders"
"""
    path = write(setup_dir, minimal)
    config = load_config(path)
    assert config.listen == "127.0.0.1:8080" and config.audit_log is None and config.trusted_proxies == ()
    assert config.issuers[0].leeway == 30.0 and config.max_token_bytes == 8192
    gateway = create_app(path, configure_audit=False)
    assert gateway.config == config
    assert gateway.identity.name == "gateway"


def test_ipv6_listen(setup_dir: Path) -> None:
    config = load_config(write(setup_dir, VALID.replace('"127.0.0.1:8080"', '"[::1]:9000"')))
    assert (config.host, config.port, config.listen) == ("::1", 9000, "[::1]:9000")


def test_url_key_sources_are_accepted_without_fetching(setup_dir: Path) -> None:
    text = VALID.replace('jwks = "idp-jwks.json"', 'jwks = "https://idp.example.com/.well-known/jwks.json"')
    text = text.replace('registry = "registry.json"', 'registry = "http://127.0.0.1:9999/jwks.json"')
    config = load_config(write(setup_dir, text))
    assert config.issuers[0].jwks == "https://idp.example.com/.well-known/jwks.json"
    assert config.registry == "http://127.0.0.1:9999/jwks.json"


def test_parse_config_from_a_mapping(setup_dir: Path) -> None:
    import tomllib

    config = parse_config(tomllib.loads(VALID), source="inline", base_dir=setup_dir)
    assert config.source == "inline" and config.routes[0].service == "orders"
    unchecked = parse_config(
        tomllib.loads(VALID.replace("keys/gateway.pem", "missing.pem")), base_dir=setup_dir, check_files=False
    )
    assert unchecked.signing_key is None


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(meshauth.ConfigurationError, match=r"nope\.toml: cannot read the configuration file"):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "where", "fragment"),
    [
        (("", 'colour = "blue"\n'), "colour", "unknown key"),
        (('service = "gateway"\n', ""), "service", "this key is required"),
        (('service = "gateway"', 'service = "my gateway"'), "service", "a service name is"),
        (('"127.0.0.1:8080"', '"localhost"'), "listen", "expected 'host:port'"),
        (('"127.0.0.1:8080"', '"127.0.0.1:99999"'), "listen", "between 0 and 65535"),
        (('"127.0.0.1:8080"', '"::1:80"'), "listen", "in brackets"),
        (('key_file = "keys/gateway.pem"', 'key_file = "keys/missing.pem"'), "key_file", "cannot read key file"),
        (('audit_log = "audit.jsonl"', 'audit_log = "nodir/audit.jsonl"'), "audit_log", "does not exist"),
        (('registry = "registry.json"', 'registry = "missing.json"'), "registry", "cannot read registry file"),
        (('registry = "registry.json"', 'registry = "http://10.1.1.1/jwks"'), "registry", "plain http only"),
        (('trusted_proxies = ["10.0.0.0/8", "::1"]', 'trusted_proxies = ["nope"]'), "trusted_proxies", "CIDR"),
        (("timeout = {connect = 2, read = 10}", "timeout = -1"), "timeout", "positive number"),
        (("timeout = {connect = 2, read = 10}", "timeout = {connect = 2, total = 1}"), "timeout.total", "unknown"),
        (("timeout = {connect = 2, read = 10}", "timeout = {read = 0}"), "timeout.read", "positive"),
        (("max_token_bytes = 4096", "max_token_bytes = 10"), "max_token_bytes", "between 256 and 65536"),
        (("max_token_bytes = 4096", 'max_token_bytes = "big"'), "max_token_bytes", "expected an integer"),
        (('algorithms = ["RS256", "ES256"]', 'algorithms = ["HS256"]'), "issuers[0].algorithms", "'HS256'"),
        (('algorithms = ["RS256", "ES256"]', 'algorithms = ["none"]'), "issuers[0].algorithms", "'none'"),
        (('algorithms = ["RS256", "ES256"]', "algorithms = []"), "issuers[0].algorithms", "non-empty list"),
        (('algorithms = ["RS256", "ES256"]', 'algorithms = ["RS256", "RS256"]'), "issuers[0].algorithms", "twice"),
        (('algorithms = ["RS256", "ES256"]', 'algorithms = ["ES256"]'), "issuers[0].jwks", "no key in"),
        (('jwks = "idp-jwks.json"', 'jwks = "missing-jwks.json"'), "issuers[0].jwks", "cannot read JWKS file"),
        (('jwks = "idp-jwks.json"', 'jwks = "ftp://idp/jwks"'), "issuers[0].jwks", "http(s) URL"),
        (("leeway = 30", "leeway = 301"), "issuers[0].leeway", "0 to 300"),
        (('audience = "api-gateway"', 'audience = ""'), "issuers[0].audience", "non-empty string"),
        (("leeway = 30", "leeway = 30\nclaims = 1"), "issuers[0].claims", "unknown key"),
        (('prefix = "/orders"', 'prefix = "orders"'), "routes[0].prefix", "starting with '/'"),
        (('prefix = "/orders"', 'prefix = "/orders/"'), "routes[0].prefix", "trailing '/'"),
        (('prefix = "/orders"', 'prefix = "/a/../b"'), "routes[0].prefix", "plain path segments"),
        (('prefix = "/orders"', 'prefix = "/a%2Fb"'), "routes[0].prefix", "plain path segments"),
        (('prefix = "/orders"', 'prefix = "/billing"'), "routes[1].prefix", "routed twice"),
        (('"http://127.0.0.1:8001"', '"ftp://x"'), "routes[0].upstream", "expected an http(s) URL, found 'ftp://x'"),
        (('"http://127.0.0.1:8001"', '"http://h/?q=1"'), "routes[0].upstream", "without query"),
        (('"http://127.0.0.1:8001"', '"http://u:p@h"'), "routes[0].upstream", "credentials"),
        (('"http://127.0.0.1:8001"', '"http://h:99999"'), "routes[0].upstream", "valid port"),
        (('methods = ["GET", "POST"]', 'methods = ["get"]'), "routes[0].methods", "upper-case"),
        (('methods = ["GET", "POST"]', "methods = []"), "routes[0].methods", "non-empty list"),
        (
            ('issuers = ["https://idp.example.com"]', 'issuers = ["https://evil"]'),
            "routes[0].issuers",
            "unknown issuer",
        ),
        (('issuers = ["https://idp.example.com"]', "issuers = []"), "routes[0].issuers", "non-empty list"),
        (('groups = ["staff"]', "groups = []"), "routes[0].groups", "non-empty list"),
        (('subjects = ["*"]', "subjects = [1]"), "routes[0].subjects", "non-empty strings"),
        (('scopes = ["orders:read"]', 'scopes = ["a b"]'), "routes[0].scopes", "without spaces"),
        (("strip_prefix = true", 'strip_prefix = "yes"'), "routes[1].strip_prefix", "true or false"),
        (('callers = ["orders"]', 'callers = ["orders"]\nrewrite = "x"'), "routes[1].rewrite", "unknown key"),
        (("accept_service_tokens = true", "accept_service_tokens = false"), "routes[1].callers", "only meaningful"),
        (('service = "orders"', "service = 3"), "routes[0].service", "non-empty string"),
        (('service = "orders"', 'service = "orders*"'), "routes[0].service", "a service name is"),
        (('service = "billing"', 'service = "billing[1]"'), "routes[1].service", "a service name is"),
        (("", "max_forwarded_hops = 0\n"), "max_forwarded_hops", "expected 1 to 100 entries, found 0"),
        (("", "max_forwarded_hops = 101\n"), "max_forwarded_hops", "expected 1 to 100 entries, found 101"),
        (("", "max_forwarded_hops = -1\n"), "max_forwarded_hops", "expected 1 to 100 entries, found -1"),
        (("", 'max_forwarded_hops = "10"\n'), "max_forwarded_hops", "expected an integer"),
        (("", "max_forwarded_hops = true\n"), "max_forwarded_hops", "expected an integer"),
    ],
)
def test_startup_errors_name_key_and_file(setup_dir: Path, change: tuple[str, str], where: str, fragment: str) -> None:
    old, new = change
    assert old == "" or old in VALID, old
    text = new + VALID if old == "" else VALID.replace(old, new, 1)
    message = load_error(setup_dir, text)
    assert f": {where}: " in message, message
    assert fragment in message, message


@pytest.mark.parametrize(
    ("line", "hops"), [("", 10), ("max_forwarded_hops = 1\n", 1), ("max_forwarded_hops = 100\n", 100)]
)
def test_max_forwarded_hops_from_1_to_100(setup_dir: Path, line: str, hops: int) -> None:
    assert load_config(write(setup_dir, line + VALID)).max_forwarded_hops == hops


def test_route_without_upstream_and_no_routes(setup_dir: Path) -> None:
    message = load_error(setup_dir, VALID.replace('upstream = "http://127.0.0.1:8001"\n', ""))
    assert "routes[0].upstream: this key is required" in message
    head = VALID.split("[[routes]]", maxsplit=1)[0]
    assert "routes: expected one or more [[routes]] tables" in load_error(setup_dir, "routes = []\n" + head)


def test_empty_issuers_list_is_allowed_for_service_token_routes(setup_dir: Path) -> None:
    text = VALID.replace("forward_user_token = true", "forward_user_token = true\nissuers = []")
    config = load_config(write(setup_dir, text))
    assert config.routes[1].issuers == ()


def test_invalid_toml_and_bad_key_file(setup_dir: Path) -> None:
    assert "invalid TOML" in load_error(setup_dir, VALID + "\n[[routes]\n")
    (setup_dir / "keys" / "gateway.pem").write_text("not a key")
    message = load_error(setup_dir, VALID)
    assert ": key_file: " in message and "not a readable PEM private key" in message


def test_gateway_key_must_be_in_the_registry(setup_dir: Path) -> None:
    other = meshauth.SigningKey.generate()
    (setup_dir / "registry.json").write_text(json.dumps({"keys": [other.public_jwk(iss="gateway")]}))
    message = load_error(setup_dir, VALID)
    assert ": key_file: " in message and "must be in the registry" in message and "absent" in message


def test_bad_registry_and_idp_documents(setup_dir: Path) -> None:
    (setup_dir / "registry.json").write_text('{"keys": [{"kty": "EC"}]}')
    assert ": registry: " in load_error(setup_dir, VALID)


def test_idp_jwks_that_is_not_a_key_set(setup_dir: Path) -> None:
    (setup_dir / "idp-jwks.json").write_text("[]")
    message = load_error(setup_dir, VALID)
    assert ": issuers[0].jwks: " in message and "'keys' array" in message


def test_issuer_configured_twice(setup_dir: Path) -> None:
    issuer = VALID[VALID.index("[[issuers]]") : VALID.index("[[routes]]")]
    message = load_error(setup_dir, VALID.replace(issuer, issuer + issuer))
    assert "issuers[1].issuer: issuer 'https://idp.example.com' is configured twice" in message
