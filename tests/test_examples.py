"""The examples run as documented and show what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_eopd_loss_under_tp_matches_full_logits():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "examples" / "eopd_loss_under_tp.py"), "--tp", "2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    loss_diff = float(re.search(r"max \|loss difference\| (\S+)", out).group(1))
    grad_diff = float(re.search(r"max \|gradient difference\| over all shards (\S+)", out).group(1))
    gate = re.search(r"gate_fraction\s+(\S+)\s+(\S+)", out)
    clip = re.search(r"clip_fraction\s+(\S+)\s+(\S+)", out)
    assert loss_diff < 1e-5 and grad_diff < 1e-6, out
    # The example's data exercises both sides of the gate and the PPO clip.
    assert 0.0 < float(gate.group(1)) < 1.0 and gate.group(1) == gate.group(2), out
    assert 0.0 < float(clip.group(1)) < 1.0, out


def test_eopd_loss_example_builds_every_input_on_the_platform_device():
    """Under NCCL every tensor must be on the GPU; "meta" stands in for a device other than the CPU."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("eopd_loss_under_tp", REPO / "examples" / "eopd_loss_under_tp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    inputs = example.make_inputs(16, 64, 0, torch.device("meta"))
    assert set(inputs) == {"teacher_logits", "student_logits", "sampled", "mask", "old_logprobs"}
    assert {name: t.device.type for name, t in inputs.items()} == dict.fromkeys(inputs, "meta")
