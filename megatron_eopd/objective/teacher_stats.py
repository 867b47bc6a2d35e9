"""Compact per-token teacher statistics, computed once from the teacher's vocab-sharded logits.

The EOPD loss needs, per response token, only: the teacher entropy (the gate), the teacher
log-prob of the sampled token (the RKL advantage) and the teacher's top-k ids and log-probs (the
FKL term).  These are O(tokens * k) numbers, replicated on every TP rank, so the teacher's
[tokens, V/TP] logits can be freed right after its forward (or never leave the teacher's ranks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor

from .fused_head import head_summary
from .vocab_parallel import DistributionSummary, vocab_parallel_summary


@dataclasses.dataclass
class TeacherTokenStats:
    """Per-token teacher statistics over the FULL vocabulary (exact under TP).

    All tensors share the leading token dimension T.  Rows outside the response mask they were
    computed with are zero-filled.  Float tensors are fp32 (fp64 if the logits were fp64).
    """

    entropy: Tensor  # [T] H(p) in nats
    sampled_logprob: Tensor  # [T] log p(y_t)
    topk_ids: Optional[Tensor] = None  # [T, k] int64 global ids, log-prob descending
    topk_logprobs: Optional[Tensor] = None  # [T, k] full-vocabulary log p (not renormalised)
    log_z: Optional[Tensor] = None  # [T] log partition function of logits / temperature
    temperature: float = 1.0

    def __post_init__(self):
        tokens = self.entropy.shape
        if self.entropy.dim() != 1 or self.sampled_logprob.shape != tokens:
            raise ValueError(
                f"entropy and sampled_logprob must both be [T], got {tuple(self.entropy.shape)} "
                f"and {tuple(self.sampled_logprob.shape)}"
            )
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs come together")
        if self.topk_ids is not None:
            if self.topk_ids.dim() != 2 or self.topk_ids.shape[0] != tokens[0]:
                raise ValueError(f"topk_ids must be [T, k], got {tuple(self.topk_ids.shape)}")
            if self.topk_logprobs.shape != self.topk_ids.shape:
                raise ValueError("topk_logprobs must have the shape of topk_ids")
            if self.topk_ids.dtype != torch.int64:
                raise ValueError(f"topk_ids must be int64 global ids, got {self.topk_ids.dtype}")
        if self.log_z is not None and self.log_z.shape != tokens:
            raise ValueError(f"log_z must be [T], got {tuple(self.log_z.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.entropy.shape[0]

    @property
    def topk(self) -> int:
        return 0 if self.topk_ids is None else self.topk_ids.shape[1]

    def topk_mass(self) -> Optional[Tensor]:
        """[T] teacher probability mass covered by its top-k."""
        return None if self.topk_logprobs is None else self.topk_logprobs.exp().sum(dim=-1)

    def select(self, rows: Tensor) -> "TeacherTokenStats":
        """The statistics of the given token indices."""
        pick = lambda x: None if x is None else x.index_select(0, rows)  # noqa: E731
        return TeacherTokenStats(
            self.entropy.index_select(0, rows),
            self.sampled_logprob.index_select(0, rows),
            pick(self.topk_ids),
            pick(self.topk_logprobs),
            pick(self.log_z),
            self.temperature,
        )

    def slice(self, lo: int, hi: int) -> "TeacherTokenStats":
        """The statistics of tokens ``lo:hi`` (views, no copy)."""
        cut = lambda x: None if x is None else x[lo:hi]  # noqa: E731
        return TeacherTokenStats(cut(self.entropy), cut(self.sampled_logprob), cut(self.topk_ids),
                                 cut(self.topk_logprobs), cut(self.log_z), self.temperature)

    def to(self, device: torch.device | str) -> "TeacherTokenStats":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            entropy=move(self.entropy),
            sampled_logprob=move(self.sampled_logprob),
            topk_ids=move(self.topk_ids),
            topk_logprobs=move(self.topk_logprobs),
            log_z=move(self.log_z),
        )


@torch.no_grad()
def compute_teacher_stats(
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    group: Any = None,
    *,
    topk: int = 16,
    response_mask: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
) -> TeacherTokenStats:
    """Teacher statistics from its vocab-sharded logits [..., V/TP] (leading dims are flattened).

    ``sampled_ids`` [...] are the student's sampled global token ids.  With ``response_mask``
    only masked-in tokens are computed (the rest are zero-filled).  ``topk=0`` skips the top-k.
    Communication per chunk of tokens: one all-reduce MAX, one all-reduce SUM, one all-gather of
    the local top-k candidates.
    """
    logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    ids, rows = _checked_tokens(topk, sampled_ids, response_mask, logits, "teacher logits")
    tokens = logits.shape[0]
    summary = vocab_parallel_summary(
        logits,
        group,
        sampled_ids=ids,
        topk=topk,
        rows=rows,
        vocab_start=vocab_start,
        true_vocab_size=true_vocab_size,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    return _placed(summary, rows, tokens, temperature)


def _checked_tokens(topk: int, sampled_ids: Tensor, response_mask: Optional[Tensor], per_token: Tensor,
                    what: str) -> tuple[Tensor, Tensor]:
    """(flat int64 sampled ids, rows to compute) for ``per_token`` [T, ...], checked against T."""
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    tokens = per_token.shape[0]
    ids = sampled_ids.reshape(-1).to(torch.int64)
    if ids.numel() != tokens:
        raise ValueError(f"{ids.numel()} sampled ids for {tokens} tokens of {what}")
    if response_mask is None:
        return ids, torch.arange(tokens, device=per_token.device)
    if response_mask.numel() != tokens:
        raise ValueError(f"response_mask has {response_mask.numel()} entries for {tokens} tokens")
    return ids, response_mask.reshape(-1).nonzero().view(-1)


def _placed(summary: DistributionSummary, rows: Tensor, tokens: int, temperature: float) -> TeacherTokenStats:
    """Statistics of ``rows`` spread over all ``tokens`` (zeros elsewhere)."""
    if rows.numel() == tokens:
        full = lambda x: x  # noqa: E731
    else:

        def full(x: Optional[Tensor]) -> Optional[Tensor]:
            if x is None:
                return None
            out = x.new_zeros((tokens,) + tuple(x.shape[1:]))
            return out.index_copy_(0, rows, x)

    return TeacherTokenStats(
        entropy=full(summary.entropy),
        sampled_logprob=full(summary.sampled_logprob),
        topk_ids=full(summary.topk_ids),
        topk_logprobs=full(summary.topk_logprobs),
        log_z=full(summary.log_z),
        temperature=float(temperature),
    )


@torch.no_grad()
def compute_teacher_stats_from_hidden(
    hidden: Tensor,
    head_weight: Tensor,
    sampled_ids: Tensor,
    group: Any = None,
    *,
    topk: int = 16,
    response_mask: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    block_tokens: Optional[int] = None,
) -> TeacherTokenStats:
    """:func:`compute_teacher_stats` of ``hidden @ head_weight.T`` with the output layer fused in.

    ``hidden`` [..., hidden]: the teacher's final hidden states (replicated over TP);
    ``head_weight`` [V/TP, hidden]: this rank's shard of its output weight.  The head runs over
    blocks of the masked-in tokens only (:func:`~.fused_head.head_summary`), so the teacher's
    [tokens, V/TP] logits never exist.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, rows = _checked_tokens(topk, sampled_ids, response_mask, flat, "teacher hidden states")
    tokens = flat.shape[0]
    summary = head_summary(
        flat.index_select(0, rows), head_weight, group, sampled_ids=ids.index_select(0, rows), topk=topk,
        vocab_start=vocab_start, true_vocab_size=true_vocab_size, temperature=temperature,
        chunk_tokens=chunk_tokens, block_tokens=block_tokens,
    )
    return _placed(summary, rows, tokens, temperature)
