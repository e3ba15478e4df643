"""`simplepose bench onnx`: onnxruntime vs torch on this CPU for the labeling network's forward, or (`--stage`)
for the labeling job's whole network stage.

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

`--stage`: the labeling job's `NetworkStage` alone (no Ray), engine torch vs onnxruntime, on coco-mini photos
decoded once by its `DecodeStage` (boxsize `--boxsize`, one scale, flip, stride-4 maps: the job's settings),
one Ray batch of all the photos grouped into forwards of `--forward-batch-size`, fp32, `--threads` threads
(the first count). Each engine is built (the onnxruntime one exports the model), warmed up on one photo of
each padded shape (an actor sees every shape early; onnxruntime plans memory per shape), then the two run
the batch alternately `--stage-reps` times; images/s and CPU ms per image (this process, all threads) from
the median run.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jobs.bench.machine import describe_machine
from simplepose.checkpoint import load_model, save_checkpoint
from simplepose.model import IMHN
from simplepose.onnx_export import INPUT_NAME, InferenceForward, export_onnx, import_onnxruntime, onnx_session

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
                        help="shared folder holding reference/fixtures (s2i16 weights) and data/coco-mini (--stage)")
    parser.add_argument("--stage", action="store_true",
                        help="time the labeling job's NetworkStage per engine on coco-mini photos instead")
    parser.add_argument("--boxsize", type=int, default=512, help="--stage: boxsize (default %(default)s)")
    parser.add_argument("--stage-images", type=int, default=32, help="--stage: photos for tiny (default %(default)s)")
    parser.add_argument("--large-stage-images", type=int, default=8,
                        help="--stage: photos for s2i16 and released (default %(default)s)")
    parser.add_argument("--forward-batch-size", type=int, default=16, help="--stage: images per forward "
                        "(default %(default)s, the job's)")
    parser.add_argument("--stage-reps", type=int, default=2, help="--stage: timed runs per engine (default %(default)s)")


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
        onnxruntime = import_onnxruntime()
    except ImportError as error:
        print(f"bench onnx: {error}")
        return 2
    print(f"machine: {describe_machine()}, onnxruntime {onnxruntime.__version__}")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    return bench_stage(args, names) if args.stage else bench_forward(args, names)


def bench_forward(args: argparse.Namespace, names: list[str]) -> int:
    """The bare forward, torch vs onnxruntime, over the grid of sizes, batches and threads."""
    rows = []
    for name in names:
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
            ort_session = onnx_session(graph, threads)
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


def bench_stage(args: argparse.Namespace, names: list[str]) -> int:
    """The labeling job's NetworkStage alone, engine torch vs onnxruntime, on decoded coco-mini photos."""
    from pipelines.label.stages import NetworkStage
    from simplepose.decode import DecoderConfig
    from simplepose.infer import InferConfig

    folder = Path(args.shared) / "data" / "coco-mini" / "train2017"
    photos = sorted(str(p) for p in folder.glob("*.jpg"))
    if not photos:
        print(f"bench onnx --stage: no photos in {folder} (set --shared)")
        return 2
    infer_config = InferConfig(boxsize=args.boxsize, scales=(1.0,), flip=True, aggregation="stride4")
    decoder_config, threads = DecoderConfig(), args.threads[0]
    print(f"stage: NetworkStage, boxsize {args.boxsize}, one scale, flip, stride4, forwards of "
          f"{args.forward_batch_size}, fp32, {threads} thread(s), photos from {folder}")
    for name in names:
        count = min(len(photos), args.stage_images if name in LIGHT else args.large_stage_images)
        batch, warm_up = _decoded(photos[:count], infer_config)
        model, source = build(name, args.shared)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / f"{name}.pt"
            save_checkpoint(model, checkpoint, {"name": name})
            stages = {}
            for engine in ("torch", "onnxruntime"):
                started = time.perf_counter()
                stages[engine] = NetworkStage(str(checkpoint), infer_config, decoder_config, device="cpu",
                                              precision="fp32", forward_batch_size=args.forward_batch_size,
                                              threads=threads, engine=engine)
                built = time.perf_counter() - started
                stages[engine](warm_up)
                print(f"model {name} ({source}), {count} photos in {len(warm_up['uri'])} padded shapes: engine "
                      f"{engine} built in {built:.1f} s, warmed up in {time.perf_counter() - started - built:.1f} s",
                      flush=True)
        runs: dict[str, list[tuple[float, float]]] = {engine: [] for engine in stages}
        outputs = {}
        for _ in range(args.stage_reps):
            for engine, stage in stages.items():
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[engine] = stage(batch)
                runs[engine].append((time.perf_counter() - wall, time.process_time() - cpu))
        figures = {}
        for engine, timings in runs.items():
            wall = statistics.median(t[0] for t in timings)
            cpu = statistics.median(t[1] for t in timings)
            figures[engine] = (count / wall, cpu)
            ok = int((outputs[engine]["status"] == "ok").sum())
            print(f"  {name:8s} {engine:12s}: {count / wall:8.2f} images/s, {1000 * cpu / count:8.1f} CPU ms per "
                  f"image ({ok}/{count} ok, {len(timings)} runs)", flush=True)
        both = np.flatnonzero((outputs["torch"]["status"] == "ok") & (outputs["onnxruntime"]["status"] == "ok"))
        same = sum(np.array_equal(*(pickle.loads(outputs[engine]["candidates"][i]).types for engine in stages))
                   for i in both)
        (torch_rate, torch_cpu), (ort_rate, ort_cpu) = figures["torch"], figures["onnxruntime"]
        print(f"  {name:8s} onnxruntime/torch: {ort_rate / torch_rate:.2f}x images/s, {torch_cpu / ort_cpu:.2f}x less "
              f"CPU per image; the same candidate types on {same}/{len(both)} photos")
    return 0


def _decoded(photos: list[str], infer_config) -> tuple[dict, dict]:
    """(the network stage's input batch of `photos`, its rows of the first photo of each padded shape)."""
    from pipelines.label.stages import DecodeStage, read_objects_batch

    uris = np.array(photos, dtype=object)
    batch = DecodeStage(infer_config, max_pixels=50_000_000)(read_objects_batch(
        {"input_index": np.arange(len(uris)), "image_id": uris, "uri": uris}, retries=0))
    first_of_shape = list({batch["pixels_0"][i].shape: i for i in reversed(range(len(uris)))}.values())
    return batch, {column: values[first_of_shape] for column, values in batch.items()}
