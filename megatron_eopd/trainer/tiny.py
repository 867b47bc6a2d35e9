"""The tiny CPU demonstration behind ``make run``: assets, distillation and the closing table.

Everything goes through the product's own code: the teacher is trained by the trainer's SFT mode,
the student is distilled by ``train()`` with the ``tiny_cpu`` preset, and accuracy is graded with
math-verify on held-out problems of the synthetic task.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_eopd.data.synthetic import make_task_model
from megatron_eopd.evaluation.heldout import HELDOUT, HeldoutSettings, evaluate_heldout
from megatron_eopd.trainer.config import load_train_config
from megatron_eopd.trainer.loop import train

# SFT budgets, measured on 2 cores (held-out Avg@4 at T=1, top-p 0.8): a constant 3e-3 learns this task
# fastest; the teacher's 1,500 iterations reach about 0.94.  The student base gets 1,200: at 900 it
# still reached its answers by a shortcut (the right total behind a path through numbers the problem
# does not have, 0.24), and distilling the teacher's valid paths into that first cost accuracy; at
# 1,200 it reads the numbers off the problem but loses track of which are used in about half of its
# answers (0.47), which is what on-policy distillation then corrects.
TEACHER_SFT = ["train.iterations=1500", "train.prompts_per_iteration=32", "train.mini_batch_size=32",
               "train.micro_batch_size=32", "optim.lr=3.0e-3", "optim.min_lr=3.0e-3", "optim.warmup_steps=10"]
STUDENT_SFT = ["train.iterations=1200", "train.prompts_per_iteration=32", "train.mini_batch_size=32",
               "train.micro_batch_size=32", "optim.lr=3.0e-3", "optim.min_lr=3.0e-3", "optim.warmup_steps=10",
               "train.sft_end_token=<|endoftext|>"]
EVAL_PROBLEMS = 64
EVAL_SAMPLES = 4
EVAL_TOP_P = 0.8  # the paper's evaluation sampling (temperature 1.0, top-p 0.8)


class TinyRun:
    def __init__(self, run_dir: Path, *, teacher_sft_iterations: int | None = None,
                 student_sft_iterations: int | None = None):
        self.run_dir = Path(run_dir)
        # A shortened budget (smoke tests) keeps the warm-up inside it.
        self.teacher_sft = TEACHER_SFT + ([f"train.iterations={teacher_sft_iterations}",
                                           f"optim.warmup_steps={min(10, teacher_sft_iterations // 2)}"]
                                          if teacher_sft_iterations is not None else [])
        self.student_sft = STUDENT_SFT + ([f"train.iterations={student_sft_iterations}",
                                           f"optim.warmup_steps={min(10, student_sft_iterations // 2)}"]
                                          if student_sft_iterations is not None else [])
        self.assets = self.run_dir / "assets"
        self.teacher_dir = self.assets / "teacher"
        self.student_base_dir = self.assets / "student_base"

    def _sft(self, init_dir: Path, out_dir: Path, overrides: list[str], *, seed: int) -> None:
        work = self.assets / f"{out_dir.name}_sft"
        config = load_train_config("tiny_cpu", [
            "train.mode=sft", f"student.hf_dir={init_dir}", f"run.dir={work}", f"train.seed={seed}",
            "checkpoint.save_interval=1000", "logging.tensorboard=false",
            "logging.save_rollouts=false",  # 1,500 files of reference solutions nobody reads
            *overrides,
        ])
        train(config)
        (work / "final_hf").rename(out_dir)

    def prepare(self) -> None:
        """Teacher and student base, each made once and kept in the run directory."""
        if not self.teacher_dir.is_dir():
            print("preparing the teacher: SFT on the synthetic task (cached for later runs)", flush=True)
            init = make_task_model(self.assets / "teacher_init", role="teacher", seed=11)
            self._sft(init, self.teacher_dir, self.teacher_sft, seed=11)
        if not self.student_base_dir.is_dir():
            print("preparing the student base: a short SFT warm-up (cached for later runs)", flush=True)
            init = make_task_model(self.assets / "student_init", role="student", seed=12)
            self._sft(init, self.student_base_dir, self.student_sft, seed=12)

    def distil(self, overrides: list[str]) -> list[dict]:
        config = load_train_config("tiny_cpu", [f"run.dir={self.run_dir}",
                                                f"student.hf_dir={self.student_base_dir}",
                                                f"teacher.hf_dir={self.teacher_dir}", *overrides])
        return train(config)

    def evaluate(self, model_dir: Path, label: str, *, engine: str = "hf") -> dict:
        """Avg@k and Pass@k of sampled answers on held-out problems, sampled as the paper evaluates."""
        settings = HeldoutSettings(problems=EVAL_PROBLEMS, samples=EVAL_SAMPLES, top_p=EVAL_TOP_P, engine=engine)
        metrics = evaluate_heldout(model_dir, settings)["metrics"][HELDOUT]
        out = {"model": str(model_dir), "avg_at_k": metrics[f"avg@{EVAL_SAMPLES}"],
               "pass_at_k": metrics[f"pass@{EVAL_SAMPLES}"], "k": EVAL_SAMPLES, "problems": EVAL_PROBLEMS}
        print(f"{label}: Avg@{EVAL_SAMPLES} {out['avg_at_k']:.3f}, Pass@{EVAL_SAMPLES} {out['pass_at_k']:.3f} "
              f"({EVAL_PROBLEMS} held-out problems, temperature 1, top-p {EVAL_TOP_P})", flush=True)
        return out

    def summary(self, teacher: dict, before: dict, after: dict, history: list[dict], *, seconds: float) -> dict:
        first = history[0] if history else {}
        last = history[-1] if history else {}
        rows = [
            (f"teacher accuracy (Avg@{EVAL_SAMPLES}, held-out)", f"{teacher['avg_at_k']:.3f}"),
            ("student accuracy before", f"{before['avg_at_k']:.3f}"),
            ("student accuracy after EOPD", f"{after['avg_at_k']:.3f}"),
            (f"student Pass@{EVAL_SAMPLES}, before -> after", f"{before['pass_at_k']:.3f} -> {after['pass_at_k']:.3f}"),
            ("rollout accuracy, first -> last iteration",
             f"{first.get('rollout_accuracy', 0):.3f} -> {last.get('rollout_accuracy', 0):.3f}"),
            ("reverse KL to the teacher (nats/token), first -> last",
             f"{first.get('rkl_estimate', 0):.3f} -> {last.get('rkl_estimate', 0):.3f}"),
            ("student entropy (nats), first -> last",
             f"{first.get('student_entropy', 0):.3f} -> {last.get('student_entropy', 0):.3f}"),
            ("teacher entropy (nats), first -> last",
             f"{first.get('teacher_entropy', 0):.3f} -> {last.get('teacher_entropy', 0):.3f}"),
            ("gate fraction (H > tau), first -> last",
             f"{first.get('gate_fraction', 0):.3f} -> {last.get('gate_fraction', 0):.3f}"),
            ("iterations", str(len(history))),
            ("wall time", f"{seconds / 60:.1f} min"),
            ("outputs", f"{self.run_dir}/ (metrics.jsonl, tensorboard/, checkpoints/, final_hf/)"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n| " + "what".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
        for key, value in rows:
            print(f"| {key.ljust(width)} | {value} |")
        return {"teacher": teacher, "student_before": before, "student_after": after,
                "first_iteration": first, "last_iteration": last, "seconds": seconds}


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
