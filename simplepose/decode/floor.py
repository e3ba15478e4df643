"""The output floor: which decoded persons are worth writing out (labeling tables, `simplepose render`,
`simplepose.Predictor`). One definition, `POSE_FLOOR`, used by all of them.

The decoder itself keeps weak persons on purpose (COCO AP rewards a ranked list that goes deep: one-keypoint
"persons" from `keep_singletons` raise recall); an analyst's table does not want them. The floor is applied
after `simplepose.decode.assemble`, never inside it, so AP figures of the decoder stay comparable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simplepose.decode.structures import Poses


@dataclass(frozen=True)
class PoseFloor:
    """Keep a person when its score >= min_person_score AND it has >= min_keypoints keypoints with a score > 0.

    Person scores are the decoder's (`DecoderConfig.person_score`; default "keypoint_sum": summed keypoint
    scores / 17, so a person with k keypoints scores at most k / 17). PoseFloor(0.0, 0) keeps everything.
    """

    min_person_score: float = 0.1
    min_keypoints: int = 2

    def __post_init__(self) -> None:
        if not np.isfinite(self.min_person_score) or self.min_keypoints < 0:
            raise ValueError(f"PoseFloor: min_person_score must be finite and min_keypoints >= 0, got "
                             f"{self.min_person_score}, {self.min_keypoints}")

    def keep(self, keypoints, scores) -> np.ndarray:
        """bool (P,): persons that pass. keypoints: (P, 17, 3) x, y, score (NaN scores count as missing);
        scores: (P,) person scores. For callers holding arrays rather than `Poses` (e.g. a poses table)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        keypoints = np.asarray(keypoints, dtype=np.float64).reshape(len(scores), 17, 3)  # P may be 0
        found = (keypoints[..., 2] > 0).sum(axis=1)  # NaN > 0 is False
        return (scores >= self.min_person_score) & (found >= self.min_keypoints)


POSE_FLOOR = PoseFloor()
"""The floor of the labeling job's `poses` table, `simplepose render` and `simplepose.Predictor`."""


def select_poses(poses: Poses, floor: PoseFloor = POSE_FLOOR) -> Poses:
    """The persons of `poses` that pass `floor`, in their order (a new Poses; the same object when all pass)."""
    if not isinstance(poses, Poses):
        raise TypeError(f"select_poses: expected Poses, got {type(poses).__name__}")
    if not isinstance(floor, PoseFloor):
        raise TypeError(f"select_poses: floor must be a PoseFloor, got {type(floor).__name__}")
    keep = floor.keep(poses.keypoints, poses.scores)
    if keep.all():
        return poses
    return Poses(poses.keypoints[keep], poses.scores[keep], poses.boxes[keep], poses.image_size)
