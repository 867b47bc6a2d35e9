"""Model chunks as Megatron hands them around: one module, or a list for virtual pipeline stages.

Megatron wraps a ``GPTModel`` in ``Float16Module`` (bf16/fp16) and ``DistributedDataParallel``
(training); code that reads the model's own attributes (``decoder``, ``eopd_arch``) unwraps first.
"""

from __future__ import annotations

from typing import Any


def as_chunk_list(model_chunks: Any) -> list:
    """``model_chunks`` as a list (a single module becomes a one-element list)."""
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def unwrap_model(chunk: Any) -> Any:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
