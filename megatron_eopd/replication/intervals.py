"""Paired bootstrap intervals for EOPD against OPD: pure arithmetic on per-problem, per-seed numbers.

The study's runs are paired: the OPD and the EOPD run of one seed share the teacher, the student
base and the prompt order, and every run is judged on the same held-out problems.  So the
question "is EOPD better?" is asked of the paired differences ``D[seed, problem]`` (EOPD's value
minus OPD's, for example a problem's unbiased Pass@k), and its uncertainty has two sources: which
seeds were run and which problems were drawn.  The bootstrap resamples both, independently and with
replacement (seeds, and problems, are each treated as a sample from a larger population), and
recomputes the mean difference; the percentile interval of those means is the interval reported.

The verdict reads the interval: entirely on the paper's side of zero, "holds"; entirely on the
other side, "reversed"; straddling zero, "cannot tell at this budget".  The smallest effect the
study could have detected is the difference that a two-sided test at the interval's level would
find with 80% probability, ``(z_{1 - alpha/2} + z_{0.8}) * SE`` with SE the bootstrap's standard
deviation: a true effect smaller than that is likely to end as "cannot tell".

Per-run quantities without a problem axis (the student's final entropy, the gated forward KL) use
the same code with one column: only the seeds are resampled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np

from megatron_eopd.evaluation.metrics import pass_at_k

Better = Literal["higher", "lower"]
HOLDS, REVERSED, CANNOT_TELL = "holds", "reversed", "cannot tell at this budget"
DEFAULT_REPLICATES = 4000
DEFAULT_LEVEL = 0.95
DETECTION_POWER = 0.8
MIN_SEEDS_FOR_VERDICT = 2


@dataclass(frozen=True)
class PairedInterval:
    """EOPD minus OPD: the observed mean difference, its bootstrap interval and what it says."""

    delta: float
    low: float
    high: float
    standard_error: float
    smallest_detectable: float
    verdict: str
    level: float
    num_seeds: int
    num_problems: int
    replicates: int
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def per_problem_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> np.ndarray:
    """Each problem's unbiased Pass@k from its number of correct samples out of ``n``."""
    return np.array([pass_at_k(n, int(c), k) for c in correct_counts], dtype=np.float64)


def verdict_of(low: float, high: float, better: Better) -> str:
    """'holds' when the interval lies on the paper's side of zero, 'reversed' on the other side."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    favourable_low, favourable_high = (low, high) if better == "higher" else (-high, -low)
    if favourable_low > 0:
        return HOLDS
    if favourable_high < 0:
        return REVERSED
    return CANNOT_TELL


def bootstrap_means(differences: np.ndarray, *, replicates: int, seed: int) -> np.ndarray:
    """Means of ``differences[seeds, problems]`` over ``replicates`` draws of seeds and of problems.

    Each replicate draws ``S`` seed rows and ``P`` problem columns with replacement (seeds first,
    then problems, from one generator); its mean over the drawn grid is
    ``sum_s sum_p w_s D[s, p] v_p / (S P)`` with ``w`` and ``v`` the draw counts, so no grid is
    materialised.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"differences must be a non-empty [seeds, problems] array, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences hold NaN or infinite values")
    seeds, problems = d.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(replicates, seeds))
    problem_draws = rng.integers(0, problems, size=(replicates, problems))
    seed_counts, problem_counts = _draw_counts(seed_draws, seeds), _draw_counts(problem_draws, problems)
    return np.einsum("bs,sp,bp->b", seed_counts, d, problem_counts) / (seeds * problems)


def _draw_counts(draws: np.ndarray, size: int) -> np.ndarray:
    """How often each of ``size`` indices was drawn, per replicate (row) of ``draws``."""
    counts = np.zeros((draws.shape[0], size), dtype=np.float64)
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return counts


def paired_interval(eopd: np.ndarray, opd: np.ndarray, better: Better, *, replicates: int = DEFAULT_REPLICATES,
                    level: float = DEFAULT_LEVEL, seed: int = 0) -> PairedInterval:
    """EOPD against OPD on ``[seeds, problems]`` arrays whose rows are the same seeds in the same order.

    A 1-D input is one value per seed (a per-run quantity): only the seeds are resampled.
    """
    eopd, opd = np.asarray(eopd, dtype=np.float64), np.asarray(opd, dtype=np.float64)
    if eopd.shape != opd.shape:
        raise ValueError(f"EOPD and OPD must be paired: shapes {eopd.shape} and {opd.shape} differ")
    if eopd.ndim == 1:
        eopd, opd = eopd[:, None], opd[:, None]
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if replicates < 100:
        raise ValueError(f"a bootstrap needs at least 100 replicates, got {replicates}")
    differences = eopd - opd
    means = bootstrap_means(differences, replicates=replicates, seed=seed)
    alpha = 1 - level
    low, high = (float(q) for q in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    standard_error = float(np.std(means, ddof=1))
    z = NormalDist().inv_cdf
    smallest = (z(1 - alpha / 2) + z(DETECTION_POWER)) * standard_error
    verdict, note = verdict_of(low, high, better), ""
    if differences.shape[0] < MIN_SEEDS_FOR_VERDICT:
        # One pair of runs shows nothing of how much another seed would move the difference: its
        # interval covers the problems drawn, not the training's randomness.
        verdict, note = CANNOT_TELL, "one seed: the seed-to-seed spread is unknown"
    return PairedInterval(
        delta=float(differences.mean()), low=low, high=high, standard_error=standard_error,
        smallest_detectable=smallest, verdict=verdict, level=level, num_seeds=differences.shape[0],
        num_problems=differences.shape[1], replicates=replicates, note=note,
    )


def pass_at_k_curve_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to ``n`` (and ``n`` itself): the points of a Pass@k curve."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [2**i for i in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else ks + [n]
