"""The tiny CPU demonstration behind ``make run``: assets, distillation and the closing table.

Everything goes through the product's own code: the teacher and the student base are trained by the
trainer's SFT mode, the student is distilled by ``train()`` with the ``tiny_cpu`` preset, and
accuracy is graded with math-verify on held-out problems of the synthetic task.

The teacher and the student base are prepared to a measured quality, not for a fixed number of
iterations: SFT runs in rounds (each round resumes the run and extends it), and after every round
the model is sampled on validation problems (test-split problems that the reported held-out set
does not contain).  The teacher trains until it is good enough to teach; the student's warm-up
stops inside an accuracy band that leaves room to improve.  A fixed iteration count had no margin
for another machine's floating-point rounding: the same commit gave a teacher of 0.98 and a
student base of 0.63 on one machine, 0.83 and 0.29 on another, and only the first student improved.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from megatron_eopd.data.synthetic import LONG_SOURCE, SOURCE, get_task, make_task_model
from megatron_eopd.errors import EOPDError
from megatron_eopd.evaluation.heldout import HELDOUT, HeldoutSettings, evaluate_heldout
from megatron_eopd.trainer.config import load_train_config
from megatron_eopd.trainer.loop import train

# SFT settings (2 cores): a constant 3e-3 learns this task fastest.  The budgets are in the gates.
SFT_SETTINGS = ["train.prompts_per_iteration=32", "train.mini_batch_size=32", "train.micro_batch_size=32",
                "optim.lr=3.0e-3", "optim.min_lr=3.0e-3", "optim.warmup_steps=10"]
# The student ends its answers with <|endoftext|> like a base model; the teacher view maps it to <|im_end|>.
STUDENT_END = ["train.sft_end_token=<|endoftext|>"]

EVAL_PROBLEMS = 128  # the reported held-out problems: the first of the test split
EVAL_SAMPLES = 4
EVAL_TOP_P = 0.8  # the paper's evaluation sampling (temperature 1.0, top-p 0.8)
VALIDATION_FIRST = 384  # validation problems: test-split problems 384-511, disjoint from every report's
VALIDATION_PROBLEMS = 128
VALIDATION_SEED = 7  # other samples than the report's (seed 2026)

DEFAULT_SEED = 1
MANIFEST = "preparation.json"


class PreparationError(EOPDError):
    """The tiny teacher or student base did not reach its quality gate within its budget."""


@dataclasses.dataclass(frozen=True)
class QualityGate:
    """SFT in rounds of ``round_iterations`` until validation Avg@4 reaches ``target``.

    ``ceiling`` (students): a round that jumps past it is undone - the round before is kept, even
    below the target - so the student base keeps room to improve.  ``max_iterations`` bounds the preparation.
    """

    target: float
    round_iterations: int
    max_iterations: int
    first_round: Optional[int] = None  # iterations before the first check (default: one round)
    ceiling: float = 1.0


TEACHER_GATE = QualityGate(target=0.95, first_round=1000, round_iterations=250, max_iterations=4000)
STUDENT_GATE = QualityGate(target=0.30, ceiling=0.50, first_round=700, round_iterations=50, max_iterations=3000)
# The longer-chain task (issue 23's Pass@k regime): a teacher SFT'd on long chains to a band, so that it
# solves most samples but not all; the student base is the default task's (make run's), which knows the
# answer format from 4-5 digit sums but has never continued a chain past five numbers.  Measured on
# 128 held-out long problems x 64 samples (seed 1): teacher Avg@64 0.66, Pass@64 1.00; student base
# Avg@64 0.007, Pass@64 0.20.  A student SFT'd on long chains instead sat at Avg@64 ~0.05 with
# Pass@64 0.81-0.95 whatever its budget (200-400 iterations): lucky samples saturate Pass@64.
LONG_TEACHER_GATE = QualityGate(target=0.60, ceiling=0.80, first_round=1000, round_iterations=250, max_iterations=5000)
# Per task, per role: the task the model is SFT'd and validated on, and its gate.
PREPARATION = {
    SOURCE: {"teacher": (SOURCE, TEACHER_GATE), "student": (SOURCE, STUDENT_GATE)},
    LONG_SOURCE: {"teacher": (LONG_SOURCE, LONG_TEACHER_GATE), "student": (SOURCE, STUDENT_GATE)},
}


def preparation_seeds(seed: int) -> dict:
    """The seeds a preparation seed stands for: model initialisation and SFT order, then EOPD sampling."""
    return {"teacher": 100 * seed + 10, "student": 100 * seed + 20, "eopd": seed}


class TinyRun:
    """The demo's run directory: ``assets/`` (teacher, student base, how they were made) and the EOPD run.

    ``seed`` stands in for a machine: it changes the models' initialisation, the SFT data order and
    the EOPD sampling.  ``teacher_sft_iterations`` / ``student_sft_iterations`` replace the quality
    gates by a fixed budget (smoke tests).
    """

    def __init__(self, run_dir: Path, *, seed: int = DEFAULT_SEED, teacher_sft_iterations: int | None = None,
                 student_sft_iterations: int | None = None, task: str = SOURCE, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.task = get_task(task).source
        self.plan = PREPARATION[self.task]
        self.seeds = preparation_seeds(seed)
        self.fixed = {"teacher": teacher_sft_iterations, "student": student_sft_iterations}
        self.log = log
        self.assets = self.run_dir / "assets"
        self.teacher_dir = self.assets / "teacher"
        self.student_base_dir = self.assets / "student_base"

    # ------------------------------------------------------------------ preparation

    def _recipe(self) -> dict:
        """What the cached assets depend on; a different recipe must not reuse them."""
        # The default task is not named, so assets prepared before tasks had names still match.
        named = self.task != SOURCE

        def how(role: str) -> dict:
            if self.fixed[role] is not None:
                return {"fixed_iterations": self.fixed[role]}
            sft_task, gate = self.plan[role]
            return ({"sft_task": sft_task} if named else {}) | dataclasses.asdict(gate)

        return {"seed": self.seed, **({"task": self.task} if named else {}),
                **{role: how(role) for role in ("teacher", "student")}}

    def _check_manifest(self) -> dict:
        path = self.assets / MANIFEST
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        if not manifest and (self.teacher_dir.is_dir() or self.student_base_dir.is_dir()):
            raise PreparationError(
                f"{self.assets} holds models without {MANIFEST} (prepared by an earlier version, for a fixed "
                f"budget): use another --run-dir, or delete {self.assets} to prepare them again")
        if manifest and manifest.get("recipe") != self._recipe():
            raise PreparationError(
                f"{self.assets} holds models prepared another way ({manifest.get('recipe')}), not as asked "
                f"({self._recipe()}): use another --run-dir, or delete {self.assets} to prepare them again")
        return manifest

    def prepare(self) -> dict:
        """Teacher and student base, each made once and kept in the run directory; returns the manifest."""
        manifest = self._check_manifest()
        manifest["recipe"] = self._recipe()
        for role, out_dir in (("teacher", self.teacher_dir), ("student", self.student_base_dir)):
            if out_dir.is_dir() and role in manifest:
                continue
            what = "the teacher" if role == "teacher" else "the student base"
            self.log(f"preparing {what}: SFT on the synthetic task (cached for later runs)")
            manifest[role] = self._prepare_model(role, out_dir, self.plan[role][1])
            (self.assets / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def _prepare_model(self, role: str, out_dir: Path, gate: QualityGate) -> dict:
        seed = self.seeds[role]
        shutil.rmtree(out_dir, ignore_errors=True)
        init = make_task_model(self.assets / f"{role}_init", role=role, seed=seed)
        work = self.assets / f"{role}_sft"
        shutil.rmtree(work, ignore_errors=True)  # an interrupted preparation starts over: rounds must match
        sft_task = self.plan[role][0]
        overrides = [f"student.hf_dir={init}", f"run.dir={work}", f"train.seed={seed}", f"data.source={sft_task}"]
        overrides += SFT_SETTINGS
        overrides += STUDENT_END if role == "student" else []
        if self.fixed[role] is not None:
            iterations = self.fixed[role]
            # A short smoke budget keeps the warm-up inside it.
            self._sft(overrides + [f"optim.warmup_steps={min(10, iterations // 2)}"], iterations)
            shutil.copytree(work / "final_hf", out_dir)
            return {"iterations": iterations, "rounds": []}
        rounds: list[dict] = []
        previous = work / "previous_hf"  # the round before, kept aside where a ceiling may undo a round
        iterations = 0
        while True:
            iterations += gate.first_round if not rounds and gate.first_round else gate.round_iterations
            self._sft(overrides, iterations)
            score = self.validate(work / "final_hf", sft_task)
            rounds.append({"iterations": iterations, "validation_avg": score})
            self.log(f"  {role} after {iterations} SFT iterations: validation Avg@{EVAL_SAMPLES} {score:.3f} "
                     f"(gate {gate.target:.2f}" + (f"-{gate.ceiling:.2f})" if gate.ceiling < 1 else ")"))
            if score >= gate.target:
                overshot = score > gate.ceiling and len(rounds) > 1
                chosen, source = (rounds[-2], previous) if overshot else (rounds[-1], work / "final_hf")
                break
            if iterations >= gate.max_iterations:
                raise PreparationError(
                    f"the {role} reached validation Avg@{EVAL_SAMPLES} {score:.3f} after {iterations} SFT "
                    f"iterations, below its gate {gate.target:.2f}; rounds: {rounds}")
            if gate.ceiling < 1:
                shutil.rmtree(previous, ignore_errors=True)
                shutil.copytree(work / "final_hf", previous)
        shutil.copytree(source, out_dir)
        return {"iterations": chosen["iterations"], "validation_avg": chosen["validation_avg"], "rounds": rounds}

    def _sft(self, overrides: list[str], iterations: int) -> None:
        """Train (or continue the run in ``run.dir`` to) ``iterations`` SFT iterations."""
        config = load_train_config("tiny_cpu", [
            "train.mode=sft", *overrides, f"train.iterations={iterations}",
            "checkpoint.save_interval=100000", "checkpoint.keep_last=1", "logging.tensorboard=false",
            "logging.summary_every=0",  # a line per round comes from the gate
            "logging.save_rollouts=false",  # thousands of files of reference solutions nobody reads
        ])
        train(config)

    def validate(self, model_dir: Path, task: str = SOURCE) -> float:
        """Validation Avg@4: test-split problems no report uses, other samples than the report's."""
        settings = HeldoutSettings(problems=VALIDATION_PROBLEMS, first_problem=VALIDATION_FIRST, source=task,
                                   samples=EVAL_SAMPLES, top_p=EVAL_TOP_P, seed=VALIDATION_SEED)
        return evaluate_heldout(model_dir, settings)["metrics"][HELDOUT][f"avg@{EVAL_SAMPLES}"]

    # ------------------------------------------------------------------ the demo

    def distil_config(self, overrides: list[str]):
        """The EOPD run's config (checked: call it before preparing, so bad overrides fail first)."""
        return load_train_config("tiny_cpu", [f"run.dir={self.run_dir}", f"train.seed={self.seeds['eopd']}",
                                              f"data.source={self.task}",
                                              f"student.hf_dir={self.student_base_dir}",
                                              f"teacher.hf_dir={self.teacher_dir}", *overrides])

    def distil(self, overrides: list[str]) -> list[dict]:
        """Run (or resume) the EOPD run; returns every iteration's metrics, those before a resume included."""
        train(self.distil_config(overrides))
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def evaluate(self, model_dir: Path, label: str, *, engine: str = "hf") -> dict:
        """Avg@k and Pass@k of sampled answers on held-out problems, sampled as the paper evaluates."""
        settings = HeldoutSettings(problems=EVAL_PROBLEMS, samples=EVAL_SAMPLES, top_p=EVAL_TOP_P, engine=engine,
                                   source=self.task)
        metrics = evaluate_heldout(model_dir, settings)["metrics"][HELDOUT]
        out = {"model": str(model_dir), "avg_at_k": metrics[f"avg@{EVAL_SAMPLES}"],
               "pass_at_k": metrics[f"pass@{EVAL_SAMPLES}"], "k": EVAL_SAMPLES, "problems": EVAL_PROBLEMS}
        self.log(f"{label}: Avg@{EVAL_SAMPLES} {out['avg_at_k']:.3f}, Pass@{EVAL_SAMPLES} {out['pass_at_k']:.3f} "
                 f"({EVAL_PROBLEMS} held-out problems, temperature 1, top-p {EVAL_TOP_P})")
        return out


# ---------------------------------------------------------------------- the closing table

WINDOW = 10  # iterations averaged at each end of the EOPD run


def _window_mean(history: list[dict], key: str, *, last: bool) -> float:
    rows = history[-WINDOW:] if last else history[:WINDOW]
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def _median(history: list[dict], key: str) -> float:
    values = sorted(float(r[key]) for r in history if r.get(key) is not None)
    return values[len(values) // 2] if values else float("nan")


def demo_summary(teacher: dict, before: dict, after: dict, history: list[dict], manifest: dict, *,
                 run_dir: Path, seconds: float) -> tuple[dict, list[str]]:
    """``summary.json``'s content and the closing table's lines.

    Training-side figures are means over the first and the last :data:`WINDOW` iterations: one
    iteration of 64 sampled responses is too noisy to compare.
    """
    ends = {key: (_window_mean(history, key, last=False), _window_mean(history, key, last=True))
            for key in ("rkl_estimate", "rollout_accuracy", "fkl_gated", "student_entropy", "gate_fraction")}
    rkl_first, rkl_last = ends["rkl_estimate"]
    summary = {
        "seed": manifest["recipe"]["seed"],
        "teacher": teacher, "student_before": before, "student_after": after,
        "heldout_gain": after["avg_at_k"] - before["avg_at_k"],
        "rkl_relative_change": (rkl_last - rkl_first) / rkl_first if rkl_first else float("nan"),
        "first_iterations": {k: v[0] for k, v in ends.items()},
        "last_iterations": {k: v[1] for k, v in ends.items()},
        "window": WINDOW, "iterations": len(history),
        "preparation": {role: {k: v for k, v in manifest[role].items() if k != "rounds"} | {
            "rounds": len(manifest[role].get("rounds", []))} for role in ("teacher", "student")},
        "median_phase_seconds": {p: _median(history, f"time_{p}") for p in ("rollout", "teacher", "student", "sync")},
        "seconds": seconds,
    }

    def prepared(role: str) -> str:
        made = manifest[role]
        quality = f", validation Avg@{EVAL_SAMPLES} {made['validation_avg']:.3f}" if "validation_avg" in made else ""
        return f"{made['iterations']} SFT iterations{quality}"

    def pair(key: str, fmt: str = ".3f") -> str:
        return f"{ends[key][0]:{fmt}} -> {ends[key][1]:{fmt}}"

    k = EVAL_SAMPLES
    rows = [
        ("preparation seed", str(summary["seed"])),
        ("teacher", prepared("teacher")),
        ("student base", prepared("student")),
        (f"teacher Avg@{k} / Pass@{k} (held-out)", f"{teacher['avg_at_k']:.3f} / {teacher['pass_at_k']:.3f}"),
        (f"student Avg@{k}, before -> after EOPD",
         f"{before['avg_at_k']:.3f} -> {after['avg_at_k']:.3f} ({summary['heldout_gain']:+.3f})"),
        (f"student Pass@{k}, before -> after", f"{before['pass_at_k']:.3f} -> {after['pass_at_k']:.3f}"),
        (f"reverse KL (nats/token), first -> last {WINDOW} iterations",
         f"{pair('rkl_estimate')} ({100 * summary['rkl_relative_change']:+.0f}%)"),
        (f"rollout accuracy, first -> last {WINDOW}", pair("rollout_accuracy")),
        (f"FKL on tokens with teacher entropy > tau, first -> last {WINDOW}", pair("fkl_gated")),
        (f"student entropy (nats), first -> last {WINDOW}", pair("student_entropy")),
        (f"gate fraction (H > tau), first -> last {WINDOW}", pair("gate_fraction")),
        ("EOPD iterations; median s rollout / teacher / student / sync",
         f"{len(history)}; " + " / ".join(f"{v:.2f}" for v in summary["median_phase_seconds"].values())),
        ("wall time", f"{seconds / 60:.1f} min"),
        ("outputs", f"{run_dir}/ (summary.json, metrics.jsonl, rollouts/, checkpoints/, final_hf/, logs/)"),
    ]
    width = max(len(key) for key, _ in rows)
    table = ["", "| " + "what".ljust(width) + " | value |", "|" + "-" * (width + 2) + "|-------|"]
    table += [f"| {key.ljust(width)} | {value} |" for key, value in rows]
    return summary, table
