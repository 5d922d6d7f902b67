"""``meshauth demo``: the whole story on loopback, in one command.

Starts a key registry, the gateway and two services (orders -> payments) on
127.0.0.1 with freshly generated keys in a temporary directory, then plays
the scenarios the project exists for and prints what happened to each call:
its HTTP status, the reason, and the trace id, followed by the recorded
spans. Exits 0 only when every scenario behaved as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .._exceptions import ConfigurationError, MeshAuthError, ResponseAuthError
from .._httpx import ServiceAuth
from .._identity import ServiceIdentity
from .._jwks_endpoint import JWKSEndpoint
from .._jws import b64url_decode, b64url_encode, dumps
from .._keys import SigningKey
from .._mutual import ResponseVerifier
from .._policy import Policy
from .._principal import Principal
from .._publish import jwks_app
from .._registry import JWKSFile
from .._verify import Verifier
from ..asgi import MeshAuthMiddleware

__all__ = ["main"]

IDP_ISSUER = "https://idp.demo.invalid"
IDP_AUDIENCE = "api-gateway"
SERVICES = ("gateway", "orders", "payments", "impostor")

App = Callable[..., Any]


# -- telemetry, when the SDK is installed --------------------------------------------


class _Tracing:
    """An in-memory OpenTelemetry SDK pipeline, or nothing when the SDK is not installed."""

    def __init__(self) -> None:
        self.exporter: Any = None
        self.provider: Any = None
        self.wrap_app: Callable[[App], App] = lambda app: app
        self.instrument: Callable[[Any], None] = lambda client: None
        try:
            from opentelemetry import trace  # noqa: PLC0415 - optional parts of the demo
            from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
                InMemorySpanExporter,
            )
        except ImportError:
            return
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        trace.set_tracer_provider(self.provider)
        try:
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # noqa: PLC0415
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415
        except ImportError:
            return
        provider = self.provider
        self.wrap_app = lambda app: OpenTelemetryMiddleware(app, tracer_provider=provider)
        self.instrument = lambda client: HTTPXClientInstrumentor.instrument_client(client, tracer_provider=provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @contextmanager
    def scenario(self, title: str) -> Iterator[str | None]:
        """A root span for one scenario; yields its trace id (hex) or None."""
        if self.provider is None:
            yield None
            return
        tracer = self.provider.get_tracer("meshauth.demo")
        with tracer.start_as_current_span(f"demo: {title}") as span:
            yield format(span.get_span_context().trace_id, "032x")

    def settle(self, quiet: float = 0.1, limit: float = 2.0) -> None:
        """Wait until no span has ended for ``quiet`` seconds: servers end theirs after replying."""
        if self.exporter is None:
            return
        deadline = time.monotonic() + limit
        count = -1
        while time.monotonic() < deadline:
            now = len(self.exporter.get_finished_spans())
            if now == count:
                return
            count = now
            time.sleep(quiet)

    def spans(self, trace_id: str) -> list[Any]:
        if self.exporter is None:
            return []
        wanted = int(trace_id, 16)
        return [s for s in self.exporter.get_finished_spans() if s.context.trace_id == wanted]

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


# -- the services ------------------------------------------------------------------------


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body"):
            return body


async def _reply(send: Any, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def payments_app(name: str) -> App:
    """The payments service (or an impostor pretending to be it): reports who called."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _read_body(receive)
        principal: Principal = scope["meshauth.principal"]
        await _reply(
            send,
            201,
            {
                "service": name,
                "charged_for": principal.subject,
                "caller": principal.caller,
                "transaction": principal.transaction,
                "txn_issuer": principal.txn_issuer,
            },
        )

    return app


def orders_app(identity: ServiceIdentity, payments_url: str, responses: ResponseVerifier, tracing: _Tracing) -> App:
    """The orders service: on checkout it charges the user through payments, on the user's behalf."""
    clients: list[httpx.AsyncClient] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _read_body(receive)
        principal: Principal = scope["meshauth.principal"]
        if not clients:
            client = httpx.AsyncClient(base_url=payments_url, timeout=10)
            tracing.instrument(client)
            clients.append(client)
        # Delegation: alice's Txn-Token (issued by the gateway) goes to payments
        # unchanged, bound to orders' own token; mutual auth proves payments answered.
        auth = ServiceAuth(identity, "payments", verify_responses=responses, on_behalf_of=principal)
        try:
            answer = await clients[0].post("/charges", json={"amount": 42}, auth=auth)
        except ResponseAuthError as exc:
            await _reply(send, 502, {"error": "payments could not be authenticated", "reason": exc.reason})
            return
        if answer.status_code >= 400:
            reason = answer.json().get("reason", "error")
            await _reply(send, 502, {"error": "payments refused the charge", "reason": reason})
            return
        await _reply(send, 200, {"order": "accepted", "payments": answer.json(), "response_signed_by": "payments"})

    return app


# -- the world ----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one scenario did."""

    number: int
    title: str
    expected: str
    status: int | str
    reason: str
    trace_id: str | None
    passed: bool
    note: str = ""


class World:
    """Keys, registry and running servers, all under one temporary directory."""

    def __init__(self, directory: Path, stack: ExitStack, tracing: _Tracing, say: Callable[[str], None]) -> None:
        self.directory = directory
        self.tracing = tracing
        self.stack = stack
        self.keys = {name: SigningKey.generate("EdDSA" if name == "payments" else "ES256") for name in SERVICES}
        self.identities = {name: ServiceIdentity(name, key) for name, key in self.keys.items()}
        self._write_keys()
        self.registry_source = JWKSFile(self.registry_path, check_interval=0.05)
        self.registry_url = self._serve(jwks_app(self.registry_source, max_age=1)) + "/.well-known/jwks.json"
        say(f"  registry   {self.registry_url}")
        self._start_payments(say)
        self._start_orders(say)
        self._start_gateway(say)

    def _write_keys(self) -> None:
        """Each service's private key (0600), the registry, and the identity provider's key set."""
        directory = self.directory
        for name, key in self.keys.items():
            fd = os.open(directory / f"{name}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key.to_pem())
        self.registry_path = directory / "registry.json"
        self._write_registry(SERVICES)
        self.idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self.idp_key.public_key().public_numbers()
        idp_jwk = {
            "kty": "RSA",
            "n": b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url_encode(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "kid": "idp-1",
            "alg": "RS256",
            "use": "sig",
        }
        (directory / "idp-jwks.json").write_text(json.dumps({"keys": [idp_jwk]}))

    def _serve(self, app: App) -> str:
        from ..testing import LoopbackServer  # noqa: PLC0415 - needs uvicorn, an optional dependency

        server = LoopbackServer(app, lifespan="off")  # no lifespan events: the gateway starts on first use
        url = server.start()
        self.stack.callback(server.stop)
        return url

    def _keys(self) -> JWKSEndpoint:
        endpoint = JWKSEndpoint(self.registry_url, min_max_age=1, cooldown=1)
        self.stack.callback(endpoint.close)
        return endpoint

    def _start_payments(self, say: Callable[[str], None]) -> None:
        """payments, and an impostor: a mesh member that accepts payments' tokens but signs as itself."""
        tracing = self.tracing
        self.payments_keys = self._keys()
        payments_policy = Policy.from_dict(
            {
                "default": "deny",
                "delegators": ["gateway", "orders"],
                "rules": [{"callers": ["orders"], "methods": ["POST"], "paths": ["/charges"]}],
            }
        )
        self.payments_url = self._serve(
            tracing.wrap_app(
                MeshAuthMiddleware(
                    payments_app("payments"),
                    Verifier("payments", self.payments_keys),
                    policy=payments_policy,
                    identity=self.identities["payments"],
                )
            )
        )
        say(f"  payments   {self.payments_url}")
        self.impostor_url = self._serve(
            tracing.wrap_app(
                MeshAuthMiddleware(
                    payments_app("impostor"),
                    Verifier("payments", self._keys()),  # accepts tokens meant for payments...
                    identity=self.identities["impostor"],  # ...but can only sign as itself
                )
            )
        )
        say(f"  impostor   {self.impostor_url}  (a mesh member pretending to be payments)")

    def _start_orders(self, say: Callable[[str], None]) -> None:
        self.orders_keys = self._keys()
        self.responses = ResponseVerifier("orders", self.orders_keys)
        orders_policy = Policy.from_dict(
            {
                "default": "deny",
                "delegators": ["gateway"],
                "rules": [{"callers": ["gateway"], "subjects": ["alice"], "paths": ["/orders/**"]}],
            }
        )
        self.orders_url = self._serve(
            self.tracing.wrap_app(
                MeshAuthMiddleware(
                    orders_app(self.identities["orders"], self.payments_url, self.responses, self.tracing),
                    Verifier("orders", self.orders_keys),
                    policy=orders_policy,
                    identity=self.identities["orders"],
                )
            )
        )
        say(f"  orders     {self.orders_url}")

    def _start_gateway(self, say: Callable[[str], None]) -> None:
        from ..gateway import create_app, parse_config  # noqa: PLC0415 - the gateway is optional too

        self.audit_log = self.directory / "audit.jsonl"
        issuer = {"issuer": IDP_ISSUER, "jwks": "idp-jwks.json", "audience": IDP_AUDIENCE, "algorithms": ["RS256"]}
        route = {
            "prefix": "/orders",
            "upstream": self.orders_url,
            "service": "orders",
            "methods": ["POST"],
            "issuers": [IDP_ISSUER],
            "groups": ["staff"],
        }
        config = parse_config(
            {
                "listen": "127.0.0.1:0",
                "service": "gateway",
                "key_file": "gateway.pem",
                "registry": "registry.json",
                "audit_log": str(self.audit_log),
                "issuers": [{**issuer, "leeway": 30}],
                "routes": [route],
            },
            source="demo gateway",
            base_dir=self.directory,
        )
        self.gateway_url = self._serve(self.tracing.wrap_app(create_app(config, tracer_provider=self.tracing.provider)))
        say(f"  gateway    {self.gateway_url}  (the single entry point; IdP {IDP_ISSUER})")

    def _write_registry(self, services: Sequence[str]) -> None:
        document = {"keys": [self.keys[name].public_jwk(iss=name) for name in services]}
        temporary = self.registry_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=2))
        os.replace(temporary, self.registry_path)

    def revoke(self, service: str) -> None:
        """Remove ``service``'s key from the registry, as an operator would."""
        self._write_registry([name for name in SERVICES if name != service])
        self.registry_source.reload()

    def user_token(self, subject: str = "alice", *, expires_in: int = 300, groups: Sequence[str] = ("staff",)) -> str:
        """A token from the (simulated) identity provider, signed RS256."""
        now = int(time.time())
        claims = {
            "iss": IDP_ISSUER,
            "sub": subject,
            "aud": IDP_AUDIENCE,
            "iat": now - 600 if expires_in < 0 else now,
            "exp": now + expires_in,
            "groups": list(groups),
        }
        header = {"alg": "RS256", "kid": "idp-1", "typ": "JWT"}
        signing_input = f"{b64url_encode(dumps(header))}.{b64url_encode(dumps(claims))}"
        signature = self.idp_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url_encode(signature)}"


class _AnswerSwapping(httpx.HTTPTransport):
    """An intermediary on the way back: keeps payments' signed headers, rewrites the body it relays."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        genuine = super().handle_request(request)
        genuine.read()
        genuine.close()
        headers = [(k, v) for k, v in genuine.headers.items() if k.lower() != "content-length"]
        return httpx.Response(genuine.status_code, headers=headers, content=b'{"charge": "approved", "amount": 1000}')


def _tamper(token: str) -> str:
    """Change the payload (alice becomes mallory) and keep the old signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "mallory"
    forged = b64url_encode(json.dumps(claims).encode())
    return f"{header}.{forged}.{signature}"


def _reason(response: httpx.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        return "-"
    return str(document.get("reason", "ok" if response.status_code < 400 else "-"))


# -- the report ------------------------------------------------------------------------------


def _span_label(span: Any) -> str:
    attributes = span.attributes or {}
    parts = [span.name]
    outcome = attributes.get("meshauth.outcome")
    if outcome:
        reason = attributes.get("meshauth.reason")
        parts.append(f"[{outcome}{': ' + str(reason) if reason and reason != 'ok' else ''}]")
    for key in ("meshauth.caller", "meshauth.subject", "meshauth.audience", "meshauth.transaction"):
        if key in attributes:
            parts.append(f"{key.split('.')[1]}={attributes[key]}")
    status = attributes.get("http.response.status_code", attributes.get("http.status_code"))
    if status is not None:
        parts.append(f"-> {status}")
    duration = (span.end_time - span.start_time) / 1e6 if span.end_time and span.start_time else 0.0
    parts.append(f"({duration:.1f} ms)")
    return " ".join(parts)


def _span_tree(spans: list[Any]) -> list[str]:
    """Indented lines, parents before children, siblings by start time."""
    by_id = {span.context.span_id: span for span in spans}
    children: dict[int | None, list[Any]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in by_id else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            # The ASGI instrumentation's per-message spans add noise, not information.
            if span.name.endswith((" http send", " http receive")):
                continue
            lines.append("  " * depth + _span_label(span))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


Answer = tuple[int, str, str]
"""What a scenario saw: HTTP status, reason, and a note for the reader."""


class _Story:
    """The scenarios the demo plays, one method each, against a running :class:`World`."""

    SCENARIOS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("alice calls /orders/checkout through the gateway", "200 ok", "alice"),
        ("an expired token is refused", "401 expired", "expired"),
        ("a tampered token is refused", "401 bad_signature", "tampered"),
        ("a token replayed to another service is refused", "401 wrong_audience", "replayed"),
        ("orders acting for ceo on its own is refused", "401 untrusted_txn_issuer", "orders_for_ceo"),
        ("mutual auth catches an impostor answering for payments", "refused wrong_responder", "impostor"),
        ("mutual auth catches an intermediary changing payments' answer", "refused body_mismatch", "swapped_answer"),
        ("a revoked key stops working", "502 unknown_kid", "revoked"),
    )

    def __init__(self, world: World, client: httpx.Client) -> None:
        self.world = world
        self.client = client

    def play(self, tracing: _Tracing) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for title, expected, name in self.SCENARIOS:
            with tracing.scenario(title) as trace_id:
                try:
                    status, reason, note = getattr(self, name)()
                except MeshAuthError as exc:
                    status, reason, note = "refused", exc.reason, f"{type(exc).__name__}: {exc.detail}"
            passed = f"{status} {reason}" == expected
            outcomes.append(Outcome(len(outcomes) + 1, title, expected, status, reason, trace_id, passed, note))
        return outcomes

    def through_gateway(self, token: str) -> Answer:
        response = self.client.post(
            self.world.gateway_url + "/orders/checkout",
            json={"item": "book"},
            headers={"Authorization": f"Bearer {token}"},
        )
        note = ""
        if response.status_code == 200:
            payments = response.json()["payments"]
            note = (
                f"payments charged {payments['charged_for']} called by {payments['caller']} inside transaction "
                f"{payments['transaction']} (Txn-Token from {payments['txn_issuer']}); "
                f"its answer was signed by {response.json()['response_signed_by']}"
            )
        return response.status_code, _reason(response), note

    def alice(self) -> Answer:
        return self.through_gateway(self.world.user_token())

    def expired(self) -> Answer:
        return self.through_gateway(self.world.user_token(expires_in=-300))

    def tampered(self) -> Answer:
        return self.through_gateway(_tamper(self.world.user_token()))

    def replayed(self) -> Answer:
        stolen = self.world.identities["orders"].mint("payments")  # a token orders sent to payments
        response = self.client.post(
            self.world.orders_url + "/orders/checkout", headers={"Authorization": f"Bearer {stolen}"}
        )
        return response.status_code, _reason(response), "a token for payments, replayed to orders"

    def orders_for_ceo(self) -> Answer:
        # orders holds a key and may delegate, but it cannot assert a user: it is not a Txn-Token issuer.
        orders = self.world.identities["orders"]
        forged = orders.issue_txn_token("ceo", scope="charges:write")
        token = orders.mint("payments", txn_token=forged)
        response = self.client.post(
            self.world.payments_url + "/charges",
            json={"amount": 1_000_000},
            headers={"Authorization": f"Bearer {token}", "Txn-Token": forged},
        )
        return response.status_code, _reason(response), "orders signed a Txn-Token for ceo itself"

    def impostor(self) -> Answer:
        auth = ServiceAuth(self.world.identities["orders"], "payments", verify_responses=self.world.responses)
        response = self.client.post(self.world.impostor_url + "/charges", json={"amount": 1}, auth=auth)
        return response.status_code, _reason(response), "the impostor's answer was accepted"

    def swapped_answer(self) -> Answer:
        auth = ServiceAuth(self.world.identities["orders"], "payments", verify_responses=self.world.responses)
        with httpx.Client(transport=_AnswerSwapping(), timeout=15) as relayed:
            response = relayed.post(self.world.payments_url + "/charges", json={"amount": 1}, auth=auth)
        return response.status_code, _reason(response), "the changed answer was accepted"

    def revoked(self) -> Answer:
        self.world.revoke("orders")
        asyncio.run(self.world.payments_keys.arefresh())
        status, reason, _ = self.through_gateway(self.world.user_token())
        return status, reason, "orders' key was removed from the registry; payments refused its token"


def _print_outcomes(outcomes: list[Outcome], out: Callable[[str], None]) -> None:
    for outcome in outcomes:
        mark = "PASS" if outcome.passed else "FAIL"
        out(f"  {mark}  {outcome.number}. {outcome.title}")
        out(f"        {outcome.status!s:>7}  {outcome.reason:<16} trace {outcome.trace_id or '-'}")
        if outcome.note:
            out(f"        {outcome.note}")
        if not outcome.passed:
            out(f"        expected {outcome.expected}")


def _print_spans(tracing: _Tracing, outcomes: list[Outcome], out: Callable[[str], None]) -> None:
    if not tracing.enabled:
        out("(install opentelemetry-sdk to see the spans: pip install 'meshauth[demo]')")
        return
    tracing.settle()
    out("")
    out("spans:")
    for outcome in outcomes:
        if outcome.trace_id is None:
            continue
        out(f"  trace {outcome.trace_id}  ({outcome.number}. {outcome.title})")
        for line in _span_tree(tracing.spans(outcome.trace_id)):
            out(f"    {line}")


def run(directory: Path, *, show_spans: bool, out: Callable[[str], None], kept: bool = True) -> int:
    """Run the demo in ``directory``; returns the exit code."""
    started = time.monotonic()
    tracing = _Tracing()
    with ExitStack() as stack:
        out(f"meshauth demo: keys and registry in {directory}")
        out("starting services on 127.0.0.1 ...")
        world = World(directory, stack, tracing, out)
        client = stack.enter_context(httpx.Client(timeout=15))
        tracing.instrument(client)
        out("")
        out("scenarios:")
        outcomes = _Story(world, client).play(tracing)
        _print_outcomes(outcomes, out)
        records = world.audit_log.read_text().splitlines() if world.audit_log.exists() else []
        out("")
        out(
            f"audit log: {len(records)} records, one per decision of the gateway and the services, in {world.audit_log}"
        )
        log, registry = shlex.quote(str(world.audit_log)), shlex.quote(str(world.registry_path))
        browse = f"meshauth console --audit {log} --registry {registry}"
        if show_spans or not tracing.enabled:
            _print_spans(tracing, outcomes, out)
    tracing.shutdown()
    passed = sum(o.passed for o in outcomes)
    out("")
    out(f"{passed} of {len(outcomes)} scenarios behaved as expected in {time.monotonic() - started:.1f} s")
    if kept:
        out(f"browse the audit log: {browse}")
    else:  # the temporary directory is removed when the demo ends
        out("browse an audit log: meshauth demo --dir demo; meshauth console --audit demo/audit.jsonl")
    return 0 if passed == len(outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshauth demo``."""
    parser = argparse.ArgumentParser(
        prog="meshauth demo",
        description=(
            "Start a key registry, the gateway and two services (orders -> payments) on 127.0.0.1 with "
            "fresh keys, play the story (alice's call, expired and tampered tokens, a replayed token, an "
            "impostor, a revoked key) and print each outcome with its trace id and the recorded spans."
        ),
        epilog="exit codes: 0 every scenario behaved as expected, 1 one did not, 2 the demo could not start",
    )
    parser.add_argument("--dir", type=Path, help="keep keys, registry and audit log in DIR (default: a temp dir)")
    parser.add_argument("--no-spans", action="store_true", help="do not print the span trees")
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.getLogger("meshauth").setLevel(logging.ERROR)  # the report says what happened

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        if args.dir is not None:
            args.dir.mkdir(parents=True, exist_ok=True)
            return run(args.dir, show_spans=not args.no_spans, out=out)
        with tempfile.TemporaryDirectory(prefix="meshauth-demo-") as directory:
            return run(Path(directory), show_spans=not args.no_spans, out=out, kept=False)
    except ModuleNotFoundError as exc:
        print(f"meshauth demo needs {exc.name}: pip install 'meshauth[demo]'", file=sys.stderr)
        return 2
    except (ConfigurationError, OSError, RuntimeError) as exc:
        print(f"meshauth demo could not start: {exc}", file=sys.stderr)
        return 2
