"""Model registry: registration, models:/ resolution, model descriptions and promotion by COCO AP, on a real
SQLite MLflow store."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pipelines import registry, tracking
from pipelines.errors import JobError
from simplepose.checkpoint import save_checkpoint
from simplepose.model import IMHN, IMHNConfig


@pytest.fixture()
def store(tmp_path):
    """A fresh SQLite tracking + registry store with one experiment."""
    mlflow_client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = tracking.ensure_experiment(mlflow_client, "t", str(tmp_path / "artifacts"))
    return mlflow_client, experiment_id, tmp_path


def _trained_version(store, payload: bytes, ap: float | None) -> str:
    """A run with a `model/imhn.pt` artifact, registered as candidate, optionally evaluated on "val"."""
    mlflow_client, experiment_id, tmp_path = store
    run = mlflow_client.create_run(experiment_id)
    ckpt = tmp_path / f"{run.info.run_id}" / registry.MODEL_FILE
    ckpt.parent.mkdir()
    ckpt.write_bytes(payload)
    mlflow_client.log_artifact(run.info.run_id, str(ckpt), registry.MODEL_ARTIFACT_PATH)
    version = registry.register_checkpoint(mlflow_client, "imhn", run.info.run_id)
    if ap is not None:
        registry.record_evaluation(mlflow_client, "imhn", version, "val", {"AP": ap, "AR": ap + 0.05})
    return version


def test_parse_model_uri():
    assert registry.parse_model_uri("models:/imhn/3") == ("imhn", "3", None)
    assert registry.parse_model_uri("models:/imhn@champion") == ("imhn", None, "champion")
    with pytest.raises(ValueError, match="not models:/NAME"):
        registry.parse_model_uri("models:/imhn")


def test_resolve_model_uri_downloads_the_checkpoint(store, tmp_path):
    version = _trained_version(store, b"weights-1", None)
    uri = str(tmp_path / "some.pt")
    assert registry.resolve_model_uri(uri) == uri  # not a registry URI: unchanged
    tracking_uri = store[0].tracking_uri
    for model_uri in (f"models:/imhn/{version}", "models:/imhn@candidate"):
        path = registry.resolve_model_uri(model_uri, tracking_uri=tracking_uri, cache_dir=str(tmp_path / "c"))
        assert path.endswith(f"imhn/{version}/{registry.MODEL_FILE}")
        assert open(path, "rb").read() == b"weights-1"


def test_promotion_both_ways(store):
    mlflow_client = store[0]
    first = _trained_version(store, b"a", 0.30)
    decision = registry.promote(mlflow_client, "imhn", "val")
    assert decision.promoted and decision.champion_version is None  # no champion yet
    assert str(mlflow_client.get_model_version_by_alias("imhn", "champion").version) == first

    worse = _trained_version(store, b"b", 0.25)
    decision = registry.promote(mlflow_client, "imhn", "val")
    assert not decision.promoted
    assert (decision.candidate_value, decision.champion_value) == (0.25, 0.30)
    assert str(mlflow_client.get_model_version_by_alias("imhn", "champion").version) == first
    record = json.loads(mlflow_client.get_model_version("imhn", worse).tags["promotion.val"])
    assert record["promoted"] is False and record["champion_value"] == 0.30

    better = _trained_version(store, b"c", 0.41)
    decision = registry.promote(mlflow_client, "imhn", "val")
    assert decision.promoted and decision.champion_version == first
    assert str(mlflow_client.get_model_version_by_alias("imhn", "champion").version) == better
    record = json.loads(mlflow_client.get_model_version("imhn", better).tags["promotion.val"])
    assert (record["candidate_value"], record["champion_value"]) == (0.41, 0.30)


def test_promotion_needs_an_evaluation_on_the_set(store):
    _trained_version(store, b"a", None)
    with pytest.raises(ValueError, match="has no coco.val.AP"):
        registry.promote(store[0], "imhn", "val")


def _checkpoint(path, metadata: dict | None = None) -> str:
    """A 1-stack IMHN of width 64 (3 MB of weights, 80 KB of index) saved at `path`; its path."""
    torch.manual_seed(0)
    save_checkpoint(IMHN.from_config(IMHNConfig(stacks=1, width=64, increase=0)), path, metadata)
    return str(path)


def test_describe_model_reads_the_metadata_not_the_weights(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "model.pt", {"name": "wide", "version": "v7"})
    opened = []
    real_filesystem = registry.storage.filesystem

    def counting_filesystem(uri, storage_options=None):  # every file describe_model opens counts its reads
        fs, fs_path = real_filesystem(uri, storage_options)

        class Counting:
            def open(self, *args, **kwargs):
                handle = fs.open(*args, **kwargs)
                read, readinto = handle.read, handle.readinto  # torch reads tensor records with readinto
                handle.read = lambda *a: opened.append(len(data := read(*a))) or data
                handle.readinto = lambda buffer: opened.append(count := readinto(buffer)) or count
                return handle
        return Counting(), fs_path

    monkeypatch.setattr(registry.storage, "filesystem", counting_filesystem)
    assert registry.describe_model(path) == (path, "wide", "v7")
    assert 0 < sum(opened) < (tmp_path / "model.pt").stat().st_size / 10  # index and zip directory only


def test_describe_model_versions_a_checkpoint_by_the_sha256_of_its_bytes(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "my-model.pt")
    monkeypatch.setattr(registry, "HASH_CHUNK_BYTES", 1000)  # thousands of chunks: the stream is hashed whole
    expected = hashlib.sha256((tmp_path / "my-model.pt").read_bytes()).hexdigest()[:12]
    assert registry.describe_model(path) == (path, "my-model", expected)


def test_describe_model_pins_an_alias_to_its_version_now(store):
    tracking_uri = store[0].tracking_uri
    first = _trained_version(store, b"a", None)  # `candidate` -> first
    assert registry.describe_model("models:/imhn@candidate", tracking_uri=tracking_uri) == (
        f"models:/imhn/{first}", "imhn", first)
    second = _trained_version(store, b"b", None)  # `candidate` moves; a described run keeps its version
    assert second != first
    assert registry.describe_model("models:/imhn@candidate", tracking_uri=tracking_uri) == (
        f"models:/imhn/{second}", "imhn", second)
    assert registry.describe_model(f"models:/imhn/{first}", tracking_uri=tracking_uri)[0] == f"models:/imhn/{first}"


def test_describe_model_errors_name_the_model(tmp_path):
    garbage = tmp_path / "bad.pt"
    garbage.write_text("garbage\n")
    with pytest.raises(JobError, match=r"MODEL '.*bad\.pt'.* not a readable torch checkpoint"):
        registry.describe_model(str(garbage))
    with pytest.raises(JobError, match=r"MODEL '.*absent\.pt' does not exist"):
        registry.describe_model(str(tmp_path / "absent.pt"))
