"""Faults during labeling on a real 3-node Ray cluster (tests/cluster.py): a head with no CPUs and two worker
nodes of 2 logical CPUs each, coco-mini on a loopback S3 server, a tiny random IMHN at boxsize 128.

Each job runs as `simplepose label ... --address` in a subprocess (as a user's driver would) and every fault
is injected from outside: SIGKILL of a stage's actor process, loss of a whole worker node, a stage that no
node can hold. Each run must end with every input exactly once in `images`, the same statuses and the same
persons as the clean run (docs/reliability.md records the measured times)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import s3fs

from cluster import MultiNodeCluster
from fault_inputs import BROKEN, image_objects, loud_random_checkpoint
from run_tables import assert_same_as_clean, tables_of

pytestmark = pytest.mark.slow  # every test runs jobs on a 3-node Ray cluster

N_IMAGES = 38
TOTAL = N_IMAGES + len(BROKEN)
# One actor per stage (0.5 + 0.5 + 0.25 CPUs, + 0.25 per read task): any one node of 2 CPUs can hold the
# whole graph, so the job survives losing the other. Batches of 1-2 rows and chunks of 2: a run has many
# commits (20 chunks) and lasts long enough to inject a fault after the first one.
FLAGS = ["--boxsize", "128", "--scales", "1", "1.5", "--chunk-size", "2", "--read-batch-size", "2", "--decode-batch-size", "1",
         "--network-batch-size", "1", "--assemble-batch-size", "2", "--network-cpus", "0.5",
         "--decode-actors", "1", "--network-actors", "1", "--assemble-actors", "1", "--progress-interval", "1",
         "--min-person-score", "0", "--min-keypoints", "0"]  # the random model's persons are kept
STAGES = {"decode": "DecodeStage", "network": "NetworkStage", "assemble": "AssembleStage"}
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def multinode(s3_endpoint, tmp_path_factory):
    """Head (0 CPUs) + 2 worker nodes (2 CPUs each); started after the S3 server (workers inherit
    AWS_ENDPOINT_URL), stopped at the end of the module."""
    cluster = MultiNodeCluster(tmp_path_factory.mktemp("mn"), workers=2, cpus=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def inputs(s3_endpoint, coco_mini, tmp_path_factory):
    """s3://rel-in/imgs/: 38 coco-mini JPEGs and 2 broken objects; s3://rel-in/tiny.pt: a random tiny IMHN."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("rel-in")
    fs.mkdir("rel-out")
    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:N_IMAGES]
    fs.pipe(image_objects(images, "rel-in/imgs"))
    local = loud_random_checkpoint(tmp_path_factory.mktemp("relmodel") / "tiny.pt")
    fs.put(str(local), "rel-in/tiny.pt")
    return fs


class Job:
    """`simplepose label` in a subprocess joined to the cluster; its log goes to a file."""

    def __init__(self, cluster: MultiNodeCluster, output: str, log, *flags: str, background: bool = False):
        """background: started as a script's `simplepose label ... &` is, with SIGINT ignored (the shell's
        SIG_IGN, which Python keeps)."""
        command = [sys.executable, "-m", "jobs.cli", "label", "s3://rel-in/imgs/", f"s3://{output}",
                   "--model", "s3://rel-in/tiny.pt", "--address", cluster.address, *FLAGS, *flags]
        self.log_path = log
        self.started = time.monotonic()
        self.stop_signal = signal.SIGTERM if background else signal.SIGINT
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                            preexec_fn=ignore_sigint)

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(self.stop_signal)
            self.process.wait(timeout=30)
            pytest.fail(f"the job ran past {timeout} s:\n{self.log()[-3000:]}")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def committed(fs, output: str) -> int:
    fs.invalidate_cache()
    return len(fs.ls(f"{output}/images")) if fs.exists(f"{output}/images") else 0


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def clean(multinode, inputs, tmp_path_factory):
    """A clean run on the cluster; also checks that its stage actors lived on both worker nodes."""
    log = tmp_path_factory.mktemp("clean") / "job.log"
    job = Job(multinode, "rel-out/clean", log)
    nodes: set[int] = set()
    while job.process.poll() is None:
        for name in STAGES.values():
            nodes.update(id(node) for node in multinode.processes(name).values())
        time.sleep(0.2)
    assert job.wait() == 0, job.log()[-3000:]
    print(f"clean run: {job.seconds:.1f} s, stage actors on {len(nodes)} nodes")
    images, poses = tables_of(inputs, "rel-out/clean")
    print(f"clean run: {len(poses)} persons")
    assert len(nodes) == 2, "the stage actors did not spread over both worker nodes"
    images, poses = tables_of(inputs, "rel-out/clean")
    assert dict(images["status"].value_counts()) == {"ok": N_IMAGES, "empty": 1, "decode_error": 1}
    assert len(poses) > 0
    return images, poses


@pytest.mark.parametrize("stage", [pytest.param("decode", marks=pytest.mark.slow), "network",
                                   pytest.param("assemble", marks=pytest.mark.slow)])
def test_stage_actor_sigkilled_mid_run(stage, multinode, inputs, clean, tmp_path):
    """SIGKILL of the stage's actor process after the first commit. Ray restarts the actor (Ray Data's actor
    pools default to max_restarts=-1, max_task_retries=-1) and resubmits its lost tasks; the writer keeps the
    first copy of any row delivered twice. The network (the slowest stage) and assembly (after it) still have
    most inputs to do, so their replacement must run; decoding may already be done with every input."""
    output = f"rel-out/kill-{stage}"
    job = Job(multinode, output, tmp_path / "job.log")
    wait_for(lambda: committed(inputs, output) >= 1 or job.process.poll() is not None, what="a first commit")
    victims = multinode.processes(STAGES[stage])
    if job.process.poll() is not None or not victims:  # timing on a loaded machine, not a broken guarantee
        job.process.kill()
        pytest.skip(f"the fault could not be injected: no live {stage} actor at the first commit")
    victim = next(iter(victims))
    os.kill(victim, signal.SIGKILL)
    killed_at, at = time.monotonic(), committed(inputs, output)
    replaced = None  # seconds until a new actor process of the stage runs (Ray restarts it: max_restarts -1)
    while job.process.poll() is None:
        if replaced is None and set(multinode.processes(STAGES[stage])) - {victim}:
            replaced = time.monotonic() - killed_at
        time.sleep(0.1)
    assert job.wait() == 0, job.log()[-3000:]
    assert at < TOTAL // 2 // 2, "the kill came after half the chunks"
    if stage != "decode":
        assert replaced is not None, "no replacement actor ran"
    print(f"{stage} actor {victim} killed after {at} chunks, replaced after {replaced and round(replaced, 1)} s; "
          f"job {job.seconds:.1f} s")
    assert_same_as_clean(inputs, output, clean, TOTAL)


@pytest.mark.slow
def test_worker_node_lost_mid_run(multinode, inputs, clean, tmp_path):
    """The node holding the network actor goes away (raylet and all its workers killed): Ray Data restarts
    the lost actors on the other node and retries the lost tasks; the job finishes exactly once."""
    output = "rel-out/node-lost"
    job = Job(multinode, output, tmp_path / "job.log")
    wait_for(lambda: committed(inputs, output) >= 1 or job.process.poll() is not None, what="a first commit")
    holders = multinode.processes("NetworkStage")
    assert job.process.poll() is None and holders, job.log()[-2000:]
    node = next(iter(holders.values()))
    at = committed(inputs, output)
    multinode.remove_worker(node)
    try:
        assert job.wait() == 0, job.log()[-3000:]
        print(f"node lost after {at} chunks; job {job.seconds:.1f} s")
        assert_same_as_clean(inputs, output, clean, TOTAL)
    finally:
        multinode.add_worker()  # the module's cluster keeps two worker nodes
        multinode.cluster.wait_for_nodes()


def test_unplaceable_stage_stalls_with_message_then_rerun_completes(multinode, inputs, clean, tmp_path):
    """The network stage asks for 3 CPUs, no node has them: every progress line names the stage and what it
    waits for, and the stall timeout ends the job, also one started in the background with SIGINT ignored;
    the re-run on a placeable setting finishes exactly once."""
    output = "rel-out/stalled"
    timeout = 8
    job = Job(multinode, output, tmp_path / "stalled.log", "--network-cpus", "3", "--stall-timeout", str(timeout),
              background=True)
    rc = job.wait(timeout=120)
    log = job.log()
    print(f"stalled job ended after {job.seconds:.1f} s with rc {rc}:\n" +
          "\n".join(line[:400] for line in log.splitlines()[-3:]))
    assert rc != 0
    assert "network waits for 1 actor of CPU 3 (no alive node has that: largest CPU 2 total" in log
    assert f"stalled: no progress for {timeout} s (stall timeout {timeout} s): network waits for" in log
    assert "simplepose label: error: no progress for" in log and "re-run the same command to resume" in log
    waiting_lines = [line for line in log.splitlines() if "progress:" in line]
    assert waiting_lines and all("waiting: network waits" in line for line in waiting_lines[1:]), waiting_lines
    assert job.seconds < timeout + 60

    rerun = Job(multinode, output, tmp_path / "rerun.log")
    assert rerun.wait() == 0, rerun.log()[-3000:]
    assert "(resumed)" in rerun.log()
    assert_same_as_clean(inputs, output, clean, TOTAL)
