"""Run state and checkpoints: save atomically, keep the last K, resume exactly.

A checkpoint is a directory ``checkpoints/iter_NNNNNNN`` that is also a megatron-eopd model
checkpoint (``tools/convert_mcore_to_hf.py`` and ``student.checkpoint`` read it)::

    release/             Megatron torch_dist: the student's sharded weights and optimizer state
    eopd_checkpoint.json model metadata;  hf/  the student's config and tokenizer files
    trainer_state.json   iteration, learning-rate schedule, optimizer step count, prompt-stream position, config
    rng/rank_R.pt        every RNG of rank R (Python, NumPy, torch, CUDA, Megatron's tracker)

Writing goes to ``checkpoints/.tmp-iter_NNNNNNN`` and is renamed when every rank is done; the
``latest`` pointer is replaced last (write + rename).  A process killed at any moment leaves
``latest`` naming a complete checkpoint; left-over temporary directories are removed on start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_eopd.checkpoint.hf_writer import copy_side_files
from megatron_eopd.checkpoint.mcore_dist import (
    HF_SUBDIR,
    RELEASE,
    dtype_name,
    merge_in_place,
    without_views,
    write_checkpoint_meta,
)
from megatron_eopd.errors import EOPDError
from megatron_eopd.models.chunks import unwrap_model
from megatron_eopd.models.qwen3.architecture import DEFAULT_VOCAB_DIVISOR

LATEST = "latest"
STATE_NAME = "trainer_state.json"


class CheckpointError(EOPDError, RuntimeError):
    """A checkpoint cannot be read or does not fit this run."""


@dataclass
class RunState:
    """What besides weights and optimizer a resumed run needs."""

    iteration: int = 0
    data: Optional[dict] = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def clean_partial_writes(root: Path) -> None:
    """Remove temporary directories of writes that were interrupted (rank 0)."""
    if _rank() == 0 and Path(root).is_dir():
        for leftover in Path(root).glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# How Megatron's distributed optimizer (DP > 1) lays its state out in a checkpoint: one tensor per
# contiguous gradient-buffer shard, written and read by every rank in parallel (its default,
# "fully_sharded_model_space", is deprecated and fails to save).  Ignored by the plain optimizer (DP = 1).
OPTIMIZER_CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_parts(optimizer) -> list[tuple[Any, torch.optim.Optimizer]]:
    """(Megatron optimizer, the torch optimizer inside it) for each part of a chained optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(part, part.optimizer) for part in parts
            if isinstance(getattr(part, "optimizer", None), torch.optim.Optimizer)]


def _optimizer_steps(optimizer) -> Optional[int]:
    """Steps taken, from Adam's per-parameter ``step`` counters (None before the first step)."""
    steps = {int(float(state["step"])) for _, inner in _optimizer_parts(optimizer)
             for state in inner.state.values() if "step" in state}
    if len(steps) > 1:
        raise CheckpointError(f"the optimizer's parameters disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else None


def _set_optimizer_steps(optimizer, steps: int) -> None:
    """Give every parameter its own ``step`` counter at ``steps``.

    Megatron's distributed optimizer, with torch's AdamW (no transformer-engine or apex), restores
    the count from the state it describes before loading, not from the checkpoint, and as one
    tensor shared by all parameters, which AdamW then advances once per parameter and step: Adam's
    bias correction, hence the effective learning rate, would be wrong after every resume.
    """
    for _, inner in _optimizer_parts(optimizer):
        for state in inner.state.values():
            if "step" in state:
                old = state["step"]
                device = old.device if isinstance(old, torch.Tensor) else "cpu"
                state["step"] = torch.tensor(float(steps), dtype=torch.float32, device=device)


def _materialise_optimizer_state(optimizer) -> None:
    """Give a torch optimizer that has not stepped yet its state tensors, leaving the weights as they are.

    Megatron's distributed optimizer reads its inner optimizer's ``step`` while it describes the
    state to load, so with torch's AdamW (no transformer-engine or apex) a fresh one fails before
    any checkpoint is read.  One step on zero gradients creates every state tensor; the weights it
    would touch (weight decay) are put back, and the checkpoint then overwrites the state.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part, inner in _optimizer_parts(optimizer):
        # Only the distributed optimizer needs it; transformer-engine's and apex's fused Adam keep
        # the step elsewhere and load without it.
        torch_adam = type(inner).__module__.startswith("torch.optim")
        if not isinstance(part, DistributedOptimizer) or inner.state or not torch_adam:
            continue
        params = [p for group in inner.param_groups for p in group["params"] if p.numel()]
        kept = [p.detach().clone() for p in params]
        for param in params:
            param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)


def _sharded_state(opt, *, loading: bool) -> dict:
    model_state = unwrap_model(opt.chunks[0]).sharded_state_dict()
    optimizer_state = opt.optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                       metadata=dict(OPTIMIZER_CHECKPOINT_METADATA))
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(root: Path, opt, state: RunState, *, config: dict, student_hf_dir: Path, keep_last: int) -> Path:
    """Collective: write iteration ``state.iteration`` under ``root``; returns the final directory."""
    from megatron.core import dist_checkpointing, parallel_state

    root = Path(root)
    name = checkpoint_name(state.iteration)
    tmp, final = root / f".tmp-{name}", root / name
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RELEASE).mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    # Views (the fused fc1's gate/up halves, of the weights and of their Adam moments) aliased, not
    # cloned by Megatron's writer: see without_views.
    dist_checkpointing.save(without_views(_sharded_state(opt, loading=False)), str(tmp / RELEASE))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        model = unwrap_model(opt.chunks[0])
        write_checkpoint_meta(
            tmp, tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            dtype=dtype_name(next(model.parameters()).dtype), padded_vocab=model.eopd_padded_vocab,
            vocab_divisor=DEFAULT_VOCAB_DIVISOR, layer_spec=model.eopd_layer_spec, source=str(student_hf_dir),
        )
        (tmp / HF_SUBDIR).mkdir()
        shutil.copy2(Path(student_hf_dir) / "config.json", tmp / HF_SUBDIR / "config.json")
        copy_side_files(Path(student_hf_dir), tmp / HF_SUBDIR)
        trainer_state = {
            "iteration": state.iteration,
            "data": state.data,
            "scheduler": opt.scheduler.state_dict(),
            "optimizer_steps": _optimizer_steps(opt.optimizer),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "config": config,
        }
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / LATEST)  # the last step: `latest` now names a complete checkpoint
        kept = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in kept[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, opt) -> RunState:
    """Collective: restore weights, optimizer, schedule and this rank's RNGs from ``path``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    try:
        trainer_state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / STATE_NAME}: {exc}") from exc
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = path / "rng" / f"rank_{_rank()}.pt"
    if trainer_state.get("world_size") != world or not rng_file.is_file():
        raise CheckpointError(
            f"{path} was written by {trainer_state.get('world_size')} ranks and this run has {world}: an exact "
            "resume needs the same world size (to continue elsewhere, start a new run with "
            f"student.checkpoint={path})"
        )
    _materialise_optimizer_state(opt.optimizer)
    sharded = _sharded_state(opt, loading=True)
    merge_in_place(sharded)  # the fc1 pieces are read into the tensors they were cut from: no second copy
    loaded = dist_checkpointing.load(sharded, str(path / RELEASE))
    unwrap_model(opt.chunks[0]).load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 weights are their own main copy: the optimizer writes into the parameters
        opt.optimizer.load_state_dict(loaded["optimizer"])
    if trainer_state.get("optimizer_steps") is not None:
        _set_optimizer_steps(opt.optimizer, int(trainer_state["optimizer_steps"]))
    opt.scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return RunState(iteration=int(trainer_state["iteration"]), data=trainer_state.get("data"))
