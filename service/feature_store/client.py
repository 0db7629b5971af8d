"""Redis clients for the feature store: one Redis or a Redis Cluster, chosen by the settings, behind
the same commands (redis-py's ``RedisCluster`` mixes in the command classes of ``Redis``).

The defaults of redis-py hurt a service, so both are tuned:

- one Redis: the default pool fails callers beyond ``max_connections`` at once (MaxConnectionsError);
  a blocking pool queues them, for at most ``timeout_s``. The default retry backs off and retries a
  refused connection ten times, so a down Redis would cost every request the whole timeout instead of
  failing in microseconds; one immediate retry is kept (it reconnects a pooled connection that a Redis
  restart has closed).
- a cluster: ``max_connections`` per node; the client follows MOVED/ASK redirections and refreshes its
  slot map itself, every call still bounded by the store's timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

if TYPE_CHECKING:
    import redis as sync_redis
    import redis.cluster as sync_cluster

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TIMEOUT_S = 0.1

AsyncClient = Redis | RedisCluster
# redis-py's own default for a cluster client's connections per node.
DEFAULT_CLUSTER_CONNECTIONS = 2**31


def create_client(
    url: str = DEFAULT_URL,
    max_connections: int = 64,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    cluster: bool = False,
) -> AsyncClient:
    """The service's client: a ``RedisCluster`` when ``cluster`` (``url`` names any node), else one Redis."""
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=1),
    )
    return Redis(connection_pool=pool)


def create_sync_client(url: str, cluster: bool = False) -> sync_redis.Redis | sync_cluster.RedisCluster:
    """A blocking client for the offline loader (``load-features``); its pipelines are split by node
    on a cluster."""
    import redis
    from redis.cluster import RedisCluster as SyncRedisCluster

    if cluster:
        return SyncRedisCluster.from_url(url)
    return redis.Redis.from_url(url)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def cluster_connections(client: RedisCluster) -> int:
    """The connections a cluster client opens to each node at most."""
    return int(client.nodes_manager.connection_kwargs.get("max_connections", DEFAULT_CLUSTER_CONNECTIONS))
