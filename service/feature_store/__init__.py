"""Online user features: a user's profile, recent actions and state, read per request and updated per
event, then turned into model inputs by the same ``FeatureEncoder`` training uses.

Two implementations of ``FeatureStore``: ``RedisFeatureStore`` (layout in ``keys.py``) and the
embedded default ``MemoryFeatureStore``. ``loader.bulk_load`` fills Redis from offline data and then
writes the load marker (``marker.py``), which tells a loaded store from one that lost its data;
``records.records_to_raw_users`` turns records into an encoder batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from service.feature_store.errors import FeatureStoreError
from service.feature_store.keys import KeyLayout
from service.feature_store.marker import LoadMarker
from service.feature_store.memory_store import MemoryFeatureStore
from service.feature_store.records import (
    DEFAULT_CAP,
    UserRecord,
    records_from_interactions,
    records_to_raw_users,
)

if TYPE_CHECKING:
    from service.feature_store.redis_store import RedisFeatureStore

__all__ = [
    "DEFAULT_CAP",
    "FeatureStore",
    "FeatureStoreError",
    "KeyLayout",
    "LoadMarker",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "UserRecord",
    "records_from_interactions",
    "records_to_raw_users",
]


@runtime_checkable
class FeatureStore(Protocol):
    """What the service needs from a feature store; all calls are coroutines."""

    cap: int

    async def get_users(self, user_ids: Sequence[int]) -> list[UserRecord]:
        """Records in the order asked; a user the store does not know comes back with found=False."""
        ...

    async def record_event(
        self, user_id: int, item_id: int, timestamp: int, event_id: str | None = None
    ) -> UserRecord:
        """Adds one interaction (newest action, count + 1, first/last timestamps) and returns the record.

        An ``event_id`` among the user's last ``EVENT_IDS_KEPT`` is not applied again (a retry)."""
        ...

    async def put_profile(self, user_id: int, fields: Mapping[str, str]) -> None:
        """Sets profile fields (names from PROFILE_FIELDS, else ValueError)."""
        ...

    async def ping(self) -> bool:
        """Whether the store is reachable now."""
        ...

    async def load_marker(self) -> LoadMarker | None:
        """The marker of the last completed load, None when there is none (FeatureStoreError when the
        store cannot be read)."""
        ...


def __getattr__(name: str) -> Any:
    # The Redis names import redis-py, which only the "serve" extra installs; the memory store and the
    # records must stay importable without it.
    if name == "RedisFeatureStore":
        from service.feature_store import redis_store

        return getattr(redis_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
