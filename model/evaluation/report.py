"""Evaluation reports: a markdown table, the cold-start curve, per-group bars, and report.json.

Everything takes ``dict[model_name, EvaluationResult]`` so that one call compares every model run on
the same points. Where models were trained with several seeds, the results are the means over seeds
and ``spread`` (model -> SeedSpread) adds "± std" to the tables and error bars to the plots;
``significance`` adds the paired-bootstrap intervals against the best baselines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by batch jobs and CI, never shown

import matplotlib.pyplot as plt  # noqa: E402

from model.evaluation.bootstrap import Significance  # noqa: E402
from model.evaluation.protocol import GROUP_NAMES, EvaluationResult, group_of  # noqa: E402
from model.evaluation.seeds import SeedSpread  # noqa: E402

Spread = Mapping[str, SeedSpread]  # model -> spread of its figures across training seeds

HEADLINE_METRICS: tuple[str, ...] = ("recall@50", "ndcg@50")
CURVE_FILE = "cold_start_curve.png"
BARS_FILE = "group_bars.png"
GROUP_COLOURS = {"cold_start": "#dbe9f6", "warm_up": "#fdebd3", "active": "#e2f2df"}


def _short(metric: str) -> str:
    """ "recall@50" -> "R@50", for compact column headers."""
    name, _, k = metric.partition("@")
    short = {"recall": "R", "ndcg": "N", "hr": "HR"}.get(name, name)
    return f"{short}@{k}" if k else short


def _value(result: EvaluationResult, group: str, metric: str) -> float:
    return result.groups.get(group, {}).get(metric, math.nan)


def _seed_std(spread: Spread | None, name: str, key: str | int, metric: str, curve: bool = False) -> float:
    """Std across seeds of one model's group (or per-h) mean; NaN where the model ran once (no spread
    was measured) or the figure is missing."""
    runs = spread.get(name) if spread else None
    if runs is None or runs.runs < 2:
        return math.nan
    table: Mapping[Any, Mapping[str, float]] = runs.curve if curve else runs.groups
    return table.get(key, {}).get(metric, math.nan)


def seed_count(spread: Spread | None) -> int:
    """The most seeds any model ran with: 1 when there is no spread."""
    return max((s.runs for s in (spread or {}).values()), default=1)


def _cell(value: float, std: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.4f}" if math.isnan(std) else f"{value:.4f} ± {std:.4f}"


def _group_header(results: Mapping[str, EvaluationResult], group: str) -> str:
    counts = sorted({r.points.get(group, 0) for r in results.values()})
    return f"{group} ({'/'.join(str(c) for c in counts)})"


def markdown_table(
    results: Mapping[str, EvaluationResult],
    metrics: Sequence[str] = HEADLINE_METRICS,
    groups: Sequence[str] = GROUP_NAMES,
    spread: Spread | None = None,
) -> str:
    """One row per model, one column per group x metric; the best value of each column in bold.
    With ``spread``, models run with several seeds show "mean ± std"."""
    columns = [(g, m) for g in groups for m in metrics]
    header = ["model"] + [f"{_group_header(results, g)} {_short(m)}" for g, m in columns]
    best = {
        col: max(
            (round(_value(r, *col), 4) for r in results.values() if not math.isnan(_value(r, *col))),
            default=math.nan,
        )
        for col in columns
    }
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [name]
        for col in columns:
            value = _value(result, *col)
            text = _cell(value, _seed_std(spread, name, *col))
            # Compared at the printed precision, so that visibly equal values are bold together.
            if not math.isnan(value) and round(value, 4) == best[col]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_table(
    results: Mapping[str, EvaluationResult], metric: str = "recall@50", spread: Spread | None = None
) -> str:
    """The cold-start curve as a markdown table: one row per model, one column per history length."""
    hs = sorted({h for r in results.values() for h in r.curve})
    lines = ["| model | " + " | ".join(f"h={h}" for h in hs) + " |", "|" + "---|" * (len(hs) + 1)]
    for name, result in results.items():
        cells = [
            _cell(result.curve[h][metric], _seed_std(spread, name, h, metric, curve=True))
            if h in result.curve
            else "–"
            for h in hs
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shade_groups(ax: Any, hs: Sequence[int]) -> None:
    """Background bands behind the history lengths of each group, so the curve reads against them."""
    for group, colour in GROUP_COLOURS.items():
        positions = [i for i, h in enumerate(hs) if group_of(h) == group]
        if positions:
            ax.axvspan(min(positions) - 0.5, max(positions) + 0.5, color=colour, zorder=0)
            ax.text(
                (min(positions) + max(positions)) / 2,
                1.0,
                group,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
                color="0.35",
            )


def plot_cold_start_curve(
    results: Mapping[str, EvaluationResult],
    path: str | Path,
    metric: str = "recall@50",
    spread: Spread | None = None,
) -> Path:
    """Metric against history length h, one line per model; h on a categorical axis (0 .. 100). Models
    run with several seeds get error bars of ± one std across seeds."""
    hs = sorted({h for r in results.values() for h in r.curve})
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    _shade_groups(ax, hs)
    handles: list[Any] = []  # in model order: the legend would list error-bar lines after plain ones
    for n, (name, result) in enumerate(results.items()):
        xs = [i for i, h in enumerate(hs) if h in result.curve]
        ys = [result.curve[hs[i]][metric] for i in xs]
        errors = [_seed_std(spread, name, hs[i], metric, curve=True) for i in xs]
        style = {"linewidth": 1.8, "markersize": 4, "label": name, "zorder": 3, **_line_style(n)}
        if all(math.isnan(e) for e in errors):
            handles += ax.plot(xs, ys, **style)
        else:
            yerr = [0.0 if math.isnan(e) else e for e in errors]
            handles.append(ax.errorbar(xs, ys, yerr=yerr, capsize=3, elinewidth=1.0, **style))
    ax.set_xticks(range(len(hs)), [str(h) for h in hs])
    ax.set_xlim(-0.5, len(hs) - 0.5)
    ax.set_xlabel("history length h (interactions before the request)")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.4, zorder=1)
    ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)
    ax.set_title(f"Cold-start curve: {metric} by history length{_seeds_note(spread)}", pad=18)
    return _save(fig, path)


def plot_group_bars(
    results: Mapping[str, EvaluationResult],
    path: str | Path,
    metric: str = "recall@50",
    groups: Sequence[str] = GROUP_NAMES,
    spread: Spread | None = None,
) -> Path:
    """Grouped bars: one cluster per user group, one bar per model, value printed on each bar; models
    run with several seeds get error bars of ± one std across seeds."""
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 + 0.45 * len(names) * len(groups)), 4.8), dpi=120)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ys = [_value(results[name], g, metric) for g in groups]
        errors = [_seed_std(spread, name, g, metric) for g in groups]
        has_errors = not all(math.isnan(e) for e in errors)
        bars = ax.bar(
            xs,
            [0.0 if math.isnan(y) else y for y in ys],
            width * 0.95,
            yerr=[0.0 if math.isnan(e) else e for e in errors] if has_errors else None,
            capsize=2 if has_errors else 0,
            error_kw={"elinewidth": 0.8, "zorder": 4},
            label=name,
            zorder=3,
            color=_line_style(j)["color"],
        )
        labels = ["–" if math.isnan(y) else f"{y:.3f}" for y in ys]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2, rotation=90 if len(names) > 3 else 0)
    ax.set_xticks(range(len(groups)), [_group_header(results, g) for g in groups])
    ax.set_ylabel(metric)
    ax.margins(y=0.18)
    ax.grid(axis="y", alpha=0.4, zorder=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.set_title(f"{metric} per user group (points per group in brackets){_seeds_note(spread)}")
    return _save(fig, path)


def _seeds_note(spread: Spread | None) -> str:
    n_seeds = seed_count(spread)
    return f"\nmean ± std over {n_seeds} training seeds" if n_seeds > 1 else ""


def _line_style(n: int) -> dict[str, Any]:
    """Distinct colour and marker per model: the default cycle repeats after ten models."""
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>"
    return {"color": colours[(2 * n) % 20 + (n // 10) % 2], "marker": markers[n % len(markers)]}


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    """Makes ``extra`` JSON-safe: numpy scalars/arrays, paths and non-finite floats."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(
    results: Mapping[str, EvaluationResult],
    out_dir: str | Path,
    dataset_name: str,
    extra: Mapping[str, Any] | None = None,
    spread: Spread | None = None,
    significance: Significance | None = None,
) -> dict[str, Path]:
    """Writes report.json, report.md, cold_start_curve.png and group_bars.png; returns their paths.

    ``results`` hold the means over seeds; ``spread`` adds their std across seeds (report.json
    "seeds" and "results_std"), ``significance`` the bootstrap intervals ("significance")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "curve": plot_cold_start_curve(results, out / CURVE_FILE, spread=spread),
        "bars": plot_group_bars(results, out / BARS_FILE, spread=spread),
    }
    payload: dict[str, Any] = {
        "dataset": dataset_name,
        "extra": _jsonable(extra),
        "results": {name: _jsonable(r.to_dict()) for name, r in results.items()},
    }
    if spread is not None:
        payload["seeds"] = seeds_section(spread)
        payload["results_std"] = {name: _jsonable(s.to_dict()) for name, s in spread.items()}
    if significance is not None:
        payload["significance"] = _jsonable(significance.to_dict())
    paths["json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(_markdown_report(results, dataset_name, extra, spread, significance))
    return paths


def seeds_section(spread: Spread) -> dict[str, Any]:
    """How many seeds each model ran with; "count" is the most any did (the trained models')."""
    return {"count": seed_count(spread), "runs": {name: s.runs for name, s in spread.items()}}


def _reused_runs_part(reused: Mapping[str, Any]) -> list[str]:
    """One line per model whose stored runs stood in for training: seeds, dates, commits."""
    if not reused:
        return []
    lines = ["Runs taken from the run store (same data and settings, trained earlier), not trained here:\n"]
    for name, runs in reused.items():
        made = ", ".join(f"seed {r['seed']} ({r['created']}, commit {r['commit']})" for r in runs)
        lines.append(f"- {name}: {made}")
    return ["\n".join(lines) + "\n"]


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def significance_table(significance: Significance) -> str:
    """One row per group and headline metric: the model, the best baseline, the difference and its
    interval, and whether the interval's lower bound is above 0."""
    level = f"{significance.confidence:.0%}"
    header = [
        "group",
        "metric",
        significance.model,
        "best baseline",
        "difference",
        f"{level} interval",
        "> 0",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, by_metric in significance.comparisons.items():
        for metric, c in by_metric.items():
            interval = c.interval
            cells = [
                group,
                _short(metric),
                f"{c.model_mean:.4f}",
                f"{c.baseline} {c.baseline_mean:.4f}",
                _signed(interval.difference),
                f"[{_signed(interval.low)}, {_signed(interval.high)}]",
                "yes" if interval.significant else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _significance_part(significance: Significance) -> list[str]:
    if not significance.comparisons:
        return []
    return [
        f"## {significance.model} against the best baseline of each group\n",
        f"Paired bootstrap over test users (each user with all their points), {significance.resamples} "
        f"resamples, seed {significance.seed}; per-point values are first averaged over each model's "
        "seeds. Best baseline: the highest group mean among the baselines (not the ablations), per metric. "
        '"> 0": the lower bound of the interval is above 0.\n',
        significance_table(significance),
    ]


def _markdown_report(
    results: Mapping[str, EvaluationResult],
    dataset_name: str,
    extra: Mapping[str, Any],
    spread: Spread | None = None,
    significance: Significance | None = None,
) -> str:
    ks = sorted({int(m.partition("@")[2]) for r in results.values() for g in r.groups.values() for m in g})
    n_seeds = seed_count(spread)
    parts = [
        f"# Evaluation report: {dataset_name}\n",
        "Groups: cold_start h ≤ 5, warm_up 10 ≤ h ≤ 30, active h ≥ 50; points per group in brackets.\n",
    ]
    if n_seeds > 1:
        parts.append(
            f"Trained models: mean ± std (sample std across seeds) over {n_seeds} training seeds; "
            "deterministic baselines run once.\n"
        )
    parts += _reused_runs_part(extra.get("reused_runs", {}))
    parts += ["## Headline (Recall@50 / NDCG@50)\n", markdown_table(results, HEADLINE_METRICS, spread=spread)]
    if significance is not None:
        parts += _significance_part(significance)
    for k in ks:
        if k != 50:
            metrics = (f"recall@{k}", f"ndcg@{k}", f"hr@{k}")
            parts += [f"## At K = {k}\n", markdown_table(results, metrics, spread=spread)]
    parts += [
        "## Cold-start curve (Recall@50 by history length)\n",
        curve_table(results, spread=spread),
        f"![cold-start curve]({CURVE_FILE})\n",
        f"![group bars]({BARS_FILE})\n",
    ]
    if extra:
        parts += ["## Run details\n", "```json\n" + json.dumps(_jsonable(extra), indent=2) + "\n```\n"]
    return "\n".join(parts)
