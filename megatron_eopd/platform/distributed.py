"""Start torch.distributed and Megatron-Core model parallelism with one calling code on GPU and CPU.

On a machine with CUDA devices this uses NCCL and binds each rank to its local GPU.  Without them it
uses gloo and switches on :mod:`megatron_eopd.platform.cpu_compat`.  Rank information comes from
torchrun's environment, else from Slurm's (``srun`` without torchrun), else a single process.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    timeout_s: float = 600.0

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


_platform: Optional[Platform] = None


def _rank_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a lone process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return 0, 1, 0


def launch_world_size() -> int:
    """The world size this launch will have (torchrun, else Slurm, else 1), before any process group."""
    return _rank_env()[1]


def launch_ranks_per_node(world_size: int, default: int) -> int:
    """Ranks per node of a launch of ``world_size`` ranks: torchrun's ``LOCAL_WORLD_SIZE`` when this
    process is inside that launch, else ``default`` (``parallel.gpus_per_node``).

    A dry run plans a launch it is not part of, and a process may carry a stray ``LOCAL_WORLD_SIZE``
    (libraries that start their own workers set it), so the variable counts only when ``WORLD_SIZE``
    says this process belongs to a launch of exactly ``world_size`` ranks.
    """
    if "LOCAL_WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") == str(world_size):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return default


def resolve_device(requested: str = "auto") -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
COLLECTIVE_TIMEOUT_ENV = "EOPD_COLLECTIVE_TIMEOUT_S"


def collective_timeout_s() -> float:
    """How long a rank waits in one collective: ``$EOPD_COLLECTIVE_TIMEOUT_S`` (the Slurm launchers
    set it), else 600 s.  A peer process that dies fails the collective at once (its sockets close);
    this bounds a peer that hangs or a host that vanishes without closing them."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        # A ConfigError: the trainer's command line reports it in one line, exit 2, before any rank waits.
        from megatron_eopd.config import ConfigError

        raise ConfigError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def init_distributed(device: str = "auto", timeout_s: Optional[float] = None) -> Platform:
    """Initialise the default process group (idempotent) and return the platform description.

    ``timeout_s`` (default :func:`collective_timeout_s`) bounds every collective of the run."""
    global _platform
    if _platform is not None:
        return _platform
    if timeout_s is None:
        timeout_s = collective_timeout_s()
    rank, world_size, local_rank = _rank_env()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        from megatron_eopd.platform import cpu_compat

        cpu_compat.enable()
        backend = "gloo"
        # Ranks share the machine's cores; oversubscribing threads slows every rank down.
        if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = None
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process needs no rendezvous: an in-memory store cannot collide with a port that
        # another daemon (Slurm's step daemons, a second job) holds on some other address.
        store = dist.HashStore()
    elif "MASTER_PORT" not in os.environ:
        raise RuntimeError("MASTER_PORT must be set for a multi-rank launch (torchrun sets it)")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _platform = Platform(dev, backend, rank, world_size, local_rank, timeout_s)
    return _platform


def current_platform() -> Platform:
    if _platform is None:
        raise RuntimeError("init_distributed() has not been called")
    return _platform


def default_device() -> torch.device:
    """Where models and their tensors live: the platform's device once initialised, else CUDA when
    torch sees a GPU, else the CPU."""
    if _platform is not None:
        return _platform.device
    return resolve_device("auto")


def release_cached_memory(device: torch.device) -> None:
    """Give the caching allocator's free blocks on ``device`` back to the GPU (no-op off CUDA).

    A rollout engine is another process: memory this process freed but still caches (the training
    peak's activations, a checkpoint load's buffers) is not available to it until returned here.
    """
    if torch.device(device).type == "cuda":
        import gc

        gc.collect()  # tensors only reachable through reference cycles
        torch.cuda.empty_cache()


# Backends whose collectives take tensors on one device type only.
_BACKEND_DEVICE_TYPES = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu"}


def _backend_device_types(group=None) -> list[str]:
    """Device types the group's backend reduces on, e.g. ["cuda"] for NCCL, ["cpu", "cuda"] for a
    "cpu:gloo,cuda:nccl" group."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # per-device-type backends
        return [part.split(":", 1)[0].strip() for part in backend.split(",")]
    if backend not in _BACKEND_DEVICE_TYPES:
        raise RuntimeError(f"collective_device() does not know which device backend {backend!r} reduces on")
    return [_BACKEND_DEVICE_TYPES[backend]]


def collective_device(group=None) -> torch.device:
    """The device on which to create tensors handed to a collective of ``group`` (default: WORLD).

    NCCL reduces only CUDA tensors and gloo (as used here) CPU ones; a tensor on the wrong side fails
    with "No backend type associated with device type ...".  Without a process group this is
    :func:`default_device` (nothing will be reduced).
    """
    if not dist.is_initialized():
        return default_device()
    types = _backend_device_types(group)
    preferred = default_device().type
    device_type = preferred if preferred in types else types[0]
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
) -> None:
    """(Re)build Megatron's model-parallel groups and its RNG tracker for the given layout."""
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    platform = current_platform()
    if platform.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {platform.world_size} is not divisible by TP*PP = "
            f"{tensor_parallel}*{pipeline_parallel}"
        )
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        # Megatron's groups otherwise wait 30 min on a peer that died; follow the platform timeout.
        distributed_timeout_minutes=max(1, math.ceil(platform.timeout_s / 60)),
        # Megatron's extra gloo copies of the data-parallel groups duplicate what gloo already is.
        create_gloo_process_groups=platform.backend != "gloo",
    )
    mcore_tp.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Forget Megatron's parallel state *and* close the process groups it opened.

    Megatron's own ``destroy_model_parallel`` only drops its references; the groups (each with its
    sockets and threads) stay alive, so re-initialising for another layout in the same process
    (tests, converters) would pile them up.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _destroy_subgroups()


def _destroy_subgroups() -> None:
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d

    world = distributed_c10d.GroupMember.WORLD
    for group in list(distributed_c10d._world.pg_map.keys()):
        if group is not world:
            dist.destroy_process_group(group)


def shutdown() -> None:
    global _platform
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _platform = None
