"""The EOPD objective on vocab-sharded student logits (SPEC.md; paper.md sections 1.2-1.6).

Per valid response token t (q: student, q_old: student at rollout / before the update, p: teacher):

    A_t     = stopgrad(log p(y_t) - log q_old(y_t))
    r_t     = exp(log q(y_t) - log q_old(y_t))
    L_rkl   = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    L_fkl   = Σ_{v in top-k(p)} p~(v) (log p~(v) - log q(v))    p~: teacher renormalised on its top-k,
                                                                 log q: FULL-vocabulary log-softmax
    L_t     = L_rkl + alpha * g(H_t) * L_fkl                       g(H) = 1[H > tau] (hard gate)
    loss    = Σ_valid L_t / N                                      N = all valid tokens

Options (``EOPDLossConfig``): exact full-vocabulary FKL or analytic reverse KL instead of the
sampled terms (these take the teacher's logit shards), either term off (OPD baseline = FKL off,
or tau = +inf), soft gates, temperatures.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .fused_head import head_token_loss
from .teacher_stats import TeacherTokenStats, compute_teacher_stats
from .vocab_parallel import TokenTerms, compute_dtype, vocab_parallel_token_terms

GATES = ("hard", "ramp", "sigmoid")
FKL_MODES = ("topk", "full", "off")
RKL_MODES = ("sampled_pg", "analytic", "off")


@dataclasses.dataclass
class EOPDLossConfig:
    """Settings of :func:`eopd_loss`; defaults are the paper's EOPD.

    gate: "hard" is 1[H > tau]; "ramp" rises linearly from 0 at tau - gate_width/2 to 1 at
    tau + gate_width/2; "sigmoid" is sigmoid((H - tau) / gate_width).  Both soft gates are 1/2
    at H = tau and tend to the hard gate as gate_width -> 0.
    fkl_mode: "topk" (paper), "full" (exact KL(p||q), needs teacher logits), "off" (OPD).
    rkl_mode: "sampled_pg" (paper: PPO-clipped sampled-token policy gradient), "analytic"
    (exact KL(q||p), needs teacher logits), "off" (FKL-only).
    chunk_tokens: tokens upcast to fp32 at a time (None: about 4M vocabulary entries on CPU,
    32M on GPU).
    """

    tau: float = 0.8
    alpha: float = 1.0
    topk: int = 16
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    gate: str = "hard"
    gate_width: float = 0.2
    fkl_mode: str = "topk"
    rkl_mode: str = "sampled_pg"
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    chunk_tokens: Optional[int] = None

    def __post_init__(self):
        if math.isnan(self.tau):
            raise ValueError("tau must be a number (+inf turns the FKL term off), got nan")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {self.alpha}")
        if int(self.topk) != self.topk or self.topk < 1:
            raise ValueError(f"topk must be a positive integer, got {self.topk}")
        if not 0 <= self.clip_eps_low < 1:
            raise ValueError(f"clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        if not (math.isfinite(self.clip_eps_high) and self.clip_eps_high >= 0):
            raise ValueError(f"clip_eps_high must be finite and >= 0, got {self.clip_eps_high}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not (math.isfinite(self.gate_width) and self.gate_width > 0):
            raise ValueError(f"gate_width must be finite and > 0, got {self.gate_width}")
        if self.fkl_mode not in FKL_MODES:
            raise ValueError(f"fkl_mode must be one of {FKL_MODES}, got {self.fkl_mode!r}")
        if self.rkl_mode not in RKL_MODES:
            raise ValueError(f"rkl_mode must be one of {RKL_MODES}, got {self.rkl_mode!r}")
        if self.fkl_mode == "off" and self.rkl_mode == "off":
            raise ValueError("fkl_mode and rkl_mode are both 'off': the loss would be empty")
        for name in ("teacher_temperature", "student_temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be None or >= 1, got {self.chunk_tokens}")

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether the exact full-vocabulary options are on (they need teacher logit shards)."""
        return self.fkl_mode == "full" or self.rkl_mode == "analytic"


def entropy_gate(teacher_entropy: Tensor, config: EOPDLossConfig) -> Tensor:
    """Per-token FKL weight g(H) in [0, 1] (see :class:`EOPDLossConfig`)."""
    if config.gate == "hard":
        return (teacher_entropy > config.tau).to(teacher_entropy.dtype)
    scaled = (teacher_entropy - config.tau) / config.gate_width
    if config.gate == "ramp":
        return (scaled + 0.5).clamp(0.0, 1.0)
    return torch.sigmoid(scaled)


def _mean(values: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted mean that is 0 (not NaN) over an empty selection."""
    values = values.detach()
    if weights is None:
        return values.sum() / max(values.numel(), 1)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def eopd_loss(
    student_logits: Tensor,
    sampled_ids: Tensor,
    response_mask: Tensor,
    teacher: Optional[TeacherTokenStats] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    config: Optional[EOPDLossConfig] = None,
    group: Any = None,
    teacher_logits: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    num_valid_tokens: Union[int, float, Tensor, None] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """EOPD loss of vocab-sharded student logits, replicated on every rank of the TP ``group``.

    Args:
        student_logits: [..., V/TP] this rank's vocabulary shard (any float dtype; upcast per chunk).
        sampled_ids: [...] global ids y_t of the sampled tokens.
        response_mask: [...] bool/0-1, which tokens count.
        teacher: statistics from :func:`compute_teacher_stats` (same tokens); may be omitted when
            ``teacher_logits`` are given, and is then computed here.
        old_logprobs: [...] log q_old(y_t) at the student temperature; None means the current
            policy detached (on-policy, r_t = 1).
        group: TP process group the vocabulary is sharded over (None: no TP).
        teacher_logits: [..., V/TP] teacher shard, same partition; needed by fkl_mode="full" and
            rkl_mode="analytic".
        vocab_start: global id of this shard's first column (default: TP rank * V/TP).
        true_vocab_size: ids at or beyond it are padding and are excluded everywhere.
        num_valid_tokens: the normaliser N, e.g. the valid-token count of the whole global batch
            when micro-batches or DP ranks are summed; default: this call's mask sum.

    Returns:
        (loss, metrics): a scalar whose gradient reaches ``student_logits`` only, and detached
        scalar diagnostics.  Diagnostics are exact over the TP group (identical on its ranks)
        and are means over this call's valid tokens (reduce over DP yourself, weighting by
        ``num_valid_tokens``).
    """
    config = EOPDLossConfig() if config is None else config
    vocab_shard = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab_shard)
    ids = sampled_ids.reshape(-1).to(torch.int64)
    mask = response_mask.reshape(-1)
    _check_shapes(student_logits, ids, mask, teacher_logits, config)
    teacher_shard = None if teacher_logits is None else teacher_logits.reshape(-1, vocab_shard)
    shard_kwargs = dict(vocab_start=vocab_start, true_vocab_size=true_vocab_size, chunk_tokens=config.chunk_tokens)
    teacher = _teacher_statistics(teacher, teacher_shard, ids, mask, group, config, shard_kwargs)

    rows, stats, k, gather_ids = _valid_tokens(ids, mask, teacher, config)
    dtype = compute_dtype(logits.dtype)
    terms = vocab_parallel_token_terms(
        logits,
        gather_ids,
        group,
        rows=rows,
        teacher_logits=teacher_shard if config.needs_teacher_logits else None,
        want_entropy=True,
        want_forward_kl=config.fkl_mode == "full",
        want_reverse_kl=config.rkl_mode == "analytic",
        temperature=config.student_temperature,
        teacher_temperature=config.teacher_temperature,
        **shard_kwargs,
    )
    loss_per_token, parts = _loss_per_token(terms, stats, old_logprobs, rows, k, config, dtype)
    normaliser = _normaliser(num_valid_tokens, rows.numel(), dtype)
    loss = loss_per_token.sum() / normaliser
    metrics = _metrics_of_parts(loss, normaliser, terms, stats, config, dtype, parts)
    return loss, metrics


def eopd_loss_from_hidden(
    hidden: Tensor,
    head_weight: Tensor,
    sampled_ids: Tensor,
    response_mask: Tensor,
    teacher: TeacherTokenStats,
    *,
    old_logprobs: Optional[Tensor] = None,
    config: Optional[EOPDLossConfig] = None,
    group: Any = None,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    num_valid_tokens: Union[int, float, Tensor, None] = None,
    block_tokens: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`eopd_loss` of ``hidden @ head_weight.T`` with the output layer fused in (:mod:`.fused_head`).

    The same loss and diagnostics as ``eopd_loss(hidden @ head_weight.T, ...)`` without its
    [tokens, V/TP] logits or their gradient: the head runs over blocks of response tokens only,
    and the gradient reaches ``hidden`` and ``head_weight``.

    Args:
        hidden: [..., hidden] final hidden states (after the final norm), replicated over TP.
        head_weight: [V/TP, hidden] this rank's shard of the output weight (the embedding when tied).
        block_tokens: response tokens per block of the head (default: about 64M logits on GPU).
        Everything else: as for :func:`eopd_loss`.  The full-vocabulary options (``fkl_mode="full"``,
        ``rkl_mode="analytic"``) read teacher logits and are refused here.
    """
    config = EOPDLossConfig() if config is None else config
    if config.needs_teacher_logits:
        raise ValueError(f"fkl_mode={config.fkl_mode!r} / rkl_mode={config.rkl_mode!r} compare full logits; "
                         "call eopd_loss on the student's logits instead of eopd_loss_from_hidden")
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = sampled_ids.reshape(-1).to(torch.int64)
    mask = response_mask.reshape(-1)
    if ids.numel() != flat.shape[0] or mask.numel() != flat.shape[0]:
        raise ValueError(f"sampled_ids ({ids.numel()}) and response_mask ({mask.numel()}) must have one entry per"
                         f" token of the hidden states ({flat.shape[0]})")
    shard_kwargs = dict(vocab_start=vocab_start, true_vocab_size=true_vocab_size, chunk_tokens=config.chunk_tokens)
    teacher = _teacher_statistics(teacher, None, ids, mask, group, config, shard_kwargs)

    rows, stats, k, gather_ids = _valid_tokens(ids, mask, teacher, config)
    dtype = compute_dtype(head_weight.dtype)

    def block_loss(terms: TokenTerms, lo: int, hi: int) -> tuple[Tensor, dict[str, Tensor]]:
        return _loss_per_token(terms, stats.slice(lo, hi), old_logprobs, rows[lo:hi], k, config, dtype)

    loss_sum, terms, parts = head_token_loss(
        flat.index_select(0, rows), head_weight, gather_ids, block_loss, group, want_entropy=True,
        temperature=config.student_temperature, block_tokens=block_tokens, **shard_kwargs,
    )
    normaliser = _normaliser(num_valid_tokens, rows.numel(), dtype)
    loss = loss_sum / normaliser
    return loss, _metrics_of_parts(loss, normaliser, terms, stats, config, dtype, parts)


def _valid_tokens(ids: Tensor, mask: Tensor, teacher: TeacherTokenStats,
                  config: EOPDLossConfig) -> tuple[Tensor, TeacherTokenStats, int, Tensor]:
    """(rows of the valid tokens, their teacher statistics, k, the global ids whose student
    log-probs the loss reads: the sampled token, then the teacher's top-k)."""
    rows = mask.nonzero().view(-1)
    stats = teacher.select(rows)
    k = min(config.topk, stats.topk)
    gather_ids = ids.index_select(0, rows).unsqueeze(1)
    if k:
        gather_ids = torch.cat([gather_ids, stats.topk_ids[:, :k]], dim=1)
    return rows, stats, k, gather_ids


def _loss_per_token(terms: TokenTerms, stats: TeacherTokenStats, old_logprobs: Optional[Tensor], rows: Tensor,
                    k: int, config: EOPDLossConfig, dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
    """L_t of the valid tokens ``rows`` (terms and stats hold exactly those rows) and its parts."""
    rkl_per_token, clip_active = _reverse_kl_term(terms, stats, old_logprobs, rows, config, dtype)
    fkl_per_token, topk_mass = _forward_kl_term(terms, stats, k, config, dtype)
    gate = entropy_gate(stats.entropy.to(dtype), config)
    loss_per_token = rkl_per_token
    fkl_weighted = None
    if config.fkl_mode != "off":
        # Exactly 0 on ungated tokens, even where the FKL is infinite (tau = +inf is exactly OPD).
        fkl_weighted = torch.where(gate > 0, config.alpha * gate * fkl_per_token, 0.0)
        loss_per_token = loss_per_token + fkl_weighted
    parts = {"gate": gate, "rkl": rkl_per_token, "fkl": fkl_per_token, "fkl_weighted": fkl_weighted,
             "clip_active": clip_active, "topk_mass": topk_mass}
    return loss_per_token, {name: value for name, value in parts.items() if value is not None}


def _metrics_of_parts(loss: Tensor, normaliser: Union[float, Tensor], terms: TokenTerms, stats: TeacherTokenStats,
                      config: EOPDLossConfig, dtype: torch.dtype, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return _metrics(loss, normaliser, terms, stats, config, dtype, gate=parts["gate"], rkl_per_token=parts["rkl"],
                    fkl_per_token=parts.get("fkl"), fkl_weighted=parts.get("fkl_weighted"),
                    clip_active=parts.get("clip_active"), topk_mass=parts.get("topk_mass"))


def _check_shapes(student_logits: Tensor, ids: Tensor, mask: Tensor, teacher_logits: Optional[Tensor],
                  config: EOPDLossConfig) -> None:
    tokens = student_logits.numel() // student_logits.shape[-1]
    if ids.numel() != tokens or mask.numel() != tokens:
        raise ValueError(
            f"sampled_ids ({ids.numel()}) and response_mask ({mask.numel()}) must have one entry per"
            f" token of the logits ({tokens})"
        )
    if config.needs_teacher_logits and teacher_logits is None:
        raise ValueError(
            f"fkl_mode={config.fkl_mode!r} / rkl_mode={config.rkl_mode!r} need teacher_logits shards"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits shard {tuple(teacher_logits.shape)} must match the student's"
            f" {tuple(student_logits.shape)} (same tokens and vocab partition; pad both vocabularies alike)"
        )


def _teacher_statistics(teacher: Optional[TeacherTokenStats], teacher_shard: Optional[Tensor], ids: Tensor,
                        mask: Tensor, group: Any, config: EOPDLossConfig, shard_kwargs: dict) -> TeacherTokenStats:
    """The given statistics, checked against the config, or those of ``teacher_shard``."""
    if teacher is None:
        if teacher_shard is None:
            raise ValueError("pass teacher statistics or teacher_logits")
        teacher = compute_teacher_stats(
            teacher_shard,
            ids,
            group,
            topk=config.topk if config.fkl_mode == "topk" else 0,
            response_mask=mask,
            temperature=config.teacher_temperature,
            **shard_kwargs,
        )
    if teacher.num_tokens != ids.numel():
        raise ValueError(f"teacher statistics cover {teacher.num_tokens} tokens, the logits {ids.numel()}")
    if teacher.temperature != config.teacher_temperature:
        raise ValueError(
            f"teacher statistics were computed at temperature {teacher.temperature}, the config says"
            f" {config.teacher_temperature}"
        )
    if config.fkl_mode == "topk" and teacher.topk < config.topk:
        raise ValueError(f"fkl_mode='topk' with topk={config.topk} needs teacher top-{config.topk}, got {teacher.topk}")
    return teacher


def _reverse_kl_term(terms: TokenTerms, stats: TeacherTokenStats, old_logprobs: Optional[Tensor], rows: Tensor,
                     config: EOPDLossConfig, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Per valid token: the RKL term and, for the PPO-clipped estimator, where the clip binds."""
    logq_sampled = terms.logprobs[:, 0]
    if config.rkl_mode == "analytic":
        return terms.reverse_kl, None
    if config.rkl_mode == "off":
        return logq_sampled.new_zeros(rows.numel()), None
    if old_logprobs is None:
        logq_old = logq_sampled.detach()
    else:
        logq_old = old_logprobs.reshape(-1).index_select(0, rows).to(dtype)
    advantage = (stats.sampled_logprob.to(dtype) - logq_old).detach()
    ratio = torch.exp(logq_sampled - logq_old)
    unclipped = -ratio * advantage
    clipped = -ratio.clamp(1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high) * advantage
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(dtype)


def _forward_kl_term(terms: TokenTerms, stats: TeacherTokenStats, k: int, config: EOPDLossConfig,
                     dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per valid token: the FKL (computed for the diagnostics even when it is off, if top-k is at
    hand; detached then) and the teacher's probability mass on its top-k."""
    if config.fkl_mode == "full":
        return terms.forward_kl, None
    if not k:
        return None, None
    teacher_topk_logp = stats.topk_logprobs[:, :k].to(dtype)
    topk_mass = teacher_topk_logp.exp().sum(dim=-1)
    renorm_logp = teacher_topk_logp - teacher_topk_logp.logsumexp(dim=-1, keepdim=True)
    renorm_p = renorm_logp.exp()
    student_topk_logq = terms.logprobs[:, 1 : 1 + k]
    if config.fkl_mode == "off":
        student_topk_logq = student_topk_logq.detach()
    # p~ = 0 entries (top-k reaching -inf logits) contribute 0, not 0 * inf.
    pointwise = torch.where(renorm_p > 0, renorm_p * (renorm_logp - student_topk_logq), 0.0)
    return pointwise.sum(dim=-1), topk_mass


def _normaliser(num_valid_tokens: Union[int, float, Tensor, None], local_valid: int,
                dtype: torch.dtype) -> Union[float, Tensor]:
    """N of ``loss = sum / N``, at least 1 (an all-masked batch gives loss 0, not NaN)."""
    if num_valid_tokens is None:
        return max(float(local_valid), 1.0)
    if isinstance(num_valid_tokens, Tensor):
        return num_valid_tokens.detach().to(dtype).clamp_min(1.0)
    return max(float(num_valid_tokens), 1.0)


def _metrics(loss: Tensor, normaliser: Union[float, Tensor], terms: TokenTerms, stats: TeacherTokenStats,
             config: EOPDLossConfig, dtype: torch.dtype, *, gate: Tensor, rkl_per_token: Tensor, fkl_per_token: Optional[Tensor],
             fkl_weighted: Optional[Tensor], clip_active: Optional[Tensor],
             topk_mass: Optional[Tensor]) -> dict[str, Tensor]:
    """Detached scalar diagnostics over this call's valid tokens."""
    teacher_entropy = stats.entropy.to(dtype)
    above_tau = (teacher_entropy > config.tau).to(dtype)
    zero = loss.new_zeros(()).detach()
    metrics = {
        "loss": loss.detach(),
        "loss_rkl": (rkl_per_token.detach().sum() / normaliser),
        "loss_fkl": zero if fkl_weighted is None else fkl_weighted.detach().sum() / normaliser,
        "num_valid_tokens": torch.tensor(float(teacher_entropy.numel()), dtype=dtype, device=loss.device),
        "teacher_entropy": _mean(teacher_entropy),
        "student_entropy": _mean(terms.entropy),
        "gate_fraction": _mean(above_tau),
        "gate_weight": _mean(gate),
        "rkl_estimate": _mean(terms.logprobs[:, 0] - stats.sampled_logprob.to(dtype)),
        "clip_fraction": zero if clip_active is None else _mean(clip_active),
    }
    if fkl_per_token is not None:
        metrics["fkl_gated"] = _mean(fkl_per_token, above_tau)
        metrics["fkl_mean"] = _mean(fkl_per_token)
    if topk_mass is not None:
        metrics["teacher_topk_mass"] = _mean(topk_mass)
    if config.rkl_mode == "analytic":
        metrics["rkl_exact"] = _mean(terms.reverse_kl)
    return metrics
