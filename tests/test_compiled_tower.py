"""The compiled user tower (AOTInductor package beside TorchScript): exported with its digest and torch
version, served when it loads and agrees with TorchScript, refused or skipped when it does not; answers
through it equal the TorchScript ones. One compile for the module (tens of seconds)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from index_builder.build import build_index_artifacts
from index_builder.settings import IndexSettings
from model.artifacts import MANIFEST_FILE, ArtifactError, data_fingerprint, load_artifacts
from model.compiled_tower import compiled_tower_file, compiler_available
from model.export import export_model
from model.features import FeatureEncoder
from model.train import TrainedModel
from service.engine import compute, load_bundle
from service.feature_store import UserRecord, records_from_interactions, records_to_raw_users

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import MODEL_CONFIG, TRAIN_CONFIG, ServingArtifacts  # noqa: E402

pytest_plugins = ["service_fixtures"]

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler for AOTInductor")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def compiled_dir(serving_artifacts: ServingArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    trained = TrainedModel(
        "cold_warm_net", serving_artifacts.a.net, serving_artifacts.encoder, MODEL_CONFIG, TRAIN_CONFIG, None
    )
    data = serving_artifacts.data
    root = tmp_path_factory.mktemp("compiled")
    directory = export_model(trained, root, data_fingerprint(data), data.name, compile_for=("cpu",))
    build_index_artifacts(directory, data=data)
    return directory


def encoded(serving_artifacts: ServingArtifacts, encoder: FeatureEncoder) -> tuple[torch.Tensor, ...]:
    data = serving_artifacts.data
    users = sorted(int(u) for u in data.users["user_id"])[:40]
    records = [
        *records_from_interactions(data, users, cap=encoder.config.max_history),
        UserRecord.unknown(10**12),
    ]
    now = int(data.interactions["timestamp"].max()) + 60
    batch = encoder.encode_users(records_to_raw_users(records, now, encoder.config.max_history))
    return tuple(torch.from_numpy(a) for a in (batch.profile, batch.history, batch.state))


def test_the_package_is_exported_with_its_digest_and_torch_version(compiled_dir: Path) -> None:
    manifest = json.loads((compiled_dir / MANIFEST_FILE).read_text())
    record = manifest["compiled_towers"]["cpu"]
    assert record["file"] == compiled_tower_file("cpu") and (compiled_dir / record["file"]).is_file()
    assert record["torch"] == torch.__version__ and len(record["sha256"]) == 64


def test_the_compiled_tower_computes_what_torchscript_computes(
    compiled_dir: Path, serving_artifacts: ServingArtifacts
) -> None:
    compiled = load_artifacts(compiled_dir, tower_format="auto")
    assert compiled.tower_format == "aoti"
    assert load_artifacts(compiled_dir).tower_format == "torchscript"  # the default of the offline code
    inputs = encoded(serving_artifacts, compiled.encoder)
    with torch.inference_mode():
        ours = compiled.compiled_tower(*inputs)
        reference = compiled.user_tower(*inputs)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
    # Any batch size within the dynamic range, the single user included.
    with torch.inference_mode():
        one = compiled.compiled_tower(*(t[:1] for t in inputs))
    torch.testing.assert_close(one[0], reference[0][:1], atol=TOLERANCE, rtol=0)


def test_served_answers_through_the_package_equal_torchscript_ones(
    compiled_dir: Path, serving_artifacts: ServingArtifacts
) -> None:
    fast = load_bundle(compiled_dir, IndexSettings(), "cpu", "auto")
    plain = load_bundle(compiled_dir, IndexSettings(), "cpu", "torchscript")
    assert (fast.tower_format, plain.tower_format) == ("aoti", "torchscript")
    data = serving_artifacts.data
    users = sorted(int(u) for u in data.users["user_id"])[:10]
    now = int(data.interactions["timestamp"].max()) + 60
    for record in [*records_from_interactions(data, users, cap=50), UserRecord.unknown(10**12)]:
        a = compute(fast, record, now, 20, set(record.actions))
        b = compute(plain, record, now, 20, set(record.actions))
        assert a.item_ids == b.item_ids
        assert a.scores == pytest.approx(b.scores, abs=TOLERANCE)


def rewrite_manifest(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_package_of_another_torch_is_skipped_or_refused(compiled_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / compiled_dir.name
    shutil.copytree(compiled_dir, copy)
    rewrite_manifest(copy, lambda m: m["compiled_towers"]["cpu"].update(torch="1.0.0"))
    assert load_artifacts(copy, tower_format="auto").tower_format == "torchscript"
    with pytest.raises(ArtifactError, match="torch 1.0.0"):
        load_artifacts(copy, tower_format="aoti")


def test_a_damaged_package_is_refused_naming_it(compiled_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / compiled_dir.name
    shutil.copytree(compiled_dir, copy)
    package = copy / compiled_tower_file("cpu")
    package.write_bytes(package.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match=compiled_tower_file("cpu")):
        load_artifacts(copy, tower_format="auto")


def test_an_attention_tower_compiles_to_the_same_answers(
    serving_artifacts: ServingArtifacts, tmp_path: Path
) -> None:
    """The warm expert's self-attention reads an uncut sequence in the compiled program (its cut width
    depends on the data); the answers must not change, for short, long and empty histories."""
    from model.artifacts import tower_example
    from model.compiled_tower import compile_user_tower, load_compiled_tower
    from model.nn.cold_warm_net import ColdWarmNet
    from model.settings import ModelConfig

    torch.manual_seed(0)
    encoder = serving_artifacts.encoder
    tower = ColdWarmNet(encoder, ModelConfig(warm_pooling="attention", embedding_dim=16)).user_tower.eval()
    package = tmp_path / compiled_tower_file("cpu")
    compile_user_tower(tower, tower_example(encoder, torch.device("cpu")), package)
    compiled, scripted = load_compiled_tower(package), torch.jit.script(tower)
    inputs = encoded(serving_artifacts, encoder)
    with torch.inference_mode():
        for a, b in zip(compiled(*inputs), scripted(*inputs), strict=True):
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
