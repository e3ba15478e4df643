"""Training augmentation: one affine warp of image, masks and keypoints around the main person (docs/method.md §4.1).

Simple Pose (Li, Su, Wang, AAAI 2020); the reference is the authors' `py_data_transformer.py` at HEAD `0fa17df`,
re-implemented (docs/method.md §4.1) and checked against golden G5 and the affines of
`fixtures/targets_coco_mini.npz`.

Randomness comes only from an explicit `numpy.random.Generator`; `sample_params` draws the parameters and
everything else applies given parameters, so tests and the validation loader pass fixed ones.
Coordinates: pixels, pixel centres at integer coordinates; the matrix maps source pixels to crop pixels.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import cv2
import numba
import numpy as np

from simplepose.skeleton import KEYPOINT_FLIP, NUM_KEYPOINTS

LOG = logging.getLogger(__name__)

IGNORED_BLOCK = 8  # source pixels per side of the blocks that `SourceImage.ignored_blocks` counts
TINT_COLUMNS = 64  # `SourceImage.tinted` converts whole runs of this many columns (OpenCV's widest SIMD rows)
MASK_TILE = 64  # crop pixels per side of the tiles `_warp_mask_miss` warps or skips (a multiple of the stride)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges; defaults are the reference's HEAD `config.py` (512 input, docs/method.md §4.1)."""

    crop_size: int = 512  # square network input, pixels
    target_dist: float = 0.6  # main person's bbox height as a fraction of the crop (before aug scale)
    scale_prob: float = 0.8  # probability of an extra random scale, else 1
    scale_range: tuple[float, float] = (0.7, 1.3)
    max_rotate_degree: float = 40.0
    center_perturb_max: float = 50.0  # pixels; the shift is int(U(-1, 1) * this), truncated toward 0
    flip_prob: float = 0.5
    tint_prob: float = 0.2
    # Tint shifts in OpenCV's 8-bit HSV, inclusive ranges (the reference's asymmetric S and V ranges).
    hue_range: tuple[int, int] = (-10, 10)
    saturation_range: tuple[int, int] = (-20, 60)
    value_range: tuple[int, int] = (-20, 40)
    border_value: tuple[int, int, int] = (124, 127, 127)  # BGR outside the source image

    def __post_init__(self):
        if not (isinstance(self.crop_size, int) and self.crop_size >= 2):
            raise ValueError(f"AugmentConfig.crop_size must be an int >= 2, got {self.crop_size!r}")
        for name in ("scale_prob", "flip_prob", "tint_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} must be a probability, got {getattr(self, name)!r}")
        for name in ("scale_range", "hue_range", "saturation_range", "value_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"AugmentConfig.{name} must be (low, high) with low <= high, got {(low, high)}")
        if self.target_dist <= 0 or self.scale_range[0] <= 0:
            raise ValueError("AugmentConfig: target_dist and scale_range must be positive")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation. The defaults are the un-randomised (validation) draw (docs/method.md §4.2)."""

    flip: bool = False
    rotation: float = 0.0  # degrees; R = [[cos, sin], [-sin, cos]] as in the reference
    scale: float = 1.0  # extra scale on top of target_dist
    shift: tuple[int, int] = (0, 0)  # (dx, dy) crop pixels added to the crop centre
    tint: tuple[int, int, int] | None = None  # (hue, saturation, value) shifts, None = no tint


def sample_params(config: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Draw one augmentation with the reference's distributions (docs/method.md §4.1) from `rng`."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"sample_params: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    # One vector of uniforms: each scalar draw from a Generator costs about a microsecond of call overhead.
    flip_u, tint_u, rotation_u, scale_u, scale_value_u, shift_x_u, shift_y_u = rng.random(7).tolist()
    flip = flip_u < config.flip_prob
    tint = None
    if tint_u < config.tint_prob:
        ranges = np.array([config.hue_range, config.saturation_range, config.value_range])
        tint = tuple(rng.integers(ranges[:, 0], ranges[:, 1], endpoint=True).tolist())
    rotation = (2.0 * rotation_u - 1.0) * config.max_rotate_degree
    low, high = config.scale_range
    scale = low + (high - low) * scale_value_u if scale_u < config.scale_prob else 1.0
    shift = (int((2.0 * shift_x_u - 1.0) * config.center_perturb_max),  # int() truncates toward 0
             int((2.0 * shift_y_u - 1.0) * config.center_perturb_max))
    return AugmentParams(flip=flip, rotation=rotation, scale=scale, shift=shift, tint=tint)


def affine_matrix(center: tuple[float, float], scale_provided: float, params: AugmentParams,
                  config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Source-to-crop affine (2, 3) float64 (docs/method.md §4.1, G5 in §13).

    M = T(S/2 - 0.5 + dx, S/2 - 0.5 + dy) . F . Scale(s) . R(rotation) . T(-cx, -cy), with S the crop size,
    F = diag(-1, 1) when flipping and s = target_dist / (scale_provided * S / (S - 1)) * params.scale.
    center: (cx, cy) main person's bbox centre, source pixels; scale_provided: bbox height / crop size.
    The S / (S - 1) factor is an odd HEAD-only tweak of the reference, kept for parity (docs/method.md §4.1).
    """
    if not scale_provided > 0:
        raise ValueError(f"affine_matrix: scale_provided must be > 0, got {scale_provided!r}")
    size = config.crop_size
    s = config.target_dist / (scale_provided * size / (size - 1)) * params.scale
    theta = math.radians(params.rotation)
    linear = s * np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    if params.flip:
        linear[0] *= -1.0
    target = np.array([size / 2 - 0.5 + params.shift[0], size / 2 - 0.5 + params.shift[1]])
    return np.hstack([linear, (target - linear @ np.asarray(center, dtype=np.float64))[:, None]])


def transform_keypoints(keypoints: np.ndarray, matrix: np.ndarray, flip: bool) -> np.ndarray:
    """Apply the affine to (P, 18, 3) reference-order keypoints; v is unchanged (absent ones move too).

    After a flip the left/right rows are swapped (skeleton.KEYPOINT_FLIP), so a left shoulder stays a left
    shoulder of the mirrored person. Returns float64 (P, 18, 3).
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 3 or kp.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"transform_keypoints: keypoints must be (P, {NUM_KEYPOINTS}, 3), got {kp.shape}")
    out = kp.copy()
    out[..., :2] = kp[..., :2] @ matrix[:, :2].T + matrix[:, 2]
    return out[:, list(KEYPOINT_FLIP)] if flip else out


def tint(image: np.ndarray, shifts: tuple[int, int, int]) -> np.ndarray:
    """Shift hue, saturation and value of a uint8 BGR image (H, W, 3) in OpenCV's 8-bit HSV.

    H is clipped to [0, 179], S and V to [0, 255] (saturating adds, then a per-channel min for H).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"tint: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return cv2.cvtColor(_shift_hsv(cv2.cvtColor(image, cv2.COLOR_BGR2HSV), shifts), cv2.COLOR_HSV2BGR)


def _shift_hsv(hsv: np.ndarray, shifts: tuple[int, int, int]) -> np.ndarray:
    """`tint`'s shift of an 8-bit HSV image (H, W, 3), in place."""
    cv2.add(hsv, (*map(float, shifts), 0.0), dst=hsv)
    return cv2.min(hsv, (179.0, 255.0, 255.0, 255.0), dst=hsv)


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """A decoded image with its person masks, prepared once and warped many times.

    pixels: (H, W, 4) uint8 = B, G, R, mask_all (OpenCV warps 4 channels in about the time of 1, and 3
        channels 2-3 times slower, with identical values per channel).
    mask_miss: (H, W) uint8, or None when it is 255 everywhere (it would warp to all ones, border included).
    ignored_blocks: with mask_miss, the summed-area table (int32, (ceil(H/B) + 1, ceil(W/B) + 1)) of the
        blocks of B = IGNORED_BLOCK source pixels that hold a pixel with mask_miss < 255; the mask warp
        skips crop tiles whose footprint covers none (`_warp_mask_miss`).
    """

    pixels: np.ndarray
    mask_miss: np.ndarray | None
    ignored_blocks: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, image: np.ndarray, mask_miss: np.ndarray | None = None,
                    mask_all: np.ndarray | None = None) -> SourceImage:
        """image: uint8 (H, W, 3) BGR; masks: uint8 (H, W) in {0, 255} (targets.person_masks), or None for
        "supervise everything" (mask_miss = 255) and "no person" (mask_all = 0)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            raise ValueError(f"SourceImage: image must be a uint8 (H, W, 3) BGR array, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        height, width = image.shape[:2]
        for name, mask in (("mask_miss", mask_miss), ("mask_all", mask_all)):
            if mask is not None and (mask.dtype != np.uint8 or mask.shape != (height, width)):
                raise ValueError(f"SourceImage: {name} must be uint8 {(height, width)}, got {mask.dtype} "
                                 f"{mask.shape}")
        pixels = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
        pixels[..., 3] = 0 if mask_all is None else mask_all
        if mask_miss is None or mask_miss.min() == 255:
            return cls(pixels=pixels, mask_miss=None)
        block = IGNORED_BLOCK
        ignored = np.zeros((-(-height // block) * block, -(-width // block) * block), np.uint8)
        ignored[:height, :width] = mask_miss < 255
        blocks = ignored.reshape(len(ignored) // block, block, -1, block).max(axis=(1, 3))
        return cls(pixels, mask_miss, cv2.integral(blocks, sdepth=cv2.CV_32S))

    @property
    def image(self) -> np.ndarray:
        """The BGR image (H, W, 3) uint8 (a copy)."""
        return cv2.cvtColor(self.pixels, cv2.COLOR_BGRA2BGR)

    def tinted(self, shifts: tuple[int, int, int], box: tuple[int, int, int, int] | None = None
               ) -> SourceImage:
        """The same source with its colours shifted (`tint`) inside box = (x0, y0, x1, y1), inclusive pixel
        bounds clipped to the image (default: all of it); masks unchanged.

        Tinting only what a warp reads (`visible_box`) gives that warp the fully tinted image's result. The
        box's columns are widened to whole runs of TINT_COLUMNS pixels: OpenCV's colour conversions round the
        scalar tail of a row by 1 level differently from its vectorised part, and aligned runs have no tail.
        """
        height, width = self.pixels.shape[:2]
        x0, y0, x1, y1 = (0, 0, width - 1, height - 1) if box is None else box
        x0 = max(x0, 0) // TINT_COLUMNS * TINT_COLUMNS
        x1 = min(x0 + -(-(x1 - x0 + 1) // TINT_COLUMNS) * TINT_COLUMNS - 1, width - 1)
        y0, y1 = max(y0, 0), min(y1, height - 1)
        pixels = self.pixels.copy()
        if x1 >= x0 and y1 >= y0:
            region = pixels[y0:y1 + 1, x0:x1 + 1]
            hsv = _shift_hsv(cv2.cvtColor(region, cv2.COLOR_BGR2HSV), shifts)  # reads B, G, R of B, G, R, A
            colours = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dstCn=4)
            colours[..., 3] = region[..., 3]
            region[...] = colours
        return dataclasses.replace(self, pixels=pixels)


def visible_box(matrix: np.ndarray, crop_size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Inclusive source pixel bounds (x0, y0, x1, y1) that a bilinear warp by `matrix` to a crop_size crop can
    read from an image of height x width pixels; empty (x1 < x0 or y1 < y0) when the crop misses the image."""
    corners = cv2.invertAffineTransform(matrix) @ np.array(
        [[0, 0, 1], [crop_size - 1, 0, 1], [0, crop_size - 1, 1], [crop_size - 1, crop_size - 1, 1]], float).T
    (x_low, y_low), (x_high, y_high) = corners.min(axis=1), corners.max(axis=1)
    return (max(math.floor(x_low) - 1, 0), max(math.floor(y_low) - 1, 0),
            min(math.ceil(x_high) + 1, width - 1), min(math.ceil(y_high) + 1, height - 1))


@dataclasses.dataclass(frozen=True)
class Warped:
    """A source warped to the crop: image uint8 (S, S, 3) BGR, the network input before
    `simplepose.model.network_input` turns it into float BGR / 255 (docs/method.md §4.4; done on the accelerator, it
    moves a quarter of the bytes and spares the CPU a float pass); masks float32 (S/stride, S/stride) in [0, 1].
    """

    image: np.ndarray
    mask_miss: np.ndarray
    mask_all: np.ndarray


def warp(source: SourceImage, matrix: np.ndarray, config: AugmentConfig = AugmentConfig(),
         stride: int = 4, image_out: np.ndarray | None = None) -> Warped:
    """Warp image and masks with `matrix` (INTER_LINEAR, constant borders: the BGR border colour, 255 for
    mask_miss so out-of-image areas are supervised, 0 for mask_all), then resize the masks to the target grid
    with INTER_AREA and scale them to [0, 1] (docs/method.md §3.5, §4.1). The crop size must be a multiple of stride.
    image_out: optional uint8 (S, S, 3) C-contiguous array to write the image into (e.g. a row of a batch)."""
    size = config.crop_size
    if size % stride:
        raise ValueError(f"warp: crop size {size} is not a multiple of the stride {stride}")
    if matrix.shape != (2, 3):
        raise ValueError(f"warp: matrix must be (2, 3), got {matrix.shape}")
    if image_out is not None and (image_out.shape != (size, size, 3) or image_out.dtype != np.uint8
                                  or not image_out.flags.c_contiguous):
        raise ValueError(f"warp: image_out must be C-contiguous uint8 {(size, size, 3)}, got {image_out.dtype} "
                         f"{image_out.shape}")
    grid = (size // stride, size // stride)
    crop = cv2.warpAffine(source.pixels, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(*config.border_value, 0))
    mask_all = _to_grid(cv2.extractChannel(crop, 3), grid)
    mask_miss = np.ones(grid, np.float32) if source.mask_miss is None else _warp_mask_miss(source, matrix, size,
                                                                                          stride)
    image = cv2.cvtColor(crop, cv2.COLOR_BGRA2BGR, dst=image_out)
    return Warped(image=image, mask_miss=mask_miss, mask_all=mask_all)


def _warp_mask_miss(source: SourceImage, matrix: np.ndarray, size: int, stride: int) -> np.ndarray:
    """mask_miss warped (border 255) and reduced to the grid, float32 (size/stride, size/stride).

    The crop is cut into square tiles (MASK_TILE pixels, rounded to the stride); a tile whose bilinear
    footprint in the source reaches no block with an ignored pixel warps to exactly 255, so it is skipped.
    Each row of tiles is warped in one call from its first to its last remaining tile. Tiles start on stride
    boundaries, so the INTER_AREA blocks are a full warp's; inside them, OpenCV's fixed-point rounding of the
    shifted origin can move a rare pixel by 1/255.
    """
    inverse = cv2.invertAffineTransform(matrix)  # what warpAffine inverts internally: crop -> source
    tile = max(MASK_TILE // stride, 1) * stride
    needed = _tiles_reaching_ignored(inverse, size, tile, source.ignored_blocks, IGNORED_BLOCK,
                                     *source.mask_miss.shape)
    grid = np.full((size // stride, size // stride), 255, np.uint8)
    for row in np.flatnonzero(needed.any(axis=1)):
        cols = np.flatnonzero(needed[row])
        top, left = int(row) * tile, int(cols[0]) * tile
        bottom, right = min(top + tile, size), min((int(cols[-1]) + 1) * tile, size)
        shifted = inverse.copy()
        shifted[:, 2] += inverse[:, 0] * left + inverse[:, 1] * top
        band = cv2.warpAffine(source.mask_miss, shifted, (right - left, bottom - top),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=255)
        cv2.resize(band, ((right - left) // stride, (bottom - top) // stride),
                   dst=grid[top // stride:bottom // stride, left // stride:right // stride],
                   interpolation=cv2.INTER_AREA)
    return np.divide(grid, np.float32(255.0), dtype=np.float32)


@numba.njit(cache=True, nogil=True)
def _tiles_reaching_ignored(inverse, size, tile, blocks, block, height, width):
    """bool (n, n): the crop tiles (tile x tile pixels from (0, 0), n = ceil(size / tile)) whose bilinear
    footprint in the source image (height x width) reaches a block holding an ignored pixel.

    inverse: crop -> source affine (2, 3); blocks: summed-area table of the ignored blocks of `block` pixels.
    The image of a tile is bounded by the images of its corners (the far ones taken one pixel past it).
    Bilinear reads floor(p) and floor(p) + 1; one more pixel each side covers OpenCV's fixed-point rounding.
    """
    count = (size + tile - 1) // tile
    needed = np.zeros((count, count), np.bool_)
    for row in range(count):
        for col in range(count):
            x_low, y_low, x_high, y_high = np.inf, np.inf, -np.inf, -np.inf
            for v in (row * tile, min(row * tile + tile, size)):
                for u in (col * tile, min(col * tile + tile, size)):
                    x = inverse[0, 0] * u + inverse[0, 1] * v + inverse[0, 2]
                    y = inverse[1, 0] * u + inverse[1, 1] * v + inverse[1, 2]
                    x_low, x_high = min(x_low, x), max(x_high, x)
                    y_low, y_high = min(y_low, y), max(y_high, y)
            x0, x1 = math.floor(x_low) - 1, math.floor(x_high) + 2
            y0, y1 = math.floor(y_low) - 1, math.floor(y_high) + 2
            if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
                continue  # the tile sees only the border (255)
            x0, y0 = max(x0, 0) // block, max(y0, 0) // block
            x1, y1 = min(x1, width - 1) // block, min(y1, height - 1) // block
            ignored = blocks[y1 + 1, x1 + 1] - blocks[y0, x1 + 1] - blocks[y1 + 1, x0] + blocks[y0, x0]
            needed[row, col] = ignored > 0
    return needed


def _to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """uint8 (S, S) mask -> float32 grid in [0, 1] by INTER_AREA (the reference's order: resize, then / 255)."""
    small = cv2.resize(mask, grid[::-1], interpolation=cv2.INTER_AREA)
    return np.divide(small, np.float32(255.0), dtype=np.float32)
