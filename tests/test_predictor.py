"""simplepose.Predictor: the Python API (shipped tiny weights, CPU)."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import simplepose
from simplepose.decode import POSE_FLOOR, Poses, PoseFloor
from simplepose.infer import LABELING

WEIGHTS = Path(__file__).resolve().parents[1] / "jobs" / "weights" / "imhn-tiny-stickfigures.pt"


@pytest.fixture(scope="module")
def predictor():
    return simplepose.Predictor(str(WEIGHTS), device="cpu", boxsize=256)


@pytest.fixture(scope="module")
def photos(coco_mini):
    return sorted((coco_mini / "train2017").glob("*.jpg"))[:2]


def test_fast_preset_is_the_labeling_default_and_settings_override_by_name():
    p = simplepose.Predictor(WEIGHTS, device="cpu")
    assert p.infer_config == LABELING
    assert (LABELING.boxsize, LABELING.scales, LABELING.flip, LABELING.aggregation) == (640, (1.0,), True, "stride4")
    assert p.floor == POSE_FLOOR and p.decoder_config.max_candidates == 24
    q = simplepose.Predictor(p.model, device="cpu", boxsize=320, max_persons=5, min_keypoints=4)
    assert q.infer_config.boxsize == 320 and q.decoder_config.max_persons == 5
    assert q.floor == PoseFloor(POSE_FLOOR.min_person_score, 4)
    assert simplepose.Predictor(p.model, preset="paper", device="cpu").infer_config.scales == (0.5, 1, 1.5, 2, 3)
    assert simplepose.Predictor(p.model, device="cpu", mode="reference").infer_config.aggregation == "reference"


def test_unknown_settings_presets_and_models_raise_value_errors():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['box_size'\]; accepted: .*'boxsize'"):
        simplepose.Predictor(WEIGHTS, device="cpu", box_size=512)
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        simplepose.Predictor(WEIGHTS, preset="slow")
    with pytest.raises(ValueError, match="local paths and file objects"):
        simplepose.Predictor("s3://bucket/model.pt")
    with pytest.raises(ValueError, match="nn.Module"):
        simplepose.Predictor(42)
    with pytest.raises(ValueError, match="precision"):
        simplepose.Predictor(WEIGHTS, device="cpu", precision="int8")


def test_shapes_floor_and_every_input_kind_agree(predictor, photos):
    bgr = cv2.imread(str(photos[0]), cv2.IMREAD_COLOR)
    poses = predictor(bgr)
    assert isinstance(poses, Poses) and len(poses) <= predictor.decoder_config.max_persons
    assert poses.keypoints.shape == (len(poses), 17, 3) and poses.scores.shape == (len(poses),)
    assert poses.boxes.shape == (len(poses), 4) and poses.image_size == bgr.shape[:2]
    assert np.all(poses.scores >= POSE_FLOOR.min_person_score)
    assert np.all((poses.keypoints[..., 2] > 0).sum(axis=1) >= POSE_FLOOR.min_keypoints)
    assert np.all(np.diff(poses.scores) <= 0)
    found = poses.keypoints[..., 2] > 0
    assert np.all(poses.keypoints[..., 0][found] >= -2) and np.all(poses.keypoints[..., 0][found] <= bgr.shape[1] + 2)
    same = [predictor(bgr[..., ::-1].copy(), rgb=True), predictor(Image.open(photos[0])), predictor(photos[0]),
            predictor(str(photos[0])), predictor(io.BytesIO(photos[0].read_bytes()))]
    for other in same:
        np.testing.assert_array_equal(other.keypoints, poses.keypoints)
        np.testing.assert_array_equal(other.scores, poses.scores)


def test_list_equals_one_by_one(predictor, photos):
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in photos]
    together = predictor(images)
    assert isinstance(together, list) and len(together) == len(images)
    for image, poses in zip(images, together):
        alone = predictor(image)
        # float32 rounding only: a batched forward may pick another convolution algorithm (seen: 1.3e-5 px at
        # x = 60, a relative 2e-7); any real difference in preprocessing or grouping is orders larger
        np.testing.assert_allclose(poses.keypoints, alone.keypoints, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(poses.scores, alone.scores, rtol=1e-6, atol=1e-6)
    assert predictor([]) == []


def test_floor_is_applied(photos):
    loose = simplepose.Predictor(WEIGHTS, device="cpu", boxsize=256, min_person_score=0.0, min_keypoints=0,
                                 max_persons=0)
    strict = simplepose.Predictor(loose.model, device="cpu", boxsize=256)
    a, b = loose(photos[0]), strict(photos[0])
    assert len(a) > len(b)  # the tiny weights find weak persons on photos
    assert np.any((a.keypoints[..., 2] > 0).sum(axis=1) < 2) or np.any(a.scores < 0.1)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8), np.uint8), r"image 0: a numpy image must have shape \(H, W, 3\), got \(8, 8\)"),
    (np.zeros((8, 8, 3), np.float32), "image 0: a numpy image must be uint8, got dtype float32"),
    (np.zeros((0, 8, 3), np.uint8), "image 0: the image is empty"),
    ("/no/such/file.jpg", "image 0: no such image file"),
    (io.BytesIO(b"not an image"), "image 0: cannot decode"),
    (3.5, "image 0: expected a numpy uint8 array, a PIL image, a path or a file object, got float"),
    ("s3://bucket/a.jpg", "local paths and file objects only"),
])
def test_bad_images_raise_clear_value_errors(predictor, bad, message):
    with pytest.raises(ValueError, match=message):
        predictor(bad)


def test_the_bad_image_of_a_list_is_named(predictor):
    good = np.full((64, 64, 3), 128, np.uint8)
    with pytest.raises(ValueError, match=r"image 1: a numpy image must have shape"):
        predictor([good, np.zeros((4, 4, 4), np.uint8)])
