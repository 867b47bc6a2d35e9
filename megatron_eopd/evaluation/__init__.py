"""Benchmark evaluation: Avg@k / Pass@k arithmetic (:mod:`.metrics`, no model code) and the runner
behind ``tools/evaluate.py`` (:mod:`.runner`), whose pieces the trainer's periodic evaluation and the
held-out evaluation of the tiny task (:mod:`.heldout`: ``make run`` and ``make replicate``) reuse.

Importing this package imports neither; ``from megatron_eopd.evaluation import metrics`` is cheap.
"""
