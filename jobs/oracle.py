"""`simplepose oracle ANNOTATIONS.json`: decode perfect heatmaps of a COCO keypoint file, the ceiling of the
grouping alone (no network, no images).

Every image's ground truth is rendered with `simplepose.targets.render_heatmaps` over the whole image at stride
4 (no crop), passed through the inference post-processing (reference mode: the authors' x4 cubic upsampling to
the original size, `simplepose.infer.upsample_reference`; default mode: the stride-4 grid as is,
`simplepose.infer.heatmaps_from_stride4`) and decoded. COCOeval stats and the decoder's speed per core (one
torch thread; tensor and assembly stages timed separately, rendering and post-processing excluded) are printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import numpy as np

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="COCO person keypoints JSON (e.g. person_keypoints_val2017.json)")
    parser.add_argument("--mode", choices=("default", "reference"), default="default",
                        help="decoder mode (DecoderConfig.mode)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="override one DecoderConfig field, e.g. --option tie_free_nms=false (repeatable)")
    parser.add_argument("--map-dtype", choices=("float16", "float32"), default="float16",
                        help="precision of the rendered maps before decoding: float16 is how the authors' oracle "
                             "maps were recorded (fixtures/oracle_train_maps.npz, AP 0.663 in reference mode)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per tensor-stage call (find_candidates_batch), as a labeling actor batches")
    parser.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--results", default=None, help="also write the COCO results JSON here")
    parser.add_argument("--floor", action="store_true",
                        help="apply the output floor of the poses tables (simplepose.decode.POSE_FLOOR) before "
                             "COCOeval; --min-person-score / --min-keypoints change it")
    parser.add_argument("--min-person-score", type=float, default=None, help="floor: person score (implies --floor)")
    parser.add_argument("--min-keypoints", type=int, default=None, help="floor: keypoints (implies --floor)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def decoder_config(mode: str, options: list[str]):
    """DecoderConfig from --mode and NAME=VALUE overrides (values parsed as the field's type)."""
    from simplepose.decode import DecoderConfig

    fields = {f.name: f for f in dataclasses.fields(DecoderConfig)}
    changes = {}
    for item in options:
        name, _, value = item.partition("=")
        if name not in fields or name == "mode":
            raise SystemExit(f"oracle: unknown decoder option {name!r}; valid: {sorted(set(fields) - {'mode'})}")
        default = getattr(DecoderConfig(), name)
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"oracle: option {name} needs true/false, got {value!r}")
            changes[name] = value.lower() in ("true", "1")
        else:
            changes[name] = type(default)(value)
    return DecoderConfig(mode=mode, **changes)


def main(args: argparse.Namespace) -> int:
    from jobs.bench.machine import describe_machine

    import torch

    torch.set_num_threads(1)  # the figures are per core: one torch thread here and in every worker
    config = decoder_config(args.mode, args.option)
    if args.workers < 1 or args.batch_size < 1:
        raise SystemExit(f"oracle: --workers and --batch-size must be >= 1, got {args.workers}, {args.batch_size}")
    floor = None
    if args.floor or args.min_person_score is not None or args.min_keypoints is not None:
        from simplepose.decode import POSE_FLOOR

        floor = POSE_FLOOR
        if args.min_person_score is not None:
            floor = dataclasses.replace(floor, min_person_score=args.min_person_score)
        if args.min_keypoints is not None:
            floor = dataclasses.replace(floor, min_keypoints=args.min_keypoints)
    from pipelines.oracle import run_oracle

    results, stats, times = run_oracle(args.annotations, config, args.workers, args.limit,
                                        args.map_dtype, args.batch_size, floor)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(results, f)
    n = len(times)
    wall, cpu = times[:, :2].sum(axis=1), times[:, 2:4].sum(axis=1)
    figures = {
        "mode": config.mode, "map_dtype": args.map_dtype, "batch_size": args.batch_size,
        "config": dataclasses.asdict(config),
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
    print(f"oracle: {n} images, {len(results)} persons, decoder mode {config.mode}, maps {args.map_dtype}, "
          f"tensor stage in batches of {args.batch_size}" + (f", floor {floor}" if floor else ""))
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
