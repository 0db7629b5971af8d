"""fetch_movielens_1m without the internet: local zips, a localhost HTTP server and a closed port."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.data.fetch import ML1M_MD5, FetchError, fetch_movielens_1m
from model.data.movielens import load_movielens

RATINGS = b"1::10::5::978300760\n2::10::3::978300761\n"
MOVIES = "10::Misérables, Les (1995)::Drama\n".encode("latin-1")


def make_zip(path: Path, top: str = "ml-1m/") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}ratings.dat", RATINGS)
        zf.writestr(f"{top}movies.dat", MOVIES)
        zf.writestr(f"{top}README", "tiny test archive")
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-1m.zip"  # nothing listens there once the socket is closed


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A localhost HTTP server over a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=root)
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# GroupLens's published checksum of ml-1m.zip (files.grouplens.org/datasets/movielens/ml-1m.zip.md5),
# written here a second time: a typo in either copy fails this test instead of every download.
PUBLISHED_ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"


def test_the_pinned_checksum_is_grouplens_published_one() -> None:
    assert ML1M_MD5 == PUBLISHED_ML1M_MD5


def test_path_to_zip_is_extracted_into_cache(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ml-1m.zip")
    directory = fetch_movielens_1m(tmp_path / "cache", path=archive)
    assert directory == tmp_path / "cache" / "ml-1m"
    assert (directory / "ratings.dat").read_bytes() == RATINGS
    data = load_movielens(directory)
    assert data.items.set_index("item_id").loc[10, "title"] == "Misérables, Les (1995)"
    assert fetch_movielens_1m(tmp_path / "cache", path=archive) == directory  # reuses the extraction


def test_zip_without_top_folder(tmp_path: Path) -> None:
    directory = fetch_movielens_1m(tmp_path / "cache", path=make_zip(tmp_path / "flat.zip", top=""))
    assert directory == tmp_path / "cache" / "flat"
    assert (directory / "ratings.dat").is_file()


def test_path_to_directory_is_returned(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_bytes(RATINGS)
    assert fetch_movielens_1m(tmp_path / "cache", path=tmp_path / "ml-1m") == tmp_path / "ml-1m"
    assert fetch_movielens_1m(tmp_path / "cache", path=tmp_path) == tmp_path / "ml-1m"  # the parent works too


def test_path_that_is_not_movielens(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="no ratings.dat"):
        fetch_movielens_1m(tmp_path / "cache", path=tmp_path)
    with pytest.raises(FetchError, match="does not exist"):
        fetch_movielens_1m(tmp_path / "cache", path=tmp_path / "missing.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FetchError, match="neither"):
        fetch_movielens_1m(tmp_path / "cache", path=tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("data.csv", "a,b\n")
    with pytest.raises(FetchError, match="does not contain ratings.dat"):
        fetch_movielens_1m(tmp_path / "cache", path=tmp_path / "other.zip")


def test_unreachable_url_gives_one_line_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        fetch_movielens_1m(tmp_path / "cache", url=closed_port_url(), timeout_s=5)
    message = str(caught.value)
    assert "--path" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not list((tmp_path / "cache").glob("*.part"))  # no half-written download left behind
    assert isinstance(caught.value, RuntimeError)


def test_download_verifies_extracts_and_reuses_cache(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    archive = make_zip(root / "ml-1m.zip")
    cache = tmp_path / "cache"
    directory = fetch_movielens_1m(cache, url=f"{base}/ml-1m.zip", md5=md5_of(archive))
    assert directory == cache / "ml-1m"
    assert (directory / "ratings.dat").read_bytes() == RATINGS
    assert md5_of(cache / "ml-1m.zip") == md5_of(archive)

    # Cached: no server needed any more.
    assert fetch_movielens_1m(cache, url=closed_port_url(), md5=md5_of(archive)) == directory
    # Extraction lost but the verified zip is still there: re-extracted without downloading.
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    assert fetch_movielens_1m(cache, url=closed_port_url(), md5=md5_of(archive)) == directory


def test_checksum_mismatch(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    make_zip(root / "ml-1m.zip")
    with pytest.raises(FetchError, match=r"checksum mismatch.*--path"):
        fetch_movielens_1m(tmp_path / "cache", url=f"{base}/ml-1m.zip", md5="0" * 32)
    assert not (tmp_path / "cache" / "ml-1m.zip").exists()
    assert not (tmp_path / "cache" / "ml-1m").exists()


def test_http_error(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    _, base = http_root
    with pytest.raises(FetchError, match=r"HTTP 404.*--path"):
        fetch_movielens_1m(tmp_path / "cache", url=f"{base}/missing.zip")
