"""Augmentation (simplepose.augment): the affine of docs/method.md §4.1 (golden G5, the fixtures' affines), parameter
draws, the flip's left/right swap, tint, and the warp of image and masks with their borders."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from simplepose.augment import (AugmentConfig, AugmentParams, SourceImage, affine_matrix, sample_params, tint,
                                transform_keypoints, visible_box, warp)
from simplepose.model import network_input
from simplepose.skeleton import KEYPOINT_FLIP, LEFT_KEYPOINTS, RIGHT_KEYPOINTS


def test_g5_affine():
    params = AugmentParams(flip=True, rotation=10.0, shift=(5, -7), scale=1.1)
    matrix = affine_matrix((320.0, 240.0), 0.5, params)
    expected = [[-1.297407, -0.228768, 730.574626], [-0.228768, 1.297407, 10.327984]]
    np.testing.assert_allclose(matrix, expected, atol=1e-6)
    assert np.sqrt(abs(np.linalg.det(matrix[:, :2]))) == pytest.approx(1.3174219, abs=1e-7)
    np.testing.assert_allclose(matrix @ [320.0, 240.0, 1.0], [260.5, 248.5], atol=1e-9)


def test_validation_affine_matches_the_fixtures(fixtures_dir, coco_mini_annotations):
    data = np.load(fixtures_dir / "targets_coco_mini.npz")
    annotations = json.loads(coco_mini_annotations.read_text())["annotations"]
    for case in range(4):
        candidates = [a for a in annotations if a["image_id"] == int(data[f"case{case}_image_id"])
                      and not a["iscrowd"] and a["num_keypoints"] >= 5 and a["area"] >= 1024]
        x, y, w, h = max(candidates, key=lambda a: a["area"])["bbox"]
        matrix = affine_matrix((x + w / 2, y + h / 2), h / 512, AugmentParams())
        np.testing.assert_allclose(matrix, data[f"case{case}_affine"], atol=1e-9)


def test_sample_params_ranges_and_determinism():
    config = AugmentConfig()
    draws = [sample_params(config, np.random.default_rng(seed)) for seed in range(400)]
    assert draws[:5] == [sample_params(config, np.random.default_rng(seed)) for seed in range(5)]
    assert all(abs(d.rotation) <= 40 and 0.7 <= d.scale <= 1.3 for d in draws)
    assert all(isinstance(v, int) and -49 <= v <= 49 for d in draws for v in d.shift)
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    assert 0.1 < np.mean([d.tint is not None for d in draws]) < 0.3
    assert 0.7 < np.mean([d.scale != 1.0 for d in draws]) < 0.9
    tints = np.array([d.tint for d in draws if d.tint is not None])
    assert tints[:, 0].min() >= -10 and tints[:, 0].max() <= 10
    assert tints[:, 1].min() >= -20 and tints[:, 1].max() <= 60 and tints[:, 1].max() > 20  # asymmetric
    assert tints[:, 2].min() >= -20 and tints[:, 2].max() <= 40
    with pytest.raises(TypeError, match="Generator"):
        sample_params(config, np.random.RandomState(0))


def test_validation_draw_is_a_plain_centred_crop():
    """`AugmentParams()` (validation) is what a config with every augmentation off draws, and its affine only
    scales the main person to target_dist of the crop, centred: no rotation, flip, shift or extra scale."""
    off = AugmentConfig(scale_prob=0, max_rotate_degree=0, center_perturb_max=0, flip_prob=0, tint_prob=0)
    assert {sample_params(off, np.random.default_rng(seed)) for seed in range(50)} == {AugmentParams()}
    matrix = affine_matrix((300.0, 200.0), 0.25, AugmentParams())  # a 128-pixel-tall person, 512 crop
    np.testing.assert_allclose(matrix[:, :2] / matrix[0, 0], np.eye(2), atol=1e-12)  # isotropic, unrotated
    np.testing.assert_allclose(matrix @ [300.0, 200.0, 1.0], [255.5, 255.5])  # the centre to the crop centre
    top, bottom = matrix @ [300.0, 136.0, 1.0], matrix @ [300.0, 264.0, 1.0]
    assert bottom[1] - top[1] == pytest.approx(0.6 * 511)  # target_dist of the crop (S - 1: the HEAD tweak)


def test_transform_keypoints_moves_every_row_and_swaps_sides_on_flip():
    kp = np.zeros((2, 18, 3))
    kp[..., 0] = np.arange(18) * 10.0
    kp[..., 1] = 100.0
    kp[..., 2] = [1, 0, 2] * 6
    matrix = affine_matrix((85.0, 100.0), 0.5, AugmentParams(flip=True))
    out = transform_keypoints(kp, matrix, flip=True)
    moved = kp[..., :2] @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(out[..., :2], moved[:, list(KEYPOINT_FLIP)])
    np.testing.assert_array_equal(out[..., 2], kp[:, list(KEYPOINT_FLIP), 2])
    for left, right in zip(LEFT_KEYPOINTS, RIGHT_KEYPOINTS):
        np.testing.assert_allclose(out[0, left, :2], moved[0, right])
    # The flip mirrors about the crop centre 255.5: x -> 511 - x with the same rotation and scale.
    unflipped = transform_keypoints(kp, affine_matrix((85.0, 100.0), 0.5, AugmentParams()), flip=False)
    np.testing.assert_allclose(out[:, list(KEYPOINT_FLIP), 0], 511 - unflipped[..., 0])
    np.testing.assert_allclose(transform_keypoints(kp, matrix, flip=False)[..., :2], moved)
    with pytest.raises(ValueError, match="keypoints"):
        transform_keypoints(np.zeros((1, 17, 3)), matrix, flip=False)


def test_tint_matches_clipped_hsv_shifts():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for shifts in [(10, 60, 40), (-10, -20, -20), (3, -5, 7)]:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(int) + shifts
        expected = cv2.cvtColor(np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2BGR)
        np.testing.assert_array_equal(tint(image, shifts), expected)
    with pytest.raises(ValueError, match="uint8"):
        tint(image.astype(np.float32), (0, 0, 0))


def make_source(height=60, width=80):
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = 200  # red
    mask_miss = np.full((height, width), 255, np.uint8)
    mask_miss[:, : width // 2] = 0
    mask_all = np.zeros((height, width), np.uint8)
    mask_all[height // 2:] = 255
    return SourceImage.from_arrays(image, mask_miss, mask_all)


def test_warp_borders_and_masks():
    config = AugmentConfig(crop_size=64)
    source = make_source()
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    out = warp(source, identity, config, stride=4)
    assert out.image.shape == (64, 64, 3) and out.mask_miss.shape == out.mask_all.shape == (16, 16)
    assert out.image.dtype == np.uint8 and out.mask_miss.dtype == out.mask_all.dtype == np.float32
    np.testing.assert_array_equal(out.image[:59, :63], np.broadcast_to([0, 0, 200], (59, 63, 3)))
    np.testing.assert_array_equal(out.image[61:], np.broadcast_to([124, 127, 127], (3, 64, 3)))  # border
    assert (out.mask_miss[:15, :10] == 0).all() and (out.mask_miss[:, 10:] == 1).all()
    assert (out.mask_miss[15] == 1).all()  # rows 60-63 are outside the image: supervised
    assert (out.mask_all[:7] == 0).all() and (out.mask_all[8:14] == 1).all()
    assert (out.mask_all[15] == 0).all()  # outside the image: no person
    assert ((out.mask_miss >= 0) & (out.mask_miss <= 1)).all()


def test_source_without_masks_and_tinted_source():
    image = np.full((10, 12, 3), 90, np.uint8)
    source = SourceImage.from_arrays(image)
    assert source.mask_miss is None and not source.pixels[..., 3].any()
    np.testing.assert_array_equal(source.image, image)
    out = warp(source, np.array([[1.0, 0, 0], [0, 1.0, 0]]), AugmentConfig(crop_size=16))
    assert (out.mask_miss == 1).all() and (out.mask_all == 0).all()
    tinted = make_source().tinted((0, 0, -20))
    assert (tinted.image[..., 2] == 180).all()
    np.testing.assert_array_equal(tinted.pixels[..., 3], make_source().pixels[..., 3])


@pytest.mark.parametrize("bad, match", [
    (dict(image=np.zeros((4, 4), np.uint8)), "uint8 \\(H, W, 3\\)"),
    (dict(image=np.zeros((4, 4, 3), np.float32)), "uint8 \\(H, W, 3\\)"),
    (dict(mask_miss=np.zeros((5, 4), np.uint8)), "mask_miss"),
    (dict(mask_all=np.zeros((4, 4), bool)), "mask_all"),
])
def test_source_rejects_bad_arrays(bad, match):
    kwargs = dict(image=np.zeros((4, 4, 3), np.uint8)) | bad
    with pytest.raises(ValueError, match=match):
        SourceImage.from_arrays(**kwargs)


def test_warp_and_config_reject_bad_values():
    with pytest.raises(ValueError, match="multiple of the stride"):
        warp(make_source(), np.eye(2, 3), AugmentConfig(crop_size=66), stride=4)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.3, 0.7))
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale_provided"):
        affine_matrix((0.0, 0.0), 0.0, AugmentParams())


@pytest.mark.parametrize("channels_last", [False, True])
def test_network_input_is_bgr_over_255(channels_last):
    image = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = warp(SourceImage.from_arrays(image), np.array([[1.0, 0, 0], [0, 1.0, 0]]), AugmentConfig(crop_size=8))
    np.testing.assert_array_equal(out.image, image)  # the identity warp keeps the pixels
    x = network_input(torch.from_numpy(out.image[None]), channels_last)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    np.testing.assert_array_equal(x[0].numpy(), image.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        network_input(x)


def random_matrices(count, height, width, seed=0, crop_size=128):
    rng = np.random.default_rng(seed)
    config = AugmentConfig(crop_size=crop_size)
    centre = (width / 2, height / 2)
    return [affine_matrix(centre, rng.uniform(0.1, 0.6), sample_params(config, rng), config) for _ in range(count)]


def test_mask_miss_tiles_match_a_full_warp():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    mask_miss = np.full((150, 200), 255, np.uint8)
    mask_miss[60:90, 20:70] = 0
    mask_miss[5, 190] = mask_miss[140:, :3] = 128  # far apart, so that tiles between them are skipped
    source = SourceImage.from_arrays(image, mask_miss)
    assert source.ignored_blocks[-1, -1] == 5 * 7 + 1 + 2  # 8-pixel blocks holding an ignored pixel
    for crop_size in (128, 256, 200):
        config = AugmentConfig(crop_size=crop_size)
        for matrix in random_matrices(20, 150, 200, crop_size=crop_size):
            full = cv2.warpAffine(mask_miss, matrix, (crop_size, crop_size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=255)
            expected = cv2.resize(full, (crop_size // 4,) * 2, interpolation=cv2.INTER_AREA) / np.float32(255)
            np.testing.assert_allclose(warp(source, matrix, config).mask_miss, expected, atol=1.01 / 255)


@pytest.mark.parametrize("width", [250, 641])
def test_tinting_the_visible_box_only_gives_the_same_crop(width):
    rng = np.random.default_rng(2)
    source = SourceImage.from_arrays(rng.integers(0, 256, (300, width, 3), dtype=np.uint8))
    config = AugmentConfig(crop_size=128)
    areas = []
    for matrix in random_matrices(30, 300, width, seed=3):
        x0, y0, x1, y1 = box = visible_box(matrix, 128, 300, width)
        areas.append((x1 - x0 + 1) * (y1 - y0 + 1) / (300 * width))
        partial = warp(source.tinted((7, 40, -15), box), matrix, config).image
        np.testing.assert_array_equal(partial, warp(source.tinted((7, 40, -15)), matrix, config).image)
    assert min(areas) < 0.5  # the box spares most of the image on zoomed-in crops
    assert visible_box(np.array([[1.0, 0, 0], [0, 1.0, 1000.0]]), 128, 300, width)[3] < 0  # below the image


def test_tinting_an_empty_box_changes_nothing():
    source = make_source()
    np.testing.assert_array_equal(source.tinted((5, 5, 5), box=(0, 0, 10, -5)).pixels, source.pixels)
