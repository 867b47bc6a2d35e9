"""Build a Megatron-Core ``GPTModel`` that computes exactly what HF ``Qwen3ForCausalLM`` computes."""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_eopd.models.qwen3.architecture import (
    DEFAULT_VOCAB_DIVISOR,
    Qwen3Arch,
    as_arch,
    padded_vocab_size,
    validate_parallelism,
)
from megatron_eopd.platform import mcore_compat

LAYER_SPEC_TE = "te"
LAYER_SPEC_LOCAL = "local"
# Core attention of the local spec: torch SDPA (default) or Megatron's DotProductAttention.
ATTENTION_SDPA = "sdpa"
ATTENTION_MEGATRON = "megatron"
# Activation recomputation: "none" keeps every layer's activations for backward; "full" keeps only
# each transformer layer's input and runs the layer again in backward (about one more forward pass
# of compute for a fraction of the activation memory).
RECOMPUTE_NONE = "none"
RECOMPUTE_FULL = "full"
RECOMPUTE_MODES = (RECOMPUTE_NONE, RECOMPUTE_FULL)


def default_layer_spec_name() -> str:
    """``"te"`` when transformer-engine is importable, else ``"local"``."""
    return LAYER_SPEC_TE if mcore_compat.have_transformer_engine() else LAYER_SPEC_LOCAL


def fusion_flags(device: torch.device) -> dict[str, bool]:
    """Megatron-Core's fusion switches for a Qwen3 model on ``device``, from what actually works.

    Each flag is on only when its kernel is installed (:func:`mcore_compat.fused_kernels_available`)
    and the model runs on CUDA (the kernels are CUDA kernels; on CPU ``torch.compile`` would only
    add compile time).  ``persist_layer_norm`` stays off even with apex: it is apex's *LayerNorm*
    kernel, Qwen3 uses RMSNorm (torch's in the local spec, which refuses the flag; TE's otherwise).
    """
    available = mcore_compat.fused_kernels_available()
    on_cuda = torch.device(device).type == "cuda"
    uses_layer_norm = False  # RMSNorm
    return {
        "apply_rope_fusion": on_cuda and available["rope_fusion"],
        "persist_layer_norm": on_cuda and available["persist_layer_norm"] and uses_layer_norm,
        "masked_softmax_fusion": on_cuda and available["masked_softmax_fusion"],
        "bias_dropout_fusion": on_cuda and available["jit_fusion"],
        "bias_activation_fusion": on_cuda and available["jit_fusion"],
    }


def recompute_overrides(mode: str) -> dict[str, Any]:
    """``TransformerConfig`` fields for activation recomputation ``mode`` (see :data:`RECOMPUTE_MODES`).

    ``"full"`` is Megatron's full granularity with the uniform method over one layer at a time: each
    layer's input is the only activation kept, the layer is re-run under the saved RNG state in
    backward, so gradients are exactly those without recomputation.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {list(RECOMPUTE_MODES)}, got {mode!r}")
    if mode == RECOMPUTE_NONE:
        return {}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def local_layer_spec(attention_backend: str = ATTENTION_SDPA):
    """Megatron's local (transformer-engine-free) Qwen3 layer spec with the chosen core attention.

    ``"sdpa"``: :class:`megatron_eopd.models.attention.SDPAttention` (torch's fused attention
    kernels, no ``[b, heads, s, s]`` score matrix); ``"megatron"``: Megatron's own
    ``DotProductAttention``, kept for comparisons.  Neither has parameters, so both specs have
    the same parameter names and load the same checkpoints.
    """
    if attention_backend not in (ATTENTION_SDPA, ATTENTION_MEGATRON):
        raise ValueError(f"attention_backend must be {ATTENTION_SDPA!r} or {ATTENTION_MEGATRON!r}, "
                         f"got {attention_backend!r}")
    spec = mcore_compat.gpt_layer_spec(use_te=False, qk_layernorm=True)
    if attention_backend == ATTENTION_SDPA:
        from megatron_eopd.models.attention import SDPAttention

        attention = getattr(getattr(spec, "submodules", None), "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is None or not hasattr(submodules, "core_attention"):
            raise RuntimeError("this megatron-core's local GPT layer spec has no "
                               "submodules.self_attention.submodules.core_attention to replace")
        submodules.core_attention = SDPAttention
    return spec


def qwen3_transformer_config(
    arch: Qwen3Arch,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.bfloat16,
    device: Optional[torch.device] = None,
    **overrides: Any,
):
    """The ``TransformerConfig`` of a Qwen3 model at the given TP/PP, to be built on ``device``
    (default: :func:`megatron_eopd.platform.default_device`)."""
    from megatron_eopd.platform import distributed as platform_dist

    device = torch.device(device) if device is not None else platform_dist.default_device()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,  # Qwen3's head_dim is explicit (not hidden/heads)
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Megatron otherwise allocates weights on torch.cuda.current_device().
        use_cpu_initialization=device.type == "cpu",
        gradient_accumulation_fusion=False,
        **fusion_flags(device),
    )
    kwargs.update(overrides)
    if kwargs.get("apply_rope_fusion"):
        from megatron_eopd.models import rope  # imports Triton: only when the fusion is asked for

        rope.ensure_fused_rope()  # TE's kernel, or ours where TE is absent
    return mcore_compat.transformer_config(**kwargs)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> int:
    """Give the weights of Megatron's vocab/column/row-parallel layers their ``tensor_model_parallel`` marks.

    Megatron-Core sets ``tensor_model_parallel``/``partition_dim`` only inside its initialisers, so a
    model built with ``perform_initialization=False`` (to be loaded) has TP shards that look like
    replicas.  The optimizer then counts only TP rank 0's shard in the gradient norm, and gradient
    clipping under TP scales by a wrong norm.  Marks only weights that have no mark yet; returns
    how many it marked.
    """
    from megatron.core.tensor_parallel import layers

    dims = ((layers.VocabParallelEmbedding, 0), (layers.ColumnParallelLinear, 0), (layers.RowParallelLinear, 1))
    marked = 0
    for module in model.modules():
        for kind, dim in dims:
            weight = getattr(module, "weight", None) if isinstance(module, kind) else None
            if isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
                # What Megatron's initialisers set (layer strides are 1 in the Qwen3 specs).
                weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1
                marked += 1
    return marked


def build_qwen3_gpt(
    architecture: Any,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype: torch.dtype = torch.bfloat16,
    layer_spec: Optional[str] = None,
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
    vp_stage: Optional[int] = None,
    attention_backend: Optional[str] = None,
    recompute: str = RECOMPUTE_NONE,
    **config_overrides: Any,
):
    """Build this rank's ``GPTModel`` chunk of a Qwen3 model under Megatron's current parallel state.

    ``architecture``: a :class:`Qwen3Arch`, or a HF config (dict, directory, path, ``PretrainedConfig``).
    ``pre_process``/``post_process`` default to "this rank is the first/last pipeline stage".
    ``layer_spec``: ``"te"`` or ``"local"``; default TE when importable.  ``attention_backend``
    (local spec only): ``"sdpa"`` (default) or ``"megatron"``, see :func:`local_layer_spec`; the TE
    spec always uses transformer-engine's attention.  ``recompute``: activation recomputation in
    training, ``"none"`` or ``"full"`` (:func:`recompute_overrides`).  Extra keyword arguments
    override ``TransformerConfig`` fields (e.g. ``perform_initialization=False`` before loading).
    The vocabulary is padded to :func:`padded_vocab_size` rows; padded logits must be ignored.

    The model comes back on :func:`megatron_eopd.platform.default_device` with every parameter in
    ``params_dtype`` (norms included, as Megatron's Float16Module would cast them), unwrapped.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_eopd.platform import distributed as platform_dist

    arch = as_arch(architecture)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    padded = padded_vocab_size(arch.vocab_size, tp, vocab_divisor)
    validate_parallelism(arch, tp, pp, padded)
    stage_kwargs = {"ignore_virtual": False, "vp_stage": vp_stage} if vp_stage is not None else {}
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(**stage_kwargs)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(**stage_kwargs)
    spec_name = layer_spec or default_layer_spec_name()
    if spec_name not in (LAYER_SPEC_TE, LAYER_SPEC_LOCAL):
        raise ValueError(f"layer_spec must be 'te' or 'local', got {spec_name!r}")
    device = platform_dist.default_device()
    config = qwen3_transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype, device=device,
                                      **{**recompute_overrides(recompute), **config_overrides})
    if spec_name == LAYER_SPEC_TE:
        if attention_backend is not None:
            raise ValueError(f"attention_backend={attention_backend!r} applies to the local layer spec only; "
                             "the TE spec uses transformer-engine's attention")
        spec = mcore_compat.gpt_layer_spec(use_te=True, qk_layernorm=True)
    else:
        attention_backend = attention_backend or ATTENTION_SDPA
        spec = local_layer_spec(attention_backend)
    extra = {"vp_stage": vp_stage} if vp_stage is not None else {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        **extra,
    )
    # The local spec's torch norms are created fp32 on the default (CPU) device, whatever the config says.
    model.to(device=device, dtype=params_dtype)
    if not config.perform_initialization:
        mark_tensor_parallel_weights(model)
    # Remembered so the mapping and exporter need nothing but the model chunk.
    model.eopd_arch = arch
    model.eopd_layer_spec = spec_name
    model.eopd_attention_backend = LAYER_SPEC_TE if spec_name == LAYER_SPEC_TE else attention_backend
    model.eopd_padded_vocab = padded
    return model
