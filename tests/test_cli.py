"""The ``coldwarm`` command line: help, one-line errors with exit code 2, and the whole offline job
(``run``) on a small synthetic data set, configured through COLDWARM_ environment variables."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from model_fixtures import one_torch_thread
from typer.testing import CliRunner

from coldwarm.cli import app, data_app
from index_builder.build import INDEX_DIR, INDEX_MANIFEST_FILE
from model.artifacts import LATEST_FILE, MANIFEST_FILE, DataSource, data_fingerprint, load_artifacts
from model.checkpoint import load_checkpoint
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import GROUP_NAMES

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

SMALL_ENV = {
    "COLDWARM_TRAIN__PRETRAIN_EPOCHS": "1",
    "COLDWARM_TRAIN__BATCH_SIZE": "256",
    "COLDWARM_TRAIN__SHARED_NEGATIVES": "256",
    "COLDWARM_MODEL__EMBEDDING_DIM": "16",
    "COLDWARM_MODEL__HIDDEN_DIM": "32",
    "COLDWARM_MODEL__N_USER_GROUPS": "8",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No COLDWARM_ setting from the surrounding shell leaks into a test."""
    for name in [n for n in os.environ if n.startswith("COLDWARM_")]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fresh environment and working directory, one torch thread; the CLI's logging setup is undone
    afterwards."""
    clean_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with one_torch_thread():
        yield
    root.handlers[:], root.level = handlers, level


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def unwrapped(output: str) -> str:
    """The output with line breaks removed, so that a message wrapped by the console reads whole."""
    return "".join(output.splitlines())


# ----- help ---------------------------------------------------------------------------------------------


def command_names(typer_app: typer.Typer) -> list[str]:
    return [c.name or (c.callback.__name__ if c.callback else "") for c in typer_app.registered_commands]


EXPECTED_COMMANDS = {"train", "evaluate", "export", "run", "build-index", "load-features", "serve"}


def test_help_lists_every_command_and_each_help_runs() -> None:
    """Every registered command (and data's) is listed by --help, and its own --help runs, showing the
    first line of its docstring: a command added without help, or whose help crashes, fails here."""
    names = command_names(app)
    assert set(names) >= EXPECTED_COMMANDS, names
    listing = invoke("--help")
    assert listing.exit_code == 0
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert name in listing.output, name
        result = invoke(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        summary = (command.callback.__doc__ or "").strip().splitlines()[0]
        assert summary and unwrapped(summary).split()[0] in result.output, name
    data_help = invoke("data", "--help")
    assert data_help.exit_code == 0
    for name in command_names(data_app):
        assert name in data_help.output
        assert invoke("data", name, "--help").exit_code == 0, name


def test_console_script_entry_point() -> None:
    script = Path(sys.executable).with_name("coldwarm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "coldwarm"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "export" in result.stdout


# ----- errors -------------------------------------------------------------------------------------------


def test_fetch_with_a_nonexistent_path_is_a_one_line_error() -> None:
    result = invoke("data", "fetch", "movielens-1m", "--path", "missing.zip")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "missing.zip does not exist" in lines[0]


def test_fetch_of_an_unknown_data_set_is_an_error() -> None:
    result = invoke("data", "fetch", "movielens-20m")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "unknown data set 'movielens-20m'" in result.output


def test_train_with_a_missing_data_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "ratings.csv"
    result = invoke("train", "--data", missing, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert str(missing) in unwrapped(result.output)
    assert result.output.startswith("error:")
    assert not (tmp_path / "run").exists()


def test_export_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    result = invoke("export", "--run-dir", tmp_path / "empty", "--artifacts-dir", tmp_path / "a")
    assert result.exit_code == 2
    assert str(tmp_path / "empty" / "checkpoint.pt") + " does not exist" in unwrapped(result.output)
    assert not (tmp_path / "a").exists()


# Error handling of the command line: one line, exit code 2, nothing half-done.


@pytest.mark.parametrize("command", ["fetch", "train"])
def test_long_error_messages_stay_on_one_line(tmp_path: Path, command: str) -> None:
    # Longer than any console is wide, whatever COLUMNS says.
    missing = tmp_path / ("long-directory-name-" * 12) / "ml-1m.zip"
    if command == "fetch":
        result = invoke("data", "fetch", "movielens-1m", "--path", missing)
    else:
        result = invoke("train", "--data", missing)
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1, result.output


@pytest.mark.parametrize("name", ["[raw]", "a[/]b"])
def test_error_message_names_a_path_with_brackets_verbatim(tmp_path: Path, name: str) -> None:
    missing = Path("data") / name / "ratings.csv"
    result = invoke("train", "--data", missing)
    assert result.exit_code == 2
    assert str(missing) in result.output


@pytest.mark.parametrize(
    "args", [["--data", "synthetic:abc"], ["--data", "synthetic", "--users", "users.csv"]]
)
def test_bad_data_arguments_are_one_line_errors(args: list[str]) -> None:
    result = invoke("train", *args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_invalid_environment_setting_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLDWARM_TRAIN__EPOCHS", "0")
    result = invoke("train", "--data", "synthetic:60")
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_zero_epochs_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL_ENV.items():
        monkeypatch.setenv(name, value)
    # TrainConfig.epochs is ge=1: nothing may be trained or saved.
    result = invoke("train", "--data", "synthetic:60", "--epochs", "0", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_run_rejects_unknown_models_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL_ENV.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    result = invoke(
        "run", "--data", "synthetic:60", "--epochs", "1", "--run-dir", run_dir, "--models", "nope"
    )
    assert result.exit_code == 2
    assert "unknown model(s) nope" in result.output
    assert not (run_dir / "checkpoint.pt").exists()


# ----- data describe ------------------------------------------------------------------------------------


def test_data_describe_names_the_batched_starts_recipe_only_for_tied_starts(tmp_path: Path) -> None:
    batched = tmp_path / "batched.csv"
    batched.write_text(
        "user_id,item_id,timestamp\n"
        + "".join(f"{u},{u + i},{1000 if i < 5 else 1000 + 60 * i}\n" for u in range(1, 4) for i in range(8))
    )
    result = invoke("data", "describe", "--data", batched)
    assert result.exit_code == 0, result.output
    text = unwrapped(result.output)
    assert "57.1%" in text  # 4 of the 7 early pairs of each user tied
    assert "batched_starts recipe" in text and "COLDWARM_TRAIN__TARGET_WINDOW=10" in text

    ordered = invoke("data", "describe", "--data", "synthetic:60")
    assert ordered.exit_code == 0, ordered.output
    assert "0.0%" in ordered.output
    assert "next_action recipe" in unwrapped(ordered.output)
    assert "TARGET_WINDOW" not in unwrapped(ordered.output)


def test_data_describe_of_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = invoke("data", "describe", "--data", tmp_path / "absent.csv")
    assert result.exit_code == 2
    assert "absent.csv" in unwrapped(result.output)


# ----- evaluate with several training seeds ------------------------------------------------------------


def test_evaluate_help_documents_seeds() -> None:
    result = invoke("evaluate", "--help")
    assert result.exit_code == 0
    assert "--seeds" in result.output and "bootstrap" in result.output


def test_evaluate_rejects_zero_seeds(tmp_path: Path) -> None:
    result = invoke("evaluate", "--data", "synthetic:60", "--seeds", "0", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert not (tmp_path / "run").exists()


def test_evaluate_with_two_seeds_reports_std_and_significance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SMALL_ENV.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    result = invoke(
        "evaluate",
        "--data",
        "synthetic:200",
        "--models",
        "cold_warm_net,most_popular",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["seeds"] == {"count": 2, "runs": {"cold_warm_net": 2, "most_popular": 1}}
    assert report["extra"]["seeds"] == [0, 1]
    assert [r["seed"] for r in report["extra"]["seed_training"]["cold_warm_net"]] == [0, 1]
    std = report["results_std"]["cold_warm_net"]["groups"]
    assert set(std) == set(GROUP_NAMES)
    assert any(std[g]["recall@50"] > 0 for g in GROUP_NAMES)  # two seeds, two different models
    assert report["results_std"]["most_popular"]["groups"]["all"]["recall@50"] == 0.0
    significance = report["significance"]
    assert significance["model"] == "cold_warm_net"
    for group in GROUP_NAMES:
        for metric in ("recall@50", "ndcg@50"):
            comparison = significance["groups"][group][metric]
            assert comparison["baseline"] == "most_popular"
            assert comparison["low"] <= comparison["difference"] <= comparison["high"]
            assert comparison["significant"] == (comparison["low"] > 0)
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "±" in markdown and "95% interval" in markdown
    assert "±" in result.output  # the printed table too


# ----- the whole job ------------------------------------------------------------------------------------


@dataclass
class RunOutput:
    run_dir: Path
    artifacts_dir: Path
    output: str


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> RunOutput:
    base = tmp_path_factory.mktemp("cli-run")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with pytest.MonkeyPatch.context() as monkeypatch, one_torch_thread():
        clean_environment(monkeypatch)
        monkeypatch.chdir(base)
        for name, value in SMALL_ENV.items():
            monkeypatch.setenv(name, value)
        result = invoke(
            "run",
            "--data",
            "synthetic:300",
            "--epochs",
            "1",
            "--run-dir",
            base / "run",
            "--artifacts-dir",
            base / "artifacts",
            "--models",
            "cold_warm_net,most_popular",
        )
    root.handlers[:], root.level = handlers, level
    assert result.exit_code == 0, (result.output, result.exception)
    return RunOutput(base / "run", base / "artifacts", result.output)


def test_run_writes_a_checkpoint_with_the_environments_settings(job: RunOutput) -> None:
    trained = load_checkpoint(job.run_dir / "checkpoint.pt")
    assert trained.name == "cold_warm_net"
    assert trained.model_config.embedding_dim == 16
    assert trained.model_config.hidden_dim == 32
    assert trained.model_config.n_user_groups == 8
    assert trained.train_config.epochs == 1  # --epochs beats the default of 8
    assert trained.train_config.pretrain_epochs == 1
    assert trained.train_config.batch_size == 256
    main = [e for e in trained.epochs if "validation" in e]
    phase = [e for e in trained.epochs if "warm_phase_validation" in e]
    assert len(main) == 1 and 1 <= len(phase) <= trained.train_config.warm_phase_epochs
    assert len(trained.epochs) == len(main) + len(phase)


def test_run_writes_the_report(job: RunOutput) -> None:
    report_dir = job.run_dir / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["dataset"] == "synthetic:300"
    assert set(report["results"]) == {"cold_warm_net", "most_popular"}
    for name, result in report["results"].items():
        assert set(result["groups"]) == set(GROUP_NAMES), name
        assert all(result["points"][g] > 0 for g in GROUP_NAMES), name
        for metrics in result["groups"].values():
            assert 0.0 <= metrics["recall@50"] <= 1.0 and 0.0 <= metrics["ndcg@50"] <= 1.0
    assert report["results"]["cold_warm_net"]["points"] == report["results"]["most_popular"]["points"]
    # COLDWARM_RECIPE=auto found the synthetic users' first actions ordered in time, and set nothing.
    assert report["extra"]["recipe"] == {
        "asked": "auto",
        "chosen": "next_action",
        "early_tie_share": 0.0,
        "applied": {},
    }
    for png in ("cold_start_curve.png", "group_bars.png"):
        content = (report_dir / png).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 1000, png
    markdown = (report_dir / "report.md").read_text()
    assert "cold_warm_net" in markdown and "most_popular" in markdown
    # The table is printed too.
    assert "most_popular" in job.output


def test_run_exports_a_version_named_in_latest(job: RunOutput) -> None:
    version = (job.artifacts_dir / LATEST_FILE).read_text().strip()
    directory = job.artifacts_dir / version
    assert directory.is_dir()
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["model_version"] == version
    assert manifest["dataset"] == "synthetic:300"
    assert manifest["data_fingerprint"] == data_fingerprint(generate_synthetic(n_users=300))
    assert manifest["data_source"] == {"source": "synthetic:300", "users": None, "items": None}
    assert manifest["model_config"]["embedding_dim"] == 16
    report = json.loads((job.run_dir / "report" / "report.json").read_text())
    assert manifest["metrics"]["groups"] == report["results"]["cold_warm_net"]["groups"]
    artifacts = load_artifacts(job.artifacts_dir)
    assert artifacts.version == version
    assert artifacts.items.embeddings.shape[1] == 2 * 16  # the experts' item spaces side by side


def test_export_of_the_runs_checkpoint_reproduces_the_version(job: RunOutput, tmp_path: Path) -> None:
    result = invoke(
        "export", "--run-dir", job.run_dir, "--data", "synthetic:300", "--artifacts-dir", tmp_path / "again"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    again = (tmp_path / "again" / LATEST_FILE).read_text().strip()
    assert again == (job.artifacts_dir / LATEST_FILE).read_text().strip()
    manifest = json.loads((tmp_path / "again" / again / MANIFEST_FILE).read_text())
    report = json.loads((job.run_dir / "report" / "report.json").read_text())
    # export reads the metrics from the run's report.json.
    assert manifest["metrics"]["groups"] == report["results"]["cold_warm_net"]["groups"]
    assert manifest["data_source"] == {"source": "synthetic:300", "users": None, "items": None}


# ----- build-index: recall on the training data's users -------------------------------------------------

PASS_TRAINING_DATA = "pass --data with the data the model was trained on"


def test_recorded_data_source_names_paths_absolutely(tmp_path: Path) -> None:
    # The working directory is tmp_path: a relative path must still name the data from anywhere else.
    source = DataSource.of("ratings.csv", Path("users.csv"), None)
    assert source == DataSource(str(tmp_path / "ratings.csv"), str(tmp_path / "users.csv"), None)
    assert DataSource.of("synthetic:300") == DataSource("synthetic:300")
    assert DataSource.from_record(source.to_record()) == source
    assert DataSource.from_record(None) is None


def unindexed_copy(job: RunOutput, destination: Path) -> Path:
    """The run's exported version, copied without its index: a build then writes a new index manifest
    instead of keeping the run's (same index content, same index version)."""
    version = (job.artifacts_dir / LATEST_FILE).read_text().strip()
    copy = destination / version
    shutil.copytree(job.artifacts_dir / version, copy, ignore=shutil.ignore_patterns(INDEX_DIR))
    return copy


def record_data_source(version_dir: Path, record: dict[str, str | None] | None) -> None:
    """Rewrites the manifest's data_source; None removes it, as in artifacts exported before sources
    were recorded. The manifest is not part of the version hash, so the artifacts stay loadable."""
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    manifest.pop("data_source")
    if record is not None:
        manifest["data_source"] = record
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def index_manifest(version_dir: Path) -> dict:
    index_root = version_dir / INDEX_DIR
    latest = (index_root / LATEST_FILE).read_text().strip()
    return json.loads((index_root / latest / INDEX_MANIFEST_FILE).read_text())


def the_error(result) -> str:
    """The one error line of a refused command (log lines before it are not errors)."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output, result.exception)
    return lines[0]


@pytest.mark.parametrize("args", [[], ["--data", "synthetic:300"]], ids=["recorded", "explicit"])
def test_build_index_measures_recall_on_the_training_datas_users(
    job: RunOutput, tmp_path: Path, args: list[str]
) -> None:
    copy = unindexed_copy(job, tmp_path)
    result = invoke("build-index", "--artifacts-dir", copy, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert index_manifest(copy)["recall_query_source"] == "users:synthetic:300"


@pytest.mark.parametrize("via", ["option", "environment"])
def test_build_index_refuses_data_the_model_was_not_trained_on(
    job: RunOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    copy = unindexed_copy(job, tmp_path)
    if via == "option":
        result = invoke("build-index", "--artifacts-dir", copy, "--data", "synthetic:200")
    else:
        monkeypatch.setenv("COLDWARM_DATA", "synthetic:200")
        result = invoke("build-index", "--artifacts-dir", copy)
    expected = json.loads((copy / MANIFEST_FILE).read_text())["data_fingerprint"]
    actual = data_fingerprint(generate_synthetic(n_users=200))
    assert the_error(result) == (
        f"error: synthetic:200 is not the data model {copy.name} was trained on "
        f"(fingerprint {actual}, expected {expected})"
    )
    assert not (copy / INDEX_DIR).exists()


@pytest.mark.parametrize(
    ("data_source", "reason"),
    [
        (None, "records no training data source"),
        ({"source": "/nonexistent/ratings.csv", "users": None, "items": None}, "cannot load"),
        ({"source": "synthetic:200", "users": None, "items": None}, "is not the data model"),
    ],
    ids=["unrecorded", "unloadable", "other-data"],
)
def test_build_index_without_data_refuses_anything_but_the_recorded_training_data(
    job: RunOutput, tmp_path: Path, data_source: dict[str, str | None] | None, reason: str
) -> None:
    copy = unindexed_copy(job, tmp_path)
    record_data_source(copy, data_source)
    error = the_error(invoke("build-index", "--artifacts-dir", copy))
    assert reason in error and error.endswith(PASS_TRAINING_DATA), error
    assert not (copy / INDEX_DIR).exists()


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=hunter2"], ids=["user", "query"]
)
def test_load_features_never_prints_the_redis_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("COLDWARM_REDIS_URL", url)
    result = invoke("load-features", "--data", "synthetic:50")
    assert result.exit_code == 2
    assert "hunter2" not in result.output and "***" in result.output
    assert "Traceback" not in result.output
