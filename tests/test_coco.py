"""COCO data (simplepose.coco): reading annotations, listing training samples and their masks, results files and
the official keypoint evaluation."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest

from simplepose.coco import (STAT_NAMES, evaluate_keypoints, image_masks, keypoint_results, load_coco,
                             training_samples, write_results)
from simplepose.skeleton import coco_to_reference


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
