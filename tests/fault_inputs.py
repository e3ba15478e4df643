"""Inputs of the fault tests: coco-mini JPEGs with two broken objects, and a tiny random IMHN that finds persons."""
from __future__ import annotations

from pathlib import Path

import torch

from simplepose.checkpoint import save_checkpoint
from simplepose.model import IMHN

BROKEN = {"empty.jpg": "empty", "truncated.jpg": "decode_error"}
"""The broken objects `image_objects` adds, with the status the job gives them."""


def image_objects(images: list[Path], prefix: str) -> dict[str, bytes]:
    """{prefix/name: bytes} of the JPEGs plus an empty and a truncated object (`BROKEN`)."""
    objects = {f"{prefix}/{p.name}": p.read_bytes() for p in images}
    objects.update({f"{prefix}/empty.jpg": b"", f"{prefix}/truncated.jpg": images[0].read_bytes()[:3000]})
    return objects


def loud_random_checkpoint(path: Path) -> Path:
    """A seeded tiny IMHN (1 stack, width 32) saved at `path`, its output layers louder and offset so that its
    random maps have peaks above the decoder's thresholds: the job finds persons to write."""
    torch.manual_seed(0)
    model = IMHN(stacks=1, width=32, increase=8)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("outs."):
                parameter.mul_(10) if name.endswith("weight") else parameter.add_(0.3)
    save_checkpoint(model, path, {"name": "tiny-random"})
    return path
