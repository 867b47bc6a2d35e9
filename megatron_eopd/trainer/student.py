"""The student side of an iteration: old log-probs before the update, then one optimizer step per mini-batch.

The step is Megatron's: the schedule runs forward and backward over the step's micro-batches, the
loss of each micro-batch is its *sum* over response tokens, and Megatron's per-token normalisation
(``calculate_per_token_loss`` with ``finalize_model_grads``) divides the data-parallel-reduced
gradient by the number of response tokens of the whole mini-batch, on every rank.  That is the
paper's normaliser: the mean over all valid tokens of the mini-batch, across micro-batches and
data-parallel ranks.  A non-finite loss term or gradient stops the run, naming the iteration and
the term, before the optimizer touches the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_eopd.errors import EOPDError
from megatron_eopd.models.forward import MicroBatch, run_micro_batches
from megatron_eopd.objective import EOPDLossConfig, eopd_loss, vocab_parallel_logprobs
from megatron_eopd.platform import collective_device
from megatron_eopd.trainer.batch import StepBatch
from megatron_eopd.trainer.teacher import TeacherOutputs

LOSS_TERMS = ("loss_rkl", "loss_fkl")


class NonFiniteError(EOPDError, FloatingPointError):
    """A loss term or gradient is NaN or infinite; the weights were not updated."""


@dataclass
class Optimization:
    """The trained model chunks (DDP-wrapped) with Megatron's optimizer and learning-rate schedule."""

    chunks: list
    optimizer: Any
    scheduler: Any


def _response_logprobs(logits: torch.Tensor, mb: MicroBatch, tp_group: Any, true_vocab_size: int) -> torch.Tensor:
    """log q(label) at the response positions of a micro-batch, flattened to ``[b * s]`` (0 elsewhere)."""
    flat = logits.reshape(-1, logits.shape[-1])
    mask = mb.extras["mask"].reshape(-1)
    rows = mask.nonzero().view(-1)
    picked = vocab_parallel_logprobs(flat, mb.extras["labels"].reshape(-1).index_select(0, rows), tp_group,
                                     rows=rows, true_vocab_size=true_vocab_size)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_copy(0, rows, picked)


@torch.no_grad()
def old_logprobs(chunks: list, step: StepBatch, *, tp_group: Any, true_vocab_size: int) -> list[torch.Tensor]:
    """The current student's log-probs of the step's response tokens (last pipeline stage; [] elsewhere)."""
    return run_micro_batches(
        chunks, step.student, lambda logits, mb: _response_logprobs(logits, mb, tp_group, true_vocab_size),
        forward_only=True,
    )


def _agreed_flags(flags: torch.Tensor, names: list[str]) -> list[str]:
    """The names whose flag is set on any rank (one all-reduce, so every rank raises together)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.to(collective_device())
        dist.all_reduce(flags)
    return [name for name, flag in zip(names, flags.tolist()) if flag]


def _stop_on_non_finite(flags: torch.Tensor, names: list[str], iteration: int, step_index: int) -> None:
    """All ranks agree on the flags (one all-reduce) and raise together, naming what went wrong."""
    bad = _agreed_flags(flags, names)
    if bad:
        raise NonFiniteError(
            f"iteration {iteration}, optimizer step {step_index}: non-finite {', '.join(bad)}; "
            "the optimizer step was skipped and the weights are unchanged (lower optim.lr, check the data or "
            "use fp32 to find the source)"
        )


TEACHER_STATISTICS = ("entropy", "sampled_logprob", "topk_logprobs", "log_z", "logits")


def check_teacher_outputs(outputs: list[list[TeacherOutputs]], iteration: int) -> None:
    """Stop before any student pass when the teacher's statistics hold NaN or Inf.

    A broken teacher (NaN weights, an overflow in bf16) would otherwise surface later as a
    non-finite loss term blamed on the student, or not at all: a NaN entropy fails ``H > tau`` and
    silently closes the forward-KL gate.  Checked on the last pipeline stage (the others hold no
    statistics) and agreed over all ranks.  Top-k log-probs and kept logits are checked for NaN only
    (``-inf`` is a legitimate log-probability of a masked entry).
    """
    flags = []
    for name in TEACHER_STATISTICS:
        bad = False
        for step in outputs:
            for out in step:
                value = out.logits if name == "logits" else getattr(out.stats, name)
                if value is None or not value.is_floating_point():
                    continue
                finite_only = name in ("entropy", "sampled_logprob", "log_z")
                if bool((~torch.isfinite(value)).any() if finite_only else torch.isnan(value).any()):
                    bad = True
                    break
            if bad:
                break
        flags.append(bad)
    bad_names = _agreed_flags(torch.tensor(flags, dtype=torch.float32), list(TEACHER_STATISTICS))
    if bad_names:
        raise NonFiniteError(
            f"iteration {iteration}: non-finite teacher statistics ({', '.join(bad_names)}) from the "
            "teacher's forward pass; stopped before this iteration's student update, so the student's weights "
            "are unchanged by it (check the teacher's weights in teacher.hf_dir / teacher.checkpoint, or use "
            "train.precision=fp32 to find the source)"
        )


def _non_finite_gradients(chunks: list) -> bool:
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return True
    return False


def optimizer_step(opt: Optimization, step: StepBatch, on_logits, *, iteration: int, step_index: int) -> list[dict]:
    """Zero gradients, run forward/backward over the step, check finiteness, step the optimizer.

    ``on_logits(logits, micro_batch) -> (loss_sum, num_tokens, metrics)``; returns the metrics of
    this rank's micro-batches (last stage) with ``grad_norm`` and ``lr`` added to the first.
    """
    for chunk in opt.chunks:
        chunk.zero_grad_buffer()
    opt.optimizer.zero_grad()
    for index, mb in enumerate(step.student):
        mb.extras["index"] = index
    metrics = run_micro_batches(opt.chunks, step.student, on_logits, forward_only=False)
    term_flags = [any(not bool(torch.isfinite(m[name])) for m in metrics if name in m) for name in LOSS_TERMS]
    flags = torch.tensor(term_flags + [_non_finite_gradients(opt.chunks)], dtype=torch.float32)
    _stop_on_non_finite(flags, [f"loss term {n}" for n in LOSS_TERMS] + ["gradients"], iteration, step_index)
    _, grad_norm, _ = opt.optimizer.step()
    opt.scheduler.step(increment=1)
    summary = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "lr": float(opt.optimizer.param_groups[0]["lr"])}
    return [dict(m, **summary) if i == 0 else m for i, m in enumerate(metrics)] or [summary]


def eopd_update(opt: Optimization, step: StepBatch, teacher: list[TeacherOutputs], old: list[torch.Tensor],
                loss: EOPDLossConfig, *, tp_group: Any, true_vocab_size: int, iteration: int,
                step_index: int) -> list[dict]:
    """One EOPD optimizer step on ``step`` with the teacher's statistics and the old log-probs."""

    def on_logits(logits: torch.Tensor, mb: MicroBatch):
        index = mb.extras["index"]
        flat = logits.reshape(-1, logits.shape[-1])
        mask = mb.extras["mask"].reshape(-1)
        loss_sum, metrics = eopd_loss(
            flat, mb.extras["labels"].reshape(-1), mask, teacher[index].stats,
            old_logprobs=old[index], config=loss, group=tp_group, teacher_logits=teacher[index].logits,
            true_vocab_size=true_vocab_size, num_valid_tokens=1.0,  # a sum: Megatron divides by the global count
        )
        return loss_sum, mask.sum().to(torch.int), metrics

    return optimizer_step(opt, step, on_logits, iteration=iteration, step_index=step_index)


def sft_update(opt: Optimization, step: StepBatch, *, tp_group: Any, true_vocab_size: int, iteration: int,
               step_index: int) -> list[dict]:
    """One supervised step: cross-entropy of the response tokens (the reference solutions)."""

    def on_logits(logits: torch.Tensor, mb: MicroBatch):
        logp = _response_logprobs(logits, mb, tp_group, true_vocab_size)
        mask = mb.extras["mask"].reshape(-1)
        loss_sum = -logp.sum()
        count = mask.sum()
        metrics = {"loss": loss_sum.detach(), "num_valid_tokens": count.to(logp.dtype)}
        return loss_sum, count.to(torch.int), metrics

    return optimizer_step(opt, step, on_logits, iteration=iteration, step_index=step_index)


def rollout_mismatch(old: list[torch.Tensor], step: StepBatch) -> Optional[dict]:
    """|Megatron's recomputed log-prob - the sampler's| over the step's response tokens (last stage)."""
    if not old:
        return None
    diffs = []
    for lp, mb in zip(old, step.student):
        mask = mb.extras["mask"]
        reported = torch.cat([torch.tensor(step.samples[i].rollout_logprobs, dtype=lp.dtype)
                              for i in mb.extras["samples"]]) if mb.extras["samples"] else lp.new_zeros(0)
        diffs.append((lp.reshape(mask.shape)[mask] - reported.to(lp.device)).abs())
    allv = torch.cat(diffs) if diffs else torch.zeros(0)
    return {"sum": float(allv.sum()), "max": float(allv.max()) if allv.numel() else 0.0, "count": allv.numel()}
