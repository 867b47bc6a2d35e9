"""tools/gpu_check.sh on CPU: a failing stage and a stage stopped at its cap each cost only
themselves, every stage that ran leaves its file, and the summary says what happened to each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


def test_a_failing_stage_and_a_capped_one_do_not_stop_the_run(tmp_path):
    env = dict(os.environ, GPU_PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu", GPU_CHECK_OUT=str(tmp_path),
               GPU_CHECK_STAGES="bench-loss bench-transport", GPU_CHECK_BENCH_LOSS_ARGS="--kernels bogus",
               GPU_CHECK_CAP_BENCH_TRANSPORT="1")  # an explicit cap is taken as it is, not scaled for CPU
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["3-bench-loss.txt", "5-bench-transport.txt", "summary.md"]  # only the stages asked for
    assert "--kernels takes distinct auto, torch, triton" in (tmp_path / "3-bench-loss.txt").read_text()
    assert "[gpu-check] stopped at the 1s cap" in (tmp_path / "5-bench-transport.txt").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| bench-")}
    assert rows["bench-loss"][0] == "failed (rc 2)", rows
    assert "--kernels takes distinct" in rows["bench-loss"][3], rows  # argparse's line as the result
    assert rows["bench-transport"][0] == "timed out at its cap" and rows["bench-transport"][2] == "1", rows
