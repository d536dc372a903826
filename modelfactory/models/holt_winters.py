"""``holt_winters``: additive-trend, additive-season exponential smoothing for a whole batch.

The model is ETS(A,A,A) in error-correction form, with one-step error
``e_t = y_t - (l + b + s_{t-m})`` and updates ``l += b + alpha e``,
``b += alpha beta e``, ``s_{t} = s_{t-m} + gamma e`` (the parametrisation of
statsmodels' ``ExponentialSmoothing(trend="add", seasonal="add")``).

How a batch is fitted, all series together as 2-d numpy arrays:

1. Every series is put on its regular time grid (right-aligned, so all series
   end in the last column) and standardised.
2. Grid search: all series x all grid points of ``(alpha, beta, gamma)`` run
   the recursion together from a zero initial state.  The one-step errors are
   linear in the initial state (level, trend, ``m`` seasonals), so for every
   grid point the *best* initial state is a least-squares problem whose design
   matrix does not depend on the data: one QR per grid point, shared by all
   series, gives each series' SSE with optimal initial states exactly.  The
   squared errors are summed by a compiled loop (numba; numpy without it), and
   the projection on the initial states' errors is one matrix product with a
   data-free projector (:func:`_projector`).
3. Refinement: a parabola through the SSE of the best grid point and its
   neighbours, per axis, proposes a better point.
4. Final fit: the grid winner and the refined point are run exactly (with
   gaps and NaNs skipped: a missing step makes no update), the initial state is
   solved by least squares, and the better of the two is kept.

Scoring forecasts from the end of the training series: a new point ``h``
steps after the last one (from its timestamp and the fitted step) is expected
at ``level + h * trend + season[(h - 1) mod m]``; its interval is
``expected +- threshold * sigma * sqrt(v_h)`` with ``sigma`` a robust scale
of the in-sample residuals (corrected for the ``m + 4`` fitted values) and ``v_h = 1 + sum_{j<h} (alpha + alpha beta j +
gamma [j mod m = 0])^2`` the ETS(A,A,A) variance growth (``interval="flat"``:
``v_h = 1``).  Points at or before the end of training are not scored (``expected`` NaN,
score 0), as for ``ets`` and ``sarimax``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..exceptions import ModelError, ParameterError
from ._jit import compiled
from ._timegrid import batch_to_grid, grid_spans, infer_steps, seasonal_fill
from ._util import grid_step, one_blas_thread, tie_floor
from .base import MAX_ABS_VALUE, SCORING_PARAMS, Model, Param, SeriesBatch, SkipGroup, robust_score, too_large

__all__ = ["HoltWinters", "hw_recursion"]

_MAD_TO_SIGMA = 1.4826
# The grid: alpha, beta as a fraction of alpha's slope gain, gamma as a fraction of 1 - alpha.
_ALPHA = np.array([0.01, 0.04, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 0.99])
_BETA = np.array([0.0, 0.01, 0.04, 0.15, 0.5])
_GAMMA = np.array([0.0, 0.05, 0.15, 0.4, 0.8])
#: A grid point whose one-step errors from a unit initial state grow beyond this over a series is
#: unstable there (a stable filter keeps them within about 1 / alpha = 100): its errors grow
#: geometrically with the length, and the grid's SSE, a difference of two huge sums, is noise.
_UNSTABLE = 1e3
#: A fit whose in-sample squared error per point exceeds this many times the series' variance
#: failed (predicting the median scores about 1): the group fails rather than keep a wild model.
_DIVERGED = 100.0
_CHUNK = 256  # at most this many series per block
_BLOCK = 4_000_000  # floats per working array (32 MB): bounds memory for long series and seasons


def _stamp(seconds: int) -> str:
    return np.datetime64(int(seconds), "s").astype(str)


def _seasonal_basis(m: int) -> np.ndarray:
    """Initial state ``(l, b, s_0..s_{m-1})`` from ``m + 1`` free values, seasonals summing to 0."""
    B = np.zeros((m + 2, m + 1))
    B[0, 0] = B[1, 1] = 1.0
    B[2:m + 1, 2:] = np.eye(m - 1)
    B[m + 1, 2:] = -1.0
    return B


def _impulse_channels(alpha, bstar, gamma, m: int, n: int) -> np.ndarray:
    """One-step errors caused by a unit initial level, trend and first seasonal with zero data,
    for every grid point: shape ``(G, n, 3)`` (see :func:`_impulse`)."""
    G = len(alpha)
    lvl, tr = np.zeros((G, 3)), np.zeros((G, 3))
    lvl[:, 0] = 1.0
    tr[:, 1] = 1.0
    s = np.zeros((m, G, 3))
    s[0, :, 2] = 1.0
    E = np.empty((G, n, 3))
    a, bb, g = alpha[:, None], bstar[:, None], gamma[:, None]
    for t in range(n):
        sj = s[t % m]
        e = -(lvl + tr + sj)
        E[:, t] = e
        lvl += tr + a * e
        tr += bb * e
        sj += g * e
    return E


def _impulse(channels: np.ndarray, m: int) -> np.ndarray:
    """One-step errors caused by each unit initial state with zero data: shape ``(G, n, m + 2)``.

    From the responses to a unit level, trend and first seasonal (:func:`_impulse_channels`): a
    unit in seasonal ``j`` is one in seasonal 0 whose response starts ``j`` steps later (nothing
    happens before its slot comes round: the same operations on the same values), so its column
    is that of seasonal 0 shifted by ``j``, bit for bit.  Running all ``m + 2`` channels, once
    per block of grid points, cost 60 % of this at m = 24 and 85 % at m = 168.
    """
    G, n, _ = channels.shape
    D = np.zeros((G, m + 2, n))  # steps last: each shifted copy is contiguous
    D[:, :3] = channels.transpose(0, 2, 1)
    for j in range(1, min(m, n)):
        D[:, 2 + j, j:] = channels[:, :n - j, 2]
    return D.transpose(0, 2, 1)


def _step(x, lvl, tr, sj, a, b, c, e, tmp) -> None:
    """One step of the recursion from a zero initial state in numpy, in place: the one-step errors
    ``e = x - lvl - tr - sj`` (in that order), then the level, trend and seasonal updates.  The
    numpy twins of :func:`_sq_errors_loop` and :func:`_projector_loop` both take their steps here,
    and those loops do the same operations in this order (the same bits).  ``out=`` throughout:
    in a Dask worker (``MALLOC_TRIM_THRESHOLD_``) each temporary of a batch's size was a fresh
    mmap, page-faulted on first touch."""
    np.subtract(x, lvl, out=e)
    e -= tr
    e -= sj
    lvl += tr
    lvl += np.multiply(a, e, out=tmp)
    tr += np.multiply(b, e, out=tmp)
    sj += np.multiply(c, e, out=tmp)


def _sq_errors_loop(Y, alpha, bstar, gamma, m, acc):  # compiled by numba: see _sq_errors
    S, n = Y.shape
    G = alpha.shape[0]
    lvl, tr, s = np.empty(G), np.empty(G), np.empty((m, G))
    for i in range(S):
        lvl[:] = 0.0
        tr[:] = 0.0
        s[:, :] = 0.0
        out = acc[i]
        out[:] = 0.0
        for t in range(n):
            y = Y[i, t]
            sj = s[t % m]
            for g in range(G):  # the grid points of one series side by side: vectorised
                e = y - lvl[g]
                e -= tr[g]
                e -= sj[g]
                lvl[g] = (lvl[g] + tr[g]) + alpha[g] * e
                tr[g] += bstar[g] * e
                sj[g] += gamma[g] * e
                out[g] += e * e


def _sq_errors(Y, alpha, bstar, gamma, m: int) -> np.ndarray:
    """Sum of the squared one-step errors of each row of ``Y`` (S, n) from a zero initial state,
    at every grid point: (S, G).

    Compiled (:mod:`._jit`), the steps of a series run with its grid points in registers: 40-60
    us a series of 168 steps at 225 grid points, against 300-450 us for the numpy loop below,
    whose ten passes over the (S, G) state a step are memory-bound.  Both do the same operations
    in the same order: the same bits.
    """
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    S, n = Y.shape
    G = len(alpha)
    loop = compiled(_sq_errors_loop)
    if loop is not None:
        acc = np.empty((S, G))
        loop(Y, alpha, bstar, gamma, m, acc)
        return acc
    lvl, tr, s = np.zeros((S, G)), np.zeros((S, G)), np.zeros((m, S, G))
    acc, e, tmp = np.zeros((S, G)), np.empty((S, G)), np.empty((S, G))
    for t in range(n):
        _step(Y[:, t:t + 1], lvl, tr, s[t % m], alpha, bstar, gamma, e, tmp)
        acc += np.multiply(e, e, out=tmp)
    return acc


def _projector_loop(Q, alpha, bstar, gamma, m, out):  # compiled by numba: see _projector
    G, n, k = Q.shape
    lvl, tr, s = np.empty(k), np.empty(k), np.empty((m, k))
    for g in range(G):
        a, b, c = alpha[g], bstar[g], gamma[g]
        lvl[:] = 0.0
        tr[:] = 0.0
        s[:, :] = 0.0
        for t in range(n):
            x = Q[g, n - 1 - t]
            sj = s[t % m]
            e = out[n - 1 - t, g]
            for r in range(k):  # the columns of one grid point side by side: vectorised
                v = x[r] - lvl[r]
                v -= tr[r]
                v -= sj[r]
                e[r] = v
                lvl[r] = (lvl[r] + tr[r]) + a * v
                tr[r] += b * v
                sj[r] += c * v


def _projector(Q: np.ndarray, alpha, bstar, gamma, m: int) -> np.ndarray:
    """The rows ``Q_g' L_g`` for every grid point ``g``, side by side: (n, G k).

    ``L_g`` is the map from a series to its one-step errors from a zero initial state, and ``Q_g``
    (n, k) an orthonormal basis of the errors its initial states can cause (:func:`_impulse`).
    The filter is linear and time-invariant, so ``L_g`` is a lower-triangular Toeplitz matrix;
    such a matrix is persymmetric (``J L J = L'``, with ``J`` reversing the steps), so
    ``L_g' q = J L_g J q``: each column of ``Q_g``, reversed, run through the recursion from a
    zero state, and reversed back.  This depends on no data: it is made once per block of grid
    points and series length (a batch of ragged series makes it once per distinct length: 10 ms
    at 225 grid points and 168 steps in numpy, about 1 ms compiled), and :func:`_grid_sse`
    needs one matrix product with it.
    """
    G, n, k = Q.shape
    out = np.empty((n, G, k))
    loop = compiled(_projector_loop)
    if loop is not None:
        loop(np.ascontiguousarray(Q), alpha, bstar, gamma, m, out)
        return out.reshape(n, G * k)
    lvl, tr, s, tmp = np.zeros((G, k)), np.zeros((G, k)), np.zeros((m, G, k)), np.empty((G, k))
    a, b, c = alpha[:, None], bstar[:, None], gamma[:, None]
    with np.errstate(over="ignore", invalid="ignore"):  # unstable grid points overflow: never winners
        for t in range(n):
            _step(Q[:, n - 1 - t], lvl, tr, s[t % m], a, b, c, out[n - 1 - t], tmp)
    return out.reshape(n, G * k)


def _grid_sse(Y, alpha, bstar, gamma, m: int, P) -> np.ndarray:
    """SSE with optimal initial states of complete rows ``Y`` (S, n) at every grid point: (S, G).

    For each grid point ``g`` the errors are ``e = L_g y - D_g x`` for an initial state ``x``, and
    the least-squares ``x`` leaves ``|L_g y|^2 - |Q_g' L_g y|^2`` (``Q_g`` an orthonormal basis of
    ``D_g``'s columns).  The first term is the recursion's (:func:`_sq_errors`); the second is one
    matrix product of the series with ``P`` = :func:`_projector` for all grid points at once,
    instead of materialising every error (G x S x n floats) and projecting it grid point by grid
    point.
    """
    S = Y.shape[0]
    G = len(alpha)
    proj = (Y @ P).reshape(S, G, -1)
    return _sq_errors(Y, alpha, bstar, gamma, m) - np.einsum("sgk,sgk->sg", proj, proj)


def _channels_loop(Yz, w, alpha, bstar, gamma, m, E, lvl, tr, s):  # compiled by numba: see hw_recursion
    S, n = Yz.shape
    c = E.shape[2]
    for i in range(S):
        a, b, g = alpha[i], bstar[i], gamma[i]
        li, ti = lvl[i], tr[i]
        for t in range(n):
            sj = s[t % m, i]
            wt = w[i, t]
            for k in range(c):  # the channels of one series side by side: vectorised
                e = -((li[k] + ti[k]) + sj[k])
                if k == 0:
                    e += Yz[i, t]
                e *= wt
                E[i, t, k] = e
                li[k] += ti[k] + a * e
                ti[k] += b * e
                sj[k] += g * e


def hw_recursion(Y, alpha, bstar, gamma, m: int):
    """Fit each row of ``Y`` exactly at its own parameters, with least-squares initial states.

    ``Y`` is (S, n) with NaN for missing steps (no update there); ``alpha``,
    ``bstar`` (= alpha * beta) and ``gamma`` are (S,).  Returns
    ``(resid, level, trend, season_ring, sse)`` where ``season_ring[j]`` is the
    seasonal used at a column ``t`` with ``t % m == j``.
    """
    S, n = Y.shape
    k = m + 2
    c = k + 1  # channel 0: the data from a zero state; channels 1..k: unit initial states
    obs = np.isfinite(Y)
    Yz = np.where(obs, Y, 0.0)
    lvl, tr, s = np.zeros((S, c)), np.zeros((S, c)), np.zeros((m, S, c))
    lvl[:, 1] = 1.0
    tr[:, 2] = 1.0
    for j in range(m):
        s[j, :, 3 + j] = 1.0
    E = np.empty((S, n, c))
    loop = compiled(_channels_loop)
    if loop is not None:
        loop(Yz, obs.astype(np.float64), alpha, bstar, gamma, m, E, lvl, tr, s)
    else:
        a, bb, g = alpha[:, None], bstar[:, None], gamma[:, None]
        for t in range(n):
            sj = s[t % m]
            e = -(lvl + tr + sj)
            e[:, 0] += Yz[:, t]
            e *= obs[:, t:t + 1]
            E[:, t] = e
            lvl += tr + a * e
            tr += bb * e
            sj += g * e
    B = _seasonal_basis(m)
    D = E[:, :, 1:] @ B  # (S, n, m + 1)
    DtD = np.matmul(D.transpose(0, 2, 1), D)
    Dte = np.matmul(D.transpose(0, 2, 1), E[:, :, :1])
    ridge = 1e-10 * np.trace(DtD, axis1=1, axis2=2)[:, None, None] * np.eye(m + 1) + 1e-300
    x = -np.linalg.solve(DtD + ridge, Dte)[:, :, 0]  # least-squares initial state
    x0 = np.concatenate([np.ones((S, 1)), x @ B.T], axis=1)  # weights of the channels
    resid = np.matmul(E, x0[:, :, None])[:, :, 0]
    resid[~obs] = np.nan
    level = np.einsum("sc,sc->s", lvl, x0)
    trend = np.einsum("sc,sc->s", tr, x0)
    ring = np.einsum("msc,sc->ms", s, x0)
    sse = np.nansum(resid * resid, axis=1)
    return resid, level, trend, ring, sse


def _refine(sse: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Best grid index per series and a parabola-refined fractional index: (S, 3) each."""
    S = sse.shape[0]
    cube = sse.reshape(S, *shape)
    best = np.array(np.unravel_index(np.argmin(sse, axis=1), shape)).T  # (S, 3)
    frac = best.astype(np.float64)
    rows = np.arange(S)
    for ax in range(3):
        lo, hi = best.copy(), best.copy()
        lo[:, ax] -= 1
        hi[:, ax] += 1
        inner = (lo[:, ax] >= 0) & (hi[:, ax] < shape[ax])
        lo[:, ax] = lo[:, ax].clip(0)
        hi[:, ax] = hi[:, ax].clip(max=shape[ax] - 1)
        f0 = cube[rows, best[:, 0], best[:, 1], best[:, 2]]
        fm = cube[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
        fp = cube[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        curv = fm - 2 * f0 + fp
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(inner & (curv > 0), 0.5 * (fm - fp) / curv, 0.0)
        frac[:, ax] += np.clip(np.nan_to_num(d), -0.5, 0.5)
    return best, frac


def _robust_sigma(resid: np.ndarray, m: int, rel_loc: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per row: 1.4826 x MAD of the residuals after the first season, at least a quarter of
    their RMS, at least the robust sigma of those that are not ties for values on a grid of step
    ``grid`` (counts: see :func:`._util.tie_floor`), and a tiny floor (so a constant series gets
    a finite, very small scale)."""
    r = resid.copy()
    cnt = np.cumsum(np.isfinite(r), axis=1)
    r[(cnt <= m) & (cnt[:, -1:] > 2 * m)] = np.nan  # the first season is fitted by the initial state
    with np.errstate(all="ignore"):
        med = np.nanmedian(r, axis=1)
        mad = _MAD_TO_SIGMA * np.nanmedian(np.abs(r - med[:, None]), axis=1)
        rms = np.sqrt(np.nanmean(r * r, axis=1))
    return np.nanmax(np.column_stack([np.nan_to_num(mad), 0.25 * np.nan_to_num(rms), tie_floor(r, grid),
                                      1e-9 * (1.0 + np.abs(rel_loc))]), axis=1)


def _at(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Grid values at fractional indices (linear between neighbours)."""
    return np.interp(idx, np.arange(len(values)), values)


def _smoothing(ia, ib, ig):
    alpha = _at(_ALPHA, ia)
    return alpha, alpha * _at(_BETA, ib), _at(_GAMMA, ig) * (1 - alpha)


class HoltWinters(Model):
    """Additive Holt-Winters (ETS(A,A,A)), fitted for a whole batch of series at once.

    Parameters
    ----------
    season_length : int, default 24
        Steps per season (24 = a daily cycle on hourly data, 168 = weekly).
    step : int or None, default None
        Seconds between points; None infers it per series (median spacing).
    threshold : float, default 3.5
        Standardised forecast error beyond which a point is anomalous.
    min_seasons : int, default 2
        Whole seasons of data needed to fit; shorter series are skipped.
    max_missing : float, default 0.2
        Largest fraction of missing steps (NaN or absent) a series may have
        within its time range; more and the series is skipped.
    max_length : int or None, default None
        Use only the last ``max_length`` steps of each series (bounds time
        and memory for long histories).
    interval : {"ets", "flat"}, default "ets"
        How the interval grows with the horizon: the ETS(A,A,A) variance
        formula, or not at all.
    debounce : {"none", "first"}, default "none"
        Alert on every anomalous point, or only on the first of an episode.
    quiet : int, default 1
        Quiet points that end an episode (with ``debounce="first"``).

    Data it needs: a time column with (mostly) regular steps and at least
    ``min_seasons * season_length`` non-missing values.  Gaps and NaNs are
    skipped by the recursion (no update); a constant series fits exactly and
    gets a tiny floor scale, so any change from the constant is anomalous.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.arange(96) * 3600
    >>> y = 10 + np.sin(2 * np.pi * np.arange(96) / 24)
    >>> m = HoltWinters(season_length=24).fit(y, t=t)
    >>> bool(m.score(y[:3] + [0, 0, 5], t=t[-1] + 3600 * np.arange(1, 4))["is_anomaly"][2])
    True
    """

    expects_what_it_scores = True
    name = "holt_winters"
    needs_time = True
    ignores_features = True
    params: ClassVar = {
        "season_length": Param(24, int, low=2, doc="steps per season"),
        "step": Param(None, (int, type(None)), low=1, doc="seconds between points"),
        "threshold": Param(3.5, float, low=0.0, doc="standardised error beyond which a point is anomalous"),
        "min_seasons": Param(2, int, low=2, doc="whole seasons needed to fit"),
        "max_missing": Param(0.2, float, low=0.0, high=0.9, doc="largest fraction of missing steps"),
        "max_length": Param(None, (int, type(None)), low=4, doc="use only the last max_length steps"),
        "interval": Param("ets", choices=("ets", "flat"), doc="interval growth with the horizon"),
        **SCORING_PARAMS,
    }
    state_attrs = ("step_", "t_last_", "level_", "trend_", "season_", "alpha_", "beta_", "gamma_",
                   "sigma_", "sse_", "nobs_")

    def required_rows(self) -> int:
        return self.season_length * self.min_seasons

    def validate_params(self) -> None:
        super().validate_params()
        # checked with the others, before a run reads any data (from fit_batch, it failed every group)
        if self.max_length is not None and self.max_length < self.required_rows():
            raise ParameterError(
                f"The 'max_length' parameter of HoltWinters ({self.max_length}) must be at least "
                f"min_seasons x season_length = {self.required_rows()}.")

    @classmethod
    def fit_batch(cls, params: dict, batch: SeriesBatch) -> list:
        proto = cls(**params)
        proto.validate_params()
        m, n = proto.season_length, len(batch)
        if n == 0:
            return []
        steps = infer_steps(batch, proto.step)
        # Series too sparse for any window of them to pass (one stray timestamp years back) stay off
        # the batch's grid: its width is the widest series', for every series of the batch.
        span, finite, last = grid_spans(batch, steps)
        window = span if proto.max_length is None else np.minimum(span, proto.max_length)
        sparse = finite < (1.0 - proto.max_missing) * window
        why: dict[int, str] = {}
        for i in np.flatnonzero(sparse).tolist():
            first = int(batch.times[batch.offsets[i]:batch.offsets[i + 1]].min())
            gone = 1 - finite[i] / window[i]
            why[i] = (f"holt_winters: {gone:.0%}" if gone < 0.995 else f"holt_winters: {gone:.3%}") + (
                f" of the time steps are missing (NaN or absent), more than max_missing={proto.max_missing}: "
                f"its {finite[i]} values span {int(span[i]):,} steps of {int(steps[i])} s, from {_stamp(first)} "
                f"to {_stamp(int(last[i]))}")
        Y, t_last, glen = batch_to_grid(batch, steps, max_len=proto.max_length, skip=sparse)
        Y[np.isinf(Y)] = np.nan  # missing, as NaN: the grid search's arithmetic warned of inf - inf first
        nobs = np.isfinite(Y).sum(axis=1)
        need = proto.required_rows()
        miss = 1.0 - nobs / np.maximum(glen, 1)
        huge = (np.abs(np.where(np.isfinite(Y), Y, 0.0)) > MAX_ABS_VALUE).any(axis=1)  # one pass, not one per series
        for i in range(n):
            if i in why:
                continue
            if huge[i] and (big := too_large(proto.name, Y[i])) is not None:
                why[i] = big
            elif nobs[i] < need:
                # with max_length, say which steps were counted: "got 404" of a group of 8,640 rows
                # named neither the step found nor the window kept
                kept = "" if proto.max_length is None or glen[i] >= span[i] else (
                    f" in the last max_length={proto.max_length} steps of {int(steps[i])} s it keeps (of "
                    f"{int(span[i]):,} steps)")
                why[i] = (f"holt_winters needs at least {need} non-missing values (min_seasons "
                          f"{proto.min_seasons} x season_length {m}); got {int(nobs[i])}{kept}")
            elif miss[i] > proto.max_missing:
                why[i] = (f"holt_winters: {miss[i]:.0%} of the time steps are missing (NaN or absent), "
                          f"more than max_missing={proto.max_missing}")
        good = np.array([i for i in range(n) if i not in why], dtype=np.int64)
        out: list = [SkipGroup(why[i]) if i in why else None for i in range(n)]
        if good.size:
            with one_blas_thread():  # small matrices: threads only wait (see one_blas_thread)
                fitted = cls._fit_rows(proto, Y[good], glen[good], nobs[good])
            for i, model in zip(good, fitted):
                if not isinstance(model, Exception):
                    model.step_, model.t_last_ = int(steps[i]), int(t_last[i])
                out[i] = model
        return out

    @classmethod
    def _fit_rows(cls, proto: "HoltWinters", Y: np.ndarray, glen: np.ndarray, nobs: np.ndarray) -> list:
        m = proto.season_length
        S, width = Y.shape
        first = width - glen
        # Standardise each row (the smoothing parameters are scale-free).
        loc = np.nanmedian(Y, axis=1)
        scale = np.nanstd(Y, axis=1)
        scale = np.where(scale > 0, scale, 1.0)
        Z = (Y - loc[:, None]) / scale[:, None]
        grid = grid_step(Y) / scale  # counts and integer gauges: the step of their values, standardised
        Zf = seasonal_fill(Z, m)
        A, Bg, Gg = np.meshgrid(_ALPHA, _BETA, _GAMMA, indexing="ij")
        ga, gb, gg = A.ravel(), (A * Bg).ravel(), (Gg * (1 - A)).ravel()
        shape = A.shape
        basis = _seasonal_basis(m)
        nmax = int(glen.max())
        sse = np.empty((S, ga.size))
        # Blocks of grid points (the impulse responses and projector) and of series (their
        # projections, and the numpy loop's seasonals) bound memory.
        gstep = int(max(1, min(ga.size, _BLOCK // (nmax * (m + 2)))))
        sstep = int(max(1, min(_CHUNK, _BLOCK // (gstep * (2 * m + 1)))))
        channels = _impulse_channels(ga, gb, gg, m, nmax)  # once: the blocks take their rows
        for g0 in range(0, ga.size, gstep):
            gs = slice(g0, g0 + gstep)
            D = _impulse(channels[gs], m) @ basis
            growth = np.maximum.accumulate(np.abs(D).max(axis=2), axis=1)  # (grid points, steps)
            for L in np.unique(glen):
                rows = np.flatnonzero(glen == L)
                P = _projector(np.linalg.qr(D[:, :L])[0], ga[gs], gb[gs], gg[gs], m)
                unstable = np.flatnonzero(growth[:, L - 1] > _UNSTABLE)
                for c in range(0, rows.size, sstep):
                    r = rows[c:c + sstep]
                    block = _grid_sse(Zf[r, width - L:], ga[gs], gb[gs], gg[gs], m, P)
                    block[:, unstable] = np.inf  # never the winner; the refinement steps away from it
                    sse[r, gs] = block
        best, frac = _refine(sse, shape)
        grid_best = sse[np.arange(S), np.argmin(sse, axis=1)]
        models = []
        fstep = int(max(1, min(_CHUNK, _BLOCK // (nmax * (m + 3)))))
        for c in range(0, S, fstep):
            r = slice(c, c + fstep)
            start = int(first[r].min())  # drop the columns that are padding for every row
            a, bs, g = _smoothing(*frac[r].T)
            resid, level, trend, ring, sse_c = hw_recursion(Z[r, start:], a, bs, g, m)
            # Keep the grid winner where the parabola's proposal did worse.
            back = np.flatnonzero(sse_c > grid_best[r] * (1 + 1e-9))
            if back.size:
                a0, b0, g0 = _smoothing(*best[r][back].T.astype(np.float64))
                alt = hw_recursion(Z[r, start:][back], a0, b0, g0, m)
                better = back[alt[4] < sse_c[back]]
                pick = alt[4] < sse_c[back]
                a[better], bs[better], g[better] = a0[pick], b0[pick], g0[pick]
                for arr, new in zip((resid, level, trend, sse_c), (alt[0], alt[1], alt[2], alt[4])):
                    arr[better] = new[pick]
                ring[:, better] = alt[3][:, pick]
            nxt = (width - start) % m  # ring slot of the first step after the end
            season = ring[(nxt + np.arange(m)) % m].T  # (rows, m): horizons 1..m
            # degrees of freedom: the m + 1 initial states and 3 smoothing parameters were fitted
            nfit = np.isfinite(resid).sum(axis=1)
            dof = np.sqrt(nfit / np.maximum(nfit - (m + 4), 1))
            sigma = dof * _robust_sigma(resid, m, loc[r] / scale[r], grid[r])
            for row in range(season.shape[0]):
                i = c + row
                if not sse_c[row] <= _DIVERGED * max(1, nfit[row]):  # NaN too
                    models.append(ModelError(
                        f"holt_winters diverged: its in-sample squared error is {sse_c[row] / max(1, nfit[row]):.3g} "
                        "times the series' variance per point; try max_length= (fewer, recent steps) or "
                        "another model"))
                    continue
                mdl = cls(**proto.get_params())
                mdl.level_ = float(loc[i] + scale[i] * level[row])
                mdl.trend_ = float(scale[i] * trend[row])
                mdl.season_ = scale[i] * season[row]
                mdl.alpha_, mdl.beta_, mdl.gamma_ = float(a[row]), float(bs[row] / a[row]), float(g[row])
                mdl.sigma_ = float(scale[i] * sigma[row])
                mdl.sse_ = float(scale[i] ** 2 * sse_c[row])
                mdl.nobs_ = int(nobs[i])
                models.append(mdl)
        return models

    # -- scoring ----------------------------------------------------------
    def horizons(self, t: np.ndarray) -> np.ndarray:
        """Steps ahead of the end of training of each time ``t`` (<= 0: inside the training range)."""
        return np.rint((np.asarray(t, dtype=np.int64) - self.t_last_) / self.step_).astype(np.int64)

    def forecast(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected value and standard deviation ``h`` steps after the end of training."""
        h = np.asarray(h, dtype=np.int64)
        m = self.season_length
        expected = self.level_ + h * self.trend_ + self.season_[(h - 1) % m]
        var = np.ones(h.shape)
        if self.interval == "ets" and h.size and h.max() > 1:
            hmax = int(min(h.max(), 10_000_000))
            j = np.arange(1, hmax)
            c = self.alpha_ + self.alpha_ * self.beta_ * j + self.gamma_ * (j % m == 0)
            cum = np.concatenate(([1.0, 1.0], 1.0 + np.cumsum(c * c)))  # v_0, v_1, v_2, ...
            var = np.where(h >= 1, cum[np.clip(h, 0, hmax)], 1.0)
        return expected, self.sigma_ * np.sqrt(var)

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        h = self.horizons(t)
        expected, sd = self.forecast(h)
        # At or before the end of training there is no forecast: the final state run backwards
        # (level + h x trend) is not what the model expected there, and with an adaptive level
        # it flagged most of its own training data.  Not scored, as for ets and sarimax.
        past = h < 1
        expected, sd = np.where(past, np.nan, expected), np.where(past, np.nan, sd)
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
