"""megatron_eopd.replication.intervals: the paired seed x problem bootstrap against a brute-force
resampling, its verdicts, and its behaviour on simulated studies with a known true difference."""

import numpy as np
import pytest

from megatron_eopd.evaluation.metrics import benchmark_metrics
from megatron_eopd.replication import intervals as iv


def test_bootstrap_means_equal_an_explicit_resampling_of_rows_and_columns():
    rng = np.random.default_rng(7)
    d = rng.normal(size=(4, 9))
    means = iv.bootstrap_means(d, replicates=300, seed=11)
    draws = np.random.default_rng(11)
    seed_idx = draws.integers(0, 4, size=(300, 4))
    problem_idx = draws.integers(0, 9, size=(300, 9))
    brute = np.array([d[np.ix_(s, p)].mean() for s, p in zip(seed_idx, problem_idx)])
    np.testing.assert_allclose(means, brute, rtol=0, atol=1e-12)


def test_interval_of_a_constant_difference_is_that_difference():
    eopd = np.full((5, 16), 0.7)
    result = iv.paired_interval(eopd, eopd - 0.1, "higher", replicates=200)
    assert result.delta == pytest.approx(0.1) and result.low == pytest.approx(0.1) and result.high == pytest.approx(0.1)
    assert result.verdict == iv.HOLDS and result.standard_error == pytest.approx(0, abs=1e-12)
    assert iv.paired_interval(eopd, eopd - 0.1, "lower", replicates=200).verdict == iv.REVERSED
    assert (result.num_seeds, result.num_problems) == (5, 16)


def test_verdicts_read_the_interval_against_the_papers_direction():
    assert iv.verdict_of(0.01, 0.05, "higher") == iv.HOLDS
    assert iv.verdict_of(-0.05, -0.01, "higher") == iv.REVERSED
    assert iv.verdict_of(-0.01, 0.05, "higher") == iv.CANNOT_TELL
    assert iv.verdict_of(-0.05, -0.01, "lower") == iv.HOLDS  # lower is better: a negative difference holds
    assert iv.verdict_of(0.01, 0.05, "lower") == iv.REVERSED
    with pytest.raises(ValueError, match="better"):
        iv.verdict_of(0, 1, "bigger")


def _simulated_study(rng, true_delta, seeds=5, problems=64):
    """Per-problem scores with problem difficulty, a seed effect per run and noise, EOPD shifted by true_delta."""
    difficulty = rng.uniform(0.1, 0.9, size=problems)
    base = difficulty + rng.normal(0, 0.05, size=(seeds, 1))
    opd = base + rng.normal(0, 0.15, size=(seeds, problems))
    eopd = base + true_delta + rng.normal(0, 0.05, size=(seeds, 1)) + rng.normal(0, 0.15, size=(seeds, problems))
    return eopd, opd


def test_no_true_difference_rarely_gives_a_verdict_and_a_large_one_is_found():
    rng = np.random.default_rng(2026)
    null = [iv.paired_interval(*_simulated_study(rng, 0.0), "higher", replicates=1000, seed=i).verdict
            for i in range(60)]
    # Nominal 5% two-sided; five seeds make the seed part of the bootstrap somewhat narrow.
    assert sum(v != iv.CANNOT_TELL for v in null) / len(null) <= 0.2, null
    found = [iv.paired_interval(*_simulated_study(rng, 0.3), "higher", replicates=1000, seed=i)
             for i in range(20)]
    assert all(r.verdict == iv.HOLDS for r in found)
    # The smallest detectable effect is what the study's noise allows: well below the true 0.3 here.
    assert all(0 < r.smallest_detectable < 0.3 for r in found)


def test_per_problem_pass_at_k_averages_to_the_benchmark_metric():
    counts = [0, 1, 3, 8, 5]
    correct = [[i < c for i in range(8)] for c in counts]
    table = benchmark_metrics(correct)
    for k in (1, 2, 4, 8):
        assert iv.per_problem_pass_at_k(counts, 8, k).mean() == pytest.approx(table[f"pass@{k}"], abs=1e-15)


def test_pass_at_k_curve_points():
    assert iv.pass_at_k_curve_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert iv.pass_at_k_curve_ks(6) == [1, 2, 4, 6]
    assert iv.pass_at_k_curve_ks(1) == [1]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="paired"):
        iv.paired_interval(np.zeros((5, 3)), np.zeros((4, 3)), "higher")
    with pytest.raises(ValueError, match="NaN"):
        iv.paired_interval(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), "higher")
    with pytest.raises(ValueError, match="replicates"):
        iv.paired_interval(np.zeros(3), np.zeros(3), "higher", replicates=10)


def test_per_run_quantities_resample_seeds_only():
    eopd, opd = np.array([1.0, 1.2, 0.9, 1.1, 1.0]), np.array([0.8, 0.9, 0.85, 0.7, 0.95])
    result = iv.paired_interval(eopd, opd, "higher", replicates=2000)
    assert result.num_problems == 1 and result.delta == pytest.approx(np.mean(eopd - opd))
    differences = eopd - opd
    assert differences.min() - 1e-12 <= result.low <= result.high <= differences.max() + 1e-12


def test_one_seed_gives_no_verdict_however_narrow_its_interval():
    eopd = np.full((1, 32), 0.9)
    result = iv.paired_interval(eopd, eopd - 0.5, "higher", replicates=200)
    assert result.low == pytest.approx(0.5) and result.verdict == iv.CANNOT_TELL and "one seed" in result.note
