"""Shared test fixtures: the shared reference data, a real loopback S3 server, a real local Ray cluster.

Shared data (fixtures recorded from the authors' code, coco-mini) is read from `$SIMPLEPOSE_SHARED`, default
`../shared` next to the repository; tests that need it skip with the reason when it is absent.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Settings every test process needs before Ray, MLflow or botocore are imported
# (docs/architecture.md, "Ray and the stack").
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIMPLEPOSE_SHARED", REPO.parent / "shared")).resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set SIMPLEPOSE_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`shared/reference/fixtures`: outputs recorded from the authors' code."""
    return _require(SHARED / "reference" / "fixtures")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """`shared/data/coco-mini`: 80 COCO train2017 images (`train2017/`) and `annotations/`."""
    return _require(SHARED / "data" / "coco-mini")


@pytest.fixture(scope="session")
def coco_mini_annotations(coco_mini) -> Path:
    return _require(coco_mini / "annotations" / "person_keypoints_train2017.json")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto's standalone server) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer  # deferred: moto (extra `local`) is only for the S3 tests

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, tmp_path_factory):
    """A real local Ray cluster (2 logical CPUs, as in CI), started once per session after the S3 server
    so that its workers inherit AWS_ENDPOINT_URL."""
    import ray  # deferred: only Ray tests pay for importing it, after the settings above
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 << 20,
             logging_level=logging.ERROR, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
