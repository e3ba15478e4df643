"""`simplepose bench label`: the labeling job end to end vs each of its stages alone, on the same data.

End to end is the job's own Ray Data graph and chunk writer on a frozen input list. Each stage alone then
runs as its own Ray Data job over the materialised output of the stage before it (same pools and resources),
so its rate is what the stage can do with the machine to itself; the writer alone is the driver committing
the materialised rows. Each stage is also called directly in this process on the same rows ("bare"): the
library's own cost, without Ray.

CPU is read from /proc for every process of the job (this driver, Ray's raylet and GCS, every worker),
sampled every 0.2 s so that actors which exit at the end of an operator still count (up to 0.2 s of an
exiting process's CPU can be missed). `--null-network` replaces the network by an instant stand-in
(`pipelines.label.stages.NullNetwork`: shapes still grouped, realistic candidates), so that only the CPU path
and the driver are timed. With a real network, `cpu_ms_per_image` excludes the forward's own CPU (measured
bare). `--json`: the last line printed is one JSON object with every figure.

Bars (docs/benchmarks.md): driver CPU <= 0.25 ms per image, cpu_ms_per_image <= 12, forward batch fill
>= 0.9 at a forward batch of 16, end to end >= 80 % of the slowest stage alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from jobs.bench.machine import describe_machine
from jobs.options import add_config_arguments, load_job_config, printed_config
from pipelines import storage
from pipelines.label import run_folder
from pipelines.label.config import LabelJobConfig
from pipelines.label.graph import build_dataset, data_context, pool_sizes, source, stages
from pipelines.label.job import ChunkWriter
from pipelines.label.stages import AssembleStage, DecodeStage, NetworkStage, read_slices_batch
from pipelines.ray_cluster import connect_ray
from pipelines.registry import describe_model
from simplepose.checkpoint import save_checkpoint
from simplepose.model import IMHN

BAR = 0.8
STAGES = ("read", "decode", "network", "assemble", "write")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "the benchmarked labeling config (pipelines.label.config.LabelJobConfig)")
    parser.add_argument("--input", default=None,
                        help="images (prefix/glob/manifest, any URI); default: shared coco-mini train2017")
    parser.add_argument("--images", type=int, default=4096, help="objects to label (the input is cycled)")
    parser.add_argument("--model", default=None, help="checkpoint URI (default: a random IMHN of --stacks/"
                                                       "--width/--increase, saved to a temporary file)")
    parser.add_argument("--small-images", type=int, default=256,
                        help="objects of the second, smaller run whose figures are subtracted (start-up cancels)")
    parser.add_argument("--null-network", action="store_true",
                        help="replace the network by an instant stand-in: time the CPU path and the driver only")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    parser.add_argument("--fixed-pools", action="store_true",
                        help="start every actor pool at its maximum size (no autoscaling)")
    parser.add_argument("--stacks", type=int, default=1, help="IMHN stacks of the random model")
    parser.add_argument("--width", type=int, default=64, help="IMHN width of the random model")
    parser.add_argument("--increase", type=int, default=16, help="IMHN width increase of the random model")
    parser.add_argument("--boxsize", type=int, default=512, help="pixels the image height is scaled to")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip averaging")
    parser.add_argument("--mode", choices=("default", "reference"), default="default", help="decoder mode")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="network device")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="network precision")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="objects per committed chunk")
    parser.add_argument("--network-cpus", type=float, default=None,
                        help="CPUs per network actor (default 1, or 0.25 with --null-network)")
    parser.add_argument("--network-batch-size", type=int, default=None,
                        help="rows per network Ray batch (default: the job's)")
    parser.add_argument("--forward-batch-size", type=int, default=16, help="images per network forward")
    parser.add_argument("--decode-actors", type=int, default=None,
                        help="max decode actors (default: sized from the cluster)")
    parser.add_argument("--network-actors", type=int, default=1, help="max network actors (<= GPUs on GPU)")
    parser.add_argument("--assemble-actors", type=int, default=None,
                        help="max assembly actors (default: sized from the cluster)")


class ProcessCpu:
    """CPU seconds of this process and all its descendants (Ray started here: raylet, GCS, workers), sampled
    from /proc in a background thread so that processes which exit between readings still count."""

    def __init__(self, interval_s: float = 0.2):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self.sampler_cpu = 0.0
        self.interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry))
        tree, stack = [], [os.getpid()]
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, []))
        return tree

    def _sample(self) -> None:
        for pid in self._tree():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self.seen[pid] = max(self.seen.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / self.tick)
            # Named while it lives (an exited process cannot be named), and again at every sample: a worker
            # forked by the raylet shows the raylet's command line until it has started.
            kind = self._kind(pid)
            if pid not in self.kinds or not kind.startswith("other"):  # an exiting process has no command line
                self.kinds[pid] = kind

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
            self.sampler_cpu = time.thread_time()  # this thread's own CPU: not the driver's work

    def total(self) -> float:
        """CPU seconds of the tree so far (every process ever seen)."""
        self._sample()
        return sum(self.seen.values())

    def by_kind(self) -> dict[str, float]:
        """CPU seconds so far per kind of process: driver, raylet, gcs, workers, other."""
        self._sample()
        kinds: dict[str, float] = {}
        for pid, seconds in self.seen.items():
            kind = self.kinds[pid]
            kinds[kind] = kinds.get(kind, 0.0) + seconds
        return kinds

    def _kind(self, pid: int) -> str:
        if pid == os.getpid():
            return "driver"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        for kind, marker in (("raylet", "raylet"), ("gcs", "gcs_server"), ("workers", "default_worker"),
                             ("workers", "ray::")):
            if marker in command:
                return kind
        return f"other ({os.path.basename(command.split(' ', 1)[0])})"

    def stop(self) -> None:
        self._stop.set()


def _input_uris(input_uri: str | None, count: int, folder: Path) -> list[str]:
    """`count` distinct object URIs. A local input with fewer objects is cycled through symbolic links in
    `folder` (a manifest keeps each URI once); a remote one is used as it is, up to `count` objects."""

    if input_uri is None:
        # The shared data folder, found as the tests find it ($SIMPLEPOSE_SHARED, else ../shared).
        shared = Path(os.environ.get("SIMPLEPOSE_SHARED", Path(__file__).resolve().parents[3] / "shared"))
        input_uri = str(shared / "data" / "coco-mini" / "train2017")
    uris = [uri for _, uri in storage.iter_input_uris(input_uri)]
    if not uris:
        raise ValueError(f"bench label: no objects under {input_uri}")
    local = all(uri.startswith(("file://", "/")) for uri in uris)
    if len(uris) >= count or not local:
        return uris[:count]
    links = folder / "inputs"
    links.mkdir()
    cycled = []
    for n, uri in enumerate(itertools.islice(itertools.cycle(uris), count)):
        target = uri.removeprefix("file://")
        link = links / f"{n:07d}{Path(target).suffix}"
        link.symlink_to(target)
        cycled.append(str(link))
    return cycled


def _model(args: argparse.Namespace, folder: Path) -> str:
    if args.model:
        return args.model


    torch.manual_seed(0)
    path = folder / "random.pt"
    save_checkpoint(IMHN(stacks=args.stacks, width=args.width, increase=args.increase), path,
                    {"name": f"random-s{args.stacks}w{args.width}i{args.increase}"})
    return str(path)


def _forward_fill(forward_batch, status, forward_batch_size: int) -> float:
    """Mean images per forward / forward batch size, from each row's `forward_batch` (images sharing it)."""
    shared = np.asarray(forward_batch, np.float64)[np.asarray(status) == "ok"]
    if not len(shared):
        return float("nan")
    forwards = (1.0 / shared).sum()
    return float(len(shared) / forwards / forward_batch_size)


def _bare(config, model_uri: str, slices: list[dict]) -> dict[str, float]:
    """CPU seconds per image of each stage called directly in this process (no Ray), on the first slices."""

    batch = {name: np.asarray([s[name] for s in slices], dtype=object) for name in ("chunk_uri", "start", "stop")}
    timings = {}
    started = time.process_time()
    rows = read_slices_batch(batch, dict(config.storage_options), config.read.retries)
    timings["read"] = time.process_time() - started
    decode = DecodeStage(config.infer, config.max_pixels)
    started = time.process_time()
    rows = decode(rows)
    timings["decode"] = time.process_time() - started
    network = NetworkStage(model_uri, config.infer, config.decoder, device="cpu",
                           precision="fp32", forward_batch_size=config.network.forward_batch_size,
                           engine=config.network.engine, threads=max(1, int(config.network.cpus)))
    started = time.process_time()
    rows = network(rows)
    timings["network"] = time.process_time() - started
    assemble = AssembleStage(config.decoder, config.floor)
    started = time.process_time()
    rows = assemble(rows)
    timings["assemble"] = time.process_time() - started
    count = len(rows["uri"])
    return {name: seconds / count for name, seconds in timings.items()}


class Measure:
    """Wall seconds, CPU seconds per kind of process and the driver's own CPU of one timed block."""
    def __init__(self, cpu: ProcessCpu, images: int):
        self.cpu, self.images = cpu, images

    def __enter__(self):
        self.started, self.kinds = time.monotonic(), self.cpu.by_kind()
        self.driver = time.process_time() - self.cpu.sampler_cpu
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.started
        after = self.cpu.by_kind()
        self.driver = time.process_time() - self.cpu.sampler_cpu - self.driver
        self.kinds = {kind: after.get(kind, 0.0) - self.kinds.get(kind, 0.0) for kind in after}
        self.kinds["driver"] = self.driver  # without the sampling thread's own CPU


def _per_image(big: Measure, small: Measure, images: int) -> dict:
    """Figures of the `images` more that the big run did than the small one: start-up (actor pools, model
    loading, worker processes) costs both runs the same and cancels out."""
    seconds = big.seconds - small.seconds
    # A stage much faster than its start-up: the difference drowns in noise; then the big run's own rate,
    # start-up included (a lower bound), is reported instead.
    startup_included = seconds <= 0.05 * big.seconds
    if startup_included:  # the whole big run per image: an upper bound
        kinds = {kind: 1e3 * seconds_ / (images + small.images) for kind, seconds_ in sorted(big.kinds.items())}
    else:
        kinds = {kind: 1e3 * (big.kinds.get(kind, 0.0) - small.kinds.get(kind, 0.0)) / images
                 for kind in sorted(set(big.kinds) | set(small.kinds))}
    return {"images_per_s": (images + small.images) / big.seconds if startup_included else images / seconds,
            "rate_includes_startup": startup_included,
            "cpu_ms_per_image": sum(kinds.values()), "cpu_ms_per_image_by_process": kinds,
            "driver_cpu_ms_per_image": kinds.get("driver", 0.0),
            "driver_cpu_ms_per_s": 1e3 * big.driver / big.seconds}


def main(args: argparse.Namespace) -> int:

    folder = Path(tempfile.mkdtemp(prefix="simplepose-bench-label-"))
    uris = _input_uris(args.input, args.images, folder)
    if len(uris) < args.images:
        print(f"only {len(uris)} objects in {args.input}: labeling those")
        args.images = len(uris)
    small_count = max(1, min(args.small_images, args.images // 4))
    network_cpus = args.network_cpus if args.network_cpus is not None else 0.25 if args.null_network else 1.0
    values = {"input": "unused", "output": str(folder), "model": _model(args, folder), "chunk_size": args.chunk_size,
              "progress_interval_s": 1e9, "infer.boxsize": args.boxsize, "infer.scales": tuple(args.scales),
              "infer.flip": args.flip, "decoder.mode": args.mode, "network.device": args.device,
              "network.precision": args.precision, "network.cpus": network_cpus,
              "network.batch_size": args.network_batch_size, "network.forward_batch_size": args.forward_batch_size,
              "network.engine": "null" if args.null_network else "torch", "decode.actors": (1, args.decode_actors),
              "network.actors": (1, args.network_actors), "assemble.actors": (1, args.assemble_actors)}
    if args.mode == "reference":
        values["infer.aggregation"] = "reference"  # as `simplepose label --mode reference`
    config = load_job_config(LabelJobConfig, args, values)  # --config and dotted overrides win over the flags
    if printed_config(args, config):
        return 0
    if args.fixed_pools:  # every pool starts at its maximum: Ray Data's actor autoscaler has nothing to do
        sizes = pool_sizes(config, {"CPU": float(os.cpu_count())}, "cpu")
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), actors=(high, high))
                                                for name, (_, high) in sizes.items()})
    machine = describe_machine()
    print(f"machine: {machine}")
    print(f"data: {args.images} objects from {args.input or 'coco-mini train2017'} (and a {small_count}-object "
          f"run whose figures are subtracted: start-up cancels out); model "
          f"{'null (stand-in)' if args.null_network else config.model}; boxsize {args.boxsize}, scales "
          f"{args.scales}, flip {args.flip}, mode {args.mode}")
    model_uri, model_name, model_version = describe_model(config.model)
    run = {"run_id": "bench", "model_name": model_name, "model_version": model_version}

    def frozen(name: str, count: int):
        manifest = folder / f"{name}.txt"
        manifest.write_text("\n".join(uris[:count]) + "\n")
        output = run_folder.RunFolder(str(folder / name))
        chunks, frozen_count = output.freeze_inputs(storage.iter_input_uris(str(manifest)), config.chunk_size)
        if frozen_count != count:
            raise RuntimeError(f"bench label: {frozen_count} objects frozen for {count} URIs")
        rows = [min(config.chunk_size, count - c * config.chunk_size) for c in range(chunks)]
        return output, [output.input_chunk_uri(c) for c in range(chunks)], rows

    cpu = ProcessCpu()
    results: dict[str, dict] = {}
    with connect_ray() as resources, data_context():
        runs = {}
        for name, count in (("small", small_count), ("big", args.images)):
            output, chunk_uris, rows_of = frozen(name, count)
            writer = ChunkWriter(output, run, config.chunk_size, count, list(range(len(rows_of))), 1e9)
            fills = []
            # End to end: the job's own graph and writer (run_label_job adds only bookkeeping around them).
            with Measure(cpu, count) as measured:
                for batch in build_dataset(config, model_uri, chunk_uris, rows_of, resources).iter_batches(
                        batch_size=None, batch_format="numpy"):
                    writer.add(batch)
                    fills.append((batch["forward_batch"], batch["status"]))
                writer.check_done()
            runs[name] = (measured, chunk_uris, rows_of, fills)
        extra = args.images - small_count
        end_to_end = _per_image(runs["big"][0], runs["small"][0], extra)
        forward_batch = np.concatenate([f for f, _ in runs["big"][3]])
        statuses = np.concatenate([s for _, s in runs["big"][3]])
        # Each stage alone, fed the materialised output of the stage before it (small and big runs again).
        inputs = {name: source(config, runs[name][1], runs[name][2]).materialize() for name in runs}
        for name, apply in stages(config, model_uri, resources):
            measures = {}
            for size, count in (("small", small_count), ("big", args.images)):
                with Measure(cpu, count) as measures[size]:
                    inputs[size] = apply(inputs[size]).materialize()
            results[name] = _per_image(measures["big"], measures["small"], extra)
        batches = list(inputs["big"].iter_batches(batch_size=None, batch_format="numpy"))
        if config.read.cpus is None:  # the job runs read + decode as one fused operator: time it as one too
            read, decode = (apply for name, apply in stages(config, model_uri, resources) if name in ("read", "decode"))
            measures = {}
            for size, count in (("small", small_count), ("big", args.images)):
                with Measure(cpu, count) as measures[size]:
                    decode(read(source(config, runs[size][1], runs[size][2]))).materialize()
            results["read+decode"] = _per_image(measures["big"], measures["small"], extra)
    cpu.stop()
    output, _, rows_of = frozen("write-alone", args.images)
    writer = ChunkWriter(output, run, config.chunk_size, args.images, list(range(len(rows_of))), 1e9)
    started, cpu_started = time.monotonic(), time.process_time()
    for batch in batches:
        writer.add(batch)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    results["write"] = {"images_per_s": args.images / seconds, "cpu_ms_per_image": 1e3 * cpu_seconds / args.images}
    bare = _bare(config, model_uri, [{"chunk_uri": runs["big"][1][0], "start": 0,
                                      "stop": min(64, runs["big"][2][0])}])
    for name in ("read", "decode", "network", "assemble"):
        results[name]["bare_cpu_ms_per_image"] = 1e3 * bare[name]
    results["write"]["bare_cpu_ms_per_image"] = results["write"]["cpu_ms_per_image"]
    forward_cpu_ms = 0.0 if args.null_network else 1e3 * bare["network"]
    operators = [n for n in STAGES if not ("read+decode" in results and n in ("read", "decode"))]
    operators += ["read+decode"] if "read+decode" in results else []
    slowest = min(operators, key=lambda n: results[n]["images_per_s"])  # of the job's operators
    result = {
        "images": args.images, "small_images": small_count, "boxsize": args.boxsize,
        "null_network": args.null_network, "end_to_end_images_per_s": end_to_end["images_per_s"],
        "end_to_end_with_startup_images_per_s": args.images / runs["big"][0].seconds,
        "driver_cpu_ms_per_image": end_to_end["driver_cpu_ms_per_image"],
        "driver_cpu_ms_per_s": end_to_end["driver_cpu_ms_per_s"],
        "cpu_ms_per_image": end_to_end["cpu_ms_per_image"] - forward_cpu_ms,
        "cpu_ms_per_image_by_process": end_to_end["cpu_ms_per_image_by_process"],
        "forward_batch_fill": _forward_fill(forward_batch, statuses, config.network.forward_batch_size),
        "forward_batch_size": config.network.forward_batch_size, "network_batch_size": config.network_rows(),
        "stages": results, "slowest_stage": slowest,
        "end_to_end_over_slowest": end_to_end["images_per_s"] / results[slowest]["images_per_s"],
        "machine": machine, "cpus": resources.get("CPU"),
    }
    print(f"{'stage':<10}{'alone images/s':>16}{'CPU ms/image in Ray':>22}{'bare CPU ms/image':>20}")
    for name in STAGES:
        f = results[name]
        print(f"{name:<10}{f['images_per_s']:>16.1f}{f['cpu_ms_per_image']:>22.2f}{f['bare_cpu_ms_per_image']:>20.2f}")
    if "read+decode" in results:  # no bare figure: the sum of read's and decode's
        f = results["read+decode"]
        print(f"{'read+decode':<10}{f['images_per_s']:>16.1f}{f['cpu_ms_per_image']:>22.2f}{'(fused, as in the job)':>22}")
    by_process = ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_ms_per_image_by_process"].items())
    print(f"end to end: {result['end_to_end_images_per_s']:.1f} images/s "
          f"({result['end_to_end_with_startup_images_per_s']:.1f} with start-up); driver CPU "
          f"{result['driver_cpu_ms_per_image']:.3f} ms/image; all processes {result['cpu_ms_per_image']:.2f} "
          f"ms/image ({by_process}); forward batch fill {result['forward_batch_fill']:.3f} at "
          f"{config.network.forward_batch_size}")
    ratio = result["end_to_end_over_slowest"]
    print(f"end-to-end / slowest stage alone ({slowest}) = {ratio:.2f} (bar {BAR:.2f}: "
          f"{'PASS' if ratio >= BAR else 'FAIL'})")
    print(f"scratch folder: {folder}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
