"""The Triton path of the vocab-parallel loss against its torch path, on CPU under the Triton interpreter.

Triton chooses between interpreting and compiling when a kernel is decorated, and that includes
its own ``triton.language`` helpers, decorated when ``triton`` is first imported: the interpreter
needs ``TRITON_INTERPRET=1`` before anything imports Triton.  The rest of the suite imports it
without.  So in a normal session ``test_parent_reruns_this_file_under_the_interpreter`` reruns
this file in a subprocess with the variable set (and a 2-rank gloo launch for the TP=2 check);
the other tests here skip in the parent and run in that subprocess, and nothing leaks into the
rest of the suite.  The parent itself compiles the kernels for sm_90 (no GPU needed) and, on a
machine with CUDA, checks the compiled kernels there.

Each test runs the same call with ``EOPD_LOSS_KERNELS=torch`` and ``=triton`` and compares every
output and the gradient.  The torch path is itself checked against a dense float64 reference in
test_objective_reference.py.  Small tiles make the kernels' tile loops run several times.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from megatron_eopd.objective import EOPDLossConfig, compute_teacher_stats, eopd_loss  # noqa: E402
from megatron_eopd.objective import vocab_parallel as vp  # noqa: E402
from megatron_eopd.testing.multirank import multirank_check  # noqa: E402

INTERPRETED = vp.triton_kernels is not None and vp.triton_kernels.INTERPRETED

TEMPERATURE = 0.7
FP32_TOL = dict(rtol=2e-5, atol=2e-6)
# Gradients are rounded to the logits' dtype: sums in another order can move one across a rounding boundary.
GRAD_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}


@pytest.mark.skipif(INTERPRETED, reason="this session is the interpreter run")
def test_parent_reruns_this_file_under_the_interpreter():
    """This file's tests in a fresh interpreter session (about 40 s on 2 cores)."""
    # A CPU session by design, on a GPU machine too (make test-gpu): the CPU layer refuses visible GPUs.
    env = dict(os.environ, TRITON_INTERPRET="1", EOPD_MULTIRANK_WORLD_SIZE="2", EOPD_MULTIRANK_DEVICE="cpu",
               CUDA_VISIBLE_DEVICES="")
    env.pop(vp.KERNELS_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "not test_parent_"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    # Everything passes: no failure, and no skip either (the parent-only tests are deselected).
    assert proc.returncode == 0 and re.fullmatch(r"\d+ passed, \d+ deselected(, \d+ warnings)? in .*", summary), (
        proc.stdout[-8000:] + proc.stderr[-4000:])
    print(summary)


def _bf16_kernel_signatures():
    """(kernel, argument types, constexprs, launch options) of each kernel, as the launchers call them on bf16."""
    from megatron_eopd.models import rope

    tk = vp.triton_kernels
    row = dict(logits_ptr="*bf16", stride_row="i64", stride_col="i32")
    shard = dict(vocab_start="i32", shard_size="i32", real_columns="i32", temperature="fp32")
    ids = dict(SCALED=True, BLOCK_V=tk.BLOCK_V, BLOCK_IDS=32)
    options = tk._launch_options()
    return [
        (tk._softmax_partials_kernel,
         dict(row, rows_ptr="*i64", ids_ptr="*i64", stride_ids="i32", max_ptr="*fp32", sums_ptr="*fp32",
              picked_ptr="*fp32", **shard, num_ids="i32"), ids, options),
        (tk._softmax_backward_kernel,
         dict(row, grad_ptr="*bf16", stride_grad_row="i64", position_ptr="*i64", log_z_ptr="*fp32",
              alpha_ptr="*fp32", beta_ptr="*fp32", ids_ptr="*i64", stride_ids="i32", g_ids_ptr="*fp32",
              **shard, num_ids="i32"), ids, options),
        (tk._summary_partials_kernel,
         dict(row, rows_ptr="*i64", sampled_ptr="*i64", max_ptr="*fp32", sums_ptr="*fp32",
              sampled_logit_ptr="*fp32", top_values_ptr="*fp32", top_ids_ptr="*i64", **shard),
         dict(SCALED=False, TOP_K=16, INSERT_LIMIT=tk.TOPK_INSERT_LIMIT, BLOCK_V=tk.TOPK_BLOCK_V), options),
    ] + [  # the fused RoPE on Qwen3's head_dim 128, both directions
        (rope._rope_kernel,
         dict(x_ptr="*bf16", f_ptr="*fp32", out_ptr="*bf16", stride_s="i32", stride_b="i32", stride_h="i32",
              batch="i32", heads="i32"),
         dict(HALF=64, BLOCK_D=64, BLOCK_H=rope.BLOCK_HEADS, BACKWARD=backward), rope.LAUNCH_OPTIONS)
        for backward in (False, True)
    ]


def _compile_for_hopper():
    """(kernel name, PTX, cubin) of every kernel compiled for sm_90 with Triton's bundled ptxas."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    hopper = GPUTarget("cuda", 90, 32)
    cubins = []
    for kernel, types, constexprs, options in _bf16_kernel_signatures():
        signature = dict(types, **{name: "constexpr" for name in constexprs})
        constants = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
        compiled = compile(ASTSource(kernel, signature, constants), target=hopper, options=options)
        cubins.append((kernel.__name__, compiled.asm["ptx"], compiled.asm["cubin"]))
    return cubins


@pytest.mark.skipif(INTERPRETED, reason="the interpreter session has no compiled kernels")
def test_parent_compiles_the_kernels_for_hopper(tmp_path):
    """What the interpreter cannot see (globals that are not constexpr, types, lowering): every
    kernel compiles to a cubin for sm_90 with Triton's bundled ptxas, no GPU needed.  And none
    spills: a spilled register goes to local memory, which on these bandwidth-bound kernels
    would add a memory round trip per tile (ptxas' own report, from the ptxas Triton uses for
    sm_90, run again with -v on each kernel's PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    for name, ptx, cubin in _compile_for_hopper():
        assert cubin, name
        source = tmp_path / f"{name}.ptx"
        source.write_text(ptx)
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(source), "-o", str(tmp_path / "out.cubin")],
                                capture_output=True, text=True, check=True).stderr
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        registers = re.findall(r"Used (\d+) registers", report)
        assert len(spills) == 1 and len(registers) == 1, report
        assert spills[0] == ("0", "0"), f"{name} spills registers to local memory:\n{report}"
        assert int(registers[0]) <= 255, report


@contextlib.contextmanager
def small_tiles(block_v: int = 64, topk_block_v: int = 32):
    """Tiles far narrower than these vocabularies, so every kernel loops over several."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vp.triton_kernels, "BLOCK_V", block_v)
        patch.setattr(vp.triton_kernels, "TOPK_BLOCK_V", topk_block_v)
        yield vp.triton_kernels


@pytest.fixture(scope="module")
def interpreted():
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of"
                    " test_parent_reruns_this_file_under_the_interpreter")
    with small_tiles() as module:
        yield module


def on_both_paths(run):
    """(run() on the torch path, run() on the Triton path)."""
    results = []
    for kernels in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(vp.KERNELS_ENV, kernels)
            results.append(run())
    return results


def make_logits(seed, tokens, vocab, dtype, *, ties=False, holes=True):
    """Logits with a per-token scale; optionally a coarse grid (many ties), -inf holes, a row with
    two finite entries (row 2) and a row that is -inf everywhere (row 5)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(tokens, 1, dtype=torch.float64).uniform_(-1.0, 2.0, generator=gen))
    x = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * scale
    if ties:
        x = x.mul(2).round().div(2)
    if holes:
        x = x.masked_fill(torch.rand(tokens, vocab, generator=gen) < 0.2, float("-inf"))
        x[2, 2:] = float("-inf")
        x[5] = float("-inf")
    return x.to(dtype)


def make_student_and_teacher(seed, tokens, vocab, true_vocab, dtype):
    """Tied bf16-grid logits with the same -inf holes on both sides, and sampled ids that are
    finite on both (row 5, -inf everywhere, gets none: it must stay out of the loss mask)."""
    student = make_logits(seed, tokens, vocab, torch.float64, ties=True)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    teacher = (0.8 * student + 0.5 * noise).mul(2).round().div(2)
    finite = torch.isfinite(student[:, :true_vocab])
    draw = torch.rand(tokens, true_vocab, generator=gen, dtype=torch.float64)
    sampled = torch.where(finite, draw, -1.0).argmax(1)
    mask = (torch.rand(tokens, generator=gen) < 0.8) & finite.any(1)
    return student.to(dtype), teacher.to(dtype), sampled, mask


def assert_same(a, b, what, **tol):
    torch.testing.assert_close(b, a, equal_nan=True, msg=lambda m: f"{what}: {m}", **(tol or FP32_TOL))


# --------------------------------------------------------------------------- student terms


STUDENT_CASES = {
    # name: dtype, vocab_start (the logits are that rank's columns), shard size, ties
    "fp32": (torch.float32, 0, 300, False),
    "bf16_ties": (torch.bfloat16, 0, 300, True),
    "bf16_second_shard": (torch.bfloat16, 160, 150, True),
}


@pytest.mark.parametrize("case", list(STUDENT_CASES))
def test_token_terms_and_gradient(interpreted, case):
    """log Z, max, entropy, log q at ids (duplicates, padded and -inf ids) and the dense
    gradient of a subset of rows, padded vocabulary, temperature != 1."""
    dtype, start, size, ties = STUDENT_CASES[case]
    tokens, true_vocab = 40, 290  # padding: the last 10 ids of a 300-id vocabulary
    logits = make_logits(1, tokens, size, dtype, ties=ties)
    gen = torch.Generator().manual_seed(2)
    rows = torch.cat([torch.tensor([2, 5]), torch.randperm(tokens, generator=gen)[:26]]).unique()
    # Ids of this shard (without a TP group other ids have no owner); duplicates add up in the
    # gradient; a padded id; an id at a -inf logit (token 2 is -inf from column 2 on).
    ids = torch.randint(start, start + size, (rows.numel(), 5), generator=gen)
    ids[:, 1] = ids[:, 0]
    ids[0, 2] = 295
    ids[(rows == 2).nonzero()[0, 0], 3] = start + 3
    weights = torch.randn(rows.numel(), 7, generator=gen)

    def run():
        x = logits.clone().requires_grad_()
        terms = vp.vocab_parallel_token_terms(x, ids, rows=rows, want_entropy=True, vocab_start=start,
                                              true_vocab_size=true_vocab, temperature=TEMPERATURE)
        finite = lambda t: torch.where(torch.isfinite(t), t, 0.0)  # noqa: E731
        loss = (finite(terms.log_z) * weights[:, 0]).sum() + (finite(terms.entropy) * weights[:, 1]).sum()
        (loss + (finite(terms.logprobs) * weights[:, 2:]).sum()).backward()
        return terms, x.grad, type(terms.log_z.grad_fn).__name__

    (ref, ref_grad, ref_fn), (got, grad, fn) = on_both_paths(run)
    assert (ref_fn, fn) == ("_VocabParallelTokenTermsBackward", "_FusedTokenTermsBackward")
    for name, a, b in zip(ref._fields, ref, got):
        if a is not None:
            assert_same(a.detach(), b.detach(), name)
    assert grad.dtype == dtype and grad.shape == logits.shape
    # Row 5 is -inf everywhere: no distribution.  The torch path's gradient is NaN there, the kernel's 0.
    assert ref_grad[5].isnan().any() and (grad[5] == 0).all()
    keep = torch.arange(tokens) != 5
    assert_same(ref_grad[keep], grad[keep], "gradient", **GRAD_TOL[dtype])
    unselected = torch.ones(tokens, dtype=torch.bool).index_fill_(0, rows, False)
    assert (grad[unselected] == 0).all()
    if start + size > true_vocab:
        assert (grad[:, true_vocab - start :] == 0).all()


def test_entropy_only_and_no_rows(interpreted):
    """No gather ids at all (vocab_parallel_entropy), and an empty row selection."""
    logits = make_logits(3, 12, 100, torch.float32, holes=False)

    def run():
        x = logits.clone().requires_grad_()
        h = vp.vocab_parallel_entropy(x)
        h.sum().backward()
        y = logits.clone().requires_grad_()
        no_ids, no_rows = torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        empty = vp.vocab_parallel_token_terms(y, no_ids, rows=no_rows)
        empty.log_z.sum().backward()
        return h.detach(), x.grad, empty.log_z.shape, y.grad

    (h_ref, g_ref, shape_ref, empty_ref), (h, g, shape, empty) = on_both_paths(run)
    assert_same(h_ref, h, "entropy")
    assert_same(g_ref, g, "entropy gradient")
    assert shape == shape_ref == (0,) and (empty == 0).all() and torch.equal(empty_ref, empty)


# --------------------------------------------------------------------------- teacher summary


@pytest.mark.parametrize("dtype, ks", [(torch.float32, (1, 16)), (torch.bfloat16, (5, 32))])
def test_summary_matches_torch_path(interpreted, dtype, ks):
    """max, log Z, entropy, sampled log-prob and top-k; ids exactly, also through bf16 ties,
    -inf entries (rows with fewer finite entries than k), padded ids and the temperature."""
    tokens, vocab, true_vocab = 20, 150, 143
    logits = make_logits(4, tokens, vocab, dtype, ties=dtype == torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    sampled = torch.randint(0, true_vocab, (tokens,), generator=gen)
    sampled[7] = 146  # padded
    rows = torch.cat([torch.tensor([2, 5, 7]), torch.randperm(tokens, generator=gen)[:11]]).unique()
    for k in ks:
        ref, got = on_both_paths(lambda: vp.vocab_parallel_summary(
            logits, sampled_ids=sampled, topk=k, rows=rows, true_vocab_size=true_vocab,
            temperature=TEMPERATURE))
        assert torch.equal(ref.topk_ids, got.topk_ids), f"top-{k} ids:\n{ref.topk_ids}\n{got.topk_ids}"
        for name, a, b in zip(ref._fields, ref, got):
            assert_same(a, b, f"top-{k} {name}")


@pytest.mark.parametrize("merge", ["bitonic", "insertion"])
def test_local_candidates_when_k_exceeds_the_shard(interpreted, monkeypatch, merge):
    """A shard narrower than k offers all its columns (the padded ones at -inf), in the torch
    path's order: value descending, then lower global id; by either way of merging a tile."""
    monkeypatch.setattr(interpreted, "TOPK_INSERT_LIMIT", 0 if merge == "bitonic" else 1 << 20)
    shard = make_logits(6, 9, 21, torch.bfloat16, ties=True)
    rows = torch.arange(9)
    part = interpreted.summary_partials(shard, rows, None, 30, vocab_start=100, real_columns=17,
                                        temperature=1.0)
    assert part.top_values.shape == (9, 32) and part.sampled is None
    x = shard.float().masked_fill(torch.arange(21) >= 17, float("-inf"))
    values, ids = vp._order_by_value_then_id(x, torch.arange(100, 121).expand(9, 21))
    assert torch.equal(part.top_ids[:, :21], ids)
    assert torch.equal(part.top_values[:, :21], values)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eopd_loss_matches_torch_path(interpreted, dtype):
    """The paper's loss (top-16 FKL, sampled-token RKL) end to end: teacher statistics, loss,
    every metric and the gradient; ties, -inf entries, padded vocabulary, both temperatures != 1,
    masked tokens."""
    tokens, vocab, true_vocab = 24, 160, 151
    student, teacher, sampled, mask = make_student_and_teacher(7, tokens, vocab, true_vocab, dtype)
    old = -3.0 + torch.randn(tokens, generator=torch.Generator().manual_seed(9))
    base = EOPDLossConfig(student_temperature=0.8, teacher_temperature=1.2)
    entropy = vp.vocab_parallel_entropy(teacher.double(), true_vocab_size=true_vocab, temperature=1.2)
    cfg = EOPDLossConfig(**{**base.__dict__, "tau": float(entropy[mask].median())})

    def run():
        x = student.clone().requires_grad_()
        stats = compute_teacher_stats(teacher, sampled, topk=cfg.topk, response_mask=mask,
                                      temperature=cfg.teacher_temperature, true_vocab_size=true_vocab)
        loss, metrics = eopd_loss(x, sampled, mask, stats, old_logprobs=old, config=cfg,
                                  true_vocab_size=true_vocab)
        loss.backward()
        return stats, loss.detach(), metrics, x.grad

    (ref_stats, ref_loss, ref_metrics, ref_grad), (stats, loss, metrics, grad) = on_both_paths(run)
    assert torch.equal(ref_stats.topk_ids, stats.topk_ids)
    assert_same(ref_loss, loss, "loss")
    assert 0.2 < float(metrics["gate_fraction"]) < 0.8
    assert ref_metrics.keys() == metrics.keys()
    for key in ref_metrics:
        assert_same(ref_metrics[key], metrics[key], f"metric {key}")
    assert_same(ref_grad, grad, "gradient", **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_matches_torch_path(interpreted, dtype):
    """The output layer fused with the loss (blocks of 5 rows) on both paths: teacher statistics
    from hidden states, loss, metrics and the gradients of the hidden states and the weight."""
    from megatron_eopd.objective import compute_teacher_stats_from_hidden, eopd_loss_from_hidden

    gen = torch.Generator().manual_seed(11)
    tokens, hidden_size, vocab, true_vocab = 23, 16, 160, 151
    h_s, h_t = (torch.randn(tokens, hidden_size, generator=gen).mul(2).to(dtype) for _ in range(2))
    w_s, w_t = (torch.randn(vocab, hidden_size, generator=gen).div(2).to(dtype) for _ in range(2))
    sampled = torch.randint(0, true_vocab, (tokens,), generator=gen)
    mask = torch.rand(tokens, generator=gen) < 0.8
    old = -3.0 + torch.randn(tokens, generator=gen)
    teacher_entropy = vp.vocab_parallel_entropy((h_t.double() @ w_t.double().t()), true_vocab_size=true_vocab,
                                                 temperature=1.2)
    cfg = EOPDLossConfig(tau=float(teacher_entropy[mask].median()), student_temperature=0.8, teacher_temperature=1.2)

    def run():
        x, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        stats = compute_teacher_stats_from_hidden(h_t, w_t, sampled, topk=cfg.topk, response_mask=mask,
                                                  temperature=cfg.teacher_temperature, true_vocab_size=true_vocab,
                                                  block_tokens=5)
        loss, metrics = eopd_loss_from_hidden(x, w, sampled, mask, stats, old_logprobs=old, config=cfg,
                                              true_vocab_size=true_vocab, block_tokens=5)
        loss.backward()
        return stats, loss.detach(), metrics, x.grad, w.grad

    (ref_stats, ref_loss, ref_metrics, ref_gh, ref_gw), (stats, loss, metrics, gh, gw) = on_both_paths(run)
    assert torch.equal(ref_stats.topk_ids, stats.topk_ids)
    assert_same(ref_stats.entropy, stats.entropy, "teacher entropy")
    assert_same(ref_loss, loss, "loss")
    assert 0.1 < float(metrics["gate_fraction"]) < 0.9
    for key in ref_metrics:
        assert_same(ref_metrics[key], metrics[key], f"metric {key}")
    for what, ref, got in (("hidden-state", ref_gh, gh), ("weight", ref_gw, gw)):
        # Matmuls of the bf16-rounded logit gradient: compare at the scale of the gradient.
        tol = GRAD_TOL[dtype] if dtype == torch.float32 else dict(rtol=0.0, atol=1e-2 * float(ref.abs().max()))
        assert_same(ref, got, f"{what} gradient", **tol)


# --------------------------------------------------------------------------- fused RoPE


def rope_angles(seq, dim, base=10000.0):
    """Megatron's non-interleaved RoPE angles [s, 1, 1, d] (fp32): [theta, theta] per position."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    theta = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return torch.cat([theta, theta], dim=-1)[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_megatron_unfused(interpreted, dtype):
    """Forward and backward of the Triton RoPE against Megatron's unfused rotation, on a strided
    query view (as the QKV split hands it over) with a head count that is not a multiple of the
    kernel's head block."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_eopd.models import rope

    seq, batch, heads, dim = 7, 2, 5, 32
    gen = torch.Generator().manual_seed(5)
    packed = torch.randn(seq, batch, heads, 3 * dim, generator=gen).to(dtype)
    freqs = rope_angles(seq, dim)
    upstream = torch.randn(seq, batch, heads, dim, generator=gen).to(dtype)
    assert rope.kernel_applies(packed[..., :dim], freqs)

    results = []
    for fused in (False, True):
        source = packed.clone().requires_grad_()
        query = source[..., dim : 2 * dim]  # not contiguous
        out = rope.fused_apply_rotary_pos_emb(query, freqs) if fused else _apply_rotary_pos_emb_bshd(query, freqs)
        out.backward(upstream)
        results.append((out.detach(), source.grad[..., dim : 2 * dim]))
    (ref_out, ref_grad), (out, grad) = results
    assert out.dtype == dtype and out.is_contiguous()
    # Megatron rounds cos/sin to the input dtype before multiplying; the kernel rounds once at the end.
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=0.0, atol=2e-2 * float(ref_out.abs().max()))
    assert_same(ref_out, out, "rotated", **tol)
    assert_same(ref_grad, grad, "gradient", **tol)


def test_rope_fusion_in_a_model_matches_unfused(interpreted, model_parallel, monkeypatch):
    """A tiny Qwen3 GPTModel with apply_rope_fusion (the Triton kernel installed in Megatron's slot)
    gives the logits and gradients of the unfused model, and the kernel ran in every layer."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eopd.models import rope
    from megatron_eopd.models.qwen3 import Qwen3Arch
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", rope_utils.fused_apply_rotary_pos_emb)
    calls = []
    real_rotate = rope._rotate
    monkeypatch.setattr(rope, "_rotate", lambda *a, **k: calls.append(k["backward"]) or real_rotate(*a, **k))
    arch = Qwen3Arch(64, 2, 4, 2, 16, 128, 97, tie_word_embeddings=True)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).unsqueeze(0).expand(2, -1)
    results = []
    for fused in (False, True):
        torch.manual_seed(3)
        model = build_qwen3_gpt(arch, params_dtype=torch.float32, layer_spec="local", apply_rope_fusion=fused)
        assert model.config.apply_rope_fusion == fused
        logits = model(tokens, positions, None)
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert rope_utils.fused_apply_rotary_pos_emb is rope.fused_apply_rotary_pos_emb
    # query and key of each of the 2 layers, forward and backward
    assert sorted(calls) == [False] * 4 + [True] * 4, calls
    (ref_logits, ref_grads), (logits, grads) = results
    assert_same(ref_logits, logits, "logits")
    for name in ref_grads:
        assert_same(ref_grads[name], grads[name], f"grad {name}", rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parent_cuda_kernels_match_torch_path():
    """On a GPU: the compiled kernels with their default tiles, at Qwen3's padded vocabulary, against
    the torch path (loss, metrics, gradient, teacher top-k); the Triton step peaks within the
    returned gradient plus a little."""
    tokens, vocab, true_vocab = 256, 151_936, 151_669
    student, teacher, sampled, mask = (
        x.cuda() for x in make_student_and_teacher(13, tokens, vocab, true_vocab, torch.bfloat16))
    cfg = EOPDLossConfig(tau=2.0, teacher_temperature=0.9)

    def run():
        x = student.clone().requires_grad_()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stats = compute_teacher_stats(teacher, sampled, topk=cfg.topk, response_mask=mask,
                                      temperature=cfg.teacher_temperature, true_vocab_size=true_vocab)
        loss, metrics = eopd_loss(x, sampled, mask, stats, config=cfg, true_vocab_size=true_vocab)
        loss.backward()
        torch.cuda.synchronize()
        return stats, loss.detach(), metrics, x.grad, torch.cuda.max_memory_allocated() - start

    (ref_stats, ref_loss, ref_metrics, ref_grad, _), (stats, loss, metrics, grad, peak) = on_both_paths(run)
    assert torch.equal(ref_stats.topk_ids, stats.topk_ids)
    assert_same(ref_stats.topk_logprobs, stats.topk_logprobs, "teacher top-k log-probs")
    assert_same(ref_loss, loss, "loss")
    for key in ref_metrics:
        assert_same(ref_metrics[key], metrics[key], f"metric {key}")
    assert_same(ref_grad, grad, "gradient", **GRAD_TOL[torch.bfloat16])
    assert peak <= grad.numel() * grad.element_size() + (64 << 20), peak


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parent_cuda_rope_and_fused_head():
    """On a GPU: the compiled RoPE against Megatron's unfused rotation at Qwen3-1.7B's attention
    shapes, and the fused head (Triton path) against the loss on full logits at Qwen3's vocabulary,
    peaking far below the full logits and their gradient."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_eopd.models import rope
    from megatron_eopd.objective import compute_teacher_stats_from_hidden, eopd_loss_from_hidden

    seq, batch, heads, dim = 2048, 2, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(seq, batch, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    freqs = rope_angles(seq, dim, base=1_000_000.0).cuda()
    exact = _apply_rotary_pos_emb_bshd(query.double(), freqs.double())
    fused = rope.fused_apply_rotary_pos_emb(query, freqs)
    unfused = _apply_rotary_pos_emb_bshd(query, freqs)
    # The kernel (fp32 math, one rounding) is at least as close to the exact rotation as Megatron's path.
    assert (fused.double() - exact).abs().max() <= (unfused.double() - exact).abs().max() * 1.01

    # 16k tokens: the logits path's two [T, V] tensors (10 GB) dwarf the fused path's fp32 weight-gradient buffer.
    tokens, hidden_size, vocab, true_vocab = 16_384, 1024, 151_936, 151_669
    h_s = torch.randn(tokens, hidden_size, device="cuda", generator=gen, dtype=torch.bfloat16)
    h_t = torch.randn(tokens, hidden_size, device="cuda", generator=gen, dtype=torch.bfloat16)
    w_s = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.05).bfloat16()
    w_t = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.05).bfloat16()
    sampled = torch.randint(0, true_vocab, (tokens,), device="cuda", generator=gen)
    mask = torch.rand(tokens, device="cuda", generator=gen) < 0.8
    cfg = EOPDLossConfig(tau=2.0)
    stats = compute_teacher_stats_from_hidden(h_t, w_t, sampled, topk=16, response_mask=mask, true_vocab_size=true_vocab)
    reference = compute_teacher_stats(h_t @ w_t.t(), sampled, topk=16, response_mask=mask, true_vocab_size=true_vocab)
    assert_same(reference.entropy, stats.entropy, "teacher entropy", rtol=1e-3, atol=1e-3)
    results = []
    for fused_head in (False, True):
        x, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if fused_head:
            loss, _ = eopd_loss_from_hidden(x, w, sampled, mask, stats, config=cfg, true_vocab_size=true_vocab)
        else:
            loss, _ = eopd_loss(x @ w.t(), sampled, mask, stats, config=cfg, true_vocab_size=true_vocab)
        loss.backward()
        torch.cuda.synchronize()
        results.append((loss.detach().float(), x.grad.float(), w.grad.float(),
                        torch.cuda.max_memory_allocated() - start))
    (l0, gh0, gw0, peak0), (l1, gh1, gw1, peak1) = results
    assert_same(l0, l1, "loss", rtol=1e-3, atol=1e-3)
    for what, a, b in (("hidden", gh0, gh1), ("weight", gw0, gw1)):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max(), what
    logits_bytes = tokens * vocab * 2
    assert peak1 < peak0 - logits_bytes, (peak0, peak1)  # at least one [T, V] bf16 tensor less


# --------------------------------------------------------------------------- dispatch


def test_dispatch_rule(interpreted, monkeypatch):
    """auto: bf16/fp16/fp32 where the kernels run, fp64 and teacher logits on torch; torch/triton force."""
    x32, x64 = torch.zeros(3, 8), torch.zeros(3, 8, dtype=torch.float64)
    ids = torch.zeros(3, 1, dtype=torch.int64)
    monkeypatch.delenv(vp.KERNELS_ENV, raising=False)
    assert vp.use_triton_kernels(x32) and vp.use_triton_kernels(x32.half()) and not vp.use_triton_kernels(x64)
    kl = vp.vocab_parallel_token_terms(x32.requires_grad_(), ids, teacher_logits=x32, want_forward_kl=True)
    assert type(kl.log_z.grad_fn).__name__ == "_VocabParallelTokenTermsBackward"  # no kernel for full KL
    monkeypatch.setenv(vp.KERNELS_ENV, "torch")
    assert not vp.use_triton_kernels(x32)
    monkeypatch.setenv(vp.KERNELS_ENV, "triton")
    assert vp.use_triton_kernels(x32)
    with pytest.raises(RuntimeError, match="cannot take torch.float64"):
        vp.use_triton_kernels(x64)
    monkeypatch.setenv(vp.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="torch, triton or auto"):
        vp.use_triton_kernels(x32)


def test_kernels_run_where_triton_was_imported_for():
    """Compiled kernels never take CPU tensors (the CPU path is torch); interpreted ones take CPU
    tensors of the three kernel dtypes only."""
    cpu = torch.zeros(2, 2)
    if not INTERPRETED:
        assert not vp.triton_kernels.available(cpu) and not vp.use_triton_kernels(cpu)
        return
    assert all(vp.triton_kernels.available(cpu.to(d)) for d in (torch.float32, torch.bfloat16, torch.float16))
    assert not vp.triton_kernels.available(cpu.double())
    assert not vp.triton_kernels.available(torch.zeros(2, 2, device="meta"))


# --------------------------------------------------------------------------- tensor parallel


# Defined only in the interpreter session, so that a normal session's shared launch never runs it.
if INTERPRETED:

    @multirank_check(tp=[2])
    def test_tp2_triton_path_matches_torch_path(ctx):
        """Two real shards on gloo: the kernels' partials through the all-reduces and the top-k
        all-gather; k = 30 exceeds the shard (26 columns, 23 of them real on rank 1)."""
        tokens, vocab, true_vocab = 24, 52, 49
        size = vocab // ctx.tp
        lo = ctx.tp_rank * size
        student, teacher, sampled, mask = make_student_and_teacher(10, tokens, vocab, true_vocab,
                                                                   torch.bfloat16)
        student, teacher = (x[:, lo : lo + size].clone() for x in (student, teacher))
        with small_tiles():
            cfg = EOPDLossConfig(topk=30, tau=1.0)

            def run():
                x = student.clone().requires_grad_()
                stats = compute_teacher_stats(teacher, sampled, ctx.tp_group, topk=30, response_mask=mask,
                                              true_vocab_size=true_vocab)
                loss, metrics = eopd_loss(x, sampled, mask, stats, config=cfg, group=ctx.tp_group,
                                          true_vocab_size=true_vocab)
                loss.backward()
                return stats, loss.detach(), metrics, x.grad

            (ref_stats, ref_loss, ref_metrics, ref_grad), (stats, loss, metrics, grad) = on_both_paths(run)
        assert torch.equal(ref_stats.topk_ids, stats.topk_ids)
        for name in ("entropy", "sampled_logprob", "topk_logprobs", "log_z"):
            assert_same(getattr(ref_stats, name), getattr(stats, name), f"teacher {name}")
        assert math.isfinite(float(loss))
        assert_same(ref_loss, loss, "loss")
        for key in ref_metrics:
            assert_same(ref_metrics[key], metrics[key], f"metric {key}")
        assert_same(ref_grad, grad, "gradient", **GRAD_TOL[torch.bfloat16])
