"""Multi-scale, multi-stack focal L2 loss: IMHN outputs + targets + mask to a scalar (docs/method.md §6).

Paper: Li, Su, Wang, "Simple Pose", AAAI 2020, focal L2 loss; original code hellojialee/Improved-Body-Parts
(`models/loss_model.py::MultiTaskLoss`, `models/loss_model_parallel.py::MultiTaskLossParallel`).

For stack i and scale j, with p the prediction, g the target and m the mask pooled to that scale:

    L(i, j) = sum over n, c, y, x of (p - g)^2 * factor * m * w_c
    factor  = |1 - s_t|^gamma,  s_t = p - alpha where g >= threshold ("foreground"), else 1 - p - beta
    total   = sum_j scale_w[j] * (sum_i stack_w[i] * L(i, j) / sum stack_w) / sum scale_w / N

Presets (`LOSS_PRESETS`, `LossConfig.preset(name)`):
* "reference" (default): the authors' training code: alpha = beta = 0, gamma = 1 (factor |1 - s_t|),
  channel weights (keypoints x3, person mask x0.1), mask thresholded at 0.5, divided by the batch size.
* "l2": the plain L2 inside MultiTaskLoss (factor 1, same weights and mask).
* "paper": the paper's focal L2 (alpha 0.1, beta 0.02, gamma 2), otherwise as "reference".
* "parallel_l2": MultiTaskLossParallel: plain L2, no channel weights, raw (unthresholded) bilinear mask,
  no division by the batch size.
The sums run over cells (no mean over pixels), so the loss scales with the map area.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from simplepose.skeleton import KEYPOINT_CHANNELS, NUM_CHANNELS, PERSON_MASK_CHANNEL
from simplepose.targets import pool_targets

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss parameters; the defaults are the authors' training code (docs/method.md §6, preset "reference").

    focal_gamma 0 gives the plain L2. stack_weights None means 1 for every stack. threshold_mask: pooled mask
    values below 0.5 become 0 (docs/method.md §3.6); False keeps the raw bilinear mask (MultiTaskLossParallel).
    """

    focal_alpha: float = 0.0
    focal_beta: float = 0.0
    focal_gamma: float = 1.0
    focal_threshold: float = 0.01  # targets >= this count as foreground
    keypoint_weight: float = 3.0  # channels 30-47
    person_mask_weight: float = 0.1  # channel 48
    stack_weights: tuple[float, ...] | None = None
    scale_weights: tuple[float, ...] = (0.1, 0.2, 0.4, 1.6, 6.4)  # highest resolution (stride 4) first
    threshold_mask: bool = True
    divide_by_batch: bool = True

    def __post_init__(self):
        if self.focal_gamma < 0:
            raise ValueError(f"LossConfig.focal_gamma must be >= 0, got {self.focal_gamma}")
        if not self.scale_weights or sum(self.scale_weights) <= 0:
            raise ValueError(f"LossConfig.scale_weights must be non-empty with a positive sum, "
                             f"got {self.scale_weights}")
        if self.stack_weights is not None and (not self.stack_weights or sum(self.stack_weights) <= 0):
            raise ValueError(f"LossConfig.stack_weights must be None or have a positive sum, "
                             f"got {self.stack_weights}")
        # YAML and JSON give lists; keep the config hashable.
        object.__setattr__(self, "scale_weights", tuple(float(w) for w in self.scale_weights))
        if self.stack_weights is not None:
            object.__setattr__(self, "stack_weights", tuple(float(w) for w in self.stack_weights))

    @classmethod
    def preset(cls, name: str, **overrides) -> LossConfig:
        """The named variant (see the module docstring), with optional field overrides."""
        if name not in LOSS_PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(LOSS_PRESETS)}")
        return dataclasses.replace(LOSS_PRESETS[name], **overrides)

    def channel_weights(self, channels: int = NUM_CHANNELS) -> torch.Tensor:
        """w_c as float32 (channels,): 1, keypoint_weight on channels 30-47, person_mask_weight on 48."""
        weights = torch.ones(channels)
        weights[KEYPOINT_CHANNELS] = self.keypoint_weight
        weights[PERSON_MASK_CHANNEL] = self.person_mask_weight
        return weights


LOSS_PRESETS: dict[str, LossConfig] = {
    "reference": LossConfig(),
    "l2": LossConfig(focal_gamma=0.0),
    "paper": LossConfig(focal_alpha=0.1, focal_beta=0.02, focal_gamma=2.0),
    "parallel_l2": LossConfig(focal_gamma=0.0, keypoint_weight=1.0, person_mask_weight=1.0,
                              threshold_mask=False, divide_by_batch=False),
}


def heatmap_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 channel_weights: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """L(i, j) for one stack and scale: (N,C,h,w) prediction and target, (N,1,h,w) mask, (C,) weights ->
    float32 scalar, the weighted masked (focal) squared error summed over every cell."""
    prediction = prediction.float()
    loss = (prediction - target) ** 2
    if config.focal_gamma != 0:
        foreground = target >= config.focal_threshold
        s_t = torch.where(foreground, prediction - config.focal_alpha, 1 - prediction - config.focal_beta)
        loss = loss * (1 - s_t).abs() ** config.focal_gamma
    return (loss * mask * channel_weights[:, None, None]).sum()


def multitask_loss(predictions: list[list[torch.Tensor]], targets: torch.Tensor, mask: torch.Tensor,
                   config: LossConfig = LossConfig()) -> tuple[torch.Tensor, list[float]]:
    """Total loss of IMHN outputs against full-resolution targets.

    predictions: per stack, the 5 (N,50,h_j,w_j) maps of `IMHN.forward`, highest resolution first (any float
    dtype, e.g. bf16 under autocast; the loss is computed in float32). targets: float (N,50,H,W) at the
    resolution of predictions[*][0]; mask: float (N,1,H,W) in [0, 1] (0 = ignore). Both are pooled to every
    scale with `simplepose.targets.pool_targets` (docs/method.md §3.6).
    Returns (total float32 scalar with grad, per_scale: L_j = stack-weighted mean of L(i, j) for each scale,
    divided by N when config.divide_by_batch, as Python floats for logging).
    """
    stacks, scales = _check_inputs(predictions, targets, mask, config)
    with torch.autocast(targets.device.type, enabled=False):
        pooled = pool_targets(targets.float(), mask.float(), num_scales=scales,
                              mask_threshold=0.5 if config.threshold_mask else None)
        stack_weights = config.stack_weights or (1.0,) * stacks
        channel_weights = config.channel_weights(targets.shape[1]).to(targets.device)
        per_scale = []
        for j, (target_j, mask_j) in enumerate(pooled):
            stack_sum = sum(w * heatmap_loss(predictions[i][j], target_j, mask_j, channel_weights, config)
                            for i, w in enumerate(stack_weights))
            per_scale.append(stack_sum / sum(stack_weights))
        per_scale_t = torch.stack(per_scale)
        if config.divide_by_batch:
            per_scale_t = per_scale_t / targets.shape[0]
        total = (per_scale_t * per_scale_t.new_tensor(config.scale_weights)).sum() / sum(config.scale_weights)
    return total, per_scale_t.detach().tolist()


def _check_inputs(predictions, targets: torch.Tensor, mask: torch.Tensor, config: LossConfig
                  ) -> tuple[int, int]:
    if not isinstance(targets, torch.Tensor) or targets.ndim != 4 or targets.shape[1] != NUM_CHANNELS:
        raise ValueError(f"multitask_loss targets must be a (N,{NUM_CHANNELS},H,W) tensor, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    n, _, height, width = targets.shape
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, 1, height, width):
        raise ValueError(f"multitask_loss mask must be ({n},1,{height},{width}) like the targets, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if not isinstance(predictions, (list, tuple)) or not predictions:
        raise ValueError("multitask_loss predictions must be a non-empty list (stacks) of lists (scales)")
    scales = len(config.scale_weights)
    if config.stack_weights is not None and len(config.stack_weights) != len(predictions):
        raise ValueError(f"LossConfig.stack_weights has {len(config.stack_weights)} entries for "
                         f"{len(predictions)} stacks of predictions")
    if height % 2 ** (scales - 1) or width % 2 ** (scales - 1):
        raise ValueError(f"multitask_loss targets {height}x{width} must be divisible by {2 ** (scales - 1)} "
                         f"to pool to {scales} scales")
    for i, stack in enumerate(predictions):
        if not isinstance(stack, (list, tuple)) or len(stack) != scales:
            got = f"{len(stack)} scales" if isinstance(stack, (list, tuple)) else type(stack).__name__
            raise ValueError(f"multitask_loss predictions[{i}] must be a list of {scales} scales "
                             f"(one per scale weight), got {got}")
        for j, p in enumerate(stack):
            expected = (n, NUM_CHANNELS, height >> j, width >> j)
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != expected:
                raise ValueError(f"multitask_loss predictions[{i}][{j}] must have shape {expected}, got "
                                 f"{getattr(p, 'shape', type(p).__name__)}")
    return len(predictions), scales
