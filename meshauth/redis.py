"""The shared key registry and replay protection on Redis (DESIGN section 10).

Needs the ``redis`` extra (``pip install 'meshauth[redis]'``)::

    from meshauth.redis import RedisKeys, RedisPublisher, RedisReplayCache

    keys = RedisKeys("redis://127.0.0.1:6379/0")                  # every verifier
    me = meshauth.ServiceIdentity.ephemeral("orders", RedisPublisher("redis://127.0.0.1:6379/0"))
    verifier = meshauth.Verifier("orders", keys, replay_cache=RedisReplayCache("redis://127.0.0.1:6379/0"))

See docs/registry.md, "Scaling out on Redis".
"""

from __future__ import annotations

from ._redis_common import load_redis

load_redis()  # fail at import with an error naming the extra, not on first use

from ._ephemeral import EphemeralIdentity  # noqa: E402 - after the dependency check on purpose
from ._redis_keys import RedisKeys  # noqa: E402
from ._redis_publish import RedisPublisher, RedisReplayCache  # noqa: E402

__all__ = ["EphemeralIdentity", "RedisKeys", "RedisPublisher", "RedisReplayCache"]

for _name in __all__:
    globals()[_name].__module__ = "meshauth.redis"
del _name
