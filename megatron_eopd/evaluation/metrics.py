"""Avg@k and Pass@k from per-sample correctness: pure arithmetic, no models, no trainer.

Every benchmark problem is sampled ``n`` times; ``c`` of the samples are correct.

* ``pass@k`` is the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models
  Trained on Code": the probability that at least one of ``k`` samples drawn without replacement
  from the ``n`` is correct, ``1 - C(n-c, k) / C(n, k)``, averaged over problems.  It is computed
  with exact integers, ``(C(n, k) - C(n-c, k)) / C(n, k)``, and one correctly rounded division, so
  it neither cancels catastrophically nor overflows for any ``n``.
* ``avg@k`` is the mean accuracy of ``k`` samples.  Its unbiased, lowest-variance estimate from
  ``n >= k`` samples is ``c / n`` for every ``k`` (and equals ``pass@1``), so it is reported once,
  as ``avg@n``: the paper's Avg@8 with ``n = 8``.

A benchmark's numbers are means over its problems; the ``mean`` row is the unweighted mean over
benchmarks (every benchmark counts the same, whatever its size).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

MEAN = "mean"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of ``k`` of the ``n`` samples (``c`` correct) is correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be integers, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total  # comb(n - c, k) is 0 when n - c < k


def ks_for(n: int) -> List[int]:
    """Every ``k`` from 1 to ``n``."""
    return list(range(1, n + 1))


def metric_names(n: int, ks: Optional[Sequence[int]] = None) -> List[str]:
    """``avg@n`` then ``pass@k`` for ``ks`` (default: every ``k <= n``), as the metrics dicts name them."""
    return [f"avg@{n}"] + [f"pass@{k}" for k in (ks_for(n) if ks is None else ks)]


def benchmark_metrics(correct: Sequence[Sequence[bool]]) -> Dict[str, float]:
    """Metrics of one benchmark from ``correct[problem][sample]`` (the same ``n`` for every problem).

    Returns ``num_problems``, ``n``, ``avg@n`` and ``pass@k`` for every ``k <= n``.
    """
    if not correct:
        raise ValueError("a benchmark needs at least one problem")
    sizes = {len(row) for row in correct}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(sizes)}")
    n = sizes.pop()
    if n < 1:
        raise ValueError("every problem needs at least one sample")
    counts = [sum(bool(x) for x in row) for row in correct]
    out: Dict[str, float] = {"num_problems": len(counts), "n": n}
    out[f"avg@{n}"] = sum(counts) / (n * len(counts))
    for k in ks_for(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return out


def mean_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """The unweighted mean of every ``avg@``/``pass@`` metric over benchmarks (all must share ``n``)."""
    if not per_benchmark:
        raise ValueError("no benchmarks to average")
    ns = {m["n"] for m in per_benchmark.values()}
    if len(ns) != 1:
        raise ValueError(f"benchmarks were sampled with different n: {sorted(ns)}")
    n = ns.pop()
    out: Dict[str, float] = {"num_problems": sum(m["num_problems"] for m in per_benchmark.values()), "n": n}
    for name in metric_names(n):
        out[name] = sum(m[name] for m in per_benchmark.values()) / len(per_benchmark)
    return out


def summarize(correct_by_benchmark: Mapping[str, Sequence[Sequence[bool]]]) -> Dict[str, Dict[str, float]]:
    """Per-benchmark metrics (in the given order) plus the ``mean`` row."""
    table = {name: benchmark_metrics(rows) for name, rows in correct_by_benchmark.items()}
    if MEAN in table:
        raise ValueError(f"{MEAN!r} is reserved for the mean over benchmarks")
    table[MEAN] = mean_over_benchmarks(table)
    return table


def console_ks(n: int) -> List[int]:
    """The ``k`` shown in the console table: all of them up to 16, else powers of two and ``n``."""
    if n <= 16:
        return ks_for(n)
    return sorted({k for k in (2**i for i in range(n.bit_length())) if k <= n} | {n})


def markdown_table(table: Mapping[str, Mapping[str, float]], *, ks: Optional[Sequence[int]] = None,
                   percent: bool = True) -> str:
    """A Markdown table: one row per benchmark (the ``mean`` row last), columns ``avg@n`` and ``pass@k``."""
    n = int(next(iter(table.values()))["n"])
    columns = metric_names(n, console_ks(n) if ks is None else ks)
    lines = ["| benchmark | problems | " + " | ".join(columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    rows = [name for name in table if name != MEAN] + ([MEAN] if MEAN in table else [])
    for name in rows:
        metrics = table[name]
        cells = [f"{100 * metrics[c]:.1f}" if percent else f"{metrics[c]:.4f}" for c in columns]
        label = f"**{name}**" if name == MEAN else name
        lines.append(f"| {label} | {int(metrics['num_problems'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat_metrics(table: Mapping[str, Mapping[str, float]], prefix: str = "eval") -> Dict[str, float]:
    """``{"<prefix>/<benchmark>/avg@n": ..., "<prefix>/<benchmark>/pass@k": ...}`` for a metrics record."""
    out = {}
    for name, metrics in table.items():
        for key in metric_names(int(metrics["n"])):
            out[f"{prefix}/{name}/{key}"] = float(metrics[key])
    return out
