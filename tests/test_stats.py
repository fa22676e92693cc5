"""creditlab.stats against closed forms and hand-computed values (no scipy)."""

import math

import pytest

from creditlab import stats


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantile_known_values(df, t):
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)


def test_t_quantile_closed_forms():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert stats.t_quantile(0.5, 3) == 0.0
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))


def test_t_quantile_tends_to_normal():
    assert stats.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)
    assert stats.t_quantile(0.975, 100) == pytest.approx(1.984, abs=5e-4)


def test_t_cdf_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 40.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_betainc_closed_forms():
    x = 0.3
    assert stats.betainc(1, 1, x) == pytest.approx(x)
    assert stats.betainc(2, 1, x) == pytest.approx(x ** 2)
    assert stats.betainc(1, 3, x) == pytest.approx(1 - (1 - x) ** 3)
    assert stats.betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)))


def test_mean_std_median_skip_missing():
    assert stats.mean([1, None, 3, float("nan")]) == 2
    assert stats.std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
    assert stats.std([1.0]) is None and stats.mean([]) is None
    assert stats.median([3, 1, 2]) == 2 and stats.median([4, 1, 2, 3]) == 2.5


def test_paired_hand_computed():
    a = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.5}
    b = {0: 0.78, 1: 0.79, 2: 0.80}  # seed 3 is not in b: left out
    p = stats.paired(a, b)
    assert p.seeds == (0, 1, 2) and p.n == 3
    assert p.diffs == pytest.approx((0.02, 0.03, 0.04))
    assert p.mean == pytest.approx(0.03) and p.std == pytest.approx(0.01)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t_{0.975, 2} s / sqrt(n)
    assert p.low == pytest.approx(0.03 - half, abs=1e-6) and p.high == pytest.approx(0.03 + half, abs=1e-6)
    assert p.excludes_zero is True  # 0.03 - 0.0248 > 0
    shifted = stats.paired({s: v - 0.01 for s, v in a.items()}, b)  # diffs 0.01, 0.02, 0.03: 0.02 - 0.0248 < 0
    assert shifted.low < 0 < shifted.high and shifted.excludes_zero is False


def test_paired_interval_containing_zero_and_one_seed():
    p = stats.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.5})  # diffs -0.5, +0.5
    assert p.mean == 0 and p.excludes_zero is False
    assert p.low == pytest.approx(-12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-3)
    one = stats.paired({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.mean == 0.5 and one.low is None and one.excludes_zero is None
    assert stats.paired({0: 1.0}, {1: 1.0}).n == 0
