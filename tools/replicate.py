#!/usr/bin/env python
"""The replication study (``make replicate``): OPD, EOPD and FKL-only students of one tiny teacher, on CPU.

Every (method, seed) is its own trainer run under ``<study-dir>/runs/``, evaluated on held-out problems
of the synthetic task; then ``report.md`` (tables, the paper's three directions judged against the seed
spread, PNG plots) and ``summary.json`` are computed from the runs' files.  Rerunning the same command
skips finished runs and resumes an interrupted one; ``--report-only`` only renders the report again.

Default budget: 3 methods x 5 seeds x 100 iterations plus the models' preparation, under an hour on
2 idle cores.  ``--quick``: one seed, 3 iterations, 8 problems and short SFT budgets (a few minutes;
the test suite's version).  ``--task synthetic:arith-long``: the harder study of longer chains, where
Pass@k is not saturated, with 64 samples per problem and Pass@k curves up to k = 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.replication.study import (  # noqa: E402
    ABLATION_METHODS,
    DEFAULT_EVAL_PROBLEMS,
    DEFAULT_ITERATIONS,
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    METHODS,
    STUDY_PRESETS,
    StudyConfig,
)
from megatron_eopd.data.synthetic import LONG_SOURCE, SOURCE, TASKS  # noqa: E402

EXIT_BAD_INPUT = 2
# --quick: what the test suite runs; any flag given explicitly wins over these.
QUICK = dict(seeds=(1,), iterations=3, eval_problems=8, teacher_sft_iterations=20, student_sft_iterations=5)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    # Every help text names its own default (several depend on --task), so no formatter appends them.
    p = argparse.ArgumentParser(prog="replicate", description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", type=Path, default=None,
                   help="study directory (default runs/replication, runs/replication-long for the long task; "
                        "-quick appended with --quick)")
    p.add_argument("--methods", type=_names, default=None,
                   help=f"comma-separated, of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; the "
                        f"tau / top-k ablation: {','.join(ABLATION_METHODS)})")
    p.add_argument("--seeds", type=_int_list, default=None,
                   help=f"comma-separated seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"training iterations per run (default {DEFAULT_ITERATIONS})")
    p.add_argument("--eval-problems", type=int, default=None,
                   help=f"held-out problems (default {DEFAULT_EVAL_PROBLEMS})")
    p.add_argument("--task", choices=tuple(TASKS), default=SOURCE,
                   help="the synthetic task: " + "; ".join(f"{t.source}: {t.description}" for t in TASKS.values())
                   + f" (default {SOURCE})")
    p.add_argument("--eval-samples", type=int, default=None,
                   help=f"samples per held-out problem (default {StudyConfig.eval_samples}; "
                        f"{STUDY_PRESETS[LONG_SOURCE]['eval_samples']} with the long task)")
    p.add_argument("--ks", type=_int_list, default=None,
                   help=f"the k of the Pass@k table (default {','.join(map(str, StudyConfig.ks))}; "
                        f"{','.join(map(str, STUDY_PRESETS[LONG_SOURCE]['ks']))} with the long task; the curves "
                        "take every power of two up to the samples)")
    p.add_argument("--eval-engine", choices=("hf", "vllm"), default="hf",
                   help="engine of the held-out sampling (default hf: no engine start-up, fast for the tiny models)")
    p.add_argument("--teacher-sft-iterations", type=int, default=None,
                   help="teacher SFT budget (default: the measured one in trainer/tiny.py)")
    p.add_argument("--student-sft-iterations", type=int, default=None,
                   help="student base SFT budget (default: trainer/tiny.py's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value",
                   help="override of the tiny_cpu preset for every run (repeatable), e.g. rollout.engine=hf")
    p.add_argument("--quick", action="store_true",
                   help="shortened study: one seed, 3 iterations, 8 problems, short SFT budgets")
    p.add_argument("--report-only", action="store_true", help="only render the report from the study's files")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    values = dict(STUDY_PRESETS[args.task])
    values.update(QUICK if args.quick else {})
    for name in ("methods", "seeds", "iterations", "eval_problems", "eval_samples", "ks", "teacher_sft_iterations",
                 "student_sft_iterations"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.ks is None:  # a smaller sample count keeps only the k it has room for
        samples = values.get("eval_samples", StudyConfig.eval_samples)
        values["ks"] = tuple(k for k in values.get("ks", StudyConfig.ks) if k <= samples) or (1,)
    values["task"] = args.task
    return StudyConfig(**values, eval_engine=args.eval_engine, overrides=tuple(args.overrides))


def default_study_dir(args: argparse.Namespace) -> Path:
    name = "replication" + ("" if args.task == SOURCE else "-" + args.task.split(":", 1)[1].replace("arith-", ""))
    return Path("runs") / (name + ("-quick" if args.quick else ""))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    study_dir = args.study_dir or default_study_dir(args)
    from megatron_eopd.replication.report import REPORT_FILE, write_report
    from megatron_eopd.replication.study import check_and_record_config, read_study_config, run_study

    start = time.perf_counter()
    try:
        if args.report_only:
            read_study_config(study_dir)
        else:
            config = config_from_args(args)
            study_dir.mkdir(parents=True, exist_ok=True)
            check_and_record_config(study_dir, config)  # other settings are refused before anything runs
    except (ValueError, FileNotFoundError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if not args.report_only:
        run_study(config, study_dir)
    summary = write_report(study_dir)
    print(f"\n{len(summary['runs'])} run(s) summarised in {time.perf_counter() - start:.0f} s; "
          f"report: {study_dir / REPORT_FILE}", flush=True)
    for d in summary["directions"]:
        print(f"- {d['claim']}: {d['status']}", flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process: keep the guard
    sys.exit(main())
