"""Run Megatron-Core on CPU with gloo: the one place where its CUDA assumptions are redirected.

Megatron-Core is written for GPUs.  On a CPU-only machine it still works once a handful of CUDA
touch points are rerouted (FACTS.md lists them): allocations on ``torch.cuda.current_device()``,
literal ``device="cuda"`` in factory calls, ``.cuda()`` moves, ``torch.cuda.synchronize``, the
CUDA RNG tracker and the optimizers' ``tensor.type()`` checks.  :func:`enable` installs the
redirections; it is only ever called by :mod:`megatron_eopd.platform.distributed` when no GPU is
present, so nothing here touches the CUDA path.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_enabled = False
_lock = threading.Lock()
_mode: "CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device index means "that CUDA device" to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch call to the CPU.

    Catches literal ``device="cuda"`` (e.g. ``get_default_causal_mask``, the pipeline schedules'
    token counters) and ``device=torch.cuda.current_device()`` alike, without editing Megatron.
    ``tensor.type()`` (the type-name query, no argument) names CPU tensors as their CUDA
    counterparts: Megatron's optimizers sort parameters by comparing it with
    ``"torch.cuda.FloatTensor"``, and the distributed optimizer (DP > 1) refuses anything else.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            # tensor.to("cuda"), tensor.to(0), tensor.cuda(): keep the tensor where it is.
            if func is torch.Tensor.cuda:
                kwargs.pop("device", None)
                kwargs.pop("non_blocking", None)
                return args[0]
            if len(args) > 1 and _is_cuda_device(args[1]) and not isinstance(args[1], torch.dtype):
                args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _inert(name: str):
    """A do-nothing stand-in; one function object per patched name (torch._dynamo keys on identity)."""

    def inert(*_args, **_kwargs):
        return None

    inert.__name__ = inert.__qualname__ = f"cpu_inert_{name}"
    return inert


def _module_cuda(self, device=None):  # noqa: ARG001 - mirrors nn.Module.cuda's signature
    return self


class _CpuRngStateSurrogate:
    """Stands in for the CUDA RNG state inside Megatron's RNG tracker.

    Megatron forks "CUDA" RNG states for dropout in tensor-parallel regions.  On CPU there is one
    generator, so the tracker's states become CPU generator states: forking still gives each region
    its own reproducible stream.
    """

    @staticmethod
    def get(*_args, **_kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set(new_state, *_args, **_kwargs) -> None:
        if isinstance(new_state, torch.Generator):
            new_state = new_state.get_state()
        torch.set_rng_state(new_state)


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """``clip_grad_by_total_norm_fp32`` for CPU gradients: scale in place when the norm exceeds ``max_norm``."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0 and grads:
        torch._foreach_mul_(grads, coefficient)


def enable() -> None:
    """Install the CPU redirections (idempotent).  Call before building Megatron models."""
    global _enabled, _mode
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "the CPU device was asked for (run.device=cpu) in a process that can use CUDA; the CPU "
                "compatibility layer must never be active beside the GPU path. Hide the GPUs for this run "
                "(CUDA_VISIBLE_DEVICES= with an empty value) or use run.device=auto"
            )
        cuda = torch.cuda
        cuda.current_device = lambda: 0  # rewritten to "cpu" by CudaToCpuMode where used as a device
        cuda.synchronize = _inert("synchronize")
        # Megatron seeds "the CUDA generator" and reads its state back: that is the CPU one here.
        # (torch.manual_seed itself calls cuda.manual_seed_all, so that one must stay inert.)
        cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        cuda.manual_seed_all = _inert("manual_seed_all")
        cuda.get_rng_state = _CpuRngStateSurrogate.get
        cuda.set_rng_state = _CpuRngStateSurrogate.set
        cuda.random.get_rng_state = _CpuRngStateSurrogate.get
        cuda.random.set_rng_state = _CpuRngStateSurrogate.set
        cuda.empty_cache = _inert("empty_cache")
        torch.nn.Module.cuda = _module_cuda

        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = _CpuRngStateSurrogate.get
        mcore_random._set_cuda_rng_state = _CpuRngStateSurrogate.set

        # Megatron's gradient clipping asserts CUDA gradients; the same scaling on CPU ones.
        from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer

        clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
        mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm

        _mode = CudaToCpuMode()
        _mode.__enter__()  # process-wide: the CPU path never leaves it
        _enabled = True


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def suspended():
    """Temporarily leave the device-rewriting mode (e.g. around third-party code that probes CUDA)."""
    if not _enabled or _mode is None:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
