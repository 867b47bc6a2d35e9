"""Qwen3 dense models on Megatron-Core: architecture facts, model builder, the HF <-> Megatron
mapping table and the weight transfer into and out of live model chunks."""

from megatron_eopd.models.qwen3.architecture import (
    QWEN3_PRESETS,
    IncompatibleModelsError,
    Qwen3Arch,
    UnsupportedArchitectureError,
    as_arch,
    check_teacher_student_compatible,
    padded_vocab_size,
    parse_hf_config,
    validate_parallelism,
)
from megatron_eopd.models.qwen3.mapping import (
    QWEN3_MAPPING,
    MappingError,
    WeightMapping,
    expected_hf_shapes,
    hf_to_megatron_shard,
    validate_hf_tensor_set,
)
from megatron_eopd.models.qwen3.transfer import iter_hf_weights, load_hf_weights
from megatron_eopd.models.qwen3.model import (
    build_qwen3_gpt,
    default_layer_spec_name,
    qwen3_transformer_config,
)

__all__ = [
    "QWEN3_MAPPING",
    "QWEN3_PRESETS",
    "IncompatibleModelsError",
    "MappingError",
    "Qwen3Arch",
    "as_arch",
    "UnsupportedArchitectureError",
    "WeightMapping",
    "build_qwen3_gpt",
    "check_teacher_student_compatible",
    "default_layer_spec_name",
    "expected_hf_shapes",
    "hf_to_megatron_shard",
    "iter_hf_weights",
    "load_hf_weights",
    "padded_vocab_size",
    "parse_hf_config",
    "qwen3_transformer_config",
    "validate_hf_tensor_set",
    "validate_parallelism",
]
