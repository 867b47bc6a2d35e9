"""The EOPD recipe, one iteration per pass of the loop:

    prompts -> rollout -> teacher statistics -> student update -> weight sync -> metrics / save

Every rank runs every line (the phases synchronise where they must).  The pieces live beside this
file: ``session.py`` (checks and set-up), ``phases.py``, ``teacher.py``, ``student.py``,
``state.py`` (checkpoints), ``metrics.py``, ``saved_rollouts.py``.
"""

from __future__ import annotations

import time

from megatron_eopd import console
from megatron_eopd.trainer import phases
from megatron_eopd.trainer.config import EOPDTrainConfig
from megatron_eopd.trainer.metrics import peak_memory_bytes, reduce_step_metrics, summary_line
from megatron_eopd.trainer.session import open_session
from megatron_eopd.trainer.state import RunState, save_checkpoint


def train(config: EOPDTrainConfig, *, resume: bool = False) -> list[dict]:
    """Run (or resume) the configured training; returns the per-iteration metrics (every rank)."""
    session = open_session(config, resume=resume)
    history: list[dict] = []
    distill = config.train.mode == "eopd"
    bar = console.progress(total=session.iterations, initial=session.state.iteration, unit="it",
                           desc=f"{config.train.mode} iterations",
                           disable=not (config.logging.progress and session.platform.rank == 0))
    every = config.logging.summary_interval(session.iterations)
    try:
        if distill:
            # The engines serve exactly the (resumed) student; on a fresh start they loaded its own
            # files, and the parity probe alone confirms it.
            session.fleet.sync(session.student.chunks, transfer=not session.engines_hold_student)
        for iteration in range(session.state.iteration + 1, session.iterations + 1):
            timer, start = phases.PhaseTimer(), time.perf_counter()
            with timer("rollout"):
                samples = phases.rollout(session, iteration)
                accuracy = phases.grade(session, samples)
                if session.rollouts is not None:
                    session.rollouts.write(iteration, phases.rollout_records(session, samples, iteration))
                steps = phases.make_steps(session, samples)
            with timer("teacher"):
                teacher = phases.teacher_statistics(session, steps, iteration) if distill else None
            with timer("student"):
                per_micro_batch, mismatch = phases.student_update(session, steps, teacher, iteration)
            teacher = None  # its outputs (the teacher's logits, with loss.fkl_mode=full) go before the engines wake
            with timer("sync"):
                if distill:
                    session.fleet.sync(session.student.chunks)
            record = {"iteration": iteration, **reduce_step_metrics(per_micro_batch), **mismatch, **timer.seconds,
                      "rollout_accuracy": accuracy,
                      "response_length": sum(s.num_response_tokens for s in samples) / max(len(samples), 1),
                      "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
                      "padding_fraction": phases.padding_fraction(steps),
                      "grad_norm": per_micro_batch[0].get("grad_norm") if per_micro_batch else None,
                      "lr": session.student.optimizer.param_groups[0]["lr"],
                      "prompts_skipped_too_long": session.stream.num_skipped_too_long,
                      "peak_memory_bytes": peak_memory_bytes(session.platform.device)}
            record["tokens_per_second"] = record["num_response_tokens"] / (time.perf_counter() - start)
            record.update(phases.evaluate(session, iteration))  # benchmarks, every eval.every iterations
            session.log.write(record)
            history.append(record)
            bar.update(1)
            if not bar.disable and every and (iteration % every == 0 or iteration == session.iterations):
                console.say(summary_line(record))
            if iteration % config.checkpoint.save_interval == 0 or iteration == session.iterations:
                save_checkpoint(session.checkpoint_dir, session.student,
                                RunState(iteration, session.stream.state_dict()), config=session.config_dict,
                                student_hf_dir=config.student.hf_dir, keep_last=config.checkpoint.keep_last)
        if config.checkpoint.export_final_hf:
            phases.export_final(session)
    finally:
        bar.close()
        session.close()
    return history
