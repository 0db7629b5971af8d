"""One entry point from a user-supplied source string to InteractionData.

A source is ``synthetic[:N_USERS]``, a MovieLens directory (it has ``ratings.dat``), a directory of
Parquet interactions files (model/data/parquet_dir.py: every ``*.parquet`` but ``users.parquet`` and
``items.parquet``, which are the side tables), or one CSV / Parquet interactions file.
"""

from __future__ import annotations

from pathlib import Path

from model.data.generic import load_generic
from model.data.movielens import load_movielens
from model.data.parquet_dir import is_parquet_dir, load_parquet_dir
from model.data.schema import DataFormatError, InteractionData
from model.data.synthetic import generate_synthetic

SYNTHETIC = "synthetic"


def load_dataset(source: str | Path, users: Path | None = None, items: Path | None = None) -> InteractionData:
    """``"synthetic"`` / ``"synthetic:N_USERS"``, a MovieLens directory, a directory of Parquet
    interactions files, or a CSV / Parquet interactions file.

    ``users`` and ``items`` are side tables for a generic file or Parquet directory only: a MovieLens
    directory brings its own.
    """
    if is_synthetic_source(source):
        _reject_side_tables(source, users, items)
        n_users = _synthetic_users(source)
        return generate_synthetic() if n_users is None else generate_synthetic(n_users=n_users)
    path = Path(source)
    if path.is_dir():
        if (path / "ratings.dat").is_file():
            _reject_side_tables(source, users, items)
            return load_movielens(path)
        if is_parquet_dir(path):
            return load_parquet_dir(path, users, items)
        raise DataFormatError(
            path,
            "directory with neither ratings.dat (a MovieLens directory) nor *.parquet files "
            "(a Parquet interactions directory)",
        )
    if path.is_file():
        return load_generic(path, users, items)
    raise DataFormatError(
        path,
        "no such file or directory; expected 'synthetic[:N_USERS]', a MovieLens directory, "
        "a directory of Parquet files or a CSV/Parquet file",
    )


def is_synthetic_source(source: str | Path) -> bool:
    """``"synthetic"`` or ``"synthetic:N_USERS"``: generated data, not a path."""
    return isinstance(source, str) and (source == SYNTHETIC or source.startswith(SYNTHETIC + ":"))


def _synthetic_users(source: str) -> int | None:
    """The N of "synthetic:N"; None for plain "synthetic" (the generator's default size)."""
    _, _, count = source.partition(":")
    if not count:
        return None
    try:
        n_users = int(count)
    except ValueError:
        n_users = 0
    if n_users < 1:
        raise ValueError(
            f"bad data source {source!r}: expected 'synthetic:N_USERS' with N_USERS a positive integer"
        )
    return n_users


def _reject_side_tables(source: str | Path, users: Path | None, items: Path | None) -> None:
    if users is not None or items is not None:
        raise ValueError(
            "--users/--items apply to a CSV/Parquet interactions file or a Parquet directory, "
            f"not to {source!s}"
        )
