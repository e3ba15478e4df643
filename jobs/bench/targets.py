"""`simplepose bench targets`: training samples per second per core (augmentation + ground truth).

As in the reference's HDF5 pipeline (docs/method.md §4.3), images are decoded and their person masks computed once,
before timing. The timed loop is what a data-loader worker does per batch (`simplepose.samples.build_samples`):
per sample, draw the augmentation, tint, warp image and masks, move the keypoints; then render the 50 target
maps of the whole batch in one pass. Images stay uint8: the training loop makes them float on its device
(`simplepose.model.network_input`). --batch 1 measures sample by sample. Each worker is one process with
OpenCV and torch limited to one thread, so samples per CPU-second is the per-core rate; wall-clock rates are
printed too (they drop when the machine is shared). The reference makes about 40 samples/s per process
(DESIGN.md).

Each worker raises glibc's mmap threshold first (`tune_malloc`). Without it, in a process that imported torch
before OpenCV (as training workers do), the multi-MB arrays of every sample (crop, float image, 50 target maps)
came from fresh mmaps: about 1600 page faults per sample and half the rate, measured. Data-loader workers
should do the same; --default-malloc measures without it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from jobs.bench.machine import describe_machine
from pipelines.train.data import tune_malloc
from simplepose.augment import AugmentConfig, SourceImage
from simplepose.coco import image_masks, load_coco, training_samples
from simplepose.samples import build_samples
from simplepose.targets import STYLES, TargetConfig

REFERENCE_SAMPLES_PER_S = 40.0


def _default_data() -> Path:
    shared = Path(os.environ.get("SIMPLEPOSE_SHARED", "/work/shared"))
    return shared / "data" / "coco-mini"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = _default_data()
    parser.add_argument("--annotations", default=str(data / "annotations" / "person_keypoints_train2017.json"),
                        help="COCO person-keypoint json (default: coco-mini under $SIMPLEPOSE_SHARED)")
    parser.add_argument("--images", default=str(data / "train2017"), help="folder of the json's images")
    parser.add_argument("--size", type=int, default=512, help="crop size in pixels (targets at size / 4)")
    parser.add_argument("--batch", type=int, default=8,
                        help="samples per build_samples call, as a loader worker builds a training batch (default 8, "
                             "the paper's per-GPU batch)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per repeat and worker")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed windows per worker; the best and the median are reported (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--style", choices=STYLES, default="reference", help="target style (TargetConfig)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the samples (default %(default)s)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default mmap threshold (see tune_malloc)")


def _prepare(args: argparse.Namespace):
    """Decode every image that has a sample and compute its masks (untimed, like the reference's HDF5)."""
    coco = load_coco(args.annotations)
    samples = training_samples(coco)
    if not samples:
        raise SystemExit(f"no training samples in {args.annotations}")
    sources = {}
    for sample in samples:
        if sample.image_id not in sources:
            image = cv2.imread(str(Path(args.images) / sample.file_name), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"cannot read image {Path(args.images) / sample.file_name}")
            sources[sample.image_id] = SourceImage.from_arrays(image, *image_masks(coco, sample.image_id))
    return samples, sources


def _worker(args: argparse.Namespace, samples, sources, worker: int) -> list[tuple[int, float, float, int]]:
    """Build samples for args.seconds, args.repeats times; returns per repeat (samples built, CPU seconds,
    wall seconds, page faults)."""
    if not args.default_malloc:
        tune_malloc()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng([args.seed, worker])
    augment_config = AugmentConfig(crop_size=args.size)
    target_config = TargetConfig(style=args.style)
    order = rng.permutation(len(samples))

    def build_batch(start: int) -> None:
        batch = [samples[order[(start + n) % len(order)]] for n in range(args.batch)]
        build_samples([(sources[s.image_id], s) for s in batch], [rng] * args.batch, augment_config,
                      target_config)

    build_batch(0)  # warm-up: first-call costs of numpy, OpenCV and the compiled kernels
    repeats, start = [], 0
    for _ in range(args.repeats):
        count, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        while time.perf_counter() - wall0 < args.seconds:
            build_batch(start + count)
            count += args.batch
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        repeats.append((count, time.process_time() - cpu0, time.perf_counter() - wall0, faults))
        start += count
    return repeats


def main(args: argparse.Namespace) -> int:
    if args.size % 64 or args.size <= 0:
        raise SystemExit(f"--size must be a positive multiple of 64, got {args.size}")
    if args.workers < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--workers, --batch and --repeats must be >= 1")
    print(f"machine: {describe_machine()}")
    # One OpenCV thread from the start: workers forked while OpenCV's pool runs would hang (train_data too).
    cv2.setNumThreads(1)
    start = time.perf_counter()
    samples, sources = _prepare(args)
    print(f"data: {len(samples)} samples from {len(sources)} images of {args.annotations}; decoding and masks "
          f"done once up front in {time.perf_counter() - start:.2f} s (not timed, as the reference's HDF5)")
    print(f"timed per sample: augmentation draw, tint, warp of image + 2 masks, keypoints, "
          f"{args.style} targets (50, {args.size // 4}, {args.size // 4}) rendered per batch of {args.batch}; "
          f"{args.workers} worker(s) x {args.repeats} x {args.seconds:g} s, 1 thread each, glibc mmap threshold "
          f"{'default' if args.default_malloc else 'raised to 64 MiB'}")
    load_before = os.getloadavg()[0]
    jobs = [(args, samples, sources, worker) for worker in range(args.workers)]
    if args.workers == 1:
        results = [_worker(*jobs[0])]
    else:  # fork: the prepared images are shared copy-on-write instead of pickled to each worker
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = pool.starmap(_worker, jobs)
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
          f"{os.cpu_count()} logical cores (other processes inflate CPU time through shared caches)")
    for worker, repeats in enumerate(results):
        for repeat, (count, cpu, wall, faults) in enumerate(repeats):
            print(f"worker {worker} repeat {repeat}: {count} samples, {cpu:.2f} CPU s, {wall:.2f} wall s: "
                  f"{count / cpu:.1f} samples per CPU-second, {count / wall:.1f} samples/s wall, "
                  f"{faults / count:.0f} page faults per sample")
    per_repeat = [[repeats[i] for repeats in results] for i in range(args.repeats)]  # every worker's repeat i
    per_core = [sum(r[0] for r in rows) / sum(r[1] for r in rows) for rows in per_repeat]
    wall = [sum(r[0] for r in rows) / max(r[2] for r in rows) for rows in per_repeat]
    best, median = max(per_core), statistics.median(per_core)
    # As timeit does: other processes only ever add time, so the fastest repeat is the least disturbed.
    print(f"result: {best:.1f} samples/s per core (best of {args.repeats} repeats, CPU time; median "
          f"{median:.1f}); {max(wall):.1f} samples/s wall over {args.workers} worker(s); reference ~"
          f"{REFERENCE_SAMPLES_PER_S:.0f} samples/s per process: x{best / REFERENCE_SAMPLES_PER_S:.1f}")
    return 0
