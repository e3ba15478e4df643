"""The demo command and its sample set: the parts in process, then the whole demo once in a subprocess."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_render import write_fake_run  # tests/ is on sys.path (rootdir-relative imports)

from pipelines import demo
from pipelines.label.config import label_config
from pipelines.label.stages import AssembleStage, DecodeStage, NetworkStage, load_model
from pipelines.synthetic import broken_objects, draw_scene, png_header, sample_images, write_coco_dataset
from simplepose.coco import training_samples
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

REPO = Path(__file__).resolve().parents[1]


def test_samples_are_deterministic_and_seeded():
    first, again, other = sample_images(3, seed=7), sample_images(3, seed=7), sample_images(3, seed=8)
    assert [s.data for s in first] == [s.data for s in again]
    assert all(a.data != b.data for a, b in zip(first, other))
    assert [s.name for s in first] == ["figures/000.jpg", "figures/001.jpg", "figures/002.jpg"]
    assert [s.data for s in broken_objects(3)] == [s.data for s in broken_objects(3)]


def test_sample_keypoints_lie_on_the_drawn_figures():
    for sample in sample_images(4, seed=2, size=(200, 300)):
        image = np.asarray(Image.open(io.BytesIO(sample.data)))
        assert image.shape == (200, 300, 3)
        kp = sample.keypoints
        assert kp.dtype == np.float32 and kp.shape[1:] == (len(COCO_KEYPOINTS), 3) and 1 <= len(kp) <= 3
        assert (kp[..., 0] >= 0).all() and (kp[..., 0] <= 299).all() and (kp[..., 1] >= 0).all()
        assert (kp[..., 1] <= 199).all() and (kp[..., 2] == 2).all()
        index = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
        # Facing the viewer: the person's left side is on the image's right; the head is above the feet.
        assert (kp[:, index["left_hip"], 0] > kp[:, index["right_hip"], 0]).all()
        assert (kp[:, index["nose"], 1] < kp[:, index["left_hip"], 1]).all()


def test_synthetic_coco_dataset_is_deterministic_and_trainable(tmp_path):
    uri = write_coco_dataset(str(tmp_path / "a"), 3, seed=5, heights=(128, 192))
    assert uri == f"{tmp_path / 'a'}/annotations/person_keypoints.json"
    write_coco_dataset(str(tmp_path / "b"), 3, seed=5, heights=(128, 192))
    data = json.loads(Path(uri).read_text())
    assert data == json.loads((tmp_path / "b" / "annotations" / "person_keypoints.json").read_text())
    assert [i["file_name"] for i in data["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert data["categories"][0]["keypoints"] == list(COCO_KEYPOINTS)
    assert data["categories"][0]["skeleton"] == [[a + 1, b + 1] for a, b in COCO_SKELETON]
    for image in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / "a" / "images" / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3) and 128 <= image["height"] <= 192
    for ann in data["annotations"]:
        kp = np.array(ann["keypoints"]).reshape(17, 3)
        x, y, w, h = ann["bbox"]
        assert ann["num_keypoints"] == 17 and (kp[:, 2] == 2).all() and ann["iscrowd"] == 0
        assert (kp[:, 0] >= x).all() and (kp[:, 0] <= x + w).all()
        assert (kp[:, 1] >= y).all() and (kp[:, 1] <= y + h).all()
        assert ann["area"] == pytest.approx(w * h)
    assert len(training_samples(uri)) >= len(data["images"])  # every scene has a trainable main person
    with pytest.raises(ValueError, match="count"):
        write_coco_dataset(str(tmp_path / "c"), 0)


def test_a_scene_without_persons():
    image, keypoints = draw_scene(np.random.default_rng(0), 64, 80, persons=0)
    assert image.shape == (64, 80, 3) and keypoints.shape == (0, len(COCO_KEYPOINTS), 3)
    with pytest.raises(ValueError, match="persons"):
        draw_scene(np.random.default_rng(0), 64, 80, persons=-1)


def test_png_header_declares_the_size():
    header = Image.open(io.BytesIO(png_header(300, 200)))
    assert (header.format, header.size) == ("PNG", (300, 200))


def test_demo_parts_upload_samples_and_the_shipped_weights():
    before = os.environ.get("AWS_ENDPOINT_URL")
    with demo.loopback_s3() as endpoint:
        assert os.environ["AWS_ENDPOINT_URL"] == endpoint
        assert demo.upload_samples(2, seed=0) == 2 + len(broken_objects())
        s3 = boto3.client("s3", endpoint_url=endpoint)  # this server, whatever clients other tests cached
        listed = s3.list_objects_v2(Bucket=demo.BUCKET, Prefix="images/")["Contents"]
        assert {o["Key"]: o["Size"] for o in listed}["images/broken/empty.jpg"] == 0
        uri = demo.upload_shipped_weights()
        size = s3.head_object(Bucket=demo.BUCKET, Key=uri.split("/", 3)[3])["ContentLength"]
        assert size == demo.shipped_weights_path().stat().st_size < 2 << 20
        model = load_model(uri)
        assert (model.config.stacks, model.config.width, model.config.increase) == (1, 32, 8)
        assert not model.training
    assert os.environ.get("AWS_ENDPOINT_URL") == before
    metadata = demo.shipped_metadata()
    assert "not for real photos" in metadata["good_for"] and "stickfigures_cpu.yaml" in metadata["command"]


def label_in_process(samples, model_uri: str, boxsize: int = 256) -> list[np.ndarray]:
    """The labeling job's stages on `samples` without Ray; returns each image's keypoints (P, 17, 3)."""
    config = label_config(input="x", output="y", model=model_uri, **{"infer.boxsize": boxsize})
    n = len(samples)
    names = np.array([s.name for s in samples], dtype=object)
    batch = {"input_index": np.arange(n), "image_id": names, "uri": names, "status": np.full(n, "ok", dtype=object),
             "error": np.full(n, "", dtype=object), "size_bytes": np.array([len(s.data) for s in samples]),
             "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
             "data": np.array([s.data for s in samples], dtype=object)}
    batch = DecodeStage(config.infer, config.max_pixels)(batch)
    batch = NetworkStage(model_uri, config.infer, config.decoder)(batch)
    batch = AssembleStage(config.decoder)(batch)
    assert batch["status"].tolist() == ["ok"] * n, batch["error"]
    return [np.frombuffer(b, np.float32).reshape(-1, len(COCO_KEYPOINTS), 3) for b in batch["pose_keypoints"]]


def test_shipped_weights_find_held_out_stick_figures():
    # Seed 123 was never used for training (the training set is write_coco_dataset's seed 1) nor by the demo.
    samples = sample_images(4, seed=123)
    found = label_in_process(samples, str(demo.shipped_weights_path()))
    errors, matched = [], 0
    for sample, poses in zip(samples, found):
        assert len(poses) >= 1, f"{sample.name}: no person found"
        for truth in sample.keypoints:
            present = poses[..., 2] > 0
            distance = np.hypot(poses[..., 0] - truth[:, 0], poses[..., 1] - truth[:, 1])  # (P, 17) pixels
            mean = np.where(present, distance, 0).sum(1) / np.maximum(present.sum(1), 1)
            best = int(np.argmin(np.where(present.sum(1) >= 5, mean, np.inf)))
            if present[best].sum() >= 5 and mean[best] < 0.1 * np.ptp(truth[:, 1]):
                matched += 1
                errors.extend(distance[best][present[best]])
    persons = sum(len(s.keypoints) for s in samples)
    assert matched >= 0.75 * persons, f"only {matched} of {persons} drawn persons found"
    assert np.median(errors) < 8.0, f"median keypoint error {np.median(errors):.1f} px"


def test_show_tables_prints_statuses_failures_and_best_poses(tmp_path, capsys):
    write_fake_run(str(tmp_path))
    demo.show_tables(str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "images table: 4 rows" in out
    assert f"{'ok':>15}:   3" in out and f"{'decode_error':>15}:   1" in out
    assert "broken/truncated.jpg: decode_error: truncated" in out
    assert "highest-scoring poses:" in out and "score 0.900" in out


def run_interruptibly(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run with a timeout that sends SIGINT (Ray cleans up on SIGINT, not on SIGKILL)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"{' '.join(command)} ran over {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    images = 3
    result = run_interruptibly([sys.executable, "-m", "jobs.cli", "demo", "--workdir", str(tmp_path),
                                "--images", str(images)], timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    out = result.stdout
    for status, count in (("ok", images), ("empty", 1), ("decode_error", 2), ("too_large", 1)):
        assert f"{status:>15}: {count:3d}" in out
    assert "WEIGHTS: imhn-tiny-stickfigures" in out and "not for real photos" in out
    assert "broken/truncated.jpg: decode_error: JPEG data is corrupt or truncated" in out

    (run_dir,) = list(tmp_path.iterdir())  # WORKDIR/RUN_ID
    assert (run_dir / "tables" / "_SUCCESS").exists()
    table = pq.read_table(run_dir / "tables" / "images")
    assert set(table["run_id"].to_pylist()) == {run_dir.name}
    statuses = dict(zip(table["image_id"].to_pylist(), table["status"].to_pylist()))
    expected = {s.name: s.expected_status for s in sample_images(images) + broken_objects()}
    assert statuses == expected
    poses = pq.read_table(run_dir / "tables" / "poses")
    assert poses.schema.names[:3] == ["run_id", "image_id", "uri"]
    assert poses.num_rows >= images  # the shipped weights find the figures (at least one per image)
    overlays = sorted((run_dir / "overlays").iterdir())
    assert len(overlays) == images and all(p.stat().st_size > 0 for p in overlays)
    # The copy works without the demo's (stopped) S3 server: its URIs name local copies of the images.
    uris = table["uri"].to_pylist() + poses["uri"].to_pylist()
    assert all(uri.startswith("file://") for uri in uris) and all(
        Path(uri.removeprefix("file://")).exists() for uri in uris)
    rendered = subprocess.run([sys.executable, "-m", "jobs.cli", "render", str(run_dir / "tables"),
                               str(tmp_path / "again")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
