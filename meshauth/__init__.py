"""meshauth: mutual, stateless service-to-service authentication with JWTs.

Each service mints short-lived tokens with its own key (:class:`ServiceIdentity`),
attaches them to outgoing ``httpx`` calls (:class:`ServiceAuth`) and verifies
inbound ones against a shared key registry (:class:`Verifier`), with no call to
a central server per request.

Integrations that pull optional dependencies are imported explicitly:
``meshauth.asgi``, ``meshauth.wsgi``, ``meshauth.testing``.
"""

from ._composite import CompositeKeys
from ._exceptions import (
    AccessDenied,
    BadPath,
    BadSignature,
    ConfigurationError,
    InvalidClaim,
    IssuerMismatch,
    KeysUnavailable,
    LifetimeTooLong,
    MalformedToken,
    MeshAuthError,
    MissingClaim,
    ReplayStoreUnavailable,
    ResponseAuthError,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    TokenTooLarge,
    Unavailable,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongTokenType,
)
from ._httpx import ServiceAuth
from ._identity import ServiceIdentity
from ._idp_keys import IdPKeyParser
from ._jwks_endpoint import JWKSEndpoint
from ._keys import KeyRecord, SigningKey
from ._mutual import ResponseVerifier
from ._paths import canonical_path
from ._policy import Decision, Policy
from ._principal import Principal
from ._publish import JWKSApp, jwks_app
from ._registry import JWKSFile, KeySet, KeySource, StaticKeys
from ._replay import MemoryReplayCache, ReplayCache
from ._rotation import Finding, RotationPlan, check_registry, plan_rotation
from ._verify import Verifier

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "BadPath",
    "BadSignature",
    "CompositeKeys",
    "ConfigurationError",
    "Decision",
    "Finding",
    "IdPKeyParser",
    "InvalidClaim",
    "IssuerMismatch",
    "JWKSApp",
    "JWKSEndpoint",
    "JWKSFile",
    "KeyRecord",
    "KeySet",
    "KeySource",
    "KeysUnavailable",
    "LifetimeTooLong",
    "MalformedToken",
    "MemoryReplayCache",
    "MeshAuthError",
    "MissingClaim",
    "Policy",
    "Principal",
    "ReplayCache",
    "ReplayStoreUnavailable",
    "ResponseAuthError",
    "ResponseVerifier",
    "RotationPlan",
    "ServiceAuth",
    "ServiceIdentity",
    "SigningKey",
    "StaticKeys",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenTooLarge",
    "Unavailable",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "Verifier",
    "WrongAudience",
    "WrongTokenType",
    "__version__",
    "canonical_path",
    "check_registry",
    "jwks_app",
    "plan_rotation",
]
