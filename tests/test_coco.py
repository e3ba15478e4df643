"""COCO data (simplepose.coco): reading annotations, listing training samples, building one training sample,
results files and the official keypoint evaluation."""
from __future__ import annotations

import copy
import io
import json

import cv2
import numpy as np
import pytest

from simplepose.augment import AugmentConfig, AugmentParams, SourceImage, affine_matrix, transform_keypoints
from simplepose.coco import (STAT_NAMES, build_sample, build_samples, evaluate_keypoints, image_masks,
                             keypoint_results, load_coco, training_samples, write_results)
from simplepose.skeleton import FLIP_CHANNEL_ORDER, KEYPOINT_START, coco_to_reference
from simplepose.targets import TargetConfig, render_heatmaps


@pytest.fixture(scope="module")
def gt(coco_mini_annotations):
    return json.loads(coco_mini_annotations.read_text())


@pytest.fixture(scope="module")
def coco(gt):
    return load_coco(gt)


def perfect_results(gt):
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in gt["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


def test_load_coco_from_path_file_dict(coco_mini_annotations, gt):
    for source in (coco_mini_annotations, str(coco_mini_annotations), io.StringIO(json.dumps(gt)),
                   io.BytesIO(coco_mini_annotations.read_bytes()), gt):
        assert len(load_coco(source).imgs) == 80
    with pytest.raises(ValueError, match="missing"):
        load_coco({"images": []})
    with pytest.raises(TypeError, match="path, file object"):
        load_coco(42)


def test_training_samples_on_coco_mini(coco, gt):
    samples = training_samples(coco)
    assert len(samples) == 65 and len({s.image_id for s in samples}) == 25
    by_id = {a["id"]: a for a in gt["annotations"]}
    for sample in samples:
        main = sample.keypoints[0]
        matches = [a for a in by_id.values() if a["image_id"] == sample.image_id
                   and np.allclose(coco_to_reference(np.reshape(a["keypoints"], (17, 3))), main)]
        ann = matches[0]
        assert ann["num_keypoints"] >= 5 and ann["area"] >= 1024 and not ann["iscrowd"]
        x, y, w, h = ann["bbox"]
        assert sample.center == (x + w / 2, y + h / 2) and sample.person_height == h
        others = [a for a in gt["annotations"] if a["image_id"] == sample.image_id and a["num_keypoints"] > 0
                  and not a["iscrowd"]]
        assert sample.keypoints.shape == (len(others), 18, 3)
    for image_id in {s.image_id for s in samples}:  # main persons of one image are spread out
        chosen = [s for s in samples if s.image_id == image_id]
        for i, first in enumerate(chosen):
            for second in chosen[i + 1:]:
                radius = 0.3 * max(_bbox(first, gt)[2:])
                assert np.hypot(*np.subtract(first.center, second.center)) >= radius


def _bbox(sample, gt):
    return next(a["bbox"] for a in gt["annotations"] if a["image_id"] == sample.image_id
                and np.allclose(coco_to_reference(np.reshape(a["keypoints"], (17, 3))), sample.keypoints[0]))


def test_separation_uses_the_chosen_persons_size():
    # The reference measures the radius with the image's last annotation (tiny here): it would keep both.
    keypoints = [10.0, 10.0, 2] * 17
    annotations = [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 100, 200], "area": 20000, "num_keypoints": 17,
         "keypoints": keypoints, "iscrowd": 0, "category_id": 1},
        {"id": 2, "image_id": 1, "bbox": [40, 20, 100, 200], "area": 20000, "num_keypoints": 17,
         "keypoints": keypoints, "iscrowd": 0, "category_id": 1},
        {"id": 3, "image_id": 1, "bbox": [300, 300, 4, 4], "area": 16, "num_keypoints": 1,
         "keypoints": keypoints, "iscrowd": 0, "category_id": 1},
    ]
    dataset = {"images": [{"id": 1, "file_name": "a.jpg", "height": 400, "width": 400}],
               "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    samples = training_samples(dataset)
    assert len(samples) == 1 and samples[0].center == (50.0, 100.0) and len(samples[0].keypoints) == 3
    with pytest.raises(ValueError, match="not in the annotations"):
        training_samples(dataset, image_ids=[7])


def test_image_masks_of_an_image_with_a_crowd(coco, gt):
    crowd = next(a for a in gt["annotations"] if a["iscrowd"])
    mask_miss, mask_all = image_masks(coco, crowd["image_id"])
    info = coco.imgs[crowd["image_id"]]
    assert mask_miss.shape == (info["height"], info["width"]) and (mask_miss == 0).any()
    assert ((mask_miss == 0) <= (mask_all == 255)).all()
    with pytest.raises(ValueError, match="not in the annotations"):
        image_masks(coco, -1)


@pytest.fixture(scope="module")
def sample_and_source(coco, coco_mini):
    sample = max(training_samples(coco), key=lambda s: len(s.keypoints))
    image = cv2.imread(str(coco_mini / "train2017" / sample.file_name))
    return sample, SourceImage.from_arrays(image, *image_masks(coco, sample.image_id))


def test_build_sample_shapes_ranges_and_targets(sample_and_source):
    sample, source = sample_and_source
    config = AugmentConfig(crop_size=256)
    image, mask, targets = build_sample(source, sample, np.random.default_rng(0), config)
    assert image.shape == (256, 256, 3) and mask.shape == (1, 64, 64) and targets.shape == (50, 64, 64)
    assert image.dtype == np.uint8 and mask.dtype == targets.dtype == np.float32
    for array in (mask, targets):
        assert array.min() >= 0 and array.max() <= 1
    assert targets[KEYPOINT_START:KEYPOINT_START + 18].max() > 0.9 and targets[:30].max() > 0.5
    # Validation draw: the targets are exactly those of the transformed keypoints.
    image, mask, targets = build_sample(source, sample, params=AugmentParams(), augment_config=config)
    matrix = affine_matrix(sample.center, sample.person_height / 256, AugmentParams(), config)
    keypoints = transform_keypoints(sample.keypoints, matrix, flip=False)
    expected = render_heatmaps(keypoints, (64, 64), TargetConfig())
    np.testing.assert_array_equal(targets[:48], expected[:48])
    assert targets[48].max() == 1.0  # the main person's eroded mask


@pytest.mark.parametrize("style", ["reference", "paper"])
def test_build_sample_flip_mirrors_everything(sample_and_source, style):
    sample, source = sample_and_source
    kwargs = dict(augment_config=AugmentConfig(crop_size=256), target_config=TargetConfig(style=style))
    plain = build_sample(source, sample, params=AugmentParams(rotation=15.0), **kwargs)
    flipped = build_sample(source, sample, params=AugmentParams(rotation=15.0, flip=True), **kwargs)
    # Left and right swap: channel c of the flipped sample is the mirrored partner channel of the plain one.
    mirrored = plain[2][list(FLIP_CHANNEL_ORDER), :, ::-1]
    if style == "paper":  # value-truncated maps are mirror-exact
        np.testing.assert_allclose(flipped[2][:48], mirrored[:48], atol=1e-5)
    else:  # the reference rounds window and box edges to cells, which is not mirror-symmetric
        for channel in range(KEYPOINT_START, KEYPOINT_START + 18):
            if mirrored[channel].max() > 0.5:
                assert flipped[2][channel].argmax() == mirrored[channel].argmax()
        assert np.abs(flipped[2][KEYPOINT_START:48] - mirrored[KEYPOINT_START:48]).max() < 0.02  # window edges
    assert np.abs(flipped[0].astype(int) - plain[0][:, ::-1]).max() <= 2  # bilinear fixed-point rounding
    assert np.abs(flipped[1] - plain[1][:, :, ::-1]).max() <= 2 / 255


def test_a_batch_equals_its_samples_one_by_one(coco, coco_mini):
    samples = training_samples(coco)[:5]
    sources = [SourceImage.from_arrays(cv2.imread(str(coco_mini / "train2017" / s.file_name)),
                                       *image_masks(coco, s.image_id)) for s in samples]
    config = AugmentConfig(crop_size=256)
    images, masks, targets = build_samples(list(zip(sources, samples)),
                                           [np.random.default_rng(n) for n in range(5)], config)
    assert images.shape == (5, 256, 256, 3) and masks.shape == (5, 1, 64, 64) and targets.shape == (5, 50, 64, 64)
    for n, (source, sample) in enumerate(zip(sources, samples)):
        image, mask, target = build_sample(source, sample, np.random.default_rng(n), config)
        np.testing.assert_array_equal(images[n], image)
        np.testing.assert_array_equal(masks[n], mask)
        np.testing.assert_allclose(targets[n], target, atol=1e-7)  # float sums in another order
    with pytest.raises(ValueError, match="one rng or one params per item"):
        build_samples(list(zip(sources, samples)), [np.random.default_rng(0)])


def test_build_sample_rejects_a_mismatched_image(sample_and_source):
    sample, _ = sample_and_source
    with pytest.raises(ValueError, match="source is"):
        build_sample(SourceImage.from_arrays(np.zeros((10, 10, 3), np.uint8)), sample, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng or params"):
        build_sample(sample_and_source[1], sample)


def test_evaluate_perfect_results(gt):
    results = perfect_results(gt)
    before = copy.deepcopy(results)
    stats = evaluate_keypoints(gt, results)
    assert list(stats) == list(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    assert results == before  # pycocotools' loadRes adds fields; the caller's dicts are untouched


def test_evaluate_degrades_and_restricts(gt, capsys):
    results = perfect_results(gt)
    shifted = [r | {"keypoints": [v + 8 * (i % 3 < 2) for i, v in enumerate(r["keypoints"])]} for r in results]
    assert evaluate_keypoints(gt, shifted)["AP"] < 0.9
    first = results[0]["image_id"]
    subset = evaluate_keypoints(gt, [r for r in results if r["image_id"] == first], image_ids=[first])
    assert subset["AR"] == pytest.approx(1.0)
    assert evaluate_keypoints(gt, [])["AP"] == 0.0
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured


@pytest.mark.parametrize("mutate, error, match", [
    (lambda r: r[0].update(image_id=999999999), ValueError, "not in the ground truth"),
    (lambda r: r[0].update(keypoints=r[0]["keypoints"][:34]), ValueError, "expected 51"),
    (lambda r: r[0].pop("score"), ValueError, "lacks"),
    (lambda r: r[0].update(category_id=2), ValueError, "category_id"),
    (lambda r: r[0].update(score=float("nan")), ValueError, "non-finite"),
    (lambda r: r[1].update(score="high"), ValueError, "must be numbers"),
    (lambda r: r.append("x"), TypeError, "not a dict"),
])
def test_evaluate_rejects_bad_results(gt, mutate, error, match):
    results = perfect_results(gt)[:3]
    mutate(results)
    with pytest.raises(error, match=match):
        evaluate_keypoints(gt, results)


def test_evaluate_rejects_unknown_image_ids(gt):
    with pytest.raises(ValueError, match="image_ids"):
        evaluate_keypoints(gt, [], image_ids=[123])


def test_keypoint_results_round_trip(tmp_path, gt):
    keypoints = np.zeros((2, 17, 3))
    keypoints[..., 0] = 1.23456
    results = keypoint_results(gt["images"][0]["id"], keypoints, np.array([0.5, 0.9]))
    assert len(results) == 2 and results[1]["score"] == 0.9 and len(results[0]["keypoints"]) == 51
    assert results[0]["keypoints"][0] == 1.235
    write_results(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    with pytest.raises(ValueError, match="keypoints"):
        keypoint_results(1, np.zeros((2, 18, 3)), np.zeros(2))
