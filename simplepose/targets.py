"""Ground truth: keypoints to the 50 target heatmaps, COCO person masks, multi-scale targets (docs/method.md §3).

Simple Pose (Li, Su, Wang, AAAI 2020); the reference is the authors' `py_data_heatmapper.py` at HEAD `0fa17df`,
re-implemented (docs/method.md §3) and checked against `fixtures/targets_coco_mini.npz` and goldens G1-G4.

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
import numba
import numpy as np
import torch
import torch.nn.functional as F

from simplepose.skeleton import (KEYPOINT_START, LIMB_CHANNELS, LIMBS, MAX_KEYPOINT_CHANNEL, NUM_CHANNELS,
                                 NUM_KEYPOINTS, PERSON_MASK_CHANNEL)

LOG = logging.getLogger(__name__)

STYLES = ("reference", "paper")
_LIMB_FROM = np.array([a for a, _ in LIMBS])
_LIMB_TO = np.array([b for _, b in LIMBS])
_ERODE_KERNEL = np.ones((3, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """How keypoints become target heatmaps. Defaults are the reference's HEAD values (docs/method.md §3).

    style "reference": keypoint Gaussians filled in a square window (never truncated by value, max over
    persons); body parts are a Gaussian of the distance to the limb's infinite line inside the endpoints'
    bounding box grown by `limb_margin`, values <= `limb_threshold` raised to `limb_floor`, mean over persons.
    style "paper": the paper's description (docs/method.md §3.7, §11.1): keypoint Gaussians truncated by value
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
    """Target stack for the persons of one image (docs/method.md §3).

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
    """`render_heatmaps` of B images, float32 (B, 50, h, w).

    keypoints: B arrays (P_i, 18, 3) as in `render_heatmaps`; person_masks: None or (B, h, w) float in [0, 1].
    The windows and boxes of the whole batch are laid out together (numpy: its per-call cost is shared);
    then each image is zeroed and drawn by compiled kernels while its 3 MB are in cache. Training loaders
    build whole batches (`simplepose.samples.build_samples`).
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
    masks = None
    if person_masks is not None:
        masks = np.asarray(person_masks, dtype=np.float32)
        if masks.shape != (len(arrays), h, w):
            raise ValueError(f"render_heatmaps: person_mask must be {(h, w)} per image, got shape "
                             f"{masks.shape[1:]} for {len(masks)} of {len(arrays)} images")
        # Only a caller's mask can leave [0, 1] (the Gaussians and the floor never do): clip it first.
        masks = np.minimum(np.maximum(masks, 0.0), 1.0)
    image = np.repeat(np.arange(len(arrays)), [len(persons) for persons in arrays])  # of each person
    windows, window_image = _keypoint_windows(kp, image)
    boxes, box_image = _limb_boxes_per_image(kp, image, (h, w), config)
    # image n's windows and boxes are at bounds[n]:bounds[n + 1] of theirs
    window_bounds, box_bounds = (np.searchsorted(of, np.arange(len(arrays) + 1)) for of in (window_image,
                                                                                            box_image))
    keypoint_constants = (MAX_KEYPOINT_CHANNEL, config.stride, -0.5 / config.keypoint_sigma ** 2,
                          config.keypoint_window,  # paper style: values below the threshold cut to 0
                          np.float32(config.keypoint_threshold if config.style == "paper" else 0.0))
    if config.style == "reference":
        draw_limbs = _draw_limbs_mean
        limb_constants = (np.float32(config.limb_threshold), np.float32(config.limb_floor))
    else:
        draw_limbs = _draw_limbs_max
        t_edge = math.sqrt(0.5) / config.limb_sigma * config.limb_half_width
        limb_constants = (np.float32(t_edge ** 2), np.float32(config.limb_threshold))
    out = np.empty((len(arrays), NUM_CHANNELS, h, w), np.float32)
    for n, target in enumerate(out):
        target.fill(0.0)  # image by image: its 3 MB are still in cache when drawn on
        _draw_keypoints(target, *(array[window_bounds[n]:window_bounds[n + 1]] for array in windows),
                        *keypoint_constants)
        draw_limbs(target, *(array[box_bounds[n]:box_bounds[n + 1]] for array in boxes), *limb_constants)
        if masks is not None:
            target[PERSON_MASK_CHANNEL] = cv2.erode(masks[n], _ERODE_KERNEL)
    return out


def _keypoint_windows(kp: np.ndarray, image: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The keypoints to draw, in image order: ((channel (N,), xy (N, 2) input pixels), image (N,) of each).
    kp: (P, 18, 3) of all images, each image's persons together; image: (P,) of each person."""
    person, k = np.nonzero(kp[..., 2] < 2)  # in person order, so in image order
    return (KEYPOINT_START + k, kp[person, k, :2]), image[person]


def _limb_boxes_per_image(kp: np.ndarray, image: np.ndarray, grid: tuple[int, int], config: TargetConfig
                          ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The body-part boxes to draw, sorted by (image, channel, person), and the image (N,) of each.

    Returns (channel, origin, size, t_step, t_start[, along_step, along_start] for the paper style): origin
    (col, row) of the box's first cell and size (cols, rows), clipped to the grid; t = t_step . (col, row) +
    t_start is the scaled distance to the limb's line, `along` the position along it (`_linear_coefficients`).
    """
    h, w = grid
    used = kp[..., 2] < 2
    person, limb = np.nonzero(used[:, _LIMB_FROM] & used[:, _LIMB_TO])
    a = kp[person, _LIMB_FROM[limb], :2]
    b = kp[person, _LIMB_TO[limb], :2]
    length = np.hypot(*(b - a).T)
    keep = length > 0  # the reference skips zero-length limbs (a division by zero otherwise)
    order = np.flatnonzero(keep)[np.lexsort((limb[keep], image[person[keep]]))]  # stable: persons in order
    a, b, length, person = a[order], b[order], length[order], person[order]
    channel = LIMB_CHANNELS.start + limb[order]
    s = config.stride
    lo, hi = _limb_boxes(a, b, length, config)
    origin = np.maximum(lo, 0)  # boxes clipped to the grid, as the reference's slicing
    size = np.maximum(np.minimum(hi, (w - 1, h - 1)) - origin + 1, 0)  # (cols, rows), 0 when off the grid
    first_centre = origin * s + (s / 2 - 0.5)  # input pixels of each box's first cell
    # The distance to the infinite line through a and b is linear in (col, row) up to its sign: per box,
    # t = (n . (cell - a)) / (sqrt(2) sigma) with n the line's normal over |b - a| + 1e-6 (the reference's).
    normal = np.stack([b[:, 1] - a[:, 1], a[:, 0] - b[:, 0]], axis=1) * (
        math.sqrt(0.5) / config.limb_sigma / (length + 1e-6))[:, None]
    boxes = (channel, origin, size, *_linear_coefficients(normal, a, first_centre, s))
    if config.style == "paper":  # along the segment from its centre, in units of the semi-major axis
        boxes += _linear_coefficients((b - a) / (length * length / 2)[:, None], (a + b) / 2, first_centre, s)
    return boxes, image[person]


def _linear_coefficients(direction: np.ndarray, point: np.ndarray, first_centre: np.ndarray, stride: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """direction . (cell centre - point) = step . (col, row) + start, for the cells (col, row) of a box counted
    from its first cell, whose centre is first_centre. Inputs (N, 2) per box as (x, y); returns float32
    step (N, 2) and start (N,). float32: |t| stays below ~100 here, so the error is ~1e-5 at most where the
    Gaussian is already ~0, ~1e-7 near its peak."""
    return ((direction * stride).astype(np.float32),
            (direction * (first_centre - point)).sum(axis=1).astype(np.float32))


# The kernels below visit every cell of every keypoint window and limb box. Compiled (numba), a cell costs a
# few nanoseconds; enumerating the cells with numpy cost more in per-call overhead than in arithmetic.
# Their float32 arithmetic is spelled out operation by operation to keep the reference's rounding.

@numba.njit(cache=True, nogil=True)
def _draw_keypoints(maps, channel, xy, max_channel, stride, scale, half, cutoff):
    """maps (C, h, w) float32. Keypoint n at xy[n] (input pixels) fills the window of cells round(xy / stride)
    +- half with exp(scale * dx^2) * exp(scale * dy^2) (d: cell centre - keypoint), values < cutoff set to 0,
    combined by max into maps channel[n] and max_channel. Cells off the grid are skipped."""
    h, w = maps.shape[1], maps.shape[2]
    offset = stride / 2 - 0.5
    window = 2 * half + 1
    gx = np.empty(window, np.float32)
    gy = np.empty(window, np.float32)
    for n in range(len(channel)):
        x, y = xy[n, 0], xy[n, 1]
        col0 = int(np.rint(x / stride)) - half
        row0 = int(np.rint(y / stride)) - half
        for i in range(window):
            dx = ((col0 + i) * stride + offset) - x
            dy = ((row0 + i) * stride + offset) - y
            gx[i] = np.float32(np.exp(dx * dx * scale))
            gy[i] = np.float32(np.exp(dy * dy * scale))
        for i in range(window):
            row = row0 + i
            if row < 0 or row >= h:
                continue
            for j in range(window):
                col = col0 + j
                if col < 0 or col >= w:
                    continue
                value = gy[i] * gx[j]
                if value < cutoff:
                    value = np.float32(0.0)
                if value > maps[channel[n], row, col]:
                    maps[channel[n], row, col] = value
                if value > maps[max_channel, row, col]:
                    maps[max_channel, row, col] = value


@numba.njit(cache=True, nogil=True)
def _limb_t(step, start, box, col, row):
    """float32 step . (col, row) + start of one cell of `box`, summed in the reference's order."""
    t = step[box, 0] * np.float32(col)
    t = t + step[box, 1] * np.float32(row)
    return t + start[box]


@numba.njit(cache=True, nogil=True)
def _draw_limbs_mean(maps, channel, origin, size, t_step, t_start, threshold, floor):
    """Reference body parts. Boxes (sorted by channel; cells from origin (col, row), size (cols, rows)) add
    exp(-t^2), with values <= threshold raised to floor, into maps[channel]; then each cell that several boxes
    of one map cover is divided by their count: the mean over persons."""
    count = np.zeros((maps.shape[1], maps.shape[2]), np.uint16)
    first = 0
    while first < len(channel):
        last = first + 1
        while last < len(channel) and channel[last] == channel[first]:
            last += 1
        target = maps[channel[first]]
        for box in range(first, last):
            for row in range(size[box, 1]):
                for col in range(size[box, 0]):
                    t = _limb_t(t_step, t_start, box, col, row)
                    value = np.exp(-(t * t))
                    if value <= threshold:
                        value = floor
                    target[origin[box, 1] + row, origin[box, 0] + col] += value
                    count[origin[box, 1] + row, origin[box, 0] + col] += 1
        for box in range(first, last):  # divide shared cells once; leave `count` zero for the next map
            for row in range(origin[box, 1], origin[box, 1] + size[box, 1]):
                for col in range(origin[box, 0], origin[box, 0] + size[box, 0]):
                    if count[row, col] > 1:
                        target[row, col] = np.float32(np.float64(target[row, col]) / count[row, col])
                    count[row, col] = 0
        first = last


@numba.njit(cache=True, nogil=True)
def _draw_limbs_max(maps, channel, origin, size, t_step, t_start, along_step, along_start, t_edge_squared,
                    threshold):
    """Paper body parts: exp(-t^2) where along^2 + t^2 / t_edge^2 <= 1 (inside the ellipse) and the value is
    >= threshold, else 0, combined by max into maps[channel]."""
    for box in range(len(channel)):
        target = maps[channel[box]]
        for row in range(size[box, 1]):
            for col in range(size[box, 0]):
                t = _limb_t(t_step, t_start, box, col, row)
                along = _limb_t(along_step, along_start, box, col, row)
                t_squared = t * t
                value = np.exp(-t_squared)
                if along * along + t_squared / t_edge_squared > np.float32(1.0) or value < threshold:
                    value = np.float32(0.0)
                if value > target[origin[box, 1] + row, origin[box, 0] + col]:
                    target[origin[box, 1] + row, origin[box, 0] + col] = value


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


def person_masks(annotations: Iterable[Mapping], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO person masks of one image (docs/method.md §3.5): (mask_miss, mask_all), uint8 (height, width) in {0, 255}.

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
    # Imported here: the rest of this module (target maps, used by the loss) must import on machines without
    # pycocotools, such as the bare GPU machine of `scripts/gpu_check.py`.
    from pycocotools import mask as mask_utils

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
    """Targets and mask at the network's output scales, highest resolution first (docs/method.md §3.6).

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
