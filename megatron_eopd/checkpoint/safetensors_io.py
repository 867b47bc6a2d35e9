"""Reading HF safetensors checkpoints (single file or sharded with an index), validated up front."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Union

import torch

from megatron_eopd.checkpoint.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFSafetensors(Mapping):
    """A lazy, read-only ``{hf_name: tensor}`` view of a HF checkpoint directory.

    Opening parses every file's header (so a truncated or corrupted file, a missing shard or an
    index that names tensors a shard lacks fails here, before any conversion work); tensors are
    read on access.
    """

    def __init__(self, hf_dir: Union[str, Path]):
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"corrupted safetensors index {index_path}: {exc}") from exc
            files = sorted(set(weight_map.values()))
        elif (self.hf_dir / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise ConversionError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.hf_dir}")
        self._handles = {}
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for file in files:
            path = self.hf_dir / file
            if not path.is_file():
                raise ConversionError(f"safetensors shard {path} named in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    self._shapes[name] = tuple(sl.get_shape())
                    self._dtypes[name] = sl.get_dtype()
                    self._where[name] = file
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"corrupted safetensors file {path}: {exc}") from exc
            self._handles[file] = handle
        if weight_map is not None:
            for name, file in weight_map.items():
                if self._where.get(name) != file:
                    raise ConversionError(f"index says {name} is in {file}, but that file does not hold it")

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            file = self._where[name]
        except KeyError:
            raise KeyError(name) from None
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"cannot read {name} from {self.hf_dir / file}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, str]:
        """safetensors dtype names (``"F32"``, ``"BF16"``, ...)."""
        return dict(self._dtypes)


def first_difference(a: Union[str, Path], b: Union[str, Path]) -> Union[str, None]:
    """Where two HF directories' weights differ (names, dtype, shape or a bit), or None when every
    tensor is bit-identical.  One tensor of each side is in memory at a time (an 8B compares in
    ~1 GiB), and the bytes are compared, so NaN payloads and -0.0 count too."""
    left, right = HFSafetensors(Path(a)), HFSafetensors(Path(b))
    if set(left) != set(right):
        return f"different tensor names: {sorted(set(left) ^ set(right))[:6]}"
    for name in left:
        x, y = left[name], right[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}"
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return f"{name}: values differ"
        del x, y
    return None
