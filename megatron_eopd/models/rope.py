"""Fused rotary position embedding for Megatron-Core without transformer-engine (one Triton kernel).

Megatron applies RoPE to the queries and keys of every layer.  With ``apply_rope_fusion`` it calls
``rope_utils.fused_apply_rotary_pos_emb``, which only transformer-engine provides; without it the
rotation runs as about ten elementwise kernels per tensor (cos, sin, casts, the rotate-half
copy, products, sum, a final concatenation) and as many again in backward.  This module supplies
a function with the same signature and semantics as one Triton kernel each way, and
:func:`ensure_fused_rope` installs it where transformer-engine
is absent, so Megatron's own ``apply_rope_fusion`` path runs it.

The rotation, for t [s, b, heads, d] and angles f [s, 1, 1, d] (Megatron's non-interleaved
layout, halves x1 = t[..., :d/2], x2 = t[..., d/2:] and f1, f2 alike)::

    out = t * cos(f) + rotate_half(t) * sin(f),   rotate_half(t) = [-x2, x1]
    i.e. out1 = x1 cos f1 - x2 sin f1,   out2 = x2 cos f2 + x1 sin f2

and its gradient is the transpose: dx1 = g1 cos f1 + g2 sin f2, dx2 = g2 cos f2 - g1 sin f1.
The kernel computes in fp32 and rounds once (Megatron's unfused path rounds cos/sin to the
input dtype first, so bf16 results can differ from it in the last bit).  Cases the kernel does
not cover (interleaved layout, a rotary dimension smaller than the head, per-sample angles,
tensors Triton cannot take here) fall back to Megatron's own unfused function.

Like :mod:`megatron_eopd.objective.triton_kernels`, the kernel runs on CUDA tensors when compiled
and on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is imported; for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_eopd.platform import mcore_compat, triton_compat

INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    triton_compat.fix_interpreter_index()
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_HEADS = 4
# Explicit, as the loss kernels' (Triton 3.9 warns that the fp-fusion default will change); 4 warps is Triton's default.
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=True)


def available(t: Tensor) -> bool:
    """Whether the kernel can run on ``t`` (dtype, and CUDA when compiled / CPU when interpreted)."""
    return t.dtype in KERNEL_DTYPES and t.device.type == ("cpu" if INTERPRETED else "cuda")


@triton.jit
def _rope_kernel(x_ptr, f_ptr, out_ptr, stride_s, stride_b, stride_h, batch, heads,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """One (position, sample) row and BLOCK_H heads per program; ``out`` is contiguous [s, b, h, d]."""
    row = tl.program_id(0).to(tl.int64)  # offsets pass 2**31 at long sequences
    pos = row // batch
    sample = row % batch
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    f1 = tl.load(f_ptr + pos * 2 * HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    f2 = tl.load(f_ptr + pos * 2 * HALF + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    cos1, sin1 = tl.cos(f1)[None, :], tl.sin(f1)[None, :]
    cos2, sin2 = tl.cos(f2)[None, :], tl.sin(f2)[None, :]
    ok = (h < heads)[:, None] & d_ok[None, :]
    src = x_ptr + pos * stride_s + sample * stride_b + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    dst = out_ptr + (row * heads + h[:, None]) * (2 * HALF) + d[None, :]
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=ok)


def _rotate(x: Tensor, angles: Tensor, backward: bool) -> Tensor:
    """The kernel on x [s, b, h, d] (any strides but a unit last one) with angles [s, d] fp32."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, heads, dim = x.shape
    out = torch.empty((s, b, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel():
        half = dim // 2
        grid = (s * b, triton.cdiv(heads, BLOCK_HEADS))
        _rope_kernel[grid](x, angles, out, x.stride(0), x.stride(1), x.stride(2), b, heads,
                           HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=BLOCK_HEADS, BACKWARD=backward,
                           **LAUNCH_OPTIONS)
    return out


class _FusedRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, angles: Tensor) -> Tensor:
        ctx.save_for_backward(angles)
        return _rotate(t, angles, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (angles,) = ctx.saved_tensors
        return _rotate(grad, angles, backward=True), None


def kernel_applies(t: Tensor, freqs: Tensor, interleaved: bool = False) -> bool:
    """Whether :func:`fused_apply_rotary_pos_emb` runs the kernel (else Megatron's unfused path)."""
    return (not interleaved and available(t) and t.dim() == 4 and freqs.dim() == 4
            and freqs.shape[0] == t.shape[0] and freqs.shape[1] == 1 and freqs.shape[2] == 1
            and freqs.shape[3] == t.shape[3] and t.shape[3] % 2 == 0 and freqs.device == t.device)


def fused_apply_rotary_pos_emb(t: Tensor, freqs: Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> Tensor:
    """RoPE on ``t`` [s, b, heads, d] with angles ``freqs`` [s, 1, 1, d]: Megatron's
    ``fused_apply_rotary_pos_emb`` contract (``transpose_output_memory`` is accepted and ignored)."""
    if not kernel_applies(t, freqs, interleaved):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1]).to(torch.float32).contiguous()
    return _FusedRoPE.apply(t, angles)


ROPE_FROM_TE = "transformer-engine"
ROPE_FROM_TRITON = "megatron_eopd.models.rope"


def ensure_fused_rope() -> str:
    """Make ``apply_rope_fusion`` runnable: transformer-engine's fused RoPE where it imports, else
    :func:`fused_apply_rotary_pos_emb` here, installed as the ``rope_utils.fused_apply_rotary_pos_emb``
    that Megatron's config check and RoPE call read.  Returns which one is in place."""
    from megatron.core.models.common.embeddings import rope_utils

    if mcore_compat.te_fused_rope():
        return ROPE_FROM_TE
    rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    return ROPE_FROM_TRITON
