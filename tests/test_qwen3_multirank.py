"""Converted Qwen3 checkpoints on Megatron-Core at TP/PP in {1,2}: HF logits, resharding, exporter.

Runs in the shared multi-rank launch (4 gloo ranks).  The tiny HF models and the converted
checkpoints are made once per launch, next to the checks' shared directories; conversion goes
through the tool's ``main`` run collectively (the tool's torchrun mode) at TP1/PP1 and TP2/PP2,
and every layout loads both, so loading at a layout other than the conversion's is covered.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_eopd.platform import current_platform
from megatron_eopd.testing.multirank import multirank_check

SEQ, BATCH = 12, 2
_HF_LOGITS: dict = {}


def _root(ctx) -> Path:
    return ctx.launch_dir / "qwen3_fixtures"


def _tiny_hf(ctx, tied: bool) -> Path:
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    path = _root(ctx) / f"hf-{'tied' if tied else 'untied'}"
    if ctx.rank == 0 and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_qwen3(tmp, seed=11 if tied else 12, tie_word_embeddings=tied)
        tmp.rename(path)
    dist.barrier()
    return path


def _converted(ctx, tied: bool, conv: str) -> Path:
    """The tool's output for this model at conversion layout ``conv`` ("tp1pp1" / "tp2pp2")."""
    from megatron_eopd.checkpoint.convert import hf_to_mcore_main
    from megatron_eopd.platform import init_model_parallel

    hf_dir = _tiny_hf(ctx, tied)
    path = _root(ctx) / f"mcore-{hf_dir.name}-{conv}"
    dist.barrier()
    if not path.exists():  # same answer on every rank: creation is collective
        tp, pp = conv[2], conv[5]
        rc = hf_to_mcore_main(["--hf-dir", str(hf_dir), "--output", str(path), "--tp", tp, "--pp", pp,
                               "--dtype", "fp32", "--layer-spec", "local"])
        assert rc == 0, f"conversion failed with status {rc}"
        init_model_parallel(ctx.tp, ctx.pp, seed=ctx.seed)  # the tool set its own layout
    return path


def _tokens(seed: int = 0, device=None) -> torch.Tensor:
    """The same tokens everywhere (drawn on the CPU), on ``device`` (default: the platform's)."""
    tokens = torch.randint(0, 301, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return tokens.to(device or current_platform().device)


def _hf_logits(hf_dir: Path) -> torch.Tensor:
    if hf_dir not in _HF_LOGITS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            _HF_LOGITS[hf_dir] = model(_tokens(device="cpu")).logits  # transformers' reference, on the CPU
    return _HF_LOGITS[hf_dir]


def _build(hf_dir: Path):
    from megatron_eopd.models.qwen3 import build_qwen3_gpt

    return build_qwen3_gpt(hf_dir, params_dtype=torch.float32, layer_spec="local", perform_initialization=False)


def _megatron_logits(model, ctx):
    """Full-vocabulary logits on the last stage (None elsewhere), through Megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = _tokens()
    position_ids = torch.arange(SEQ, device=tokens.device).unsqueeze(0).expand(BATCH, -1)
    captured = []

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, None)

        def loss_func(output_tensor):
            captured.append(output_tensor.detach())
            return output_tensor.sum() * 0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = captured[0]
    if ctx.tp > 1:
        parts = [torch.empty_like(local) for _ in range(ctx.tp)]
        dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
        local = torch.cat(parts, dim=-1)
    return local[..., :301]


def _assert_logits_match(model, ctx, hf_dir):
    got = _megatron_logits(model, ctx)
    if got is not None:
        ref = _hf_logits(hf_dir).to(got.device)
        assert got.device == current_platform().device, got.device
        assert got.shape == ref.shape, (got.shape, ref.shape)
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-4, f"max |megatron - hf| logits = {diff:.3e}"
        assert ref.std() > 0.1  # the comparison is not between two near-constant outputs


def _assert_export_matches(model, ctx, hf_dir, to_rank):
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.qwen3 import expected_hf_shapes, iter_hf_weights, parse_hf_config

    ref = HFSafetensors(hf_dir)
    hf_order = list(expected_hf_shapes(parse_hf_config(hf_dir)))
    got = dict(iter_hf_weights(model, to_rank=to_rank))
    mp_rank = ctx.pp_rank * ctx.tp + ctx.tp_rank
    if to_rank is None or to_rank == mp_rank:
        assert list(got) == hf_order, "exporter must stream in HF order"
        assert set(got) == set(ref), set(got) ^ set(ref)
        for name, tensor in got.items():
            assert tensor.device == current_platform().device, (name, tensor.device)
            assert torch.equal(tensor, ref[name].to(tensor.device)), f"{name} differs after export (to_rank={to_rank})"
    else:
        assert not got, f"rank {ctx.rank} received {len(got)} tensors meant for rank {to_rank}"


@multirank_check(tp=[1, 2], pp=[1, 2], tied=[False, True], conv=["tp1pp1", "tp2pp2"])
def test_converted_checkpoint_matches_hf(ctx):
    """Tool-converted checkpoint, loaded at this layout: HF logits (fp32, 1e-4) and bit-exact export."""
    from megatron_eopd.checkpoint import load_mcore_checkpoint

    tied, conv = ctx.params["tied"], ctx.params["conv"]
    ckpt = _converted(ctx, tied, conv)
    hf_dir = _tiny_hf(ctx, tied)
    model = _build(hf_dir)
    meta = load_mcore_checkpoint(model, ckpt)
    assert meta["tensor_model_parallel_size"] == int(conv[2])
    _assert_logits_match(model, ctx, hf_dir)
    _assert_export_matches(model, ctx, hf_dir, to_rank=None)


@multirank_check(tp=[1, 2], pp=[1, 2], tied=[False, True])
def test_in_memory_loader_and_exporter(ctx):
    """(a) HF state dict -> this rank's shard, (b) streaming export to one rank or to all."""
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.qwen3 import hf_to_megatron_shard, load_hf_weights

    hf_dir = _tiny_hf(ctx, ctx.params["tied"])
    weights = HFSafetensors(hf_dir)
    model = _build(hf_dir)
    load_hf_weights(model, weights)

    expected = hf_to_megatron_shard(weights, hf_dir, tp_rank=ctx.tp_rank, tp_size=ctx.tp, pp_rank=ctx.pp_rank,
                                    pp_size=ctx.pp)
    params = dict(model.named_parameters())
    assert set(expected) == set(params), set(expected) ^ set(params)
    for name, tensor in expected.items():
        assert params[name].device == current_platform().device, (name, params[name].device)
        assert torch.equal(params[name], tensor.to(params[name].device)), name

    _assert_logits_match(model, ctx, hf_dir)
    last = ctx.tp * ctx.pp - 1
    for to_rank in sorted({0, last}):
        _assert_export_matches(model, ctx, hf_dir, to_rank=to_rank)
    # Casting on the way out, for a bf16 inference engine.
    for name, tensor in __import__("megatron_eopd.models.qwen3", fromlist=["x"]).iter_hf_weights(
            model, to_rank=None, dtype=torch.bfloat16):
        expected_bf16 = weights[name].to(device=tensor.device, dtype=torch.bfloat16)
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected_bf16), name


@multirank_check(tp=[1, 2], pp=[1, 2], tied=[False, True])
def test_fused_output_layer_matches_logits(ctx):
    """The output layer fused into the teacher statistics and the EOPD loss (``fused_head=True``)
    against the same model's logits through Megatron's schedule: equal statistics, loss and
    gradient of every parameter (fp32; the embedding too where tied)."""
    from megatron.core import parallel_state

    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.forward import MicroBatch, run_micro_batches
    from megatron_eopd.models.output_head import FinalHidden
    from megatron_eopd.models.qwen3 import load_hf_weights
    from megatron_eopd.objective import (EOPDLossConfig, compute_teacher_stats, compute_teacher_stats_from_hidden,
                                         eopd_loss, eopd_loss_from_hidden)

    hf_dir = _tiny_hf(ctx, ctx.params["tied"])
    model = _build(hf_dir)
    load_hf_weights(model, HFSafetensors(hf_dir))
    group = ctx.tp_group if ctx.tp > 1 else None
    tokens = _tokens(seed=3)
    labels = torch.roll(tokens, -1, dims=1).reshape(-1)
    mask = (torch.arange(BATCH * SEQ, device=tokens.device) % 5 != 0)
    mbs = [MicroBatch.from_tokens(tokens)]
    kw = dict(topk=8, response_mask=mask, true_vocab_size=301)

    def stats_of(output, mb):
        if isinstance(output, FinalHidden):
            assert output.hidden.shape[-1] == model.config.hidden_size
            return compute_teacher_stats_from_hidden(output.hidden, output.weight, labels, group, block_tokens=7, **kw)
        assert output.shape[-1] == model.eopd_padded_vocab // ctx.tp
        return compute_teacher_stats(output.reshape(-1, output.shape[-1]), labels, group, **kw)

    with torch.no_grad():
        stats = [run_micro_batches([model], mbs, stats_of, forward_only=True, fused_head=fused) for fused in (0, 1)]
    last = parallel_state.is_pipeline_last_stage()
    if last:
        for name in ("entropy", "sampled_logprob", "topk_logprobs", "log_z"):
            torch.testing.assert_close(getattr(stats[1][0], name), getattr(stats[0][0], name), rtol=1e-5,
                                       atol=1e-5, msg=name)
        teacher = stats[0][0]
        assert float(teacher.entropy[mask].std()) > 0.05  # not a degenerate comparison
    cfg = EOPDLossConfig(tau=float(teacher.entropy[mask].median()) if last else 0.8, topk=8)

    def loss_of(output, mb):
        common = dict(config=cfg, group=group, true_vocab_size=301)
        if isinstance(output, FinalHidden):
            loss, metrics = eopd_loss_from_hidden(output.hidden, output.weight, labels, mask, teacher,
                                                  block_tokens=5, **common)
        else:
            loss, metrics = eopd_loss(output.reshape(-1, output.shape[-1]), labels, mask, teacher, **common)
        return loss, mask.sum().to(torch.int), metrics

    grads, losses = [], []
    for fused in (False, True):
        for param in model.parameters():
            param.grad = None
        out = run_micro_batches([model], mbs, loss_of, forward_only=False, fused_head=fused)
        losses.append([m["loss"] for m in out])
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0], sorted(grads[0].keys() ^ grads[1].keys())
    for name in grads[0]:
        scale = float(grads[0][name].abs().max())
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6 + 1e-4 * scale, msg=name)
    if last:
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
    # The output layer is itself again after each fused call.
    from megatron.core.tensor_parallel import ColumnParallelLinear

    head = getattr(model, "output_layer", None)
    assert head is None or "forward" not in vars(head) and isinstance(head, ColumnParallelLinear)


@multirank_check(tp=[1, 2], pp=[1, 2])
def test_micro_batches_of_their_own_lengths(ctx):
    """Without PP each micro-batch may have its own length: the logits of a short micro-batch equal those
    of the same rows padded to the longest; under PP the schedule needs one shape, and says so."""
    import pytest

    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.forward import MicroBatch, run_micro_batches
    from megatron_eopd.models.qwen3 import load_hf_weights

    hf_dir = _tiny_hf(ctx, False)
    model = _build(hf_dir)
    load_hf_weights(model, HFSafetensors(hf_dir))
    long_tokens, short_tokens = _tokens(seed=5), _tokens(seed=6)[:, : SEQ // 2]
    padded_short = torch.cat([short_tokens, torch.zeros_like(short_tokens)], dim=1)  # right padding
    mixed = [MicroBatch.from_tokens(long_tokens), MicroBatch.from_tokens(short_tokens)]
    if ctx.pp > 1:
        with pytest.raises(ValueError, match="under pipeline parallelism every micro-batch of a call needs the same"):
            run_micro_batches([model], mixed, lambda out, mb: out, forward_only=True)
        return
    with torch.no_grad():
        got = run_micro_batches([model], mixed, lambda out, mb: out.detach().clone(), forward_only=True)
        want = run_micro_batches([model], [MicroBatch.from_tokens(long_tokens), MicroBatch.from_tokens(padded_short)],
                                 lambda out, mb: out.detach().clone(), forward_only=True)
    assert got[0].shape[1] == SEQ and got[1].shape[1] == SEQ // 2
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1][:, : SEQ // 2], rtol=1e-6, atol=1e-5)
    assert float(got[1].std()) > 0.1
