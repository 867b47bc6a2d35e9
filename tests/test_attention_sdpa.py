"""SDPAttention (torch SDPA core attention for the local spec) against Megatron and transformers.

In this process (world of 1): the module against Megatron's ``DotProductAttention`` on random
inputs (outputs and q/k/v gradients in fp32: causal, GQA, padding masks, scales, dropout in eval),
what it refuses, and which core attention ``build_qwen3_gpt`` puts in the local spec.

In the shared multi-rank launch (TP and PP in {1, 2}): a tiny GQA Qwen3 built with the SDPA spec
against HF ``Qwen3ForCausalLM`` (eager attention, fp32): logits, and every parameter gradient of a
sum-of-log-probs loss, shard by shard; and against the same model on ``DotProductAttention``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_eopd.models.qwen3.architecture import Qwen3Arch
from megatron_eopd.platform import distributed as platform_dist
from megatron_eopd.testing.multirank import multirank_check

# fp32 bounds.  SDPA and DotProductAttention differ only in rounding: absolute tolerance as a
# fraction of the reference's largest entry (fp32 eps is 1.2e-7).
MODULE_ATOL_FRACTION, MODULE_RTOL = 4e-6, 1e-5
# Whole model vs transformers: two implementations of every layer, 4 layers, fp32.
LOGITS_ATOL = 1e-4
GRAD_RTOL, GRAD_ATOL_FRACTION = 1e-4, 1e-5  # atol relative to the reference gradient's max |g|


def _config(heads: int, groups: int, head_dim: int = 16, **overrides):
    from megatron_eopd.platform import mcore_compat

    kwargs = dict(num_layers=4, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                  kv_channels=head_dim, ffn_hidden_size=128, normalization="RMSNorm", qk_layernorm=True,
                  gated_linear_unit=True, params_dtype=torch.float32, attention_dropout=0.0,
                  hidden_dropout=0.0, masked_softmax_fusion=False, use_cpu_initialization=True)
    kwargs.update(overrides)
    return mcore_compat.transformer_config(**kwargs)


def _pair(config, mask_type, layer_number: int = 1, **kwargs):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_eopd.models.attention import SDPAttention

    made = [cls(config=config, layer_number=layer_number, attn_mask_type=mask_type, attention_type="self",
                **kwargs) for cls in (SDPAttention, DotProductAttention)]
    return made[0], made[1]


def _qkv(sq, sk, batch, heads, groups, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(sq, batch, heads, head_dim), (sk, batch, groups, head_dim), (sk, batch, groups, head_dim)]
    return [(2 * torch.randn(s, generator=gen)).requires_grad_() for s in shapes]


def _run(module, qkv, mask, grad_out):
    for t in qkv:
        t.grad = None
    out = module(*qkv, mask)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in qkv]


def _compare(sdpa, ref, qkv, mask=None):
    sq, batch = qkv[0].shape[:2]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(sq, batch, ref.hidden_size_per_partition, generator=gen)
    got, got_grads = _run(sdpa, qkv, mask, grad_out)
    want, want_grads = _run(ref, qkv, mask, grad_out)
    assert got.shape == want.shape == (sq, batch, ref.hidden_size_per_partition)
    assert got.is_contiguous()
    worst = 0.0
    for name, g, w in zip(["out", "dq", "dk", "dv"], [got, *got_grads], [want, *want_grads]):
        scale = float(w.abs().max())
        assert scale > 0, f"reference {name} is zero"
        torch.testing.assert_close(g, w, atol=MODULE_ATOL_FRACTION * scale, rtol=MODULE_RTOL,
                                   msg=lambda m: f"{name}: {m}")
        worst = max(worst, float((g - w).abs().max()) / scale)
    print(f"max |sdpa - DotProductAttention| / max |reference| = {worst:.2e}")
    return worst


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (8, 2), (4, 1)])
def test_causal_matches_dot_product_attention(model_parallel, heads, groups):
    from megatron.core.transformer.enums import AttnMaskType

    config = _config(heads, groups)
    sdpa, ref = _pair(config, AttnMaskType.causal)
    assert (sdpa.num_attention_heads_per_partition, sdpa.num_query_groups_per_partition) == (
        ref.num_attention_heads_per_partition, ref.num_query_groups_per_partition)
    assert sdpa.softmax_scale == pytest.approx(ref.softmax_scale) == pytest.approx(16 ** -0.5)
    _compare(sdpa, ref, _qkv(24, 24, 3, heads, groups, 16))


def test_single_query_attends_to_every_key(model_parallel):
    """One causal query (decoding): no mask, as in DotProductAttention."""
    from megatron.core.transformer.enums import AttnMaskType

    sdpa, ref = _pair(_config(4, 2), AttnMaskType.causal)
    _compare(sdpa, ref, _qkv(1, 9, 2, 4, 2, 16))


@pytest.mark.parametrize("mask_type", ["padding", "arbitrary", "no_mask"])
def test_boolean_masks_match_dot_product_attention(model_parallel, mask_type):
    from megatron.core.transformer.enums import AttnMaskType

    sdpa, ref = _pair(_config(4, 2), AttnMaskType[mask_type])
    qkv = _qkv(10, 10, 2, 4, 2, 16, seed=3)
    _compare(sdpa, ref, qkv)  # without a mask: full attention
    # Megatron's convention: True = masked out; [b, 1, sq, sk].  Every query keeps some key.
    mask = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(4)) < 0.5
    mask[..., 0] = False
    _compare(sdpa, ref, qkv, mask)


@pytest.mark.parametrize("explicit_scale", [None, 0.3])
def test_scales_match_dot_product_attention(model_parallel, explicit_scale):
    """softmax_scale as passed, and apply_query_key_layer_scaling (the same function by design)."""
    from megatron.core.transformer.enums import AttnMaskType

    config = _config(4, 2, apply_query_key_layer_scaling=True)
    sdpa, ref = _pair(config, AttnMaskType.causal, layer_number=3, softmax_scale=explicit_scale)
    expected = explicit_scale if explicit_scale is not None else 16 ** -0.5
    assert sdpa.softmax_scale == pytest.approx(expected)
    assert ref.softmax_scale == pytest.approx(expected / 3)  # Megatron's pre-scaled matmul factor
    _compare(sdpa, ref, _qkv(12, 12, 2, 4, 2, 16, seed=5))


def test_dropout_only_in_training(model_parallel):
    from megatron.core.transformer.enums import AttnMaskType

    sdpa, ref = _pair(_config(4, 2, attention_dropout=0.5), AttnMaskType.causal)
    assert sdpa.dropout_p == 0.5
    sdpa.eval()
    ref.eval()
    qkv = _qkv(16, 16, 2, 4, 2, 16, seed=6)
    _compare(sdpa, ref, qkv)  # eval: dropout is a no-op in both
    sdpa_override, _ = _pair(_config(4, 2, attention_dropout=0.5), AttnMaskType.causal, attention_dropout=0.0)
    assert sdpa_override.dropout_p == 0.0  # the constructor argument wins over the config

    sdpa.train()
    with torch.no_grad():
        evaluated = ref(*qkv, None)
        trained = [sdpa(*qkv, None) for _ in range(2)]
    assert all(torch.isfinite(t).all() for t in trained)
    assert not torch.allclose(trained[0], evaluated, atol=1e-3)
    assert not torch.allclose(trained[0], trained[1], atol=1e-3)  # the RNG stream advances


def test_unsupported_inputs_raise(model_parallel):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_eopd.models.attention import SDPAttention

    config = _config(4, 2)
    causal, _ = _pair(config, AttnMaskType.causal)
    padding, _ = _pair(config, AttnMaskType.padding)
    q, k, v = _qkv(8, 8, 2, 4, 2, 16)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        causal(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        causal(q, k, v, None, attention_bias=torch.zeros(1, 4, 8, 8))
    with pytest.raises(NotImplementedError, match="explicit attention_mask"):
        causal(q, k, v, mask)
    with pytest.raises(NotImplementedError, match="sq == sk"):
        causal(*_qkv(4, 8, 2, 4, 2, 16), None)
    with pytest.raises(NotImplementedError, match="attn_mask_type"):
        causal(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal)
    with pytest.raises(NotImplementedError, match="boolean"):
        padding(q, k, v, torch.zeros(2, 1, 8, 8))
    full = mask.clone()
    full[1, 0, 5] = True
    with pytest.raises(NotImplementedError, match="masks every key"):
        padding(q, k, v, full)
    with pytest.raises(ValueError, match="does not broadcast"):
        padding(q, k, v, torch.zeros(3, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="query heads"):
        causal(*_qkv(8, 8, 2, 2, 2, 16), None)
    # The forward's mask type wins over the constructor's (as in transformer-engine's attention).
    as_causal = padding(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(as_causal, causal(q, k, v, None))

    def build(**overrides):
        return SDPAttention(config=_config(4, 2, **overrides), layer_number=1,
                            attn_mask_type=AttnMaskType.causal, attention_type="self")

    with pytest.raises(NotImplementedError, match="sliding-window"):
        build(window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="softmax_type"):
        build(softmax_type="off-by-one")
    cp_config = _config(4, 2)
    cp_config.context_parallel_size = 2  # without the CP process groups TransformerConfig would need
    with pytest.raises(NotImplementedError, match="context parallelism"):
        SDPAttention(config=cp_config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")


ARCH = Qwen3Arch(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32,
                 ffn_hidden_size=128, vocab_size=301, tie_word_embeddings=False)


def _core_attention_types(model) -> set:
    return {type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers}


def test_builder_puts_sdpa_in_the_local_spec(model_parallel):
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt

    sdpa = build_qwen3_gpt(ARCH, params_dtype=torch.float32, layer_spec="local")
    megatron = build_qwen3_gpt(ARCH, params_dtype=torch.float32, layer_spec="local",
                               attention_backend="megatron")
    assert _core_attention_types(sdpa) == {"SDPAttention"} and sdpa.eopd_attention_backend == "sdpa"
    assert _core_attention_types(megatron) == {"DotProductAttention"}
    assert megatron.eopd_attention_backend == "megatron"
    # Same parameters, same checkpoints.
    shapes = [[(n, p.shape) for n, p in m.named_parameters()] for m in (sdpa, megatron)]
    assert shapes[0] == shapes[1]
    assert set(sdpa.state_dict()) == set(megatron.state_dict())
    with pytest.raises(ValueError, match="attention_backend must be"):
        build_qwen3_gpt(ARCH, layer_spec="local", attention_backend="flash")


def test_transformer_engine_spec_is_kept_when_importable(model_parallel, monkeypatch):
    """With TE importable the default stays TE's spec (its own attention); an attention_backend is refused."""
    from megatron_eopd.models.qwen3 import model as qwen3_model
    from megatron_eopd.platform import mcore_compat

    asked = []

    class Stop(Exception):
        pass

    def spec(*, use_te, **_kwargs):
        asked.append(use_te)
        raise Stop

    monkeypatch.setattr(mcore_compat, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(mcore_compat, "gpt_layer_spec", spec)
    with pytest.raises(Stop):
        qwen3_model.build_qwen3_gpt(ARCH)
    assert asked == [True]
    with pytest.raises(ValueError, match="local layer spec only"):
        qwen3_model.build_qwen3_gpt(ARCH, attention_backend="sdpa")
    monkeypatch.setattr(mcore_compat, "have_transformer_engine", lambda: False)
    with pytest.raises(Stop):
        qwen3_model.build_qwen3_gpt(ARCH)
    assert asked == [True, False]


# --------------------------------------------------------------------------- multi-rank: whole model

SEQ, BATCH = 16, 2
HF_SHAPE = dict(num_heads=8, num_kv_heads=2, head_dim=32, num_layers=4, hidden_size=64, ffn_hidden_size=128)


def _tiny_hf(ctx, tied: bool) -> Path:
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    path = ctx.launch_dir / "sdpa_fixtures" / f"hf-gqa4-{'tied' if tied else 'untied'}"
    if ctx.rank == 0 and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_qwen3(tmp, seed=21 if tied else 22, tie_word_embeddings=tied, **HF_SHAPE)
        tmp.rename(path)
    dist.barrier()
    return path


def _tokens() -> torch.Tensor:
    return torch.randint(0, 301, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def _hf_reference(hf_dir: Path):
    """HF logits [b, s, V] and parameter gradients of sum_t log p(x_{t+1} | x_<=t), eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    tokens = _tokens()
    logits = model(tokens[:, :-1]).logits
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).sum()
    logprobs.backward()
    return logits.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def _megatron_pass(model, ctx):
    """Logits (full vocabulary, last stage; else None) and the same loss's backward through the schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eopd.objective.vocab_parallel import vocab_parallel_logprobs
    from megatron_eopd.platform import current_platform

    device = current_platform().device
    tokens = _tokens().to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ, device=device).unsqueeze(0).expand(BATCH, -1)
    captured = []

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None)

        def loss_func(logits):
            captured.append(logits.detach())
            logprobs = vocab_parallel_logprobs(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               group=ctx.tp_group, true_vocab_size=301)
            return -logprobs.sum(), {}  # the schedule's backward descends the loss; HF's ascends logprobs

        return output, loss_func

    model.zero_grad(set_to_none=True)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    grads = {}
    for name, param in model.named_parameters():
        grad = -param.grad.detach().clone()  # back to d(sum of log-probs)
        if ctx.tp > 1 and ("q_layernorm" in name or "k_layernorm" in name):
            # Each TP rank's heads contribute to these shared weights (finalize_model_grads sums them).
            dist.all_reduce(grad, group=ctx.tp_group)
        grads[name] = grad
    logits = None
    if parallel_state.is_pipeline_last_stage():
        logits = captured[0]
        if ctx.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(ctx.tp)]
            dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
            logits = torch.cat(parts, dim=-1)
        logits = logits[..., :301]
    return logits, grads


def _build(hf_dir: Path, backend: str):
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.qwen3 import build_qwen3_gpt, load_hf_weights

    model = build_qwen3_gpt(hf_dir, params_dtype=torch.float32, layer_spec="local", attention_backend=backend,
                            perform_initialization=False)
    load_hf_weights(model, HFSafetensors(hf_dir))
    return model


def _grad_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    atol = GRAD_ATOL_FRACTION * float(want.abs().max())
    torch.testing.assert_close(got, want.to(got.device), rtol=GRAD_RTOL, atol=atol,
                               msg=lambda m: f"{what}: {m}")
    return float((got - want.to(got.device)).abs().max() / max(float(want.abs().max()), 1e-30))


@multirank_check(tp=[1, 2], pp=[1, 2], tied=[False, True])
def test_sdpa_model_matches_hf_and_dot_product_attention(ctx):
    """Tiny GQA Qwen3 (8 heads, 2 KV groups) on the SDPA spec vs HF eager and vs DotProductAttention."""
    from megatron_eopd.models.qwen3 import hf_to_megatron_shard

    tied = ctx.params["tied"]
    hf_dir = _tiny_hf(ctx, tied)
    ref_logits, ref_grads = _hf_reference(hf_dir)
    sdpa = _build(hf_dir, "sdpa")
    assert _core_attention_types(sdpa) == {"SDPAttention"}, _core_attention_types(sdpa)
    logits, grads = _megatron_pass(sdpa, ctx)
    megatron_logits, megatron_grads = _megatron_pass(_build(hf_dir, "megatron"), ctx)
    report = {"check": f"tp{ctx.tp}-pp{ctx.pp}-tied={tied}", "rank": ctx.rank}

    if logits is not None:
        assert ref_logits.std() > 0.1  # not two near-constant outputs
        report["logits_vs_hf"] = float((logits - ref_logits.to(logits.device)).abs().max())
        report["logits_vs_megatron"] = float((logits - megatron_logits).abs().max())
        report["logits_megatron_vs_hf"] = float((megatron_logits - ref_logits.to(logits.device)).abs().max())
        assert report["logits_vs_hf"] <= LOGITS_ATOL, report
        torch.testing.assert_close(logits, megatron_logits, atol=1e-5, rtol=MODULE_RTOL)

    # HF gradients in this rank's Megatron layout.  Tied: the input embedding's gradient is split
    # between the first stage's embedding and the last stage's output layer, so under PP each holds
    # a part; compare what a single stage holds only without PP.
    expected = hf_to_megatron_shard(ref_grads, hf_dir, tp_rank=ctx.tp_rank, tp_size=ctx.tp,
                                    pp_rank=ctx.pp_rank, pp_size=ctx.pp)
    if tied and ctx.pp > 1:
        expected = {n: g for n, g in expected.items()
                    if "word_embeddings" not in n and "output_layer" not in n}
    assert expected and set(expected) <= set(grads), set(expected) - set(grads)
    worst_hf = worst_megatron = 0.0
    for name, want in expected.items():
        assert float(want.abs().max()) > 0, f"HF gradient of {name} is zero"
        worst_hf = max(worst_hf, _grad_close(grads[name], want, f"{name} vs HF"))
        worst_megatron = max(worst_megatron,
                             _grad_close(grads[name], megatron_grads[name], f"{name} vs Megatron"))
    report.update(grads_vs_hf_rel=worst_hf, grads_vs_megatron_rel=worst_megatron, compared=len(expected))
    # The measured deviations, for people: <launch dir>/sdpa_report/<layout>-rank<r>.json.
    out = ctx.launch_dir / "sdpa_report"
    out.mkdir(exist_ok=True)
    (out / f"{report['check']}-rank{ctx.rank}.json").write_text(json.dumps(report))


@multirank_check(tp=2)
def test_module_splits_heads_like_dot_product_attention(ctx):
    """Per-partition heads and groups under TP=2 (8 heads / 2 groups -> 4 / 1 per rank)."""
    from megatron.core.transformer.enums import AttnMaskType

    sdpa, ref = _pair(_config(8, 2), AttnMaskType.causal)
    assert (sdpa.num_attention_heads_per_partition, sdpa.num_query_groups_per_partition) == (4, 1)
    assert sdpa.hidden_size_per_partition == ref.hidden_size_per_partition == 64
    qkv = [t.detach().to(platform_dist.current_platform().device).requires_grad_()
           for t in _qkv(12, 12, 2, 4, 1, 16, seed=ctx.tp_rank)]
    _compare(sdpa, ref, qkv)
