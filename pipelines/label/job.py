"""The labeling job: image objects in storage -> Ray Data (read, decode, network, assembly) -> Parquet tables.

`run_label_job(LabelJobConfig(...))` is the whole job; `jobs/label.py` is its command line and
`docs/tables.md` documents its output. The stages are in `pipelines.label.stages`, the output folder
protocol (resume, exactly-once commits, success marker) in `pipelines.label.run_folder`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines import errors, preflight, storage
from pipelines.label import run_folder, tables
from pipelines.label.graph import build_dataset, data_context, resolve_device
from pipelines.ray_cluster import connect_ray
from pipelines.label.stages import IMAGE_COLUMNS, NETWORK_ENGINES
from pipelines.label.watch import LabelJobStalled, Watchdog, stage_resources, waiting_stages  # noqa: F401

LOG = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class LabelJobConfig:
    """One labeling run. Test-time defaults are the authors' HEAD setting (docs/method.md §8.5: boxsize 640, one scale,
    flip); `mode` is the decoder's (`simplepose.decode.DecoderConfig.mode`). Sizes are pixels.

    input: prefix, glob, single object or manifest (.parquet/.csv/.txt/.lst of URIs) of any fsspec URI.
    output: folder URI of the run (see `pipelines.label.run_folder`). model: checkpoint URI or models:/NAME@ALIAS.
    aggregation: heatmap aggregation (`InferConfig.aggregation`); None = "reference" for mode "reference"
      (its decoder needs original-resolution maps), else "stride4" (maps stay on the device, no upsampling).
    min_person_score, min_keypoints: the output floor of the poses table (`simplepose.decode.PoseFloor`;
      None = its defaults): persons scoring below, or with fewer detected keypoints, are not written.
    chunk_size: objects per committed chunk (one images and one poses part file per chunk; a kill loses at
      most the chunks in flight). *_batch_size: rows per Ray batch of each stage; each batch is one block,
      and the driver's cost is per block, so batches are large. The network stage groups its Ray batch by
      padded shape into forwards of up to forward_batch_size images of one shape; the larger its Ray batch,
      the fuller the forwards (COCO photos at boxsize 512 have ~10 padded shapes: 256 rows fill forwards of
      16 to 0.76, 1024 rows to 0.93, measured by `bench label`). network_batch_size None = about 1 GiB of
      network inputs, at most 1024 rows (`network_rows`). *_actors: (min, max) actor pool sizes, max None =
      sized from the cluster (`pipelines.label.graph.pool_sizes`). *_cpus: logical CPUs reserved per task / actor
      (fractional on small machines, where whole CPUs can hang Ray).
    device: "auto" = one GPU per network actor when the cluster has GPUs, else CPU; "cuda" on a cluster
      without GPUs fails at once. precision: "auto" = bf16 on GPUs that support it (decided on the actor's
      GPU), fp16 on others, fp32 on CPU. engine: "torch" (the IMHN) or "null" (an instant stand-in for
      benchmarks). channels_last: NHWC activations (None = on CUDA only). compile: `torch.compile` the model.
    allow_local_paths: a manifest on an object store may name local paths (read from the workers' disks).
    address: Ray cluster to join (None: $RAY_ADDRESS, else a local Ray). storage_options: fsspec options
      (endpoint_url, key, secret, profile...), never logged or written.
    progress_interval_s: seconds between progress lines (logged even while no batch arrives, with the stages
      that wait for resources). stall_timeout_s: the job ends with `LabelJobStalled` after that long without
      a new output row (None = never); committed chunks stay and the re-run resumes (docs/reliability.md).
    """

    input: str
    output: str
    model: str
    boxsize: int = 640
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    mode: str = "default"
    aggregation: str | None = None
    max_pixels: int = 50_000_000
    min_person_score: float | None = None
    min_keypoints: int | None = None
    chunk_size: int = 10_000
    read_batch_size: int = 64
    decode_batch_size: int = 64
    network_batch_size: int | None = None
    forward_batch_size: int = 16
    assemble_batch_size: int = 256
    read_cpus: float = 0.25
    decode_cpus: float = 0.5
    network_cpus: float = 1.0
    assemble_cpus: float = 0.25
    decode_actors: tuple[int, int | None] = (1, None)
    network_actors: tuple[int, int | None] = (1, None)
    assemble_actors: tuple[int, int | None] = (1, None)
    device: str = "auto"
    precision: str = "auto"
    engine: str = "torch"
    channels_last: bool | None = None
    compile: bool = False
    read_retries: int = 3
    allow_local_paths: bool = False
    overwrite: bool = False
    address: str | None = None
    storage_options: Mapping[str, object] = field(default_factory=dict, repr=False)
    progress_interval_s: float = 10.0
    stall_timeout_s: float | None = 1800.0

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        for name in ("input", "output", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"LabelJobConfig.{name}: a non-empty URI is required")
        if self.engine not in NETWORK_ENGINES:
            raise ValueError(f"LabelJobConfig.engine: {self.engine!r} not in {NETWORK_ENGINES}")
        if self.device not in DEVICES or self.precision not in PRECISIONS:
            raise ValueError(f"LabelJobConfig: device {self.device!r} not in {DEVICES} or precision "
                             f"{self.precision!r} not in {PRECISIONS}")
        if min(self.chunk_size, self.max_pixels, self.read_batch_size, self.decode_batch_size,
               self.network_rows(), self.forward_batch_size, self.assemble_batch_size) < 1:
            raise ValueError("LabelJobConfig: chunk_size, max_pixels and batch sizes must be >= 1")
        for name in ("decode_actors", "network_actors", "assemble_actors"):
            low, high = getattr(self, name)
            if low < 1 or (high is not None and high < low):
                raise ValueError(f"LabelJobConfig.{name}: need 1 <= min <= max (max None = sized from the "
                                 f"cluster), got {(low, high)}")
        if self.stall_timeout_s is not None and self.stall_timeout_s <= 0:
            raise ValueError(f"LabelJobConfig.stall_timeout_s: must be > 0 or None, got {self.stall_timeout_s}")
        self.decoder_config()  # validates mode
        self.infer_config()  # validates boxsize, scales, aggregation
        self.pose_floor()  # validates the floor

    def infer_config(self):
        from simplepose.infer import InferConfig

        aggregation = self.aggregation or ("reference" if self.mode == "reference" else "stride4")
        return InferConfig(boxsize=self.boxsize, scales=self.scales, flip=self.flip, aggregation=aggregation)

    def decoder_config(self):
        from simplepose.decode import DecoderConfig

        return DecoderConfig(mode=self.mode)

    def network_rows(self) -> int:
        """Rows per network Ray batch: `network_batch_size`, or as many as fit ~1 GiB of uint8 inputs (a 4:3
        image per scale), between forward_batch_size and 1024."""
        if self.network_batch_size is not None:
            return self.network_batch_size
        per_image = sum(3 * (s * self.boxsize) ** 2 * 4 / 3 for s in self.scales)
        return int(min(1024, max(self.forward_batch_size, (1 << 30) // max(per_image, 1))))  # boxsize 0: checked later

    def pose_floor(self):
        """The output floor of the poses table (`simplepose.decode.PoseFloor`)."""
        from simplepose.decode import PoseFloor

        changes = {name: value for name, value in (("min_person_score", self.min_person_score),
                                                   ("min_keypoints", self.min_keypoints)) if value is not None}
        return PoseFloor(**changes)

    def settings(self) -> dict:
        """What determines the output rows (the run id is derived from it); no secrets."""
        infer = dataclasses.asdict(self.infer_config())
        return {"input": self.input, "model": self.model, "infer": infer, "mode": self.mode,
                "decoder": dataclasses.asdict(self.decoder_config()),
                "floor": dataclasses.asdict(self.pose_floor()), "max_pixels": self.max_pixels,
                "chunk_size": self.chunk_size, "allow_local_paths": self.allow_local_paths,
                "schema_version": tables.SCHEMA_VERSION}


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
    model_uri, model_name, model_version = describe_model(config.model, config.storage_options)
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


def describe_model(model: str, storage_options: Mapping | None = None) -> tuple[str, str, str]:
    """(URI the actors load, model name, model version).

    models:/NAME@ALIAS is pinned to the version the alias points at now, so a promotion during the run does
    not mix models. A checkpoint file: name and version from its metadata ("name", "version") when present,
    else the file's stem and the first 12 hex digits of its SHA-256.
    """
    if model.startswith("models:/"):
        from pipelines import registry, tracking

        version = registry.get_version(tracking.client(), model)
        return f"models:/{version.name}/{version.version}", version.name, str(version.version)
    import hashlib
    import io

    from simplepose.checkpoint import load_checkpoint

    with errors.about("MODEL", model, storage_options):  # store errors and bad files name the model URI
        with storage.open_binary(model, storage_options) as f:
            data = f.read()
        _, _, metadata = load_checkpoint(io.BytesIO(data))
    name = str(metadata.get("name") or os.path.splitext(os.path.basename(model.rstrip("/")))[0])
    version = str(metadata.get("version") or hashlib.sha256(data).hexdigest()[:12])
    return model, name, version


def _summary(config: LabelJobConfig, folder: run_folder.RunFolder, manifest: dict, processed: int,
             seconds: float, resumed: bool) -> LabelSummary:
    return LabelSummary(
        run_id=manifest["run_id"], output=config.output, counts=dict(manifest["counts"]),
        images=manifest["objects"], persons=manifest["persons"], seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 else 0.0, processed=processed, resumed=resumed,
        model_name=manifest["model_name"], model_version=manifest["model_version"],
        images_path=folder.uri("images"), poses_path=folder.uri("poses"), manifest_path=folder.uri("_manifest.json"))
