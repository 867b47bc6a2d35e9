"""Core attention for Megatron-Core's local layer spec on torch's ``scaled_dot_product_attention``.

Megatron's ``DotProductAttention`` (the local spec's core attention) materialises the scores of
every head as a ``[b, heads, sq, sk]`` matrix, upcast to fp32 for the softmax, and repeats K/V
for grouped-query attention.  :class:`SDPAttention` computes the same function through torch's
SDPA, which dispatches to flash / cuDNN / memory-efficient kernels where the inputs allow (torch
chooses; nothing is forced) and to its math kernel elsewhere (e.g. on the CPU).

It is a drop-in ``core_attention`` for ``SelfAttentionSubmodules``: the constructor and
``forward`` take what Megatron passes to ``DotProductAttention`` (``[sq, b, heads, head_dim]``
query/key/value in, ``[sq, b, heads * head_dim]`` out, heads already split per tensor-parallel
rank), and it has no parameters, so checkpoints are the same as with the local spec.

What it computes, relative to ``DotProductAttention``:

- scale: ``softmax_scale`` (default ``1/sqrt(head_dim)``).  With ``apply_query_key_layer_scaling``
  Megatron divides the scale by the layer number before the matmul and multiplies it back inside
  the fp32 softmax, an fp16 overflow guard that leaves the function unchanged; SDPA's kernels keep
  the scores in fp32, so the net scale is applied once.
- masks: ``causal`` with no ``attention_mask`` (square, or a single query which attends to every
  key, as Megatron does); ``no_mask`` / ``padding`` / ``arbitrary`` with a boolean
  ``attention_mask`` in Megatron's convention (``True`` = masked out), broadcastable to
  ``[b, heads, sq, sk]``, or without one.  Megatron writes -10000 into masked scores where SDPA
  excludes them: the results agree whenever a row keeps at least one key, and rows that mask
  every key (Megatron: a uniform average over all keys) are refused.
- dropout on the attention probabilities with ``attention_dropout`` (default
  ``config.attention_dropout``), only in training, inside Megatron's model-parallel RNG fork
  unless sequence parallelism is on (the same streams ``DotProductAttention`` draws from; the
  dropout masks themselves differ, as any two kernels' do).

Everything else ``DotProductAttention`` or TE's attention accepts raises ``NotImplementedError``:
packed sequences (THD), ``attention_bias``, context parallelism, sliding windows, non-vanilla
softmax, causal attention with an explicit mask or with ``sq != sk > 1``, non-boolean masks and the
TE-only mask types.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

# Mask types that take an optional boolean mask and nothing else.
_MASK_ONLY_TYPES = (AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary)


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


class SDPAttention(MegatronModule):
    """``DotProductAttention``'s interface and function on torch's scaled_dot_product_attention."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise NotImplementedError(
                "SDPAttention does not support context parallelism "
                f"(context_parallel_size={config.context_parallel_size}); use transformer-engine's spec"
            )
        if getattr(config, "window_size", None):
            raise NotImplementedError(f"SDPAttention does not support sliding-window attention "
                                      f"(window_size={config.window_size})")
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise NotImplementedError(f"SDPAttention supports softmax_type='vanilla' only, "
                                      f"got {softmax_type!r}")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type  # meaningful only with context parallelism, refused above

        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention's pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        # Per-partition sizes exactly as DotProductAttention derives them.
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = _divide(projection_size, world_size)
        self.hidden_size_per_attention_head = _divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = _divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = _divide(config.num_query_groups, world_size)

        # The net scale of DotProductAttention's scores (see the module docstring on layer scaling).
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = float(softmax_scale)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """``[sq, b, np, hn]`` query, ``[sk, b, ng, hn]`` key/value -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences (THD); "
                                      "use transformer-engine's spec")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(f"expected [s, b, heads, head_dim] query/key/value, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        sq, batch, heads, _ = query.shape
        sk, groups = key.size(0), key.size(2)
        if (heads, groups) != (self.num_attention_heads_per_partition, self.num_query_groups_per_partition):
            raise ValueError(
                f"got {heads} query heads and {groups} key/value heads on this rank, expected "
                f"{self.num_attention_heads_per_partition} and {self.num_query_groups_per_partition}"
            )

        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal, sdpa_mask = False, None
        if mask_type == AttnMaskType.causal:
            if attention_mask is not None:
                raise NotImplementedError(
                    "SDPAttention: causal attention with an explicit attention_mask is ambiguous "
                    "(DotProductAttention applies only the mask, transformer-engine only causality); "
                    "pass attention_mask=None, or the mask with attn_mask_type=arbitrary"
                )
            if sq > 1:  # one query (decoding) attends to every key, as in DotProductAttention
                if sq != sk:
                    raise NotImplementedError(f"SDPAttention: causal attention needs sq == sk, "
                                              f"got {sq} and {sk}")
                is_causal = True
        elif mask_type in _MASK_ONLY_TYPES:
            if attention_mask is not None:
                sdpa_mask = self._keep_mask(attention_mask, (batch, heads, sq, sk))
        else:
            raise NotImplementedError(f"SDPAttention does not support attn_mask_type={mask_type}")

        dropout_p = self.dropout_p if self.training else 0.0
        # [s, b, n, d] -> [b, n, s, d]: views (SDPA takes strided inputs; K/V are not repeated).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=groups != heads,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    @staticmethod
    def _keep_mask(attention_mask: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Megatron's boolean mask (True = masked out) as SDPA's (True = attend)."""
        if attention_mask.dtype != torch.bool:
            raise NotImplementedError(
                f"SDPAttention takes boolean attention masks (True = masked out), got {attention_mask.dtype}"
            )
        try:
            fits = tuple(torch.broadcast_shapes(attention_mask.shape, shape)) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to "
                             f"[b, heads, sq, sk] = {list(shape)}")
        keep = attention_mask.logical_not()
        # Where DotProductAttention would average every key uniformly, SDPA would not: refuse.
        # (One host sync per call, on the masked path only.)
        if not bool(keep.any(dim=-1).all()):
            raise NotImplementedError(
                "SDPAttention: attention_mask masks every key for some query; DotProductAttention "
                "would attend uniformly there, SDPA does not"
            )
        return keep
