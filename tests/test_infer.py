"""Inference: resize/pad geometry, flip averaging, reference upsampling, stride-4 mapping, batching.

docs/method.md §8.
"""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simplepose import infer
from simplepose.infer import InferConfig, ScaleInput
from simplepose.model import IMHN
from simplepose.skeleton import FLIP_CHANNEL_ORDER, KEYPOINT_START, coco_to_reference

SMALL = InferConfig(boxsize=64, scales=(0.5, 1.0, 1.5))  # small inputs keep the CPU forward fast


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = IMHN(stacks=1, width=32, increase=8).eval()
    for module in model.modules():  # non-trivial BN statistics so that a wrong batch mode would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


class ConvModel(torch.nn.Module):
    """Stride-4 average pooling then one 3x3 conv with 50 outputs; the IMHN output structure (1 stack)."""

    def __init__(self, kernels: torch.Tensor):
        super().__init__()
        self.kernels = torch.nn.Parameter(kernels)

    def forward(self, x):
        out = F.conv2d(F.avg_pool2d(x, 4), self.kernels, padding=1)
        return [[out] + [F.avg_pool2d(out, 2 ** s) for s in range(1, 5)]]


class ConstantModel(torch.nn.Module):
    """Returns the same stride-4 maps for every input (the input only sets the size)."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = torch.nn.Parameter(maps)

    def forward(self, x):
        n, _, h, w = x.shape
        return [[self.maps[None, :, :h // 4, :w // 4].expand(n, -1, -1, -1)]]


# --- preprocess ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, expected_width", [(157, 78), (159, 80), (161, 80)])
def test_preprocess_rounds_half_to_even_and_pads_bottom_right(width, expected_width):
    image = _image(128, width)
    (item,) = infer.preprocess(image, InferConfig(boxsize=64, scales=(1.0,)))  # factor 0.5: w/2 ends in .5
    assert item.factor == 0.5 and item.image_size == (128, width)
    assert item.resized_shape == (64, expected_width)
    assert item.image.shape == (64, 128, 3) and item.image.dtype == np.uint8
    resized = cv2.resize(image, (0, 0), fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(item.image[:, :expected_width], resized)
    assert (item.image[:, expected_width:] == 128).all()


def test_preprocess_all_scales_geometry():
    image = _image(100, 157)
    inputs = infer.preprocess(image, InferConfig(boxsize=128, scales=(0.5, 1.0, 2.0)))
    for item, scale in zip(inputs, (0.5, 1.0, 2.0)):
        factor = scale * 128 / 100
        assert item.factor == pytest.approx(factor)
        rh, rw = item.resized_shape
        assert (rh, rw) == (round(100 * factor), round(157 * factor))
        assert item.image.shape[0] % 64 == 0 and item.image.shape[1] % 64 == 0
        assert item.image.shape[0] - rh < 64 and item.image.shape[1] - rw < 64
        assert (item.image[rh:] == 128).all() and (item.image[:, rw:] == 128).all()


def test_size_caps_and_coinciding_factors_are_kept():
    config = InferConfig(boxsize=64, scales=(1.0, 2.0, 3.0), max_height=100, max_width=120)
    inputs = infer.preprocess(_image(20, 40), config)
    assert [item.factor for item in inputs] == [3.0, 3.0, 3.0]  # 64/20 * 40 > 120: min(100/20, 120/40)
    assert all(item.resized_shape == (60, 120) for item in inputs)
    assert infer.PAPER.factor(3.0, 10, 40) == 95.0  # the paper caps: min(2600/10, 3800/40)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((10, 10, 3), np.float32), TypeError),
    (np.zeros((10, 10), np.uint8), ValueError),
    (np.zeros((10, 10, 4), np.uint8), ValueError),
    (np.zeros((0, 10, 3), np.uint8), ValueError),
    (np.zeros((3000, 1, 3), np.uint8), ValueError),  # 1 pixel wide: 0 pixels at scale 0.5
    ([[1, 2, 3]], TypeError),
])
def test_preprocess_rejects_bad_images(bad, error):
    with pytest.raises(error, match="preprocess"):
        infer.preprocess(bad, SMALL)


def test_presets_set_the_network_inputs_and_maps():
    """A 320 x 480 image under each preset: the paper's five scales of a 512 box (the default config), HEAD's and
    the labeling job's one 640 box, FAST's one 512 box; the stride-4 presets give maps whose cell j is pixel
    (4j + 1.5 + 0.5) / factor - 0.5 of the image."""
    image = _image(320, 480)
    expected = {infer.PAPER: [256, 512, 768, 1024, 1536], infer.HEAD: [640], infer.FAST: [512],
                infer.LABELING: [640]}
    assert infer.PRESETS["paper"] == InferConfig() and infer.PRESETS["head"] == infer.HEAD
    for config, heights in expected.items():
        inputs = infer.preprocess(image, config)
        assert [item.resized_shape for item in inputs] == [(h, h * 3 // 2) for h in heights]
    for config, factor in ((infer.FAST, 1.6), (infer.LABELING, 2.0)):
        (item,) = infer.preprocess(image, config)
        maps = torch.zeros(48, item.image.shape[0] // 4, item.image.shape[1] // 4)
        heat = infer.aggregate([item], [maps], config)
        assert heat.image_size == (320, 480)
        assert heat.map_to_image == pytest.approx((4 / factor, 4 / factor, 2 / factor - 0.5, 2 / factor - 0.5))
    for bad in ({"aggregation": "max"}, {"scales": ()}, {"scales": (0,)}, {"pad_value": 300}, {"multiple": 30}):
        with pytest.raises(ValueError, match="InferConfig"):
            InferConfig(**bad)


# --- flip averaging ------------------------------------------------------------------------------------

def test_flip_equivariant_model_gives_the_same_maps_with_and_without_flip():
    kernels = torch.randn(50, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    order = list(FLIP_CHANNEL_ORDER)
    assert [order[c] for c in order] == list(range(50))  # an involution, so the symmetrised kernels are exact
    kernels = (kernels + kernels[order].flip(-1)) / 2  # hflip(K[c]) == K[order[c]]: exactly flip-equivariant
    model = ConvModel(kernels).eval()
    inputs = infer.preprocess(_image(90, 150), SMALL)
    with_flip = infer.forward_maps(model, inputs, SMALL)
    no_flip = InferConfig(boxsize=64, scales=SMALL.scales, flip=False)
    without = infer.forward_maps(model, inputs, no_flip)
    for a, b in zip(with_flip, without):
        assert a.shape == b.shape == (50, a.shape[1], a.shape[2])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    asymmetric = ConvModel(torch.randn(50, 3, 3, 3)).eval()  # the test can fail: a generic model differs
    assert not torch.allclose(infer.forward_maps(asymmetric, inputs[:1], SMALL)[0],
                              infer.forward_maps(asymmetric, inputs[:1], no_flip)[0], atol=1e-3)


def test_bright_channel_moves_to_its_mirror_channel():
    maps = torch.zeros(50, 16, 16)
    rsho = KEYPOINT_START + 2  # right shoulder; its mirror is the left shoulder (reference keypoint 5)
    maps[rsho, 3, 2] = 1.0
    maps[9, 5, 1] = 1.0  # limb 9 neck->Rsho mirrors to limb 12 neck->Lsho
    item = ScaleInput(np.full((64, 64, 3), 128, np.uint8), 1.0, (64, 64), (64, 64))
    (out,) = infer.forward_maps(ConstantModel(maps).eval(), [item], InferConfig())
    assert out[rsho, 3, 2] == 0.5 and out[KEYPOINT_START + 5, 3, 13] == 0.5  # column 2 mirrors to 15 - 2
    assert out[9, 5, 1] == 0.5 and out[12, 5, 14] == 0.5
    assert out.sum() == 2.0


# --- reference upsampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("resized_shape, image_size", [((50, 70), (50, 70)), ((50, 70), (97, 131)),
                                                       ((61, 33), (30, 17))])
def test_upsample_reference_equals_per_channel_opencv(resized_shape, image_size):
    maps = np.random.default_rng(2).normal(size=(48, 16, 20)).astype(np.float32)
    got = infer.upsample_reference(maps, resized_shape, image_size)
    (rh, rw), (height, width) = resized_shape, image_size
    for c in (0, 17, 47):
        up = cv2.resize(maps[c], (0, 0), fx=4, fy=4, interpolation=cv2.INTER_CUBIC)[:rh, :rw]
        want = cv2.resize(up, (width, height), interpolation=cv2.INTER_CUBIC) if (rh, rw) != image_size else up
        np.testing.assert_allclose(got[c], want, atol=1e-5)
    assert got.shape == (48, height, width) and got.dtype == np.float32
    spike = np.zeros((48, 16, 20), np.float32)
    spike[:, 5, 5] = 1.0
    assert infer.upsample_reference(spike, resized_shape, image_size).min() < 0  # no clamping of the overshoot


def test_upsample_reference_rejects_bad_maps():
    with pytest.raises(ValueError, match="upsample_reference"):
        infer.upsample_reference(np.zeros((16, 20), np.float32), (10, 10), (10, 10))
    with pytest.raises(ValueError, match="upsample_reference"):
        infer.upsample_reference(np.zeros((48, 16, 20), np.float32), (70, 10), (10, 10))


def test_reference_aggregation_equals_the_step_by_step_pipeline(tiny_model):
    image = _image(70, 110)
    (heat,) = infer.predict_heatmaps(tiny_model, [image], SMALL)
    total = np.zeros((48, 70, 110), np.float32)
    for item in infer.preprocess(image, SMALL):
        x = torch.from_numpy(item.image).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            out = tiny_model(torch.cat([x, x.flip(-1)]))[-1][0]
        avg = ((out[0] + out[1].flip(-1)[list(FLIP_CHANNEL_ORDER)]) / 2).numpy()
        rh, rw = item.resized_shape
        up = cv2.resize(avg[:48].transpose(1, 2, 0), (0, 0), fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
        total += cv2.resize(up[:rh, :rw], (110, 70), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
    total /= len(SMALL.scales)
    assert heat.map_to_image == (1.0, 1.0, 0.0, 0.0) and heat.image_size == (70, 110)
    np.testing.assert_allclose(heat.limbs.numpy(), total[:30], atol=1e-5)
    np.testing.assert_allclose(heat.keypoints.numpy(), total[30:48], atol=1e-5)


# --- stride-4 grid -------------------------------------------------------------------------------------

def _gaussian_scale_maps(px, py, item, sigma_px=6.0):
    """Stride-4 maps of one scale input with a Gaussian at original pixel (px, py) on every channel."""
    h4, w4 = item.image.shape[0] // 4, item.image.shape[1] // 4
    f = item.factor
    cx = ((px + 0.5) * f - 0.5 - 1.5) / 4  # original pixel -> resized pixel -> stride-4 cell
    cy = ((py + 0.5) * f - 0.5 - 1.5) / 4
    s = sigma_px * f / 4
    ys, xs = torch.meshgrid(torch.arange(h4, dtype=torch.float64), torch.arange(w4, dtype=torch.float64),
                            indexing="ij")
    g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * s ** 2)).float()
    return g[None].expand(48, -1, -1).clone()


def _refined_peak(m: torch.Tensor):
    """Argmax refined by a parabola through log values (exact for a sampled Gaussian)."""
    m = m.double().clamp_min(1e-12).log()
    i, j = divmod(int(m.argmax()), m.shape[1])
    dx = (m[i, j - 1] - m[i, j + 1]) / (2 * (m[i, j - 1] - 2 * m[i, j] + m[i, j + 1]))
    dy = (m[i - 1, j] - m[i + 1, j]) / (2 * (m[i - 1, j] - 2 * m[i, j] + m[i + 1, j]))
    return j + float(dx), i + float(dy)


@pytest.mark.parametrize("size, peak", [((120, 200), (77.3, 41.8)), ((200, 90), (50.6, 133.2)),
                                        ((97, 97), (30.0, 60.5))])
@pytest.mark.parametrize("scales", [(1.0,), (0.5,), (1.5,), (2.0,), (0.5, 1.0, 1.5, 2.0)])
def test_stride4_grid_puts_a_peak_at_the_right_original_pixel(size, peak, scales):
    config = InferConfig(boxsize=96, scales=scales, aggregation="stride4")
    inputs = infer.preprocess(np.zeros((*size, 3), np.uint8), config)
    sigma = 8 / min(item.factor for item in inputs)  # >= 2 cells at every scale: smooth enough for bicubic
    heat = infer.aggregate(inputs, [_gaussian_scale_maps(*peak, item, sigma) for item in inputs], config)
    base = config.factor(1.0, *size)
    assert heat.keypoints.shape[1:] == (math.ceil(round(size[0] * base) / 4), math.ceil(round(size[1] * base) / 4))
    assert heat.map_to_image == pytest.approx((4 / base, 4 / base, 2 / base - 0.5, 2 / base - 0.5))
    x, y = heat.to_image(*_refined_peak(heat.keypoints[3]))
    assert abs(x - peak[0]) < 0.5 and abs(y - peak[1]) < 0.5, (x, y)
    # The whole map equals the same Gaussian drawn on the base grid directly (a quarter-cell shift gives > 0.05).
    (base_input,) = infer.preprocess(np.zeros((*size, 3), np.uint8), InferConfig(boxsize=96, scales=(1.0,)))
    want = _gaussian_scale_maps(*peak, base_input, sigma)[:30, :heat.limbs.shape[1], :heat.limbs.shape[2]]
    torch.testing.assert_close(heat.limbs, want, atol=0.045, rtol=0)


def test_heatmaps_from_stride4_crops_and_maps_cells():
    maps = torch.arange(50 * 20 * 30, dtype=torch.float32).reshape(50, 20, 30)
    heat = infer.heatmaps_from_stride4(maps, 1.0, (75, 110))  # ceil(75/4) x ceil(110/4) cells
    assert heat.keypoints.shape == (18, 19, 28) and heat.limbs.shape == (30, 19, 28)
    torch.testing.assert_close(heat.keypoints, maps[30:48, :19, :28])
    x, y = heat.to_image(np.array([0.0, 2.0]), 1.0)
    assert x.tolist() == [1.5, 9.5] and y == 5.5  # cell j is pixel 4j + 1.5
    with pytest.raises(ValueError, match="heatmaps_from_stride4"):
        infer.heatmaps_from_stride4(maps[:, :10], 1.0, (75, 110))
    with pytest.raises(ValueError, match="heatmaps_from_stride4"):
        infer.heatmaps_from_stride4(maps[:47], 1.0, (75, 110))


def test_stride4_mapping_on_the_reference_ground_truth_maps(fixtures_dir, coco_mini_annotations):
    """The oracle maps are the authors' stride-4 targets of whole images: their refined keypoint peaks, mapped
    with `heatmaps_from_stride4(factor 1)`, land on the annotated keypoints; `upsample_reference` with
    resized_shape == image_size is exactly the oracle's x4 + crop."""
    maps = np.load(fixtures_dir / "oracle_train_maps.npz")
    gt = json.loads(coco_mini_annotations.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    errors = []
    for key in maps.files[:8]:
        image_id, m = int(key[3:]), maps[key].astype(np.float32)
        heat = infer.heatmaps_from_stride4(torch.from_numpy(m), 1.0, sizes[image_id])
        annotations = [a["keypoints"] for a in gt["annotations"]
                       if a["image_id"] == image_id and not a["iscrowd"] and a["num_keypoints"] > 0]
        keypoints = coco_to_reference(np.array(annotations).reshape(-1, 17, 3))
        for k in range(18):
            i, j = divmod(int(heat.keypoints[k].argmax()), heat.keypoints.shape[2])
            used = keypoints[:, k, 2] < 2
            interior = 0 < i < heat.keypoints.shape[1] - 1 and 0 < j < heat.keypoints.shape[2] - 1
            if heat.keypoints[k, i, j] < 0.5 or not used.any() or not interior:
                continue
            x, y = heat.to_image(*_refined_peak(heat.keypoints[k]))
            errors.append(np.hypot(keypoints[used, k, 0] - x, keypoints[used, k, 1] - y).min())
    assert len(errors) > 20 and max(errors) < 0.05, errors
    h, w = sizes[int(maps.files[0][3:])]
    m = maps[maps.files[0]].astype(np.float32)
    want = cv2.resize(m.transpose(1, 2, 0), (0, 0), fx=4, fy=4, interpolation=cv2.INTER_CUBIC)[:h, :w]
    np.testing.assert_array_equal(infer.upsample_reference(m, (h, w), (h, w)), want.transpose(2, 0, 1))


# --- batching, devices, errors -------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["reference", "stride4"])
def test_batched_images_of_different_sizes_equal_one_by_one(tiny_model, aggregation):
    config = InferConfig(boxsize=64, scales=(1.0, 2.0), aggregation=aggregation)
    images = [_image(64, 100, 1), _image(80, 60, 2), _image(64, 90, 3)]  # 1 and 3 share padded shapes
    batched = infer.predict_heatmaps(tiny_model, images, config, batch_size=3)
    for image, got in zip(images, batched):
        (alone,) = infer.predict_heatmaps(tiny_model, [image], config, batch_size=1)
        assert got.map_to_image == alone.map_to_image and got.image_size == alone.image_size
        torch.testing.assert_close(got.keypoints, alone.keypoints, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.limbs, alone.limbs, atol=2e-5, rtol=1e-4)


def test_bfloat16_autocast_on_cpu_is_close_to_float32(tiny_model):
    image = _image(64, 64)
    config = InferConfig(boxsize=64, scales=(1.0,), aggregation="stride4")
    (full,) = infer.predict_heatmaps(tiny_model, [image], config)
    model = infer.prepare_model(IMHN(stacks=1, width=32, increase=8).train(), "cpu", channels_last=True)
    model.load_state_dict(tiny_model.state_dict())
    assert not model.training
    (half,) = infer.predict_heatmaps(model, [image], config, "cpu", dtype=torch.bfloat16, channels_last=True)
    assert half.keypoints.dtype == torch.float32
    assert (half.keypoints - full.keypoints).abs().max() < 0.05 * full.keypoints.abs().max()


def test_forward_errors_name_the_problem(tiny_model):
    item = infer.preprocess(_image(64, 64), InferConfig(boxsize=64, scales=(1.0,)))[0]
    with pytest.raises(ValueError, match="float16 not supported on cpu"):
        infer.forward_maps(tiny_model, [item], dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 64"):
        infer.forward_maps(tiny_model, [ScaleInput(item.image[:40], 1.0, (40, 64), (40, 64))])
    with pytest.raises(ValueError, match="training mode"):
        infer.forward_maps(IMHN(stacks=1, width=32, increase=8).train(), [item])
    with pytest.raises(ValueError, match="image 1: preprocess"):
        infer.predict_heatmaps(tiny_model, [_image(64, 64), np.zeros((5, 5), np.uint8)], SMALL)
    with pytest.raises(ValueError, match="prepare_model"):
        infer.predict_heatmaps(tiny_model, [_image(64, 64)], SMALL, device="cuda")
    with pytest.raises(TypeError, match="Heatmaps"):
        infer.Heatmaps(torch.zeros(18, 4, 4, dtype=torch.float64), torch.zeros(30, 4, 4), (1, 1, 0, 0), (4, 4))
