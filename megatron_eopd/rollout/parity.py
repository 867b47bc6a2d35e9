"""The parity probe: after every weight sync, the rollout engine and the Megatron student must agree.

Both sides score the same fixed token sequences (log p(x_t | x_<t) at temperature 1): the engine
through its prompt log-probs, Megatron through a forward pass of the student itself.  A transposed
or mis-ordered tensor, a stale one, or a wrong vocabulary moves these log-probs by whole nats, while
a correct sync only shows numeric noise; beyond the configured tolerance the run stops with
:class:`ParityProbeError`, naming the probe and where the largest difference is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_eopd.errors import EOPDError
from megatron_eopd.models.chunks import as_chunk_list, unwrap_model
from megatron_eopd.models.forward import MicroBatch, last_stage_group_source, run_micro_batches
from megatron_eopd.rollout.engine import ParityProbeConfig, RolloutEngine


@dataclass
class ParityReport:
    """Outcome of one probe; ``worst_*`` locate the largest absolute difference."""

    probe: str
    num_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    worst_sequence: int
    worst_position: int  # index, within the sequence, of the token whose log-prob differs most
    worst_token: int
    engine_logprob: float
    reference_logprob: float
    max_abs_tolerance: float
    mean_abs_tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.max_abs_tolerance and self.mean_abs_diff <= self.mean_abs_tolerance

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity probe '{self.probe}' {verdict}: max |engine - megatron| log-prob = "
            f"{self.max_abs_diff:.3g} nats "
            f"(tolerance {self.max_abs_tolerance:g}) at sequence {self.worst_sequence}, position "
            f"{self.worst_position}, token {self.worst_token} (engine {self.engine_logprob:.4f}, "
            f"reference {self.reference_logprob:.4f}); mean {self.mean_abs_diff:.3g} nats "
            f"(tolerance {self.mean_abs_tolerance:g}) over {self.num_tokens} tokens"
        )


class ParityProbeError(EOPDError, RuntimeError):
    """The engine's log-probs disagree with the Megatron student's beyond tolerance: the sync is wrong."""

    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(
            report.summary()
            + ". The weights in the rollout engine do not compute the student's model: check the HF <-> "
            "Megatron mapping (q/k/v and gate/up fusion, transposes, tensors left out of the sync)."
        )


def probe_sequences(config: ParityProbeConfig, vocab_size: int) -> list[list[int]]:
    """The configured probe sequences, or deterministic random ones drawn from ``config.seed``."""
    if config.sequences:
        too_big = [t for seq in config.sequences for t in seq if t >= vocab_size]
        if too_big:
            raise ValueError(
                f"parity probe sequences hold token ids >= vocab size {vocab_size}: {too_big[:5]}"
            )
        return [list(s) for s in config.sequences]
    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, vocab_size, (config.num_sequences, config.sequence_length), generator=gen)
    return ids.tolist()


def compare_logprobs(
    engine_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    sequences: Sequence[Sequence[int]],
    *,
    probe: str,
    config: ParityProbeConfig,
    positions: Optional[Sequence[int]] = None,
) -> ParityReport:
    """Compare per-token log-probs (each tensor: tokens 1..len-1 of its sequence, or the tokens at
    ``positions`` of every sequence, when given)."""
    if len(engine_logprobs) != len(reference_logprobs) or len(engine_logprobs) != len(sequences):
        raise ValueError(
            f"probe '{probe}': {len(engine_logprobs)} engine vs {len(reference_logprobs)} reference results "
            f"for {len(sequences)} sequences"
        )
    best = (-1.0, 0, 0)
    total, count = 0.0, 0
    for i, (eng, ref, seq) in enumerate(zip(engine_logprobs, reference_logprobs, sequences)):
        eng, ref = eng.double().flatten().cpu(), ref.double().flatten().cpu()
        expected = len(seq) - 1 if positions is None else len(positions)
        if eng.numel() != expected or ref.numel() != expected:
            raise ValueError(
                f"probe '{probe}': sequence {i} has {expected} tokens to compare but {eng.numel()} engine and "
                f"{ref.numel()} reference log-probs"
            )
        diff = (eng - ref).abs()
        # A NaN on either side is as bad as it gets.
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        total += float(diff.sum())
        count += diff.numel()
        j = int(diff.argmax())
        if float(diff[j]) > best[0]:
            best = (float(diff[j]), i, j)
    max_diff, seq_i, tok_j = best
    position = tok_j + 1 if positions is None else int(positions[tok_j])
    return ParityReport(
        probe=probe,
        num_tokens=count,
        max_abs_diff=max_diff,
        mean_abs_diff=total / max(count, 1),
        worst_sequence=seq_i,
        worst_position=position,
        worst_token=int(sequences[seq_i][position]),
        engine_logprob=float(engine_logprobs[seq_i].flatten()[tok_j]),
        reference_logprob=float(reference_logprobs[seq_i].flatten()[tok_j]),
        max_abs_tolerance=config.max_abs_tolerance,
        mean_abs_tolerance=config.mean_abs_tolerance,
    )


def check_parity(
    engine: RolloutEngine,
    reference_logprobs: Sequence[torch.Tensor],
    sequences: Sequence[Sequence[int]],
    *,
    probe: str,
    config: ParityProbeConfig,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Score ``sequences`` with ``engine`` and compare with the reference.

    Beyond tolerance raises :class:`ParityProbeError` (or, with ``raise_on_failure=False``, only reports).
    """
    report = compare_logprobs(
        engine.score(sequences), reference_logprobs, sequences, probe=probe, config=config
    )
    if raise_on_failure and not report.passed:
        raise ParityProbeError(report)
    return report


# --------------------------------------------------------------------------- reference log-probs


@torch.no_grad()
def hf_sequence_logprobs(hf_model: Any, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Reference log-probs from a Hugging Face causal LM (a stand-in for Megatron in tests and tools)."""
    device = next(hf_model.parameters()).device
    out = []
    for seq in sequences:
        ids = torch.tensor([list(seq)], dtype=torch.long, device=device)
        logp = torch.log_softmax(hf_model(input_ids=ids).logits[0].float(), dim=-1)
        out.append(logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1).cpu())
    return out


@torch.no_grad()
def megatron_sequence_logprobs(
    model_chunks: Any,
    sequences: Sequence[Sequence[int]],
    *,
    vocab_size: Optional[int] = None,
    positions: Optional[Sequence[int]] = None,
) -> list[torch.Tensor]:
    """Log-probs of ``sequences`` under the Megatron student, on every rank of its model-parallel group.

    Call on all ranks of the TP x PP group (it runs Megatron's forward-only pipeline schedule).  The
    few probe tokens' vocab-parallel logits are gathered over TP and normalised over the true
    vocabulary (``vocab_size``; default the model's HF vocabulary - padded rows are not tokens), then
    the result is broadcast from the last pipeline stage.  Sequences are right-padded to one length;
    causal attention keeps padding from touching real positions.

    ``positions``: only the tokens at these indices (>= 1, in every sequence) get a log-prob, and
    the output layer multiplies only the hidden states that predict them (the model's final hidden
    states, from the fused-head path, where the model allows it).  At a 151,936-row vocabulary that
    product is most of a short model's forward.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = as_chunk_list(model_chunks)
    if len(chunks) != 1:
        raise NotImplementedError("the parity probe does not support virtual pipeline stages yet")
    inner = unwrap_model(chunks[0])
    if vocab_size is None:
        arch = getattr(inner, "eopd_arch", None)
        if arch is None:
            raise ValueError("pass vocab_size: this model was not built by build_qwen3_gpt")
        vocab_size = arch.vocab_size
    device = next(inner.parameters()).device
    batch, length = len(sequences), max(len(s) for s in sequences)
    tokens = torch.zeros((batch, length), dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    if positions is not None:
        positions = [int(p) for p in positions]
        if not positions or min(positions) < 1 or max(positions) >= min(len(s) for s in sequences):
            raise ValueError(f"positions must be indices 1..{min(len(s) for s in sequences) - 1} of every "
                             f"sequence, got {positions}")
        targets = torch.tensor(positions, dtype=torch.long, device=device)
    else:
        targets = torch.arange(1, length, device=device)
    # Each stage decides for itself: only the last one has an output layer, and only it reads this.
    fused = positions is not None and _fused_head_allowed(inner)
    predicted = tokens[:, targets, None]

    def logprobs_of(logits: torch.Tensor) -> torch.Tensor:
        # log p = logit - logsumexp over the true vocabulary: the same numbers as a log-softmax,
        # without writing a second positions x vocabulary array (330 MB at Qwen3's 151,936 rows).
        full = gather_from_tensor_model_parallel_region(logits.float())[..., :vocab_size]
        picked = full.gather(-1, predicted).squeeze(-1)
        return picked - torch.logsumexp(full, dim=-1)

    def pick_logprobs(output: Any, _micro_batch: MicroBatch) -> torch.Tensor:
        if fused:  # FinalHidden: the hidden states that predict the targets, times this rank's vocab shard
            return logprobs_of(torch.matmul(output.hidden[:, targets - 1], output.weight.t()))
        return logprobs_of(output[:, :-1] if positions is None else output[:, targets - 1])

    picked = run_micro_batches(chunks, [MicroBatch.from_tokens(tokens)], pick_logprobs, forward_only=True,
                               fused_head=fused)
    width = len(targets)
    result = picked[0].contiguous() if picked else torch.empty((batch, width), dtype=torch.float32, device=device)
    source = last_stage_group_source()
    if source is not None:
        dist.broadcast(result, src=source, group=parallel_state.get_pipeline_model_parallel_group())
    if positions is not None:
        return [result[i].float().cpu() for i in range(batch)]
    return [result[i, : len(seq) - 1].float().cpu() for i, seq in enumerate(sequences)]


def _fused_head_allowed(model: Any) -> bool:
    """Whether the fused-head path hands this model's final hidden states over (see output_head)."""
    from megatron_eopd.models.output_head import check_fusable

    if not getattr(model, "post_process", False):
        return True  # not the last stage: nothing changes here
    try:
        check_fusable(model)
    except NotImplementedError:
        return False
    return True
