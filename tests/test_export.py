"""Export of a trained model into versioned artifacts, loading them back, corrupt directories, and
checkpoints: what the service runs must compute what the trained model computes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_fixtures import one_torch_thread

from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import (
    CONTENT_FILES,
    FEATURES_FILE,
    ITEMS_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    USER_TOWER_FILE,
    ArtifactError,
    content_version,
    data_fingerprint,
    file_digest,
    load_artifacts,
)
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data.schema import InteractionData
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import build_eval_points
from model.export import export_model
from model.features import EncodedUsers, FeatureEncoder, raw_users_from_histories
from model.nn.cold_warm_net import state_term_width
from model.nn.experts import AttentionPooling
from model.ranker import encode_points
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainedModel, TrainingContext, fit_cold_warm_net

MODEL_CONFIG = ModelConfig(embedding_dim=16, hidden_dim=32, feature_dim=8, n_user_groups=8, bias_features=6)
# The default mixes the experts' scores: user and item vectors are the two experts' halves side by side.
WIDTH = 2 * MODEL_CONFIG.embedding_dim
# torch 2.13 deprecates TorchScript (jit.script/save/load), which the artifacts are made of.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

# BCE: the loss under which the bias net has a user side too (in a softmax b_u would cancel).
TRAIN_CONFIG = TrainConfig(
    loss="bce", epochs=1, pretrain_epochs=1, batch_size=256, shared_negatives=256, active_users=100
)


@dataclass
class Exported:
    data: InteractionData
    trained: TrainedModel
    root: Path
    directory: Path
    users: EncodedUsers


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    data = generate_synthetic(n_users=300, n_items=120, seed=7)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=20))
    context = TrainingContext.build(data, split, encoder)
    with one_torch_thread():
        trained = fit_cold_warm_net(context, MODEL_CONFIG, TRAIN_CONFIG, progress=False)
    root = tmp_path_factory.mktemp("artifacts")
    directory = export_model(trained, root, data_fingerprint(data), data.name, {"recall@50": 0.5})
    # Real test users at several history lengths (h = 0 included), then one unknown user with
    # nothing at all: no profile, no history.
    points = build_eval_points(data, split.test, history_lengths=(0, 1, 5, 20, 50), n_targets=10)
    encoded = encode_points(points, data.users, encoder)
    nobody = encoder.encode_users(
        raw_users_from_histories(
            {}, [np.array([], dtype=np.int64)], [np.array([], dtype=np.int64)], np.array([0]), 20
        )
    )
    users = EncodedUsers(
        *(np.concatenate([getattr(encoded, f), getattr(nobody, f)]) for f in ("profile", "history", "state"))
    )
    return Exported(data, trained, root, directory, users)


def tensors(users: EncodedUsers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.as_tensor(users.profile), torch.as_tensor(users.history), torch.as_tensor(users.state)


def test_torchscript_user_tower_matches_the_eager_one(exported: Exported) -> None:
    users = exported.users
    assert (users.history[-1] == 0).all() and (users.profile[-1] == 0).all()
    assert (users.history.sum(axis=1) == 0).sum() >= 2  # h = 0 points and the unknown user
    artifacts = load_artifacts(exported.root)
    net = exported.trained.net.eval()
    assert isinstance(net.user_tower.pooling, AttentionPooling)  # the default warm expert is exported
    with torch.no_grad():
        eager = net.user_tower(*tensors(users))
        scripted = artifacts.user_tower(*tensors(users))
    assert len(eager) == len(scripted) == 3
    for name, a, b in zip(("embedding", "bias", "gate"), eager, scripted, strict=True):
        assert a.shape == b.shape, name
        assert float((a - b).abs().max()) <= 1e-5, name
    embedding, bias, gate = scripted
    assert embedding.shape == (len(users.profile), WIDTH)
    torch.testing.assert_close(gate.sum(dim=1), torch.ones(len(gate)))
    assert float(bias.std()) > 0  # the bias net is exported and active


def test_items_table_equals_the_nets_item_side(exported: Exported) -> None:
    artifacts = load_artifacts(exported.directory)
    with torch.no_grad():
        embeddings, bias = exported.trained.net.all_items()
    np.testing.assert_array_equal(artifacts.items.item_ids, exported.trained.encoder.catalog_item_ids)
    np.testing.assert_array_equal(artifacts.items.item_ids, exported.data.catalog_item_ids())
    np.testing.assert_allclose(artifacts.items.embeddings, embeddings.numpy(), atol=1e-6)
    np.testing.assert_allclose(artifacts.items.bias, bias.numpy(), atol=1e-6)
    assert artifacts.items.embeddings.dtype == np.float32 and artifacts.items.bias.dtype == np.float32
    for half in np.split(artifacts.items.embeddings, 2, axis=1):  # each expert's item vector: unit norm
        np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    with np.load(exported.directory / ITEMS_FILE) as arrays:
        assert arrays["item_ids"].dtype == np.int64


def test_artifacts_reproduce_score_all(exported: Exported) -> None:
    """What the index and service compute (s · <e_u, e_i> + b_u + b_i from the artifacts) is score_all."""
    artifacts = load_artifacts(exported.root)
    with torch.no_grad():
        embedding, bias, _ = artifacts.user_tower(*tensors(exported.users))
        expected = exported.trained.net.score_all(*tensors(exported.users)).numpy()
    served = (
        artifacts.scale * embedding.numpy() @ artifacts.items.embeddings.T
        + bias.numpy()[:, None]
        + artifacts.items.bias[None, :]
    )
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_manifest_and_latest(exported: Exported) -> None:
    directory = exported.directory
    assert directory.parent == exported.root
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE, MANIFEST_FILE]
    )
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    trained = exported.trained
    assert manifest["model_version"] == directory.name
    assert manifest["data_fingerprint"] == data_fingerprint(exported.data)
    assert manifest["dataset"] == exported.data.name
    assert manifest["model_name"] == "cold_warm_net"
    assert manifest["scale"] == pytest.approx(float(trained.net.scale.detach()))
    assert manifest["scale"] != pytest.approx(MODEL_CONFIG.initial_scale)  # learnt, not the initial value
    assert manifest["model_config"] == MODEL_CONFIG.model_dump(mode="json")
    assert manifest["train_config"] == TRAIN_CONFIG.model_dump(mode="json")
    assert manifest["feature_config"] == trained.encoder.config.model_dump(mode="json")
    assert manifest["bias_features"] == trained.bias_features.names
    assert 1 <= len(manifest["bias_features"]) <= MODEL_CONFIG.bias_features
    assert manifest["metrics"] == {"recall@50": 0.5}
    assert manifest["n_items"] == len(trained.encoder.catalog_item_ids)
    assert manifest["embedding_dim"] == WIDTH  # the width of the vectors the index holds
    assert (exported.root / LATEST_FILE).read_text().strip() == directory.name
    artifacts = load_artifacts(exported.root)
    assert artifacts.directory == directory
    assert artifacts.version == directory.name
    assert artifacts.scale == manifest["scale"]
    assert artifacts.encoder.to_dict() == trained.encoder.to_dict()


def test_data_fingerprint_tracks_the_interactions() -> None:
    a = generate_synthetic(n_users=30, n_items=20, seed=1)
    assert data_fingerprint(a) == data_fingerprint(generate_synthetic(n_users=30, n_items=20, seed=1))
    assert data_fingerprint(a) != data_fingerprint(generate_synthetic(n_users=30, n_items=20, seed=2))


def test_exporting_again_moves_latest_to_the_new_version(exported: Exported, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = export_model(exported.trained, root, "fp", "d")
    # The version is a hash of the content: the same model exports to the same version.
    assert first.name == exported.directory.name
    assert export_model(exported.trained, tmp_path / "other-root", "fp", "d").name == first.name
    other = load_checkpoint(save_checkpoint(exported.trained, tmp_path / "c.pt"))
    with torch.no_grad():
        other.net.log_scale.add_(0.5)  # a different model: different item table
        for p in other.net.item_scorer.parameters():
            p.add_(0.01)
    second = export_model(other, root, "fp", "d")
    assert first != second
    assert (root / LATEST_FILE).read_text().strip() == second.name
    assert load_artifacts(root).directory == second
    assert load_artifacts(first).version == first.name  # the older version stays loadable
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]


# ----- corrupt directories -----------------------------------------------------------------------------


def corrupt_copy(exported: Exported, tmp_path: Path) -> Path:
    target = tmp_path / exported.directory.name
    shutil.copytree(exported.directory, target)
    return target


@pytest.mark.parametrize("missing", [USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE])
def test_missing_file_is_an_artifact_error_naming_the_directory(
    exported: Exported, tmp_path: Path, missing: str
) -> None:
    directory = corrupt_copy(exported, tmp_path)
    (directory / missing).unlink()
    with pytest.raises(ArtifactError) as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)
    assert missing in str(raised.value)


def test_missing_manifest_is_an_artifact_error_naming_the_directory(
    exported: Exported, tmp_path: Path
) -> None:
    directory = corrupt_copy(exported, tmp_path)
    (directory / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="LATEST") as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)


def test_truncated_user_tower_is_an_artifact_error(exported: Exported, tmp_path: Path) -> None:
    directory = corrupt_copy(exported, tmp_path)
    content = (directory / USER_TOWER_FILE).read_bytes()
    (directory / USER_TOWER_FILE).write_bytes(content[: len(content) // 2])
    with pytest.raises(ArtifactError, match=f"{USER_TOWER_FILE} does not match its digest") as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)


def test_damaged_file_under_a_resigned_manifest_is_refused_naming_it(
    exported: Exported, tmp_path: Path
) -> None:
    """A manifest re-signed over a damaged file passes the digests; loading still names the file."""
    directory = corrupt_copy(exported, tmp_path)
    content = (directory / USER_TOWER_FILE).read_bytes()
    (directory / USER_TOWER_FILE).write_bytes(content[: len(content) // 2])
    resign(directory)
    with pytest.raises(ArtifactError, match=f"{USER_TOWER_FILE} cannot be loaded"):
        load_artifacts(directory)


def resign(directory: Path) -> None:
    """Rewrites the manifest's digests and version for the files as they now are."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"] = {name: file_digest(directory / name) for name in CONTENT_FILES}
    manifest["model_version"] = content_version(directory, CONTENT_FILES)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "manifest", ["{not json at all", "", '["a", "list"]', '{"model_version": "x"}', '{"scale": 2.0}']
)
def test_bad_manifest_is_an_artifact_error(exported: Exported, tmp_path: Path, manifest: str) -> None:
    directory = corrupt_copy(exported, tmp_path)
    (directory / MANIFEST_FILE).write_text(manifest)
    with pytest.raises(ArtifactError) as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)


def test_truncated_items_and_bad_features_are_artifact_errors(exported: Exported, tmp_path: Path) -> None:
    for name, content in ((ITEMS_FILE, b"PK\x03\x04garbage"), (FEATURES_FILE, b'{"config": {}}')):
        directory = corrupt_copy(exported, tmp_path / name)
        (directory / name).write_bytes(content)
        with pytest.raises(ArtifactError, match=f"{name} does not match its digest") as raised:
            load_artifacts(directory)
        assert str(directory) in str(raised.value)
        resign(directory)
        with pytest.raises(ArtifactError, match=f"{name} cannot be loaded"):
            load_artifacts(directory)


def test_inconsistent_item_arrays_are_an_artifact_error(exported: Exported, tmp_path: Path) -> None:
    directory = corrupt_copy(exported, tmp_path)
    with np.load(directory / ITEMS_FILE) as arrays:
        item_ids, embeddings, bias = arrays["item_ids"], arrays["embeddings"], arrays["bias"]
    np.savez(directory / ITEMS_FILE, item_ids=item_ids, embeddings=embeddings[:-1], bias=bias)
    resign(directory)
    with pytest.raises(ArtifactError, match="disagree") as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)


def test_tampered_file_is_an_artifact_error(exported: Exported, tmp_path: Path) -> None:
    """Same shapes, other values: only the content hash against model_version can tell."""
    directory = corrupt_copy(exported, tmp_path)
    with np.load(directory / ITEMS_FILE) as arrays:
        item_ids, embeddings, bias = arrays["item_ids"], arrays["embeddings"], arrays["bias"]
    np.savez(directory / ITEMS_FILE, item_ids=item_ids, embeddings=embeddings, bias=bias + 1.0)
    with pytest.raises(ArtifactError, match=f"{ITEMS_FILE} does not match its digest") as raised:
        load_artifacts(directory)
    assert str(directory) in str(raised.value)
    # A manifest written before per-file digests is checked by the version hash over all files.
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    del manifest["files"]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match model_version"):
        load_artifacts(directory)


def test_root_without_latest_and_dangling_latest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as raised:
        load_artifacts(tmp_path)
    assert str(tmp_path) in str(raised.value)
    (tmp_path / LATEST_FILE).write_text("deadbeef\n")
    with pytest.raises(ArtifactError) as raised:
        load_artifacts(tmp_path)
    assert str(tmp_path / "deadbeef") in str(raised.value)


# ----- checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_the_same_scores(exported: Exported, tmp_path: Path) -> None:
    trained = exported.trained
    path = save_checkpoint(trained, tmp_path / "run" / "checkpoint.pt")
    loaded = load_checkpoint(path)
    assert loaded.name == trained.name
    assert loaded.model_config == trained.model_config
    assert loaded.train_config == trained.train_config
    assert loaded.bias_features == trained.bias_features
    assert loaded.epochs == trained.epochs
    assert loaded.encoder.to_dict() == trained.encoder.to_dict()
    assert not loaded.net.training
    with torch.no_grad():
        before = trained.net.score_all(*tensors(exported.users))
        after = loaded.net.score_all(*tensors(exported.users))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.net.user_tower.attention.group_embeddings, trained.net.user_tower.attention.group_embeddings
    )
    assert float(trained.net.user_tower.attention.group_embeddings.abs().sum()) > 0  # groups were fitted


@pytest.mark.parametrize(
    "update",
    [
        {"expert_mixing": "embedding"},
        {"expert_mixing": "embedding", "similarity": "dot"},
        {"state_item_dims": 4},
        {"stage_popularity": True},
        {"expert_state_input": True, "expert_state_columns": "count"},
        {"expert_state_input": True, "expert_state_columns": "all"},
    ],
)
def test_the_scoring_options_export_what_they_score(update: dict[str, Any], tmp_path: Path) -> None:
    """The paper's embedding mixing (d-wide vectors), the inner product (no unit norms, scale 1) and
    the state term, learnt or stage popularity (k more values), export a tower and an item table whose
    folded inner product is the net's score_all, as the default's do."""
    data = generate_synthetic(n_users=200, n_items=80, seed=8)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=20))
    context = TrainingContext.build(data, split, encoder)
    config = MODEL_CONFIG.model_copy(update=update)
    with one_torch_thread():
        trained = fit_cold_warm_net(context, config, TRAIN_CONFIG, progress=False)
    export_model(trained, tmp_path, data_fingerprint(data), data.name, {})
    artifacts = load_artifacts(tmp_path)
    points = build_eval_points(data, split.test, history_lengths=(0, 1, 5), n_targets=10)
    users = tensors(encode_points(points, data.users, encoder))
    with torch.no_grad():
        embedding, bias, _ = artifacts.user_tower(*users)
        expected = trained.net.score_all(*users).numpy()
    experts = 1 if config.expert_mixing == "embedding" else 2
    width = experts * config.embedding_dim + state_term_width(encoder, config)
    assert embedding.shape[1] == artifacts.items.embeddings.shape[1] == width
    assert (artifacts.scale == 1.0) == (update.get("similarity") == "dot")
    folded = fold_bias(artifacts.items.embeddings, artifacts.items.bias, artifacts.scale)
    served = query_vectors(embedding.numpy()) @ folded.T + bias.numpy()[:, None]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    if config.stage_popularity:  # counted by training, served with the items, kept by a checkpoint
        table = trained.net.item_scorer.state_items.table
        assert float(table.abs().sum()) > 0
        np.testing.assert_allclose(artifacts.items.embeddings[:, -table.shape[1] :], table.numpy())
        loaded = load_checkpoint(save_checkpoint(trained, tmp_path / "checkpoint.pt"))
        torch.testing.assert_close(loaded.net.item_scorer.state_items.table, table, rtol=0, atol=0)
