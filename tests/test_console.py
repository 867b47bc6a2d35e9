"""The console: a job's own lines reach the terminal, everything else (libraries, warnings, child
processes, C-level writes) goes to the log file, and a failure still reaches the terminal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    sys.path.insert(0, {repo!r})
    from megatron_eopd import console

    console.say("before the capture")
    with console.capture_output({log!r}, prog="job"):
        console.say("job line")
        print("a library's print")
        warnings.warn("a library's warning")
        logging.getLogger("some.library").warning("a library's log record")
        os.write(2, b"a C extension's write\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        bar = console.progress(total=3, desc="phase")
        for _ in range(3):
            bar.update(1)
        bar.close()
        console.say("table line")
        if {fail!r}:
            raise RuntimeError("the engine died: worker exited")
    print("after the capture")
""")


def _run(tmp_path: Path, *, fail: bool) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "job.log"
    script = tmp_path / "job.py"
    script.write_text(JOB.format(repo=str(REPO), log=str(log), fail=fail))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120), log


LIBRARY_OUTPUT = ["a library's print", "a library's warning", "a library's log record", "a C extension's write",
                  "a child process"]


def test_job_lines_on_the_terminal_and_the_rest_in_the_log(tmp_path):
    proc, log = _run(tmp_path, fail=False)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for line in ("before the capture", "job line", "table line", "after the capture", "phase"):
        assert line in terminal, (line, terminal)
    for line in LIBRARY_OUTPUT:
        assert line not in terminal, (line, terminal)
    logged = log.read_text()
    for line in LIBRARY_OUTPUT + ["job line", "table line"]:  # the log holds the whole story
        assert line in logged, (line, logged)
    assert "after the capture" not in logged  # the descriptors are restored
    assert "before the capture" not in logged


def test_a_failure_reaches_the_terminal_with_the_log_path(tmp_path):
    proc, log = _run(tmp_path, fail=True)
    assert proc.returncode == 1
    assert "job: error: RuntimeError: the engine died: worker exited" in proc.stderr
    assert f"(full log: {log})" in proc.stderr
    assert "after the capture" not in proc.stdout
    logged = log.read_text()
    assert "Traceback" in logged and "the engine died" in logged
