"""Model registry: registration, models:/ resolution and promotion by COCO AP, on a real SQLite MLflow store."""
from __future__ import annotations

import json

import pytest

from pipelines import registry, tracking


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
