"""The two small arrays that cross stage boundaries: `Candidates` (tensor stage -> assembly) and `Poses`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simplepose.skeleton import NUM_KEYPOINTS, NUM_LIMBS


@dataclass(frozen=True)
class Candidates:
    """Keypoint candidates of one image and the scored candidate pairs of every body part.

    Candidate id = row index; rows are sorted by keypoint type, then by raster order of the peak (docs/method.md §9.1).
    xy: float64 (N, 2) x, y in original image pixels (pixel centres at integer coordinates).
    scores: float64 (N,) keypoint score. types: int64 (N,) reference keypoint index 0..17.
    pair_limbs: int64 (M,) body part 0..29; pair_a / pair_b: int64 (M,) candidate ids of the limb's `from` and
    `to` keypoints; pair_scores: float64 (M,) body-part score; pair_lengths: float64 (M,) |B - A| in original
    image pixels. Only accepted pairs are listed, ordered by limb, then a, then b.
    image_size: (height, width) of the original image in pixels.
    """

    xy: np.ndarray
    scores: np.ndarray
    types: np.ndarray
    pair_limbs: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_scores: np.ndarray
    pair_lengths: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n, m = len(self.types), len(self.pair_limbs)
        if self.xy.shape != (n, 2) or self.scores.shape != (n,):
            raise ValueError(f"Candidates: xy {self.xy.shape} / scores {self.scores.shape} do not match "
                             f"{n} types")
        for name in ("pair_a", "pair_b", "pair_scores", "pair_lengths"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"Candidates.{name}: shape {getattr(self, name).shape}, expected ({m},)")
        if n and (self.types.min() < 0 or self.types.max() >= NUM_KEYPOINTS):
            raise ValueError(f"Candidates.types: values must be in 0..{NUM_KEYPOINTS - 1}")
        if m and (self.pair_limbs.min() < 0 or self.pair_limbs.max() >= NUM_LIMBS):
            raise ValueError(f"Candidates.pair_limbs: values must be in 0..{NUM_LIMBS - 1}")

    @property
    def counts(self) -> np.ndarray:
        """int64 (18,): number of candidates of each keypoint type."""
        return np.bincount(self.types, minlength=NUM_KEYPOINTS)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "Candidates":
        f, i = np.zeros(0), np.zeros(0, dtype=np.int64)
        return cls(np.zeros((0, 2)), f, i, i, i, i, f, f, image_size)


@dataclass(frozen=True)
class Poses:
    """Persons found in one image, COCO keypoint order.

    keypoints: float64 (P, 17, 3) x, y in original image pixels and a per-keypoint score in [0, 1]
    (x = y = score = 0 when the keypoint is missing). scores: float64 (P,) person score (higher is more
    confident). boxes: float64 (P, 4) x, y, w, h in pixels of the found keypoints (zeros when none).
    image_size: (height, width) of the original image.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        p = len(self.scores)
        if self.keypoints.shape != (p, 17, 3) or self.boxes.shape != (p, 4):
            raise ValueError(f"Poses: keypoints {self.keypoints.shape} / boxes {self.boxes.shape} do not match "
                             f"{p} scores")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_keypoints(cls, keypoints: np.ndarray, scores: np.ndarray, image_size: tuple[int, int]) -> "Poses":
        """Poses with boxes computed as the tight box of the keypoints with a score > 0."""
        keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 17, 3)
        found = keypoints[..., 2] > 0
        big = np.where(found[..., None], keypoints[..., :2], np.inf)
        lo = big.min(axis=1)
        hi = np.where(found[..., None], keypoints[..., :2], -np.inf).max(axis=1)
        any_found = found.any(axis=1)[:, None]
        boxes = np.where(any_found, np.concatenate([lo, hi - lo], axis=1), 0.0)
        return cls(keypoints, np.asarray(scores, dtype=np.float64).reshape(-1), boxes, image_size)


def split_by_image(xy, peaks, pairs, sizes: list) -> list[Candidates]:
    """Tensor-stage outputs of a batch -> one Candidates per image; candidate ids restart at 0 per image.

    xy: (N, 2) image pixels; peaks: `peaks.Peaks` (scores, types, images); pairs: `pairs.Pairs`; both sorted
    by image; sizes: (H, W) per image. Tensors on any device.
    """
    def numpy(*tensors):
        return [t.cpu().numpy() for t in tensors]

    n = len(sizes)
    candidate_cuts = np.cumsum(np.bincount(numpy(peaks.images)[0], minlength=n))[:-1]
    pair_cuts = np.cumsum(np.bincount(numpy(pairs.images)[0], minlength=n))[:-1]
    per_candidate = [np.split(v, candidate_cuts) for v in numpy(xy, peaks.scores, peaks.types)]
    per_pair = [np.split(v, pair_cuts) for v in numpy(pairs.limbs, pairs.a, pairs.b, pairs.scores, pairs.lengths)]
    firsts = np.concatenate([[0], candidate_cuts])
    out = []
    for i, size in enumerate(sizes):
        (c_xy, c_scores, c_types), (limbs, a, b, scores, lengths) = ([v[i] for v in per_candidate],
                                                                      [v[i] for v in per_pair])
        out.append(Candidates(c_xy, c_scores, c_types, limbs, a - firsts[i], b - firsts[i], scores, lengths,
                              tuple(size)))
    return out


def coco_results(poses: Poses, image_id: int, visibility: str = "score") -> list[dict]:
    """COCO keypoint result dicts {image_id, category_id 1, keypoints: 51 floats, score} of one image
    (`simplepose.coco.keypoint_results`, which rounds coordinates to 1e-3 px).

    visibility: "score" writes each keypoint's score as its third value; "reference" writes the authors'
    flag instead, 1 iff x > 0 or y > 0 (docs/method.md §9.4; COCOeval ignores it either way).
    """
    from simplepose.coco import keypoint_results  # pycocotools is only needed by callers that write results

    if visibility not in ("score", "reference"):
        raise ValueError(f"coco_results: visibility {visibility!r} is not 'score' or 'reference'")
    kp = poses.keypoints.copy()
    if visibility == "reference":
        kp[..., 2] = ((kp[..., 0] > 0) | (kp[..., 1] > 0)).astype(np.float64)
    return keypoint_results(image_id, kp, poses.scores)
