"""A request inside a user's transaction, as the gateway starts it, for tests."""

from __future__ import annotations

from meshauth.testing import Mesh


def in_transaction(
    mesh: Mesh, caller: str, audience: str, subject: str = "alice", *, issuer: str = "gateway", scope: str | None = None
) -> dict[str, str]:
    """Headers of ``caller``'s request to ``audience`` inside ``subject``'s transaction (Txn-Token by ``issuer``)."""
    txn = mesh.identity(issuer).issue_txn_token(subject, scope=scope)
    token = mesh.identity(caller).token_for(audience, txn_token=txn)
    return {"Authorization": f"Bearer {token}", "Txn-Token": txn}
