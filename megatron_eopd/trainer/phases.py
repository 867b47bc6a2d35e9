"""The phases of an iteration, named as the loop runs them (see ``loop.py`` for the order)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_eopd.data import grade_answer, qwen3_templates
from megatron_eopd.data.synthetic import sample_solution
from megatron_eopd.models.qwen3 import expected_hf_shapes, iter_hf_weights
from megatron_eopd.models.qwen3.architecture import load_hf_config
from megatron_eopd.trainer.batch import Sample, StepBatch, step_batches
from megatron_eopd.trainer.metrics import all_reduce_sum
from megatron_eopd.trainer.session import Session
from megatron_eopd.trainer.student import (
    check_teacher_outputs, eopd_update, old_logprobs, rollout_mismatch, sft_update,
)
from megatron_eopd.trainer.teacher import score_teacher


class PhaseTimer:
    """Wall-clock seconds per named phase (``time_<phase>`` in the metrics)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[f"time_{phase}"] = self.seconds.get(f"time_{phase}", 0.0) + time.perf_counter() - start


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def iteration_seed(config, iteration: int) -> int:
    """The seed an iteration draws its responses with: the engines' sampling seed (EOPD; prompt ``i``'s
    request uses ``sampling.request_seed(i)``) or the reference-solution RNG's seed (SFT)."""
    if config.train.mode == "sft":
        return config.train.seed * 1_000_003 + iteration
    return config.train.seed * 1_000_003 + iteration * 7_919


def rollout(session: Session, iteration: int) -> list[Sample]:
    """prompts -> responses: the student samples with the engines (EOPD) or writes reference solutions (SFT)."""
    config = session.config
    items = session.stream.next_batch(config.train.prompts_per_iteration)
    if config.train.mode == "sft":
        return _reference_samples(session, items, iteration)
    sampling = dataclasses.replace(config.rollout.sampling, seed=iteration_seed(config, iteration))
    session.fleet.wake_up()
    results = session.fleet.generate([list(item.prompt_ids) for item in items], sampling)
    session.fleet.sleep()
    samples = []
    for index, (item, result) in enumerate(zip(items, results)):
        teacher_prompt = session.teacher_encode(item.record.problem)
        for sample in result.samples:
            samples.append(Sample(
                prompt_index=index, prompt_ids=list(item.prompt_ids), teacher_prompt_ids=teacher_prompt,
                response_ids=list(sample.token_ids),
                teacher_response_ids=list(qwen3_templates.teacher_view_of_response(sample.token_ids, session.special)),
                rollout_logprobs=list(sample.logprobs), finish_reason=sample.finish_reason, answer=item.record.answer,
                prompt_id=item.record.id, request_seed=sampling.request_seed(index),
            ))
    return samples


def _reference_samples(session: Session, items, iteration: int) -> list[Sample]:
    """SFT: ``rollout.sampling.n`` random valid solution paths per prompt, ended by ``train.sft_end_token``."""
    rng = random.Random(iteration_seed(session.config, iteration))
    end = session.tokenizer.convert_tokens_to_ids(session.config.train.sft_end_token)
    samples = []
    for index, item in enumerate(items):
        for _ in range(session.config.rollout.sampling.n):
            response = session.tokenizer.encode(sample_solution(item.record, rng), add_special_tokens=False) + [end]
            samples.append(Sample(index, list(item.prompt_ids), list(item.prompt_ids), response, response,
                                  [0.0] * len(response), "stop", item.record.answer, prompt_id=item.record.id))
    return samples


def grade(session: Session, samples: list[Sample]) -> float:
    """Share of responses whose last ``\\boxed{}`` is right (rank 0 grades; a metric, never a reward)."""
    correct = 0
    if session.platform.rank == 0:
        for sample in samples:
            text = session.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            graded = grade_answer(text, sample.answer)
            sample.correct, sample.response_text = graded.correct, text
            sample.extracted_answer, sample.grade_reason = graded.extracted, graded.reason
            correct += int(sample.correct)
    return all_reduce_sum([float(correct)])[0] / max(len(samples), 1)


def rollout_records(session: Session, samples: list[Sample], iteration: int) -> list[dict]:
    """One JSON-ready dict per sample, in the order the update splits them into mini-batches (rank 0,
    after :func:`grade`).  SFT has no engine and no teacher: those fields are None there."""
    distill = session.config.train.mode == "eopd"
    seed = iteration_seed(session.config, iteration)
    mini_batch_size = session.config.train.mini_batch_size
    return [{
        "iteration": iteration, "seed": seed, "request_seed": sample.request_seed,
        "mini_batch": position // mini_batch_size, "prompt_index": sample.prompt_index,
        "prompt_id": sample.prompt_id, "prompt_ids": sample.prompt_ids, "response_ids": sample.response_ids,
        "rollout_logprobs": sample.rollout_logprobs if distill else None,
        "teacher_prompt_ids": sample.teacher_prompt_ids if distill else None,
        "teacher_response_ids": sample.teacher_response_ids if distill else None,
        "finish_reason": sample.finish_reason, "response_text": sample.response_text,
        "extracted_answer": sample.extracted_answer, "correct": sample.correct,
        "grade_reason": sample.grade_reason, "gold_answer": sample.answer,
    } for position, sample in enumerate(samples)]


def make_steps(session: Session, samples: list[Sample]) -> list[StepBatch]:
    from megatron.core import parallel_state

    train = session.config.train
    return step_batches(samples, mini_batch_size=train.mini_batch_size, micro_batch_size=train.micro_batch_size,
                        dp_rank=parallel_state.get_data_parallel_rank(),
                        dp_size=parallel_state.get_data_parallel_world_size(),
                        pad_id=session.tokenizer.pad_token_id, device=session.platform.device,
                        uniform_length=parallel_state.get_pipeline_model_parallel_world_size() > 1)


def padding_fraction(steps: list[StepBatch]) -> float:
    """Share of the positions the student computes this iteration that are padding (all DP ranks)."""
    counts = [step.student_positions for step in steps]
    used, computed = all_reduce_sum([float(sum(u for u, _ in counts)), float(sum(c for _, c in counts))])
    return 1.0 - used / computed if computed else 0.0


def teacher_statistics(session: Session, steps: list[StepBatch], iteration: int) -> list:
    """The teacher's per-token statistics for every step, before any update (forward only).

    Non-finite statistics stop the run here (:class:`NonFiniteError` naming the iteration and the
    statistic), before the student sees them.
    """
    outputs = [score_teacher(session.teacher, step, session.config.loss, tp_group=_tp_group(),
                             true_vocab_size=session.vocab_size, fused_head=session.config.fused_head)
               for step in steps]
    check_teacher_outputs(outputs, iteration)
    return outputs


def student_update(session: Session, steps: list[StepBatch], teacher: Optional[list], iteration: int) -> tuple[list, dict]:
    """Old log-probs for every step first (one pass, the paper's PPO), then one optimizer step per mini-batch."""
    group = _tp_group()
    metrics, mismatch = [], {"sum": 0.0, "max": 0.0, "count": 0}
    if session.config.train.mode == "sft":
        for index, step in enumerate(steps):
            metrics += sft_update(session.student, step, tp_group=group, true_vocab_size=session.vocab_size,
                                  iteration=iteration, step_index=index, fused_head=session.config.fused_head)
        return metrics, {}
    fused = session.config.fused_head
    olds = [old_logprobs(session.student.chunks, step, tp_group=group, true_vocab_size=session.vocab_size,
                         fused_head=fused) for step in steps]
    for old, step in zip(olds, steps):
        found = rollout_mismatch(old, step)
        if found is not None:
            mismatch = {"sum": mismatch["sum"] + found["sum"], "max": max(mismatch["max"], found["max"]),
                        "count": mismatch["count"] + found["count"]}
    for index, (step, stats, old) in enumerate(zip(steps, teacher, olds)):
        metrics += eopd_update(session.student, step, stats, old, session.config.loss, tp_group=group,
                               true_vocab_size=session.vocab_size, iteration=iteration, step_index=index,
                               fused_head=fused)
    return metrics, _reduce_mismatch(mismatch)


def _reduce_mismatch(local: dict) -> dict:
    from megatron.core import parallel_state

    mine = parallel_state.get_tensor_model_parallel_rank() == 0
    total, count = all_reduce_sum([local["sum"] if mine else 0.0, local["count"] if mine else 0.0])
    worst = torch.tensor([local["max"]], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_eopd.platform import collective_device

        worst = worst.to(collective_device())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"rollout_logprob_diff_mean": total / max(count, 1.0), "rollout_logprob_diff_max": float(worst.item())}


def export_final(session: Session) -> None:
    """The trained student as a Hugging Face directory ``final_hf/`` (what vLLM and transformers load)."""
    from pathlib import Path

    from megatron.core import parallel_state

    from megatron_eopd.checkpoint.hf_writer import write_hf_directory

    if parallel_state.get_data_parallel_rank() != 0:
        return
    chunks = session.student.chunks
    arch = session.config.student.architecture("student")
    stream = iter_hf_weights(chunks, arch, to_rank=0)
    if session.platform.rank != 0:
        for _ in stream:  # drive the exporter's collectives
            pass
        return
    source = Path(session.config.student.hf_dir)
    dtype = next(chunks[0].parameters()).dtype
    write_hf_directory(session.run_dir / "final_hf", stream, expected_hf_shapes(arch), dtype,
                       hf_config=load_hf_config(source), side_files_from=source)


def evaluate(session: Session, iteration: int) -> dict:
    """Benchmark scores of the just-synced student, every ``eval.every`` iterations and after the last.

    The benchmarks load (and are checked) on the first call; the engines sample, rank 0 grades, every
    rank returns the same ``eval/<benchmark>/avg@n``, ``eval/<benchmark>/pass@k`` and ``time_eval``.
    """
    spec = session.config.eval
    if not spec.every or session.fleet is None:
        return {}
    from megatron_eopd.config import ConfigError
    from megatron_eopd.evaluation import metrics as eval_metrics
    from megatron_eopd.evaluation import runner

    if "eval" not in session.extras:
        try:
            benchmarks = runner.load_benchmarks(spec.benchmarks, spec.data_dir, limit=spec.limit)
            style = runner.resolve_prompt_style(session.config.student.prompt_style)
            prompts = runner.encode_prompts(benchmarks, session.tokenizer, style)
            runner.check_prompt_lengths(benchmarks, prompts, session.config.rollout.max_model_len
                                        or runner.model_max_length(session.config.student.hf_dir))
        except runner.EvalInputError as exc:
            raise ConfigError(f"eval: {exc}") from None
        sampling = runner.eval_sampling(
            n=spec.n, temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
            max_tokens=spec.max_tokens or session.config.rollout.sampling.max_tokens,
            stop_token_ids=runner.eval_stop_token_ids(session.tokenizer))
        session.extras["eval"] = (benchmarks, prompts, sampling)
    if iteration % spec.every and iteration != session.iterations:
        return {}
    benchmarks, prompts, sampling = session.extras["eval"]
    start = time.perf_counter()
    session.fleet.wake_up()
    results = session.fleet.generate(prompts, sampling)
    session.fleet.sleep()
    scores = {}
    if session.platform.rank == 0:
        graded = runner.grade_generations(benchmarks, results, session.tokenizer,
                                          timeout_s=spec.grading_timeout)
        scores = eval_metrics.flat_metrics(eval_metrics.summarize(runner.correctness(graded)), prefix="eval")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    return {**scores, "time_eval": time.perf_counter() - start}
