"""Fused Triton kernels for the vocab-parallel loss: the GPU path of :mod:`.vocab_parallel`.

Each kernel runs one program per token row and streams that row's vocabulary shard in ``BLOCK_V``
tiles, so a row is read once per pass and nothing of size [tokens, V/TP] is allocated except the
gradient itself.  The kernels only compute per-rank partials; :mod:`.vocab_parallel` combines them
over the TP group with the same collectives as its torch path.

Notation for one row and one shard: z = logits / temperature over the real (non-padded) columns,
m = max z (local), S = Σ e^(z-m), A = Σ e^(z-m)(z-m).  Tiles fold in by the online-softmax rule:
going from max m to M >= m with f = e^(m-M),

    Σ e^(z-M) = f·S,    Σ e^(z-M)(z-M) = f·(A + (m-M)·S),

which is also how the TP combine rescales each rank's partial after the all-reduce MAX.  Then
log Z = M + log S, H = log S - A/S and log q(v) = (z_v - M) - log S.

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when this
module is imported: with ``TRITON_INTERPRET=1`` set then, the kernels run on CPU tensors (for
tests) and never on CUDA ones, and without it the reverse.  :func:`available` encodes that rule.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_eopd.platform import triton_compat

INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    triton_compat.fix_interpreter_index()
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_TOPK = 32
# Launch shapes: first guesses, to be tuned on a GPU.  Tile widths are vocabulary entries (powers
# of two); the top-k tile also sizes the bitonic top-k network run on tiles with many candidates,
# and tiles with at most TOPK_INSERT_LIMIT candidates insert them one by one instead.
BLOCK_V = 4096
TOPK_BLOCK_V = 2048
TOPK_INSERT_LIMIT = 8
NUM_WARPS = 8

# After a shift by the running max, -inf is clamped to this (exp() gives exactly 0 and 0 * it is 0,
# where 0 * -inf is NaN); the same constant as vocab_parallel.NEG_LARGE.
NEG_LARGE = tl.constexpr(-1e30)
# Below every key of a real column: marks top-k slots past the end of the shard.
NO_KEY = tl.constexpr(-(2**63))


def available(tensor: Tensor) -> bool:
    """Whether the kernels can run on ``tensor``: bf16/fp16/fp32, and on CUDA when compiled or on
    CPU when this module was imported under ``TRITON_INTERPRET=1``."""
    return tensor.dtype in KERNEL_DTYPES and tensor.device.type == ("cpu" if INTERPRETED else "cuda")


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _fold_tile(m, s, a, x):
    """Fold tile ``x`` (fp32, -inf allowed) into the running (m, S, A) of the module docstring."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # nothing finite seen yet: any shift works
    delta = tl.maximum(m - shift, NEG_LARGE)  # m = -inf: f = 0 and delta * S = 0 * NEG_LARGE = 0
    f = tl.exp(delta)
    xs = tl.maximum(x - shift, NEG_LARGE)
    e = tl.exp(xs)
    return new_m, f * s + tl.sum(e, axis=0), f * (a + delta * s) + tl.sum(e * xs, axis=0)


@triton.jit
def _load_scaled(row_ptr, cols, stride_col, limit, temperature, SCALED: tl.constexpr):
    """z = logit / temperature in fp32 at ``cols`` (IEEE division, as torch); -inf at columns >= ``limit``."""
    x = tl.load(row_ptr + cols * stride_col, mask=cols < limit, other=float("-inf")).to(tl.float32)
    if SCALED:
        x = tl.div_rn(x, temperature)
    return x


@triton.jit
def _unscale(g, temperature, SCALED: tl.constexpr):
    """d/dlogit = d/dz / temperature."""
    if SCALED:
        g = tl.div_rn(g, temperature)
    return g


@triton.jit
def _pick_owned(row_ptr, stride_col, ids, valid, vocab_start, shard_size, real_columns, temperature,
                SCALED: tl.constexpr):
    """z at global ``ids`` this shard owns (-inf at padded ids), 0 elsewhere: a TP sum completes it."""
    local = ids - vocab_start
    owned = valid & (local >= 0) & (local < shard_size)
    local = tl.where(owned, local, 0)
    z = _load_scaled(row_ptr, local, stride_col, tl.where(owned, real_columns, 0), temperature, SCALED)
    return tl.where(owned, z, 0.0)


@triton.jit
def _descending_key(x, cols):
    """int64 keys whose descending order is x descending, then column ascending (exact ties)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order of the floats
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _decode_key(key):
    """(value, column) of a :func:`_descending_key` key."""
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (key & 0xFFFFFFFF)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _softmax_partials_kernel(
    logits_ptr, stride_row, stride_col, rows_ptr, ids_ptr, stride_ids,
    max_ptr, sums_ptr, picked_ptr,
    vocab_start, shard_size, real_columns, temperature, num_ids,
    SCALED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_IDS: tl.constexpr,
):
    """Row i = token rows[i]: m, (S, A) and z at the row's gather ids (0 where not owned)."""
    i = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride_row
    m, s, a = float("-inf"), 0.0, 0.0
    for start in range(0, real_columns, BLOCK_V):  # padded columns are -inf: nothing to add
        cols = start + tl.arange(0, BLOCK_V)
        x = _load_scaled(row_ptr, cols, stride_col, real_columns, temperature, SCALED)
        m, s, a = _fold_tile(m, s, a, x)
    tl.store(max_ptr + i, m)
    tl.store(sums_ptr + 2 * i, s)
    tl.store(sums_ptr + 2 * i + 1, a)

    j = tl.arange(0, BLOCK_IDS)
    valid = j < num_ids
    ids = tl.load(ids_ptr + i * stride_ids + j, mask=valid, other=0)
    z = _pick_owned(row_ptr, stride_col, ids, valid, vocab_start, shard_size, real_columns, temperature,
                    SCALED)
    tl.store(picked_ptr + i * num_ids + j, z, mask=valid)


@triton.jit
def _softmax_backward_kernel(
    logits_ptr, stride_row, stride_col, grad_ptr, stride_grad_row, position_ptr,
    log_z_ptr, alpha_ptr, beta_ptr, ids_ptr, stride_ids, g_ids_ptr,
    vocab_start, shard_size, real_columns, temperature, num_ids,
    SCALED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_IDS: tl.constexpr,
):
    """Token t's gradient row: (q·(α·log q + β) + Σ_j g_j·1[v = id_j]) / temperature.

    Zero for tokens outside the selection (position -1), at padded columns, and on rows whose
    log Z is -inf (no distribution).  The dense term is written tile by tile; after a barrier the
    few gather columns are recomputed in fp32 with their g added, so they are rounded once.
    """
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(position_ptr + t)
    selected = position >= 0
    p = tl.maximum(position, 0)
    log_z = tl.load(log_z_ptr + p, mask=selected, other=float("-inf"))
    alpha = tl.load(alpha_ptr + p, mask=selected, other=0.0)
    beta = tl.load(beta_ptr + p, mask=selected, other=0.0)
    # Columns [0, limit) have a gradient: none outside the selection or without a distribution.
    limit = tl.where(log_z > float("-inf"), real_columns, 0)
    log_z = tl.where(limit > 0, log_z, 0.0)  # masked lanes compute -inf - 0, never -inf - -inf
    row_ptr = logits_ptr + t * stride_row
    out_ptr = grad_ptr + t * stride_grad_row
    for start in range(0, shard_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _load_scaled(row_ptr, cols, stride_col, limit, temperature, SCALED)
        log_q = tl.maximum(z - log_z, NEG_LARGE)
        g = _unscale(tl.where(cols < limit, (log_q * alpha + beta) * tl.exp(log_q), 0.0), temperature, SCALED)
        tl.store(out_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < shard_size)

    tl.debug_barrier()  # the dense stores above land before the gather columns are rewritten
    j = tl.arange(0, BLOCK_IDS)
    valid = j < tl.where(selected, num_ids, 0)
    local = tl.load(ids_ptr + p * stride_ids + j, mask=valid, other=0) - vocab_start
    g_ids = tl.load(g_ids_ptr + p * num_ids + j, mask=valid, other=0.0)
    hit = valid & (local >= 0) & (local < limit)
    # Duplicate ids: each of their lanes writes the sum of all their g.
    g_ids = tl.sum(tl.where(local[:, None] == local[None, :], g_ids[None, :], 0.0), axis=1)
    local = tl.where(hit, local, 0)
    z = _load_scaled(row_ptr, local, stride_col, tl.where(hit, limit, 0), temperature, SCALED)
    log_q = tl.maximum(z - log_z, NEG_LARGE)
    g = _unscale((log_q * alpha + beta) * tl.exp(log_q) + g_ids, temperature, SCALED)
    tl.store(out_ptr + local, g.to(grad_ptr.dtype.element_ty), mask=hit)


@triton.jit
def _summary_partials_kernel(
    logits_ptr, stride_row, stride_col, rows_ptr, sampled_ptr,
    max_ptr, sums_ptr, sampled_logit_ptr, top_values_ptr, top_ids_ptr,
    vocab_start, shard_size, real_columns, temperature,
    SCALED: tl.constexpr, TOP_K: tl.constexpr, INSERT_LIMIT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row i = token rows[i]: m, (S, A), z at its sampled id, and the shard's top-TOP_K of z.

    The top-k is held in registers as int64 keys (value descending, then lower column), so ties
    are exact.  A tile's keys above the current k-th are merged in: up to INSERT_LIMIT of them one
    at a time in place of the k-th (the usual case after the first tiles), more by a bitonic top-k
    of the tile merged with the held ones.  Padded columns are candidates with value -inf, as in
    the torch path; slots past the end of a shard narrower than TOP_K come out as -inf.
    """
    i = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride_row
    m, s, a = float("-inf"), 0.0, 0.0
    if TOP_K > 0:
        slots = tl.arange(0, TOP_K)
        best = tl.full([TOP_K], NO_KEY, tl.int64)  # unordered
    for start in range(0, shard_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = _load_scaled(row_ptr, cols, stride_col, real_columns, temperature, SCALED)
        m, s, a = _fold_tile(m, s, a, x)
        if TOP_K > 0:
            kth = tl.min(best, axis=0)
            keys = tl.where(cols < shard_size, _descending_key(x, cols), NO_KEY)
            keys = tl.where(keys > kth, keys, NO_KEY)
            above = tl.sum((keys > NO_KEY).to(tl.int32), axis=0)
            if above > INSERT_LIMIT:
                best = tl.topk(tl.reshape(tl.join(best, tl.topk(keys, TOP_K)), [2 * TOP_K]), TOP_K)
            else:
                for _ in range(above):
                    key = tl.max(keys, axis=0)
                    best = tl.where((slots == tl.argmin(best, axis=0)) & (key > kth), key, best)
                    kth = tl.min(best, axis=0)
                    keys = tl.where(keys == key, NO_KEY, keys)
    tl.store(max_ptr + i, m)
    tl.store(sums_ptr + 2 * i, s)
    tl.store(sums_ptr + 2 * i + 1, a)
    if sampled_ptr is not None:
        z = _pick_owned(row_ptr, stride_col, tl.load(sampled_ptr + i), True, vocab_start, shard_size,
                        real_columns, temperature, SCALED)
        tl.store(sampled_logit_ptr + i, z)
    if TOP_K > 0:
        best = tl.sort(best, descending=True)
        values, cols = _decode_key(best)
        tl.store(top_values_ptr + i * TOP_K + slots, tl.where(best == NO_KEY, float("-inf"), values))
        tl.store(top_ids_ptr + i * TOP_K + slots, vocab_start + cols)


# --------------------------------------------------------------------------- launchers


def _launch_options() -> dict:
    # Fused multiply-adds on, explicitly (Triton 3.9 warns that its default will change).
    return dict(num_warps=NUM_WARPS, enable_fp_fusion=True)


def _block_ids(num_ids: int) -> int:
    return max(triton.next_power_of_2(num_ids), 2)


def _block_v(shard_size: int, limit: int) -> int:
    return min(triton.next_power_of_2(max(shard_size, 1)), limit)


class SoftmaxPartials(NamedTuple):
    """One shard's per-row partials (fp32): local max [n], (S, A) [n, 2], z at the gather ids [n, m]."""

    max: Tensor
    sums: Tensor
    picked: Tensor


def softmax_partials(
    logits: Tensor,
    rows: Tensor,
    gather_ids: Tensor,
    *,
    vocab_start: int,
    real_columns: int,
    temperature: float,
) -> SoftmaxPartials:
    """Partials of rows ``logits[rows]`` [n, V/TP] for log Z, entropy and log q at ``gather_ids`` [n, m].

    ``real_columns``: leading local columns that are real vocabulary (the rest is padding).
    """
    n, num_ids = rows.numel(), gather_ids.shape[1]
    shard_size = logits.shape[1]
    out = SoftmaxPartials(
        logits.new_empty(n, dtype=torch.float32),
        logits.new_empty(n, 2, dtype=torch.float32),
        logits.new_empty(n, num_ids, dtype=torch.float32),
    )
    if n:
        gather_ids = gather_ids.contiguous()
        _softmax_partials_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), rows, gather_ids, gather_ids.stride(0),
            *out, vocab_start, shard_size, real_columns, float(temperature), num_ids,
            SCALED=temperature != 1.0, BLOCK_V=_block_v(shard_size, BLOCK_V), BLOCK_IDS=_block_ids(num_ids),
            **_launch_options(),
        )
    return out


def softmax_backward(
    logits: Tensor,
    rows: Tensor,
    gather_ids: Tensor,
    g_ids: Tensor,
    log_z: Tensor,
    alpha: Tensor,
    beta: Tensor,
    *,
    vocab_start: int,
    real_columns: int,
    temperature: float,
) -> Tensor:
    """dL/dlogits = dL/dz / temperature for all of ``logits`` [T, V/TP], in their dtype, where per
    selected row i dL/dz_v = q_v·(α_i·log q_v + β_i) + Σ_j g_ids[i, j]·1[v = gather_ids[i, j]]
    and other rows get 0.

    ``rows`` must be distinct.  One pass; the only allocation besides the gradient is a [T] map.
    """
    tokens, shard_size = logits.shape
    num_ids = gather_ids.shape[1]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    position = torch.full((tokens,), -1, dtype=torch.int64, device=logits.device)
    position.index_copy_(0, rows.long(), torch.arange(rows.numel(), device=logits.device))
    if tokens:
        gather_ids = gather_ids.contiguous()
        _softmax_backward_kernel[(tokens,)](
            logits, logits.stride(0), logits.stride(1), grad, grad.stride(0), position,
            log_z.contiguous(), alpha.contiguous(), beta.contiguous(), gather_ids, gather_ids.stride(0),
            g_ids.to(torch.float32).contiguous(),
            vocab_start, shard_size, real_columns, float(temperature), num_ids,
            SCALED=temperature != 1.0, BLOCK_V=_block_v(shard_size, BLOCK_V), BLOCK_IDS=_block_ids(num_ids),
            **_launch_options(),
        )
    return grad


class SummaryPartials(NamedTuple):
    """One shard's per-row summary partials (fp32 unless noted); ``topk`` slots are padded to a
    power of two (at least 2), the slots past min(k, V/TP) are not candidates."""

    max: Tensor  # [n]
    sums: Tensor  # [n, 2] (S, A)
    sampled: Optional[Tensor]  # [n] z at the sampled id where owned, else 0
    top_values: Optional[Tensor]  # [n, K] z, descending
    top_ids: Optional[Tensor]  # [n, K] int64 global ids; ties by lower id


def summary_partials(
    logits: Tensor,
    rows: Tensor,
    sampled_ids: Optional[Tensor],
    topk: int,
    *,
    vocab_start: int,
    real_columns: int,
    temperature: float,
) -> SummaryPartials:
    """Partials of rows ``logits[rows]`` for :func:`vocab_parallel_summary`; ``sampled_ids`` [n] are
    the rows' own sampled ids, ``topk`` <= MAX_TOPK (0: none)."""
    if not 0 <= topk <= MAX_TOPK:
        raise ValueError(f"the top-k kernel takes k <= {MAX_TOPK}, got {topk}")
    n, shard_size = rows.numel(), logits.shape[1]
    # At least 2: Triton 3.6's tl.topk(x, 1) reduces x to a 0-d value and fails to build (3.9 fixed it).
    slots = max(2, triton.next_power_of_2(topk)) if topk else 0
    new = lambda *shape, dtype=torch.float32: logits.new_empty(*shape, dtype=dtype)  # noqa: E731
    out = SummaryPartials(
        new(n),
        new(n, 2),
        new(n) if sampled_ids is not None else None,
        new(n, slots) if topk else None,
        new(n, slots, dtype=torch.int64) if topk else None,
    )
    if n:
        block = max(_block_v(shard_size, TOPK_BLOCK_V if topk else BLOCK_V), slots)
        _summary_partials_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), rows, sampled_ids,
            *out, vocab_start, shard_size, real_columns, float(temperature),
            SCALED=temperature != 1.0, TOP_K=slots, INSERT_LIMIT=TOPK_INSERT_LIMIT, BLOCK_V=block,
            **_launch_options(),
        )
    return out
