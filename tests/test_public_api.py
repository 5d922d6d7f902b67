"""The curated public surface: sorted, importable, and free of optional dependencies."""

from __future__ import annotations

import subprocess
import sys

import meshauth


def test_all_is_sorted_and_complete() -> None:
    assert meshauth.__all__ == sorted(meshauth.__all__)
    for name in meshauth.__all__:
        assert hasattr(meshauth, name), name
    public = {n for n in dir(meshauth) if not n.startswith("_") and n not in {"testing", "audit"}}
    modules = {n for n in public if type(getattr(meshauth, n)).__name__ == "module"}
    assert public - modules <= set(meshauth.__all__)


def test_exception_tree() -> None:
    assert issubclass(meshauth.TokenError, meshauth.MeshAuthError)
    for name in ("AccessDenied", "KeysUnavailable", "ResponseAuthError", "ConfigurationError"):
        error = getattr(meshauth, name)
        assert issubclass(error, meshauth.MeshAuthError) and not issubclass(error, meshauth.TokenError)
    reasons = {cls.reason for cls in meshauth.TokenError.by_reason.values()}
    assert reasons == {
        "too_large",
        "malformed",
        "wrong_type",
        "unsupported_alg",
        "unknown_kid",
        "bad_signature",
        "missing_claim",
        "invalid_claim",
        "issuer_mismatch",
        "wrong_audience",
        "expired",
        "not_yet_valid",
        "lifetime_too_long",
        "replayed",
        "missing_txn_token",
        "txn_mismatch",
        "untrusted_txn_issuer",
        "key_expired",
        "missing_credentials",
        "wrong_scheme",
        "duplicate_authorization",
    }


def test_core_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, meshauth; "
        "bad = [m for m in ('fastapi', 'flask', 'starlette', 'uvicorn', 'opentelemetry.sdk', 'respx', 'django', "
        "'rest_framework', 'grpc', 'requests') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_py_typed_marker_ships() -> None:
    from importlib import resources

    assert resources.files("meshauth").joinpath("py.typed").is_file()
