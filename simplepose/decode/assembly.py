"""Scored pairs to persons, our way: one greedy pass over all pairs of all body parts in score order.

Every candidate starts as its own group; a pair joins the groups of its two ends unless they already share a
keypoint type (so a person never holds two candidates of one type, and no candidate is shared by two persons).
Unlike the authors' walk (`reference.py`) both ends of a pair count, the order is by score rather than by limb,
and nothing is dropped once attached. Groups that no body part can link to their person (an arm whose
shoulder is unseen) then join the nearest larger group. Pure numpy + a union-find loop over the (few) pairs.
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
    """Candidates -> Poses: groups (after `attach_fragments`) of >= min_parts keypoints (any size with
    `keep_singletons`), ranked by `person_score`: "keypoint_sum" = sum of the 17 COCO keypoint scores / 17
    (complete, confident persons first; a one-keypoint group scores at most 1/17), "reference" =
    1 - 1/(keypoint scores + scores of the pairs inside the group)."""
    if len(candidates.types) == 0:
        return Poses.from_keypoints(np.zeros((0, 17, 3)), np.zeros(0), candidates.image_size)
    labels = group_candidates(candidates)
    roots, person_of = np.unique(labels, return_inverse=True)
    sizes = np.bincount(person_of, minlength=len(roots))
    kp = np.zeros((len(roots), NUM_KEYPOINTS, 3))
    kp[person_of, candidates.types, :2] = candidates.xy
    kp[person_of, candidates.types, 2] = candidates.scores
    if config.attach_fragments:
        kp, sizes = attach_fragments(kp, sizes, config.fragment_reach)
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


def attach_fragments(kp: np.ndarray, sizes: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Join each group to the nearest larger group when no body part can link them.

    The skeleton cannot link some keypoints without others (an elbow only through its shoulder): an
    unlabelled or unseen shoulder leaves the arm as a separate group. kp: float64 (G, 18, 3) groups
    (score > 0 = present), sizes: int64 (G,). A group moves into the larger group that holds none of its
    types and whose nearest keypoint is closest, if that distance is below `reach` x the host's size (the
    diagonal of its keypoints' box). Returns (kp, sizes) with emptied groups at size 0.
    """
    present = kp[..., 2] > 0
    for small in np.argsort(sizes, kind="stable"):
        if sizes[small] == 0:
            continue
        hosts = (sizes > sizes[small]) & ~(present & present[small]).any(axis=1)
        if not hosts.any():
            continue
        own = kp[small, present[small], :2]  # (k, 2)
        dist = np.linalg.norm(kp[hosts, None, :, :2] - own[None, :, None], axis=-1)  # (h, k, 18)
        dist = np.where(present[hosts][:, None, :], dist, np.inf).min(axis=(1, 2))
        lo = np.where(present[hosts][..., None], kp[hosts, :, :2], np.inf).min(axis=1)
        hi = np.where(present[hosts][..., None], kp[hosts, :, :2], -np.inf).max(axis=1)
        ratio = dist / np.maximum(np.linalg.norm(hi - lo, axis=1), 1.0)
        best = np.argmin(ratio)
        if ratio[best] < reach:
            host = np.flatnonzero(hosts)[best]
            kp[host, present[small]] = kp[small, present[small]]
            present[host] |= present[small]
            sizes[host] += sizes[small]
            kp[small], present[small], sizes[small] = 0.0, False, 0
    return kp, sizes


def _pair_sums(candidates: Candidates, labels: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """float64 (G,): summed scores of the pairs inside each group (used by person_score="reference")."""
    inside = labels[candidates.pair_a] == labels[candidates.pair_b]
    group = np.searchsorted(roots, labels[candidates.pair_a[inside]])
    return np.bincount(group, weights=candidates.pair_scores[inside], minlength=len(roots))
