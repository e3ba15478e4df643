"""Scored pairs to persons, our way: one greedy pass over all pairs of all body parts in score order.

Every candidate starts as its own group; a pair joins the groups of its two ends unless they already share a
keypoint type (so a person never holds two candidates of one type, and no candidate is shared by two persons).
Unlike the authors' walk (`reference.py`) both ends of a pair count, the order is by score rather than by limb,
and nothing is dropped once attached. Groups that no body part can link to their person (an arm whose
shoulder is unseen) then join the nearest larger group. numpy, a union-find loop over the pairs (at most
30 K^2 with `DecoderConfig.max_candidates` = K) and a compiled kernel for the fragments.
"""
from __future__ import annotations

import logging

import numba
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
    c = candidates
    key = 0.5 * c.pair_scores + 0.25 * c.scores[c.pair_a] + 0.25 * c.scores[c.pair_b]
    order = np.argsort(-key, kind="stable")
    owned = np.left_shift(np.int64(1), c.types.astype(np.int64))  # bit set of keypoint types of each root
    return _group_kernel(c.pair_a[order].astype(np.int64), c.pair_b[order].astype(np.int64), owned)


@numba.njit(cache=True, nogil=True)
def _group_kernel(pair_a, pair_b, owned):  # pragma: no cover - compiled
    """Union-find over pairs in the given order (compiled: ~5 ns a pair; Python's loop took ~0.5 us)."""
    n = len(owned)
    parent = np.arange(n)
    for k in range(len(pair_a)):
        a, b = pair_a[k], pair_b[k]
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a == b or (owned[a] & owned[b]) != 0:
            continue
        if b < a:
            a, b = b, a
        parent[b] = a
        owned[a] |= owned[b]
    for i in range(n):  # roots are each group's smallest id: resolve every label to its root
        r = i
        while parent[r] != r:
            r = parent[r]
        parent[i] = r
    return parent


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
    (score > 0 = present), sizes: int64 (G,). Groups are visited from the smallest (stable order of the
    initial sizes); a group moves into the larger group that holds none of its types and whose nearest
    keypoint is closest, if that distance is below `reach` x the host's size (the diagonal of its keypoints'
    box; ties: the lower group index). Returns (kp, sizes) with emptied groups at size 0.
    Compiled (numba): O(G^2 + n^2) for n present keypoints, ~0.2 ms for 400 groups (numpy's per-call cost
    made it ~25 us per group before).
    """
    kp = np.ascontiguousarray(kp, dtype=np.float64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    order = np.argsort(sizes, kind="stable")
    groups, types = np.nonzero(kp[..., 2] > 0)
    _attach_kernel(kp, sizes, float(reach), order, groups.astype(np.int64), types.astype(np.int64))
    return kp, sizes


@numba.njit(cache=True, nogil=True)
def _attach_kernel(kp, sizes, reach, order, entry_group, entry_type):  # pragma: no cover - compiled
    """In place on kp (G, T, 3) and sizes (G,). entries: the present keypoints (group, type), group-major."""
    n_groups, n_types = kp.shape[0], kp.shape[1]
    n = len(entry_group)
    bits = np.zeros(n_groups, np.int64)
    lo = np.full((n_groups, 2), np.inf)
    hi = np.full((n_groups, 2), -np.inf)
    first = np.full(n_groups + 1, n, np.int64)  # entries of each group as a linked list (owners change)
    nxt = np.full(n, -1, np.int64)
    for e in range(n - 1, -1, -1):
        g, t = entry_group[e], entry_type[e]
        bits[g] |= np.int64(1) << t
        for d in range(2):
            lo[g, d] = min(lo[g, d], kp[g, t, d])
            hi[g, d] = max(hi[g, d], kp[g, t, d])
        nxt[e] = first[g] if first[g] < n else -1
        first[g] = e
    owner = entry_group.copy()
    best_dist = np.empty(n_groups)
    for small in order:
        if sizes[small] == 0:
            continue
        any_host = False
        for h in range(n_groups):
            best_dist[h] = np.inf
            if sizes[h] > sizes[small] and (bits[h] & bits[small]) == 0:
                any_host = True
        if not any_host:
            continue
        e = first[small] if first[small] < n else -1
        while e >= 0:
            x, y = kp[small, entry_type[e], 0], kp[small, entry_type[e], 1]
            for f in range(n):
                h = owner[f]
                if sizes[h] > sizes[small] and (bits[h] & bits[small]) == 0:
                    dx, dy = kp[h, entry_type[f], 0] - x, kp[h, entry_type[f], 1] - y
                    dist = np.sqrt(dx * dx + dy * dy)
                    if dist < best_dist[h]:
                        best_dist[h] = dist
            e = nxt[e]
        host, best = -1, np.inf
        for h in range(n_groups):
            if sizes[h] > sizes[small] and (bits[h] & bits[small]) == 0:
                wx, wy = hi[h, 0] - lo[h, 0], hi[h, 1] - lo[h, 1]
                ratio = best_dist[h] / max(np.sqrt(wx * wx + wy * wy), 1.0)
                if ratio < best:
                    host, best = h, ratio
        if host < 0 or not best < reach:
            continue
        e = first[small] if first[small] < n else -1
        last = -1
        while e >= 0:
            t = entry_type[e]
            for d in range(3):
                kp[host, t, d] = kp[small, t, d]
            for d in range(2):
                lo[host, d] = min(lo[host, d], kp[small, t, d])
                hi[host, d] = max(hi[host, d], kp[small, t, d])
            owner[e] = host
            last = e
            e = nxt[e]
        nxt[last] = first[host] if first[host] < n else -1  # splice small's entries in front of host's
        first[host] = first[small]
        first[small] = n
        bits[host] |= bits[small]
        bits[small] = 0
        sizes[host] += sizes[small]
        sizes[small] = 0
        for t in range(n_types):
            for d in range(3):
                kp[small, t, d] = 0.0


def _pair_sums(candidates: Candidates, labels: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """float64 (G,): summed scores of the pairs inside each group (used by person_score="reference")."""
    inside = labels[candidates.pair_a] == labels[candidates.pair_b]
    group = np.searchsorted(roots, labels[candidates.pair_a[inside]])
    return np.bincount(group, weights=candidates.pair_scores[inside], minlength=len(roots))
