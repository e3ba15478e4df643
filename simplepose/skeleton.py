"""Keypoints, body parts, channel layout and flip maps: the one source of truth (docs/method.md §1).

Two keypoint orders exist:
* the **reference order** (18 keypoints: COCO's 17 plus the neck, CMU/OpenPose order) used by the network's
  channels, the targets and the decoder;
* the **COCO order** (17 keypoints) used by annotations, results and the Parquet tables.

Visibility conventions:
* COCO: 0 = not labelled, 1 = labelled but occluded, 2 = labelled and visible.
* reference ("recoded", docs/method.md §1.1): 0 = labelled occluded, 1 = labelled visible, 2 = absent.
  A keypoint is *used* when its recoded visibility is < 2.
"""
from __future__ import annotations

import numpy as np

KEYPOINTS: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
"""The 18 keypoints in the reference (network channel) order."""

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
"""The 17 COCO keypoints in COCO order (as in `person_keypoints_*.json`)."""

COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
"""COCO's drawing skeleton as 0-based COCO keypoint index pairs (for overlays and table metadata)."""

NECK = 1
"""Reference index of the neck, the one keypoint COCO does not have."""

REFERENCE_TO_COCO: tuple[int, ...] = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
"""COCO index of each reference keypoint (`dt_gt_mapping`); -1 for the neck."""

COCO_TO_REFERENCE: tuple[int, ...] = tuple(REFERENCE_TO_COCO.index(c) for c in range(17))
"""Reference index of each COCO keypoint."""

LIMBS: tuple[tuple[int, int], ...] = (
    (1, 0), (1, 14), (1, 15), (1, 16), (1, 17), (0, 14), (0, 15), (14, 16), (15, 17), (1, 2),
    (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (0, 2), (0, 5), (2, 8), (8, 12), (5, 11), (11, 9), (16, 2), (17, 5), (8, 11),
)
"""The 30 body parts as (from, to) reference keypoint indices, in the reference order (docs/method.md §1.2).
The order matters: the greedy assembly walks limbs in this order with `from` as the anchor."""

NUM_KEYPOINTS = len(KEYPOINTS)  # 18
NUM_LIMBS = len(LIMBS)  # 30

# Output channel layout (docs/method.md §1.3).
LIMB_CHANNELS = slice(0, NUM_LIMBS)  # 0-29 body-part heatmaps
KEYPOINT_START = NUM_LIMBS  # 30
KEYPOINT_CHANNELS = slice(KEYPOINT_START, KEYPOINT_START + NUM_KEYPOINTS)  # 30-47 keypoint heatmaps
PERSON_MASK_CHANNEL = 48  # eroded union of person/crowd masks ("background" in the reference)
MAX_KEYPOINT_CHANNEL = 49  # max over the 18 keypoint channels ("reverseKeypoint" in the reference)
NUM_CHANNELS = 50

LEFT_KEYPOINTS: tuple[int, ...] = (5, 6, 7, 11, 12, 13, 15, 17)
RIGHT_KEYPOINTS: tuple[int, ...] = (2, 3, 4, 8, 9, 10, 14, 16)
"""Reference indices swapped pairwise when a training sample is mirrored (docs/method.md §1.4)."""

KEYPOINT_FLIP: tuple[int, ...] = tuple(
    {**dict(zip(LEFT_KEYPOINTS, RIGHT_KEYPOINTS)), **dict(zip(RIGHT_KEYPOINTS, LEFT_KEYPOINTS))}.get(k, k)
    for k in range(NUM_KEYPOINTS)
)
"""Mirror partner of each reference keypoint (an involution)."""

FLIP_HEAT_ORDER: tuple[int, ...] = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16, 18, 19)
"""Test-time flip map of the 20 "heat" channels (channels 30-49, indexed from 30)."""

FLIP_LIMB_ORDER: tuple[int, ...] = (
    0, 2, 1, 4, 3, 6, 5, 8, 7, 12, 13, 14, 9, 10, 11, 18, 19, 20, 15, 16, 17, 22, 21, 25, 26, 23, 24, 28, 27, 29,
)
"""Test-time flip map of the 30 body-part channels."""

FLIP_CHANNEL_ORDER: tuple[int, ...] = FLIP_LIMB_ORDER + tuple(KEYPOINT_START + c for c in FLIP_HEAT_ORDER)
"""Flip map of all 50 channels: `avg[c] = (out[c] + hflip(out_of_flipped_input)[FLIP_CHANNEL_ORDER[c]]) / 2`."""


def coco_to_reference(keypoints: np.ndarray) -> np.ndarray:
    """COCO keypoints to reference keypoints with recoded visibility and the neck (docs/method.md §1.1).

    keypoints: (P, 17, 3) or (17, 3) float, COCO order, (x, y, v) with COCO visibility (0/1/2), pixels.
    Returns (P, 18, 3) or (18, 3) float64 in reference order, v recoded (2->1, 1->0, 0->2). The neck is the
    shoulders' midpoint with v = min of theirs when both are labelled, else (0, 0, 2). Absent keypoints keep
    their (x, y) (COCO writes 0, 0): absence is decided by v alone.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape[-2:] != (17, 3):
        raise ValueError(f"coco_to_reference: expected (..., 17, 3) COCO keypoints, got shape {kp.shape}")
    squeeze = kp.ndim == 2
    kp = kp.reshape(-1, 17, 3)
    out = np.zeros((kp.shape[0], NUM_KEYPOINTS, 3))
    coco_index = np.array([c if c >= 0 else 0 for c in REFERENCE_TO_COCO])
    out[:] = kp[:, coco_index]
    v = out[..., 2]
    out[..., 2] = np.select([v == 2, v == 1], [1.0, 0.0], 2.0)
    rsho, lsho = out[:, 2], out[:, 5]
    both = (rsho[:, 2] < 2) & (lsho[:, 2] < 2)
    out[:, NECK, :2] = np.where(both[:, None], (rsho[:, :2] + lsho[:, :2]) / 2, 0.0)
    out[:, NECK, 2] = np.where(both, np.minimum(rsho[:, 2], lsho[:, 2]), 2.0)
    return out[0] if squeeze else out


def reference_to_coco(keypoints: np.ndarray) -> np.ndarray:
    """Reference-order keypoints (..., 18, K) to COCO order (..., 17, K), dropping the neck."""
    kp = np.asarray(keypoints)
    if kp.shape[-2] != NUM_KEYPOINTS:
        raise ValueError(f"reference_to_coco: expected (..., 18, K) keypoints, got shape {kp.shape}")
    return kp[..., list(COCO_TO_REFERENCE), :]
