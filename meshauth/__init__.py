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
    BodyMismatch,
    ConfigurationError,
    DuplicateAuthorization,
    InvalidClaim,
    InvalidNonce,
    IssuerMismatch,
    KeyExpired,
    KeysUnavailable,
    LifetimeTooLong,
    MalformedToken,
    MeshAuthError,
    MissingClaim,
    MissingCredentials,
    MissingResponse,
    MissingTxnToken,
    NonceMismatch,
    ReplayStoreUnavailable,
    ResponseAuthError,
    StatusMismatch,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    TokenTooLarge,
    TxnMismatch,
    Unavailable,
    UnboundBody,
    UnknownKey,
    UnsupportedAlgorithm,
    UntrustedTxnIssuer,
    WrongAudience,
    WrongResponder,
    WrongScheme,
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
from . import _public

__all__ = [
    "AccessDenied",
    "BadPath",
    "BadSignature",
    "BodyMismatch",
    "CompositeKeys",
    "ConfigurationError",
    "Decision",
    "DuplicateAuthorization",
    "Finding",
    "IdPKeyParser",
    "InvalidClaim",
    "InvalidNonce",
    "IssuerMismatch",
    "JWKSApp",
    "JWKSEndpoint",
    "JWKSFile",
    "KeyExpired",
    "KeyRecord",
    "KeySet",
    "KeySource",
    "KeysUnavailable",
    "LifetimeTooLong",
    "MalformedToken",
    "MemoryReplayCache",
    "MeshAuthError",
    "MissingClaim",
    "MissingCredentials",
    "MissingResponse",
    "MissingTxnToken",
    "NonceMismatch",
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
    "StatusMismatch",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenTooLarge",
    "TxnMismatch",
    "Unavailable",
    "UnboundBody",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "UntrustedTxnIssuer",
    "Verifier",
    "WrongAudience",
    "WrongResponder",
    "WrongScheme",
    "WrongTokenType",
    "__version__",
    "canonical_path",
    "check_registry",
    "jwks_app",
    "plan_rotation",
]


_public.show_as_public(globals(), __all__, __name__)
