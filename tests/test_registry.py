"""Static and file-backed key registries."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

import meshauth
from meshauth._registry import KeySet


def _doc(*keys: meshauth.SigningKey, owner: str = "orders") -> dict[str, object]:
    return {"keys": [key.public_jwk(iss=owner) for key in keys]}


def test_static_keys_lookup_and_round_trip() -> None:
    a, b = meshauth.SigningKey.generate(), meshauth.SigningKey.generate("EdDSA")
    keys = meshauth.StaticKeys.from_jwks(json.dumps(_doc(a, b)))
    assert len(keys) == 2
    record = keys.get_key(a.kid)
    assert record is not None and record.owner == "orders" and record.alg == "ES256"
    assert keys.get_key("nope") is None
    assert keys.to_jwks() == _doc(a, b)
    assert keys.status()["ready"] is True


def test_static_keys_async_lookup() -> None:
    import asyncio

    key = meshauth.SigningKey.generate()
    keys = meshauth.StaticKeys.from_jwks(_doc(key))
    assert asyncio.run(keys.aget_key(key.kid)) is keys.get_key(key.kid)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not a valid JSON document"),
        (b'{"keys": [], "keys": []}', "duplicate member"),
        (b'{"keys": NaN}', "not a valid JSON document"),
        (b'{"keys": {}}', "'keys' array"),
        (b"[]", "'keys' array"),
        (b"\xff\xfe", "not a valid JSON document"),
    ],
)
def test_bad_documents(document: bytes, message: str) -> None:
    with pytest.raises(meshauth.ConfigurationError, match=message):
        meshauth.StaticKeys.from_jwks(document)


def test_duplicate_kids_and_private_members_are_rejected() -> None:
    key = meshauth.SigningKey.generate()
    with pytest.raises(meshauth.ConfigurationError, match="duplicate kid"):
        meshauth.StaticKeys.from_jwks(_doc(key, key))
    private = _doc(key)
    private["keys"][0]["d"] = "secret"  # type: ignore[index]
    with pytest.raises(meshauth.ConfigurationError, match="private key members") as info:
        meshauth.StaticKeys.from_jwks(private)
    assert "keys[0]" in str(info.value) and "secret" not in str(info.value)


def test_lenient_lazy_keyset_skips_and_reports_bad_keys() -> None:
    good, other = meshauth.SigningKey.generate(), meshauth.SigningKey.generate("EdDSA")
    doc = _doc(good, other)
    doc["keys"].append({"kid": "bad", "kty": "RSA", "alg": "RS256"})  # type: ignore[attr-defined]
    keyset = KeySet.from_jwks(doc, strict=False, lazy=True)
    assert len(keyset) == 2
    assert keyset.problems and "bad" in keyset.problems[0]
    assert keyset.get(good.kid) is keyset.get(good.kid)  # built once, then reused
    assert keyset.get(other.kid) is not None
    assert keyset.get("bad") is None
    assert [r.kid for r in keyset] == [good.kid, other.kid]


def test_lazy_key_that_fails_to_build_is_absent_and_reported() -> None:
    key = meshauth.SigningKey.generate()
    jwk = key.public_jwk(iss="orders")
    jwk["x"] = jwk["y"]  # structurally fine, not a point on the curve
    keyset = KeySet.from_jwks({"keys": [jwk]}, strict=False, lazy=True)
    assert keyset.get(key.kid) is None
    assert keyset.get(key.kid) is None  # judged once: not rebuilt (under the lock) on every lookup
    assert len(keyset.problems) == 1 and "not a valid ES256 public key" in keyset.problems[0]


class Ticker:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, doc: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    os.replace(tmp, path)


def test_jwks_file_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    old, new = meshauth.SigningKey.generate(), meshauth.SigningKey.generate()
    _write(path, _doc(old))
    mono = Ticker()
    source = meshauth.JWKSFile(path, check_interval=1.0, monotonic=mono)
    assert source.get_key(old.kid) is not None
    _write(path, _doc(new))
    assert source.get_key(new.kid) is None  # not checked again yet
    mono.now += 1.5
    assert source.get_key(new.kid) is not None
    assert source.get_key(old.kid) is None  # removing a key revokes it
    assert source.status()["keys"] == 1 and source.status()["last_error"] is None


def test_jwks_file_keeps_last_good_set_on_a_broken_update(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "registry.json"
    key = meshauth.SigningKey.generate()
    _write(path, _doc(key))
    mono = Ticker()
    source = meshauth.JWKSFile(path, monotonic=mono)
    _write(path, '{"keys": [ broken')
    mono.now += 2
    with caplog.at_level(logging.WARNING, logger="meshauth"):
        assert source.get_key(key.kid) is not None
    assert "keeping the last good key set" in caplog.text
    assert source.status()["last_error"] is not None
    _write(path, _doc(key, meshauth.SigningKey.generate()))
    mono.now += 2
    source.get_key(key.kid)
    assert source.status()["last_error"] is None and source.status()["keys"] == 2


def test_jwks_file_survives_the_file_disappearing(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    key = meshauth.SigningKey.generate()
    _write(path, _doc(key))
    mono = Ticker()
    source = meshauth.JWKSFile(path, monotonic=mono)
    path.unlink()
    mono.now += 2
    assert source.get_key(key.kid) is not None
    assert "cannot stat" in (source.status()["last_error"] or "")


def test_jwks_file_start_up_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(meshauth.ConfigurationError, match=r"missing\.json"):
        meshauth.JWKSFile(tmp_path / "missing.json")
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_doc(meshauth.SigningKey.generate())))
    with pytest.raises(meshauth.ConfigurationError, match="larger than"):
        meshauth.JWKSFile(path, max_bytes=10)


def test_jwks_file_reload_now(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    a, b = meshauth.SigningKey.generate(), meshauth.SigningKey.generate()
    _write(path, _doc(a))
    source = meshauth.JWKSFile(path, check_interval=3600)
    _write(path, _doc(b))
    source.reload()
    assert source.get_key(b.kid) is not None
    assert source.to_jwks() == _doc(b)
