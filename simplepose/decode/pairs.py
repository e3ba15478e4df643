"""Body-part maps to scored candidate pairs: every (from, to) candidate pair of each of the 30 body parts is
scored by sampling its body-part map along the segment, all limbs at once (docs/method.md §9.2).

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
    """Accepted candidate pairs, ordered by image, limb, then `a`, then `b` (the authors' enumeration order).

    limbs, a, b: int64 (M,) body part and candidate ids of its `from` / `to` keypoint;
    scores: float64 (M,) body-part score (mean sample, plus the distance prior where enabled);
    lengths: float64 (M,) |B - A| in original image pixels; images: int64 (M,) image in the batch.
    """

    limbs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor
    images: torch.Tensor


def enumerate_pairs(types: torch.Tensor, images: torch.Tensor | None = None, n_images: int = 1):
    """All (limb, a, b) with type(a) = from and type(b) = to of the limb within one image, in image, limb, a,
    b order. types / images: int64 (N,) of candidates sorted by image then type (id = index) ->
    (limbs, a, b, pair images) int64 (M,)."""
    dev = types.device
    images = torch.zeros_like(types) if images is None else images
    limb_from = torch.tensor([f for f, _ in LIMBS], device=dev)
    limb_to = torch.tensor([t for _, t in LIMBS], device=dev)
    counts = torch.bincount(images * NUM_KEYPOINTS + types, minlength=n_images * NUM_KEYPOINTS)
    starts = (torch.cumsum(counts, 0) - counts).reshape(n_images, NUM_KEYPOINTS)
    counts = counts.reshape(n_images, NUM_KEYPOINTS)
    n_to = counts[:, limb_to].reshape(-1)  # (image, limb) groups, image-major
    per_group = counts[:, limb_from].reshape(-1) * n_to
    group = torch.repeat_interleave(torch.arange(n_images * NUM_LIMBS, device=dev), per_group)
    local = torch.arange(len(group), device=dev) - (torch.cumsum(per_group, 0) - per_group)[group]
    pair_images, limbs = group // NUM_LIMBS, group % NUM_LIMBS
    a = starts[pair_images, limb_from[limbs]] + torch.div(local, n_to[group], rounding_mode="floor")
    b = starts[pair_images, limb_to[limbs]] + local % n_to[group]
    return limbs, a, b, pair_images


def _distance_prior(lengths: torch.Tensor, image_height: float) -> torch.Tensor:
    """min(0.5 * image height / length - 1, 0): the authors' penalty on limbs longer than half the image height
    (their argument is named image width but receives the height, docs/method.md §9.2)."""
    return torch.clamp(0.5 * image_height / lengths - 1.0, max=0.0)


def reference_pair_scores(limb_maps: torch.Tensor, xy: torch.Tensor, types: torch.Tensor, image_height: float,
                          config: DecoderConfig) -> Pairs:
    """The authors' find_connections scoring, exactly (docs/method.md §9.2): identity map (1 cell = 1 pixel).

    limb_maps: float32/float64 (30, H, W); xy: float64 (N, 2). n = min(round(norm + 1), max_samples) samples
    at numpy-linspace positions (endpoints included), each read at the nearest cell (round half to even);
    their mean is a sequential sum in the maps' dtype divided by n; the distance prior is added in float64.
    Accepted: count(samples > limb_threshold) >= connect_ratio * n and score > 0. Pairs at distance 0 are skipped.
    """
    limbs, a, b, _ = enumerate_pairs(types)
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
    return Pairs(limbs[keep], a[keep], b[keep], scores[keep], norm[keep], torch.zeros_like(a[keep]))


def stride_pair_scores(batch: list[torch.Tensor], peaks, scales: torch.Tensor, image_heights: torch.Tensor,
                       config: DecoderConfig) -> Pairs:
    """Our pair scores on maps of any stride: `pair_samples` points evenly spaced from A to B (endpoints
    included), read bilinearly (`bilinear_samples`) or at the nearest cell.

    batch: body-part maps float32 (30, h_i, w_i) per image; peaks: `Peaks` of the batch (map cells);
    scales: float64 (B,) image pixels per map cell; image_heights: float64 (B,) original heights in pixels.
    Score = mean sample (+ the distance prior when `distance_prior`); accepted like the reference.
    """
    dev = peaks.xy.device
    limbs, a, b, images = enumerate_pairs(peaks.types, peaks.images, len(batch))
    shapes = torch.tensor([maps.shape[1:] for maps in batch], device=dev, dtype=torch.int64).reshape(-1, 2)
    height, width = shapes[images, 0][:, None], shapes[images, 1][:, None]
    start = peaks.xy[a].to(torch.float32)
    delta = peaks.xy[b].to(torch.float32) - start
    lengths = torch.linalg.vector_norm(delta.to(torch.float64), dim=1) * scales[images]
    t = torch.linspace(0.0, 1.0, config.pair_samples, device=dev)
    pos = start[:, None, :] + t[None, :, None] * delta[:, None, :]
    x = torch.minimum(pos[..., 0].clamp(min=0), (width - 1).to(torch.float32))
    y = torch.minimum(pos[..., 1].clamp(min=0), (height - 1).to(torch.float32))
    base = limbs[:, None] * (height * width)
    if config.bilinear_samples:
        x0 = torch.minimum(x.floor(), (width - 2).clamp(min=0).to(torch.float32))
        y0 = torch.minimum(y.floor(), (height - 2).clamp(min=0).to(torch.float32))
        fx, fy = (x - x0)[..., None], (y - y0)[..., None]
        i00 = base + y0.to(torch.int64) * width + x0.to(torch.int64)
        dx, dy = (width > 1).to(torch.int64), width * (height > 1).to(torch.int64)
        corners = _gather(batch, images, torch.stack([i00, i00 + dx, i00 + dy, i00 + dy + dx], dim=-1))
        top = corners[..., 0:1] * (1 - fx) + corners[..., 1:2] * fx
        bottom = corners[..., 2:3] * (1 - fx) + corners[..., 3:4] * fx
        samples = (top * (1 - fy) + bottom * fy)[..., 0]
    else:
        nearest = base + torch.round(y).to(torch.int64) * width + torch.round(x).to(torch.int64)
        samples = _gather(batch, images, nearest)
    scores = samples.mean(dim=1).to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError("decode: body-part heatmaps contain NaN or inf")
    if config.distance_prior:
        scores = scores + _distance_prior(lengths, image_heights[images])
    on = (samples > config.limb_threshold).sum(dim=1)
    keep = (lengths > 0) & (on >= config.connect_ratio * config.pair_samples) & (scores > 0)
    return Pairs(limbs[keep], a[keep], b[keep], scores[keep], lengths[keep], images[keep])


def _gather(batch: list[torch.Tensor], images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values of each image's flattened maps at `index` (M, ...) int64, for pairs sorted by image (M,)."""
    sizes = torch.bincount(images, minlength=len(batch)).tolist()
    return torch.cat([maps.reshape(-1)[part] for maps, part in zip(batch, torch.split(index, sizes))])
