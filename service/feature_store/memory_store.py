"""The embedded default feature store: user records in a dict of this process, for running the service
without a Redis server (a laptop, a demo, tests). Same interface and semantics as ``RedisFeatureStore``
(cap, count, first/last timestamps, "" meaning unknown), but nothing is shared between processes and
nothing survives a restart.

Each method mutates without awaiting, so calls from one event loop are atomic, as the Redis script is;
the store is not meant to be shared between threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from model.data.schema import PROFILE_FIELDS
from service.feature_store.keys import as_user_id
from service.feature_store.marker import LoadMarker
from service.feature_store.records import (
    DEFAULT_CAP,
    EVENT_IDS_KEPT,
    EventIdConflictError,
    UserRecord,
    check_event,
    check_event_id,
    check_profile,
)


@dataclass
class _UserState:
    profile: dict[str, str] = field(default_factory=dict)
    actions: list[int] = field(default_factory=list)  # newest first, at most cap
    count: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    # (event id, item id), newest first, at most EVENT_IDS_KEPT
    event_ids: list[tuple[str, int]] = field(default_factory=list)


class MemoryFeatureStore:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.cap = cap
        self._users: dict[int, _UserState] = {}
        # Set by loader.load_memory_store, for /readyz; this store never needs one to count as loaded:
        # it cannot lose its data behind the process's back.
        self.marker: LoadMarker | None = None

    def __len__(self) -> int:
        return len(self._users)

    async def get_users(self, user_ids: Sequence[int]) -> list[UserRecord]:
        return [self._record(as_user_id(user_id)) for user_id in user_ids]

    async def record_event(
        self, user_id: int, item_id: int, timestamp: int, event_id: str | None = None
    ) -> UserRecord:
        user_id, item_id, timestamp = check_event(user_id, item_id, timestamp)
        event_id = check_event_id(event_id)
        state = self._users.setdefault(user_id, _UserState())
        if event_id:
            seen = dict(state.event_ids)
            if event_id in seen:
                if seen[event_id] != item_id:
                    raise EventIdConflictError(user_id, event_id, item_id)
                return self._record(user_id)
            state.event_ids = [(event_id, item_id), *state.event_ids[: EVENT_IDS_KEPT - 1]]
        state.actions = [item_id, *state.actions[: self.cap - 1]]
        state.count += 1
        if state.first_ts is None or timestamp < state.first_ts:
            state.first_ts = timestamp
        if state.last_ts is None or timestamp > state.last_ts:
            state.last_ts = timestamp
        return self._record(user_id)

    async def put_profile(self, user_id: int, fields: Mapping[str, str]) -> None:
        profile = check_profile(fields)
        user_id = as_user_id(user_id)
        if profile:
            self._users.setdefault(user_id, _UserState()).profile.update(profile)

    async def ping(self) -> bool:
        return True

    async def load_marker(self) -> LoadMarker | None:
        return self.marker

    def put_record(self, record: UserRecord) -> None:
        """Replaces a user's whole record (bulk loading); actions beyond the cap are dropped."""
        profile = check_profile({k: v for k, v in record.profile.items() if v != ""})
        self._users[as_user_id(record.user_id)] = _UserState(
            profile=profile,
            actions=[int(a) for a in record.actions[: self.cap]],
            count=record.count,
            first_ts=record.first_ts,
            last_ts=record.last_ts,
        )

    def _record(self, user_id: int) -> UserRecord:
        state = self._users.get(user_id)
        if state is None:
            return UserRecord.unknown(user_id)
        return UserRecord(
            user_id=user_id,
            # "" means unknown here as in Redis, where a stored "" reads back as absent.
            profile={name: state.profile[name] for name in PROFILE_FIELDS if state.profile.get(name)},
            actions=list(state.actions),
            count=state.count,
            first_ts=state.first_ts,
            last_ts=state.last_ts,
            found=True,
        )
