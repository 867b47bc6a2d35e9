"""tools/bench_weight_transport.py: every model tensor reaches a separate receiver process by both
transports (its checksums match), the table has a row per transport, and bad arguments are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_weight_transport.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_both_transports_deliver_the_whole_model_to_another_process(device):
    proc = _run("--models", "tiny", "--repeats", "1", "--bucket-mb", "0.01", "--device", device)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("tiny ")]
    assert [r[1] for r in rows] == ["bytes", "ipc"]
    assert all(r[-1] == "yes" for r in rows), rows
    assert all(float(r[3]) > 0 for r in rows)


@pytest.mark.parametrize("args, message", [(("--models", "70b"), "--models: choose from"),
                                           (("--transports", "nccl"), "--transports: choose from"),
                                           (("--repeats", "0"), "--repeats must be >= 1")])
def test_bad_arguments_are_refused_by_name(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr
