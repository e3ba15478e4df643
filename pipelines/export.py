"""A labeling run as COCO JSON: what `simplepose export RUN OUT --format coco-results|coco` writes.

Two formats (docs/tables.md, "Exporting a run"):

- `coco-results`: the COCO keypoint *results* list, one object per person, `{"image_id", "category_id": 1,
  "keypoints": [x, y, score] * 17, "score"}`, undetected keypoints (0, 0, 0): ready for pycocotools
  `COCO(annotations).loadRes(results)` and `COCOeval(..., "keypoints")`.
- `coco`: a COCO *annotations* file (`info`, `licenses`, `images` with id, file_name, width, height,
  `annotations` with keypoints [x, y, v] * 17, num_keypoints, bbox, area, iscrowd 0, score, and the `person`
  category with the 17 COCO keypoint names and 1-based skeleton) that CVAT and Label Studio import as
  "COCO Keypoints" and that `pycocotools.coco.COCO()` loads. A keypoint is visible (v = 2) when it was
  detected and its score is >= `keypoint_threshold`, else (0, 0, 0); the box and area are those of the
  visible keypoints; persons left without a visible keypoint are dropped; images whose status is not `ok`
  (no pixels, no size) are left out, `ok` images without persons are kept.

Image ids: with `annotations` (a COCO file), the id of the image whose `file_name` equals the base name of
the object's URI; run images not in that file are left out of `coco-results` (COCOeval could not score them)
and numbered after its largest id in `coco` (`max_id + 1 + input_index`). Without it, `input_index + 1`.
Both are deterministic: the same run gives the same file.

Memory stays bounded whatever the run's size: the part files are read one at a time (`images` and `poses`
of one chunk, only the columns needed) and the JSON is written as it is made, to a temporary file renamed
(local) or uploaded (object stores) when complete, so a failed export leaves nothing at OUT. Only the
annotation file's `images` index (file name -> id) is kept whole. A run without `_SUCCESS` is refused unless
`allow_incomplete`, which exports its committed chunks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.label import run_folder
from pipelines.errors import JobError, UsageError, about
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

LOG = logging.getLogger(__name__)

FORMATS = ("coco-results", "coco")
CATEGORY = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINTS),
            "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON]}
"""COCO's person category: keypoint names in COCO order, the skeleton 1-based as in COCO's files."""

COORDINATE_DECIMALS = 2
SCORE_DECIMALS = 4

_IMAGE_COLUMNS = ["input_index", "image_id", "uri", "status", "width", "height"]
_POSE_COLUMNS = ["image_id", "uri", "score",
                 *[f"{name}_{part}" for name in COCO_KEYPOINTS for part in ("x", "y", "score")]]


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """format: `coco-results` or `coco`; complete: the run has `_SUCCESS`; parts: chunks read; images: entries
    of `images` (`coco`) or images with persons written (`coco-results`); persons: results or annotations
    written; skipped_images: images left out for their status (not `ok`, `coco` only); unmatched_images: images
    whose file name is not in `annotations`; dropped_persons: persons without a visible keypoint (`coco`)."""

    format: str
    run_id: str | None
    complete: bool
    parts: int
    images: int
    persons: int
    skipped_images: int
    unmatched_images: int
    dropped_persons: int
    output: str


def export_run(run_output: str, out_uri: str, *, format: str = "coco-results",  # noqa: A002 - the CLI's name
               annotations: str | None = None, keypoint_threshold: float = 0.0, allow_incomplete: bool = False,
               storage_options: Mapping | None = None) -> ExportSummary:
    """Export the labeling run in `run_output` to `out_uri` (both any fsspec URI) as `format` (`FORMATS`)."""
    if format not in FORMATS:
        raise UsageError(f"export: --format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not np.isfinite(keypoint_threshold):
        raise UsageError(f"export: --keypoint-threshold must be a number, got {keypoint_threshold}")
    started = time.monotonic()
    folder = run_folder.RunFolder(run_output, storage_options)
    with about("RUN", run_output, storage_options):
        run = folder.read_json("_run.json")
        complete = storage.exists(folder.uri("_SUCCESS"), storage_options)
        chunks = committed_chunks(folder)
    if run is None and not chunks:
        raise JobError(f"RUN {run_output!r} has no _run.json and no images/ table: not the output folder of a "
                       f"labeling run")
    if not complete and not allow_incomplete:
        raise JobError(f"RUN {run_output!r} is incomplete (no _SUCCESS: the job is running or was stopped); "
                       f"finish it, or pass --allow-incomplete to export its {len(chunks)} committed chunks")
    ids = _ImageIds.from_annotations(annotations, storage_options) if annotations else _ImageIds()
    run = run or {}
    with about("OUTPUT", out_uri, storage_options), _AtomicText(out_uri, storage_options) as out:
        if format == "coco-results":
            counts = _write_results(folder, chunks, ids, out)
        else:
            counts = _write_coco(folder, chunks, ids, out, run, complete, float(keypoint_threshold))
    summary = ExportSummary(format=format, run_id=run.get("run_id"), complete=complete, parts=len(chunks),
                            output=out_uri, **counts)
    if summary.unmatched_images:
        LOG.warning("%d images of the run have no entry in %s (matched by file name)%s", summary.unmatched_images,
                    annotations, ": their persons are left out" if format == "coco-results" else
                    f": numbered after its largest id ({ids.max_id})")
    LOG.info("exported run %s (%s, %d chunks) as %s: %d images, %d persons to %s in %.1f s", summary.run_id,
             "complete" if complete else "INCOMPLETE", len(chunks), format, summary.images, summary.persons,
             out_uri, time.monotonic() - started)
    return summary


# ----------------------------------------------------------------------------------------------------- reading


def committed_chunks(folder: run_folder.RunFolder) -> list[int]:
    """The run's committed chunks (those with an `images` part), in order."""
    names = storage.list_names(folder.uri("images"), folder.options)
    return sorted(c for c in map(run_folder.chunk_of, names) if c is not None)


def read_part(uri: str, columns: list[str], storage_options: Mapping | None):
    """One part file, only `columns` (a pyarrow Table). Every read of the exporter goes through here."""
    with storage.open_binary(uri, storage_options) as f:
        return pq.read_table(f, columns=columns)


def _chunk_tables(folder: run_folder.RunFolder, chunks: list[int], poses: bool) -> Iterator[tuple[dict, dict | None]]:
    """Per chunk, its images columns (and poses columns) as numpy arrays; one chunk in memory at a time."""
    for chunk in chunks:
        name = run_folder.part_name(chunk)
        with about("RUN", folder.uri("images", name), folder.options):
            images = _columns(read_part(folder.uri("images", name), _IMAGE_COLUMNS, folder.options))
        if not poses:
            yield images, None
            continue
        uri = folder.uri("poses", name)
        try:
            poses_columns = _columns(read_part(uri, _POSE_COLUMNS, folder.options))  # the table is dropped here
        except FileNotFoundError:
            raise JobError(f"RUN {folder.output!r}: chunk {chunk} has an images part but no poses part {uri!r}; "
                           f"the folder was changed by hand (re-run the labeling job into it)") from None
        except Exception as error:  # noqa: BLE001 - store errors name the part
            with about("RUN", uri, folder.options):
                raise error
        yield images, poses_columns


def _columns(table) -> dict[str, np.ndarray]:
    """Table columns as numpy: strings as object arrays, nullable floats with NaN for null."""
    out = {}
    for name in table.column_names:
        column = table[name]
        out[name] = (np.asarray(column.to_pylist(), dtype=object) if pa.types.is_string(column.type)
                     else column.to_numpy(zero_copy_only=False))
    return out


def _keypoints(poses: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 17, 3) float64 x, y (NaN when not detected), score."""
    return np.stack([np.stack([poses[f"{n}_x"], poses[f"{n}_y"], poses[f"{n}_score"]], axis=-1)
                     for n in COCO_KEYPOINTS], axis=1).astype(np.float64).reshape(-1, len(COCO_KEYPOINTS), 3)


class _ImageIds:
    """Integer COCO image ids for run images: from an annotation file by file name, else input_index + 1."""

    def __init__(self, by_file: dict[str, int] | None = None, source: str | None = None):
        self.by_file, self.source = by_file, source
        self.max_id = max(by_file.values(), default=0) if by_file else 0
        self.claimed: dict[int, str] = {}  # id -> URI that matched it (bounded by the annotation file)

    @classmethod
    def from_annotations(cls, uri: str, storage_options: Mapping | None) -> _ImageIds:
        with about("ANNOTATIONS", uri, storage_options), storage.open_binary(uri, storage_options) as f:
            try:
                data = json.load(f)
            except (ValueError, UnicodeDecodeError) as error:
                raise JobError(f"ANNOTATIONS {uri!r} is not a JSON file: {error}") from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise JobError(f"ANNOTATIONS {uri!r} has no 'images' list: not a COCO annotation file")
        by_file: dict[str, int] = {}
        for image in images:
            name, image_id = posixpath.basename(str(image.get("file_name", ""))), image.get("id")
            if not name or not isinstance(image_id, int):
                raise JobError(f"ANNOTATIONS {uri!r}: an image without file_name or integer id: {str(image)[:120]}")
            if by_file.setdefault(name, image_id) != image_id:
                raise JobError(f"ANNOTATIONS {uri!r}: file name {name!r} is given to images {by_file[name]} and "
                               f"{image_id}; matching by file name needs unique names")
        del data
        return cls(by_file, uri)

    def assign(self, input_index: np.ndarray, uris: np.ndarray) -> np.ndarray:
        """Ids of a chunk's images (int64); -1 for images not in the annotation file."""
        if self.by_file is None:
            return input_index.astype(np.int64) + 1
        ids = np.full(len(uris), -1, np.int64)
        for k, uri in enumerate(uris):
            image_id = self.by_file.get(posixpath.basename(uri.rstrip("/")))
            if image_id is None:
                continue
            previous = self.claimed.setdefault(image_id, uri)
            if previous != uri:
                raise JobError(f"--annotations {self.source!r}: run images {previous!r} and {uri!r} have the same "
                               f"file name, so image id {image_id} would stand for both")
            ids[k] = image_id
        return ids


# ----------------------------------------------------------------------------------------------------- writing


def _write_results(folder, chunks, ids: _ImageIds, out) -> dict[str, int]:
    out.write("[")
    first, persons, images, unmatched = True, 0, 0, 0
    for image_cols, poses in _chunk_tables(folder, chunks, poses=True):
        chunk_ids = ids.assign(image_cols["input_index"], image_cols["uri"])
        unmatched += int(np.count_nonzero((chunk_ids < 0) & (image_cols["status"] == "ok")))
        if not len(poses["score"]):
            continue
        id_of = dict(zip(image_cols["image_id"].tolist(), chunk_ids.tolist()))
        person_ids = np.array([id_of.get(i, -1) for i in poses["image_id"]], np.int64)
        keep = person_ids >= 0
        keypoints = _keypoints(poses)[keep]
        detected = np.isfinite(keypoints[..., 0])
        keypoints[~detected] = 0.0
        keypoints[..., :2] = np.round(keypoints[..., :2], COORDINATE_DECIMALS)
        keypoints[..., 2] = np.round(keypoints[..., 2], SCORE_DECIMALS)
        scores = np.round(poses["score"][keep].astype(np.float64), SCORE_DECIMALS)
        kept_ids = person_ids[keep]
        images += len(np.unique(kept_ids))
        rows = []
        for image_id, points, score in zip(kept_ids.tolist(), keypoints.reshape(len(kept_ids), 51).tolist(),
                                           scores.tolist()):
            rows.append(json.dumps({"image_id": image_id, "category_id": 1, "keypoints": points, "score": score},
                                   separators=(",", ":")))
        if rows:
            out.write(("\n" if first else ",\n") + ",\n".join(rows))
            first = False
            persons += len(rows)
    out.write("\n]\n")
    return {"images": images, "persons": persons, "skipped_images": 0, "unmatched_images": unmatched,
            "dropped_persons": 0}


def _write_coco(folder, chunks, ids: _ImageIds, out, run: dict, complete: bool,
                threshold: float) -> dict[str, int]:
    info = {"description": f"simplepose labeling run {run.get('run_id', '?')}",
            "contributor": f"simplepose, model {run.get('model_name', '?')}",
            "version": str(run.get("model_version", "")),
            "simplepose": {"run_id": run.get("run_id"), "model_name": run.get("model_name"),
                           "model_version": run.get("model_version"), "complete": complete,
                           "keypoint_threshold": threshold}}
    out.write('{"info":' + json.dumps(info, sort_keys=True) + ',\n"licenses":[],\n"categories":'
              + json.dumps([CATEGORY], separators=(",", ":")) + ',\n"images":[')
    # Pass 1: the images (status ok), part by part.
    first, images, skipped, unmatched = True, 0, 0, 0
    for image_cols, _ in _chunk_tables(folder, chunks, poses=False):
        chunk_ids, missing = _coco_ids(ids, image_cols)
        ok = image_cols["status"] == "ok"
        unmatched += int(np.count_nonzero(missing & ok))
        skipped += int(np.count_nonzero(~ok))
        rows = [json.dumps({"id": i, "file_name": _file_name(uri), "width": w, "height": h},
                           separators=(",", ":"))
                for i, uri, w, h in zip(chunk_ids[ok].tolist(), image_cols["uri"][ok].tolist(),
                                        image_cols["width"][ok].tolist(), image_cols["height"][ok].tolist())]
        if rows:
            out.write(("\n" if first else ",\n") + ",\n".join(rows))
            first, images = False, images + len(rows)
    ids.claimed.clear()  # pass 2 assigns the same ids again
    out.write('\n],\n"annotations":[')
    # Pass 2: the persons, part by part.
    first, persons, dropped, next_id = True, 0, 0, 1
    for image_cols, poses in _chunk_tables(folder, chunks, poses=True):
        if not len(poses["score"]):
            continue
        chunk_ids, _ = _coco_ids(ids, image_cols)
        ok = image_cols["status"] == "ok"
        id_of = dict(zip(image_cols["image_id"][ok].tolist(), chunk_ids[ok].tolist()))
        person_ids = np.array([id_of.get(i, -1) for i in poses["image_id"]], np.int64)
        keypoints = _keypoints(poses)
        visible = np.isfinite(keypoints[..., 0]) & (keypoints[..., 2] >= threshold)
        count = visible.sum(axis=1)
        keep = (person_ids >= 0) & (count > 0)
        dropped += int(np.count_nonzero(~keep))
        keypoints, visible, count = keypoints[keep], visible[keep], count[keep]
        xy = np.where(visible[..., None], keypoints[..., :2], np.nan)
        low, high = np.nanmin(xy, axis=1), np.nanmax(xy, axis=1)  # every kept person has a visible keypoint
        boxes = np.round(np.concatenate([low, high - low], axis=1), COORDINATE_DECIMALS)
        areas = np.round(boxes[:, 2] * boxes[:, 3], COORDINATE_DECIMALS)
        points = np.zeros_like(keypoints)
        points[..., :2] = np.round(np.where(visible[..., None], keypoints[..., :2], 0.0), COORDINATE_DECIMALS)
        points[..., 2] = np.where(visible, 2, 0)
        scores = np.round(poses["score"][keep].astype(np.float64), SCORE_DECIMALS)
        rows = []
        for image_id, flat, n, box, area, score in zip(
                person_ids[keep].tolist(), points.reshape(len(count), 51).tolist(), count.tolist(),
                boxes.tolist(), areas.tolist(), scores.tolist()):
            flat[2::3] = [int(v) for v in flat[2::3]]
            rows.append(json.dumps({"id": next_id + len(rows), "image_id": image_id, "category_id": 1,
                                    "keypoints": flat, "num_keypoints": n, "bbox": box, "area": area,
                                    "iscrowd": 0, "segmentation": [], "score": score}, separators=(",", ":")))
        if rows:
            out.write(("\n" if first else ",\n") + ",\n".join(rows))
            first, persons, next_id = False, persons + len(rows), next_id + len(rows)
    out.write("\n]}\n")
    return {"images": images, "persons": persons, "skipped_images": skipped, "unmatched_images": unmatched,
            "dropped_persons": dropped}


def _coco_ids(ids: _ImageIds, image_cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, not in the annotation file) for the `coco` format: those are numbered after its largest id."""
    chunk_ids = ids.assign(image_cols["input_index"], image_cols["uri"])
    missing = chunk_ids < 0
    chunk_ids[missing] = ids.max_id + 1 + image_cols["input_index"][missing].astype(np.int64)
    return chunk_ids, missing


def _file_name(uri: str) -> str:
    """The image's `file_name`: the base name of its URI (as CVAT and Label Studio match uploaded files)."""
    return posixpath.basename(uri.rstrip("/"))


class _AtomicText:
    """A text file written piece by piece that appears at `uri` only whole: a hidden temporary file renamed in
    place (local file systems) or a local temporary file uploaded at the end (object stores); removed on error."""

    def __init__(self, uri: str, storage_options: Mapping | None):
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri, storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = any(p in storage.LOCAL_PROTOCOLS for p in protocols)

    def __enter__(self):
        if self.local:
            directory, name = posixpath.split(self.path)
            self.fs.makedirs(directory or ".", exist_ok=True)
            self.temporary = posixpath.join(directory, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        else:
            handle, self.temporary = tempfile.mkstemp(prefix="simplepose-export-", suffix=".json")
            os.close(handle)
        self.file = open(self.temporary, "w", encoding="utf-8", buffering=1 << 20)
        return self.file

    def __exit__(self, kind, error, traceback) -> None:
        self.file.close()
        try:
            if error is None:
                if self.local:
                    os.replace(self.temporary, self.path)
                else:
                    self.fs.put_file(self.temporary, self.path)
        finally:
            if os.path.exists(self.temporary):
                os.remove(self.temporary)
