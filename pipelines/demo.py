"""The demo (`simplepose demo`): the labeling job end to end on an embedded local stack, in a minute or two on a laptop.

It starts an S3-protocol server on loopback (moto's standalone server), uploads a generated sample set
(`pipelines.synthetic`: stick figures plus broken objects), runs the real labeling job
(`pipelines.label.run_label_job`, Ray Data on a local Ray) from `s3://` to Parquet tables in `s3://`,
reads the tables back, copies the run into WORKDIR/RUN_ID/tables and renders overlays into
WORKDIR/RUN_ID/overlays.

Weights: by default the tiny IMHN shipped with the package (`jobs/weights/imhn-tiny-stickfigures.pt`,
1 stack, width 32), trained by `simplepose train jobs/configs/stickfigures_cpu.yaml` on generated stick
figures (docs/training.md): it finds the demo's stick figures and is useless on photographs. With --model
(a checkpoint URI or models:/NAME@ALIAS, e.g. the authors' converted checkpoint) the poses are that model's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.images import STATUSES
from pipelines.label.config import label_config
from pipelines.label.job import run_label_job
from pipelines.local_copy import copy_run_with_images
from pipelines.ray_cluster import connect_ray
from pipelines.render import render_run
from pipelines.synthetic import broken_objects, sample_images
from simplepose.checkpoint import load_checkpoint

LOG = logging.getLogger(__name__)

BUCKET = "simplepose-demo"
SHIPPED_WEIGHTS = "imhn-tiny-stickfigures.pt"
"""Package data in jobs/weights/: the stick-figure IMHN(stacks=1, width=32, increase=8), our checkpoint format."""
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}


def run_demo(workdir: str, images: int = 8, model: str | None = None, boxsize: int = 256, seed: int = 0,
             min_score: float = 0.2) -> int:
    """The whole demo (module docstring), printing as it goes; `workdir` gets RUN_ID/tables and RUN_ID/overlays.
    Returns the exit status (0)."""
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with loopback_s3() as endpoint:
        print(f"S3-protocol server (moto) on {endpoint}; bucket s3://{BUCKET}")
        objects = upload_samples(images, seed)
        print(f"uploaded {objects} objects to s3://{BUCKET}/images/ "
              f"({images} stick-figure JPEGs and {objects - images} broken objects)")
        model_uri = model or upload_shipped_weights()
        with local_ray():
            summary = label(model_uri, boxsize)
        run_uri = summary.output
        print(f"\nlabeling job finished (weights: see the end):\n  {summary.format()}\n")
        show_tables(run_uri)
        # One folder per run id (inputs + model + options), so a rerun never mixes files of different runs.
        tables_dir, overlays_dir = workdir / summary.run_id / "tables", workdir / summary.run_id / "overlays"
        copied = copy_run_with_images(run_uri, tables_dir)  # its URIs must outlive the loopback server
        rendered = render_run(run_uri, str(overlays_dir), limit=None, min_score=min_score)
    print(f"\nrun copied to {tables_dir} with its {copied} images (the copy's URIs point at them); query it "
          f"with DuckDB: SELECT status, count(*) FROM '{tables_dir / 'images' / '*.parquet'}' GROUP BY status)")
    print(f"{rendered.images} overlays ({rendered.persons} persons scoring >= {min_score} drawn) in "
          f"{overlays_dir}")
    if model is None:
        metadata = shipped_metadata()
        print(f"\nWEIGHTS: {metadata['name']} {metadata['version']}, the tiny IMHN shipped with SimplePose "
              f"(1 stack, width 32), trained by our own `{metadata['command']}` on {metadata['trained_on']}. "
              f"Good for: {metadata['good_for']}. Pass --model with a checkpoint trained on COCO (e.g. the "
              "authors' converted one) for poses of real people.")
    else:
        print(f"\nWEIGHTS: {model} ({summary.model_name} {summary.model_version}); the images are synthetic "
              "stick figures, not photographs, so even a good COCO model may find few of them.")
    print(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port) for the duration; AWS_ENDPOINT_URL and dummy credentials are
    set for this process (and the Ray workers it starts) and restored afterwards. Yields the endpoint URL."""
    try:  # deferred: moto is the optional `local` extra
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        raise RuntimeError("simplepose demo needs the local stack: pip install 'simplepose[local]' "
                           f"(moto[server]); {error}") from error
    for noisy in ("werkzeug", "botocore", "aiobotocore"):  # per-request and "found credentials" INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield endpoint
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def upload_samples(count: int, seed: int) -> int:
    """Create the bucket and upload `count` sample images plus the broken objects; returns the object count."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    samples = sample_images(count, seed=seed) + broken_objects(seed=seed)
    fs.pipe({f"{BUCKET}/images/{s.name}": s.data for s in samples})
    return len(samples)


def shipped_weights_path() -> Path:
    """Local path of the shipped stick-figure checkpoint (package data of `jobs`)."""
    path = Path(str(resources.files("jobs") / "weights" / SHIPPED_WEIGHTS))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped demo weights {path} are missing: reinstall simplepose")
    return path


def shipped_metadata() -> dict:
    """The provenance stored in the shipped checkpoint (name, version, trained_on, command, good_for...)."""
    return load_checkpoint(shipped_weights_path())[2]


def upload_shipped_weights() -> str:
    """Copy the shipped checkpoint to s3://BUCKET/models/ (the job reads its model from the store); returns the URI."""
    uri = f"s3://{BUCKET}/models/{SHIPPED_WEIGHTS}"
    storage.write_atomic(uri, shipped_weights_path().read_bytes())
    return uri


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """A quiet local Ray on this machine's cores, sized for a demo, started after the S3 settings so its workers
    inherit them."""
    with tempfile.TemporaryDirectory(prefix="sp-ray-", dir="/tmp") as temp_dir:  # short: AF_UNIX path limit
        # address="local": never join $RAY_ADDRESS, whose workers could not reach this loopback S3 server.
        with connect_ray("local", num_cpus=max(2, os.cpu_count() or 2), object_store_memory=512 << 20,
                         temp_dir=temp_dir):
            yield


def label(model_uri: str, boxsize: int):
    """Run the labeling job on s3://BUCKET/images/ into s3://BUCKET/runs/demo; returns its LabelSummary."""
    config = label_config(f"s3://{BUCKET}/images/", f"s3://{BUCKET}/runs/demo", model_uri, progress_interval_s=5.0,
                          **{"infer.boxsize": boxsize, "network.device": "cpu"})
    return run_label_job(config)


def show_tables(run_uri: str) -> None:
    """Print image rows per status (with the reasons of failures) and a few poses, read back with pyarrow."""
    fs, path = storage.filesystem(run_uri)
    images = pq.read_table(f"{path}/images", filesystem=fs)
    poses = pq.read_table(f"{path}/poses", filesystem=fs)
    print(f"images table: {images.num_rows} rows; poses table: {poses.num_rows} rows")
    counts = images.group_by("status").aggregate([("status", "count")]).to_pylist()
    order = {status: i for i, status in enumerate(STATUSES)}
    for row in sorted(counts, key=lambda r: order.get(r["status"], len(order))):
        print(f"  {row['status']:>15}: {row['status_count']:3d}  ({STATUSES.get(row['status'], '?')})")
    failures = images.filter(pc.not_equal(images["status"], "ok")).sort_by("input_index")
    for row in failures.select(["image_id", "status", "error"]).to_pylist():
        print(f"  {row['image_id']}: {row['status']}: {row['error']}")
    if poses.num_rows:
        top = poses.sort_by([("score", "descending")]).slice(0, 3)
        print("highest-scoring poses:")
        for row in top.select(["image_id", "person_index", "score", "num_keypoints", "bbox_x", "bbox_y", "bbox_w",
                               "bbox_h"]).to_pylist():
            print(f"  {row['image_id']} person {row['person_index']}: score {row['score']:.3f}, "
                  f"{row['num_keypoints']} keypoints, box x {row['bbox_x']:.0f} y {row['bbox_y']:.0f} "
                  f"w {row['bbox_w']:.0f} h {row['bbox_h']:.0f}")
