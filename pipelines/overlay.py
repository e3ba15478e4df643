"""Pose overlays drawn from a labeling run's tables: the drawing shared by `simplepose render` and
`simplepose report`, and the reading of the persons of a few images.

Plain Python (OpenCV, pyarrow), no Ray: it is for looking at a few images, not for rendering a whole run.
"""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

PALETTE = ((0, 215, 255), (255, 128, 0), (80, 200, 60), (200, 60, 220), (60, 60, 255),
           (255, 255, 0), (0, 128, 255), (180, 180, 180))
"""BGR colours of persons 0, 1, 2, ... (cycled)."""

_SHIFT = 4  # OpenCV fixed-point drawing: coordinates * 16, so keypoints are drawn with sub-pixel accuracy

NO_PERSONS = (np.zeros((0, len(COCO_KEYPOINTS), 3)), np.zeros(0), np.zeros((0, 4)))
"""`poses_by_image`'s value for an image without persons: keypoints (0, 17, 3), scores (0,), boxes (0, 4)."""


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


def read_run_table(run_output: str, name: str, storage_options: Mapping | None, **read_options) -> pa.Table:
    """The run's table `name` (`images` or `poses`), every part, with pyarrow `read_table` options."""
    fs, path = storage.filesystem(storage.join(run_output, name), storage_options)
    if not fs.exists(path):
        raise ValueError(f"{run_output} has no {name}/ table: not the output folder of a labeling run")
    return pq.read_table(path, filesystem=fs, **read_options)


def poses_by_image(run_output: str, image_ids: list[str], min_score: float, storage_options: Mapping | None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{image_id: (keypoints (P, 17, 3), scores (P,), boxes (P, 4))} of persons with score >= `min_score` of a
    few images, persons by person_index; images without such persons are absent (use `NO_PERSONS`)."""
    if not image_ids:
        return {}
    columns = ["image_id", "person_index", "score", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
               *[f"{name}_{part}" for name in COCO_KEYPOINTS for part in ("x", "y", "score")]]
    table = read_run_table(run_output, "poses", storage_options, columns=columns,
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
