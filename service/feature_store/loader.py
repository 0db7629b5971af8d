"""Offline data → feature store: every known user's profile, recent actions and state, as
``records_from_interactions`` describes them (all interactions, none cut off by time).

Loading is idempotent and authoritative for the users it loads: their actions list is deleted and
rewritten, their hash fields set, and hash fields the data does not have (an empty profile value, the
timestamps of a user without interactions) removed, so loading the same data twice, or over a store
changed since, leaves exactly the same content. Users only in the user table get their profile and
count 0. Pipelines are not transactions: a reader racing the load may briefly see a user's actions
list empty; load before serving, or accept that blip.

Once every user is written, ``bulk_load`` writes the load marker (version, time, users;
``keys.KeyLayout.load_marker_key``): a store without it lost its data or was never completely loaded,
and the service flags its answers instead of serving every user as a new one (``marker.py``). A load
that fails half-way writes no new marker; one over a store that already has a marker leaves the old one
until it completes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from model.data.schema import InteractionData
from service.feature_store.keys import USER_FIELDS, KeyLayout
from service.feature_store.marker import LoadMarker, marker_fields
from service.feature_store.memory_store import MemoryFeatureStore
from service.feature_store.records import DEFAULT_CAP, UserRecord, iter_records

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class LoadStats:
    users: int
    actions: int  # list entries written, after the cap
    seconds: float
    marker: LoadMarker | None = None  # what the load wrote as its marker

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


def bulk_load(
    client: redis.Redis,
    layout: KeyLayout,
    data: InteractionData,
    cap: int = DEFAULT_CAP,
    user_ids: Iterable[int] | np.ndarray | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    version: str | None = None,
) -> LoadStats:
    """Writes users (all known users when ``user_ids`` is None) in pipelines of ``batch_size`` users,
    then the load marker, naming ``version`` (default: the data's fingerprint).

    Ids unknown to ``data`` are skipped and not counted: the loader never invents a user.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if version is not None and not version:
        raise ValueError("version must be non-empty (None: the data's fingerprint)")

    def write(batch: list[UserRecord]) -> None:
        _write_batch(client, layout, batch)

    stats = _load(data, cap, user_ids, batch_size, progress, write)
    marker = completed_load(data, stats.users, version)
    # Last, and only once every batch is written: the marker says the store holds a complete load.
    client.hset(layout.load_marker_key(), mapping=marker_fields(marker))
    return replace(stats, marker=marker)


def load_memory_store(
    store: MemoryFeatureStore,
    data: InteractionData,
    user_ids: Iterable[int] | np.ndarray | None = None,
    progress: bool = False,
    version: str | None = None,
) -> LoadStats:
    """``bulk_load`` for the embedded store, at the store's own cap (its marker is for /readyz only)."""

    def write(batch: list[UserRecord]) -> None:
        for record in batch:
            store.put_record(record)

    stats = _load(data, store.cap, user_ids, 10_000, progress, write)
    store.marker = completed_load(data, stats.users, version)
    return replace(stats, marker=store.marker)


def completed_load(data: InteractionData, users: int, version: str | None) -> LoadMarker:
    """The marker of a load of ``users`` users of ``data`` completed now."""
    if version is None:
        # Imported here: model.artifacts brings torch, which only this default needs.
        from model.artifacts import data_fingerprint

        # The fingerprint the model manifests record: the loaded data can be matched to a model.
        version = data_fingerprint(data)
    return LoadMarker(version=version, time=int(time.time()), users=users)


def _load(
    data: InteractionData,
    cap: int,
    user_ids: Iterable[int] | np.ndarray | None,
    batch_size: int,
    progress: bool,
    write: Callable[[list[UserRecord]], None],
) -> LoadStats:
    started = time.perf_counter()
    ids = np.union1d(data.users["user_id"], data.interactions["user_id"]) if user_ids is None else user_ids
    total = len(ids) if hasattr(ids, "__len__") else None
    users = actions = 0
    with tqdm(total=total, unit="user", desc="loading users", disable=not progress) as bar:
        for batch in _batches(iter_records(data, ids, None, cap), batch_size):
            known = [record for record in batch if record.found]
            write(known)
            users += len(known)
            actions += sum(len(record.actions) for record in known)
            bar.update(len(batch))
    return LoadStats(users=users, actions=actions, seconds=time.perf_counter() - started)


def _write_batch(client: redis.Redis, layout: KeyLayout, batch: list[UserRecord]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for record in batch:
            user_key, actions_key = layout.user_key(record.user_id), layout.actions_key(record.user_id)
            fields = user_fields(record)
            pipe.delete(actions_key)
            if record.actions:
                pipe.rpush(actions_key, *record.actions)  # already newest first
            pipe.hset(user_key, mapping=fields)
            absent = [name for name in USER_FIELDS if name not in fields]
            if absent:
                pipe.hdel(user_key, *absent)
        pipe.execute()


def user_fields(record: UserRecord) -> dict[str, str]:
    """The user hash of a record, as the layout stores it; absent values are left out."""
    fields = {name: value for name, value in record.profile.items() if value != ""}
    fields["count"] = str(record.count)
    if record.first_ts is not None:
        fields["first_ts"] = str(record.first_ts)
    if record.last_ts is not None:
        fields["last_ts"] = str(record.last_ts)
    return fields


def _batches(records: Iterable[UserRecord], size: int) -> Iterator[list[UserRecord]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch
