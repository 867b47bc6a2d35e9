"""Stopping a command-line tool cleanly on SIGTERM or SIGINT (what Slurm, torchrun, ``kill`` and Ctrl-C send).

The tools (``train_eopd``, ``evaluate``, ``run_tiny``) run their work inside :func:`stop_on_signals`,
the one place this is handled:

- The first SIGTERM or SIGINT raises :class:`StopSignal` in the main thread, so every ``finally``
  block and context manager on the way out runs: rollout engines close, logs close.  A checkpoint
  being written is left as a temporary directory that the next start removes; ``latest`` still names
  the previous, complete one.
- Later signals are only recorded: they must not cut short the clean-up the first one started.
  That clean-up is bounded (each engine: vLLM's own shutdown, then :func:`stop_processes`).
- Leaving the block after a signal, every process started inside it that is still alive (vLLM's
  engine core, its workers, their children) gets SIGTERM, a grace period, then SIGKILL.  Without
  this a stopped trainer left ``VLLM::EngineCore`` running, re-parented to PID 1, and it ignored a
  further SIGTERM for more than 5 s.
- The exception that ended the work is swallowed once a signal has arrived (on other ranks it is
  often a collective whose peer has just exited); the tool then prints one line and exits with
  :func:`exit_status`: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell's
  convention for a process ended by a signal.

Processes are found with ``psutil`` (a dependency of vLLM: where it is missing there are no engine
processes to stop, and only the signal handling applies).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGTERM -> grace -> SIGKILL.  vLLM's own engine shutdown waits 5 s for its workers before it kills.
GRACE_S = 5.0


class StopSignal(BaseException):
    """SIGTERM or SIGINT arrived.  A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception``
    clauses (retries, best-effort fallbacks) must not swallow a request to stop."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal_name(self.signum)}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """128 + ``signum``: what a shell reports for a process ended by that signal."""
    return 128 + int(signum)


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def descendants(pid: Optional[int] = None) -> list:
    """``psutil.Process`` objects of every live descendant of ``pid`` (default: this process)."""
    psutil = _psutil()
    if psutil is None:
        return []
    try:
        return psutil.Process(pid if pid is not None else os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: Iterable, *, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM ``processes`` (``psutil.Process`` objects) and everything below them, wait up to
    ``grace_s``, SIGKILL what remains.  Returns the pids that had to be killed.

    The whole tree is collected before anything is signalled: once a parent exits, its children are
    re-parented and can no longer be found from it.  ``psutil.Process`` remembers each process's
    start time, so a pid reused by an unrelated process in the meantime is never signalled.
    """
    psutil = _psutil()
    if psutil is None:
        return []
    tree: dict[int, object] = {}
    for process in processes:
        try:
            for member in [process, *process.children(recursive=True)]:
                tree.setdefault(member.pid, member)
        except psutil.NoSuchProcess:
            continue
    # This process's multiprocessing resource tracker (started with vLLM's first spawned process) is
    # not the engine's: it ignores SIGTERM by design and removes leaked shared memory once we exit.
    tree.pop(resource_tracker_pid(), None)
    alive = []
    for process in tree.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                process.terminate()
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    _, remaining = psutil.wait_procs(alive, timeout=grace_s)
    killed = []
    for process in remaining:
        try:
            process.kill()
            killed.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(remaining, timeout=grace_s)
    return killed


def resource_tracker_pid() -> Optional[int]:
    """The pid of this process's multiprocessing resource tracker (a child, but no engine's), if started."""
    from multiprocessing import resource_tracker

    return getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)


class SignalGuard:
    """What :func:`stop_on_signals` yields: ``signum`` is the first stop signal received, or None."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.interrupted: Optional[BaseException] = None  # what the signal's exception replaced, if anything
        self._seen: dict[int, object] = {}
        self._raise = True  # False once the block has ended: a late signal is recorded, not raised

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum) if self.signum is not None else 0

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""

    def _remember_processes(self, before: set) -> None:
        for process in descendants():
            if _identity(process) not in before:
                self._seen.setdefault(process.pid, process)

    def _handler(self, before: set):
        def handle(signum, frame):  # noqa: ARG001 - the signal module's signature
            if self.signum is not None:
                return  # already stopping: let the clean-up finish
            self.signum = signum
            # The tree as it is now, before any of it exits and orphans its own children.
            self._remember_processes(before)
            if self._raise:
                raise StopSignal(signum)

        return handle


def _identity(process) -> tuple:
    try:
        return process.pid, process.create_time()
    except Exception:  # noqa: BLE001 - gone already
        return process.pid, None


@contextlib.contextmanager
def stop_on_signals(signals: Iterable[int] = STOP_SIGNALS, *, grace_s: float = GRACE_S) -> Iterator[SignalGuard]:
    """Run the block so that SIGTERM / SIGINT stop it cleanly (see the module docstring).

    After the block, ``guard.stopped`` says whether a signal arrived; the caller prints its message
    and returns ``guard.exit_status``.  Outside the main thread (where Python cannot take signals)
    the block runs unguarded.  Processes that already existed when the block began are never stopped.
    """
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    before = {_identity(p) for p in descendants()}
    handler = guard._handler(before)
    previous = {}
    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield guard
    except BaseException as exc:  # noqa: BLE001 - after a stop signal, whatever ended the work is its consequence
        if guard.signum is None:
            raise
        if not isinstance(exc, StopSignal):
            guard.interrupted = exc
    finally:
        guard._raise = False
        try:
            if guard.signum is not None:
                guard._remember_processes(before)
                stop_processes(list(guard._seen.values()), grace_s=grace_s)
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
