"""Ray Train integration: 2 CPU workers (gloo DDP, bf16 autocast) train a tiny IMHN on coco-mini read from a
real loopback S3 server through storage options, checkpoint to S3, log to a real SQLite MLflow store (never the
options), register the model; re-running the run name resumes from the checkpoint. Each `fit()` costs ~20 s of
Ray overhead: two fits. Fine-tuning weights read through storage options: no Ray."""
from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import boto3
import fsspec
import pytest
import torch

from pipelines import registry, tracking
from pipelines.train.config import load_train_config
from pipelines.train.job import run_training
from pipelines.train.loop import STATE_FILE, set_up
from simplepose.checkpoint import save_checkpoint
from simplepose.model import IMHN


@pytest.fixture(scope="module")
def coco_bucket(s3_endpoint, coco_mini):
    """coco-mini (annotations + train2017) in a fresh bucket; returns the bucket name."""
    bucket = f"train-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    fs.put(str(coco_mini / "annotations"), f"{bucket}/coco/annotations", recursive=True)
    fs.pipe({f"{bucket}/coco/train2017/{p.name}": p.read_bytes() for p in (coco_mini / "train2017").iterdir()})
    return bucket


def tiny_config(bucket: str, tmp_path, run_name: str, epochs: int):
    return load_train_config(None, [
        "model.stacks=1", "model.width=16", "model.increase=0",
        f"data.annotations=s3://{bucket}/coco/annotations/person_keypoints_train2017.json",
        f"data.images=s3://{bucket}/coco/train2017", "data.loader_workers=1", "data.max_samples=8",
        f"stages=[{{name: l2_64, epochs: {epochs}, input_size: 64, loss: {{focal_gamma: 0.0}}}}]",
        "batch_size=2", "max_steps_per_epoch=2", "optimizer.lr=2e-3", "schedule.warmup_epochs=0",
        "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5",
        "precision.amp=auto", "precision.sync_bn=false",
        f"checkpoint.storage_path=s3://{bucket}/runs", f"checkpoint.run_name={run_name}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location=s3://{bucket}/mlflow",
        "tracking.experiment=test-train", "tracking.registered_model=tiny-imhn", "tracking.log_every_steps=1"])


def test_init_weights_are_read_through_storage_options(s3_endpoint, coco_bucket, tmp_path, monkeypatch):
    """With no endpoint in the environment, `checkpoint.init_from` on S3 is reachable only through the options."""
    config = tiny_config(coco_bucket, tmp_path, "init", epochs=1)
    torch.manual_seed(123)  # other weights than set_up's seeded ones
    source = IMHN.from_config(config.model)
    save_checkpoint(source, tmp_path / "init.pt")
    uri = f"s3://{coco_bucket}/init/imhn.pt"
    fsspec.filesystem("s3", endpoint_url=s3_endpoint).put(str(tmp_path / "init.pt"), uri)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    worker = set_up(config, rank=0, world=1, device=torch.device("cpu"), init_from=uri,
                    storage_options={"endpoint_url": s3_endpoint})
    for name, value in source.state_dict().items():
        torch.testing.assert_close(worker.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_two_workers_train_checkpoint_resume_and_register(ray_cluster, coco_bucket, s3_endpoint, tmp_path):
    run_name = f"tiny-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"  # the loopback server takes any credentials
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": secret}
    sigint = signal.getsignal(signal.SIGINT)
    first = run_training(tiny_config(coco_bucket, tmp_path, run_name, epochs=3), storage_options=options)
    assert signal.getsignal(signal.SIGINT) is sigint  # Ctrl-C after training is the caller's again, not Ray Train's
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    losses = [m.value for m in sorted(client.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 6  # 3 epochs x 2 steps, logged by rank 0 only
    assert sum(losses[-2:]) < sum(losses[:2])  # the loss falls
    assert first.metrics["epoch"] == 2 and first.metrics["step"] == 6
    assert first.checkpoint_uri.startswith(f"{coco_bucket}/runs/{run_name}")  # checkpoints on S3
    assert first.model_version == "1"
    assert str(client.get_model_version_by_alias("tiny-imhn", "candidate").version) == "1"
    run = client.get_run(first.run_id)
    assert run.data.params["optimizer.lr"] == "0.002" and run.data.tags["code_version"]
    assert run.data.tags["data.annotations_version"] != "unknown"
    for metric in ("lr", "images_per_s", "loss_scale0", "loss_scale4", "epoch_loss"):
        assert metric in run.data.metrics
    # The storage options reached every read and write, and are logged nowhere: params, tags, config artifact.
    logged = json.dumps([run.data.params, run.data.tags, first.metrics], default=str)
    config_file = client.download_artifacts(first.run_id, "config/train_config.json", str(tmp_path))
    with open(config_file) as handle:
        logged += handle.read()
    assert secret not in logged and "storage_options" not in logged

    # The same run name with more epochs resumes: epoch, step, optimizer state and the same MLflow run.
    second = run_training(tiny_config(coco_bucket, tmp_path, run_name, epochs=4), storage_options=options)
    assert second.run_id == first.run_id and second.model_version == "2"
    assert (second.metrics["start_epoch"], second.metrics["epoch"], second.metrics["step"]) == (3, 3, 8)
    resumed = [m.value for m in client.get_metric_history(first.run_id, "resumed_at_epoch")]
    assert sorted(resumed) == [0, 3]
    with fsspec.open(f"s3://{second.checkpoint_uri}/{STATE_FILE}", "rb") as handle:
        state = torch.load(handle, weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 8
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    stored = fs.find(f"{coco_bucket}/runs/{run_name}")
    assert stored and not any(secret.encode() in fs.cat_file(path) for path in stored)  # nor in Ray's files
    # The registered checkpoint loads by alias.
    path = registry.resolve_model_uri("models:/tiny-imhn@candidate", tracking_uri=client.tracking_uri,
                                      cache_dir=str(tmp_path / "cache"))
    from simplepose.checkpoint import load_model
    assert load_model(path).config.stacks == 1


def test_train_command_takes_storage_options_and_never_prints_them(capsys):
    from jobs.cli import main

    config = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "coco_mini_cpu.yaml")
    assert main(["train", config, "--storage-option", "secret=s3cr3t-value", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and json.loads(out)["data"]["annotations"]
