"""The one in-memory shape every loader produces and every later step consumes.

Ids are int64 throughout: feed backends key users and items by 64-bit integers, and FAISS maps
item ids as int64. Profile values are strings so that one vocabulary type covers them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

INTERACTION_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "rating")
PROFILE_FIELDS: tuple[str, ...] = ("gender", "age", "occupation", "zip_code")
USER_COLUMNS: tuple[str, ...] = ("user_id", *PROFILE_FIELDS)
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "genres", "year")
GENRE_SEPARATOR = "|"


class DataFormatError(ValueError):
    """A data file that cannot be read; the message names the file and, where known, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class InteractionData:
    """Interactions plus optional side tables, normalised.

    - ``interactions``: user_id int64, item_id int64, timestamp int64 (Unix seconds), rating float32
      (NaN where the source has none); sorted by (user_id, timestamp, item_id).
    - ``users``: user_id int64 and the PROFILE_FIELDS as str ("" where unknown); one row per user.
    - ``items``: item_id int64, title str, genres str (GENRE_SEPARATOR-joined, "" if none),
      year Int64 (nullable); one row per item.
    """

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    name: str

    def catalog_item_ids(self) -> np.ndarray:
        """Every item that can be recommended, sorted: the item table plus any item interacted with."""
        ids = np.union1d(
            self.items["item_id"].to_numpy(np.int64), self.interactions["item_id"].to_numpy(np.int64)
        )
        return ids.astype(np.int64)


def normalise_interactions(frame: pd.DataFrame) -> pd.DataFrame:
    """Casts to the schema's dtypes and the (user, timestamp, item) order the protocol relies on.

    Ties keep their input order (a stable sort). At tens of millions of rows memory decides: rows
    already in order are not sorted, and otherwise one ``np.lexsort`` orders them and the columns are
    reordered one at a time; pandas' multi-column ``sort_values`` needs several times the table."""
    columns = {
        name: frame[name].astype(dtype).reset_index(drop=True)
        for name, dtype in (("user_id", np.int64), ("item_id", np.int64), ("timestamp", np.int64))
    }
    columns["rating"] = (
        frame["rating"].astype(np.float32).reset_index(drop=True)
        if "rating" in frame
        else pd.Series(np.full(len(frame), np.nan, dtype=np.float32))
    )
    keys = [columns[name].to_numpy() for name in ("item_id", "timestamp", "user_id")]  # last = primary
    if not _in_interaction_order(*keys[::-1]):
        order = np.lexsort(keys)
        del keys
        for name, column in columns.items():
            columns[name] = pd.Series(column.to_numpy()[order])
    return pd.DataFrame(columns, copy=False)


def _in_interaction_order(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray) -> bool:
    """Whether the rows are sorted by (user, timestamp, item)."""
    step = np.diff(user)
    if (step < 0).any():
        return False
    tied = step == 0
    step = np.diff(timestamp)
    if (tied & (step < 0)).any():
        return False
    tied &= step == 0
    return not (tied & (np.diff(item) < 0)).any()


def normalise_users(frame: pd.DataFrame | None, user_ids: np.ndarray) -> pd.DataFrame:
    """One row per user in ``user_ids`` ∪ the table; missing profile fields become ""."""
    table = frame.copy() if frame is not None else pd.DataFrame({"user_id": np.array([], dtype=np.int64)})
    table["user_id"] = table["user_id"].astype(np.int64)
    for field in PROFILE_FIELDS:
        if field not in table:
            table[field] = ""
        table[field] = table[field].fillna("").astype(str)
    missing = np.setdiff1d(user_ids, table["user_id"].to_numpy())
    if len(missing):
        extra = pd.DataFrame({"user_id": missing, **{f: "" for f in PROFILE_FIELDS}})
        table = pd.concat([table[list(USER_COLUMNS)], extra], ignore_index=True)
    table = table[list(USER_COLUMNS)].drop_duplicates("user_id", keep="first")
    return table.sort_values("user_id").reset_index(drop=True)


def normalise_items(frame: pd.DataFrame | None, item_ids: np.ndarray) -> pd.DataFrame:
    """One row per item in ``item_ids`` ∪ the table; missing title/genres become "", year NA."""
    table = frame.copy() if frame is not None else pd.DataFrame({"item_id": np.array([], dtype=np.int64)})
    table["item_id"] = table["item_id"].astype(np.int64)
    for field in ("title", "genres"):
        if field not in table:
            table[field] = ""
        table[field] = table[field].fillna("").astype(str)
    table["year"] = (
        table["year"].astype("Int64") if "year" in table else pd.array([pd.NA] * len(table), "Int64")
    )
    missing = np.setdiff1d(item_ids, table["item_id"].to_numpy())
    if len(missing):
        extra = pd.DataFrame(
            {"item_id": missing, "title": "", "genres": "", "year": pd.array([pd.NA] * len(missing), "Int64")}
        )
        table = pd.concat([table[list(ITEM_COLUMNS)], extra], ignore_index=True)
    table = table[list(ITEM_COLUMNS)].drop_duplicates("item_id", keep="first")
    return table.sort_values("item_id").reset_index(drop=True)


def make_interaction_data(
    interactions: pd.DataFrame,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    name: str,
) -> InteractionData:
    """The single constructor loaders use, so every source ends in the same normalised shape."""
    inter = normalise_interactions(interactions)
    return InteractionData(
        interactions=inter,
        users=normalise_users(users, np.unique(inter["user_id"].to_numpy())),
        items=normalise_items(items, np.unique(inter["item_id"].to_numpy())),
        name=name,
    )
