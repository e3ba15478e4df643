"""Integration tests of the labeling job: a real loopback S3 server (moto) and a real 2-CPU Ray cluster,
coco-mini images plus broken objects. The model is a tiny IMHN with random weights: the tests check rows,
statuses, exactly-once and resume, not pose quality."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.label import tables
from pipelines.label.config import label_config
from pipelines.label.job import run_label_job

pytestmark = pytest.mark.slow  # labeling jobs on Ray, one in a subprocess

N_IMAGES = 20
BROKEN = {"empty.jpg": "empty", "truncated.jpg": "decode_error", "random.jpg": "decode_error",
          "notes.txt": "decode_error"}
# Small pools and fractional CPUs: the whole graph fits the fixture's 2 CPUs (whole-CPU actors can hang Ray).
SMALL = {"infer.boxsize": 128, "decode.actors": (1, 1), "network.actors": (1, 1), "assemble.actors": (1, 1),
         "network.cpus": 0.5, "read.batch_size": 4, "decode.batch_size": 2, "network.batch_size": 2,
         "assemble.batch_size": 4, "progress_interval_s": 1.0}


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, coco_mini, tmp_path_factory):
    """s3://label-in/imgs/: 20 coco-mini JPEGs and 4 broken objects; s3://label-in/tiny.pt: the model."""
    import s3fs
    import torch

    from simplepose.checkpoint import save_checkpoint
    from simplepose.model import IMHN

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("label-in")
    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:N_IMAGES]
    objects = {f"label-in/imgs/{p.name}": p.read_bytes() for p in images}
    rng = np.random.default_rng(0)
    objects.update({"label-in/imgs/empty.jpg": b"", "label-in/imgs/truncated.jpg": images[0].read_bytes()[:3000],
                    "label-in/imgs/random.jpg": rng.bytes(5000), "label-in/imgs/notes.txt": b"not an image\n"})
    fs.pipe(objects)
    torch.manual_seed(0)
    local = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(IMHN(stacks=1, width=32, increase=8), local, {"name": "tiny-random"})
    fs.put(str(local), "label-in/tiny.pt")
    return fs, [p.name for p in images]


def _download(fs, uri: str, tmp_path) -> str:
    local = tmp_path / "download"
    fs.get(uri.removeprefix("s3://").rstrip("/") + "/", str(local), recursive=True)
    return str(local)


def _check_images_exactly_once(root: str, expected_uris: set[str]):
    images = pq.read_table(f"{root}/images")
    assert images.num_rows == len(expected_uris)
    assert set(images["uri"].to_pylist()) == expected_uris
    assert sorted(images["input_index"].to_pylist()) == list(range(len(expected_uris)))
    return images


def test_label_job_on_s3_with_broken_objects(s3_data, ray_cluster, tmp_path):
    fs, names = s3_data
    config = label_config(input="s3://label-in/imgs/", output="s3://label-out/run1", model="s3://label-in/tiny.pt",
                            chunk_size=5, **SMALL)
    summary = run_label_job(config)
    expected = {f"s3://label-in/imgs/{n}" for n in [*names, *BROKEN]}
    assert summary.images == len(expected) and summary.processed == len(expected)
    assert summary.counts == {"ok": N_IMAGES, "empty": 1, "decode_error": 3}
    assert fs.exists("label-out/run1/_SUCCESS") and len(fs.ls("label-out/run1/images")) == 5
    root = _download(fs, "s3://label-out/run1", tmp_path)
    images = _check_images_exactly_once(root, expected)
    status = dict(zip(images["image_id"].to_pylist(), images["status"].to_pylist()))
    assert {name: status[name] for name in BROKEN} == BROKEN
    errors = dict(zip(images["image_id"].to_pylist(), images["error"].to_pylist()))
    assert errors[names[0]] == "" and errors["truncated.jpg"]
    assert tables.read_metadata(pq.read_schema(f"{root}/poses/part-000000.parquet"))["run"]["model_name"] == \
        "tiny-random"

    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{root}/images/*.parquet') GROUP BY status "
                      f"ORDER BY status").fetchall()
    assert rows == [("decode_error", 3), ("empty", 1), ("ok", N_IMAGES)]
    persons = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/poses/*.parquet')").fetchall()[0][0]
    assert persons == summary.persons == sum(images["num_persons"].to_pylist())

    again = run_label_job(config)  # complete: nothing is redone
    assert again.processed == 0 and again.run_id == summary.run_id


def test_label_job_manifest_with_missing_object(s3_data, ray_cluster, tmp_path):
    fs, names = s3_data
    lines = ["image_id,uri"] + [f"img{i},s3://label-in/imgs/{n}" for i, n in enumerate(names[:3])]
    lines.append("gone,s3://label-in/imgs/does-not-exist.jpg")
    fs.pipe("label-in/manifest.csv", ("\n".join(lines) + "\n").encode())
    out = tmp_path / "out"
    summary = run_label_job(label_config(input="s3://label-in/manifest.csv", output=str(out),
                                           model="s3://label-in/tiny.pt", chunk_size=10, **SMALL))
    assert summary.counts == {"ok": 3, "read_error": 1}
    images = pq.read_table(out / "images").to_pandas().set_index("image_id")
    assert images.loc["gone", "status"] == "read_error" and images.loc["gone", "error"]
    assert list(images.index) == ["img0", "img1", "img2", "gone"] and (out / "_SUCCESS").exists()


def test_label_job_killed_and_rerun_finishes_without_duplicates(s3_data, ray_cluster, tmp_path):
    fs, names = s3_data
    output = "s3://label-out/killed"
    command = [sys.executable, "-m", "jobs.cli", "label", "s3://label-in/imgs/", output,
               "--model", "s3://label-in/tiny.pt", "--chunk-size", "2", "--boxsize", "256",
               "--address", ray_cluster.get_runtime_context().gcs_address, "--network-cpus", "0.5",
               "--decode-actors", "1", "--network-actors", "1", "--assemble-actors", "1",
               "--network-batch-size", "1", "--decode-batch-size", "1", "--read-batch-size", "2"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    committed = []
    while time.monotonic() < deadline and job.poll() is None:
        fs.invalidate_cache()
        committed = fs.ls("label-out/killed/images") if fs.exists("label-out/killed/images") else []
        if len(committed) >= 2:
            break
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert len(committed) >= 2, "the job committed no chunks within 120 s"
    assert not fs.exists("label-out/killed/_SUCCESS"), "the job finished before it could be killed"

    fs.invalidate_cache()
    parts = [p for p in fs.ls("label-out/killed/images") if p.endswith(".parquet")]
    committed_rows = sum(pq.read_metadata(fs.open(p)).num_rows for p in parts)
    summary = run_label_job(label_config(input="s3://label-in/imgs/", output=output, model="s3://label-in/tiny.pt",
                                           chunk_size=2, **{**SMALL, "infer.boxsize": 256}))
    total = N_IMAGES + len(BROKEN)
    # Blocks carry several chunks, so the killed job may have committed every chunk but not _SUCCESS: the
    # re-run then redoes nothing. Either way it processes exactly the objects of the uncommitted chunks.
    assert summary.resumed and summary.images == total and committed_rows >= 4
    assert summary.processed == total - committed_rows
    root = _download(fs, output, tmp_path)
    _check_images_exactly_once(root, {f"s3://label-in/imgs/{n}" for n in [*names, *BROKEN]})
    poses = pq.read_table(f"{root}/poses").to_pandas()
    assert not poses.duplicated(["image_id", "person_index"]).any()
