"""The platform layer runs Megatron-Core on CPU/gloo through Megatron's own pipeline schedule.

A tiny GPTModel at TP=2, PP=2 and TP=2 x PP=2 must give the same loss and the same gradients
(shard by shard) as the TP=1, PP=1 model holding identical weights.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_eopd.platform import current_platform
from megatron_eopd.testing.multirank import multirank_check
from megatron_fill import fill_by_global_coordinates, full_tensor_slice

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, MICRO_BATCH, MICROBATCHES = 128, 64, 4, 2, 16, 2, 2


def _build_tiny_gpt(tp: int, pp: int, pp_rank: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        kv_channels=32,
        ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=current_platform().is_cpu,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )
    model.to(current_platform().device)  # the local spec's torch norms are made on the default device
    layer_offset = pp_rank * (LAYERS // pp)
    fill_by_global_coordinates(
        model, parallel_state.get_tensor_model_parallel_rank(), tp, layer_offset
    )
    return model, layer_offset


def _batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        tokens = tokens.to(current_platform().device)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
    return out


def _run_schedule(model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ, device=current_platform().device).unsqueeze(0).expand(MICRO_BATCH, -1)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], position_ids, None, labels=batch["labels"])
        return output, functools.partial(loss_func)

    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    return losses


def _mean_loss_on_every_rank(losses, pp_group) -> torch.Tensor:
    from megatron.core import parallel_state

    value = torch.zeros(1, dtype=torch.float64, device=current_platform().device)
    if parallel_state.is_pipeline_last_stage():
        value[0] = sum(float(l["lm loss"]) for l in losses) / len(losses)
    if pp_group is not None:
        dist.all_reduce(value, group=pp_group)  # only the last stage contributes
    return value


@multirank_check(tp=[1, 2], pp=[1, 2])
def test_tiny_gpt_layouts_match_single_rank(ctx):
    batches = _batches(ctx.seed)
    model, layer_offset = _build_tiny_gpt(ctx.tp, ctx.pp, ctx.pp_rank)
    loss = _mean_loss_on_every_rank(_run_schedule(model, batches), ctx.pp_group)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    device = current_platform().device
    assert {t.device for t in [*grads.values(), loss]} == {device}, "compare on the platform's device"
    params = dict(model.named_parameters())

    # Reference: the same weights as one TP=1, PP=1 model on this rank alone.
    from megatron_eopd.platform import init_model_parallel
    from megatron_fill import _global_name

    tp_rank = ctx.tp_rank
    init_model_parallel(1, 1, seed=ctx.seed)
    ref_model, _ = _build_tiny_gpt(1, 1, 0)
    ref_loss = _mean_loss_on_every_rank(_run_schedule(ref_model, batches), None)  # PP=1: no reduce
    ref_grads = {name: p.grad for name, p in ref_model.named_parameters()}

    assert torch.isfinite(loss).all() and loss.item() > 0.5, f"implausible loss {loss.item()}"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        full = ref_grads[_global_name(name, layer_offset)]
        expected = full_tensor_slice(full, params[name], tp_rank, ctx.tp)
        assert float(expected.abs().max()) > 0, f"reference gradient of {name} is zero"
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
