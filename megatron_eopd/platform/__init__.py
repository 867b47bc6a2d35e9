"""Process-group start-up, Megatron-Core parallel state and the CPU compatibility layer."""

from megatron_eopd.platform.distributed import (
    Platform,
    collective_device,
    current_platform,
    default_device,
    destroy_model_parallel,
    init_distributed,
    init_model_parallel,
    launch_ranks_per_node,
    launch_world_size,
    release_cached_memory,
    resolve_device,
    shutdown,
)

__all__ = [
    "Platform",
    "collective_device",
    "current_platform",
    "default_device",
    "destroy_model_parallel",
    "init_distributed",
    "init_model_parallel",
    "launch_ranks_per_node",
    "launch_world_size",
    "release_cached_memory",
    "resolve_device",
    "shutdown",
]
