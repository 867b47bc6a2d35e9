"""The output layer fused with the loss: per-token terms from hidden states, never all the logits.

A Qwen3 head maps hidden states h [T, hidden] to logits z = h W^T [T, V/TP] (W: this rank's
vocabulary shard of the output weight).  At V = 151,936 the logits and their gradient are the
largest tensors of a training step (2 x 4.6 GiB in bf16 at 16k tokens), though the loss reads
only a few numbers per token: log Z, H(q) and log q at a handful of ids.  The functions here run
the head over blocks of token rows and keep only those per-token numbers:

- :func:`head_token_loss` (training): for each block, z_b = h_b W^T, the block's per-token terms
  (:func:`~.vocab_parallel.vocab_parallel_token_terms`, Triton kernels where they run), the
  caller's per-token loss of those terms and its gradient with respect to z_b, folded straight
  into dL/dh_b = (dL/dz_b) W and dL/dW += (dL/dz_b)^T h_b.  The gradient is complete when the
  forward ends (as in Liger Kernel's fused linear cross entropy); backward only scales it by the
  upstream gradient.  Peak extra memory: one block of logits and of its gradient, plus an fp32
  accumulator of W's gradient when the weight is 16-bit and there are several blocks.
- :func:`head_summary` and :func:`head_logprobs` (no autograd): the teacher's statistics and the
  student's log-probs block by block.

Only the rows asked for are computed (response tokens; prompts cost nothing).  Under TP every
rank holds the same h and its own W shard: the per-token terms are reduced over the group inside
each block exactly as on full logits, and dL/dh (a partial sum per shard) is all-reduced once at
the end, the job Megatron's column-parallel output layer does in its backward.  The results equal
those on ``h @ W.T`` computed in full, up to the rounding of the block matmuls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .vocab_parallel import (
    DistributionSummary,
    TokenTerms,
    compute_dtype,
    tp_size_and_rank,
    vocab_parallel_summary,
    vocab_parallel_token_terms,
)

# Rows per block: about 4M logits on CPU (cache-sized), 64M on GPU (128 MiB of bf16: the block
# matmuls stay large while the block stays far below the full [T, V/TP]).
DEFAULT_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}

# A per-token loss of a block: (terms of the block's rows, lo, hi) -> (loss [hi - lo], extras),
# where ``extras`` maps names to per-token tensors [hi - lo, ...] kept (detached) for diagnostics.
PerTokenLoss = Callable[[TokenTerms, int, int], tuple[Tensor, dict[str, Tensor]]]


def cross_entropy_per_token(terms: TokenTerms, lo: int, hi: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The :data:`PerTokenLoss` of plain cross entropy: -log q at the first gathered id (the label)."""
    return -terms.logprobs[:, 0], {}


def block_rows(num_rows: int, vocab_shard: int, device: torch.device, block_tokens: Optional[int] = None) -> int:
    """Token rows per block of the head (``block_tokens`` overrides the default)."""
    if block_tokens is not None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        return int(block_tokens)
    elements = DEFAULT_BLOCK_ELEMENTS.get(torch.device(device).type, DEFAULT_BLOCK_ELEMENTS["cuda"])
    return max(1, min(max(num_rows, 1), elements // max(vocab_shard, 1)))


def _check_head(hidden: Tensor, weight: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [rows, hidden] and weight [vocab_shard, hidden] must share the hidden size, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden states on {hidden.device} but the output weight on {weight.device}")


def _block_logits(hidden_block: Tensor, weight: Tensor) -> Tensor:
    """z = h W^T in the weight's dtype (what Megatron's output layer computes)."""
    return hidden_block.to(weight.dtype) @ weight.t()


@dataclasses.dataclass
class _HeadLossPlan:
    """What :class:`_HeadTokenLoss` needs besides its tensor inputs, and where it leaves the diagnostics."""

    gather_ids: Tensor
    group: Any
    per_token_loss: PerTokenLoss
    terms_kwargs: dict
    rows_per_block: int
    terms: Optional[TokenTerms] = None  # detached, all rows, filled by forward
    extras: Optional[dict] = None


class _HeadTokenLoss(torch.autograd.Function):
    """Σ_rows per_token_loss(terms(h W^T)) with its gradient in h and W computed during forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, plan: _HeadLossPlan):
        rows, step = hidden.shape[0], plan.rows_per_block
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        blocks = range(0, max(rows, 1), step)  # no rows: one empty block, for the outputs' shapes
        # One block: its weight gradient is one matmul; several: summed in fp32 (16-bit weights).
        accumulate_fp32 = len(blocks) > 1 and weight.dtype in (torch.bfloat16, torch.float16)
        # Written by the first block's product, not zero-filled first: at Qwen3's 151,936 rows a
        # zeroed fp32 [V, hidden] buffer is a 622 MB pass of its own (a second of a CPU step).
        grad_weight: Optional[Tensor] = None
        total = hidden.new_zeros((), dtype=compute_dtype(weight.dtype))
        term_parts: dict[str, list[Tensor]] = {name: [] for name in TokenTerms._fields if name != "teacher_log_z"}
        extra_parts: dict[str, list[Tensor]] = {}
        for lo in blocks:
            hi = min(lo + step, rows)
            h_block = hidden[lo:hi]
            z = _block_logits(h_block, weight).requires_grad_(want_grad)
            with torch.enable_grad():
                terms = vocab_parallel_token_terms(z, plan.gather_ids[lo:hi], plan.group, **plan.terms_kwargs)
                losses, extras = plan.per_token_loss(terms, lo, hi)
                block_loss = losses.sum()
            if want_grad and block_loss.requires_grad:
                (grad_z,) = torch.autograd.grad(block_loss, z)
                grad_hidden[lo:hi] = (grad_z @ weight).to(hidden.dtype)
                if grad_weight is None:
                    grad_weight = grad_z.t() @ h_block.to(weight.dtype)
                    grad_weight = grad_weight.float() if accumulate_fp32 else grad_weight
                elif accumulate_fp32:
                    grad_weight.add_(grad_z.t() @ h_block.to(weight.dtype))
                else:
                    grad_weight.addmm_(grad_z.t(), h_block.to(weight.dtype))
                del grad_z
            total += block_loss.detach()
            for name in term_parts:
                term_parts[name].append(getattr(terms, name).detach())
            for name, value in extras.items():
                extra_parts.setdefault(name, []).append(value.detach())
            del z, terms, losses, block_loss
        plan.terms = TokenTerms(**{name: torch.cat(parts) for name, parts in term_parts.items()})
        plan.extras = {name: torch.cat(parts) for name, parts in extra_parts.items()}
        if want_grad:
            size, _ = tp_size_and_rank(plan.group)
            if size > 1:
                dist.all_reduce(grad_hidden, group=plan.group)  # Σ over the vocabulary shards
            if grad_weight is None:  # no block had a loss that depends on the weights
                grad_weight = torch.zeros_like(weight)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype), None


def head_token_loss(
    hidden: Tensor,
    weight: Tensor,
    gather_ids: Tensor,
    per_token_loss: PerTokenLoss,
    group: Any = None,
    *,
    want_entropy: bool = True,
    temperature: float = 1.0,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
    block_tokens: Optional[int] = None,
) -> tuple[Tensor, TokenTerms, dict[str, Tensor]]:
    """Σ over rows of ``per_token_loss`` on the terms of ``hidden @ weight.T``, differentiable in both.

    Args:
        hidden: [n, hidden] the rows that count (select them first; the others cost nothing).
        weight: [V/TP, hidden] this rank's shard of the output weight.
        gather_ids: [n, m] global ids whose full-vocabulary log q the terms carry.
        per_token_loss: see :data:`PerTokenLoss`; called once per block, under autograd, with the
            block's :class:`TokenTerms` (differentiable in the block's logits) and its row range.
        group, temperature, vocab_start, true_vocab_size, chunk_tokens: as for
            :func:`~.vocab_parallel.vocab_parallel_token_terms`.
        block_tokens: rows per block of the head (default: :func:`block_rows`).

    Returns:
        (loss_sum, terms, extras): the scalar sum (its gradient reaches ``hidden`` and ``weight``),
        the detached terms of all rows and the detached ``extras`` of all rows, concatenated.
    """
    _check_head(hidden, weight)
    if gather_ids.dim() != 2 or gather_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"gather_ids must be [rows, m] = [{hidden.shape[0]}, m], got {tuple(gather_ids.shape)}")
    plan = _HeadLossPlan(
        gather_ids=gather_ids.to(torch.int64),
        group=group,
        per_token_loss=per_token_loss,
        terms_kwargs=dict(want_entropy=want_entropy, temperature=temperature, vocab_start=vocab_start,
                          true_vocab_size=true_vocab_size, chunk_tokens=chunk_tokens),
        rows_per_block=block_rows(hidden.shape[0], weight.shape[0], weight.device, block_tokens),
    )
    loss_sum = _HeadTokenLoss.apply(hidden, weight, plan)
    return loss_sum, plan.terms, plan.extras


@torch.no_grad()
def head_summary(
    hidden: Tensor,
    weight: Tensor,
    group: Any = None,
    *,
    sampled_ids: Optional[Tensor] = None,
    topk: int = 0,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    block_tokens: Optional[int] = None,
) -> DistributionSummary:
    """:func:`~.vocab_parallel.vocab_parallel_summary` of ``hidden @ weight.T`` [n, V/TP], block by block.

    ``sampled_ids`` [n] belong to the rows of ``hidden``.  No autograd.
    """
    _check_head(hidden, weight)
    rows = hidden.shape[0]
    if sampled_ids is not None and sampled_ids.numel() != rows:
        raise ValueError(f"{sampled_ids.numel()} sampled ids for {rows} rows of hidden states")
    step = block_rows(rows, weight.shape[0], weight.device, block_tokens)
    parts: list[DistributionSummary] = []
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        parts.append(vocab_parallel_summary(
            _block_logits(hidden[lo:hi], weight), group,
            sampled_ids=None if sampled_ids is None else sampled_ids[lo:hi].to(torch.int64), topk=topk,
            vocab_start=vocab_start, true_vocab_size=true_vocab_size, temperature=temperature,
            chunk_tokens=chunk_tokens,
        ))
    if not parts:  # no rows: the summary of an empty block
        empty_block = hidden.new_empty(0, weight.shape[0], dtype=weight.dtype)
        return vocab_parallel_summary(
            empty_block, group, sampled_ids=None if sampled_ids is None else sampled_ids.to(torch.int64),
            topk=topk, vocab_start=vocab_start, true_vocab_size=true_vocab_size, temperature=temperature)
    return DistributionSummary(*(None if fields[0] is None else torch.cat(fields) for fields in zip(*parts)))


@torch.no_grad()
def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    group: Any = None,
    *,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    block_tokens: Optional[int] = None,
) -> Tensor:
    """Full-vocabulary log q(ids) [n] of ``hidden @ weight.T`` rows, block by block; no autograd."""
    summary = head_summary(hidden, weight, group, sampled_ids=ids, vocab_start=vocab_start,
                           true_vocab_size=true_vocab_size, temperature=temperature, chunk_tokens=chunk_tokens,
                           block_tokens=block_tokens)
    return summary.sampled_logprob
