"""Running the gateway under uvicorn (the ``gateway`` extra)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Final

from .._exceptions import ConfigurationError
from ._config import load_config
from ._proxy import create_app

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "serve"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2


def serve(config_path: str | os.PathLike[str]) -> int:
    """Load the configuration and serve the gateway on ``listen`` until SIGINT/SIGTERM.

    Returns the process exit code: ``0`` after a clean shut-down, ``1`` when
    the server could not run (the port is taken, start-up failed), ``2`` for
    a configuration error, whose message (naming the file and the key) is
    printed to stderr.
    """
    try:
        config = load_config(config_path)
        app = create_app(config)
    except ConfigurationError as exc:
        print(f"meshauth gateway: {exc.detail}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        import uvicorn  # noqa: PLC0415 - the optional 'gateway' extra, needed only to serve
    except ImportError:
        print(
            "meshauth gateway: uvicorn is not installed; install the extra: pip install 'meshauth[gateway]'",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_CONFIG
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="on",
            # The access log would print request lines, and a query string
            # may carry a secret; the audit log records every request instead.
            access_log=False,
            # The gateway reads X-Forwarded-For itself, trusting only the
            # configured proxies; uvicorn must not rewrite the peer address.
            proxy_headers=False,
            # Upstream responses carry their own Server and Date headers.
            server_header=False,
            date_header=False,
            log_level="info",
        )
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal
    # again for the handler it found installed. Installing a recording
    # handler first turns that into a normal return, so that a clean stop
    # exits with 0 rather than being killed by the re-raised signal.
    stops: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stops.append(signum))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        return exc.code if isinstance(exc.code, int) and exc.code else EXIT_FAILED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK if server.started else EXIT_FAILED
