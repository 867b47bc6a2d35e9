"""From rollouts to the token tensors the models read, and back from per-token results to responses.

A sample is ``prompt + response``.  The model reads ``sequence[:-1]`` and predicts
``sequence[1:]`` (the labels); position ``j`` is a response position when its label is a response
token, so a response of R tokens after a prompt of P tokens covers positions ``P-1 .. P+R-2``.

The student and the teacher read the same response behind their own prompts (the teacher's may
carry Qwen3's empty think block) and the teacher sees its end-of-turn token where the student wrote
``<|endoftext|>``.  Both views have the same response tokens in the same order, so a per-response-
token quantity moves between them as the masked entries in row-major order (:class:`ResponsePlacement`).

A mini-batch is dealt to the data-parallel ranks by sequence length (:func:`balance_over_ranks`),
so every rank computes about the same number of tokens and none waits at the gradient all-reduce for
a rank that drew the long responses.  Each rank's share is ordered longest first and cut into
micro-batches of ``micro_batch_size`` rows, so sequences of similar length share a micro-batch (and
the first micro-batch shows the step's peak memory).  Without pipeline parallelism every
micro-batch is padded only to its own longest sequence; with it, to one length per optimizer step
(the pipeline's buffers are sized once per call).  Rows added to fill the last micro-batch and
padding positions carry a zero mask.  Neither the order nor the padding changes the loss: it is
normalised over the mini-batch's response tokens, and causal attention never lets a position see
the padding behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_eopd.models.forward import MicroBatch


@dataclass
class Sample:
    """One response with everything the update needs (token ids are plain lists)."""

    prompt_index: int  # index of its prompt in the iteration's batch
    prompt_ids: list[int]  # the student's prompt
    teacher_prompt_ids: list[int]  # the same problem as the teacher reads it
    response_ids: list[int]
    teacher_response_ids: list[int]  # the response as the teacher scores it (end-of-turn swapped)
    rollout_logprobs: list[float]  # log q(y_t) the sampler reported
    finish_reason: str
    answer: str = ""  # the gold answer
    correct: Optional[bool] = None
    prompt_id: str = ""  # the prompt record's id
    request_seed: Optional[int] = None  # the engine's seed for this prompt's request (all its n samples)
    # Set by grading, on rank 0 only: the decoded response, its last \boxed{} and why it is right or wrong.
    response_text: Optional[str] = None
    extracted_answer: Optional[str] = None
    grade_reason: Optional[str] = None

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class PackedView:
    """One view (student or teacher) of a list of samples: ``[N, S]`` inputs, labels and response mask."""

    tokens: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def _positions(prompt: Sequence[int], response: Sequence[int]) -> int:
    """Positions the model reads for ``prompt + response``: the sequence without its last token."""
    return len(prompt) + len(response) - 1


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
         length: Optional[int] = None, rows: Optional[int] = None, device=None) -> PackedView:
    """Right-padded inputs/labels/mask of ``prompt + response`` sequences (see the module docstring)."""
    n = len(prompts)
    lengths = [_positions(p, r) for p, r in zip(prompts, responses)]
    length = max(lengths, default=1) if length is None else length
    rows = n if rows is None else rows
    if any(x > length for x in lengths) or rows < n:
        raise ValueError(f"{n} sequences of up to {max(lengths)} positions do not fit [{rows}, {length}]")
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        tokens[i, : len(sequence) - 1] = sequence[:-1]
        labels[i, : len(sequence) - 1] = sequence[1:]
        mask[i, len(prompt) - 1 : len(sequence) - 1] = True
    return PackedView(tokens.to(device), labels.to(device), mask.to(device))


@dataclass(frozen=True)
class ResponsePlacement:
    """Where one view's response positions sit in another view, as flat indices into each mask.

    Built once per pair of micro-batches (two host syncs, for the two ``nonzero``); :meth:`move`
    then places any number of per-position quantities without another one, as GPU index kernels.
    """

    source: torch.Tensor  # flat indices of the source mask's response positions, in row-major order
    target: torch.Tensor
    source_shape: tuple
    target_shape: tuple

    @classmethod
    def between(cls, source_mask: torch.Tensor, target_mask: torch.Tensor) -> "ResponsePlacement":
        source = source_mask.reshape(-1).nonzero().squeeze(1)
        target = target_mask.reshape(-1).nonzero().squeeze(1)
        if source.numel() != target.numel():
            raise ValueError(f"{source.numel()} response positions in the source view, {target.numel()} in the target")
        return cls(source, target, tuple(source_mask.shape), tuple(target_mask.shape))

    def move(self, values: torch.Tensor) -> torch.Tensor:
        """``values [*source_shape, ...]`` placed at the target's response positions; zero elsewhere."""
        rest = tuple(values.shape[len(self.source_shape):])
        flat = values.reshape((-1,) + rest)
        out = flat.new_zeros((math.prod(self.target_shape),) + rest)
        out.index_copy_(0, self.target, flat.index_select(0, self.source))
        return out.reshape(self.target_shape + rest)


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step in both views; ``samples`` in micro-batch row order."""

    student: list[MicroBatch]
    teacher: list[MicroBatch]
    samples: list[Sample]

    @property
    def num_response_tokens(self) -> int:
        return sum(s.num_response_tokens for s in self.samples)

    @property
    def student_positions(self) -> tuple[int, int]:
        """(positions holding a sample's tokens, positions the student computes) over its micro-batches."""
        used = sum(_positions(s.prompt_ids, s.response_ids) for s in self.samples)
        return used, sum(mb.tokens.numel() for mb in self.student)


def _views(samples: Sequence[Sample], micro_batch_size: int, pad_id: int, device, *, teacher: bool,
           uniform_length: bool) -> list[MicroBatch]:
    prompts = [s.teacher_prompt_ids if teacher else s.prompt_ids for s in samples]
    responses = [s.teacher_response_ids if teacher else s.response_ids for s in samples]
    lengths = [_positions(p, r) for p, r in zip(prompts, responses)]
    out = []
    for start in range(0, len(samples), micro_batch_size):
        stop = start + micro_batch_size
        length = max(lengths) if uniform_length else max(lengths[start:stop])
        view = pack(prompts[start:stop], responses[start:stop],
                    pad_id=pad_id, length=length, rows=micro_batch_size, device=device)
        out.append(MicroBatch.from_tokens(view.tokens, labels=view.labels, mask=view.mask,
                                          samples=list(range(start, min(start + micro_batch_size, len(samples))))))
    return out


def balance_over_ranks(lengths: Sequence[int], ranks: int, per_rank: int) -> list[list[int]]:
    """Indices of each rank's items: longest first, each to the rank with the fewest tokens so far
    among those with room for it (at most ``per_rank`` items each; ties go to the lower rank).

    Every rank's list comes out longest first.  Deterministic: every rank computes the same deal.
    """
    if per_rank * ranks < len(lengths):
        raise ValueError(f"{len(lengths)} items do not fit {ranks} ranks of {per_rank}")
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rank = min((r for r in range(ranks) if len(shares[r]) < per_rank), key=lambda r: (loads[r], r))
        shares[rank].append(item)
        loads[rank] += lengths[item]
    return shares


def step_batches(samples: Sequence[Sample], *, mini_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, pad_id: int, device, uniform_length: bool = False) -> list[StepBatch]:
    """This data-parallel rank's share of every mini-batch, as micro-batches in both views.

    Mini-batch ``m`` is ``samples[m*mini : (m+1)*mini]``, dealt to the ``dp_size`` ranks by
    :func:`balance_over_ranks` on the sequence lengths, so the union over ranks is the whole
    mini-batch and every share is ordered longest first.  ``uniform_length`` pads every micro-batch
    of a step and view to the step's longest sequence (needed under pipeline parallelism),
    otherwise each micro-batch to its own.
    """
    per_rank = mini_batch_size // dp_size
    steps = []
    for start in range(0, len(samples), mini_batch_size):
        mini_batch = samples[start : start + mini_batch_size]
        lengths = [_positions(s.prompt_ids, s.response_ids) for s in mini_batch]
        share = balance_over_ranks(lengths, dp_size, per_rank)[dp_rank]
        mine = [mini_batch[i] for i in share]
        steps.append(StepBatch(
            student=_views(mine, micro_batch_size, pad_id, device, teacher=False,
                           uniform_length=uniform_length),
            teacher=_views(mine, micro_batch_size, pad_id, device, teacher=True,
                           uniform_length=uniform_length),
            samples=mine,
        ))
    return steps
