"""simplepose.onnx_export / `simplepose export-model`: the inference forward as ONNX, checked in onnxruntime
against torch on the reference s2i16 weights at two input sizes and batch sizes (the axes really are dynamic)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the extra simplepose[onnx] is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the extra simplepose[onnx] is not installed")

from jobs import cli  # noqa: E402
from simplepose.checkpoint import load_model, save_checkpoint  # noqa: E402
from simplepose.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, InferenceForward, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def s2i16(fixtures_dir):
    weights = np.load(fixtures_dir / "imhn_ref_s2i16_weights.npz")
    buffer = io.BytesIO()
    torch.save({"weights": {k: torch.from_numpy(v) for k, v in weights.items()}, "epoch": 52}, buffer)
    buffer.seek(0)
    return load_model(buffer)


@pytest.fixture(scope="module")
def exported(s2i16, tmp_path_factory):
    """The s2i16 model saved as our checkpoint and exported with the command (which checks it once)."""
    folder = tmp_path_factory.mktemp("onnx")
    save_checkpoint(s2i16, folder / "s2i16.pt", metadata={"name": "s2i16", "version": "ref"})
    assert cli.main(["export-model", str(folder / "s2i16.pt"), str(folder / "s2i16.onnx")]) == 0
    return folder / "s2i16.onnx"


def test_graph_has_one_dynamic_input_and_the_inference_output(exported, s2i16):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims[0][1] == 3 and dims[1][1] == 50
    assert all(isinstance(d, str) and d for d in dims[0][::2] + dims[0][3:] + dims[1][::2] + dims[1][3:])
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    meta = read_metadata(proto)
    assert meta["config"] == {"stacks": 2, "width": 256, "increase": 16, "outputs": 50}
    assert meta["checkpoint"] == {"name": "s2i16", "version": "ref"} and "multiples of 64" in meta["input"]
    assert not s2i16.training  # the export leaves the model's mode as it was


@pytest.mark.parametrize("shape", [(1, 3, 128, 128), (3, 3, 192, 256)])
def test_onnxruntime_matches_torch(exported, s2i16, fixtures_dir, shape):
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    if shape == (1, 3, 128, 128):  # the recorded input of the authors' network
        x = torch.from_numpy(np.load(fixtures_dir / "imhn_ref_s2i16_io.npz")["input_nhwc"]).permute(0, 3, 1, 2)
    else:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    x = x.contiguous()
    with torch.inference_mode():
        expected = InferenceForward(s2i16)(x).numpy()
        assert np.array_equal(expected, s2i16(x)[-1][0].numpy())  # what simplepose.infer.forward_maps uses
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    assert got.shape == (shape[0], 50, shape[2] // 4, shape[3] // 4) == expected.shape
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"relative error {error:.2e}"
    if shape[0] == 1:
        recorded = np.load(fixtures_dir / "imhn_ref_s2i16_io.npz")["out_stack1_scale0"]
        assert np.abs(got - recorded).max() / np.abs(recorded).max() <= 1e-4


def test_export_model_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["export-model", str(tmp_path / "missing.pt"), str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "CHECKPOINT" in err and "missing.pt" in err and "Traceback" not in err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["export-model", str(tmp_path / "bad.pt"), str(tmp_path / "m.onnx")]) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_bench_onnx_prints_both_engines(capsys):
    assert cli.main(["bench", "onnx", "--models", "tiny", "--height", "128", "--widths", "192", "--batches", "2",
                     "--threads", "1", "--min-time", "0", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "onnxruntime" in out
    assert "tiny      128x192 batch 2 threads 1: torch" in out and "onnxruntime/torch" in out and "summary" in out


def test_bench_onnx_stage_prints_both_engines(capsys, coco_mini):
    assert cli.main(["bench", "onnx", "--stage", "--models", "tiny", "--boxsize", "64", "--stage-images", "3",
                     "--stage-reps", "1", "--threads", "1", "--shared", str(coco_mini.parents[1])]) == 0
    out = capsys.readouterr().out
    assert "tiny     torch       :" in out and "tiny     onnxruntime :" in out and "CPU ms per image" in out
    assert "the same candidate types on 3/3 photos" in out
