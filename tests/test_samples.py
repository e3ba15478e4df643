"""Training-sample composition (simplepose.samples): augment one main person's crop and render its targets,
one by one and as a batch, on coco-mini's samples."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from simplepose.augment import AugmentConfig, AugmentParams, SourceImage, affine_matrix, transform_keypoints
from simplepose.coco import image_masks, load_coco, training_samples
from simplepose.samples import build_sample, build_samples
from simplepose.skeleton import FLIP_CHANNEL_ORDER, KEYPOINT_START
from simplepose.targets import TargetConfig, render_heatmaps


@pytest.fixture(scope="module")
def coco(coco_mini_annotations):
    return load_coco(coco_mini_annotations)


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
