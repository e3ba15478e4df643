"""MLflow plumbing shared by training, evaluation and promotion.

Local default: a SQLite tracking store (which also holds the model registry) and a file or S3 artifact store;
production: an MLflow server URI. Experiments are always created with an explicit artifact location so
nothing lands in ./mlruns by accident (without one, MLflow puts them under the CWD).

MLflow is imported where it is first used, never at the top of a `pipelines` module: it takes about 2 s to
import, the labeling job imports `pipelines.registry` (for `describe_model`) but needs MLflow only for a
models:/ URI, and `MLFLOW_DISABLE_TELEMETRY` must be set before MLflow is imported (`client`).
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import simplepose
from pipelines import storage

LOG = logging.getLogger(__name__)

RUN_NAME_TAG = "simplepose.run_name"

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
"""The tracking (and registry) store when neither an argument nor $MLFLOW_TRACKING_URI names one."""

DEFAULT_ARTIFACT_LOCATION = "mlruns/artifacts"
"""The artifact location of experiments created without one (a folder, made a file:// URI)."""


def _quiet_mlflow() -> None:
    # Telemetry is on by default in MLflow 3 and writes to ~/.config.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///path` absolute (creating its folder), so that Ray workers started in other
    working directories reach the same database; other URIs (http://, databricks, absolute) are unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def resolve_artifact_location(location: str) -> str:
    """A plain relative or absolute folder becomes a file:// URI; s3://, file://, mlflow-artifacts: stay."""
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    return Path(location).resolve().as_uri()


def client(tracking_uri: str | None = None):
    """An `MlflowClient` for `tracking_uri` (default: $MLFLOW_TRACKING_URI, then the project default);
    the registry lives in the same store."""
    _quiet_mlflow()
    from mlflow import MlflowClient  # after _quiet_mlflow, and only when needed (module docstring)

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(mlflow_client, name: str, artifact_location: str) -> str:
    """Id of experiment `name`, created with `artifact_location` when it does not exist yet."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=resolve_artifact_location(artifact_location))


def find_or_create_run(mlflow_client, experiment_id: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """The MLflow run that tracks Ray Train run `run_name`: the existing one when the Ray run is resumed,
    else a new one. Returns (run_id, resumed)."""
    existing = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id, False


def code_version() -> str:
    """The git commit of the code (with "-dirty" when modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"simplepose-{simplepose.__version__}"


def data_version(uri: str, storage_options: Mapping[str, object] | None = None) -> str:
    """An identity for a data object: its ETag / checksum on object stores, else size and mtime.
    storage_options: fsspec options of `uri` (`pipelines.storage.filesystem`)."""
    try:
        fs, path = storage.filesystem(uri, storage_options)
        info = fs.info(path)
    except (OSError, ValueError) as error:
        LOG.warning("no version for %s: %s", uri, error)
        return "unknown"
    for key in ("ETag", "etag", "checksum"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"size={info.get('size')},mtime={info.get('mtime') or info.get('LastModified')}"


class MetricLogger:
    """Buffers metrics of one MLflow run and sends them in batches (one request per `flush`)."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self._pending = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # imported on use (module docstring); loaded with the client anyway

        now = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []
