"""MLflow model registry: register trained checkpoints, resolve `models:/` URIs, promote by COCO AP.

A model version is a plain artifact folder holding our checkpoint file (`imhn.pt`, the
`simplepose-imhn/1` format: config + state_dict, loadable with `torch.load(weights_only=True)`), registered
with `create_model_version(source=...)`. This is preferred over an `mlflow.pytorch` model because a pickled
module needs `weights_only=False` (arbitrary code on load) and breaks when classes move, and the `pt2` flavour
fixes input shapes at export; a state_dict loads in well under a second and stays loadable by
`simplepose.load_model` with no MLflow installed.

Aliases: `candidate` = the latest trained version; `champion` = the one the labeling job uses. The COCO
stats of a version on a named evaluation set are tags `coco.<set>.<stat>`. `describe_model` names the model a
job will load (a models:/ alias pinned to its version, or a checkpoint's name and version).

MLflow is imported inside the functions that use it (see `pipelines.tracking`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines import errors, storage, tracking

LOG = logging.getLogger(__name__)

MODEL_FILE = "imhn.pt"
MODEL_ARTIFACT_PATH = "model"
CANDIDATE, CHAMPION = "candidate", "champion"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name/3` -> ("name", "3", None); `models:/name@champion` -> ("name", None, "champion")."""
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"parse_model_uri: {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


def get_version(mlflow_client, uri: str):
    """The `ModelVersion` a models:/ URI names (an alias is resolved now)."""
    name, version, alias = parse_model_uri(uri)
    if alias is not None:
        return mlflow_client.get_model_version_by_alias(name, alias)
    return mlflow_client.get_model_version(name, version)


def resolve_model_uri(uri: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """Local path of our checkpoint file for `models:/name@alias` or `models:/name/version`, downloaded from
    the registry into `cache_dir` (default: a per-version folder under the temp dir, reused across calls);
    any other URI (path, s3://, file://) is returned unchanged."""
    if not uri.startswith("models:/"):
        return uri
    mlflow_client = tracking.client(tracking_uri)
    version = get_version(mlflow_client, uri)
    root = Path(cache_dir or Path(tempfile.gettempdir()) / "simplepose-models")
    target = root / version.name / str(version.version)
    path = target / MODEL_FILE
    if not path.exists():
        from mlflow.artifacts import download_artifacts  # on use: MLflow is slow to import (pipelines.tracking)

        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as scratch:  # atomic: a crash leaves no partial file
            downloaded = Path(download_artifacts(artifact_uri=version.source, dst_path=scratch,
                                                 tracking_uri=mlflow_client.tracking_uri))
            source = downloaded / MODEL_FILE if downloaded.is_dir() else downloaded
            if not source.exists():
                raise ValueError(f"resolve_model_uri: {uri} (version {version.version}, source {version.source}) "
                                 f"holds no {MODEL_FILE}")
            source.replace(path)
    LOG.info("%s -> version %s -> %s", uri, version.version, path)
    return str(path)


METADATA_BLOCK_BYTES = 1 << 20
"""Block size of `describe_model`'s metadata read: a few small ranges of the file, which s3fs's default
50 MiB readahead would turn into 150 MiB of transfer for the released model (3 MiB with this)."""

HASH_CHUNK_BYTES = 32 << 20
"""Bytes per read (one ranged request on an object store, no readahead) when `describe_model` hashes a
checkpoint: the file never sits in memory whole, and the released model takes 16 requests."""


def describe_model(model: str, storage_options: Mapping[str, object] | None = None,
                   tracking_uri: str | None = None) -> tuple[str, str, str]:
    """(URI the job loads, model name, model version) of a model reference.

    models:/NAME@ALIAS (or models:/NAME/VERSION) is pinned to the version the alias points at now, in the
    registry at `tracking_uri` (default $MLFLOW_TRACKING_URI, else the local store), so a promotion during a
    run does not mix models; the checkpoint itself is not read. A checkpoint URI: name and version from its
    metadata ("name", "version") when present, else the file's stem and the first 12 hex digits of the
    SHA-256 of its bytes. Only the checkpoint's metadata is read (`read_checkpoint_metadata`: the format,
    keys and shapes are checked, no weight is loaded) and the hash, when one is needed, reads the file in
    chunks of `HASH_CHUNK_BYTES`. Store errors and unusable files raise a JobError naming MODEL and the URI.
    """
    if model.startswith("models:/"):
        version = get_version(tracking.client(tracking_uri), model)
        return f"models:/{version.name}/{version.version}", version.name, str(version.version)
    # Imported on use: torch takes over a second to import, and registry lookups and promotion never need it.
    from simplepose.checkpoint import read_checkpoint_metadata

    with errors.about("MODEL", model, storage_options):  # store errors and bad files name the model URI
        fs, path = storage.filesystem(model, storage_options)
        with fs.open(path, "rb", block_size=METADATA_BLOCK_BYTES) as f:
            _, metadata = read_checkpoint_metadata(f)
        version = metadata.get("version")
        if not version:
            digest = hashlib.sha256()
            with fs.open(path, "rb", cache_type="none") as f:
                while chunk := f.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
            version = digest.hexdigest()[:12]
    name = metadata.get("name") or posixpath.splitext(posixpath.basename(model.rstrip("/")))[0]
    return model, str(name), str(version)


def register_checkpoint(mlflow_client, name: str, run_id: str, alias: str | None = CANDIDATE,
                        tags: dict[str, str] | None = None) -> str:
    """Register the run's `model/` artifact folder (holding `imhn.pt`) as a new version of `name`, point
    `alias` at it, and return the version number."""
    from mlflow.exceptions import MlflowException  # on use: MLflow is slow to import (pipelines.tracking)

    try:
        mlflow_client.create_registered_model(name, description="Simple Pose IMHN checkpoints (simplepose-imhn/1)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = mlflow_client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    if alias:
        mlflow_client.set_registered_model_alias(name, alias, version.version)
    LOG.info("registered %s version %s (alias %s) from %s", name, version.version, alias, source)
    return str(version.version)


def record_evaluation(mlflow_client, name: str, version: str, set_name: str, stats: dict[str, float],
                      run_id: str | None = None) -> None:
    """Store COCO stats on a model version as tags `coco.<set>.<stat>` (plus the evaluation run id)."""
    for key, value in stats.items():
        mlflow_client.set_model_version_tag(name, version, f"coco.{set_name}.{key}", f"{value:.6f}")
    if run_id:
        mlflow_client.set_model_version_tag(name, version, f"coco.{set_name}.run_id", run_id)


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of one promotion: both versions and their metric values (None when not evaluated)."""
    model: str
    set_name: str
    metric: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str


def _metric(version, set_name: str, metric: str) -> float | None:
    value = version.tags.get(f"coco.{set_name}.{metric}")
    return None if value is None else float(value)


def promote(mlflow_client, name: str, set_name: str, metric: str = "AP",
            candidate_alias: str = CANDIDATE, champion_alias: str = CHAMPION) -> PromotionDecision:
    """Move `champion_alias` to the `candidate_alias` version when its `metric` on `set_name` is strictly
    higher than the current champion's (or there is no champion yet). The decision, with both numbers, is
    recorded as tag `promotion.<set>` on the candidate version either way."""
    from mlflow.exceptions import MlflowException  # on use: MLflow is slow to import (pipelines.tracking)

    candidate = mlflow_client.get_model_version_by_alias(name, candidate_alias)
    candidate_value = _metric(candidate, set_name, metric)
    if candidate_value is None:
        raise ValueError(f"promote: {name} version {candidate.version} ({candidate_alias}) has no "
                         f"coco.{set_name}.{metric}; run `simplepose evaluate models:/{name}@{candidate_alias} "
                         f"... --set-name {set_name}` first")
    try:
        champion = mlflow_client.get_model_version_by_alias(name, champion_alias)
    except MlflowException:
        champion = None
    champion_value = None if champion is None else _metric(champion, set_name, metric)
    if champion is None:
        promoted, reason = True, f"no {champion_alias} yet"
    elif champion.version == candidate.version:
        promoted, reason = False, f"version {candidate.version} already is {champion_alias}"
    elif champion_value is None:
        raise ValueError(f"promote: {champion_alias} version {champion.version} has no coco.{set_name}.{metric}; "
                         f"evaluate it on the same set before comparing")
    else:
        promoted = candidate_value > champion_value
        reason = (f"{metric} {candidate_value:.4f} {'>' if promoted else '<='} {champion_alias} "
                  f"{champion_value:.4f}")
    decision = PromotionDecision(name, set_name, metric, str(candidate.version), candidate_value,
                                 None if champion is None else str(champion.version), champion_value,
                                 promoted, reason)
    if promoted:
        mlflow_client.set_registered_model_alias(name, champion_alias, candidate.version)
    record = {**asdict(decision), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    mlflow_client.set_model_version_tag(name, candidate.version, f"promotion.{set_name}", json.dumps(record))
    LOG.info("promotion of %s version %s: %s (%s)", name, candidate.version, promoted, reason)
    return decision
