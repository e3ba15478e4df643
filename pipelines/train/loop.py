"""Data-parallel mixed-precision training of the IMHN with Ray Train (V2 API), tracked in MLflow.

Driver (`run_training`): opens or resumes the MLflow run of the Ray run name, starts a `TorchTrainer`
(DDP: NCCL on GPUs, gloo on CPUs), then logs the final checkpoint, registers it as a model version with alias
`candidate`, and optionally evaluates and promotes it (the retraining chain).
Workers (`train_loop`): staged schedule (docs/method.md §7), SGD with per-iteration LR (scaled by world size, warm-up,
x0.2 steps), AMP (fp16 + GradScaler or bf16 autocast), optional SyncBN, a checkpoint every epoch to the run's
storage. A restarted worker group (FailureConfig) or a re-run of the same run name resumes from the latest
checkpoint: weights, optimizer, scaler, epoch and step.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import registry, tracking
from pipelines.train.config import OptimizerConfig, TrainConfig, config_from_dict
from pipelines.train.data import CocoKeypointSamples, make_loader
from simplepose.checkpoint import load_checkpoint, save_checkpoint
from simplepose.loss import multitask_loss
from simplepose.model import IMHN, network_input

LOG = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # weights + optimizer + scaler + epoch + step + config (resume)


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
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "config": config.to_dict()}, path)


def load_state(path: str | os.PathLike, model: IMHN, optimizer, scaler) -> tuple[int, int]:
    """Restore `save_state`'s file into model/optimizer/scaler; returns (next epoch, global step)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["step"]


def _init_weights(model: IMHN, uri: str, tracking_uri: str) -> None:
    """Fine-tuning start: copy weights from our/the authors' checkpoint or a models:/ URI (same architecture)."""
    import fsspec

    with fsspec.open(registry.resolve_model_uri(uri, tracking_uri=tracking_uri), "rb") as handle:
        config, state, _ = load_checkpoint(handle)
    if config != model.config:
        raise ValueError(f"checkpoint.init_from {uri} holds {config}, but the run trains {model.config}")
    model.load_state_dict(state)


def train_loop(loop_config: dict) -> None:
    """Ray Train worker function. loop_config: {"config": TrainConfig.to_dict(), "run_id", "tracking_uri"}."""
    import ray.train
    import ray.train.torch

    config = config_from_dict(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.backends.cudnn.benchmark = True  # fixed input sizes per stage, as the authors ran
    torch.manual_seed(config.data.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = IMHN.from_config(config.model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.checkpoint.init_from:
        _init_weights(model, config.checkpoint.init_from, loop_config["tracking_uri"])
    if config.precision.sync_bn and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, config.optimizer)
    amp_dtype, use_scaler = precision(config.precision.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, step = 0, 0
    if checkpoint is not None:
        # Each rank downloads into its own folder: ranks sharing Ray's temporary one can read a file while
        # another rank downloads it again (ray-project/ray#48726; seen here as a corrupt-zip error on resume).
        with tempfile.TemporaryDirectory(prefix=f"resume-rank{rank}-") as folder:
            start_epoch, step = load_state(Path(checkpoint.to_directory(folder)) / STATE_FILE, model, optimizer,
                                           scaler)
        LOG.info("rank %d resumed at epoch %d, step %d", rank, start_epoch, step)
    ddp_model = ray.train.torch.prepare_model(model)  # to the device, DDP wrap (weights loaded before)
    logger = None
    if rank == 0:
        logger = tracking.MetricLogger(tracking.client(loop_config["tracking_uri"]), loop_config["run_id"])
        logger.log({"resumed_at_epoch": start_epoch}, step=step)
    data = config.data
    samples = CocoKeypointSamples(data.annotations, data.images, config.augment, config.targets, data.seed,
                                  data.max_samples)
    for epoch in range(start_epoch, config.total_epochs):
        stage, stage_epoch = config.stage_at(epoch)
        loader = make_loader(samples, epoch, stage.input_size, config.batch_size, rank, world,
                             data.loader_workers, data.prefetch_factor, data.seed)
        iters = min(len(loader), config.max_steps_per_epoch or len(loader))
        if iters == 0:
            raise ValueError(f"train_loop: no full batch of {config.batch_size} for rank {rank}/{world}")
        ddp_model.train()
        totals, epoch_start = [], time.perf_counter()
        for i, (images, masks, targets) in enumerate(loader):
            if i >= iters:
                break
            lr = learning_rate(config, stage_epoch, i, iters, world)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, masks, targets = (t.to(device, non_blocking=True) for t in (images, masks, targets))
            images = network_input(images)  # uint8 crops become float here, on the device
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                predictions = ddp_model(images)
            loss, per_scale = multitask_loss(predictions, targets, masks, stage.loss)
            optimizer.zero_grad(set_to_none=True)
            if _skip(loss, config.precision.skip_loss_above, world, device):
                LOG.warning("rank %d skips step %d: loss %.4g", rank, step, float(loss))
                continue
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            totals.append(float(loss.detach()))
            if logger and (step % config.tracking.log_every_steps == 0 or i == iters - 1):
                elapsed = time.perf_counter() - epoch_start
                # rank 0's batch loss; epoch_loss is its mean over the epoch
                logger.log({"loss": totals[-1], "lr": lr, **{f"loss_scale{j}": v for j, v in enumerate(per_scale)},
                            "images_per_s": config.batch_size * world * (i + 1) / elapsed},
                           step=step)
                logger.flush()
        seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch, "stage": stage.name, "step": step, "start_epoch": start_epoch,
                   "epoch_loss": sum(totals) / max(len(totals), 1),
                   "epoch_images_per_s": config.batch_size * world * len(totals) / seconds}
        if logger:
            logger.log({k: v for k, v in metrics.items() if k not in ("stage", "step", "start_epoch")}, step=step)
            logger.flush()
        _report(metrics, model if rank == 0 else None, optimizer, scaler, epoch, step, config)


def _skip(loss: torch.Tensor, limit: float | None, world: int, device: torch.device) -> bool:
    """Skip the step on every rank together when any rank's loss is not finite or above `limit`
    (a lone skip would leave the other ranks waiting in DDP's gradient all-reduce)."""
    value = float(loss.detach())
    bad = torch.tensor([0.0 if math.isfinite(value) and (limit is None or value <= limit) else 1.0],
                       device=device)
    if world > 1:
        torch.distributed.all_reduce(bad)
    return bool(bad.item() > 0)


def _report(metrics: dict, model: IMHN | None, optimizer, scaler, epoch: int, step: int,
            config: TrainConfig) -> None:
    """Every rank reports; rank 0 (the one given `model`) attaches the checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if model is not None:
            save_state(Path(folder) / STATE_FILE, model, optimizer, scaler, epoch, step, config)
            save_checkpoint(_unwrap(model), Path(folder) / registry.MODEL_FILE,
                            {"epoch": epoch, "step": step, "stage": metrics["stage"]})
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _unwrap(model: torch.nn.Module) -> IMHN:
    """The plain IMHN (SyncBN layers converted back to BatchNorm2d for a device-independent checkpoint)."""
    if isinstance(model, IMHN) and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return model
    plain = IMHN.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    return plain
