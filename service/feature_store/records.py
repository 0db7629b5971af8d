"""A user's record as the feature store holds it, and its two translations: from offline interaction
data (bulk loading, parity tests) and into the ``RawUsers`` batch the shared ``FeatureEncoder`` reads.

Serving must describe a user exactly as training and evaluation do (``model.samples`` and
``model.ranker``): history = item ids before ``now``, newest first, capped at ``max_history``;
interaction_count = every interaction so far (it may exceed the cap); first/last timestamp of those
interactions; ``now`` = the request time. A user the store does not know becomes a cold-start user:
empty profile, no history, count 0.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.data.schema import PROFILE_FIELDS, InteractionData
from model.features import RawUsers
from model.settings import FeatureConfig
from service.feature_store.keys import as_user_id

# The model reads at most max_history actions; keeping fewer would starve it, keeping more is waste.
DEFAULT_CAP = FeatureConfig().max_history


@dataclass
class UserRecord:
    """One user as stored: ``actions`` newest first (at most the store's cap), ``count`` all of them."""

    user_id: int
    profile: dict[str, str] = field(default_factory=dict)
    actions: list[int] = field(default_factory=list)
    count: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    found: bool = False

    @classmethod
    def unknown(cls, user_id: int) -> UserRecord:
        """The record of a user the store has never heard of: a cold-start user."""
        return cls(user_id=as_user_id(user_id))


def records_to_raw_users(
    records: Sequence[UserRecord], now: int | Sequence[int], max_history: int
) -> RawUsers:
    """The batch the encoder reads, each user as of ``now`` (one time for all, or one per record)."""
    batch = len(records)
    nows = _per_record(now, batch)
    history = np.full((batch, max_history), -1, dtype=np.int64)
    count = np.zeros(batch, dtype=np.int64)
    first = np.zeros(batch, dtype=np.int64)
    last = np.zeros(batch, dtype=np.int64)
    for row, record in enumerate(records):
        recent = record.actions[:max_history]
        history[row, : len(recent)] = recent
        # A damaged count must not make a user with actions look brand new.
        count[row] = max(record.count, len(record.actions))
        if count[row] > 0:
            first[row], last[row] = _timestamps(record, int(nows[row]))
    profiles = {
        name: np.array([str(r.profile.get(name, "")) for r in records], dtype=object)
        for name in PROFILE_FIELDS
    }
    return RawUsers(profiles, history, count, first, last, nows)


def _per_record(now: int | Sequence[int], batch: int) -> np.ndarray:
    nows = np.asarray(now, dtype=np.int64)
    if nows.ndim == 0:
        return np.full(batch, int(nows), dtype=np.int64)
    if nows.shape != (batch,):
        raise ValueError(f"now must be one time or one per record ({batch}), got shape {nows.shape}")
    return nows.copy()


def _timestamps(record: UserRecord, now: int) -> tuple[int, int]:
    # Only a damaged record has interactions without timestamps; borrowing the other timestamp (or
    # now) keeps "days since" small instead of decades long, which would look like a dormant user.
    first = record.first_ts if record.first_ts is not None else record.last_ts
    last = record.last_ts if record.last_ts is not None else record.first_ts
    return (now if first is None else first), (now if last is None else last)


def records_from_interactions(
    data: InteractionData,
    user_ids: Iterable[int] | np.ndarray | None = None,
    as_of: int | None = None,
    cap: int = DEFAULT_CAP,
) -> list[UserRecord]:
    """The offline view of users' records: what the store holds once every interaction with
    ``timestamp < as_of`` (all of them when ``as_of`` is None) has been recorded, and no other.

    ``user_ids`` None means every known user. A user of the user table is ``found`` even without
    interactions; a user in neither table comes back ``unknown``. Empty profile values are left out:
    "" and an absent field both mean unknown.

    The cut is by time, so interactions sharing the timestamp ``as_of`` are all excluded; an
    evaluation point cuts by position and may keep some of them (MovieLens has many same-second
    ratings). Both agree whenever the request time is later than the last history timestamp.
    """
    return list(iter_records(data, user_ids, as_of, cap))


def iter_records(
    data: InteractionData,
    user_ids: Iterable[int] | np.ndarray | None = None,
    as_of: int | None = None,
    cap: int = DEFAULT_CAP,
) -> Iterator[UserRecord]:
    """Like ``records_from_interactions``, lazily: the bulk loader streams millions of users."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    index = _InteractionIndex(data)
    ids = index.all_user_ids() if user_ids is None else user_ids
    for user_id in ids:
        yield index.record(as_user_id(user_id), as_of, cap)


class _InteractionIndex:
    """Per-user slices of the sorted interaction table and rows of the user table, found by bisection."""

    def __init__(self, data: InteractionData) -> None:
        interactions = data.interactions
        self.interaction_users = interactions["user_id"].to_numpy(np.int64)
        if np.any(np.diff(self.interaction_users) < 0):
            raise ValueError("interactions must be sorted by user_id (use make_interaction_data)")
        self.items = interactions["item_id"].to_numpy(np.int64)
        self.stamps = interactions["timestamp"].to_numpy(np.int64)
        users = data.users
        order = np.argsort(users["user_id"].to_numpy(np.int64), kind="stable")
        self.table_users = users["user_id"].to_numpy(np.int64)[order]
        self.profiles = {
            name: users[name].fillna("").astype(str).to_numpy(dtype=object)[order] for name in PROFILE_FIELDS
        }

    def all_user_ids(self) -> np.ndarray:
        return np.union1d(self.table_users, self.interaction_users)

    def record(self, user_id: int, as_of: int | None, cap: int) -> UserRecord:
        start, stop = (int(i) for i in np.searchsorted(self.interaction_users, [user_id, user_id + 1]))
        profile, in_table = self._profile(user_id)
        if not in_table and start == stop:
            return UserRecord.unknown(user_id)
        if as_of is not None:
            # Within a user, rows are in (timestamp, item) order, so the kept rows are a prefix.
            stop = start + int(np.searchsorted(self.stamps[start:stop], as_of, side="left"))
        items = self.items[start:stop]
        stamps = self.stamps[start:stop]
        return UserRecord(
            user_id=user_id,
            profile=profile,
            actions=[int(i) for i in items[::-1][:cap]],
            count=int(stop - start),
            first_ts=int(stamps[0]) if len(stamps) else None,
            last_ts=int(stamps[-1]) if len(stamps) else None,
            found=True,
        )

    def _profile(self, user_id: int) -> tuple[dict[str, str], bool]:
        row = int(np.searchsorted(self.table_users, user_id))
        if row >= len(self.table_users) or self.table_users[row] != user_id:
            return {}, False
        values = {name: column[row] for name, column in self.profiles.items()}
        return {name: value for name, value in values.items() if value != ""}, True


def check_event(user_id: int, item_id: int, timestamp: int) -> tuple[int, int, int]:
    """Validated (user, item, timestamp) of an event; both stores accept exactly the same events."""
    values = []
    for name, value in (("item_id", item_id), ("timestamp", timestamp)):
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, not a bool")
        values.append(operator.index(value))
    # -1 pads histories, so a negative item id would silently vanish at encoding time.
    if values[0] < 0:
        raise ValueError(f"item_id must be >= 0, got {values[0]}")
    return as_user_id(user_id), values[0], values[1]


# Ids of a user's last events kept for deduplication: enough for any retry of the latest few events.
EVENT_IDS_KEPT = 8
# Stored with each kept event id: the item it was for ("id=item"; "=" is not an id character), so that
# an id sent again for another item is told apart from a retry.
EVENT_ITEM_SEPARATOR = "="


class EventIdConflictError(ValueError):
    """An event id among the user's last ones came again with another item: not a retry, a client bug."""

    def __init__(self, user_id: int, event_id: str, item_id: int) -> None:
        super().__init__(
            f"event_id {event_id!r} was already used for another item of user {user_id}; "
            f"a retry must send the same item ({item_id} differs)"
        )


# No spaces: the script keeps the ids space-separated. The API validates with the same pattern.
EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)


def check_event_id(event_id: str | None) -> str:
    """ "" (no deduplication) or an id of 1-64 characters from [A-Za-z0-9_.:-] (no separators)."""
    if event_id is None or event_id == "":
        return ""
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise ValueError(f"event_id must be 1-64 characters of [A-Za-z0-9_.:-], got {event_id!r}")
    return event_id


def check_profile(fields: Mapping[str, str]) -> dict[str, str]:
    """Profile fields to store; unknown names are errors, unknown values are not (they encode as OOV)."""
    unknown = sorted(set(fields) - set(PROFILE_FIELDS))
    if unknown:
        raise ValueError(f"unknown profile fields {unknown}; expected a subset of {list(PROFILE_FIELDS)}")
    wrong = sorted(name for name, value in fields.items() if not isinstance(value, str))
    if wrong:
        raise TypeError(f"profile values must be strings; not so for {wrong}")
    return dict(fields)
