"""Qwen3 presets, HF config parsing/validation and the mapping transforms (no Megatron, no process group)."""

from __future__ import annotations

import pytest
import torch

from megatron_eopd.models.qwen3 import (
    QWEN3_MAPPING,
    QWEN3_PRESETS,
    IncompatibleModelsError,
    Qwen3Arch,
    UnsupportedArchitectureError,
    check_teacher_student_compatible,
    expected_hf_shapes,
    hf_to_megatron_shard,
    padded_vocab_size,
    parse_hf_config,
    validate_parallelism,
)
from megatron_eopd.models.qwen3.mapping import hf_from_shards

# Published totals (Qwen3 model cards): total, non-embedding, in billions, to the cards' precision.
PUBLISHED = {
    "Qwen3-0.6B": (0.6, 0.44),
    "Qwen3-1.7B": (1.7, 1.4),
    "Qwen3-4B": (4.0, 3.6),
    "Qwen3-8B": (8.2, 6.95),
}
# Exact counts from the architecture (checked by hand against the HF safetensors sizes).
EXACT_TOTALS = {
    "Qwen3-0.6B": 596_049_920,
    "Qwen3-1.7B": 1_720_574_976,
    "Qwen3-4B": 4_022_468_096,
    "Qwen3-8B": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_parameter_counts(name):
    arch = QWEN3_PRESETS[name]
    total, non_embedding = PUBLISHED[name]
    digits = len(str(non_embedding).split(".")[1])
    assert round(arch.total_parameters() / 1e9, 1) == total
    assert round(arch.non_embedding_parameters() / 1e9, digits) == non_embedding
    assert arch.total_parameters() == EXACT_TOTALS[name]
    assert sum(torch.Size(s).numel() for s in expected_hf_shapes(arch).values()) == arch.total_parameters()
    assert arch.vocab_size == 151_936 and arch.rope_theta == 1e6 and arch.rms_norm_eps == 1e-6
    assert arch.max_position_embeddings == 40_960
    assert arch.tie_word_embeddings == (name != "Qwen3-8B")


def test_preset_round_trips_through_hf_config():
    for arch in QWEN3_PRESETS.values():
        assert parse_hf_config(arch.to_hf_config()) == arch


def test_parse_reads_transformers_5_rope_parameters():
    cfg = QWEN3_PRESETS["Qwen3-0.6B"].to_hf_config()
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert parse_hf_config(cfg).rope_theta == 5e5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
        ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "unsupported architecture"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"use_sliding_window": True}, "sliding_window"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    cfg = QWEN3_PRESETS["Qwen3-0.6B"].to_hf_config()
    cfg.update(change)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        parse_hf_config(cfg)


def test_teacher_student_vocabulary_mismatch_is_refused():
    student = QWEN3_PRESETS["Qwen3-1.7B"]
    teacher = QWEN3_PRESETS["Qwen3-8B"]
    check_teacher_student_compatible(student, teacher)  # sizes differ, vocabulary shared: fine
    other = teacher.to_hf_config()
    other["vocab_size"] = 152_064
    with pytest.raises(IncompatibleModelsError, match=r"student vocab_size=151936, teacher vocab_size=152064"):
        check_teacher_student_compatible(student, other)


def test_vocab_padding_is_independent_of_tp():
    assert padded_vocab_size(301, 1) == padded_vocab_size(301, 2) == padded_vocab_size(301, 8) == 384
    assert padded_vocab_size(151_936, 4) == 151_936
    assert padded_vocab_size(152_064, 8) == 152_064


@pytest.mark.parametrize(
    "tp, pp, message",
    [(3, 1, "TP=3 does not divide num_attention_heads=16"), (16, 1, "num_key_value_heads=8"),
     (1, 5, "PP=5 does not divide num_hidden_layers=28")],
)
def test_parallelism_validation_names_the_dimension(tp, pp, message):
    with pytest.raises(ValueError, match=message):
        validate_parallelism(QWEN3_PRESETS["Qwen3-0.6B"], tp, pp)


TINY = Qwen3Arch(64, 2, 4, 2, 32, 96, 301, tie_word_embeddings=False, max_position_embeddings=64)


def _random_hf(arch: Qwen3Arch, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in expected_hf_shapes(arch).items()}


def test_qkv_fusion_follows_megatron_group_order():
    """linear_qkv rows are [q of group 0, k0, v0, q of group 1, k1, v1]."""
    arch = TINY
    hf = _random_hf(arch)
    d, h = arch.head_dim, arch.hidden_size
    fused = hf_to_megatron_shard(hf, arch, tp_rank=0, tp_size=1)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = hf["model.layers.0.self_attn.q_proj.weight"].view(arch.num_attention_heads, d, h)
    k = hf["model.layers.0.self_attn.k_proj.weight"].view(arch.num_kv_heads, d, h)
    v = hf["model.layers.0.self_attn.v_proj.weight"].view(arch.num_kv_heads, d, h)
    expected = []
    for g in range(arch.num_kv_heads):
        expected += [q[2 * g], q[2 * g + 1], k[g], v[g]]
    assert torch.equal(fused, torch.cat(expected))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_shard_then_merge_is_identity(tp, pp, spec):
    arch = TINY
    hf = _random_hf(arch)
    shards = {
        (t, p): hf_to_megatron_shard(hf, arch, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_spec=spec)
        for t in range(tp)
        for p in range(pp)
    }
    rebuilt = {}
    for p in range(pp):
        for name in shards[(0, p)]:
            entry = next(e for e in QWEN3_MAPPING if name.endswith(e.megatron_name(spec)))
            layer = None
            if name.startswith("decoder.layers."):
                layer = p * (arch.num_layers // pp) + int(name.split(".")[2])
            tensors = hf_from_shards(entry, [shards[(t, p)][name] for t in range(tp)], arch)
            rebuilt.update(zip(entry.hf_names(layer), tensors))
    assert set(rebuilt) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(rebuilt[name], tensor), name
    if spec == "te":
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shards[(0, 0)]
    # Vocabulary rows are padded on the Megatron side.
    emb = shards[(0, 0)]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == padded_vocab_size(arch.vocab_size) // tp
