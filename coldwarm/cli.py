"""The ``coldwarm`` command line: one subcommand per step of the offline job, and ``run`` for all of them.

Every option falls back to the settings (``COLDWARM_`` environment variables, see model/settings.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from model.artifacts import (
    ArtifactError,
    DataMismatchError,
    DataSource,
    check_training_data,
    data_fingerprint,
    read_manifest,
    recorded_data_source,
    resolve_version_dir,
)
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data.describe import EARLY_ACTIONS, DataSummary, describe, training_advice
from model.data.fetch import FetchError, fetch_movielens_1m
from model.data.loading import load_dataset
from model.data.schema import DataFormatError, InteractionData
from model.data.split import split_users
from model.distributed import LayoutError, ProcessLayout, backend_for, launched_by_torchrun, process_group
from model.evaluation.report import markdown_table, write_report
from model.experiments import ALL_MODELS, PRIMARY_MODEL, ExperimentOutcome, check_model_names, run_experiments
from model.export import compile_devices, export_model
from model.features import FeatureEncoder
from model.recipe import RecipeChoice, settings_for_data
from model.settings import Settings
from model.train import (
    TrainedModel,
    TrainingContext,
    check_batch_size,
    fit_cold_warm_net,
    set_torch_threads,
    training_device,
)

app = typer.Typer(
    help="Cold & Warm Net: train, evaluate and export a cold-start-aware retrieval model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Get and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("coldwarm")

DEFAULT_RUN_DIR = Path("runs/latest")
PASS_TRAINING_DATA = "pass --data with the data the model was trained on"
CHECKPOINT_FILE = "checkpoint.pt"
QUICK_MODELS = (PRIMARY_MODEL, "most_popular", "segment_popular", "onboarding_popular", "ease")

DataOption = Annotated[
    str | None,
    typer.Option(
        help="synthetic[:N_USERS], a MovieLens-1M directory, a directory of Parquet interactions files, "
        "or a CSV/Parquet interactions file [env COLDWARM_DATA]"
    ),
]
UsersOption = Annotated[
    Path | None, typer.Option(help="user table for a CSV/Parquet interactions file or Parquet directory")
]
ItemsOption = Annotated[
    Path | None, typer.Option(help="item table for a CSV/Parquet interactions file or Parquet directory")
]
RunDirOption = Annotated[Path, typer.Option(help="where train writes its checkpoint, evaluate its report")]
EpochsOption = Annotated[int | None, typer.Option(help="training epochs [env COLDWARM_TRAIN__EPOCHS]")]
ModelsOption = Annotated[str, typer.Option(help=f"comma-separated, or 'all': {', '.join(ALL_MODELS)}")]
SeedsOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="train every trained model (and its user groups) this many times, with seeds "
        "COLDWARM_TRAIN__SEED + 0 .. N-1; figures are means over seeds with their std, and "
        "cold_warm_net is tested against the best baseline of each group by a paired bootstrap over "
        "users. Deterministic baselines run once",
    ),
]


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=2)


def make_settings(data: str | None, epochs: int | None, artifacts_dir: Path | None = None) -> Settings:
    """The environment's settings with the command line's options on top, validated together."""
    try:
        settings = Settings()
        overrides = settings.model_dump()
        if data is not None:
            overrides["data"] = data
        if artifacts_dir is not None:
            overrides["artifacts_dir"] = artifacts_dir
        if epochs is not None:
            overrides["train"]["epochs"] = epochs
        settings = Settings.model_validate(overrides)
    except ValidationError as error:
        raise fail(f"invalid settings: {validation_summary(error)}") from error
    set_torch_threads(settings.train)
    return settings


def validation_summary(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


# What loading a data source raises for data that is missing or malformed.
DATA_ERRORS = (DataFormatError, FileNotFoundError, ValueError)


def data_given(data: str | None) -> bool:
    """Whether the data source was chosen (--data or COLDWARM_DATA) rather than left at its default."""
    return data is not None or "data" in Settings().model_fields_set


def load_data(settings: Settings, users: Path | None, items: Path | None) -> InteractionData:
    try:
        data = load_dataset(settings.data, users, items)
    except DATA_ERRORS as error:
        raise fail(str(error)) from error
    log_loaded(data)
    return data


def log_loaded(data: InteractionData) -> None:
    log.info(
        "loaded %s: %d interactions, %d users, %d items",
        data.name,
        len(data.interactions),
        len(data.users),
        len(data.catalog_item_ids()),
    )


def settings_for(data: InteractionData, settings: Settings) -> tuple[Settings, RecipeChoice]:
    """``settings`` with the training recipe resolved on ``data`` (model/recipe.py), logged."""
    resolved, choice = settings_for_data(settings, data)
    log.info("%s", choice.describe())
    return resolved, choice


def build_context(data: InteractionData, settings: Settings) -> TrainingContext:
    split = split_users(data)
    log.info(
        "user split: %d train, %d validation, %d test",
        len(split.train),
        len(split.validation),
        len(split.test),
    )
    encoder = FeatureEncoder.fit(data, split.train, settings.features)
    return TrainingContext.build(data, split, encoder, settings.train)


def parse_models(models: str) -> list[str]:
    names = (
        list(ALL_MODELS) if models.strip() == "all" else [m.strip() for m in models.split(",") if m.strip()]
    )
    try:
        return check_model_names(names)
    except ValueError as error:
        raise fail(str(error)) from error


def write_evaluation(
    outcome: ExperimentOutcome, data: InteractionData, out_dir: Path, seconds: float
) -> None:
    extra = {
        **outcome.details,
        "wall_seconds": round(seconds, 1),
        "training": {
            name: {"epochs": t.epochs, "seconds": round(t.seconds, 1)} for name, t in outcome.trained.items()
        },
    }
    paths = write_report(
        outcome.results, out_dir, data.name, extra, spread=outcome.spread, significance=outcome.significance
    )
    console.print(markdown_table(outcome.results, spread=outcome.spread))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))


@data_app.command("fetch")
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="the data set to fetch: movielens-1m")],
    path: Annotated[
        Path | None, typer.Option(help="use this local ml-1m.zip or ml-1m directory instead")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="download cache [env COLDWARM_CACHE_DIR]")] = None,
) -> None:
    """Download MovieLens-1M (checksum verified) into the cache, or register a local copy with --path."""
    setup_logging()
    if dataset != "movielens-1m":
        raise fail(f"unknown data set {dataset!r}; available: movielens-1m")
    try:
        directory = fetch_movielens_1m(cache_dir or Settings().cache_dir, path)
    except FetchError as error:
        raise fail(str(error)) from error
    console.print(f"MovieLens-1M is in {directory}; train with: coldwarm train --data {directory}")


@data_app.command("describe")
def data_describe(
    data: DataOption = None,
    users: UsersOption = None,
    items: ItemsOption = None,
) -> None:
    """Sizes, history lengths and how often users' first actions share a timestamp: the last says
    whether a target window suits the data (README "Model and training choices")."""
    setup_logging()
    summary = describe(load_data(make_settings(data, None), users, items))
    console.print(data_summary_table(summary))
    console.print(training_advice(summary))


def data_summary_table(summary: DataSummary) -> Table:
    table = Table(title=summary.name)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("users", f"{summary.users:,}")
    table.add_row("items", f"{summary.items:,}")
    table.add_row("interactions", f"{summary.interactions:,}")
    table.add_row(
        "actions per user (p10 / p50 / p90)",
        " / ".join(f"{value:g}" for value in summary.history_quantiles.values()),
    )
    tied = f"early pairs tied in time (first {EARLY_ACTIONS} actions)"
    table.add_row(tied, f"{summary.early_tie_share:.1%}")
    return table


NprocOption = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="train with N processes on this machine (DistributedDataParallel: gloo on the CPU, NCCL "
        "on GPUs), started through torchrun; the batch size stays the global batch and must be a "
        "multiple of N. Under torchrun itself leave it out: --nproc-per-node says how many",
    ),
]


@app.command()
def train(
    data: DataOption = None,
    users: UsersOption = None,
    items: ItemsOption = None,
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    epochs: EpochsOption = None,
    nproc: NprocOption = 1,
) -> None:
    """Train Cold & Warm Net (pre-training → user groups → MI bias features → main loop with DKD),
    early-stopped on the validation users' cold-start group; writes RUN_DIR/checkpoint.pt.

    Under torchrun (or with --nproc N) the processes split each batch; rank 0 validates and alone
    writes the checkpoint."""
    setup_logging()
    settings = make_settings(data, epochs)
    try:
        layout = ProcessLayout.from_env()
    except LayoutError as error:
        raise fail(str(error)) from error
    if nproc > 1:
        if launched_by_torchrun():
            raise fail("--nproc starts torchrun itself; under torchrun, --nproc-per-node sets the processes")
        check_global_batch(settings, nproc)
        raise typer.Exit(launch_torchrun(nproc, data, users, items, run_dir, epochs))
    check_global_batch(settings, layout.world_size)
    try:
        device = training_device(settings.train, layout)
    except ValueError as error:
        raise fail(str(error)) from error
    if not layout.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log of the run: rank 0's
    with process_group(layout, device, settings.distributed.timeout_s):
        if layout.distributed:
            log.info(
                "rank 0 of %d processes (%s), %d samples per process and step",
                layout.world_size,
                backend_for(device),
                settings.train.batch_size // layout.world_size,
            )
        loaded = load_data(settings, users, items)
        settings, _ = settings_for(loaded, settings)
        trained = train_primary(build_context(loaded, settings), settings)
        if layout.is_main:
            log.info("checkpoint: %s", save_checkpoint(trained, run_dir / CHECKPOINT_FILE))


def check_global_batch(settings: Settings, processes: int) -> None:
    try:
        check_batch_size(settings.train.batch_size, processes)
    except ValueError as error:
        raise fail(f"{error} (COLDWARM_TRAIN__BATCH_SIZE)") from error


def launch_torchrun(
    nproc: int,
    data: str | None,
    users: Path | None,
    items: Path | None,
    run_dir: Path,
    epochs: int | None,
) -> int:
    """Runs this train command in ``nproc`` processes under torchrun (on a free local port) and
    returns its exit status; the settings travel in the environment, which the processes inherit."""
    arguments = ["--run-dir", str(run_dir)]
    for option, value in (("--data", data), ("--users", users), ("--items", items), ("--epochs", epochs)):
        if value is not None:
            arguments += [option, str(value)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "coldwarm",
        "train",
        *arguments,
    ]
    log.info("launching %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def train_primary(context: TrainingContext, settings: Settings) -> TrainedModel:
    trained = fit_cold_warm_net(context, settings.model, settings.train, PRIMARY_MODEL)
    log.info("trained %s in %.0fs over %d epochs", trained.name, trained.seconds, len(trained.epochs))
    return trained


@app.command()
def evaluate(
    data: DataOption = None,
    users: UsersOption = None,
    items: ItemsOption = None,
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    models: ModelsOption = "all",
    epochs: EpochsOption = None,
    seeds: SeedsOption = 1,
) -> None:
    """Run the evaluation protocol (shared/DESIGN.md) on the test users for the chosen models; the
    checkpoint in RUN_DIR stands for cold_warm_net (its first seed), everything else is trained here.
    Writes RUN_DIR/report/{report.json, report.md, *.png}."""
    setup_logging()
    started = time.perf_counter()
    settings = make_settings(data, epochs)
    loaded = load_data(settings, users, items)
    settings, recipe = settings_for(loaded, settings)
    context = build_context(loaded, settings)
    trained = {}
    if (run_dir / CHECKPOINT_FILE).exists():
        trained[PRIMARY_MODEL] = load_checkpoint(run_dir / CHECKPOINT_FILE)
    outcome = run_experiments(context, settings, parse_models(models), trained=trained, seeds=seeds)
    outcome.details["recipe"] = recipe.to_record()
    write_evaluation(outcome, loaded, run_dir / "report", time.perf_counter() - started)


@app.command()
def export(
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    data: DataOption = None,
    artifacts_dir: Annotated[
        Path | None, typer.Option(help="artifacts root [env COLDWARM_ARTIFACTS_DIR]")
    ] = None,
) -> None:
    """Export RUN_DIR's model: TorchScript user tower, item embeddings and biases, vocabularies and a
    manifest, into ARTIFACTS_DIR/<model_version>/, and point ARTIFACTS_DIR/LATEST at it."""
    setup_logging()
    settings = make_settings(data, None, artifacts_dir)
    checkpoint = run_dir / CHECKPOINT_FILE
    if not checkpoint.exists():
        raise fail(f"{checkpoint} does not exist; run 'coldwarm train' first")
    trained = load_checkpoint(checkpoint)
    loaded = load_data(settings, None, None)
    report = run_dir / "report" / "report.json"
    metrics = json.loads(report.read_text())["results"].get(PRIMARY_MODEL, {}) if report.exists() else {}
    export_trained(trained, settings, loaded, metrics, DataSource.of(settings.data))


def export_trained(
    trained: TrainedModel, settings: Settings, loaded: InteractionData, metrics: dict, source: DataSource
) -> Path:
    """The artifacts of ``trained`` (compiled towers as ``settings.export`` says), logged."""
    directory = export_model(
        trained,
        settings.artifacts_dir,
        data_fingerprint(loaded),
        loaded.name,
        metrics,
        source,
        compile_devices(settings.export),
    )
    log.info("exported %s", directory)
    return directory


@app.command()
def run(
    data: DataOption = None,
    users: UsersOption = None,
    items: ItemsOption = None,
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    models: ModelsOption = ",".join(QUICK_MODELS),
    epochs: EpochsOption = None,
    artifacts_dir: Annotated[
        Path | None, typer.Option(help="artifacts root [env COLDWARM_ARTIFACTS_DIR]")
    ] = None,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="then load features and serve")
    ] = False,
    host: Annotated[str, typer.Option(help="with --serve: interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="with --serve: port to bind")] = 8000,
) -> None:
    """The whole job: load → train → evaluate (against the chosen baselines) → export → index, and with
    --serve: → features (Redis if COLDWARM_REDIS_URL is set, else in-process) → serve on HOST:PORT."""
    setup_logging()
    started = time.perf_counter()
    settings = make_settings(data, epochs, artifacts_dir)
    model_names = parse_models(models)  # before hours of training, not after
    loaded = load_data(settings, users, items)
    settings, recipe = settings_for(loaded, settings)
    context = build_context(loaded, settings)
    trained = train_primary(context, settings)
    save_checkpoint(trained, run_dir / CHECKPOINT_FILE)
    outcome = run_experiments(context, settings, model_names, trained={PRIMARY_MODEL: trained})
    outcome.details["recipe"] = recipe.to_record()
    write_evaluation(outcome, loaded, run_dir / "report", time.perf_counter() - started)
    metrics = outcome.results[PRIMARY_MODEL].to_dict() if PRIMARY_MODEL in outcome.results else {}
    directory = export_trained(trained, settings, loaded, metrics, DataSource.of(settings.data, users, items))
    from index_builder.build import build_index_artifacts
    from index_builder.settings import IndexSettings

    build_index_artifacts(directory, None, IndexSettings(), loaded, progress=True)
    log.info("offline job done in %.0fs", time.perf_counter() - started)
    if serve_after:
        load_features_for_serving(loaded, settings)
        serve_app(host, port, None, preloaded=loaded)


@app.command("build-index")
def build_index(
    artifacts_dir: Annotated[Path | None, typer.Option(help="artifacts root or version dir")] = None,
    data: DataOption = None,
    index_type: Annotated[
        str | None, typer.Option("--type", help="flat | ivf | hnsw [env COLDWARM_INDEX_TYPE]")
    ] = None,
) -> None:
    """Build the FAISS index of the exported item embeddings (item bias folded in as one extra
    dimension, so scores are exact), measure its recall@100 against exact search on real user queries
    from the data the model was trained on (the source its manifest records, or DATA, which must be that
    data), and write it with a manifest beside the artifacts (index/<index_version>/)."""
    setup_logging()
    from index_builder.build import build_index_artifacts
    from index_builder.settings import IndexSettings

    settings = make_settings(data, None, artifacts_dir)
    index_settings = IndexSettings() if index_type is None else IndexSettings(type=index_type)
    try:
        # Resolved once, so that the version whose data is checked is the one indexed.
        version_dir = resolve_version_dir(settings.artifacts_dir)
        manifest = read_manifest(version_dir)
    except ArtifactError as error:
        raise fail(str(error)) from error
    if data_given(data):
        loaded = load_data(settings, None, None)
        check_recall_data(manifest, loaded, hint="")
    else:
        loaded = load_recorded_training_data(manifest)
        check_recall_data(manifest, loaded, hint=PASS_TRAINING_DATA)
    directory = build_index_artifacts(version_dir, None, index_settings, loaded, progress=True)
    log.info("index written to %s", directory)


def load_recorded_training_data(manifest: dict[str, Any]) -> InteractionData:
    """The training data from the source the manifest records; refused when there is none or it fails."""
    version = manifest.get("model_version")
    source = recorded_data_source(manifest)
    if source is None:
        raise fail(f"the manifest of model {version} records no training data source; {PASS_TRAINING_DATA}")
    try:
        data = source.load()
    except DATA_ERRORS as error:
        raise fail(
            f"cannot load {source.source}, the data model {version} was trained on ({error}); "
            f"{PASS_TRAINING_DATA}"
        ) from error
    log_loaded(data)
    return data


def check_recall_data(manifest: dict[str, Any], data: InteractionData, hint: str) -> None:
    """Recall measured on other users than the training data's says nothing of the served traffic."""
    try:
        check_training_data(manifest, data)
    except DataMismatchError as error:
        raise fail(f"{error}; {hint}" if hint else str(error)) from error


@app.command("load-features")
def load_features(data: DataOption = None, users: UsersOption = None, items: ItemsOption = None) -> None:
    """Bulk-load every known user's profile, recent actions and state into Redis (COLDWARM_REDIS_URL),
    with pipelines; loading twice gives the same content."""
    setup_logging()
    settings = make_settings(data, None)
    load_into_redis(load_data(settings, users, items), settings)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    data: Annotated[
        str | None,
        typer.Option(help="preload the in-process store from this source (only without COLDWARM_REDIS_URL)"),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="server processes sharing the port (each with its own model thread; the index file is "
            "memory-mapped, so its pages are shared); more than 1 needs COLDWARM_REDIS_URL",
        ),
    ] = 1,
) -> None:
    """Serve POST /recommend, /recommend/batch, /events, /users, /healthz, /readyz, /metrics and
    /admin/reload."""
    setup_logging()
    if workers > 1:
        serve_workers(host, port, workers, data)
    else:
        serve_app(host, port, data)


def load_features_for_serving(loaded: InteractionData, settings: Settings) -> None:
    """Into Redis when COLDWARM_REDIS_URL is set; otherwise serve_app preloads its in-process store."""
    from service.settings import ServiceSettings

    if ServiceSettings().redis_url:
        load_into_redis(loaded, settings)


def load_into_redis(loaded: InteractionData, settings: Settings) -> None:
    import redis
    from redis.exceptions import RedisClusterException

    from service.feature_store import KeyLayout
    from service.feature_store.client import create_sync_client
    from service.feature_store.loader import bulk_load
    from service.settings import ServiceSettings, redacted_url

    service_settings = ServiceSettings()
    if not service_settings.redis_url:
        raise fail("set COLDWARM_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to load features into Redis")
    client = create_sync_client(service_settings.redis_url, service_settings.redis_cluster)
    layout = KeyLayout(service_settings.key_prefix, service_settings.key_schema_version)
    try:
        stats = bulk_load(client, layout, loaded, cap=settings.features.max_history)
    except (redis.RedisError, RedisClusterException) as error:
        raise fail(f"Redis at {redacted_url(service_settings.redis_url)}: {error}") from error
    finally:
        client.close()
    marker = stats.marker.version if stats.marker else "none"
    log.info(
        "loaded %d users, %d actions into Redis in %.1fs (load marker version %s)",
        stats.users,
        stats.actions,
        stats.seconds,
        marker,
    )


def serve_workers(host: str, port: int, workers: int, data: str | None) -> None:
    """Several uvicorn worker processes, each building its app from the environment."""
    import uvicorn

    from service.settings import ServiceSettings

    service_settings = ServiceSettings()
    if not service_settings.redis_url:
        # Each process would hold its own in-process store: events sent to one worker would be
        # invisible to the others.
        raise fail("--workers > 1 needs a shared feature store: set COLDWARM_REDIS_URL")
    if data:
        raise fail("--data preloads the in-process store; with --workers > 1 load Redis with load-features")
    uvicorn.run(
        "service.app:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=service_settings.access_log,
    )


def serve_app(host: str, port: int, data: str | None, preloaded: InteractionData | None = None) -> None:
    import uvicorn

    from service.app import create_app
    from service.feature_store import MemoryFeatureStore
    from service.feature_store.loader import load_memory_store
    from service.settings import ServiceSettings

    service_settings = ServiceSettings()
    store = None
    if (data or preloaded is not None) and not service_settings.redis_url:
        settings = make_settings(data, None)
        store = MemoryFeatureStore(cap=settings.features.max_history)
        load_memory_store(store, preloaded if preloaded is not None else load_data(settings, None, None))
        log.info("in-process feature store preloaded with %d users", len(store))
    uvicorn.run(
        create_app(service_settings, store=store),
        host=host,
        port=port,
        log_level="info",
        access_log=service_settings.access_log,
    )


if __name__ == "__main__":
    app()
