"""`simplepose bench onnx`: onnxruntime vs torch on this CPU for the labeling network's forward.

The forward is the one the labeling job runs (`simplepose.infer.forward_maps`: float32, the last stack's stride-4
maps), exported by `simplepose.onnx_export` (opset 17) and run by onnxruntime's CPU provider with all graph
optimisations, against torch in fp32 (`torch.inference_mode()`, contiguous format, as the job's default).
Both get the same thread count (torch.set_num_threads / intra_op_num_threads, onnxruntime inter-op 1). Each
point interleaves the two engines batch by batch (so a load change on a shared machine hits both) after one
warm-up each, until both ran `--min-time` seconds and at least `--reps` batches; figures are medians.

Models: `tiny` (the shipped jobs/weights/imhn-tiny-stickfigures.pt), `s2i16` (the reference fixture's weights
when the shared folder is there, else random weights of that size: PoseNet(2, 256, increase=16)), `released`
(random weights, the 129M-parameter size). Random weights use the scale-preserving init of `bench network`
(the training init's tiny activations become float32 denormals, slow on CPUs and unlike trained weights).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jobs.bench.machine import describe_machine
from simplepose.checkpoint import load_model
from simplepose.model import IMHN
from simplepose.onnx_export import INPUT_NAME, InferenceForward, export_onnx

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "weights" / "imhn-tiny-stickfigures.pt"
LIGHT = ("tiny",)
"""Models cheap enough for the full grid of widths and batches; the others get --large-widths/--large-batches."""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="tiny,s2i16", help="comma-separated: tiny, s2i16, released "
                        "(default %(default)s)")
    parser.add_argument("--height", type=int, default=512, help="input height, multiple of 64 (default %(default)s)")
    parser.add_argument("--widths", type=_ints, default=[384, 512, 640],
                        help="input widths for tiny, multiples of 64 (default 384,512,640)")
    parser.add_argument("--batches", type=_ints, default=[1, 2, 4, 8], help="batch sizes for tiny (default 1,2,4,8)")
    parser.add_argument("--large-widths", type=_ints, default=[512],
                        help="widths for s2i16 and released: seconds per image on a CPU (default 512)")
    parser.add_argument("--large-batches", type=_ints, default=[1, 2],
                        help="batch sizes for s2i16 and released (default 1,2)")
    parser.add_argument("--threads", type=_ints, default=[1, 2], help="thread counts (default 1,2)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per engine and point (default %(default)s)")
    parser.add_argument("--reps", type=int, default=2, help="at least this many timed batches (default %(default)s)")
    parser.add_argument("--shared", default=os.environ.get("SIMPLEPOSE_SHARED", str(REPO.parent / "shared")),
                        help="shared folder holding reference/fixtures (for the s2i16 weights)")


def build(name: str, shared: str) -> tuple[IMHN, str]:
    """(model in eval mode, where its weights came from)."""
    if name == "tiny":
        return load_model(TINY), TINY.name
    if name == "s2i16":
        fixture = Path(shared) / "reference" / "fixtures" / "imhn_ref_s2i16_weights.npz"
        if fixture.exists():
            weights = np.load(fixture)
            buffer = io.BytesIO()
            torch.save({"weights": {k: torch.from_numpy(v) for k, v in weights.items()}, "epoch": 52}, buffer)
            buffer.seek(0)
            return load_model(buffer), "reference fixture weights"
        model = IMHN(2, 256, 16)
    elif name == "released":
        model = IMHN()
    else:
        raise ValueError(f"bench onnx: unknown model {name!r} (tiny, s2i16, released)")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
    return model.eval(), "random weights (scale-preserving init)"


def session(graph: bytes, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def measure(forward, ort_session, x: torch.Tensor, min_time: float, reps: int) -> tuple[float, float]:
    """Median seconds per batch of (torch, onnxruntime), interleaved, after one warm-up each."""
    array = x.numpy()
    runs = {"torch": lambda: forward(x), "onnxruntime": lambda: ort_session.run(None, {INPUT_NAME: array})}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        while min(len(t) for t in times.values()) < reps or min(sum(t) for t in times.values()) < min_time:
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["torch"]), statistics.median(times["onnxruntime"])


def main(args: argparse.Namespace) -> int:
    try:
        import onnxruntime
    except ImportError:
        print("bench onnx needs onnxruntime: pip install 'simplepose[onnx]'")
        return 2
    print(f"machine: {describe_machine()}, onnxruntime {onnxruntime.__version__}")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, source = build(name, args.shared)
        started = time.perf_counter()
        graph = export_onnx(model)
        print(f"model {name}: {model.config}, {sum(p.numel() for p in model.parameters()):,} parameters, {source}; "
              f"exported in {time.perf_counter() - started:.1f} s ({len(graph) / 1e6:.1f} MB)")
        forward = InferenceForward(model).eval()
        widths, batches = (args.widths, args.batches) if name in LIGHT else (args.large_widths, args.large_batches)
        checked = False
        for threads in args.threads:
            torch.set_num_threads(threads)
            ort_session = session(graph, threads)
            for width in widths:
                for batch in batches:
                    x = torch.rand(batch, 3, args.height, width, generator=torch.Generator().manual_seed(0))
                    if not checked:
                        with torch.inference_mode():
                            expected = forward(x).numpy()
                        got = ort_session.run(None, {INPUT_NAME: x.numpy()})[0]
                        print(f"  onnxruntime vs torch: relative error "
                              f"{np.abs(got - expected).max() / np.abs(expected).max():.1e}")
                        checked = True
                    t_torch, t_ort = measure(forward, ort_session, x, args.min_time, args.reps)
                    row = (name, f"{args.height}x{width}", batch, threads, batch / t_torch, batch / t_ort,
                           t_torch / t_ort)
                    rows.append(row)
                    print(f"  {row[0]:8s} {row[1]:>8s} batch {batch} threads {threads}: torch {row[4]:8.2f} "
                          f"images/s, onnxruntime {row[5]:8.2f} images/s, onnxruntime/torch {row[6]:.2f}x",
                          flush=True)
    print("summary (geometric mean of onnxruntime/torch speed over sizes and batches):")
    for name in dict.fromkeys(r[0] for r in rows):
        for threads in args.threads:
            ratios = [r[6] for r in rows if r[0] == name and r[3] == threads]
            if ratios:
                mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
                print(f"  {name:8s} threads {threads}: {mean:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}, "
                      f"{len(ratios)} points)")
    return 0
