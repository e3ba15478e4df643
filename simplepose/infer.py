"""Inference: images to heatmaps (resize/pad, network, flip and multi-scale averaging; docs/method.md §8).

Paper: Li, Su, Wang, "Simple Pose: Rethinking and Improving a Bottom-up Approach for Multi-Person Pose
Estimation", AAAI 2020. Reference code: hellojialee/Improved-Body-Parts (`evaluate.py::predict`), re-implemented
from docs/method.md §8, not copied.

The work is split into steps that a labeling job runs in different places:
  `preprocess`  (numpy/OpenCV, CPU)        image -> one padded uint8 input per scale (+ geometry)
  `forward_maps` (torch, the model's device) padded inputs -> flip-averaged stride-4 maps, batched
  `aggregate`   (torch / OpenCV)           one image's per-scale maps -> `Heatmaps`
`predict_heatmaps` chains them. Coordinates: pixel centres at integer coordinates; stride-4 map cell (i, j)
stands for input pixel (4j + 1.5, 4i + 1.5) of the padded network input.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from simplepose.model import network_input
from simplepose.skeleton import FLIP_CHANNEL_ORDER, KEYPOINT_CHANNELS, LIMB_CHANNELS, NUM_CHANNELS

LOG = logging.getLogger(__name__)

AGGREGATIONS = ("reference", "stride4")
_DECODED_CHANNELS = KEYPOINT_CHANNELS.stop  # 48: body parts 0-29 + keypoints 30-47; 48/49 are never decoded


@dataclass(frozen=True)
class InferConfig:
    """How images become heatmaps. The defaults are the paper's published setting (test-dev AP 0.685):
    boxsize 512, scales (0.5, 1, 1.5, 2, 3), flip, reference aggregation (`PAPER`), so that evaluation
    reproduces the paper; `PRESETS` also has the authors' HEAD setting and `FAST`, which labeling jobs pick
    explicitly (one scale, stride-4 maps: several times less network work and no full-resolution maps).

    boxsize: pixels; a scale s resizes the image by factor s * boxsize / height (the height is normalised),
      capped so that the resized image fits max_height x max_width (docs/method.md §8.1).
    scales: positive multipliers, averaged with equal weights (capped duplicates included, docs/method.md §8.3).
    flip: also run the horizontally flipped padded input and average (docs/method.md §8.2).
    aggregation: "reference" = x4 OpenCV cubic upsampling of each scale, crop, cubic resize to the original
      size, mean (maps at original resolution; identity `map_to_image`; runs on the host, like the authors').
      "stride4" = each scale resampled (torch bicubic, centre-aligned, no antialiasing) onto the stride-4
      grid of the scale `base_scale` and averaged there; stays on the model's device, no upsampling (a named
      improvement; with one scale equal to base_scale the network's cells are used as they are).
    base_scale: the scale whose stride-4 grid "stride4" averages on (it need not be one of `scales`).
    pad_value: uint8 padding value (the network sees pad_value / 255). multiple: padded H and W are multiples
      of it (the hourglass needs 64). stride: network output stride in input pixels.
    """

    boxsize: int = 512
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    flip: bool = True
    aggregation: str = "reference"
    base_scale: float = 1.0
    max_height: int = 2600
    max_width: int = 3800
    pad_value: int = 128
    multiple: int = 64
    stride: int = 4

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or min(self.scales) <= 0 or self.base_scale <= 0:
            raise ValueError(f"InferConfig: scales and base_scale must be positive, got {self.scales}, "
                             f"{self.base_scale}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"InferConfig: aggregation {self.aggregation!r} not in {AGGREGATIONS}")
        if min(self.boxsize, self.max_height, self.max_width, self.stride) <= 0 or self.multiple % self.stride:
            raise ValueError(f"InferConfig: boxsize/max sizes/stride must be positive and multiple "
                             f"({self.multiple}) a multiple of stride ({self.stride})")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"InferConfig: pad_value must be a uint8 value, got {self.pad_value}")

    def factor(self, scale: float, height: int, width: int) -> float:
        """Resize factor of one scale for a height x width image, with the size caps (docs/method.md §8.1)."""
        factor = scale * self.boxsize / height
        if factor * height > self.max_height or factor * width > self.max_width:
            factor = min(self.max_height / height, self.max_width / width)
        return factor


PAPER = InferConfig()
"""The paper's published setting (pub code): boxsize 512, five scales, flip. The default."""
HEAD = InferConfig(boxsize=640, scales=(1.0,))
"""The authors' current code (HEAD): boxsize 640, one scale, flip."""
FAST = InferConfig(boxsize=512, scales=(1.0,), aggregation="stride4")
"""Labeling at scale: one scale of 512, flip, stride-4 maps on the device (the decoder reads them there)."""
PRESETS: dict[str, InferConfig] = {"paper": PAPER, "head": HEAD, "fast": FAST}
LABELING = InferConfig(boxsize=640, scales=(1.0,), flip=True, aggregation="stride4")
"""The labeling job's default (`pipelines.label.LabelJobConfig`: the authors' HEAD boxsize 640, one scale,
flip; stride-4 maps for the default decoder) and `simplepose.Predictor`'s preset "fast"."""


@dataclass(frozen=True)
class ScaleInput:
    """One scale of one image, ready for the network.

    image: uint8 (Hp, Wp, 3) BGR, the resized image padded bottom/right with pad_value to multiples of 64.
    factor: resize factor (original pixel x -> resized pixel (x + 0.5) * factor - 0.5).
    resized_shape: (rh, rw) of the resized image before padding. image_size: (H, W) of the original image.
    """

    image: np.ndarray
    factor: float
    resized_shape: tuple[int, int]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Heatmaps:
    """The decoder's input for one image.

    keypoints: float32 (18, h, w) keypoint heatmaps (reference order); limbs: float32 (30, h, w) body parts.
    map_to_image: (sx, sy, ox, oy): map cell (row y, col x) is original pixel (sx * x + ox, sy * y + oy).
    image_size: (H, W) of the original image in pixels.
    The maps may be inference tensors (`torch.inference_mode`): clone them before in-place edits outside it.
    """

    keypoints: torch.Tensor
    limbs: torch.Tensor
    map_to_image: tuple[float, float, float, float]
    image_size: tuple[int, int]

    def __post_init__(self):
        kp, lb = self.keypoints, self.limbs
        if not (isinstance(kp, torch.Tensor) and isinstance(lb, torch.Tensor)):
            raise TypeError(f"Heatmaps: keypoints and limbs must be torch tensors, got {type(kp)}, {type(lb)}")
        if kp.dtype != torch.float32 or lb.dtype != torch.float32:
            raise TypeError(f"Heatmaps: expected float32 maps, got {kp.dtype}, {lb.dtype}")
        if kp.ndim != 3 or lb.ndim != 3 or kp.shape[0] != 18 or lb.shape[0] != 30 or kp.shape[1:] != lb.shape[1:]:
            raise ValueError(f"Heatmaps: expected keypoints (18, h, w) and limbs (30, h, w), got "
                             f"{tuple(kp.shape)}, {tuple(lb.shape)}")
        if len(self.map_to_image) != 4 or len(self.image_size) != 2:
            raise ValueError(f"Heatmaps: map_to_image needs 4 numbers and image_size 2, got "
                             f"{self.map_to_image}, {self.image_size}")

    def to_image(self, x, y):
        """Map coordinates (x = column, y = row, any array-likes) to original image pixels."""
        sx, sy, ox, oy = self.map_to_image
        return sx * x + ox, sy * y + oy


def preprocess(image_bgr: np.ndarray, config: InferConfig = PAPER) -> list[ScaleInput]:
    """One BGR uint8 (H, W, 3) image -> one padded network input per scale of `config` (docs/method.md §8.1).

    OpenCV bicubic resize with fx = fy = factor (output size (cvRound(W f), cvRound(H f))), then padding on
    the bottom and right with `config.pad_value` up to multiples of `config.multiple`. Pure numpy/OpenCV.
    """
    if not isinstance(image_bgr, np.ndarray):
        raise TypeError(f"preprocess: image must be a numpy array, got {type(image_bgr).__name__}")
    if image_bgr.dtype != np.uint8:
        raise TypeError(f"preprocess: image must be uint8 BGR, got dtype {image_bgr.dtype}")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"preprocess: image must have shape (H, W, 3), got {image_bgr.shape}")
    height, width = image_bgr.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"preprocess: image is empty, shape {image_bgr.shape}")
    inputs = []
    for scale in config.scales:
        factor = config.factor(scale, height, width)
        rh, rw = round(height * factor), round(width * factor)  # half-to-even, like OpenCV's cvRound
        if rh == 0 or rw == 0:
            raise ValueError(f"preprocess: image {height}x{width} is too thin, scale {scale} resizes it to "
                             f"{rh}x{rw}")
        resized = cv2.resize(image_bgr, (0, 0), fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        assert resized.shape[:2] == (rh, rw), f"OpenCV resized to {resized.shape[:2]}, expected {(rh, rw)}"
        ph, pw = -rh % config.multiple, -rw % config.multiple
        padded = cv2.copyMakeBorder(resized, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(config.pad_value,) * 3)
        inputs.append(ScaleInput(padded, factor, (rh, rw), (height, width)))
    return inputs


def prepare_model(model: torch.nn.Module, device="cpu", channels_last: bool = False) -> torch.nn.Module:
    """Put a model in eval mode on `device` (once, e.g. in an actor's constructor); returns it."""
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _batches(shapes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of the inputs grouped into forward batches of one padded shape each.

    Only equal shapes share a batch, so results equal one-by-one runs. Padding to a common shape is not
    exact: the hourglass's coarse levels (1/64 of the input, a few cells) then see padding where they saw
    their border, and on the weights available (untrained) the maps moved by 30-75% of their maximum.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype in (None, torch.float32):
        return torch.autocast(device.type, enabled=False)
    allowed = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16,)
    if dtype not in allowed:
        raise ValueError(f"forward_maps: autocast dtype {dtype} not supported on {device.type} (use one of "
                         f"{allowed} or None for float32)")
    return torch.autocast(device.type, dtype=dtype)


def forward_maps(model: torch.nn.Module, inputs: Sequence[ScaleInput], config: InferConfig = PAPER, *,
                 dtype: torch.dtype | None = None, channels_last: bool = False, batch_size: int = 8,
                 device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Run the network on padded inputs of any sizes; flip-average (docs/method.md §8.2) on the model's device.

    Returns, per input, the last stack's stride-4 output float32 (50, Hp/4, Wp/4) on the model's device.
    Up to `batch_size` inputs (x2 with flip) of one padded shape go through the network at once.
    dtype: autocast dtype (bfloat16/float16 on CUDA, bfloat16 on CPU) or None for float32.
    device: where the inputs go and the averaging runs; None = the model's parameters' device. Give it for a
    model without parameters, e.g. `simplepose.onnx_export.OnnxNetwork` (an onnxruntime session, "cpu").
    """
    if model.training:
        raise ValueError("forward_maps: model is in training mode (batch statistics); call model.eval() or "
                         "prepare_model() first")
    if batch_size < 1:
        raise ValueError(f"forward_maps: batch_size must be >= 1, got {batch_size}")
    for n, item in enumerate(inputs):
        shape = item.image.shape
        if item.image.dtype != np.uint8 or len(shape) != 3 or shape[2] != 3 or shape[0] % config.multiple \
                or shape[1] % config.multiple:
            raise ValueError(f"forward_maps: input {n} must be uint8 (H, W, 3) with H, W multiples of "
                             f"{config.multiple}, got {item.image.dtype} {shape}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    order = FLIP_CHANNEL_ORDER
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    shapes = [item.image.shape[:2] for item in inputs]
    with torch.inference_mode(), _autocast(device, dtype):
        for batch in _batches(shapes, batch_size):
            host = torch.from_numpy(np.stack([inputs[i].image for i in batch]))
            if device.type == "cuda":  # page-locked: the copy runs asynchronously, overlapping the forward
                host = host.pin_memory()
            x = network_input(host.to(device, non_blocking=True), channels_last)
            if config.flip:
                x = torch.cat([x, x.flip(-1)])
            out = model(x)[-1][0].float()
            if out.shape[1] != NUM_CHANNELS:
                raise ValueError(f"forward_maps: the model gave {out.shape[1]} channels, expected {NUM_CHANNELS}")
            if config.flip:
                n = len(batch)
                out = (out[:n] + out[n:].flip(-1)[:, order]) / 2
            for k, i in enumerate(batch):
                outputs[i] = out[k]
    return outputs


def upsample_reference(maps: np.ndarray, resized_shape: tuple[int, int], image_size: tuple[int, int],
                       stride: int = 4) -> np.ndarray:
    """The authors' upsampling of one scale (docs/method.md §8.3): float32 (C, h4, w4) stride-4 maps of the padded
    input -> float32 (C, H, W) at the original image size.

    OpenCV INTER_CUBIC x`stride` of the whole map, crop the top-left (rh, rw) = `resized_shape`, INTER_CUBIC
    resize to (W, H) = `image_size` (skipped when equal). No clamping. Other float dtypes are cast to float32.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or not np.issubdtype(maps.dtype, np.floating):
        raise ValueError(f"upsample_reference: maps must be float (C, h4, w4), got {maps.dtype} {maps.shape}")
    (rh, rw), (height, width) = resized_shape, image_size
    channels, h4, w4 = maps.shape
    if not (0 < rh <= h4 * stride and 0 < rw <= w4 * stride) or min(height, width) <= 0:
        raise ValueError(f"upsample_reference: resized_shape {resized_shape} must be positive and fit in the "
                         f"x{stride} map {(h4 * stride, w4 * stride)}; image_size {image_size} positive")
    hwc = np.ascontiguousarray(maps.transpose(1, 2, 0), dtype=np.float32)
    up = cv2.resize(hwc, (0, 0), fx=stride, fy=stride, interpolation=cv2.INTER_CUBIC)
    up = up.reshape(h4 * stride, w4 * stride, channels)[:rh, :rw]  # cv2 drops a single channel axis
    if (rh, rw) != (height, width):
        up = cv2.resize(up, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    return np.ascontiguousarray(up.transpose(2, 0, 1))


def _grid_shape(factor: float, image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Stride-4 cells covering the resized image: (ceil(rh / stride), ceil(rw / stride))."""
    rh, rw = (round(n * factor) for n in image_size)  # round() is half-to-even, like cvRound
    return math.ceil(rh / stride), math.ceil(rw / stride)


def _grid_mapping(factor: float, stride: int) -> tuple[float, float, float, float]:
    """Cell j -> resized pixel stride*j + (stride-1)/2 -> original pixel (stride*j + stride/2)/factor - 0.5."""
    scale, offset = stride / factor, stride / (2 * factor) - 0.5
    return scale, scale, offset, offset


def _split(maps: torch.Tensor, map_to_image, image_size) -> Heatmaps:
    return Heatmaps(keypoints=maps[KEYPOINT_CHANNELS].float().contiguous(),
                    limbs=maps[LIMB_CHANNELS].float().contiguous(),
                    map_to_image=map_to_image, image_size=tuple(int(n) for n in image_size))


def _check_stride4(maps: torch.Tensor, caller: str):
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] not in (48, 50) \
            or not maps.is_floating_point():
        raise ValueError(f"{caller}: maps must be a float tensor (48 or 50, h4, w4), got "
                         f"{getattr(maps, 'dtype', type(maps))} {tuple(getattr(maps, 'shape', ()))}")


def heatmaps_from_stride4(maps: torch.Tensor, factor: float, image_size: tuple[int, int],
                          stride: int = 4) -> Heatmaps:
    """One scale's stride-4 maps (48 or 50, h4, w4) of an input resized by `factor` (padded or not) ->
    `Heatmaps` on the cells covering the resized image, on the same device, with the exact cell-to-pixel
    mapping: cell j is original pixel (stride*j + stride/2) / factor - 0.5."""
    _check_stride4(maps, "heatmaps_from_stride4")
    gh, gw = _grid_shape(factor, image_size, stride)
    if maps.shape[1] < gh or maps.shape[2] < gw:
        raise ValueError(f"heatmaps_from_stride4: maps {tuple(maps.shape)} do not cover the {gh}x{gw} cells of "
                         f"image {image_size} resized by {factor}")
    return _split(maps[:, :gh, :gw], _grid_mapping(factor, stride), image_size)


def _resample(maps: torch.Tensor, ratio: float, grid_shape: tuple[int, int]) -> torch.Tensor:
    """Sample (C, h, w) maps of a scale with factor f at the cells of the base grid (factor g), ratio = f/g.

    Base cell j is scale cell (j + 0.5) * ratio - 0.5 (both centre-aligned on the same original pixel);
    torch bicubic (a = -0.75, like OpenCV) with replicated borders, align_corners=False.
    """
    (gh, gw), (_, h, w) = grid_shape, maps.shape
    dev = maps.device
    gx = (torch.arange(gw, device=dev, dtype=torch.float32) + 0.5) * (2 * ratio / w) - 1
    gy = (torch.arange(gh, device=dev, dtype=torch.float32) + 0.5) * (2 * ratio / h) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    return F.grid_sample(maps[None].float(), grid, mode="bicubic", padding_mode="border",
                         align_corners=False)[0]


def aggregate(inputs: Sequence[ScaleInput], maps: Sequence[torch.Tensor], config: InferConfig = PAPER) -> Heatmaps:
    """One image's per-scale flip-averaged stride-4 maps (from `forward_maps`) -> `Heatmaps` (mean of scales).

    "reference": `upsample_reference` per scale on the host, mean -> (C, H, W) CPU tensors, identity mapping.
    "stride4": every scale resampled onto the stride-4 grid of `config.base_scale` on the maps' device.
    """
    if len(inputs) != len(maps) or not inputs:
        raise ValueError(f"aggregate: need one map per scale input, got {len(inputs)} inputs, {len(maps)} maps")
    image_size = inputs[0].image_size
    if config.aggregation == "reference":
        total = None
        for item, m in zip(inputs, maps):
            up = upsample_reference(m[:_DECODED_CHANNELS].cpu().numpy(), item.resized_shape, image_size,
                                    config.stride)
            total = up if total is None else np.add(total, up, out=total)
        total /= len(maps)
        return _split(torch.from_numpy(total), (1.0, 1.0, 0.0, 0.0), image_size)
    base = config.factor(config.base_scale, *image_size)
    grid = _grid_shape(base, image_size, config.stride)
    total = None
    for item, m in zip(inputs, maps):
        _check_stride4(m, "aggregate")
        if item.factor == base:  # same grid: the cells coincide, take them as they are
            sampled = m[:_DECODED_CHANNELS, :grid[0], :grid[1]].float()
        else:
            sampled = _resample(m[:_DECODED_CHANNELS], item.factor / base, grid)
        total = sampled.clone() if total is None else total.add_(sampled)
    return _split(total / len(maps), _grid_mapping(base, config.stride), image_size)


def predict_inputs(model: torch.nn.Module, inputs_per_image: Sequence[Sequence[ScaleInput]],
                   config: InferConfig = PAPER, **forward_kwargs) -> list[Heatmaps]:
    """The device step: preprocessed images (a list of `preprocess` outputs) -> one `Heatmaps` per image.
    All scales of all images are batched together; `forward_kwargs` go to `forward_maps`."""
    flat = [item for image in inputs_per_image for item in image]
    start = time.perf_counter()
    maps = forward_maps(model, flat, config, **forward_kwargs)
    LOG.debug("forward_maps: %d images, %d inputs in %.3f s (asynchronous on CUDA)", len(inputs_per_image),
              len(flat), time.perf_counter() - start)
    results, start = [], 0
    for image in inputs_per_image:
        results.append(aggregate(image, maps[start:start + len(image)], config))
        start += len(image)
    return results


def predict_heatmaps(model: torch.nn.Module, images_bgr: Sequence[np.ndarray], config: InferConfig = PAPER,
                     device=None, dtype: torch.dtype | None = None, **forward_kwargs) -> list[Heatmaps]:
    """BGR uint8 (H, W, 3) images of any sizes -> one `Heatmaps` per image (`preprocess` + `predict_inputs`).

    device: where the model is expected to be (None: wherever it is); a mismatch is an error, not a move
    (use `prepare_model` once). dtype: autocast dtype or None (float32). forward_kwargs: `forward_maps`'s
    channels_last and batch_size.
    """
    if device is not None:
        wanted, actual = torch.device(device), next(model.parameters()).device
        if wanted.type != actual.type or wanted.index not in (None, actual.index):
            raise ValueError(f"predict_heatmaps: the model is on {actual}, not {wanted}; "
                             f"call prepare_model(model, {str(wanted)!r}) once first")
    if isinstance(images_bgr, np.ndarray):
        raise TypeError("predict_heatmaps: images_bgr must be a list of (H, W, 3) arrays, not one array")
    prepared = []
    for n, image in enumerate(images_bgr):
        try:
            prepared.append(preprocess(image, config))
        except (TypeError, ValueError) as error:
            raise type(error)(f"image {n}: {error}") from error
    return predict_inputs(model, prepared, config, dtype=dtype, **forward_kwargs)

