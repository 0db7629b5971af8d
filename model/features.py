"""The one place where raw user and item data become model inputs, for training and for serving.

Training (prefix samples), evaluation (history + request time) and the service (a Redis record)
all describe users as a ``RawUsers`` batch and call ``FeatureEncoder.encode_users``: that is the
guard against train/serve skew. A user is described only by what was known at ``now``.

Index conventions: in every vocabulary 0 means "missing" (and pads sequences), 1 means
"out of vocabulary", known values start at 2. History entries are catalog positions + 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.catalog import catalog_indices
from model.data.schema import GENRE_SEPARATOR, PROFILE_FIELDS, InteractionData
from model.settings import FeatureConfig

MISSING = 0
OOV = 1
SECONDS_PER_DAY = 86_400.0
# Profile tensor columns, in order; zip is reduced to its prefix.
PROFILE_COLUMNS: tuple[str, ...] = ("gender", "age", "occupation", "zip_prefix")
STATE_COLUMNS: tuple[str, ...] = ("interaction_count", "days_since_first", "days_since_last")
COUNT_COLUMN = STATE_COLUMNS.index("interaction_count")


class Vocabulary:
    """String value → index, fitted on training data; unseen values map to OOV."""

    def __init__(self, values: list[str]) -> None:
        self.values = list(values)
        self._index = {value: i + 2 for i, value in enumerate(self.values)}

    @classmethod
    def fit(cls, values: np.ndarray | pd.Series | list[str]) -> Vocabulary:
        unique = sorted({str(v) for v in values if str(v) != ""})
        return cls(unique)

    def __len__(self) -> int:
        """Size of the embedding table this vocabulary needs (missing and OOV included)."""
        return len(self.values) + 2

    def encode(self, values: np.ndarray | pd.Series | list[str]) -> np.ndarray:
        # A dict lookup per value: microseconds for the service's one-user batches, where a pandas
        # round trip costs a millisecond, and fast enough for training's few hundred thousand rows.
        index = self._index
        return np.fromiter(
            (MISSING if (text := str(value)) == "" else index.get(text, OOV) for value in values),
            dtype=np.int64,
            count=len(values),
        )


@dataclass
class RawUsers:
    """A batch of users as the world describes them at time ``now`` (all arrays of length B).

    ``history`` holds raw item ids, newest first, padded with -1; counts and timestamps describe
    every interaction before ``now`` (the history itself may be capped).
    """

    profiles: dict[str, np.ndarray]
    history: np.ndarray
    interaction_count: np.ndarray
    first_timestamp: np.ndarray
    last_timestamp: np.ndarray
    now: np.ndarray

    def __len__(self) -> int:
        return len(self.now)


@dataclass
class EncodedUsers:
    """Model inputs of the user tower: int64 arrays (B, 4), (B, L), (B, 3)."""

    profile: np.ndarray
    history: np.ndarray
    state: np.ndarray


@dataclass
class ItemFeatures:
    """Per-catalog-position item inputs: id index, genre multi-hot (n, G), year and popularity buckets."""

    id_index: np.ndarray
    genres: np.ndarray
    year: np.ndarray
    popularity: np.ndarray


def bucketise(values: np.ndarray, bounds: tuple[float, ...], present: np.ndarray | None = None) -> np.ndarray:
    """Bucket 1 + i for bounds[i] <= v < bounds[i+1]; 0 where the value is absent."""
    buckets = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="right").astype(np.int64)
    buckets = np.maximum(buckets, 1)
    if present is not None:
        buckets[~present] = MISSING
    return buckets


class FeatureEncoder:
    """Fitted vocabularies, buckets and the item catalog; turns raw users and items into tensors."""

    def __init__(
        self,
        config: FeatureConfig,
        vocabularies: dict[str, Vocabulary],
        catalog_item_ids: np.ndarray,
        item_popularity: np.ndarray,
        item_genres: list[str],
        item_years: np.ndarray,
    ) -> None:
        self.config = config
        self.vocabularies = vocabularies
        self.catalog_item_ids = np.asarray(catalog_item_ids, dtype=np.int64)
        self.item_popularity = np.asarray(item_popularity, dtype=np.int64)
        self.item_genres = list(item_genres)
        self.item_years = np.asarray(item_years, dtype=np.int64)
        # Per state column: the bucket served in place of each bucket (identity until fitted).
        self.state_buckets: list[np.ndarray] = [
            np.arange(c, dtype=np.int64) for c in self.state_cardinalities()
        ]

    # ----- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, data: InteractionData, train_user_ids: np.ndarray, config: FeatureConfig) -> FeatureEncoder:
        """Vocabularies and popularity from train users only; the catalog is every known item."""
        # Only the item column of the train rows: a copy of whole rows would be the largest object here.
        train_item_ids = data.interactions.loc[data.interactions["user_id"].isin(train_user_ids), "item_id"]
        users = data.users[data.users["user_id"].isin(train_user_ids)]
        catalog = data.catalog_item_ids()
        items = data.items.set_index("item_id").reindex(catalog)
        genres = items["genres"].fillna("").astype(str).to_list()
        years = items["year"].astype("Int64").fillna(-1).to_numpy(np.int64)
        counts = train_item_ids.value_counts()
        popularity = counts.reindex(catalog).fillna(0).to_numpy(np.int64)
        train_items = np.unique(train_item_ids.to_numpy(np.int64))
        vocabularies = {
            "gender": Vocabulary.fit(users["gender"]),
            "age": Vocabulary.fit(users["age"]),
            "occupation": Vocabulary.fit(users["occupation"]),
            "zip_prefix": Vocabulary.fit(
                zip_prefixes(users["zip_code"].to_numpy(), config.zip_prefix_length)
            ),
            "item_id": Vocabulary.fit(train_items.astype(str)),
            "genre": Vocabulary.fit([g for text in genres for g in text.split(GENRE_SEPARATOR)]),
            "year": Vocabulary.fit([str(b) for b in year_buckets(years, config.year_bucket_size) if b >= 0]),
        }
        return cls(config, vocabularies, catalog, popularity, genres, years)

    def fit_state_coverage(self, state_codes: np.ndarray) -> None:
        """Serves every state bucket that fewer than ``min_state_samples`` training samples reached as
        the nearest bucket that training did reach.

        A bucket no sample fell into keeps the random embedding it was initialised with; a user landing
        there at serving (a return after a longer gap than any seen, more actions than any train user)
        would get an arbitrary gate. ``state_codes`` are the encoded training samples' state columns.
        """
        # Any integer dtype: training keeps its samples' codes in the smallest one (model/samples.py).
        state_codes = np.asarray(state_codes)
        # Fitting again on codes this map produced gives the same map: buckets it moves end at 0.
        self.state_buckets = [
            nearest_trained_bucket(
                np.bincount(state_codes[:, column], minlength=cardinality)[:cardinality],
                self.config.min_state_samples,
            )
            for column, cardinality in enumerate(self.state_cardinalities())
        ]

    def remapped_state_buckets(self) -> dict[str, dict[int, int]]:
        """{state column: {bucket: bucket served in its place}} for the buckets not served as themselves."""
        return {
            name: {int(b): int(s) for b, s in enumerate(served) if b != s}
            for name, served in zip(STATE_COLUMNS, self.state_buckets, strict=True)
            if np.any(served != np.arange(len(served)))
        }

    def serve_state_buckets(self, state_codes: np.ndarray) -> np.ndarray:
        """Encoded state columns with each bucket replaced by the one served in its place, in the
        codes' own integer dtype (a list gives int64), one column at a time: training remaps millions of
        samples' codes, and an int64 copy of all of them would outweigh the codes."""
        state_codes = np.asarray(state_codes)
        served_codes = np.empty_like(state_codes)
        for column, served in enumerate(self.state_buckets):
            served_codes[:, column] = served[state_codes[:, column]]
        return served_codes

    # ----- users -------------------------------------------------------------------------------
    def encode_users(self, raw: RawUsers) -> EncodedUsers:
        return EncodedUsers(
            profile=self.encode_profiles(raw.profiles, len(raw)),
            history=self.encode_history(raw.history),
            state=self.encode_state(raw),
        )

    def encode_profiles(self, profiles: dict[str, np.ndarray], batch: int) -> np.ndarray:
        columns = []
        for name in PROFILE_COLUMNS:
            source = "zip_code" if name == "zip_prefix" else name
            values = profiles.get(source)
            if values is None:
                columns.append(np.full(batch, MISSING, dtype=np.int64))
                continue
            values = np.asarray(values, dtype=object)
            if name == "zip_prefix":
                values = zip_prefixes(values, self.config.zip_prefix_length)
            columns.append(self.vocabularies[name].encode(values))
        return np.stack(columns, axis=1)

    def encode_history(self, history: np.ndarray) -> np.ndarray:
        """Raw item ids (newest first, -1 padded) → catalog position + 1, 0 for padding or unknown items.

        Unknown items are dropped and the rest shifted left, so position 0 is always the newest known item.
        """
        history = np.asarray(history, dtype=np.int64).reshape(len(history), -1)[:, : self.config.max_history]
        codes = self.history_codes(history)
        known = codes != MISSING
        # Stable sort on "is padding" compacts known entries to the left, keeping their order.
        order = np.argsort(~known, axis=1, kind="stable")
        codes = np.take_along_axis(codes, order, axis=1)
        out = np.zeros((len(history), self.config.max_history), dtype=np.int64)
        out[:, : codes.shape[1]] = codes
        return out

    def history_codes(self, item_ids: np.ndarray) -> np.ndarray:
        """The history code of each raw item id (any shape): catalog position + 1, MISSING (0) for
        padding (negative ids) or an item outside the catalog. Training gathers its histories from
        these codes (model/samples.py), so this is the one definition of what a history entry means."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if not len(self.catalog_item_ids):
            return np.full(item_ids.shape, MISSING, dtype=np.int64)
        # Position + 1: an id outside the catalog is position -1, so code 0, which is MISSING; negative
        # ids are padding whatever the catalog holds.
        return np.where(item_ids >= 0, self.catalog_positions(item_ids) + 1, MISSING)

    def encode_state(self, raw: RawUsers) -> np.ndarray:
        count = np.asarray(raw.interaction_count, dtype=np.int64)
        now = np.asarray(raw.now, dtype=np.float64)
        seen = count > 0
        since_first = (now - np.asarray(raw.first_timestamp, dtype=np.float64)) / SECONDS_PER_DAY
        since_last = (now - np.asarray(raw.last_timestamp, dtype=np.float64)) / SECONDS_PER_DAY
        buckets = np.stack(
            [
                bucketise(count, tuple(float(b) for b in self.config.count_bounds)),
                bucketise(np.maximum(since_first, 0.0), self.config.days_bounds, present=seen),
                bucketise(np.maximum(since_last, 0.0), self.config.days_bounds, present=seen),
            ],
            axis=1,
        )
        return self.serve_state_buckets(buckets)

    def state_cardinalities(self) -> tuple[int, int, int]:
        count = len(self.config.count_bounds) + 1
        days = len(self.config.days_bounds) + 1
        return count, days, days

    def profile_cardinalities(self) -> tuple[int, ...]:
        return tuple(len(self.vocabularies[name]) for name in PROFILE_COLUMNS)

    # ----- items -------------------------------------------------------------------------------
    def item_features(self) -> ItemFeatures:
        genre_vocab = self.vocabularies["genre"]
        multi_hot = np.zeros((len(self.catalog_item_ids), len(genre_vocab)), dtype=np.float32)
        for row, text in enumerate(self.item_genres):
            if text:
                multi_hot[row, genre_vocab.encode(text.split(GENRE_SEPARATOR))] = 1.0
        multi_hot[multi_hot.sum(axis=1) == 0, MISSING] = 1.0
        years = year_buckets(self.item_years, self.config.year_bucket_size)
        return ItemFeatures(
            id_index=self.vocabularies["item_id"].encode(self.catalog_item_ids.astype(str)),
            genres=multi_hot,
            year=np.where(years >= 0, self.vocabularies["year"].encode(years.astype(str)), MISSING),
            popularity=bucketise(
                self.item_popularity, tuple(float(b) for b in self.config.popularity_bounds)
            ),
        )

    def catalog_positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog position of each raw item id, -1 where the item is not in the catalog."""
        return catalog_indices(self.catalog_item_ids, np.asarray(item_ids, dtype=np.int64))

    # ----- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "config": self.config.model_dump(mode="json"),
            "vocabularies": {name: vocab.values for name, vocab in self.vocabularies.items()},
            "catalog_item_ids": self.catalog_item_ids.tolist(),
            "item_popularity": self.item_popularity.tolist(),
            "item_genres": self.item_genres,
            "item_years": self.item_years.tolist(),
            "state_buckets": [column.tolist() for column in self.state_buckets],
        }

    @classmethod
    def from_dict(cls, state: dict) -> FeatureEncoder:
        encoder = cls(
            FeatureConfig.model_validate(state["config"]),
            {name: Vocabulary(values) for name, values in state["vocabularies"].items()},
            np.asarray(state["catalog_item_ids"], dtype=np.int64),
            np.asarray(state["item_popularity"], dtype=np.int64),
            state["item_genres"],
            np.asarray(state["item_years"], dtype=np.int64),
        )
        # Encoders saved before the coverage was fitted serve every bucket as itself, as they did.
        if state.get("state_buckets") is not None:
            encoder.state_buckets = [np.asarray(c, dtype=np.int64) for c in state["state_buckets"]]
        return encoder

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> FeatureEncoder:
        return cls.from_dict(json.loads(path.read_text()))


def nearest_trained_bucket(counts: np.ndarray, min_samples: int) -> np.ndarray:
    """For each bucket, itself when ``counts`` reach ``min_samples``, else the nearest bucket that does
    (the lower one on a tie); identity when no bucket does or ``min_samples`` is 0.

    Bucket 0 (missing: no action yet) is not on the scale of the others, so it neither borrows from nor
    lends to them.
    """
    buckets = np.arange(len(counts), dtype=np.int64)
    trained = np.flatnonzero(counts[1:] >= min_samples) + 1
    if min_samples == 0 or len(trained) == 0:
        return buckets
    on_scale = buckets[1:]
    distance = np.abs(on_scale[:, None] - trained[None, :])
    served = buckets.copy()
    served[1:] = trained[np.argmin(distance, axis=1)]  # argmin takes the first, i.e. lower, on a tie
    return served


def zip_prefixes(zip_codes: np.ndarray, length: int) -> np.ndarray:
    return np.asarray([str(z)[:length] if length else "" for z in zip_codes], dtype=object)


def year_buckets(years: np.ndarray, size: int) -> np.ndarray:
    """Start year of each item's bucket, -1 where the year is unknown."""
    years = np.asarray(years, dtype=np.int64)
    return np.where(years > 0, years // size * size, -1)


def profile_arrays(users: pd.DataFrame, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Profile field → values for ``user_ids`` from a user table; unknown users get empty profiles."""
    table = users.set_index("user_id").reindex(np.asarray(user_ids, dtype=np.int64))
    return {field: table[field].fillna("").astype(str).to_numpy(dtype=object) for field in PROFILE_FIELDS}


def raw_users_from_histories(
    profiles: dict[str, np.ndarray],
    histories: list[np.ndarray],
    history_timestamps: list[np.ndarray],
    now: np.ndarray,
    max_history: int,
) -> RawUsers:
    """Users whose whole chronological history (oldest first) is known, as of ``now``."""
    batch = len(histories)
    history = np.full((batch, max_history), -1, dtype=np.int64)
    first = np.zeros(batch, dtype=np.int64)
    last = np.zeros(batch, dtype=np.int64)
    count = np.zeros(batch, dtype=np.int64)
    for row, (items, stamps) in enumerate(zip(histories, history_timestamps, strict=True)):
        recent = np.asarray(items, dtype=np.int64)[::-1][:max_history]
        history[row, : len(recent)] = recent
        count[row] = len(items)
        if len(items):
            first[row], last[row] = int(stamps[0]), int(stamps[-1])
    return RawUsers(profiles, history, count, first, last, np.asarray(now, dtype=np.int64))
