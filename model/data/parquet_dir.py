"""Interactions from a directory of Parquet files, read a bounded number of rows at a time.

The convention:

- Every ``*.parquet`` / ``*.pq`` file directly in the directory holds interactions, with the columns of
  one interactions file (``user_id, item_id, timestamp[, rating]``, model/data/generic.py); together
  they are one table, split over files however the writer chose (Spark's ``part-*.parquet``, one file
  per day, ...). A file without ``rating`` has no ratings (NaN), as a single file would.
- ``users.parquet`` and ``items.parquet`` in the directory are not interactions but the optional side
  tables. ``--users`` / ``--items`` (CSV or Parquet, anywhere) give them instead; not both ways.
- Names starting with ``_`` or ``.`` (``_SUCCESS``, ``_metadata``, hidden files) and subdirectories
  are skipped.

The rows are sorted by (user, time, item) afterwards, as from every source, so how they are split into
files, and the files' order, change nothing: the result is the InteractionData of one file holding
the same rows.

Memory: the whole table is never a pandas frame. Each file is decoded ``chunk_rows`` rows at a time
(``ParquetFile.iter_batches``; only the interaction columns), checked by generic.py's column checks
(the same messages, naming the file and its row), and copied into arrays preallocated from the files'
row counts: ids int32 while they fit (widened to int64 once if one does not), timestamps int64,
ratings float32. Reading therefore peaks at those arrays plus one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from model.data.generic import (
    INTERACTION_OPTIONAL,
    INTERACTION_REQUIRED,
    PARQUET_SUFFIXES,
    read_interaction_rows,
    read_items,
    read_users,
    require_columns,
)
from model.data.schema import DataFormatError, InteractionData, make_interaction_data

USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
# Rows decoded at once: the chunk's frame and generic.py's float64 checks of it stay at tens of MB,
# while the per-chunk overhead is negligible.
CHUNK_ROWS = 1 << 18
_ID_COLUMNS = ("user_id", "item_id")


def is_parquet_dir(directory: Path) -> bool:
    """Whether ``directory`` holds any Parquet file (interactions or side tables)."""
    return any(_is_data_file(path) for path in directory.iterdir())


def interaction_files(directory: Path) -> list[Path]:
    """The interactions files of ``directory``, in name order."""
    return sorted(
        path
        for path in directory.iterdir()
        if _is_data_file(path) and path.name not in (USERS_FILE, ITEMS_FILE)
    )


def load_parquet_dir(
    directory: Path | str,
    users: Path | None = None,
    items: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> InteractionData:
    """The directory's interactions plus the side tables (in it, or ``users`` / ``items``)."""
    directory = Path(directory)
    files = [_ParquetInput.open(path) for path in interaction_files(directory)]
    if not files:
        raise DataFormatError(
            directory,
            f"no interactions files: expected *.parquet files besides {USERS_FILE} and {ITEMS_FILE}",
        )
    columns = _Columns.allocate(
        sum(f.rows for f in files), with_rating=any("rating" in f.columns for f in files)
    )
    for source in files:
        source.read_into(columns, chunk_rows)
    if columns.filled == 0:
        raise DataFormatError(directory, "contains no interactions")
    user_table = _side_table(directory, USERS_FILE, users, "--users")
    item_table = _side_table(directory, ITEMS_FILE, items, "--items")
    return make_interaction_data(
        columns.frame(),
        read_users(user_table) if user_table else None,
        read_items(item_table) if item_table else None,
        directory.name,
    )


def _is_data_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in PARQUET_SUFFIXES and not path.name.startswith(("_", "."))


def _side_table(directory: Path, name: str, given: Path | None, option: str) -> Path | None:
    inside = directory / name
    if not inside.is_file():
        return given
    if given is not None:
        raise DataFormatError(directory, f"holds {name} and {option} {given} was given too: give one of them")
    return inside


@dataclass(frozen=True)
class _ParquetInput:
    """One interactions file: its reader, row count and the interaction columns it has."""

    path: Path
    reader: pq.ParquetFile
    columns: tuple[str, ...]

    @classmethod
    def open(cls, path: Path) -> _ParquetInput:
        """Reads the footer only; checks the required columns are there."""
        try:
            reader = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
            raise DataFormatError(path, f"not a readable Parquet file: {err}") from None
        names = reader.schema_arrow.names
        require_columns(path, names, INTERACTION_REQUIRED)
        wanted = (*INTERACTION_REQUIRED, *INTERACTION_OPTIONAL)
        return cls(path, reader, tuple(name for name in names if name in wanted))

    @property
    def rows(self) -> int:
        return int(self.reader.metadata.num_rows)

    def read_into(self, columns: _Columns, chunk_rows: int) -> None:
        first_row = 0
        try:
            # One thread: one chunk decoded at a time, not several columns and row groups ahead.
            batches = self.reader.iter_batches(
                batch_size=chunk_rows, columns=list(self.columns), use_threads=False
            )
            for batch in batches:
                if batch.num_rows:
                    columns.append(read_interaction_rows(self.path, batch.to_pandas(), first_row))
                first_row += batch.num_rows
        except DataFormatError:
            raise
        except Exception as err:  # a corrupt page surfaces only when it is decoded
            raise DataFormatError(self.path, f"not a readable Parquet file: {err}") from None


@dataclass
class _Columns:
    """The interaction columns of all files, preallocated and filled chunk by chunk."""

    arrays: dict[str, np.ndarray]
    filled: int = 0

    @classmethod
    def allocate(cls, rows: int, with_rating: bool) -> _Columns:
        arrays = {name: np.empty(rows, dtype=np.int32) for name in _ID_COLUMNS}
        arrays["timestamp"] = np.empty(rows, dtype=np.int64)
        if with_rating:
            arrays["rating"] = np.full(rows, np.nan, dtype=np.float32)  # a file without ratings has none
        return cls(arrays)

    def append(self, chunk: pd.DataFrame) -> None:
        rows = slice(self.filled, self.filled + len(chunk))
        for name in chunk.columns:
            values = chunk[name].to_numpy()
            if name in _ID_COLUMNS and not _fits(values, self.arrays[name].dtype):
                self.arrays[name] = self.arrays[name].astype(np.int64)
            self.arrays[name][rows] = values
        self.filled = rows.stop

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: values[: self.filled] for name, values in self.arrays.items()}, copy=False)


def _fits(values: np.ndarray, dtype: np.dtype) -> bool:
    limits = np.iinfo(dtype)
    return not len(values) or (limits.min <= values.min() and values.max() <= limits.max)
