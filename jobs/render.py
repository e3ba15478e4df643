"""`simplepose render RUN_OUTPUT OUT_DIR`: draw a labeling run's poses onto its images, for people to look at.

Reads the run's `images` and `poses` Parquet tables (docs/tables.md), fetches the source objects through
fsspec, decodes them exactly as the job did (`pipelines.images.decode_image`, so EXIF orientation matches the
stored coordinates) and writes one overlay per image: keypoints, COCO skeleton, box and "index: score"
per person. Plain Python, no Ray: it is for inspecting a few images, not for rendering a whole run.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import posixpath
import re
from collections.abc import Mapping

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.images import decode_image
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

LOG = logging.getLogger(__name__)

PALETTE = ((0, 215, 255), (255, 128, 0), (80, 200, 60), (200, 60, 220), (60, 60, 255),
           (255, 255, 0), (0, 128, 255), (180, 180, 180))
"""BGR colours of persons 0, 1, 2, ... (cycled)."""

FORMATS = ("jpg", "png")
_SHIFT = 4  # OpenCV fixed-point drawing: coordinates * 16, so keypoints are drawn with sub-pixel accuracy
_READ_BATCH = 16


@dataclasses.dataclass(frozen=True)
class RenderSummary:
    """images: overlays written; persons: persons drawn; failed: listed images whose source could not be read
    or decoded now; outputs: URIs of the overlays, in input order."""

    images: int
    persons: int
    failed: int
    outputs: tuple[str, ...]


def draw_poses(image: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """A copy of `image` (uint8 (H, W, 3) BGR) with P persons drawn on it.

    keypoints: (P, 17, 3) COCO order, (x, y, score) in pixels, pixel centres at integer coordinates; a keypoint
    is drawn when its score > 0 and x, y are finite. scores: (P,) person scores. boxes: (P, 4) x, y, w, h.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_poses: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    keypoints = np.asarray(keypoints, np.float64).reshape(-1, len(COCO_KEYPOINTS), 3)
    people = len(keypoints)
    scores, boxes = np.asarray(scores, np.float64).reshape(people), np.asarray(boxes, np.float64).reshape(people, 4)
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 320))
    found = (keypoints[..., 2] > 0) & np.isfinite(keypoints[..., :2]).all(axis=-1)
    fixed = np.round(np.nan_to_num(keypoints[..., :2]) * (1 << _SHIFT)).astype(np.int64)
    for p in range(people):
        colour = PALETTE[p % len(PALETTE)]
        x, y, w, h = np.round(boxes[p] * (1 << _SHIFT)).astype(np.int64)
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + w), int(y + h)), colour, thickness, cv2.LINE_AA, _SHIFT)
        for a, b in COCO_SKELETON:
            if found[p, a] and found[p, b]:
                cv2.line(canvas, _point(fixed[p, a]), _point(fixed[p, b]), colour, thickness + 1, cv2.LINE_AA, _SHIFT)
        for k in np.flatnonzero(found[p]):
            cv2.circle(canvas, _point(fixed[p, k]), (thickness + 2) << _SHIFT, (255, 255, 255), -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(canvas, _point(fixed[p, k]), (thickness + 1) << _SHIFT, colour, -1, cv2.LINE_AA, _SHIFT)
        label_at = (int(max(boxes[p, 0], 0)), int(max(boxes[p, 1] - 4 * thickness, 12 * thickness)))
        cv2.putText(canvas, f"{p}: {scores[p]:.2f}", label_at, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, colour,
                    thickness, cv2.LINE_AA)
    return canvas


def _point(xy: np.ndarray) -> tuple[int, int]:
    return int(xy[0]), int(xy[1])


def render_run(run_output: str, out_dir: str, limit: int | None = 50, min_score: float = 0.0,
               image_format: str = "jpg", storage_options: Mapping | None = None) -> RenderSummary:
    """Overlays of the first `limit` images with status ok (input order; None = all) of the run in
    `run_output`, persons with score >= `min_score`, written to `out_dir` (any fsspec URI) as
    `{input_index:06d}_{image_id}.{image_format}`. Images with 0 persons are rendered too (plain copies)."""
    if limit is not None and limit < 0:
        raise ValueError(f"render_run: limit must be >= 0 or None, got {limit}")
    if image_format not in FORMATS:
        raise ValueError(f"render_run: image_format must be one of {FORMATS}, got {image_format!r}")
    selected = _ok_images(run_output, limit, storage_options)
    poses = _poses_by_image(run_output, selected["image_id"].to_pylist(), min_score, storage_options)
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
            keypoints, scores, boxes = poses.get(row["image_id"], _NO_PERSONS)
            overlay = draw_poses(decoded.image, keypoints, scores, boxes)
            uri = storage.join(out_dir, _output_name(row["input_index"], row["image_id"], image_format))
            storage.write_atomic(uri, _encode(overlay, image_format), storage_options)
            outputs.append(uri)
            persons += len(scores)
    LOG.info("rendered %d images (%d persons, %d failed) to %s", len(outputs), persons, failed, out_dir)
    return RenderSummary(len(outputs), persons, failed, tuple(outputs))


_NO_PERSONS = (np.zeros((0, len(COCO_KEYPOINTS), 3)), np.zeros(0), np.zeros((0, 4)))


def _read_table(run_output: str, name: str, storage_options: Mapping | None, **read_options) -> pa.Table:
    fs, path = storage.filesystem(storage.join(run_output, name), storage_options)
    if not fs.exists(path):
        raise ValueError(f"{run_output} has no {name}/ table: not the output folder of a labeling run")
    return pq.read_table(path, filesystem=fs, **read_options)


def _ok_images(run_output: str, limit: int | None, storage_options: Mapping | None) -> pa.Table:
    """(input_index, image_id, uri) of the first `limit` images with status ok, by input_index."""
    table = _read_table(run_output, "images", storage_options, columns=["input_index", "image_id", "uri"],
                        filters=[("status", "=", "ok")])
    table = table.sort_by("input_index")
    return table if limit is None else table.slice(0, limit)


def _poses_by_image(run_output: str, image_ids: list[str], min_score: float, storage_options: Mapping | None
                    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{image_id: (keypoints (P, 17, 3), scores (P,), boxes (P, 4))}, persons by person_index."""
    if not image_ids:
        return {}
    columns = ["image_id", "person_index", "score", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
               *[f"{name}_{part}" for name in COCO_KEYPOINTS for part in ("x", "y", "score")]]
    table = _read_table(run_output, "poses", storage_options, columns=columns,
                        filters=[("image_id", "in", image_ids), ("score", ">=", float(min_score))])
    table = table.sort_by([("image_id", "ascending"), ("person_index", "ascending")])
    values = {name: table[name].to_numpy(zero_copy_only=False) for name in columns[1:]}  # nulls become NaN
    keypoints = np.stack([np.stack([values[f"{n}_x"], values[f"{n}_y"], values[f"{n}_score"]], axis=-1)
                          for n in COCO_KEYPOINTS], axis=1).reshape(-1, len(COCO_KEYPOINTS), 3)
    boxes = np.stack([values[f"bbox_{c}"] for c in "xywh"], axis=-1).reshape(-1, 4)
    ids = np.asarray(table["image_id"].to_pylist(), dtype=object)
    out = {}
    for image_id in np.unique(ids):  # a few images: one boolean mask each is cheap
        rows = ids == image_id
        out[str(image_id)] = (keypoints[rows], values["score"][rows], boxes[rows])
    return out


def _output_name(input_index: int, image_id: str, image_format: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.splitext(image_id)[0]).strip("._")[-120:]  # ids: keys, URIs
    return f"{int(input_index):06d}_{stem}.{image_format}"


def _encode(image: np.ndarray, image_format: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if image_format == "jpg" else []
    ok, encoded = cv2.imencode(f".{image_format}", image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} overlay as {image_format}")
    return encoded.tobytes()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_output", help="output folder URI of a labeling run (holds images/ and poses/)")
    parser.add_argument("out_dir", help="folder URI for the overlays (local path, s3://..., any fsspec URI)")
    parser.add_argument("--limit", type=int, default=50,
                        help="render the first N images with status ok, in input order; 0 = all (default %(default)s)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="draw persons with a score >= this (default %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="jpg", dest="image_format",
                        help="overlay file format (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    summary = render_run(args.run_output, args.out_dir, limit=args.limit or None, min_score=args.min_score,
                         image_format=args.image_format)
    print(f"rendered {summary.images} images with {summary.persons} persons to {args.out_dir}"
          + (f" ({summary.failed} could not be read or decoded)" if summary.failed else ""))
    return 0 if summary.failed == 0 else 1
