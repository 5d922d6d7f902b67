"""The meshauth gateway: one JWT-verifying entry point in front of internal services.

It verifies an end user's token from an external identity provider, applies
the route's policy and forwards the request upstream with a *delegated*
service token (``sub`` = the user, ``act`` = the gateway, ``aud`` = the
upstream service); the user's own token stays at the gateway.

Run it from the command line (``pip install 'meshauth[gateway]'``)::

    meshauth gateway --config gateway.toml
    meshauth gateway --check --config gateway.toml   # validate, load keys, reach key sets
    python -m meshauth.gateway --config gateway.toml

or build the ASGI app yourself::

    from meshauth.gateway import create_app
    app = create_app("gateway.toml")        # serve with any ASGI server

See ``docs/gateway.md`` for the configuration reference.
"""

from __future__ import annotations

from .. import _public
from .._idp_tokens import UserPrincipal, UserTokenVerifier
from ._check import check
from ._config import GatewayConfig, IssuerConfig, RouteConfig, Timeout, load_config, parse_config
from ._proxy import Gateway, create_app
from ._refusals import MethodNotAllowed, NoRoute, UpstreamTimeout, UpstreamUnreachable
from ._serve import serve

__all__ = [
    "Gateway",
    "GatewayConfig",
    "IssuerConfig",
    "MethodNotAllowed",
    "NoRoute",
    "RouteConfig",
    "Timeout",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "UserPrincipal",
    "UserTokenVerifier",
    "check",
    "create_app",
    "load_config",
    "parse_config",
    "serve",
]


_public.show_as_public(globals(), __all__, __name__)
