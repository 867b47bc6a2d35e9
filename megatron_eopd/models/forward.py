"""Running Megatron model chunks over micro-batches through Megatron's pipeline schedules.

Every pass over a model goes through here: the parity probe, teacher scoring, the student's old
log-probs (forward only) and the student's update (forward and backward).  Megatron's schedule
owns pipeline parallelism; this module owns the contract around it:

- under pipeline parallelism every micro-batch of one call has the same ``[micro_batch_size,
  seq_length]`` token shape (the point-to-point buffers are sized once per call); without it each
  micro-batch may have its own (Megatron's non-pipelined schedule reads no shape), so a batcher can
  pad every micro-batch only to its own longest sequence;
- ``on_logits(logits, micro_batch)`` runs on the last pipeline stage with this rank's vocab shard
  of the logits ``[b, s, V/TP]``; what it returns is collected in micro-batch order (forward
  only), or it returns ``(loss_sum, num_tokens, metrics)`` for training, where the gradient is
  ``sum of loss_sum / sum of num_tokens`` over micro-batches and data-parallel ranks (Megatron's
  per-token loss normalisation, which the trainer's model config switches on).
- with ``fused_head=True`` the output layer is left to the loss: ``on_logits`` receives a
  :class:`~megatron_eopd.models.output_head.FinalHidden` (final hidden states ``[b, s, hidden]``
  and this rank's output-weight shard) in place of the logits, for the loss functions of
  :mod:`megatron_eopd.objective.fused_head`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from megatron_eopd.models.chunks import as_chunk_list
from megatron_eopd.models.output_head import FinalHidden, final_hidden_states, head_weight


@dataclass
class MicroBatch:
    """Token ids ``[b, s]`` and positions fed to the model, plus whatever ``on_logits`` needs."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, **extras: Any) -> "MicroBatch":
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).unsqueeze(0).expand(batch, -1)
        return cls(tokens, positions, dict(extras))


def run_micro_batches(
    model_chunks: Any,
    micro_batches: list[MicroBatch],
    on_logits: Callable[[Any, MicroBatch], Any],
    *,
    forward_only: bool,
    fused_head: bool = False,
) -> list:
    """Run the schedule over ``micro_batches``; call on every rank of the model-parallel group.

    Returns, on the last pipeline stage, ``on_logits``'s results in micro-batch order (forward
    only) or the metrics dicts (training); an empty list on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.core import parallel_state

    if not micro_batches:
        return []
    shape = tuple(micro_batches[0].tokens.shape)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        for i, mb in enumerate(micro_batches):
            if tuple(mb.tokens.shape) != shape:
                raise ValueError(f"micro-batch {i} has token shape {tuple(mb.tokens.shape)}, the first {shape}: "
                                 "under pipeline parallelism every micro-batch of a call needs the same shape")
        seq_length, micro_batch_size = shape[1], shape[0]
    else:  # unused by the non-pipelined schedule; the largest, for the record
        seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
        micro_batch_size = max(mb.tokens.shape[0] for mb in micro_batches)
    chunks = as_chunk_list(model_chunks)
    collected: list = []

    def loss_func(micro_batch: MicroBatch, logits: Any):
        result = on_logits(logits, micro_batch)
        if forward_only:
            collected.append(result)
            return micro_batch.tokens.new_zeros((), dtype=torch.float32), {}
        loss_sum, num_tokens, metrics = result
        return loss_sum, num_tokens, metrics

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        if not fused_head:
            output = model(micro_batch.tokens, micro_batch.position_ids, None)
            return output, lambda logits: loss_func(micro_batch, logits)
        with final_hidden_states(model):
            output = model(micro_batch.tokens, micro_batch.position_ids, None)
        return output, lambda hidden: loss_func(micro_batch, FinalHidden(hidden, head_weight(model)))

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return collected if forward_only else list(outputs)


def last_stage_group_source() -> Optional[int]:
    """Global rank of the last pipeline stage in this rank's pipeline group (None without PP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    size = parallel_state.get_pipeline_model_parallel_world_size()
    if size == 1:
        return None
    return dist.get_global_rank(parallel_state.get_pipeline_model_parallel_group(), size - 1)
