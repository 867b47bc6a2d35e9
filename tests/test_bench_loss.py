"""tools/bench_loss.py --quick runs, prints its table, and the vocab-parallel loss peaks lower."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_table_and_uses_less_memory():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench_loss.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peaks = {}
    for line in proc.stdout.splitlines():
        # rich draws "│", plain text uses spaces: split on either.
        cells = [c.strip() for c in re.split(r"[│|]|\s{2,}", line) if c.strip()]
        if len(cells) >= 3 and cells[1] in ("naive", "vocab-parallel"):
            peaks[cells[1]] = float(cells[2])
    assert set(peaks) == {"naive", "vocab-parallel"}, proc.stdout
    assert peaks["vocab-parallel"] < peaks["naive"], proc.stdout
    assert "loss rel diff" in proc.stdout


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_loss_tool", REPO_ROOT / "tools" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_out_of_memory_gives_an_oom_row_not_a_crash(monkeypatch, capsys):
    import pytest
    import torch

    bench = _tool()
    calls = []

    def naive_oom(student, *rest):
        calls.append(student.grad)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.55 GiB")

    def recorded_vp(student, *rest):
        calls.append(student.grad)
        return real_vp(student, *rest)

    real_vp = bench.vocab_parallel_step
    monkeypatch.setattr(bench, "naive_step", naive_oom)
    monkeypatch.setattr(bench, "vocab_parallel_step", recorded_vp)
    args = bench.parse_args(["--tokens", "64,128", "--vocab", "4096", "--chunk-tokens", "32"])
    rows = bench.run(args)
    assert [(r["tokens"], r["impl"], r["oom"]) for r in rows] == [
        (64, "naive", True), (64, "vocab-parallel", False), (128, "naive", True), (128, "vocab-parallel", False)]
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in rows if not r["oom"])
    assert all(g is None for g in calls), "a step started with an earlier run's gradient still alive"
    bench.render(rows, args)
    out = capsys.readouterr().out
    assert sum(line.count("OOM") for line in out.splitlines() if "naive" in line) == 4  # 2 rows x (peak, ms)

    monkeypatch.setattr(bench, "naive_step", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not hidden
        bench.run(args)


def test_inputs_are_drawn_in_the_target_dtype(monkeypatch):
    """No fp32 [tokens, vocab] staging copy: every large tensor is created in the bench dtype."""
    import torch

    bench = _tool()
    made = []
    real_randn = torch.randn

    def spy(*size, **kwargs):
        out = real_randn(*size, **kwargs)
        made.append((tuple(out.shape), out.dtype, out.device.type))
        return out

    monkeypatch.setattr(torch, "randn", spy)
    student, teacher, *_ = bench.make_inputs(32, 1000, torch.bfloat16, "cpu")
    big = [m for m in made if m[0] == (32, 1000)]
    assert big == [((32, 1000), torch.bfloat16, "cpu")] * 2
    assert student.dtype == teacher.dtype == torch.bfloat16 and student.requires_grad
