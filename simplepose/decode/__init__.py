"""Keypoint assignment: heatmaps to persons, in two stages (SPEC §8; DESIGN "Decoding is split in two").

`find_candidates` (torch, on the maps' device): peaks with sub-cell positions and scores, and body-part
scores of candidate pairs; only small numpy arrays come out (`Candidates`, picklable).
`assemble` (numpy, CPU): greedy grouping into persons -> `Poses` in COCO order and original image pixels.
`DecoderConfig(mode="reference")` is the authors' decoder bug for bug (Li, Su, Wang, "Simple Pose", AAAI 2020;
code `hellojialee/Improved-Body-Parts`, read through SPEC.md only); `mode="default"` is ours.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from simplepose.decode.assembly import assemble_greedy
from simplepose.decode.config import DecoderConfig
from simplepose.decode.maps import check_heatmaps
from simplepose.decode.pairs import reference_pair_scores, stride_pair_scores
from simplepose.decode.peaks import reference_peaks, stride_peaks
from simplepose.decode.reference import assemble_reference
from simplepose.decode.structures import Candidates, Poses, coco_results

LOG = logging.getLogger(__name__)

__all__ = ["DecoderConfig", "Candidates", "Poses", "find_candidates", "find_candidates_batch", "assemble", "decode",
           "coco_results"]


@torch.inference_mode()
def find_candidates(heatmaps, config: DecoderConfig = DecoderConfig()) -> Candidates:
    """Tensor stage for one image: `find_candidates_batch([heatmaps], config)[0]`."""
    return find_candidates_batch([heatmaps], config)[0]


@torch.inference_mode()
def find_candidates_batch(batch: Sequence, config: DecoderConfig = DecoderConfig()) -> list[Candidates]:
    """Tensor stage. batch: `simplepose.infer.Heatmaps` (keypoints (18, h, w), limbs (30, h, w) float tensors
    on one device, map_to_image (sx, sy, ox, oy), image_size (H, W)) per image -> Candidates per image, in
    original image pixels. The default mode decodes the whole batch in one set of tensor operations (their
    fixed cost is what dominates on small maps); reference mode decodes image by image."""
    checked = [check_heatmaps(heatmaps, config) for heatmaps in batch]
    if config.is_reference:
        return [_reference_candidates(*item, config) for item in checked]
    if not checked:
        return []
    device = checked[0][0].device
    mapping = torch.tensor([item[2] for item in checked], dtype=torch.float64, device=device)
    sizes = [item[3] for item in checked]
    peaks = stride_peaks([item[0] for item in checked], config)
    heights = torch.tensor([float(h) for h, _ in sizes], dtype=torch.float64, device=device)
    pairs = stride_pair_scores([item[1] for item in checked], peaks, mapping[:, 0], heights, config)
    xy = peaks.xy * mapping[peaks.images, :2] + mapping[peaks.images, 2:]
    return _split(xy, peaks, pairs, sizes)


def _reference_candidates(keypoints, limbs, mapping, image_size, config: DecoderConfig) -> Candidates:
    """The authors' find_peaks + find_connections scoring on maps at original resolution (identity mapping)."""
    peaks = reference_peaks(keypoints, config)
    pairs = reference_pair_scores(limbs, peaks.xy, peaks.types, float(image_size[0]), config)
    return _split(peaks.xy, peaks, pairs, [image_size])[0]


def _split(xy: torch.Tensor, peaks, pairs, sizes: list) -> list[Candidates]:
    """Batch tensors -> one numpy Candidates per image (candidate ids restart at 0 in each image)."""
    n = len(sizes)
    arrays = [t.cpu().numpy() for t in (xy, peaks.scores, peaks.types, peaks.images, pairs.limbs, pairs.a,
                                        pairs.b, pairs.scores, pairs.lengths, pairs.images)]
    xy, scores, types, images, limbs, a, b, pair_scores, lengths, pair_images = arrays
    cuts = np.cumsum(np.bincount(images, minlength=n))[:-1]
    pair_cuts = np.cumsum(np.bincount(pair_images, minlength=n))[:-1]
    firsts = np.concatenate([[0], cuts])
    per_image = zip(*(np.split(v, cuts) for v in (xy, scores, types)),
                    *(np.split(v, pair_cuts) for v in (limbs, a, b, pair_scores, lengths)))
    return [Candidates(c_xy, c_scores, c_types, c_limbs, c_a - first, c_b - first, c_scores_pairs, c_lengths, size)
            for (c_xy, c_scores, c_types, c_limbs, c_a, c_b, c_scores_pairs, c_lengths), first, size
            in zip(per_image, firsts, sizes)]


def assemble(candidates: Candidates, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Assembly stage (numpy, CPU): Candidates -> Poses."""
    if not isinstance(candidates, Candidates):
        raise TypeError(f"assemble: expected Candidates, got {type(candidates).__name__}")
    if config.is_reference or not config.global_greedy:
        return assemble_reference(candidates, config)
    return assemble_greedy(candidates, config)


def decode(heatmaps, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Both stages: Heatmaps -> Poses."""
    return assemble(find_candidates(heatmaps, config), config)
