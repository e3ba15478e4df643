"""Keypoint assignment: heatmaps to persons, in two stages (SPEC §8; DESIGN "Decoding is split in two").

`find_candidates` (torch, on the maps' device): peaks with sub-cell positions and scores, and body-part
scores of candidate pairs; only small numpy arrays come out (`Candidates`, picklable).
`assemble` (numpy, CPU): greedy grouping into persons -> `Poses` in COCO order and original image pixels.
`DecoderConfig(mode="reference")` is the authors' decoder bug for bug (Li, Su, Wang, "Simple Pose", AAAI 2020;
code `hellojialee/Improved-Body-Parts`, read through SPEC.md only); `mode="default"` is ours.
"""
from __future__ import annotations

import logging

import torch

from simplepose.decode.assembly import assemble_greedy
from simplepose.decode.config import DecoderConfig
from simplepose.decode.maps import check_heatmaps
from simplepose.decode.pairs import reference_pair_scores, stride_pair_scores
from simplepose.decode.peaks import reference_peaks, stride_peaks
from simplepose.decode.reference import assemble_reference
from simplepose.decode.structures import Candidates, Poses, coco_results

LOG = logging.getLogger(__name__)

__all__ = ["DecoderConfig", "Candidates", "Poses", "find_candidates", "assemble", "decode", "coco_results"]


@torch.inference_mode()
def find_candidates(heatmaps, config: DecoderConfig = DecoderConfig()) -> Candidates:
    """Tensor stage. heatmaps: `simplepose.infer.Heatmaps` (keypoints (18, h, w), limbs (30, h, w) float
    tensors, map_to_image (sx, sy, ox, oy), image_size (H, W)) -> Candidates in original image pixels."""
    keypoints, limbs, (sx, sy, ox, oy), image_size = check_heatmaps(heatmaps, config)
    height = float(image_size[0])
    if config.is_reference:
        peaks = reference_peaks(keypoints, config)
        pairs = reference_pair_scores(limbs, peaks.xy, peaks.types, height, config)
    else:
        peaks = stride_peaks(keypoints, config)
        pairs = stride_pair_scores(limbs, peaks.xy, peaks.types, float(sx), height, config)
    xy = peaks.xy * torch.tensor([sx, sy], dtype=torch.float64, device=peaks.xy.device)
    xy = xy + torch.tensor([ox, oy], dtype=torch.float64, device=xy.device)
    return Candidates(xy.cpu().numpy(), peaks.scores.cpu().numpy(), peaks.types.cpu().numpy(),
                      pairs.limbs.cpu().numpy(), pairs.a.cpu().numpy(), pairs.b.cpu().numpy(),
                      pairs.scores.cpu().numpy(), pairs.lengths.cpu().numpy(), image_size)


def assemble(candidates: Candidates, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Assembly stage (numpy, CPU): Candidates -> Poses."""
    if not isinstance(candidates, Candidates):
        raise TypeError(f"assemble: expected Candidates, got {type(candidates).__name__}")
    if config.is_reference:
        return assemble_reference(candidates, config)
    return assemble_greedy(candidates, config)


def decode(heatmaps, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Both stages: Heatmaps -> Poses."""
    return assemble(find_candidates(heatmaps, config), config)
