"""The labeling network stage's engine "onnxruntime" against its engine "torch" on real photos (coco-mini,
the shipped tiny weights): the same forwards, maps within 1e-4 relative, the same candidates; the options it
cannot honour are refused with one clear line. Stages are called on dict batches, no Ray."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the extra simplepose[onnx] is not installed")

from pipelines.label.stages import (  # noqa: E402
    DecodeStage, NetworkStage, check_engine, read_objects_batch, unpack_inputs)
from simplepose.decode import DecoderConfig  # noqa: E402
from simplepose.infer import InferConfig, predict_inputs  # noqa: E402

WEIGHTS = str(Path(__file__).resolve().parents[1] / "jobs" / "weights" / "imhn-tiny-stickfigures.pt")
MODES = {  # small boxsizes keep the CPU forwards short; each still gives several padded shapes
    "default": (InferConfig(boxsize=128, scales=(1.0,), aggregation="stride4"), DecoderConfig()),
    "reference": (InferConfig(boxsize=96, scales=(1.0, 1.5), aggregation="reference"), DecoderConfig(mode="reference")),
}
MAPS_RTOL = 1e-4  # max |onnxruntime - torch| / max |torch| of the flip- and scale-averaged maps
XY_ATOL = 1e-2  # pixels: sub-pixel refinement divides small differences of neighbouring cells
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def photos(coco_mini):
    """Eight coco-mini photos as the read stage's output."""
    uris = np.array([str(p) for p in sorted((coco_mini / "train2017").glob("*.jpg"))[:8]], dtype=object)
    return read_objects_batch({"input_index": np.arange(len(uris)), "image_id": uris, "uri": uris}, retries=0)


def _relative_error(got, expected) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("mode", MODES)
def test_onnxruntime_engine_gives_the_torch_engines_maps_and_candidates(photos, mode):
    infer_config, decoder_config = MODES[mode]
    batch = DecodeStage(infer_config, max_pixels=50_000_000)(photos)
    scales = len(infer_config.scales)
    stages = {engine: NetworkStage(WEIGHTS, infer_config, decoder_config, forward_batch_size=2, engine=engine)
              for engine in ("torch", "onnxruntime")}
    outs = {engine: stage(batch) for engine, stage in stages.items()}

    # Only equal padded shapes share a forward, in groups of up to forward_batch_size: the same grouping.
    shapes = [tuple(batch[f"pixels_{s}"][i].shape for s in range(scales)) for i in range(len(batch["uri"]))]
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    assert len(groups) > 1 and max(map(len, groups.values())) > 2  # several shapes, one split over forwards
    shared = np.zeros(len(shapes), int)
    for members in groups.values():
        for k in range(0, len(members), 2):
            shared[members[k:k + 2]] = len(members[k:k + 2])
    for out in outs.values():
        assert out["status"].tolist() == ["ok"] * len(shapes) and out["forward_batch"].tolist() == shared.tolist()
    assert (stages["onnxruntime"].forwards, stages["onnxruntime"].images_forwarded) == \
        (stages["torch"].forwards, stages["torch"].images_forwarded)

    prepared = unpack_inputs(batch, range(len(shapes)), scales)
    maps = {engine: predict_inputs(stage.model, prepared, infer_config, device="cpu")
            for engine, stage in stages.items()}
    for got, expected in zip(maps["onnxruntime"], maps["torch"]):
        assert got.map_to_image == expected.map_to_image and got.keypoints.shape == expected.keypoints.shape
        assert _relative_error(got.keypoints, expected.keypoints) <= MAPS_RTOL
        assert _relative_error(got.limbs, expected.limbs) <= MAPS_RTOL

    for got, expected in zip(outs["onnxruntime"]["candidates"], outs["torch"]["candidates"]):
        got, expected = pickle.loads(got), pickle.loads(expected)
        assert len(expected.types) > 0 and np.array_equal(got.types, expected.types)
        np.testing.assert_allclose(got.xy, expected.xy, rtol=0, atol=XY_ATOL)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_ATOL)
        for name in ("pair_limbs", "pair_a", "pair_b"):
            assert np.array_equal(getattr(got, name), getattr(expected, name))
        np.testing.assert_allclose(got.pair_scores, expected.pair_scores, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp16"}, "float32 only, not precision 'fp16'"),
    ({"precision": "bf16"}, "float32 only"),
    ({"device": "cuda"}, "CPU nodes only"),
    ({"channels_last": True}, "no channels_last or compile"),
    ({"compile": True}, "no channels_last or compile"),
])
def test_options_onnxruntime_cannot_honour_are_refused(options, message):
    infer_config, decoder_config = MODES["default"]
    with pytest.raises(ValueError, match=message):
        NetworkStage(WEIGHTS, infer_config, decoder_config, engine="onnxruntime", **options)
    check_engine("onnxruntime", "auto", "auto")  # what a job checks before it resolves the device
    check_engine("torch", "cuda", "fp16", channels_last=True, compile=True)
    with pytest.raises(ValueError, match="not in"):
        check_engine("tensorrt", "cpu", "auto")


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ImportError) as raised:
        check_engine("onnxruntime", "cpu", "fp32")
    assert "pip install 'simplepose[onnx]'" in str(raised.value) and "\n" not in str(raised.value)
