"""Building the run's models under Megatron's current parallel state.

- The teacher: a ``GPTModel`` for inference only - weights loaded, ``requires_grad`` off, no DDP
  wrapper, no gradient buffers, no optimizer.
- The student: a ``GPTModel`` wrapped in Megatron's ``DistributedDataParallel`` (gradient buffers in
  fp32, reduced over data-parallel ranks), Megatron's optimizer (AdamW; the distributed optimizer
  when DP > 1) and its learning-rate schedule, with Megatron's per-token loss normalisation on.

Parameters are created in the run's dtype (bf16 on GPUs, fp32 on CPUs) on the platform's device by
``build_qwen3_gpt``.  No ``Float16Module``: it would upcast the last stage's full logits to fp32,
which the vocab-parallel loss avoids by upcasting chunk by chunk; token ids need no input cast.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_eopd.checkpoint import HFSafetensors, load_mcore_checkpoint
from megatron_eopd.models.qwen3 import build_qwen3_gpt, load_hf_weights
from megatron_eopd.platform import current_platform
from megatron_eopd.platform.mcore_compat import fuse_torch_adam
from megatron_eopd.trainer.config import ModelSpec, OptimConfig
from megatron_eopd.trainer.student import Optimization


def run_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_weights(model, spec: ModelSpec) -> None:
    """The spec's Megatron checkpoint when given, else the safetensors of its HF directory."""
    if spec.checkpoint:
        load_mcore_checkpoint(model, Path(spec.checkpoint))
    else:
        load_hf_weights(model, HFSafetensors(Path(spec.hf_dir)))


def build_teacher(spec: ModelSpec, dtype: torch.dtype) -> list:
    model = build_qwen3_gpt(spec.hf_dir, params_dtype=dtype, perform_initialization=False)
    load_weights(model, spec)
    model.eval()
    model.requires_grad_(False)
    return [model]


def build_student(spec: ModelSpec, dtype: torch.dtype, optim: OptimConfig, total_steps: int,
                  *, recompute: str = "none", load: bool = True) -> Optimization:
    """The student with DDP, optimizer and schedule; ``load=False`` when a checkpoint will fill it.
    ``recompute``: activation recomputation, see ``build_qwen3_gpt``."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = build_qwen3_gpt(spec.hf_dir, params_dtype=dtype, perform_initialization=False, recompute=recompute,
                            calculate_per_token_loss=True)
    if load:
        load_weights(model, spec)
    distributed_optimizer = parallel_state.get_data_parallel_world_size() > 1
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer,
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
        # Megatron's extra gloo copies of the DP groups exist only next to NCCL (see init_model_parallel).
        use_gloo_process_groups=current_platform().backend != "gloo",
    )
    fuse_torch_adam(optimizer)  # where neither transformer-engine nor apex gave Megatron a fused Adam
    config.grad_scale_func = optimizer.scale_loss
    steps = max(total_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=optim.lr_schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return Optimization([ddp], optimizer, scheduler)
