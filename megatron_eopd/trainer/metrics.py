"""Per-iteration metrics: reduced over micro-batches and ranks, written to ``metrics.jsonl`` and TensorBoard.

The loss's diagnostics arrive per micro-batch on the last pipeline stage (identical on its TP
ranks).  Loss terms are sums there (Megatron normalises), the rest are means over the micro-batch's
response tokens; :func:`reduce_step_metrics` turns them into global token-weighted means with one
all-reduce over the world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_eopd.platform import collective_device

SUMMED = ("loss", "loss_rkl", "loss_fkl")  # sums over tokens: divided by the global token count
TOKEN_MEANS = ("teacher_entropy", "student_entropy", "gate_fraction", "gate_weight", "rkl_estimate",
               "clip_fraction", "fkl_mean", "teacher_topk_mass")
GATED_MEANS = ("fkl_gated",)  # means over tokens above tau
REQUIRED = ("iteration", "loss", "loss_rkl", "loss_fkl", "teacher_entropy", "student_entropy", "gate_fraction",
            "fkl_gated", "clip_fraction", "response_length", "rollout_accuracy", "tokens_per_second", "time_rollout",
            "time_teacher", "time_student", "time_sync", "peak_memory_bytes")


def _contributes() -> bool:
    """One rank per model replica reports: TP rank 0 of the last pipeline stage."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def reduce_step_metrics(per_micro_batch: Iterable[dict]) -> dict:
    """Global metrics of one or more optimizer steps from this rank's per-micro-batch dicts."""
    keys = SUMMED + TOKEN_MEANS + GATED_MEANS
    sums = [0.0] * (len(keys) + 2)  # + token count, + gated token count
    present = [0.0] * len(keys)
    if _contributes():
        for m in per_micro_batch:
            count = float(m.get("num_valid_tokens", 0.0))
            gated = count * float(m.get("gate_fraction", 0.0))
            for i, key in enumerate(keys):
                if key not in m:
                    continue
                value = float(m[key])
                present[i] = 1.0
                weight = 1.0 if key in SUMMED else gated if key in GATED_MEANS else count
                sums[i] += value * weight
            sums[-2] += count
            sums[-1] += gated
    totals = all_reduce_sum(sums + present)
    tokens, gated_tokens = totals[len(keys)], totals[len(keys) + 1]
    out = {"num_response_tokens": tokens}
    for i, key in enumerate(keys):
        if totals[len(keys) + 2 + i] == 0:
            continue
        denominator = gated_tokens if key in GATED_MEANS else tokens
        out[key] = totals[i] / denominator if denominator > 0 else 0.0
    return out


class MetricsLog:
    """``metrics.jsonl`` (one object per iteration) and TensorBoard scalars; written by rank 0 only."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_from: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():
            # Iterations after the checkpoint we resume from were lost with the process: drop them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_from]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_from + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as sink:
            sink.write(json.dumps(clean, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(float(value)):
                    self.writer.add_scalar(key, value, record["iteration"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocator memory on a GPU; the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def summary_line(record: dict) -> str:
    parts = [f"iter {record['iteration']}"]
    for key, fmt in (("loss", ".4f"), ("loss_rkl", ".4f"), ("loss_fkl", ".4f"), ("teacher_entropy", ".3f"),
                     ("student_entropy", ".3f"), ("gate_fraction", ".3f"), ("rollout_accuracy", ".3f"),
                     ("response_length", ".1f"), ("tokens_per_second", ".0f")):
        value: Optional[float] = record.get(key)
        if value is not None:
            parts.append(f"{key} {value:{fmt}}")
    return " | ".join(parts)
