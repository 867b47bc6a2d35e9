"""The simulated hosts behind the multi-node Slurm tests (megatron_eopd/testing/netns.py).

Each host has its own hostname and address and reaches the others by name; nothing of a fabric
outlives it: not after ``with``, not after SIGTERM, and what a SIGKILLed owner left is swept by the
next fabric.  Skipped where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_eopd.testing import netns
from megatron_eopd.testing.netns import HostFabric, NamespacesUnavailable

REPO = Path(__file__).resolve().parents[1]


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def _leftovers(pid: int) -> list[str]:
    mine = [ns for ns in netns.list_namespaces() if ns.startswith(f"{netns.PREFIX}-{pid}-")]
    mine += [line.split(":")[1].strip() for line in _links().splitlines() if f"eopd{pid}g" in line]
    if netns.NETNS_ETC.is_dir():
        mine += [p.name for p in netns.NETNS_ETC.glob(f"{netns.PREFIX}-{pid}-*")]
    return mine


@pytest.fixture(scope="module")
def fabric():
    try:
        with HostFabric(["ha", "hb"]) as f:
            yield f
    except NamespacesUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")


def _on(fabric: HostFabric, host: str, script: str) -> str:
    proc = subprocess.run(fabric.command(host, [sys.executable, "-c", textwrap.dedent(script)]),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_hosts_have_their_own_name_address_and_reach_each_other(fabric):
    assert _on(fabric, "ha", "import socket; print(socket.gethostname())") == "ha"
    assert _on(fabric, "hb", "import socket; print(socket.gethostbyname('ha'))") == fabric.address["ha"]
    # hb serves on its own address; ha connects to it by name; loopback works inside a host too.
    server = subprocess.Popen(fabric.command("hb", [sys.executable, "-c", textwrap.dedent("""
        import socket
        s = socket.socket(); s.bind(("0.0.0.0", 29400)); s.listen(1); print("ready", flush=True)
        c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
    """)]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        seen_from = _on(fabric, "ha", """
            import socket
            s = socket.create_connection(("hb", 29400), timeout=10); print(s.recv(64).decode())
            l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
            socket.create_connection(l.getsockname(), timeout=5)
        """)
        assert seen_from == fabric.address["ha"]
    finally:
        server.kill()
        server.wait()
    # The machine's own /etc/hosts is untouched; the namespace's is its own.
    assert "hb" not in Path("/etc/hosts").read_text().split()


def test_sigterm_and_sigkill_leave_nothing_behind(fabric):
    owner = textwrap.dedent("""
        import sys, time
        from megatron_eopd.testing.netns import HostFabric
        fabric = HostFabric(["ha"])
        fabric.open()
        print("open", flush=True)
        time.sleep(120)
    """)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", owner], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.stdout.readline().strip() == "open"
        assert _leftovers(proc.pid), "the fabric made nothing"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        if sig == signal.SIGKILL:  # nobody could clean up: the next fabric's sweep does
            assert _leftovers(proc.pid)
            netns.sweep_stale()
        assert _leftovers(proc.pid) == [], f"left behind after {sig.name}"
    # The sweep spares a live owner's fabric (this module's).
    assert all(ns in netns.list_namespaces() for ns in fabric.netns.values())


def test_bad_host_names():
    with pytest.raises(ValueError, match="distinct"):
        HostFabric(["a", "a"])
    with pytest.raises(ValueError, match="host name"):
        HostFabric(["Node_1"])
