"""COCO keypoints: annotation files to training samples, detections to results files and COCOeval stats.

Training samples follow the reference's offline preprocessing (`data/coco_masks_hdf5.py`, docs/method.md §4.3):
one sample per *main person*, holding every other annotated person of the image too (`training_samples`), and
the image's person masks (`image_masks`). `simplepose.samples.build_sample` turns a sample and its prepared
image into the network's (image, mask, targets) triple. Evaluation is the official pycocotools keypoint
COCOeval, returned as data.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from simplepose.samples import TrainingSample
from simplepose.skeleton import coco_to_reference
from simplepose.targets import person_masks

LOG = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
"""The 10 COCO keypoint stats, in pycocotools' `COCOeval.stats` order."""


def load_coco(source) -> COCO:
    """A pycocotools COCO index from a path, an open file (text or binary), a dict, or a COCO (returned as is).

    pycocotools' progress prints are captured and logged at debug level.
    """
    if isinstance(source, COCO):
        return source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            dataset = json.load(f)
    elif hasattr(source, "read"):
        dataset = json.load(source)
    elif isinstance(source, dict):
        dataset = source
    else:
        raise TypeError(f"load_coco: expected a path, file object, dict or COCO, got {type(source).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise ValueError(f"load_coco: not a COCO annotation file, missing {missing}")
    coco = COCO()
    coco.dataset = dataset
    _quietly(coco.createIndex)
    return coco


def _quietly(function, *args):
    """Run a pycocotools call with its prints captured into the debug log."""
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        result = function(*args)
    LOG.debug("pycocotools: %s", captured.getvalue().strip())
    return result


def training_samples(coco, image_ids: Sequence[int] | None = None, min_keypoints: int = 5,
                     min_area: float = 32 * 32, separation: float = 0.3) -> list[TrainingSample]:
    """List the training samples of a COCO keypoint set (path, file, dict or COCO), in image then
    annotation order.

    A main person is a non-crowd annotation with num_keypoints >= min_keypoints and area >= min_area whose
    bbox centre is not closer than separation * max(w, h) of an already chosen main person, using that chosen
    person's bbox. (The reference takes that size from a stale loop variable, the image's last annotation;
    we use the chosen person's, which is evidently what was meant.) Pass a COCO object (`load_coco`) when
    calling this and `image_masks` repeatedly: a path or dict is indexed again on every call.
    """
    coco = load_coco(coco)
    ids = coco.getImgIds() if image_ids is None else list(image_ids)
    unknown = sorted(set(ids) - set(coco.imgs))
    if unknown:
        raise ValueError(f"training_samples: image ids not in the annotations: {unknown[:10]}")
    samples = []
    for image_id in ids:
        info = coco.imgs[image_id]
        persons = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)
                   and a.get("num_keypoints", 0) > 0]
        chosen: list[tuple[np.ndarray, float]] = []  # (centre, radius)
        for index, ann in enumerate(persons):
            if ann["num_keypoints"] < min_keypoints or ann["area"] < min_area:
                continue
            x, y, w, h = ann["bbox"]
            centre = np.array([x + w / 2, y + h / 2])
            if any(np.hypot(*(centre - c)) < radius for c, radius in chosen):
                continue
            chosen.append((centre, separation * max(w, h)))
            ordered = [ann] + persons[:index] + persons[index + 1:]
            keypoints = np.array([a["keypoints"] for a in ordered], dtype=np.float64).reshape(-1, 17, 3)
            samples.append(TrainingSample(
                image_id=image_id, file_name=info["file_name"], height=info["height"], width=info["width"],
                keypoints=coco_to_reference(keypoints), center=(float(centre[0]), float(centre[1])),
                person_height=float(h)))
    LOG.debug("training_samples: %d samples from %d images", len(samples), len(ids))
    return samples


def image_masks(coco, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask_miss, mask_all) uint8 (H, W) in {0, 255} of one image (targets.person_masks, docs/method.md §3.5)."""
    coco = load_coco(coco)
    if image_id not in coco.imgs:
        raise ValueError(f"image_masks: image id {image_id} not in the annotations")
    info = coco.imgs[image_id]
    return person_masks(coco.imgToAnns.get(image_id, []), info["height"], info["width"])


def keypoint_results(image_id: int, keypoints: np.ndarray, scores: np.ndarray) -> list[dict]:
    """COCO results for the persons of one image.

    keypoints: (P, 17, 3) COCO order, (x, y, score) in original image pixels; scores: (P,) person scores.
    Returns [{"image_id", "category_id": 1, "keypoints": 51 floats, "score"}, ...] (pycocotools `loadRes`).
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    if kp.ndim != 3 or kp.shape[1:] != (17, 3) or len(sc) != len(kp):
        raise ValueError(f"keypoint_results: need keypoints (P, 17, 3) and scores (P,), got {kp.shape} and "
                         f"{sc.shape}")
    return [{"image_id": int(image_id), "category_id": 1, "keypoints": [round(float(v), 3) for v in k.ravel()],
             "score": float(s)} for k, s in zip(kp, sc)]


def write_results(results: list[dict], file) -> None:
    """Write a results list as COCO results JSON to a path or a text file object."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "w") as f:
            json.dump(results, f)
    else:
        json.dump(results, file)


def evaluate_keypoints(gt_annotations, results: list[dict], image_ids: Sequence[int] | None = None
                       ) -> dict[str, float]:
    """Official COCO keypoint evaluation (pycocotools COCOeval, iouType "keypoints", OKS).

    gt_annotations: path, file, dict or COCO. results: COCO keypoint results (see `keypoint_results`); the
    caller's dicts are not modified. image_ids: the images evaluated (default: every ground-truth image, so an
    image without results counts as missed). Returns {name: value} for STAT_NAMES; -1 where COCO has no
    ground truth for a stat (e.g. no medium persons). pycocotools' prints go to the debug log.
    """
    gt = load_coco(gt_annotations)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    unknown = sorted(set(ids) - set(gt.imgs))
    if unknown:
        raise ValueError(f"evaluate_keypoints: image_ids not in the ground truth: {unknown[:10]}")
    _check_results(results, set(gt.imgs))
    if results:
        dt = _quietly(gt.loadRes, [copy.deepcopy(r) for r in results])
    else:  # loadRes cannot take an empty list; an empty detection set is still a valid (zero) result
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        _quietly(dt.createIndex)
    evaluator = COCOeval(gt, dt, iouType="keypoints")
    evaluator.params.imgIds = ids
    for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
        _quietly(step)
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def _check_results(results: list[dict], known_ids: set[int]) -> None:
    """Raise a ValueError naming the first malformed result (pycocotools would assert or crash later)."""
    if not isinstance(results, list):
        raise TypeError(f"evaluate_keypoints: results must be a list of dicts, got {type(results).__name__}")
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise TypeError(f"evaluate_keypoints: results[{index}] is a {type(result).__name__}, not a dict")
        missing = [k for k in ("image_id", "category_id", "keypoints", "score") if k not in result]
        if missing:
            raise ValueError(f"evaluate_keypoints: results[{index}] lacks {missing}")
        if result["image_id"] not in known_ids:
            raise ValueError(f"evaluate_keypoints: results[{index}] has image_id {result['image_id']!r}, which "
                             f"is not in the ground truth")
        if result["category_id"] != 1:
            raise ValueError(f"evaluate_keypoints: results[{index}] has category_id {result['category_id']!r}; "
                             f"keypoint results are persons (1)")
        if len(result["keypoints"]) != 51:
            raise ValueError(f"evaluate_keypoints: results[{index}] has {len(result['keypoints'])} keypoint "
                             f"values, expected 51 (17 COCO keypoints as x, y, score)")
    try:
        values = np.array([[*r["keypoints"], r["score"]] for r in results], dtype=np.float64).reshape(-1, 52)
    except (TypeError, ValueError) as error:
        raise ValueError(f"evaluate_keypoints: keypoints and scores must be numbers ({error})") from None
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise ValueError(f"evaluate_keypoints: results[{int(np.argmin(finite))}] has a non-finite keypoint or "
                         f"score")
