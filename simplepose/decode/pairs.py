"""Body-part maps to scored candidate pairs: every (from, to) candidate pair of each of the 30 body parts is
scored by sampling its body-part map along the segment, all limbs at once (SPEC §8.2, §15.5).

Runs in torch on the maps' device. Coordinates are map cells (x = column, y = row); lengths for the distance
prior are in original image pixels (`scale` = image pixels per map cell).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from simplepose.decode.config import DecoderConfig
from simplepose.skeleton import LIMBS, NUM_KEYPOINTS, NUM_LIMBS

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pairs:
    """Accepted candidate pairs, ordered by limb, then `a`, then `b` (the authors' enumeration order).

    limbs, a, b: int64 (M,) body part and candidate ids of its `from` / `to` keypoint;
    scores: float64 (M,) body-part score (mean sample, plus the distance prior where enabled);
    lengths: float64 (M,) |B - A| in original image pixels.
    """

    limbs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def enumerate_pairs(types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (limb, a, b) with type(a) = from and type(b) = to of the limb, in limb, a, b order.

    types: int64 (N,) sorted keypoint types of the candidates (id = index) -> three int64 (M,) tensors.
    """
    dev = types.device
    limb_from = torch.tensor([f for f, _ in LIMBS], device=dev)
    limb_to = torch.tensor([t for _, t in LIMBS], device=dev)
    counts = torch.bincount(types, minlength=NUM_KEYPOINTS)
    starts = torch.cumsum(counts, 0) - counts
    n_to = counts[limb_to]
    per_limb = counts[limb_from] * n_to
    limbs = torch.repeat_interleave(torch.arange(NUM_LIMBS, device=dev), per_limb)
    local = torch.arange(len(limbs), device=dev) - (torch.cumsum(per_limb, 0) - per_limb)[limbs]
    n_to_pair = n_to[limbs]
    a = starts[limb_from[limbs]] + torch.div(local, n_to_pair, rounding_mode="floor")
    b = starts[limb_to[limbs]] + local % n_to_pair
    return limbs, a, b


def _distance_prior(lengths: torch.Tensor, image_height: float) -> torch.Tensor:
    """min(0.5 * image height / length - 1, 0): the authors' penalty on limbs longer than half the image height
    (their argument is named image width but receives the height, SPEC §8.2)."""
    return torch.clamp(0.5 * image_height / lengths - 1.0, max=0.0)


def reference_pair_scores(limb_maps: torch.Tensor, xy: torch.Tensor, types: torch.Tensor, image_height: float,
                          config: DecoderConfig) -> Pairs:
    """The authors' find_connections scoring, exactly (SPEC §8.2, §15.5): identity map (1 cell = 1 pixel).

    limb_maps: float32/float64 (30, H, W); xy: float64 (N, 2). n = min(round(norm + 1), max_samples) samples
    at numpy-linspace positions (endpoints included), each read at the nearest cell (round half to even);
    their mean is a sequential sum in the maps' dtype divided by n; the distance prior is added in float64.
    Accepted: count(samples > limb_threshold) >= connect_ratio * n and score > 0. Pairs at distance 0 are skipped.
    """
    limbs, a, b = enumerate_pairs(types)
    delta = xy[b] - xy[a]
    norm = torch.sqrt(delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1])
    n = torch.clamp(torch.round(norm + 1), max=config.max_samples).to(torch.int64)
    steps = torch.arange(config.max_samples, device=xy.device, dtype=torch.float64)
    step = delta / (n - 1).clamp(min=1)[:, None].to(torch.float64)
    pos = steps[None, :, None] * step[:, None, :] + xy[a][:, None, :]  # numpy linspace: t * step + start
    last = steps[None, :] == (n - 1)[:, None].to(torch.float64)
    pos = torch.where((last & (n > 1)[:, None])[..., None], xy[b][:, None, :], pos)
    valid = steps[None, :] < n[:, None]
    height, width = limb_maps.shape[-2:]
    col = torch.round(pos[..., 0]).to(torch.int64).clamp(0, width - 1)
    row = torch.round(pos[..., 1]).to(torch.int64).clamp(0, height - 1)
    samples = limb_maps.reshape(-1)[(limbs[:, None] * height + row) * width + col]
    samples = torch.where(valid, samples, torch.zeros_like(samples))
    total = samples[:, 0].clone()
    for k in range(1, config.max_samples):  # sequential, as the authors' Python sum (adding 0 is exact)
        total = total + samples[:, k]
    mean = total / n.to(samples.dtype)
    scores = mean.to(torch.float64) + _distance_prior(norm, image_height)
    on = ((samples > config.limb_threshold) & valid).sum(dim=1)
    keep = (norm > 0) & (on >= config.connect_ratio * n) & (scores > 0)
    return Pairs(limbs[keep], a[keep], b[keep], scores[keep], norm[keep])


def stride_pair_scores(limb_maps: torch.Tensor, xy: torch.Tensor, types: torch.Tensor, scale: float,
                       image_height: float, config: DecoderConfig) -> Pairs:
    """Our pair scores on maps of any stride: max_samples points evenly spaced from A to B (endpoints
    included), read bilinearly (`bilinear_samples`) or at the nearest cell.

    limb_maps: float32 (30, h, w); xy: float64 (N, 2) map cells; scale: image pixels per map cell.
    Score = mean sample (+ the distance prior when `distance_prior`); accepted like the reference.
    """
    limbs, a, b = enumerate_pairs(types)
    height, width = limb_maps.shape[-2:]
    start = xy[a].to(torch.float32)
    delta = xy[b].to(torch.float32) - start
    lengths = torch.linalg.vector_norm(delta.to(torch.float64), dim=1) * scale
    t = torch.linspace(0.0, 1.0, config.max_samples, device=xy.device)
    pos = start[:, None, :] + t[None, :, None] * delta[:, None, :]
    x = pos[..., 0].clamp(0, width - 1)
    y = pos[..., 1].clamp(0, height - 1)
    flat = limb_maps.reshape(-1)
    base = limbs[:, None] * (height * width)
    if config.bilinear_samples:
        x0 = x.floor().clamp(max=max(width - 2, 0))
        y0 = y.floor().clamp(max=max(height - 2, 0))
        fx, fy = x - x0, y - y0
        i00 = base + y0.to(torch.int64) * width + x0.to(torch.int64)
        dx, dy = int(width > 1), width * int(height > 1)
        top = flat[i00] * (1 - fx) + flat[i00 + dx] * fx
        bottom = flat[i00 + dy] * (1 - fx) + flat[i00 + dy + dx] * fx
        samples = top * (1 - fy) + bottom * fy
    else:
        samples = flat[base + torch.round(y).to(torch.int64) * width + torch.round(x).to(torch.int64)]
    scores = samples.mean(dim=1).to(torch.float64)
    if config.distance_prior:
        scores = scores + _distance_prior(lengths, image_height)
    on = (samples > config.limb_threshold).sum(dim=1)
    keep = (lengths > 0) & (on >= config.connect_ratio * config.max_samples) & (scores > 0)
    return Pairs(limbs[keep], a[keep], b[keep], scores[keep], lengths[keep])
