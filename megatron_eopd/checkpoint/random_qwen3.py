"""Real-shaped Qwen3 directories with seeded random weights, to rehearse a job before downloading weights.

A directory holds what the hub's does: ``config.json`` from the project's presets (depth the only
change allowed), safetensors (one ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards
with ``model.safetensors.index.json`` above the shard limit), the real tokenizer of the chosen kind
and its ``generation_config.json``.  Tensor names and shapes come from the mapping table; tensors are
generated one at a time in row blocks, so at most one shard is held in memory (an 8B checkpoint is
written in 5 GiB shards, never as a whole model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from megatron_eopd.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, GENERATION_CONFIG, write_hf_directory
from megatron_eopd.data import qwen3_tokenizer
from megatron_eopd.errors import EOPDError
from megatron_eopd.models.qwen3.architecture import QWEN3_PRESETS, Qwen3Arch
from megatron_eopd.models.qwen3.mapping import expected_hf_shapes

ARCHS = {"0.6b": "Qwen3-0.6B", "1.7b": "Qwen3-1.7B", "4b": "Qwen3-4B", "8b": "Qwen3-8B"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Standard deviation of the logits (normalised final hidden state x output rows): the output/embedding
# rows get std LOGIT_STD / sqrt(hidden), so every width gives next-token distributions of about 5 nats,
# far from uniform (ln 151,669 = 11.9 nats) and from one-hot: measured with transformers on a 49-token
# chat prompt, mean entropy 4.9 / 5.0 / 5.0 nats (2-layer 0.6B, 28-layer 0.6B, 2-layer 8B), per
# position 1.4-6.5 nats, top-1 probability 0.21 on average and at most 0.69.
LOGIT_STD = 4.0
# Projections: std LINEAR_GAIN / sqrt(fan_in), so each layer adds O(1) per coordinate to the residual
# stream.  With Qwen3's 0.02 the tied embedding dominates the last hidden state and every position
# predicts its own input token (entropy ~0.3 nats); the layers' output must outweigh it.
LINEAR_GAIN = 1.6
NORM_NOISE = 0.1  # norms 1 + N(0, 0.1): a swapped or dropped norm changes the logits
_BLOCK_ELEMENTS = 1 << 24  # generate 16M values at a time (64 MiB of fp32 scratch)


class RandomCheckpointError(EOPDError, ValueError):
    """A request for a random Qwen3 directory that cannot be fulfilled; nothing has been written."""


def resolve_arch(arch: str, num_layers: Optional[int] = None) -> Qwen3Arch:
    """The preset of ``arch`` (``0.6b``, ``1.7b``, ``4b``, ``8b``), optionally with fewer layers."""
    if arch not in ARCHS:
        raise RandomCheckpointError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    preset = QWEN3_PRESETS[ARCHS[arch]]
    if num_layers is None:
        return preset
    if not 1 <= num_layers <= preset.num_layers:
        raise RandomCheckpointError(
            f"--num-layers {num_layers} is outside 1..{preset.num_layers} ({ARCHS[arch]} has {preset.num_layers} layers)"
        )
    return dataclasses.replace(preset, num_layers=num_layers)


def hub_config(arch: Qwen3Arch, dtype: torch.dtype, kind: qwen3_tokenizer.Kind) -> dict:
    """``config.json`` with the fields a Qwen3 hub directory carries (eos differs by kind)."""
    config = arch.to_hf_config()
    config.update(qwen3_tokenizer.config_token_ids(kind))
    config.update({
        "attention_dropout": 0.0,
        "initializer_range": 0.02,  # the hub's value (unused when loading)
        "max_window_layers": arch.num_layers,
        "rope_scaling": None,
        "sliding_window": None,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        # The hub's value.  Without it transformers 5 takes the tokenizer for a Mistral one and warns.
        "transformers_version": "4.51.0",
    })
    return config


def _std_of(name: str, shape: tuple[int, ...], arch: Qwen3Arch) -> Optional[float]:
    """Init std of a tensor, or None for a norm (ones plus noise)."""
    if name.endswith("norm.weight"):
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return LOGIT_STD / arch.hidden_size ** 0.5
    return LINEAR_GAIN / shape[1] ** 0.5


def random_tensors(arch: Qwen3Arch, dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` in HF order, drawn from one seeded generator in row blocks.

    Only the output tensor and a small fp32 block exist at a time; the values do not depend on how
    the caller shards them.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, shape in expected_hf_shapes(arch).items():
        out = torch.empty(shape, dtype=dtype)
        rows = out.view(shape[0], -1)
        step = max(1, _BLOCK_ELEMENTS // rows.shape[1])
        std = _std_of(name, shape, arch)
        for start in range(0, rows.shape[0], step):
            block = torch.randn(rows[start:start + step].shape, generator=generator)
            rows[start:start + step] = 1.0 + NORM_NOISE * block if std is None else std * block
        yield name, out


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists and is not an empty directory (unless ``overwrite``), or cannot be written."""
    if output.exists():
        if not output.is_dir():
            raise RandomCheckpointError(f"--output {output} exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise RandomCheckpointError(f"--output {output} exists and is not empty (pass --overwrite to replace it)")
    parent = next((p for p in [output.parent, *output.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RandomCheckpointError(f"cannot create {output}: {parent} is not a writable directory")


def write_random_qwen3(
    output: Union[str, Path],
    arch: str = "0.6b",
    *,
    num_layers: Optional[int] = None,
    seed: int = 0,
    dtype: str = "bf16",
    kind: qwen3_tokenizer.Kind = "instruct",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write a Qwen3 hub directory of ``arch`` with seeded random weights; return its path.

    Every argument is checked before anything is written; the directory appears complete (it is
    written next to ``output`` and renamed at the end) or not at all.
    """
    output = Path(output)
    shape = resolve_arch(arch, num_layers)
    if dtype not in DTYPES:
        raise RandomCheckpointError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if kind not in qwen3_tokenizer.KINDS:
        raise RandomCheckpointError(f"unknown --kind {kind!r}; choose one of {', '.join(qwen3_tokenizer.KINDS)}")
    if max_shard_bytes < 1:
        raise RandomCheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_output(output, overwrite)
    torch_dtype = DTYPES[dtype]
    shapes = expected_hf_shapes(shape)
    with tempfile.TemporaryDirectory(prefix="qwen3-side-files-") as side:
        qwen3_tokenizer.write_tokenizer_files(side, kind)
        (Path(side) / GENERATION_CONFIG).write_text(json.dumps(qwen3_tokenizer.generation_config(kind), indent=2) + "\n")
        from tqdm import tqdm

        with tqdm(total=len(shapes), desc=f"writing {ARCHS[arch]} ({shape.num_layers} layers)", unit="tensor",
                  disable=not progress, mininterval=1.0) as bar:
            write_hf_directory(output, random_tensors(shape, torch_dtype, seed), shapes, torch_dtype,
                               hf_config=hub_config(shape, torch_dtype, kind), side_files_from=Path(side),
                               max_shard_bytes=max_shard_bytes, progress=bar)
    return output
