"""The meshauth console: a read-only web page over audit logs and the key registry.

Run it with ``meshauth console --audit audit.jsonl [--registry registry.json]``,
or from Python::

    from meshauth.console import AuditIndex, ConsoleServer, open_registry

    server = ConsoleServer(AuditIndex(["audit.jsonl"]), open_registry("registry.json", expiry_warning=7 * 86400))
    server.start()          # follows the logs and serves http://127.0.0.1:<port>/ in background threads
    print(server.url)
    ...
    server.stop()

Standard library only: no extra to install. The page's HTML, CSS and
JavaScript ship inside this package, so it works offline.
"""

from __future__ import annotations

from ._index import FILTERS, AuditIndex, Page
from ._registry_view import RegistryView, open_registry
from ._server import ConsoleServer, is_loopback

__all__ = ["FILTERS", "AuditIndex", "ConsoleServer", "Page", "RegistryView", "is_loopback", "open_registry"]
