"""IMHN: released size, parity with the authors' network, shapes, precision, bad input (key layout: test_checkpoint)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from simplepose.checkpoint import load_model
from simplepose.model import IMHN, IMHNConfig

TINY = dict(stacks=2, width=32, increase=8)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_released_config_parameter_count_and_parts():
    with torch.device("meta"):
        model = IMHN()
    assert model.config == IMHNConfig(4, 256, 128, 50)
    assert count(model) == 128_998_760
    # docs/method.md §5.5, by module
    assert [count(getattr(model, name)) for name in
            ("pre", "hourglass", "features", "outs", "merge_features", "merge_preds")] == [
        1_007_680, 89_774_080, 35_579_200, 257_000, 1_981_440, 399_360]
    assert sum(b.numel() for b in model.buffers()) == 208_032


def test_parity_with_reference_network(fixtures_dir):
    """The authors' PoseNet(nstack=2, inp_dim=256, increase=16), loaded from their file format (docs/method.md §5)."""
    weights = np.load(fixtures_dir / "imhn_ref_s2i16_weights.npz")
    recorded = np.load(fixtures_dir / "imhn_ref_s2i16_io.npz")
    buffer = io.BytesIO()
    torch.save({"weights": {k: torch.from_numpy(v) for k, v in weights.items()}, "epoch": 52}, buffer)
    buffer.seek(0)
    model = load_model(buffer)
    assert model.config == IMHNConfig(2, 256, 16, 50) and not model.training
    image = torch.from_numpy(recorded["input_nhwc"]).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        outputs = model(image)
    assert len(outputs) == 2 and all(len(stack) == 5 for stack in outputs)
    for i in range(2):
        for j in range(5):
            ref = recorded[f"out_stack{i}_scale{j}"]
            ours = outputs[i][j].numpy()
            assert ours.shape == ref.shape
            error = np.abs(ours - ref).max() / np.abs(ref).max()
            assert error <= 1e-4, f"stack {i} scale {j}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = IMHN(**TINY)
    for module in model.modules():  # give the BNs non-trivial statistics so layout bugs show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def test_output_shapes_highest_resolution_first(tiny_model):
    with torch.inference_mode():
        out = tiny_model(torch.rand(2, 3, 64, 128))
    assert [[tuple(t.shape) for t in stack] for stack in out] == [
        [(2, 50, 16, 32), (2, 50, 8, 16), (2, 50, 4, 8), (2, 50, 2, 4), (2, 50, 1, 2)]] * 2


def test_channels_last_and_bf16_autocast_match_fp32(tiny_model):
    image = torch.rand(1, 3, 128, 64)
    with torch.inference_mode():
        reference = tiny_model(image)
        last = tiny_model.to(memory_format=torch.channels_last)(image.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = tiny_model(image)
    tiny_model.to(memory_format=torch.contiguous_format)
    for ref, cl, bf in zip(sum(reference, []), sum(last, []), sum(half, [])):
        scale = ref.abs().max()
        assert torch.allclose(cl, ref, atol=1e-5 * scale, rtol=0)
        assert bf.dtype == torch.bfloat16
        assert (bf.float() - ref).abs().max() <= 0.1 * scale  # bf16 keeps 8 bits of mantissa


def test_training_updates_first_merge_statistics_twice():
    """The reference runs merge_preds[i][0] and merge_features[i][0] twice per stage (docs/method.md §5.4)."""
    model = IMHN(**TINY).train()
    model(torch.rand(2, 3, 64, 64))
    assert model.merge_preds[0][0].conv.bn.num_batches_tracked.item() == 2
    assert model.merge_features[0][0].conv.bn.num_batches_tracked.item() == 2
    assert model.merge_preds[0][1].conv.bn.num_batches_tracked.item() == 1


def test_training_init():
    torch.manual_seed(0)
    model = IMHN(**TINY)
    conv = model.hourglass[0].hg[0][1].convBlock[3].weight
    assert 0.0008 < conv.std().item() < 0.0012
    linear = model.features[0].before_regress[0][2].fc[0]
    assert 0.006 < linear.weight.std().item() < 0.014 and linear.bias.abs().max() == 0
    assert model.outs[0][0].conv.bias.abs().max() == 0
    bn = model.pre.bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(1, 3, 64, 96), ValueError, "multiples of 64"),
    (torch.rand(1, 3, 0, 64), ValueError, "multiples of 64"),
    (torch.rand(1, 4, 64, 64), ValueError, r"\(N, 3, H, W\)"),
    (torch.rand(3, 64, 64), ValueError, r"\(N, 3, H, W\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "float"),
    (np.zeros((1, 3, 64, 64), np.float32), TypeError, "torch.Tensor"),
])
def test_bad_input_is_refused(tiny_model, bad, error, match):
    with pytest.raises(error, match=match):
        tiny_model(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stacks=0), "stacks"), (dict(width=40), "width"), (dict(increase=3), "increase"),
    (dict(outputs=0), "outputs"), (dict(stacks=2.0), "int"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IMHNConfig(**kwargs)


def test_from_config_builds_that_network():
    """`from_config` builds the configured architecture: the same modules and shapes as the keyword
    constructor (a strict state-dict load), `stacks` outputs of `outputs` channels; another config does not fit."""
    config = IMHNConfig(**TINY)
    model = IMHN.from_config(config)
    assert model.config == config
    model.load_state_dict(IMHN(**TINY).state_dict())  # strict: every key and shape matches
    with torch.inference_mode():
        out = model.eval()(torch.rand(1, 3, 64, 64))
    assert len(out) == config.stacks and out[-1][0].shape == (1, config.outputs, 16, 16)
    with pytest.raises(RuntimeError, match="size mismatch"):
        IMHN.from_config(IMHNConfig(stacks=2, width=32, increase=16)).load_state_dict(model.state_dict())
    with pytest.raises(TypeError):
        IMHN.from_config(dict(TINY))
