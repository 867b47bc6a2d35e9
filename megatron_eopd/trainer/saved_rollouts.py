"""``logging.save_rollouts``: ``rollouts/iter_NNNNNNN.jsonl``, one JSON object per sample of an iteration.

Rank 0 writes (the samples are on every rank already) each file whole into a temporary file and
renames it, so a crash leaves the complete file or none.  A resumed run deletes the files of the
iterations after its checkpoint, as ``metrics.jsonl`` drops their lines: the process that wrote them
died before their update was saved, and the resumed run writes them again.  The fields are listed in
the README ("Saved rollouts") and built by :func:`megatron_eopd.trainer.phases.rollout_records`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch.distributed as dist

DIRECTORY = "rollouts"
_NAME = re.compile(r"iter_(\d+)\.jsonl")


def rollout_file_name(iteration: int) -> str:
    return f"iter_{iteration:07d}.jsonl"


class RolloutLog:
    """The run's ``rollouts/`` directory; every method is a no-op except on rank 0."""

    def __init__(self, run_dir: Path, *, resume_from: int = 0):
        self.directory = Path(run_dir) / DIRECTORY
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".tmp-*"):  # a write that a crash interrupted
            leftover.unlink()
        for path in self.directory.glob("iter_*.jsonl"):
            match = _NAME.fullmatch(path.name)
            if match and int(match.group(1)) > resume_from:
                path.unlink()

    def path(self, iteration: int) -> Path:
        return self.directory / rollout_file_name(iteration)

    def write(self, iteration: int, records: Iterable[dict]) -> None:
        if not self.enabled:
            return
        final = self.path(iteration)
        partial = self.directory / f".tmp-{final.name}"
        with partial.open("w") as sink:
            for record in records:
                sink.write(json.dumps(record, sort_keys=True) + "\n")
            sink.flush()
            os.fsync(sink.fileno())  # the rename must not reach the disk before the data (power loss)
        os.replace(partial, final)
