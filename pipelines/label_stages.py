"""The stages of the labeling job, as Ray Data `map_batches` callables (testable on a dict batch without Ray).

  read_objects_batch   object URIs -> bytes (retried), status read_error / empty          (Ray tasks, I/O)
  DecodeStage          bytes -> decoded, resized, padded uint8 network inputs              (CPU actors)
  NetworkStage         inputs -> network, flip + scale averaging, keypoint candidates     (GPU actors / CPU)
  AssembleStage        candidates -> persons (greedy assembly)                             (CPU actors)

A batch is a dict of equal-length numpy arrays. Every stage keeps the image columns (`IMAGE_COLUMNS`) and
marks failures in `status` / `error` instead of raising, so each input object stays exactly one row until
the end. Variable-size payloads (network inputs, candidates, persons) travel as bytes columns: pickled for
the library's small dataclasses, raw float32 for the persons; this keeps Ray Data from guessing tensor types.
Only uint8 network inputs and small candidate arrays cross the object store, never heatmaps.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping

import numpy as np

from pipelines import storage

LOG = logging.getLogger(__name__)

IMAGE_COLUMNS = ("input_index", "image_id", "uri", "status", "error", "size_bytes", "width", "height")
"""Columns every stage passes on (one row per input object)."""

OK = "ok"


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


class DecodeStage:
    """bytes -> `inputs` column: pickled `simplepose.infer.preprocess` output (per-scale padded uint8 BGR).

    Uses `pipelines.images.decode_image` (corrupt / truncated / oversized objects become statuses) and sets
    width and height (original pixels). infer_config: `simplepose.infer.InferConfig`; max_pixels: images
    with more pixels are `too_large` (checked before full decoding when the header allows).
    """

    def __init__(self, infer_config, max_pixels: int):
        import cv2

        from pipelines.images import decode_image
        from simplepose.infer import preprocess

        cv2.setNumThreads(1)  # one actor per core: OpenCV threads would oversubscribe
        self.config, self.max_pixels = infer_config, max_pixels
        self._decode, self._preprocess = decode_image, preprocess

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        width, height = np.array(batch["width"], np.int32), np.array(batch["height"], np.int32)
        inputs = np.full(n, b"", dtype=object)
        for i in np.flatnonzero(status == OK):
            try:
                decoded = self._decode(bytes(batch["data"][i]), self.max_pixels)
                status[i], error[i] = decoded.status, decoded.error
                width[i], height[i] = decoded.width, decoded.height
                if decoded.status == OK:
                    inputs[i] = pickle.dumps(self._preprocess(decoded.image, self.config), protocol=5)
            except Exception as failure:  # one bad image must not fail the batch (and its good neighbours)
                status[i], error[i] = "decode_error", _describe(failure)
        return _carry(batch, status=status, error=error, width=width, height=height, inputs=inputs)


class NetworkStage:
    """`inputs` -> `candidates` column: pickled `simplepose.decode.Candidates` (small arrays only).

    Loads the model once (`model_uri`: a checkpoint URI of any fsspec filesystem or `models:/name/version`),
    places it on `device` ("cuda" or "cpu"), then per batch runs `simplepose.infer.predict_inputs` (network,
    flip and scale averaging; `precision` "fp32", "fp16" or "bf16" autocast) and the decoder's tensor stage
    `find_candidates_batch` on the same device. A failing image becomes status inference_error.
    """

    def __init__(self, model_uri: str, infer_config, decoder_config, device: str = "cpu",
                 precision: str = "fp32", network_batch_size: int = 8, threads: int = 1,
                 storage_options: Mapping | None = None):
        import torch

        from simplepose.infer import prepare_model

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.config, self.decoder_config = infer_config, decoder_config
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.batch_size = network_batch_size
        self.model = prepare_model(load_model(model_uri, storage_options), device)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        candidates = np.full(n, b"", dtype=object)
        decoded_rows = np.flatnonzero(status == OK)
        prepared = [pickle.loads(batch["inputs"][i]) for i in decoded_rows]
        try:
            results = self._candidates(prepared)
        except Exception as failure:  # find the culprit(s): retry one by one so good images survive
            LOG.warning("batch of %d failed in the network stage (%s); retrying one by one", len(decoded_rows),
                        _describe(failure))
            results = []
            for item in prepared:
                try:
                    results.extend(self._candidates([item]))
                except Exception as single:
                    results.append(single)
        for i, result in zip(decoded_rows, results):
            if isinstance(result, BaseException):
                status[i], error[i] = "inference_error", _describe(result)
            else:
                candidates[i] = pickle.dumps(result, protocol=5)
        return _carry(batch, status=status, error=error, candidates=candidates)

    def _candidates(self, prepared: list) -> list:
        from simplepose.decode import find_candidates_batch
        from simplepose.infer import predict_inputs

        if not prepared:
            return []
        heatmaps = predict_inputs(self.model, prepared, self.config, dtype=self.dtype, batch_size=self.batch_size)
        with self.torch.inference_mode():  # one set of tensor ops for the whole batch (~3x faster per image)
            return find_candidates_batch(heatmaps, self.decoder_config)


class AssembleStage:
    """`candidates` -> persons: num_persons (int32) and, as raw float32 bytes, pose_keypoints (P, 17, 3)
    COCO order (x, y, score; original pixels), pose_scores (P,) and pose_boxes (P, 4) x, y, w, h."""

    def __init__(self, decoder_config):
        from simplepose.decode import assemble

        self.config, self._assemble = decoder_config, assemble

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        persons = np.zeros(n, np.int32)
        keypoints, scores, boxes = (np.full(n, b"", dtype=object) for _ in range(3))
        for i in np.flatnonzero(status == OK):
            try:
                poses = self._assemble(pickle.loads(batch["candidates"][i]), self.config)
            except Exception as failure:
                status[i], error[i] = "inference_error", _describe(failure)
                continue
            persons[i] = len(poses.scores)
            keypoints[i] = np.asarray(poses.keypoints, np.float32).tobytes()
            scores[i] = np.asarray(poses.scores, np.float32).tobytes()
            boxes[i] = np.asarray(poses.boxes, np.float32).tobytes()
        return _carry(batch, status=status, error=error, num_persons=persons, pose_keypoints=keypoints,
                      pose_scores=scores, pose_boxes=boxes)


def load_model(model_uri: str, storage_options: Mapping | None = None):
    """IMHN in eval mode on the CPU from a checkpoint URI (any fsspec filesystem) or a models:/ URI."""
    from simplepose.checkpoint import load_model as load_checkpoint_model

    if model_uri.startswith("models:/"):
        from pipelines.registry import resolve_model_uri

        return load_checkpoint_model(resolve_model_uri(model_uri))
    with storage.open_binary(model_uri, storage_options) as f:
        return load_checkpoint_model(f)
