"""Full-vocabulary statistics of logits that are sharded over the vocabulary across a TP group.

Tensor-parallel rank r holds the columns ``[vocab_start, vocab_start + V/TP)`` of the logits of
every token.  Each statistic here is a per-token reduction over the vocabulary, so it needs only a
few per-token collectives and never a gather of full-vocabulary logits:

* global max (one all-reduce MAX), then every sum over the vocabulary that a chunk of tokens
  needs -- sum of exp, entropy numerator, KL numerators, logits picked at global ids -- packed
  into ONE all-reduce SUM;
* global top-k: local top-k -> all-gather of (value, global id) -> re-top-k.

Gradient convention: every per-token output is *replicated* (identical on all TP ranks), so
everything downstream of it (the loss) is too.  The gradient a rank returns for its shard is the
derivative of that one loss with respect to its own columns; the backward of the all-reduce SUM
is therefore the identity and the backward pass needs no communication at all (as in
Megatron-Core's ``_VocabParallelCrossEntropy``).  Never feed these outputs into per-rank partial
sums that are added up later: that is the other convention (ModelOpt's) and mixes wrongly.

Memory: logits are read chunk by chunk (``chunk_tokens`` rows at a time), upcast to fp32 (or kept
in fp64), and dropped; backward recomputes the softmax per chunk instead of saving it.

Kernels: the chunked torch code here is the reference and the CPU path.  Where the fused Triton
kernels of :mod:`.triton_kernels` can run (see :func:`use_triton_kernels`), the student terms
without teacher logits and the summary take them instead: one pass per row computes each rank's
partials, combined by the same collectives (once for all rows; ``chunk_tokens`` does not apply).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from . import triton_kernels
except ImportError:  # no Triton: the torch path everywhere
    triton_kernels = None

# After subtracting the global max, -inf logits are clamped to this: exp() of it is exactly 0 in
# fp32 and fp64, and 0 * it stays 0, where 0 * -inf would be NaN.
NEG_LARGE = -1e30
# Default chunk: about 4M vocabulary entries on CPU (16 MiB per fp32 temporary: cache friendly),
# 32M on GPU (128 MiB: few enough kernel launches per token).
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}
# "torch", "triton" or "auto" (default): which implementation the loss primitives use.
KERNELS_ENV = "EOPD_LOSS_KERNELS"


def use_triton_kernels(logits: Tensor) -> bool:
    """Whether ``logits`` go through the Triton kernels: ``EOPD_LOSS_KERNELS`` = "torch" never,
    "auto" (default) wherever :func:`triton_kernels.available` says they run (bf16/fp16/fp32 on CUDA,
    or on CPU under ``TRITON_INTERPRET=1``), "triton" always, and it is an error where they cannot.
    Callers also keep the torch path for what has no kernel (full-vocabulary KL, top-k > 32).
    """
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in ("torch", "triton", "auto"):
        raise ValueError(f"{KERNELS_ENV} must be torch, triton or auto, got {choice!r}")
    if choice == "torch":
        return False
    usable = triton_kernels is not None and triton_kernels.available(logits)
    if choice == "triton" and not usable:
        if triton_kernels is None:
            why = "Triton does not import"
        else:
            where = "CPU (interpreter)" if triton_kernels.INTERPRETED else "CUDA"
            why = f"they take bf16/fp16/fp32 on {where}"
        raise RuntimeError(f"{KERNELS_ENV}=triton, but the kernels cannot take {logits.dtype} logits on"
                           f" {logits.device.type}: {why}")
    return usable


def tp_size_and_rank(group: Any) -> tuple[int, int]:
    """(size, rank) of ``group``; ``None`` (or no initialised process group) means no TP."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """Which global vocabulary ids this rank's logits columns hold."""

    group: Any
    tp_size: int
    tp_rank: int
    start: int
    size: int
    true_vocab_size: Optional[int] = None

    @classmethod
    def of(
        cls,
        logits: Tensor,
        group: Any = None,
        vocab_start: Optional[int] = None,
        true_vocab_size: Optional[int] = None,
    ) -> "VocabShard":
        tp_size, tp_rank = tp_size_and_rank(group)
        if tp_size == 1:
            group = None
        size = logits.shape[-1]
        start = tp_rank * size if vocab_start is None else int(vocab_start)
        if true_vocab_size is not None and true_vocab_size < 1:
            raise ValueError(f"true_vocab_size must be >= 1, got {true_vocab_size}")
        return cls(group, tp_size, tp_rank, start, size, true_vocab_size)

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def vocab_size(self) -> int:
        """Number of real (non-padded) vocabulary ids over all shards, assuming equal shards."""
        padded = self.size * self.tp_size
        return padded if self.true_vocab_size is None else min(padded, self.true_vocab_size)

    @property
    def real_columns(self) -> int:
        """Number of leading local columns that hold real (non-padded) vocabulary ids."""
        if self.true_vocab_size is None:
            return self.size
        return min(max(self.true_vocab_size - self.start, 0), self.size)

    def padded_columns(self, device: torch.device) -> Optional[Tensor]:
        """Bool mask of local columns whose global id is padding (>= true vocab size), or None."""
        if self.true_vocab_size is None or self.end <= self.true_vocab_size:
            return None
        return torch.arange(self.start, self.end, device=device) >= self.true_vocab_size

    def chunk_rows(self, chunk_tokens: Optional[int], device: torch.device) -> int:
        if chunk_tokens is None:
            elements = DEFAULT_CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS["cuda"])
            return max(1, elements // max(self.size, 1))
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return int(chunk_tokens)


# --------------------------------------------------------------------------- chunk helpers


class _RowRuns:
    """Selected token rows as maximal runs of consecutive tokens.

    Chunks are then read and written with slice copies (a view plus one fused dtype-converting
    copy) instead of gathers: response masks are long runs, and on CPU ``index_select`` of
    [rows, 150k] tensors can cost far more than the arithmetic.
    """

    def __init__(self, rows: Tensor):
        n = rows.numel()
        self.runs: list[tuple[int, int, int]] = []  # (first position, end position, first token)
        if n:
            breaks = ((rows[1:] - rows[:-1]) != 1).nonzero().view(-1) + 1
            starts = [0] + breaks.tolist()
            tokens = rows[starts].tolist()
            for begin, end, token in zip(starts, starts[1:] + [n], tokens):
                self.runs.append((begin, end, token))
        self._begins = [r[0] for r in self.runs]

    def segments(self, lo: int, hi: int):
        """(chunk offset, length, first token) of the pieces of positions [lo, hi)."""
        i = max(bisect.bisect_right(self._begins, lo) - 1, 0)
        while i < len(self.runs) and self.runs[i][0] < hi:
            begin, end, token = self.runs[i]
            a, b = max(begin, lo), min(end, hi)
            if a < b:
                yield a - lo, b - a, token + (a - begin)
            i += 1


class _ChunkBuffers:
    """[chunk, V/TP] scratch tensors allocated once per call and reused by every chunk.

    Fresh allocations per chunk would be returned to the OS and page-faulted back in each time
    on CPU (glibc trims large frees); one set per call keeps the chunk loop allocation-free.
    """

    def __init__(self, rows: int, cols: int, device: torch.device):
        self.shape, self.device = (rows, cols), device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self.shape, dtype=dtype, device=self.device)
        return buffer[:rows]


def _load_chunk(
    logits: Tensor, runs: _RowRuns, lo: int, hi: int, temperature: float, pad: Optional[Tensor], out: Tensor
) -> Tensor:
    """Rows at positions [lo, hi) copied into ``out`` in fp32/fp64, / temperature, padding at -inf."""
    x = out
    for offset, length, token in runs.segments(lo, hi):
        x[offset : offset + length].copy_(logits[token : token + length])
    if temperature != 1.0:
        x.div_(temperature)
    if pad is not None:
        x.masked_fill_(pad, float("-inf"))
    return x


def _shift_by_global_max_(chunks: list[Tensor], shard: VocabShard) -> Tensor:
    """Subtract each tensor's per-token global max in place; return the maxima [c, len(chunks)].

    After the shift -inf entries are clamped to NEG_LARGE (see there).
    """
    maxima = torch.stack([x.amax(dim=-1) for x in chunks], dim=1)
    if shard.group is not None:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=shard.group)
    # A row that is -inf everywhere has no distribution; keep it from turning into NaN here.
    maxima = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))
    for i, x in enumerate(chunks):
        x.sub_(maxima[:, i : i + 1]).clamp_(min=NEG_LARGE)
    return maxima


def _local_columns(ids: Tensor, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """(local column of each global id, clamped into range; whether this rank owns the id)."""
    owned = (ids >= shard.start) & (ids < shard.end)
    local = (ids - shard.start).clamp(0, shard.size - 1)
    return local, owned


def _pick_owned(x: Tensor, ids: Tensor, shard: VocabShard) -> Tensor:
    """x at global ids where this rank owns them, else 0: the all-reduce SUM completes it."""
    local, owned = _local_columns(ids, shard)
    return x.gather(1, local).masked_fill_(~owned, 0.0)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product without a [rows, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _restore_neg_inf(x: Tensor) -> Tensor:
    """Values that came from clamped -inf logits are -inf again."""
    return x.masked_fill(x <= NEG_LARGE / 2, float("-inf"))


def _all_reduce_sum_(x: Tensor, shard: VocabShard) -> Tensor:
    if shard.group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)
    return x


def _combine_partials(
    local_max: Tensor, sums: Tensor, picked: Tensor, shard: VocabShard
) -> tuple[Tensor, Tensor]:
    """Per-rank kernel partials -> (global max M [n], all-reduced [S, A, picked...] [n, 2 + j]).

    ``sums`` [n, 2] are (Σe^(z-m), Σe^(z-m)(z-m)) about the local max m; ``picked`` [n, j] are
    logits owned by this rank (0 elsewhere).  The same two collectives as the chunk loop: MAX of
    the maxima, then ONE SUM after rescaling by f = e^(m-M): f·S and f·(A + (m-M)·S).
    """
    maxima = local_max.clone()
    if shard.group is not None:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=shard.group)
    maxima = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))  # as the chunk loop
    delta = (local_max - maxima).clamp_(min=NEG_LARGE)  # a shard without finite logits: f = 0
    f = delta.exp()
    s, a = sums.unbind(1)
    rescaled = torch.stack([f * s, f * (a + delta * s)], dim=1)
    return maxima, _all_reduce_sum_(torch.cat([rescaled, picked], dim=1), shard)


# --------------------------------------------------------------------------- top-k


def _order_by_value_then_id(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by value descending, ties by global id ascending (a total, rank-free order)."""
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, by_value), ids.gather(-1, by_value)


def _local_topk(x: Tensor, k: int, shard: VocabShard, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic top-min(k, V/TP) of a chunk: among equal values the lowest global ids win.

    ``torch.topk`` picks an arbitrary subset of the values tied at the k-th place.  Asking it for
    one more value shows which rows have such a tie (the (k+1)-th equals the k-th); in those rows
    the slots after the values strictly above the k-th one are refilled with the lowest columns
    holding the k-th value.  (Rare with fp32 logits, common with bf16, certain for k beyond the
    finite entries.)
    """
    kk = min(k, x.shape[1])
    values, cols = x.topk(min(kk + 1, x.shape[1]), dim=-1, sorted=True)
    if values.shape[1] > kk:
        tied = values[:, kk] == values[:, kk - 1]
        values, cols = values[:, :kk].contiguous(), cols[:, :kk].contiguous()
        if bool(tied.any()):
            kth = values[:, kk - 1 :]
            n_above = (values > kth).sum(dim=-1)  # sorted: these fill the first slots already
            at_kth = torch.eq(x, kth, out=scratch).nonzero()  # row-major: lowest columns first
            at_kth = at_kth[tied[at_kth[:, 0]]]
            row, col = at_kth[:, 0], at_kth[:, 1]
            per_row = torch.bincount(row, minlength=x.shape[0])
            rank = torch.arange(row.numel(), device=x.device) - (per_row.cumsum(0) - per_row)[row]
            slot = n_above[row] + rank
            keep = slot < kk
            cols[row[keep], slot[keep]] = col[keep]
    return _order_by_value_then_id(values, cols + shard.start)


def _global_topk(values: Tensor, ids: Tensor, k: int, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """Merge every rank's local top-k: all-gather (value, id) pairs, re-select the top k."""
    if shard.group is None:
        return values[:, :k], ids[:, :k]
    # One collective: fp64 holds fp32/fp64 values and ids < 2**53 exactly.
    packed = torch.stack([values.double(), ids.double()], dim=-1)
    gathered = [torch.empty_like(packed) for _ in range(shard.tp_size)]
    dist.all_gather(gathered, packed, group=shard.group)
    candidates = torch.cat(gathered, dim=1)
    all_values = candidates[..., 0].to(values.dtype)
    all_ids = candidates[..., 1].to(torch.int64)
    all_values, all_ids = _order_by_value_then_id(all_values, all_ids)
    return all_values[:, :k], all_ids[:, :k]


# --------------------------------------------------------------------------- no-grad scan


class DistributionSummary(NamedTuple):
    """Per-token statistics of one vocab-sharded distribution (replicated on every TP rank)."""

    max: Tensor  # [T] global max of logits / temperature
    log_z: Tensor  # [T] log partition function (max included)
    entropy: Tensor  # [T] nats
    sampled_logprob: Optional[Tensor]  # [T] log-prob of the given ids
    topk_ids: Optional[Tensor]  # [T, k] int64 global ids
    topk_logprobs: Optional[Tensor]  # [T, k] full-vocabulary log-probs


@torch.no_grad()
def vocab_parallel_summary(
    logits: Tensor,
    group: Any = None,
    *,
    sampled_ids: Optional[Tensor] = None,
    topk: int = 0,
    rows: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
) -> DistributionSummary:
    """One pass over ``logits`` [T, V/TP] (no autograd): max, log Z, entropy, log-prob of
    ``sampled_ids`` [T] and the global top-``topk`` (ids and full-vocabulary log-probs).

    ``rows`` (int64 token indices) restricts the work to those tokens; the outputs then have
    ``len(rows)`` rows.  Top-k order: log-prob descending, ties by lower global id.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_shard], got shape {tuple(logits.shape)}")
    shard = VocabShard.of(logits, group, vocab_start, true_vocab_size)
    if topk > shard.vocab_size:
        raise ValueError(f"top-k of {topk} exceeds the vocabulary size {shard.vocab_size}")
    rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    if use_triton_kernels(logits) and topk <= triton_kernels.MAX_TOPK:
        return _fused_summary(logits, shard, rows, sampled_ids, topk, temperature)
    n, dtype, device = rows.numel(), compute_dtype(logits.dtype), logits.device
    pad = shard.padded_columns(device)
    step = shard.chunk_rows(chunk_tokens, device)
    runs = _RowRuns(rows)
    buffers = _ChunkBuffers(min(step, n), shard.size, device)

    maxima, log_z, entropy = (torch.empty(n, dtype=dtype, device=device) for _ in range(3))
    sampled = torch.empty(n, dtype=dtype, device=device) if sampled_ids is not None else None
    top_ids = torch.empty(n, topk, dtype=torch.int64, device=device) if topk else None
    top_lp = torch.empty(n, topk, dtype=dtype, device=device) if topk else None

    for lo in range(0, n, step):
        hi = min(lo + step, n)
        x = _load_chunk(logits, runs, lo, hi, temperature, pad, buffers.get("x", hi - lo, dtype))
        m = _shift_by_global_max_([x], shard)[:, 0]
        e = torch.exp(x, out=buffers.get("e", hi - lo, dtype))
        columns = [e.sum(dim=-1, keepdim=True), _rowdot(e, x).unsqueeze(1)]
        if sampled_ids is not None:
            columns.append(_pick_owned(x, sampled_ids[rows[lo:hi]].unsqueeze(1), shard))
        sums = _all_reduce_sum_(torch.cat(columns, dim=1), shard)
        log_s = sums[:, 0].log()
        maxima[lo:hi], log_z[lo:hi] = m, m + log_s
        entropy[lo:hi] = log_s - sums[:, 1] / sums[:, 0]
        if sampled is not None:
            sampled[lo:hi] = _restore_neg_inf(sums[:, 2]) - log_s
        if topk:
            values, ids = _local_topk(x, topk, shard, buffers.get("eq", hi - lo, torch.bool))
            values, ids = _global_topk(values, ids, topk, shard)
            top_ids[lo:hi] = ids
            top_lp[lo:hi] = _restore_neg_inf(values) - log_s.unsqueeze(1)
    return DistributionSummary(maxima, log_z, entropy, sampled, top_ids, top_lp)


def _fused_summary(
    logits: Tensor,
    shard: VocabShard,
    rows: Tensor,
    sampled_ids: Optional[Tensor],
    topk: int,
    temperature: float,
) -> DistributionSummary:
    """:func:`vocab_parallel_summary` on the Triton kernels: one pass, then the same collectives."""
    own_sampled = None if sampled_ids is None else sampled_ids.index_select(0, rows)
    part = triton_kernels.summary_partials(
        logits, rows, own_sampled, topk, vocab_start=shard.start, real_columns=shard.real_columns,
        temperature=temperature,
    )
    picked = part.max.new_zeros(rows.numel(), 0) if part.sampled is None else part.sampled.unsqueeze(1)
    maxima, sums = _combine_partials(part.max, part.sums, picked, shard)
    log_s = sums[:, 0].log()
    entropy = log_s - sums[:, 1] / sums[:, 0]
    sampled = None if part.sampled is None else sums[:, 2] - maxima - log_s
    top_ids = top_lp = None
    if topk:
        # The torch path's candidates: this rank's top min(k, V/TP) of z - M, ties by lower id.
        candidates = min(topk, shard.size)
        values = part.top_values[:, :candidates] - maxima.unsqueeze(1)
        values, ids = _order_by_value_then_id(values, part.top_ids[:, :candidates])
        values, top_ids = _global_topk(values, ids, topk, shard)
        top_lp = values - log_s.unsqueeze(1)
    return DistributionSummary(maxima, maxima + log_s, entropy, sampled, top_ids, top_lp)


# --------------------------------------------------------------------------- differentiable terms


@dataclasses.dataclass(frozen=True)
class _TermsPlan:
    shard: VocabShard
    temperature: float
    teacher_temperature: float
    chunk_rows: int
    want_entropy: bool
    want_fkl: bool
    want_rkl: bool


class _VocabParallelTokenTerms(torch.autograd.Function):
    """Per-token terms of student shard z (and optionally teacher shard t), differentiable in z.

    Outputs (all [n] or [n, ids], replicated over TP):
      max, log Z, log q at global ids, H(q), KL(p||q) (forward), KL(q||p) (reverse).
    Forward per chunk: all-reduce MAX of the maxima, then all-reduce SUM of [Σe, Σe·z, picked
    logits, Σe_t, Σe_t·t, Σe_t·z, Σe·t].  Backward: no communication (outputs are replicated).
    """

    @staticmethod
    def forward(ctx, logits, rows, gather_ids, teacher_logits, plan: _TermsPlan):
        shard, n = plan.shard, rows.numel()
        dtype, device = compute_dtype(logits.dtype), logits.device
        pad = shard.padded_columns(device)
        has_teacher = teacher_logits is not None
        new = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        maxima, log_z, logprobs = new(n), new(n), new(n, gather_ids.shape[1])
        entropy = new(n) if plan.want_entropy else new(0)
        fkl = new(n) if plan.want_fkl else new(0)
        rkl = new(n) if plan.want_rkl else new(0)
        teacher_log_z = new(n) if has_teacher else new(0)

        runs = _RowRuns(rows)
        buffers = _ChunkBuffers(min(plan.chunk_rows, n), shard.size, device)
        for lo in range(0, n, plan.chunk_rows):
            hi = min(lo + plan.chunk_rows, n)
            z = _load_chunk(logits, runs, lo, hi, plan.temperature, pad, buffers.get("z", hi - lo, dtype))
            chunks = [z]
            if has_teacher:
                t = _load_chunk(
                    teacher_logits, runs, lo, hi, plan.teacher_temperature, pad, buffers.get("t", hi - lo, dtype)
                )
                chunks.append(t)
            m = _shift_by_global_max_(chunks, shard)  # z, t now shifted (<= 0) and clamped
            e = torch.exp(z, out=buffers.get("e", hi - lo, dtype))
            columns = [e.sum(dim=-1), _rowdot(e, z)]
            if has_teacher:
                e_t = torch.exp(t, out=buffers.get("e_t", hi - lo, dtype))
                columns += [e_t.sum(dim=-1), _rowdot(e_t, t), _rowdot(e_t, z), _rowdot(e, t)]
            picked = _pick_owned(z, gather_ids[lo:hi], shard)
            sums = _all_reduce_sum_(torch.cat([torch.stack(columns, dim=1), picked], dim=1), shard)
            # Naming: e = exp(a_z), e_t = exp(a_t); "et_z" is Σ e_t·a_z, "ez_t" is Σ e·a_t.
            s, ez = sums[:, 0], sums[:, 1]
            log_s = s.log()
            maxima[lo:hi], log_z[lo:hi] = m[:, 0], m[:, 0] + log_s
            logprobs[lo:hi] = _restore_neg_inf(sums[:, len(columns) :]) - log_s.unsqueeze(1)
            if plan.want_entropy:
                entropy[lo:hi] = log_s - ez / s
            if has_teacher:
                s_t, et_t, et_z, ez_t = sums[:, 2], sums[:, 3], sums[:, 4], sums[:, 5]
                log_s_t = s_t.log()
                teacher_log_z[lo:hi] = m[:, 1] + log_s_t
                # KL(p||q) = Σp(a_t - a_z) - log S_t + log S   (a = shifted logits, Σp = 1)
                if plan.want_fkl:
                    fkl[lo:hi] = (et_t - et_z) / s_t - log_s_t + log_s
                # KL(q||p) = Σq(a_z - a_t) - log S + log S_t
                if plan.want_rkl:
                    rkl[lo:hi] = (ez - ez_t) / s - log_s + log_s_t

        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, rows, gather_ids, teacher_logits, log_z, teacher_log_z, entropy, rkl)
        ctx.mark_non_differentiable(maxima)
        return maxima, log_z, logprobs, entropy, fkl, rkl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _g_max, g_log_z, g_logprobs, g_entropy, g_fkl, g_rkl):
        logits, rows, gather_ids, teacher_logits, log_z, teacher_log_z, entropy, rkl = ctx.saved_tensors
        plan: _TermsPlan = ctx.plan
        shard = plan.shard
        n = rows.numel()
        # Rows outside the selection get exactly zero; the others are all overwritten below.
        grad = torch.empty_like(logits) if n == logits.shape[0] else torch.zeros_like(logits)
        if n == 0:
            return grad, None, None, None, None
        zeros = log_z.new_zeros(n)
        g_log_z = zeros if g_log_z is None else g_log_z
        g_entropy = zeros if g_entropy is None or not plan.want_entropy else g_entropy
        g_fkl = None if g_fkl is None or not plan.want_fkl else g_fkl
        g_rkl = None if g_rkl is None or not plan.want_rkl else g_rkl
        g_ids_total = zeros if g_logprobs is None else g_logprobs.sum(dim=1)
        pad = shard.padded_columns(logits.device)
        runs = _RowRuns(rows)
        dtype = log_z.dtype
        buffers = _ChunkBuffers(min(plan.chunk_rows, n), shard.size, logits.device)

        # d/dz of: log Z -> q;  log q(i) -> 1_i - q;  H -> -q(log q + H);  KL(p||q) -> q - p;
        # KL(q||p) -> q(log q - log p - KL).  So grad = q·(α·log q + β - g_rkl·log p) - g_fkl·p
        # + scatter(g_logprobs), with per-token α, β below; then × 1/temperature.
        alpha = -g_entropy + (g_rkl if g_rkl is not None else 0.0)
        beta = g_log_z - g_ids_total - g_entropy * (entropy if plan.want_entropy else 0.0)
        if g_fkl is not None:
            beta = beta + g_fkl
        if g_rkl is not None:
            beta = beta - g_rkl * rkl

        for lo in range(0, n, plan.chunk_rows):
            hi = min(lo + plan.chunk_rows, n)
            log_q = _load_chunk(logits, runs, lo, hi, plan.temperature, pad, buffers.get("z", hi - lo, dtype))
            log_q.sub_(log_z[lo:hi].unsqueeze(1)).clamp_(min=NEG_LARGE)
            q = torch.exp(log_q, out=buffers.get("q", hi - lo, dtype))
            g = log_q.mul_(alpha[lo:hi].unsqueeze(1)).add_(beta[lo:hi].unsqueeze(1))  # reuses log_q
            if teacher_logits is not None and (g_fkl is not None or g_rkl is not None):
                log_p = _load_chunk(
                    teacher_logits, runs, lo, hi, plan.teacher_temperature, pad, buffers.get("t", hi - lo, dtype)
                )
                log_p.sub_(teacher_log_z[lo:hi].unsqueeze(1)).clamp_(min=NEG_LARGE)
                if g_rkl is not None:
                    g.addcmul_(log_p, g_rkl[lo:hi].unsqueeze(1), value=-1.0)
                g.mul_(q)
                if g_fkl is not None:
                    g.addcmul_(log_p.exp_(), g_fkl[lo:hi].unsqueeze(1), value=-1.0)
            else:
                g.mul_(q)
            if g_logprobs is not None:
                local, owned = _local_columns(gather_ids[lo:hi], shard)
                g.scatter_add_(1, local, g_logprobs[lo:hi].masked_fill(~owned, 0.0))
            if pad is not None:
                g.masked_fill_(pad, 0.0)
            if plan.temperature != 1.0:
                g.div_(plan.temperature)
            for offset, length, token in runs.segments(lo, hi):
                grad[token : token + length].copy_(g[offset : offset + length])
        return grad, None, None, None, None


class _FusedTokenTerms(torch.autograd.Function):
    """:class:`_VocabParallelTokenTerms` without teacher logits, on the Triton kernels.

    Same outputs and convention; forward is one pass per row plus the same two collectives (once
    for all rows), backward one pass writing the gradient of every row directly, no communication.
    """

    @staticmethod
    def forward(ctx, logits, rows, gather_ids, plan: _TermsPlan):
        shard = plan.shard
        part = triton_kernels.softmax_partials(
            logits, rows, gather_ids, vocab_start=shard.start, real_columns=shard.real_columns,
            temperature=plan.temperature,
        )
        maxima, sums = _combine_partials(part.max, part.sums, part.picked, shard)
        s, ez = sums[:, 0], sums[:, 1]
        log_s = s.log()
        log_z = maxima + log_s
        logprobs = (sums[:, 2:] - maxima.unsqueeze(1)) - log_s.unsqueeze(1)
        entropy = log_s - ez / s if plan.want_entropy else log_s.new_empty(0)

        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, rows, gather_ids, log_z, entropy)
        ctx.mark_non_differentiable(maxima)
        return maxima, log_z, logprobs, entropy, log_s.new_empty(0), log_s.new_empty(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _g_max, g_log_z, g_logprobs, g_entropy, _g_fkl, _g_rkl):
        logits, rows, gather_ids, log_z, entropy = ctx.saved_tensors
        plan: _TermsPlan = ctx.plan
        zeros = log_z.new_zeros(rows.numel())
        g_log_z = zeros if g_log_z is None else g_log_z
        g_entropy = zeros if g_entropy is None or not plan.want_entropy else g_entropy
        g_ids = torch.zeros_like(gather_ids, dtype=log_z.dtype) if g_logprobs is None else g_logprobs
        # The coefficients of _VocabParallelTokenTerms.backward with no KL terms.
        alpha = -g_entropy
        beta = g_log_z - g_ids.sum(dim=1) - g_entropy * (entropy if plan.want_entropy else 0.0)
        grad = triton_kernels.softmax_backward(
            logits, rows, gather_ids, g_ids, log_z, alpha, beta, vocab_start=plan.shard.start,
            real_columns=plan.shard.real_columns, temperature=plan.temperature,
        )
        return grad, None, None, None


class TokenTerms(NamedTuple):
    """Per-token outputs of :func:`vocab_parallel_token_terms` (empty tensors where not asked)."""

    max: Tensor  # [n] not differentiable
    log_z: Tensor  # [n]
    logprobs: Tensor  # [n, ids] full-vocabulary log q at the given global ids
    entropy: Tensor  # [n] H(q) or empty
    forward_kl: Tensor  # [n] KL(p||q) or empty
    reverse_kl: Tensor  # [n] KL(q||p) or empty
    teacher_log_z: Optional[Tensor] = None


def vocab_parallel_token_terms(
    logits: Tensor,
    gather_ids: Tensor,
    group: Any = None,
    *,
    rows: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
    want_entropy: bool = False,
    want_forward_kl: bool = False,
    want_reverse_kl: bool = False,
    vocab_start: Optional[int] = None,
    true_vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
) -> TokenTerms:
    """All differentiable per-token terms of vocab-sharded ``logits`` [T, V/TP] in one pass.

    ``gather_ids`` [n, m] are global ids whose log-probs are returned (row i belongs to token
    ``rows[i]``; ``rows`` defaults to all T tokens).  KL terms need ``teacher_logits`` with the
    same sharding; the teacher is a constant.  Gradients flow to ``logits`` only, and only the
    selected rows get a non-zero gradient.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_shard], got shape {tuple(logits.shape)}")
    if (want_forward_kl or want_reverse_kl) and teacher_logits is None:
        raise ValueError("full-vocabulary KL terms need teacher_logits shards")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher logits shard {tuple(teacher_logits.shape)} must match the student's {tuple(logits.shape)}"
            " (same tokens, same vocab partition; pad both vocabularies to one size first)"
        )
    shard = VocabShard.of(logits, group, vocab_start, true_vocab_size)
    rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    if gather_ids.dim() != 2 or gather_ids.shape[0] != rows.numel():
        raise ValueError(f"gather_ids must be [len(rows), m], got {tuple(gather_ids.shape)}")
    plan = _TermsPlan(
        shard,
        float(temperature),
        float(teacher_temperature),
        shard.chunk_rows(chunk_tokens, logits.device),
        want_entropy,
        want_forward_kl,
        want_reverse_kl,
    )
    gather_ids = gather_ids.to(torch.int64)
    if teacher_logits is None and use_triton_kernels(logits):
        return TokenTerms(*_FusedTokenTerms.apply(logits, rows, gather_ids, plan))
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    return TokenTerms(*_VocabParallelTokenTerms.apply(logits, rows, gather_ids, teacher, plan))


# --------------------------------------------------------------------------- public primitives


class LogSoftmaxStats(NamedTuple):
    max: Tensor  # [T] global max of logits / temperature (not differentiable)
    log_z: Tensor  # [T] log Σ_v exp(logit_v / temperature), differentiable


def vocab_parallel_log_softmax_stats(logits: Tensor, group: Any = None, **kwargs) -> LogSoftmaxStats:
    """Global max and log partition function of vocab-sharded ``logits`` [T, V/TP]."""
    ids = torch.zeros(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    terms = vocab_parallel_token_terms(logits, ids, group, **kwargs)
    return LogSoftmaxStats(terms.max, terms.log_z)


def vocab_parallel_logprobs(logits: Tensor, ids: Tensor, group: Any = None, **kwargs) -> Tensor:
    """Full-vocabulary log-probs at global ``ids`` ([T] or [T, m]); differentiable."""
    flat = ids.unsqueeze(1) if ids.dim() == 1 else ids
    out = vocab_parallel_token_terms(logits, flat, group, **kwargs).logprobs
    return out.squeeze(1) if ids.dim() == 1 else out


def vocab_parallel_entropy(logits: Tensor, group: Any = None, **kwargs) -> Tensor:
    """Entropy in nats of softmax(logits / temperature) per token; differentiable."""
    ids = torch.zeros(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    return vocab_parallel_token_terms(logits, ids, group, want_entropy=True, **kwargs).entropy


def vocab_parallel_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    group: Any = None,
    *,
    direction: str = "forward",
    **kwargs,
) -> Tensor:
    """Exact per-token KL between teacher p and student q over the full vocabulary.

    ``direction="forward"`` is KL(p||q) = Σ p log(p/q) (mode covering, the KD loss);
    ``"reverse"`` is KL(q||p) = Σ q log(q/p).  Differentiable in the student only.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    ids = torch.zeros(student_logits.shape[0], 0, dtype=torch.int64, device=student_logits.device)
    forward = direction == "forward"
    terms = vocab_parallel_token_terms(
        student_logits,
        ids,
        group,
        teacher_logits=teacher_logits,
        want_forward_kl=forward,
        want_reverse_kl=not forward,
        **kwargs,
    )
    return terms.forward_kl if forward else terms.reverse_kl


def vocab_parallel_topk(logits: Tensor, k: int, group: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """Global top-k over the vocabulary: (int64 global ids [T, k], full-vocab log-probs [T, k]).

    Ordered by log-prob descending; equal values are broken by the lower global id, so the
    result does not depend on the TP size.  Not differentiable.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    summary = vocab_parallel_summary(logits, group, topk=k, **kwargs)
    return summary.topk_ids, summary.topk_logprobs
