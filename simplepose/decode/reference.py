"""The authors' greedy assembly, bug for bug (docs/method.md §9.2 selection, §9.3): scored pairs to persons.

Kept apart from `assembly.py` on purpose: every rule here, including the known bugs (only the `to` end is
ever attached to an existing person, replaced keypoints are dropped, the merge ignores the second person's
longest limb, `remove_recon = 0`, person score 1 - 1/total), is the reference behaviour that parity tests pin.
A person is the authors' 20x2 row: rows 0..17 [candidate id, slot score] (-1 when empty), row 18
[total score, -1], row 19 [number of parts, longest attached limb in pixels].
"""
from __future__ import annotations

import logging

import numpy as np

from simplepose.decode.config import DecoderConfig
from simplepose.decode.structures import Candidates, Poses
from simplepose.skeleton import LIMBS, NUM_KEYPOINTS, NUM_LIMBS, reference_to_coco

LOG = logging.getLogger(__name__)

TOTAL, COUNT = NUM_KEYPOINTS, NUM_KEYPOINTS + 1  # rows 18 and 19 of a person


def select_connections(candidates: Candidates) -> tuple[list[np.ndarray], list[int]]:
    """The authors' per-limb greedy selection (docs/method.md §9.2).

    Pairs of limb k are sorted (stable, descending) by 0.5 * score + 0.25 * score(A) + 0.25 * score(B) and kept
    while neither end is used by that limb, until min(|A|, |B|) are kept.
    Returns (connections, special_k): connections[k] float64 (M_k, 6) rows idA, idB, score, i, j, length
    (i, j = index of A / B among the candidates of their type); special_k = limbs with an empty end type.
    """
    counts = candidates.counts
    starts = np.cumsum(counts) - counts
    connections, special_k = [], []
    for k, (kf, kt) in enumerate(LIMBS):
        rows = np.zeros((0, 6))
        if counts[kf] == 0 or counts[kt] == 0:
            special_k.append(k)
        else:
            sel = np.flatnonzero(candidates.pair_limbs == k)
            a, b, s = candidates.pair_a[sel], candidates.pair_b[sel], candidates.pair_scores[sel]
            key = 0.5 * s + 0.25 * candidates.scores[a] + 0.25 * candidates.scores[b]
            kept, used_a, used_b = [], set(), set()
            for p in np.argsort(-key, kind="stable"):
                if a[p] in used_a or b[p] in used_b:
                    continue
                used_a.add(a[p])
                used_b.add(b[p])
                length = candidates.pair_lengths[sel][p]
                kept.append((a[p], b[p], s[p], a[p] - starts[kf], b[p] - starts[kt], length))
                if len(kept) >= min(counts[kf], counts[kt]):
                    break
            if kept:
                rows = np.array(kept, dtype=np.float64)
        connections.append(rows)
    return connections, special_k


def _new_person(a: int, b: int, s: float, length: float, kf: int, kt: int, candidate_scores) -> np.ndarray:
    row = -np.ones((NUM_KEYPOINTS + 2, 2))
    row[kf] = (a, s)
    row[kt] = (b, s)
    row[TOTAL, 0] = candidate_scores[a] + candidate_scores[b] + s
    row[COUNT] = (2, length)
    return row


def _attach_to_end(person: np.ndarray, b: int, s: float, length: float, kt: int, candidate_scores,
                   config: DecoderConfig) -> None:
    """found == 1: only the limb's `to` end is ever attached, added, replaced or re-scored (docs/method.md §9.3)."""
    slot_id, slot_score = person[kt]
    longest = person[COUNT, 1]
    if slot_id == -1:
        if config.length_rate * longest > length:
            person[kt] = (b, s)
            person[COUNT, 0] += 1
            person[TOTAL, 0] += candidate_scores[b] + s
            person[COUNT, 1] = max(longest, length)
    elif slot_id != b:
        if slot_score >= s or config.length_rate * longest <= length:
            return
        person[TOTAL, 0] -= candidate_scores[int(slot_id)] + slot_score  # b' is dropped, not re-assigned
        person[kt] = (b, s)
        person[TOTAL, 0] += candidate_scores[b] + s
        person[COUNT, 1] = max(longest, length)
    elif slot_score <= s:
        person[TOTAL, 0] += s - slot_score
        person[kt, 1] = s
        person[COUNT, 1] = max(longest, length)


def _try_merge(first: np.ndarray, second: np.ndarray, s: float, length: float, config: DecoderConfig) -> bool:
    """found == 2: merge `second` into `first` when they share no slot and the pair is strong enough.
    Shared slots would need `remove_recon`, which is 0 in the reference: nothing happens then."""
    occ1, occ2 = first[:NUM_KEYPOINTS, 0] >= 0, second[:NUM_KEYPOINTS, 0] >= 0
    if (occ1 & occ2).any():
        return False
    tolerance = min(first[:NUM_KEYPOINTS, 1][occ1].min(), second[:NUM_KEYPOINTS, 1][occ2].min())
    if s < config.merge_tolerance * tolerance or config.length_rate * first[COUNT, 1] <= length:
        return False
    first[:NUM_KEYPOINTS][occ2] = second[:NUM_KEYPOINTS][occ2]
    first[COUNT, 0] += second[COUNT, 0]
    first[TOTAL, 0] += second[TOTAL, 0] + s
    first[COUNT, 1] = max(first[COUNT, 1], length)  # the second person's longest limb is ignored (bug)
    return True


def find_people(connections: list[np.ndarray], special_k, candidate_scores: np.ndarray,
                config: DecoderConfig) -> np.ndarray:
    """The authors' greedy assembly (docs/method.md §9.3): per-limb connection lists -> float64 (P, 20, 2).

    connections[k]: (M_k, >=6) rows idA, idB, score, i, j, length in the order the authors walk them;
    special_k: limbs to skip; candidate_scores: float64 (N,) indexed by candidate id.
    """
    people: list[np.ndarray] = []
    skip = set(int(k) for k in special_k)
    for k in range(NUM_LIMBS):
        if k in skip:
            continue
        kf, kt = LIMBS[k]
        for row in connections[k]:
            a, b, s, length = int(row[0]), int(row[1]), float(row[2]), float(row[5])
            found = [p for p, person in enumerate(people) if person[kf, 0] == a or person[kt, 0] == b]
            if len(found) == 1:
                _attach_to_end(people[found[0]], b, s, length, kt, candidate_scores, config)
            elif len(found) == 2:
                if _try_merge(people[found[0]], people[found[1]], s, length, config):
                    del people[found[1]]
            elif not found:
                people.append(_new_person(a, b, s, length, kf, kt, candidate_scores))
    kept = [p for p in people
            if not (p[COUNT, 0] < config.min_parts or p[TOTAL, 0] / p[COUNT, 0] < config.min_mean_score)]
    return np.array(kept).reshape(-1, NUM_KEYPOINTS + 2, 2)


def people_to_poses(people: np.ndarray, candidates: Candidates) -> Poses:
    """Authors' rows (P, 20, 2) -> Poses: COCO order, keypoint score = candidate score, person score
    1 - 1/total (docs/method.md §9.4; may be negative)."""
    ids = people[:, :NUM_KEYPOINTS, 0].astype(np.int64)
    found = ids >= 0
    safe = np.where(found, ids, 0)
    kp = np.zeros((len(people), NUM_KEYPOINTS, 3))
    if len(candidates.types):
        kp[..., :2] = np.where(found[..., None], candidates.xy[safe], 0.0)
        kp[..., 2] = np.where(found, candidates.scores[safe], 0.0)
    totals = people[:, TOTAL, 0]
    with np.errstate(divide="ignore"):
        scores = 1.0 - 1.0 / totals
    return Poses.from_keypoints(reference_to_coco(kp), scores, candidates.image_size)


def assemble_reference(candidates: Candidates, config: DecoderConfig) -> Poses:
    """Candidates -> Poses exactly as the authors' find_connections selection + find_people + process."""
    connections, special_k = select_connections(candidates)
    return people_to_poses(find_people(connections, special_k, candidates.scores, config), candidates)
