"""Keypoint assignment: heatmaps to persons, in two stages (docs/method.md §9; DESIGN "Decoding is split in two").

`find_candidates` (torch, on the maps' device): peaks with sub-cell positions and scores, and body-part
scores of candidate pairs; only small numpy arrays come out (`Candidates`, picklable).
`assemble` (numpy, CPU): greedy grouping into persons -> `Poses` in COCO order and original image pixels.
Bounded on any maps: `DecoderConfig.max_candidates` peaks per type and `max_persons` persons per image.
`select_poses(poses, POSE_FLOOR)`: the output floor of the labeling tables, `simplepose render` and
`simplepose.Predictor` (`PoseFloor`: min_person_score, min_keypoints), applied after `assemble`.
`DecoderConfig(mode="reference")` is the authors' decoder bug for bug (Li, Su, Wang, "Simple Pose", AAAI 2020;
code `hellojialee/Improved-Body-Parts`, re-implemented from docs/method.md §11, not copied); `mode="default"` is ours.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from simplepose.decode.assembly import assemble_greedy
from simplepose.decode.config import DecoderConfig
from simplepose.decode.floor import POSE_FLOOR, PoseFloor, select_poses
from simplepose.decode.maps import check_heatmaps
from simplepose.decode.pairs import reference_pair_scores, stride_pair_scores
from simplepose.decode.peaks import reference_peaks, stride_peaks
from simplepose.decode.reference import assemble_reference
from simplepose.decode.structures import Candidates, Poses, coco_results, split_by_image

LOG = logging.getLogger(__name__)

__all__ = ["DecoderConfig", "Candidates", "Poses", "find_candidates", "find_candidates_batch", "assemble",
           "decode", "coco_results", "PoseFloor", "POSE_FLOOR", "select_poses"]


@torch.inference_mode()
def find_candidates(heatmaps, config: DecoderConfig = DecoderConfig()) -> Candidates:
    """Tensor stage for one image: `find_candidates_batch([heatmaps], config)[0]`."""
    return find_candidates_batch([heatmaps], config)[0]


@torch.inference_mode()
def find_candidates_batch(batch: Sequence, config: DecoderConfig = DecoderConfig()) -> list[Candidates]:
    """Tensor stage. batch: `simplepose.infer.Heatmaps` (keypoints (18, h, w), limbs (30, h, w) float tensors
    on one device, map_to_image (sx, sy, ox, oy), image_size (H, W)) per image -> Candidates per image, in
    original image pixels (sx is taken as the pixels per cell for lengths: maps have square cells). The default
    mode decodes the whole batch in one set of tensor operations (their fixed cost is what dominates on small
    maps: batches of 16 are ~3x faster per image than one by one on a CPU core); reference mode goes image by
    image."""
    checked = [check_heatmaps(heatmaps, config) for heatmaps in batch]
    devices = sorted({str(item[0].device) for item in checked})
    if len(devices) > 1:
        raise ValueError(f"find_candidates_batch: the batch's maps are on several devices {devices}")
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
    LOG.debug("tensor stage: %d images, %d candidates, %d accepted pairs", len(sizes), len(peaks.types),
              len(pairs.limbs))
    return split_by_image(xy, peaks, pairs, sizes)


def _reference_candidates(keypoints, limbs, mapping, image_size, config: DecoderConfig) -> Candidates:
    """The authors' find_peaks + find_connections scoring on maps at original resolution (identity mapping)."""
    peaks = reference_peaks(keypoints, config)
    pairs = reference_pair_scores(limbs, peaks.xy, peaks.types, float(image_size[0]), config)
    return split_by_image(peaks.xy, peaks, pairs, [image_size])[0]


def assemble(candidates: Candidates, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Assembly stage (numpy, CPU): Candidates -> Poses."""
    if not isinstance(candidates, Candidates):
        raise TypeError(f"assemble: expected Candidates, got {type(candidates).__name__}")
    if config.is_reference:
        return assemble_reference(candidates, config)
    poses = assemble_greedy(candidates, config) if config.global_greedy else assemble_reference(candidates, config)
    return _best_persons(poses, config.max_persons)


def _best_persons(poses: Poses, limit: int) -> Poses:
    """The `limit` highest-scoring persons (ties: the earlier one), in their order; all when limit is 0."""
    if not limit or len(poses) <= limit:
        return poses
    keep = np.sort(np.argsort(-poses.scores, kind="stable")[:limit])
    return Poses(poses.keypoints[keep], poses.scores[keep], poses.boxes[keep], poses.image_size)


def decode(heatmaps, config: DecoderConfig = DecoderConfig()) -> Poses:
    """Both stages: Heatmaps -> Poses."""
    return assemble(find_candidates(heatmaps, config), config)
