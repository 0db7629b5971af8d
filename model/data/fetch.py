"""Getting MovieLens-1M onto disk: a given directory or zip, a cached download, or a fresh download.

Every failure surfaces as one FetchError line that says what to do instead (pass --path), because the
usual cause is a machine without internet access, where a urllib traceback helps nobody.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# MD5 of the official ml-1m.zip. Not checked against grouplens.org from here (no internet); it is the
# value pinned by several independent, widely used dataset downloaders. Update it here if GroupLens
# ever republishes the archive.
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
ML1M_DIRNAME = "ml-1m"
REQUIRED_FILE = "ratings.dat"
_CHUNK_BYTES = 1 << 16
_PATH_HINT = (
    "download ml-1m.zip yourself and pass --path /path/to/ml-1m.zip (or the extracted ml-1m directory)"
)


class FetchError(RuntimeError):
    """MovieLens could not be obtained; the message is one line meant for the user."""


def fetch_movielens_1m(
    cache_dir: Path,
    path: Path | None = None,
    timeout_s: float = 30,
    url: str = ML1M_URL,
    md5: str = ML1M_MD5,
) -> Path:
    """A directory holding ratings.dat (and users.dat, movies.dat): ``path``'s, or the download's."""
    cache_dir = Path(cache_dir)
    if path is not None:
        return _use_given(Path(path), cache_dir)
    extracted = cache_dir / ML1M_DIRNAME
    if (extracted / REQUIRED_FILE).is_file():  # extraction is atomic, so its presence means complete
        return extracted
    archive = cache_dir / "ml-1m.zip"
    if not (archive.is_file() and file_md5(archive) == md5):
        _download(url, archive, timeout_s, md5)
    return _extract(archive, cache_dir)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _use_given(path: Path, cache_dir: Path) -> Path:
    if path.is_dir():
        for candidate in (path, path / ML1M_DIRNAME):
            if (candidate / REQUIRED_FILE).is_file():
                return candidate
        raise FetchError(f"{path} is not a MovieLens directory: it has no {REQUIRED_FILE}")
    if path.is_file() and zipfile.is_zipfile(path):
        return _extract(path, cache_dir)
    if path.exists():
        raise FetchError(f"{path} is neither a MovieLens directory nor a zip archive")
    raise FetchError(f"{path} does not exist; pass the ml-1m directory or ml-1m.zip")


def _download(url: str, target: Path, timeout_s: float, md5: str) -> None:
    """Downloads to a .part file and renames it only once the checksum matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}", disable=None
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        partial.unlink(missing_ok=True)
        raise FetchError(f"could not download {url}: HTTP {err.code} {err.reason}; {_PATH_HINT}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise FetchError(f"could not download {url} (offline?): {reason}; {_PATH_HINT}") from None
    actual = file_md5(partial)
    if actual != md5:
        partial.unlink(missing_ok=True)
        raise FetchError(f"checksum mismatch for {url}: MD5 {actual}, expected {md5}; {_PATH_HINT}")
    partial.replace(target)


def _extract(archive: Path, cache_dir: Path) -> Path:
    """Extracts into a temporary folder, then moves the folder holding ratings.dat into cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            data_dir = _data_dir_in(zf, archive)
            destination = cache_dir / (data_dir.name if data_dir.parts else archive.stem)
            if (destination / REQUIRED_FILE).is_file():
                return destination
            with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".extract-") as scratch:
                content = Path(scratch) / "content"  # a level below scratch, so even a root data_dir can move
                zf.extractall(content)
                if destination.exists():
                    shutil.rmtree(destination)  # a leftover without ratings.dat: not a usable extraction
                (content / data_dir).replace(destination)
    except (zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"could not extract {archive}: {err}; {_PATH_HINT}") from None
    return destination


def _data_dir_in(zf: zipfile.ZipFile, archive: Path) -> Path:
    """The member folder that holds ratings.dat (shallowest), refusing paths that escape the folder."""
    names = [Path(name) for name in zf.namelist()]
    if any(name.is_absolute() or ".." in name.parts for name in names):
        raise FetchError(f"{archive} has unsafe member paths; refusing to extract it")
    holders = sorted(
        (name.parent for name in names if name.name == REQUIRED_FILE), key=lambda p: len(p.parts)
    )
    if not holders:
        raise FetchError(f"{archive} does not contain {REQUIRED_FILE}; is it the MovieLens-1M zip?")
    return holders[0]
