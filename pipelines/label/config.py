"""The labeling job's configuration: the library's own configs nested, plus one small dataclass per stage.

    simplepose label IN OUT --model M --config label.yaml decoder.attach_fragments=false network.device=cuda

Built by `pipelines.config.load_config` (defaults < --config file < flag shortcuts < dotted overrides); every
field of `InferConfig`, `DecoderConfig` and `PoseFloor` is reachable as `infer.*`, `decoder.*`, `floor.*`
without command-line code. `--print-config` shows the resolved config (docs/tables.md, "Run settings").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipelines.config import SECRET, load_config
from pipelines.images import DEFAULT_MAX_PIXELS
from pipelines.label import tables
from pipelines.label.stages import check_engine
from simplepose.decode import POSE_FLOOR, DecoderConfig, PoseFloor
from simplepose.infer import LABELING, InferConfig

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ReadStageConfig:
    """Reads: `batch_size` objects listed and fetched per call (one block), `retries` per object on transient
    storage errors. cpus None (the default): reads run inside the decode actors, with their CPUs (Ray Data
    fuses the two operators when their resources match): one operator less for the driver to schedule and no
    raw bytes through the object store, which halved the driver's CPU per image and took ~1 ms per image off
    the job's CPU (`bench label`, docs/benchmarks.md). A number: reads are separate tasks of that many CPUs."""
    batch_size: int = 64
    cpus: float | None = None
    retries: int = 3

    def __post_init__(self):
        _check(self.batch_size >= 1 and (self.cpus is None or self.cpus > 0) and self.retries >= 0,
               "ReadStageConfig", f"needs batch_size >= 1, cpus > 0 or None, retries >= 0, got {self}")


@dataclass(frozen=True)
class PoolStageConfig:
    """An actor-pool stage: `batch_size` rows per Ray batch (one block: the driver's cost is per block, so
    batches are large), `cpus` logical CPUs per actor (fractional on small machines, where whole CPUs can
    hang Ray), `actors` (min, max) pool size, max None = sized from the cluster (`graph.pool_sizes`)."""
    batch_size: int | None = 64
    cpus: float = 0.5
    actors: tuple[int, int | None] = (1, None)

    def __post_init__(self):
        low, high = self.actors
        _check(low >= 1 and (high is None or high >= low), f"{type(self).__name__}.actors",
               f"needs 1 <= min <= max (max None = sized from the cluster), got {self.actors}")
        _check((self.batch_size is None or self.batch_size >= 1) and self.cpus > 0, type(self).__name__,
               f"need batch_size >= 1 and cpus > 0, got {self.batch_size}, {self.cpus}")


@dataclass(frozen=True)
class DecodeStageConfig(PoolStageConfig):
    """Decode + resize + pad actors (CPU)."""


@dataclass(frozen=True)
class AssembleStageConfig(PoolStageConfig):
    """Keypoint assignment + output floor actors (CPU; light once decoding is bounded)."""
    batch_size: int | None = 256
    cpus: float = 0.25


@dataclass(frozen=True)
class NetworkStageConfig(PoolStageConfig):
    """Network actors. batch_size None = about 1 GiB of network inputs, at most 1024 rows
    (`LabelJobConfig.network_rows`): the actor groups its Ray batch by padded shape into forwards of up to
    `forward_batch_size` images of one shape, so the larger the batch the fuller the forwards (COCO photos at
    boxsize 512: 256 rows fill forwards of 16 to 0.76, 1024 rows to 0.93, measured by `bench label`).

    device: "auto" = one GPU per actor when the cluster has GPUs, else CPU; "cuda" on a cluster without GPUs
      fails at once. precision: "auto" = bf16 on GPUs that support it (decided on the actor's GPU), fp16 on
      others, fp32 on CPU. engine: "torch" (the IMHN), "onnxruntime" (CPU nodes, fp32; `pip install
      'simplepose[onnx]'`; 1.7-2.5x less CPU per image than torch, docs/benchmarks.md) or "null" (an instant
      stand-in for benchmarks). channels_last: NHWC activations (None = on CUDA only). compile: `torch.compile`.
    """
    batch_size: int | None = None
    cpus: float = 1.0
    forward_batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"
    engine: str = "torch"
    channels_last: bool | None = None
    compile: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.device in DEVICES, "NetworkStageConfig.device", f"{self.device!r} not in {DEVICES}")
        _check(self.precision in PRECISIONS, "NetworkStageConfig.precision", f"{self.precision!r} not in {PRECISIONS}")
        _check(self.forward_batch_size >= 1, "NetworkStageConfig.forward_batch_size", "must be >= 1")
        try:  # the engine's own limits (onnxruntime: CPU, fp32, installed), before any work
            check_engine(self.engine, self.device, self.precision, self.channels_last, self.compile)
        except ValueError as error:
            raise ValueError(f"NetworkStageConfig.engine: {error}") from None


@dataclass(frozen=True)
class LabelJobConfig:
    """One labeling run. Test-time defaults are `simplepose.infer.LABELING` (the authors' HEAD boxsize 640, one
    scale, flip; stride-4 maps); the decoder and the output floor are the library's defaults. Sizes are pixels.

    input: prefix, glob, single object or manifest (.parquet/.csv/.txt/.lst of URIs) of any URI.
    output: folder URI of the run (see `pipelines.label.run_folder`). model: checkpoint URI or models:/NAME@ALIAS.
    infer, decoder, floor: the library's configs. decoder.mode "reference" needs infer.aggregation
      "reference" (its decoder reads maps at the original resolution); `--mode reference` sets both.
    floor: the poses table keeps persons scoring >= floor.min_person_score with >= floor.min_keypoints keypoints.
    max_pixels: images whose header declares more pixels get status too_large (not decoded).
    chunk_size: objects per committed chunk (one images and one poses part file each; a kill loses at most
      the chunks in flight). read, decode, network, assemble: each stage's batch, CPUs and pool.
    allow_local_paths: a manifest on an object store may name local paths (read from the workers' disks).
    address: Ray cluster to join (None: $RAY_ADDRESS, else a local Ray). storage_options: fsspec options
      (endpoint_url, key, secret, profile...), set in code or by --storage-option, never logged or written.
    progress_interval_s: seconds between progress lines (logged even while no batch arrives, with the stages
      that wait for resources). stall_timeout_s: the job ends with `LabelJobStalled` after that long without
      a new output row (None or 0 = never); committed chunks stay and the re-run resumes (docs/reliability.md).
    """

    input: str
    output: str
    model: str
    infer: InferConfig = LABELING
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    floor: PoseFloor = POSE_FLOOR
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = 10_000
    read: ReadStageConfig = field(default_factory=ReadStageConfig)
    decode: DecodeStageConfig = field(default_factory=DecodeStageConfig)
    network: NetworkStageConfig = field(default_factory=NetworkStageConfig)
    assemble: AssembleStageConfig = field(default_factory=AssembleStageConfig)
    allow_local_paths: bool = False
    overwrite: bool = False
    address: str | None = None
    storage_options: Mapping[str, object] = field(default_factory=dict, repr=False, metadata=SECRET)
    progress_interval_s: float = 10.0
    stall_timeout_s: float | None = 1800.0

    def __post_init__(self):
        for name in ("input", "output", "model"):
            _check(isinstance(getattr(self, name), str) and getattr(self, name), f"LabelJobConfig.{name}",
                   "a non-empty URI is required")
        _check(min(self.chunk_size, self.max_pixels) >= 1, "LabelJobConfig.chunk_size/max_pixels", "must be >= 1")
        _check(self.stall_timeout_s is None or self.stall_timeout_s >= 0, "LabelJobConfig.stall_timeout_s",
               f"must be >= 0 or None, got {self.stall_timeout_s}")
        if self.stall_timeout_s == 0:  # 0 = never, as on the command line; stored as None
            object.__setattr__(self, "stall_timeout_s", None)
        _check(not self.decoder.is_reference or self.infer.aggregation == "reference", "LabelJobConfig: decoder.mode",
               "reference needs infer.aggregation=reference (its decoder reads maps at the original resolution); "
               "--mode reference sets both")

    def read_cpus(self) -> float:
        """Logical CPUs of a read: `read.cpus`, or the decode actors' when reads are fused into them."""
        return self.decode.cpus if self.read.cpus is None else self.read.cpus

    def network_rows(self) -> int:
        """Rows per network Ray batch: `network.batch_size`, or as many as fit ~1 GiB of uint8 inputs (a 4:3
        image per scale), between forward_batch_size and 1024."""
        if self.network.batch_size is not None:
            return self.network.batch_size
        per_image = sum(3 * (s * self.infer.boxsize) ** 2 * 4 / 3 for s in self.infer.scales)
        return int(min(1024, max(self.network.forward_batch_size, (1 << 30) // per_image)))

    def settings(self) -> dict:
        """What determines the output rows (the run id is derived from it); no secrets."""
        return {"input": self.input, "model": self.model, "infer": dataclasses.asdict(self.infer),
                "mode": self.decoder.mode, "decoder": dataclasses.asdict(self.decoder),
                "floor": dataclasses.asdict(self.floor), "max_pixels": self.max_pixels,
                "chunk_size": self.chunk_size, "allow_local_paths": self.allow_local_paths,
                "schema_version": tables.SCHEMA_VERSION}


def _check(ok: bool, where: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {reason}")


def label_config(input: str, output: str, model: str, storage_options: Mapping | None = None,
                 **settings) -> LabelJobConfig:
    """A LabelJobConfig from the same dotted keys as the command's overrides and --config files, e.g.
    `label_config("s3://b/in/", "s3://b/out", "m.pt", chunk_size=500, **{"infer.boxsize": 512})`."""
    return load_config(LabelJobConfig, values={"input": input, "output": output, "model": model, **settings},
                       secrets={"storage_options": dict(storage_options or {})})
