"""COCO keypoint evaluation of a model: inference + decoding over a COCO set, results JSON, COCOeval, MLflow.

The per-image work is the library's (`simplepose.infer.predict_heatmaps`, `simplepose.decode.decode`,
`coco_results`), the same stages the labeling job distributes; here they run in one process on one device,
which is what a 500-5000 image evaluation set needs. Images are fetched in concurrent batches with retries
(`pipelines.storage.read_objects`). Every URI is read and written through `pipelines.storage` with the
caller's `storage_options`, which are never logged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines import registry, storage, tracking
from pipelines.images import decode_image
from simplepose.checkpoint import load_model
from simplepose.coco import evaluate_keypoints
from simplepose.decode import DecoderConfig, assemble, coco_results, find_candidates_batch
from simplepose.infer import PAPER, PRESETS, InferConfig, predict_heatmaps, prepare_model

LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvalTracking:
    """Where evaluation runs are logged; `set_name` names the evaluation set in tags and model versions."""
    tracking_uri: str = tracking.DEFAULT_TRACKING_URI
    experiment: str = "simplepose-eval"
    artifact_location: str = tracking.DEFAULT_ARTIFACT_LOCATION
    set_name: str | None = None  # default: the annotation file's name without extension
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """stats: the 10 COCO stats (`simplepose.coco.STAT_NAMES`: floats in [0, 1], -1 where undefined);
    results_uri: the COCO results JSON."""
    stats: dict[str, float]
    results_uri: str
    num_images: int
    num_detections: int
    seconds: float
    run_id: str | None = None


@dataclass(frozen=True)
class EvaluateJobConfig:
    """One evaluation (`simplepose evaluate`). model: checkpoint URI or models:/NAME@ALIAS / models:/NAME/N;
    annotations: COCO keypoint JSON; images: prefix, image i is IMAGES/<file_name> (any URIs).
    infer, decoder: the library's configs; the default is the paper's setting (`simplepose.infer.PAPER`: five
    scales, flip, reference aggregation), `--preset` starts from another. max_images: the first N images of
    the file. batch_size: images per network batch. device: "cuda", "cuda:1", "cpu" (None: cuda when
    available). results: also write the COCO results JSON here. tracking: the MLflow run (None: not logged)."""
    model: str
    annotations: str
    images: str
    infer: InferConfig = PAPER
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    max_images: int | None = None
    batch_size: int = 4
    device: str | None = None
    results: str | None = None
    tracking: EvalTracking | None = field(default_factory=EvalTracking)

    def __post_init__(self):
        if self.batch_size < 1 or (self.max_images is not None and self.max_images < 1):
            raise ValueError(f"EvaluateJobConfig: batch_size and max_images must be >= 1, got {self.batch_size}, "
                             f"{self.max_images}")
        if self.decoder.is_reference and self.infer.aggregation != "reference":
            raise ValueError("EvaluateJobConfig: decoder.mode reference needs infer.aggregation=reference (its "
                             "decoder reads maps at the original resolution)")


def infer_config_for(preset: str, scales: tuple[float, ...] | None = None, flip: bool | None = None,
                     boxsize: int | None = None) -> InferConfig:
    """The named inference preset (`simplepose.infer.PRESETS`) with the given fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"infer_config_for: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    changes = {key: value for key, value in (("scales", scales and tuple(scales)), ("flip", flip),
                                             ("boxsize", boxsize)) if value is not None}
    return dataclasses.replace(PRESETS[preset], **changes)


def load_annotations(uri: str, storage_options: Mapping[str, object] | None = None) -> dict:
    """A COCO annotation dict read from any fsspec URI."""
    with storage.open_binary(uri, storage_options) as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"load_annotations: {uri} is not a COCO annotation file (needs 'images' and "
                         f"'annotations')")
    return data


def _read_images(uris: list[str], storage_options: Mapping[str, object] | None) -> list[np.ndarray | None]:
    """Fetch a batch of objects concurrently (with retries) and decode them as the labeling job does
    (`pipelines.images.decode_image`); None for an unreadable or undecodable one."""
    images = []
    for uri, blob in zip(uris, storage.read_objects(uris, storage_options)):
        decoded = decode_image(blob) if isinstance(blob, bytes) else None
        if decoded is None or decoded.image is None:
            reason = decoded.error if decoded is not None else f"read failed: {blob!r}"
            LOG.warning("evaluation image %s scored as no detection: %s", uri, reason)
        images.append(None if decoded is None else decoded.image)
    return images


def predict_coco(model: torch.nn.Module, gt: dict, images_uri: str, infer_config: InferConfig,
                 decoder_config: DecoderConfig, image_ids: list[int], batch_size: int = 4,
                 dtype: torch.dtype | None = None, storage_options: Mapping[str, object] | None = None
                 ) -> list[dict]:
    """COCO keypoint results (list of {image_id, category_id, keypoints, score}) of `model` on `image_ids`;
    image i is `images_uri/<file_name>`; an unreadable image contributes no detection (and a warning)."""
    by_id = {image["id"]: image for image in gt["images"]}
    results: list[dict] = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        images = _read_images([storage.join(images_uri, by_id[i]["file_name"]) for i in ids], storage_options)
        readable = [(i, image) for i, image in zip(ids, images) if image is not None]
        heatmaps = predict_heatmaps(model, [image for _, image in readable], infer_config, dtype=dtype)
        candidates = find_candidates_batch(heatmaps, decoder_config)  # one set of tensor ops per batch
        for (image_id, _), image_candidates in zip(readable, candidates):
            results += coco_results(assemble(image_candidates, decoder_config), image_id)
        LOG.debug("evaluated %d/%d images", min(start + batch_size, len(image_ids)), len(image_ids))
    return results


def run_evaluation(model_uri: str, annotations: str, images: str, infer_config: InferConfig,
                   decoder_config: DecoderConfig = DecoderConfig(), results_uri: str | None = None,
                   max_images: int | None = None, batch_size: int = 4, device: str | None = None,
                   dtype: torch.dtype | None = None, track: EvalTracking | None = None,
                   storage_options: Mapping[str, object] | None = None) -> EvalResult:
    """Evaluate `model_uri` (path, s3://, models:/name@alias, models:/name/N) on a COCO set.

    Images: the first `max_images` ids of the annotation file (all by default, in file order as the authors'
    validation does). Writes the results JSON to `results_uri` (default: next to nothing, only logged), runs
    pycocotools COCOeval, and, with `track`, logs params, the 10 stats (`coco_<stat>`) and the results file
    to an MLflow run; for a registry URI the stats are also stored on the model version (`coco.<set>.*`).
    storage_options: fsspec options (endpoint_url, key, secret, profile...) of every read and write of the
    model, annotation, image and results URIs; never logged to MLflow nor printed (a registry model is
    downloaded by MLflow, with its own artifact-store settings).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"run_evaluation: max_images must be >= 1, got {max_images}")
    started = time.perf_counter()
    gt = load_annotations(annotations, storage_options)
    image_ids = [image["id"] for image in gt["images"]][:max_images]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_file = registry.resolve_model_uri(model_uri, tracking_uri=track and track.tracking_uri)
    with storage.open_binary(model_file, storage_options) as handle:
        model = prepare_model(load_model(handle), device)
    results = predict_coco(model, gt, images, infer_config, decoder_config, image_ids, batch_size, dtype,
                           storage_options)
    stats = evaluate_keypoints(gt, results, image_ids=image_ids)
    payload = json.dumps(results)
    if results_uri:
        storage.write_atomic(results_uri, payload.encode("utf-8"), storage_options)
    result = EvalResult(stats, results_uri or "", len(image_ids), len(results), time.perf_counter() - started)
    if track is not None:
        result = log_evaluation(result, payload, model_uri, annotations, images, infer_config, decoder_config,
                                track, storage_options)
    LOG.info("evaluated %s on %d images in %.1f s: AP %.4f", model_uri, len(image_ids), result.seconds,
             stats["AP"])
    return result


def log_evaluation(result: EvalResult, payload: str, model_uri: str, annotations: str, images: str,
                   infer_config: InferConfig, decoder_config: DecoderConfig, track: EvalTracking,
                   storage_options: Mapping[str, object] | None = None) -> EvalResult:
    """Log one evaluation to a new MLflow run (params, `coco_<stat>` metrics, the results JSON `payload` as
    `results/<set>_results.json`); for a models:/ URI also tag the model version. Returns it with run_id.
    storage_options: only to read the annotation file's version (`tracking.data_version`); not logged."""
    client = tracking.client(track.tracking_uri)
    experiment_id = tracking.ensure_experiment(client, track.experiment, track.artifact_location)
    set_name = track.set_name or annotations.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    run = client.create_run(experiment_id, run_name=f"eval-{set_name}", tags={
        "simplepose.kind": "evaluation", "simplepose.set_name": set_name, "model_uri": model_uri,
        "code_version": tracking.code_version(), "data.annotations": annotations,
        "data.annotations_version": tracking.data_version(annotations, storage_options), **track.tags})
    run_id = run.info.run_id
    client.log_batch(run_id, params=_params({
        "model_uri": model_uri, "annotations": annotations, "images": images, "num_images": result.num_images,
        "boxsize": infer_config.boxsize, "scales": list(infer_config.scales), "flip": infer_config.flip,
        "aggregation": infer_config.aggregation, "decoder_mode": decoder_config.mode}))
    metrics = {f"coco_{key}": value for key, value in result.stats.items()}
    metrics.update(num_detections=result.num_detections, seconds=result.seconds)
    logger = tracking.MetricLogger(client, run_id)
    logger.log(metrics, step=0)
    logger.flush()
    client.log_text(run_id, payload, f"results/{set_name}_results.json")
    client.set_terminated(run_id)
    if model_uri.startswith("models:/"):
        version = registry.get_version(client, model_uri)
        registry.record_evaluation(client, version.name, str(version.version), set_name, result.stats, run_id)
    return EvalResult(result.stats, result.results_uri, result.num_images, result.num_detections,
                      result.seconds, run_id)


def _params(values: dict) -> list:
    # Imported here, as everywhere in pipelines (see pipelines.tracking): MLflow takes about 2 s to import and
    # an evaluation without tracking (`--no-mlflow`) never needs it.
    from mlflow.entities import Param

    return [Param(key, json.dumps(value) if isinstance(value, list) else str(value)) for key, value in values.items()]
