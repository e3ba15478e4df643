"""Ground truth: keypoints to the 50 target heatmaps, COCO person masks, multi-scale targets (SPEC §2).

Simple Pose (Li, Su, Wang, AAAI 2020); the reference is the authors' `py_data_heatmapper.py` at HEAD `0fa17df`,
re-implemented from SPEC §2 and checked against `fixtures/targets_coco_mini.npz` and goldens G1-G4.

Grid convention: a target map at stride s has cell (row i, col j) standing for the input pixel
(s*j + s/2 - 0.5, s*i + s/2 - 0.5), pixel centres at integer coordinates (so (4j + 1.5, 4i + 1.5) at stride 4).
Gaussians are evaluated at these float positions against float keypoints: the targets are sub-cell accurate.

Rendering is vectorised over persons: every window or box of every person is enumerated at once as flat cell
indices, evaluated in one numpy expression, and combined with `np.maximum.at` (max) or `np.add.at` and a
per-cell count (mean).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from simplepose.skeleton import (KEYPOINT_CHANNELS, KEYPOINT_START, LIMB_CHANNELS, LIMBS, MAX_KEYPOINT_CHANNEL,
                                 NUM_CHANNELS, NUM_KEYPOINTS, PERSON_MASK_CHANNEL)

LOG = logging.getLogger(__name__)

STYLES = ("reference", "paper")
_LIMB_FROM = np.array([a for a, _ in LIMBS])
_LIMB_TO = np.array([b for _, b in LIMBS])
_ERODE_KERNEL = np.ones((3, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """How keypoints become target heatmaps. Defaults are the reference's HEAD values (SPEC §2, §15.1).

    style "reference": keypoint Gaussians filled in a square window (never truncated by value, max over
    persons); body parts are a Gaussian of the distance to the limb's infinite line inside the endpoints'
    bounding box grown by `limb_margin`, values <= `limb_threshold` raised to `limb_floor`, mean over persons.
    style "paper": the paper's description (SPEC §10.1): keypoint Gaussians truncated by value
    (< `keypoint_threshold` -> 0); body parts a Gaussian of the perpendicular distance inside the ellipse whose
    major axis is the limb segment and whose minor semi-axis is where that Gaussian falls to `limb_threshold`,
    zero elsewhere, max over persons. `limb_floor` and `limb_margin` are not used.
    """

    style: str = "reference"
    stride: int = 4  # input pixels per target cell
    keypoint_sigma: float = 9.0  # input pixels
    keypoint_threshold: float = 0.015  # sets the 15x15-cell window (reference) or the value cut-off (paper)
    limb_sigma: float = 7.0  # input pixels
    limb_threshold: float = 0.015
    limb_floor: float = 0.01  # reference only: value of box cells whose Gaussian is <= limb_threshold
    limb_margin: float = 4.0  # reference only: input pixels added around the endpoints' box (1 stride)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"TargetConfig.style must be one of {STYLES}, got {self.style!r}")
        if not (isinstance(self.stride, int) and self.stride > 0):
            raise ValueError(f"TargetConfig.stride must be a positive int, got {self.stride!r}")
        for name in ("keypoint_sigma", "limb_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TargetConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("keypoint_threshold", "limb_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"TargetConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.limb_floor < 1 or self.limb_margin < 0:
            raise ValueError(f"TargetConfig: need 0 <= limb_floor < 1 and limb_margin >= 0, "
                             f"got {self.limb_floor!r}, {self.limb_margin!r}")

    @property
    def keypoint_radius(self) -> float:
        """Distance (input pixels) at which a keypoint Gaussian falls to `keypoint_threshold`."""
        return self.keypoint_sigma * math.sqrt(-2.0 * math.log(self.keypoint_threshold))

    @property
    def keypoint_window(self) -> int:
        """Half-width in cells of the square window around round(x / stride): 7 (15x15 cells) at HEAD values.
        The reference uses ceil(radius / stride); the paper style adds half a cell for the rounding so that
        every cell above the threshold is inside."""
        extra = self.stride / 2 if self.style == "paper" else 0.0
        return math.ceil((self.keypoint_radius + extra) / self.stride)

    @property
    def limb_half_width(self) -> float:
        """Paper style: minor semi-axis (input pixels) of the limb ellipse, where the Gaussian = threshold."""
        return self.limb_sigma * math.sqrt(-2.0 * math.log(self.limb_threshold))


def cell_centres(n: int, stride: int) -> np.ndarray:
    """Input-pixel coordinate of cells 0..n-1 along one axis: stride*i + stride/2 - 0.5, float64 (n,)."""
    return np.arange(n) * float(stride) + (stride / 2 - 0.5)


def render_heatmaps(keypoints: np.ndarray, grid_shape: tuple[int, int], config: TargetConfig = TargetConfig(),
                    person_mask: np.ndarray | None = None) -> np.ndarray:
    """Target stack for the persons of one image (SPEC §2).

    keypoints: (P, 18, 3) float, reference order, (x, y) in input pixels of the image the grid covers, recoded
        visibility (0 occluded, 1 visible, 2 absent); a keypoint is used iff v < 2. P may be 0.
    grid_shape: (h, w) cells; the grid covers an input of (h * stride, w * stride) pixels.
    person_mask: optional (h, w) float in [0, 1]: the person mask (`mask_all`) already at grid resolution;
        channel 48 becomes its 3x3 erosion (0 when None).
    Returns float32 (50, h, w) in [0, 1]: 0-29 body parts, 30-47 keypoints, 48 person mask, 49 max of 30-47.
    """
    masks = None if person_mask is None else np.asarray(person_mask)[None]
    return render_heatmaps_batch([keypoints], grid_shape, config, masks)[0]


def render_heatmaps_batch(keypoints: Sequence[np.ndarray], grid_shape: tuple[int, int],
                          config: TargetConfig = TargetConfig(), person_masks: np.ndarray | None = None
                          ) -> np.ndarray:
    """`render_heatmaps` of B images in one vectorised pass, float32 (B, 50, h, w).

    keypoints: B arrays (P_i, 18, 3) as in `render_heatmaps`; person_masks: None or (B, h, w) float in [0, 1].
    A single image's targets cost mostly numpy's per-call overhead, which a batch shares (training data
    loaders build whole batches: `simplepose.coco.build_samples`).
    """
    if len(grid_shape) != 2 or min(grid_shape) < 1:
        raise ValueError(f"render_heatmaps: grid_shape must be (h, w) >= 1, got {grid_shape!r}")
    h, w = (int(s) for s in grid_shape)
    arrays = [np.asarray(kp, dtype=np.float64) for kp in keypoints]
    for n, kp in enumerate(arrays):
        if kp.ndim != 3 or kp.shape[1:] != (NUM_KEYPOINTS, 3):
            raise ValueError(f"render_heatmaps: keypoints must be (P, {NUM_KEYPOINTS}, 3) per image, got shape "
                             f"{kp.shape} for image {n}")
    kp = np.concatenate(arrays) if arrays else np.zeros((0, NUM_KEYPOINTS, 3))
    if not np.isfinite(kp).all():
        raise ValueError("render_heatmaps: keypoints contain NaN or inf")
    out = np.zeros((len(arrays), NUM_CHANNELS, h, w), np.float32)
    # Each person's first map in `out` viewed flat as (B * 50) maps: its image's channel 0.
    image_of_person = np.repeat(np.arange(len(arrays)) * NUM_CHANNELS, [len(a) for a in arrays])
    _render_keypoints(out, image_of_person, kp, config)
    _render_limbs(out, image_of_person, kp, config)
    if person_masks is not None:
        masks = np.asarray(person_masks, dtype=np.float32)
        if masks.shape != (len(arrays), h, w):
            raise ValueError(f"render_heatmaps: person_mask must be {(h, w)} per image, got shape "
                             f"{masks.shape[1:]} for {len(masks)} of {len(arrays)} images")
        # Only a caller's mask can leave [0, 1] (the Gaussians and the floor never do): clip it first.
        for target, mask in zip(out, np.minimum(np.maximum(masks, 0.0), 1.0)):
            target[PERSON_MASK_CHANNEL] = cv2.erode(mask, _ERODE_KERNEL)
    return out


def _cells_in_boxes(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int]):
    """All cells of N inclusive boxes lo..hi ((N, 2) int as (col, row)) clipped to the grid, enumerated flat.

    Returns (box, rows, cols, origin): int64 arrays of equal length giving each cell's box and its position
    relative to `origin` (N, 2), the box's clipped top-left corner (col, row). Boxes outside the grid give
    no cells (as the reference's slicing).
    """
    origin = np.maximum(lo, 0)
    # int32 per cell: half the memory traffic of int64 on these tens of thousands of cells
    size = np.maximum(np.minimum(hi, np.array(shape[::-1]) - 1) - origin + 1, 0).astype(np.int32)  # (cols, rows)
    count = size[:, 0] * size[:, 1]
    box = np.repeat(np.arange(len(count), dtype=np.int32), count)
    local = np.arange(box.size, dtype=np.int32) - np.repeat(np.cumsum(count, dtype=np.int32) - count, count)
    rows, cols = np.divmod(local, size[box, 0])
    return box, rows, cols, origin


def _render_keypoints(out: np.ndarray, first_map: np.ndarray, kp: np.ndarray, config: TargetConfig) -> None:
    """Max-combine the keypoint Gaussians of every person into `out` (B, 50, h, w) float32, in place.
    first_map: (P,) index of each person's image's channel 0 in `out` viewed as (B * 50) maps."""
    h, w = out.shape[2:]
    person, k = np.nonzero(kp[..., 2] < 2)
    xy = kp[person, k, :2]  # (N, 2) pixels
    s, half = config.stride, config.keypoint_window
    # Window cells around round(xy / stride) on both axes at once: (N, 2 = col | row, window)
    cells = np.rint(xy / s).astype(np.int64)[:, :, None] + np.arange(-half, half + 1)
    offsets = np.subtract(cells * s + (s / 2 - 0.5), xy[:, :, None])
    gauss = np.exp(np.square(offsets, out=offsets) * (-0.5 / config.keypoint_sigma ** 2)).astype(np.float32)
    # Window cells outside the grid get weight 0 and are clipped onto it: a max with 0 changes nothing.
    last = np.array([w - 1, h - 1])[:, None]
    gauss[(cells < 0) | (cells > last)] = 0.0
    cells = np.minimum(np.maximum(cells, 0), last)  # np.clip is slower on small arrays
    g = gauss[:, 1, :, None] * gauss[:, 0, None, :]  # separable: (N, window rows, window cols)
    if config.style == "paper":
        g[g < config.keypoint_threshold] = 0.0
    rows = (cells[:, 1] * w)[:, :, None] + cells[:, 0, None, :]  # (N, window, window) cells of one map
    maps = first_map[person] * (h * w)
    # Each keypoint's channel, and channel 49 (the max over them): fewer bytes than a max over 18 maps.
    for channel in (KEYPOINT_START + k, np.full_like(k, MAX_KEYPOINT_CHANNEL)):
        np.maximum.at(out.reshape(-1), (rows + (maps + channel * (h * w))[:, None, None]).ravel(), g.ravel())


def _render_limbs(out: np.ndarray, first_map: np.ndarray, kp: np.ndarray, config: TargetConfig) -> None:
    """Body-part maps of every person into `out` (B, 50, h, w) float32, in place (mean or max combine).
    first_map: (P,) index of each person's image's channel 0 in `out` viewed as (B * 50) maps."""
    h, w = out.shape[2:]
    used = kp[..., 2] < 2
    person, limb = np.nonzero(used[:, _LIMB_FROM] & used[:, _LIMB_TO])
    a = kp[person, _LIMB_FROM[limb], :2]
    b = kp[person, _LIMB_TO[limb], :2]
    length = np.hypot(*(b - a).T)
    keep = length > 0  # the reference skips zero-length limbs (a division by zero otherwise)
    a, b, length = a[keep], b[keep], length[keep]
    channel = first_map[person[keep]] + LIMB_CHANNELS.start + limb[keep]  # in `out` viewed as (B * 50) maps
    s, off = config.stride, config.stride / 2 - 0.5
    c_lo, c_hi = _limb_boxes(a, b, length, config)
    box, rows, cols, origin = _cells_in_boxes(c_lo, c_hi, (h, w))
    if box.size == 0:
        return
    # The distance to the infinite line through a and b is linear in (col, row) up to its sign: per box,
    # t = (n . (cell - a)) / (sqrt(2) sigma) with n the line's normal over |b - a| + 1e-6 (the reference's).
    normal = np.stack([b[:, 1] - a[:, 1], a[:, 0] - b[:, 0]], axis=1) * (
        math.sqrt(0.5) / config.limb_sigma / (length + 1e-6))[:, None]
    cells = (box, rows, cols, origin * s + off, s)
    t = _linear_in_cells(normal, a, *cells)
    t_squared = np.square(t, out=t)
    g = np.negative(t_squared)
    np.exp(g, out=g)
    index_type = np.int32 if out.size < 2 ** 31 else np.int64  # int32: half the memory traffic
    flat = ((channel * h + origin[:, 1]) * w + origin[:, 0]).astype(index_type)[box]
    flat += rows * w
    flat += cols
    out = out.reshape(-1)
    if config.style == "reference":
        g[g <= config.limb_threshold] = config.limb_floor
        # Mean over persons: sum in place, then divide the few cells that several boxes share.
        np.add.at(out, flat, g)
        overlapping = _overlapping_boxes(channel, c_lo, c_hi)
        if overlapping.any():  # only boxes on the same map can share cells
            cells, count = np.unique(flat[overlapping[box]], return_counts=True)
            shared, count = cells[count > 1], count[count > 1]
            out[shared] /= count
    else:  # inside the ellipse: (along / semi-major)^2 + (distance / semi-minor)^2 <= 1
        axis = (b - a) / (length * length / 2)[:, None]
        along = _linear_in_cells(axis, (a + b) / 2, *cells)
        t_edge = math.sqrt(0.5) / config.limb_sigma * config.limb_half_width
        g[(along * along + t_squared / t_edge ** 2 > 1.0) | (g < config.limb_threshold)] = 0.0
        np.maximum.at(out, flat, g)


def _overlapping_boxes(channel: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """bool (N,): boxes lo..hi ((N, 2) inclusive cells) that share a cell with another box on the same map.

    Only pairs within a channel are compared (a batch has hundreds of boxes but a map only a few).
    """
    order = np.argsort(channel, kind="stable")
    sorted_channel = channel[order]
    starts = np.flatnonzero(np.r_[True, sorted_channel[1:] != sorted_channel[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    group = np.repeat(np.arange(len(starts)), sizes)  # of each sorted box
    partners = sizes[group]
    first = np.repeat(np.arange(len(order)), partners)  # pairs (first, second) of sorted boxes in one group
    second = np.repeat(starts[group], partners) + np.arange(partners.sum()) - np.repeat(
        np.cumsum(partners) - partners, partners)
    a, b = order[first], order[second]
    shared = (a != b) & (lo[a] <= hi[b]).all(axis=1) & (lo[b] <= hi[a]).all(axis=1)
    out = np.zeros(len(channel), bool)
    out[a[shared]] = True
    return out


def _limb_boxes(a: np.ndarray, b: np.ndarray, length: np.ndarray, config: TargetConfig
                ) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive cell boxes (lo, hi), int64 (N, 2) as (col, row), of limbs from a to b ((N, 2) pixels).

    reference: the endpoints' box grown by limb_margin pixels, edges rounded to cells (half to even);
    paper: every cell whose centre lies in the bounding box of the limb's ellipse.
    """
    s = config.stride
    if config.style == "reference":
        lo, hi = np.minimum(a, b) - config.limb_margin, np.maximum(a, b) + config.limb_margin
        return np.rint(lo / s).astype(np.int64), np.rint(hi / s).astype(np.int64)
    cos, sin = (np.abs(b - a) / length[:, None]).T
    semi_major, semi_minor = length / 2, config.limb_half_width
    extent = np.stack([np.hypot(semi_major * cos, semi_minor * sin),
                       np.hypot(semi_major * sin, semi_minor * cos)], axis=1)
    centre = (a + b) / 2 - (s / 2 - 0.5)  # in units where cell j sits at s * j
    return np.ceil((centre - extent) / s).astype(np.int64), np.floor((centre + extent) / s).astype(np.int64)


def _linear_in_cells(direction: np.ndarray, point: np.ndarray, box: np.ndarray, rows: np.ndarray,
                     cols: np.ndarray, origin: np.ndarray, stride: int) -> np.ndarray:
    """direction . (cell centre - point) for every enumerated cell, float64 (M,).

    direction, point: (N, 2) per box, (x, y); origin: (N, 2) input-pixel centre of each box's first cell;
    box, rows, cols: from `_cells_in_boxes`.
    """
    constant = (direction * (origin - point)).sum(axis=1).astype(np.float32)
    step = (direction * stride).astype(np.float32)
    # float32: |t| stays below ~100 here, so the error is ~1e-5 at most where g is already ~0, ~1e-7 near g = 1
    out = np.multiply(step[box, 0], cols, dtype=np.float32)
    out += np.multiply(step[box, 1], rows, dtype=np.float32)
    out += constant[box]
    return out


def person_masks(annotations: Iterable[Mapping], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO person masks of one image (SPEC §2.5): (mask_miss, mask_all), uint8 (height, width) in {0, 255}.

    annotations: the image's COCO person annotations in file order (dicts with `segmentation`, `iscrowd`,
        `num_keypoints`; polygons, RLE or uncompressed RLE).
    mask_miss is 0 (= not supervised) on persons with num_keypoints == 0 and on crowd regions, 255 elsewhere.
    mask_all is 255 on every person and crowd region. A crowd region first loses its overlap with the non-crowd
    persons that come before it in annotation order, as in the reference. Unlike the reference, which raises
    on a second crowd annotation, every crowd region is handled the same way and their union is used.
    """
    if height < 1 or width < 1:
        raise ValueError(f"person_masks: image size must be positive, got {height}x{width}")
    persons = np.zeros((height, width), bool)  # non-crowd persons so far
    unlabelled = np.zeros((height, width), bool)
    crowd = np.zeros((height, width), bool)
    crowds = 0
    for ann in annotations:
        if "segmentation" not in ann:
            raise ValueError(f"person_masks: annotation {ann.get('id')!r} has no 'segmentation'")
        region = _decode_segmentation(ann["segmentation"], height, width)
        if ann.get("iscrowd", 0):
            crowd |= region & ~persons
            crowds += 1
        else:
            persons |= region
            if ann.get("num_keypoints", 0) == 0:
                unlabelled |= region
    if crowds > 1:
        LOG.debug("person_masks: %d crowd regions, masked as their union (the reference raises)", crowds)
    mask_miss = np.where(unlabelled | crowd, 0, 255).astype(np.uint8)
    mask_all = np.where(persons | crowd, 255, 0).astype(np.uint8)
    return mask_miss, mask_all


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygon list, RLE, uncompressed RLE) to a bool (height, width) mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)) if segmentation else None
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        raise ValueError(f"person_masks: unsupported segmentation of type {type(segmentation).__name__}")
    if rle is None:
        return np.zeros((height, width), bool)
    if tuple(rle["size"]) != (height, width):
        raise ValueError(f"person_masks: RLE size {rle['size']} does not match the image {height}x{width}")
    return mask_utils.decode(rle).astype(bool)


def pool_targets(targets: torch.Tensor, mask: torch.Tensor, num_scales: int = 5,
                 mask_threshold: float | None = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Targets and mask at the network's output scales, highest resolution first (SPEC §2.6).

    targets: (N, C, H, W) float; mask: (N, 1, H, W) float in [0, 1]; H and W divisible by 2**(num_scales-1).
    Scale k (size H/2**k): targets by adaptive average pooling (exact block means), the mask by bilinear
    interpolation (align_corners=False, no antialiasing) with values < mask_threshold set to 0 (the rest kept
    as is; None keeps the raw bilinear mask, as the authors' `MultiTaskLossParallel` does).
    Returns a list of num_scales (targets_k, mask_k) pairs.
    """
    if not isinstance(targets, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"pool_targets: targets and mask must be tensors, got {type(targets).__name__}, "
                        f"{type(mask).__name__}")
    if targets.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != targets.shape[0] \
            or mask.shape[2:] != targets.shape[2:]:
        raise ValueError(f"pool_targets: need targets (N, C, H, W) and mask (N, 1, H, W), got "
                         f"{tuple(targets.shape)} and {tuple(mask.shape)}")
    factor = 2 ** (num_scales - 1)
    height, width = targets.shape[2:]
    if num_scales < 1 or height % factor or width % factor:
        raise ValueError(f"pool_targets: H, W = {height}, {width} must be divisible by 2**(num_scales-1) = "
                         f"{factor}")
    scales = []
    for k in range(num_scales):
        size = (height >> k, width >> k)
        mask_k = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        if mask_threshold is not None:
            mask_k = mask_k.masked_fill(mask_k < mask_threshold, 0.0)
        scales.append((F.adaptive_avg_pool2d(targets, size), mask_k))
    return scales
