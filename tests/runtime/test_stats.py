"""The study's statistics: t quantiles and CDF against printed tables (and scipy when present),
Welch's test, intervals, the one-seed case, and the seeds-needed formula."""

from __future__ import annotations

import math
import random

import pytest

from physlm_graph.runtime.stats import seeds_needed, summarize, t_cdf, t_ppf, welch


@pytest.mark.parametrize("q, df, want", [(0.975, 1, 12.7062047362), (0.975, 3, 3.1824463053), (0.975, 10, 2.2281388520),
                                         (0.995, 4, 4.6040948713), (0.8, 8, 0.8888895178), (0.975, 1000, 1.9623390808)])
def test_t_quantiles_match_the_tables(q, df, want):
    assert t_ppf(q, df) == pytest.approx(want, rel=1e-9)
    assert t_cdf(want, df) == pytest.approx(q, rel=1e-9)
    assert t_ppf(1 - q, df) == pytest.approx(-want, rel=1e-9)


def test_against_scipy_when_installed():
    st = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for df in (1, 2.5, 7, 42.3):
        for t in (-6.0, -1.1, 0.0, 0.4, 2.5):
            assert t_cdf(t, df) == pytest.approx(st.t.cdf(t, df), abs=1e-12)
    for _ in range(40):
        a = [rng.gauss(0, 1) for _ in range(rng.randint(2, 9))]
        b = [rng.gauss(0.7, 3) for _ in range(rng.randint(2, 9))]
        ref = st.ttest_ind(b, a, equal_var=False)
        w = welch(a, b)
        assert w.t == pytest.approx(ref.statistic, rel=1e-10) and w.p_value == pytest.approx(ref.pvalue, rel=1e-8)


def test_summary_interval_and_one_seed():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    half = 3.1824463053 * s.std / 2  # t_{0.975, 3} * std / sqrt(4)
    assert (s.n, s.mean, s.std) == (4, 2.5, pytest.approx(math.sqrt(5 / 3)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    one = summarize([3.25])
    assert (one.std, one.ci_low, one.ci_high) == (None, None, None)
    assert one.describe() == "3.2500 (1 seed: std and CI undefined)"
    assert "±" not in one.describe()
    assert welch([1.0], [1.0, 2.0]).p_value is None


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    va, vb = 1.0 / 3, (20 / 3) / 4  # s^2 / n on each side
    w = welch(a, b)
    assert w.diff == 5.0 and w.t == pytest.approx(5.0 / math.sqrt(va + vb))
    assert w.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert w.p_value == pytest.approx(2 * (1 - t_cdf(w.t, w.df)))
    assert welch([1.0, 1.0], [1.0, 1.0]).p_value == 1.0


def test_seeds_needed():
    # a difference of one standard deviation per arm needs 17 seeds each at alpha 0.05, power 0.8
    assert seeds_needed(0.1, 0.1, 0.1) == 17
    n = seeds_needed(0.02, 0.05, 0.03)
    var = 0.05 ** 2 + 0.03 ** 2
    for m, ok in ((n, True), (n - 1, False)):  # n is the first count whose power reaches 0.8
        df = var ** 2 / ((0.05 ** 4 + 0.03 ** 4) / (m - 1))
        assert (0.02 / math.sqrt(var / m) >= t_ppf(0.975, df) + t_ppf(0.8, df)) is ok
    assert seeds_needed(0.0, 1.0, 1.0) is None
