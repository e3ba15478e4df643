"""The stages of the labeling job, as Ray Data `map_batches` callables (testable on a dict batch without Ray).

  read_slices_batch    frozen input slices -> URIs -> bytes (retried), read_error / empty   (Ray tasks, I/O)
  DecodeStage          bytes -> decoded, resized, padded uint8 network inputs              (CPU actors)
  NetworkStage         inputs -> network, flip + scale averaging, keypoint candidates     (GPU actors / CPU)
  AssembleStage        candidates -> persons (greedy assembly, output floor)               (CPU actors)

A batch is a dict of equal-length numpy arrays. Every stage keeps the image columns (`IMAGE_COLUMNS`) and
marks failures in `status` / `error` instead of raising, so each input object stays exactly one row until
the end. Network inputs travel as uint8 tensor columns (`pixels_<scale>`, one (Hp, Wp, 3) array per row):
Ray stores them as Arrow tensors that the next stage reads without unpickling or copying. Candidates (a few
kB per image) are pickled; persons are raw float32 bytes. Heatmaps never leave the network actor.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines import storage
from pipelines.images import decode_image
from pipelines.registry import resolve_model_uri
from pipelines.synthetic import draw_scene
from simplepose.checkpoint import load_model as load_checkpoint_model
from simplepose.decode import (
    POSE_FLOOR,
    assemble,
    find_candidates,
    find_candidates_batch,
    select_poses,
)
from simplepose.infer import (
    ScaleInput,
    heatmaps_from_stride4,
    predict_inputs,
    prepare_model,
    preprocess,
)
from simplepose.onnx_export import OnnxNetwork, import_onnxruntime
from simplepose.skeleton import coco_to_reference
from simplepose.targets import render_heatmaps

LOG = logging.getLogger(__name__)

IMAGE_COLUMNS = ("input_index", "image_id", "uri", "status", "error", "size_bytes", "width", "height")
"""Columns every stage passes on (one row per input object)."""

OK = "ok"
NETWORK_ENGINES = ("torch", "onnxruntime", "null")
"""torch: the IMHN. onnxruntime: the IMHN exported to ONNX, run by onnxruntime's CPU provider (float32, CPU
nodes only; 1.6-2.5x less CPU per image than torch on our CPUs, docs/benchmarks.md; extra simplepose[onnx]).
null: an instant stand-in for benchmarks of the CPU path (`NullNetwork`)."""

_EMPTY_PIXELS = np.zeros((0, 0, 3), np.uint8)


def _errors(count: int) -> dict[str, np.ndarray]:
    return {"status": np.full(count, OK, dtype=object), "error": np.full(count, "", dtype=object)}


def _describe(error: BaseException) -> str:
    """`Type: first line of the message`, bounded; never includes request headers or credentials."""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}"[:500]


def _carry(batch: Mapping[str, np.ndarray], **columns: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: np.asarray(batch[name]) for name in IMAGE_COLUMNS if name in batch}
    out.update(columns)
    return out


def _object_column(values: Sequence) -> np.ndarray:
    """A 1-D object array of `values` (numpy would make a 4-D array of equal-shaped images)."""
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


def read_input_slice(chunk_uri: str, start: int, stop: int, storage_options: Mapping | None = None
                     ) -> dict[str, np.ndarray]:
    """Rows start..stop-1 (positions within the chunk) of a frozen input chunk: input_index, image_id, uri."""
    with storage.open_binary(chunk_uri, storage_options) as f:
        table = pq.read_table(f).slice(start, stop - start)
    return {"input_index": table["input_index"].to_numpy(),
            "image_id": np.asarray(table["image_id"].to_pylist(), dtype=object),
            "uri": np.asarray(table["uri"].to_pylist(), dtype=object)}


def read_slices_batch(batch: Mapping[str, np.ndarray], storage_options: Mapping | None = None,
                      retries: int = 3) -> dict[str, np.ndarray]:
    """{chunk_uri, start, stop} (slices of frozen input chunks) -> one row per object of those slices."""
    parts = [read_input_slice(str(uri), int(start), int(stop), storage_options)
             for uri, start, stop in zip(batch["chunk_uri"], batch["start"], batch["stop"])]
    rows = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]} if parts else \
        {"input_index": np.zeros(0, np.int64), "image_id": np.zeros(0, object), "uri": np.zeros(0, object)}
    return read_objects_batch(rows, storage_options, retries)


def read_objects_batch(batch: Mapping[str, np.ndarray], storage_options: Mapping | None = None,
                       retries: int = 3) -> dict[str, np.ndarray]:
    """{input_index, image_id, uri} -> + data (bytes), size_bytes, status ("ok", "read_error", "empty"), error.

    Transient store errors are retried (`storage.read_objects`); an unreadable object becomes one
    read_error row with the reason.
    """
    uris = [str(u) for u in batch["uri"]]
    outcomes = storage.read_objects(uris, storage_options, retries=retries)
    n = len(uris)
    flags = _errors(n)
    data = np.empty(n, dtype=object)
    sizes = np.zeros(n, dtype=np.int64)
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            flags["status"][i], flags["error"][i], data[i] = "read_error", _describe(outcome), b""
            continue
        data[i], sizes[i] = outcome, len(outcome)
        if not outcome:
            flags["status"][i], flags["error"][i] = "empty", "the object has 0 bytes"
    return {"input_index": np.asarray(batch["input_index"], np.int64), "image_id": np.asarray(batch["image_id"]),
            "uri": np.asarray(uris, dtype=object), **flags, "size_bytes": sizes, "data": data,
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32)}


def pack_inputs(inputs: Sequence[Sequence | None], scales: int) -> dict[str, np.ndarray]:
    """Per-image `simplepose.infer.preprocess` outputs (None for failed rows) -> tensor and scalar columns:
    pixels_<s> (uint8 (Hp, Wp, 3) per row; (0, 0, 3) for failed rows), factor_<s>, resized_<s> (rh, rw)."""
    columns = {}
    for s in range(scales):
        columns[f"pixels_{s}"] = _object_column([item[s].image if item else _EMPTY_PIXELS for item in inputs])
        columns[f"factor_{s}"] = np.array([item[s].factor if item else 0.0 for item in inputs], np.float64)
        columns[f"resized_{s}"] = np.array([item[s].resized_shape if item else (0, 0) for item in inputs],
                                           np.int32).reshape(-1, 2)
    return columns


def unpack_inputs(batch: Mapping[str, np.ndarray], rows: Sequence[int], scales: int) -> list[list]:
    """The `ScaleInput` lists of `rows` from columns made by `pack_inputs` (views, no copies)."""
    out = []
    for i in rows:
        size = (int(batch["height"][i]), int(batch["width"][i]))
        out.append([ScaleInput(np.asarray(batch[f"pixels_{s}"][i]), float(batch[f"factor_{s}"][i]),
                               tuple(int(v) for v in batch[f"resized_{s}"][i]), size) for s in range(scales)])
    return out


class DecodeStage:
    """bytes -> network inputs (`pack_inputs` columns: per-scale padded uint8 BGR of `simplepose.infer.preprocess`).

    Uses `pipelines.images.decode_image` (corrupt / truncated / oversized objects become statuses) and sets
    width and height (original pixels). infer_config: `simplepose.infer.InferConfig`; max_pixels: images
    with more pixels are `too_large` (checked before full decoding when the header allows).
    """

    def __init__(self, infer_config, max_pixels: int):
        cv2.setNumThreads(1)  # one actor per core: OpenCV threads would oversubscribe
        self.config, self.max_pixels = infer_config, max_pixels
        self._decode, self._preprocess = decode_image, preprocess

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        width, height = np.array(batch["width"], np.int32), np.array(batch["height"], np.int32)
        inputs: list = [None] * n
        for i in np.flatnonzero(status == OK):
            try:
                decoded = self._decode(batch["data"][i], self.max_pixels)
                status[i], error[i] = decoded.status, decoded.error
                width[i], height[i] = decoded.width, decoded.height
                if decoded.status == OK:
                    inputs[i] = self._preprocess(decoded.image, self.config)
            except Exception as failure:  # one bad image must not fail the batch (and its good neighbours)
                status[i], error[i] = "decode_error", _describe(failure)
        return _carry(batch, status=status, error=error, width=width, height=height,
                      **pack_inputs(inputs, len(self.config.scales)))


class NetworkStage:
    """Network inputs -> `candidates` column: pickled `simplepose.decode.Candidates` (small arrays only).

    Loads the model once (`model_uri`: a checkpoint URI of any fsspec filesystem or `models:/name/version`),
    places it on `device` ("cuda" or "cpu"), then per Ray batch groups the images by padded shape and runs
    forwards of up to `forward_batch_size` images of one shape each (only equal shapes share a forward, so
    the maps equal one-by-one runs), flip and scale averaging (`simplepose.infer.predict_inputs`) and the
    decoder's tensor stage `find_candidates_batch` on the same device. Large Ray batches (`network_batch_size`
    in the job) are what fill the forwards: COCO's aspect ratios give ~9 padded shapes at boxsize 512.

    precision: "fp32", "fp16", "bf16" (autocast) or "auto" (resolved here, on the actor's own device: bf16
    where the GPU supports it, else fp16; fp32 on CPU). channels_last: NHWC activations (faster convolutions
    on tensor cores). compile: `torch.compile` the model once. engine "onnxruntime": the model exported once
    per actor to ONNX in memory and run by onnxruntime with `threads` intra-op threads (`OnnxNetwork`), in
    place of the torch forward only (grouping, averaging and decoding are the torch engine's code); its
    options are checked by `check_engine`. engine "null": no network at all (`NullNetwork`), for benchmarks of
    everything around it. A failing image becomes status inference_error.

    `forward_batch` (int16 column): how many images shared each row's forward, so that a consumer can
    compute the forward batch fill; `forwards` / `images_forwarded` count them on the actor.
    """

    def __init__(self, model_uri: str, infer_config, decoder_config, device: str = "cpu",
                 precision: str = "auto", forward_batch_size: int = 16, threads: int = 1,
                 storage_options: Mapping | None = None, engine: str = "torch", channels_last: bool = False,
                 compile: bool = False):
        check_engine(engine, device, precision, channels_last, compile)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("NetworkStage: device cuda, but this worker sees no CUDA GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.torch, self.device = torch, torch.device(device)
        self.config, self.decoder_config = infer_config, decoder_config
        self.precision = resolve_precision(precision, device)
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.batch_size, self.channels_last = forward_batch_size, channels_last
        self.forwards = self.images_forwarded = 0
        if engine == "null":
            self.model, self.null = None, NullNetwork(decoder_config)
        else:
            self.null = None
            model = prepare_model(load_model(model_uri, storage_options), device, channels_last=channels_last)
            if engine == "onnxruntime":
                self.model = OnnxNetwork(model, threads)
            else:
                self.model = torch.compile(model) if compile else model

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        candidates = np.full(n, b"", dtype=object)
        shared = np.zeros(n, np.int16)
        rows = np.flatnonzero(status == OK)
        scales = len(self.config.scales)
        shapes = [tuple(np.asarray(batch[f"pixels_{s}"][i]).shape for s in range(scales)) for i in rows]
        groups: dict[tuple, list[int]] = {}
        for i, shape in zip(rows, shapes):
            groups.setdefault(shape, []).append(int(i))
        forwards = [g[k:k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]
        for members in forwards:
            prepared = unpack_inputs(batch, members, scales)
            try:
                results = self._candidates(prepared)
                shared[members] = len(members)
            except Exception as failure:  # find the culprit(s): retry one by one so good images survive
                LOG.warning("forward of %d images failed in the network stage (%s); retrying one by one",
                            len(members), _describe(failure))
                results = []
                for item in prepared:
                    try:
                        results.extend(self._candidates([item]))
                    except Exception as single:
                        results.append(single)
                shared[members] = 1
            for i, result in zip(members, results):
                if isinstance(result, BaseException):
                    status[i], error[i] = "inference_error", _describe(result)
                else:
                    candidates[i] = result if isinstance(result, bytes) else pickle.dumps(result, protocol=5)
        return _carry(batch, status=status, error=error, candidates=candidates, forward_batch=shared)

    def _candidates(self, prepared: list) -> list:
        """Candidates (or pickled candidates) of images whose inputs all share one padded shape per scale."""
        self.forwards += 1
        self.images_forwarded += len(prepared)
        if self.null is not None:
            return [self.null.candidates_bytes] * len(prepared)
        heatmaps = predict_inputs(self.model, prepared, self.config, dtype=self.dtype, device=self.device,
                                  batch_size=self.batch_size, channels_last=self.channels_last)
        with self.torch.inference_mode():  # one set of tensor ops for the whole forward (~3x faster per image)
            return find_candidates_batch(heatmaps, self.decoder_config)


class NullNetwork:
    """The network replaced by an instant stand-in: every image gets the same realistic candidates, those of
    perfect maps of three drawn stick figures on a 512 x 683 image (about 50 candidates, 3 persons). Used by
    `simplepose bench label --null-network` to time the CPU path and the driver alone."""

    def __init__(self, decoder_config):
        height, width = 512, 683
        _, keypoints = draw_scene(np.random.default_rng(0), height, width, persons=3)
        maps = render_heatmaps(coco_to_reference(np.asarray(keypoints, np.float64)),
                               (-(-height // 4), -(-width // 4)))
        candidates = find_candidates(heatmaps_from_stride4(torch.from_numpy(maps), 1.0, (height, width)),
                                     decoder_config)
        self.candidates_bytes = pickle.dumps(candidates, protocol=5)


class AssembleStage:
    """`candidates` -> persons: num_persons (int32) and, as raw float32 bytes, pose_keypoints (P, 17, 3)
    COCO order (x, y, score; original pixels), pose_scores (P,) and pose_boxes (P, 4) x, y, w, h.
    floor: `simplepose.decode.PoseFloor` applied to the persons (default `POSE_FLOOR`, the tables' floor)."""

    def __init__(self, decoder_config, floor=None):
        self.config, self.floor = decoder_config, POSE_FLOOR if floor is None else floor
        self._assemble, self._select = assemble, select_poses

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        persons = np.zeros(n, np.int32)
        keypoints, scores, boxes = (np.full(n, b"", dtype=object) for _ in range(3))
        for i in np.flatnonzero(status == OK):
            try:
                poses = self._select(self._assemble(pickle.loads(batch["candidates"][i]), self.config), self.floor)
            except Exception as failure:
                status[i], error[i] = "inference_error", _describe(failure)
                continue
            persons[i] = len(poses.scores)
            keypoints[i] = np.asarray(poses.keypoints, np.float32).tobytes()
            scores[i] = np.asarray(poses.scores, np.float32).tobytes()
            boxes[i] = np.asarray(poses.boxes, np.float32).tobytes()
        extra = {"forward_batch": np.asarray(batch["forward_batch"])} if "forward_batch" in batch else {}
        return _carry(batch, status=status, error=error, num_persons=persons, pose_keypoints=keypoints,
                      pose_scores=scores, pose_boxes=boxes, **extra)


def check_engine(engine: str, device: str, precision: str, channels_last: bool | None = False,
                 compile: bool = False) -> None:
    """ValueError for options that `engine` cannot honour; ImportError (naming the extra) for engine
    onnxruntime without onnxruntime. Cheap: a job can call it before any work.

    onnxruntime runs float32 on the CPU only (device "cpu", or "auto" resolved to cpu by the caller; precision
    "auto" or "fp32") and has no channels_last or compile (torch's options). On GPU nodes torch, with bf16
    autocast, channels_last and compile, is the engine: onnxruntime was measured faster on CPUs only, and its
    GPU build is a different package.
    """
    if engine not in NETWORK_ENGINES:
        raise ValueError(f"engine {engine!r} not in {NETWORK_ENGINES}")
    if engine != "onnxruntime":
        return
    if device not in ("cpu", "auto"):
        raise ValueError(f"engine onnxruntime runs on CPU nodes only, not device {device!r}; use engine torch on GPUs")
    if precision not in ("auto", "fp32"):
        raise ValueError(f"engine onnxruntime runs float32 only, not precision {precision!r}; use precision "
                         f"auto or fp32, or engine torch")
    if channels_last or compile:
        raise ValueError("engine onnxruntime has no channels_last or compile (torch options); turn them off")
    import_onnxruntime()


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> bf16 on a GPU that supports it (this process's GPU), fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_model(model_uri: str, storage_options: Mapping | None = None):
    """IMHN in eval mode on the CPU from a checkpoint URI (any fsspec filesystem) or a models:/ URI."""
    if model_uri.startswith("models:/"):
        return load_checkpoint_model(resolve_model_uri(model_uri))
    with storage.open_binary(model_uri, storage_options) as f:
        return load_checkpoint_model(f)
