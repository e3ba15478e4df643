"""The decoder's bounds (DecoderConfig.max_candidates / max_persons) and the output floor (select_poses)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_decode import person, stride4_heatmaps  # tests/ is on sys.path (rootdir-relative imports)

from simplepose.decode import (POSE_FLOOR, DecoderConfig, Poses, PoseFloor, assemble, find_candidates,
                               find_candidates_batch, select_poses)
from simplepose.decode.assembly import attach_fragments, group_candidates
from simplepose.decode.peaks import stride_peaks, top_k_per_group
from simplepose.infer import Heatmaps
from simplepose.skeleton import NUM_KEYPOINTS

STRIDE4 = (4.0, 4.0, 1.5, 1.5)


def noise(size: int = 512, seed: int = 0) -> Heatmaps:
    """Uniform random maps in [0, 1] at stride 4 for a size x size image: the worst case of the decoder."""
    g = torch.Generator().manual_seed(seed)
    cells = size // 4
    return Heatmaps(torch.rand(18, cells, cells, generator=g), torch.rand(30, cells, cells, generator=g),
                    STRIDE4, (size, size))


def test_the_default_decoder_is_bounded():
    """Noise maps hold far more peaks per type than the default cap; the default decoder keeps the cap on
    candidates and on persons."""
    config = DecoderConfig()
    maps = noise(512)
    uncapped = stride_peaks([maps.keypoints], DecoderConfig(max_candidates=0))  # peaks only: no pairs to score
    candidates = find_candidates(maps, config)
    assert np.bincount(uncapped.types.numpy()).min() > 10 * config.max_candidates
    assert 0 < candidates.counts.max() <= config.max_candidates
    assert 0 < len(assemble(candidates, config)) <= config.max_persons
    with pytest.raises(ValueError, match="max_candidates"):
        DecoderConfig(max_candidates=-1)


def test_top_k_per_group_keeps_the_best_of_each_group_ties_to_the_earlier_row():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.2, 0.3, 0.7], dtype=torch.float64)
    keep = top_k_per_group(groups, scores, 2)
    assert keep.tolist() == [False, True, False, True, True, True, True]
    keep = top_k_per_group(groups, scores, 3)
    assert keep.tolist() == [True, True, False, True, True, True, True]


def test_caps_hold_on_noise_maps_and_time_stays_bounded():
    config = DecoderConfig(max_candidates=16, max_persons=20)
    maps = [noise(512, seed) for seed in range(2)]
    start = time.perf_counter()
    candidates = find_candidates_batch(maps, config)
    tensor_s = time.perf_counter() - start
    for cands in candidates:
        assert cands.counts.max() == 16 and len(cands.types) == NUM_KEYPOINTS * 16
        assert len(cands.pair_a) <= 30 * 16 * 16
        start = time.perf_counter()
        poses = assemble(cands, config)
        assembly_s = time.perf_counter() - start
        assert 0 < len(poses) <= 20
        assert np.all(np.diff(poses.scores) <= 0)
        assert assembly_s < 2.0  # ~5 ms on a development VM core; uncapped, the tensor stage runs out of memory
    assert tensor_s < 30.0


def test_kept_candidates_are_the_highest_scoring_and_stay_in_raster_order():
    maps = noise(256, seed=3)
    # Every peak, uncapped: the peaks alone (uncapped pair scoring of noise would take a minute and GBs).
    everything = stride_peaks([maps.keypoints], DecoderConfig(max_candidates=0))
    capped = find_candidates(maps, DecoderConfig(max_candidates=5))
    cells = find_candidates(maps, DecoderConfig(max_candidates=5, refinement="none"))  # cell centres
    for t in range(NUM_KEYPOINTS):
        all_scores = np.sort(everything.scores[everything.types == t].numpy())[::-1]
        kept = capped.scores[capped.types == t]
        np.testing.assert_array_equal(np.sort(kept)[::-1], all_scores[:5])
    assert np.all(np.diff(capped.types) >= 0)
    for t in range(NUM_KEYPOINTS):  # raster order within a type: rows then columns
        xy = cells.xy[cells.types == t]
        raster = np.lexsort((xy[:, 0], xy[:, 1]))
        np.testing.assert_array_equal(raster, np.arange(len(xy)))


def test_caps_do_not_change_a_small_scene():
    truth = np.stack([person(60, 40), person(200, 50, 0.8), person(330, 30, 1.1)])
    maps = stride4_heatmaps(truth, (256, 400))
    free, capped = DecoderConfig(max_candidates=0, max_persons=0), DecoderConfig()
    a, b = assemble(find_candidates(maps, free), free), assemble(find_candidates(maps, capped), capped)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_reference_mode_ignores_the_caps():
    maps = noise(96, seed=1)  # 24 x 24 cells used as maps at original resolution (identity mapping)
    big = Heatmaps(maps.keypoints, maps.limbs, (1.0, 1.0, 0.0, 0.0), (24, 24))
    a = find_candidates(big, DecoderConfig(mode="reference"))
    b = find_candidates(big, DecoderConfig(mode="reference", max_candidates=1))
    np.testing.assert_array_equal(a.xy, b.xy)


def test_max_persons_keeps_the_best_in_order():
    cands = find_candidates(noise(256, seed=2), DecoderConfig())
    everyone = assemble(cands, DecoderConfig(max_persons=0))
    best = assemble(cands, DecoderConfig(max_persons=3))
    assert len(everyone) > 3 and len(best) == 3
    np.testing.assert_array_equal(best.scores, everyone.scores[:3])


def test_group_and_attach_kernels_match_their_definitions():
    """The compiled kernels against the plain numpy definitions they replaced, on random groups."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = int(rng.integers(1, 30))
        present = rng.random((g, 18)) < rng.uniform(0.05, 0.5)
        present[~present.any(axis=1), 0] = True
        kp = np.zeros((g, 18, 3))
        kp[..., :2] = np.where(present[..., None], rng.random((g, 18, 2)) * 200, 0)
        kp[..., 2] = np.where(present, rng.uniform(0.1, 1, (g, 18)), 0)
        sizes = present.sum(axis=1).astype(np.int64)
        expected = _attach_numpy(kp.copy(), sizes.copy(), 0.4)
        got = attach_fragments(kp.copy(), sizes.copy(), 0.4)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    cands = find_candidates(noise(128, seed=4), DecoderConfig())
    np.testing.assert_array_equal(group_candidates(cands), _group_python(cands))


def _attach_numpy(kp, sizes, reach):
    present = kp[..., 2] > 0
    for small in np.argsort(sizes, kind="stable"):
        if sizes[small] == 0:
            continue
        hosts = (sizes > sizes[small]) & ~(present & present[small]).any(axis=1)
        if not hosts.any():
            continue
        own = kp[small, present[small], :2]
        dist = np.linalg.norm(kp[hosts, None, :, :2] - own[None, :, None], axis=-1)
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


def _group_python(c):
    parent = list(range(len(c.types)))
    owned = [1 << int(t) for t in c.types]
    key = 0.5 * c.pair_scores + 0.25 * c.scores[c.pair_a] + 0.25 * c.scores[c.pair_b]
    order = np.argsort(-key, kind="stable")
    for a, b in zip(c.pair_a[order].tolist(), c.pair_b[order].tolist()):
        while parent[a] != a:
            parent[a] = a = parent[parent[a]]
        while parent[b] != b:
            parent[b] = b = parent[parent[b]]
        if a == b or owned[a] & owned[b]:
            continue
        if b < a:
            a, b = b, a
        parent[b] = a
        owned[a] |= owned[b]
    labels = np.array(parent, dtype=np.int64)
    while not np.array_equal(labels[labels], labels):
        labels = labels[labels]
    return labels


# ---- the output floor ----

def _poses(scores, keypoint_counts) -> Poses:
    kp = np.zeros((len(scores), 17, 3))
    for p, k in enumerate(keypoint_counts):
        kp[p, :k] = (10.0, 20.0, 0.5)
    return Poses.from_keypoints(kp, np.asarray(scores, dtype=np.float64), (100, 100))


def test_floor_drops_weak_and_sparse_persons_in_order():
    poses = _poses([0.9, 0.5, 0.09, 0.3, 0.2], [17, 1, 5, 2, 3])
    kept = select_poses(poses)  # POSE_FLOOR: score >= 0.1 and >= 2 keypoints
    np.testing.assert_array_equal(kept.scores, [0.9, 0.3, 0.2])
    assert kept.keypoints.shape == (3, 17, 3) and kept.boxes.shape == (3, 4)
    assert len(select_poses(poses, PoseFloor(0.0, 0))) == 5
    assert len(select_poses(poses, PoseFloor(min_person_score=0.25, min_keypoints=3))) == 1
    strong = _poses([0.9], [17])
    np.testing.assert_array_equal(select_poses(strong).keypoints, strong.keypoints)  # kept as it is
    assert len(select_poses(_poses([], []))) == 0


def test_floor_counts_nan_keypoint_scores_as_missing_and_rejects_bad_arguments():
    kp = np.zeros((1, 17, 3))
    kp[0, :3] = (1.0, 2.0, np.nan)
    assert not POSE_FLOOR.keep(kp, [0.5]).any()
    with pytest.raises(TypeError, match="Poses"):
        select_poses("poses")
    with pytest.raises(TypeError, match="PoseFloor"):
        select_poses(_poses([0.5], [3]), 0.1)
    with pytest.raises(ValueError, match="min_keypoints"):
        PoseFloor(0.1, -1)
