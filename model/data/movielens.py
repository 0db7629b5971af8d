"""MovieLens-1M in its original ``::``-separated directory format.

pandas' python engine (the only one that accepts a multi-character separator) needs many seconds for
ratings.dat, so the bytes are rewritten to a single-byte separator and handed to the C parser. The C
parser reports neither which line holds a bad value nor rows with missing trailing fields, so the fast
path only validates in bulk; when that fails, a slow line-by-line scan finds the first bad line for the
error message. Valid files never pay for the scan.
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from model.data.schema import GENRE_SEPARATOR, DataFormatError, InteractionData, make_interaction_data

FIELD_SEPARATOR = b"::"
# Single bytes that could stand in for "::"; the first one absent from the file is used, so no field
# can contain it and the C parser's split is exactly the "::" split.
_STAND_IN_SEPARATORS = (b"\t", b"\x1f", b"\x1e", b"|", b";", b",")

FieldKind = Literal["int", "float", "str"]
RATINGS_FIELDS: dict[str, FieldKind] = {
    "user_id": "int",
    "item_id": "int",
    "rating": "float",
    "timestamp": "int",
}
USERS_FIELDS: dict[str, FieldKind] = {
    "user_id": "int",
    "gender": "str",
    "age": "str",
    "occupation": "str",
    "zip_code": "str",
}
MOVIES_FIELDS: dict[str, FieldKind] = {"item_id": "int", "title": "str", "genres": "str"}

FULL_ML1M_RATINGS = 1_000_209
FULL_ML1M_USERS = 6_040
_YEAR_AT_END = re.compile(r"\((\d{4})\)\s*$")
_NO_GENRES = "(no genres listed)"  # later MovieLens releases spell "no genre" this way


def load_movielens(directory: Path | str, name: str | None = None) -> InteractionData:
    """Loads a MovieLens-1M directory: ratings.dat is required, users.dat and movies.dat optional."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFormatError(
            directory, "not a directory; expected a MovieLens directory holding ratings.dat"
        )
    ratings_path = directory / "ratings.dat"
    if not ratings_path.is_file():
        raise DataFormatError(ratings_path, "missing: a MovieLens directory must contain ratings.dat")

    ratings = read_dat(ratings_path, RATINGS_FIELDS, encoding="latin-1")
    if ratings.empty:
        raise DataFormatError(ratings_path, "contains no ratings")
    users = _load_users(directory / "users.dat")
    items = _load_movies(directory / "movies.dat")
    return make_interaction_data(ratings, users, items, name or _dataset_name(directory, ratings, users))


def _load_users(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return read_dat(path, USERS_FIELDS, encoding="auto")


def _load_movies(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    movies = read_dat(path, MOVIES_FIELDS, encoding="auto")
    movies["genres"] = movies["genres"].str.strip().replace(_NO_GENRES, "")
    # The source already joins genres with "|"; re-joining keeps that true if GENRE_SEPARATOR changes.
    if GENRE_SEPARATOR != "|":
        movies["genres"] = movies["genres"].str.replace("|", GENRE_SEPARATOR, regex=False)
    movies["year"] = parse_title_year(movies["title"])
    return movies


def parse_title_year(titles: pd.Series) -> pd.Series:
    """The year from a title's trailing "(1995)"; NA where the title has none."""
    return pd.to_numeric(titles.str.extract(_YEAR_AT_END, expand=False), errors="coerce").astype("Int64")


def _dataset_name(directory: Path, ratings: pd.DataFrame, users: pd.DataFrame | None) -> str:
    """The name results are reported under; a prefix of ML-1M must not pass for the full data set."""
    if len(ratings) == FULL_ML1M_RATINGS:
        return "MovieLens-1M"
    user_ids = np.unique(ratings["user_id"].to_numpy())
    is_ml1m_prefix = (
        users is not None
        and len(users) == FULL_ML1M_USERS
        and user_ids[0] == 1
        and user_ids[-1] == len(user_ids)
        and len(user_ids) < FULL_ML1M_USERS
    )
    if is_ml1m_prefix:
        return f"MovieLens-1M (users 1–{len(user_ids):,})"
    return f"MovieLens ({directory.resolve().name})"


def read_dat(path: Path, fields: dict[str, FieldKind], encoding: str = "auto") -> pd.DataFrame:
    """Parses a ``::``-separated file into ``fields``; int columns int64, float float64, str str.

    ``encoding="auto"`` takes UTF-8 when the bytes are valid UTF-8 and ISO-8859-1 (the encoding of the
    original MovieLens files) otherwise, so files someone re-encoded still load with correct titles.
    """
    data = path.read_bytes()
    if encoding == "auto":
        encoding = _detect_encoding(data)
    frame = _parse_fast(data, fields, encoding)
    if frame is None:
        bad = find_first_bad_line(data, fields, encoding)
        if bad is None:  # The scan and the C parser disagree: still fail loudly, without a line.
            raise DataFormatError(path, f"cannot be parsed as {len(fields)} '::'-separated fields")
        line, message = bad
        raise DataFormatError(path, message, line)
    return frame


def _detect_encoding(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def _parse_fast(data: bytes, fields: dict[str, FieldKind], encoding: str) -> pd.DataFrame | None:
    """The C-parser path; None when the file is not clean (the caller then locates the bad line)."""
    separator = next((s for s in _STAND_IN_SEPARATORS if s not in data), None)
    if separator is None:
        return None
    if not data.strip():
        return pd.DataFrame({name: pd.Series(dtype=_empty_dtype(kind)) for name, kind in fields.items()})
    try:
        frame = _read_c_parser(data.replace(FIELD_SEPARATOR, separator), separator, fields, encoding)
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError):
        return None
    # Short rows come back padded with "", which a str column would accept silently; counting the
    # separators catches them (long rows already made the parser raise).
    if data.count(FIELD_SEPARATOR) != (len(fields) - 1) * len(frame):
        return None
    if not all(_column_is_valid(frame[name], kind) for name, kind in fields.items()):
        return None
    return frame


def _read_c_parser(
    data: bytes, separator: bytes, fields: dict[str, FieldKind], encoding: str
) -> pd.DataFrame:
    with warnings.catch_warnings():
        # Mixed types in a column mean a bad value, which the validation reports with its line.
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        return pd.read_csv(
            io.BytesIO(data),
            sep=separator.decode(),
            header=None,
            names=list(fields),
            dtype={name: str for name, kind in fields.items() if kind == "str"},
            quoting=csv.QUOTE_NONE,
            na_filter=False,  # "NA" is a valid zip code or title, never a missing value here
            encoding=encoding,
            engine="c",
        )


def _empty_dtype(kind: FieldKind) -> object:
    return {"int": np.int64, "float": np.float64, "str": str}[kind]


def _column_is_valid(column: pd.Series, kind: FieldKind) -> bool:
    if kind == "int":
        return column.dtype.kind == "i"
    if kind == "float":
        return column.dtype.kind in "if" and bool(np.isfinite(column.to_numpy(np.float64)).all())
    return True


def find_first_bad_line(data: bytes, fields: dict[str, FieldKind], encoding: str) -> tuple[int, str] | None:
    """The 1-based number and a description of the first line the fast path would reject."""
    for index, raw in enumerate(data.split(b"\n")):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        problem = _line_problem(line.split(FIELD_SEPARATOR), fields, encoding)
        if problem is not None:
            return index + 1, problem
    return None


def _line_problem(values: list[bytes], fields: dict[str, FieldKind], encoding: str) -> str | None:
    if len(values) != len(fields):
        return f"expected {len(fields)} '::'-separated fields ({', '.join(fields)}), found {len(values)}"
    for (name, kind), value in zip(fields.items(), values, strict=True):
        if kind == "str":
            continue
        text = value.decode(encoding, errors="replace")
        if not _is_valid_number(text, kind):
            noun = "an integer" if kind == "int" else "a number"
            return f"{name} must be {noun}, got {text!r}"
    return None


def _is_valid_number(text: str, kind: FieldKind) -> bool:
    if "_" in text:  # Python reads "1_000" as 1000; the C parser (rightly) does not
        return False
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        return False
    if kind == "int":
        return -(2**63) <= value < 2**63
    return math.isfinite(value)
