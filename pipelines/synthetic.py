"""A seed to a small synthetic image set that the project may ship: stick figures and broken objects.

The demo and the tests need images without licence questions, so they are drawn here with OpenCV: stick
figures in COCO's 17-keypoint skeleton (`simplepose.skeleton.COCO_SKELETON`) on textured backgrounds, plus
objects that a labeling job must survive (empty, truncated, not an image, a decompression bomb header).
Everything is deterministic from the seed. The drawn keypoints come with each image (COCO order,
x/y in pixels with pixel centres at integer coordinates, v = 2), so tests can build poses tables from them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
import zlib

import cv2
import numpy as np

from pipelines import storage
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

LOG = logging.getLogger(__name__)

# A standing person facing the viewer, in units of body height: (x right, y down) from the top of the head
# at x = 0. Elbows, wrists, knees and ankles are placed by `_figure` from random joint angles.
_HEAD_AND_TORSO = {
    "nose": (0.0, 0.07), "left_eye": (0.022, 0.055), "right_eye": (-0.022, 0.055),
    "left_ear": (0.045, 0.065), "right_ear": (-0.045, 0.065),
    "left_shoulder": (0.11, 0.19), "right_shoulder": (-0.11, 0.19),
    "left_hip": (0.07, 0.52), "right_hip": (-0.07, 0.52),
}
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.15, 0.24, 0.23  # body heights
_JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class SampleImage:
    """One object of the sample set.

    name: object key relative to the upload prefix (e.g. "figures/000.jpg", "broken/empty.jpg").
    data: the encoded bytes. expected_status: what `pipelines.images.decode_image` must report.
    keypoints: float32 (P, 17, 3) of the drawn figures, COCO order, (x, y, v=2), pixels; (0, 17, 3) if none.
    """

    name: str
    data: bytes
    expected_status: str
    keypoints: np.ndarray


def sample_images(count: int = 8, seed: int = 0, size: tuple[int, int] = (384, 512)) -> list[SampleImage]:
    """`count` JPEG scenes of 1-3 stick figures, size (height, width) pixels, deterministic from `seed`."""
    if count < 0:
        raise ValueError(f"sample_images: count must be >= 0, got {count}")
    height, width = size
    if height < 64 or width < 64:
        raise ValueError(f"sample_images: size must be at least 64x64 pixels, got {size}")
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        image, keypoints = draw_scene(rng, height, width, persons=int(rng.integers(1, 4)))
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        assert ok, "cv2.imencode failed on a synthetic scene"
        samples.append(SampleImage(f"figures/{index:03d}.jpg", encoded.tobytes(), "ok", keypoints))
    return samples


def write_coco_dataset(folder: str, count: int, seed: int = 0, heights: tuple[int, int] = (256, 512),
                       aspects: tuple[float, float] = (0.75, 1.6), max_persons: int = 3) -> str:
    """Write a synthetic COCO keypoint set of `count` stick-figure scenes to `folder` (any fsspec URI).

    Layout: FOLDER/images/NNNNNN.jpg and FOLDER/annotations/person_keypoints.json (image ids 1..count,
    one person annotation per figure: keypoints (x, y, v=2) flattened in COCO order, num_keypoints 17,
    bbox x, y, w, h pixels around the figure, area = bbox area, iscrowd 0, segmentation = the bbox polygon;
    the COCO person category with `simplepose.skeleton` names and 1-based skeleton). Each scene has an
    independently drawn height in `heights` (pixels), width = height x aspect, and 1..max_persons figures.
    Deterministic from `seed`. Returns the annotation file's URI.
    """
    if count < 1 or max_persons < 1:
        raise ValueError(f"write_coco_dataset: count and max_persons must be >= 1, got {count}, {max_persons}")
    if heights[0] < 64 or heights[0] > heights[1] or not 0 < aspects[0] <= aspects[1]:
        raise ValueError(f"write_coco_dataset: need 64 <= heights[0] <= heights[1] and 0 < aspects[0] <= "
                         f"aspects[1], got heights {heights}, aspects {aspects}")
    rng = np.random.default_rng(seed)
    fs, root = storage.filesystem(folder.rstrip("/"))
    fs.makedirs(f"{root}/images", exist_ok=True)
    fs.makedirs(f"{root}/annotations", exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        height = int(rng.integers(heights[0], heights[1] + 1))
        width = int(round(height * rng.uniform(*aspects)))
        scene, keypoints = draw_scene(rng, height, width, persons=int(rng.integers(1, max_persons + 1)))
        file_name = f"{image_id:06d}.jpg"
        fs.pipe_file(f"{root}/images/{file_name}",
                     cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])[1].tobytes())
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for kp in keypoints:
            box = _figure_box(kp, height, width)
            x0, y0, w, h = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "keypoints": [round(float(v), 2) for v in kp.reshape(-1)], "num_keypoints": len(kp),
                "bbox": box, "area": w * h,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]})
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINTS),
                "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON]}
    uri = f"{folder.rstrip('/')}/annotations/person_keypoints.json"
    fs.pipe_file(f"{root}/annotations/person_keypoints.json", json.dumps(
        {"info": {"description": f"SimplePose synthetic stick figures, seed {seed}"},
         "images": images, "annotations": annotations, "categories": [category]}).encode())
    LOG.info("wrote %d images and %d persons to %s", count, len(annotations), folder)
    return uri


def _figure_box(keypoints: np.ndarray, height: int, width: int) -> list[float]:
    """[x, y, w, h] pixels around one drawn figure: its keypoints' extent plus the head above the nose and the
    stroke width, clipped to the image."""
    (x0, y0), (x1, y1) = keypoints[:, :2].min(axis=0), keypoints[:, :2].max(axis=0)
    margin = 0.08 * (y1 - y0)  # the head circle (radius 0.065 body) and half a stroke outside the keypoints
    x0, y0 = max(0.0, x0 - margin), max(0.0, y0 - margin)
    x1, y1 = min(width - 1.0, x1 + margin), min(height - 1.0, y1 + margin / 2)
    return [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]


def broken_objects(seed: int = 0) -> list[SampleImage]:
    """Objects that must not stop a labeling job: empty, truncated JPEG, HTML text, a 40000x40000 PNG header."""
    scene, _ = draw_scene(np.random.default_rng(seed), 240, 320, persons=1)
    jpeg = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])[1].tobytes()
    none = np.zeros((0, len(COCO_KEYPOINTS), 3), np.float32)
    return [
        SampleImage("broken/empty.jpg", b"", "empty", none),
        SampleImage("broken/truncated.jpg", jpeg[: len(jpeg) * 3 // 5], "decode_error", none),
        SampleImage("broken/not-an-image.jpg", b"<html><body>403 Forbidden</body></html>\n", "decode_error", none),
        SampleImage("broken/bomb.png", png_header(40000, 40000), "too_large", none),
    ]


def png_header(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares `width` x `height` RGB pixels (a decompression bomb:
    the single IDAT chunk holds one compressed row, so decoding would allocate the full size and then fail)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    row = zlib.compress(bytes(1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def draw_scene(rng: np.random.Generator, height: int, width: int, persons: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with `persons` stick figures side by side.

    Returns (image uint8 (height, width, 3) BGR, keypoints float32 (persons, 17, 3) COCO order, v = 2).
    """
    if persons < 0:
        raise ValueError(f"draw_scene: persons must be >= 0, got {persons}")
    image = _background(rng, height, width)
    slot = width / max(persons, 1)
    keypoints = []
    for p in range(persons):
        body = rng.uniform(0.45, 0.85) * height
        top = rng.uniform(0.03 * height, height - 1.03 * body)  # feet end at ~0.99 body below the top
        centre_x = (p + rng.uniform(0.4, 0.6)) * slot
        kp = _figure(rng, body)
        kp[:, 0] += centre_x
        kp[:, 1] += top
        np.clip(kp[:, 0], 0, width - 1, out=kp[:, 0])
        np.clip(kp[:, 1], 0, height - 1, out=kp[:, 1])
        _draw_figure(image, kp, body, rng)
        keypoints.append(np.concatenate([kp, np.full((len(kp), 1), 2.0)], axis=1))
    return image, np.asarray(keypoints, np.float32).reshape(persons, len(COCO_KEYPOINTS), 3)


def _figure(rng: np.random.Generator, body: float) -> np.ndarray:
    """(17, 2) keypoints of one figure `body` pixels tall, x relative to its centre line, y from its head top."""
    points = {name: np.array(xy, np.float64) for name, xy in _HEAD_AND_TORSO.items()}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        # Angles from straight down, positive = away from the body; the chains bend at elbow and knee.
        arm = rng.uniform(-0.3, 2.4)
        points[f"{side}_elbow"] = points[f"{side}_shoulder"] + _UPPER_ARM * _direction(arm, sign)
        points[f"{side}_wrist"] = points[f"{side}_elbow"] + _FOREARM * _direction(arm + rng.uniform(-1.2, 1.2), sign)
        leg = rng.uniform(-0.05, 0.4)
        points[f"{side}_knee"] = points[f"{side}_hip"] + _THIGH * _direction(leg, sign)
        points[f"{side}_ankle"] = points[f"{side}_knee"] + _SHIN * _direction(leg + rng.uniform(-0.4, 0.3), sign)
    return np.stack([points[name] for name in COCO_KEYPOINTS]) * body


def _direction(angle: float, sign: float) -> np.ndarray:
    return np.array([sign * np.sin(angle), np.cos(angle)])


def _draw_figure(image: np.ndarray, kp: np.ndarray, body: float, rng: np.random.Generator) -> None:
    """Torso, limbs (COCO skeleton) and head of one figure, drawn in place."""
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    skin = (int(rng.integers(60, 120)), int(rng.integers(110, 170)), int(rng.integers(170, 230)))
    thickness = max(2, int(round(0.045 * body)))
    index = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
    torso = kp[[index[n] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip")]]
    cv2.fillConvexPoly(image, np.round(torso).astype(np.int32), colour, cv2.LINE_AA)
    for a, b in COCO_SKELETON:
        cv2.line(image, tuple(int(v) for v in np.round(kp[a])), tuple(int(v) for v in np.round(kp[b])),
                 colour, thickness, cv2.LINE_AA)
    nose = tuple(int(v) for v in np.round(kp[index["nose"]]))
    cv2.circle(image, nose, max(3, int(round(0.065 * body))), skin, -1, cv2.LINE_AA)
    for name in ("left_eye", "right_eye"):
        cv2.circle(image, tuple(int(v) for v in np.round(kp[index[name]])), max(1, thickness // 4), (30, 30, 30), -1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs, a few rectangles and fine grain: texture without people-like structure."""
    coarse = rng.uniform(60, 230, (max(2, height // 64), max(2, width // 64), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        image[y0:y1, x0:x1] = 0.5 * image[y0:y1, x0:x1] + 0.5 * rng.uniform(40, 220, 3)
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
