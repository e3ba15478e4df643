"""The two Parquet tables of a labeling run: `images` (one row per input object) and `poses` (one row per
detected person). The schemas here are the contract documented in docs/tables.md; change both together
and bump `SCHEMA_VERSION`.

Coordinates are original-image pixels, x to the right and y down, pixel centres at integer coordinates.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.images import STATUSES as image_statuses
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_KEY = b"simplepose"

STATUSES = tuple(image_statuses)
"""Values of `images.status`, with their meanings in `pipelines.images.STATUSES` (the one source)."""

IMAGES_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("input_index", pa.int64(), nullable=False),  # position in the run's frozen input list
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),  # "" when status is ok
    pa.field("size_bytes", pa.int64(), nullable=False),  # object size; 0 when unread
    pa.field("width", pa.int32(), nullable=False),  # pixels; 0 when unknown
    pa.field("height", pa.int32(), nullable=False),
    pa.field("num_persons", pa.int32(), nullable=False),
])

_KEYPOINT_FIELDS = [
    pa.field(f"{name}_{part}", pa.float32(), nullable=part == "x" or part == "y")
    for name in COCO_KEYPOINTS for part in ("x", "y", "score")
]

POSES_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("person_index", pa.int32(), nullable=False),  # 0 = best score in its image
    pa.field("score", pa.float32(), nullable=False),
    pa.field("num_keypoints", pa.int32(), nullable=False),  # detected keypoints (of 17)
    *_KEYPOINT_FIELDS,  # nose_x, nose_y, nose_score, ... in COCO order; x, y null when not detected
    pa.field("bbox_x", pa.float32(), nullable=False),  # box of the detected keypoints, pixels
    pa.field("bbox_y", pa.float32(), nullable=False),
    pa.field("bbox_w", pa.float32(), nullable=False),
    pa.field("bbox_h", pa.float32(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
])


def table_metadata(run: dict) -> dict[bytes, bytes]:
    """Parquet key-value metadata: keypoint names, skeleton and conventions, plus the run description."""
    description = {
        "schema_version": SCHEMA_VERSION,
        "keypoints": list(COCO_KEYPOINTS),
        "skeleton": [list(pair) for pair in COCO_SKELETON],
        "skeleton_indexing": "0-based indices into keypoints",
        "coordinates": "original image pixels, x right, y down, pixel centres at integer coordinates",
        "missing_keypoint": "x and y null, score 0",
        "statuses": list(STATUSES),
        "run": run,
    }
    return {METADATA_KEY: json.dumps(description, sort_keys=True).encode()}


def images_table(columns: dict[str, np.ndarray], metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """`images` rows from equal-length columns named as in `IMAGES_SCHEMA`."""
    arrays = [pa.array(np.asarray(columns[f.name]), type=f.type) for f in IMAGES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=IMAGES_SCHEMA.with_metadata(metadata or {}))


def poses_table(image_ids: np.ndarray, uris: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                boxes: np.ndarray, run_id: str, model_name: str, model_version: str,
                metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """`poses` rows for N persons.

    image_ids, uris: (N,) str, the image of each person; keypoints: (N, 17, 3) float, COCO order, (x, y,
    score) in original pixels, score 0 = not detected; scores: (N,) person scores; boxes: (N, 4) x, y, w, h.
    person_index counts persons within each image by decreasing score (rows of one image must be adjacent).
    """
    keypoints = np.asarray(keypoints, np.float32).reshape(-1, len(COCO_KEYPOINTS), 3)
    n = keypoints.shape[0]
    scores = np.asarray(scores, np.float32).reshape(n)
    boxes = np.asarray(boxes, np.float32).reshape(n, 4)
    image_ids = np.asarray(image_ids, dtype=object).reshape(n)
    detected = keypoints[..., 2] > 0
    columns: dict[str, pa.Array] = {
        "run_id": pa.array([run_id] * n, pa.string()),
        "image_id": pa.array(image_ids, pa.string()),
        "uri": pa.array(np.asarray(uris, dtype=object).reshape(n), pa.string()),
        "person_index": pa.array(_rank_within_groups(image_ids, scores), pa.int32()),
        "score": pa.array(scores),
        "num_keypoints": pa.array(detected.sum(axis=1).astype(np.int32)),
        "bbox_x": pa.array(boxes[:, 0]), "bbox_y": pa.array(boxes[:, 1]),
        "bbox_w": pa.array(boxes[:, 2]), "bbox_h": pa.array(boxes[:, 3]),
        "model_name": pa.array([model_name] * n, pa.string()),
        "model_version": pa.array([model_version] * n, pa.string()),
    }
    for k, name in enumerate(COCO_KEYPOINTS):
        columns[f"{name}_x"] = pa.array(keypoints[:, k, 0], mask=~detected[:, k])
        columns[f"{name}_y"] = pa.array(keypoints[:, k, 1], mask=~detected[:, k])
        columns[f"{name}_score"] = pa.array(keypoints[:, k, 2])
    return pa.Table.from_arrays([columns[f.name] for f in POSES_SCHEMA],
                                schema=POSES_SCHEMA.with_metadata(metadata or {}))


def _rank_within_groups(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank of each score within its run of equal adjacent group keys, 0 = highest (stable for ties)."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int32)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    order = np.lexsort((-scores, group_of))  # by group, then by decreasing score
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(n) - starts[group_of[order]]
    return rank


def to_parquet_bytes(table: pa.Table) -> bytes:
    """One Parquet file in memory (zstd, statistics on), ready for an atomic write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=128 * 1024)
    return sink.getvalue().to_pybytes()


def read_metadata(table_or_schema: pa.Table | pa.Schema) -> dict:
    """The decoded `simplepose` metadata of a table or schema ({} when absent)."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
