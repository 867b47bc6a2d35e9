"""Rollout engines at cluster scale: placed by config, fed a share of the prompts each, synced together.

``rollout.engines_per_node`` engines per node (default one), each on an evenly spaced local rank,
with vLLM's own tensor parallelism over the GPUs that follow it.  The iteration's prompts are split
into contiguous shards, one per engine; every engine samples its shard with the request seeds the
prompts would have in one call (so results do not depend on the number of engines) and the results
are gathered to every rank.  Every engine is synced and probed after each update; on GPUs the
engines sleep while the models train, and before an engine starts or wakes every rank hands the
memory its allocator caches back to the GPU (the engines are other processes on the same GPUs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_eopd.platform import default_device, launch_ranks_per_node, release_cached_memory
from megatron_eopd.rollout import RolloutConfig, RolloutEngine, RolloutResult, SamplingConfig, WeightSyncer
from megatron_eopd.rollout import SyncReport, create_rollout_engine


def engine_host_ranks(world_size: int, ranks_per_node: int, engines_per_node: int, engine_tp: int) -> list[int]:
    """Global ranks that host an engine: ``engines_per_node`` evenly spaced local ranks on every node."""
    ranks_per_node = min(ranks_per_node, world_size)
    if ranks_per_node % engines_per_node:
        raise ValueError(f"rollout.engines_per_node={engines_per_node} does not divide the {ranks_per_node} ranks of a node")
    spacing = ranks_per_node // engines_per_node
    # A lone process may give its engine the node's other GPUs; ranks sharing a node may not overlap.
    if engine_tp > spacing and ranks_per_node > 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={engine_tp} exceeds the {spacing} GPUs per engine "
            f"({ranks_per_node} per node / {engines_per_node} engines)"
        )
    nodes = -(-world_size // ranks_per_node)
    return [node * ranks_per_node + i * spacing for node in range(nodes) for i in range(engines_per_node)
            if node * ranks_per_node + i * spacing < world_size]


def shard_bounds(num_prompts: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal ``[start, end)`` shards."""
    base, extra = divmod(num_prompts, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class RolloutFleet:
    """The run's engines; every method is called on every rank."""

    def __init__(self, config: RolloutConfig, model_dir: Path, *, ranks_per_node: int,
                 device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else default_device()
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        ranks_per_node = launch_ranks_per_node(world, ranks_per_node)
        self.hosts = engine_host_ranks(world, ranks_per_node, config.engines_per_node, config.tensor_parallel_size)
        self.config = config
        release_cached_memory(self.device)
        self.engine: Optional[RolloutEngine] = (
            create_rollout_engine(config, model_dir) if self.rank in self.hosts else None
        )
        self.syncer = WeightSyncer(self.engine, config)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[RolloutResult]:
        """Results for every prompt, in prompt order, on every rank."""
        bounds = shard_bounds(len(prompts), len(self.hosts))
        mine: list[RolloutResult] = []
        if self.engine is not None:
            start, end = bounds[self.hosts.index(self.rank)]
            seed = None if sampling.seed is None else sampling.request_seed(start)
            shard = dataclasses.replace(sampling, seed=seed)
            if end > start:
                mine = self.engine.generate(list(prompts[start:end]), shard).results
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return [result for host in self.hosts for result in everyone[host]]

    def sync(self, model_chunks, *, transfer: bool = True) -> SyncReport:
        """The weights into the engines and the parity probe (``transfer=False``: the probe only)."""
        release_cached_memory(self.device)  # the sync wakes the engines
        return self.syncer.sync(model_chunks, transfer=transfer)

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()

    def wake_up(self) -> None:
        release_cached_memory(self.device)
        if self.engine is not None:
            self.engine.wake_up()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
