"""Single-process checks of the objective: config validation, autograd gradcheck, masking,
chunking invariance, guardrails.  (Multi-rank equivalence lives in test_objective_reference.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_eopd.objective import (
    EOPDLossConfig,
    compute_teacher_stats,
    entropy_gate,
    eopd_loss,
    vocab_parallel_topk,
)
from megatron_eopd.objective.vocab_parallel import vocab_parallel_token_terms


def _case(tokens=12, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(tokens, 1).uniform_(-1.0, 2.5, generator=gen)).double()
    student = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = torch.rand(tokens, generator=gen) < 0.75
    mask[0] = False
    old = torch.randn(tokens, generator=gen, dtype=torch.float64) - 3.0
    return student, teacher, y, mask, old


def _loss_and_grad(student, teacher, y, mask, old, cfg, **kwargs):
    x = student.clone().requires_grad_()
    stats = compute_teacher_stats(teacher, y, topk=cfg.topk, response_mask=mask, temperature=cfg.teacher_temperature)
    loss, metrics = eopd_loss(x, y, mask, stats, old_logprobs=old, config=cfg, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tau", math.nan, "tau"),
        ("alpha", -1.0, "alpha"),
        ("topk", 0, "topk"),
        ("clip_eps_low", 1.0, "clip_eps_low"),
        ("clip_eps_high", -0.1, "clip_eps_high"),
        ("gate", "step", "gate must be one of"),
        ("gate_width", 0.0, "gate_width"),
        ("fkl_mode", "exact", "fkl_mode"),
        ("rkl_mode", "pg", "rkl_mode"),
        ("teacher_temperature", 0.0, "teacher_temperature"),
        ("student_temperature", math.inf, "student_temperature"),
        ("chunk_tokens", 0, "chunk_tokens"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        EOPDLossConfig(**{field: value})


def test_config_rejects_empty_loss_and_accepts_infinite_tau():
    with pytest.raises(ValueError, match="both 'off'"):
        EOPDLossConfig(fkl_mode="off", rkl_mode="off")
    assert EOPDLossConfig(tau=math.inf).tau == math.inf


def test_token_terms_pass_gradcheck():
    """Finite differences against the hand-written backward, every output at once."""
    student, teacher, _, _, _ = _case(tokens=6, vocab=17)
    ids = torch.randint(0, 17, (4, 3), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 2, 3, 5])

    def terms(x):
        out = vocab_parallel_token_terms(
            x, ids, rows=rows, teacher_logits=teacher, want_entropy=True, want_forward_kl=True,
            want_reverse_kl=True, temperature=1.3, teacher_temperature=0.8, chunk_tokens=3,
        )
        return out.log_z, out.logprobs, out.entropy, out.forward_kl, out.reverse_kl

    assert torch.autograd.gradcheck(terms, (student.clone().requires_grad_(),))


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    student, teacher, y, mask, old = _case()
    mask[:] = False
    loss, grad, metrics = _loss_and_grad(student, teacher, y, mask, old, EOPDLossConfig())
    assert loss.item() == 0.0
    assert (grad == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["num_valid_tokens"].item() == 0


def test_masked_rows_neither_contribute_nor_receive_gradient():
    student, teacher, y, mask, old = _case()
    cfg = EOPDLossConfig(tau=2.0)
    loss, grad, _ = _loss_and_grad(student, teacher, y, mask, old, cfg)
    garbage = student.clone()
    garbage[~mask] = math.nan  # whatever sits in masked rows must not leak
    teacher_garbage = teacher.clone()
    teacher_garbage[~mask] = math.inf
    loss2, grad2, _ = _loss_and_grad(garbage, teacher_garbage, y, mask, old, cfg)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)
    assert (grad2[~mask] == 0).all() and grad2[mask].abs().sum() > 0


@pytest.mark.parametrize("cfg", [
    EOPDLossConfig(tau=2.0),
    EOPDLossConfig(tau=2.0, fkl_mode="full", rkl_mode="analytic", gate="sigmoid"),
])
def test_chunking_does_not_change_results(cfg):
    student, teacher, y, mask, old = _case(tokens=23)
    results = []
    for chunk in (1, 4, None):
        config = EOPDLossConfig(**{**cfg.__dict__, "chunk_tokens": chunk})
        results.append(_loss_and_grad(student, teacher, y, mask, old, config, teacher_logits=teacher))
    for loss, grad, _ in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-13, atol=1e-15)


def test_leading_dims_and_tensor_normaliser():
    student, teacher, y, mask, old = _case(tokens=12)
    cfg = EOPDLossConfig(tau=2.0)
    flat_loss, flat_grad, _ = _loss_and_grad(student, teacher, y, mask, old, cfg, num_valid_tokens=20)
    x = student.view(3, 4, -1).clone().requires_grad_()
    stats = compute_teacher_stats(teacher.view(3, 4, -1), y.view(3, 4), response_mask=mask.view(3, 4))
    loss, _ = eopd_loss(x, y.view(3, 4), mask.view(3, 4), stats, old_logprobs=old.view(3, 4), config=cfg,
                        num_valid_tokens=torch.tensor(20))
    loss.backward()
    torch.testing.assert_close(loss.detach(), flat_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(x.grad.view(12, -1), flat_grad, rtol=1e-14, atol=0)


def test_teacher_stats_from_logits_equal_passed_stats():
    student, teacher, y, mask, old = _case()
    cfg = EOPDLossConfig(tau=2.0)
    loss, grad, _ = _loss_and_grad(student, teacher, y, mask, old, cfg)
    x = student.clone().requires_grad_()
    loss2, _ = eopd_loss(x, y, mask, None, old_logprobs=old, config=cfg, teacher_logits=teacher)
    loss2.backward()
    assert torch.equal(loss, loss2.detach()) and torch.equal(grad, x.grad)


def test_guardrails():
    student, teacher, y, mask, old = _case()
    stats = compute_teacher_stats(teacher, y, topk=4)
    with pytest.raises(ValueError, match="teacher_logits"):
        eopd_loss(student, y, mask, stats, config=EOPDLossConfig(fkl_mode="full"))
    with pytest.raises(ValueError, match="top-16"):
        eopd_loss(student, y, mask, stats, config=EOPDLossConfig())
    with pytest.raises(ValueError, match="temperature"):
        eopd_loss(student, y, mask, stats, config=EOPDLossConfig(topk=4, teacher_temperature=2.0))
    with pytest.raises(ValueError, match="one entry per token"):
        eopd_loss(student, y[:-1], mask, stats, config=EOPDLossConfig(topk=4))
    with pytest.raises(ValueError, match="must match"):
        eopd_loss(student, y, mask, stats, config=EOPDLossConfig(topk=4, fkl_mode="full"),
                  teacher_logits=teacher[:, :-1])
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        vocab_parallel_topk(teacher, 41)


def test_topk_ties_prefer_lower_ids_and_padding_is_excluded():
    logits = torch.zeros(3, 10)
    logits[1, 7] = 1.0
    logits[2, 9] = 100.0  # a padded id: must never be chosen
    logits[0, 2:8] = -math.inf  # fewer finite entries than k
    ids, logp = vocab_parallel_topk(logits, 4, true_vocab_size=8, chunk_tokens=2)
    assert ids.tolist() == [[0, 1, 2, 3], [7, 0, 1, 2], [0, 1, 2, 3]]
    torch.testing.assert_close(logp[0], torch.tensor([-math.log(2.0)] * 2 + [-math.inf] * 2))
    torch.testing.assert_close(logp[2], torch.full((4,), -math.log(8.0)))


def test_gates_are_half_at_tau_and_tend_to_the_hard_gate():
    h = torch.tensor([0.0, 0.8, 0.80001, 5.0], dtype=torch.float64)
    assert entropy_gate(h, EOPDLossConfig()).tolist() == [0.0, 0.0, 1.0, 1.0]
    for gate in ("ramp", "sigmoid"):
        assert entropy_gate(h, EOPDLossConfig(gate=gate))[1].item() == pytest.approx(0.5)
        sharp = entropy_gate(h, EOPDLossConfig(gate=gate, gate_width=1e-9))
        assert sharp[[0, 3]].tolist() == [0.0, 1.0]
    assert entropy_gate(h, EOPDLossConfig(tau=math.inf, gate="sigmoid")).sum().item() == 0.0


def test_opd_measures_fkl_on_high_entropy_tokens_without_training_on_it():
    """fkl_mode="off" (OPD) still reports ``fkl_gated``, the teacher-top-k forward KL averaged over the tokens
    whose teacher entropy exceeds tau, while its loss and gradient are the reverse-KL term's alone; checked
    against a dense float64 computation on full logits (the replication study compares OPD on this metric)."""
    student, teacher, y, mask, old = _case(tokens=24, vocab=40, seed=3)
    lp = torch.log_softmax(teacher, dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    tau = float(entropy[mask].median()) + 1e-9
    k = 6
    loss, grad, metrics = _loss_and_grad(student, teacher, y, mask, old, EOPDLossConfig(tau=tau, topk=k, fkl_mode="off"))

    lq = torch.log_softmax(student, dim=-1)
    top_lp, top_ids = torch.topk(lp, k, dim=-1)
    renorm = torch.log_softmax(top_lp, dim=-1)
    fkl = (renorm.exp() * (renorm - lq.gather(1, top_ids))).sum(-1)
    above = (entropy > tau) & mask
    assert 0 < int(above.sum()) < int(mask.sum())
    torch.testing.assert_close(metrics["fkl_gated"], fkl[above].mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["gate_fraction"], above.sum().double() / mask.sum(), rtol=1e-12, atol=0)

    x = student.clone().requires_grad_()
    logq_y = torch.log_softmax(x, dim=-1).gather(1, y[:, None])[:, 0]
    advantage = lp.gather(1, y[:, None])[:, 0] - old
    ratio = (logq_y - old).exp()
    rkl = torch.maximum(-ratio * advantage, -ratio.clamp(0.8, 1.2) * advantage)
    reference = rkl[mask].sum() / mask.sum()
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-14)
    assert float(metrics["loss_fkl"]) == 0.0

    # EOPD on the same tokens reports the same diagnostic (it trains on it; OPD only measures it).
    _, _, eopd_metrics = _loss_and_grad(student, teacher, y, mask, old, EOPDLossConfig(tau=tau, topk=k))
    torch.testing.assert_close(eopd_metrics["fkl_gated"], metrics["fkl_gated"], rtol=1e-12, atol=0)
