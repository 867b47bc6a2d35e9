"""Writing a HF model directory from a stream of ``(hf_name, tensor)`` pairs."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from megatron_eopd.checkpoint.safetensors_io import INDEX_NAME, SINGLE_NAME

# Everything a HF directory may hold besides weights and config that loaders want next to it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "tokenizer.model",
)
GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = TOKENIZER_FILES + (GENERATION_CONFIG,)) -> list[str]:
    """Copy tokenizer and generation-config files that exist in ``src``; return their names."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _make_readable(path: Path) -> None:
    """Give a weights file the permissions of the files beside it (``0666 & ~umask``).

    safetensors 0.8 creates its files 0600; a model directory on a cluster's shared file system must
    be readable by jobs running as other users, as its config and tokenizer files are.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def plan_shards(shapes: Mapping[str, Sequence[int]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Group tensors (in the given order) into shards of at most ``max_shard_bytes`` each."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize
        for dim in shape:
            nbytes *= int(dim)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_weights(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    shapes: Mapping[str, Sequence[int]],
    dtype: torch.dtype,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Optional[object] = None,
) -> list[str]:
    """Stream tensors into safetensors files, holding at most one shard in memory.

    ``shapes`` (name -> shape, in stream order) fixes the shard plan up front, so the file names
    (``model-0000k-of-0000n.safetensors``) are known before the first tensor arrives.  A single
    shard is written as ``model.safetensors`` without an index.  Returns the files written.
    """
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_shards(shapes, itemsize, max_shard_bytes)
    n = len(plan)
    file_of = {}
    for k, names in enumerate(plan):
        file = SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        for name in names:
            file_of[name] = file
    count_of = {file: sum(1 for v in file_of.values() if v == file) for file in set(file_of.values())}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    written = []
    seen = set()
    for name, tensor in tensors:
        if name not in file_of:
            raise ValueError(f"unexpected tensor {name} in the export stream")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(f"{name}: exported shape {list(tensor.shape)} != expected {list(shapes[name])}")
        seen.add(name)
        file = file_of[name]
        # clone(): detach from model storage and from the vocab-padded parent tensor.
        pending.setdefault(file, {})[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous().clone()
        if len(pending[file]) == count_of[file]:
            save_file(pending.pop(file), str(out_dir / file), metadata={"format": "pt"})
            _make_readable(out_dir / file)
            written.append(file)
        if progress is not None:
            progress.update(1)
    missing = [name for name in shapes if name not in seen]
    if missing:
        raise ValueError(f"export stream ended without {len(missing)} tensors, e.g. {missing[:4]}")
    if n > 1:
        total = sum(math.prod(s) * itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": file_of}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written


def hf_config_for_dtype(config: Mapping, dtype: torch.dtype) -> dict:
    """A copy of a HF ``config.json`` dict declaring ``dtype`` (both the old and the new key)."""
    out = dict(config)
    name = str(dtype).replace("torch.", "")
    out["torch_dtype"] = name  # vLLM and transformers < 5 read this one
    out["dtype"] = name
    return out


def write_hf_files(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    shapes: Mapping[str, Sequence[int]],
    dtype: torch.dtype,
    *,
    hf_config: Mapping,
    side_files_from: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Optional[object] = None,
) -> None:
    """Everything a HF model directory holds: weights, ``config.json`` for ``dtype``, tokenizer files."""
    write_hf_weights(out_dir, tensors, shapes, dtype, max_shard_bytes=max_shard_bytes, progress=progress)
    config = hf_config_for_dtype(hf_config, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(Path(side_files_from), out_dir)


def write_hf_directory(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, Sequence[int]],
                       dtype: torch.dtype, *, hf_config: Mapping, side_files_from: Path, **kwargs) -> Path:
    """:func:`write_hf_files` into a staging directory renamed to ``out_dir`` at the end (replacing it).

    A reader never sees a half-written directory; a failure leaves ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_hf_files(staging, tensors, shapes, dtype, hf_config=hf_config, side_files_from=side_files_from, **kwargs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
    return out_dir
