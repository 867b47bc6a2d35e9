"""megatron_eopd.testing.proc_memory: the /proc readers the memory benchmark and the smoke run rely on,
checked against allocations of known size in a child and a grandchild process."""

import json
import subprocess
import sys
import time

import pytest

from megatron_eopd.testing import proc_memory

MIB = 1024**2
# The child writes a bytearray of CHILD_MIB (so its pages are really there), starts a grandchild that
# does the same with GRANDCHILD_MIB, says "ready" and waits for its stdin to close.
FAMILY = r"""
import subprocess, sys
mib = int(sys.argv[1])
block = bytearray(b"x" * (mib * 1024 * 1024))
kids = []
if len(sys.argv) > 2:
    kids.append(subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[2]], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE))
    kids[0].stdout.readline()
print("ready", flush=True)
sys.stdin.read()
for kid in kids:
    kid.stdin.close()
    kid.wait()
"""
CHILD_MIB, GRANDCHILD_MIB = 160, 96


@pytest.fixture
def family():
    proc = subprocess.Popen([sys.executable, "-c", FAMILY, str(CHILD_MIB), str(GRANDCHILD_MIB), FAMILY],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_status_and_descendants_see_each_allocation(family):
    kids = proc_memory.descendants(family.pid)
    assert len(kids) == 1, kids
    child_anon = proc_memory.status(family.pid)["RssAnon"]
    kid_anon = proc_memory.status(kids[0])["RssAnon"]
    # Each holds its block plus an interpreter (tens of MiB at most).
    assert CHILD_MIB * MIB <= child_anon < (CHILD_MIB + 64) * MIB
    assert GRANDCHILD_MIB * MIB <= kid_anon < (GRANDCHILD_MIB + 64) * MIB
    assert proc_memory.private_dirty(family.pid) >= CHILD_MIB * MIB

    total_pss, largest_anon = proc_memory.tree_memory(family.pid)
    assert abs(largest_anon - max(child_anon, kid_anon)) < 4 * MIB  # sampled a moment later
    assert (CHILD_MIB + GRANDCHILD_MIB) * MIB <= total_pss < (CHILD_MIB + GRANDCHILD_MIB + 128) * MIB


def test_a_gone_process_reads_as_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert proc_memory.status(proc.pid) == {}
    assert proc_memory.pss(proc.pid) == 0
    assert proc_memory.descendants(proc.pid) == []
    assert proc_memory.tree_memory(proc.pid) == (0, 0)


def test_self_watch_reports_a_peak_that_is_gone_again(capfd):
    watch = proc_memory.SelfWatch(interval=0.005)
    try:
        block = bytearray(b"x" * (128 * MIB))
        time.sleep(0.05)  # several samples while the block is held
        del block
        record = watch.mark("after")
    finally:
        watch.stop()
    assert record["window_peak_anon"] - record["now_anon"] >= 120 * MIB
    line = [l for l in capfd.readouterr().err.splitlines() if l.startswith(proc_memory.MARK)][-1]
    assert json.loads(line[len(proc_memory.MARK):])["label"] == "after"
