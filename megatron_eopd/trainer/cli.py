"""``tools/train_eopd.py``: train, resume, or dry-run a configuration."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from megatron_eopd.config import ConfigError, to_dict
from megatron_eopd.signals import stop_on_signals

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3  # a loss term, gradient or teacher statistic went NaN/Inf; the weights were not updated
EXIT_ENGINE_FAILED = 4  # a rollout engine failed to start or died; the message names it and the cause
# Stopped by SIGTERM / SIGINT: 128 + the signal number (143 / 130), see megatron_eopd.signals.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_eopd",
        description="Entropy-aware on-policy distillation (or SFT) of a Qwen3 student on Megatron-Core.",
        epilog="Runs as one process or under torchrun (one rank per GPU); a run directory that holds a checkpoint "
        "is resumed automatically. Exit status 2 on bad input, before anything starts; 3 when a run stops "
        "on a non-finite loss term, gradient or teacher statistic (the message names the iteration and "
        "the term); 4 when a rollout engine fails to start or dies (the message names the engine's rank, its model "
        "and the cause its processes reported). SIGTERM or SIGINT (Slurm, torchrun, kill, Ctrl-C) stops the run "
        "cleanly: the rollout engines and every process they started are stopped, the latest complete checkpoint "
        "stays readable (a checkpoint being written is discarded on the next start), and the exit status is "
        "128 + the signal number (143 for SIGTERM, 130 for SIGINT); the same command resumes.",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. eopd_qwen3_4b, tiny_cpu) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. loss.tau=1.0")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the parallel layout for --world-size ranks, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size for --dry-run (default: $WORLD_SIZE, else the preset's "
                   "parallel.nodes x parallel.gpus_per_node)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in run.dir and continue from it")
    return p


def _bad_input_types():
    from megatron_eopd.data import DataError
    from megatron_eopd.models.qwen3 import IncompatibleModelsError, UnsupportedArchitectureError
    from megatron_eopd.trainer.state import CheckpointError

    return ConfigError, DataError, IncompatibleModelsError, UnsupportedArchitectureError, CheckpointError


def _resume_point(config) -> str:
    """Where the next start continues from, for the message of a run that ended early."""
    from megatron_eopd.trainer.state import latest_checkpoint

    if config is None:
        return "nothing was started"
    try:
        checkpoint = latest_checkpoint(Path(config.run.dir) / "checkpoints")
    except Exception as exc:  # noqa: BLE001 - the message must still come out
        return f"the latest checkpoint could not be read ({exc})"
    if checkpoint is None:
        return "no checkpoint was written yet; the same command starts the run again"
    return f"the latest complete checkpoint is {checkpoint}; the same command resumes from it"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_eopd import console

    console.quiet_known_warnings()  # before Megatron-Core is imported: the session states them once
    from megatron_eopd.rollout import RolloutEngineError
    from megatron_eopd.trainer.config import load_train_config, plan_layout
    from megatron_eopd.trainer.student import NonFiniteError

    args = parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    who = f" (rank {rank})" if rank else ""
    config = None
    with stop_on_signals() as stop:
        try:
            config = load_train_config(args.config, args.overrides)
            if args.dry_run:
                world = args.world_size or int(os.environ.get("WORLD_SIZE", config.parallel.planned_world_size))
                layout = plan_layout(config, world)
                print("# resolved config")
                print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
                print("# parallel layout")
                print(yaml.safe_dump(layout.describe(), sort_keys=False), end="")
                return 0
            from megatron_eopd.trainer.loop import train

            train(config, resume=args.resume)
        except _bad_input_types() as exc:
            print(f"train_eopd: error{who}: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        except NonFiniteError as exc:  # every rank raises together; the last checkpoint is the one to resume from
            print(f"train_eopd: stopped{who}: {exc}", file=sys.stderr, flush=True)
            return EXIT_NON_FINITE
        except RolloutEngineError as exc:  # its engine was closed on the way out (train's finally)
            print(f"train_eopd: error{who}: {exc}; {_resume_point(config)}", file=sys.stderr, flush=True)
            return EXIT_ENGINE_FAILED
    if stop.stopped:
        print(f"train_eopd: stopped by {stop.signal_name}{who}: the rollout engines and their processes are "
              f"stopped; {_resume_point(config)}", file=sys.stderr, flush=True)
        return stop.exit_status
    return 0
