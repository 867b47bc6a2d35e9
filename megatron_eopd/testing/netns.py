"""Simulated hosts on one machine: network namespaces on a private switch, for multi-node tests.

``HostFabric(["n1", "n2"])`` creates, as root:

- a *switch* namespace holding a Linux bridge, so traffic between the simulated hosts never crosses
  the machine's own bridges or firewall (a fresh namespace has no netfilter rules);
- one namespace per host, with ``lo`` up (vLLM and torchrun use local ports) and an interface
  :data:`HOST_IFNAME` on the switch with its own address in a private ``/24`` that no route of the
  machine uses;
- one veth from the machine's own namespace to the switch (:attr:`HostFabric.gateway`), for daemons
  that stay outside (slurmctld) and the test's clients;
- ``/etc/netns/<namespace>/hosts`` naming every host and the gateway, mounted over ``/etc/hosts``
  in a private mount namespace of each process started on that host (the simulated cluster's DNS; the machine's own
  ``/etc/hosts`` is never touched).

:meth:`HostFabric.command` wraps a command to run inside a host: its namespace, plus a new UTS
namespace whose hostname is the host's name, and that hosts file.  Everything else (files, ``/dev/shm``, PIDs, users) is
the machine's: the real filesystem plays the cluster's shared filesystem.

Names carry this process's PID (``eopdsl-<pid>-...``), so :func:`sweep_stale` can remove what a
killed test run left behind without touching a concurrent run's.  :meth:`HostFabric.close` is
idempotent and also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from megatron_eopd.errors import EOPDError

PREFIX = "eopdsl"
HOST_IFNAME = "eopd0"  # the same name in every host namespace: one GLOO_SOCKET_IFNAME fits all
NETNS_ETC = Path("/etc/netns")
# Candidate subnets: 10.213.N.0/24, the first that no address or route of the machine overlaps.
_SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")


class NamespacesUnavailable(EOPDError, RuntimeError):
    """Namespaces or veth pairs cannot be made here; the message says why (tests skip on it)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NamespacesUnavailable(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(netns: str) -> None:
    out = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_namespace(netns: str) -> None:
    _kill_namespace_processes(netns)
    _ip("netns", "delete", netns, check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def _exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a CI runner's stop) unwind like Ctrl-C, so that context managers,
    fixtures' finalisers and atexit handlers remove the namespaces.  Only where nobody else
    handles SIGTERM, and only from the main thread (where Python runs handlers)."""
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _raise(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, _raise)


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete namespaces (and the gateway veths) of fabrics whose owning process is gone."""
    removed = []
    for netns in list_namespaces():
        m = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", netns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_namespace(netns)
            removed.append(netns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+(eopd(\d+)g)[@:]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "delete", m.group(1), check=False)
            removed.append(m.group(1))
    if NETNS_ETC.is_dir():  # hosts files of namespaces that no longer exist
        for entry in NETNS_ETC.glob(f"{PREFIX}-*"):
            m = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", entry.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        first = line.split()[:1]
        if first and first[0] != "default" and re.match(r"[\d./]+$", first[0]):
            used.append(ipaddress.ip_network(first[0], strict=False))
    return used


def _free_subnet(pid: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    subnets = list(_SUBNET_BASE.subnets(new_prefix=24))
    start = pid % len(subnets)  # concurrent fabrics start their search at different places
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise NamespacesUnavailable(f"no free /24 in {_SUBNET_BASE} for the test network")


class HostFabric:
    """Namespaces for ``hosts`` on a private switch; see the module docstring."""

    def __init__(self, hosts: Sequence[str]):
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"host names must be distinct and non-empty, got {list(hosts)}")
        for host in hosts:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,14}", host):
                raise ValueError(f"host name {host!r}: use 1-15 lower-case letters and digits")
        self.hosts = list(hosts)
        self.pid = os.getpid()
        self.switch = f"{PREFIX}-{self.pid}-sw"
        self.netns = {host: f"{PREFIX}-{self.pid}-{host}" for host in hosts}
        self.gateway_link = f"eopd{self.pid}g"
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.gateway: Optional[str] = None  # the machine's address on the switch
        self.address: dict[str, str] = {}
        self._closed = True
        self._made_etc_dir = False

    def __enter__(self) -> "HostFabric":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if os.geteuid() != 0:
            raise NamespacesUnavailable("network namespaces need root")
        missing = [cmd for cmd in ("ip", "nsenter", "unshare", "mount") if shutil.which(cmd) is None]
        if missing:
            raise NamespacesUnavailable(f"missing {', '.join(missing)} (iproute2, util-linux)")
        sweep_stale()
        self._closed = False
        atexit.register(self.close)
        _exit_on_sigterm()
        self.subnet = _free_subnet(self.pid)
        addrs = list(self.subnet.hosts())
        self.gateway = str(addrs[0])
        self.address = {host: str(addrs[10 + i]) for i, host in enumerate(self.hosts)}
        prefix = self.subnet.prefixlen

        _ip("netns", "add", self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        # The machine's end: created in the switch namespace, then its peer moved out, so that a
        # failure half-way leaves nothing in the machine's namespace once the switch is deleted.
        _ip(*sw, "link", "add", "gw", "type", "veth", "peer", "name", self.gateway_link)
        _ip(*sw, "link", "set", self.gateway_link, "netns", "1")
        _ip(*sw, "link", "set", "gw", "master", "br0", "up")
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.gateway_link)
        _ip("link", "set", self.gateway_link, "up")
        for i, host in enumerate(self.hosts):
            netns = self.netns[host]
            _ip("netns", "add", netns)
            port = f"h{i}"
            _ip(*sw, "link", "add", port, "type", "veth", "peer", "name", HOST_IFNAME)
            _ip(*sw, "link", "set", HOST_IFNAME, "netns", netns)
            _ip(*sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "addr", "add", f"{self.address[host]}/{prefix}", "dev", HOST_IFNAME)
            _ip("-n", netns, "link", "set", HOST_IFNAME, "up")
        hosts_file = "\n".join(
            ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
             f"{self.gateway} {os.uname().nodename.split('.')[0]}"]
            + [f"{self.address[host]} {host}" for host in self.hosts]) + "\n"
        self._made_etc_dir = not NETNS_ETC.exists()
        for netns in self.netns.values():
            (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / netns / "hosts").write_text(hosts_file)

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host``: its network namespace, a UTS namespace named after it, and a
        private mount namespace in which its hosts file covers ``/etc/hosts``.

        Not ``ip netns exec``: that also remounts ``/sys`` for the namespace, which hides the cgroup
        filesystem slurmd needs."""
        netns = self.netns[host]
        script = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "--mount", "--propagation", "private",
                "--", "sh", "-c", script, host, str(NETNS_ETC / netns / "hosts"), *argv]

    def pids(self, host: str) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.netns[host], check=False).stdout.split()]

    def close(self) -> None:
        """Kill whatever runs in the namespaces, delete them, their hosts files and the gateway."""
        if self._closed:
            return
        self._closed = True
        for netns in [*self.netns.values(), self.switch]:
            _delete_namespace(netns)
        if self._made_etc_dir:
            try:
                NETNS_ETC.rmdir()  # only when empty: a concurrent fabric's files stay
            except OSError:
                pass
        _ip("link", "delete", self.gateway_link, check=False)  # gone with the switch, normally
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
