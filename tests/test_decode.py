"""Unit tests of the decoder stages: peaks, refinement, pair scoring, assembly edge cases, input errors."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simplepose.decode import (Candidates, DecoderConfig, Poses, assemble, coco_results, decode, find_candidates,
                               find_candidates_batch)
from simplepose.decode.pairs import enumerate_pairs, stride_pair_scores
from simplepose.decode.peaks import Peaks, reference_peaks, stride_peaks
from simplepose.infer import Heatmaps
from simplepose.skeleton import COCO_TO_REFERENCE, LIMBS, coco_to_reference
from simplepose.targets import render_heatmaps

DEFAULT = DecoderConfig()
REFERENCE = DecoderConfig(mode="reference")
STRIDE4 = (4.0, 4.0, 1.5, 1.5)  # cell j = image pixel 4j + 1.5


def gaussian(shape, x, y, sigma, peak=1.0):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (peak * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2))).astype(np.float32)


def person(x0, y0, scale=1.0):
    """A standing person (COCO order, v=2) with its nose at (x0, y0), about 150*scale pixels tall."""
    offsets = [(0, 0), (4, -4), (-4, -4), (8, -2), (-8, -2), (15, 20), (-15, 20), (20, 45), (-20, 45),
               (22, 68), (-22, 68), (10, 75), (-10, 75), (11, 110), (-11, 110), (12, 145), (-12, 145)]
    return np.array([(x0 + dx * scale, y0 + dy * scale, 2.0) for dx, dy in offsets])


def stride4_heatmaps(coco_persons, image_size):
    """Perfect stride-4 maps of COCO persons (P, 17, 3) over a whole image of (H, W) pixels."""
    height, width = image_size
    kp = coco_to_reference(np.asarray(coco_persons, dtype=np.float64).reshape(-1, 17, 3))
    maps = torch.from_numpy(render_heatmaps(kp, (math.ceil(height / 4), math.ceil(width / 4))))
    return Heatmaps(maps[30:48].contiguous(), maps[:30].contiguous(), STRIDE4, image_size)


def score_pairs(limb_maps, xy, types, scale, height, config):
    """stride_pair_scores for one image of candidates xy (N, 2) map cells with types (N,)."""
    peaks = Peaks(xy, torch.ones(len(types), dtype=torch.float64), types, torch.zeros_like(types))
    return stride_pair_scores([limb_maps], peaks, torch.tensor([scale], dtype=torch.float64),
                              torch.tensor([height], dtype=torch.float64), config)


def match(poses: Poses, truth: np.ndarray, tolerance: float) -> None:
    """Each true person (17, 3) has a detected person with every keypoint within `tolerance` pixels."""
    for true in truth:
        errors = np.linalg.norm(poses.keypoints[:, :, :2] - true[None, :, :2], axis=2).max(axis=1)
        assert errors.min() <= tolerance, f"person at {true[0, :2]}: best max error {errors.min():.2f} px"


# ---- peaks and refinement ----

@settings(max_examples=40, deadline=None)
@given(x=st.floats(3, 36), y=st.floats(3, 26), sigma=st.floats(1.5, 3.0))
def test_log_parabola_recovers_gaussian_centre_and_peak(x, y, sigma):
    maps = torch.zeros(18, 30, 40)
    maps[5] = torch.from_numpy(gaussian((30, 40), x, y, sigma, peak=0.9))
    peaks = stride_peaks([maps], DEFAULT)
    assert peaks.types.tolist() == [5]
    assert np.allclose(peaks.xy[0].numpy(), (x, y), atol=1e-3)
    assert peaks.scores[0].item() == pytest.approx(0.9, abs=1e-4)


def test_reference_centroid_keeps_the_axis_swap_bug():
    """docs/method.md §13 G7: a sigma-2 peak at (10.6, 20.0), anchor (11, 20) -> (11.0, 19.834, 0.6256)."""
    maps = torch.zeros(18, 40, 40)
    maps[0] = torch.from_numpy(gaussian((40, 40), 10.6, 20.0, 2.0))
    peaks = reference_peaks(maps, REFERENCE)
    assert np.allclose(peaks.xy[0].numpy(), (11.0, 19.834), atol=1e-3)
    assert peaks.scores[0].item() == pytest.approx(0.6256, abs=1e-4)
    fixed = stride_peaks([maps], DEFAULT.replace(refinement="centroid", peak_value_score=False))
    assert fixed.xy[0, 1].item() == pytest.approx(20.0, abs=1e-6)  # rows do not leak into y any more
    assert 10.5 < fixed.xy[0, 0].item() < 11.0


def test_plateau_gives_one_peak_only_with_tie_free_nms():
    maps = torch.zeros(18, 10, 10)
    maps[3, 4:6, 4:6] = 0.8
    assert len(stride_peaks([maps], DEFAULT).types) == 1
    assert len(stride_peaks([maps], DEFAULT.replace(tie_free_nms=False)).types) == 4
    assert len(reference_peaks(maps, REFERENCE).types) == 4  # the reference keeps every tied cell


def test_peaks_at_the_map_border_and_below_threshold():
    maps = torch.zeros(18, 12, 12)
    maps[2] = torch.from_numpy(gaussian((12, 12), 0.0, 11.0, 2.0))  # centred on the bottom-left corner cell
    maps[4, 6, 6] = 0.099  # below keypoint_threshold
    peaks = stride_peaks([maps], DEFAULT)
    assert peaks.types.tolist() == [2]
    assert np.allclose(peaks.xy[0].numpy(), (0.0, 11.0))  # mirrored neighbours keep it on the border cell
    ref = reference_peaks(maps, REFERENCE)
    assert ref.xy[0].tolist() == [0.0, 11.0] and ref.scores[0].item() == pytest.approx(1.0)  # unrefined


# ---- pair scoring ----

def test_enumerate_pairs_order_is_limb_then_a_then_b():
    types = torch.tensor([0, 0, 1, 1, 1, 14])  # two noses, three necks, one right eye
    limbs, a, b, images = enumerate_pairs(types)
    assert not images.any()
    expected = [(0, i, j) for i in (2, 3, 4) for j in (0, 1)]  # limb 0 = neck -> nose
    expected += [(1, i, 5) for i in (2, 3, 4)]  # neck -> Reye
    expected += [(5, i, 5) for i in (0, 1)]  # nose -> Reye
    assert list(zip(limbs.tolist(), a.tolist(), b.tolist())) == expected


def test_pair_scoring_accepts_the_band_and_rejects_a_crossing():
    limb_maps = torch.zeros(30, 40, 40)
    limb_maps[0, 20, 5:36] = 0.9  # a horizontal neck->nose band on row 20
    xy = torch.tensor([[5.0, 20.0], [35.0, 5.0], [35.0, 20.0]], dtype=torch.float64)
    types = torch.tensor([0, 0, 1])  # noses 0 and 1, neck 2
    pairs = score_pairs(limb_maps, xy, types, 4.0, 160.0, DEFAULT)
    assert pairs.limbs.tolist() == [0] and pairs.a.tolist() == [2] and pairs.b.tolist() == [0]
    assert pairs.scores[0].item() == pytest.approx(0.9)
    assert pairs.lengths[0].item() == pytest.approx(4.0 * 30)
    nearest = score_pairs(limb_maps, xy + torch.tensor([0.0, 0.4], dtype=torch.float64), types, 4.0, 160.0,
                          DEFAULT.replace(bilinear_samples=False))
    assert nearest.scores[0].item() == pytest.approx(0.9)  # nearest cell: row 20.4 reads row 20


def test_distance_prior_penalises_limbs_longer_than_half_the_image_height():
    limb_maps = torch.full((30, 8, 100), 0.9)
    xy = torch.tensor([[0.0, 4.0], [99.0, 4.0]], dtype=torch.float64)
    types = torch.tensor([0, 1])
    plain = score_pairs(limb_maps, xy, types, 4.0, 400.0, DEFAULT)
    prior = score_pairs(limb_maps, xy, types, 4.0, 400.0, DEFAULT.replace(distance_prior=True))
    assert plain.scores[0].item() == pytest.approx(0.9)
    assert prior.scores[0].item() == pytest.approx(0.9 + 0.5 * 400 / 396 - 1)


# ---- assembly ----

def test_no_candidates_gives_no_person():
    maps = Heatmaps(torch.zeros(18, 16, 16), torch.zeros(30, 16, 16), STRIDE4, (64, 64))
    for config in (DEFAULT,):
        poses = decode(maps, config)
        assert len(poses) == 0 and poses.keypoints.shape == (0, 17, 3) and poses.boxes.shape == (0, 4)
    full = Heatmaps(torch.zeros(18, 64, 64), torch.zeros(30, 64, 64), (1.0, 1.0, 0.0, 0.0), (64, 64))
    assert len(decode(full, REFERENCE)) == 0
    assert coco_results(decode(maps), 1) == []


def test_round_trip_two_persons_at_stride4():
    truth = np.stack([person(120, 60), person(300, 80, 1.2)])
    poses = decode(stride4_heatmaps(truth, (320, 480)))
    assert len(poses) == 2
    match(poses, truth, tolerance=1.0)
    assert (poses.keypoints[..., 2] > 0.95).all()  # every keypoint found, with its own score
    assert np.all(np.diff(poses.scores) <= 0)  # ranked
    box = poses.boxes[np.argmin(np.abs(poses.boxes[:, 0] - 100))]
    assert box[2] > 0 and box[3] == pytest.approx(149, abs=1.0)  # eyes at -4 to ankles at +145


def test_missing_keypoint_type_and_no_neck():
    """No left shoulder, hence no neck: the head still joins the body through nose->Rsho and Rear->Rsho. The
    left arm is linked to the body only through the left shoulder: a separate group that `attach_fragments`
    moves into the person (without it, a separate lower-ranked person)."""
    truth = person(200, 50)
    truth[5, 2] = 0
    maps = stride4_heatmaps(truth[None], (300, 400))
    present = np.arange(17) != 5
    best = decode(maps).keypoints[0]
    assert len(decode(maps)) == 1 and best[5, 2] == 0 and (best[present, 2] > 0.9).all()
    assert np.abs(best[present, :2] - truth[present, :2]).max() < 1.0
    split = decode(maps, DEFAULT.replace(attach_fragments=False))
    assert len(split) == 2 and (split.keypoints[0, [5, 7, 9], 2] == 0).all()
    assert (split.keypoints[1, [7, 9], 2] > 0).all() and split.scores[1] < split.scores[0]


def test_persons_never_share_a_keypoint_and_types_are_unique():
    """Two overlapping persons compete for the keypoints in between: each candidate goes to one person."""
    truth = np.stack([person(100, 40), person(125, 45)])
    candidates = find_candidates(stride4_heatmaps(truth, (260, 260)))
    poses = assemble(candidates)
    found = poses.keypoints[..., :2][poses.keypoints[..., 2] > 0]
    assert len(np.unique(found, axis=0)) == len(found)  # no keypoint written twice
    assert len(found) <= len(candidates.types)


def test_persons_touching_the_image_border():
    truth = person(6, 2)  # nose at the top-left corner, right side and head clipped onto the border
    truth[:, :2] = np.clip(truth[:, :2], 0, None)
    poses = decode(stride4_heatmaps(truth[None], (200, 100)))
    assert len(poses) == 1
    # The border cell's centre is 1.5 px inside: a keypoint on the border is off by at most 1.5 px per axis.
    match(poses, truth[None], tolerance=1.5 * math.sqrt(2) + 1e-6)


def test_tiny_persons_are_still_found():
    truth = np.stack([person(60, 30, scale=0.5), person(200, 40, scale=0.5)])  # 72 px tall
    poses = decode(stride4_heatmaps(truth, (160, 260)))
    assert (poses.scores > 0).sum() >= 2
    torsos = poses.keypoints[:, [5, 6, 11, 12], :2]
    for true in truth:
        assert np.abs(torsos - true[None, [5, 6, 11, 12], :2]).max(axis=(1, 2)).min() < 2.5


def test_crowded_image():
    rng = np.random.default_rng(0)
    truth = np.stack([person(40 + 70 * i, 20 + 200 * j + rng.uniform(-8, 8), scale=1.0 + 0.1 * (i % 3))
                      for i in range(8) for j in range(2)])
    poses = decode(stride4_heatmaps(truth, (420, 620)))
    complete = poses.keypoints[(poses.keypoints[..., 2] > 0).sum(axis=1) == 17]
    assert len(complete) == 16
    match(Poses.from_keypoints(complete, np.ones(16), (420, 620)), truth, tolerance=1.0)


def test_candidates_pickle_and_validate():
    candidates = find_candidates(stride4_heatmaps(person(80, 40)[None], (240, 200)))
    again = pickle.loads(pickle.dumps(candidates))
    assert np.array_equal(again.xy, candidates.xy) and again.image_size == (240, 200)
    with pytest.raises(ValueError, match="pair_a"):
        Candidates(candidates.xy, candidates.scores, candidates.types, candidates.pair_limbs,
                   candidates.pair_a[:-1], candidates.pair_b, candidates.pair_scores, candidates.pair_lengths,
                   (240, 200))
    with pytest.raises(TypeError, match="Candidates"):
        assemble("not candidates")


def test_coco_results_reference_visibility_rule():
    kp = np.zeros((1, 17, 3))
    kp[0, 0] = (0.0, 0.0, 0.7)  # a found keypoint at exactly (0, 0) reads as missing in the authors' files
    kp[0, 1] = (5.0, 0.0, 0.4)
    poses = Poses.from_keypoints(kp, np.array([0.5]), (10, 10))
    ours, theirs = coco_results(poses, 7), coco_results(poses, 7, visibility="reference")
    assert ours[0]["keypoints"][:6] == [0.0, 0.0, 0.7, 5.0, 0.0, 0.4]
    assert theirs[0]["keypoints"][:6] == [0.0, 0.0, 0.0, 5.0, 0.0, 1.0]
    assert theirs[0]["category_id"] == 1 and theirs[0]["image_id"] == 7 and len(theirs[0]["keypoints"]) == 51


# ---- malformed input ----

@pytest.mark.parametrize("keypoints, limbs, match_text", [
    (torch.zeros(17, 8, 8), torch.zeros(30, 8, 8), "keypoints must be"),
    (torch.zeros(18, 8, 8), torch.zeros(30, 8, 9), "differ in size"),
    (torch.zeros(18, 8, 8, dtype=torch.int32), torch.zeros(30, 8, 8), "float32"),
    (np.zeros((18, 8, 8), np.float32), torch.zeros(30, 8, 8), "torch.Tensor"),
])
def test_malformed_maps_raise_clear_errors(keypoints, limbs, match_text):
    class Maps:  # not a simplepose.infer.Heatmaps: that class would refuse them itself
        map_to_image, image_size = STRIDE4, (32, 32)

    maps = Maps()
    maps.keypoints, maps.limbs = keypoints, limbs
    with pytest.raises((ValueError, TypeError), match=match_text):
        find_candidates(maps)


def test_nan_maps_and_bad_configs_raise():
    keypoints = torch.zeros(18, 8, 8)
    keypoints[0, 4, 4], keypoints[0, 4, 5] = 0.5, float("nan")
    with pytest.raises(ValueError, match="NaN"):
        find_candidates(Heatmaps(keypoints, torch.zeros(30, 8, 8), STRIDE4, (32, 32)))
    with pytest.raises(ValueError, match="NaN"):
        find_candidates(Heatmaps(keypoints, torch.zeros(30, 8, 8), (1.0, 1.0, 0.0, 0.0), (8, 8)), REFERENCE)
    with pytest.raises(ValueError, match="original resolution"):
        find_candidates(Heatmaps(torch.zeros(18, 8, 8), torch.zeros(30, 8, 8), STRIDE4, (32, 32)), REFERENCE)
    with pytest.raises(ValueError, match="mode"):
        DecoderConfig(mode="fast")
    with pytest.raises(ValueError, match="refinement"):
        DecoderConfig(refinement="argmax")
    with pytest.raises(TypeError, match="no field"):
        find_candidates(object())


def test_pairs_and_persons_follow_the_skeleton():
    """One candidate of each of the 18 types: the decoder proposes exactly one pair per skeleton limb, from the
    limb's `from` keypoint to its `to` keypoint, and assembles them into one person whose COCO keypoint c is
    the candidate of reference type COCO_TO_REFERENCE[c], with its score (the neck has no COCO slot)."""
    types = torch.arange(18)
    limbs, a, b, _ = (t.numpy() for t in enumerate_pairs(types))
    assert list(zip(limbs.tolist(), a.tolist(), b.tolist())) == [(k, f, t) for k, (f, t) in enumerate(LIMBS)]
    xy = np.column_stack([10.0 + 7 * np.arange(18), 50.0 + 3 * np.arange(18)])
    scores = np.linspace(0.5, 0.95, 18)
    candidates = Candidates(xy, scores, types.numpy(), limbs, a, b, np.full(len(limbs), 0.8),
                            np.linalg.norm(xy[b] - xy[a], axis=1), (200, 200))
    for config in (DEFAULT, DEFAULT.replace(global_greedy=False)):
        poses = assemble(candidates, config)
        assert len(poses) == 1
        np.testing.assert_array_equal(poses.keypoints[0, :, :2], xy[list(COCO_TO_REFERENCE)])
        np.testing.assert_allclose(poses.keypoints[0, :, 2], scores[list(COCO_TO_REFERENCE)])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_assembly_invariants_on_random_pairs(data):
    """Any candidates and pairs: every candidate lands in at most one person, a person holds one candidate
    per type at most, persons come out ranked, and the reference walk never shares a candidate either."""
    n = data.draw(st.integers(0, 25))
    types = np.sort(np.array(data.draw(st.lists(st.integers(0, 17), min_size=n, max_size=n)), dtype=np.int64))
    ys = data.draw(st.lists(st.floats(1, 200), min_size=n, max_size=n))
    xy = np.column_stack([np.arange(n) * 7.0 + 1, ys]).reshape(n, 2)  # distinct x: candidates are told apart
    scores = np.array(data.draw(st.lists(st.floats(0.1, 1.0), min_size=n, max_size=n)), dtype=np.float64)
    limbs, a, b, _ = (t.numpy() for t in enumerate_pairs(torch.from_numpy(types)))
    chosen = np.array(data.draw(st.lists(st.booleans(), min_size=len(limbs), max_size=len(limbs))), dtype=bool)
    m = int(chosen.sum())
    pair_scores = np.array(data.draw(st.lists(st.floats(0.01, 1.0), min_size=m, max_size=m)), dtype=np.float64)
    candidates = Candidates(xy, scores, types, limbs[chosen], a[chosen], b[chosen], pair_scores,
                            np.linalg.norm(xy[b[chosen]] - xy[a[chosen]], axis=1), (200, 200))
    for config in (DEFAULT, DEFAULT.replace(global_greedy=False)):
        poses = assemble(candidates, config)
        found = poses.keypoints[..., :2][poses.keypoints[..., 2] > 0]
        assert len(np.unique(found, axis=0)) == len(found) <= n
    poses = assemble(candidates, DEFAULT)
    assert np.all(np.diff(poses.scores) <= 0)
    found = poses.keypoints[..., :2][poses.keypoints[..., 2] > 0]
    # With singletons kept, every candidate except the necks (no COCO slot) is written exactly once.
    assert len(found) == int((types != 1).sum())


def test_batch_equals_one_by_one_and_keeps_images_apart():
    """A batch of differently sized images gives each image exactly its own single-image candidates."""
    batch = [stride4_heatmaps(person(80, 40)[None], (240, 200)),
             Heatmaps(torch.zeros(18, 10, 12), torch.zeros(30, 10, 12), STRIDE4, (40, 48)),
             stride4_heatmaps(np.stack([person(60, 30), person(200, 50, 1.2)]), (300, 330))]
    together = find_candidates_batch(batch)
    assert len(together) == 3 and len(together[1].types) == 0
    for alone, mine in zip((find_candidates(maps) for maps in batch), together):
        for name in ("xy", "scores", "types", "pair_limbs", "pair_a", "pair_b", "pair_scores", "pair_lengths"):
            np.testing.assert_allclose(getattr(mine, name), getattr(alone, name), err_msg=name)
        assert mine.image_size == alone.image_size
