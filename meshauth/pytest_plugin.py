"""pytest fixtures for code that uses meshauth, registered by the package (entry point ``pytest11``).

Installing meshauth makes these fixtures available in every test suite:

* ``meshauth_clock``: a :class:`~meshauth.testing.FakeClock` starting at the real current time;
* ``meshauth_mesh``: a :class:`~meshauth.testing.Mesh` of two services on that clock,
  the caller (ini option ``meshauth_caller``, default ``"client"``) and the callee
  (``meshauth_service``, default ``"service"``); ``mesh.add_service(name)`` adds more;
* ``meshauth_identity``: the caller's :class:`~meshauth.ServiceIdentity`;
* ``meshauth_registry``: the mesh's in-memory key registry (:class:`~meshauth.testing.MemoryKeys`);
* ``meshauth_verifier``: the callee's :class:`~meshauth.Verifier`.

Turn the plugin off with ``-p no:meshauth``. The testing helpers are imported
when a fixture is first used.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from . import ServiceIdentity, Verifier
    from .testing import FakeClock, MemoryKeys, Mesh

__all__ = [
    "meshauth_clock",
    "meshauth_identity",
    "meshauth_mesh",
    "meshauth_registry",
    "meshauth_verifier",
    "pytest_addoption",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("meshauth_caller", "service name of the meshauth_identity fixture", default="client")
    parser.addini("meshauth_service", "service name of the meshauth_verifier fixture", default="service")


@pytest.fixture
def meshauth_clock() -> FakeClock:
    """A fake wall clock starting now (whole seconds); ``advance(seconds)`` moves it."""
    from .testing import FakeClock  # noqa: PLC0415 - see the module docstring

    return FakeClock(int(time.time()))


@pytest.fixture
def meshauth_mesh(request: pytest.FixtureRequest, meshauth_clock: FakeClock) -> Mesh:
    """Two services with ephemeral keys in one in-memory registry, on ``meshauth_clock``."""
    from .testing import Mesh  # noqa: PLC0415 - see the module docstring

    caller = str(request.config.getini("meshauth_caller"))
    service = str(request.config.getini("meshauth_service"))
    return Mesh([caller, service], clock=meshauth_clock)


@pytest.fixture
def meshauth_identity(request: pytest.FixtureRequest, meshauth_mesh: Mesh) -> ServiceIdentity:
    """The caller's identity: ``meshauth_identity.token_for(<service>)``."""
    return meshauth_mesh.identity(str(request.config.getini("meshauth_caller")))


@pytest.fixture
def meshauth_registry(meshauth_mesh: Mesh) -> MemoryKeys:
    """The mesh's key registry: ``add_key``, ``revoke``, ``to_jwks``."""
    return meshauth_mesh.keys


@pytest.fixture
def meshauth_verifier(request: pytest.FixtureRequest, meshauth_mesh: Mesh) -> Verifier:
    """The callee's verifier, on the mesh registry and clock."""
    return meshauth_mesh.verifier(str(request.config.getini("meshauth_service")))
