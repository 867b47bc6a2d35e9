"""A real, throw-away Slurm cluster (one node, or several simulated ones) for tests of ``slurm/``.

``LocalSlurm`` finds (or, as root with apt, installs) ``munge`` and ``slurm-wlm``, writes a munge key
and a ``slurm.conf`` into a fresh temporary directory, starts ``munged``, ``slurmctld`` and ``slurmd``
in the foreground as children of this process, and waits until ``sinfo`` reports the node idle.
Leaving the context cancels every job of the cluster and stops the three daemons; nothing stays
running.

Everything is private to one instance: its own munge socket (so a system munged, or a second test
run on the same machine, is never touched), free TCP ports, state and spool directories, and a
``SLURM_CONF`` that only the commands run through :meth:`LocalSlurm.env` see.

``LocalSlurm(nodes=N)`` with N > 1 simulates N hosts on this machine
(:class:`megatron_eopd.testing.netns.HostFabric`): every ``slurmd`` runs in its own network and UTS
namespace (hostname ``eopdn1``, ``eopdn2``, ...) with its own address on a private switch, and
``slurmctld`` listens in the machine's namespace on the switch's gateway address.  The munge key,
the configuration and every file are shared, as a cluster's shared filesystem would be.  These nodes
declare a GPU node's shape (64 CPUs, ``gpu:8``; ``SlurmdParameters=config_overrides``) so that the
GPU launchers' ``#SBATCH`` headers are accepted as written; nothing can use those GPUs.

Any step that cannot work here (not root, no apt, a daemon that does not come up, no namespaces)
raises :class:`SlurmUnavailable` with the reason, for a test to skip on.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_eopd.errors import EOPDError
from megatron_eopd.testing.netns import HostFabric, NamespacesUnavailable

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
APT_PACKAGES = ("slurm-wlm", "munge")
# Where Debian puts the daemons; root's PATH normally has them, a test runner's may not.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

# What the simulated nodes of a multi-node cluster declare (see the module docstring).
SIMULATED_CPUS = 64
SIMULATED_GPUS = 8

# Job states after which a job will not run again by itself.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED"}
)


class SlurmUnavailable(EOPDError, RuntimeError):
    """Slurm cannot be brought up on this machine; the message says why (tests skip on it)."""


def _log(msg: str) -> None:
    print(f"[slurm_cluster] {msg}", flush=True)


def _search_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in _EXTRA_PATH if p not in parts])


def find_binaries() -> dict[str, Optional[str]]:
    path = _search_path()
    return {name: shutil.which(name, path=path) for name in DAEMONS + CLIENTS}


def install_with_apt(packages: Sequence[str] = APT_PACKAGES, timeout_s: float = 900.0) -> float:
    """``apt-get update`` + ``apt-get install`` as root; returns the seconds it took."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get install "
                               + " ".join(packages) + ")")
    apt = shutil.which("apt-get", path=_search_path())
    if apt is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    for cmd in ([apt, "update", "-q"],
                [apt, "install", "-y", "-q", "--no-install-recommends", *packages]):
        _log("running " + " ".join(cmd))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(cmd)} did not finish in {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise SlurmUnavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}): " + " | ".join(tail))
    seconds = time.monotonic() - start
    _log(f"installed {' '.join(packages)} in {seconds:.1f} s")
    return seconds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mib() -> int:
    """MemTotal from /proc/meminfo, with headroom: slurmd drains a node that has less than configured."""
    text = Path("/proc/meminfo").read_text()
    kib = int(re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.M).group(1))
    return max(1, int(kib / 1024 * 0.9))


@dataclasses.dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: str  # "rc:signal", as scontrol prints it
    restarts: int
    fields: dict

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class LocalSlurm:
    """``with LocalSlurm() as cluster: cluster.sbatch(...)``; see the module docstring."""

    def __init__(self, install: bool = True, start_timeout_s: float = 60.0, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got nodes={nodes}")
        self.install = install and os.environ.get("EOPD_SLURM_NO_INSTALL") != "1"
        self.start_timeout_s = start_timeout_s
        self.install_seconds: Optional[float] = None  # None: was already installed
        self.startup_seconds: Optional[float] = None
        # slurmctld checks that it runs on SlurmctldHost: the machine's own name, in every mode.
        self.controller = socket.gethostname().split(".")[0]
        self.multi_node = nodes > 1
        self.nodes = [f"eopdn{i + 1}" for i in range(nodes)] if self.multi_node else [self.controller]
        self.node = self.nodes[0]
        self.cpus = SIMULATED_CPUS if self.multi_node else (os.cpu_count() or 1)
        self.fabric: Optional[HostFabric] = None
        self.workdir: Optional[Path] = None
        self.bin: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            # slurmd must run as root to launch jobs; munged and the key need root-owned files.
            raise SlurmUnavailable("a local Slurm needs root (slurmd launches jobs as their user)")
        found = find_binaries()
        missing = [name for name, path in found.items() if path is None]
        if missing:
            if not self.install:
                raise SlurmUnavailable(f"Slurm/munge not installed (missing {', '.join(missing)}); "
                                       "installation disabled")
            _log(f"missing {', '.join(missing)}; installing {' '.join(APT_PACKAGES)}")
            self.install_seconds = install_with_apt()
            found = find_binaries()
            missing = [name for name, path in found.items() if path is None]
            if missing:
                raise SlurmUnavailable(f"still missing after apt install: {', '.join(missing)}")
        self.bin = {name: path for name, path in found.items() if path is not None}

        t0 = time.monotonic()
        # Short path: the munge socket path must fit in a sockaddr_un (108 bytes).
        self.workdir = Path(tempfile.mkdtemp(prefix="eopd-slurm-"))
        for sub in ("munge", "state", "spool", "log"):
            (self.workdir / sub).mkdir(mode=0o700)
        if self.multi_node:
            self.fabric = HostFabric(self.nodes)
            try:
                self.fabric.open()
            except NamespacesUnavailable as exc:
                raise SlurmUnavailable(f"cannot simulate {len(self.nodes)} hosts: {exc}") from None
        self._start_munged()
        self._write_slurm_conf()
        self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            cmd = [self.bin["slurmd"], "-D", "-N", node, "-f", str(self.conf)]
            self._spawn(self._slurmd_name(node), self.fabric.command(node, cmd) if self.fabric else cmd)
        self._wait_idle()
        self.startup_seconds = time.monotonic() - t0
        _log(f"nodes {','.join(self.nodes)} idle; daemons started in {self.startup_seconds:.1f} s "
             f"(dir {self.workdir})")

    def _slurmd_name(self, node: str) -> str:
        return f"slurmd-{node}" if self.multi_node else "slurmd"

    def address(self, node: str) -> str:
        """The address other nodes reach ``node`` on."""
        return self.fabric.address[node] if self.fabric else "127.0.0.1"

    def stop(self) -> None:
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            # Jobs first: their slurmstepd processes are not our children.  Note every process of
            # this cluster's jobs before cancelling, and end any that outlive the cancellation
            # (proctrack/linuxproc can lose track of them when slurmd goes away).
            # (Multi-node: the namespaces are emptied below, whatever runs in them.)
            job_pids = set() if self.multi_node else self._job_pids()
            self.run(["scancel", "--quiet", "--partition", "debug"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip()
                if not out:
                    break
                time.sleep(0.5)
            self._kill_leftovers(job_pids)
        for name in reversed(list(self._procs)):  # slurmds, slurmctld, munged
            proc = self._procs.pop(name)
            if proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.fabric is not None:
            self.fabric.close()
        if self.workdir is not None and os.environ.get("EOPD_SLURM_KEEP_DIR") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _job_pids(self) -> set[int]:
        res = self.run(["scontrol", "listpids"], check=False)
        pids = set()
        for line in res.stdout.splitlines()[1:]:  # PID JOBID STEPID LOCALID GLOBALID
            first = line.split()[:1]
            if first and first[0].isdigit():
                pids.add(int(first[0]))
        return pids

    @staticmethod
    def _kill_leftovers(pids: set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, 9)
                _log(f"killed leftover job process {pid}")
            except (ProcessLookupError, PermissionError):
                pass

    # -- daemons -----------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.workdir / "munge" / "munge.socket"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.workdir / "log" / f"{name}.out"
        self._logs[name] = log
        with open(log, "wb") as fh:
            self._procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self.env())
        time.sleep(0.3)
        if self._procs[name].poll() is not None:
            raise SlurmUnavailable(f"{name} exited at start (code {self._procs[name].returncode}): "
                                   + self.log_tail(name))

    def log_tail(self, name: str, lines: int = 8) -> str:
        texts = []
        for path in (self._logs.get(name), self.workdir / "log" / f"{name}.log"):
            if path is not None and path.exists():
                texts += path.read_text(errors="replace").strip().splitlines()
        return " | ".join(texts[-lines:]) or "(no log output)"

    def _start_munged(self) -> None:
        mdir = self.workdir / "munge"
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            self.bin["munged"], "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}", f"--log-file={self.workdir / 'log' / 'munged.log'}",
        ])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not start: " + self.log_tail("munged"))
            time.sleep(0.1)

    def _write_slurm_conf(self) -> None:
        w = self.workdir
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        ctld_addr = self.fabric.gateway if self.fabric else "127.0.0.1"
        if self.multi_node:
            # One line per simulated host; %n keeps each slurmd's files apart.
            nodes = [f"NodeName={node} NodeAddr={self.address(node)} CPUs={self.cpus} "
                     f"RealMemory={_real_memory_mib()} Gres=gpu:{SIMULATED_GPUS} State=UNKNOWN"
                     for node in self.nodes]
            extra = ["GresTypes=gpu", "SlurmdParameters=config_overrides"]
            spool, pid_file, log_file = w / "spool" / "%n", w / "slurmd-%n.pid", w / "log" / "slurmd-%n.log"
            for node in self.nodes:
                (w / "spool" / node).mkdir(mode=0o700)
            # Slurm drops a GPU without a device file; empty files stand in for /dev/nvidia*.
            (w / "dev").mkdir()
            for i in range(SIMULATED_GPUS):
                (w / "dev" / f"gpu{i}").touch()
            (w / "gres.conf").write_text(
                f"AutoDetect=off\nName=gpu File={w / 'dev'}/gpu[0-{SIMULATED_GPUS - 1}]\n")
        else:
            nodes = [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                     f"RealMemory={_real_memory_mib()} State=UNKNOWN"]
            extra = []
            spool, pid_file, log_file = w / "spool", w / "slurmd.pid", w / "log" / "slurmd.log"
        self.conf.write_text("\n".join([
            "# Written by megatron_eopd.testing.slurm_cluster for one test session.",
            "ClusterName=eopdtest",
            f"SlurmctldHost={self.controller}({ctld_addr})",
            "SlurmUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={pid_file}",
            f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={log_file}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=600",
            "KillWait=5",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            *extra,
            *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        state = "?"
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited (code {proc.returncode}): " + self.log_tail(name))
            res = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = res.stdout.strip() or res.stderr.strip()
            states = [s.rstrip("*") for s in state.split()]
            if len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        slurmds = "; ".join(f"{name}: {self.log_tail(name)}" for name in self._procs if name.startswith("slurmd"))
        raise SlurmUnavailable(f"nodes {','.join(self.nodes)} not idle after {self.start_timeout_s:.0f} s "
                               f"(sinfo: {state!r}); {slurmds}; slurmctld: {self.log_tail('slurmctld')}")

    # -- client side -------------------------------------------------------------------------
    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """os.environ with this cluster's SLURM_CONF, minus any outer job's SLURM_* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["PATH"] = _search_path()
        if self.workdir is not None:
            env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60.0,
            **kwargs) -> subprocess.CompletedProcess:
        env = kwargs.pop("env", None)
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.env(env), **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: Sequence[str], **kwargs) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], **kwargs).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> JobInfo:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.strip()
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))
        return JobInfo(job_id=job_id, state=fields.get("JobState", "?"),
                       exit_code=fields.get("ExitCode", "?"),
                       restarts=int(fields.get("Restarts", "0") or 0), fields=fields)

    def release_requeued(self, job_id: str, timeout_s: float = 120.0, exclude: Sequence[str] = ()) -> JobInfo:
        """Wait until ``job_id`` is requeued and its first run has left the node, then start it now
        (on nodes other than ``exclude``: a requeued job that comes back on other hosts).

        Slurm holds a requeued job back (``Reason=BeginTime``, about two minutes) partly so the old
        run's step daemons can finish; releasing it earlier can launch the new batch script while
        ``slurmstepd`` of the old one still tears down, and slurmd then fails the launch (exit 1,
        no output).  So this waits for every ``slurmstepd: [JOB.*]`` process to be gone first.
        It also waits for the wall clock to move two seconds past the requeue: slurmd revokes the
        old run's credential at the kill and refuses a credential made in the same second as the
        revocation (``ctime <= revoked``, whole seconds: "Job N already killed, do not launch batch
        job"), which fails the relaunch the same way.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.restarts >= 1 and info.state == "PENDING" and info.fields.get("Reason") == "BeginTime":
                requeued_at = time.time()  # the revocation happened before this
                break
            if info.finished and info.restarts == 0:
                raise RuntimeError(f"job {job_id} ended without being requeued: {info.fields}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not requeued after {timeout_s:.0f} s: {info.fields}")
            time.sleep(0.3)
        step_pattern = rf"slurmstepd: \[{job_id}\."
        while subprocess.run(["pgrep", "-f", step_pattern], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the first run of job {job_id} still has step daemons after {timeout_s:.0f} s")
            time.sleep(0.3)
        time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
        update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
        if exclude:
            update.append(f"ExcNodeList={','.join(exclude)}")
        self.run(update)
        return self.job(job_id)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 1.0) -> JobInfo:
        """Poll ``scontrol show job`` until the job reaches a final state (no accounting needed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.finished:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                raise TimeoutError(f"job {job_id} still {info.state} after {timeout_s:.0f} s; cancelled")
            time.sleep(poll_s)
