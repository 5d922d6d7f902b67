"""meshauth.grpc: interceptors on a real gRPC server on 127.0.0.1, sync and asyncio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import pytest

import meshauth
from meshauth.grpc import (
    AsyncMeshAuthInterceptor,
    MeshAuthClientInterceptor,
    MeshAuthInterceptor,
    async_client_interceptors,
    call_credentials,
    principal,
)
from meshauth.testing import Mesh

SERVICE = "meshauth.test.Payments"
CHARGE = f"/{SERVICE}/Charge"
POLICY = {"rules": [{"callers": ["orders"], "methods": ["POST"], "paths": [f"/{SERVICE}/*"]}]}


def _who(context: Any, tag: str) -> bytes:
    caller = principal(context)
    return json.dumps({"caller": caller.caller, "subject": caller.subject, "tag": tag}).encode()


def _payments(charge: Any, stream: Any, upload: Any, chat: Any) -> Any:
    """The test service: one method of each call kind, with raw bytes as messages."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Charge": grpc.unary_unary_rpc_method_handler(charge),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


def _sync_handlers() -> list[Any]:
    def charge(request: bytes, context: Any) -> bytes:
        return _who(context, request.decode())

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield _who(context, "first")
        yield _who(context, "second")

    def upload(requests: Iterator[bytes], context: Any) -> bytes:
        return _who(context, "+".join(r.decode() for r in requests))

    def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for item in requests:
            yield _who(context, item.decode())

    def health(request: bytes, context: Any) -> bytes:
        return b"SERVING"

    def txn(request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata())
        return json.dumps({"caller": principal(context).caller, "txn-token": metadata.get("txn-token")}).encode()

    return [
        _payments(charge, stream, upload, chat),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(health)}
        ),
        grpc.method_handlers_generic_handler("meshauth.test.Txn", {"Echo": grpc.unary_unary_rpc_method_handler(txn)}),
    ]


def _aio_handlers() -> list[Any]:
    async def charge(request: bytes, context: Any) -> bytes:
        return _who(context, request.decode())

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield _who(context, "first")
        yield _who(context, "second")

    async def upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return _who(context, "+".join([r.decode() async for r in requests]))

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for item in requests:
            yield _who(context, item.decode())

    return [_payments(charge, stream, upload, chat)]


@pytest.fixture
def live() -> Mesh:
    return Mesh(["orders", "payments", "billing", "gateway"])


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start sync gRPC servers on 127.0.0.1:<free port>; all stopped at teardown."""
    servers: list[Any] = []

    def start(interceptor: Any, *, credentials: Any = None) -> str:
        server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
        server.add_generic_rpc_handlers(_sync_handlers())
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None).wait(5)


def _body(raw: bytes) -> dict[str, str]:
    return json.loads(raw)  # type: ignore[no-any-return]


def test_sync_every_call_kind_sees_the_principal(live: Mesh, serve: Any, audit_log: Any) -> None:
    address = serve(MeshAuthInterceptor(live.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY)))
    interceptor = MeshAuthClientInterceptor(live.identity("orders"), "payments")
    with grpc.intercept_channel(grpc.insecure_channel(address), interceptor) as channel:
        assert _body(channel.unary_unary(CHARGE)(b"c1", timeout=10))["caller"] == "orders"
        streamed = [_body(m)["tag"] for m in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)]
        uploaded = _body(channel.stream_unary(f"/{SERVICE}/Upload")(iter([b"a", b"b"]), timeout=10))
        chatted = [_body(m) for m in channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"x", b"y"]), timeout=10)]
    assert streamed == ["first", "second"]
    assert uploaded == {"caller": "orders", "subject": "orders", "tag": "a+b"}
    assert [m["tag"] for m in chatted] == ["x", "y"] and {m["caller"] for m in chatted} == {"orders"}
    records = audit_log.records()
    assert (records[0].meshauth["outcome"], records[0].meshauth["path"]) == ("accepted", CHARGE)
    assert len(records) == 4 and {r.meshauth["rule"] for r in records} == {0}


def _refusal(call: Any) -> tuple[Any, dict[str, str], dict[str, str]]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    return error.code(), json.loads(error.details()), dict(error.trailing_metadata() or ())


def test_sync_refusals_map_to_status_codes(live: Mesh, serve: Any, down_keys: Any, audit_log: Any) -> None:
    address = serve(MeshAuthInterceptor(live.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY)))
    with grpc.insecure_channel(address) as plain:
        code, body, trailers = _refusal(lambda: plain.unary_unary(CHARGE)(b"", timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert body == {"error": "unauthorized", "reason": "missing_credentials"}
    assert trailers["www-authenticate"] == 'Bearer realm="payments"'

    wrong = MeshAuthClientInterceptor(live.identity("orders"), "billing")
    with grpc.intercept_channel(grpc.insecure_channel(address), wrong) as channel:
        code, body, trailers = _refusal(lambda: channel.unary_unary(CHARGE)(b"", timeout=10))
    assert (code, body["reason"]) == (grpc.StatusCode.UNAUTHENTICATED, "wrong_audience")
    assert 'error_description="wrong_audience"' in trailers["www-authenticate"]

    denied = MeshAuthClientInterceptor(live.identity("billing"), "payments")
    with grpc.intercept_channel(grpc.insecure_channel(address), denied) as channel:
        code, body, _ = _refusal(lambda: channel.unary_unary(CHARGE)(b"", timeout=10))
    assert (code, body) == (grpc.StatusCode.PERMISSION_DENIED, {"error": "forbidden", "reason": "no_matching_rule"})
    assert [r.meshauth["reason"] for r in audit_log.records()] == [
        "missing_credentials",
        "wrong_audience",
        "no_matching_rule",
    ]

    down = serve(MeshAuthInterceptor(meshauth.Verifier("payments", down_keys)))
    orders = MeshAuthClientInterceptor(live.identity("orders"), "payments")
    with grpc.intercept_channel(grpc.insecure_channel(down), orders) as channel:
        code, body, trailers = _refusal(lambda: channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10).next())
    assert (code, body["reason"], trailers["retry-after"]) == (grpc.StatusCode.UNAVAILABLE, "keys_unavailable", "5")


def test_excluded_methods_and_delegation(live: Mesh, serve: Any) -> None:
    address = serve(MeshAuthInterceptor(live.verifier("payments"), exclude=["/grpc.health.v1.Health/*"]))
    with grpc.insecure_channel(address) as plain:
        assert plain.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10) == b"SERVING"
    txn = live.identity("gateway").issue_txn_token("alice")
    inbound = live.verifier("orders").verify(live.identity("gateway").token_for("orders", txn_token=txn), txn)
    onward = MeshAuthClientInterceptor(live.identity("orders"), "payments", on_behalf_of=inbound)
    with grpc.intercept_channel(grpc.insecure_channel(address), onward) as channel:
        answer = _body(channel.unary_unary(CHARGE)(b"", timeout=10))
    assert (answer["caller"], answer["subject"]) == ("orders", "alice")


def test_call_credentials_on_a_local_channel(live: Mesh, serve: Any) -> None:
    address = serve(
        MeshAuthInterceptor(live.verifier("payments")),
        credentials=grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP),
    )
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(live.identity("orders"), "payments"),
    )
    with grpc.secure_channel(address, credentials) as channel:
        assert _body(channel.unary_unary(CHARGE)(b"ok", timeout=10))["caller"] == "orders"


def test_principal_outside_an_authenticated_call() -> None:
    with pytest.raises(TypeError, match="MeshAuthInterceptor"):
        principal(object())


def test_aio_server_and_client(live: Mesh, down_keys: Any) -> None:
    async def run() -> dict[str, Any]:
        server = grpc.aio.server(
            interceptors=[AsyncMeshAuthInterceptor(live.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))]
        )
        server.add_generic_rpc_handlers(_aio_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        results: dict[str, Any] = {}
        try:
            interceptors = async_client_interceptors(live.identity("orders"), "payments")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
                results["charge"] = _body(await channel.unary_unary(CHARGE)(b"c1", timeout=10))
                results["stream"] = [
                    _body(m)["tag"] async for m in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)
                ]
                results["upload"] = _body(await channel.stream_unary(f"/{SERVICE}/Upload")(iter([b"a", b"b"])))
                results["chat"] = [
                    _body(m)["tag"] async for m in channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"x"]))
                ]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                try:
                    await plain.unary_unary(CHARGE)(b"", timeout=10)
                except grpc.aio.AioRpcError as error:
                    results["refused"] = (error.code(), json.loads(error.details() or "{}"))
            denied = async_client_interceptors(live.identity("billing"), "payments")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=denied) as channel:
                try:
                    [m async for m in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)]
                except grpc.aio.AioRpcError as error:
                    results["denied"] = (error.code(), json.loads(error.details() or "{}"))
        finally:
            await server.stop(None)
        return results

    results = asyncio.run(run())
    assert results["charge"] == {"caller": "orders", "subject": "orders", "tag": "c1"}
    assert results["stream"] == ["first", "second"]
    assert results["upload"]["tag"] == "a+b" and results["chat"] == ["x"]
    assert results["refused"] == (
        grpc.StatusCode.UNAUTHENTICATED,
        {"error": "unauthorized", "reason": "missing_credentials"},
    )
    assert results["denied"] == (
        grpc.StatusCode.PERMISSION_DENIED,
        {"error": "forbidden", "reason": "no_matching_rule"},
    )


def test_concurrent_calls_each_see_their_own_caller(live: Mesh, serve: Any, audit_log: Any) -> None:
    address = serve(MeshAuthInterceptor(live.verifier("payments")))
    channels = {
        name: grpc.intercept_channel(
            grpc.insecure_channel(address), MeshAuthClientInterceptor(live.identity(name), "payments")
        )
        for name in ("orders", "billing")
    }

    def call(index: int) -> tuple[str, dict[str, str]]:
        name = ("orders", "billing")[index % 2]
        return name, _body(channels[name].unary_unary(CHARGE)(str(index).encode(), timeout=10))

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(call, range(40)))
    finally:
        for channel in channels.values():
            channel.close()
    assert all(answer["caller"] == name for name, answer in answers)
    assert sorted(int(answer["tag"]) for _, answer in answers) == list(range(40))
    assert len(audit_log.records()) == 40


def test_on_behalf_of_forwards_the_txn_token(live: Mesh, serve: Any) -> None:
    address = serve(MeshAuthInterceptor(live.verifier("payments")))
    txn = live.identity("gateway").issue_txn_token("alice")
    inbound = live.verifier("orders").verify(live.identity("gateway").token_for("orders", txn_token=txn), txn)
    onward = MeshAuthClientInterceptor(live.identity("orders"), "payments", on_behalf_of=inbound)
    with grpc.intercept_channel(grpc.insecure_channel(address), onward) as channel:
        answer = _body(channel.unary_unary("/meshauth.test.Txn/Echo")(b"", timeout=10))
    assert answer == {"caller": "orders", "txn-token": txn}
    # Two txn-token entries are malformed.
    doubled = [("authorization", "Bearer " + live.identity("orders").token_for("payments", txn_token=txn)),
               ("txn-token", txn), ("txn-token", txn)]  # fmt: skip
    with grpc.insecure_channel(address) as channel:
        code, body, _ = _refusal(lambda: channel.unary_unary(CHARGE)(b"", timeout=10, metadata=doubled))
    assert (code, body["reason"]) == (grpc.StatusCode.UNAUTHENTICATED, "malformed")


def test_a_replayed_token_is_renewed_once_and_a_wrong_audience_is_logged(
    live: Mesh, serve: Any, audit_log: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    verifier = live.verifier("payments", replay_cache=meshauth.MemoryReplayCache(clock=live.clock))
    address = serve(MeshAuthInterceptor(verifier))
    orders = MeshAuthClientInterceptor(live.identity("orders"), "payments")
    with grpc.intercept_channel(grpc.insecure_channel(address), orders) as channel:
        first = _body(channel.unary_unary(CHARGE)(b"1", timeout=10))
        # The cached token was spent by the first call: "replayed", which a new token cures.
        second = _body(channel.unary_unary(CHARGE)(b"2", timeout=10))
    assert (first["tag"], second["tag"]) == ("1", "2")
    assert [r.meshauth["reason"] for r in audit_log.records()][1] == "replayed"
    assert len(audit_log.records()) == 3

    wrong = MeshAuthClientInterceptor(live.identity("billing"), "billing")
    with grpc.intercept_channel(grpc.insecure_channel(address), wrong) as channel:
        code, body, _ = _refusal(lambda: channel.unary_unary(CHARGE)(b"", timeout=10))
    assert (code, body["reason"]) == (grpc.StatusCode.UNAUTHENTICATED, "wrong_audience")
    assert len(audit_log.records()) == 4, "not retried"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "meshauth" and r.levelno == logging.WARNING]
    assert "realm 'payments'" in warning and "audience 'billing'" in warning and CHARGE in warning


def test_aio_client_renews_a_replayed_token(live: Mesh) -> None:
    verifier = live.verifier("payments", replay_cache=meshauth.MemoryReplayCache(clock=live.clock))

    async def run() -> list[str]:
        server = grpc.aio.server(interceptors=[AsyncMeshAuthInterceptor(verifier)])
        server.add_generic_rpc_handlers(_aio_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            interceptors = async_client_interceptors(live.identity("orders"), "payments")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
                return [_body(await channel.unary_unary(CHARGE)(tag, timeout=10))["tag"] for tag in (b"a", b"b")]
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == ["a", "b"]


# -- a method path the policy would judge in another form (dot-segments, encoded dots) ------------------

PUBLIC_ONLY = {"rules": [{"callers": ["orders"], "methods": ["POST"], "paths": ["/pub.Svc/*"]}]}
CLIMBING = ["/admin.Svc/x/../../pub.Svc/Get", "/admin.Svc/%2e%2e/pub.Svc/Get", "/admin.Svc/.%2e/pub.Svc/Get"]


class _CatchAll(grpc.GenericRpcHandler):
    """Routes every method to one handler that says which method it ran (as an app's generic handler may)."""

    def __init__(self, ran: list[str], asynchronous: bool = False) -> None:
        self.ran = ran
        self.asynchronous = asynchronous

    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        ran = self.ran

        def answer(request: bytes, context: Any) -> bytes:
            ran.append(method)
            return method.encode()

        async def aanswer(request: bytes, context: Any) -> bytes:
            return answer(request, context)

        return grpc.unary_unary_rpc_method_handler(aanswer if self.asynchronous else answer)


def test_sync_a_method_path_with_dot_segments_is_refused_before_any_handler(live: Mesh, audit_log: Any) -> None:
    ran: list[str] = []
    policy = meshauth.Policy.from_dict(PUBLIC_ONLY)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=2), interceptors=[MeshAuthInterceptor(live.verifier("payments"), policy=policy)]
    )
    server.add_generic_rpc_handlers([_CatchAll(ran)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        orders = MeshAuthClientInterceptor(live.identity("orders"), "payments")
        with grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), orders) as channel:
            assert channel.unary_unary("/pub.Svc/Get")(b"", timeout=10) == b"/pub.Svc/Get"
            code, body, _ = _refusal(lambda: channel.unary_unary("/admin.Svc/Get")(b"", timeout=10))
            assert (code, body["reason"]) == (grpc.StatusCode.PERMISSION_DENIED, "no_matching_rule")
            for method in CLIMBING:
                code, body, _ = _refusal(lambda method=method: channel.unary_unary(method)(b"", timeout=10))
                assert (code, body) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    {"error": "bad_request", "reason": "bad_path"},
                )
    finally:
        server.stop(None).wait(5)
    assert ran == ["/pub.Svc/Get"]  # the admin handler never ran
    refused = [r.meshauth for r in audit_log.records() if r.meshauth["reason"] == "bad_path"]
    assert [r["path"] for r in refused] == CLIMBING and {r["outcome"] for r in refused} == {"rejected"}


ESCAPING_EXCLUSION = ["/grpc.health.v1.Health/%2e%2e/admin.Svc/Get", "/grpc.health.v1.Health/.%2E/admin.Svc/Get"]


def test_an_excluded_prefix_cannot_be_escaped_with_encoded_dots(live: Mesh) -> None:
    ran: list[str] = []
    interceptor = MeshAuthInterceptor(live.verifier("payments"), exclude=["/grpc.health.v1.Health/*"])
    server = grpc.server(ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    server.add_generic_rpc_handlers([_CatchAll(ran)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # no credentials at all
            assert plain.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10) == b"/grpc.health.v1.Health/Check"
            for method in ESCAPING_EXCLUSION:
                code, body, _ = _refusal(lambda method=method: plain.unary_unary(method)(b"", timeout=10))
                assert (code, body["reason"]) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_path")
    finally:
        server.stop(None).wait(5)
    assert ran == ["/grpc.health.v1.Health/Check"]


def test_aio_an_excluded_prefix_cannot_be_escaped_with_encoded_dots(live: Mesh) -> None:
    ran: list[str] = []

    async def run() -> list[str]:
        interceptor = AsyncMeshAuthInterceptor(live.verifier("payments"), exclude=["/grpc.health.v1.Health/*"])
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers([_CatchAll(ran, asynchronous=True)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        reasons: list[str] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                for method in ESCAPING_EXCLUSION:
                    try:
                        await plain.unary_unary(method)(b"", timeout=10)
                    except grpc.aio.AioRpcError as error:
                        reasons.append(json.loads(error.details() or "{}")["reason"])
        finally:
            await server.stop(None)
        return reasons

    assert asyncio.run(run()) == ["bad_path"] * len(ESCAPING_EXCLUSION)
    assert ran == []


def test_aio_a_method_path_with_dot_segments_is_refused_before_any_handler(live: Mesh) -> None:
    ran: list[str] = []

    async def run() -> list[tuple[Any, str]]:
        policy = meshauth.Policy.from_dict(PUBLIC_ONLY)
        server = grpc.aio.server(interceptors=[AsyncMeshAuthInterceptor(live.verifier("payments"), policy=policy)])
        server.add_generic_rpc_handlers([_CatchAll(ran, asynchronous=True)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes: list[tuple[Any, str]] = []
        try:
            interceptors = async_client_interceptors(live.identity("orders"), "payments")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
                assert await channel.unary_unary("/pub.Svc/Get")(b"", timeout=10) == b"/pub.Svc/Get"
                for method in CLIMBING:
                    try:
                        await channel.unary_unary(method)(b"", timeout=10)
                    except grpc.aio.AioRpcError as error:
                        outcomes.append((error.code(), json.loads(error.details() or "{}")["reason"]))
        finally:
            await server.stop(None)
        return outcomes

    assert asyncio.run(run()) == [(grpc.StatusCode.INVALID_ARGUMENT, "bad_path")] * len(CLIMBING)
    assert ran == ["/pub.Svc/Get"]


def _inside_alices_transaction(live: Mesh) -> meshauth.Principal:
    """orders' inbound principal for a request the gateway made on alice's behalf."""
    txn = live.identity("gateway").issue_txn_token("alice")
    return live.verifier("orders").verify(live.identity("gateway").token_for("orders", txn_token=txn), txn)


def test_call_credentials_forward_the_txn_token(live: Mesh, serve: Any) -> None:
    address = serve(
        MeshAuthInterceptor(live.verifier("payments")),
        credentials=grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP),
    )
    inbound = _inside_alices_transaction(live)
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(live.identity("orders"), "payments", on_behalf_of=inbound),
    )
    with grpc.secure_channel(address, credentials) as channel:
        answer = _body(channel.unary_unary(CHARGE)(b"", timeout=10))
    assert (answer["caller"], answer["subject"]) == ("orders", "alice")


def test_async_client_interceptors_forward_the_txn_token(live: Mesh) -> None:
    inbound = _inside_alices_transaction(live)

    async def run() -> dict[str, str]:
        server = grpc.aio.server(interceptors=[AsyncMeshAuthInterceptor(live.verifier("payments"))])
        server.add_generic_rpc_handlers(_aio_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            interceptors = async_client_interceptors(live.identity("orders"), "payments", on_behalf_of=inbound)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
                return _body(await channel.unary_unary(CHARGE)(b"", timeout=10))
        finally:
            await server.stop(None)

    answer = asyncio.run(run())
    assert (answer["caller"], answer["subject"]) == ("orders", "alice")
