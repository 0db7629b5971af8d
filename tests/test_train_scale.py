"""bench/train_scale.py: the data it generates, the ratios it reports, and a tiny run end to end."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from model.data.loading import load_dataset
from model.data.parquet_dir import interaction_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package
import train_scale  # noqa: E402

RUN_FIELDS = (
    "baseline_mib",
    "load_s",
    "hwm_load_mib",
    "interactions",
    "users",
    "samples_s",
    "hwm_samples_mib",
    "training_samples",
    "samples_mib",
    "steps",
    "train_samples_per_s",
    "gather_ms_per_batch",
    "hwm_train_mib",
    "peak_rss_mib",
)


def run(mode: str, interactions: int, peak: float, baseline: float = 100.0) -> dict[str, object]:
    return {"mode": mode, "interactions": interactions, "peak_rss_mib": peak, "baseline_mib": baseline}


def test_scaling_is_the_largest_size_over_the_smallest_per_mode() -> None:
    runs = [run("lazy", 10_000, 300.0), run("lazy", 1_000, 200.0), run("eager", 1_000, 250.0)]
    assert train_scale.scaling(runs, "lazy") == {
        "data_ratio": 10.0,
        "peak_rss_ratio": 1.5,
        "above_baseline_ratio": 2.0,
        "bytes_per_added_interaction": 100 * 2**20 / 9_000,
    }
    assert train_scale.scaling(runs, "eager") is None  # one size: no ratio


def test_generated_data_is_a_time_ordered_parquet_directory_of_the_wanted_size(tmp_path: Path) -> None:
    spec = train_scale.DataSpec(interactions=3_000, chunk_users=40, files=3, row_group_rows=500, seed=0)
    manifest = train_scale.ensure_data(spec, tmp_path / "data")
    data = load_dataset(tmp_path / "data")
    assert manifest["interactions"] == len(data.interactions) >= 3_000
    assert manifest["generator_calls"] > 1
    # Cut at the user who reaches the size: fewer than one user's actions (at most 150) over it.
    assert len(data.interactions) < 3_000 + 150
    assert data.users["user_id"].is_unique and len(data.users) == data.interactions["user_id"].nunique()
    files = interaction_files(tmp_path / "data")
    assert len(files) == 3
    stamps = pd.concat([pd.read_parquet(f, columns=["timestamp"]) for f in files])["timestamp"]
    assert stamps.is_monotonic_increasing  # an event log: the loader has to sort
    assert train_scale.ensure_data(spec, tmp_path / "data") == manifest  # reused, not generated again


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "train_scale"
    options = shlex.split(
        "--sizes 2000,4000 --steps 1 --eager --chunk-users 50 --files 2 --row-group-rows 300"
    )
    command = [sys.executable, str(ROOT / "bench" / "train_scale.py"), *options, "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["runs"]
    assert [r["mode"] for r in runs] == ["lazy", "eager", "lazy", "eager"]
    assert runs[0]["interactions"] == runs[1]["interactions"] >= 2000
    assert runs[2]["interactions"] == runs[3]["interactions"] >= 4000
    for one in runs:
        assert all(one[field] > 0 for field in RUN_FIELDS), one
        assert (
            one["hwm_load_mib"] <= one["hwm_samples_mib"] <= one["hwm_train_mib"] <= one["peak_rss_mib"] + 1
        )
    small, large = runs[0], runs[2]
    lazy = report["scaling"]["lazy"]
    assert lazy["data_ratio"] == pytest.approx(large["interactions"] / small["interactions"])
    assert lazy["peak_rss_ratio"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"])
    table = out.with_suffix(".md").read_text()
    assert table.count("| lazy |") == 2 and table.count("| eager |") == 2
