"""The oracle (`simplepose oracle`): decode perfect heatmaps of a COCO keypoint file, the ceiling of the
grouping alone (no network, no images).

Every image's ground truth is rendered with `simplepose.targets.render_heatmaps` over the whole image at stride
4 (no crop), passed through the inference post-processing (reference mode: the authors' x4 cubic upsampling to
the original size, `simplepose.infer.upsample_reference`; default mode: the stride-4 grid as is,
`simplepose.infer.heatmaps_from_stride4`) and decoded. COCOeval stats and the decoder's speed per core (one
torch thread; tensor and assembly stages timed separately, rendering and post-processing excluded) are printed.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines import storage
from simplepose.coco import evaluate_keypoints
from simplepose.decode import (DecoderConfig, PoseFloor, assemble, coco_results, find_candidates_batch,
                               select_poses)
from simplepose.infer import Heatmaps, heatmaps_from_stride4, upsample_reference
from simplepose.skeleton import coco_to_reference
from simplepose.targets import render_heatmaps

STRIDE = 4


def perfect_heatmaps(image: dict, keypoint_lists: list, mode: str, map_dtype: str = "float16"):
    """Ground-truth maps of one image as the decoder's input: (Heatmaps, post-processing seconds).

    The maps are rounded to `map_dtype` and back to float32 first: the authors' oracle figures were measured
    on float16 maps (equal bit for bit to render_heatmaps cast to float16).
    """
    height, width = image["height"], image["width"]
    coco = np.asarray(keypoint_lists, dtype=np.float64).reshape(-1, 17, 3)
    maps = render_heatmaps(coco_to_reference(coco).reshape(-1, 18, 3),
                           (math.ceil(height / STRIDE), math.ceil(width / STRIDE)))
    maps = maps.astype(map_dtype).astype(np.float32)
    start = time.perf_counter()
    if mode == "reference":
        full = torch.from_numpy(upsample_reference(maps[:48], (height, width), (height, width)))
        heatmaps = Heatmaps(full[30:48].contiguous(), full[:30].contiguous(), (1.0, 1.0, 0.0, 0.0),
                            (height, width))
    else:
        heatmaps = heatmaps_from_stride4(torch.from_numpy(maps), 1.0, (height, width))
    return heatmaps, time.perf_counter() - start


def _decode_chunk(task):
    """Worker: decode a chunk of images, `batch_size` at a time through the tensor stage -> (results,
    [(tensor_s, assembly_s, tensor_cpu_s, assembly_cpu_s, postprocess_s)] per image; a batch's tensor-stage
    time is shared equally by its images)."""
    torch.set_num_threads(1)
    config, map_dtype, batch_size, items, floor = task
    visibility = "reference" if config.is_reference else "score"
    results, times = [], []
    if items:  # warm-up: torch's first calls allocate and dispatch slowly; not timed
        warm = [perfect_heatmaps(*item, config.mode, map_dtype)[0] for item in items[:batch_size]]
        [assemble(c, config) for c in find_candidates_batch(warm, config)]
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        rendered = [perfect_heatmaps(image, keypoint_lists, config.mode, map_dtype)
                    for image, keypoint_lists in chunk]
        w0, c0 = time.perf_counter(), time.thread_time()
        candidates = find_candidates_batch([heatmaps for heatmaps, _ in rendered], config)
        tensor_wall, tensor_cpu = (time.perf_counter() - w0) / len(chunk), (time.thread_time() - c0) / len(chunk)
        for (image, _), cands, (_, post) in zip(chunk, candidates, rendered):
            w1, c1 = time.perf_counter(), time.thread_time()
            poses = assemble(cands, config)
            times.append((tensor_wall, time.perf_counter() - w1, tensor_cpu, time.thread_time() - c1, post))
            results += coco_results(poses if floor is None else select_poses(poses, floor), image["id"], visibility)
    return results, times


@dataclass(frozen=True)
class OracleConfig:
    """One oracle run (`simplepose oracle`). annotations: COCO person keypoints JSON (any URI).
    decoder: the decoder under test. floor: the poses tables' output floor applied before COCOeval (untimed),
    None = every decoded person. map_dtype: precision of the rendered maps before decoding ("float16" is how
    the authors' oracle maps were recorded). batch_size: images per tensor-stage call, as a labeling actor
    batches. workers: processes, one torch thread each. limit: only the first N images. results: also write
    the COCO results JSON to this URI."""
    annotations: str
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    floor: PoseFloor | None = None
    map_dtype: str = "float16"
    batch_size: int = 16
    workers: int = 1
    limit: int | None = None
    results: str | None = None

    def __post_init__(self):
        if self.map_dtype not in ("float16", "float32"):
            raise ValueError(f"OracleConfig.map_dtype: float16 or float32, got {self.map_dtype!r}")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError(f"OracleConfig: batch_size and workers must be >= 1, got {self.batch_size}, "
                             f"{self.workers}")


def run_oracle(config: OracleConfig) -> tuple[list[dict], dict, np.ndarray]:
    """-> (COCO results, stats dict, per-image times float64 (n, 5)); see `_decode_chunk` for the columns.
    Writes the results to `config.results` when set."""
    annotations, workers, limit, map_dtype = config.annotations, config.workers, config.limit, config.map_dtype
    batch_size, floor = config.batch_size, config.floor
    with storage.open_binary(annotations) as f:
        dataset = json.load(f)
    persons: dict[int, list] = {}
    for ann in dataset["annotations"]:
        if not ann.get("iscrowd", 0) and ann.get("num_keypoints", 0) > 0:
            persons.setdefault(ann["image_id"], []).append(ann["keypoints"])
    images = dataset["images"][:limit]
    items = [(image, persons.get(image["id"], [])) for image in images]
    chunks = [items[i::workers] for i in range(workers)]
    if workers == 1:
        outputs = [_decode_chunk((config.decoder, map_dtype, batch_size, items, floor))]
    else:
        with ProcessPoolExecutor(workers) as pool:
            outputs = list(pool.map(_decode_chunk, [(config.decoder, map_dtype, batch_size, chunk, floor)
                                                          for chunk in chunks]))
    results = [r for out, _ in outputs for r in out]
    times = np.array([t for _, ts in outputs for t in ts]).reshape(-1, 5)
    stats = evaluate_keypoints(dataset, results, image_ids=[image["id"] for image in images])
    if config.results:
        storage.write_atomic(config.results, json.dumps(results).encode())
    return results, stats, times
