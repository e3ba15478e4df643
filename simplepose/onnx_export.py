"""The IMHN as an ONNX graph for onnxruntime: exactly the forward that inference uses.

What is exported: `simplepose.infer.forward_maps` (and so the labeling job and `simplepose.Predictor`) uses
only `model(x)[-1][0]`, the last stack's stride-4 output; the other stacks and scales feed the training loss
only. The graph therefore has one input and one output:

- input `image`: float32 (N, 3, H, W), BGR / 255, no mean or std (`simplepose.model.network_input` of the
  padded uint8 images); N, H and W are dynamic, H and W must be multiples of 64 (`INPUT_MULTIPLE`: the stem's
  stride 4 and the hourglass's 4 halvings; `simplepose.infer` pads to them). Other sizes fail in onnxruntime
  with a shape error in an `Add` node: the graph does not check them itself, the torch model does.
- output `maps`: float32 (N, 50, H/4, W/4), linear (no sigmoid), the 50 channels of `simplepose.skeleton`.

Flip averaging, multi-scale, upsampling and decoding stay outside the graph, as in `forward_maps`.

Opset `OPSET` (17) runs on onnxruntime's CPU provider (any version since 1.13). The export uses torch's
TorchScript-based exporter (`dynamo=False`): with it the dynamic axes need no extra packages, and its graph
matched torch within 4e-6 (relative) on the reference weights; torch 2.13 still ships it (deprecated).
The graph's metadata (`metadata_props`, key `simplepose`) holds the model config, the checkpoint metadata
and these conventions as JSON.

`OnnxNetwork` runs the graph in an onnxruntime CPU session (`onnx_session`) as a drop-in for the torch model
in `forward_maps` (the labeling job's network engine "onnxruntime").

Imports only torch here; the `onnx` and `onnxruntime` packages (extra `simplepose[onnx]`) are imported when
metadata is added and when a session is made.
"""
from __future__ import annotations

import dataclasses
import io
import json
import warnings

import torch
from torch import nn

from simplepose.model import IMHN, INPUT_MULTIPLE
from simplepose.skeleton import NUM_CHANNELS

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "maps"
METADATA_KEY = "simplepose"
ONNX_HINT = "pip install 'simplepose[onnx]'"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAME: {0: "batch", 2: "height_div_4", 3: "width_div_4"}}


class InferenceForward(nn.Module):
    """`model(x)[-1][0]`: the last stack's stride-4 maps, what `simplepose.infer.forward_maps` uses."""

    def __init__(self, model: IMHN):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)[-1][0]


def export_onnx(model: IMHN, metadata: dict | None = None, *, opset: int = OPSET,
                example_size: tuple[int, int] = (2 * INPUT_MULTIPLE, 2 * INPUT_MULTIPLE)) -> bytes:
    """The ONNX file (bytes) of `model`'s inference forward (module docstring), dynamic in batch, height and
    width. `metadata` (e.g. the checkpoint's name and version) goes into the graph's metadata with the model
    config. `example_size` (multiples of 64) is the traced input's size; the graph does not depend on it."""
    if not isinstance(model, IMHN):
        raise TypeError(f"export_onnx needs an IMHN, got {type(model).__name__}")
    height, width = example_size
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or height <= 0 or width <= 0:
        raise ValueError(f"export_onnx: example_size must be positive multiples of {INPUT_MULTIPLE}, got {example_size}")
    was_training = model.training
    forward = InferenceForward(model).eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter's deprecation notice, and tracer warnings about the input checks of
            # IMHN.forward (Python booleans of shapes): they are evaluated once, at trace time, as intended.
            warnings.simplefilter("ignore")
            torch.onnx.export(forward, (torch.zeros(1, 3, height, width),), buffer, dynamo=False,
                              opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=DYNAMIC_AXES, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.EVAL)
    finally:
        model.train(was_training)  # the exporter restores the wrapper's mode, not the model's
    return add_metadata(buffer.getvalue(), {
        "config": dataclasses.asdict(model.config), "checkpoint": dict(metadata or {}), "opset": opset,
        "input": f"{INPUT_NAME}: float32 (N, 3, H, W) BGR / 255, H and W multiples of {INPUT_MULTIPLE}",
        "output": f"{OUTPUT_NAME}: float32 (N, {NUM_CHANNELS}, H/4, W/4), the last stack's stride-4 maps (linear)",
        "cell_centre": "output cell (i, j) stands for input pixel (4j+1.5, 4i+1.5)",
    })


def add_metadata(onnx_bytes: bytes, description: dict) -> bytes:
    """The ONNX file with `description` as JSON under `metadata_props[METADATA_KEY]` (needs the onnx package)."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"exporting to ONNX needs the onnx package: {ONNX_HINT}") from error
    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description, sort_keys=True, default=str)
    proto.producer_name = "simplepose"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def import_onnxruntime():
    """The onnxruntime module; an ImportError naming the extra when it is not installed."""
    try:
        import onnxruntime  # deferred: an optional dependency (extra simplepose[onnx]) that torch users never need
    except ImportError as error:
        raise ImportError(f"running ONNX needs the onnxruntime package: {ONNX_HINT}") from error
    return onnxruntime


def onnx_session(onnx_bytes: bytes, threads: int = 1):
    """An onnxruntime CPU session of an ONNX file (bytes): `threads` intra-op threads, inter-op 1 (sequential
    execution), all graph optimisations."""
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


class OnnxNetwork:
    """An IMHN exported once (`export_onnx`, in memory) and run by onnxruntime on the CPU, float32 only.

    It stands in for the model in `simplepose.infer.forward_maps` (give it device="cpu": it has no parameters
    to take the device from): called on the float32 (N, 3, H, W) network input, it returns the IMHN's output
    structure reduced to what the graph computes, [[maps (N, 50, H/4, W/4)]] (one stack, its stride-4 scale),
    so `out[-1][0]` reads the same maps as for torch. `threads`: onnxruntime's intra-op threads.
    """

    training = False  # the graph is exported in eval mode: batch norm uses the running statistics

    def __init__(self, model: IMHN, threads: int = 1, metadata: dict | None = None):
        import_onnxruntime()  # fail before the export (seconds for a large model) when it is missing
        self.session = onnx_session(export_onnx(model, metadata), threads)

    def __call__(self, image: torch.Tensor) -> list[list[torch.Tensor]]:
        (maps,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: image.contiguous().numpy()})
        return [[torch.from_numpy(maps)]]


def read_metadata(onnx_bytes_or_proto) -> dict:
    """The `simplepose` metadata of an ONNX file (bytes or a loaded ModelProto); {} when absent."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes_or_proto) if isinstance(onnx_bytes_or_proto, bytes) else onnx_bytes_or_proto
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}
