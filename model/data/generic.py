"""Interactions (and optional user / item tables) from any CSV or Parquet files with known column names.

Columns are parsed in bulk; only when a column holds a bad value is its first bad row located and
turned into a file line number (CSV, header = line 1) or a 1-based row number (Parquet), so that the
message points at the spot to fix.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from model.data.schema import (
    GENRE_SEPARATOR,
    PROFILE_FIELDS,
    DataFormatError,
    InteractionData,
    make_interaction_data,
)

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
INTERACTION_REQUIRED = ("user_id", "item_id", "timestamp")
INTERACTION_OPTIONAL = ("rating",)
ITEM_OPTIONAL = ("title", "genres", "year")
_INT64_LIMIT = 2.0**63
_EPOCH = pd.Timestamp(0, tz="UTC")
_PANDAS_LINE = re.compile(r"\bline (\d+)")


def load_generic(
    interactions: Path | str,
    users: Path | str | None = None,
    items: Path | str | None = None,
    name: str | None = None,
) -> InteractionData:
    """Loads interactions (user_id, item_id, timestamp[, rating]) plus optional user and item tables."""
    interactions = Path(interactions)
    frame = _load_interactions(_Table.read(interactions, INTERACTION_REQUIRED, INTERACTION_OPTIONAL, text=()))
    user_frame = read_users(Path(users)) if users else None
    item_frame = read_items(Path(items)) if items else None
    return make_interaction_data(frame, user_frame, item_frame, name or interactions.stem)


def read_users(path: Path) -> pd.DataFrame:
    """A user table (user_id and any PROFILE_FIELDS), CSV or Parquet, validated."""
    return _load_users(_Table.read(path, ("user_id",), PROFILE_FIELDS, text=PROFILE_FIELDS))


def read_items(path: Path) -> pd.DataFrame:
    """An item table (item_id and any of title, genres, year), CSV or Parquet, validated."""
    return _load_items(_Table.read(path, ("item_id",), ITEM_OPTIONAL, text=("title", "genres")))


def read_interaction_rows(path: Path, frame: pd.DataFrame, first_row: int) -> pd.DataFrame:
    """Interaction columns (int64 ids and timestamps, float64 rating when present) of ``frame``, rows
    ``first_row``.. (0-based) of Parquet file ``path``, validated as a whole file is: an error names
    the row of the file."""
    return _load_interactions(_Table(path, frame, is_csv=False, first_row=first_row))


def require_columns(path: Path, columns: Iterable[str], required: Iterable[str]) -> None:
    """Raises for the first of ``required`` missing from ``columns``, the columns read from ``path``."""
    columns = [str(name) for name in columns]
    for column in required:
        if column not in columns:
            found = ", ".join(columns) or "none"
            raise DataFormatError(path, f"missing required column {column!r} (columns read: {found})")


def _load_interactions(table: _Table) -> pd.DataFrame:
    if table.frame.empty:
        raise DataFormatError(table.path, "contains no interactions")
    out = pd.DataFrame(
        {
            "user_id": table.int_column("user_id"),
            "item_id": table.int_column("item_id"),
            "timestamp": table.timestamp_column("timestamp"),
        }
    )
    if "rating" in table.frame:
        out["rating"] = table.float_column("rating")
    return out


def _load_users(table: _Table) -> pd.DataFrame:
    out = pd.DataFrame({"user_id": table.int_column("user_id")})
    for field in PROFILE_FIELDS:
        if field in table.frame:
            out[field] = _as_text(table.frame[field])
    return out


def _load_items(table: _Table) -> pd.DataFrame:
    out = pd.DataFrame({"item_id": table.int_column("item_id")})
    for field in ("title", "genres"):
        if field in table.frame:
            out[field] = _as_text(table.frame[field])
    if "year" in table.frame:
        out["year"] = table.optional_int_column("year")
    return out


@dataclass(frozen=True)
class _Table:
    """One input file's wanted columns, plus how to turn a row position into a place in the file.

    ``frame`` may be a part of a Parquet file, starting at its 0-based row ``first_row``."""

    path: Path
    frame: pd.DataFrame
    is_csv: bool
    first_row: int = 0

    @classmethod
    def read(
        cls, path: Path, required: Iterable[str], optional: Iterable[str], text: Iterable[str]
    ) -> _Table:
        """Reads ``required`` (each must exist) and whichever of ``optional`` exist; ``text`` stays str."""
        required, wanted = tuple(required), {*required, *optional}
        if not path.is_file():
            raise DataFormatError(path, "no such file")
        suffix = path.suffix.lower()
        if suffix in CSV_SUFFIXES:
            frame = _read_csv(path, wanted, set(text))
        elif suffix in PARQUET_SUFFIXES:
            frame = _read_parquet(path, wanted)
        else:
            raise DataFormatError(path, f"unsupported file type {suffix!r}; expected .csv, .parquet or .pq")
        require_columns(path, frame.columns, required)
        return cls(path, frame, suffix in CSV_SUFFIXES)

    def error(self, position: int, message: str) -> DataFormatError:
        if self.is_csv:
            return DataFormatError(self.path, message, _csv_line_of_record(self.path, position))
        return DataFormatError(self.path, f"{message} (Parquet row, 1-based)", self.first_row + position + 1)

    def fail_at_first(self, bad: np.ndarray, column: str, describe: Callable[[object], str]) -> None:
        """Raises for the first True in ``bad``; a no-op when there is none."""
        if bad.any():
            position = int(np.flatnonzero(bad)[0])
            raise self.error(position, f"{column}: {describe(self.frame[column].iloc[position])}")

    def int_column(self, column: str) -> np.ndarray:
        series = self.frame[column]
        if series.dtype.kind == "i" or (series.dtype.kind == "u" and (series.empty or series.max() < 2**63)):
            return series.to_numpy(np.int64)
        values = _numeric(series)
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= _INT64_LIMIT)
        self.fail_at_first(bad, column, lambda v: f"expected an integer id, got {v!r}")
        exact = pd.to_numeric(series, errors="coerce")  # int64 when every value is an integer: no rounding
        return exact.to_numpy(np.int64) if exact.dtype.kind == "i" else values.astype(np.int64)

    def optional_int_column(self, column: str) -> pd.api.extensions.ExtensionArray:
        series = self.frame[column]
        present = _present(series)
        values = _numeric(series)
        bad = present & (~np.isfinite(values) | (values != np.floor(values)))
        self.fail_at_first(bad, column, lambda v: f"expected an integer or nothing, got {v!r}")
        return pd.arrays.IntegerArray(np.where(present, values, 0).astype(np.int64), ~present)

    def float_column(self, column: str) -> np.ndarray:
        """Numbers; a blank cell is allowed and becomes NaN (the schema's "no rating")."""
        series = self.frame[column]
        values = _numeric(series)
        bad = _present(series) & ~np.isfinite(values)
        self.fail_at_first(bad, column, lambda v: f"expected a number, got {v!r}")
        return values

    def timestamp_column(self, column: str) -> np.ndarray:
        """Unix seconds from integers or ISO-8601 strings (naive ones read as UTC), mixed freely."""
        series = self.frame[column]
        if series.dtype.kind == "M":
            self.fail_at_first(series.isna().to_numpy(), column, lambda v: "missing timestamp")
            return _datetimes_to_seconds(series).to_numpy(np.int64)
        values = _numeric(series)
        needs_parse = ~np.isfinite(values) & _present(series)
        if needs_parse.any():
            parsed = pd.to_datetime(
                series[needs_parse].astype(str), format="ISO8601", utc=True, errors="coerce"
            )
            values[needs_parse] = _datetimes_to_seconds(parsed).to_numpy(np.float64)
        bad = ~np.isfinite(values) | (np.abs(values) >= _INT64_LIMIT)
        self.fail_at_first(bad, column, lambda v: f"expected Unix seconds or an ISO-8601 datetime, got {v!r}")
        return np.floor(values).astype(np.int64)


def _read_csv(path: Path, wanted: set[str], text: set[str]) -> pd.DataFrame:
    try:
        try:
            frame = _read_csv_as(path, wanted, text, "utf-8")
        except UnicodeDecodeError:
            frame = _read_csv_as(path, wanted, text, "latin-1")  # MovieLens-derived files often still are
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError) as err:
        match = _PANDAS_LINE.search(str(err))
        line = int(match.group(1)) if match else _first_ragged_line(path)
        raise DataFormatError(path, f"not valid CSV: {str(err).strip()}", line) from None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame


def _read_csv_as(path: Path, wanted: set[str], text: set[str], encoding: str) -> pd.DataFrame:
    # Header names are matched after stripping spaces, but dtype= needs them exactly as written.
    header = pd.read_csv(path, nrows=0, encoding=encoding).columns
    with warnings.catch_warnings():
        # A row longer than the header usually means an unquoted comma shifted the columns; pandas only
        # warns about (or, with usecols, silently drops) the extra fields, so all columns are read and
        # the warning is an error.
        warnings.simplefilter("error", pd.errors.ParserWarning)
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)  # mixed types: a bad value, reported later
        frame = pd.read_csv(
            path,
            dtype={name: str for name in header if str(name).strip() in text},  # keeps "02138" intact
            keep_default_na=False,
            na_values=[""],  # only an empty cell is missing: "NA" may be a real title or zip code
            index_col=False,
            encoding=encoding,
            engine="c",
        )
    return frame[[name for name in frame.columns if str(name).strip() in wanted]]


def _read_parquet(path: Path, wanted: set[str]) -> pd.DataFrame:
    try:
        present = [name for name in pq.read_schema(path).names if name in wanted]
        return pd.read_parquet(path, columns=present)
    except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
        raise DataFormatError(path, f"not a readable Parquet file: {err}") from None


def _csv_line_of_record(path: Path, position: int) -> int | None:
    """The 1-based line where data record ``position`` starts, skipping blank lines as pandas does."""
    records = _csv_records(path)
    next(records, None)  # the header
    data_lines = (line for line, row in records if len(row) > 1 or (row and row[0].strip()))
    return next((line for index, line in enumerate(data_lines) if index == position), None)


def _first_ragged_line(path: Path) -> int | None:
    """The 1-based line where the first record with more fields than the header starts."""
    records = _csv_records(path)
    _, header = next(records, (1, []))
    return next((line for line, row in records if len(row) > len(header)), None)


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based starting line, fields) of every record, header included; quoted newlines span lines.

    Only used to explain an error, so the second pass over the file does not matter.
    """
    encoding = "utf-8"
    try:
        with path.open(encoding=encoding) as handle:
            for _ in handle:
                pass
    except UnicodeDecodeError:
        encoding = "latin-1"
    with path.open(newline="", encoding=encoding) as handle:
        reader = csv.reader(handle)
        start = 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1


def _present(series: pd.Series) -> np.ndarray:
    """Cells that hold something: not null and, for text, not blank."""
    present = series.notna().to_numpy()
    if series.dtype.kind in "OSUT" or pd.api.types.is_string_dtype(series.dtype):
        present = present & series.astype(str).str.strip().ne("").to_numpy()
    return present


def _numeric(series: pd.Series) -> np.ndarray:
    """float64 values; NaN wherever the cell is not a number."""
    if series.dtype.kind in "iuf":
        return series.to_numpy(np.float64, copy=True)
    if series.dtype.kind == "b":
        return np.full(len(series), np.nan)
    numbers = pd.to_numeric(series.astype(object), errors="coerce")
    return numbers.to_numpy(np.float64, na_value=np.nan).copy()  # writable: callers fill in parsed dates


def _datetimes_to_seconds(series: pd.Series) -> pd.Series:
    if series.dt.tz is None:
        series = series.dt.tz_localize("UTC")
    return (series - _EPOCH) // pd.Timedelta(seconds=1)


def _as_text(series: pd.Series) -> pd.Series:
    """Profile / title / genre values as str: "" for missing, 25.0 -> "25", lists joined with "|"."""
    return pd.Series(
        [_cell_text(value) for value in series.to_numpy(object)], index=series.index, dtype=object
    )


def _cell_text(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return GENRE_SEPARATOR.join(_cell_text(v) for v in value if _cell_text(v))
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()
