"""The one HF <-> Megatron-Core mapping table for Qwen3, and the transforms that use it.

Every consumer goes through :data:`QWEN3_MAPPING`: the file converters, the in-memory loader
(:func:`hf_to_megatron_shard`, :func:`load_hf_weights`) and the streaming exporter
(:func:`iter_hf_weights`) that feeds vLLM every training iteration.

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
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from megatron_eopd.errors import EOPDError
from megatron_eopd.models.chunks import as_chunk_list, unwrap_model
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

_OUTPUT = QWEN3_MAPPING[-1]
_EMBEDDING = QWEN3_MAPPING[0]
_LAYER_PREFIX = "decoder.layers."
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


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
        out.append(_EMBEDDING)
    if post_process:
        out.append(QWEN3_MAPPING[-2])  # final norm
        if not arch.tie_word_embeddings:
            out.append(_OUTPUT)
        elif with_tied_output and not pre_process:
            # A tied model's last stage keeps its own copy of the embedding as output layer.
            out.append(dataclasses.replace(_OUTPUT, hf=_EMBEDDING.hf))
    return out


def hf_to_megatron_shard(
    hf_weights: Mapping[str, torch.Tensor],
    hf_config: Any,
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
    Layers are split evenly across stages, as Megatron does by default.
    """
    arch = as_arch(hf_config)
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
            name = f"{_LAYER_PREFIX}{local}.{entry.megatron_name(layer_spec)}"
            out[name] = shard_from_hf(entry, tensors, arch, tp_rank, tp_size, padded)
    for entry in _entries_for_stage(arch, pp_rank == 0, pp_rank == pp_size - 1, with_tied_output=True):
        tensors = [hf_weights[n] for n in entry.hf_names(None)]
        out[entry.megatron_name(layer_spec)] = shard_from_hf(entry, tensors, arch, tp_rank, tp_size, padded)
    return out


# --------------------------------------------------------------------------- model-chunk helpers


def _chunk_layer_spec(model: Any) -> str:
    spec = getattr(model, "eopd_layer_spec", None)
    if spec is not None:
        return spec
    names = {n for n, _ in model.named_parameters()}
    return "te" if any(n.endswith("linear_qkv.layer_norm_weight") for n in names) else "local"


def _chunk_arch(model: Any, hf_config: Any) -> Qwen3Arch:
    if hf_config is not None:
        return as_arch(hf_config)
    arch = getattr(model, "eopd_arch", None)
    if arch is None:
        raise ValueError("pass hf_config: this model was not built by build_qwen3_gpt")
    return arch


def _named_entries(model: Any, arch: Qwen3Arch) -> Iterator[tuple[WeightMapping, Optional[int], str, torch.Tensor]]:
    """(entry, global layer or None, local name, parameter) for every parameter of one chunk."""
    spec = _chunk_layer_spec(model)
    by_suffix = {e.megatron_name(spec): e for e in QWEN3_MAPPING if e.place == LAYER}
    by_name = {e.megatron_name(spec): e for e in QWEN3_MAPPING if e.place != LAYER}
    from megatron_eopd.platform.mcore_compat import layer_global_index

    for name, param in model.named_parameters():
        match = _LAYER_NAME.match(name)
        if match:
            entry = by_suffix.get(match.group(2))
            layer = layer_global_index(model.decoder.layers[int(match.group(1))])
        else:
            entry, layer = by_name.get(name), None
        if entry is None:
            raise MappingError(f"Megatron parameter {name!r} has no entry in the Qwen3 mapping table")
        yield entry, layer, name, param


def load_hf_weights(
    model_chunks: Any,
    hf_weights: Mapping[str, torch.Tensor],
    hf_config: Any = None,
    *,
    progress: Optional[Callable[[str], None]] = None,
) -> None:
    """Copy HF weights into this rank's model chunk(s), under Megatron's current TP state.

    Works for any PP/VPP layout: each layer's global index is read from the model itself.
    ``hf_weights`` may be lazy; only the tensors this rank holds are read.
    ``progress(name)`` is called after each parameter.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    chunks = as_chunk_list(model_chunks)
    for chunk in chunks:
        model = unwrap_model(chunk)
        arch = _chunk_arch(model, hf_config)
        padded = model.vocab_size
        for entry, layer, name, param in _named_entries(model, arch):
            hf_names = entry.hf_names(layer)
            if entry is _OUTPUT and arch.tie_word_embeddings:
                hf_names = _EMBEDDING.hf_names(None)
            shard = shard_from_hf(entry, [hf_weights[n] for n in hf_names], arch, tp_rank, tp_size, padded)
            if tuple(shard.shape) != tuple(param.shape):
                raise MappingError(f"{name}: shard shape {list(shard.shape)} != parameter {list(param.shape)}")
            with torch.no_grad():
                param.copy_(shard)
            if progress is not None:
                progress(name)


# --------------------------------------------------------------------------- Megatron -> HF (streaming)


def _order_key(entry: WeightMapping, layer: Optional[int]) -> tuple[int, int, int]:
    index = QWEN3_MAPPING.index(entry)
    if entry.place == FIRST_STAGE:
        return (0, 0, index)
    if entry.place == LAYER:
        return (1, layer, index)
    return (2, 0, index)


def iter_hf_weights(
    model_chunks: Any,
    hf_config: Any = None,
    *,
    to_rank: Optional[int] = 0,
    dtype: Optional[torch.dtype] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the full HF-named weights of a TP/PP-sharded Qwen3, one tensor at a time.

    Call it on **every rank** of the model-parallel group and run the iterator to the end on each
    (it issues collectives; ranks that receive nothing still have to drive it).

    ``to_rank``: the rank, *within this replica's tensor x pipeline group*, numbered
    ``pp_rank * tp_size + tp_rank``, that receives the tensors (0 = first TP rank of the first
    stage, which is global rank 0 for data-parallel replica 0); every other rank yields nothing.
    ``None``: every rank yields every tensor.  Data-parallel replicas each run their own stream.

    Tensors come in HF order (embedding, layers 0..L-1, final norm, lm head), on the model's
    device, with vocabulary padding stripped and per-rank fusion undone.  They may share storage
    with the model's parameters: copy before modifying.  ``dtype`` casts them (default: as stored).
    A tied model yields no ``lm_head.weight``, as HF saves it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    chunks = as_chunk_list(model_chunks)
    models = [unwrap_model(c) for c in chunks]
    arch = _chunk_arch(models[0], hf_config)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
    pp_group = parallel_state.get_pipeline_model_parallel_group() if pp_size > 1 else None
    if to_rank is not None and not 0 <= to_rank < tp_size * pp_size:
        raise ValueError(f"to_rank={to_rank} is outside the TPxPP group of {tp_size * pp_size} ranks")

    local: dict[tuple, tuple[WeightMapping, Optional[int], torch.Tensor]] = {}
    for model in models:
        for entry, layer, _name, param in _named_entries(model, arch):
            if entry is _OUTPUT and arch.tie_word_embeddings:
                continue  # the last stage's copy of a tied embedding
            local[_order_key(entry, layer)] = (entry, layer, param)

    # Which stage owns which tensor, and its dtype: one small exchange per call.
    my_keys = sorted(local)
    dtype_name = str(next(iter(local.values()))[2].dtype) if local else None
    if pp_group is not None:
        gathered: list = [None] * pp_size
        dist.all_gather_object(gathered, (my_keys, dtype_name), group=pp_group)
    else:
        gathered = [(my_keys, dtype_name)]
    owner = {key: stage for stage, (keys, _) in enumerate(gathered) for key in keys}
    wire_dtype = getattr(torch, next(d for _, d in gathered if d).split(".")[-1])
    device = next(iter(local.values()))[2].device if local else torch.device("cpu")
    hf_shapes = expected_hf_shapes(arch)
    dst_stage, dst_tp = (None, None) if to_rank is None else divmod(to_rank, tp_size)
    i_receive = to_rank is None or (pp_rank == dst_stage and tp_rank == dst_tp)

    for key in sorted(owner):
        stage = owner[key]
        entry, layer = QWEN3_MAPPING[key[2]], (key[1] if key[0] == 1 else None)
        names = entry.hf_names(layer)
        tensors: Optional[tuple[torch.Tensor, ...]] = None
        if stage == pp_rank:
            param = local[key][2].detach()
            if tp_group is not None and entry.split != REPLICATED:
                shards = [torch.empty_like(param) for _ in range(tp_size)]
                dist.all_gather(shards, param.contiguous(), group=tp_group)
            else:
                shards = [param]
            tensors = hf_from_shards(entry, shards, arch)
        if pp_group is not None and (to_rank is None or stage != dst_stage):
            tensors = _move_across_stages(tensors, names, hf_shapes, stage, pp_rank, dst_stage, dst_tp,
                                          tp_rank, pp_group, wire_dtype, device)
        if i_receive:
            for name, tensor in zip(names, tensors):
                yield name, (tensor if dtype is None else tensor.to(dtype))


def _move_across_stages(tensors, names, hf_shapes, src_stage, pp_rank, dst_stage, dst_tp, tp_rank,
                        pp_group, wire_dtype, device):
    """Broadcast from the owner stage (to_rank=None) or send it to the one destination rank."""
    import torch.distributed as dist

    src_global = dist.get_global_rank(pp_group, src_stage)
    if dst_stage is None:
        out = []
        for i, name in enumerate(names):
            buf = tensors[i].contiguous() if pp_rank == src_stage else torch.empty(
                hf_shapes[name], dtype=wire_dtype, device=device)
            dist.broadcast(buf, src=src_global, group=pp_group)
            out.append(buf)
        return tuple(out)
    if tp_rank != dst_tp:
        return tensors  # this pipeline group is not on the path to the destination
    dst_global = dist.get_global_rank(pp_group, dst_stage)
    if pp_rank == src_stage:
        for tensor in tensors:
            dist.send(tensor.contiguous(), dst=dst_global, group=pp_group)
        return tensors
    if pp_rank == dst_stage:
        out = []
        for name in names:
            buf = torch.empty(hf_shapes[name], dtype=wire_dtype, device=device)
            dist.recv(buf, src=src_global, group=pp_group)
            out.append(buf)
        return tuple(out)
    return tensors
