"""Process-group start-up, Megatron-Core parallel state and the CPU compatibility layer."""

from megatron_eopd.platform.distributed import (
    Platform,
    current_platform,
    destroy_model_parallel,
    init_distributed,
    init_model_parallel,
    resolve_device,
    shutdown,
)

__all__ = [
    "Platform",
    "current_platform",
    "destroy_model_parallel",
    "init_distributed",
    "init_model_parallel",
    "resolve_device",
    "shutdown",
]
