"""The training job's driver: MLflow run, Ray Train `TorchTrainer`, registration, evaluation, promotion.

`run_training(config, storage_options)`:
1. `start_tracking`: opens (or, for a known run name, resumes) the MLflow run and logs the config;
2. `make_trainer` + `fit`: the workers run `pipelines.train.loop.train_loop` and checkpoint every epoch to
   `checkpoint.storage_path`;
3. `finish_run`: logs the last checkpoint to the run, registers it as a model version with alias `candidate`;
4. `evaluate_and_promote`, with an `evaluation` section: the retraining chain.

One Ray run name = one MLflow run: re-running a name resumes both (the Ray run from its latest checkpoint, the
MLflow run found by tag `simplepose.run_name`), so step metrics continue on the same curves.

`storage_options` (fsspec options: endpoint_url, key, secret, ...) reach every read and write of the data, the init
weights and the checkpoints, and are never logged or printed: they travel beside the config, which is logged.
Ray Train writes the checkpoints through a pyarrow filesystem made from them (`pipelines.storage.arrow_filesystem`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from pipelines import registry, storage, tracking
from pipelines.evaluate import EvalTracking, infer_config_for, run_evaluation
from pipelines.train.config import TrainConfig
from pipelines.train.loop import STATE_FILE, STORAGE_OPTIONS, TrainResult, train_loop

LOG = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch request
MAX_PARAM_LENGTH = 6000  # MLflow's limit of a param value's length


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


def flat_params(value, prefix: str = "") -> dict[str, str]:
    """A nested config dict as MLflow params: dotted keys, lists as JSON, everything else as str."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flat_params(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def start_tracking(config: TrainConfig, storage_options: Mapping[str, object] | None = None):
    """(client, tracking_uri, run_id, resumed): the MLflow run of `config.checkpoint.run_name`; a new run gets
    the flattened config as params, the config as an artifact and data/code version tags. `storage_options`
    only read the annotation file's version; they are not logged."""
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, config.tracking.experiment,
                                               config.tracking.artifact_location)
    tags = {"simplepose.kind": "training", "code_version": tracking.code_version(),
            "data.annotations": config.data.annotations, "data.images": config.data.images,
            "data.annotations_version": tracking.data_version(config.data.annotations, storage_options),
            "ray.storage_path": config.checkpoint.storage_path}
    run_id, resumed = tracking.find_or_create_run(client, experiment_id, config.checkpoint.run_name, tags)
    if resumed:
        client.log_dict(run_id, config.to_dict(), "config/train_config_resumed.json")
        return client, uri, run_id, resumed
    log_params(client, run_id, flat_params(config.to_dict()))
    client.log_dict(run_id, config.to_dict(), "config/train_config.json")
    return client, uri, run_id, resumed


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """`params` on the MLflow run, in as few requests as MLflow allows (values cut to its maximum length)."""
    # MLflow is imported on use (pipelines.tracking's docstring), and only after `tracking.client` has imported
    # mlflow itself: importing mlflow.entities first while another thread is importing mlflow breaks MLflow's
    # import (seen in tests/test_train_faults.py, whose fault injector polls MLflow from a thread).
    from mlflow.entities import Param

    items = [Param(key, value[:MAX_PARAM_LENGTH]) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def make_trainer(config: TrainConfig, run_id: str, tracking_uri: str,
                 storage_options: Mapping[str, object] | None = None):
    """The `TorchTrainer` of `config`: its workers run `train_loop`; checkpoints go to
    `checkpoint.storage_path/<run_name>` through `storage_options`."""
    # Ray is imported here, not at the top: `simplepose train` imports this module before
    # `pipelines.ray_cluster.connect_ray` has applied Ray's environment settings, which Ray reads when imported.
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    resources = {}
    if scaling.cpus_per_worker is not None:
        resources["CPU"] = scaling.cpus_per_worker
    if scaling.use_gpu and scaling.gpus_per_worker is not None:
        resources["GPU"] = scaling.gpus_per_worker
    filesystem, path = storage.arrow_filesystem(config.checkpoint.storage_path, storage_options)
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri,
                           STORAGE_OPTIONS: dict(storage_options or {})},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources or None),
        run_config=RunConfig(name=config.checkpoint.run_name, storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
                             failure_config=FailureConfig(max_failures=config.checkpoint.max_failures)))


def run_training(config: TrainConfig, storage_options: Mapping[str, object] | None = None) -> TrainResult:
    """Train (or resume) `config` on the connected Ray cluster; see the module docstring."""
    config = with_absolute_paths(config)
    client, uri, run_id, resumed = start_tracking(config, storage_options)
    LOG.info("MLflow run %s (%s) for Ray run %r", run_id, "resumed" if resumed else "new",
             config.checkpoint.run_name)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = make_trainer(config, run_id, uri, storage_options).fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    finally:  # Ray Train's fit leaves its handler (abort this run's controller) installed: Ctrl-C after it is ours
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    outcome = finish_run(config, client, run_id, result)
    return evaluate_and_promote(config, outcome, client, uri, storage_options) if config.evaluation else outcome


def finish_run(config: TrainConfig, client, run_id: str, result) -> TrainResult:
    """After `fit`: the last checkpoint's model and state as artifacts of the MLflow run, its location as tag
    `ray.checkpoint`, the model registered as a version with alias `candidate` (`tracking.register`), the run
    FINISHED."""
    if result.checkpoint is None:
        raise RuntimeError(f"run_training: Ray run {config.checkpoint.run_name!r} produced no checkpoint")
    checkpoint_uri = result.checkpoint.path
    with result.checkpoint.as_directory() as folder:  # downloaded through the checkpoint's own filesystem
        client.log_artifact(run_id, str(Path(folder) / registry.MODEL_FILE), registry.MODEL_ARTIFACT_PATH)
        client.log_artifact(run_id, str(Path(folder) / STATE_FILE), "checkpoint")
    client.set_tag(run_id, "ray.checkpoint", checkpoint_uri)
    version = None
    if config.tracking.register:
        version = registry.register_checkpoint(client, config.tracking.registered_model, run_id, registry.CANDIDATE,
                                               tags={"run_name": config.checkpoint.run_name,
                                                     "code_version": tracking.code_version()})
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(run_id, version, checkpoint_uri, dict(result.metrics or {}))


def evaluate_and_promote(config: TrainConfig, outcome: TrainResult, client, uri: str,
                         storage_options: Mapping[str, object] | None = None) -> TrainResult:
    """The retraining chain after training: evaluate the registered version `outcome.model_version` on
    `config.evaluation`'s set, then (with `config.promote`) promote it; returns `outcome` with both results."""
    if outcome.model_version is None:
        raise ValueError("TrainConfig.evaluation needs tracking.register: the chain evaluates the registered version")
    spec = config.evaluation
    infer_config = infer_config_for(spec.preset, spec.scales, spec.flip)
    model_uri = f"models:/{config.tracking.registered_model}/{outcome.model_version}"
    track = EvalTracking(tracking_uri=uri, experiment=config.tracking.experiment,
                         artifact_location=config.tracking.artifact_location, set_name=spec.set_name,
                         tags={"training_run_id": outcome.run_id})
    evaluation = run_evaluation(model_uri, spec.annotations, spec.images, infer_config,
                                max_images=spec.max_images, track=track, storage_options=storage_options)
    promotion = None
    if config.promote:
        promotion = registry.promote(client, config.tracking.registered_model, spec.set_name)
    return dataclasses.replace(outcome, evaluation=evaluation, promotion=promotion)
