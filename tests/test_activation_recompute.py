"""Activation recomputation of the Qwen3 student (``train.recompute=full``).

What it must do: keep only each transformer layer's input during forward, run every layer again in
backward, and change no gradient (bit for bit on the CPU).  Checked on a real tiny Qwen3 ``GPTModel`` (fp32, loaded from a HF
checkpoint): the bytes autograd saves inside the decoder, how often each layer runs, and every
parameter's gradient against the same model without recomputation, alone and at TP/PP 1/2 through
Megatron's pipeline schedule.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_eopd.platform import current_platform
from megatron_eopd.testing.multirank import multirank_check

SEQ, BATCH = 16, 2


def _tiny_hf(root: Path) -> Path:
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    path = root / "hf"
    if not path.exists():
        tmp = root / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_qwen3(tmp, seed=21)
        tmp.rename(path)
    return path


def _build(hf_dir: Path, recompute: str):
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.qwen3 import build_qwen3_gpt, load_hf_weights

    model = build_qwen3_gpt(hf_dir, params_dtype=torch.float32, layer_spec="local", perform_initialization=False,
                            recompute=recompute)
    load_hf_weights(model, HFSafetensors(hf_dir))
    model.train()
    return model


def _count_layer_forwards(model) -> list[int]:
    """A live list: how many times each of this chunk's transformer layers has run forward."""
    counts = [0] * len(model.decoder.layers)
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda *_args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _tokens(seed: int) -> torch.Tensor:
    tokens = torch.randint(0, 301, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return tokens.to(current_platform().device)


def _assert_same_gradient(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Bit-identical on the CPU; on CUDA within rounding, since some of its attention backward kernels
    accumulate with atomics and are not bitwise reproducible even without recomputation."""
    assert float(want.abs().max()) > 0, f"{name}: zero gradient, the comparison would prove nothing"
    if want.device.type == "cpu":
        assert torch.equal(got, want), f"{name}: gradient changed by recomputation"
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)


def test_unknown_mode_is_refused_before_building():
    from megatron_eopd.models.qwen3.model import recompute_overrides

    assert recompute_overrides("none") == {}
    assert recompute_overrides("full")["recompute_granularity"] == "full"
    with pytest.raises(ValueError, match=r"recompute must be one of \['none', 'full'\], got 'selective'"):
        recompute_overrides("selective")


def test_full_recompute_saves_layer_inputs_only_and_keeps_gradients(model_parallel, tmp_path):
    hf_dir = _tiny_hf(tmp_path)
    position_ids = torch.arange(SEQ, device=current_platform().device).unsqueeze(0).expand(BATCH, -1)
    tokens = _tokens(seed=0)
    result = {}
    for mode in ("none", "full"):
        model = _build(hf_dir, mode)
        assert model.config.recompute_granularity == (None if mode == "none" else "full")
        forwards = _count_layer_forwards(model)
        inside_decoder, saved = [False], [0]
        model.decoder.register_forward_pre_hook(lambda *_: inside_decoder.__setitem__(0, True))
        model.decoder.register_forward_hook(lambda *_: inside_decoder.__setitem__(0, False))

        def pack(tensor):
            if inside_decoder[0]:
                saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = model(tokens, position_ids, None)
        after_forward = list(forwards)
        logits.float().log_softmax(-1).pow(2).mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        result[mode] = dict(saved=saved[0], after_forward=after_forward, after_backward=list(forwards), grads=grads,
                            layers=model.config.num_layers, hidden=model.config.hidden_size)

    layers, hidden = result["full"]["layers"], result["full"]["hidden"]
    layer_input = BATCH * SEQ * hidden * 4  # one fp32 [s, b, h] tensor
    # Without recomputation every layer's intermediates are kept; with it, about one input per layer
    # (plus the rotary angles each checkpoint also receives, and the final norm's input).
    assert result["full"]["saved"] <= 2 * (layers + 1) * layer_input, result["full"]["saved"]
    assert result["none"]["saved"] >= 10 * result["full"]["saved"], (result["none"]["saved"], result["full"]["saved"])
    assert result["none"]["after_forward"] == result["none"]["after_backward"] == [1] * layers
    assert result["full"]["after_forward"] == [1] * layers and result["full"]["after_backward"] == [2] * layers
    want, got = result["none"]["grads"], result["full"]["grads"]
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        _assert_same_gradient(got[name], want[name], name)


def test_trainer_builds_the_student_with_the_configured_recompute(model_parallel, tmp_path):
    from megatron_eopd.trainer.config import ModelSpec, OptimConfig
    from megatron_eopd.trainer.models import build_student

    spec = ModelSpec(hf_dir=str(_tiny_hf(tmp_path)))
    for mode, granularity in (("none", None), ("full", "full")):
        student = build_student(spec, torch.float32, OptimConfig(), total_steps=4, recompute=mode)
        config = student.chunks[0].module.config
        assert (config.recompute_granularity, config.recompute_method) == (
            (granularity, "uniform" if granularity else None)), mode


@multirank_check(tp=[1, 2], pp=[1, 2])
def test_full_recompute_under_the_pipeline_schedule(ctx):
    """Two micro-batches of vocab-parallel cross entropy through Megatron's schedule: every gradient
    equal with and without recomputation, each layer run twice per micro-batch with it."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_eopd.models.forward import MicroBatch, run_micro_batches

    root = ctx.launch_dir / "recompute_fixture"
    if ctx.rank == 0:
        root.mkdir(exist_ok=True)
        _tiny_hf(root)
    dist.barrier()
    hf_dir = root / "hf"
    micro_batches = [MicroBatch.from_tokens(_tokens(seed)) for seed in (1, 2)]

    def loss_of(logits, micro_batch):
        labels = torch.roll(micro_batch.tokens, -1, dims=1).t().contiguous()  # [s, b] like the logits
        per_token = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(), labels)
        return per_token.sum(), torch.tensor(per_token.numel(), dtype=torch.int, device=logits.device), {}

    grads, forwards = {}, {}
    for mode in ("none", "full"):
        model = _build(hf_dir, mode)
        forwards[mode] = _count_layer_forwards(model)
        run_micro_batches([model], micro_batches, loss_of, forward_only=False)
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    layers_here = len(forwards["none"])
    assert layers_here >= 1
    assert forwards["none"] == [len(micro_batches)] * layers_here, forwards["none"]
    assert forwards["full"] == [2 * len(micro_batches)] * layers_here, forwards["full"]
    assert grads["none"].keys() == grads["full"].keys() and grads["none"]
    for name, want in grads["none"].items():
        _assert_same_gradient(grads["full"][name], want, name)
