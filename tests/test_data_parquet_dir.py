"""A directory of Parquet interactions files (model/data/parquet_dir.py): read in chunks across row
groups and files, it is the data of one file holding the same rows, with the same error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import parquet_dir
from model.data.generic import load_generic
from model.data.loading import load_dataset
from model.data.schema import DataFormatError, InteractionData
from model.data.synthetic import generate_synthetic


def write_parquet(frame: pd.DataFrame, path: Path, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_size)
    return path


def shuffled_interactions(data: InteractionData, seed: int = 0) -> pd.DataFrame:
    """Rows out of (user, time, item) order, as files written by others come."""
    order = np.random.default_rng(seed).permutation(len(data.interactions))
    return data.interactions.iloc[order].reset_index(drop=True)


def assert_same_data(got: InteractionData, expected: InteractionData) -> None:
    pd.testing.assert_frame_equal(got.interactions, expected.interactions)
    pd.testing.assert_frame_equal(got.users, expected.users)
    pd.testing.assert_frame_equal(got.items, expected.items)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return generate_synthetic(n_users=30, n_items=40, interactions_per_user=(5, 20), seed=3)


def split_into_files(frame: pd.DataFrame, directory: Path, sizes: list[int], row_groups: list[int]) -> None:
    directory.mkdir(exist_ok=True)
    starts = np.cumsum([0, *sizes])
    for number, (start, stop, group) in enumerate(zip(starts[:-1], starts[1:], row_groups, strict=True)):
        write_parquet(frame.iloc[start:stop], directory / f"part-{number:03d}.parquet", group)


def test_a_directory_is_the_data_of_one_file_with_the_same_rows(
    data: InteractionData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = shuffled_interactions(data)
    sizes = [len(rows) // 3, len(rows) // 4, len(rows) - len(rows) // 3 - len(rows) // 4]
    split_into_files(rows, tmp_path / "events", sizes, row_groups=[17, 30, 9])
    write_parquet(data.users, tmp_path / "events" / parquet_dir.USERS_FILE)
    write_parquet(data.items, tmp_path / "events" / parquet_dir.ITEMS_FILE)
    assert all(pq.ParquetFile(p).num_row_groups > 2 for p in (tmp_path / "events").glob("part-*"))
    chunks: list[tuple[str, int, int]] = []
    checked = parquet_dir.read_interaction_rows

    def recording(path: Path, frame: pd.DataFrame, first_row: int) -> pd.DataFrame:
        chunks.append((path.name, first_row, len(frame)))
        return checked(path, frame, first_row)

    monkeypatch.setattr(parquet_dir, "read_interaction_rows", recording)
    got = parquet_dir.load_parquet_dir(tmp_path / "events", chunk_rows=13)
    one = load_generic(
        write_parquet(rows, tmp_path / "one.parquet"),
        write_parquet(data.users, tmp_path / "users.parquet"),
        write_parquet(data.items, tmp_path / "items.parquet"),
        name="events",
    )
    assert_same_data(got, one)
    assert got.name == "events"
    # Chunks of at most 13 rows, each inside one file, consecutive within it, covering every row.
    assert max(size for _, _, size in chunks) == 13
    for number, size in enumerate(sizes):
        mine = [(first, n) for name, first, n in chunks if name == f"part-{number:03d}.parquet"]
        assert [first for first, _ in mine] == list(np.cumsum([0, *[n for _, n in mine]])[:-1])
        assert sum(n for _, n in mine) == size


def test_load_dataset_reads_a_directory_with_side_tables_given_as_options(
    data: InteractionData, tmp_path: Path
) -> None:
    rows = shuffled_interactions(data, seed=1)
    split_into_files(rows, tmp_path / "events", [len(rows) // 2, len(rows) - len(rows) // 2], [20, 20])
    users = write_parquet(data.users, tmp_path / "people.parquet")
    items_csv = tmp_path / "titles.csv"
    data.items.to_csv(items_csv, index=False)
    got = load_dataset(tmp_path / "events", users=users, items=items_csv)
    assert_same_data(got, load_generic(write_parquet(rows, tmp_path / "events.parquet"), users, items_csv))


def test_files_without_ratings_and_ids_beyond_int32(tmp_path: Path) -> None:
    """A file without a rating column has no ratings; ids that need int64 widen the columns exactly."""
    big = 2**40 + 7
    with_rating = pd.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 11], "timestamp": [100, 200], "rating": [4.5, 2.0]}
    )
    without = pd.DataFrame({"user_id": [big, 1], "item_id": [10, -(2**35)], "timestamp": [300, 50]})
    directory = tmp_path / "events"
    directory.mkdir()
    write_parquet(with_rating, directory / "a.parquet")
    write_parquet(without, directory / "b.pq")
    got = load_dataset(directory)
    one = load_generic(
        write_parquet(pd.concat([with_rating, without]), tmp_path / "one.parquet"), name="events"
    )
    assert_same_data(got, one)
    assert got.interactions["user_id"].tolist() == [1, 1, 2, big]
    assert np.isnan(got.interactions["rating"].to_numpy()).tolist() == [True, False, False, True]


def test_files_that_are_not_interactions_are_skipped(data: InteractionData, tmp_path: Path) -> None:
    rows = shuffled_interactions(data)
    directory = tmp_path / "events"
    split_into_files(rows, directory, [len(rows)], [64])
    (directory / "_SUCCESS").write_text("")
    (directory / "notes.txt").write_text("not data")
    write_parquet(rows.iloc[:5], directory / ".part-001.parquet")  # a writer's hidden file
    write_parquet(rows.iloc[:5], directory / "_metadata.parquet")
    (directory / "older").mkdir()
    write_parquet(rows.iloc[:5], directory / "older" / "part-000.parquet")
    assert parquet_dir.interaction_files(directory) == [directory / "part-000.parquet"]
    assert len(load_dataset(directory).interactions) == len(rows)


def test_a_bad_value_names_its_file_and_row_as_for_that_file_alone(tmp_path: Path) -> None:
    good = pd.DataFrame({"user_id": ["1"] * 30, "item_id": range(30), "timestamp": range(30)})
    bad = good.copy()
    bad.loc[22, "user_id"] = "bob"  # row 23 of the file: in its third row group, a chunk's 5th row
    directory = tmp_path / "events"
    directory.mkdir()
    write_parquet(good, directory / "part-0.parquet", row_group_size=10)
    write_parquet(bad, directory / "part-1.parquet", row_group_size=10)
    with pytest.raises(DataFormatError) as alone:
        load_generic(directory / "part-1.parquet")
    with pytest.raises(DataFormatError) as caught:
        parquet_dir.load_parquet_dir(directory, chunk_rows=6)
    assert str(caught.value) == str(alone.value)
    assert caught.value.line == 23 and caught.value.path == directory / "part-1.parquet"
    assert "user_id: expected an integer id, got 'bob' (Parquet row, 1-based)" in str(caught.value)


def test_a_file_missing_a_required_column_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    directory.mkdir()
    write_parquet(pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}), directory / "a.parquet")
    write_parquet(pd.DataFrame({"user_id": [1], "item_id": [2], "time": [3]}), directory / "b.parquet")
    with pytest.raises(DataFormatError, match=r"b\.parquet: missing required column 'timestamp'"):
        load_dataset(directory)


def test_directories_that_are_not_parquet_interactions(data: InteractionData, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "events.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"neither ratings\.dat .* nor \*\.parquet files"):
        load_dataset(plain)
    tables_only = tmp_path / "tables"
    tables_only.mkdir()
    write_parquet(data.users, tables_only / parquet_dir.USERS_FILE)
    with pytest.raises(DataFormatError, match="no interactions files"):
        load_dataset(tables_only)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_parquet(data.interactions.iloc[:0], empty / "part-0.parquet")
    with pytest.raises(DataFormatError, match="contains no interactions"):
        load_dataset(empty)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part-0.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataFormatError, match=r"part-0\.parquet: not a readable Parquet file"):
        load_dataset(corrupt)


def test_a_side_table_in_the_directory_and_as_an_option_is_ambiguous(
    data: InteractionData, tmp_path: Path
) -> None:
    directory = tmp_path / "events"
    split_into_files(data.interactions, directory, [len(data.interactions)], [100])
    write_parquet(data.users, directory / parquet_dir.USERS_FILE)
    with pytest.raises(DataFormatError, match="holds users.parquet and --users"):
        load_dataset(directory, users=write_parquet(data.users, tmp_path / "u.parquet"))
