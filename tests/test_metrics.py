import math

import numpy as np
import pytest

from ncfm_core.errors import ConfigError
from ncfm_core.metrics import fair_metrics, hlr, ior, lrs

E = math.e


def test_ior_and_hlr_are_plain_differences_of_fractions():
    assert ior(0.72, 0.26) == pytest.approx(0.46, abs=1e-12)
    assert ior(0.10, 0.30) == pytest.approx(-0.20, abs=1e-12)
    assert hlr(0.848, 0.718) == pytest.approx(0.13, abs=1e-12)
    assert hlr(0.50, 0.60) == pytest.approx(-0.10, abs=1e-12)


@pytest.mark.parametrize("bad", [71.8, -0.01, 1.0001, float("nan")])
def test_accuracies_outside_fractions_are_refused(bad):
    with pytest.raises(ConfigError, match="fraction"):
        ior(bad, 0.2)
    with pytest.raises(ConfigError, match="fraction"):
        hlr(0.9, bad)


def test_lrs_at_equal_ior_and_hlr_is_the_closed_form():
    # a = 0: (e^0 - e^-1) / (e - e^-1) = (1 - 1/e) / (e - 1/e) = 1 / (e + 1) ~ 0.2689
    expected = (1.0 - 1.0 / E) / (E - 1.0 / E)
    assert expected == pytest.approx(1.0 / (E + 1.0), abs=1e-15)
    for value in (-0.4, 0.0, 0.25):
        assert lrs(value, value) == pytest.approx(expected, abs=1e-15)
    assert lrs(0.0, 0.0) == pytest.approx(0.2689414213699951, abs=1e-12)


def test_lrs_matches_a_hand_computation_with_numpy():
    ior_value, hlr_value = 0.3, 0.1
    a = (ior_value - hlr_value) / 2.0  # 0.1
    expected = (np.exp(a) - np.exp(-1.0)) / (np.exp(1.0) - np.exp(-1.0))
    assert lrs(ior_value, hlr_value) == pytest.approx(float(expected), abs=1e-15)
    assert expected == pytest.approx(0.313687, abs=1e-6)  # by hand: (1.105171 - 0.367879) / 2.350402


def test_lrs_spans_exactly_zero_to_one_at_the_extremes_and_stays_inside():
    assert lrs(-1.0, 1.0) == pytest.approx(0.0, abs=1e-15)  # worse than random, far from full data
    assert lrs(1.0, -1.0) == pytest.approx(1.0, abs=1e-15)
    # every pair of accuracies in [0, 1] gives an LRS in [0, 1], increasing in acc_syn
    grid = np.linspace(0.0, 1.0, 11)
    for acc_random in grid:
        for acc_full in grid:
            scores = [lrs(ior(s, acc_random), hlr(acc_full, s)) for s in grid]
            assert all(0.0 <= score <= 1.0 for score in scores)
            assert all(b > a for a, b in zip(scores, scores[1:]))


def test_lrs_refuses_percent_points():
    # DD-Ranking's bug: IOR and HLR in percents put a far outside [-1, 1]
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        lrs(46.0, 13.0)


def test_fair_metrics_reports_only_what_the_baselines_allow():
    assert fair_metrics(0.7) == {}
    assert fair_metrics(0.7, acc_random=0.5) == {"ior": pytest.approx(0.2)}
    assert fair_metrics(0.7, acc_full=0.9) == {"hlr": pytest.approx(0.2)}
    both = fair_metrics(0.7, acc_random=0.5, acc_full=0.9)
    assert both["ior"] == pytest.approx(0.2) and both["hlr"] == pytest.approx(0.2)
    assert both["lrs"] == pytest.approx(1.0 / (E + 1.0), abs=1e-12)
