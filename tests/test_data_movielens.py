"""MovieLens-1M directory loader: values, dtypes, encodings and errors that point at the bad line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.data.loading import load_dataset
from model.data.movielens import load_movielens
from model.data.schema import DataFormatError

RATINGS = b"1::20::5::978300760\n1::10::3::978300700\n2::10::4::978300800\n2::30::2.5::978300800\n"
USERS = b"1::F::1::10::48067\n2::M::56::16::02138\n3::M::25::15::55117-4321\n"
MOVIES = (
    "10::Toy Story (1995)::Animation|Children's|Comedy\n"
    "20::Misérables, Les (1995)::Drama|Musical\n"
    "30::Untitled Project::Drama\n"
).encode("latin-1")


def write_movielens(
    directory: Path, ratings: bytes = RATINGS, users: bytes | None = USERS, movies: bytes | None = MOVIES
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.dat").write_bytes(ratings)
    if users is not None:
        (directory / "users.dat").write_bytes(users)
    if movies is not None:
        (directory / "movies.dat").write_bytes(movies)
    return directory


def test_values_and_dtypes(tmp_path: Path) -> None:
    data = load_movielens(write_movielens(tmp_path / "ml"))

    inter = data.interactions
    assert inter.dtypes.to_dict() == {
        "user_id": np.dtype(np.int64),
        "item_id": np.dtype(np.int64),
        "timestamp": np.dtype(np.int64),
        "rating": np.dtype(np.float32),
    }
    # Sorted by (user, timestamp, item): user 2's two same-second ratings by item id.
    assert inter[["user_id", "item_id", "timestamp"]].values.tolist() == [
        [1, 10, 978300700],
        [1, 20, 978300760],
        [2, 10, 978300800],
        [2, 30, 978300800],
    ]
    assert inter["rating"].tolist() == [3.0, 5.0, 4.0, 2.5]

    users = data.users.set_index("user_id")
    assert users.loc[1].tolist() == ["F", "1", "10", "48067"]
    assert users.loc[2, "zip_code"] == "02138"  # leading zero kept: zip codes are text
    assert users.loc[3, "zip_code"] == "55117-4321"
    assert all(isinstance(v, str) for v in users["age"])

    items = data.items.set_index("item_id")
    assert items.loc[20, "title"] == "Misérables, Les (1995)"  # decoded from ISO-8859-1
    assert items.loc[10, "genres"] == "Animation|Children's|Comedy"
    assert items.loc[10, "year"] == 1995
    assert pd.isna(items.loc[30, "year"])
    assert str(data.items["year"].dtype) == "Int64"


def test_side_tables_are_optional(tmp_path: Path) -> None:
    data = load_movielens(write_movielens(tmp_path / "ml", users=None, movies=None))
    assert sorted(data.users["user_id"]) == [1, 2]
    assert set(data.users["gender"]) == {""}
    assert sorted(data.items["item_id"]) == [10, 20, 30]
    assert set(data.items["title"]) == {""}


def test_utf8_titles_also_load(tmp_path: Path) -> None:
    movies = "20::Misérables, Les (1995)::Drama\n".encode()
    data = load_movielens(write_movielens(tmp_path / "ml", movies=movies))
    assert data.items.set_index("item_id").loc[20, "title"] == "Misérables, Les (1995)"


def test_windows_line_endings_and_blank_lines(tmp_path: Path) -> None:
    ratings = b"1::20::5::978300760\r\n\r\n1::10::3::978300700\r\n"
    data = load_movielens(write_movielens(tmp_path / "ml", ratings=ratings))
    assert data.interactions["item_id"].tolist() == [10, 20]


@pytest.mark.parametrize(
    ("ratings", "bad_line"),
    [
        (b"1::20::5::978300760\n1::10::3\n", 2),  # too few fields
        (b"1::20::5::978300760\n1::10::3::978300700::9\n", 2),  # too many fields
        (b"1::20::5::978300760\n\n1::x::3::978300700\n", 3),  # non-integer id, after a blank line
        (b"1::20::5::978300760\n1::10::3::978300700\n2::10::good::978300800\n", 3),  # non-numeric rating
        (b"1::20::5::978300760\n1::10::3::97830.5\n", 2),  # non-integer timestamp
        (b"1::20::5::978300760\n1::10::NaN::978300700\n", 2),  # NaN is not a rating
    ],
)
def test_malformed_ratings_name_file_and_line(tmp_path: Path, ratings: bytes, bad_line: int) -> None:
    directory = write_movielens(tmp_path / "ml", ratings=ratings)
    with pytest.raises(DataFormatError) as caught:
        load_movielens(directory)
    assert caught.value.line == bad_line
    assert f"ratings.dat:{bad_line}:" in str(caught.value)


def test_short_users_line_is_caught_even_though_fields_are_text(tmp_path: Path) -> None:
    users = b"1::F::1::10::48067\n2::M::56::16\n"
    with pytest.raises(DataFormatError, match=r"users\.dat:2:.*expected 5"):
        load_movielens(write_movielens(tmp_path / "ml", users=users))


def test_malformed_movies_line(tmp_path: Path) -> None:
    movies = "10::Toy Story (1995)::Animation\nten::Heat (1995)::Action\n".encode("latin-1")
    with pytest.raises(DataFormatError, match=r"movies\.dat:2:.*item_id"):
        load_movielens(write_movielens(tmp_path / "ml", movies=movies))


def test_missing_directory_or_ratings(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="not a directory"):
        load_movielens(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="ratings.dat"):
        load_movielens(tmp_path / "empty")


def test_load_dataset_dispatches_directory(tmp_path: Path) -> None:
    data = load_dataset(write_movielens(tmp_path / "ml"))
    assert len(data.interactions) == 4
    with pytest.raises(DataFormatError, match="ratings.dat"):
        load_dataset(tmp_path)  # a directory, but not a MovieLens one
