"""A Megatron ``GPTModel`` that hands over its final hidden states instead of its logits.

The loss functions of :mod:`megatron_eopd.objective.fused_head` run the output layer themselves,
block by block, so they need what the layer would have read: the final hidden states (after the
final norm) and this rank's vocabulary shard of the output weight.  :func:`final_hidden_states`
makes the last pipeline stage return exactly those, for the duration of one forward, by letting
the column-parallel output layer pass its input through; the weight stays a parameter of the
model (same name, same checkpoint, same gradient bucket, tied to the embedding where Qwen3 ties
it) and autograd carries its gradient there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import torch

from megatron_eopd.models.chunks import unwrap_model


class FinalHidden(NamedTuple):
    """What the last pipeline stage hands to the loss in place of logits."""

    hidden: torch.Tensor  # [b, s, hidden] after the final norm, replicated over TP
    weight: torch.Tensor  # [V/TP, hidden] this rank's shard of the output weight


def head_weight(model_chunk: Any) -> torch.Tensor:
    """The output weight the chunk's output layer multiplies by (the word embedding when tied)."""
    model = unwrap_model(model_chunk)
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def check_fusable(model: Any) -> None:
    """Raise NotImplementedError naming the reason when the fused output layer cannot stand in for this
    (unwrapped, last-stage) model's own output layer."""
    layer = model.output_layer
    if getattr(layer, "sequence_parallel", False):
        raise NotImplementedError("the fused output layer does not gather sequence-parallel hidden states; "
                                  "turn sequence parallelism off or train.fused_output_layer off")
    if getattr(model.config, "use_mup", False):
        raise NotImplementedError("the fused output layer does not apply MuP's logit scaling")
    if getattr(layer, "bias", None) is not None:
        raise NotImplementedError("the fused output layer has no output bias (Qwen3 has none)")


@contextlib.contextmanager
def final_hidden_states(model_chunk: Any) -> Iterator[None]:
    """Inside: the chunk's forward returns final hidden states ``[b, s, hidden]`` where it would
    return logits ``[b, s, V/TP]`` (last pipeline stage; other stages are unchanged)."""
    model = unwrap_model(model_chunk)
    if not getattr(model, "post_process", False):
        yield
        return
    check_fusable(model)
    layer = model.output_layer

    def pass_through(input_: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None, **_: Any):
        return input_, None

    layer.forward = pass_through  # the instance attribute shadows ColumnParallelLinear.forward
    try:
        yield
    finally:
        del layer.forward
