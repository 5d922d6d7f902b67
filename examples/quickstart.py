"""Two services in one process: orders calls payments, payments verifies the caller.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import meshauth


def main() -> None:
    # Each service has its own key; the registry holds the public halves.
    orders_key = meshauth.SigningKey.generate("ES256")
    payments_key = meshauth.SigningKey.generate("EdDSA")
    registry = meshauth.StaticKeys.from_jwks(
        {"keys": [orders_key.public_jwk(iss="orders"), payments_key.public_jwk(iss="payments")]}
    )

    orders = meshauth.ServiceIdentity("orders", orders_key)
    payments = meshauth.Verifier("payments", registry)

    token = orders.token_for("payments")
    principal = payments.verify(token)
    print(f"payments accepted a call from {principal.caller!r} (kid {principal.kid[:12]}..., {principal.alg})")

    try:
        meshauth.Verifier("billing", registry).verify(token)
    except meshauth.TokenError as error:
        print(f"billing refused the same token: {error.reason} ({error})")


if __name__ == "__main__":
    main()
