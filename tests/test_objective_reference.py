"""The vocab-parallel EOPD objective against an independent dense float64 reference.

The reference below uses full-vocabulary logits, ``torch.log_softmax`` and plain autograd; it
shares no code with ``megatron_eopd.objective``.  Every multi-rank check builds the same full
logits on every rank from a seeded generator, hands each rank its vocabulary shard, and compares
values (and the shard's gradient) with the reference at ~1e-10.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_eopd.objective import (
    EOPDLossConfig,
    compute_teacher_stats,
    eopd_loss,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_topk,
)
from megatron_eopd.objective.vocab_parallel import vocab_parallel_log_softmax_stats
from megatron_eopd.testing.multirank import multirank_check

TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- dense reference


def dense_log_softmax(logits, temperature=1.0, true_vocab=None):
    z = logits / temperature
    if true_vocab is not None and true_vocab < z.shape[-1]:
        padded = torch.arange(z.shape[-1]) >= true_vocab
        z = z.masked_fill(padded, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def dense_log_z(logits, temperature=1.0, true_vocab=None):
    z = logits / temperature
    if true_vocab is not None:
        z = z[:, :true_vocab]
    return torch.logsumexp(z, dim=-1)


def p_times(p, x):
    """p * x with 0 where p == 0 (0 * -inf is 0 in an expectation; also no NaN gradient)."""
    return p * torch.where(p > 0, x, torch.zeros_like(x))


def dense_entropy(logp):
    return -p_times(logp.exp(), logp).sum(-1)


def dense_topk(logp, k):
    """Largest log-probs first, equal values by lower id (a stable full sort)."""
    order = torch.sort(logp, dim=-1, descending=True, stable=True).indices[:, :k]
    return order, logp.gather(1, order)


def dense_gate(h, cfg):
    if cfg.gate == "hard":
        return (h > cfg.tau).double()
    if cfg.gate == "ramp":
        return ((h - cfg.tau) / cfg.gate_width + 0.5).clamp(0, 1)
    return torch.sigmoid((h - cfg.tau) / cfg.gate_width)


def dense_eopd(student, teacher, y, mask, old, cfg, true_vocab=None, normaliser=None):
    """(loss, metrics) of the EOPD objective on full logits; student gets .grad via autograd."""
    lq = dense_log_softmax(student, cfg.student_temperature, true_vocab)
    lp = dense_log_softmax(teacher, cfg.teacher_temperature, true_vocab)
    valid = mask.bool()
    h_t = dense_entropy(lp)
    lq_y = lq.gather(1, y[:, None])[:, 0]
    lp_y = lp.gather(1, y[:, None])[:, 0]
    if cfg.rkl_mode == "sampled_pg":
        old = lq_y.detach() if old is None else old
        adv = (lp_y - old).detach()
        ratio = (lq_y - old).exp()
        a, b = -ratio * adv, -ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv
        rkl = torch.maximum(a, b)
        clip_frac = (b > a)[valid].double().mean() if valid.any() else torch.tensor(0.0)
    elif cfg.rkl_mode == "analytic":
        rkl = p_times(lq.exp(), lq - lp).sum(-1)
        clip_frac = torch.tensor(0.0)
    else:
        rkl = torch.zeros_like(lq_y)
        clip_frac = torch.tensor(0.0)
    if cfg.fkl_mode == "full":
        fkl = p_times(lp.exp(), lp - lq).sum(-1)
    else:
        ids, top = dense_topk(lp, cfg.topk)
        renorm = torch.log_softmax(top, dim=-1)
        fkl = p_times(renorm.exp(), renorm - lq.gather(1, ids)).sum(-1)
    gate = dense_gate(h_t, cfg)
    per_token = rkl
    if cfg.fkl_mode != "off":
        per_token = per_token + torch.where(gate > 0, cfg.alpha * gate * fkl, torch.zeros_like(fkl))
    n = valid.sum().item() if normaliser is None else normaliser
    loss = per_token[valid].sum() / max(n, 1)

    def mean(x, w=None):
        x = x.detach()[valid]
        if w is None:
            return x.mean() if x.numel() else torch.tensor(0.0, dtype=torch.float64)
        w = w[valid]
        return (x * w).sum() / max(w.sum().item(), 1)

    above = (h_t > cfg.tau).double()
    metrics = {
        "loss": loss.detach(),
        "num_valid_tokens": torch.tensor(float(valid.sum()), dtype=torch.float64),
        "teacher_entropy": mean(h_t),
        "student_entropy": mean(dense_entropy(lq)),
        "gate_fraction": mean(above),
        "gate_weight": mean(gate),
        "rkl_estimate": mean(lq_y - lp_y),
        "clip_fraction": clip_frac.double(),
        "fkl_gated": mean(fkl, above),
    }
    return loss, metrics


# --------------------------------------------------------------------------- test data


def make_case(seed, tokens, vocab, *, ties=False, neg_inf=False, true_vocab=None, masked_rows=True):
    """Full float64 logits (identical on every rank), sampled ids, mask and old log-probs."""
    gen = torch.Generator().manual_seed(seed)
    # Per-token scales spread the teacher entropy from near 0 to near log V around tau.
    scale = torch.exp(torch.empty(tokens, 1).uniform_(-1.0, 2.5, generator=gen)).double()
    student = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * scale
    if ties:  # coarse grid: many equal values, also at the top-k boundary
        student, teacher = (x.mul(2).round().div(2) for x in (student, teacher))
    real = vocab if true_vocab is None else true_vocab
    y = torch.randint(0, real, (tokens,), generator=gen)
    if neg_inf:  # masked-out vocabulary entries, the same on both sides, never the sampled token
        holes = torch.rand(tokens, vocab, generator=gen) < 0.3
        if tokens > 2:  # a row with fewer finite entries than any top-k asks for
            holes[2] = True
            holes[2, :2] = False
        holes[torch.arange(tokens), y] = False
        student = student.masked_fill(holes, float("-inf"))
        teacher = teacher.masked_fill(holes, float("-inf"))
    mask = torch.rand(tokens, generator=gen) < 0.8
    if masked_rows:
        mask[:2] = False
    if neg_inf and tokens > 2:
        mask[2] = True
    lq_y = dense_log_softmax(student, 1.0, true_vocab).gather(1, y[:, None])[:, 0]
    old = lq_y + 0.3 * torch.randn(tokens, generator=gen, dtype=torch.float64)
    return SimpleNamespace(student=student, teacher=teacher, y=y, mask=mask, old=old, true_vocab=true_vocab)


def shard_of(full, ctx):
    size = full.shape[1] // ctx.tp
    lo = ctx.tp_rank * size
    return full[:, lo : lo + size].clone(), lo, lo + size


def group_of(ctx):
    return ctx.tp_group if ctx.tp > 1 else None


def assert_grad_matches(shard, dense_full_grad, lo, hi, what, **tol):
    torch.testing.assert_close(shard.grad, dense_full_grad[:, lo:hi], msg=lambda m: f"{what} grad: {m}", **(tol or TOL))


# --------------------------------------------------------------------------- multi-rank checks

PRIMITIVE_CASES = {
    "random": dict(tokens=37, vocab=96, topks=(1, 7), temperature=1.0),
    # ties, -inf entries, padded vocabulary, k beyond the shard (96/4 = 24 < 30), temperature
    "edge": dict(tokens=29, vocab=96, topks=(5, 30), temperature=0.7, ties=True, neg_inf=True, true_vocab=90),
}


@multirank_check(tp=[1, 2, 4], case=list(PRIMITIVE_CASES))
def test_primitives_match_dense(ctx):
    spec = PRIMITIVE_CASES[ctx.params["case"]]
    c = make_case(ctx.seed, spec["tokens"], spec["vocab"], ties=spec.get("ties", False),
                  neg_inf=spec.get("neg_inf", False), true_vocab=spec.get("true_vocab"))
    temp, tv, group = spec["temperature"], c.true_vocab, group_of(ctx)
    kw = dict(temperature=temp, true_vocab_size=tv, chunk_tokens=5)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    ids = torch.randint(0, tv or spec["vocab"], (spec["tokens"], 4), generator=gen)
    ids[:, 3] = ids[:, 0]  # duplicates accumulate
    if spec.get("neg_inf"):  # keep the weighted sums finite: gather only finite entries
        finite = torch.isfinite(c.student.gather(1, ids)).all(1)
        ids[~finite] = c.y[~finite, None]
    w = torch.randn(spec["tokens"], 4, generator=gen, dtype=torch.float64)

    # log Z and max
    full = c.student.clone().requires_grad_()
    ref_log_z = dense_log_z(full, temp, tv)
    (ref_log_z * w[:, 0]).sum().backward()
    shard, lo, hi = shard_of(c.student, ctx)
    shard.requires_grad_()
    stats = vocab_parallel_log_softmax_stats(shard, group, **kw)
    torch.testing.assert_close(stats.log_z, ref_log_z.detach(), **TOL)
    real = tv or spec["vocab"]
    torch.testing.assert_close(stats.max, (c.student[:, :real] / temp).max(-1).values, **TOL)
    (stats.log_z * w[:, 0]).sum().backward()
    assert_grad_matches(shard, full.grad, lo, hi, "log Z")

    # log-probs at global ids, entropy
    for what, dense_fn, shard_fn in [
        ("logprobs", lambda x: dense_log_softmax(x, temp, tv).gather(1, ids),
         lambda s: vocab_parallel_logprobs(s, ids, group, **kw)),
        ("entropy", lambda x: dense_entropy(dense_log_softmax(x, temp, tv))[:, None],
         lambda s: vocab_parallel_entropy(s, group, **kw)[:, None]),
    ]:
        full = c.student.clone().requires_grad_()
        ref = dense_fn(full)
        (ref * w[:, : ref.shape[1]]).sum().backward()
        shard, lo, hi = shard_of(c.student, ctx)
        shard.requires_grad_()
        out = shard_fn(shard)
        torch.testing.assert_close(out, ref.detach(), msg=lambda m: f"{what}: {m}", **TOL)
        (out * w[:, : out.shape[1]]).sum().backward()
        assert_grad_matches(shard, full.grad, lo, hi, what)

    # exact KL both ways, different temperatures on each side
    teacher_shard, _, _ = shard_of(c.teacher, ctx)
    for direction in ("forward", "reverse"):
        full = c.student.clone().requires_grad_()
        lq, lp = dense_log_softmax(full, temp, tv), dense_log_softmax(c.teacher, 1.3, tv)
        ref = (p_times(lp.exp(), lp - lq) if direction == "forward" else p_times(lq.exp(), lq - lp)).sum(-1)
        (ref * w[:, 1]).sum().backward()
        shard, lo, hi = shard_of(c.student, ctx)
        shard.requires_grad_()
        out = vocab_parallel_kl(shard, teacher_shard, group, direction=direction, teacher_temperature=1.3, **kw)
        torch.testing.assert_close(out, ref.detach(), msg=lambda m: f"{direction} KL: {m}", **TOL)
        (out * w[:, 1]).sum().backward()
        assert_grad_matches(shard, full.grad, lo, hi, f"{direction} KL")

    # global top-k (ids exactly, ties by lower id) and teacher statistics
    lp_t = dense_log_softmax(c.teacher, temp, tv)
    for k in spec["topks"]:
        ref_ids, ref_lp = dense_topk(lp_t, k)
        got_ids, got_lp = vocab_parallel_topk(teacher_shard, k, group, **kw)
        assert torch.equal(got_ids, ref_ids), f"top-{k} ids differ:\n{got_ids}\n{ref_ids}"
        torch.testing.assert_close(got_lp, ref_lp, **TOL)
    k = spec["topks"][-1]
    tstats = compute_teacher_stats(teacher_shard, c.y, group, topk=k, response_mask=c.mask,
                                   temperature=temp, true_vocab_size=tv, chunk_tokens=3)
    m = c.mask
    ref_ids, ref_lp = dense_topk(lp_t, k)
    torch.testing.assert_close(tstats.entropy[m], dense_entropy(lp_t)[m], **TOL)
    torch.testing.assert_close(tstats.sampled_logprob[m], lp_t.gather(1, c.y[:, None])[m, 0], **TOL)
    torch.testing.assert_close(tstats.log_z[m], dense_log_z(c.teacher, temp, tv)[m], **TOL)
    assert torch.equal(tstats.topk_ids[m], ref_ids[m])
    torch.testing.assert_close(tstats.topk_logprobs[m], ref_lp[m], **TOL)
    assert (tstats.entropy[~m] == 0).all() and tstats.topk_ids.dtype == torch.int64


LOSS_VARIANTS = {
    "paper": dict(cfg=dict(), tau="median"),
    "opd_tau_inf": dict(cfg=dict(tau=math.inf)),
    "fkl_only": dict(cfg=dict(rkl_mode="off", topk=5), tau="median", old=False),
    "exact_kl_temps": dict(cfg=dict(fkl_mode="full", rkl_mode="analytic", teacher_temperature=1.5,
                                    student_temperature=0.7, alpha=0.5), tau="median", teacher_logits=True),
    "soft_gates": dict(cfg=dict(gate="ramp", gate_width=1.0), tau="median", also=dict(gate="sigmoid", gate_width=0.3)),
    # ties, -inf, padded vocab, k beyond the shard, asymmetric clip, chunk of 1, global normaliser
    "edge": dict(cfg=dict(topk=30, clip_eps_low=0.1, clip_eps_high=0.3, chunk_tokens=1), tau="median",
                 case=dict(ties=True, neg_inf=True, true_vocab=90), normaliser=77),
    "all_masked": dict(cfg=dict(), all_masked=True),
}


def _median_tau(c, cfg_kwargs):
    h = dense_entropy(dense_log_softmax(c.teacher, cfg_kwargs.get("teacher_temperature", 1.0), c.true_vocab))
    return float(h[c.mask].median()) + 1e-6 if c.mask.any() else 0.8


@multirank_check(tp=[1, 2, 4], variant=list(LOSS_VARIANTS))
def test_loss_matches_dense(ctx):
    spec = LOSS_VARIANTS[ctx.params["variant"]]
    c = make_case(ctx.seed, 48, 96, **spec.get("case", {}))
    if spec.get("all_masked"):
        c.mask[:] = False
    group = group_of(ctx)
    cfgs = [dict(spec["cfg"])] + ([dict(spec["cfg"], **spec["also"])] if "also" in spec else [])
    for cfg_kwargs in cfgs:
        if spec.get("tau") == "median":
            cfg_kwargs["tau"] = _median_tau(c, cfg_kwargs)
        cfg = EOPDLossConfig(**cfg_kwargs)
        old = c.old if spec.get("old", True) else None
        normaliser = spec.get("normaliser")

        full = c.student.clone().requires_grad_()
        ref_loss, ref_metrics = dense_eopd(full, c.teacher, c.y, c.mask, old, cfg, c.true_vocab, normaliser)
        ref_loss.backward()

        shard, lo, hi = shard_of(c.student, ctx)
        teacher_shard, _, _ = shard_of(c.teacher, ctx)
        shard.requires_grad_()
        stats = compute_teacher_stats(teacher_shard, c.y, group, topk=cfg.topk, response_mask=c.mask,
                                      temperature=cfg.teacher_temperature, true_vocab_size=c.true_vocab)
        loss, metrics = eopd_loss(
            shard, c.y, c.mask, stats, old_logprobs=old, config=cfg, group=group,
            teacher_logits=teacher_shard if spec.get("teacher_logits") else None,
            true_vocab_size=c.true_vocab, num_valid_tokens=normaliser,
        )
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
        assert_grad_matches(shard, full.grad, lo, hi, f"loss {cfg_kwargs}")
        for key, ref_value in ref_metrics.items():
            if key == "fkl_gated" and cfg.fkl_mode == "off":
                continue
            torch.testing.assert_close(metrics[key], ref_value, msg=lambda m: f"metric {key}: {m}", **TOL)
        assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
        if spec.get("all_masked"):
            assert loss.item() == 0.0 and (shard.grad == 0).all()
        if ctx.params["variant"] == "paper":
            gated = metrics["gate_fraction"].item()
            assert 0.2 < gated < 0.8, f"test data should gate about half the tokens, got {gated}"

        if ctx.params["variant"] == "opd_tau_inf":
            # tau = +inf must be the OPD baseline (FKL off) to the last bit, value and gradient.
            opd = shard.detach().clone().requires_grad_()
            opd_loss, _ = eopd_loss(opd, c.y, c.mask, stats, old_logprobs=old,
                                    config=EOPDLossConfig(fkl_mode="off"), group=group)
            opd_loss.backward()
            assert torch.equal(opd_loss, loss), (opd_loss, loss)
            assert torch.equal(opd.grad, shard.grad)


@multirank_check(tp=[1, 4])
def test_bf16_inputs_close_to_fp32_reference(ctx):
    c = make_case(ctx.seed, 40, 200, true_vocab=190)
    student16, teacher16 = c.student.bfloat16(), c.teacher.bfloat16()
    cfg = EOPDLossConfig(tau=_median_tau(c, {}), chunk_tokens=7)
    full = student16.double().requires_grad_()
    ref_loss, ref_metrics = dense_eopd(full, teacher16.double(), c.y, c.mask, c.old, cfg, c.true_vocab)
    ref_loss.backward()

    group = group_of(ctx)
    shard, lo, hi = shard_of(student16, ctx)
    teacher_shard, _, _ = shard_of(teacher16, ctx)
    shard.requires_grad_()
    stats = compute_teacher_stats(teacher_shard, c.y, group, topk=cfg.topk, response_mask=c.mask, true_vocab_size=190)
    assert stats.topk_logprobs.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    loss, metrics = eopd_loss(shard, c.y, c.mask, stats, old_logprobs=c.old.float(), config=cfg, group=group,
                              true_vocab_size=190)
    loss.backward()
    assert loss.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shard.grad.double(), full.grad[:, lo:hi], rtol=2e-2, atol=1e-4)
    for key in ("teacher_entropy", "student_entropy", "gate_fraction", "fkl_gated"):
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key], rtol=1e-5, atol=1e-5)


@multirank_check(tp=[2])
def test_full_vocab_kl_matches_modelopt(ctx):
    """ModelOpt's LogitsKLLoss: reverse=False is KL(teacher||student) = our forward KL.

    It returns each rank's partial KL (tp_reduce=True: Megatron sums it over TP afterwards) and
    differentiates through an autograd all-reduce, so per-rank backward of the partial sums gives
    each shard's gradient of the total.
    """
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    seq, batch, vocab = 6, 3, 128
    c = make_case(ctx.seed, seq * batch, vocab, masked_rows=False)
    # ModelOpt computes in fp32 whatever the input; ours runs in fp64 (exact to 1e-10 above), so
    # the tolerance is fp32 rounding relative to the largest entry: log-probs here reach ~-80,
    # so log q - log p carries ~5e-6 of rounding.  (A non-autograd all-reduce is off by ~1e-1.)
    shard, lo, hi = shard_of(c.student, ctx)
    teacher_shard, _, _ = shard_of(c.teacher, ctx)
    config = SimpleNamespace(tensor_model_parallel_size=ctx.tp)
    for reverse, direction in ((False, "forward"), (True, "reverse")):
        theirs_in = shard.float().requires_grad_()
        partial, tp_reduce, _ = LogitsKLLoss(config, temperature=1.0, reverse=reverse)(
            theirs_in.view(seq, batch, -1), teacher_shard.float().view(seq, batch, -1)
        )
        assert tp_reduce
        partial.sum().backward()
        theirs = partial.detach().transpose(0, 1).reshape(-1).double()  # [b, s] -> token order [s, b]
        dist.all_reduce(theirs, group=ctx.tp_group)

        ours_in = shard.clone().requires_grad_()
        ours = vocab_parallel_kl(ours_in, teacher_shard, ctx.tp_group, direction=direction)
        ours.sum().backward()
        for what, a, b in (("value", ours.detach(), theirs), ("grad", ours_in.grad, theirs_in.grad.double())):
            scale = float(a.abs().max())
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale,
                                       msg=lambda m: f"{direction} KL {what} vs modelopt (max |x| {scale:.3g}): {m}")


# --------------------------------------------------------------------------- the output layer fused in

FUSED_HEAD_VARIANTS = {
    "paper": dict(cfg=dict(), blocks=5),
    "opd_tau_inf": dict(cfg=dict(tau=math.inf), blocks=None),
    "fkl_only": dict(cfg=dict(rkl_mode="off", topk=5), old=False, blocks=7),
    "soft_gate_temps": dict(cfg=dict(gate="sigmoid", gate_width=0.3, student_temperature=0.7,
                                     teacher_temperature=1.5, alpha=0.5), blocks=1),
    # padded vocabulary, k beyond the shard (96/4 = 24 < 30), global normaliser
    "padded": dict(cfg=dict(topk=30, clip_eps_low=0.1, clip_eps_high=0.3), true_vocab=90, normaliser=77, blocks=4),
    "all_masked": dict(cfg=dict(), all_masked=True, blocks=3),
}


def make_head_case(seed, tokens, hidden, vocab, true_vocab=None):
    """Hidden states and output weights (float64, identical on every rank) whose logits spread the
    teacher's entropy around the median, plus sampled ids, mask and old log-probs."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(tokens, 1).uniform_(-1.0, 1.5, generator=gen)).double()
    h_s = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64) * scale
    h_t = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64) * scale
    w_s = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    w_t = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    y = torch.randint(0, true_vocab or vocab, (tokens,), generator=gen)
    mask = torch.rand(tokens, generator=gen) < 0.8
    mask[:2] = False
    lq_y = dense_log_softmax(h_s @ w_s.t(), 1.0, true_vocab).gather(1, y[:, None])[:, 0]
    old = lq_y + 0.3 * torch.randn(tokens, generator=gen, dtype=torch.float64)
    return SimpleNamespace(h_s=h_s, h_t=h_t, w_s=w_s, w_t=w_t, y=y, mask=mask, old=old, true_vocab=true_vocab)


def weight_shard_of(weight, ctx):
    size = weight.shape[0] // ctx.tp
    lo = ctx.tp_rank * size
    return weight[lo : lo + size].clone(), lo, lo + size


@multirank_check(tp=[1, 2, 4], variant=list(FUSED_HEAD_VARIANTS))
def test_fused_head_loss_matches_dense(ctx):
    """eopd_loss_from_hidden / compute_teacher_stats_from_hidden against the dense loss of h @ W^T:
    value, metrics, and the gradients of the hidden states and of this rank's weight rows."""
    from megatron_eopd.objective import compute_teacher_stats_from_hidden, eopd_loss_from_hidden

    spec = FUSED_HEAD_VARIANTS[ctx.params["variant"]]
    c = make_head_case(ctx.seed, 45, 24, 96, spec.get("true_vocab"))
    if spec.get("all_masked"):
        c.mask[:] = False
    group = group_of(ctx)
    cfg_kwargs = dict(spec["cfg"])
    if "tau" not in cfg_kwargs:
        lp = dense_log_softmax(c.h_t @ c.w_t.t(), cfg_kwargs.get("teacher_temperature", 1.0), c.true_vocab)
        cfg_kwargs["tau"] = float(dense_entropy(lp)[c.mask].median()) + 1e-6 if c.mask.any() else 0.8
    cfg = EOPDLossConfig(**cfg_kwargs)
    old = c.old if spec.get("old", True) else None
    normaliser = spec.get("normaliser")

    h_ref, w_ref = c.h_s.clone().requires_grad_(), c.w_s.clone().requires_grad_()
    ref_loss, ref_metrics = dense_eopd(h_ref @ w_ref.t(), c.h_t @ c.w_t.t(), c.y, c.mask, old, cfg, c.true_vocab,
                                       normaliser)
    ref_loss.backward()

    w_t_shard, _, _ = weight_shard_of(c.w_t, ctx)
    stats = compute_teacher_stats_from_hidden(c.h_t, w_t_shard, c.y, group, topk=cfg.topk, response_mask=c.mask,
                                              temperature=cfg.teacher_temperature, true_vocab_size=c.true_vocab,
                                              block_tokens=spec["blocks"])
    on_logits = compute_teacher_stats(c.h_t @ w_t_shard.t(), c.y, group, topk=cfg.topk, response_mask=c.mask,
                                      temperature=cfg.teacher_temperature, true_vocab_size=c.true_vocab)
    for name in ("entropy", "sampled_logprob", "topk_logprobs", "log_z"):
        torch.testing.assert_close(getattr(stats, name), getattr(on_logits, name), msg=name, **TOL)
    assert torch.equal(stats.topk_ids, on_logits.topk_ids)

    hidden = c.h_s.clone().requires_grad_()
    w_shard, lo, hi = weight_shard_of(c.w_s, ctx)
    w_shard.requires_grad_()
    loss, metrics = eopd_loss_from_hidden(hidden, w_shard, c.y, c.mask, stats, old_logprobs=old, config=cfg,
                                          group=group, true_vocab_size=c.true_vocab, num_valid_tokens=normaliser,
                                          block_tokens=spec["blocks"])
    (loss * 2.5).backward()  # the upstream gradient scales what forward computed
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
    torch.testing.assert_close(hidden.grad, 2.5 * h_ref.grad, msg="hidden-state gradient", **TOL)
    torch.testing.assert_close(w_shard.grad, 2.5 * w_ref.grad[lo:hi], msg="weight-shard gradient", **TOL)
    for key, ref_value in ref_metrics.items():
        if key == "fkl_gated" and cfg.fkl_mode == "off":
            continue
        torch.testing.assert_close(metrics[key], ref_value, msg=lambda m: f"metric {key}: {m}", **TOL)
    if spec.get("all_masked"):
        assert loss.item() == 0.0 and (hidden.grad == 0).all() and (w_shard.grad == 0).all()


@multirank_check(tp=[1, 2])
def test_fused_head_bf16_close_to_full_logits(ctx):
    """In bf16, blocks (fp32-accumulated weight gradient) agree with the head run on all tokens at once."""
    from megatron_eopd.objective import compute_teacher_stats_from_hidden, eopd_loss_from_hidden

    c = make_head_case(ctx.seed, 64, 32, 128)
    group = group_of(ctx)
    cfg = EOPDLossConfig(tau=1.0)
    w_t = weight_shard_of(c.w_t, ctx)[0].bfloat16()
    stats = compute_teacher_stats_from_hidden(c.h_t.bfloat16(), w_t, c.y, group, response_mask=c.mask)
    results = []
    for fused in (False, True):
        hidden = c.h_s.bfloat16().requires_grad_()
        w_shard = weight_shard_of(c.w_s, ctx)[0].bfloat16().requires_grad_()
        if fused:
            loss, _ = eopd_loss_from_hidden(hidden, w_shard, c.y, c.mask, stats, old_logprobs=c.old, config=cfg,
                                            group=group, block_tokens=9)
        else:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            h_in = copy_to_tensor_model_parallel_region(hidden) if group is not None else hidden
            loss, _ = eopd_loss(h_in @ w_shard.t(), c.y, c.mask, stats, old_logprobs=c.old, config=cfg, group=group)
        loss.backward()
        results.append((loss.detach().double(), hidden.grad.double(), w_shard.grad.double()))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-3, atol=1e-3)
    for what, a, b in (("hidden", gh1, gh0), ("weight", gw1, gw0)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 2e-2 * scale, f"{what} gradient differs by {(a - b).abs().max()} of {scale}"
