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
