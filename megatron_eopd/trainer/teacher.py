"""Teacher scoring: a forward-only pass of the Megatron teacher over the teacher's view of each step.

The teacher is a plain ``GPTModel`` (no optimizer, no DDP wrapper, no gradient buffers) in the same
tensor/pipeline groups as the student.  On the last pipeline stage its vocab-sharded logits become
the compact per-token statistics of :func:`~megatron_eopd.objective.compute_teacher_stats` (entropy,
log-prob of the response token, top-k) right away, exactly over the full vocabulary with a few
per-token collectives; the logits are dropped unless the loss needs them (``fkl_mode=full`` or
``rkl_mode=analytic``).  Results are placed at the student view's response positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_eopd.models.forward import MicroBatch, run_micro_batches
from megatron_eopd.models.output_head import FinalHidden
from megatron_eopd.objective import (
    EOPDLossConfig,
    TeacherTokenStats,
    compute_teacher_stats,
    compute_teacher_stats_from_hidden,
)
from megatron_eopd.trainer.batch import ResponsePlacement, StepBatch


@dataclass
class TeacherOutputs:
    """Per student micro-batch (last pipeline stage only): statistics on its flattened positions."""

    stats: TeacherTokenStats
    logits: Optional[torch.Tensor] = None  # [b * s, V/TP] in the student layout, when the loss needs them


def _to_student_layout(stats: TeacherTokenStats, placement: ResponsePlacement) -> TeacherTokenStats:
    def move(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if x is None:
            return None
        placed = placement.move(x.reshape(placement.source_shape + tuple(x.shape[1:])))
        return placed.reshape((-1,) + tuple(x.shape[1:]))

    return TeacherTokenStats(move(stats.entropy), move(stats.sampled_logprob), move(stats.topk_ids),
                             move(stats.topk_logprobs), move(stats.log_z), stats.temperature)


@torch.no_grad()
def score_teacher(teacher_chunks: Any, step: StepBatch, loss: EOPDLossConfig, *, tp_group: Any,
                  true_vocab_size: int, fused_head: bool = False) -> list[TeacherOutputs]:
    """Teacher statistics for every student micro-batch of ``step`` (empty on non-last stages).

    ``fused_head``: the teacher's output layer runs block by block inside the statistics
    (:func:`compute_teacher_stats_from_hidden`), so its logits never exist in full; not when the
    loss needs the teacher's logits.
    """
    if fused_head and loss.needs_teacher_logits:
        raise ValueError("the loss needs the teacher's logits (fkl_mode='full' or rkl_mode='analytic'); "
                         "score the teacher without the fused output layer")
    topk = loss.topk if loss.fkl_mode == "topk" or loss.fkl_mode == "off" else 0
    common = dict(topk=topk, true_vocab_size=true_vocab_size, temperature=loss.teacher_temperature,
                  chunk_tokens=loss.chunk_tokens)

    def on_logits(output: Any, teacher_mb: MicroBatch) -> TeacherOutputs:
        student_mb = step.student[teacher_mb.extras["index"]]
        placement = ResponsePlacement.between(teacher_mb.extras["mask"], student_mb.extras["mask"])
        labels, mask = teacher_mb.extras["labels"].reshape(-1), teacher_mb.extras["mask"].reshape(-1)
        if isinstance(output, FinalHidden):
            stats = compute_teacher_stats_from_hidden(output.hidden, output.weight, labels, tp_group,
                                                      response_mask=mask, **common)
            return TeacherOutputs(_to_student_layout(stats, placement), None)
        stats = compute_teacher_stats(output.reshape(-1, output.shape[-1]), labels, tp_group, response_mask=mask,
                                      **common)
        kept = placement.move(output).reshape(-1, output.shape[-1]) if loss.needs_teacher_logits else None
        return TeacherOutputs(_to_student_layout(stats, placement), kept)

    for index, mb in enumerate(step.teacher):
        mb.extras["index"] = index
    return run_micro_batches(teacher_chunks, step.teacher, on_logits, forward_only=True, fused_head=fused_head)
