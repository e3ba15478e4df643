"""`simplepose.Predictor`: images in, persons out, in one call, with the labeling job's functions.

    predictor = simplepose.Predictor("model.pt")           # preset "fast" = the labeling job's defaults
    poses = predictor("photo.jpg")                          # simplepose.decode.Poses
    poses.keypoints, poses.scores, poses.boxes              # (P, 17, 3) COCO order, (P,), (P, 4) x, y, w, h

The steps are exactly the labeling job's (`pipelines.label.stages`): `simplepose.infer.preprocess` ->
`predict_inputs` -> `simplepose.decode.find_candidates_batch` -> `assemble` -> `select_poses` with the same
floor (`simplepose.decode.POSE_FLOOR`). No Ray, MLflow or object-store client: models and images are local
paths, file objects or in-memory objects (open a URI with fsspec yourself and pass the file object).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from simplepose.checkpoint import load_model
from simplepose.decode import POSE_FLOOR, DecoderConfig, Poses, PoseFloor, assemble, find_candidates_batch, \
    select_poses
from simplepose.infer import HEAD, LABELING, PAPER, InferConfig, predict_inputs, prepare_model, preprocess

PRESETS: dict[str, InferConfig] = {"fast": LABELING, "head": HEAD, "paper": PAPER}
"""Predictor presets. "fast" = the labeling job's defaults (`simplepose.infer.LABELING`: boxsize 640, one scale,
flip, stride-4 maps; note `simplepose.infer.FAST` is the same at boxsize 512); "head" = the authors' HEAD
setting (reference aggregation); "paper" = the paper's five scales (slow; the evaluation setting)."""
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_OWN_SETTINGS = ("precision", "batch_size")
_INFER_FIELDS = tuple(f.name for f in dataclasses.fields(InferConfig))
_DECODER_FIELDS = tuple(f.name for f in dataclasses.fields(DecoderConfig))
_FLOOR_FIELDS = tuple(f.name for f in dataclasses.fields(PoseFloor))


class Predictor:
    """Pose estimation for a few images at a time in a Python process.

    model: a checkpoint (local path or binary file object; ours or the authors', `simplepose.load_model`) or an
      `torch.nn.Module` (an IMHN; it is put in eval mode on `device`, in place).
    preset: a name in `PRESETS` ("fast", "head", "paper"): the `InferConfig` to start from.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1"...
    settings: override by name any field of `InferConfig` (boxsize, scales, flip, aggregation, ...),
      `DecoderConfig` (mode, max_candidates, max_persons, ...), `PoseFloor` (min_person_score, min_keypoints),
      or precision ("auto": bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPUs, as the labeling job;
      "fp32", "bf16", "fp16") and batch_size (images per network forward, default 16). Unknown names raise
      ValueError listing the accepted ones. mode="reference" without an aggregation picks "reference", as the
      labeling job does.
    """

    def __init__(self, model: Any, preset: str = "fast", device: str = "auto", **settings):
        if preset not in PRESETS:
            raise ValueError(f"Predictor: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        accepted = (*_INFER_FIELDS, *_DECODER_FIELDS, *_FLOOR_FIELDS, *_OWN_SETTINGS)
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            raise ValueError(f"Predictor: unknown setting(s) {unknown}; accepted: {sorted(accepted)}")
        infer_changes = {k: v for k, v in settings.items() if k in _INFER_FIELDS}
        if settings.get("mode") == "reference" and "aggregation" not in settings:
            infer_changes["aggregation"] = "reference"
        self.infer_config = dataclasses.replace(PRESETS[preset], **infer_changes)
        self.decoder_config = DecoderConfig(**{k: v for k, v in settings.items() if k in _DECODER_FIELDS})
        self.floor = dataclasses.replace(POSE_FLOOR, **{k: v for k, v in settings.items() if k in _FLOOR_FIELDS})
        if self.decoder_config.is_reference and self.infer_config.aggregation != "reference":
            raise ValueError("Predictor: mode='reference' needs aggregation='reference' (maps at the original "
                             "resolution)")
        self.batch_size = int(settings.get("batch_size", 16))
        if self.batch_size < 1:
            raise ValueError(f"Predictor: batch_size must be >= 1, got {self.batch_size}")
        self.device = _device(device)
        precision = settings.get("precision", "auto")
        if precision not in PRECISIONS:
            raise ValueError(f"Predictor: precision {precision!r} is not one of {sorted(PRECISIONS)}")
        self.dtype = _autocast_dtype(precision, self.device)
        self.model = prepare_model(_load(model), self.device)

    def __repr__(self) -> str:
        return (f"Predictor(device={str(self.device)!r}, infer={self.infer_config}, decoder={self.decoder_config}, "
                f"floor={self.floor})")

    def __call__(self, images, rgb: bool = False) -> Poses | list[Poses]:
        """One image -> Poses; a list or tuple of images -> a list of Poses (same order).

        An image is a numpy uint8 (H, W, 3) array (BGR, or RGB with rgb=True), a PIL image, or a local path /
        binary file object of an encoded image (EXIF orientation applied, as the labeling job decodes).
        Poses: keypoints float64 (P, 17, 3) COCO order (x, y, score; 0 when missing) in original pixels,
        scores (P,), boxes (P, 4) x, y, w, h; persons by descending score, the floor applied.
        """
        if isinstance(images, (list, tuple)):
            return self.predict(images, rgb=rgb)
        return self.predict([images], rgb=rgb)[0]

    @torch.inference_mode()
    def predict(self, images: Sequence, rgb: bool = False) -> list[Poses]:
        """A list of images (see `__call__`) -> one Poses per image."""
        bgr = []
        for n, image in enumerate(images):
            try:
                bgr.append(to_bgr(image, rgb))
            except ValueError as error:
                raise ValueError(f"Predictor: image {n}: {error}") from None
        out: list[Poses] = []
        for first in range(0, len(bgr), self.batch_size):
            prepared = [preprocess(image, self.infer_config) for image in bgr[first:first + self.batch_size]]
            heatmaps = predict_inputs(self.model, prepared, self.infer_config, dtype=self.dtype,
                                      batch_size=self.batch_size)
            candidates = find_candidates_batch(heatmaps, self.decoder_config)
            out += [select_poses(assemble(c, self.decoder_config), self.floor) for c in candidates]
        return out


def to_bgr(image, rgb: bool = False) -> np.ndarray:
    """An image (numpy uint8 (H, W, 3) BGR or RGB with rgb=True, PIL image, local path or file object of an
    encoded image) -> contiguous uint8 (H, W, 3) BGR. Raises ValueError naming what is wrong."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8, got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must have shape (H, W, 3), got {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"the image is empty, shape {image.shape}")
        return np.ascontiguousarray(image[..., ::-1] if rgb else image)
    if isinstance(image, Image.Image):
        return _pil_to_bgr(image)
    if isinstance(image, (str, os.PathLike)):
        if "://" in os.fspath(image):
            raise ValueError(f"{os.fspath(image)!r}: Predictor reads local paths and file objects only; open "
                             "a URI with fsspec and pass the file object")
        if not os.path.isfile(image):
            raise ValueError(f"no such image file: {os.fspath(image)!r}")
    elif not hasattr(image, "read"):
        raise ValueError(f"expected a numpy uint8 array, a PIL image, a path or a file object, got "
                         f"{type(image).__name__}")
    try:
        with Image.open(image) as opened:
            return _pil_to_bgr(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode {getattr(image, 'name', image)!r} as an image: {error}") from None


def _pil_to_bgr(image) -> np.ndarray:
    """PIL image -> uint8 BGR; transparent pixels composited over white, as the labeling job decodes."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert("RGB"))
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty, size {image.size}")
    return np.ascontiguousarray(array[..., ::-1])


def _load(model) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)) and "://" in os.fspath(model):
        raise ValueError(f"Predictor: model {os.fspath(model)!r}: local paths and file objects only; open a URI "
                         "with fsspec and pass the file object")
    if not isinstance(model, (str, os.PathLike)) and not hasattr(model, "read"):
        raise ValueError(f"Predictor: model must be a checkpoint path, a binary file object or an nn.Module, "
                         f"got {type(model).__name__}")
    return load_model(model)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Predictor: device {device!r} is not a torch device: {error}") from None


def _autocast_dtype(precision: str, device: torch.device):
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
