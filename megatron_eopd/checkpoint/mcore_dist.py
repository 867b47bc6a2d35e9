"""Megatron distributed checkpoints (``torch_dist``) of Qwen3 models, with our conversion metadata.

Directory layout (what Megatron-LM's ``--load DIR --ckpt-format torch_dist`` expects, plus ours)::

    DIR/latest_checkpointed_iteration.txt   "release"
    DIR/release/                            torch_dist: .metadata, *.distcp, common.pt, metadata.json
    DIR/eopd_checkpoint.json                format, TP/PP at conversion, dtype, vocab padding, layer spec
    DIR/hf/                                 the HF config.json, generation_config.json, tokenizer files

``torch_dist`` stores every tensor with its global shape and offsets, so a checkpoint written at
one TP/PP loads at any other: Megatron reshards on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megatron_eopd.checkpoint.errors import ConversionError
from megatron_eopd.models.chunks import as_chunk_list, unwrap_model

FORMAT = "megatron-eopd/qwen3-torch_dist"
FORMAT_VERSION = 1
META_NAME = "eopd_checkpoint.json"
HF_SUBDIR = "hf"
RELEASE = "release"
TRACKER = "latest_checkpointed_iteration.txt"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def read_checkpoint_meta(ckpt_dir: Union[str, Path]) -> dict:
    """Our metadata of a converted checkpoint; :class:`ConversionError` if it is not one."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_NAME
    if not path.is_file():
        raise ConversionError(f"{ckpt_dir} is not a megatron-eopd checkpoint (no {META_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"corrupted {path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if not (ckpt_dir / RELEASE / "metadata.json").is_file():
        raise ConversionError(f"{ckpt_dir / RELEASE} holds no torch_dist checkpoint")
    if not (ckpt_dir / HF_SUBDIR / "config.json").is_file():
        raise ConversionError(f"{ckpt_dir / HF_SUBDIR} lacks the HF config.json")
    return meta


def hf_config_of(ckpt_dir: Union[str, Path]) -> dict:
    return json.loads((Path(ckpt_dir) / HF_SUBDIR / "config.json").read_text())


def _model_sharded_state_dict(model_chunks: Any) -> dict:
    chunks = as_chunk_list(model_chunks)
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    # Megatron-LM's key names for virtual pipeline chunks.
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor with a storage of its own size (no copy); CPU, contiguous only.

    Megatron's ``torch_dist`` writer clones every CPU tensor whose storage is larger than the tensor
    (``_clone_if_needed`` in ``filesystem_async.py``) and holds all the clones until the files are
    written.  The halves of a fused SwiGLU ``linear_fc1`` that it saves are such views, so a save on
    CPU held a second copy of every fc1 (45% of Qwen3).  An alias through a buffer has the view's
    exact size: written as it is.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == nbytes:
        return tensor
    whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    start = tensor.storage_offset() * tensor.element_size()
    return torch.frombuffer(memoryview(whole.numpy())[start:start + nbytes], dtype=tensor.dtype).view(tensor.shape)


def without_views(node: Any) -> Any:
    """A sharded state dict for saving whose CPU tensors are not views: factories are built (as
    Megatron's save does first) and every piece gets :func:`_own_storage`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(node, ShardedTensorFactory):
        return without_views(node.build())
    if isinstance(node, ShardedTensor):
        if isinstance(node.data, torch.Tensor):
            node.data = _own_storage(node.data.detach())
        return node
    if isinstance(node, dict):
        return {k: without_views(v) for k, v in node.items()}
    if isinstance(node, list):
        return [without_views(v) for v in node]
    return node


def save_mcore_checkpoint(model_chunks: Any, ckpt_dir: Union[str, Path]) -> None:
    """Collective: every rank of the job saves its shards under ``ckpt_dir/release``."""
    from megatron.core import dist_checkpointing

    release = Path(ckpt_dir) / RELEASE
    if torch.distributed.get_rank() == 0:
        release.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = without_views(_model_sharded_state_dict(model_chunks))
    state["checkpoint_version"] = 3.0
    state["iteration"] = 0
    dist_checkpointing.save(state, str(release))


def _pieces(tree: Any) -> list:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _pieces(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _pieces(v)]
    return [tree]


def merge_in_place(sharded: Any) -> None:
    """Make the sharded state dict's factories hand back the parameter they were cut from.

    Megatron splits some parameters into pieces for the checkpoint (the fused gate/up ``linear_fc1``
    of a SwiGLU MLP is saved as two tensors) and on load joins the loaded pieces with ``torch.cat``,
    a new tensor per parameter, all held until ``load_state_dict`` copies them back: a second copy
    of every such weight (for Qwen3, the fc1s are 45% of the model).  The pieces are views of the
    parameter and the checkpoint is read into them in place, so when every loaded piece still lies
    in the parameter's storage the parameter already holds the result and is returned as is;
    otherwise Megatron's own merge runs.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def visit(node: Any) -> None:
        if isinstance(node, ShardedTensorFactory):
            param, merge = node.data, node.merge_fn
            if not isinstance(param, torch.Tensor):
                return
            storage = param.untyped_storage().data_ptr()

            def merge_in_place(loaded, param=param, merge=merge, storage=storage):
                pieces = _pieces(loaded)
                if pieces and all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage
                                  for t in pieces):
                    return param
                return merge(loaded)

            object.__setattr__(node, "merge_fn", merge_in_place)
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(sharded)


def load_mcore_checkpoint(model_chunks: Any, ckpt_dir: Union[str, Path], *, strict: bool = True) -> dict:
    """Collective: load a converted checkpoint into model chunks built at any TP/PP.

    Returns the checkpoint metadata.  Megatron's local layer spec saves its norms under the
    transformer-engine keys (``sharded_state_dict_keys_map``), so a checkpoint converted with one
    spec loads into a model built with the other.
    """
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_meta(ckpt_dir)
    chunks = as_chunk_list(model_chunks)
    sharded = _model_sharded_state_dict(chunks)
    merge_in_place(sharded)
    loaded = dist_checkpointing.load(sharded, str(Path(ckpt_dir) / RELEASE))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    return meta


def write_checkpoint_meta(ckpt_dir: Path, *, tp: int, pp: int, dtype: str, padded_vocab: int,
                          vocab_divisor: int, layer_spec: str, source: Optional[str] = None) -> dict:
    import megatron.core

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "Qwen3ForCausalLM",
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "dtype": dtype,
        "padded_vocab_size": padded_vocab,
        "vocab_divisor": vocab_divisor,
        "layer_spec": layer_spec,
        "megatron_core_version": getattr(megatron.core, "__version__", "unknown"),
        "source": source,
    }
    (ckpt_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    (ckpt_dir / TRACKER).write_text(RELEASE + "\n")
    return meta
