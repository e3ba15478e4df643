"""The Ray Train worker function of the training job (`pipelines.train.job.run_training` starts it on every worker).

`train_loop` reads top-down:

    checkpoint = ray.train.get_checkpoint()           # this run name's latest checkpoint, None on a fresh start
    worker = set_up(config, ...)                      # device, seeded IMHN (+ fine-tuning weights), optimizer, scaler
    start_epoch, step = resume(worker, checkpoint)    # weights, optimizer, scaler, epoch and step
    ddp_model = ray.train.torch.prepare_model(...)    # DDP wrap
    for epoch in range(start_epoch, total_epochs):
        metrics, step = train_epoch(...)              # train_step per batch, rank 0 logs to MLflow
        report_epoch(...)                             # metrics to Ray Train, rank 0's checkpoint to the run's storage

The recipe: staged schedule (docs/method.md §7), SGD (or Adam) with a per-iteration LR (scaled by world size,
warm-up, x0.2 steps), AMP (fp16 + GradScaler or bf16 autocast), optional SyncBN, a checkpoint every epoch. A
restarted worker group (FailureConfig) or a re-run of the same run name resumes from the latest checkpoint.

Where the CPU waits for the GPU. CUDA kernels are queued asynchronously; the CPU waits only where it needs a value
back or hands bytes on. Each is marked `# sync:` in the code. Per step:
1. `multitask_loss` returns the per-scale losses as Python floats (`.tolist()`): the CPU waits for the forward and
   the loss. The skip rule needs the total's value anyway, and the per-scale values are logged.
2. `skip_on_every_rank`: the skip flag is all-reduced and read back (`.item()`): every rank waits for every other
   rank's forward. The ranks must agree before DDP's gradient all-reduce (a lone skip would hang the others).
3. fp16 only: `GradScaler.step` reads whether the gradients hold inf/NaN before it steps (`.item()` inside torch):
   the CPU waits for the backward.
Per epoch: the checkpoint (`save_state` copies the weights to the CPU: it waits for the last step) and
`ray.train.report` (a barrier of all ranks, then the upload). The host-to-device copies of a batch do not wait
(pinned memory, `non_blocking`), and the LR, the logged numbers and images/s are computed on the CPU from values
it already has. Rank 0's MLflow writes are not GPU waits, but they stall rank 0, and the other ranks wait for it
at the next step's all-reduce.

Ray is imported inside the functions that run on Ray workers, not at the top: `simplepose train` imports this module
before `pipelines.ray_cluster.connect_ray` has applied Ray's environment settings (QUIET_ENV), which Ray reads when
it is imported.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import registry, storage, tracking
from pipelines.config import config_from_dict
from pipelines.train.config import OptimizerConfig, TrainConfig
from pipelines.train.data import CocoKeypointSamples, make_loader
from simplepose.checkpoint import load_checkpoint, save_checkpoint
from simplepose.loss import LossConfig, multitask_loss
from simplepose.model import IMHN, network_input

LOG = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # weights + optimizer + scaler + epoch + step + config (resume)

STORAGE_OPTIONS = "storage_options"
"""The loop config's key for the fsspec options of the data and the init weights. They travel to the workers
beside the config, never inside it: the config is logged to MLflow, the options never are."""


@dataclass(frozen=True)
class TrainResult:
    """run_id: MLflow run; model_version: registered version (None when registration is off);
    checkpoint_uri: the last Ray Train checkpoint; metrics: its reported metrics; evaluation / promotion:
    the chain's outcome when configured."""
    run_id: str
    model_version: str | None
    checkpoint_uri: str
    metrics: dict
    evaluation: object | None = None
    promotion: object | None = None


# ---- the recipe's pieces ---------------------------------------------------------------------------------------

def learning_rate(config: TrainConfig, stage_epoch: int, step: int, iters: int, world_size: int) -> float:
    """LR of one iteration (docs/method.md §7): base (x world size) * gamma^(stage_epoch // step_epochs), times the
    warm-up (1 + step + stage_epoch * iters) / (warmup_epochs * iters) while stage_epoch < warmup_epochs."""
    opt, sched = config.optimizer, config.schedule
    lr = opt.lr * (world_size if opt.scale_by_world_size else 1)
    lr *= sched.gamma ** (stage_epoch // sched.step_epochs)
    if stage_epoch < sched.warmup_epochs:
        lr *= (1 + step + stage_epoch * iters) / (sched.warmup_epochs * iters)
    return lr


def precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler) for a `PrecisionConfig.amp` setting on `device`."""
    if amp == "fp32":
        return None, False
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "bf16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: fp16 autocast needs CUDA, the device is {device}; use bf16 or auto")
    return (torch.float16, True) if amp == "fp16" else (torch.bfloat16, False)


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer `opt.name` names over the model's parameters (the LR is set per iteration anyway)."""
    if opt.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                           nesterov=opt.nesterov)


def save_state(path: str | os.PathLike, model: IMHN, optimizer, scaler, epoch: int, step: int,
               config: TrainConfig) -> None:
    """Everything a resumed run needs, as plain tensors and numbers (loadable with weights_only=True)."""
    # sync: `.cpu()` of every weight waits for the GPU to finish the epoch's last step.
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "config": config.to_dict()}, path)


def load_state(path: str | os.PathLike, model: IMHN, optimizer, scaler) -> tuple[int, int]:
    """Restore `save_state`'s file into model/optimizer/scaler; returns (next epoch, global step). The optimizer's
    state goes to the device its parameters are on."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["step"]


# ---- the worker function ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Worker:
    """What one Ray Train worker trains with (`set_up`). `model` is the module that DDP wraps (SyncBN-converted on
    multi-GPU runs); checkpoints are written from it."""
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: fp32, no autocast


def train_loop(loop_config: dict) -> None:
    """Ray Train worker function. loop_config: {"config": TrainConfig.to_dict(), "run_id", "tracking_uri",
    STORAGE_OPTIONS: fsspec options of the data and the init weights (may be absent)}."""
    import ray.train  # here, not at the top: see the module docstring
    import ray.train.torch

    config = config_from_dict(TrainConfig, loop_config["config"])
    options = loop_config.get(STORAGE_OPTIONS) or {}
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    worker = set_up(config, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                    init_from=None if checkpoint is not None else config.checkpoint.init_from,
                    tracking_uri=loop_config["tracking_uri"], storage_options=options)
    start_epoch, step = resume(worker, checkpoint) if checkpoint is not None else (0, 0)
    ddp_model = ray.train.torch.prepare_model(worker.model)  # DDP wrap; its broadcast carries the loaded weights
    logger = None
    if worker.rank == 0:
        logger = tracking.MetricLogger(tracking.client(loop_config["tracking_uri"]), loop_config["run_id"])
        logger.log({"resumed_at_epoch": start_epoch}, step=step)
    data = config.data
    samples = CocoKeypointSamples(data.annotations, data.images, config.augment, config.targets, data.seed,
                                  data.max_samples, storage_options=options)
    for epoch in range(start_epoch, config.total_epochs):
        metrics, step = train_epoch(worker, ddp_model, samples, epoch, step, logger)
        report_epoch(worker, {**metrics, "start_epoch": start_epoch}, logger)


def set_up(config: TrainConfig, rank: int, world: int, device: torch.device, init_from: str | None = None,
           tracking_uri: str | None = None, storage_options: Mapping[str, object] | None = None) -> Worker:
    """The worker's model (seeded, so identical on every rank; DDP also broadcasts it), optionally initialised from
    `init_from`, on `device`; its optimizer, autocast dtype and GradScaler."""
    torch.backends.cudnn.benchmark = True  # fixed input sizes per stage, as the authors ran
    torch.manual_seed(config.data.seed)  # identical initial weights on every rank
    model = IMHN.from_config(config.model)
    if init_from:
        _init_weights(model, init_from, tracking_uri, storage_options)
    if config.precision.sync_bn and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # On the device before the optimizer exists: a resumed optimizer state is then restored onto the device of the
    # parameters (`load_state`), not left on the CPU beside CUDA parameters.
    model = model.to(device)
    amp_dtype, use_scaler = precision(config.precision.amp, device)
    return Worker(config, rank, world, device, model, make_optimizer(model, config.optimizer),
                  torch.amp.GradScaler(device.type, enabled=use_scaler), amp_dtype)


def _init_weights(model: IMHN, uri: str, tracking_uri: str | None,
                  storage_options: Mapping[str, object] | None = None) -> None:
    """Fine-tuning start: copy weights from our/the authors' checkpoint or a models:/ URI (same architecture)."""
    with storage.open_binary(registry.resolve_model_uri(uri, tracking_uri=tracking_uri), storage_options) as handle:
        config, state, _ = load_checkpoint(handle)
    if config != model.config:
        raise ValueError(f"checkpoint.init_from {uri} holds {config}, but the run trains {model.config}")
    model.load_state_dict(state)


def resume(worker: Worker, checkpoint) -> tuple[int, int]:
    """(next epoch, global step) of Ray Train's `checkpoint`, whose state is loaded into the worker's model,
    optimizer and scaler."""
    # Each rank downloads into its own folder: ranks sharing Ray's temporary one can read a file while another rank
    # downloads it again (ray-project/ray#48726; seen here as a corrupt-zip error on resume).
    with tempfile.TemporaryDirectory(prefix=f"resume-rank{worker.rank}-") as folder:
        start_epoch, step = load_state(Path(checkpoint.to_directory(folder)) / STATE_FILE, worker.model,
                                       worker.optimizer, worker.scaler)
    LOG.info("rank %d resumed at epoch %d, step %d", worker.rank, start_epoch, step)
    return start_epoch, step


def train_epoch(worker: Worker, ddp_model: torch.nn.Module, samples: CocoKeypointSamples, epoch: int, step: int,
                logger: tracking.MetricLogger | None) -> tuple[dict, int]:
    """One epoch of this rank's shard: (the epoch's metrics, the global step after it). Rank 0 (the one with a
    `logger`) logs its batch loss every `tracking.log_every_steps` steps and at the epoch's last step."""
    config, world = worker.config, worker.world
    stage, stage_epoch = config.stage_at(epoch)
    data = config.data
    loader = make_loader(samples, epoch, stage.input_size, config.batch_size, worker.rank, world,
                         data.loader_workers, data.prefetch_factor, data.seed)
    iters = min(len(loader), config.max_steps_per_epoch or len(loader))
    if iters == 0:
        raise ValueError(f"train_loop: no full batch of {config.batch_size} for rank {worker.rank}/{world}")
    ddp_model.train()
    losses, epoch_start = [], time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= iters:
            break
        lr = learning_rate(config, stage_epoch, i, iters, world)
        loss, per_scale, skipped = train_step(worker, ddp_model, batch, lr, stage.loss)
        if skipped:
            LOG.warning("rank %d skips step %d: loss %.4g", worker.rank, step, loss)
            continue
        step += 1
        losses.append(loss)
        if logger and (step % config.tracking.log_every_steps == 0 or i == iters - 1):
            elapsed = time.perf_counter() - epoch_start
            # rank 0's batch loss; epoch_loss is its mean over the epoch
            logger.log({"loss": loss, "lr": lr, **{f"loss_scale{j}": v for j, v in enumerate(per_scale)},
                        "images_per_s": config.batch_size * world * (i + 1) / elapsed}, step=step)
            logger.flush()
    seconds = time.perf_counter() - epoch_start
    metrics = {"epoch": epoch, "stage": stage.name, "step": step, "epoch_loss": sum(losses) / max(len(losses), 1),
               "epoch_images_per_s": config.batch_size * world * len(losses) / seconds}
    return metrics, step


def train_step(worker: Worker, ddp_model: torch.nn.Module, batch, lr: float,
               loss_config: LossConfig) -> tuple[float, list[float], bool]:
    """One optimizer step on `batch` (images uint8, masks, targets) at `lr`: (this rank's loss, its per-scale
    losses, skipped). A skipped step (`skip_on_every_rank`) has no backward and no optimizer or scaler update."""
    for group in worker.optimizer.param_groups:
        group["lr"] = lr
    images, masks, targets = (t.to(worker.device, non_blocking=True) for t in batch)
    images = network_input(images)  # uint8 crops become float here, on the device
    with torch.autocast(worker.device.type, dtype=worker.amp_dtype or torch.float32,
                        enabled=worker.amp_dtype is not None):
        predictions = ddp_model(images)
    # sync: the per-scale losses come back as Python floats, so the CPU waits here for the forward and the loss.
    loss, per_scale = multitask_loss(predictions, targets, masks, loss_config)
    worker.optimizer.zero_grad(set_to_none=True)
    # Read once, before the backward: this is also the value logged and averaged (read after the optimizer step,
    # it would make the CPU wait for the backward as well).
    value = float(loss.detach())
    if skip_on_every_rank(value, worker.config.precision.skip_loss_above, worker.world, worker.device):
        return value, per_scale, True
    worker.scaler.scale(loss).backward()
    worker.scaler.step(worker.optimizer)  # sync (fp16 only): reads the inf/NaN check of the gradients first
    worker.scaler.update()
    return value, per_scale, False


def skip_on_every_rank(loss: float, limit: float | None, world: int, device: torch.device) -> bool:
    """Skip the step on every rank together when any rank's loss is not finite or above `limit`
    (a lone skip would leave the other ranks waiting in DDP's gradient all-reduce)."""
    bad = torch.tensor([0.0 if math.isfinite(loss) and (limit is None or loss <= limit) else 1.0], device=device)
    if world > 1:
        torch.distributed.all_reduce(bad)
    # sync: the all-reduced flag is read back, so every rank waits for all ranks' forwards (a cross-rank barrier).
    return bool(bad.item() > 0)


def report_epoch(worker: Worker, metrics: dict, logger: tracking.MetricLogger | None) -> None:
    """The epoch's metrics: to MLflow from rank 0 (`logger`), to Ray Train from every rank; rank 0 attaches the
    checkpoint (`STATE_FILE` for resuming, `registry.MODEL_FILE` to evaluate) that Ray uploads to the run's storage."""
    import ray.train  # here, not at the top: see the module docstring

    epoch, step = metrics["epoch"], metrics["step"]
    if logger:
        logger.log({k: v for k, v in metrics.items() if k not in ("stage", "step", "start_epoch")}, step=step)
        logger.flush()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if worker.rank == 0:
            save_state(Path(folder) / STATE_FILE, worker.model, worker.optimizer, worker.scaler, epoch, step,
                       worker.config)
            save_checkpoint(_unwrap(worker.model), Path(folder) / registry.MODEL_FILE,
                            {"epoch": epoch, "step": step, "stage": metrics["stage"]})
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        # sync: a barrier of all ranks, then rank 0's upload; every rank waits for it before the next epoch.
        ray.train.report(metrics, checkpoint=checkpoint)


def _unwrap(model: torch.nn.Module) -> IMHN:
    """The plain IMHN (SyncBN layers converted back to BatchNorm2d for a device-independent checkpoint)."""
    if isinstance(model, IMHN) and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return model
    plain = IMHN.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    return plain
