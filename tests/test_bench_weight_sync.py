"""tools/bench_weight_sync.py: a real Megatron student -> vLLM sync is timed and broken into its parts.

The tiny model keeps it short; the parts table must name every part of the in-memory path and of
the syncer's own parity probe, and the parts together must stay within the timed whole.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_weight_sync.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.vllm
def test_one_sync_is_broken_into_its_parts():
    from megatron_eopd.rollout.engine import vllm_importable

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    proc = _run("--sizes", "tiny", "--repeats", "1", "--dtype", "float32", "--paths", "memory/ipc")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("tiny ") and "memory/ipc" in line)
    sync_s, probe_s, max_diff = float(row[5]), float(row[7]), float(row[8])
    assert max_diff < 1e-3, row  # fp32 on both sides: the probe agrees
    parts = dict(re.findall(r"^  (\w+) +([\d.]+) +[\d.]+%$", out, flags=re.M))
    assert list(parts) == ["export", "pack", "engine_load", "finish", "prefix_cache_reset",
                           "probe_generate", "probe_megatron", "probe_score", "probe_compare"]
    load = sum(float(v) for k, v in parts.items() if not k.startswith("probe_"))
    probe = sum(float(v) for k, v in parts.items() if k.startswith("probe_"))
    assert load <= sync_s + 2e-3 and abs(probe - probe_s) <= 2e-3, (parts, sync_s, probe_s)
    # The probe compares the first parity.sequence_length (32) tokens' 31 and the generated one, x 4.
    assert "probe 128 tokens" in out


@pytest.mark.parametrize("args, message", [(("--sizes", "qwen3-70b"), "unknown sizes"),
                                           (("--paths", "nccl"), "--paths: choose from"),
                                           (("--repeats", "0"), "--repeats must be >= 1")])
def test_bad_arguments_are_refused_by_name(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
