"""Final-answer extraction and math-verify grading, including the wall-clock limit."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_eopd.data import Grade, extract_last_boxed, grade_answer, grade_batch
from megatron_eopd.data import grading


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3} first, then \\boxed{4}", "4"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} then \\fbox{5}", "5"),
        ("\\boxed{\\boxed{8}}", "\\boxed{8}"),  # the outer box is the answer
        ("\\boxed {12}", "12"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces still nest as braces
        ("no box here", None),
        ("\\boxed{3} and a cut-off \\boxed{\\frac{1}{", "3"),  # an unfinished box does not count
        ("\\boxedx{3}", None),
        ("", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34", True),
        ("\\boxed{025}", "25", True),
        ("\\boxed{24}", "25", False),
        ("\\boxed{3.0}", "3", True),
        ("\\boxed{(1,2)}", "(1, 2)", True),
        ("\\boxed{(2,1)}", "(1,2)", False),  # tuples are ordered
        ("\\boxed{2,1}", "1,2", True),  # bare lists are compared as sets by math-verify
        ("\\boxed{[0,1)}", "[0,1)", True),
        ("\\boxed{(0,1]}", "[0,1)", False),  # interval ends matter
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", True),
        ("\\boxed{5\\text{ cm}}", "5", True),  # math-verify drops units
        ("\\boxed{5 cm}", "5", True),
        ("\\boxed{50\\%}", "50", True),
        ("I think \\boxed{3}. No wait: \\boxed{4}", "4", True),
        ("I think \\boxed{4}. No wait: \\boxed{3}", "4", False),
    ],
)
def test_grade_answer_on_tricky_answers(response, gold, correct):
    grade = grade_answer(response, gold)
    assert grade.correct is correct, grade
    assert grade.reason == ("correct" if correct else "wrong")
    assert grade.extracted == extract_last_boxed(response)


def test_grade_answer_without_a_box_or_with_garbage():
    assert grade_answer("the answer is 4", "4") == Grade(False, None, "no_boxed_answer")
    assert grade_answer("\\boxed{}", "4") == Grade(False, "", "no_boxed_answer")
    assert grade_answer("\\boxed{@@@}", "4").reason in ("unparsable_answer", "wrong")


def test_grade_batch():
    grades = grade_batch(["\\boxed{1}", "\\boxed{2}", "nothing"], ["1", "3", "1"])
    assert [g.correct for g in grades] == [True, False, False]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grade_batch(["a", "b"], ["1"])


def test_a_real_pathological_expression_times_out_in_the_main_thread():
    start = time.monotonic()
    grade = grade_answer("\\boxed{10^{10^{10^{10}}}}", "5", timeout_s=0.5)
    assert grade == Grade(False, "10^{10^{10^{10}}}", "timeout")
    assert time.monotonic() - start < 3.0
    # The alarm is gone afterwards: an ordinary grade still works and nothing fires later.
    assert grade_answer("\\boxed{2}", "2").correct
    time.sleep(0.6)


def _slow_verify(gold, answer):
    time.sleep(2.0)
    return "correct"


def test_timeout_outside_the_main_thread(monkeypatch):
    # Signals only work in the main thread; a worker thread must still get an answer in time.
    monkeypatch.setattr(grading, "_verify", _slow_verify)
    out = {}

    def worker():
        start = time.monotonic()
        out["grade"] = grade_answer("\\boxed{1}", "1", timeout_s=0.3)
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert out["grade"] == Grade(False, "1", "timeout") and out["seconds"] < 1.5


def test_real_grading_works_outside_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(grade_answer("\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join(30)
    assert out == [Grade(True, "\\frac{1}{2}", "correct")]


def test_an_outer_alarm_survives_grading():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        assert grade_answer("\\boxed{3}", "3").correct
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 1.0
        time.sleep(remaining + 0.2)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_shared_gold_answers_grade_their_own_boxed_form():
    import json
    import os
    from pathlib import Path

    shared = Path(os.environ.get("EOPD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "math"))
    path = shared / "olympiadbench.jsonl"
    if not path.is_file():
        pytest.skip(f"offline benchmark data not found at {shared}")
    rows = [json.loads(line) for line in path.open()][:60]
    grades = grade_batch([f"so \\boxed{{{r['answer']}}}" for r in rows], [r["answer"] for r in rows])
    assert all(g.correct for g in grades), [(r["answer"], g) for r, g in zip(rows, grades) if not g.correct]
