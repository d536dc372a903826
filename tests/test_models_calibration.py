"""How often the built-in models flag clean data, and whether they still catch what they should.

Each test trains on four weeks of hourly data and scores the next week (for the forests and the
autoencoder on features, the training rows too), with the models' default threshold of 3.5.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from modelfactory.models import get
from modelfactory.models._util import grid_step, tie_floor

H = 3600
T = 24 * 28
TIMES = np.arange(T + 24 * 7, dtype=np.int64) * H
CALENDAR = np.column_stack([(TIMES // H) % 24, (TIMES // H // 24) % 7]).astype(float)


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence warnings on counts
        yield


def _model(name: str):
    if name == "autoencoder_features":
        return get("autoencoder", input="features")
    if name == "sarimax":  # a short window and few iterations: seconds, not tens of seconds
        return get(name, season_length=24, max_length=24 * 14, maxiter=50)
    return get(name, season_length=24) if name in ("holt_winters", "ets") else get(name)


def _flags(name: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
    """Flags of the training range and of the week after it, and the model."""
    X = CALENDAR if name in ("random_forest", "isolation_forest", "autoencoder_features") else None
    part = (lambda a, s: None if a is None else a[s])
    old, new = slice(0, T), slice(T, None)
    m = _model(name).fit(y[old], t=TIMES[old], X=part(X, old))
    return (m.score(y[old], t=TIMES[old], X=part(X, old))["is_anomaly"],
            m.score(y[new], t=TIMES[new], X=part(X, new))["is_anomaly"], m)


SPARSE = {
    "counts of mean 0.05": lambda rng: rng.poisson(0.05, TIMES.size).astype(float),
    "counts of mean 0.3": lambda rng: rng.poisson(0.3, TIMES.size).astype(float),
    "a gauge at 3, 8 % of hours at 4": lambda rng: 3.0 + (rng.random(TIMES.size) < 0.08),
    # on a grid of 1 whose smallest gap is 2: the step is the gaps' greatest common divisor
    "counts of only 0, 2 or 5": lambda rng: rng.choice([0.0, 2.0, 5.0], TIMES.size, p=[0.85, 0.1, 0.05]),
    "a gauge at 6, at 4 or 9 in 5 % of hours each": lambda rng: rng.choice([4.0, 6.0, 9.0], TIMES.size,
                                                                             p=[0.05, 0.9, 0.05]),
}


@pytest.mark.parametrize("case", list(SPARSE))
@pytest.mark.parametrize("name", ["holt_winters", "ets", "random_forest", "autoencoder"])
def test_sparse_counts_and_integer_gauges_are_not_flagged_at_every_value_off_their_mode(name, case):
    # Their residuals are mostly tied, so 1.4826 x MAD collapsed and the scale was a quarter of
    # the RMS: 5-26 % of clean points were flagged (every 1 among the 0s, every 4 of the gauge).
    # Three series; the nominal rate of |z| > 3.5 is 0.05 %: one point in 500 is the bound.
    rng = np.random.default_rng(7)
    flagged = []
    for _ in range(3):
        inside, after, _ = _flags(name, SPARSE[case](rng))
        flagged += [inside, after]
    rate = np.concatenate(flagged).mean()
    assert rate <= 0.002, f"{name} flagged {rate:.2%} of clean points of {case}"


@pytest.mark.parametrize("name", ["holt_winters", "ets", "sarimax", "random_forest", "autoencoder"])
@pytest.mark.parametrize("case,size", [("counts of mean 0.3", 10), ("counts of only 0, 2 or 5", 20)])
def test_a_spike_in_sparse_counts_is_still_caught(name, case, size):
    # a spike of four times the largest clean value of 0, 2 or 5 (one of 10 is within their scale:
    # the tie floor is the spread of the values off the mode, about 3 there, 1.5 for Poisson 0.3)
    rng = np.random.default_rng(3)
    y = SPARSE[case](rng)
    y[T + 30] += size
    _, after, _ = _flags(name, y)
    assert after[30]


def test_sparse_counts_are_not_flagged_at_every_one_by_sarimax():
    rng = np.random.default_rng(11)
    _, after, m = _flags("sarimax", rng.poisson(0.05, TIMES.size).astype(float))
    assert m.widen_ > 1  # its own forecast deviation is that of counts of mean 0.05: about 0.22
    assert after.mean() <= 0.004, f"sarimax flagged {after.mean():.2%} of clean counts"


def test_measurements_are_on_no_grid_and_keep_their_scale():
    # The floor is 0 for values that are not on a grid, so Gaussian measurements keep the scale
    # they had (bit for bit); rounded to 3 decimals they are on a grid, too fine to matter.
    rng = np.random.default_rng(0)
    y = 10 + rng.normal(0, 1, (50, 500))
    assert (grid_step(y) == 0).all()
    assert (tie_floor(y - 10, grid_step(y)) == 0).all()
    r = np.round(y, 3)
    q = grid_step(r)
    assert np.isin(q.round(9), [0.0, 0.001]).all()  # 0 where no two consecutive values are 0.001 apart
    mad = 1.4826 * np.median(np.abs(r - np.median(r, axis=1)[:, None]), axis=1)
    assert np.all(tie_floor(r, q) <= 1.01 * mad)


def test_grid_step_of_counts_gauges_and_halves():
    assert grid_step(np.array([0.0, 0, 2, 0, 1, np.nan])) == 1.0
    # the smallest gap a multiple of the step: 2 and 3 (step 1), 3 and 4, 10 and 15 (step 5)
    assert grid_step(np.array([0.0, 2, 0, 0, 5, 2, 0])) == 1.0
    assert grid_step(np.array([6.0, 6, 9, 6, 4, 6])) == 1.0
    assert grid_step(np.array([0.0, 10, 0, 25, 0, 10])) == 5.0
    assert grid_step(np.array([[0.0, 2, 5, np.nan], [0.0, 0.5, 1.25, 2.0]])).tolist() == [1.0, 0.25]
    # the last 16 values only show a gap of 2: the whole row is still looked at
    assert grid_step(np.r_[5.0, 0.0, np.tile([0.0, 2.0], 20)]) == 1.0
    assert grid_step(np.array([3.0, 4, 3, 3, 5])) == 1.0
    assert grid_step(np.array([1.5, 2.0, 2.0, 3.5])) == 0.5
    assert grid_step(np.array([0.0, 0.1, 0.2, 0.3])) == pytest.approx(0.1)
    assert grid_step(np.array([np.nan, np.nan])) == 0.0
    assert grid_step(np.array([5.0, 5.0, 5.0])) == 0.0  # a constant: no step to see


def _two_features(rng, n: int, start: int):
    hour = (np.arange(n) + start) % 24
    load = rng.uniform(0, 1, n)
    y = 50 + 20 * np.sin(2 * np.pi * hour / 24) + 30 * load + rng.normal(0, 2, n)
    return np.column_stack([hour, load]).astype(float), y


@pytest.mark.parametrize("missing", [0, 1])
def test_random_forest_rows_missing_one_feature_are_judged_by_its_training_spread(missing):
    # With the feature's training median in its place, 40-70 % of these clean rows were flagged.
    rng = np.random.default_rng(5)
    X, y = _two_features(rng, 672, 0)
    Xn, yn = _two_features(rng, 168, 672)
    m = get("random_forest").fit(y, X=X)
    full = m.score(yn, X=Xn)
    Xn[:, missing] = np.nan
    out = m.score(yn, X=Xn)
    assert out["is_anomaly"].mean() <= 0.01
    # the band widens by what the missing feature could have done, and only for those rows
    assert np.all(out["upper"] - out["lower"] > full["upper"] - full["lower"])
    spike = yn.copy()
    spike[7] += 200
    assert m.score(spike, X=Xn)["is_anomaly"][7]


def test_random_forest_stored_before_the_quantiles_fills_missing_features_with_medians():
    rng = np.random.default_rng(5)
    X, y = _two_features(rng, 300, 0)
    m = get("random_forest").fit(y, X=X)
    state = m.get_state()
    del state["quantiles_"]
    old = type(m)(**m.get_params()).set_state(state)
    Xn = X[:20].copy()
    Xn[:, 0] = np.nan
    filled = np.where(np.isfinite(Xn), Xn, m.medians_)
    assert np.array_equal(old.score(y[:20], X=Xn)["expected"], m.predict(filled))


def test_ets_refuses_a_damped_trend_without_a_trend():
    from modelfactory.exceptions import ParameterError

    with pytest.raises(ParameterError, match=r"'damped_trend' parameter of ETS .* Got damped_trend=True with trend=None"):
        get("ets", trend=None, damped_trend=True).validate_params()
    get("ets", trend="add", damped_trend=True).validate_params()  # with a trend: fine


def test_autoencoder_on_features_flags_clean_rows_about_as_often_as_its_threshold_says():
    # Its residuals have heavy tails (the target is an input the network partly copies): a scale
    # from their MAD flagged about 4 % of clean rows, in training and in new rows alike.
    rng = np.random.default_rng(1)
    flagged, caught = [], []
    for _ in range(3):
        y = 10 + rng.normal(0, 1, TIMES.size)
        spikes = T + rng.choice(TIMES.size - T, 5, replace=False)
        inside, after, m = _flags("autoencoder_features", y)
        flagged += [inside, after]
        y[spikes] += 8 * rng.choice([-1.0, 1.0], 5)
        caught.append(m.score(y[T:], X=CALENDAR[T:])["is_anomaly"][spikes - T])
    assert np.concatenate(flagged).mean() <= 0.01
    assert np.concatenate(caught).mean() >= 0.9
