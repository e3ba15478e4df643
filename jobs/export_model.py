"""`simplepose export-model CHECKPOINT OUT.onnx`: a checkpoint as an ONNX graph for onnxruntime.

The graph is the forward that inference uses (`simplepose.onnx_export`): input `image` float32 (N, 3, H, W)
BGR / 255 with N, H, W dynamic (H, W multiples of 64), output `maps` float32 (N, 50, H/4, W/4), the last
stack's stride-4 maps; opset 17. After writing, the graph is run once in onnxruntime against torch on a small
input (`--no-check` skips that). Needs the extra `pip install 'simplepose[onnx]'` (onnx, onnxruntime).
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from jobs.options import add_storage_option, storage_options
from pipelines import storage
from pipelines.errors import JobError, about
from simplepose.checkpoint import build_model, load_checkpoint
from simplepose.model import INPUT_MULTIPLE
from simplepose.onnx_export import INPUT_NAME, ONNX_HINT, OPSET, InferenceForward, export_onnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a simplepose checkpoint (local path, s3://..., any fsspec URI)")
    parser.add_argument("out", metavar="OUT.onnx", help="where to write the ONNX file (local path or any fsspec URI)")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default %(default)s)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not compare onnxruntime with torch on a small input after the export")
    add_storage_option(parser)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    try:
        import onnx  # noqa: F401 - an optional extra, imported here only to say so before any work
    except ImportError:
        raise JobError("export-model needs the onnx package, which is not installed", ONNX_HINT) from None
    with about("CHECKPOINT", args.checkpoint, options), storage.open_binary(args.checkpoint, options) as f:
        data = f.read()
    with about("CHECKPOINT", args.checkpoint, options):
        config, state, metadata = load_checkpoint(io.BytesIO(data))
        model = build_model(config, state)
    started = time.monotonic()
    graph = export_onnx(model, metadata, opset=args.opset)
    with about("OUTPUT", args.out, options):
        storage.write_atomic(args.out, graph, options)
    line = (f"{args.checkpoint} ({model.config}) exported to {args.out}: {len(graph) / 1e6:.1f} MB, opset "
            f"{args.opset}, input image (N, 3, H, W) with H, W multiples of {INPUT_MULTIPLE}, output maps "
            f"(N, 50, H/4, W/4), in {time.monotonic() - started:.1f} s")
    if args.check:
        line += f"; onnxruntime vs torch: relative error {check_graph(model, graph):.1e}"
    print(line)
    return 0


def check_graph(model, graph: bytes, shape=(2, 3, 2 * INPUT_MULTIPLE, 3 * INPUT_MULTIPLE)) -> float:
    """Max |onnxruntime - torch| / max |torch| on a random input of `shape`; a JobError above 1e-4."""
    try:
        import onnxruntime  # an optional extra: --no-check exports without it
    except ImportError:
        raise JobError("checking the export needs onnxruntime, which is not installed",
                       f"{ONNX_HINT}, or pass --no-check") from None
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = InferenceForward(model.eval())(x).numpy()
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
    if not error <= 1e-4:
        raise JobError(f"the ONNX graph differs from torch by {error:.1e} (relative) on a {shape} input",
                       "report this with the checkpoint's config; --no-check writes it anyway")
    return error
