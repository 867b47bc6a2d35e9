"""Memory of processes as Linux reports it in ``/proc``: what the memory benchmark and the smoke run sample.

Two views serve different questions.  ``RssAnon`` (from ``/proc/PID/status``) is what a process
allocated itself: issue 20's bounds ("at most 1.3x the shard") speak of it, per process or per rank.
``Pss`` (from ``/proc/PID/smaps_rollup``) shares every page among the processes mapping it, so its
sum over a process tree is the tree's footprint with pages shared by forked helpers counted once.
Every reader returns bytes, and zeros (or an empty dict) once the process is gone: sampling races
with processes that exit.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Iterable, Union

Pid = Union[int, str]
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
# Prefix of the lines a SelfWatch prints on stderr; whoever started the process reads them back.
MARK = "EOPD-MEMORY "


def read_kib_fields(path: str, fields: Iterable[str]) -> dict[str, int]:
    """The ``Name:  N kB`` lines of a /proc file for the given names, in bytes ({} if unreadable)."""
    wanted, out = set(fields), {}
    try:
        with open(path) as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key in wanted:
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def status(pid: Pid = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile and RssShmem of a process."""
    return read_kib_fields(f"/proc/{pid}/status", STATUS_FIELDS)


def pss(pid: Pid = "self") -> int:
    """The process's proportional share of the pages it maps."""
    return read_kib_fields(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss", 0)


def private_dirty(pid: Pid = "self") -> int:
    """Pages this process alone has written: what a forked child adds to its parent."""
    return read_kib_fields(f"/proc/{pid}/smaps_rollup", ("Private_Dirty",)).get("Private_Dirty", 0)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children, ...), from the parents in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces and parentheses: the fields start after the last ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_memory(root: int) -> tuple[int, int]:
    """(PSS summed over ``root`` and its descendants, the largest RssAnon of one of them)."""
    members = [root, *descendants(root)]
    return (sum(pss(pid) for pid in members),
            max((status(pid).get("RssAnon", 0) for pid in members), default=0))


class SelfWatch:
    """Samples this process's RssAnon / RssFile from a thread; ``mark(label)`` reports the peaks since
    the previous mark and since the start on stderr (one ``EOPD-MEMORY {json}`` line).

    A thread, because a peak inside one call (a checkpoint load) lasts milliseconds; the kernel's own
    high-water mark (VmHWM) counts file pages too, so it is reported beside, not used."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.lock = threading.Lock()
        self.total = {"anon": 0, "file": 0}
        self.window = {"anon": 0, "file": 0}
        self.rank = int(os.environ.get("RANK", "0"))
        self._stop = threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, int]:
        now = status()
        with self.lock:
            for key, name in (("anon", "RssAnon"), ("file", "RssFile")):
                value = now.get(name, 0)
                self.total[key] = max(self.total[key], value)
                self.window[key] = max(self.window[key], value)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def mark(self, label: str, **extra) -> dict:
        now = self.sample()
        with self.lock:
            record = {"label": label, "rank": self.rank, "pid": os.getpid(), "time": time.time(),
                      "peak_anon": self.total["anon"], "peak_file": self.total["file"],
                      "window_peak_anon": self.window["anon"], "window_peak_file": self.window["file"],
                      "now_anon": now.get("RssAnon", 0), "now_file": now.get("RssFile", 0),
                      "vm_hwm": now.get("VmHWM", 0), **extra}
            self.window = {"anon": 0, "file": 0}
        print(MARK + json.dumps(record), file=sys.stderr, flush=True)
        return record
