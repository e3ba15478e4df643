"""Validation of the decoder's input maps (a `simplepose.infer.Heatmaps` or any object with its fields)."""
from __future__ import annotations

import math

import torch

from simplepose.decode.config import DecoderConfig
from simplepose.skeleton import NUM_KEYPOINTS, NUM_LIMBS


def check_heatmaps(heatmaps, config: DecoderConfig):
    """-> (keypoints (18, h, w), limbs (30, h, w), (sx, sy, ox, oy) floats, (H, W) ints), or a clear error.

    Maps must be float32 (float64 is accepted too: the authors decoded float64 maps in their G8 case) torch
    tensors of matching (h, w), finite (checked here in reference mode, where read in the default mode).
    Reference mode needs maps at original resolution with the identity
    mapping (the authors' x4 + resize post-processing, `simplepose.infer.upsample_reference`).
    """
    for name in ("keypoints", "limbs", "map_to_image", "image_size"):
        if not hasattr(heatmaps, name):
            raise TypeError(f"decode: heatmaps ({type(heatmaps).__name__}) has no field {name!r}; "
                            "expected a simplepose.infer.Heatmaps")
    keypoints, limbs = heatmaps.keypoints, heatmaps.limbs
    for name, maps, channels in (("keypoints", keypoints, NUM_KEYPOINTS), ("limbs", limbs, NUM_LIMBS)):
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"decode: heatmaps.{name} must be a torch.Tensor, got {type(maps).__name__}")
        if maps.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"decode: heatmaps.{name} must be float32, got {maps.dtype}")
        if maps.ndim != 3 or maps.shape[0] != channels or min(maps.shape[1:], default=0) < 1:
            raise ValueError(f"decode: heatmaps.{name} must be ({channels}, h, w) with h, w >= 1, "
                             f"got {tuple(maps.shape)}")
    if keypoints.shape[1:] != limbs.shape[1:]:
        raise ValueError(f"decode: keypoint maps {tuple(keypoints.shape)} and body-part maps "
                         f"{tuple(limbs.shape)} differ in size")
    # Reference mode scans every value (a summing pass: far cheaper than an element-wise isfinite); the default
    # mode checks only the values it reads (peaks, neighbours, pair samples), keeping one dense pass in all.
    if config.is_reference and not (math.isfinite(float(keypoints.sum())) and math.isfinite(float(limbs.sum()))):
        raise ValueError("decode: heatmaps contain NaN or inf")
    mapping = tuple(float(v) for v in heatmaps.map_to_image)
    size = tuple(int(v) for v in heatmaps.image_size)
    if len(mapping) != 4 or not all(math.isfinite(v) for v in mapping) or mapping[0] <= 0 or mapping[1] <= 0:
        raise ValueError(f"decode: map_to_image must be (sx > 0, sy > 0, ox, oy), got {heatmaps.map_to_image}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"decode: image_size must be (height, width) >= 1, got {heatmaps.image_size}")
    if config.is_reference and (mapping != (1.0, 1.0, 0.0, 0.0) or tuple(keypoints.shape[1:]) != size):
        raise ValueError(f"decode: reference mode needs maps at the original resolution {size} with the "
                         f"identity map_to_image, got maps {tuple(keypoints.shape[1:])} and {mapping}; use "
                         "simplepose.infer.upsample_reference or mode='default'")
    return keypoints, limbs, mapping, size
