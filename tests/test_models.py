"""The model protocol, the registry, parameter errors, debounce and the conformance check."""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from modelfactory import models
from modelfactory.exceptions import ModelError, NotFittedError, ParameterError
from modelfactory.models import base, get, register_model, registry
from modelfactory.models.base import Model, Param, SeriesBatch, SkipGroup, debounce, dumps, loads, robust_score
from modelfactory.testing import ConformanceError, check_model, make_series

BUILTINS = ["autoencoder", "ets", "holt_winters", "isolation_forest", "random_forest", "sarimax", "seasonal"]

# Parameters that keep the statsmodels fits quick; the defaults are exercised elsewhere.
FAST = {
    "ets": {"season_length": 4},
    "sarimax": {"season_length": 4, "seasonal_d": 0, "seasonal_q": 0, "maxiter": 50},
    "autoencoder": {"max_iter": 100},
    "isolation_forest": {"n_estimators": 20},
    "random_forest": {"n_estimators": 20},
}


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture
def user_models():
    yield
    models._USER.clear()


class Mean(Model):
    """A minimal user model: the mean and standard deviation of the series."""

    name = "mean_model"
    params: ClassVar = {"threshold": Param(3.0, float, low=0.0), **base.SCORING_PARAMS}
    state_attrs = ("mean_", "sd_")

    def _fit(self, y, t, X):
        fin = y[np.isfinite(y)]
        self.mean_, self.sd_ = float(fin.mean()), max(float(fin.std()), 1e-9)

    def _score(self, y, t, X):
        z = (y - self.mean_) / self.sd_
        e = np.full(y.shape, self.mean_)
        return {"expected": e, "lower": e - self.threshold * self.sd_, "upper": e + self.threshold * self.sd_,
                "score": robust_score(z), "is_anomaly": np.abs(np.nan_to_num(z)) > self.threshold}


# -- registry --------------------------------------------------------------
def test_registry_lists_builtins_and_is_read_only():
    assert isinstance(registry, Mapping)
    assert sorted(registry) == BUILTINS
    assert registry["holt_winters"].name == "holt_winters"
    with pytest.raises(TypeError):
        registry["x"] = Mean  # type: ignore[index]
    assert "holt_winters" in repr(registry)


def test_every_builtin_is_known_by_its_own_name():
    for name in BUILTINS:
        assert registry[name].name == name
        assert get(name).get_params() == {k: p.default for k, p in registry[name].params.items()}


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(ModelError, match=r"Unknown model 'holt_winter'\. Did you mean 'holt_winters'\?"):
        get("holt_winter")
    with pytest.raises(ModelError, match="Known models: autoencoder, ets"):
        get("zzz")
    # a class's path (the CLI's --model mymodels.MeanStd) is not imported: say how such a model trains
    with pytest.raises(ModelError, match=r"Unknown model 'mymodels\.MeanStd'\. A model is named as registered, not "
                                         r"by its module: pass a class of your own to modelfactory\.train\(model="):
        get("mymodels.MeanStd")


def test_register_model_and_use_it_by_name(user_models):
    register_model("mean_model", Mean)
    assert registry["mean_model"] is Mean and "mean_model" in list(registry)
    assert get("mean_model", threshold=2.0).threshold == 2.0
    with pytest.raises(ModelError, match="already registered; pick another name or pass overwrite=True"):
        register_model("mean_model", Mean)
    register_model("mean_model", Mean, overwrite=True)
    with pytest.raises(ModelError, match="'seasonal' is already registered; pick another name\\."):
        register_model("seasonal", Mean)
    with pytest.raises(ModelError, match="must be an identifier"):
        register_model("my model", Mean)
    with pytest.raises(ModelError, match="needs a class; got Mean"):
        register_model("other", Mean())


def test_a_user_model_passes_check_model():
    report = check_model(Mean())
    assert report["checks"][-1] == "debounce" and report["bytes"] < 500


def test_check_model_names_the_broken_check():
    class NoSelf(Mean):
        def fit(self, y, *, t=None, X=None):
            super().fit(y, t=t, X=X)
            return None

    with pytest.raises(ConformanceError, match=r"check_model\[fit\] NoSelf: fit must return the model itself"):
        check_model(NoSelf())

    class Flaky(Mean):
        def _fit(self, y, t, X):
            super()._fit(y, t, X)
            self.mean_ += np.random.default_rng().normal()

    with pytest.raises(ConformanceError, match=r"check_model\[serialisation\]|check_model\[determinism\]"):
        check_model(Flaky())

    class Crashes(Mean):
        def _fit(self, y, t, X):
            if len(y) < 5:
                raise IndexError("boom")
            super()._fit(y, t, X)

    with pytest.raises(ConformanceError, match=r"check_model\[short\].*IndexError: boom"):
        check_model(Crashes())
    assert issubclass(ConformanceError, AssertionError)


def test_check_model_takes_a_detector_that_expects_nothing_when_it_says_so():
    """A detector whose expected is NaN by design (expects_what_it_scores = False, as the runner
    documents) failed check_model as "a silent NaN model"; a class that does not say so still does."""
    class Detector(Mean):
        expects_what_it_scores = False

        def _score(self, y, t, X):
            return {**super()._score(y, t, X), **{k: np.full(len(y), np.nan) for k in ("expected", "lower", "upper")}}

    assert check_model(Detector())["checks"][-1] == "debounce"

    class Silent(Detector):
        expects_what_it_scores = True

    with pytest.raises(ConformanceError, match=r"silent NaN model\); if it is a detector .*expects_what_it_scores = False"):
        check_model(Silent())


# -- parameters --------------------------------------------------------------
def test_unknown_parameter_names_the_closest_valid_one():
    with pytest.raises(ParameterError, match=r"HoltWinters has no parameter 'season_lenght'\. "
                                              r"Did you mean 'season_length'\?"):
        get("holt_winters", season_lenght=24)
    with pytest.raises(ParameterError, match=r"RandomForest has no parameter 'n_trees'"):
        get("random_forest", n_trees=3)


@pytest.mark.parametrize("name, params, message", [
    ("holt_winters", {"season_length": 1},
     r"The 'season_length' parameter of HoltWinters must be an int >= 2\. Got 1 instead\."),
    ("holt_winters", {"max_missing": 2.0},
     r"The 'max_missing' parameter of HoltWinters must be a finite float in \[0\.0, 0\.9\]\. Got 2\.0 instead\."),
    ("holt_winters", {"interval": "wide"},
     r"The 'interval' parameter of HoltWinters must be one of 'ets', 'flat'\. Got 'wide' instead\."),
    ("seasonal", {"step": 0}, r"The 'step' parameter of SeasonalProfile must be an int \(or None\) >= 1"),
    ("seasonal", {"debounce": "last"}, r"The 'debounce' parameter of SeasonalProfile must be one of 'none', 'first'"),
    ("ets", {"trend": "mul"}, r"The 'trend' parameter of ETS must be one of 'add', None\. Got 'mul'"),
    ("sarimax", {"d": 3}, r"The 'd' parameter of SARIMAX must be an int in \[0, 2\]\. Got 3 instead\."),
    ("isolation_forest", {"n_estimators": 0}, r"'n_estimators' parameter of IsolationForest must be an int in"),
    ("random_forest", {"max_features": 1.5}, r"'max_features' parameter of RandomForest must be a finite float in"),
    ("autoencoder", {"window": True}, r"'window' parameter of Autoencoder must be an int in \[2, 10000\]\. Got True"),
    # a window shorter than the model needs skipped or failed every group of a run that had read all
    # its data (holt_winters checked it only in fit_batch)
    ("holt_winters", {"max_length": 10},
     r"The 'max_length' parameter of HoltWinters \(10\) must be at least min_seasons x season_length = 48\."),
    ("ets", {"max_length": 10},
     r"The 'max_length' parameter of ETS \(10\) must be at least two seasons, 2 x season_length = 48\."),
    ("sarimax", {"max_length": 20}, r"The 'max_length' parameter of SARIMAX \(20\) must be at least two seasons"),
])
def test_out_of_range_parameters_say_what_is_allowed(name, params, message):
    model = get(name, **params)
    with pytest.raises(ParameterError, match=message):
        model.validate_params()
    y, t, X = make_series(200)
    with pytest.raises(ParameterError, match=message):  # before any fitting starts
        model.fit(y, t=t, X=X)


def test_a_series_shorter_than_its_seasons_is_skipped_whatever_shares_its_batch():
    """A group gets what it would get on its own: too short is `skipped` with the reason, in a
    batch of short series (it used to fail them all with a ParameterError) as among long ones."""
    y, t, _ = make_series(30)
    y2, t2, _ = make_series(200)
    alone = SeriesBatch(np.concatenate([y, y[:20]]), np.array([0, 30, 50]), np.concatenate([t, t[:20]]))
    mixed = SeriesBatch(np.concatenate([y2, y[:20]]), np.array([0, 200, 220]), np.concatenate([t2, t2[:20]]))
    for cls, what in ((registry["holt_winters"], "holt_winters"), (registry["seasonal"], "seasonal")):
        out = cls.fit_batch({"season_length": 48}, alone)
        assert all(isinstance(o, SkipGroup) for o in out), out
        assert f"{what} needs at least 96 non-missing values" in str(out[1])
        out = cls.fit_batch({"season_length": 48}, mixed)
        assert isinstance(out[0], Model)
        assert isinstance(out[1], SkipGroup) and f"{what} needs at least 96 non-missing values" in str(out[1])


def test_missing_features_and_time_are_model_errors():
    y, t, X = make_series(100)
    with pytest.raises(ModelError, match="random_forest needs feature columns: pass features=\\[...\\]"):
        get("random_forest").fit(y, t=t)
    with pytest.raises(ModelError, match="holt_winters needs a time column: pass time="):
        get("holt_winters").fit(y)
    with pytest.raises(ModelError, match="autoencoder with input='features' needs feature columns"):
        get("autoencoder", input="features").fit(y, t=t)
    m = get("random_forest", n_estimators=5).fit(y, X=X)
    with pytest.raises(ModelError, match="random_forest needs the features of each point to score it"):
        m.score(y)
    with pytest.raises(ModelError, match="fitted on 2 feature columns; got 3"):
        m.score(y[:5], X=np.ones((5, 3)))


def test_scoring_before_fitting_raises_not_fitted():
    with pytest.raises(NotFittedError, match="This HoltWinters is not fitted yet: call fit\\(\\) first"):
        get("holt_winters").score([1.0], t=[0])


def test_a_stored_model_whose_class_renamed_its_state_says_the_class_changed():
    # it said "not fitted yet: call fit() first" of a model that was fitted, by the class as it was
    class Band(Model):
        name = "band"
        state_attrs = ("m_", "s_")

        def _fit(self, y, t, X):
            self.m_, self.s_ = float(np.mean(y)), float(np.std(y))

    class BandRenamed(Band):
        state_attrs = ("mean_", "std_")

    m = Band().fit(np.arange(10.0))
    m.__class__ = BandRenamed  # what unpickling a stored Band gives once the class is changed
    with pytest.raises(NotFittedError, match=r"This BandRenamed lacks mean_, std_ of its state_attrs but holds m_, s_: "
                                             r"if it was stored by an earlier version of its class, the class changed "
                                             r"since \(train again"):
        m.score(np.arange(3.0))


# -- per-group data problems -------------------------------------------------
@pytest.mark.parametrize("name, params, y, reason", [
    ("holt_winters", {}, np.full(100, np.nan), "needs at least 48 non-missing values"),
    ("seasonal", {}, np.arange(10.0), "needs at least 48 non-missing values"),
    ("ets", {"season_length": 4}, np.full(60, 3.0), "the series is constant"),
    ("sarimax", {"season_length": 4}, np.full(60, 3.0), "the series is constant"),
    ("autoencoder", {}, np.arange(20.0), "needs at least 48 non-missing values"),
    ("isolation_forest", {}, np.arange(10.0), "needs at least 32 non-missing values"),
])
def test_data_problems_skip_the_group_with_a_reason(name, params, y, reason):
    t = np.arange(len(y)) * 3600
    with pytest.raises(SkipGroup, match=reason):
        get(name, **params).fit(y, t=t, X=np.ones((len(y), 2)))


def test_too_many_missing_steps_skip():
    y, t, _ = make_series(200)
    keep = np.arange(200) % 6 < 2  # two thirds of the hourly steps absent
    with pytest.raises(SkipGroup, match=r"66% of the time steps are missing .* more than max_missing=0\.2"):
        get("holt_winters").fit(y[keep], t=t[keep])


def test_constant_series_give_sane_models():
    t = np.arange(120) * 3600
    for name in ("seasonal", "holt_winters"):
        m = get(name).fit(np.full(120, 7.0), t=t)
        r = m.score([7.0, 7.5], t=[t[-1] + 3600, t[-1] + 7200])
        assert np.allclose(r["expected"], 7.0) and r["is_anomaly"].tolist() == [False, True]


# -- scoring contract ----------------------------------------------------------
def test_robust_score_is_a_probability_of_the_deviation():
    s = robust_score(np.array([0.0, 1.0, -3.0, np.inf, np.nan]))
    assert np.allclose(s, [0.0, 0.682689, 0.9973, 1.0, 0.0], atol=1e-4)


def test_debounce_modes():
    a = np.array([0, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    assert debounce(a, "none").tolist() == a.tolist()
    assert np.flatnonzero(debounce(a, "first")).tolist() == [1, 6, 8]
    assert np.flatnonzero(debounce(a, "first", quiet=2)).tolist() == [1, 6]
    assert np.flatnonzero(debounce(a, "first", quiet=3)).tolist() == [1]
    assert debounce(np.zeros(0, bool)).shape == (0,)
    with pytest.raises(ParameterError, match="debounce mode must be one of"):
        debounce(a, "last")
    with pytest.raises(ParameterError, match="'quiet' parameter of debounce must be an int >= 1"):
        debounce(a, "first", quiet=0)


def test_debounce_parameter_is_applied_by_score():
    y, t, _ = make_series(24 * 7)
    new_t = t[-1] + 3600 * np.arange(1, 13)
    new_y = y[-24:-12] + np.r_[0, 0, 50, 50, 50, 0, 0, 50, 0, 0, 0, 0]
    for name in ("seasonal", "holt_winters"):
        raw = get(name).fit(y, t=t).score(new_y, t=new_t)["is_anomaly"]
        assert np.flatnonzero(raw).tolist() == [2, 3, 4, 7]
        first = get(name, debounce="first").fit(y, t=t).score(new_y, t=new_t)["is_anomaly"]
        assert np.flatnonzero(first).tolist() == [2, 7]
        quiet = get(name, debounce="first", quiet=3).fit(y, t=t)
        assert np.flatnonzero(quiet.score(new_y, t=new_t)["is_anomaly"]).tolist() == [2]
        assert np.flatnonzero(quiet.score(new_y, t=new_t, debounce="none")["is_anomaly"]).tolist() == [2, 3, 4, 7]


def test_score_batch_matches_score():
    y, t, _ = make_series(24 * 7)
    y2, _, _ = make_series(24 * 7, seed=3)
    fitted = registry["holt_winters"].fit_batch({}, SeriesBatch(np.r_[y, y2], np.array([0, 168, 336]), np.r_[t, t]))
    nt = t[-1] + 3600 * np.arange(1, 6)
    batch = SeriesBatch(np.r_[y[:5], y2[:5], y[:5]], np.array([0, 5, 10, 15]), np.r_[nt, nt, nt])
    out = registry["holt_winters"].score_batch([fitted[0], fitted[1], None], batch)
    assert np.allclose(out["expected"][:5], fitted[0].score(y[:5], t=nt)["expected"])
    assert np.isnan(out["expected"][10:]).all() and not out["is_anomaly"][10:].any()


# -- serialisation -------------------------------------------------------------
def test_serialised_bytes_are_checked():
    m = get("seasonal").fit(*make_series(100)[:1], t=make_series(100)[1])
    data = m.to_bytes()
    assert data[:4] == b"MFM1"
    with pytest.raises(ModelError, match="bad magic bytes"):
        loads(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelError, match="These bytes hold a 'seasonal' model, not 'holt_winters'"):
        registry["holt_winters"].from_bytes(data)
    name, params, state = loads(dumps("x", {"a": 1}, {"v": np.arange(3, dtype=np.int16), "s": 2.5}))
    assert name == "x" and params == {"a": 1} and state["v"].dtype == np.int16 and state["s"] == 2.5


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_passes_check_model(name):
    report = check_model(get(name, **FAST.get(name, {})))
    assert report["checks"] == ["params", "unfitted", "fit", "score", "spike", "serialisation", "determinism",
                                "constant", "short", "gaps", "all_nan", "batch", "debounce"]


def test_feature_autoencoder_passes_check_model():
    check_model(get("autoencoder", input="features", max_iter=100))


def test_a_detector_that_does_not_judge_the_target_passes_check_model():
    """isolation_forest with include_target=False fits on its features whatever the target, and
    flags rows whose target is missing: check_model required it to skip an all-NaN target and
    never flag a NaN one, the contract of models that judge the target."""
    assert check_model(get("isolation_forest", include_target=False))["checks"][-3:] == ["all_nan", "batch",
                                                                                        "debounce"]


def test_bytes_per_model_are_small():
    y, t, X = make_series(24 * 14)
    limits = {"seasonal": 1_000, "holt_winters": 1_000, "ets": 1_000, "autoencoder": 5_000,
              "isolation_forest": 120_000, "random_forest": 150_000}
    for name, limit in limits.items():
        size = len(get(name, **({"season_length": 24} if name == "ets" else {})).fit(y, t=t, X=X).to_bytes())
        assert size < limit, (name, size)


def test_a_stored_model_name_nobody_registered_is_a_clear_error():
    from modelfactory.models import stored_class

    assert stored_class("seasonal") is registry["seasonal"]
    with pytest.raises(ModelError, match=r"no model of that name is registered in this process: call "
                                         r"modelfactory.register_model\('tukey_reg', TheClass\) first"):
        stored_class("tukey_reg")


def test_nan_parameters_are_refused_and_numpy_scalars_are_plain_values():
    """NaN passed every bound (NaN < low is False): threshold=NaN trained a model that never alerts."""
    for bad in ("nan", "inf"):
        with pytest.raises(ParameterError, match=rf"The 'threshold' parameter of SeasonalProfile must be a finite float "
                                                 rf">= 0\.0\. Got {bad} instead\."):
            get("seasonal", threshold=float(bad)).validate_params()
    # a parameter of any kind (a user's Param(..., object)) takes what it is given
    base.Param(None).check("User", "anything", float("nan"))
    m = get("seasonal", threshold=np.float32(4), season_length=np.int64(12))
    m.validate_params()
    assert type(m.threshold) is float and type(m.season_length) is int
    import json

    assert json.loads(json.dumps(m.get_params()))["season_length"] == 12


@pytest.mark.parametrize("name", ["seasonal", "holt_winters", "ets", "sarimax", "autoencoder"])
def test_fit_reads_a_series_in_time_order_whatever_the_order_of_its_rows(name):
    """``fit(y, t=t)`` on rows straight from an unsorted frame inferred a wrong step (seasonal),
    skipped the series saying it had 5 values (holt_winters, ets, sarimax) or raised a bare
    ValueError (autoencoder), where a run, which sorts the rows, fitted it."""
    rng = np.random.default_rng(0)
    H = 24 * 14
    t = np.arange(H + 24) * 3600 + 1767225600
    y = 100 + 10 * np.sin(2 * np.pi * np.arange(H + 24) / 24) + rng.normal(size=H + 24)
    params = {**FAST.get(name, {}), "season_length": 24} if name != "autoencoder" else FAST[name]
    mix = rng.permutation(H)
    a = get(name, **params).fit(y[:H], t=t[:H])
    b = get(name, **params).fit(y[:H][mix], t=t[:H][mix])
    np.testing.assert_allclose(b.score(y[H:], t=t[H:])["expected"], a.score(y[H:], t=t[H:])["expected"])


def test_is_anomaly_values_read_as_flags():
    # NaN (any float type), None and pandas' NA are no flag; bool(nan) is True, and NA raised
    import pandas as pd

    from modelfactory.models.base import as_flags

    assert as_flags(np.array([1.0, np.nan, 0.0, 2.0])).tolist() == [True, False, False, True]
    assert as_flags(np.array([True, None, np.float32("nan"), pd.NA, 0, "x"], dtype=object)).tolist() == [
        True, False, False, False, False, True]
    assert as_flags(pd.array([True, None, False], dtype="boolean")).tolist() == [True, False, False]
    assert as_flags([True, False]).tolist() == [True, False]


def test_a_class_without_state_attrs_is_told_so_not_to_fit_first():
    # "not fitted yet: call fit() first", right after fit()
    class Bare(Model):
        name = "bare"

        def _fit(self, y, t, X):
            self.mean_ = float(np.mean(y))

    m = Bare().fit(np.arange(5.0))
    with pytest.raises(NotFittedError, match=r"Bare declares no state_attrs, so it can never be scored or loaded as "
                                             r"fitted: list the attributes its fit sets"):
        m.score(np.arange(3.0))


def test_too_few_values_under_max_length_says_which_steps_were_counted():
    # "got 12" of a series of 200 values named neither the step found nor the window kept
    t = np.concatenate([np.arange(0, 100 * 60, 60), 100 * 60 + np.arange(0, 500 * 60, 300)]).astype(np.int64)
    with pytest.raises(SkipGroup, match=r"needs at least 48 non-missing values \(min_seasons 2 x season_length 24\); "
                                        r"got 12 in the last max_length=60 steps of 60 s it keeps \(of 596 steps\)"):
        get("holt_winters", season_length=24, max_length=60).fit(np.sin(t / 3600.0) + 5, t=t)
