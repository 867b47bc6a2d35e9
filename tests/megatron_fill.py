"""Deterministic weights defined on each parameter's *global* coordinates.

A Megatron model at any TP/PP layout filled by :func:`fill_by_global_coordinates` holds the very
same function as the TP=1, PP=1 model filled the same way, so layouts can be compared exactly
without any conversion code.  Used to check the platform layer independently of the mapping table.
"""

from __future__ import annotations

import re
import zlib

import torch

_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def _global_name(name: str, layer_offset: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}", name)


def _full_values(global_name: str, shape: tuple[int, ...], is_norm_weight: bool) -> torch.Tensor:
    numel = 1
    for dim in shape:
        numel *= dim
    phase = (zlib.crc32(global_name.encode()) % 10_000) / 997.0
    idx = torch.arange(numel, dtype=torch.float64)
    values = torch.sin(idx * 0.7311 + phase) * 0.08
    if is_norm_weight:
        values = 1.0 + values  # keep norms near identity so activations stay well-scaled
    return values.reshape(shape)


@torch.no_grad()
def fill_by_global_coordinates(model: torch.nn.Module, tp_rank: int, tp_size: int, layer_offset: int) -> None:
    for name, param in model.named_parameters():
        global_name = _global_name(name, layer_offset)
        shape = list(param.shape)
        dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
        if dim >= 0:
            shape[dim] *= tp_size
        is_norm = "norm" in name and name.endswith("weight")
        full = _full_values(global_name, tuple(shape), is_norm)
        if dim >= 0:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(full.to(param.dtype))


def full_tensor_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of a TP=1 tensor that ``param``'s shard holds on ``tp_rank``."""
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) >= 0:
        return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
    return full
