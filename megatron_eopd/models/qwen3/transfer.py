"""Qwen3 weights into and out of live Megatron model chunks, through the mapping table.

:func:`load_hf_weights` copies HF tensors into this rank's parameters (any TP/PP/VPP layout; the
global layer index is read off the model); :func:`iter_hf_weights` streams a sharded model back as
full HF-named tensors, gathering TP shards and moving tensors across pipeline stages, for the
exporter and the weight sync to vLLM.  What each tensor *is* on either side (names, splits,
fusions, padding) is :mod:`megatron_eopd.models.qwen3.mapping`; this module only moves it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from megatron_eopd.models.chunks import as_chunk_list, unwrap_model
from megatron_eopd.models.qwen3.architecture import Qwen3Arch, as_arch
from megatron_eopd.models.qwen3.mapping import (
    EMBEDDING,
    FIRST_STAGE,
    LAYER,
    LAYER_NAME,
    OUTPUT,
    QWEN3_MAPPING,
    QKV,
    REPLICATED,
    VOCAB,
    MappingError,
    WeightMapping,
    expected_hf_shapes,
    hf_from_shards,
    shard_from_hf,
)
from megatron_eopd.platform.mcore_compat import layer_global_index


# --------------------------------------------------------------------------- model-chunk helpers


def _chunk_layer_spec(model: Any) -> str:
    spec = getattr(model, "eopd_layer_spec", None)
    if spec is not None:
        return spec
    names = {n for n, _ in model.named_parameters()}
    return "te" if any(n.endswith("linear_qkv.layer_norm_weight") for n in names) else "local"


def _chunk_arch(model: Any, architecture: Any) -> Qwen3Arch:
    """``architecture`` (a :class:`Qwen3Arch` or a HF config) when given, else the one the builder recorded."""
    if architecture is not None:
        return as_arch(architecture)
    arch = getattr(model, "eopd_arch", None)
    if arch is None:
        raise ValueError("pass architecture: this model was not built by build_qwen3_gpt")
    return arch


def _named_entries(model: Any, arch: Qwen3Arch) -> Iterator[tuple[WeightMapping, Optional[int], str, torch.Tensor]]:
    """(entry, global layer or None, local name, parameter) for every parameter of one chunk."""
    spec = _chunk_layer_spec(model)
    by_suffix = {e.megatron_name(spec): e for e in QWEN3_MAPPING if e.place == LAYER}
    by_name = {e.megatron_name(spec): e for e in QWEN3_MAPPING if e.place != LAYER}
    for name, param in model.named_parameters():
        match = LAYER_NAME.match(name)
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
    architecture: Any = None,
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
        arch = _chunk_arch(model, architecture)
        padded = model.vocab_size
        for entry, layer, name, param in _named_entries(model, arch):
            hf_names = entry.hf_names(layer)
            if entry is OUTPUT and arch.tie_word_embeddings:
                hf_names = EMBEDDING.hf_names(None)
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
    architecture: Any = None,
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
    arch = _chunk_arch(models[0], architecture)
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
            if entry is OUTPUT and arch.tie_word_embeddings:
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
                # Only the TP rank on the path to the receiver assembles the full tensor: the
                # others would hold it (and its shards) for nothing, 2.3 GiB at a time for an
                # 8B's embedding.
                on_path = to_rank is None or tp_rank == dst_tp
                full, shards = _receive_buffers(entry, param, tp_size) if on_path else (None, None)
                if to_rank is None and full is not None:
                    dist.all_gather_into_tensor(full, param.contiguous(), group=tp_group)
                elif to_rank is None:
                    dist.all_gather(shards, param.contiguous(), group=tp_group)
                else:
                    _gather_to(shards, param, tp_rank, dst_tp, tp_group)
                if full is not None:
                    shards = [full]  # the shards landed in place: the buffer is their concatenation
            else:
                shards = [param]
            tensors = hf_from_shards(entry, shards, arch) if shards is not None else None
        if pp_group is not None and (to_rank is None or stage != dst_stage):
            tensors = _move_across_stages(tensors, names, hf_shapes, stage, pp_rank, dst_stage, dst_tp,
                                          tp_rank, pp_group, wire_dtype, device)
        if i_receive:
            for name, tensor in zip(names, tensors):
                yield name, (tensor if dtype is None else tensor.to(dtype))


# Splits whose TP shards are consecutive row blocks of the full tensor: gathered straight into one
# buffer, they need no concatenation, which for an embedding would be a second full copy (1.2 GiB
# for an 8B's, on top of the rank's own shard, while converting).
ROW_STACKED = (VOCAB, QKV)


def _receive_buffers(entry: WeightMapping, param: torch.Tensor,
                     tp_size: int) -> tuple[Optional[torch.Tensor], list[torch.Tensor]]:
    """Buffers for ``tp_size`` shards like ``param``: (the full tensor they are row blocks of, or None; the shards)."""
    if entry.split not in ROW_STACKED:
        return None, [torch.empty_like(param) for _ in range(tp_size)]
    full = torch.empty((tp_size * param.shape[0], *param.shape[1:]), dtype=param.dtype, device=param.device)
    return full, list(full.split(param.shape[0], dim=0))


def _gather_to(shards: Optional[list[torch.Tensor]], param: torch.Tensor, tp_rank: int, dst_tp: int,
               tp_group: Any) -> None:
    """The TP shards of ``param`` into ``shards`` on TP rank ``dst_tp`` (``shards`` is None elsewhere).

    Point to point rather than ``dist.gather``: gloo's gather receives into one flat buffer of all the
    shards and copies out of it, a second full tensor (1.2 GiB for an 8B's embedding) that made the
    receiving rank of a 2-rank 8B export peak at 1.36x its shard.  ``recv`` writes into each buffer.
    """
    import torch.distributed as dist

    if tp_rank != dst_tp:
        dist.send(param.contiguous(), dst=dist.get_global_rank(tp_group, dst_tp), group=tp_group)
        return
    for source, shard in enumerate(shards):
        if source == tp_rank:
            shard.copy_(param)
        else:
            dist.recv(shard, src=dist.get_global_rank(tp_group, source), group=tp_group)


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
