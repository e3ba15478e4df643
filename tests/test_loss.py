"""Loss: the authors' golden values (docs/method.md §13 G6/G6b), every preset, precision and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simplepose.loss import LOSS_PRESETS, LossConfig, heatmap_loss, multitask_loss
from simplepose.model import IMHN


def g6_inputs(mask_kind: str):
    """docs/method.md §13 G6: N = 1, 50 channels, 16x16 targets, 4 stacks of constant predictions 0.1*(i+1)."""
    c, y, x = np.ogrid[:50, :16, :16]
    targets = ((256 * c + 16 * y + x) % 97) / 96.0
    targets[:, ::3, :] = 0
    if mask_kind == "G6":
        mask = np.ones((16, 16))
        mask[:4, :4] = 0
    else:  # G6b exercises the 0.5 threshold of the pooled mask
        mask = ((x[0] + 2 * y[0]) % 5) / 4.0
    predictions = [[torch.full((1, 50, 16 >> j, 16 >> j), 0.1 * (i + 1)) for j in range(5)] for i in range(4)]
    return (predictions, torch.tensor(targets[None], dtype=torch.float32),
            torch.tensor(np.broadcast_to(mask, (1, 1, 16, 16)).copy(), dtype=torch.float32))


@pytest.mark.parametrize("mask_kind, preset, expected", [
    ("G6", "reference", 29.343151),    # MultiTaskLoss, focal (HEAD)
    ("G6", "parallel_l2", 24.125593),  # MultiTaskLossParallel
    ("G6b", "reference", 12.999322),
    ("G6b", "parallel_l2", 12.751017),
    ("G6", "l2", 40.935466),           # regression value, derived independently below
])
def test_golden_values(mask_kind, preset, expected):
    total, per_scale = multitask_loss(*g6_inputs(mask_kind), LossConfig.preset(preset))
    assert total.dtype == torch.float32 and total.ndim == 0
    assert total.item() == pytest.approx(expected, rel=1e-5)
    weights = LOSS_PRESETS[preset].scale_weights
    assert sum(w * v for w, v in zip(weights, per_scale)) / sum(weights) == pytest.approx(total.item(), rel=1e-6)


def test_plain_l2_hand_check():
    """The 'l2' value of G6 recomputed in float64 numpy from docs/method.md §6 and §3.6 alone: block means for the
    targets; for the mask, bilinear downsampling by 2^k averages the central 2x2 of each block, then < 0.5 -> 0."""
    predictions, targets, mask = g6_inputs("G6")
    g, m = targets[0].double().numpy(), mask[0, 0].double().numpy()
    w = np.ones(50)
    w[30:48], w[48] = 3.0, 0.1
    scale_weights = [0.1, 0.2, 0.4, 1.6, 6.4]
    total = 0.0
    for j, sw in enumerate(scale_weights):
        f, s = 2 ** j, 16 >> j
        g_j = g.reshape(50, s, f, s, f).mean(axis=(2, 4))
        centre = slice(max(f // 2 - 1, 0), f // 2 + 1)
        m_j = m.reshape(s, f, s, f)[:, centre, :, centre].mean(axis=(1, 3))
        m_j[m_j < 0.5] = 0
        stacks = [(((0.1 * (i + 1) - g_j) ** 2) * m_j * w[:, None, None]).sum() for i in range(4)]
        total += sw * np.mean(stacks)
    total /= sum(scale_weights)
    assert total == pytest.approx(40.935466, rel=1e-7)
    assert multitask_loss(predictions, targets, mask, LossConfig.preset("l2"))[0].item() == pytest.approx(
        total, rel=1e-6)


def test_focal_factors_by_hand():
    """One cell per case: reference |1 - s_t| and the paper's (1 - s_t)^2 with alpha 0.1, beta 0.02."""
    p = torch.tensor([0.5, 0.3]).view(1, 2, 1, 1)
    g = torch.tensor([0.2, 0.005]).view(1, 2, 1, 1)  # foreground (>= 0.01), background
    ones, w = torch.ones(1, 1, 1, 1), torch.ones(2)
    reference = heatmap_loss(p, g, ones, w, LossConfig())
    assert reference.item() == pytest.approx(0.09 * 0.5 + 0.295 ** 2 * 0.3, rel=1e-6)
    paper = heatmap_loss(p, g, ones, w, LossConfig.preset("paper"))
    assert paper.item() == pytest.approx(0.09 * 0.6 ** 2 + 0.295 ** 2 * 0.32 ** 2, rel=1e-6)
    plain = heatmap_loss(p, g, ones, torch.tensor([3.0, 0.1]), LossConfig.preset("l2"))
    assert plain.item() == pytest.approx(0.09 * 3 + 0.295 ** 2 * 0.1, rel=1e-6)


def test_presets():
    assert LossConfig.preset("reference") == LossConfig()
    assert LossConfig.preset("paper", keypoint_weight=1.0).focal_gamma == 2.0
    weights = LossConfig().channel_weights()
    assert weights[:30].eq(1).all() and weights[30:48].eq(3).all() and weights[48] == pytest.approx(0.1)
    assert weights[49] == 1
    with pytest.raises(ValueError, match="unknown loss preset"):
        LossConfig.preset("focal")
    assert LossConfig(scale_weights=[1, 2, 3, 4, 5]).scale_weights == (1.0, 2.0, 3.0, 4.0, 5.0)


def test_batch_division_and_stack_weights():
    predictions, targets, mask = g6_inputs("G6")
    double = [[torch.cat([p, p]) for p in stack] for stack in predictions]
    one = multitask_loss(predictions, targets, mask)[0]
    two = multitask_loss(double, torch.cat([targets, targets]), torch.cat([mask, mask]))[0]
    assert two.item() == pytest.approx(one.item(), rel=1e-6)  # sum over the batch, divided by N
    last_only = LossConfig(stack_weights=(0, 0, 0, 1))
    alone = multitask_loss(predictions[3:], targets, mask, LossConfig(stack_weights=(1,)))[0]
    assert multitask_loss(predictions, targets, mask, last_only)[0].item() == pytest.approx(alone.item())


def test_gradients_under_bf16_autocast():
    model = IMHN(stacks=1, width=16, increase=8).train()
    image = torch.rand(2, 3, 64, 64)
    targets, mask = torch.rand(2, 50, 16, 16), (torch.rand(2, 1, 16, 16) > 0.2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = model(image)
        total, per_scale = multitask_loss(predictions, targets, mask)
    assert predictions[0][0].dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.isfinite(total) and len(per_scale) == 5
    total.backward()
    assert model.outs[0][0].conv.weight.grad is not None and model.outs[0][0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change, match", [
    (lambda p, t, m: (p, t, m[:, :, :8]), "mask must be"),
    (lambda p, t, m: (p, t[:, :49], m), "targets must be"),
    (lambda p, t, m: ([s[:4] for s in p], t, m), "list of 5 scales"),
    (lambda p, t, m: ([s[:1] + [s[1][..., :3]] + s[2:] for s in p], t, m), r"predictions\[0\]\[1\]"),
    (lambda p, t, m: ([], t, m), "non-empty"),
])
def test_bad_input_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        multitask_loss(*change(*g6_inputs("G6")))
    with pytest.raises(ValueError, match="stack_weights"):
        multitask_loss(*g6_inputs("G6"), LossConfig(stack_weights=(1.0, 1.0)))
