"""``ets`` and ``sarimax``: statsmodels' exact state-space models, one series at a time.

For users who want the exact statistical model (maximum likelihood, intervals
from the model).  They cost tens of milliseconds to seconds per series, so for
millions of groups prefer ``holt_winters`` or ``seasonal``.

Serialisation stores no pickle and needs no refit: the fitted parameters, the
model's state at the start of a short tail of the training series, and that
tail, all as arrays.  On load the model is rebuilt from that state and run
over the tail (``ETSModel.smooth`` / ``SARIMAX.filter``), which gives exactly
the original forecasts and intervals.

Both need a time column; the series is put on a regular grid (median step);
``inf`` values count as missing, like NaN.  Both are fitted to the series divided
by its standard deviation (``ets`` also centred on its median) and keep their
state in those units (``yloc_``, ``yscale_``): statsmodels' optimisers and
diffuse initialisation work in absolute units, so the same series in
milliseconds and in seconds, or in bytes and in gigabytes, would otherwise get
different models.  statsmodels' convergence warnings are recorded in ``notes_``,
not raised.
"""
from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np

from ..exceptions import ModelError, ParameterError
from ._timegrid import seasonal_fill, series_to_grid
from ._util import fit_quietly as _fit_quietly
from ._util import grid_step, tie_floor
from .base import SCORING_PARAMS, Model, Param, SkipGroup, robust_score

__all__ = ["ETS", "SARIMAX"]

_MAX_HORIZON = 100_000


class _StateSpaceModel(Model):
    """Shared plumbing: regular grid, skip rules, tail storage, scoring by horizon."""

    expects_what_it_scores = True
    needs_time = True
    ignores_features = True
    state_attrs: ClassVar = ("step_", "t_last_", "params_", "tail_", "notes_", "yloc_", "yscale_", "widen_")
    def _centres(self) -> bool:
        """Whether the series is centred on its median too (only where the model cannot tell: a level
        absorbs the median, differencing removes it)."""
        return False


    def required_rows(self) -> int:
        m = self.season_length if self._seasonal() else 1
        return max(self.min_values, 2 * m + 2)

    def _seasonal(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate_params(self) -> None:
        super().validate_params()
        # a window shorter than two seasons skips every group: say so before a run reads any data
        if self.max_length is not None and self._seasonal() and self.max_length < 2 * self.season_length:
            raise ParameterError(
                f"The 'max_length' parameter of {type(self).__name__} ({self.max_length}) must be at least "
                f"two seasons, 2 x season_length = {2 * self.season_length}.")

    def _grid(self, y, t):
        vals, t0, step = series_to_grid(y, t, self.step, max_len=self.max_length, max_missing=self.max_missing,
                                        name=self.name)
        vals = np.where(np.isfinite(vals), vals, np.nan)  # +-inf is missing too: statsmodels cannot use it
        if self.max_length is not None and vals.size > self.max_length:
            t0 += (vals.size - self.max_length) * step
            vals = vals[vals.size - self.max_length:]
        missing = float(np.mean(~np.isfinite(vals)))
        if missing > self.max_missing:
            raise SkipGroup(f"{self.name}: {missing:.0%} of the time steps are missing (NaN or absent), "
                            f"more than max_missing={self.max_missing}")
        fin = vals[np.isfinite(vals)]
        big = float(np.abs(fin).max()) if fin.size else 0.0
        sd = float(np.std(fin)) if fin.size else 0.0
        if fin.size and not sd > 0 and big > 0:  # squares below float64's reach (values near 1e-160)
            sd = float(np.std(fin / big)) * big
        # relative to the values: the model is fitted standardised, so a series of values around
        # 1e-12 with a clear cycle is no more constant than the same series in other units
        if fin.size and (np.ptp(fin) <= 1e-12 * big or not sd > 0):
            raise SkipGroup(f"{self.name}: the series is constant ({fin[0]:g}); there is no variance to "
                            "model (use 'seasonal' or 'holt_winters', which handle constant series)")
        m = self.season_length if self._seasonal() else 1
        if self._seasonal() and vals.size < 2 * m:
            raise SkipGroup(f"{self.name}: season_length {m} needs at least two seasons "
                            f"({2 * m} steps); the series spans {vals.size}")
        self.yloc_ = float(np.median(fin)) if self._centres() else 0.0
        self.yscale_ = sd  # > 0 and finite: not constant, and at most MAX_ABS_VALUE
        return (vals - self.yloc_) / self.yscale_, t0 + (vals.size - 1) * step, step

    def _tie_widen(self, vals: np.ndarray, resid: np.ndarray) -> float:
        """How much wider than the model's own forecast deviation the band must be for values on a
        grid (counts mostly 0, a gauge mostly at 3): at least the robust sigma of the one-step
        residuals that are not ties (:func:`._util.tie_floor`), as ``holt_winters`` floors its
        scale.  The likelihood's variance of such a series is about its mean (0.3 for counts of mean
        0.3), and a band of 3.5 of its deviations flagged most 2s.  1 for measurements (no grid).
        ``vals`` are the standardised values (NaN where missing), ``resid`` the one-step residuals."""
        grid = grid_step(vals)
        if not grid > 0:
            return 1.0
        m = self.season_length if self._seasonal() else 1
        r = np.where(np.isfinite(vals), np.asarray(resid, dtype=np.float64), np.nan)
        r[:min(m, r.size // 2)] = np.nan  # the first season is mostly the initial state's
        sd1 = float(np.sqrt(max(self._forecast(1)[1][0], 0.0)))
        floor = tie_floor(r, grid)
        return float(max(1.0, floor / sd1)) if sd1 > 0 else 1.0

    def _tail_len(self, n: int) -> int:
        m = self.season_length if self._seasonal() else 1
        return int(max(2, min(max(m, 8), n - m - 1)))

    def horizons(self, t: np.ndarray) -> np.ndarray:
        """Steps ahead of the end of training of each time ``t``."""
        return np.rint((np.asarray(t, dtype=np.int64) - self.t_last_) / self.step_).astype(np.int64)

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        h = self.horizons(t)
        expected = np.full(y.shape, np.nan)
        sd = np.full(y.shape, np.nan)
        ok = (h >= 1) & (h <= _MAX_HORIZON)
        if ok.any():  # the model works in standardised units (see the module docstring)
            mean, var = self._forecast(int(h[ok].max()))
            expected[ok] = self.yloc_ + self.yscale_ * mean[h[ok] - 1]
            sd[ok] = self.yscale_ * self.widen_ * np.sqrt(np.maximum(var[h[ok] - 1], 0.0))
        z = (y - expected) / sd
        finite = np.isfinite(z)
        zz = np.where(finite, z, 0.0)
        return {
            "expected": expected,
            "lower": expected - self.threshold * sd,
            "upper": expected + self.threshold * sd,
            "score": robust_score(zz),
            "is_anomaly": finite & (np.abs(zz) > self.threshold),
        }

    def _forecast(self, H: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def set_state(self, state):
        # models stored before the standardisation worked in the data's units
        state = {"yloc_": 0.0, "yscale_": 1.0, "widen_": 1.0, **state}  # and before the tie floor
        super().set_state(state)
        self.notes_ = list(state["notes_"])
        self._rebuilt = None
        return self


_COMMON = {
    "season_length": Param(24, int, low=1, doc="steps per season (1: no seasonality)"),
    "step": Param(None, (int, type(None)), low=1, doc="seconds between points"),
    "threshold": Param(3.5, float, low=0.0, doc="standardised forecast error beyond which a point is anomalous"),
    "max_missing": Param(0.2, float, low=0.0, high=0.9, doc="largest fraction of missing steps"),
    "min_values": Param(10, int, low=4, doc="fewest non-missing values to fit"),
    "maxiter": Param(200, int, low=1, doc="optimizer iterations"),
    "max_length": Param(None, (int, type(None)), low=8, doc="fit only the last max_length steps"),
    **SCORING_PARAMS,
}


class ETS(_StateSpaceModel):
    """statsmodels' ``ETSModel`` (additive errors), fitted by maximum likelihood per series.

    Parameters
    ----------
    trend : {"add", None}, default "add"
    damped_trend : bool, default False
        Damp the trend; needs ``trend="add"`` (refused without a trend).
    seasonal : {"add", None}, default "add"
    season_length : int, default 24
        Steps per season.
    step : int or None, default None
        Seconds between points; None infers it (median spacing).
    threshold : float, default 3.5
        Standardised forecast error (by the model's own forecast standard
        deviation) beyond which a point is anomalous.
    max_missing : float, default 0.2
        Largest fraction of missing steps; missing steps are filled from the
        same season slot (ETSModel needs complete series), more are skipped.
    min_values : int, default 10
        Fewest non-missing values (and at least two seasons).
    maxiter : int, default 200
        Optimizer iterations; a fit that does not converge is kept, with a note.
    max_length : int or None, default None
        Fit only the last ``max_length`` steps (the fit time grows with the length).
    debounce, quiet
        See :func:`modelfactory.models.base.debounce`.

    Only additive errors and components: their intervals are analytic
    (deterministic and fast); multiplicative ones would be simulated.  Constant
    series are skipped.  Points at or before the end of training score 0.
    """

    name = "ets"
    params: ClassVar = {
        "trend": Param("add", choices=("add", None), doc="trend component"),
        "damped_trend": Param(False, bool, doc="damp the trend"),
        "seasonal": Param("add", choices=("add", None), doc="seasonal component"),
        **_COMMON,
    }
    state_attrs: ClassVar = _StateSpaceModel.state_attrs + ("start_", "mse_")

    def _seasonal(self) -> bool:
        return self.seasonal is not None and self.season_length > 1

    def _centres(self) -> bool:  # the level absorbs the median
        return True

    def validate_params(self) -> None:
        super().validate_params()
        # statsmodels has no damped trend without a trend: it was dropped without a word
        if self.damped_trend and self.trend is None:
            raise ParameterError(
                "The 'damped_trend' parameter of ETS must be False without a trend (trend=None); pass "
                f"trend='add' to damp it. Got damped_trend={self.damped_trend!r} with trend=None instead.")

    def _model(self, endog, **init):
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        return ETSModel(endog, error="add", trend=self.trend, damped_trend=bool(self.damped_trend and self.trend),
                        seasonal=self.seasonal if self._seasonal() else None,
                        seasonal_periods=self.season_length if self._seasonal() else None, **init)

    def _fit(self, y, t, X) -> None:
        import pandas as pd

        vals, self.t_last_, self.step_ = self._grid(y, t)
        m = self.season_length if self._seasonal() else 1
        raw = vals
        vals = seasonal_fill(vals[None, :], m)[0]
        first = int(np.argmax(np.isfinite(vals)))
        vals, raw = vals[first:], raw[first:]
        res, self.notes_ = _fit_quietly(lambda: self._model(pd.Series(vals)).fit(disp=False, maxiter=self.maxiter))
        names = list(res.model.param_names)
        p = dict(zip(names, np.asarray(res.params, dtype=np.float64)))
        n, L = len(vals), self._tail_len(len(vals))
        st = np.asarray(res.states, dtype=np.float64)
        k = n - L - 1
        start = [st[k, 0]]
        if self.trend:
            start.append(st[k, 1])
        if self._seasonal():
            start.extend(st[k - m + 1:k + 1, -1])
        self.params_ = np.array([v for name, v in p.items() if not name.startswith("initial_")])
        self.start_ = np.array(start, dtype=np.float64)
        self.tail_ = vals[n - L:].copy()
        self.mse_ = float(res.mse)
        if not (np.all(np.isfinite(self.params_)) and np.all(np.isfinite(self.start_))
                and np.isfinite(self.mse_)):
            raise ModelError("ets: the fit produced non-finite parameters or states")
        self._rebuilt, self.widen_ = None, 1.0
        self.widen_ = self._tie_widen(raw, res.resid)

    def _rebuild(self):
        import pandas as pd

        if getattr(self, "_rebuilt", None) is None:
            init = {"initialization_method": "known", "initial_level": self.start_[0]}
            i = 1
            if self.trend:
                init["initial_trend"] = self.start_[1]
                i = 2
            if self._seasonal():
                init["initial_seasonal"] = self.start_[i:]
            self._rebuilt = self._model(pd.Series(np.asarray(self.tail_, dtype=np.float64)), **init).smooth(
                np.asarray(self.params_, dtype=np.float64))
        return self._rebuilt

    def _forecast(self, H: int):
        res = self._rebuild()
        L = len(self.tail_)
        pred = res.get_prediction(start=L, end=L + H - 1)
        mean = np.asarray(pred.predicted_mean, dtype=np.float64)
        if res.mse > 0:
            var = np.asarray(pred.var_pred_mean, dtype=np.float64) * (self.mse_ / res.mse)
        else:  # the tail fitted exactly: use the relative variance directly
            var = self.mse_ * np.asarray(res._relative_forecast_variance(np.arange(1, H + 1)), dtype=np.float64)
        return mean, var


class SARIMAX(_StateSpaceModel):
    """statsmodels' ``SARIMAX`` state-space model, fitted by maximum likelihood per series.

    Parameters
    ----------
    p, d, q : int, default 1, 0, 1
        The ARIMA order.
    seasonal_p, seasonal_d, seasonal_q : int, default 0, 1, 1
        The seasonal order (with ``season_length``; ignored when it is 1).
    trend : {"n", "c", "t", "ct"}, default "n"
        Deterministic trend terms.
    season_length : int, default 24
        Steps per season.
    step, threshold, max_missing, min_values, maxiter, max_length, debounce, quiet
        As for :class:`ETS`.

    Missing steps (gaps, NaNs) are handled by the Kalman filter.  Constant
    series are skipped.  Intervals are the model's exact forecast variance.
    Points at or before the end of training score 0.
    """

    name = "sarimax"
    params: ClassVar = {
        "p": Param(1, int, low=0, high=10, doc="AR order"),
        "d": Param(0, int, low=0, high=2, doc="differences"),
        "q": Param(1, int, low=0, high=10, doc="MA order"),
        "seasonal_p": Param(0, int, low=0, high=3, doc="seasonal AR order"),
        "seasonal_d": Param(1, int, low=0, high=1, doc="seasonal differences"),
        "seasonal_q": Param(1, int, low=0, high=3, doc="seasonal MA order"),
        "trend": Param("n", choices=("n", "c", "t", "ct"), doc="deterministic trend terms"),
        **_COMMON,
    }
    state_attrs: ClassVar = _StateSpaceModel.state_attrs + ("state_", "state_cov_", "trend_offset_")

    def _seasonal(self) -> bool:
        return self.season_length > 1 and (self.seasonal_p + self.seasonal_d + self.seasonal_q) > 0

    def _centres(self) -> bool:
        # a differenced series does not see its level; uncentred, a series on a large offset (1e12 with
        # a noise of 1) was standardised by a deviation the offset's rounding swamped, and flagged 46 of
        # 48 clean points
        return self.d > 0 or (self._seasonal() and self.seasonal_d > 0)

    def _model(self, endog, trend_offset: int = 1):
        from statsmodels.tsa.statespace.sarimax import SARIMAX as _SARIMAX

        seasonal = ((self.seasonal_p, self.seasonal_d, self.seasonal_q, self.season_length)
                    if self._seasonal() else (0, 0, 0, 0))
        return _SARIMAX(endog, order=(self.p, self.d, self.q), seasonal_order=seasonal, trend=self.trend,
                        trend_offset=trend_offset)

    def set_state(self, state):
        # models stored before the tail kept its place in time: their time trend restarted at the tail
        return super().set_state({"trend_offset_": 1, **state})

    def _fit(self, y, t, X) -> None:
        vals, self.t_last_, self.step_ = self._grid(y, t)
        first = int(np.argmax(np.isfinite(vals)))
        vals = vals[first:]
        res, self.notes_ = _fit_quietly(lambda: self._model(vals).fit(disp=False, maxiter=self.maxiter))
        n, L = len(vals), self._tail_len(len(vals))
        fr = res.filter_results
        self.params_ = np.asarray(res.params, dtype=np.float64)
        self.state_ = np.asarray(fr.predicted_state[:, n - L], dtype=np.float64)
        self.state_cov_ = np.asarray(fr.predicted_state_cov[:, :, n - L], dtype=np.float64)
        self.tail_ = vals[n - L:].copy()
        # the time trend ("t", "ct") of the rebuilt tail goes on from where the tail stood in the
        # fitted series; restarted at 1, every forecast lost the drift of the first n - L steps
        self.trend_offset_ = n - L + 1
        if not (np.all(np.isfinite(self.params_)) and np.all(np.isfinite(self.state_))
                and np.all(np.isfinite(self.state_cov_))):
            raise ModelError("sarimax: the fit produced non-finite parameters or states")
        self._rebuilt, self.widen_ = None, 1.0
        self.widen_ = self._tie_widen(vals, res.resid)

    def _rebuild(self):
        if getattr(self, "_rebuilt", None) is None:
            mod = self._model(np.asarray(self.tail_, dtype=np.float64), int(self.trend_offset_))
            mod.ssm.initialize_known(np.asarray(self.state_, dtype=np.float64),
                                     np.asarray(self.state_cov_, dtype=np.float64))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._rebuilt = mod.filter(np.asarray(self.params_, dtype=np.float64))
        return self._rebuilt

    def _forecast(self, H: int):
        fc = self._rebuild().get_forecast(H)
        return (np.asarray(fc.predicted_mean, dtype=np.float64),
                np.asarray(fc.var_pred_mean, dtype=np.float64).reshape(-1))
