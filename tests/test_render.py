"""pipelines.render: overlays drawn from a labeling run's tables (built here from the synthetic samples' keypoints)."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import s3fs

from pipelines.overlay import PALETTE, draw_poses
from pipelines.render import render_run
from pipelines import storage
from pipelines.label import tables
from pipelines.images import decode_image
from pipelines.synthetic import broken_objects, sample_images
from simplepose.decode import POSE_FLOOR
from simplepose.skeleton import COCO_KEYPOINTS


def write_fake_run(root: str, person_scores: float = 0.9) -> list:
    """Upload 3 sample images and a truncated one under ROOT/src/ and write a run in ROOT/run/ whose poses
    are the drawn keypoints (score 1), persons scored `person_scores`, except the last person of each image
    (0.2). Returns the samples in input order."""
    samples = sample_images(3, seed=5, size=(120, 160)) + [broken_objects(seed=5)[1]]
    uris = [storage.join(root, "src", s.name) for s in samples]
    for sample, uri in zip(samples, uris):
        storage.write_atomic(uri, sample.data)
    n = len(samples)
    images = tables.images_table({
        "run_id": np.full(n, "r1", object), "input_index": np.arange(n),
        "image_id": np.array([s.name for s in samples], object),
        "uri": np.array(uris, object), "status": np.array([s.expected_status for s in samples], object),
        "error": np.array(["" if s.expected_status == "ok" else "truncated" for s in samples], object),
        "size_bytes": np.array([len(s.data) for s in samples]), "width": np.full(n, 160), "height": np.full(n, 120),
        "num_persons": np.array([len(s.keypoints) for s in samples])})
    ok = [(s, u) for s, u in zip(samples, uris) if s.expected_status == "ok"]
    keypoints = np.concatenate([s.keypoints for s, _ in ok]).copy()
    keypoints[..., 2] = 1.0
    keypoints[0, 3] = 0.0  # one keypoint not detected
    scores = np.concatenate([np.r_[np.full(len(s.keypoints) - 1, person_scores), 0.2] for s, _ in ok])
    boxes = np.concatenate([np.c_[k[..., :2].min(1), np.ptp(k[..., :2], axis=1)] for k in [s.keypoints for s, _ in ok]])
    counts = [len(s.keypoints) for s, _ in ok]
    poses = tables.poses_table(np.repeat([s.name for s, _ in ok], counts), np.repeat([u for _, u in ok], counts),
                               keypoints, scores, boxes, "r1", "tiny", "1")
    storage.write_atomic(storage.join(root, "run", "images", "part-000000.parquet"), tables.to_parquet_bytes(images))
    storage.write_atomic(storage.join(root, "run", "poses", "part-000000.parquet"), tables.to_parquet_bytes(poses))
    return samples


def test_draw_poses_marks_detected_keypoints_and_limbs_only():
    image = np.full((100, 120, 3), 128, np.uint8)
    keypoints = np.zeros((1, 17, 3))
    index = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
    keypoints[0, index["left_shoulder"]] = (30, 40, 0.9)
    keypoints[0, index["left_elbow"]] = (70, 40, 0.8)
    keypoints[0, index["left_wrist"]] = (np.nan, np.nan, 0.0)  # not detected, as read from the table
    out = draw_poses(image, keypoints, np.array([0.7]), np.array([[10.0, 10.0, 90.0, 80.0]]))
    assert (image == 128).all(), "the input must not be modified"
    colour = np.array(PALETTE[0])
    for x, y in ((30, 40), (70, 40), (50, 40)):  # both keypoints and the limb between them
        np.testing.assert_allclose(out[y, x], colour, atol=2)
    assert (out[40, 85:95] == 128).all()  # nothing towards the missing wrist
    np.testing.assert_allclose(out[50, 10], colour, atol=40)  # left edge of the box (anti-aliased)
    assert (out[95, 5:] == 128).all()  # below the box


def test_draw_poses_validates_the_image():
    with pytest.raises(ValueError, match="uint8"):
        draw_poses(np.zeros((10, 10), np.uint8), np.zeros((0, 17, 3)), np.zeros(0), np.zeros((0, 4)))


def test_render_run_local(tmp_path):
    samples = write_fake_run(str(tmp_path))
    summary = render_run(str(tmp_path / "run"), str(tmp_path / "out"), limit=None, min_score=0.5)
    assert summary.images == 3 and summary.failed == 0
    assert summary.persons == sum(len(s.keypoints) - 1 for s in samples[:3])  # the 0.2 persons are filtered
    assert [uri.rsplit("/", 1)[1] for uri in summary.outputs] == [
        "000000_figures_000.jpg", "000001_figures_001.jpg", "000002_figures_002.jpg"]
    for sample, uri in zip(samples, summary.outputs):
        overlay = decode_image(open(uri, "rb").read())
        original = decode_image(sample.data).image.astype(int)
        assert overlay.status == "ok" and overlay.image.shape == original.shape
        drawn = sample.keypoints[:-1].reshape(-1, 3)  # every keypoint of the persons kept
        x, y = np.round(drawn[:, 0]).astype(int), np.round(drawn[:, 1]).astype(int)
        changed = np.abs(overlay.image.astype(int)[y, x] - original[y, x]).sum(axis=1) > 30
        assert changed.mean() > 0.8  # JPEG + neighbouring figures may hide a few

    limited = render_run(str(tmp_path / "run"), str(tmp_path / "png"), limit=2, image_format="png")
    assert limited.images == 2 and all(uri.endswith(".png") for uri in limited.outputs)
    assert limited.persons == sum(len(s.keypoints) for s in samples[:2])

    (tmp_path / "src" / samples[1].name).unlink()  # a source object deleted since the run
    partial = render_run(str(tmp_path / "run"), str(tmp_path / "partial"), limit=None)
    assert (partial.images, partial.failed) == (2, 1)


def test_render_run_on_object_storage(s3_endpoint):
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("render-test")
    write_fake_run("s3://render-test")
    summary = render_run("s3://render-test/run", "s3://render-test/overlays", limit=1)
    assert summary.images == 1 and summary.outputs[0].startswith("s3://render-test/overlays/000000_")
    data = storage.read_objects(list(summary.outputs))[0]
    assert decode_image(data).status == "ok"


def test_render_run_rejects_a_folder_without_tables(tmp_path):
    with pytest.raises(ValueError, match="no images/ table"):
        render_run(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="limit"):
        render_run(str(tmp_path), str(tmp_path / "out"), limit=-1)


def test_render_command(tmp_path):
    write_fake_run(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "render", str(tmp_path / "run"), str(tmp_path / "out"),
                             "--limit", "0", "--min-score", "0.5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rendered 3 images" in result.stdout
    assert len(list((tmp_path / "out").iterdir())) == 3
    assert cv2.imread(str(sorted((tmp_path / "out").iterdir())[0])) is not None


def test_render_run_applies_the_poses_floor_by_default(tmp_path):
    samples = write_fake_run(str(tmp_path))
    everyone = sum(len(s.keypoints) for s in samples[:3])
    default = render_run(str(tmp_path / "run"), str(tmp_path / "a"), limit=None)
    assert POSE_FLOOR.min_person_score <= 0.2 and default.persons == everyone  # 0.2-score persons pass the floor
    strict = render_run(str(tmp_path / "run"), str(tmp_path / "b"), limit=None, min_keypoints=17)
    assert strict.persons == everyone - 1  # the first person misses one keypoint
    assert render_run(str(tmp_path / "run"), str(tmp_path / "c"), limit=None, min_score=0.25).persons == everyone - 3
