"""``megatron_eopd.signals``: SIGTERM / SIGINT stop a block cleanly, and the processes it started go with it.

Real signals sent to this process and real child processes (one that ignores SIGTERM, one whose own
child would be orphaned); the command-line runs in test_trainer_runs.py use the same guard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from megatron_eopd.signals import StopSignal, stop_on_signals

# Ignores SIGTERM, like vLLM's engine core did once its own shutdown had begun.
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"]


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for_children(proc: subprocess.Popen, count: int) -> list[psutil.Process]:
    for _ in range(200):
        children = psutil.Process(proc.pid).children()
        if len(children) >= count:
            return children
        time.sleep(0.02)
    raise AssertionError(f"{proc.args} did not start {count} children")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_block_and_every_process_started_in_it(signum):
    earlier = subprocess.Popen(["sleep", "60"])  # started before the block: not the block's to stop
    previous = signal.getsignal(signum)
    reached_the_end = False
    try:
        with stop_on_signals(grace_s=1.0) as stop:
            stubborn = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
            assert stubborn.stdout.readline() == "ready\n"
            parent = subprocess.Popen(["bash", "-c", "sleep 60 & wait"])
            grandchild = _wait_for_children(parent, 1)[0]
            started = [psutil.Process(stubborn.pid), psutil.Process(parent.pid), grandchild]
            os.kill(os.getpid(), signum)
            time.sleep(10)  # the handler raises in here
            reached_the_end = True
        assert not reached_the_end
        assert stop.stopped and stop.signum == signum and stop.exit_status == 128 + signum
        assert stop.interrupted is None  # the signal's own exception ended the block
        # Gone on leaving the block: the one that ignores SIGTERM too (killed after the grace), and the
        # grandchild that its parent's exit would have orphaned.
        assert [p.pid for p in started if not _gone(p)] == []
        assert earlier.poll() is None
        assert signal.getsignal(signum) is previous
    finally:
        earlier.kill()
        earlier.wait()


def test_a_second_signal_does_not_cut_the_clean_up_short_and_its_failure_is_swallowed():
    """Clean-up after the first signal runs to its end through a second one; an exception it raises
    instead of the signal's (another rank's collective failing as its peer exits) is recorded, not raised."""
    steps = []
    with stop_on_signals(grace_s=1.0) as stop:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a second signal lands in here
            steps.append("clean-up finished")
            raise RuntimeError("Connection closed by peer")
    assert steps == ["clean-up finished"]
    assert stop.signum == signal.SIGTERM and stop.exit_status == 143
    assert isinstance(stop.interrupted, RuntimeError)


def test_without_a_signal_the_block_is_left_as_it_was():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="bad input"):
        with stop_on_signals():
            child = subprocess.Popen(["sleep", "60"])
            raise ValueError("bad input")
    try:
        assert child.poll() is None  # only a stop signal stops the block's processes
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        child.kill()
        child.wait()
    with stop_on_signals() as stop:
        pass
    assert not stop.stopped and stop.exit_status == 0


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body():
        with stop_on_signals() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
        seen["stopped"] = stop.stopped

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": signal.getsignal(signal.SIGTERM), "stopped": False}


def test_stop_signal_is_not_an_exception_that_broad_handlers_swallow():
    assert not issubclass(StopSignal, Exception) and issubclass(StopSignal, BaseException)
    assert str(StopSignal(signal.SIGTERM)) == "stopped by SIGTERM"
