"""Training job configuration: typed, frozen dataclasses loaded from YAML with dotted overrides.

`load_train_config("jobs/configs/paper.yaml", ["optimizer.lr=1e-3", "scaling.num_workers=2"])` reads the file,
applies the overrides (values parsed as YAML scalars) and builds a `TrainConfig`. Unknown keys, wrong types
and impossible values raise a ValueError naming the dotted key. Defaults are the authors' recipe (docs/method.md §7).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipelines import tracking
from pipelines.config import load_config, to_dict
from simplepose.augment import AugmentConfig
from simplepose.loss import LossConfig
from simplepose.model import IMHNConfig
from simplepose.targets import TargetConfig

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """A COCO keypoint training set: annotation JSON + image prefix, both any fsspec URI (s3://, file, path).

    Image i is read from `images + "/" + file_name`. `loader_workers` torch DataLoader processes per Ray Train
    worker build augmented samples in parallel so the accelerator does not wait.
    """
    annotations: str = "s3://coco/annotations/person_keypoints_train2017.json"
    images: str = "s3://coco/train2017"
    loader_workers: int = 4
    prefetch_factor: int = 2
    seed: int = 0
    max_samples: int | None = None  # keep the first N samples (small runs and tests); None = all


@dataclass(frozen=True)
class StageConfig:
    """One phase of the staged recipe: its own epoch counter (LR steps and warm-up restart), input size, loss."""
    name: str = "focal512"
    epochs: int = 15
    input_size: int = 512
    loss: LossConfig = field(default_factory=LossConfig)


def _paper_stages() -> tuple[StageConfig, ...]:
    # docs/method.md §7 staged recipe: L2 at 384, then focal L2 at 384, then focal L2 at 512 (the checkpoint log).
    # L2 is the focal loss with gamma 0; focal is the authors' |1 - s_t| form (LossConfig defaults, docs/method.md §6).
    return (StageConfig("l2_384", 16, 384, LossConfig.preset("l2")),
            StageConfig("focal384", 35, 384, LossConfig()),
            StageConfig("focal512", 15, 512, LossConfig()))


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD (docs/method.md §7). `lr` is per worker: the applied base LR is lr x world size when `scale_by_world_size`.

    `name` "adam" (a named option, not the authors') uses Adam with the same lr, schedule and weight decay
    (momentum and nesterov are SGD-only): it trains small networks from the reference init in minutes.
    """
    name: str = "sgd"
    lr: float = 2.5e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    scale_by_world_size: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """Per-iteration LR: base * gamma^(stage_epoch // step_epochs), times a linear warm-up over the first
    `warmup_epochs` of every stage, (1 + step + epoch * iters) / (warmup_epochs * iters) (docs/method.md §7)."""
    gamma: float = 0.2
    step_epochs: int = 15
    warmup_epochs: int = 3


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers. `cpus_per_worker` below 1 avoids Ray's silent hang on 2-CPU machines
    (whole-CPU workers leave none for data reads)."""
    num_workers: int = 4
    use_gpu: bool = True
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None


@dataclass(frozen=True)
class PrecisionConfig:
    """Mixed precision: "auto" = fp16 + GradScaler on CUDA, bf16 autocast on CPU; or "fp16", "bf16", "fp32"."""
    amp: str = "auto"
    sync_bn: bool = True
    skip_loss_above: float | None = 2e5  # the authors skip a batch whose loss explodes (docs/method.md §7)


@dataclass(frozen=True)
class CheckpointSection:
    """Where Ray Train keeps the run (any URI); re-running the same `run_name` resumes its last checkpoint.

    `init_from` starts a new run from weights (ours, the authors', or models:/name@alias) for fine-tuning.
    """
    storage_path: str = "s3://simplepose/train-runs"
    run_name: str = "imhn-paper"
    num_to_keep: int = 2
    max_failures: int = 3
    init_from: str | None = None


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. A relative sqlite path or artifact location is resolved against the working directory."""
    tracking_uri: str = tracking.DEFAULT_TRACKING_URI
    experiment: str = "simplepose-train"
    artifact_location: str = tracking.DEFAULT_ARTIFACT_LOCATION
    registered_model: str = "simplepose-imhn"
    register: bool = True
    log_every_steps: int = 10


@dataclass(frozen=True)
class EvaluationSection:
    """Evaluate the trained model after training (the retraining chain). `set_name` keys the AP on the model
    version so that `promote` compares like with like."""
    annotations: str
    images: str
    set_name: str
    preset: str = "paper"
    scales: tuple[float, ...] | None = None
    flip: bool | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """A training job: model, data, staged schedule, optimizer, scaling, precision, checkpoints, MLflow,
    and optionally the evaluation + promotion that follow it in the retraining chain."""
    model: IMHNConfig = field(default_factory=IMHNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    stages: tuple[StageConfig, ...] = field(default_factory=_paper_stages)
    batch_size: int = 8  # per worker; 4 workers x 8 = the paper's 32
    max_steps_per_epoch: int | None = None  # cut epochs short (small runs and tests)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationSection | None = None
    promote: bool = False  # after evaluation, move `champion` to this version if its AP is higher

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(len(self.stages) >= 1, "stages", "needs at least one stage")
        for i, stage in enumerate(self.stages):
            _check(stage.epochs >= 1, f"stages.{i}.epochs", f"must be >= 1, got {stage.epochs}")
            _check(stage.input_size % 64 == 0 and stage.input_size > 0, f"stages.{i}.input_size",
                   f"must be a positive multiple of 64, got {stage.input_size}")
        _check(self.precision.amp in ("auto", "fp16", "bf16", "fp32"), "precision.amp",
               f"must be auto, fp16, bf16 or fp32, got {self.precision.amp!r}")
        _check(self.optimizer.name in ("sgd", "adam"), "optimizer.name",
               f"must be sgd or adam, got {self.optimizer.name!r}")
        _check(self.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        _check(self.promote is False or self.evaluation is not None, "promote",
               "needs an `evaluation` section (promotion compares the COCO AP it records)")

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def stage_at(self, epoch: int) -> tuple[StageConfig, int]:
        """The stage that global epoch `epoch` (0-based) belongs to and the epoch inside that stage."""
        for stage in self.stages:
            if epoch < stage.epochs:
                return stage, epoch
            epoch -= stage.epochs
        raise ValueError(f"TrainConfig.stage_at: epoch beyond the {self.total_epochs} configured epochs")

    def to_dict(self) -> dict:
        """Plain nested dict (lists for tuples): YAML/JSON-serialisable and accepted by `pipelines.config.config_from_dict`."""
        return to_dict(self)


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig: {key} {reason}")


def load_train_config(uri: str | None, overrides: list[str] = (), storage_options: dict | None = None
                      ) -> TrainConfig:
    """Read a YAML job config (any URI, read with `storage_options`; None = all defaults) and apply dotted
    overrides (`pipelines.config`)."""
    return load_config(TrainConfig, uri, overrides, storage_options=storage_options)
