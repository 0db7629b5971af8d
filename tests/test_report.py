"""Report files and table content from synthetic evaluation results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.evaluation.protocol import EvaluationResult, summarise
from model.evaluation.report import markdown_table, plot_cold_start_curve, plot_group_bars, write_report

H = np.array([0, 1, 5, 10, 30, 50, 100])


def result(name: str, recall: list[float], ndcg: list[float]) -> EvaluationResult:
    per_point = {
        "recall@50": np.array(recall),
        "ndcg@50": np.array(ndcg),
        "hr@50": (np.array(recall) > 0).astype(float),
        "recall@10": np.array(recall) / 2,
        "ndcg@10": np.array(ndcg) / 2,
        "hr@10": (np.array(recall) > 0.2).astype(float),
    }
    return summarise(name, per_point, H, np.arange(len(H)))


@pytest.fixture()
def results() -> dict[str, EvaluationResult]:
    return {
        # popularity-like: strong when cold; item-item-like: strong when warm.
        "pop": result("pop", [0.3, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1]),
        "item": result("item", [0.3, 0.1, 0.1, 0.4, 0.4, 0.3, 0.3], [0.2, 0.1, 0.1, 0.3, 0.3, 0.2, 0.2]),
    }


def test_markdown_table_rows_columns_and_bold(results: dict[str, EvaluationResult]) -> None:
    table = markdown_table(results)
    lines = table.strip().splitlines()
    assert len(lines) == 4  # header, separator, one row per model
    header = lines[0]
    for column in ("cold_start (3) R@50", "warm_up (2) N@50", "active (2) R@50", "all (7) N@50"):
        assert column in header
    pop_row = next(line for line in lines if line.startswith("| pop "))
    item_row = next(line for line in lines if line.startswith("| item "))
    cells_pop = [c.strip() for c in pop_row.strip("|").split("|")]
    cells_item = [c.strip() for c in item_row.strip("|").split("|")]
    # cold_start R@50: pop 0.3 beats item 0.1667; warm_up R@50: item 0.4 beats pop 0.2.
    assert cells_pop[1] == "**0.3000**" and cells_item[1] == "0.1667"
    assert cells_pop[3] == "0.2000" and cells_item[3] == "**0.4000**"


def test_markdown_table_bolds_ties_and_handles_missing_groups(results: dict[str, EvaluationResult]) -> None:
    table = markdown_table(results, metrics=("hr@50",))
    assert table.count("**1.0000**") == 2 * 4  # both models hit on every point: every column tied
    sparse = {"pop": summarise("pop", {"recall@50": np.array([0.5])}, np.array([0]), np.array([1]))}
    assert "–" in markdown_table(sparse)  # warm_up/active have no points


def test_write_report_files(tmp_path: Path, results: dict[str, EvaluationResult]) -> None:
    extra = {"lambda": np.float64(500.0), "nan": float("nan")}
    paths = write_report(results, tmp_path / "out", "tiny", extra)
    for name in ("report.json", "report.md", "cold_start_curve.png", "group_bars.png"):
        path = tmp_path / "out" / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert set(paths) == {"json", "markdown", "curve", "bars"}
    payload = json.loads((tmp_path / "out" / "report.json").read_text())
    assert payload["dataset"] == "tiny"
    assert payload["extra"] == {"lambda": 500.0, "nan": None}
    assert payload["results"]["pop"]["groups"]["cold_start"]["recall@50"] == pytest.approx(0.3)
    assert payload["results"]["item"]["curve"]["10"]["recall@50"] == pytest.approx(0.4)
    assert payload["results"]["item"]["points"] == {"cold_start": 3, "warm_up": 2, "active": 2, "all": 7}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "# Evaluation report: tiny" in markdown
    assert "| pop |" in markdown and "![cold-start curve](cold_start_curve.png)" in markdown
    assert "## At K = 10" in markdown


def test_plots_are_pngs(tmp_path: Path, results: dict[str, EvaluationResult]) -> None:
    for plot, name in ((plot_cold_start_curve, "curve.png"), (plot_group_bars, "bars.png")):
        path = plot(results, tmp_path / name, metric="ndcg@50")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
