"""Benchmark evaluation: Avg@k / Pass@k arithmetic (:mod:`.metrics`, no model code) and the runner
behind ``tools/evaluate.py`` (:mod:`.runner`), whose pieces the trainer's periodic evaluation reuses.

Importing this package imports neither; ``from megatron_eopd.evaluation import metrics`` is cheap.
"""
