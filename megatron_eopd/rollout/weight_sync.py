"""Moving the student's Megatron weights (any TP/PP) into the rollout engine, then proving they arrived.

After every optimizer iteration :meth:`WeightSyncer.sync` is called on **every rank**:

1. the exporter of the Qwen3 mapping (``iter_hf_weights``) gathers each tensor over TP/PP and
   streams full HF-named tensors to the rank that owns the engine (global rank 0);
2. ``"memory"``: the stream goes straight into the running engine in buckets
   (:meth:`RolloutEngine.load_weights`; for vLLM a worker extension over ``collective_rpc``);
   ``"disk"``: the stream is written as a HF directory under ``sync_dir`` with the converter's
   writer, and the engine reloads it (:meth:`RolloutEngine.load_weights_from_dir`);
3. the parity probe: the Megatron student scores the probe sequences (a forward on all ranks), the
   engine scores the same sequences, and beyond tolerance every rank raises
   :class:`~megatron_eopd.rollout.parity.ParityProbeError`.

Only data-parallel replica 0 exports; the other replicas hold the same weights and only join the
verdict, so all ranks stop together instead of some hanging in a collective.  (An engine that fails
*while* receiving leaves the other ranks inside the exporter's collectives until the process-group
timeout: such a failure is an infrastructure fault, not a mapping one.)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from megatron_eopd.rollout.engine import RolloutConfig, RolloutEngine, WeightLoadReport
from megatron_eopd.rollout.parity import (
    ParityProbeError,
    ParityReport,
    compare_logprobs,
    megatron_sequence_logprobs,
    probe_sequences,
)


class WeightSyncError(RuntimeError):
    """A sync did not update every engine parameter, or the engine refused the weights."""


@dataclass
class SyncReport:
    """One sync as seen from the engine's rank (``load`` and ``parity`` are None elsewhere)."""

    step: int
    method: str
    seconds: float
    load: Optional[WeightLoadReport]
    parity: Optional[ParityReport]


def _drain(stream: Iterable) -> None:
    for _ in stream:  # drives the exporter's collectives on ranks that receive nothing
        pass


class WeightSyncer:
    """Syncs a Megatron Qwen3 student into a rollout engine and runs the parity probe after each sync.

    ``engine`` is the engine on the rank that owns it (global rank 0) and ``None`` on every other
    rank.  ``hf_config``: the student's HF config (default: read from the model built by
    ``build_qwen3_gpt``).  ``strict``: a sync that leaves any engine parameter unwritten raises
    :class:`WeightSyncError` before the probe even runs.
    """

    def __init__(
        self,
        engine: Optional[RolloutEngine],
        config: RolloutConfig,
        *,
        hf_config: Any = None,
        vocab_size: Optional[int] = None,
        strict: bool = True,
    ):
        self.engine = engine
        self.config = config
        self.hf_config = hf_config
        self.vocab_size = vocab_size
        self.strict = strict
        self.step = 0
        self._last_dir: Optional[Path] = None

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _ranks() -> tuple[int, int, bool]:
        """(global rank, world size, whether this rank is in data-parallel replica 0)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        if not dist.is_initialized():
            return 0, 1, True
        return dist.get_rank(), dist.get_world_size(), parallel_state.get_data_parallel_rank() == 0

    def _arch(self, model_chunks: Any):
        from megatron_eopd.models.qwen3 import Qwen3Arch, parse_hf_config
        from megatron_eopd.models.qwen3.mapping import unwrap_model

        if self.hf_config is not None:
            return (
                self.hf_config if isinstance(self.hf_config, Qwen3Arch) else parse_hf_config(self.hf_config)
            )
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        arch = getattr(unwrap_model(chunks[0]), "eopd_arch", None)
        if arch is None:
            raise ValueError("pass hf_config to WeightSyncer: the model was not built by build_qwen3_gpt")
        return arch

    def _write_hf_dir(self, stream: Iterable[tuple[str, torch.Tensor]], arch, dtype: torch.dtype) -> Path:
        from megatron_eopd.checkpoint.hf_writer import copy_side_files, write_hf_weights
        from megatron_eopd.models.qwen3.mapping import expected_hf_shapes

        root = Path(self.config.sync_dir)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"student-step{self.step:06d}"
        staging = root / f".staging-step{self.step:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        staging.mkdir()
        write_hf_weights(staging, stream, expected_hf_shapes(arch), dtype)
        # A complete HF directory (config + tokenizer), so it also serves evaluation or a restart.
        source = self.engine.model_dir
        config = json.loads((source / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = str(dtype).replace("torch.", "")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source, staging)
        staging.rename(final)  # readers never see a half-written directory
        return final

    def _sync_dtype(self, model_chunks: Any) -> torch.dtype:
        if self.config.dtype != "auto":
            return getattr(torch, self.config.dtype)
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        return next(chunks[0].parameters()).dtype

    # ------------------------------------------------------------------ the sync

    def sync(self, model_chunks: Any, *, method: Optional[str] = None, probe: bool = True) -> SyncReport:
        """Move the current weights into the engine, then (``probe``) run the parity probe; all ranks call."""
        from megatron_eopd.models.qwen3.mapping import iter_hf_weights

        method = method or self.config.weight_sync
        if method not in ("memory", "disk"):
            raise ValueError(f"sync method must be 'memory' or 'disk', got {method!r}")
        if method == "disk" and not self.config.sync_dir:
            raise ValueError("disk sync needs rollout.sync_dir")
        rank, _, in_replica0 = self._ranks()
        owns_engine = self.engine is not None
        self.step += 1
        start = time.perf_counter()
        load: Optional[WeightLoadReport] = None
        parity: Optional[ParityReport] = None
        failure: Optional[str] = None
        try:
            if in_replica0:
                arch = self._arch(model_chunks)
                stream = iter_hf_weights(model_chunks, arch, to_rank=0)
                if not owns_engine:
                    _drain(stream)
                elif method == "memory":
                    load = self.engine.load_weights(stream)
                else:
                    t0 = time.perf_counter()
                    written = self._write_hf_dir(stream, arch, self._sync_dtype(model_chunks))
                    load = self.engine.load_weights_from_dir(written)
                    load.seconds = time.perf_counter() - t0  # writing is part of the disk path's cost
                    if self._last_dir is not None and self._last_dir != written:
                        shutil.rmtree(self._last_dir, ignore_errors=True)
                    self._last_dir = written
                # Every rank takes part in the probe's forward before anyone may raise, so that a
                # failure found on the engine's rank never leaves the others inside a collective.
                reference = sequences = None
                if probe and self.config.parity.enabled:
                    vocab = self.vocab_size or arch.vocab_size
                    sequences = probe_sequences(self.config.parity, vocab)
                    reference = megatron_sequence_logprobs(model_chunks, sequences, vocab_size=vocab)
                if owns_engine and self.strict and load.not_updated:
                    raise WeightSyncError(
                        f"weight sync step {self.step} ({method}) left {len(load.not_updated)} engine "
                        f"parameters unwritten (stale): {load.not_updated[:6]}"
                    )
                if owns_engine and reference is not None:
                    parity = compare_logprobs(
                        self.engine.score(sequences),
                        reference,
                        sequences,
                        probe=f"sync-step{self.step}-{method}",
                        config=self.config.parity,
                    )
                    if not parity.passed:
                        raise ParityProbeError(parity)
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks below, then re-raised
            failure = f"{type(exc).__name__}: {exc}"
            if not _is_distributed():
                raise
            _share_verdict(failure, rank)
            raise
        verdict = _share_verdict(failure, rank)
        if verdict is not None:
            raise WeightSyncError(f"weight sync step {self.step} failed on the engine's rank: {verdict}")
        return SyncReport(self.step, method, time.perf_counter() - start, load, parity)


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _share_verdict(failure: Optional[str], rank: int) -> Optional[str]:
    """Broadcast the engine rank's verdict (None = success) to every rank."""
    if not _is_distributed():
        return failure
    import torch.distributed as dist

    box = [failure if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
