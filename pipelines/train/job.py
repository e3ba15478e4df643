"""The training job's driver: MLflow run, Ray Train `TorchTrainer`, registration, evaluation, promotion.

One Ray run name = one MLflow run: re-running a name resumes both (the Ray run from its latest checkpoint, the
MLflow run found by tag `simplepose.run_name`), so step metrics continue on the same curves.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pipelines import registry, tracking
from pipelines.train.loop import STATE_FILE, TrainResult, train_loop
from pipelines.train.config import TrainConfig

LOG = logging.getLogger(__name__)


def absolute_uri(path: str) -> str:
    """URIs (s3://, file://, models:/) as they are; local paths made absolute, since Ray workers run in
    another working directory."""
    return path if "://" in path or path.startswith("models:/") else str(Path(path).resolve())


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """`config` with its local data, storage and init paths made absolute (`absolute_uri`)."""
    data = dataclasses.replace(config.data, annotations=absolute_uri(config.data.annotations),
                               images=absolute_uri(config.data.images))
    init = config.checkpoint.init_from
    checkpoint = dataclasses.replace(config.checkpoint, storage_path=absolute_uri(config.checkpoint.storage_path),
                                     init_from=init and absolute_uri(init))
    return dataclasses.replace(config, data=data, checkpoint=checkpoint)


def _flat(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else key, item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def start_tracking(config: TrainConfig):
    """(client, tracking_uri, run_id, resumed): the MLflow run of `config.checkpoint.run_name`; a new run gets
    the flattened config as params, the config as an artifact and data/code version tags."""
    from mlflow.entities import Param

    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, config.tracking.experiment,
                                               config.tracking.artifact_location)
    tags = {"simplepose.kind": "training", "code_version": tracking.code_version(),
            "data.annotations": config.data.annotations, "data.images": config.data.images,
            "data.annotations_version": tracking.data_version(config.data.annotations),
            "ray.storage_path": config.checkpoint.storage_path}
    run_id, resumed = tracking.find_or_create_run(client, experiment_id, config.checkpoint.run_name, tags)
    if not resumed:
        params = _flat("", config.to_dict())
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            client.log_batch(run_id, params=items[start:start + 100])
        client.log_dict(run_id, config.to_dict(), "config/train_config.json")
    else:
        client.log_dict(run_id, config.to_dict(), "config/train_config_resumed.json")
    return client, uri, run_id, resumed


def run_training(config: TrainConfig) -> TrainResult:
    """Train (or resume) `config` on the connected Ray cluster; see the module docstring."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = with_absolute_paths(config)
    client, uri, run_id, resumed = start_tracking(config)
    LOG.info("MLflow run %s (%s) for Ray run %r", run_id, "resumed" if resumed else "new",
             config.checkpoint.run_name)
    scaling = config.scaling
    resources = {}
    if scaling.cpus_per_worker is not None:
        resources["CPU"] = scaling.cpus_per_worker
    if scaling.use_gpu and scaling.gpus_per_worker is not None:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources or None),
        run_config=RunConfig(name=config.checkpoint.run_name, storage_path=config.checkpoint.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
                             failure_config=FailureConfig(max_failures=config.checkpoint.max_failures)))
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run_training: Ray run {config.checkpoint.run_name!r} produced no checkpoint")
    checkpoint_uri = result.checkpoint.path
    with result.checkpoint.as_directory() as folder:
        client.log_artifact(run_id, str(Path(folder) / registry.MODEL_FILE), registry.MODEL_ARTIFACT_PATH)
        client.log_artifact(run_id, str(Path(folder) / STATE_FILE), "checkpoint")
    client.set_tag(run_id, "ray.checkpoint", checkpoint_uri)
    version = None
    if config.tracking.register:
        version = registry.register_checkpoint(client, config.tracking.registered_model, run_id, registry.CANDIDATE,
                                               tags={"run_name": config.checkpoint.run_name,
                                                     "code_version": tracking.code_version()})
    client.set_terminated(run_id, status="FINISHED")
    outcome = TrainResult(run_id, version, checkpoint_uri, dict(result.metrics or {}))
    return evaluate_and_promote(config, outcome, client, uri) if config.evaluation else outcome


def evaluate_and_promote(config: TrainConfig, outcome: TrainResult, client, uri: str) -> TrainResult:
    """The retraining chain after training: evaluate the registered version `outcome.model_version` on
    `config.evaluation`'s set, then (with `config.promote`) promote it; returns `outcome` with both results."""
    from pipelines.evaluate import EvalTracking, infer_config_for, run_evaluation

    if outcome.model_version is None:
        raise ValueError("TrainConfig.evaluation needs tracking.register: the chain evaluates the registered version")
    spec = config.evaluation
    infer_config = infer_config_for(spec.preset, spec.scales, spec.flip)
    model_uri = f"models:/{config.tracking.registered_model}/{outcome.model_version}"
    track = EvalTracking(tracking_uri=uri, experiment=config.tracking.experiment,
                         artifact_location=config.tracking.artifact_location, set_name=spec.set_name,
                         tags={"training_run_id": outcome.run_id})
    evaluation = run_evaluation(model_uri, spec.annotations, spec.images, infer_config,
                                max_images=spec.max_images, track=track)
    promotion = None
    if config.promote:
        promotion = registry.promote(client, config.tracking.registered_model, spec.set_name)
    return dataclasses.replace(outcome, evaluation=evaluation, promotion=promotion)
