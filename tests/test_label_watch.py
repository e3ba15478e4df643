"""The labeling driver's watchdog without Ray: progress lines while the consumer is blocked, the waiting
stages in them, and the stall timeout interrupting a blocked main thread with LabelJobStalled."""
from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from pipelines.errors import JobError, explain
from pipelines.label.watch import STALL_SIGNAL, LabelJobStalled, Watchdog


class Writer:
    def __init__(self):
        self.last_progress = time.monotonic()
        self.waiting, self.rows_written, self.expected, self.lines = "", 3, {4: 2}, []

    def _report(self):
        self.lines.append(self.waiting)


def swallow(signum, frame):  # as the SIGINT handler Ray Train's fit leaves behind: no exception
    pass


@pytest.fixture(params=["default", "ignored", "swallowed"])
def sigint(request):
    """The driver's SIGINT disposition: Python's default; ignored, as for a job a script starts in the
    background (`simplepose label ... &`: the shell sets SIG_IGN); or a handler that raises nothing."""
    handler = {"default": signal.default_int_handler, "ignored": signal.SIG_IGN, "swallowed": swallow}[request.param]
    previous = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, previous)


def test_stall_interrupts_a_blocked_consumer_and_names_the_waiting_stage(caplog, sigint):
    writer = Writer()
    stall_handler = signal.getsignal(STALL_SIGNAL)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, "pipelines.label.watch"), pytest.raises(LabelJobStalled) as raised:
        with Watchdog(writer, 0.1, 0.5, lambda: "network waits for 1 actor of CPU 3"):
            threading.Event().wait(30)  # a blocking wait, as Ray Data's iterator
    assert time.monotonic() - started < 3
    message = str(raised.value)
    assert "no progress for" in message and "network waits for 1 actor of CPU 3" in message
    assert "3 objects committed, 1 chunks left" in message
    assert writer.lines and all(line == "network waits for 1 actor of CPU 3" for line in writer.lines)
    assert "stalled:" in caplog.text
    explained = explain(raised.value)
    assert isinstance(explained, JobError) and "re-run the same command" in explained.hint
    assert signal.getsignal(STALL_SIGNAL) is stall_handler and signal.getsignal(signal.SIGINT) is sigint


def test_ctrl_c_during_the_watch_is_a_keyboard_interrupt_not_a_stall():
    def press_ctrl_c():
        time.sleep(0.3)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as raised:
        with Watchdog(Writer(), 0.1, 5, lambda: "") as watchdog:
            threading.Event().wait(10)
    assert raised.type is KeyboardInterrupt and watchdog.stalled is None


def test_progress_keeps_the_watchdog_quiet_and_no_timeout_never_interrupts():
    writer = Writer()
    with Watchdog(writer, 0.05, 0.4, lambda: "") as watchdog:
        for _ in range(10):  # rows keep arriving
            time.sleep(0.1)
            writer.last_progress = time.monotonic()
    assert watchdog.stalled is None and writer.lines
    with Watchdog(Writer(), 0.05, None, lambda: "") as watchdog:
        time.sleep(0.3)
    assert watchdog.stalled is None


def test_a_failing_resource_query_is_reported_not_raised():
    writer = Writer()

    def broken():
        raise ConnectionError("GCS away")

    with Watchdog(writer, 0.05, None, broken):
        time.sleep(0.3)
    assert writer.lines and writer.lines[-1] == "(resources unknown: ConnectionError)"
