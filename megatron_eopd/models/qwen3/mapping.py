"""The one HF <-> Megatron-Core mapping table for Qwen3, and the pure transforms that use it.

Every consumer goes through :data:`QWEN3_MAPPING`: the file converters, the in-memory loader and
the streaming exporter that feeds vLLM every training iteration.  This module is "tensors in,
tensors out" (HF names and full tensors <-> one TP rank's Megatron shard, :func:`shard_from_hf`,
:func:`hf_from_shards`, :func:`hf_to_megatron_shard`); it knows no model object and no process
group.  Moving weights into and out of live, sharded model chunks (parameters, TP gathers,
pipeline sends) is :mod:`megatron_eopd.models.qwen3.transfer`.

Layouts (``h`` hidden, ``d`` head_dim, ``g`` KV heads = query groups, ``q = heads / g``):

* ``linear_qkv.weight`` is ``[g * (q + 2) * d, h]`` laid out per query group as
  ``[q heads of the group, k, v]``.  TP splits whole groups, so rank shards concatenate back into
  the global layout.
* ``linear_fc1.weight`` fuses ``[gate; up]`` *per TP rank*: rank r holds
  ``[gate_r; up_r]``, so the global tensor is not the concatenation of rank shards.
* embedding / output layer rows are padded to :func:`padded_vocab_size` with zeros; padding is
  stripped on export.
* ``linear_proj`` / ``linear_fc2`` are row-parallel (split along the input dimension).

With the transformer-engine layer spec the input and pre-MLP RMSNorms are fused into the next
linear layer (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); the table knows
both names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from megatron_eopd.errors import EOPDError
from megatron_eopd.models.qwen3.architecture import (
    DEFAULT_VOCAB_DIVISOR,
    Qwen3Arch,
    as_arch,
    padded_vocab_size,
)

# How a tensor is split across tensor-parallel ranks.
REPLICATED = "replicated"
ROW = "row"  # split along dim 1 (input features)
VOCAB = "vocab"  # split along dim 0, rows padded to the padded vocabulary
QKV = "qkv"  # q/k/v fused per query group, groups split along dim 0
GATE_UP = "gate_up"  # gate/up fused per rank

# Where a tensor lives in the pipeline.
FIRST_STAGE, LAST_STAGE, LAYER = "first", "last", "layer"


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str  # local layer spec name; "{layer}"-free suffix for layer entries
    megatron_te: str  # transformer-engine layer spec name
    hf: tuple[str, ...]  # HF names; "{layer}" is the global layer index
    split: str
    place: str

    def megatron_name(self, layer_spec: str) -> str:
        return self.megatron_te if layer_spec == "te" else self.megatron

    def hf_names(self, layer: Optional[int]) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf)


def _layer(megatron: str, hf: Union[str, tuple[str, ...]], split: str, te: Optional[str] = None):
    hf_names = (hf,) if isinstance(hf, str) else hf
    prefix = "model.layers.{layer}."
    return WeightMapping(megatron, te or megatron, tuple(prefix + n for n in hf_names), split, LAYER)


# Order matters: it is the order in which the exporter streams tensors (HF's own order).
QWEN3_MAPPING: tuple[WeightMapping, ...] = (
    WeightMapping("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                  ("model.embed_tokens.weight",), VOCAB, FIRST_STAGE),
    _layer("input_layernorm.weight", "input_layernorm.weight", REPLICATED,
           te="self_attention.linear_qkv.layer_norm_weight"),
    _layer("self_attention.linear_qkv.weight",
           ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    _layer("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", REPLICATED),
    _layer("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", REPLICATED),
    _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight", ROW),
    _layer("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", REPLICATED,
           te="mlp.linear_fc1.layer_norm_weight"),
    _layer("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    _layer("mlp.linear_fc2.weight", "mlp.down_proj.weight", ROW),
    WeightMapping("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                  ("model.norm.weight",), REPLICATED, LAST_STAGE),
    WeightMapping("output_layer.weight", "output_layer.weight", ("lm_head.weight",), VOCAB, LAST_STAGE),
)



def mapping_entry(megatron_name: str) -> WeightMapping:
    """The table's entry for a local-spec Megatron name (a layer entry by its in-layer suffix)."""
    for entry in QWEN3_MAPPING:
        if entry.megatron == megatron_name:
            return entry
    raise KeyError(f"no Qwen3 mapping entry for Megatron name {megatron_name!r}")


EMBEDDING = mapping_entry("embedding.word_embeddings.weight")
FINAL_NORM = mapping_entry("decoder.final_layernorm.weight")
OUTPUT = mapping_entry("output_layer.weight")
LAYER_PREFIX = "decoder.layers."
LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class MappingError(EOPDError, ValueError):
    """Tensors do not match the architecture (missing, extra, or wrong shape)."""


# --------------------------------------------------------------------------- HF-side facts


def expected_hf_shapes(arch: Qwen3Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF ``Qwen3ForCausalLM`` checkpoint of ``arch`` holds, with its shape, in HF order."""
    h, d, f, v = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    nq, nkv = arch.num_attention_heads * d, arch.num_kv_heads * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nq, h),
        "self_attn.k_proj.weight": (nkv, h),
        "self_attn.v_proj.weight": (nkv, h),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, nq),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(arch.num_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def validate_hf_tensor_set(arch: Qwen3Arch, shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Check names and shapes of a HF checkpoint against ``arch``; raise :class:`MappingError`.

    Returns the names to ignore (a tied model's redundant ``lm_head.weight``).
    """
    expected = expected_hf_shapes(arch)
    ignored = []
    if arch.tie_word_embeddings and "lm_head.weight" in shapes:
        ignored.append("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected) - set(ignored))
    if missing:
        raise MappingError(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                           + (" ..." if len(missing) > 8 else ""))
    if extra:
        raise MappingError(f"extra tensors not in a {arch.num_layers}-layer Qwen3 ({len(extra)}): "
                           f"{', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
    for name in list(expected) + ignored:
        want = expected.get(name, expected["model.embed_tokens.weight"])
        got = tuple(shapes[name])
        if got != tuple(want):
            raise MappingError(f"shape mismatch for {name}: checkpoint has {list(got)}, "
                               f"config implies {list(want)}")
    return ignored


# --------------------------------------------------------------------------- HF -> Megatron


def _chunk(tensor: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    return torch.chunk(tensor, tp_size, dim=dim)[tp_rank]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Qwen3Arch) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's global ``linear_qkv`` layout ``[g, (q+2)*d, h]`` flattened."""
    g, d, h = arch.num_kv_heads, arch.head_dim, q.shape[-1]
    fused = torch.cat(
        [q.reshape(g, arch.q_per_group * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1
    )
    return fused.reshape(-1, h)


def split_qkv(fused: torch.Tensor, arch: Qwen3Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` on the global (TP-gathered) tensor."""
    g, d, h = arch.num_kv_heads, arch.head_dim, fused.shape[-1]
    grouped = fused.reshape(g, (arch.q_per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [arch.q_per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def shard_from_hf(
    entry: WeightMapping,
    tensors: Sequence[torch.Tensor],
    arch: Qwen3Arch,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
) -> torch.Tensor:
    """This TP rank's Megatron shard of one mapping entry, from its full HF tensors."""
    if entry.split == REPLICATED:
        return tensors[0]
    if entry.split == ROW:
        return _chunk(tensors[0], 1, tp_rank, tp_size)
    if entry.split == VOCAB:
        full = tensors[0]
        if padded_vocab > full.shape[0]:
            pad = full.new_zeros(padded_vocab - full.shape[0], full.shape[1])
            full = torch.cat([full, pad], dim=0)
        return _chunk(full, 0, tp_rank, tp_size)
    if entry.split == QKV:
        # Whole query groups per rank: slice the global per-group layout.
        return _chunk(fuse_qkv(*tensors, arch), 0, tp_rank, tp_size)
    if entry.split == GATE_UP:
        gate, up = tensors
        return torch.cat([_chunk(gate, 0, tp_rank, tp_size), _chunk(up, 0, tp_rank, tp_size)], dim=0)
    raise AssertionError(entry.split)


def hf_from_shards(
    entry: WeightMapping, shards: Sequence[torch.Tensor], arch: Qwen3Arch
) -> tuple[torch.Tensor, ...]:
    """Full HF tensor(s) of one entry from its Megatron shards in TP-rank order (undoes fusion and padding)."""
    if entry.split == REPLICATED:
        return (shards[0],)
    if entry.split == ROW:
        return (torch.cat(list(shards), dim=1) if len(shards) > 1 else shards[0],)
    if entry.split == VOCAB:
        full = torch.cat(list(shards), dim=0) if len(shards) > 1 else shards[0]
        return (full[: arch.vocab_size],)
    if entry.split == QKV:
        full = torch.cat(list(shards), dim=0) if len(shards) > 1 else shards[0]
        return split_qkv(full, arch)
    if entry.split == GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return gate, up
    raise AssertionError(entry.split)


def _entries_for_stage(arch: Qwen3Arch, pre_process: bool, post_process: bool, with_tied_output: bool):
    """(entry, hf names) of the non-layer tensors a stage holds."""
    out = []
    if pre_process:
        out.append(EMBEDDING)
    if post_process:
        out.append(FINAL_NORM)
        if not arch.tie_word_embeddings:
            out.append(OUTPUT)
        elif with_tied_output and not pre_process:
            # A tied model's last stage keeps its own copy of the embedding as output layer.
            out.append(dataclasses.replace(OUTPUT, hf=EMBEDDING.hf))
    return out


def hf_to_megatron_shard(
    hf_weights: Mapping[str, torch.Tensor],
    architecture: Any,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    layer_spec: str = "local",
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
) -> dict[str, torch.Tensor]:
    """Megatron state dict (local names, local layer indices) of one TP rank / PP stage.

    ``hf_weights`` maps HF names to full tensors; it may be lazy (e.g.
    :class:`megatron_eopd.checkpoint.HFSafetensors`) since only this stage's tensors are read.
    ``architecture``: a :class:`Qwen3Arch` or a HF config (anything :func:`as_arch` takes).
    Layers are split evenly across stages, as Megatron does by default.
    """
    arch = as_arch(architecture)
    if arch.num_layers % pp_size:
        raise ValueError(f"PP={pp_size} does not divide num_hidden_layers={arch.num_layers}")
    per_stage = arch.num_layers // pp_size
    padded = padded_vocab_size(arch.vocab_size, tp_size, vocab_divisor)
    out: dict[str, torch.Tensor] = {}
    layer_entries = [e for e in QWEN3_MAPPING if e.place == LAYER]
    for local in range(per_stage):
        layer = pp_rank * per_stage + local
        for entry in layer_entries:
            tensors = [hf_weights[n] for n in entry.hf_names(layer)]
            name = f"{LAYER_PREFIX}{local}.{entry.megatron_name(layer_spec)}"
            out[name] = shard_from_hf(entry, tensors, arch, tp_rank, tp_size, padded)
    for entry in _entries_for_stage(arch, pp_rank == 0, pp_rank == pp_size - 1, with_tied_output=True):
        tensors = [hf_weights[n] for n in entry.hf_names(None)]
        out[entry.megatron_name(layer_spec)] = shard_from_hf(entry, tensors, arch, tp_rank, tp_size, padded)
    return out
