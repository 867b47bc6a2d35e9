"""The ``slurm/`` launchers: dry runs with a fake Slurm environment, bad input, and real sbatch jobs.

The dry-run tests run the scripts with plain ``bash`` (no Slurm needed) and check what they would
launch.  The ``slurm``-marked tests start a private single-node Slurm
(:mod:`megatron_eopd.testing.slurm_cluster`) and submit real jobs with ``sbatch``; they skip, saying
why, where that cannot work (not root, no apt, daemons that do not start).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eopd.testing.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
CLUSTER_SCRIPTS = {
    "eopd_0.6b.sh": "eopd_qwen3_0.6b",
    "eopd_1.7b.sh": "eopd_qwen3_1.7b",
    "eopd_4b.sh": "eopd_qwen3_4b",
}
# Overrides that keep the tiny job short on a 2-core machine (sbatch'ed as-is).
TINY_OVERRIDES = ("train.iterations=2",)
TINY_ITERATIONS = 2
# The job prepares its teacher and student itself; a few SFT steps are enough to exercise the path.
TINY_PREPARE_ARGS = "--teacher-sft-iterations 4 --student-sft-iterations 2"
TINY_TIMEOUT_S = float(os.environ.get("EOPD_SLURM_TINY_TIMEOUT_S", "1800"))


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any outer Slurm job or EOPD_* knobs, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "EOPD_", "NCCL_", "GPUS_PER_NODE"))
           and k not in ("OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING")}
    if sys.prefix != sys.base_prefix:  # the venv running pytest, for the scripts too
        env["EOPD_VENV"] = sys.prefix
    env.update(extra)
    return env


def _run_script(script: Path, args=(), cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=_clean_env(**env),
                          capture_output=True, text=True, timeout=300)


def _fake_job_env(submit_dir: Path, nnodes: int, job_id: int = 4242, **extra: str) -> dict[str, str]:
    env = dict(EOPD_DRY_RUN="1", SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="myjob", SLURM_NNODES=str(nnodes),
               SLURM_JOB_NODELIST="gpu[07-08]" if nnodes > 1 else "gpu07", SLURM_SUBMIT_DIR=str(submit_dir),
               SLURM_CPUS_PER_TASK="64")
    env.update(extra)
    return env


def _layout(stdout: str) -> dict[str, str]:
    """Top-level ``key: value`` lines the trainer's dry run printed between the launcher's markers."""
    m = re.search(r"^===== resolved layout .*?=====\n(.*?)^===== end of layout =====", stdout, re.S | re.M)
    assert m, f"no layout section in:\n{stdout}"
    found = {}
    for line in m.group(1).splitlines():
        kv = re.match(r"^(\w+):\s*(\S+)\s*$", line)
        if kv:
            found[kv.group(1)] = kv.group(2)
    return found


def _command(stdout: str, label: str = "launch") -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith(f"{label}: ")]
    assert len(lines) == 1, f"expected one '{label}:' line in:\n{stdout}"
    return shlex.split(lines[0][len(label) + 2:])


def _split_torchrun(cmd: list[str]) -> tuple[list[str], list[str]]:
    idx = [i for i, tok in enumerate(cmd) if os.path.basename(tok) == "torchrun"]
    assert len(idx) == 1, cmd
    return cmd[:idx[0]], cmd[idx[0] + 1:]


# --- static checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["common.sh", *CLUSTER_SCRIPTS, "eopd_tiny_cpu.sh"])
def test_scripts_parse(name):
    res = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in SLURM_DIR.glob("*.sh"))
    res = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", [*CLUSTER_SCRIPTS, "eopd_tiny_cpu.sh"])
def test_sbatch_headers(name):
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", (SLURM_DIR / name).read_text(), re.M))
    for key in ("nodes", "cpus-per-task", "requeue", "signal", "open-mode", "output", "time"):
        assert key in headers, f"{name}: no #SBATCH --{key}"
    assert headers["open-mode"] == "append"  # a requeued run appends to its log
    assert headers["signal"].startswith("B:USR1@")  # to the batch shell, whose trap requeues
    if name in CLUSTER_SCRIPTS:
        assert headers["ntasks-per-node"] == "1" and headers["gpus-per-node"] == "8"
        assert "exclusive" in headers


# --- dry runs with a fake Slurm environment (need tools/train_eopd.py --dry-run) ---------------------

@pytest.mark.parametrize(
    "name,nnodes,extra,nproc,port",
    [
        ("eopd_0.6b.sh", 1, {"GPUS_PER_NODE": "8"}, 8, 24242),
        ("eopd_1.7b.sh", 2, {"SLURM_GPUS_ON_NODE": "8", "NCCL_DEBUG": "INFO"}, 8, 24242),
        ("eopd_4b.sh", 2, {"GPUS_PER_NODE": "8", "EOPD_RDZV_PORT": "31337"}, 8, 31337),
    ],
)
def test_cluster_dry_run_layout_and_command(tmp_path, name, nnodes, extra, nproc, port):
    preset = CLUSTER_SCRIPTS[name]
    overrides = ["train.iterations=7", "loss.tau=1.25"]
    res = _run_script(SLURM_DIR / name, overrides, cwd=tmp_path, **_fake_job_env(tmp_path, nnodes, **extra))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    world = nnodes * nproc

    # The layout comes first, from the trainer's own dry run at the job's world size.
    assert out.index("===== resolved layout") < out.index("===== launch command")
    layout = _layout(out)
    for key in ("world_size", "tensor_parallel", "pipeline_parallel", "data_parallel"):
        assert key in layout, f"dry run printed no '{key}:' line:\n{out}"
    assert int(layout["world_size"]) == world
    assert int(layout["tensor_parallel"]) * int(layout["pipeline_parallel"]) * int(layout["data_parallel"]) \
        == world
    assert "1.25" in out[:out.index("===== end of layout")], "override not passed to the dry run"

    run_dir = tmp_path / "runs" / f"{preset}-myjob"
    srun, torchrun = _split_torchrun(_command(out))
    assert srun[0] == "srun"
    assert f"--nodes={nnodes}" in srun and "--ntasks-per-node=1" in srun and "--cpus-per-task=64" in srun
    assert f"--output={run_dir}/logs/train-%j-node%n.log" in srun
    assert torchrun == [
        f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_id=4242", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu07:{port}", "--rdzv_conf=join_timeout=300", "tools/train_eopd.py", "--config", preset, f"run.dir={run_dir}",
        *overrides,
    ]
    env_line = next(line for line in out.splitlines() if "] env: " in line)
    assert f"OMP_NUM_THREADS={64 // nproc}" in env_line and "CUDA_DEVICE_MAX_CONNECTIONS=1" in env_line
    assert f"NCCL_DEBUG={extra.get('NCCL_DEBUG', 'WARN')}" in env_line
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env_line
    assert "EOPD_COLLECTIVE_TIMEOUT_S=600" in env_line
    assert not run_dir.exists(), "a dry run must not create the run directory"


def test_cluster_dry_run_resumes_and_honours_run_dir(tmp_path):
    run_dir = tmp_path / "elsewhere" / "my-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000005\n")
    res = _run_script(SLURM_DIR / "eopd_4b.sh", ["train.iterations=7"], cwd=tmp_path,
                      **_fake_job_env(tmp_path, 2, GPUS_PER_NODE="8", EOPD_RUN_DIR=str(run_dir)))
    assert res.returncode == 0, res.stdout + res.stderr
    _, torchrun = _split_torchrun(_command(res.stdout))
    assert torchrun[-3:] == [f"run.dir={run_dir}", "train.iterations=7", "--resume"]
    assert "resuming" in res.stdout


def test_tiny_dry_run(tmp_path):
    res = _run_script(SLURM_DIR / "eopd_tiny_cpu.sh", list(TINY_OVERRIDES), cwd=tmp_path,
                      **_fake_job_env(tmp_path, 1, job_id=77, SLURM_CPUS_PER_TASK="2"))
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = tmp_path / "runs" / "tiny_cpu-myjob"
    # The trainer resolves the tiny layout from the prepared models' config.json; a dry run prepares
    # nothing (minutes of SFT), so it says so.  The real job prints the layout after preparing.
    assert "tiny models are not prepared" in res.stdout and "===== resolved layout" not in res.stdout
    assert _command(res.stdout, "prepare")[1:] == ["tools/run_tiny.py", "--prepare-only", "--run-dir", str(run_dir)]
    srun, torchrun = _split_torchrun(_command(res.stdout))
    assert srun[0] == "srun" and "--ntasks=1" in srun and "--cpus-per-task=2" in srun
    assert torchrun == ["--standalone", "--nnodes=1", "--nproc_per_node=1", "tools/train_eopd.py",
                        "--config", "tiny_cpu", f"run.dir={run_dir}", f"student.hf_dir={run_dir}/assets/student_base",
                        f"teacher.hf_dir={run_dir}/assets/teacher", *TINY_OVERRIDES]
    assert not run_dir.exists(), "a dry run must not create the run directory"


def test_tiny_dry_run_on_two_nodes_uses_the_head_nodes_rendezvous(tmp_path):
    """With --nodes=2 the tiny job runs one torchrun per node joined at the head node, not --standalone."""
    res = _run_script(SLURM_DIR / "eopd_tiny_cpu.sh", list(TINY_OVERRIDES), cwd=tmp_path,
                      **_fake_job_env(tmp_path, 2, job_id=77, SLURM_CPUS_PER_TASK="2", EOPD_RDZV_JOIN_TIMEOUT_S="60"))
    assert res.returncode == 0, res.stdout + res.stderr
    srun, torchrun = _split_torchrun(_command(res.stdout))
    assert "--nodes=2" in srun and "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    assert torchrun[:6] == ["--nnodes=2", "--nproc_per_node=1", "--rdzv_id=77", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=gpu07:20077", "--rdzv_conf=join_timeout=60"], torchrun
    nodes = [line for line in res.stdout.splitlines() if line.startswith("node ")]
    assert [line.split(": ")[1] for line in nodes] == ["gpu07 (gpu07), hosts the rendezvous", "gpu08 (gpu08)"], nodes


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("a[1,3-4],b7,c[010-011]", ["a1", "a3", "a4", "b7", "c010", "c011"]),
])
def test_hostlist_expansion_without_scontrol(tmp_path, nodelist, hosts):
    """The launchers' fallback where scontrol cannot run (a PATH without it)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("awk",):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    res = subprocess.run([shutil.which("bash"), "-c", f"source {SLURM_DIR}/common.sh; eopd_hostnames '{nodelist}'; "
                          f"echo head=$(eopd_head_node '{nodelist}')"],
                         env={"PATH": str(bindir)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [*hosts, f"head={hosts[0]}"]


# --- bad input ----------------------------------------------------------------------------------------

def test_unknown_preset_is_rejected_before_launch(tmp_path):
    res = _run_script(SLURM_DIR / "eopd_4b.sh", cwd=tmp_path,
                      **_fake_job_env(tmp_path, 2, GPUS_PER_NODE="8", EOPD_PRESET="eopd_qwen3_9000b"))
    assert res.returncode != 0
    assert "rejected this configuration" in res.stderr and "launch:" not in res.stdout


def test_bad_override_is_rejected_before_launch(tmp_path):
    res = _run_script(SLURM_DIR / "eopd_0.6b.sh", ["loss.tau=not-a-number"], cwd=tmp_path,
                      **_fake_job_env(tmp_path, 1, GPUS_PER_NODE="8"))
    assert res.returncode != 0
    assert "rejected this configuration" in res.stderr and "launch:" not in res.stdout


def test_missing_repository(tmp_path):
    lone = tmp_path / "eopd_4b.sh"
    shutil.copy(SLURM_DIR / "eopd_4b.sh", lone)  # as in sbatch's spool directory, away from the repo
    res = _run_script(lone, cwd=tmp_path, **_fake_job_env(tmp_path, 2))
    assert res.returncode == 1
    assert "repository not found" in res.stderr and "EOPD_HOME" in res.stderr

    res = _run_script(SLURM_DIR / "eopd_4b.sh", cwd=tmp_path,
                      **_fake_job_env(tmp_path, 2, EOPD_HOME=str(tmp_path / "nowhere")))
    assert res.returncode == 1
    assert "repository not found" in res.stderr and str(tmp_path / "nowhere") in res.stderr

    # A directory that has the launchers but not the trainer.
    fake = tmp_path / "fake-home"
    shutil.copytree(SLURM_DIR, fake / "slurm")
    res = _run_script(SLURM_DIR / "eopd_4b.sh", cwd=tmp_path, **_fake_job_env(tmp_path, 2, EOPD_HOME=str(fake)))
    assert res.returncode == 1 and "trainer not found" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["run.dir=/tmp/x"], "EOPD_RUN_DIR"),
    (["--config", "tiny_cpu"], "set by the launcher"),
    (["--dry-run"], "set by the launcher"),
])
def test_arguments_the_launcher_owns(tmp_path, args, message):
    res = _run_script(SLURM_DIR / "eopd_4b.sh", args, cwd=tmp_path, **_fake_job_env(tmp_path, 2))
    assert res.returncode == 1 and message in res.stderr


def test_outside_slurm_without_dry_run(tmp_path):
    res = _run_script(SLURM_DIR / "eopd_1.7b.sh", cwd=tmp_path)
    assert res.returncode == 1 and "not inside a Slurm job" in res.stderr


def test_bad_gpu_count(tmp_path):
    res = _run_script(SLURM_DIR / "eopd_4b.sh", cwd=tmp_path, **_fake_job_env(tmp_path, 2, GPUS_PER_NODE="eight"))
    assert res.returncode == 1 and "GPUS_PER_NODE" in res.stderr


@pytest.mark.parametrize("knob", ["EOPD_COLLECTIVE_TIMEOUT_S", "EOPD_RDZV_JOIN_TIMEOUT_S", "EOPD_RDZV_PORT"])
def test_bad_timeouts_and_port(tmp_path, knob):
    res = _run_script(SLURM_DIR / "eopd_4b.sh", cwd=tmp_path, **_fake_job_env(tmp_path, 2, **{knob: "soon"}))
    assert res.returncode == 1 and knob in res.stderr and "launch:" not in res.stdout


# --- a real single-node Slurm ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster():
    try:
        cluster = LocalSlurm()
        cluster.__enter__()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local Slurm: {exc}")
    try:
        print(f"local Slurm: install {cluster.install_seconds or 0:.1f} s "
              f"(0: already installed), start {cluster.startup_seconds:.1f} s")
        yield cluster
    finally:
        cluster.__exit__(None, None, None)


@pytest.mark.slurm
def test_sbatch_runs_a_job(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -eu\necho \"job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST\" > result.txt\n"
                      "echo to-the-log\n")
    job_id = slurm_cluster.sbatch(["--output", str(tmp_path / "job-%j.out"), str(script)], cwd=tmp_path)
    info = slurm_cluster.wait(job_id, timeout_s=120)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), info.fields
    assert (tmp_path / "result.txt").read_text().strip() == f"job={job_id} nodes={slurm_cluster.node}"
    assert (tmp_path / f"job-{job_id}.out").read_text().strip() == "to-the-log"

    failing = tmp_path / "fail.sh"
    failing.write_text("#!/bin/bash\nexit 3\n")
    info = slurm_cluster.wait(slurm_cluster.sbatch(["--output", "/dev/null", str(failing)], cwd=tmp_path), 120)
    assert (info.state, info.exit_code) == ("FAILED", "3:0"), info.fields


@pytest.mark.slurm
def test_requeue_on_signal_runs_the_job_again(slurm_cluster, tmp_path):
    """The path the launchers rely on: USR1 to the batch shell -> trap -> scontrol requeue -> rerun."""
    script = tmp_path / "requeue.sh"
    script.write_text("""#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
set -u
echo "start restart=${SLURM_RESTART_COUNT:-0}" >> runs.txt
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    requeued=0
    # (kill the sleep ourselves: proctrack/linuxproc loses track of orphans when the shell ends)
    trap 'requeued=1; echo "USR1 -> requeue" >> runs.txt; kill $sleeper; scontrol requeue "$SLURM_JOB_ID"' USR1
    sleep 120 &
    sleeper=$!
    touch waiting
    wait $!  # returns when the trap has run; Slurm then ends this run
    ((requeued)) || echo "no USR1" >> runs.txt
    exit 0
fi
echo "finished restart=${SLURM_RESTART_COUNT}" >> runs.txt
""")
    job_id = slurm_cluster.sbatch(["--output", str(tmp_path / "requeue-%j.out"), str(script)], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "waiting").exists():
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    # Slurm holds a requeued job back (BeginTime, about two minutes); release it once the first run is gone.
    slurm_cluster.release_requeued(job_id, timeout_s=60)
    info = slurm_cluster.wait(job_id, timeout_s=120)
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 1), (
        f"{info.fields}\nslurmd: {slurm_cluster.log_tail('slurmd', 12)}")
    assert (tmp_path / "runs.txt").read_text().splitlines() == [
        "start restart=0", "USR1 -> requeue", "start restart=1", "finished restart=1"]


@pytest.mark.slurm
def test_tiny_job_under_sbatch(slurm_cluster, tmp_path):
    """slurm/eopd_tiny_cpu.sh submitted from a directory outside the repository, trained end to end."""
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {k: v for k, v in _clean_env(EOPD_TINY_PREPARE_ARGS=TINY_PREPARE_ARGS).items() if k.startswith("EOPD_")}
    job_id = slurm_cluster.sbatch(["--job-name=tinytest", str(SLURM_DIR / "eopd_tiny_cpu.sh"), *TINY_OVERRIDES],
                                  cwd=submit, env=env)
    info = slurm_cluster.wait(job_id, timeout_s=TINY_TIMEOUT_S, poll_s=3)
    log = (submit / f"tinytest-{job_id}.out").read_text()
    run_dir = submit / "runs" / "tiny_cpu-tinytest"
    train_logs = "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("train-*.log")))
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), f"{info.fields}\n{log}\n{train_logs}"
    assert "training step finished with exit code 0" in log
    assert log.index("===== resolved layout") < log.index("] launching;")  # the layout before the launch
    assert re.search(r"^world_size: 1$", log, re.M), log

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == TINY_ITERATIONS and all("iteration" in row for row in rows), rows
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "final_hf" / "config.json").is_file()
    # The weights reached vLLM's worker after every iteration without its per-layer reload-fallback
    # warning (dropped by the worker extension: the rotary cache and a tied head are not checkpoint tensors).
    assert all(row["time_sync"] > 0 for row in rows), rows
    assert "(Worker pid=" in train_logs, train_logs[-3000:]
    assert "Failed to load weights" not in train_logs, train_logs[-3000:]


# The launcher's own requeue path with a real tiny job (USR1 mid-training -> scontrol requeue -> the
# second allocation resumes and completes, losses equal to an uninterrupted run) is tested on two
# nodes in tests/test_slurm_multinode.py, where the second allocation also lands on other hosts;
# the same job on one node would cost the suite another minute for the same code path.


# --- the collective timeout the launchers hand to the trainer ------------------------------------------

@pytest.mark.parametrize("raw,want", [(None, 600.0), ("", 600.0), ("45", 45.0), ("2.5", 2.5)])
def test_collective_timeout_from_the_environment(monkeypatch, raw, want):
    from megatron_eopd.platform.distributed import COLLECTIVE_TIMEOUT_ENV, collective_timeout_s

    if raw is None:
        monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, raw)
    assert collective_timeout_s() == want


@pytest.mark.parametrize("raw", ["soon", "0", "-3", "inf", "nan"])
def test_bad_collective_timeout(monkeypatch, raw):
    from megatron_eopd.platform.distributed import COLLECTIVE_TIMEOUT_ENV, collective_timeout_s

    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=COLLECTIVE_TIMEOUT_ENV):
        collective_timeout_s()
