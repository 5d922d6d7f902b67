"""Real identity providers' token shapes, with the issuer options of docs/gateway.md.

Each case builds a token the way the provider does (header members, claim
names, audience and group conventions), signs it with a fresh RSA or EC key,
and checks that the documented ``[[issuers]]`` options accept it, read its
groups and scopes, and refuse the provider's look-alike that must not pass (an
ID token sent as an access token, a token for another API).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import meshauth
from meshauth import IdPKeyParser, StaticKeys
from meshauth.gateway import UserTokenVerifier, parse_config
from meshauth.testing import FakeClock

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "6e74172b-be56-4843-9ff4-e66a39bb12e3"
ROUTE = '\n[[routes]]\nprefix = "/orders"\nupstream = "http://127.0.0.1:8001"\nservice = "orders"\n'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk(alg: str, kid: str) -> dict[str, Any]:
    if alg == "ES256":
        numbers = _EC.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.x.to_bytes(32, "big")),
            "y": b64(numbers.y.to_bytes(32, "big")),
            "kid": kid,
            "use": "sig",
        }
    n = _RSA.public_key().public_numbers()
    # IdPs publish RSA keys without 'alg', often with certificate members.
    return {"kty": "RSA", "n": b64(n.n.to_bytes(256, "big")), "e": "AQAB", "kid": kid, "use": "sig", "x5t": "aGludA"}


def sign(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    if header["alg"] == "ES256":
        r, s = decode_dss_signature(_EC.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = _RSA.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64(signature)}"


def verifier_for(toml: str, keys: Mapping[str, Any], clock: FakeClock, tmp_path: Path) -> UserTokenVerifier:
    """The gateway's issuer options exactly as docs/gateway.md writes them, and the verifier they build."""
    (tmp_path / "gateway.pem").write_bytes(meshauth.SigningKey.generate().to_pem())
    document = f'service = "gateway"\nkey_file = "gateway.pem"\nregistry = "registry.json"\n{toml}{ROUTE}'
    config = parse_config(tomllib.loads(document), source="gateway.toml", base_dir=tmp_path, check_files=False)
    (issuer,) = config.issuers
    parsed = StaticKeys.from_jwks(keys, source="idp", parser=IdPKeyParser(issuer.issuer, issuer.algorithms))
    return UserTokenVerifier(config.issuers, {issuer.issuer: parsed}, clock=clock)


def verify(verifier: UserTokenVerifier, token: str) -> Any:
    return asyncio.run(verifier.averify(token))


def reason(verifier: UserTokenVerifier, token: str) -> str:
    with pytest.raises(meshauth.TokenError) as caught:
        verify(verifier, token)
    return caught.value.reason


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def test_entra_id_v1_access_token(clock: FakeClock, tmp_path: Path) -> None:
    issuer = f"https://sts.windows.net/{TENANT}/"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "https://login.microsoftonline.com/common/discovery/keys"
audience = ["api://orders", "{CLIENT}"]
groups_claim = "roles"
scope_claims = ["scp"]
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "nOo3ZDrODXEK1jKWhXslHR_KXEg")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    # v1 headers carry x5t beside kid (the same value): allowed, and ignored.
    header = {"typ": "JWT", "alg": "RS256", "x5t": "nOo3ZDrODXEK1jKWhXslHR_KXEg", "kid": "nOo3ZDrODXEK1jKWhXslHR_KXEg"}
    claims = {
        "aud": "api://orders",
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "appid": CLIENT,
        "oid": "00000000-0000-0000-0000-00000000a11c",
        "roles": ["Orders.Reader"],
        "scp": "orders.read user_impersonation",
        "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "tid": TENANT,
        "ver": "1.0",
        # Users in many groups: Entra tokens grow past 8 KiB (the IdP limit is 16 KiB).
        "groups": [f"{i:08x}-0000-0000-0000-000000000000" for i in range(200)],
    }
    user = verify(verifier, sign(header, claims))
    assert user.groups == {"Orders.Reader"} and user.scopes == {"orders.read", "user_impersonation"}
    assert user.audience == "api://orders" and user.issuer == issuer
    assert reason(verifier, sign(header, {**claims, "aud": "https://graph.microsoft.com"})) == "wrong_audience"


def test_entra_id_v2_access_token(clock: FakeClock, tmp_path: Path) -> None:
    issuer = f"https://login.microsoftonline.com/{TENANT}/v2.0"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "https://login.microsoftonline.com/{TENANT}/discovery/v2.0/keys"
audience = "{CLIENT}"
groups_claim = "roles"
scope_claims = ["scp"]
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "v2key")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    claims = {
        "aud": CLIENT,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "azp": "3f4a7b9c-0000-0000-0000-000000000001",
        "roles": ["Orders.Admin", "Orders.Reader"],
        "scp": "orders.write",
        "sub": "qzX0yXBGrjyH0yqRe9TdxvVZ4rQpQjR2Dl0gqq8ZV0A",
        "tid": TENANT,
        "ver": "2.0",
    }
    user = verify(verifier, sign({"typ": "JWT", "alg": "RS256", "kid": "v2key"}, claims))
    assert user.groups == {"Orders.Admin", "Orders.Reader"} and user.scopes == {"orders.write"}


def test_cognito_access_token_and_its_id_token(clock: FakeClock, tmp_path: Path) -> None:
    issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Ab12Cd34E"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "{issuer}/.well-known/jwks.json"
audience = "5r2q3hvbdvqmnb7tg0ccfcl4n0"
audience_claim = "client_id"
groups_claim = "cognito:groups"
require = {{ token_use = "access" }}
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "cognito-1")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    header = {"kid": "cognito-1", "alg": "RS256"}  # no typ
    access = {
        "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "cognito:groups": ["staff"],
        "iss": issuer,
        "client_id": "5r2q3hvbdvqmnb7tg0ccfcl4n0",
        "origin_jti": "f3b1",
        "event_id": "e-1",
        "token_use": "access",
        "scope": "orders/read aws.cognito.signin.user.admin",
        "auth_time": now,
        "exp": now + 3600,
        "iat": now,
        "jti": "a7c1",
        "username": "alice",
    }
    user = verify(verifier, sign(header, access))  # no 'aud' at all: the client_id is the audience
    assert user.subject == access["sub"] and user.groups == {"staff"}
    assert user.scopes == {"orders/read", "aws.cognito.signin.user.admin"}
    id_token = {**access, "token_use": "id", "aud": access["client_id"], "email": "alice@example.com"}
    assert reason(verifier, sign(header, id_token)) == "invalid_claim"  # an ID token is not an access token


def test_keycloak_access_token_and_its_id_token(clock: FakeClock, tmp_path: Path) -> None:
    issuer = "https://sso.example.com/realms/acme"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "{issuer}/protocol/openid-connect/certs"
audience = "orders-api"
groups_claim = "realm_access.roles"
require = {{ typ = "Bearer" }}
algorithms = ["RS256", "ES256"]
""",
        {"keys": [jwk("ES256", "kc-ec")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    header = {"alg": "ES256", "typ": "JWT", "kid": "kc-ec"}
    claims = {
        "exp": now + 300,
        "iat": now,
        "jti": "onrtac:1",
        "iss": issuer,
        "aud": ["orders-api", "account"],
        "sub": "f:1b2c:alice",
        "typ": "Bearer",
        "azp": "web",
        "realm_access": {"roles": ["staff", "offline_access"]},
        "resource_access": {"account": {"roles": ["view-profile"]}},
        "scope": "openid profile orders:read",
        "preferred_username": "alice",
    }
    user = verify(verifier, sign(header, claims))
    assert user.groups == {"staff", "offline_access"} and "orders:read" in user.scopes
    assert reason(verifier, sign(header, {**claims, "typ": "ID"})) == "invalid_claim"


def test_auth0_permissions_are_scopes(clock: FakeClock, tmp_path: Path) -> None:
    issuer = "https://acme.eu.auth0.com/"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "{issuer}.well-known/jwks.json"
audience = "https://api.acme.example"
scope_claims = ["scope", "permissions"]
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "auth0-1")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    claims = {
        "iss": issuer,
        "sub": "auth0|64f0c0ffee",
        "aud": ["https://api.acme.example", "https://acme.eu.auth0.com/userinfo"],
        "iat": now,
        "exp": now + 86400,
        "scope": "openid profile",
        "azp": "Xq1",
        "permissions": ["orders:read", "orders:write"],
    }
    user = verify(verifier, sign({"alg": "RS256", "typ": "JWT", "kid": "auth0-1"}, claims))
    assert user.scopes == {"openid", "profile", "orders:read", "orders:write"}


def test_okta_scp_list_and_groups(clock: FakeClock, tmp_path: Path) -> None:
    issuer = "https://dev-123456.okta.com/oauth2/default"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "{issuer}"
jwks = "{issuer}/v1/keys"
audience = "api://default"
scope_claims = ["scp"]
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "okta-1")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    claims = {
        "ver": 1,
        "jti": "AT.x",
        "iss": issuer,
        "aud": "api://default",
        "iat": now,
        "exp": now + 3600,
        "cid": "0oa1",
        "uid": "00u1",
        "scp": ["orders.read", "openid"],
        "auth_time": now,
        "sub": "alice@example.com",
        "groups": ["Everyone", "staff"],
    }
    user = verify(verifier, sign({"kid": "okta-1", "alg": "RS256"}, claims))
    assert user.scopes == {"orders.read", "openid"} and user.groups == {"Everyone", "staff"}


def test_google_id_token_for_a_client(clock: FakeClock, tmp_path: Path) -> None:
    # Google signs ID tokens only; the audience is the OAuth client id. Its key
    # set holds one key here: a token without kid is accepted only then.
    audience = "1234-abc.apps.googleusercontent.com"
    verifier = verifier_for(
        f"""
[[issuers]]
issuer = "https://accounts.google.com"
jwks = "https://www.googleapis.com/oauth2/v3/certs"
audience = "{audience}"
algorithms = ["RS256"]
""",
        {"keys": [jwk("RS256", "g-1")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    claims = {
        "iss": "https://accounts.google.com",
        "azp": audience,
        "aud": audience,
        "sub": "110169484474386276334",
        "email": "alice@example.com",
        "email_verified": True,
        "hd": "example.com",
        "iat": now,
        "exp": now + 3600,
    }
    assert verify(verifier, sign({"alg": "RS256", "kid": "g-1", "typ": "JWT"}, claims)).groups == frozenset()
    assert verify(verifier, sign({"alg": "RS256", "typ": "JWT"}, claims)).subject == claims["sub"]


def test_a_token_over_the_issuers_size_limit(clock: FakeClock, tmp_path: Path) -> None:
    verifier = verifier_for(
        """
[[issuers]]
issuer = "https://idp.example.com"
jwks = "https://idp.example.com/keys"
audience = "api"
algorithms = ["RS256"]
max_token_bytes = 4096
""",
        {"keys": [jwk("RS256", "k")]},
        clock,
        tmp_path,
    )
    now = int(clock())
    claims = {"iss": "https://idp.example.com", "sub": "alice", "aud": "api", "exp": now + 60}
    token = sign({"alg": "RS256", "kid": "k"}, {**claims, "groups": ["g" * 60] * 60})
    assert len(token) > 4096
    assert reason(verifier, token) == "too_large"
    assert verify(verifier, sign({"alg": "RS256", "kid": "k"}, claims)).subject == "alice"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ('groups_claim = "realm_access..roles"', "dotted path"),
        ("require = { token_use = true }", "string or number"),
        ("max_token_bytes = 10", "1024 to 1048576"),
        ('scope_claims = "scp"', "expected"),
    ],
)
def test_issuer_options_are_checked_at_load(tmp_path: Path, option: str, message: str) -> None:
    (tmp_path / "gateway.pem").write_bytes(meshauth.SigningKey.generate().to_pem())
    document = f"""service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"
[[issuers]]
issuer = "https://idp.example.com"
jwks = "https://idp.example.com/keys"
audience = "api"
algorithms = ["RS256"]
{option}
{ROUTE}"""
    with pytest.raises(meshauth.ConfigurationError, match=message):
        parse_config(tomllib.loads(document), source="gateway.toml", base_dir=tmp_path, check_files=False)
