"""CSV / Parquet loader: columns, timestamps, dtypes and errors that point at the bad line or row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.data.generic import load_generic
from model.data.loading import load_dataset
from model.data.schema import DataFormatError

INTERACTIONS_CSV = """user_id,item_id,timestamp,rating,extra
1,10,978300760,5,x
1,20,978300700,3,y
2,10,978300800,,z
"""
USERS_CSV = """user_id,gender,age,occupation,zip_code,favourite_colour
1,F,1,10,02138,red
2,M,56,16,NA,blue
"""
ITEMS_CSV = """item_id,title,genres,year
10,"Misérables, Les (1995)",Drama|Musical,1995
20,Heat (1995),Action|Crime|Thriller,
"""


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_csv_values_and_dtypes(tmp_path: Path) -> None:
    data = load_generic(
        write(tmp_path / "inter.csv", INTERACTIONS_CSV),
        users=write(tmp_path / "users.csv", USERS_CSV),
        items=write(tmp_path / "items.csv", ITEMS_CSV),
    )
    assert data.name == "inter"
    inter = data.interactions
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "int64", "float32"]
    assert inter[["user_id", "item_id", "timestamp"]].values.tolist() == [
        [1, 20, 978300700],
        [1, 10, 978300760],
        [2, 10, 978300800],
    ]
    assert inter["rating"].tolist()[:2] == [3.0, 5.0]
    assert np.isnan(inter["rating"].iloc[2])  # a blank rating means "no rating", not an error

    users = data.users.set_index("user_id")
    assert list(data.users.columns) == ["user_id", "gender", "age", "occupation", "zip_code"]
    assert users.loc[1].tolist() == ["F", "1", "10", "02138"]
    assert users.loc[2, "zip_code"] == "NA"  # a literal value, not a missing marker

    items = data.items.set_index("item_id")
    assert items.loc[10, "title"] == "Misérables, Les (1995)"
    assert items.loc[20, "genres"] == "Action|Crime|Thriller"
    assert items.loc[10, "year"] == 1995
    assert pd.isna(items.loc[20, "year"])


def test_rating_is_optional(tmp_path: Path) -> None:
    data = load_generic(write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,2,3\n"))
    assert data.interactions["rating"].isna().all()
    assert data.interactions["rating"].dtype == np.float32


def test_latin1_csv(tmp_path: Path) -> None:
    items = write(tmp_path / "items.csv", ITEMS_CSV, encoding="latin-1")
    inter = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,10,3\n")
    data = load_generic(inter, items=items)
    assert data.items.set_index("item_id").loc[10, "title"] == "Misérables, Les (1995)"


def test_iso_timestamps(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,timestamp\n"
        "1,10,2000-12-31T22:12:40Z\n"
        "1,20,2000-12-31 22:12:41\n"  # naive: read as UTC
        "2,10,2001-01-01T00:12:40+02:00\n"
        "2,20,978300760\n"  # integers and ISO strings may be mixed
    )
    data = load_generic(write(tmp_path / "i.csv", text))
    assert data.interactions["timestamp"].tolist() == [978300760, 978300761, 978300760, 978300760]
    assert data.interactions["timestamp"].dtype == np.int64


def test_missing_required_column(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.csv", "user_id,movie,timestamp\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv.*missing required column 'item_id'"):
        load_generic(path)
    users = write(tmp_path / "people.csv", "id,gender\n1,F\n")
    with pytest.raises(DataFormatError, match=r"people\.csv.*'user_id'"):
        load_generic(write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,2,3\n"), users=users)


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("user_id,item_id,timestamp\n1,2,3\n1,x,4\n", 3, "item_id"),
        ("user_id,item_id,timestamp\n1,2,3\n\n1,3,4\n1.5,3,5\n", 5, "user_id"),  # blank line still counted
        ("user_id,item_id,timestamp\n1,2,3\n1,3,not-a-date\n", 3, "timestamp"),
        ("user_id,item_id,timestamp\n1,2,3\n,3,4\n", 3, "user_id"),  # missing id
        ("user_id,item_id,timestamp,rating\n1,2,3,4\n1,3,4,great\n", 3, "rating"),
        ('user_id,item_id,timestamp,note\n1,2,3,"two\nlines"\n1,x,4,a\n', 4, "item_id"),  # quoted newline
        ("user_id,item_id,timestamp\n1,2,3\n1,2,3,4\n", 3, None),  # too many fields
    ],
)
def test_bad_csv_value_names_file_and_line(tmp_path: Path, text: str, line: int, column: str | None) -> None:
    path = write(tmp_path / "events.csv", text)
    with pytest.raises(DataFormatError) as caught:
        load_generic(path)
    assert caught.value.line == line
    assert f"events.csv:{line}:" in str(caught.value)
    if column:
        assert column in str(caught.value)


def test_bad_year_in_item_table(tmp_path: Path) -> None:
    items = write(tmp_path / "items.csv", "item_id,year\n10,1995\n20,soon\n")
    with pytest.raises(DataFormatError, match=r"items\.csv:3:.*year"):
        load_generic(write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,10,3\n"), items=items)


def test_parquet_round_trip(tmp_path: Path) -> None:
    csv_data = load_generic(
        write(tmp_path / "inter.csv", INTERACTIONS_CSV),
        users=write(tmp_path / "users.csv", USERS_CSV),
        items=write(tmp_path / "items.csv", ITEMS_CSV),
    )
    csv_data.interactions.to_parquet(tmp_path / "inter.parquet")
    csv_data.users.to_parquet(tmp_path / "users.pq")
    csv_data.items.to_parquet(tmp_path / "items.parquet")
    pq_data = load_generic(tmp_path / "inter.parquet", tmp_path / "users.pq", tmp_path / "items.parquet")
    pd.testing.assert_frame_equal(pq_data.interactions, csv_data.interactions)
    pd.testing.assert_frame_equal(pq_data.users, csv_data.users, check_dtype=False)
    pd.testing.assert_frame_equal(pq_data.items, csv_data.items, check_dtype=False)


def test_parquet_native_types(tmp_path: Path) -> None:
    """Datetime timestamps, integer profile fields and list genres, as Parquet writers produce them."""
    pd.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [10, 10],
            "timestamp": pd.to_datetime(["2000-12-31 22:12:40", "2000-12-31 22:12:41"]),
        }
    ).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"user_id": [1, 2], "age": [25, 56]}).to_parquet(tmp_path / "u.parquet")
    pd.DataFrame({"item_id": [10], "genres": [["Drama", "Musical"]]}).to_parquet(tmp_path / "m.parquet")
    data = load_generic(tmp_path / "i.parquet", tmp_path / "u.parquet", tmp_path / "m.parquet")
    assert data.interactions["timestamp"].tolist() == [978300760, 978300761]
    assert data.users["age"].tolist() == ["25", "56"]
    assert data.items["genres"].tolist() == ["Drama|Musical"]


def test_bad_parquet_value_names_row(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["1", "2", "bob"], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    frame.to_parquet(tmp_path / "events.parquet")
    with pytest.raises(DataFormatError, match=r"events\.parquet:3:.*user_id.*Parquet row") as caught:
        load_generic(tmp_path / "events.parquet")
    assert caught.value.line == 3


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_generic(write(tmp_path / "i.json", "{}"))
    with pytest.raises(DataFormatError, match="no such file"):
        load_generic(tmp_path / "absent.csv")


def test_load_dataset_dispatches_file(tmp_path: Path) -> None:
    inter = write(tmp_path / "inter.csv", INTERACTIONS_CSV)
    data = load_dataset(inter, users=write(tmp_path / "users.csv", USERS_CSV))
    assert len(data.interactions) == 3
    assert data.users.set_index("user_id").loc[1, "gender"] == "F"
    with pytest.raises(DataFormatError, match="no such file or directory"):
        load_dataset(tmp_path / "absent.csv")
