"""`simplepose bench decoder`: the decoder's cost on real network maps and on pure noise, with its caps.

Two cases, both with the labeling job's functions (`simplepose.infer.preprocess` -> `predict_inputs` ->
`simplepose.decode.find_candidates_batch` -> `assemble` -> `select_poses`):
  photos: a checkpoint (default: the shipped tiny IMHN, which is poorly suited to photographs and therefore
    gives many weak candidates: a realistic bad case) on the coco-mini train images at --boxsize, one scale,
    flip, stride-4 maps. The network runs once per image, untimed; the tensor stage (batches of
    --batch-size) and the assembly (per image) are timed.
  noise: uniform random maps in [0, 1] at stride 4 for a --noise-size square image (the worst case the caps
    must bound: a local maximum in one cell of nine, nearly every pair accepted).
Figures are per image, one torch thread; `decoder.NAME=VALUE` overrides DecoderConfig fields as in `simplepose
label` and `simplepose oracle` (e.g. `decoder.max_candidates=0 decoder.max_persons=0` for the uncapped decoder).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from jobs.bench.machine import describe_machine
from jobs.options import add_config_arguments, load_job_config, printed_config
from simplepose.checkpoint import load_model
from simplepose.decode import POSE_FLOOR, DecoderConfig, assemble, find_candidates_batch, select_poses
from simplepose.infer import Heatmaps, InferConfig, predict_inputs, prepare_model, preprocess

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "imhn-tiny-stickfigures.pt")
DEFAULT_IMAGES = "../shared/data/coco-mini/train2017"


@dataclass(frozen=True)
class DecoderBenchConfig:
    """The decoder under test (`decoder.*`, the same keys as the labeling job's and the oracle's)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "the benchmarked decoder (decoder.*)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint path (default: the shipped tiny IMHN)")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="folder of JPEG/PNG photos (default %(default)s)")
    parser.add_argument("--limit", type=int, default=80, help="photos to use (default %(default)s)")
    parser.add_argument("--boxsize", type=int, default=512, help="network input height (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="tensor-stage batch (default %(default)s)")
    parser.add_argument("--noise-size", type=int, default=512, help="noise case: image side in pixels")
    parser.add_argument("--noise-images", type=int, default=8, help="noise case: images (default %(default)s)")
    parser.add_argument("--skip-photos", action="store_true", help="only the noise case")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def _summary(counts: list, per_type: list, persons: list, kept: list, tensor_s: list, assembly_s: list) -> dict:
    ms = 1e3 * np.asarray(assembly_s)
    return {
        "images": len(counts),
        "candidates_mean": float(np.mean(counts)), "candidates_max": int(np.max(counts)),
        "max_per_type": int(max(c.max() for c in per_type)),
        "persons_mean": float(np.mean(persons)), "persons_max": int(np.max(persons)),
        "persons_after_floor_mean": float(np.mean(kept)),
        "tensor_ms_mean": 1e3 * float(np.mean(tensor_s)),
        "assembly_ms_median": float(np.median(ms)), "assembly_ms_mean": float(ms.mean()),
        "assembly_ms_max": float(ms.max()),
    }


def decode_timed(heatmaps: list, config, floor, batch_size: int) -> dict:
    """Tensor stage in batches, assembly image by image (timed), then the floor -> summary figures."""
    counts, per_type, persons, kept, tensor_s, assembly_s = [], [], [], [], [], []
    [assemble(c, config) for c in find_candidates_batch(heatmaps[:1], config)]  # warm-up, untimed
    for first in range(0, len(heatmaps), batch_size):
        chunk = heatmaps[first:first + batch_size]
        start = time.perf_counter()
        candidates = find_candidates_batch(chunk, config)
        tensor_s += [(time.perf_counter() - start) / len(chunk)] * len(chunk)
        for cands in candidates:
            start = time.perf_counter()
            poses = assemble(cands, config)
            assembly_s.append(time.perf_counter() - start)
            counts.append(len(cands.types))
            per_type.append(cands.counts)
            persons.append(len(poses))
            kept.append(len(select_poses(poses, floor)))
    return _summary(counts, per_type, persons, kept, tensor_s, assembly_s)


def photo_heatmaps(model_path: str, folder: str, limit: int, boxsize: int) -> list:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))[:limit]
    if not names:
        raise SystemExit(f"bench decoder: no images in {folder}")
    config = InferConfig(boxsize=boxsize, scales=(1.0,), flip=True, aggregation="stride4")
    model = prepare_model(load_model(model_path), "cpu")
    out = []
    for name in names:
        image = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
        out += predict_inputs(model, [preprocess(image, config)], config)
    return out


def noise_heatmaps(size: int, images: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    cells = -(-size // 4)
    return [Heatmaps(torch.rand(18, cells, cells, generator=generator),
                     torch.rand(30, cells, cells, generator=generator), (4.0, 4.0, 1.5, 1.5), (size, size))
            for _ in range(images)]


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    bench_config = load_job_config(DecoderBenchConfig, args)
    if printed_config(args, bench_config):
        return 0
    config = bench_config.decoder
    figures = {"config": {"max_candidates": config.max_candidates, "max_persons": config.max_persons},
               "floor": {"min_person_score": POSE_FLOOR.min_person_score,
                         "min_keypoints": POSE_FLOOR.min_keypoints},
               "machine": describe_machine()}
    print(f"machine: {figures['machine']}")
    print(f"decoder: max_candidates {config.max_candidates}, max_persons {config.max_persons}; floor {POSE_FLOOR}")
    cases = [] if args.skip_photos else [("photos", lambda: photo_heatmaps(args.model, args.images, args.limit,
                                                                            args.boxsize))]
    cases.append(("noise", lambda: noise_heatmaps(args.noise_size, args.noise_images)))
    for name, make in cases:
        figures[name] = result = decode_timed(make(), config, POSE_FLOOR, args.batch_size)
        print(f"{name}: {result['images']} images, candidates mean {result['candidates_mean']:.1f} max "
              f"{result['candidates_max']} (max {result['max_per_type']} of one type), persons mean "
              f"{result['persons_mean']:.1f} max {result['persons_max']}, after the floor "
              f"{result['persons_after_floor_mean']:.1f}; tensor stage {result['tensor_ms_mean']:.2f} ms, assembly "
              f"median {result['assembly_ms_median']:.3f} ms mean {result['assembly_ms_mean']:.3f} ms max "
              f"{result['assembly_ms_max']:.3f} ms per image")
    if args.json:
        print(json.dumps(figures))
    return 0
