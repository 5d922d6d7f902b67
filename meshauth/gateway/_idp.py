"""Which verifier a bearer token goes to: a meshauth service token or an end user's IdP token.

User tokens are checked by the IdP profile of the verification engine
(``meshauth._idp_tokens``), with the issuer's keys from the one JWKS client
(:class:`meshauth.JWKSEndpoint`, :class:`meshauth.JWKSFile`, or OpenID Connect
discovery); service tokens by :class:`meshauth.Verifier`.
"""

from __future__ import annotations

from .._engine import typ_of
from .._exceptions import MeshAuthError
from .._jws import b64url_decode, loads_object
from .._verify import SERVICE_TOKEN_TYPE

__all__ = ["is_service_token"]


def is_service_token(token: str) -> bool:
    """Whether ``token``'s (unverified) header says it is a meshauth service token.

    Only picks which verifier runs; that verifier then checks everything.
    """
    header_b64, dot, _ = token.partition(".")
    if not dot or len(header_b64) > 1024:
        return False
    try:
        header = loads_object(b64url_decode(header_b64, "header"), "header")
    except MeshAuthError:
        return False
    return typ_of(header.get("typ")) == SERVICE_TOKEN_TYPE
