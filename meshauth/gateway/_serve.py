"""Running the gateway: the socket, the worker processes, signals and exit codes (DESIGN section 8).

The parent process loads the configuration (exit ``2`` on an error), raises
its open-file limit, binds ``listen`` once (exit ``1``, naming ``listen``,
when the port is taken) and serves it with :class:`HTTPServer`; with
``workers = N`` it forks N processes that accept on the one pre-bound socket
and stops them all on SIGINT/SIGTERM. Each worker builds its own gateway
application and its own span exporter after the fork (threads and event loops
do not survive a fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import signal
import socket
import sys
import threading
from typing import Any, Final

from .._exceptions import ConfigurationError, Unavailable
from .._telemetry import audit
from ._config import GatewayConfig, load_config
from ._exchange import AUDIT_EVENT
from ._export import start_export
from ._proxy import Gateway, create_app
from ._server import HTTPServer, Refusal
from ._server_config import Limits
from ._tracing import start_trace

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "serve"]

logger = logging.getLogger("meshauth.gateway")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
# Descriptors kept free for the upstream connection pool, key fetches, logs and the exporter.
_RESERVED_DESCRIPTORS: Final = 640
_BACKLOG: Final = 2048


def _say(message: str) -> None:
    print(f"meshauth gateway: {message}", file=sys.stderr, flush=True)


def serve(config_path: str | os.PathLike[str]) -> int:
    """Load the configuration and serve the gateway on ``listen`` until SIGINT/SIGTERM.

    Returns the process exit code: ``0`` after a clean shut-down, ``1`` when
    the server could not run (the port is taken, start-up failed), ``2`` for
    a configuration error, whose message (naming the file and the key) is
    printed to stderr.
    """
    try:
        config = load_config(config_path)
    except ConfigurationError as exc:
        _say(exc.detail)
        return EXIT_CONFIG
    limits = _fit_to_descriptors(config.limits)
    try:
        sock = bind(config)
    except OSError as exc:
        _say(str(exc))
        return EXIT_FAILED
    with sock:
        if config.workers == 1:
            return run_worker(config, sock, limits)
        return _supervise(config, sock, limits)


def bind(config: GatewayConfig) -> socket.socket:
    """A listening socket on ``listen``; an ``OSError`` whose message names the key and the cause."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise OSError(f"listen: cannot resolve {config.listen}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"listen: {config.listen} is already in use by another process") from None
        if exc.errno == errno.EACCES:
            raise OSError(f"listen: not permitted to listen on {config.listen}") from None
        raise OSError(f"listen: cannot listen on {config.listen}: {exc.strerror or exc}") from None
    return sock


def _fit_to_descriptors(limits: Limits) -> Limits:
    """Raise the soft open-file limit to the hard one; lower ``max_connections`` if it still cannot fit.

    Each client connection holds a descriptor; running out makes accept fail
    for everyone, the failure ``max_connections`` exists to prevent.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    room = soft - _RESERVED_DESCRIPTORS if soft != resource.RLIM_INFINITY else limits.max_connections
    if limits.max_connections <= room:
        return limits
    fitted = max(1, room)
    _say(
        f"limits.max_connections: {limits.max_connections} needs more open files than RLIMIT_NOFILE allows "
        f"({soft}); serving at most {fitted} connections"
    )
    return dataclasses.replace(limits, max_connections=fitted)


def run_worker(config: GatewayConfig, sock: socket.socket, limits: Limits) -> int:
    """Serve ``sock`` in this process until SIGINT/SIGTERM; the exit code."""
    try:
        exporters = start_export(config.telemetry, config.service)
    except ConfigurationError as exc:
        _say(exc.detail)
        return EXIT_CONFIG
    try:
        try:
            app = create_app(config, tracer_provider=exporters.tracer_provider, meter_provider=exporters.meter_provider)
        except ConfigurationError as exc:
            _say(exc.detail)
            return EXIT_CONFIG
        except Unavailable as exc:  # a Redis registry that could not be reached to publish the key
            _say(f"registry: {exc.detail}")
            return EXIT_FAILED
        return asyncio.run(_run(app, sock, limits))
    finally:
        exporters.shutdown()


async def _run(app: Gateway, sock: socket.socket, limits: Limits) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        try:
            await app.startup()
        except Exception as exc:
            _say(f"start-up failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        server = HTTPServer(app, limits, on_refusal=audit_refusal)
        await server.start(sock)
        logger.info("gateway: serving on %s (pid %d)", app.config.listen, os.getpid())
        await stop.wait()
        await server.stop()
        return EXIT_OK
    finally:
        await app.aclose()
        for sig in handled:
            loop.remove_signal_handler(sig)


def audit_refusal(refusal: Refusal) -> None:
    """The one audit record of a request the server answered itself."""
    fields: dict[str, Any] = {"status": refusal.status, "client": refusal.client, "detail": refusal.detail}
    if refusal.method is not None:
        fields["method"] = refusal.method[:16]
    if refusal.path is not None:
        fields["path"] = refusal.path[:1024]
    fields["trace_id"] = start_trace(refusal.headers).trace_id
    outcome = "error" if refusal.status >= 500 else "rejected"
    audit(AUDIT_EVENT, outcome, refusal.reason, **fields)


def _supervise(config: GatewayConfig, sock: socket.socket, limits: Limits) -> int:
    """Fork ``workers`` processes on the shared socket; stop them together; the worst exit code."""
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(config.workers):
            pid = os.fork()
            if pid == 0:  # the worker
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                code = EXIT_FAILED
                try:
                    code = run_worker(config, sock, limits)
                finally:
                    os._exit(code)
            children[pid] = -1
        worst = EXIT_OK
        while any(code < 0 for code in children.values()):
            pid, status = os.wait()
            code = os.waitstatus_to_exitcode(status)
            children[pid] = code
            if code != EXIT_OK or not stopping:
                # One worker failing takes the others down: a supervisor restarts the whole gateway.
                worst = max(worst, code if code > 0 else EXIT_FAILED)
                forward(signal.SIGTERM, None)
        return worst
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
