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


# safetensors' names of the dtypes we export.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _safetensors_header(names: Sequence[str], shapes: Mapping[str, Sequence[int]], dtype: torch.dtype,
                        itemsize: int) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``names`` in this order.

    Data offsets follow the stream order (safetensors only asks that the tensors tile the data area
    without gaps), and the header is padded with spaces to a multiple of 8 bytes as safetensors does.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = itemsize * math.prod(int(d) for d in shapes[name])
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shapes[name]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_hf_weights(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    shapes: Mapping[str, Sequence[int]],
    dtype: torch.dtype,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Optional[object] = None,
) -> list[str]:
    """Stream tensors into safetensors files, holding at most one tensor (in ``dtype``) in memory.

    ``shapes`` (name -> shape, in stream order) fixes the shard plan and each file's header up front,
    so the file names (``model-0000k-of-0000n.safetensors``) and every tensor's offset are known
    before the first tensor arrives; each tensor is written at its place as it arrives (in any
    order).  A single shard is written as ``model.safetensors`` without an index.  Returns the files
    written.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot export dtype {dtype}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_shards(shapes, itemsize, max_shard_bytes)
    n = len(plan)
    files = [SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    file_of, offset_of, left = {}, {}, {}
    for k, names in enumerate(plan):
        offset = 0
        for name in names:
            file_of[name], offset_of[name] = files[k], offset
            offset += itemsize * math.prod(int(d) for d in shapes[name])
        left[files[k]] = len(names)
    headers = {files[k]: _safetensors_header(names, shapes, dtype, itemsize) for k, names in enumerate(plan)}
    handles: dict = {}
    written: list[str] = []
    seen = set()
    try:
        for name, tensor in tensors:
            if name not in file_of or name in seen:
                raise ValueError(f"unexpected tensor {name} in the export stream")
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: exported shape {list(tensor.shape)} != expected {list(shapes[name])}")
            seen.add(name)
            file = file_of[name]
            if file not in handles:
                handles[file] = open(out_dir / file, "wb")
                handles[file].write(headers[file])
            # One tensor at a time: cast (a copy only when the dtype or device differs), write its bytes.
            data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            handles[file].seek(len(headers[file]) + offset_of[name])
            handles[file].write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            del data
            left[file] -= 1
            if not left[file]:
                handles.pop(file).close()
                _make_readable(out_dir / file)
                written.append(file)
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles.values():
            handle.close()
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
