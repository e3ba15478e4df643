"""Overlays of a labeling run, for people to look at: `render_run(RUN_OUTPUT, OUT_DIR)` (`simplepose render`).

Reads the run's `images` and `poses` Parquet tables (docs/tables.md), fetches the source objects through
fsspec, decodes them exactly as the job did (`pipelines.images.decode_image`, so EXIF orientation matches the
stored coordinates) and writes one overlay per image: keypoints, COCO skeleton, box and "index: score"
per person (`pipelines.overlay.draw_poses`). Plain Python, no Ray: it is for inspecting a few images, not for
rendering a whole run.
"""
from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
from collections.abc import Mapping

import cv2
import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.images import decode_image
from pipelines.overlay import NO_PERSONS, draw_poses, poses_by_image, read_run_table
from simplepose.decode import POSE_FLOOR

LOG = logging.getLogger(__name__)

FORMATS = ("jpg", "png")
_READ_BATCH = 16


@dataclasses.dataclass(frozen=True)
class RenderSummary:
    """images: overlays written; persons: persons drawn; failed: listed images whose source could not be read
    or decoded now; outputs: URIs of the overlays, in input order."""

    images: int
    persons: int
    failed: int
    outputs: tuple[str, ...]


def render_run(run_output: str, out_dir: str, limit: int | None = 50, min_score: float | None = None,
               image_format: str = "jpg", storage_options: Mapping | None = None,
               min_keypoints: int | None = None) -> RenderSummary:
    """Overlays of the first `limit` images with status ok (input order; None = all) of the run in
    `run_output`, written to `out_dir` (any fsspec URI) as `{input_index:06d}_{image_id}.{image_format}`.
    Persons drawn: those passing the output floor of the poses tables (`simplepose.decode.POSE_FLOOR`, the one
    the labeling job and `simplepose.Predictor` apply), score >= `min_score` and >= `min_keypoints` keypoints
    with a score > 0; None = the floor's value. Images with 0 persons are rendered too (plain copies)."""
    if limit is not None and limit < 0:
        raise ValueError(f"render_run: limit must be >= 0 or None, got {limit}")
    if image_format not in FORMATS:
        raise ValueError(f"render_run: image_format must be one of {FORMATS}, got {image_format!r}")
    floor = POSE_FLOOR
    if min_score is not None:
        floor = dataclasses.replace(floor, min_person_score=float(min_score))
    if min_keypoints is not None:
        floor = dataclasses.replace(floor, min_keypoints=int(min_keypoints))
    selected = _ok_images(run_output, limit, storage_options)
    poses = poses_by_image(run_output, selected["image_id"].to_pylist(), floor.min_person_score, storage_options)
    outputs, persons, failed = [], 0, 0
    rows = selected.to_pylist()
    for start in range(0, len(rows), _READ_BATCH):
        batch = rows[start:start + _READ_BATCH]
        for row, data in zip(batch, storage.read_objects([r["uri"] for r in batch], storage_options)):
            decoded = decode_image(data) if isinstance(data, bytes) else None
            if decoded is None or decoded.status != "ok":
                LOG.warning("cannot render %s: %s", row["uri"], decoded.error if decoded else data)
                failed += 1
                continue
            keypoints, scores, boxes = poses.get(row["image_id"], NO_PERSONS)
            keep = floor.keep(keypoints, scores)
            keypoints, scores, boxes = keypoints[keep], scores[keep], boxes[keep]
            overlay = draw_poses(decoded.image, keypoints, scores, boxes)
            uri = storage.join(out_dir, _output_name(row["input_index"], row["image_id"], image_format))
            storage.write_atomic(uri, _encode(overlay, image_format), storage_options)
            outputs.append(uri)
            persons += len(scores)
    LOG.info("rendered %d images (%d persons, %d failed) to %s", len(outputs), persons, failed, out_dir)
    return RenderSummary(len(outputs), persons, failed, tuple(outputs))


def _ok_images(run_output: str, limit: int | None, storage_options: Mapping | None) -> pa.Table:
    """(input_index, image_id, uri) of the first `limit` images with status ok, by input_index."""
    table = read_run_table(run_output, "images", storage_options, columns=["input_index", "image_id", "uri"],
                           filters=[("status", "=", "ok")])
    table = table.sort_by("input_index")
    return table if limit is None else table.slice(0, limit)


def _output_name(input_index: int, image_id: str, image_format: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.splitext(image_id)[0]).strip("._")[-120:]  # ids: keys, URIs
    return f"{int(input_index):06d}_{stem}.{image_format}"


def _encode(image: np.ndarray, image_format: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if image_format == "jpg" else []
    ok, encoded = cv2.imencode(f".{image_format}", image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} overlay as {image_format}")
    return encoded.tobytes()
