"""`simplepose oracle ANNOTATIONS.json`: decode perfect heatmaps of a COCO keypoint file and print COCOeval and
the decoder's speed per core (`pipelines.oracle`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import numpy as np
import torch

from jobs.bench.machine import describe_machine
from jobs.options import add_config_arguments, add_shortcut, load_job_config, printed_config
from pipelines.config import to_dict
from pipelines.oracle import OracleConfig, run_oracle
from simplepose.decode import POSE_FLOOR

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="COCO person keypoints JSON (e.g. person_keypoints_val2017.json)")
    add_config_arguments(parser, "the oracle's config (decoder.*, floor.*, ...)")

    def shortcut(flag: str, path: str, help: str, **kwargs) -> None:
        add_shortcut(parser, flag, path, OracleConfig, help, **kwargs)

    shortcut("--mode", "decoder.mode", "decoder mode", choices=("default", "reference"))
    shortcut("--map-dtype", "map_dtype", "precision of the rendered maps before decoding: float16 is how the "
             "authors' oracle maps were recorded (AP 0.663 in reference mode)", choices=("float16", "float32"))
    shortcut("--batch-size", "batch_size", "images per tensor-stage call (find_candidates_batch), as a labeling "
             "actor batches", type=int)
    shortcut("--workers", "workers", "processes, one torch thread each", type=int)
    shortcut("--limit", "limit", "only the first N images", type=int)
    shortcut("--results", "results", "also write the COCO results JSON here")
    parser.add_argument("--floor", action="store_true",
                        help="apply the output floor of the poses tables (simplepose.decode.POSE_FLOOR) before "
                             "COCOeval; floor.min_person_score=... / floor.min_keypoints=... change it")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the figures are per core: one torch thread here and in every worker
    values = {"annotations": args.annotations}
    if args.floor:
        values["floor"] = to_dict(POSE_FLOOR)
    config = load_job_config(OracleConfig, args, values)
    if printed_config(args, config):
        return 0
    results, stats, times = run_oracle(config)
    floor = config.floor
    n = len(times)
    wall, cpu = times[:, :2].sum(axis=1), times[:, 2:4].sum(axis=1)
    figures = {
        "mode": config.decoder.mode, "map_dtype": config.map_dtype, "batch_size": config.batch_size,
        "config": dataclasses.asdict(config.decoder),
        "floor": None if floor is None else dataclasses.asdict(floor),
        "n_images": n, "n_persons": len(results),
        "stats": stats,
        # Per core: one torch thread per process; the CPU time of the decoding thread is the primary figure
        # (robust to other processes sharing the cores), wall time is given too.
        "images_per_s_per_core": n / cpu.sum() if cpu.sum() > 0 else float("inf"),
        "images_per_s_per_core_wall": n / wall.sum() if wall.sum() > 0 else float("inf"),
        "tensor_ms_median": 1e3 * float(np.median(times[:, 0])),
        "assembly_ms_median": 1e3 * float(np.median(times[:, 1])),
        "tensor_ms_mean": 1e3 * float(times[:, 0].mean()), "assembly_ms_mean": 1e3 * float(times[:, 1].mean()),
        "tensor_cpu_ms_mean": 1e3 * float(times[:, 2].mean()), "assembly_cpu_ms_mean": 1e3 * float(times[:, 3].mean()),
        "postprocess_ms_mean": 1e3 * float(times[:, 4].mean()),
        "machine": describe_machine(),
    }
    print(f"oracle: {n} images, {len(results)} persons, decoder mode {config.decoder.mode}, maps {config.map_dtype}, "
          f"tensor stage in batches of {config.batch_size}" + (f", floor {floor}" if floor else ""))
    print(f"machine: {figures['machine']}")
    print("COCOeval: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    print(f"decoder per core: {figures['images_per_s_per_core']:.1f} images/s (thread CPU time), "
          f"{figures['images_per_s_per_core_wall']:.1f} images/s (wall)")
    print(f"  tensor stage: median {figures['tensor_ms_median']:.3f} ms, mean {figures['tensor_ms_mean']:.3f} ms "
          f"(cpu mean {figures['tensor_cpu_ms_mean']:.3f} ms) per image")
    print(f"  assembly stage: median {figures['assembly_ms_median']:.3f} ms, mean "
          f"{figures['assembly_ms_mean']:.3f} ms (cpu mean {figures['assembly_cpu_ms_mean']:.3f} ms) per image")
    print(f"  post-processing (not in the decoder figure): mean {figures['postprocess_ms_mean']:.3f} ms per image")
    if args.json:
        print(json.dumps(figures))
    return 0
