"""The labeling driver's watchdog: progress lines while no batch arrives, the stages that wait for resources,
and the stall timeout (docs/reliability.md).

Ray Data's iterator blocks the driver while no output arrives (an actor pool that cannot be placed, a lost
node being replaced), so progress is reported from a thread: every `interval` seconds it asks the GCS which
of this job's stage actors are not placed yet (pending creation or restarting) and names them with the
resources they need and the largest free / total resources of any alive node; the line is logged with the
progress line. When no new row has arrived for `stall_timeout_s`, it logs why and interrupts the driver's
main thread (`STALL_SIGNAL` to that thread, whose handler raises KeyboardInterrupt: Ray Data's iterator stops
its execution as on Ctrl-C), and `run_label_job` raises `LabelJobStalled`. Committed chunks stay: the re-run
resumes.

Not SIGINT itself: a job started in the background by a script (`simplepose label ... &`, `nohup`) inherits
SIGINT ignored from the shell, and a library may leave its own SIGINT handler behind (Ray Train's `fit`
does); either way a stalled job would never stop. The watchdog owns its signal's handler while it runs.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping

from pipelines.errors import JobError

LOG = logging.getLogger(__name__)

STAGE_CLASSES = {"DecodeStage": "decode", "NetworkStage": "network", "AssembleStage": "assemble"}
"""Actor class of each stage's pool (Ray Data names its actors MapWorker(MapBatches(<class>)))."""
UNPLACED = ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")
STALL_SIGNAL = signal.SIGUSR2
"""Sent by the watchdog to the driver's main thread on a stall (SIGUSR1 is Ray Tune's)."""


class LabelJobStalled(JobError):
    """No output row for `stall_timeout_s`; the message says which stages wait for which resources (the CLI
    prints it and the hint, exit status 1)."""

    def __init__(self, message: str):
        super().__init__(message, "committed chunks are kept: fix the cluster or the stage's resources "
                                  "(--*-cpus, --*-actors) and re-run the same command to resume")


def stage_resources(config, device: str) -> dict[str, dict[str, float]]:
    """Logical resources one actor of each stage asks for (as `graph.stages` sets them)."""
    network = {"CPU": 1.0, "GPU": 1.0} if device == "cuda" else {"CPU": config.network.cpus}
    return {"decode": {"CPU": config.decode.cpus}, "network": network, "assemble": {"CPU": config.assemble.cpus}}


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def waiting_stages(needs: Mapping[str, Mapping[str, float]]) -> str:
    """'' when every stage actor of this job is alive, else e.g. "network waits for 1 actor of CPU 3 (no alive
    node has that: largest CPU 2 total, 0.5 free)" for actors no node holds yet (no worker process, no
    address) and "decode: 1 actor starting" for placed ones whose constructor runs. Reads the actor table from
    the GCS (no dashboard / State API needed)."""
    import ray  # deferred like every Ray import of the job: Ray's environment is set when it starts
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    unplaced: dict[str, int] = {}
    starting: dict[str, int] = {}
    for actor in state.actors().values():
        if actor.get("JobID") != job or actor.get("State") not in UNPLACED:
            continue
        name = actor.get("ActorClassName", "")
        stage = next((s for cls, s in STAGE_CLASSES.items() if f"({cls})" in name or name == cls), None)
        if stage is not None:
            placed = actor.get("Pid") or actor.get("Address", {}).get("IPAddress")
            counts = starting if placed else unplaced
            counts[stage] = counts.get(stage, 0) + 1
    parts = [f"{stage}: {n} actor{'s' if n > 1 else ''} starting" for stage, n in sorted(starting.items())]
    if not unplaced:
        return "; ".join(parts)
    totals = state.state.total_resources_per_node()
    free = state.available_resources_per_node()
    for stage, count in sorted(unplaced.items()):
        need = needs.get(stage, {})
        fits = [node for node, total in totals.items() if all(total.get(k, 0) >= v for k, v in need.items())]
        if fits:
            best = max(fits, key=lambda n: free.get(n, {}).get("CPU", 0))
            where = (f"{len(fits)} alive node{'s' if len(fits) > 1 else ''} large enough, the freest has CPU "
                     f"{free.get(best, {}).get('CPU', 0):g} free")
        else:
            best = max(totals, key=lambda n: totals[n].get("CPU", 0), default=None)
            where = ("no alive node has that: largest " +
                     (f"CPU {totals[best].get('CPU', 0):g} total, {free.get(best, {}).get('CPU', 0):g} free"
                      if best else "none"))
        parts.insert(0, f"{stage} waits for {count} actor{'s' if count > 1 else ''} of {_fmt(need)} ({where})")
    return "; ".join(parts)


class Watchdog:
    """Runs while the driver consumes the dataset. `writer` has `last_progress` (monotonic time of the last
    new row), `waiting` (set here) and `_report()` (the progress line)."""

    def __init__(self, writer, interval_s: float, stall_timeout_s: float | None,
                 waiting: Callable[[], str] = lambda: ""):
        self.writer, self.interval, self.timeout, self.waiting = writer, max(0.05, interval_s), stall_timeout_s, waiting
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="label-watchdog", daemon=True)
        self._previous_handler = None

    def __enter__(self) -> "Watchdog":
        self.writer.last_progress = time.monotonic()
        if threading.current_thread().ident != self._main:
            self.timeout = None  # cannot interrupt a non-main thread's blocking iterator: report only
        if self.timeout is not None:
            self._previous_handler = signal.signal(STALL_SIGNAL, _interrupt)
        self._thread.start()
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._previous_handler is not None:
            signal.signal(STALL_SIGNAL, self._previous_handler)
        if self.stalled is not None and kind is not None and issubclass(kind, KeyboardInterrupt):
            raise LabelJobStalled(self.stalled) from None
        return False

    def _run(self) -> None:
        tick = min(self.interval, 1.0, self.timeout or 1.0)
        last_check = 0.0
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last_check >= self.interval:
                last_check = now
                try:
                    self.writer.waiting = self.waiting()
                except Exception as error:  # noqa: BLE001 - the GCS may be unreachable for a moment
                    self.writer.waiting = f"(resources unknown: {type(error).__name__})"
                self.writer._report()
            idle = now - self.writer.last_progress
            if self.timeout is not None and idle >= self.timeout:
                try:
                    waiting = self.waiting()
                except Exception:  # noqa: BLE001
                    waiting = self.writer.waiting
                self.stalled = (f"no progress for {idle:.0f} s (stall timeout {self.timeout:g} s): "
                                f"{waiting or 'no stage is waiting for resources (slow or hung stage)'}; "
                                f"{self.writer.rows_written} objects committed, {len(self.writer.expected)} chunks "
                                f"left")
                LOG.error("stalled: %s", self.stalled)
                signal.pthread_kill(self._main, STALL_SIGNAL)
                return


def _interrupt(signum, frame):
    raise KeyboardInterrupt
