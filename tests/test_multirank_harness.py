"""The multi-rank harness at a world size some layouts do not fit (e.g. one GPU): those are skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

INNER = '''
import torch
import torch.distributed as dist

from megatron_eopd.platform import collective_device
from megatron_eopd.testing.multirank import multirank_check


@multirank_check(tp=[1, 2])
def test_world_sum(ctx):
    value = torch.ones(1, device=collective_device())
    dist.all_reduce(value)
    assert value.item() == ctx.world_size == 1
'''


def test_layouts_that_do_not_fit_are_skipped_not_launched(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    env = dict(os.environ, EOPD_MULTIRANK_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_inner.py"), "-q", "-rs", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'bt'}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"\b1 passed, 1 skipped\b", out), out[-3000:]
    assert "TP*PP = 2*1 does not divide the launch's world size 1" in out, out[-3000:]
    plans = list((tmp_path / "bt").glob("multirank[0-9]*/plan.json"))
    assert len(plans) == 1, plans
    assert [s["check_id"] for s in json.loads(plans[0].read_text())] == ["test_inner::test_world_sum[tp1-pp1]"]


def test_cpu_ranks_see_no_gpu_and_cuda_ranks_keep_theirs():
    from megatron_eopd.testing.multirank import rank_environment

    parent = {"CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "4", "PATH": "/bin"}
    cpu = rank_environment(parent, "cpu")
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "4" and cpu["PYTHONUNBUFFERED"] == "1"
    assert rank_environment(parent, "cuda")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert rank_environment({}, "cpu")["OMP_NUM_THREADS"] == "1"
    assert parent["CUDA_VISIBLE_DEVICES"] == "0,1"  # the caller's mapping is not changed


def test_the_cpu_layer_beside_visible_gpus_names_the_way_out():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_eopd.platform import cpu_compat; cpu_compat.enable()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "run.device=cpu" in proc.stderr and "CUDA_VISIBLE_DEVICES=" in proc.stderr, proc.stderr[-2000:]
