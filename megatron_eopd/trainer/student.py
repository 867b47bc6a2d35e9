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
from megatron_eopd.models.output_head import FinalHidden
from megatron_eopd.objective import EOPDLossConfig, eopd_loss, eopd_loss_from_hidden, vocab_parallel_logprobs
from megatron_eopd.objective.fused_head import cross_entropy_per_token, head_logprobs, head_token_loss
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


def _response_rows(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mb.extras["mask"].reshape(-1)
    return mask, mask.nonzero().view(-1)


def _response_logprobs(output: Any, mb: MicroBatch, tp_group: Any, true_vocab_size: int) -> torch.Tensor:
    """log q(label) at the response positions of a micro-batch, flattened to ``[b * s]`` (0 elsewhere),
    from the logits or, with the fused head, from the final hidden states."""
    mask, rows = _response_rows(mb)
    labels = mb.extras["labels"].reshape(-1).index_select(0, rows)
    if isinstance(output, FinalHidden):
        hidden = output.hidden.reshape(-1, output.hidden.shape[-1]).index_select(0, rows)
        picked = head_logprobs(hidden, output.weight, labels, tp_group, true_vocab_size=true_vocab_size)
    else:
        flat = output.reshape(-1, output.shape[-1])
        picked = vocab_parallel_logprobs(flat, labels, tp_group, rows=rows, true_vocab_size=true_vocab_size)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_copy(0, rows, picked)


@torch.no_grad()
def old_logprobs(chunks: list, step: StepBatch, *, tp_group: Any, true_vocab_size: int,
                 fused_head: bool = False) -> list[torch.Tensor]:
    """The current student's log-probs of the step's response tokens (last pipeline stage; [] elsewhere)."""
    return run_micro_batches(
        chunks, step.student, lambda output, mb: _response_logprobs(output, mb, tp_group, true_vocab_size),
        forward_only=True, fused_head=fused_head,
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
    """Whether any gradient element is NaN or infinite.

    Each gradient's sum first: a NaN or an infinity in it makes the sum non-finite, and a sum reads
    the gradient once without the boolean copy that ``isfinite`` writes (155 MB for a Qwen3
    embedding's gradient, a second and a half per CPU step).  A sum can also overflow from finite
    values; those gradients alone are checked element by element, so the answer stays exact.
    """
    grads = []
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    if not grads:
        return False
    sums_finite = torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads]))
    if bool(sums_finite.all()):  # one host sync, not one per parameter
        return False
    return any(not bool(torch.isfinite(grads[i]).all()) for i in torch.nonzero(~sums_finite).flatten().tolist())


def optimizer_step(opt: Optimization, step: StepBatch, on_logits, *, iteration: int, step_index: int,
                   fused_head: bool = False) -> list[dict]:
    """Zero gradients, run forward/backward over the step, check finiteness, step the optimizer.

    ``on_logits(logits, micro_batch) -> (loss_sum, num_tokens, metrics)``; returns the metrics of
    this rank's micro-batches (last stage) with ``grad_norm`` and ``lr`` added to the first.
    """
    for chunk in opt.chunks:
        chunk.zero_grad_buffer()
    opt.optimizer.zero_grad()
    for index, mb in enumerate(step.student):
        mb.extras["index"] = index
    metrics = run_micro_batches(opt.chunks, step.student, on_logits, forward_only=False, fused_head=fused_head)
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
                step_index: int, fused_head: bool = False) -> list[dict]:
    """One EOPD optimizer step on ``step`` with the teacher's statistics and the old log-probs.

    ``fused_head``: the output layer runs inside the loss (:func:`eopd_loss_from_hidden`), so the
    student's logits and their gradient never exist in full; not with the full-vocabulary options.
    """
    if fused_head and loss.needs_teacher_logits:
        raise ValueError("the fused output layer cannot compute the full-vocabulary options "
                         f"(fkl_mode={loss.fkl_mode!r}, rkl_mode={loss.rkl_mode!r}); run them on logits")

    def on_logits(output: Any, mb: MicroBatch):
        index = mb.extras["index"]
        mask = mb.extras["mask"].reshape(-1)
        common = dict(old_logprobs=old[index], config=loss, group=tp_group, true_vocab_size=true_vocab_size,
                      num_valid_tokens=1.0)  # a sum: Megatron divides by the global count
        if isinstance(output, FinalHidden):
            loss_sum, metrics = eopd_loss_from_hidden(output.hidden, output.weight, mb.extras["labels"].reshape(-1),
                                                      mask, teacher[index].stats, **common)
        else:
            loss_sum, metrics = eopd_loss(output.reshape(-1, output.shape[-1]), mb.extras["labels"].reshape(-1),
                                          mask, teacher[index].stats, teacher_logits=teacher[index].logits, **common)
        return loss_sum, mask.sum().to(torch.int), metrics

    return optimizer_step(opt, step, on_logits, iteration=iteration, step_index=step_index, fused_head=fused_head)


def _sft_loss_sum(output: Any, mb: MicroBatch, tp_group: Any, true_vocab_size: int) -> torch.Tensor:
    """-Σ log q(label) over the response positions (differentiable), from logits or final hidden states."""
    if not isinstance(output, FinalHidden):
        return -_response_logprobs(output, mb, tp_group, true_vocab_size).sum()
    _, rows = _response_rows(mb)
    hidden = output.hidden.reshape(-1, output.hidden.shape[-1]).index_select(0, rows)
    labels = mb.extras["labels"].reshape(-1).index_select(0, rows).unsqueeze(1)
    loss_sum, _, _ = head_token_loss(hidden, output.weight, labels, cross_entropy_per_token, tp_group,
                                     want_entropy=False, true_vocab_size=true_vocab_size)
    return loss_sum


def sft_update(opt: Optimization, step: StepBatch, *, tp_group: Any, true_vocab_size: int, iteration: int,
               step_index: int, fused_head: bool = False) -> list[dict]:
    """One supervised step: cross-entropy of the response tokens (the reference solutions)."""

    def on_logits(output: Any, mb: MicroBatch):
        loss_sum = _sft_loss_sum(output, mb, tp_group, true_vocab_size)
        count = mb.extras["mask"].reshape(-1).sum()
        metrics = {"loss": loss_sum.detach(), "num_valid_tokens": count.to(loss_sum.dtype)}
        return loss_sum, count.to(torch.int), metrics

    return optimizer_step(opt, step, on_logits, iteration=iteration, step_index=step_index, fused_head=fused_head)


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
