"""ServiceIdentity: minting, the per-audience token cache and its concurrency guarantees."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest

import meshauth
from meshauth._jws import b64url_decode
from meshauth.testing import FakeClock, Mesh


class CountingKey(meshauth.SigningKey):
    """A signing key that counts (and can slow down) its signatures."""

    __slots__ = ("calls", "delay_event")

    def __init__(self, base: meshauth.SigningKey) -> None:
        super().__init__(base._private)
        self.calls = 0
        self.delay_event: threading.Event | None = None

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        if self.delay_event is not None:
            self.delay_event.wait(5)
        return super().sign(data)


def _claims(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


def test_token_shape(mesh: Mesh, clock: FakeClock) -> None:
    token = mesh.identity("orders").token_for("payments")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": mesh.signing_keys["orders"].kid, "typ": "meshauth+jwt"}
    claims = _claims(token)
    assert claims["iss"] == claims["sub"] == "orders"
    assert claims["aud"] == "payments"
    assert claims["iat"] == int(clock()) and claims["exp"] == int(clock()) + 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 22  # 128 random bits
    assert "act" not in claims and "scope" not in claims


def test_token_for_is_cached_until_the_refresh_margin(mesh: Mesh, clock: FakeClock) -> None:
    orders = mesh.identity("orders")
    first = orders.token_for("payments")
    assert orders.token_for("payments") == first
    assert orders.token_for("billing") != first
    clock.advance(300 - 61)  # a minute and a second before expiry: still cached
    assert orders.token_for("payments") == first
    clock.advance(2)  # inside the refresh margin: a new token
    second = orders.token_for("payments")
    assert second != first
    assert _claims(second)["iat"] == int(clock())


def test_scoped_tokens_are_cached_separately(mesh: Mesh) -> None:
    orders = mesh.identity("orders")
    plain = orders.token_for("payments")
    scoped = orders.token_for("payments", scope="charges:write")
    assert plain != scoped
    assert _claims(scoped)["scope"] == "charges:write"
    assert orders.token_for("payments", scope="charges:write") == scoped


def test_invalidate_forces_a_new_token(mesh: Mesh) -> None:
    orders = mesh.identity("orders")
    first = orders.token_for("payments")
    scoped = orders.token_for("payments", scope="a")
    other = orders.token_for("billing")
    orders.invalidate("payments")
    assert orders.token_for("payments") != first
    assert orders.token_for("payments", scope="a") != scoped
    assert orders.token_for("billing") == other
    orders.invalidate()
    assert orders.token_for("billing") != other


def test_mint_is_always_fresh(mesh: Mesh) -> None:
    orders = mesh.identity("orders")
    assert orders.mint("payments") != orders.mint("payments")


def test_service_tokens_carry_no_user(mesh: Mesh) -> None:
    """Version 2: sub is always the service itself; a user travels in a Txn-Token, bound by tth."""
    orders = mesh.identity("orders")
    txn = mesh.identity("gateway").issue_txn_token("alice")
    claims = json.loads(b64url_decode(orders.mint("payments", txn_token=txn).split(".")[1], "payload"))
    assert claims["sub"] == claims["iss"] == "orders" and "act" not in claims and len(claims["tth"]) == 43
    with pytest.raises(TypeError):
        orders.mint("payments", subject="alice")  # type: ignore[call-arg]


def test_on_behalf_of_binds_the_inbound_txn_token(mesh: Mesh) -> None:
    txn = mesh.identity("gateway").issue_txn_token("alice")
    inbound = mesh.verifier("orders").verify(mesh.identity("gateway").token_for("orders", txn_token=txn), txn)
    onward = mesh.identity("orders").on_behalf_of(inbound, "payments")
    principal = mesh.verifier("payments").verify(onward, txn)
    assert (principal.caller, principal.subject, principal.transaction) == ("orders", "alice", inbound.transaction)
    assert mesh.identity("orders").on_behalf_of(inbound, "payments") == onward  # cached per Txn-Token


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"audience": ""}, ValueError),
        ({"audience": "payments", "subject": "alice"}, TypeError),  # removed in version 2
        ({"audience": "payments", "actors": ("gateway",)}, TypeError),  # removed in version 2
        ({"audience": "payments", "txn_token": "caf\u00e9"}, ValueError),  # not ASCII
        ({"audience": "payments", "scope": ["two words"]}, ValueError),
        ({"audience": "payments", "ttl": 0}, ValueError),
    ],
)
def test_mint_rejects_bad_arguments(mesh: Mesh, kwargs: dict[str, object], error: type[Exception]) -> None:
    audience = kwargs.pop("audience")
    with pytest.raises(error):
        mesh.identity("orders").mint(audience, **kwargs)  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    key = meshauth.SigningKey.generate()
    with pytest.raises(ValueError, match="name"):
        meshauth.ServiceIdentity("", key)
    with pytest.raises(TypeError):
        meshauth.ServiceIdentity("orders", "not a key")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        meshauth.ServiceIdentity("orders", key, ttl=3)


def test_from_env(tmp_path: pytest.TempPathFactory) -> None:
    key = meshauth.SigningKey.generate("EdDSA")
    path = tmp_path / "orders.pem"  # type: ignore[operator]
    path.write_bytes(key.to_pem(password="pw"))
    identity = meshauth.ServiceIdentity.from_env(
        {"MESHAUTH_SERVICE": "orders", "MESHAUTH_KEY_FILE": str(path), "MESHAUTH_KEY_PASSWORD": "pw"}, ttl=60
    )
    assert identity.name == "orders" and identity.key.kid == key.kid and identity.ttl == 60
    with pytest.raises(meshauth.ConfigurationError, match="MESHAUTH_KEY_FILE"):
        meshauth.ServiceIdentity.from_env({"MESHAUTH_SERVICE": "orders"})


def test_mint_response_token(mesh: Mesh) -> None:
    token = mesh.identity("payments").mint_response("orders", "n0nce")
    header = jwt.get_unverified_header(token)
    claims = _claims(token)
    assert header["typ"] == "meshauth-response+jwt"
    assert claims["iss"] == claims["sub"] == "payments" and claims["aud"] == "orders"
    assert claims["nonce"] == "n0nce" and claims["exp"] - claims["iat"] <= 60
    with pytest.raises(ValueError, match="at most 60 s"):
        mesh.identity("payments").mint_response("orders", "n", ttl=61)
    with pytest.raises(ValueError, match="nonce"):
        mesh.identity("payments").mint_response("orders", "")


def test_cold_cache_many_threads_one_signature(clock: FakeClock) -> None:
    key = CountingKey(meshauth.SigningKey.generate())
    identity = meshauth.ServiceIdentity("orders", key, clock=clock)
    key.delay_event = threading.Event()
    barrier = threading.Barrier(50)

    def call() -> str:
        barrier.wait(5)
        return identity.token_for("payments")

    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(call) for _ in range(50)]
        # Let every thread reach the lock before the one signer finishes.
        threading.Timer(0.2, key.delay_event.set).start()
        tokens = {f.result(timeout=10) for f in futures}
    assert len(tokens) == 1
    assert key.calls == 1


def test_cold_cache_many_tasks_one_signature(clock: FakeClock) -> None:
    key = CountingKey(meshauth.SigningKey.generate())
    identity = meshauth.ServiceIdentity("orders", key, clock=clock)

    async def main() -> set[str]:
        results = await asyncio.gather(*(identity.atoken_for("payments") for _ in range(50)))
        return set(results)

    assert len(asyncio.run(main())) == 1
    assert key.calls == 1


def test_async_caller_waits_off_loop_while_a_thread_signs(clock: FakeClock) -> None:
    key = CountingKey(meshauth.SigningKey.generate())
    identity = meshauth.ServiceIdentity("orders", key, clock=clock)
    key.delay_event = threading.Event()
    signer = threading.Thread(target=identity.token_for, args=("payments",))
    signer.start()
    while key.calls == 0:  # the thread now holds the lock and is signing
        threading.Event().wait(0.001)

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        waiting = asyncio.create_task(identity.atoken_for("payments"))
        await asyncio.sleep(0.1)  # the loop keeps running while the thread signs
        key.delay_event.set()  # type: ignore[union-attr]
        token = await asyncio.wait_for(waiting, 5)
        ticking.cancel()
        return token, ticks

    token, ticks = asyncio.run(main())
    signer.join(5)
    assert ticks > 5, "the event loop was blocked"
    assert key.calls == 1
    assert token == identity.token_for("payments")


def test_refresh_ahead_does_not_block_other_callers(clock: FakeClock) -> None:
    key = CountingKey(meshauth.SigningKey.generate())
    identity = meshauth.ServiceIdentity("orders", key, clock=clock)
    first = identity.token_for("payments")
    clock.advance(250)  # inside the refresh margin but far from expiry
    key.delay_event = threading.Event()
    refresher = threading.Thread(target=identity.token_for, args=("payments",))
    refresher.start()
    while key.calls < 2:
        threading.Event().wait(0.001)
    # While the refresh is in flight, other callers get the still-valid token at once.
    assert identity.token_for("payments") == first
    key.delay_event.set()
    refresher.join(5)
    assert identity.token_for("payments") != first
    assert key.calls == 2


def test_repr_has_no_secret(mesh: Mesh) -> None:
    identity = mesh.identity("orders")
    assert "orders" in repr(identity) and "PRIVATE" not in repr(identity)


def test_token_for_normalizes_its_scope(mesh: Mesh) -> None:
    orders = mesh.identity("orders")
    assert _claims(orders.token_for("payments", scope=" a  b "))["scope"] == "a b"
    assert "scope" not in _claims(orders.token_for("payments", scope="  "))
