"""``autoencoder``: a small scikit-learn ``MLPRegressor`` that reconstructs its input.

Two inputs:

* ``input="window"`` (default): sliding windows of ``window`` consecutive steps
  of the series (on its regular time grid, robustly standardised).  Each
  point's reconstruction is the average over the windows that contain it; its
  residual is scored against the training residuals.  Scoring new points uses
  the last ``window - 1`` training values as context, so it works from the
  first new point on.
* ``input="features"``: each row's feature vector plus the target,
  standardised per column; the target's reconstruction is ``expected``.

The network is fitted by scikit-learn (fixed ``random_state``, convergence
warnings recorded in ``notes_``); only ``coefs_`` and ``intercepts_`` are kept,
as arrays, and prediction is re-implemented in numpy.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..exceptions import ModelError
from ._timegrid import series_to_grid
from ._util import (
    MAD_TO_SIGMA,
    center_scale,
    fit_quietly,
    grid_step,
    max_abs,
    scale_floor,
    tie_floor,
)
from .base import SCORING_PARAMS, Model, Param, SkipGroup, robust_score

__all__ = ["Autoencoder", "mlp_forward"]

_ACT = {
    "relu": lambda a: np.maximum(a, 0.0),
    "tanh": np.tanh,
    "logistic": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "identity": lambda a: a,
}
_MAX_STEPS = 1_000_000
_Z99 = 2.5758  # |z| of a Gaussian exceeded 1 % of the time
#: Reconstructions of new points with those far outside their band replaced (see _score_window).
_REPLACED_PASSES = 3


def mlp_forward(X: np.ndarray, coefs: list, intercepts: list, activation: str) -> np.ndarray:
    """``MLPRegressor.predict`` in numpy: hidden layers with ``activation``, identity output."""
    a = np.asarray(X, dtype=np.float64)
    for i, (W, b) in enumerate(zip(coefs, intercepts)):
        a = a @ W + b
        if i < len(coefs) - 1:
            a = _ACT[activation](a)
    return a


def _windows(z: np.ndarray, w: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(z, w)


def _fill(z: np.ndarray) -> np.ndarray:
    """Linear interpolation of NaNs (nearest value at the ends)."""
    ok = np.isfinite(z)
    if ok.all() or not ok.any():
        return z
    idx = np.arange(z.size)
    out = z.copy()
    out[~ok] = np.interp(idx[~ok], idx[ok], z[ok])
    return out


def _cover_grid(w: int) -> np.ndarray:
    """The window counts under ``w`` whose band training measures: 1, 2, 3, 4, 6, 8, 12, 16, ...
    (a count between two of them takes the smaller one's band, the wider)."""
    ks = {1, 2, 3}
    k = 4
    while k < w:
        ks.update((k, k * 3 // 2))
        k *= 2
    return np.array(sorted(k for k in ks if k < w), dtype=np.int64)


def _coverage(use: np.ndarray, n: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point of ``n``: how many of the windows that ``use`` marks cover it, and the first
    and last position it has in them (window ``i`` holds point ``i + j`` at position ``j``)."""
    nw = use.size
    count = np.zeros(n, dtype=np.int64)
    first, last = np.full(n, w, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    for j in range(w):
        count[j:j + nw] += use
        first[j:j + nw] = np.where(use, np.minimum(first[j:j + nw], j), first[j:j + nw])
        last[j:j + nw] = np.where(use, j, last[j:j + nw])
    return count, first, last


def _average_reconstruction(R: np.ndarray, n: int, use: np.ndarray | None = None) -> np.ndarray:
    """Mean over the windows covering each of ``n`` points (window ``i`` covers ``i..i+w-1``);
    with ``use``, over the windows where it is set only (NaN for a point none of them covers)."""
    nw, w = R.shape
    wt = np.ones(nw) if use is None else use.astype(np.float64)
    acc = np.zeros(n)
    cnt = np.zeros(n)
    for j in range(w):
        acc[j:j + nw] += np.where(wt > 0, R[:, j], 0.0)
        cnt[j:j + nw] += wt
    if use is None:
        return acc / np.maximum(cnt, 1)
    return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)


class Autoencoder(Model):
    """A small MLP autoencoder on sliding windows of the series (or on feature vectors).

    Parameters
    ----------
    input : {"window", "features"}, default "window"
    window : int, default 24
        Steps per window (``input="window"``).
    hidden : int, default 6
        Units of the single hidden (bottleneck) layer.
    activation : {"tanh", "relu", "logistic"}, default "tanh"
    l2 : float, default 1e-3
        L2 penalty (scikit-learn's ``alpha``).
    max_iter : int, default 300
    step : int or None, default None
        Seconds between points (``input="window"``); None infers it.
    threshold : float, default 3.5
        Robust z-score of a reconstruction residual beyond which a point is anomalous.
    max_missing : float, default 0.2
        Largest fraction of missing steps (filled by interpolation); more are skipped.
    min_values : int, default 48
        Fewest non-missing values to fit (and at least ``2 * window``).
    random_state : int, default 0
    debounce, quiet
        See :func:`modelfactory.models.base.debounce`.

    A constant series is standardised to zeros, fits exactly and gets a tiny
    floor scale, so any change from the constant is anomalous.  With
    ``input="window"``, points at or before the end of training are not scored
    (``expected`` NaN, score 0).
    """

    expects_what_it_scores = True
    name = "autoencoder"
    params: ClassVar = {
        "input": Param("window", choices=("window", "features"), doc="what to reconstruct"),
        "window": Param(24, int, low=2, high=10_000, doc="steps per window"),
        "hidden": Param(6, int, low=1, high=1_000, doc="bottleneck units"),
        "activation": Param("tanh", choices=("tanh", "relu", "logistic"), doc="hidden activation"),
        "l2": Param(1e-3, float, low=0.0, doc="L2 penalty"),
        "max_iter": Param(300, int, low=1, doc="training iterations"),
        "step": Param(None, (int, type(None)), low=1, doc="seconds between points"),
        "threshold": Param(3.5, float, low=0.0, doc="robust z of the residual"),
        "max_missing": Param(0.2, float, low=0.0, high=0.9, doc="largest fraction of missing steps"),
        "min_values": Param(48, int, low=4, doc="fewest values to fit"),
        "random_state": Param(0, int, low=0, doc="seed"),
        **SCORING_PARAMS,
    }
    state_attrs: ClassVar = ("loc_", "scale_", "coef0_", "coef1_", "bias0_", "bias1_", "center_",
                             "rscale_", "cover_k_", "cover_scale_", "tail_", "step_", "t_last_", "notes_")

    # Which data it needs depends on ``input``: checked per instance (see _check_data).
    needs_time = False
    needs_features = False

    def data_needs(self) -> tuple[bool, bool]:
        return self.input == "window", self.input == "features"

    def uses_features(self) -> bool:
        return self.input == "features"

    def _check_data(self, y, t, X) -> None:
        if self.input == "window" and t is None:
            raise ModelError("autoencoder with input='window' needs a time column: pass time=.")
        if self.input == "features" and (X is None or X.shape[1] == 0):
            raise ModelError("autoencoder with input='features' needs feature columns: pass features=[...].")
        super()._check_data(y, t, X)

    def required_rows(self) -> int:
        return max(self.min_values, 2 * self.window if self.input == "window" else 0)

    def _network(self, A: np.ndarray):
        from sklearn.neural_network import MLPRegressor

        est = MLPRegressor(hidden_layer_sizes=(self.hidden,), activation=self.activation, alpha=self.l2,
                           max_iter=self.max_iter, random_state=self.random_state, tol=1e-5)
        est, self.notes_ = fit_quietly(lambda: est.fit(A, A))
        self.coef0_, self.coef1_ = (np.asarray(c, dtype=np.float64) for c in est.coefs_)
        self.bias0_, self.bias1_ = (np.asarray(b, dtype=np.float64) for b in est.intercepts_)

    def reconstruct(self, A: np.ndarray) -> np.ndarray:
        """The network's output for standardised inputs ``A`` (``MLPRegressor.predict`` in numpy)."""
        return mlp_forward(A, [self.coef0_, self.coef1_], [self.bias0_, self.bias1_], self.activation)

    def _fit(self, y, t, X) -> None:
        if self.input == "window":
            self._fit_window(y, t)
        else:
            self._fit_features(y, X)

    # -- windows ----------------------------------------------------------
    def _fit_window(self, y, t) -> None:
        vals, t0, self.step_ = series_to_grid(y, t, self.step, max_missing=self.max_missing, name=self.name)
        vals = np.where(np.isfinite(vals), vals, np.nan)  # +-inf is missing too
        missing = float(np.mean(~np.isfinite(vals)))
        if missing > self.max_missing:
            raise SkipGroup(f"autoencoder: {missing:.0%} of the time steps are missing (NaN or absent), "
                            f"more than max_missing={self.max_missing}")
        self.t_last_ = int(t0 + (vals.size - 1) * self.step_)
        med = float(np.nanmedian(vals))
        sig = MAD_TO_SIGMA * float(np.nanmedian(np.abs(vals - med)))
        sd = float(np.nanstd(vals))
        # counts and integer gauges: their MAD collapses on tied values (see tie_floor)
        grid = grid_step(vals)
        self.loc_, self.scale_ = med, max(sig, 0.25 * sd, tie_floor(vals, grid), scale_floor(max_abs(vals)))
        z = _fill((vals - self.loc_) / self.scale_)
        self._network(_windows(z, self.window))
        if sig == 0 and sd == 0:  # a constant series: reconstruct it exactly
            self.coef1_[:] = 0.0
            self.bias1_[:] = 0.0
        W = _windows(z, self.window)
        R = self.reconstruct(W)
        recon = _average_reconstruction(R, z.size)
        r = np.where(np.isfinite(vals), z - recon, np.nan)
        self.center_, self.rscale_ = center_scale(r, floor=1e-6, step=grid / self.scale_)
        # (R is not needed after: the residuals go in its place, for the memory of long windows)
        self.cover_k_, self.cover_scale_ = self._cover_scales(np.subtract(W, R, out=R), np.isfinite(vals),
                                                              grid / self.scale_)
        self.tail_ = z[z.size - (self.window - 1):].copy()

    def _cover_scales(self, E: np.ndarray, real: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
        """The residual scale of a point reconstructed from fewer windows than ``window``.

        Scored after a gap, or at the end of what is scored, a point is covered by fewer windows
        of real values than in training, and the network reconstructs each position of a window
        with an error of its own: a day of 24 hourly points scored a week after training, each from
        the one window they make, missed by up to several training scales, and 13-15 of the 24
        clean points were flagged.  From the training windows' residuals ``E`` (window by
        position), measured for each count ``k`` of :func:`_cover_grid`: the scale of the mean
        residual over ``k`` consecutive positions, at the start of the windows (a point just
        after a gap), between start and end (up to eight places, pooled), and at their end (the
        last points scored).  Rows: start, middle, end; never narrower than ``rscale_``, nor for
        fewer windows than for more."""
        nw, w = E.shape
        n = nw + w - 1
        P = np.zeros((n, w + 1))  # P[p, j + 1]: point p's residual in the window holding it at position j
        for j in range(w):
            P[j:j + nw, j + 1] = E[:, j]
        C = np.cumsum(P, axis=1, out=P)
        ks = _cover_grid(w)
        scales = np.full((3, ks.size), self.rscale_)
        for c, k in enumerate(ks.tolist()):
            inner = np.unique(np.linspace(1, w - k - 1, 8).round().astype(np.int64)) if w - k > 1 else [0]
            for row, starts in enumerate(([0], inner, [w - k])):
                r = []
                for a in starts:
                    p = np.arange(a + k - 1, nw + a)  # the points that windows at positions a..a+k-1 all cover
                    p = p[real[p]]
                    r.append((C[p, a + k] - C[p, a]) / k)
                r = np.concatenate(r)
                if r.size:
                    scales[row, c] = center_scale(r, floor=1e-6, step=step)[1]
        scales = np.maximum(scales, self.rscale_)
        return ks, np.maximum.accumulate(scales[:, ::-1], axis=1)[:, ::-1]

    def set_state(self, state):
        # models stored before the band widened for points covered by few windows: it did not
        return super().set_state({"cover_k_": np.zeros(0, dtype=np.int64), "cover_scale_": np.zeros((3, 0)), **state})

    def _point_scales(self, count: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """``rscale_`` for each point, widened for one covered by fewer windows than ``window``
        (see :meth:`_cover_scales`)."""
        out = np.full(count.shape, self.rscale_)
        few = (count > 0) & (count < self.window)
        if not np.size(self.cover_scale_) or not few.any():
            return out
        col = np.searchsorted(self.cover_k_, count[few], side="right") - 1
        row = np.where(first[few] == 0, 0, np.where(last[few] == self.window - 1, 2, 1))
        out[few] = np.asarray(self.cover_scale_)[row, col]
        return out

    def _score_window(self, y, t):
        h = np.rint((t - self.t_last_) / self.step_).astype(np.int64)
        expected, rscale = np.full(y.shape, np.nan), np.full(y.shape, self.rscale_)
        ok = (h >= 1) & (h <= _MAX_STEPS)
        if ok.any():
            H = int(h[ok].max())
            z = np.full(H, np.nan)
            z[h[ok] - 1] = (y[ok] - self.loc_) / self.scale_
            known = np.isfinite(z)
            ctx = _fill(np.concatenate([self.tail_, z]))
            if not known.any():  # no new finite value: forecast-free, reconstruct the context
                ctx = np.concatenate([self.tail_, np.full(H, self.tail_[-1])])
            R = self.reconstruct(_windows(ctx, self.window))
            # Windows that hold interpolated steps (a gap between training and these points, or
            # within them) are not the series: a day scored a week after training was reconstructed
            # from a straight line across that week, and its first hours were flagged (36 of 336
            # clean points over two weeks of daily scoring; six hours at a time, 211 of 336). A
            # point is reconstructed from the windows of real values that cover it, else from those
            # no more interpolated than training allowed (max_missing); a point no such window
            # covers is not scored (expected NaN).
            real = np.concatenate([np.ones(len(self.tail_), dtype=bool), known])
            share = 1.0 - _windows(real, self.window).mean(axis=1)
            recon, rs = self._covering(R, ctx.size, share), self._covered_scales(ctx.size, share)
            # A point far outside its band drags the reconstruction of every window that holds it:
            # one dip of 40 sigmas flagged 6-11 clean neighbours.  Such points are replaced by their
            # reconstruction and the windows reconstructed again (a few times: the first
            # reconstruction of a dip is itself pulled down by it), so the others are expected from
            # a context without them, and they from one without themselves.
            n0, given = len(self.tail_), ctx
            far = np.zeros(ctx.size, dtype=bool)
            for _ in range(_REPLACED_PASSES):
                far[n0:] |= known & (np.abs(given[n0:] - recon[n0:] - self.center_) > self.threshold * rs[n0:])
                if not far.any():
                    break
                ctx = np.where(far, recon + self.center_, given)
                recon = self._covering(self.reconstruct(_windows(ctx, self.window)), ctx.size, share)
            expected[ok] = self.loc_ + self.scale_ * (recon[n0:][h[ok] - 1] + self.center_)
            rscale[ok] = rs[n0:][h[ok] - 1]
        return expected, rscale

    def _covering(self, R: np.ndarray, n: int, share: np.ndarray) -> np.ndarray:
        """Each point's reconstruction from the windows of real values that cover it, else from
        those no more interpolated than training allowed (``share``: each window's interpolated
        share); NaN for a point neither covers."""
        recon = _average_reconstruction(R, n, use=share == 0)
        if not np.isfinite(recon).all():  # some point is covered by no window of real values only
            loose = _average_reconstruction(R, n, use=share <= self.max_missing)
            recon = np.where(np.isfinite(recon), recon, loose)
        return recon

    def _covered_scales(self, n: int, share: np.ndarray) -> np.ndarray:
        """Each point's residual scale, for the windows :meth:`_covering` reconstructs it from
        (those windows depend on ``share`` alone: once per score, not per reconstruction)."""
        w = self.window
        cover = _coverage(share == 0, n, w)
        real = cover[0] > 0
        if not real.all():  # as _covering: the looser windows where no window of real values covers
            cover = tuple(np.where(real, a, b) for a, b in zip(cover, _coverage(share <= self.max_missing, n, w)))
        return self._point_scales(*cover)

    # -- features ---------------------------------------------------------
    def _fit_features(self, y, X) -> None:
        ok = np.isfinite(y)
        A = np.column_stack([X[ok], y[ok]])
        if not np.isfinite(A).any(axis=0).all():  # (before nanmedian, which warns of an all-NaN slice)
            raise SkipGroup("autoencoder: a feature column has no finite value in this group")
        A = np.where(np.isfinite(A), A, np.nanmedian(np.where(np.isfinite(A), A, np.nan), axis=0))
        self.loc_ = np.median(A, axis=0)
        dev = MAD_TO_SIGMA * np.median(np.abs(A - self.loc_), axis=0)
        self.scale_ = np.maximum(np.maximum(dev, 0.25 * A.std(axis=0)), scale_floor(np.abs(A).max(axis=0)))
        grid = grid_step(A[:, -1])  # a target of counts: as for windows (the features' scales only standardise)
        self.scale_[-1] = max(self.scale_[-1], tie_floor(A[:, -1], grid))
        Z = (A - self.loc_) / self.scale_
        self._network(Z)
        r = Z[:, -1] - self.reconstruct(Z)[:, -1]
        self.center_, self.rscale_ = center_scale(r, floor=1e-6, step=grid / self.scale_[-1])
        # The target is one of the network's inputs and it partly copies it through: its residuals
        # are a bent function of the deviation, with tails far heavier than a Gaussian's, and a scale
        # from their MAD flagged 3-4 % of clean rows, in-sample and new alike.  The scale is at least
        # what puts their 99th percentile at its Gaussian z.
        tail = float(np.quantile(np.abs(r - self.center_), 0.99)) / _Z99
        self.rscale_ = max(self.rscale_, tail)
        self.tail_, self.step_, self.t_last_ = np.zeros(0), 0, 0
        self.cover_k_, self.cover_scale_ = np.zeros(0, dtype=np.int64), np.zeros((3, 0))

    def _score_features(self, y, X):
        if X.shape[1] != len(self.loc_) - 1:
            raise ModelError(f"autoencoder was fitted on {len(self.loc_) - 1} feature columns; got {X.shape[1]}.")
        A = np.column_stack([X, np.where(np.isfinite(y), y, self.loc_[-1])])
        A = np.where(np.isfinite(A), A, self.loc_)
        rec = self.reconstruct((A - self.loc_) / self.scale_)[:, -1]
        return self.loc_[-1] + self.scale_[-1] * (rec + self.center_)

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        if self.input == "window":
            expected, rscale = self._score_window(y, t)
        else:
            expected, rscale = self._score_features(y, X), self.rscale_
        unit = rscale * (self.scale_ if np.ndim(self.scale_) == 0 else self.scale_[-1])
        z = (y - expected) / unit
        finite = np.isfinite(z)
        zz = np.where(finite, z, 0.0)
        return {
            "expected": expected,
            "lower": expected - self.threshold * unit,
            "upper": expected + self.threshold * unit,
            "score": robust_score(zz),
            "is_anomaly": finite & (np.abs(zz) > self.threshold),
        }
