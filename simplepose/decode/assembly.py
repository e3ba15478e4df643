"""Scored pairs to persons, our way: one greedy pass over all pairs of all body parts in score order.

Every candidate starts as its own group; a pair joins the groups of its two ends unless they already share a
keypoint type (so a person never holds two candidates of one type, and no candidate is shared by two persons).
Unlike the authors' walk (`reference.py`) both ends of a pair count, the order is by score rather than by limb,
and nothing is dropped once attached. Pure numpy + a union-find loop over the (few) accepted pairs.
"""
from __future__ import annotations

import logging

import numpy as np

from simplepose.decode.config import DecoderConfig
from simplepose.decode.structures import Candidates, Poses
from simplepose.skeleton import NUM_KEYPOINTS, reference_to_coco

LOG = logging.getLogger(__name__)


def group_candidates(candidates: Candidates) -> np.ndarray:
    """Greedy grouping: int64 (N,) group label of each candidate (labels are the group's smallest id).

    Pairs are taken by descending key 0.5 * score + 0.25 * score(A) + 0.25 * score(B) (the authors' ranking
    key, here across all limbs); a pair is refused when its two groups already hold a common keypoint type.
    """
    n = len(candidates.types)
    parent = list(range(n))
    owned = [1 << int(t) for t in candidates.types]  # bit set of keypoint types held by each group root
    c = candidates
    key = 0.5 * c.pair_scores + 0.25 * c.scores[c.pair_a] + 0.25 * c.scores[c.pair_b]
    order = np.argsort(-key, kind="stable")
    for a, b in zip(c.pair_a[order].tolist(), c.pair_b[order].tolist()):
        while parent[a] != a:
            parent[a] = a = parent[parent[a]]  # path halving
        while parent[b] != b:
            parent[b] = b = parent[parent[b]]
        if a == b or owned[a] & owned[b]:
            continue
        if b < a:
            a, b = b, a
        parent[b] = a
        owned[a] |= owned[b]
    labels = np.array(parent, dtype=np.int64)
    while True:  # finish path compression, vectorised
        up = labels[labels]
        if np.array_equal(up, labels):
            return labels
        labels = up


def assemble_greedy(candidates: Candidates, config: DecoderConfig) -> Poses:
    """Candidates -> Poses: groups of >= min_parts keypoints (or any size with `keep_singletons`), ranked by
    `person_score`: "keypoint_sum" = sum of the 17 COCO keypoint scores / 17 (complete, confident persons
    first; a one-keypoint group scores at most 1/17), "reference" = 1 - 1/(keypoint + pair scores)."""
    if len(candidates.types) == 0:
        return Poses.from_keypoints(np.zeros((0, 17, 3)), np.zeros(0), candidates.image_size)
    labels = group_candidates(candidates)
    roots, person_of = np.unique(labels, return_inverse=True)
    sizes = np.bincount(person_of, minlength=len(roots))
    kp = np.zeros((len(roots), NUM_KEYPOINTS, 3))
    kp[person_of, candidates.types, :2] = candidates.xy
    kp[person_of, candidates.types, 2] = candidates.scores
    min_parts = 1 if config.keep_singletons else config.min_parts
    keep = sizes >= min_parts
    coco = reference_to_coco(kp)
    if config.person_score == "keypoint_sum":
        scores = coco[..., 2].sum(axis=1) / coco.shape[1]
    else:
        pair_sum = _pair_sums(candidates, labels, roots)
        scores = 1.0 - 1.0 / (kp[..., 2].sum(axis=1) + pair_sum)
    order = np.argsort(-scores[keep], kind="stable")
    return Poses.from_keypoints(coco[keep][order], scores[keep][order], candidates.image_size)


def _pair_sums(candidates: Candidates, labels: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """float64 (G,): summed scores of the pairs inside each group (used by person_score="reference")."""
    inside = labels[candidates.pair_a] == labels[candidates.pair_b]
    group = np.searchsorted(roots, labels[candidates.pair_a[inside]])
    return np.bincount(group, weights=candidates.pair_scores[inside], minlength=len(roots))
