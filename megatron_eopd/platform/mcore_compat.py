"""The one place that knows about differences between Megatron-Core releases (0.16 - 0.19).

Callers ask for what they need (a layer spec, a config) and this module adapts to the installed
version.  Keep it small: add a shim only when a difference actually bites.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import warnings
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def have_transformer_engine() -> bool:
    """True when transformer-engine imports (optional accelerator, never required)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is the same as none
        return False
    return True


def _imports(module: str) -> bool:
    """True when ``module`` imports; a missing or broken extension counts as absent."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - ImportError, OSError from a bad .so, a CUDA init error, ...
        return False
    return True


# Megatron's FusedScaleMaskSoftmax imports one of these per call, chosen by the mask type.
SOFTMAX_EXTENSIONS = (
    "scaled_masked_softmax_cuda",
    "scaled_upper_triang_masked_softmax_cuda",
    "scaled_softmax_cuda",
)


def te_fused_rope() -> bool:
    """Whether transformer-engine's fused RoPE is what ``rope_utils`` holds for ``apply_rope_fusion``."""
    if not have_transformer_engine():
        return False
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except Exception:  # noqa: BLE001
        return False
    # The very check TransformerConfig.__post_init__ makes for apply_rope_fusion.
    return (getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
            or getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None)


@functools.lru_cache(maxsize=None)
def fused_kernels_available() -> dict[str, bool]:
    """Which of Megatron-Core's optional fused kernels this installation can actually run.

    - ``rope_fusion``: fused RoPE for ``apply_rope_fusion``, transformer-engine's or this project's
      Triton kernel (see :func:`megatron_eopd.models.rope.ensure_fused_rope`);
    - ``persist_layer_norm``: apex's persistent LayerNorm (``apex.contrib.layer_norm``);
    - ``masked_softmax_fusion``: Megatron's compiled softmax extensions (:data:`SOFTMAX_EXTENSIONS`),
      which the megatron-core wheel does not ship;
    - ``jit_fusion``: GPU code generation for Megatron's ``jit_fuser`` (``torch.compile``), i.e.
      Triton, used by the bias-dropout-add and bias-activation fusions.

    All are CUDA kernels; whether to use them on a given device is the caller's decision.
    """
    return {
        "rope_fusion": te_fused_rope() or _imports("triton"),
        "persist_layer_norm": _imports("apex.contrib.layer_norm.layer_norm"),
        "masked_softmax_fusion": all(_imports(m) for m in SOFTMAX_EXTENSIONS),
        "jit_fusion": _imports("triton"),
    }


def torch_adam_optimizers(optimizer) -> list:
    """The ``torch.optim.Adam``/``AdamW`` instances inside a Megatron optimizer (chained or not)."""
    members = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = [getattr(member, "optimizer", member) for member in members]
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def fuse_torch_adam(optimizer) -> int:
    """Have Megatron's fallback to torch's Adam(W) run torch's fused kernel; returns the groups switched.

    Megatron-Core takes transformer-engine's or apex's fused Adam when one imports, and otherwise
    torch's Adam(W) with its defaults: on CPU tensors that is the per-tensor loop, about ten
    elementwise passes over every tensor (3.2 s a step for Qwen3-0.6B's 151,936 x 1024 embedding on
    2 cores; 0.17 s fused).  torch's fused kernel computes the same update (up to rounding) on every
    device it lists as supported; a group already set to foreach or fused is left as it is.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    switched = 0
    for torch_optimizer in torch_adam_optimizers(optimizer):
        for group in torch_optimizer.param_groups:
            params = group["params"]
            if group.get("fused") or group.get("foreach") or group.get("differentiable") or not params:
                continue
            if not all(p.device.type in supported and p.is_floating_point() for p in params):
                continue
            group["fused"] = True
            switched += 1
    return switched


def describe_accelerators(device_type: str) -> str:
    """One line saying which optional accelerators are absent and what runs instead on ``device_type``.

    Megatron-Core warns about each absent one at every import site; this states it once.
    """
    triton = _imports("triton")
    if have_transformer_engine():
        parts = ["transformer-engine: layer spec, fused RoPE and norms"]
    else:
        parts = ["transformer-engine absent: Megatron-Core's local layer spec with torch SDPA attention"
                 + (", this project's Triton RoPE" if device_type == "cuda" and triton else "")]
    adam = "transformer-engine's fused Adam" if have_transformer_engine() else "torch's fused AdamW"
    parts.append("apex: fused optimizer and norms" if _imports("apex") else f"apex absent: torch RMSNorm, {adam}")
    if device_type == "cuda":
        parts.append("Triton: fused loss kernels" if triton else "Triton absent: the loss's torch path")
    else:
        parts.append("CPU: torch kernels throughout")
    return "optional accelerators - " + "; ".join(parts)


def _call_with_supported_kwargs(fn, **kwargs):
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


def gpt_layer_spec(*, use_te: bool, qk_layernorm: bool = True, normalization: str = "RMSNorm"):
    """Megatron's GPT layer spec: transformer-engine modules or the local (pure Megatron) ones."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return _call_with_supported_kwargs(
            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec, qk_layernorm=qk_layernorm
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed. Falling back to Torch Norm"
        return _call_with_supported_kwargs(
            gpt_layer_specs.get_gpt_layer_local_spec,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
        )


def transformer_config(**kwargs: Any):
    """``TransformerConfig(**kwargs)`` minus fields this release does not define.

    Fields that only tune fusions come and go between releases; dropping an unknown one is safe.
    Fields that change the maths must exist, so those are checked.
    """
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    required = {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "ffn_hidden_size", "normalization", "qk_layernorm", "gated_linear_unit"}
    missing = sorted((required & set(kwargs)) - known)
    if missing:
        raise RuntimeError(f"this megatron-core lacks TransformerConfig fields {missing}")
    return TransformerConfig(**{k: v for k, v in kwargs.items() if k in known})


def layer_global_index(layer) -> int:
    """0-based global index of a ``TransformerLayer`` (its ``layer_number`` is 1-based and global)."""
    return int(layer.layer_number) - 1
