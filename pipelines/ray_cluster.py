"""Joining or starting Ray, the same way for every job (label, train, demo, bench).

Ray reads its settings from the environment when it starts, and its workers inherit the driver's environment,
so `QUIET_ENV` is applied before `import ray` (docs/architecture.md, "Ray and the stack").
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

LOG = logging.getLogger(__name__)

QUIET_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_BACKEND_LOG_LEVEL": "fatal",
             "MLFLOW_DISABLE_TELEMETRY": "true"}
"""No token-auth file, no usage stats, no C++ actor-argument noise, no MLflow telemetry (set if unset)."""


def quiet_environment() -> None:
    """Apply `QUIET_ENV` to this process (values already set win); call before Ray starts."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def connect_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
                temp_dir: str | None = None) -> Iterator[dict[str, float]]:
    """Use the Ray this process is already connected to, join `address` / $RAY_ADDRESS, or start a local Ray
    (stopped again on exit). `address="local"` always starts a new local Ray; `num_cpus`, `object_store_memory`
    (bytes) and `temp_dir` apply to a Ray this call starts. Yields the cluster's resources ({"CPU": n, "GPU": g})."""
    quiet_environment()
    import ray  # after quiet_environment(): Ray reads those settings when it is imported and started

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        LOG.info("%s", f"joining Ray at {address}" if address and address != "local" else "starting a local Ray")
        ray.init(address=address, num_cpus=num_cpus, object_store_memory=object_store_memory, _temp_dir=temp_dir,
                 include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        started = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its own logger: ray.init's level does not reach it
    try:
        yield dict(ray.cluster_resources())
    finally:
        if started:
            ray.shutdown()
