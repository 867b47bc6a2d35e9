"""The launchers on a real multi-node Slurm: three simulated hosts on this machine.

:class:`~megatron_eopd.testing.slurm_cluster.LocalSlurm` with ``nodes=3`` runs each ``slurmd`` in its
own network and UTS namespace (hosts ``eopdn1``-``eopdn3``, own addresses on a private switch,
``slurmctld`` on the switch's gateway); the filesystem is shared as on a cluster.  Two-node jobs
leave a third node free, so a requeued job may land on other hosts, and ``--nodes=3`` is a real
allocation.  One cluster serves the module; tiny models are prepared once and copied into each run
directory (the job's own preparation step then finds them cached).

What the tests prove, on that cluster:

- ``sbatch --nodes=2 slurm/eopd_tiny_cpu.sh`` trains (one rank per node, DP = 2, gloo): one torchrun
  per node joined through a c10d rendezvous at the head node's address, one vLLM engine per node,
  metrics equal to a one-node DP = 2 ``torchrun`` of the same configuration, one checkpoint tree;
- in one job's life: the pre-timeout signal requeues it and the second allocation, on other hosts
  (the first head node excluded), resumes from the latest checkpoint; a node whose job step is then killed fails the job within
  :data:`FAIL_WITHIN_S`, srun naming that node; the next submission resumes from the last complete
  checkpoint, and the losses at the end equal the uninterrupted run's;
- ``EOPD_DRY_RUN=1 sbatch --nodes=2 slurm/eopd_4b.sh`` prints the 16-rank layout and the per-node
  commands; ``--nodes=3`` (24 ranks: DP 12 does not divide the mini-batch) stops before any step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eopd.testing.netns import HOST_IFNAME
from megatron_eopd.testing.slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
NODES = 3
PREPARE_ARGS = ["--teacher-sft-iterations", "4", "--student-sft-iterations", "2"]
ITERATIONS = 5  # room for a requeue and a node failure at different checkpoints
# A small budget (as tests/test_trainer_runs.py): 8 prompts, two optimizer steps of 4, DP = 2.
OVERRIDES = (
    f"train.iterations={ITERATIONS}", "train.seed=1", "train.prompts_per_iteration=8",
    "train.mini_batch_size=4", "train.micro_batch_size=2", "rollout.sampling.max_tokens=24",
    "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_interval=1",
    "checkpoint.keep_last=2", "checkpoint.export_final_hf=false",
)
JOB_TIMEOUT_S = float(os.environ.get("EOPD_SLURM_TINY_TIMEOUT_S", "900"))
# Collectives of the test jobs give up after this (the launchers' default is 600 s): a rank whose
# peer died must not wait longer; the slowest legitimate wait here is a peer's engine start-up.
COLLECTIVE_TIMEOUT_S = 240
FAIL_WITHIN_S = 90  # from killing a node's step to the job's final state
# Keys that measure the machine, not the computation.
NOT_DETERMINISTIC = ("tokens_per_second", "peak_memory_bytes")


def _job_env(**extra: str) -> dict[str, str]:
    """What sbatch passes to the job (the test's environment minus Slurm's and our knobs, plus these)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "EOPD_", "NCCL_", "GLOO_", "GPUS_PER_NODE"))
           and k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if sys.prefix != sys.base_prefix:
        env["EOPD_VENV"] = sys.prefix
    # One thread per rank (two ranks share two cores) in both layouts compared: equal reductions.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_") and k not in NOT_DETERMINISTIC}


def _latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip() or None
    except OSError:
        return None


def _assert_same_metrics(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want], (what, got, want)
    for g, w in zip(got, want):
        g, w = _deterministic(g), _deterministic(w)
        assert g.keys() == w.keys(), (what, g.keys() ^ w.keys())
        for key in g:
            if isinstance(w[key], float):
                assert math.isclose(g[key], w[key], rel_tol=0.0, abs_tol=0.0) or (
                    math.isnan(g[key]) and math.isnan(w[key])), (
                    f"{what}: iteration {w['iteration']} {key}: {g[key]!r} vs {w[key]!r}")
            else:
                assert g[key] == w[key], f"{what}: iteration {w['iteration']} {key}: {g[key]!r} vs {w[key]!r}"


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    try:
        slurm = LocalSlurm(nodes=NODES)
        slurm.__enter__()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local multi-node Slurm: {exc}")
    try:
        print(f"local Slurm, {NODES} nodes: start {slurm.startup_seconds:.1f} s")
        yield slurm
    finally:
        slurm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def assets(slurm_tiny_assets) -> Path:
    """Tiny teacher and student, prepared once for the session (tests/conftest.py)."""
    assets_dir, args = slurm_tiny_assets
    assert args == " ".join(PREPARE_ARGS), "the jobs' preparation arguments must match the cached recipe"
    return assets_dir


def _submit(cluster: LocalSlurm, assets: Path, submit: Path, name: str, *sbatch_args: str,
            run_dir: Path | None = None) -> tuple[str, Path, Path]:
    """sbatch the tiny launcher on two nodes; returns (job id, run directory, batch log)."""
    submit.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir or submit / "run"
    if not (run_dir / "assets").exists():
        shutil.copytree(assets, run_dir / "assets")
    env = _job_env(EOPD_RUN_DIR=str(run_dir), EOPD_TINY_PREPARE_ARGS=" ".join(PREPARE_ARGS),
                   EOPD_COLLECTIVE_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S), GLOO_SOCKET_IFNAME=HOST_IFNAME)
    job_id = cluster.sbatch(["--nodes=2", f"--job-name={name}", *sbatch_args, str(SLURM_DIR / "eopd_tiny_cpu.sh"),
                             *OVERRIDES], cwd=submit, env=env)
    return job_id, run_dir, submit / f"{name}-{job_id}.out"


def _logs(run_dir: Path, log: Path) -> str:
    train = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                      for p in sorted((run_dir / "logs").glob("train-*.log")))
    return f"--- batch log\n{log.read_text(errors='replace') if log.exists() else '(none)'}\n{train}"


def _wait_for(condition, job_id: str, cluster: LocalSlurm, what: str, timeout_s: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        info = cluster.job(job_id)
        assert not info.finished, f"job {job_id} ended before {what}: {info.fields}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def two_node_run(cluster, assets, tmp_path_factory) -> dict:
    """One uninterrupted two-node run; its metrics are the reference of the interrupted ones."""
    submit = tmp_path_factory.mktemp("two-node")
    job_id, run_dir, log = _submit(cluster, assets, submit, "twonode")
    info = cluster.wait(job_id, timeout_s=JOB_TIMEOUT_S, poll_s=2)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), f"{info.fields}\n{_logs(run_dir, log)}"
    return dict(job_id=job_id, run_dir=run_dir, log=log.read_text(), nodes=info.fields["NodeList"],
                rows=_rows(run_dir))


# --- 1. two nodes train like one node --------------------------------------------------------------

def test_two_nodes_train_like_one_node_with_two_ranks(cluster, assets, two_node_run, tmp_path):
    run_dir, log = two_node_run["run_dir"], two_node_run["log"]
    hosts = cluster.run(["scontrol", "show", "hostnames", two_node_run["nodes"]]).stdout.split()
    assert len(hosts) == 2 and set(hosts) <= set(cluster.nodes), hosts
    head = hosts[0]

    # One torchrun per node, meeting at the head node's address on the switch (not localhost).
    assert re.search(r"^world_size: 2$", log, re.M), log
    launch = next(line for line in log.splitlines() if line.startswith("launch: "))
    assert "--standalone" not in launch and "--rdzv_backend=c10d" in launch, launch
    assert f"--rdzv_endpoint={cluster.address(head)}:" in launch, launch
    for i, host in enumerate(hosts):
        assert re.search(rf"^node {i}: {host} \({re.escape(cluster.address(host))}\)", log, re.M), log
    assert "training step finished with exit code 0" in log

    # Each node's task (srun: one per node, output file per node) ran a rank that started its own engine.
    node_logs = {p.name: p.read_text(errors="replace") for p in (run_dir / "logs").glob("train-*.log")}
    assert sorted(node_logs) == [f"train-{two_node_run['job_id']}-node{i}.log" for i in range(2)], node_logs.keys()
    for name, text in node_logs.items():
        assert "(Worker pid=" in text or "EngineCore" in text, f"{name}: no vLLM engine\n{text[-3000:]}"

    # The same configuration as one node with two ranks (torchrun --standalone, no Slurm).
    reference = tmp_path / "reference"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tools/train_eopd.py", "--config", "tiny_cpu", f"run.dir={reference}",
               f"student.hf_dir={run_dir}/assets/student_base", f"teacher.hf_dir={run_dir}/assets/teacher",
               *OVERRIDES]
    proc = subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = two_node_run["rows"]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1)), rows
    _assert_same_metrics(rows, _rows(reference), "two nodes vs one node, DP = 2")

    # One checkpoint tree in the shared run directory, written by the ranks of both hosts.
    ckpts = run_dir / "checkpoints"
    assert _latest(run_dir) == f"iter_{ITERATIONS:07d}"
    latest = ckpts / _latest(run_dir)
    assert json.loads((latest / "eopd_checkpoint.json").read_text())["tensor_model_parallel_size"] == 1
    # torch_dist shards are named __<rank>_<n>.distcp: both ranks (one per host) wrote theirs here.
    writers = {int(m.group(1)) for p in latest.rglob("*.distcp") if (m := re.match(r"__(\d+)_\d+\.distcp$", p.name))}
    assert writers == {0, 1}, sorted(p.name for p in latest.rglob("*"))
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert sorted(str(p.relative_to(ckpts / _latest(run_dir))) for p in (ckpts / _latest(run_dir)).rglob("*")) == \
        sorted(str(p.relative_to(reference / "checkpoints" / _latest(reference)))
               for p in (reference / "checkpoints" / _latest(reference)).rglob("*"))


# --- 2 and 3. requeued across nodes, then a node dies ---------------------------------------------------

def _kill_step_on(cluster: LocalSlurm, host: str) -> list[int]:
    """SIGKILL every process of the job step on ``host`` (torchrun, the trainer, its engine), sparing
    the node's slurmd and step daemons: what a crashed host's processes look like to the others."""
    killed = []
    for pid in cluster.fabric.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "slurmd" in cmdline or "slurmstepd" in cmdline or "unshare" in cmdline or not cmdline:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _hosts(cluster: LocalSlurm, job_id: str) -> list[str]:
    return cluster.run(["scontrol", "show", "hostnames", cluster.job(job_id).fields["NodeList"]]).stdout.split()


def test_requeued_across_nodes_then_a_dead_node_then_resumed(cluster, assets, two_node_run, tmp_path):
    """One job's life: the pre-timeout signal requeues it and the second allocation (without the first
    head node, so the rendezvous moves to another host) resumes from the latest checkpoint; there, one node's step is killed and the job fails within FAIL_WITHIN_S, srun
    naming the node; a new submission resumes from the last complete checkpoint.  The losses at the
    end equal the uninterrupted run's.  (One chain: every launch starts two vLLM engines.)"""
    job_id, run_dir, log = _submit(cluster, assets, tmp_path / "first", "chain")

    # Requeue: USR1 to the batch shell once a checkpoint exists.
    _wait_for(lambda: _latest(run_dir) is not None, job_id, cluster, "first checkpoint")
    first_hosts = _hosts(cluster, job_id)
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    try:
        # Back on other hosts: without the first head node, the rendezvous moves too.
        cluster.release_requeued(job_id, timeout_s=180, exclude=[first_hosts[0]])
    except (RuntimeError, TimeoutError) as err:
        pytest.fail(f"{err}\n{_logs(run_dir, log)}")

    def resumed() -> str | None:
        m = re.findall(r"resuming: \S+/checkpoints/latest -> (iter_\d{7})", log.read_text())
        return m[-1] if m else None

    _wait_for(lambda: resumed() is not None, job_id, cluster, "the requeued run")
    start = resumed()
    assert f"requeueing job {job_id} (restart 0)" in log.read_text()
    second_hosts = _hosts(cluster, job_id)
    print(f"allocations: {first_hosts} then {second_hosts}; the second resumed from {start}")
    assert first_hosts[0] not in second_hosts, second_hosts

    # A node dies: once the resumed run has saved a newer checkpoint, kill the step on its second host.
    _wait_for(lambda: (_latest(run_dir) or "") > start, job_id, cluster, "a checkpoint after the resume")
    # (launched by now: the rendezvous moved to the new head node)
    assert f"--rdzv_endpoint={cluster.address(second_hosts[0])}:" in log.read_text().rsplit("restart 1,", 1)[1]
    victim = second_hosts[1]
    killed_at = time.monotonic()
    assert _kill_step_on(cluster, victim), f"no step processes on {victim}"
    info = cluster.wait(job_id, timeout_s=FAIL_WITHIN_S + 60, poll_s=0.5)
    took = time.monotonic() - killed_at
    batch = log.read_text()
    assert info.state == "FAILED" and info.restarts == 1, f"{info.fields}\n{_logs(run_dir, log)}"
    assert took < FAIL_WITHIN_S, f"the job took {took:.0f} s to fail\n{_logs(run_dir, log)}"
    assert re.search(rf"srun: error: {victim}: task 1", batch), batch
    assert "training step finished with exit code 0" not in batch
    print(f"killed the step on {victim}; the job failed {took:.1f} s later")

    # The next submission resumes from the last complete checkpoint and finishes the run.
    complete = _latest(run_dir)
    assert (run_dir / "checkpoints" / complete / "eopd_checkpoint.json").is_file()
    job2, _, log2 = _submit(cluster, assets, tmp_path / "second", "resume", run_dir=run_dir)
    info = cluster.wait(job2, timeout_s=JOB_TIMEOUT_S, poll_s=2)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), f"{info.fields}\n{_logs(run_dir, log2)}"
    assert f"resuming: {run_dir}/checkpoints/latest -> {complete}" in log2.read_text(), log2.read_text()
    runs = (run_dir / "logs" / "jobs.log").read_text().splitlines()
    assert [re.search(r"job=(\d+) restart=(\d+)", line).groups() for line in runs] == [
        (job_id, "0"), (job_id, "1"), (job2, "0")], runs
    _assert_same_metrics(_rows(run_dir), two_node_run["rows"], "requeued, node lost and resumed vs uninterrupted")


# --- 4. the GPU launcher's plan on two and three nodes ---------------------------------------------

def _submit_4b(cluster: LocalSlurm, submit: Path, nodes: int, **env: str) -> tuple[object, str]:
    submit.mkdir(parents=True, exist_ok=True)
    job_id = cluster.sbatch([f"--nodes={nodes}", "--job-name=fourb", str(SLURM_DIR / "eopd_4b.sh")], cwd=submit,
                            env=_job_env(GPUS_PER_NODE="8", **env))
    info = cluster.wait(job_id, timeout_s=300)
    return info, (submit / f"fourb-{job_id}.out").read_text()


def test_4b_dry_run_on_two_nodes_and_three_nodes_refused(cluster, tmp_path):
    info, out = _submit_4b(cluster, tmp_path / "two", 2, EOPD_DRY_RUN="1")
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), f"{info.fields}\n{out}"
    assert re.search(r"^world_size: 16$", out, re.M) and re.search(r"^data_parallel: 8$", out, re.M), out
    hosts = cluster.run(["scontrol", "show", "hostnames", info.fields["NodeList"]]).stdout.split()
    launch = next(line for line in out.splitlines() if line.startswith("launch: "))
    per_node = [line for line in out.splitlines() if re.match(r"node \d+: ", line)]
    assert len(per_node) == 2, out
    tokens = shlex.split(launch[len("launch: "):])
    node_cmd = tokens[next(i for i, t in enumerate(tokens) if t.endswith("/torchrun")):]
    assert tokens[0] == "srun" and "--nodes=2" in tokens and "--ntasks-per-node=1" in tokens, launch
    assert node_cmd[1:3] == ["--nnodes=2", "--nproc_per_node=8"], node_cmd
    assert f"--rdzv_endpoint={cluster.address(hosts[0])}:" in " ".join(node_cmd), node_cmd
    for i, (host, line) in enumerate(zip(hosts, per_node)):
        assert line.startswith(f"node {i}: {host} ({cluster.address(host)})"), line
        assert shlex.split(line.split(": ", 2)[2]) == node_cmd, (line, node_cmd)
    assert "hosts the rendezvous" in per_node[0] and "hosts the rendezvous" not in per_node[1]
    assert "nothing launched" in out

    # 24 ranks: TP 2 leaves DP 12, which does not divide the mini-batch of 32; no step starts.
    info, out = _submit_4b(cluster, tmp_path / "three", 3)
    assert (info.state, info.exit_code) == ("FAILED", "1:0"), f"{info.fields}\n{out}"
    assert "not a multiple of data-parallel size 12" in out and "rejected this configuration" in out, out
    assert "launch: " not in out and "launching;" not in out, out
    assert not list((tmp_path / "three").rglob("train-*.log")), "a training step was started"
