"""`simplepose bench label`: the labeling job end to end vs each of its stages alone, on the same data.

Each stage alone runs as its own Ray Data job over the materialised output of the stage before it (same
pool sizes and resources as in the job), so its rate is what the stage can do with the machine to itself;
the writer alone is the driver committing the materialised rows. Two rates are printed for each: with
start-up (actor pools, model loading; amortised only over many images) and steady (rows after the first
output batch / time from the first batch to the last). End to end is the job's own Ray Data graph and
writer on a frozen input list. Bar: end-to-end >= 80% of the slowest stage alone.
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

BAR = 0.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default=None,
                        help="images (prefix/glob/manifest URI); default: shared coco-mini train2017")
    parser.add_argument("--images", type=int, default=96, help="objects to label (the input is cycled)")
    parser.add_argument("--model", default=None, help="checkpoint URI (default: a random IMHN of --stacks/"
                                                       "--width/--increase, saved to a temporary file)")
    parser.add_argument("--stacks", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--increase", type=int, default=16)
    parser.add_argument("--boxsize", type=int, default=256)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mode", choices=("default", "reference"), default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--network-cpus", type=float, default=1.0)
    parser.add_argument("--network-batch-size", type=int, default=8)
    parser.add_argument("--decode-actors", type=int, default=2, help="max decode actors")
    parser.add_argument("--network-actors", type=int, default=1, help="max network actors (<= GPUs on GPU)")
    parser.add_argument("--assemble-actors", type=int, default=1, help="max assembly actors")


def _input_uris(input_uri: str | None, count: int) -> list[str]:
    from pipelines import storage

    if input_uri is None:
        # The shared data folder, found as the tests find it ($SIMPLEPOSE_SHARED, else ../shared).
        shared = Path(os.environ.get("SIMPLEPOSE_SHARED", Path(__file__).resolve().parents[3] / "shared"))
        input_uri = str(shared / "data" / "coco-mini" / "train2017")
    uris = [uri for _, uri in storage.iter_input_uris(input_uri)]
    if not uris:
        raise ValueError(f"bench label: no objects under {input_uri}")
    return list(itertools.islice(itertools.cycle(uris), count))


def _model(args: argparse.Namespace, folder: Path) -> str:
    if args.model:
        return args.model
    import torch

    from simplepose.checkpoint import save_checkpoint
    from simplepose.model import IMHN

    torch.manual_seed(0)
    path = folder / "random.pt"
    save_checkpoint(IMHN(stacks=args.stacks, width=args.width, increase=args.increase), path,
                    {"name": f"random-s{args.stacks}w{args.width}i{args.increase}"})
    return str(path)


class Clock:
    """Times one pass over a dataset's output: total seconds (start-up included) and the steady rate
    (rows after the first batch / time from the first batch to the last)."""

    def __init__(self):
        self.started, self.first, self.last, self.rows, self.first_rows = time.monotonic(), None, None, 0, 0

    def tick(self, rows: int) -> None:
        self.last = time.monotonic()
        if self.first is None:
            self.first, self.first_rows = self.last, rows
        self.rows += rows

    def figures(self) -> tuple[float, float, float]:
        """(seconds, images/s with start-up, steady images/s)."""
        seconds = (self.last or time.monotonic()) - self.started
        span = (self.last - self.first) if self.first is not None else 0.0
        steady = (self.rows - self.first_rows) / span if span > 0 else float("nan")
        return seconds, self.rows / seconds, steady


def _timed(dataset, clock: Clock, sink=None) -> list:
    """Iterate `dataset`, ticking `clock`; batches go to `sink` when given, else are returned as tables."""
    import pyarrow as pa

    kept = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if sink is not None:
            sink(batch)
        else:
            kept.append(pa.table({name: list(column) if column.dtype == object else column
                                  for name, column in batch.items()}))
        clock.tick(len(batch["uri"]))
    return kept


def main(args: argparse.Namespace) -> int:
    import ray.data

    from jobs.bench.machine import describe_machine
    from pipelines import label_run, storage
    from pipelines.label import ChunkWriter, LabelJobConfig, describe_model
    from pipelines.label_ray import build_dataset, connect_ray, source, stages

    folder = Path(tempfile.mkdtemp(prefix="simplepose-bench-label-"))
    manifest = folder / "inputs.txt"
    manifest.write_text("\n".join(_input_uris(args.input, args.images)) + "\n")
    config = LabelJobConfig(
        input=str(manifest), output=str(folder / "e2e"), model=_model(args, folder), boxsize=args.boxsize,
        scales=tuple(args.scales), flip=args.flip, mode=args.mode, device=args.device, precision=args.precision,
        chunk_size=args.chunk_size, network_cpus=args.network_cpus, network_batch_size=args.network_batch_size,
        decode_actors=(1, args.decode_actors), network_actors=(1, args.network_actors),
        assemble_actors=(1, args.assemble_actors), assemble_batch_size=args.network_batch_size,
        progress_interval_s=1e9)
    print(f"machine: {describe_machine()}")
    print(f"data: {args.images} objects from {args.input or 'coco-mini train2017'}; model {config.model}; "
          f"boxsize {args.boxsize}, scales {args.scales}, flip {args.flip}, mode {args.mode}")
    model_uri, model_name, model_version = describe_model(config.model)
    run = {"run_id": "bench", "model_name": model_name, "model_version": model_version}
    clocks: dict[str, Clock] = {}
    with connect_ray() as resources:
        chunks = []
        for name in ("e2e", "write-alone"):
            output = label_run.RunFolder(str(folder / name))
            count, _ = output.freeze_inputs(storage.iter_input_uris(config.input), config.chunk_size)
            chunks.append((output, list(range(count))))
        (e2e, pending), (write_alone, _) = chunks
        uris = [e2e.input_chunk_uri(c) for c in pending]
        # End to end: the job's own graph and writer (run_label_job adds only bookkeeping around them).
        writer = ChunkWriter(e2e, run, config.chunk_size, args.images, pending, progress_interval_s=1e9)
        clocks["end-to-end"] = Clock()
        _timed(build_dataset(config, model_uri, uris, resources), clocks["end-to-end"], writer.add)
        writer.check_done()
        # Each stage alone, fed the materialised output of the stage before it.
        dataset = source(config, uris).materialize()
        for name, apply in stages(config, model_uri, resources):
            clocks[name] = Clock()
            dataset = ray.data.from_arrow(_timed(apply(dataset), clocks[name]))
        batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    writer = ChunkWriter(write_alone, run, config.chunk_size, args.images, pending, progress_interval_s=1e9)
    clocks["write"] = Clock()
    for batch in batches:
        writer.add(batch)
        clocks["write"].tick(len(batch["uri"]))

    print(f"{'':<14}{'seconds':>9}{'images/s':>10}{'steady images/s':>17}   (steady: after the first batch)")
    for name, clock in clocks.items():
        seconds, rate, steady = clock.figures()
        label = name if name == "end-to-end" else f"{name} alone"
        print(f"{label:<14}{seconds:>9.2f}{rate:>10.2f}{steady:>17.2f}")
    stage_names = [name for name in clocks if name != "end-to-end"]
    for column, title in ((1, "with start-up"), (2, "steady")):
        slowest = min(stage_names, key=lambda name: clocks[name].figures()[column])
        ratio = clocks["end-to-end"].figures()[column] / clocks[slowest].figures()[column]
        print(f"{title}: end-to-end / slowest stage alone ({slowest}) = {ratio:.2f} "
              f"(bar {BAR:.2f}: {'PASS' if ratio >= BAR else 'FAIL'})")
    print(f"scratch folder: {folder}")
    return 0
