"""Report files and table content from synthetic evaluation results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from model.evaluation import report
from model.evaluation.bootstrap import Significance, compare_with_best_baselines
from model.evaluation.protocol import EvaluationResult, summarise
from model.evaluation.report import (
    HEADLINE_METRICS,
    curve_table,
    markdown_table,
    plot_cold_start_curve,
    plot_group_bars,
    write_report,
)
from model.evaluation.seeds import SeedSpread, mean_over_seeds, spread_over_seeds

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


def test_report_names_the_runs_taken_from_the_run_store(
    tmp_path: Path, results: dict[str, EvaluationResult]
) -> None:
    reused = {"item": [{"seed": s, "created": "2026-12-01 17:00 UTC", "commit": "abc1234"} for s in (0, 1)]}
    write_report(results, tmp_path, "tiny", {"reused_runs": reused})
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "- item: seed 0 (2026-12-01 17:00 UTC, commit abc1234), seed 1 (2026-12-01 17:00 UTC, commit abc1234)"
        in markdown
    )
    assert markdown.index("not trained here") < markdown.index("## Headline")
    write_report(results, tmp_path / "fresh", "tiny", {})
    assert "run store" not in (tmp_path / "fresh" / "report.md").read_text()


def test_plots_are_pngs(tmp_path: Path, results: dict[str, EvaluationResult]) -> None:
    for plot, name in ((plot_cold_start_curve, "curve.png"), (plot_group_bars, "bars.png")):
        path = plot(results, tmp_path / name, metric="ndcg@50")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- several seeds: mean ± std, error bars, significance ---------------------------------------------

Seeded = tuple[dict[str, EvaluationResult], dict[str, SeedSpread], Significance]


@pytest.fixture()
def seeded(results: dict[str, EvaluationResult]) -> Seeded:
    """ "net" trained with two seeds (its result is their mean), "pop" run once."""
    recall_a = np.array([0.4, 0.4, 0.4, 0.5, 0.5, 0.4, 0.4])
    runs = [result("net", list(recall_a + d), list(recall_a / 2 + d)) for d in (-0.05, 0.05)]
    means = {"net": mean_over_seeds(runs), "pop": results["pop"]}
    spread = {"net": spread_over_seeds(runs), "pop": spread_over_seeds([results["pop"]])}
    significance = compare_with_best_baselines(means, "net", ["pop"], HEADLINE_METRICS)
    return means, spread, significance


def test_markdown_shows_mean_and_std_of_seeded_models_only(seeded: Seeded) -> None:
    means, spread, _ = seeded
    table = markdown_table(means, spread=spread)
    net_row = next(line for line in table.splitlines() if line.startswith("| net "))
    pop_row = next(line for line in table.splitlines() if line.startswith("| pop "))
    # Two seeds 0.1 apart: sample std 0.1 / sqrt(2) = 0.0707.
    assert "**0.4000 ± 0.0707**" in net_row
    assert "±" not in pop_row and "| pop | 0.3000 |" in pop_row
    assert "±" in curve_table(means, spread=spread)
    assert "±" not in markdown_table(means)  # without spread, as before


def test_write_report_with_seeds_and_significance(tmp_path: Path, seeded: Seeded) -> None:
    means, spread, significance = seeded
    write_report(means, tmp_path, "tiny", {}, spread=spread, significance=significance)
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["results"]["net"]["groups"]["cold_start"]["recall@50"] == pytest.approx(0.4)  # the mean
    assert payload["seeds"] == {"count": 2, "runs": {"net": 2, "pop": 1}}
    assert payload["results_std"]["net"]["groups"]["cold_start"]["recall@50"] == pytest.approx(0.1 / 2**0.5)
    assert payload["results_std"]["net"]["curve"]["0"]["recall@50"] == pytest.approx(0.1 / 2**0.5)
    assert payload["results_std"]["pop"]["groups"]["all"]["recall@50"] == 0.0
    section = payload["significance"]
    assert section["model"] == "net" and section["confidence"] == 0.95 and section["resamples"] == 2000
    cold = section["groups"]["cold_start"]["recall@50"]
    assert cold["baseline"] == "pop"
    assert cold["difference"] == pytest.approx(0.1)  # 0.4 against 0.3 on every cold-start point
    assert cold["low"] == pytest.approx(0.1) and cold["high"] == pytest.approx(0.1)
    assert cold["significant"] is True
    assert set(section["groups"]) == {"cold_start", "warm_up", "active", "all"}
    markdown = (tmp_path / "report.md").read_text()
    assert "mean ± std" in markdown and "0.4000 ± 0.0707" in markdown
    assert "| cold_start | R@50 | 0.4000 | pop 0.3000 | +0.1000 | [+0.1000, +0.1000] | yes |" in markdown


def drawn_figure(monkeypatch: pytest.MonkeyPatch, plot: Any, *args: Any, **kwargs: Any) -> Any:
    """The figure a plot function draws, caught before it is saved and closed."""
    figures: list[Any] = []
    save = report._save

    def keep(fig: Any, path: str | Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    path = plot(*args, **kwargs)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return figures[0]


def error_bars(fig: Any) -> dict[str, list[float]]:
    """Per model (legend label): the half-lengths of its error bars, from the curve or the bars."""
    ax = fig.axes[0]
    found: dict[str, list[float]] = {}
    # ax.bar also lists its error bars as a container of their own, unlabelled: skipped.
    for container in [c for c in ax.containers if not c.get_label().startswith("_")]:
        bars = container.errorbar if isinstance(container, BarContainer) else container
        if isinstance(bars, ErrorbarContainer):
            segments = bars.lines[2][0].get_segments()
            found[container.get_label()] = [float(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    return found


@pytest.mark.parametrize("plot", [plot_cold_start_curve, plot_group_bars], ids=["curve", "bars"])
def test_plots_show_error_bars_of_seeded_models(
    tmp_path: Path, seeded: Seeded, monkeypatch: pytest.MonkeyPatch, plot: Any
) -> None:
    means, spread, _ = seeded
    with_spread = error_bars(drawn_figure(monkeypatch, plot, means, tmp_path / "a.png", spread=spread))
    assert set(with_spread) == {"net"}  # "pop" ran once: no error bar
    assert with_spread["net"] == pytest.approx([0.1 / 2**0.5] * len(with_spread["net"]))
    assert error_bars(drawn_figure(monkeypatch, plot, means, tmp_path / "b.png")) == {}
