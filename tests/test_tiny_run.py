"""The main job (``make run`` = ``tools/run_tiny.py``): quality gates, cached assets, the console.

The full-budget run (preparing to the gates, 150 EOPD iterations through vLLM) is CI's job after
the suite (``.ci/run`` checks its summary).  Here: the gates' round logic on scripted validation
scores, and the tool end to end on a smoke budget with the transformers sampler.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_eopd.trainer import tiny
from megatron_eopd.trainer.tiny import PreparationError, QualityGate, TinyRun

REPO = Path(__file__).resolve().parents[1]


class ScriptedRun(TinyRun):
    """A TinyRun whose SFT rounds only record how far they trained and whose validation reads a script:
    the gate logic, not the training, is under test here."""

    def __init__(self, run_dir: Path, scores: dict[int, float], task: str = tiny.SOURCE):
        super().__init__(run_dir, task=task, log=lambda line: None)
        self.scores = scores
        self.trained_to: list[int] = []
        self.sft_sources: list[str] = []
        self.validated_on: list[str] = []

    def _sft(self, overrides: list[str], iterations: int) -> None:
        work = Path(next(o for o in overrides if o.startswith("run.dir=")).split("=", 1)[1])
        (work / "final_hf").mkdir(parents=True, exist_ok=True)
        (work / "final_hf" / "iterations").write_text(str(iterations))
        self.trained_to.append(iterations)
        self.sft_sources.append(next(o for o in overrides if o.startswith("data.source=")).split("=", 1)[1])

    def validate(self, model_dir: Path, task: str = tiny.SOURCE) -> float:
        self.validated_on.append(task)
        return self.scores[int((model_dir / "iterations").read_text())]


def _prepare(tmp_path, scores, gate):
    run = ScriptedRun(tmp_path, scores)
    made = run._prepare_model("student", tmp_path / "out", gate)
    return run, made, int((tmp_path / "out" / "iterations").read_text())


def test_a_gate_stops_at_the_first_round_that_reaches_its_target(tmp_path):
    gate = QualityGate(target=0.3, ceiling=0.5, first_round=700, round_iterations=50, max_iterations=3000)
    run, made, kept = _prepare(tmp_path, {700: 0.1, 750: 0.22, 800: 0.35, 850: 0.45}, gate)
    assert run.trained_to == [700, 750, 800] and kept == 800
    assert made["iterations"] == 800 and made["validation_avg"] == 0.35 and len(made["rounds"]) == 3


def test_a_round_that_overshoots_the_ceiling_is_undone(tmp_path):
    gate = QualityGate(target=0.3, ceiling=0.5, first_round=700, round_iterations=50, max_iterations=3000)
    run, made, kept = _prepare(tmp_path, {700: 0.1, 750: 0.22, 800: 0.71}, gate)
    assert run.trained_to == [700, 750, 800]
    assert kept == 750 and made["iterations"] == 750 and made["validation_avg"] == 0.22  # the model kept is 750's


def test_a_gate_not_reached_within_its_budget_is_an_error(tmp_path):
    gate = QualityGate(target=0.95, first_round=100, round_iterations=100, max_iterations=300)
    with pytest.raises(PreparationError, match=r"validation Avg@4 0.900 after 300 SFT iterations, below its gate 0.95"):
        _prepare(tmp_path, {100: 0.5, 200: 0.8, 300: 0.9}, gate)
    assert not (tmp_path / "out").exists()


def test_the_long_task_trains_its_teacher_on_long_chains_and_keeps_make_runs_student_base(tmp_path):
    """Issue 23's regime: the teacher is SFT'd and gated on the long task, the student base on the default one."""
    teacher = ScriptedRun(tmp_path / "t", {1000: 0.3, 1250: 0.7}, task=tiny.LONG_SOURCE)
    made = teacher._prepare_model("teacher", tmp_path / "t" / "out", teacher.plan["teacher"][1])
    assert made["iterations"] == 1250 and set(teacher.sft_sources) == set(teacher.validated_on) == {tiny.LONG_SOURCE}
    student = ScriptedRun(tmp_path / "s", {700: 0.35}, task=tiny.LONG_SOURCE)
    student._prepare_model("student", tmp_path / "s" / "out", student.plan["student"][1])
    assert set(student.sft_sources) == set(student.validated_on) == {tiny.SOURCE}
    recipe = teacher._recipe()
    assert recipe["task"] == tiny.LONG_SOURCE and recipe["teacher"]["sft_task"] == tiny.LONG_SOURCE
    assert recipe["student"] == {"sft_task": tiny.SOURCE, **dataclasses.asdict(tiny.STUDENT_GATE)}
    # The default task's recipe is what it was before tasks had names (cached assets stay valid).
    assert TinyRun(tmp_path)._recipe() == {"seed": 1, "teacher": dataclasses.asdict(tiny.TEACHER_GATE),
                                           "student": dataclasses.asdict(tiny.STUDENT_GATE)}
    assert tiny.LONG_TEACHER_GATE.ceiling <= 0.8  # the teacher must leave room: Avg@64 at most 0.8


def test_the_default_gates_and_validation_problems():
    """Validation problems are test-split problems no report uses; the student's band is below the teacher."""
    assert tiny.VALIDATION_FIRST >= tiny.EVAL_PROBLEMS
    assert tiny.VALIDATION_FIRST + tiny.VALIDATION_PROBLEMS <= 512  # the synthetic test split
    assert tiny.STUDENT_GATE.ceiling < tiny.TEACHER_GATE.target
    seeds = [tiny.preparation_seeds(s) for s in (1, 2, 3)]
    assert len({(s["teacher"], s["student"], s["eopd"]) for s in seeds}) == 3


SMOKE = ["--teacher-sft-iterations", "12", "--student-sft-iterations", "4", "train.iterations=2",
         "rollout.engine=hf", "rollout.sampling.max_tokens=48"]


def _run_tiny(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "run_tiny.py"), *args], capture_output=True,
                          timeout=900, cwd=REPO)
    # Decoded by hand: text mode would turn the bars' carriage returns into line breaks.
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_make_run_on_a_smoke_budget_keeps_the_console_short_and_the_logs_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "tiny"
    proc = _run_tiny("--run-dir", str(run_dir), *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What a terminal shows: a bar redraws its line with carriage returns, a finished one clears itself.
    lines = [line.split("\r")[-1] for line in proc.stdout.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert lines[0] == f"run directory {run_dir}/; library and engine logs go to {run_dir}/logs/run_tiny.log"
    assert any(line.startswith("optional accelerators - transformer-engine absent") for line in lines)
    assert any(line.startswith("| student Avg@4, before -> after EOPD") for line in lines)
    assert len(lines) < 40, proc.stdout
    # Megatron-Core's fallback warnings are stated once by us, not by it; library output is in the log.
    assert "Falling back" not in proc.stdout + proc.stderr and "UserWarning" not in proc.stdout + proc.stderr
    assert "Loading weights" in (run_dir / "logs" / "run_tiny.log").read_text()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["seed"] == tiny.DEFAULT_SEED
    assert summary["heldout_gain"] == pytest.approx(
        summary["student_after"]["avg_at_k"] - summary["student_before"]["avg_at_k"])
    assert summary["preparation"]["teacher"]["iterations"] == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_rkl = sum(r["rkl_estimate"] for r in rows[:10]) / len(rows[:10])
    assert summary["first_iterations"]["rkl_estimate"] == pytest.approx(first_rkl)
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == ["iter_0000001.jsonl", "iter_0000002.jsonl"]

    # Another seed must not reuse these models: one line naming both recipes, nothing changed.
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "assets").rglob("*") if p.is_file()}
    other = _run_tiny("--run-dir", str(run_dir), "--seed", "2", *SMOKE)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "run_tiny: error: " in other.stderr and "holds models prepared another way" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "assets").rglob("*") if p.is_file()} == before


def test_bad_overrides_fail_before_any_preparation(tmp_path):
    proc = _run_tiny("--run-dir", str(tmp_path / "tiny"), "train.bogus=1")
    assert proc.returncode == 2
    assert "run_tiny: error: unknown config key(s) in 'train': bogus" in proc.stderr
    assert not (tmp_path / "tiny" / "assets").exists()


def test_models_prepared_without_a_manifest_are_not_reused(tmp_path):
    """A run directory from before the quality gates holds models of a fixed budget: refused, not mixed in."""
    (tmp_path / "assets" / "teacher").mkdir(parents=True)
    with pytest.raises(PreparationError, match="without preparation.json"):
        TinyRun(tmp_path, log=lambda line: None).prepare()
