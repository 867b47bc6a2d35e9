"""Build a Megatron-Core ``GPTModel`` that computes exactly what HF ``Qwen3ForCausalLM`` computes."""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_eopd.models.qwen3.architecture import (
    DEFAULT_VOCAB_DIVISOR,
    Qwen3Arch,
    padded_vocab_size,
    parse_hf_config,
    validate_parallelism,
)
from megatron_eopd.platform import mcore_compat

LAYER_SPEC_TE = "te"
LAYER_SPEC_LOCAL = "local"


def default_layer_spec_name() -> str:
    """``"te"`` when transformer-engine is importable, else ``"local"``."""
    return LAYER_SPEC_TE if mcore_compat.have_transformer_engine() else LAYER_SPEC_LOCAL


def qwen3_transformer_config(
    arch: Qwen3Arch,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.bfloat16,
    **overrides: Any,
):
    """The ``TransformerConfig`` of a Qwen3 model at the given TP/PP."""
    on_cpu = not torch.cuda.is_available()
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
        use_cpu_initialization=on_cpu,
        # Fused kernels exist only on GPU.
        bias_dropout_fusion=not on_cpu,
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu,
        persist_layer_norm=not on_cpu,
        apply_rope_fusion=not on_cpu,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    return mcore_compat.transformer_config(**kwargs)


def build_qwen3_gpt(
    hf_config: Any,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype: torch.dtype = torch.bfloat16,
    layer_spec: Optional[str] = None,
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
    vp_stage: Optional[int] = None,
    **config_overrides: Any,
):
    """Build this rank's ``GPTModel`` chunk of a Qwen3 model under Megatron's current parallel state.

    ``hf_config``: a HF config (dict, directory, path, ``PretrainedConfig``) or a :class:`Qwen3Arch`.
    ``pre_process``/``post_process`` default to "this rank is the first/last pipeline stage".
    ``layer_spec``: ``"te"`` or ``"local"``; default TE when importable.  Extra keyword arguments
    override ``TransformerConfig`` fields (e.g. ``perform_initialization=False`` before loading).
    The vocabulary is padded to :func:`padded_vocab_size` rows; padded logits must be ignored.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    arch = hf_config if isinstance(hf_config, Qwen3Arch) else parse_hf_config(hf_config)
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
    config = qwen3_transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype, **config_overrides)
    spec = mcore_compat.gpt_layer_spec(use_te=spec_name == LAYER_SPEC_TE, qk_layernorm=True)
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
    # Remembered so the mapping and exporter need nothing but the model chunk.
    model.eopd_arch = arch
    model.eopd_layer_spec = spec_name
    model.eopd_padded_vocab = padded
    return model
