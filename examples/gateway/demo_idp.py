"""A stand-in identity provider for trying the gateway locally.

    python demo_idp.py init                       # writes idp-key.pem and idp-jwks.json
    python demo_idp.py token alice --groups staff --scope orders:read

The token is what a real IdP would hand Alice after she logs in: RS256,
issuer https://idp.example.com, audience api-gateway, valid for 10 minutes.
Needs PyJWT (``pip install pyjwt``), which meshauth itself does not install.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = Path(__file__).resolve().parent
KEY = HERE / "idp-key.pem"
JWKS = HERE / "idp-jwks.json"


def init() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    KEY.write_bytes(pem)
    KEY.chmod(0o600)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "demo-1", "use": "sig"}
    JWKS.write_text(json.dumps({"keys": [jwk]}, indent=2))
    print(f"wrote {KEY.name} (private) and {JWKS.name} (the gateway's issuer key set)")


def token(subject: str, groups: list[str], scope: str, ttl: int) -> None:
    key = serialization.load_pem_private_key(KEY.read_bytes(), password=None)
    now = int(time.time())
    claims = {
        "iss": "https://idp.example.com",
        "sub": subject,
        "aud": "api-gateway",
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "groups": groups,
        "scope": scope,
    }
    print(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "demo-1", "typ": "JWT"}))


def main() -> None:
    parser = argparse.ArgumentParser(description="a stand-in identity provider")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="create the IdP key and its JWKS")
    mint = commands.add_parser("token", help="print a user token")
    mint.add_argument("subject")
    mint.add_argument("--groups", nargs="*", default=["staff"])
    mint.add_argument("--scope", default="orders:read")
    mint.add_argument("--ttl", type=int, default=600)
    args = parser.parse_args()
    if args.command == "init":
        init()
    else:
        token(args.subject, args.groups, args.scope, args.ttl)


if __name__ == "__main__":
    main()
