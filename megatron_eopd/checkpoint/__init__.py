"""Checkpoint file I/O: validated HF safetensors reading, Megatron torch_dist save/load, HF directory writing."""

from megatron_eopd.checkpoint.errors import ConversionError
from megatron_eopd.checkpoint.mcore_dist import (
    load_mcore_checkpoint,
    read_checkpoint_meta,
    save_mcore_checkpoint,
)
from megatron_eopd.checkpoint.safetensors_io import HFSafetensors

__all__ = [
    "ConversionError",
    "HFSafetensors",
    "load_mcore_checkpoint",
    "read_checkpoint_meta",
    "save_mcore_checkpoint",
]
