"""The labeling job: image objects in storage -> Ray Data (read, decode, network, assembly) -> Parquet tables.

`run_label_job(config)` (a `pipelines.label.config.LabelJobConfig`) is the whole job; `jobs/label.py` is its
command line and `docs/tables.md` documents its output. The stages are in `pipelines.label.stages`, the output folder
protocol (resume, exactly-once commits, success marker) in `pipelines.label.run_folder`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines import preflight, registry, storage
from pipelines.label import run_folder, tables
from pipelines.label.config import LabelJobConfig
from pipelines.label.graph import build_dataset, data_context, resolve_device
from pipelines.label.stages import IMAGE_COLUMNS
from pipelines.label.watch import LabelJobStalled, Watchdog, stage_resources, waiting_stages  # noqa: F401
from pipelines.ray_cluster import connect_ray

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSummary:
    """What a run did. counts: objects per status over the whole run (resumed chunks included)."""

    run_id: str
    output: str
    counts: dict[str, int]
    images: int
    persons: int
    seconds: float
    images_per_second: float  # objects processed by this invocation / its wall time
    processed: int  # objects processed by this invocation (0 when the run was already complete)
    resumed: bool
    model_name: str
    model_version: str
    images_path: str
    poses_path: str
    manifest_path: str

    def format(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"run {self.run_id}{' (resumed)' if self.resumed else ''}: {self.images} objects ({statuses}), "
                f"{self.persons} persons; this invocation {self.processed} objects in {self.seconds:.1f} s "
                f"({self.images_per_second:.2f} images/s); model {self.model_name} {self.model_version}; "
                f"tables {self.images_path} {self.poses_path}")


def run_label_job(config: LabelJobConfig) -> LabelSummary:
    """Label every input object into OUTPUT/images and OUTPUT/poses; resumable and exactly-once per run."""
    started = time.monotonic()
    preflight.check_label_job(config)  # INPUT and OUTPUT usable: nothing is written to OUTPUT otherwise
    folder = run_folder.RunFolder(config.output, config.storage_options)
    model_uri, model_name, model_version = registry.describe_model(config.model, config.storage_options)
    settings = {**config.settings(), "model_version": model_version}
    run_id = run_folder.run_id_for(settings)
    run = {"run_id": run_id, "settings": settings, "model_name": model_name, "model_version": model_version}
    resumed = folder.start(run, config.overwrite)
    if (manifest := folder.complete()) is not None:
        LOG.info("run %s in %s is already complete", run_id, config.output)
        return _summary(config, folder, manifest, 0, time.monotonic() - started, resumed)
    chunks, objects = folder.freeze_inputs(storage.iter_input_uris(config.input, config.storage_options,
                                                                   allow_local=config.allow_local_paths),
                                           config.chunk_size)
    pending = sorted(set(range(chunks)) - folder.committed_chunks())
    LOG.info("run %s: %d objects in %d chunks, %d to do (model %s %s, options %s)", run_id, objects, chunks,
             len(pending), model_name, model_version, storage.redact(config.storage_options))
    processed = 0
    if pending:
        writer = ChunkWriter(folder, run, config.chunk_size, objects, pending, config.progress_interval_s)
        with connect_ray(config.address) as ray_resources, data_context():
            dataset = build_dataset(config, model_uri, [folder.input_chunk_uri(c) for c in pending],
                                    [writer.expected[c] for c in pending], ray_resources)
            needs = stage_resources(config, resolve_device(config, ray_resources))
            with Watchdog(writer, config.progress_interval_s, config.stall_timeout_s, lambda: waiting_stages(needs)):
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    writer.add(batch)
        writer.check_done()
        processed = writer.rows_written
    totals = folder.totals()
    if totals["images"] != objects:
        raise RuntimeError(f"run {run_id}: {totals['images']} image rows committed for {objects} inputs")
    seconds = time.monotonic() - started
    manifest = {**run, "objects": objects, "chunks": chunks, "counts": totals["status"],
                "persons": totals["persons"], "finished_unix": time.time(), "last_invocation_seconds": seconds,
                "last_invocation_processed": processed, "tables": {"images": "images/", "poses": "poses/"}}
    folder.finish(manifest)
    summary = _summary(config, folder, manifest, processed, seconds, resumed)
    LOG.info("%s", summary.format())
    return summary


class ChunkWriter:
    """Collects output rows per chunk and commits a chunk as soon as all its rows have arrived.

    Rows are keyed by input_index, so a row delivered twice (a retried task) is written once. The driver's
    work per batch is a few numpy operations (no Python loop over rows): it bounds how many images per
    second one job can drive.
    """

    def __init__(self, folder: run_folder.RunFolder, run: dict, chunk_size: int, objects: int,
                 pending: list[int], progress_interval_s: float):
        self.folder, self.run, self.chunk_size, self.objects = folder, run, chunk_size, objects
        self.expected = {c: min(chunk_size, objects - c * chunk_size) for c in pending}
        self.arrived = {c: np.zeros(n, bool) for c, n in self.expected.items()}
        self.pieces: dict[int, list[dict[str, np.ndarray]]] = {c: [] for c in pending}
        self.committed: set[int] = set()
        self.metadata = tables.table_metadata({k: run[k] for k in ("run_id", "model_name", "model_version")})
        self.rows_written = self.failed = 0
        self.started = self.last_report = self.last_progress = time.monotonic()
        self.interval = progress_interval_s
        self.waiting = ""  # stages waiting for resources (set by the watchdog), shown in the progress line
        self._report_lock = threading.Lock()

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        index = np.asarray(batch["input_index"], np.int64)
        chunks = index // self.chunk_size
        for chunk in np.unique(chunks).tolist():
            if chunk in self.committed:  # late duplicates of committed rows: already written once
                continue
            if chunk not in self.expected:
                raise RuntimeError(f"rows for chunk {chunk}, which is not pending")
            rows = np.flatnonzero(chunks == chunk)
            offsets = index[rows] - chunk * self.chunk_size
            offsets, first = np.unique(offsets, return_index=True)  # duplicates within the batch
            new = ~self.arrived[chunk][offsets]
            if not new.any():
                continue
            rows = rows[first[new]]
            self.last_progress = time.monotonic()
            self.arrived[chunk][offsets[new]] = True
            self.pieces[chunk].append({name: np.asarray(batch[name])[rows] for name in ROW_COLUMNS})
            if self.arrived[chunk].all():
                self._commit(chunk)
        self._report()

    def _commit(self, chunk: int) -> None:
        pieces = self.pieces.pop(chunk)
        rows = {name: np.concatenate([piece[name] for piece in pieces]) for name in ROW_COLUMNS}
        order = np.argsort(rows["input_index"], kind="stable")
        images, poses = chunk_tables({name: column[order] for name, column in rows.items()}, self.run,
                                     self.metadata)
        self.folder.write_chunk(chunk, images, poses)
        del self.expected[chunk], self.arrived[chunk]
        self.committed.add(chunk)
        self.rows_written += len(order)
        self.failed += int((rows["status"] != "ok").sum())

    def _report(self, force: bool = False) -> None:
        with self._report_lock:  # the driver's loop and the watchdog thread both report
            now = time.monotonic()
            if force or now - self.last_report >= self.interval:
                self.last_report = now
                rate = self.rows_written / max(now - self.started, 1e-9)
                LOG.info("progress: %d objects committed (%d failed), %d chunks left, %.2f images/s%s",
                         self.rows_written, self.failed, len(self.expected), rate,
                         f"; waiting: {self.waiting}" if self.waiting else "")

    def check_done(self) -> None:
        self._report(force=True)
        if self.expected:
            missing = {c: int((~self.arrived[c]).sum()) for c in self.expected}
            raise RuntimeError(f"the pipeline ended with rows missing in chunks {missing}")


ROW_COLUMNS = (*IMAGE_COLUMNS, "num_persons", "pose_keypoints", "pose_scores", "pose_boxes")
"""The assembly stage's columns that the tables keep."""


def chunk_tables(rows: Mapping[str, np.ndarray], run: dict, metadata: dict) -> tuple[pa.Table, pa.Table]:
    """(images, poses) tables of one chunk from the assembly stage's columns (`ROW_COLUMNS`, ordered by
    input_index)."""
    n = len(rows["input_index"])
    columns = {name: rows[name] for name in IMAGE_COLUMNS}
    columns["num_persons"] = np.asarray(rows["num_persons"], np.int32)
    columns["run_id"] = np.full(n, run["run_id"], dtype=object)
    images = tables.images_table(columns, metadata)
    with_persons = np.flatnonzero(columns["num_persons"] > 0)
    counts = columns["num_persons"][with_persons]

    def stacked(name: str, shape: tuple[int, ...]) -> np.ndarray:
        joined = b"".join(rows[name][with_persons].tolist())
        return np.frombuffer(joined, np.float32).reshape(-1, *shape)

    poses = tables.poses_table(
        np.repeat(np.asarray(rows["image_id"], dtype=object)[with_persons], counts),
        np.repeat(np.asarray(rows["uri"], dtype=object)[with_persons], counts),
        stacked("pose_keypoints", (17, 3)), stacked("pose_scores", ()), stacked("pose_boxes", (4,)),
        run["run_id"], run["model_name"], run["model_version"], metadata)
    return images, poses


def _summary(config: LabelJobConfig, folder: run_folder.RunFolder, manifest: dict, processed: int,
             seconds: float, resumed: bool) -> LabelSummary:
    return LabelSummary(
        run_id=manifest["run_id"], output=config.output, counts=dict(manifest["counts"]),
        images=manifest["objects"], persons=manifest["persons"], seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 else 0.0, processed=processed, resumed=resumed,
        model_name=manifest["model_name"], model_version=manifest["model_version"],
        images_path=folder.uri("images"), poses_path=folder.uri("poses"), manifest_path=folder.uri("_manifest.json"))
