"""Ground-truth heatmaps (simplepose.targets): parity with the reference fixtures, goldens G1-G4 (docs/method.md §13),
the paper style, person masks and multi-scale pooling."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from jobs.bench import targets as bench
from simplepose.skeleton import (KEYPOINT_CHANNELS, KEYPOINT_START, LIMBS, MAX_KEYPOINT_CHANNEL, NECK,
                                 PERSON_MASK_CHANNEL, coco_to_reference)
from simplepose.targets import (TargetConfig, cell_centres, person_masks, pool_targets, render_heatmaps,
                                render_heatmaps_batch)

NOSE = 0
GRID = (128, 128)


def person(**points) -> np.ndarray:
    """(18, 3) reference keypoints: name=(x, y[, recoded v]) for the given ones, absent (v = 2) elsewhere."""
    kp = np.zeros((18, 3))
    kp[:, 2] = 2
    index = {"nose": NOSE, "neck": NECK}
    for name, value in points.items():
        kp[index[name]] = (*value[:2], value[2] if len(value) > 2 else 1)
    return kp


@pytest.mark.parametrize("case", range(4))
def test_matches_reference_fixture(fixtures_dir, case):
    data = np.load(fixtures_dir / "targets_coco_mini.npz")
    keypoints = coco_to_reference(data[f"case{case}_coco_keypoints_crop"])
    labels = data[f"case{case}_labels"]
    out = render_heatmaps(keypoints, GRID)
    assert out.shape == (50, 128, 128) and out.dtype == np.float32
    compared = [c for c in range(50) if c != PERSON_MASK_CHANNEL]
    assert np.abs(out[compared] - labels[compared]).max() <= 1e-5
    assert not out[PERSON_MASK_CHANNEL].any()


def test_g1_keypoint_window():
    out = render_heatmaps(person(nose=(100.0, 200.0))[None], GRID)
    nose = out[KEYPOINT_START + NOSE]
    assert np.unravel_index(nose.argmax(), nose.shape) == (50, 25)
    assert nose[50, 25] == pytest.approx(0.9726045, abs=1e-7)
    rows, cols = np.nonzero(nose)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (43, 57, 18, 32)
    assert len(rows) == 15 * 15 and nose[nose > 0].min() == pytest.approx(2.158e-5, rel=1e-3)
    expected = np.array([
        [0.2564, 0.3901, 0.4872, 0.4994, 0.4201, 0.2901, 0.1644],
        [0.3901, 0.5936, 0.7413, 0.7598, 0.6392, 0.4414, 0.2501],
        [0.4872, 0.7413, 0.9257, 0.9489, 0.7983, 0.5512, 0.3124],
        [0.4994, 0.7598, 0.9489, 0.9726, 0.8182, 0.5650, 0.3202],
        [0.4201, 0.6392, 0.7983, 0.8182, 0.6884, 0.4753, 0.2694],
        [0.2901, 0.4414, 0.5512, 0.5650, 0.4753, 0.3282, 0.1860],
        [0.1644, 0.2501, 0.3124, 0.3202, 0.2694, 0.1860, 0.1054]])
    np.testing.assert_allclose(nose[47:54, 22:29], expected, atol=5e-5)
    np.testing.assert_array_equal(out[MAX_KEYPOINT_CHANNEL], out[KEYPOINT_CHANNELS].max(axis=0))
    assert not out[:30].any()  # a lone keypoint makes no body part


def test_g2_vertical_limb_is_three_cells_wide():
    limb = render_heatmaps(person(nose=(100.0, 200.0), neck=(100.0, 240.0))[None], GRID)[0]
    rows, cols = np.nonzero(limb)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (49, 61, 24, 26)
    assert limb[limb > 0].min() == pytest.approx(0.7344, abs=1e-4)
    assert limb.max() == pytest.approx(0.9773, abs=1e-4)
    np.testing.assert_allclose(limb[55, 24:27], [0.9382, 0.9773, 0.7344], atol=1e-4)


def test_g3_diagonal_limb_fills_its_box_with_a_floor():
    limb = render_heatmaps(person(neck=(100.0, 200.0, 0), nose=(180.0, 280.0))[None], GRID)[0]
    rows, cols = np.nonzero(limb)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (49, 71, 24, 46) and len(rows) == 529
    assert np.isclose(limb, 0.01).sum() == 240 and limb.max() == pytest.approx(1.0)
    diagonal = [limb[60 - i, 35 + i] for i in range(5)]
    np.testing.assert_allclose(diagonal, [1.0, 0.721, 0.271, 0.053, 0.01], atol=1e-3)


def test_g4_overlapping_persons_are_averaged():
    persons = np.stack([person(nose=(100.0, 200.0), neck=(100.0, 240.0)),
                        person(nose=(130.0, 200.0), neck=(110.0, 260.0))])
    limb = render_heatmaps(persons, GRID)[0]
    expected = [0.9382, 0.9773, 0.3989, 0.1954, 0.4493, 0.7701, 0.9838, 0.9368, 0.6649, 0.3517, 0.1387]
    np.testing.assert_allclose(limb[55, 24:35], expected, atol=1e-4)


def test_many_persons_combine_as_the_mean_and_max_of_each_alone():
    rng = np.random.default_rng(5)
    persons = np.concatenate([rng.uniform(-40, 560, (9, 18, 2)), rng.integers(0, 3, (9, 18, 1))], axis=2)
    persons[:4, :, :2] = persons[0, :, :2] + rng.normal(0, 25, (4, 18, 2))  # four near one another: shared cells
    together = render_heatmaps(persons, GRID)
    alone = np.stack([render_heatmaps(persons[i:i + 1], GRID) for i in range(len(persons))])
    limbs = alone[:, :30]
    covered = (limbs > 0).sum(axis=0)  # in a box, a body part is >= the floor 0.01
    assert (covered > 1).sum() > 100
    np.testing.assert_allclose(together[:30], limbs.sum(axis=0) / np.maximum(covered, 1), atol=1e-6)
    np.testing.assert_array_equal(together[KEYPOINT_CHANNELS], alone[:, KEYPOINT_CHANNELS].max(axis=0))


@pytest.mark.parametrize("style", ["reference", "paper"])
def test_a_batch_renders_each_image_as_alone(style):
    rng = np.random.default_rng(6)
    config = TargetConfig(style=style)
    images = [np.concatenate([rng.uniform(-40, 560, (p, 18, 2)), rng.integers(0, 3, (p, 18, 1))], axis=2)
              for p in (3, 0, 1, 6)]
    images[3][:, :, :2] = images[3][0, :, :2] + rng.normal(0, 25, (6, 18, 2))  # crowded: shared cells
    masks = rng.uniform(0, 1, (4, *GRID))
    batch = render_heatmaps_batch(images, GRID, config, masks)
    assert batch.shape == (4, 50, *GRID) and not batch[1, :48].any()
    for n, keypoints in enumerate(images):
        np.testing.assert_allclose(batch[n], render_heatmaps(keypoints, GRID, config, masks[n]), atol=1e-7)
    assert render_heatmaps_batch([], GRID).shape == (0, 50, *GRID)


def test_paper_style_limb_is_an_ellipse_along_the_segment():
    config = TargetConfig(style="paper")
    a, b = np.array([101.5, 201.5]), np.array([181.5, 281.5])  # both on cell centres, 45 degrees
    limb = render_heatmaps(person(neck=(*a, 1), nose=(*b, 1))[None], GRID, config)[0]
    on_segment = [(50 + i, 25 + i) for i in range(21)]  # cells whose centre is on the segment
    np.testing.assert_allclose([limb[r, c] for r, c in on_segment], 1.0, atol=1e-6)
    assert limb.max() == pytest.approx(1.0)
    positive = limb[limb > 0]
    assert positive.min() >= config.limb_threshold  # truncated by value, no floor
    # Beyond the endpoints along the axis and far to the side there is nothing.
    assert limb[45, 20] == 0 and limb[90, 90] == 0 and limb[50, 70] == 0
    xs, ys = np.meshgrid(cell_centres(128, 4), cell_centres(128, 4))
    distance = np.abs((xs - a[0]) - (ys - a[1])) / np.sqrt(2)
    assert (distance[limb > 0] <= config.limb_half_width + 1e-9).all()


def test_paper_style_combines_persons_by_max_and_truncates_keypoints():
    config = TargetConfig(style="paper")
    first = person(nose=(100.0, 200.0), neck=(100.0, 240.0))
    second = person(nose=(130.0, 200.0), neck=(110.0, 260.0))
    both = render_heatmaps(np.stack([first, second]), GRID, config)
    alone = [render_heatmaps(p[None], GRID, config) for p in (first, second)]
    np.testing.assert_allclose(both, np.maximum(*alone), atol=1e-7)
    nose = both[KEYPOINT_START + NOSE]
    assert nose[nose > 0].min() >= config.keypoint_threshold
    radius = config.keypoint_radius
    xs, ys = np.meshgrid(cell_centres(128, 4), cell_centres(128, 4))
    near = np.hypot(xs - 100, ys - 200) < radius - 0.5
    assert (nose[near] > 0).all()  # the window never cuts the disc


def test_person_mask_channel_is_eroded():
    mask = np.zeros(GRID, np.float32)
    mask[10:20, 30:40] = 1.0
    out = render_heatmaps(np.zeros((0, 18, 3)), GRID, person_mask=mask)
    expected = np.zeros(GRID, np.float32)
    expected[11:19, 31:39] = 1.0
    np.testing.assert_array_equal(out[PERSON_MASK_CHANNEL], expected)
    assert not np.delete(out, PERSON_MASK_CHANNEL, axis=0).any()


def test_keypoints_outside_the_grid_paint_what_falls_inside():
    out = render_heatmaps(person(nose=(-10.0, 300.0), neck=(-30.0, 900.0))[None], GRID)
    # round(-10 / 4) = -2 (half to even): the window spans columns -9..5, of which 0..5 are drawn
    assert out[KEYPOINT_START + NOSE, :, 5].any() and not out[KEYPOINT_START + NOSE, :, 6:].any()
    assert not out[KEYPOINT_START + NECK].any()


@pytest.mark.parametrize("bad, match", [
    (dict(keypoints=np.zeros((2, 17, 3))), "keypoints must be"),
    (dict(keypoints=np.full((1, 18, 3), np.nan)), "NaN"),
    (dict(grid_shape=(0, 4)), "grid_shape"),
    (dict(person_mask=np.zeros((4, 4))), "person_mask"),
])
def test_render_rejects_bad_input(bad, match):
    kwargs = dict(keypoints=np.zeros((1, 18, 3)), grid_shape=GRID) | bad
    with pytest.raises(ValueError, match=match):
        render_heatmaps(**kwargs)


@pytest.mark.parametrize("bad", [dict(style="ellipse"), dict(keypoint_sigma=0), dict(limb_threshold=1.5),
                                 dict(stride=0), dict(limb_floor=-0.1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="TargetConfig"):
        TargetConfig(**bad)


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_person_masks_unlabelled_persons_and_crowds():
    annotations = [
        {"segmentation": square(10, 10, 30, 30), "iscrowd": 0, "num_keypoints": 5},
        {"segmentation": square(40, 10, 50, 20), "iscrowd": 0, "num_keypoints": 0},
        # crowd overlapping the first person: the overlap stays supervised
        {"segmentation": {"size": [64, 64], "counts": _rle_counts(20, 20, 40, 40)}, "iscrowd": 1,
         "num_keypoints": 0},
        # a second crowd region: the reference raises here, we take the union
        {"segmentation": {"size": [64, 64], "counts": _rle_counts(50, 50, 60, 60)}, "iscrowd": 1,
         "num_keypoints": 0},
    ]
    mask_miss, mask_all = person_masks(annotations, 64, 64)
    assert mask_miss.dtype == mask_all.dtype == np.uint8 and mask_miss.shape == (64, 64)
    assert mask_miss[15, 15] == 255 and mask_all[15, 15] == 255  # labelled person
    assert mask_miss[15, 45] == 0 and mask_all[15, 45] == 255  # no keypoints
    assert mask_miss[25, 25] == 255  # crowd minus the earlier person
    assert mask_miss[35, 35] == 0 and mask_all[35, 35] == 255  # crowd
    assert mask_miss[55, 55] == 0 and mask_all[55, 55] == 255  # second crowd
    assert mask_miss[5, 5] == 255 and mask_all[5, 5] == 0


def _rle_counts(x0, y0, x1, y1, size=64):
    """Uncompressed column-major RLE of the box [x0, x1) x [y0, y1)."""
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    flat = m.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    return np.diff(np.r_[0, changes]).tolist()


def test_person_masks_on_a_coco_image_with_a_crowd(coco_mini_annotations):
    data = json.loads(coco_mini_annotations.read_text())
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    image = next(i for i in data["images"] if i["id"] == crowd["image_id"])
    annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    mask_miss, mask_all = person_masks(annotations, image["height"], image["width"])
    x, y, w, h = (int(v) for v in crowd["bbox"])
    assert (mask_miss[y:y + h, x:x + w] == 0).mean() > 0.2  # the crowd region is not supervised
    assert ((mask_miss == 0) <= (mask_all == 255)).all()  # what is ignored is a person or a crowd
    for ann in annotations:
        if not ann["iscrowd"] and ann["num_keypoints"] > 0:
            px, py, pw, ph = ann["bbox"]
            assert mask_all[int(py + ph / 2), int(px + pw / 2)] in (0, 255)


def test_person_masks_rejects_a_wrong_rle_size():
    with pytest.raises(ValueError, match="RLE size"):
        person_masks([{"segmentation": {"size": [8, 8], "counts": [64]}, "iscrowd": 1}], 16, 16)


def test_pool_targets_block_means_and_thresholded_mask():
    targets = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1.0
    mask[:, :, 8:, :3] = 0.6
    scales = pool_targets(targets, mask)
    assert [t.shape[-1] for t, _ in scales] == [16, 8, 4, 2, 1]
    assert all(m.shape == (2, 1, t.shape[2], t.shape[3]) for t, m in scales)
    torch.testing.assert_close(scales[0][0], targets)
    torch.testing.assert_close(scales[1][0][0, 0, 0, 0], targets[0, 0, :2, :2].mean())
    torch.testing.assert_close(scales[4][0], targets.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(scales[0][1], mask)  # identity at full scale (0.6 >= 0.5 is kept)
    half = scales[1][1][0, 0]
    assert half[0, 0] == 1.0 and half[4, 0] == pytest.approx(0.6)
    assert half[4, 1] == 0.0  # (0.6 + 0) / 2 = 0.3 < 0.5: zeroed
    assert scales[2][1][0, 0, 2, 0] == pytest.approx(0.6)  # factor 4: the block's central 2x2 only


def test_pool_targets_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        pool_targets(torch.zeros(1, 50, 12, 12), torch.zeros(1, 1, 12, 12))
    with pytest.raises(ValueError, match="mask"):
        pool_targets(torch.zeros(1, 50, 16, 16), torch.zeros(1, 2, 16, 16))
    with pytest.raises(TypeError, match="tensors"):
        pool_targets(np.zeros((1, 50, 16, 16)), torch.zeros(1, 1, 16, 16))


def test_every_limb_channel_is_drawn():
    kp = np.zeros((1, 18, 3))
    kp[0, :, 0] = 20 + 25 * (np.arange(18) % 5)
    kp[0, :, 1] = 20 + 25 * (np.arange(18) // 5)
    kp[0, :, 2] = 1
    out = render_heatmaps(kp, GRID)
    assert all(out[c].max() > 0.9 for c in range(len(LIMBS)))


def test_benchmark_runs_on_coco_mini(coco_mini, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--annotations", str(coco_mini / "annotations" / "person_keypoints_train2017.json"),
                              "--images", str(coco_mini / "train2017"), "--size", "128", "--seconds", "0.2",
                              "--repeats", "2", "--workers", "2",  # forked workers (they once hung on OpenCV)
                              "--default-malloc"])  # leave the test process's allocator alone
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "samples/s per core (best of 2 repeats" in out and "65 samples from 25 images" in out
    assert "worker 1 repeat 1:" in out
