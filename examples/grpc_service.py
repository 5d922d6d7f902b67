"""A gRPC service behind meshauth's interceptor, and a client whose interceptor attaches tokens.

Run: python examples/grpc_service.py   (needs: pip install '.[grpc]')

Generic handlers with raw bytes keep the example free of a protoc step; with
generated stubs, pass the same interceptors to ``grpc.server`` and
``grpc.intercept_channel``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

import meshauth
from meshauth.grpc import MeshAuthClientInterceptor, MeshAuthInterceptor, principal
from meshauth.testing import Mesh

# Throw-away keys for the demo; a service loads its own with ServiceIdentity.from_env().
MESH = Mesh(["orders", "payments", "billing"])
CHARGE = "/shop.Payments/Charge"


def charge(request: bytes, context: Any) -> bytes:
    caller = principal(context)  # verified by the interceptor
    return json.dumps({"charged_for": caller.caller, "amount": json.loads(request)["amount"]}).encode()


def main() -> None:
    policy = meshauth.Policy.from_dict({"rules": [{"callers": ["orders"], "paths": ["/shop.Payments/*"]}]})
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4), interceptors=[MeshAuthInterceptor(MESH.verifier("payments"), policy=policy)]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("shop.Payments", {"Charge": grpc.unary_unary_rpc_method_handler(charge)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for name in ("orders", "billing"):
            interceptor = MeshAuthClientInterceptor(MESH.identity(name), "payments")
            with grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), interceptor) as channel:
                try:
                    answer = channel.unary_unary(CHARGE)(b'{"amount": 42}', timeout=10)
                    print(f"{name}: OK {json.loads(answer)}")
                except grpc.RpcError as error:
                    print(f"{name}: {error.code().name} {error.details()}")
    finally:
        server.stop(None).wait(5)


if __name__ == "__main__":
    main()
