"""Qwen3 prompt formatting and the teacher's view of a student response (pure functions).

Prompt: the problem, a space, and the ``\\boxed{}`` instruction (the training suffix of the authors'
preprocessing, or the evaluation suffix of the paper's evaluation), wrapped as one ChatML user turn
followed by the opening of the assistant turn.  Qwen3-Base tokenizers ship the same ChatML template
as the chat models, so the base student and the chat teacher read the same prompt tokens.

Teacher view: a base student ends its answer with ``<|endoftext|>``; the chat teacher (Qwen3-8B,
non-thinking) ends a turn with ``<|im_end|>``.  Before the teacher scores a response, the student's
*first* ``<|endoftext|>`` becomes ``<|im_end|>`` (151643 -> 151645 in real Qwen3), on a copy.  The
ids are read from the tokenizer, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

TRAIN_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
EVAL_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# What Qwen3's chat template appends to the assistant opening when thinking is switched off.
EMPTY_THINK = "<think>\n\n</think>\n\n"

Purpose = Literal["train", "eval"]


def instruction_suffix(purpose: Purpose) -> str:
    """The ``\\boxed{}`` instruction for training prompts or for evaluation prompts."""
    if purpose == "train":
        return TRAIN_SUFFIX
    if purpose == "eval":
        return EVAL_SUFFIX
    raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")


def user_message(problem: str, purpose: Purpose = "train") -> str:
    """The problem statement followed by the ``\\boxed{}`` instruction."""
    return f"{problem.strip()} {instruction_suffix(purpose)}"


def format_prompt(problem: str, purpose: Purpose = "train", *, chat: bool = True) -> str:
    """The student's prompt text.

    ``chat=True`` (default): one ChatML user turn and the opening of the assistant turn, as
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` renders it for Qwen3.
    ``chat=False``: the bare user message, for base models prompted without a template.
    """
    message = user_message(problem, purpose)
    if not chat:
        return message
    return f"{IM_START}user\n{message}{IM_END}\n{IM_START}assistant\n"


def format_teacher_prompt(problem: str, purpose: Purpose = "train", *, non_thinking: bool = True) -> str:
    """The teacher's prompt: the student's chat prompt, plus Qwen3's empty think block when non-thinking."""
    prompt = format_prompt(problem, purpose, chat=True)
    return prompt + EMPTY_THINK if non_thinking else prompt


@dataclass(frozen=True)
class Qwen3SpecialIds:
    """Token ids of the Qwen3 specials that rollouts and teacher scoring need."""

    endoftext: int
    im_start: int
    im_end: int


def special_token_ids(tokenizer) -> Qwen3SpecialIds:
    """Read the special-token ids from a (Hugging Face) tokenizer; fail loudly if one is missing."""
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for field, token in (("endoftext", ENDOFTEXT), ("im_start", IM_START), ("im_end", IM_END)):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or (unk is not None and tid == unk):
            raise ValueError(f"tokenizer has no {token!r} token; is this a Qwen-family tokenizer?")
        ids[field] = int(tid)
    return Qwen3SpecialIds(**ids)


TokenIds = Union[Sequence[int], torch.Tensor]


def replace_first_token(ids: TokenIds, old: int, new: int) -> TokenIds:
    """A copy of ``ids`` with the first occurrence of ``old`` replaced by ``new``.

    ``ids`` is a list/tuple of ints (returns a list), a 1-D tensor, or a 2-D tensor (each row is
    treated on its own).  Later occurrences, e.g. padding that reuses the same id, are kept.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() not in (1, 2):
            raise ValueError(f"expected a 1-D or 2-D tensor of token ids, got shape {tuple(ids.shape)}")
        out = ids.clone()
        rows = out.unsqueeze(0) if out.dim() == 1 else out
        hit = rows == old
        has = hit.any(dim=1)
        first = hit.int().argmax(dim=1)  # index of the first True (0 when none; masked by `has`)
        row_idx = torch.nonzero(has, as_tuple=True)[0]
        rows[row_idx, first[row_idx]] = new
        return out
    out = [int(t) for t in ids]
    try:
        out[out.index(old)] = new
    except ValueError:
        pass  # no such token: the response was truncated, nothing to replace
    return out


def teacher_view_of_response(response_ids: TokenIds, special: Qwen3SpecialIds) -> TokenIds:
    """The student's response as the chat teacher scores it: first ``<|endoftext|>`` -> ``<|im_end|>``."""
    return replace_first_token(response_ids, special.endoftext, special.im_end)
