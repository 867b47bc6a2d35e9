"""A synthetic arithmetic-reasoning task for the tiny CPU demo: sums of distinct one-digit numbers.

A problem asks for the sum of four or five distinct digits.  A solution adds them up one at a time
in any order ("3+5=8,8+2=10,10+7=17. \\boxed{17}"): the first step adds any two of the numbers,
every later step adds one of those not used yet to the running total.  So there are 4! or 5!
valid paths, and a teacher trained on random paths is uncertain at the choice of each next number
and certain everywhere else (the running total is copied, the sums are determined), which is the
token mix EOPD's entropy gate is about.  Also here: a character-level Qwen-style tokenizer and the
task models.

Why this shape (measured on the 2-core machine, 2-layer models, batch 32, Avg@4 at T=1, top-p 0.8):
combining any two of the remaining numbers, partial sums included, took a 4-layer teacher 500 SFT
iterations to reach 0.43; with the running-total form and distinct digits a 2-layer teacher reaches
0.94 in 1,500, and a smaller student learns it fast enough to be distilled within minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Union

from megatron_eopd.data.prompts import PromptRecord
from megatron_eopd.data.qwen3_templates import EMPTY_THINK, ENDOFTEXT, EVAL_SUFFIX, IM_END, IM_START, TRAIN_SUFFIX

SOURCE = "synthetic:arith"
LONG_SOURCE = "synthetic:arith-long"
MIN_OPERANDS = 4
MAX_OPERANDS = 5
MAX_OPERAND = 9  # operands are distinct digits 0..MAX_OPERAND
# About one set of operands in TEST_BUCKETS goes to the test split (by a hash, so stable).
TEST_BUCKETS = 8

STEP_SEP = ","
_PROBLEM_RE = re.compile(r"^Add (\d+(?:, \d+)*) and (\d+)\.$")
_STEP_RE = re.compile(r"(\d+)\+(\d+)=(\d+)")
FINAL_PREFIX = ". \\boxed{"
FINAL_SUFFIX = "}"

Split = Literal["train", "test"]


def format_problem(operands: Sequence[int]) -> str:
    """``[3, 5, 2, 7]`` -> ``"Add 3, 5, 2 and 7."``"""
    if len(operands) < 2:
        raise ValueError("a problem needs at least two operands")
    return f"Add {', '.join(str(x) for x in operands[:-1])} and {operands[-1]}."


def parse_problem(problem: Union[str, PromptRecord]) -> List[int]:
    """The operands of a problem written by :func:`format_problem`."""
    text = problem.problem if isinstance(problem, PromptRecord) else problem
    match = _PROBLEM_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a synthetic arithmetic problem: {text!r}")
    return [int(x) for x in match.group(1).split(", ")] + [int(match.group(2))]


def final_text(total: int) -> str:
    """The closing of every solution, with the answer boxed."""
    return f"{FINAL_PREFIX}{total}{FINAL_SUFFIX}"


def _split_of(operands: Sequence[int]) -> Split:
    # Hash the sorted operands: reorderings of one problem land in the same split.
    key = ",".join(str(x) for x in sorted(operands)).encode()
    return "test" if hashlib.sha256(key).digest()[0] % TEST_BUCKETS == 0 else "train"


def generate_problems(
    n: int,
    *,
    seed: int = 0,
    split: Split = "train",
    min_operands: int = MIN_OPERANDS,
    max_operands: int = MAX_OPERANDS,
) -> List[PromptRecord]:
    """``n`` distinct problems of ``split``; deterministic in (n, seed, split).

    Operands are ``min_operands``..``max_operands`` distinct digits 0-9.  No set of operands appears
    in both splits, so test problems are not reorderings of training problems.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 2 <= min_operands <= max_operands <= MAX_OPERAND + 1:
        raise ValueError(f"need 2 <= min_operands <= max_operands <= {MAX_OPERAND + 1}")
    rng = random.Random(f"arith-{seed}-{split}")
    seen = set()
    records: List[PromptRecord] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"could not find {n} distinct {split} problems; ask for fewer")
        count = rng.randint(min_operands, max_operands)
        operands = tuple(rng.sample(range(MAX_OPERAND + 1), count))
        if operands in seen or _split_of(operands) != split:
            continue
        seen.add(operands)
        records.append(
            PromptRecord(
                id=f"arith-{split}-{len(records)}",
                problem=format_problem(operands),
                answer=str(sum(operands)),
                source=SOURCE,
            )
        )
    return records


def sample_solution(problem: Union[str, PromptRecord], rng: random.Random) -> str:
    """A uniformly random valid path: the operands in a random order, added to a running total."""
    order = parse_problem(problem)
    rng.shuffle(order)
    total, steps = order[0], []
    for x in order[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return STEP_SEP.join(steps) + final_text(total)


def _solution_steps(solution: str):
    """The (a, b, s) steps of a solution in the task's exact format, or None."""
    match = re.search(re.escape(FINAL_PREFIX) + r"(\d+)" + re.escape(FINAL_SUFFIX) + "$", solution)
    if not match:
        return None, None
    body = solution[: match.start()]
    parts = body.split(STEP_SEP)
    steps = []
    for part in parts:
        step = _STEP_RE.fullmatch(part)
        if not step or any(g != str(int(g)) for g in step.groups()):  # no leading zeros
            return None, None
        steps.append(tuple(int(g) for g in step.groups()))
    return steps, int(match.group(1))


def is_valid_solution(problem: Union[str, PromptRecord], solution: str) -> bool:
    """Whether ``solution`` is one of the paths :func:`sample_solution` can produce, to the character."""
    remaining = Counter(parse_problem(problem))
    steps, boxed = _solution_steps(solution)
    if steps is None or len(steps) != sum(remaining.values()) - 1:
        return False
    total = None
    for a, b, s in steps:
        if total is None:  # the first step takes two of the numbers
            remaining[a] -= 1
        elif a != total:  # every later one continues the running total
            return False
        remaining[b] -= 1
        if remaining[a] < 0 or remaining[b] < 0 or a + b != s:
            return False
        total = s
    return not +remaining and boxed == total


def _next_char_entropies(weights: Dict[str, float], chosen: str) -> List[float]:
    """Entropy (nats) of the next character at each position of ``chosen``, under ``weights``.

    ``weights`` maps every possible text of this segment to its probability; texts must be
    prefix-free (each ends with a delimiter), so the next-character distribution is well defined.
    """
    out = []
    for pos in range(len(chosen)):
        prefix = chosen[:pos]
        mass: Dict[str, float] = {}
        for text, w in weights.items():
            if text.startswith(prefix):
                mass[text[pos]] = mass.get(text[pos], 0.0) + w
        total = sum(mass.values())
        out.append(-sum((m / total) * math.log(m / total) for m in mass.values() if m > 0))
    return out


def ideal_branch_entropies(problem: Union[str, PromptRecord], solution: str) -> List[float]:
    """Per response token, the entropy (nats) of a perfectly trained teacher.

    The ideal teacher is the distribution of :func:`sample_solution`: the next number is a uniform
    pick among those not used yet (the first step picks two); the running totals, the sums and the
    closing are determined.  Tokens are the solution's characters (the task tokenizer is character
    level) with the closing prefix as one token (:data:`TASK_PHRASES`), plus the end-of-turn token.
    """
    if not is_valid_solution(problem, solution):
        raise ValueError(f"not a valid solution of {problem!r}: {solution!r}")
    remaining = Counter(parse_problem(problem))
    steps, boxed = _solution_steps(solution)
    entropies: List[float] = []

    def pick(value: int, delimiter: str) -> None:
        count = sum(remaining.values())
        options = {f"{v}{delimiter}": c / count for v, c in remaining.items() if c}
        entropies.extend(_next_char_entropies(options, f"{value}{delimiter}"))
        remaining[value] -= 1

    for index, (a, b, s) in enumerate(steps):
        if index == 0:
            pick(a, "+")
        else:
            entropies.extend([0.0] * len(f"{a}+"))
        pick(b, "=")
        entropies.extend([0.0] * len(str(s) + (STEP_SEP if index + 1 < len(steps) else "")))
    entropies.append(0.0)  # the closing prefix, one token
    entropies.extend([0.0] * len(f"{boxed}{FINAL_SUFFIX}"))
    entropies.append(0.0)  # end of turn
    return entropies


def ideal_high_entropy_fraction(
    records: Sequence[Union[str, PromptRecord]], *, samples_per_problem: int = 4, tau: float = 0.8, seed: int = 0
) -> float:
    """Fraction of response tokens (over sampled paths) whose ideal teacher entropy exceeds ``tau``."""
    rng = random.Random(seed)
    high = total = 0
    for record in records:
        for _ in range(samples_per_problem):
            ent = ideal_branch_entropies(record, sample_solution(record, rng))
            high += sum(h > tau for h in ent)
            total += len(ent)
    return high / total


# ---------------------------------------------------------------- tokenizer and models

TASK_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]
TASK_SPECIALS = (ENDOFTEXT, IM_START, IM_END)
TASK_PHRASES = (TRAIN_SUFFIX, EVAL_SUFFIX, EMPTY_THINK, "user\n", "assistant\n", FINAL_PREFIX)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_task_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: printable ASCII and newline, the Qwen specials,
    then a few whole-phrase tokens.

    Characters outside that alphabet are dropped by the tokenizer; the task never produces them.
    The phrases every prompt repeats (the instructions, the chat roles, the empty think block) and the
    closing of every solution (". \\boxed{") are one token each, as frequent text is in a real BPE
    vocabulary: prompts shrink from ~110 to ~35 tokens, which more than halves the compute of every
    phase on CPU, and responses lose 8 certain tokens.  Problems, steps and answers stay character
    level, so the branch points of a solution are single tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(TASK_ALPHABET)}
    # BPE without merges splits text into single characters; Fuse joins them back verbatim.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(TASK_SPECIALS))
    core.add_tokens([AddedToken(p, normalized=False, special=False) for p in TASK_PHRASES])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


ModelRole = Literal["teacher", "student"]

# Teacher and student shapes of the tiny demo; head_dim 32 because vLLM's CPU attention needs it.
# RoPE base 10,000 rather than Qwen3's 1e6: sequences are under 200 tokens, and the slow rotary
# frequencies a long context needs would leave positions nearly indistinguishable.  Two layers:
# with the same SFT budget a 4-layer 128-wide teacher reached 0.36 Avg@4 where the 2-layer one
# reached 0.54 (600 iterations) and 0.89 (1,500); the student is narrower (96 wide, 3 heads sharing
# one KV head, tied embeddings like the small Qwen3s), about half the teacher's parameters.
TASK_MODEL_SHAPES = {
    "teacher": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                    ffn_hidden_size=384, tie_word_embeddings=False, rope_theta=10_000.0),
    "student": dict(hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=32,
                    ffn_hidden_size=288, tie_word_embeddings=True, rope_theta=10_000.0),
}


def make_task_model(out_dir: Union[str, Path], *, role: ModelRole, seed: int = 0,
                    max_position_embeddings: int = 512) -> Path:
    """Write a randomly initialised HF ``Qwen3ForCausalLM`` (fp32) with the task tokenizer; return the dir.

    Untied embeddings for the teacher (like Qwen3-8B), tied for the student (like the small Qwen3s).
    Generation stops at ``<|im_end|>`` or ``<|endoftext|>``.
    """
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    if role not in TASK_MODEL_SHAPES:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    return make_tiny_qwen3(
        out_dir,
        seed=seed,
        tokenizer=build_task_tokenizer(),
        init_std=0.02,
        perturb_norms=False,
        eos_tokens=(IM_END, ENDOFTEXT),
        max_position_embeddings=max_position_embeddings,
        **TASK_MODEL_SHAPES[role],
    )


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """One named split of the task: how many distinct digits a problem adds, and the split sizes."""

    source: str
    min_operands: int
    max_operands: int
    description: str
    train_size: int = 4096
    test_size: int = 512


# The default task (make run, make replicate) and a harder one for the replication's Pass@k curves:
# six to eight numbers give five to seven running-total steps, so an error anywhere in a longer chain
# spoils the answer and per-sample accuracy has room below the teacher's Pass@k (issue 23).  Both keep
# a test split whose operand sets never occur in training.
TASKS: Dict[str, ArithTask] = {
    SOURCE: ArithTask(SOURCE, MIN_OPERANDS, MAX_OPERANDS, "sums of 4-5 distinct digits"),
    LONG_SOURCE: ArithTask(LONG_SOURCE, 6, 8, "sums of 6-8 distinct digits (longer chains)"),
}


def get_task(source: str) -> ArithTask:
    """The task named ``source``; ValueError naming the known ones otherwise."""
    if source not in TASKS:
        raise ValueError(f"unknown synthetic task {source!r}; known: {', '.join(TASKS)}")
    return TASKS[source]


def task_records(split: Split = "train", *, n: Optional[int] = None, seed: int = 0,
                 source: str = SOURCE) -> List[PromptRecord]:
    """The records ``load_prompt_records(source)`` returns: the task's train (4096) or test (512) problems."""
    task = get_task(source)
    default = task.train_size if split == "train" else task.test_size
    records = generate_problems(default if n is None else n, seed=seed, split=split,
                                min_operands=task.min_operands, max_operands=task.max_operands)
    return [dataclasses.replace(r, source=task.source) for r in records]
