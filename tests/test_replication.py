"""The replication study (``make replicate``): its report is computed from the runs' own files.

- Fabricated runs with known numbers (no training): the aggregation over seeds (mean, sample std),
  the verdicts on the paper's three directions and the tables say what the numbers say.
- The shortened study end to end (``tools/replicate.py --quick``: one seed, OPD, EOPD and FKL-only,
  2 iterations, 6 held-out problems, short SFT budgets; the in-process HF sampler for rollouts): the
  report has its sections, one table row per method, valid PNGs; its numbers equal an independent
  recomputation from ``metrics.jsonl`` and ``eval.json``; editing those files and rendering again
  changes the report accordingly; a rerun skips the finished runs; other settings are refused.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_eopd.replication.report import SECTIONS, write_report
from megatron_eopd.replication.study import HELDOUT, METHODS, StudyConfig

REPO = Path(__file__).resolve().parents[1]
REPLICATE = str(REPO / "tools" / "replicate.py")
QUICK_ARGS = ["--quick", "--iterations", "2", "--eval-problems", "6", "--teacher-sft-iterations", "12",
              "--student-sft-iterations", "3", "--set", "rollout.engine=hf", "--set", "rollout.sampling.max_tokens=64"]
RUN_TIMEOUT = 900  # generous: the machine may be shared; idle, the quick study takes about 2 minutes


# --------------------------------------------------------------------------- helpers


def pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def heldout_from_eval(path: Path, ks=(1, 4, 8)) -> dict:
    """Avg@n and Pass@k straight from the per-sample flags, without the package's code."""
    rows = json.loads(path.read_text())["results"][HELDOUT]
    flags = [[bool(s["correct"]) for s in row["samples"]] for row in rows]
    n = len(flags[0])
    out = {f"avg@{n}": sum(map(sum, flags)) / (n * len(flags))}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(row), k) for row in flags) / len(flags)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_records(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def section_titles(markdown: str) -> list[str]:
    return [line[3:].strip() for line in markdown.splitlines() if line.startswith("## ")]


def table_rows(markdown: str, first_header_cell: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``first_header_cell``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= 400 and image.size[1] >= 300, image.size


# --------------------------------------------------------------------------- fabricated runs (fast)


def fabricate_study(root: Path, values: dict, *, iterations: int = 10, problems: int = 4) -> StudyConfig:
    """A study directory with finished runs whose numbers are given.

    ``values[(method, seed)] = (entropy_final, fkl_final, correct_per_problem)``: the entropy and FKL of
    the last iteration (the final window is one iteration here), and how many of 8 samples are correct.
    """
    config = StudyConfig(methods=tuple(dict.fromkeys(m for m, _ in values)),
                         seeds=tuple(dict.fromkeys(s for _, s in values)), iterations=iterations,
                         eval_problems=problems)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"config": config.to_dict()}))
    for (method, seed), (entropy, fkl, correct) in values.items():
        run = root / "runs" / f"{method}-seed{seed}"
        run.mkdir(parents=True)
        rows = [{"iteration": i, "student_entropy": 1.0, "fkl_gated": 0.5, "gate_fraction": 0.2,
                 "teacher_entropy": 0.6} for i in range(1, iterations + 1)]
        rows[-1].update(student_entropy=entropy, fkl_gated=fkl)
        write_records(run / "metrics.jsonl", rows)
        results = {HELDOUT: [{"id": f"p{p}", "samples": [{"correct": j < c} for j in range(8)]}
                             for p, c in enumerate(correct)]}
        (run / "eval.json").write_text(json.dumps({"results": results}))
    return config


def test_aggregation_and_verdicts_follow_the_numbers(tmp_path):
    values = {
        ("opd", 1): (0.40, 0.90, [0, 2, 8, 1]), ("opd", 2): (0.42, 0.95, [0, 3, 8, 1]),
        ("opd", 3): (0.44, 0.85, [1, 2, 8, 0]),
        # entropy clearly higher; FKL lower but within the spread; Pass@8 lower (reversed)
        ("eopd", 1): (0.60, 0.80, [0, 2, 8, 0]), ("eopd", 2): (0.62, 1.00, [0, 2, 8, 0]),
        ("eopd", 3): (0.64, 0.75, [0, 3, 8, 0]),
    }
    fabricate_study(tmp_path, values)
    summary = write_report(tmp_path)

    entropy = summary["per_method"]["eopd"]["student_entropy_final"]
    assert entropy["mean"] == pytest.approx(0.62) and entropy["std"] == pytest.approx(0.02)
    assert (entropy["min"], entropy["max"]) == (0.60, 0.64)
    pass8 = summary["per_method"]["opd"]["pass@8"]
    assert pass8["values"] == pytest.approx([0.75, 0.75, 0.75])
    verdicts = {d["key"]: d for d in summary["directions"]}
    assert verdicts["entropy"]["status"] == "holds, beyond the seed spread"
    assert verdicts["entropy"]["delta"] == pytest.approx(0.20) and verdicts["entropy"]["every_seed_separated"]
    assert verdicts["fkl_high_entropy"]["status"] == "holds in the mean, within the seed spread"
    assert verdicts["pass_at_k"]["status"].startswith("reversed, beyond the seed spread")  # 0.5 vs 0.75, no spread
    assert verdicts["pass_at_k"]["delta"] == pytest.approx(-0.25)
    # The paired intervals: entropy +0.20 in every seed pair (an interval of width 0, so it holds);
    # Pass@8 per problem: EOPD loses problem 3 (1 of 8 correct for OPD) in every seed, -1/4 each time.
    entropy_interval = verdicts["entropy"]["interval"]
    assert entropy_interval["delta"] == pytest.approx(0.20) and entropy_interval["verdict"] == "holds"
    assert (entropy_interval["num_seeds"], entropy_interval["num_problems"]) == (3, 1)
    pass8_interval = verdicts["pass_at_k"]["intervals"]["pass@8"]
    assert pass8_interval["delta"] == pytest.approx(-0.25) and pass8_interval["num_problems"] == 4
    assert pass8_interval["low"] <= -0.25 <= pass8_interval["high"] and pass8_interval["verdict"] == "cannot tell at this budget"
    # Pass@1 per problem from the counts: EOPD - OPD = mean over seeds and problems of (c_e - c_o) / 8.
    diffs = [(e - o) / 8 for seed in (1, 2, 3)
             for e, o in zip(values[("eopd", seed)][2], values[("opd", seed)][2])]
    assert verdicts["pass_at_k"]["intervals"]["pass@1"]["delta"] == pytest.approx(sum(diffs) / len(diffs))

    report = (tmp_path / "report.md").read_text()
    assert section_titles(report) == list(SECTIONS)
    assert "EOPD sustains the student's token entropy better than OPD: holds, beyond the seed spread." in report
    assert "0.620 ± 0.020" in report and "+0.200" in report
    assert "Paired bootstrap (3 seeds): +0.200, 95% interval [+0.200, +0.200]: **holds**" in report
    rows = {row[0]: row for row in table_rows(report, "method")}
    assert set(rows) == {"OPD", "EOPD"}
    assert rows["EOPD"][-1] == "50.0 ± 0.0" and rows["OPD"][-1] == "75.0 ± 0.0"
    assert summary["pass_at_k_curves"]["eopd"]["k"] == [1, 2, 4, 8]
    assert summary["pass_at_k_curves"]["eopd"]["mean"][-1] == pytest.approx(0.5)
    assert summary["pass_at_k_curves"]["opd"]["min"][-1] == summary["pass_at_k_curves"]["opd"]["max"][-1] == 0.75
    assert set(verdicts["pass_at_k"]["intervals"]) == {"pass@1", "pass@2", "pass@4", "pass@8"}
    interval_rows = {row[0]: row for row in table_rows(report, "k")}
    assert set(interval_rows) == {"Pass@1", "Pass@2", "Pass@4", "Pass@8"}
    assert interval_rows["Pass@8"][1] == "−25.0" and interval_rows["Pass@8"][-1] == "cannot tell at this budget"
    for name in ("entropy.png", "fkl_high_entropy.png", "gate_fraction.png", "pass_at_k.png", "pass_at_k_curves.png"):
        check_png(tmp_path / "plots" / name)
        assert f"](plots/{name})" in report


def test_one_seed_and_missing_runs_are_said_plainly(tmp_path):
    fabricate_study(tmp_path, {("opd", 1): (0.4, 0.9, [1, 2]), ("eopd", 1): (0.5, 0.8, [2, 2])}, problems=2)
    (tmp_path / "runs" / "eopd-seed1" / "eval.json").unlink()  # not evaluated yet
    summary = write_report(tmp_path)
    assert summary["missing_runs"] == ["runs/eopd-seed1"]
    assert all(d["status"].startswith("not assessed") for d in summary["directions"])
    report = (tmp_path / "report.md").read_text()
    assert "**Incomplete:**" in report and "runs/eopd-seed1" in report

    (tmp_path / "runs" / "eopd-seed1" / "eval.json").write_text(json.dumps({"results": {HELDOUT: [
        {"id": "p0", "samples": [{"correct": True}] * 8}, {"id": "p1", "samples": [{"correct": False}] * 8}]}}))
    summary = write_report(tmp_path)
    statuses = [d["status"] for d in summary["directions"]]
    assert statuses[0] == "holds in the mean (one seed: spread unknown)"


def test_ablation_arms_are_compared_with_the_papers_eopd(tmp_path):
    values = {("eopd", 1): (0.5, 0.8, [2, 4, 8, 0]), ("eopd", 2): (0.5, 0.8, [2, 4, 8, 0]),
              ("eopd_tau0.4", 1): (0.6, 0.7, [4, 4, 8, 1]), ("eopd_tau0.4", 2): (0.6, 0.7, [4, 4, 8, 1]),
              ("opd", 1): (0.4, 0.9, [2, 4, 8, 0]), ("opd", 2): (0.4, 0.9, [2, 4, 8, 0])}
    fabricate_study(tmp_path, values)
    summary = write_report(tmp_path)
    arms = {a["method"]: a for a in summary["ablation"]}
    assert set(arms) == {"eopd_tau0.4", "opd"}
    # tau 0.4 gets 2 more samples of problem 0 and one of problem 3 right: +3/32 at Pass@1, and
    # problem 3 solved at Pass@8 (+1/4), in both seeds.
    assert arms["eopd_tau0.4"]["pass@1"]["delta"] == pytest.approx(3 / 32)
    assert arms["eopd_tau0.4"]["pass@8"]["delta"] == pytest.approx(0.25)
    assert arms["opd"]["pass@8"]["delta"] == pytest.approx(0.0)
    report = (tmp_path / "report.md").read_text()
    assert "### Against the paper's EOPD (tau 0.8, top-16)" in report
    assert "Best at Pass@8: EOPD tau=0.4, +25.0 points above the paper's EOPD in the mean" in report


def test_every_method_is_a_valid_trainer_config_with_its_loss():
    from megatron_eopd.trainer.config import load_train_config

    want = {"opd": (0.8, 16, "off"), "eopd": (0.8, 16, "topk"), "eopd_tau0.4": (0.4, 16, "topk"),
            "eopd_tau1.6": (1.6, 16, "topk"), "eopd_top32": (0.8, 32, "topk")}
    for name, (tau, topk, fkl_mode) in want.items():
        loss = load_train_config("tiny_cpu", list(METHODS[name].overrides)).loss
        assert (loss.tau, loss.topk, loss.fkl_mode) == (tau, topk, fkl_mode), name


def test_study_config_is_checked():
    with pytest.raises(ValueError, match="unknown method"):
        StudyConfig(methods=("opd", "grpo"))
    with pytest.raises(ValueError, match="Pass@k"):
        StudyConfig(eval_samples=4)  # k = 8 is reported
    with pytest.raises(ValueError, match="the study sets"):
        StudyConfig(overrides=("train.seed=7",))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        StudyConfig(task="synthetic:arith-hard")
    with pytest.raises(ValueError, match="the study sets"):
        StudyConfig(overrides=("data.source=synthetic:arith-long",))  # the task is the study's own option
    assert StudyConfig().methods == ("opd", "eopd", "fkl_only")  # the ablation arms are asked for by name
    assert set(METHODS) == {"opd", "eopd", "fkl_only", "eopd_tau0.4", "eopd_tau1.6", "eopd_top32"}


# --------------------------------------------------------------------------- the shortened study (slow)


def _replicate(*args: str, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, REPLICATE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    study = tmp_path_factory.mktemp("replication") / "study"
    proc = _replicate("--study-dir", str(study), *QUICK_ARGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return study, proc


def test_quick_study_report_structure(quick_study):
    study, _ = quick_study
    report = (study / "report.md").read_text()
    assert section_titles(report) == list(SECTIONS)
    rows = {row[0]: row for row in table_rows(report, "method")}
    assert set(rows) == {"OPD", "EOPD", "FKL-only", "student base (before distillation)", "teacher"}
    assert [row[0] for row in table_rows(report, "run")] == [
        f"[runs/{m}-seed1](runs/{m}-seed1/)" for m in ("opd", "eopd", "fkl_only")]
    for name in ("entropy.png", "fkl_high_entropy.png", "gate_fraction.png", "pass_at_k.png", "pass_at_k_curves.png"):
        check_png(study / "plots" / name)
        assert f"](plots/{name})" in report
    summary = json.loads((study / "summary.json").read_text())
    assert [d["key"] for d in summary["directions"]] == ["entropy", "fkl_high_entropy", "pass_at_k"]
    samples = summary["config"]["eval_samples"]
    assert summary["pass_at_k_curves"]["eopd"]["k"][-1] == samples
    assert all(d["interval"]["num_seeds"] >= 1 and d["interval"]["verdict"] for d in summary["directions"])
    assert all("one seed" in d["status"] or d["status"] in ("no difference", "not assessable")
               for d in summary["directions"])


def test_quick_study_numbers_are_recomputed_from_the_run_files(quick_study):
    study, _ = quick_study
    summary = json.loads((study / "summary.json").read_text())
    report = (study / "report.md").read_text()
    per_run = {row[0]: row for row in table_rows(report, "run")}
    assert len(summary["runs"]) == 3
    for run in summary["runs"]:
        run_dir = study / run["dir"]
        rows = records(run_dir / "metrics.jsonl")
        assert len(rows) == 2
        # OPD does not train on the forward KL but measures it on the high-entropy tokens.
        assert all(r["fkl_gated"] is not None for r in rows if r["gate_fraction"] > 0)
        assert run["scalars"]["student_entropy_final"] == pytest.approx(rows[-1]["student_entropy"], abs=1e-12)
        assert run["scalars"]["student_entropy_first"] == pytest.approx(rows[0]["student_entropy"], abs=1e-12)
        assert run["scalars"]["gate_fraction_final"] == pytest.approx(rows[-1]["gate_fraction"], abs=1e-12)
        heldout = heldout_from_eval(run_dir / "eval.json")
        for key, value in heldout.items():
            assert run["scalars"][key] == pytest.approx(value, abs=1e-12), key
        row = per_run[f"[{run['dir']}]({run['dir']}/)"]
        assert row[2] == f"{rows[0]['student_entropy']:.3f} → {rows[-1]['student_entropy']:.3f}"
        assert row[-3] == f"{100 * heldout['pass@8']:.1f}"
        samples = [s for r in json.loads((run_dir / "eval.json").read_text())["results"][HELDOUT] for s in r["samples"]]
        cut = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
        assert row[-2] == f"{100 * cut:.1f}"  # held-out samples cut at max tokens
    teacher = heldout_from_eval(study / "evals" / "teacher.json")
    teacher_row = {row[0]: row for row in table_rows(report, "method")}["teacher"]
    assert teacher_row[-1] == f"{100 * teacher['pass@8']:.1f}"


def test_quick_study_report_follows_edited_files_and_rerun_skips(quick_study, tmp_path):
    import shutil

    study, _ = quick_study
    copy = tmp_path / "study"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("assets", "checkpoints", "final_hf"))
    metrics = copy / "runs" / "opd-seed1" / "metrics.jsonl"
    rows = records(metrics)
    rows[-1]["student_entropy"] = 9.8765
    write_records(metrics, rows)
    eval_path = copy / "runs" / "eopd-seed1" / "eval.json"
    evaluation = json.loads(eval_path.read_text())
    for row in evaluation["results"][HELDOUT]:
        for sample in row["samples"]:
            sample["correct"] = True
    eval_path.write_text(json.dumps(evaluation))

    proc = _replicate("--study-dir", str(copy), "--report-only", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((copy / "summary.json").read_text())
    by_run = {r["dir"]: r for r in summary["runs"]}
    assert by_run["runs/opd-seed1"]["scalars"]["student_entropy_final"] == 9.8765
    assert by_run["runs/eopd-seed1"]["scalars"]["pass@8"] == 1.0
    report = (copy / "report.md").read_text()
    methods = {row[0]: row for row in table_rows(report, "method")}
    assert methods["OPD"][2].endswith("→ 9.877") and methods["EOPD"][-1] == "100.0"
    entropy = next(d for d in summary["directions"] if d["key"] == "entropy")
    assert entropy["status"].startswith("does not hold")  # OPD's edited entropy is now far higher

    # The original study: a rerun with the same settings skips every finished run; other settings are refused.
    proc = _replicate("--study-dir", str(study), *QUICK_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, skipped") == 3
    proc = _replicate("--study-dir", str(study), *QUICK_ARGS, "--iterations", "5", timeout=120)
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_the_long_task_option_sets_its_sampling_and_reaches_every_run():
    """--task synthetic:arith-long: 64 samples, Pass@1/8/64, its own directory, the source in every run."""
    from megatron_eopd.replication.study import StudyPaths, train_overrides
    from megatron_eopd.trainer.config import load_train_config
    from megatron_eopd.trainer.tiny import TinyRun

    sys.path.insert(0, str(REPO / "tools"))
    import replicate

    args = replicate.build_parser().parse_args(["--task", "synthetic:arith-long"])
    config = replicate.config_from_args(args)
    assert (config.task, config.eval_samples, config.ks) == ("synthetic:arith-long", 64, (1, 8, 64))
    assert replicate.default_study_dir(args) == Path("runs/replication-long")
    smaller = replicate.config_from_args(replicate.build_parser().parse_args(
        ["--task", "synthetic:arith-long", "--eval-samples", "16"]))
    assert smaller.ks == (1, 8)  # the k it has samples for
    default = replicate.config_from_args(replicate.build_parser().parse_args([]))
    assert (default.task, default.eval_samples, default.ks) == ("synthetic:arith", 8, (1, 4, 8))
    from megatron_eopd.data.synthetic import TASKS
    from megatron_eopd.replication.study import STUDY_PRESETS

    for task in TASKS:  # every task --task offers has a study preset, and the preset's fields are StudyConfig's
        assert replicate.config_from_args(replicate.build_parser().parse_args(["--task", task])).task == task
    from megatron_eopd.trainer.tiny import PREPARATION

    assert set(STUDY_PRESETS) == set(TASKS) == set(PREPARATION)  # a new task needs its study and its models

    assets = TinyRun(Path("study"), task=config.task)
    run = load_train_config("tiny_cpu", train_overrides(StudyPaths(Path("study")), assets, config, "eopd", 3))
    assert run.data.source == "synthetic:arith-long" and run.train.seed == 3
    assert assets._recipe()["task"] == "synthetic:arith-long"
    assert "task" not in TinyRun(Path("study"))._recipe()  # the default task's assets keep their recipe


def test_room_for_pass_at_k_is_read_from_the_references(tmp_path):
    """Issue 23's conditions (teacher Avg@n <= 0.8 and Pass@n >= 0.95, student base Pass@n <= 0.8), met or not."""
    values = {("opd", s): (0.2, 0.5, [4, 4, 4, 4]) for s in (1, 2)}
    values |= {("eopd", s): (0.2, 0.5, [4, 4, 4, 4]) for s in (1, 2)}
    fabricate_study(tmp_path, values)
    (tmp_path / "evals").mkdir()

    def reference(name: str, correct: list[int]) -> None:
        results = {HELDOUT: [{"id": f"p{p}", "samples": [{"correct": j < c} for j in range(8)]}
                             for p, c in enumerate(correct)]}
        (tmp_path / "evals" / f"{name}.json").write_text(json.dumps({"results": results}))

    reference("teacher", [6, 5, 6, 1])  # Avg@8 18/32 = 56.25%, every problem solved
    reference("student_base", [0, 0, 1, 0])  # Pass@8 25%
    summary = write_report(tmp_path)
    room = {(c["model"], c["metric"]): (c["value"], c["met"]) for c in summary["pass_at_k_room"]}
    assert room[("teacher", "avg@8")] == (pytest.approx(18 / 32), True)
    assert room[("teacher", "pass@8")] == (pytest.approx(1.0), True)
    assert room[("student_base", "pass@8")] == (pytest.approx(0.25), True)
    report = (tmp_path / "report.md").read_text()
    assert "teacher Avg@8 56.2% (at most 80%: met)" in report and "curves have room on both sides" in report

    reference("teacher", [8, 8, 8, 7])  # a saturated teacher: Avg@8 96.9%
    summary = write_report(tmp_path)
    assert [c["met"] for c in summary["pass_at_k_room"]] == [False, True, True]
    assert "teacher Avg@8 96.9% (at most 80%: NOT met)" in (tmp_path / "report.md").read_text()


def test_truncated_share_counts_samples_cut_at_max_tokens():
    from megatron_eopd.replication.results import truncated_fraction

    rows = [{"samples": [{"finish_reason": "length"}, {"finish_reason": "stop"}]},
            {"samples": [{"finish_reason": "length"}, {"finish_reason": "length"}]}]
    assert truncated_fraction(rows) == pytest.approx(0.75)
    assert truncated_fraction([{"samples": [{"correct": True}]}]) is None  # a report without finish reasons
