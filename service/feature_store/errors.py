"""The one error the feature store raises, and which failures of Redis become it.

Every way a Redis call can fail is mapped here, a Redis Cluster's included: redis-py's cluster errors
(``SlotNotCoveredError``, ``CrossSlotTransactionError``, the other ``RedisClusterException``) do not
derive from ``RedisError``, and a guard that caught only ``RedisError`` would let them through as 500s.
The service degrades reads and answers 503 to writes on a ``FeatureStoreError``, whatever its cause.
"""

from __future__ import annotations


class FeatureStoreError(RuntimeError):
    """The store could not be reached or did not answer in time; the caller should degrade.

    ``reason`` is "timeout" or "unavailable", for metrics and for the degraded answer.
    """

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


def redis_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis (or the cluster) failed this call" (redis-py imported lazily:
    the embedded store needs none of it)."""
    from redis.exceptions import RedisClusterException, RedisError

    # OSError: sockets refused or reset below redis-py's own wrapping.
    return (RedisError, RedisClusterException, OSError)


def as_store_error(operation: str, error: BaseException, timeout_s: float) -> FeatureStoreError:
    """``error`` (a timeout, or one of ``redis_failures``) as the store's error for ``operation``."""
    # TimeoutError first: it is also an OSError.
    if isinstance(error, TimeoutError):
        return FeatureStoreError(f"{operation}: no answer from Redis within {timeout_s}s", reason="timeout")
    return FeatureStoreError(f"{operation}: {type(error).__name__}: {error}")
