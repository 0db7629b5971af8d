"""LATEST names a version directory of its root, and nothing else: whatever it holds, loading never
reaches outside the artifacts root."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.artifacts import LATEST_FILE, MANIFEST_FILE, ArtifactError, resolve_version_dir


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    version = tmp_path / "artifacts" / "abc123"
    version.mkdir(parents=True)
    (version / MANIFEST_FILE).write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / MANIFEST_FILE).write_text("{}")
    return tmp_path / "artifacts"


def test_latest_naming_a_version_resolves_to_it(root: Path) -> None:
    (root / LATEST_FILE).write_text("abc123\n")
    assert resolve_version_dir(root) == root / "abc123"


@pytest.mark.parametrize("name", ["/etc", "{outside}", "../elsewhere", "abc123/../../elsewhere", "..", ""])
def test_latest_pointing_outside_the_root_is_refused(root: Path, name: str) -> None:
    text = name.format(outside=root.parent / "elsewhere")
    (root / LATEST_FILE).write_text(text + "\n")
    with pytest.raises(ArtifactError, match="not the name of a version directory"):
        resolve_version_dir(root)
