"""Grading a response's final answer against the gold answer with math-verify.

The last ``\\boxed{...}`` (or ``\\fbox{...}``) of the response is the answer; it is compared with
the gold answer gold-first, ``verify(parse(gold), parse(answer))``.  Every call has a wall-clock
limit: a pathological expression is graded wrong with reason ``"timeout"``, never left hanging.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, TypeVar

_BOX_COMMANDS = ("\\boxed", "\\fbox")

T = TypeVar("T")


@dataclass(frozen=True)
class Grade:
    """``reason``: "correct", "wrong", "no_boxed_answer", "unparsable_answer", "unparsable_gold",
    "timeout" or "error: ..."."""

    correct: bool
    extracted: Optional[str]
    reason: str


class GradingTimeout(BaseException):
    """Grading took longer than its limit.

    A BaseException on purpose: math-verify catches ``Exception`` everywhere and would turn an
    interrupt into a quiet "could not parse".
    """


def _box_contents(text: str, start: int) -> Optional[tuple]:
    """The braced argument after a box command that ends at ``start``, and where it ends."""
    pos = start
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for end in range(pos, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : end], end
    return None  # unbalanced: the response was cut off inside the box


def extract_last_boxed(text: str) -> Optional[str]:
    """Contents of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``).  A box inside a box counts as
    part of the outer one; "last" is the outermost box that starts last.
    """
    found = None
    pos = 0
    while True:
        starts = [(text.find(cmd, pos), cmd) for cmd in _BOX_COMMANDS]
        starts = [(i, cmd) for i, cmd in starts if i >= 0]
        if not starts:
            return found
        index, cmd = min(starts)
        after = index + len(cmd)
        if after < len(text) and text[after].isalpha():  # e.g. \boxedx is another command
            pos = after
            continue
        box = _box_contents(text, after)
        if box is None:
            pos = after
            continue
        found, pos = box[0], box[1] + 1


def _with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()``, or :class:`GradingTimeout` after ``timeout_s`` seconds.

    In the main thread a SIGALRM interval timer interrupts the computation (sympy is pure Python,
    so the signal lands).  Signals only work there; elsewhere ``fn`` runs in a daemon thread that is
    abandoned on timeout (it may keep a core busy until it finishes, but the caller moves on).
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise GradingTimeout()

        previous_handler = signal.signal(signal.SIGALRM, on_alarm)
        start = time.monotonic()
        previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_delay > 0:  # someone else's alarm was pending: put it back, less the time spent
                left = max(previous_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, previous_interval)
    result: list = []

    def run():
        try:
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, exc))

    worker = threading.Thread(target=run, name="grade_answer", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        raise GradingTimeout()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _verify(gold: str, answer: str):
    from math_verify import parse, verify

    # math-verify's own timeouts also use SIGALRM and would cancel ours: ours covers both calls.
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        return "unparsable_gold"
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not answer_parsed:
        return "unparsable_answer"
    return "correct" if verify(gold_parsed, answer_parsed, timeout_seconds=None) else "wrong"


def grade_answer(response_text: str, gold: str, *, timeout_s: float = 5.0) -> Grade:
    """Grade the last boxed answer of ``response_text`` against ``gold`` (a LaTeX or plain answer)."""
    extracted = extract_last_boxed(response_text)
    if extracted is None or not extracted.strip():
        return Grade(False, extracted, "no_boxed_answer")
    try:
        reason = _with_deadline(lambda: _verify(gold, extracted), timeout_s)
    except GradingTimeout:
        return Grade(False, extracted, "timeout")
    except Exception as exc:  # noqa: BLE001 - a grader crash must not stop training
        return Grade(False, extracted, f"error: {type(exc).__name__}: {exc}")
    return Grade(reason == "correct", extracted, reason)


def grade_batch(texts: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0) -> List[Grade]:
    """:func:`grade_answer` for each (response, gold) pair."""
    if len(texts) != len(golds):
        raise ValueError(f"{len(texts)} responses but {len(golds)} gold answers")
    return [grade_answer(t, g, timeout_s=timeout_s) for t, g in zip(texts, golds)]
