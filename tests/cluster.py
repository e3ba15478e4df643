"""A real multi-node Ray cluster on one machine, for fault tests (docs/reliability.md, "The cluster fixture").

`MultiNodeCluster` wraps Ray's own test utility `ray.cluster_utils.Cluster`: a head node with no CPUs (it
runs the GCS and the driver's raylet, no work) and worker nodes, each its own raylet, object store and
worker processes, with their own logical CPUs. The test process does not connect to it (it may already be
connected to the session's local Ray): jobs join it by address (`--address` / `LabelJobConfig.address`) from a
subprocess, and faults are injected from outside: SIGKILL of a worker process found by its process title
(`ray::MapWorker(MapBatches(DecodeStage))...`), or `remove_node` (the node's raylet and all its workers die).
A worker process's parent is its node's raylet, which is how the tests tell which node an actor lives on.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines.ray_cluster import quiet_environment


class MultiNodeCluster:
    """Head (0 CPUs) + `workers` nodes of `cpus` logical CPUs each; `stop()` kills every process it started."""

    def __init__(self, temp_dir: str | os.PathLike, workers: int = 2, cpus: float = 2,
                 object_store_memory: int = 128 << 20):
        quiet_environment()
        from ray.cluster_utils import Cluster  # after quiet_environment(): Ray reads it when imported

        from ray._common.utils import get_default_ray_temp_dir

        # Ray writes the head's address to <default temp dir>/ray_current_cluster even with a temp_dir of
        # its own, without creating that folder: on a machine where no Ray ran yet the head fails to start
        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        self.cpus, self.object_store_memory = cpus, object_store_memory
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "object_store_memory": object_store_memory, "include_dashboard": False,
            "temp_dir": str(temp_dir)})
        self.workers = [self.add_worker() for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, cpus: float | None = None):
        return self.cluster.add_node(num_cpus=self.cpus if cpus is None else cpus,
                                     object_store_memory=self.object_store_memory)

    def remove_worker(self, node) -> None:
        """Lose a whole node: its raylet and every worker process on it are killed."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    @staticmethod
    def raylet_pid(node) -> int:
        from ray._private import ray_constants  # deferred with Cluster above (after quiet_environment)

        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def node_of(self, pid: int):
        """The worker node whose raylet is `pid`'s parent, or None."""
        parent = _parent(pid)
        return next((node for node in self.workers if self.raylet_pid(node) == parent), None)

    def processes(self, name: str) -> dict[int, object]:
        """{pid: node} of this cluster's live worker processes titled `name` (never another cluster's)."""
        return {pid: node for pid in ray_workers(name) if (node := self.node_of(pid)) is not None}

    def stop(self) -> None:
        self.cluster.shutdown()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def ray_workers(name: str) -> list[int]:
    """PIDs of live Ray worker processes whose title contains `name` (e.g. "DecodeStage", "RayTrainWorker")."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and name in title:
            pids.append(int(entry.name))
    return pids
