"""Putting series on a regular time grid (private helpers shared by the time-series models).

A series arrives as values with int64 epoch-second times, possibly with gaps
(missing timestamps), NaNs and duplicates.  The models that need regular steps
place it on the grid ``t_last - k * step``: the step is the given one or the
median spacing of the series; a missing step becomes NaN; of two values on
the same grid point the later row wins.
"""
from __future__ import annotations

import numpy as np

from .base import SeriesBatch

__all__ = ["infer_steps", "refine_step", "batch_to_grid", "grid_spans", "series_to_grid", "seasonal_fill"]


def infer_steps(batch: SeriesBatch, step: int | None) -> np.ndarray:
    """The time step of every series of ``batch`` in seconds (>= 1).

    ``step`` if given, else the (lower) median positive spacing of each series' times
    (1 when there are no times or fewer than two distinct ones), refined by
    :func:`refine_step`.
    """
    n = len(batch)
    if step is not None:
        return np.full(n, int(step), dtype=np.int64)
    if batch.times is None:
        return np.ones(n, dtype=np.int64)
    out = np.ones(n, dtype=np.int64)
    t = batch.times
    for i in range(n):
        s, e = int(batch.offsets[i]), int(batch.offsets[i + 1])
        d = np.diff(t[s:e])
        d = d[d > 0]
        if d.size:  # the lower median: robust to a few gaps, never between two spacings
            med = max(1, int(np.partition(d, (d.size - 1) // 2)[(d.size - 1) // 2]))
            out[i] = refine_step(t[s:e], med)
    return out


def refine_step(t: np.ndarray, median: int) -> int:
    """The step of a series whose times ``t`` (sorted) jitter about a regular grid: the slope of
    the times against their grid index (each spacing rounded to whole ``median`` steps), to the
    second.

    The median spacing of jittered times is off by its sampling error: hourly times jittered by up
    to 5 minutes gave 3,583 s, the grid drifted three steps over four weeks, and holt_winters'
    band came out 250 times too wide (never alerting, yet ``ok``).  Times most of whose spacings
    are exactly the median keep it.

    >>> t = np.arange(672) * 3600 + np.tile([0, 290, -280, 10], 168)
    >>> refine_step(t, 3583)
    3600
    """
    t = np.asarray(t, dtype=np.int64)
    d = np.diff(t)
    if t.size < 2 or 2 * np.count_nonzero(d == median) >= np.count_nonzero(d > 0):
        # most spacings are exactly the median: a regular series with a few odd steps (daily
        # times at local midnight move by an hour at a clock change), whose step that is
        return int(median)
    k = np.concatenate(([0.0], np.cumsum(np.rint(d / median))))
    if k[-1] < 1:
        return int(median)
    x = (t - t[0]).astype(np.float64)
    kc = k - k.mean()
    return max(1, round(float(kc @ (x - x.mean())) / float(kc @ kc)))


def batch_to_grid(batch: SeriesBatch, steps: np.ndarray, *, max_len: int | None = None,
                  skip: np.ndarray | None = None):
    """Place every series of ``batch`` on its own regular grid, right-aligned.

    Returns ``(Y, t_last, length)``: ``Y`` has shape ``(n_series, width)``;
    series ``i`` fills its last ``length[i]`` columns (its grid from its first
    to its last timed point), NaN where a step is missing, and NaN padding on
    the left.  ``t_last[i]`` is the time of its last point.  Series longer than
    ``max_len`` grid points keep only their last ``max_len`` points.  Series where ``skip``
    (a boolean mask) is set get length 0 and an empty row, and never widen the grid.
    Without times, row order is the grid.
    """
    n = len(batch)
    sid, v, pos_from_end, t_last, glen = _positions(batch, steps)
    if skip is not None:
        glen = np.where(skip, 0, glen)
    if max_len is not None:
        glen = np.minimum(glen, max_len)
    width = int(glen.max()) if n and len(v) else 0
    Y = np.full((n, width), np.nan)
    keep = (pos_from_end >= 0) & (pos_from_end < glen[sid])
    Y[sid[keep], width - 1 - pos_from_end[keep]] = v[keep]
    return Y, t_last.astype(np.int64), glen


def grid_spans(batch: SeriesBatch, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per series, without building the grid: the grid points from its first to its last timed
    point, its finite values, and the time of its last point.  One stray timestamp years
    away makes a series span millions of points: check before :func:`batch_to_grid` puts a
    whole batch on a grid that wide."""
    sid, v, _, t_last, glen = _positions(batch, steps)
    finite = np.bincount(sid[np.isfinite(v)], minlength=len(batch)).astype(np.int64)
    return glen, finite, t_last


def _positions(batch: SeriesBatch, steps: np.ndarray):
    """``(series of each row, values, grid position counted back from the series' last point,
    each series' last time, each series' grid length)``."""
    n = len(batch)
    lengths = np.diff(batch.offsets).astype(np.int64)
    sid = np.repeat(np.arange(n), lengths)
    v = np.asarray(batch.values, dtype=np.float64)
    if batch.times is None:
        pos_from_end = (batch.offsets[1:][sid] - 1 - np.arange(len(v))).astype(np.int64)
        t_last = (lengths - 1).astype(np.int64)
    else:
        t = batch.times.astype(np.int64)
        t_last = np.zeros(n, dtype=np.int64)
        nonempty = lengths > 0
        if nonempty.any():  # the latest time of each series (rows need not be sorted)
            t_last[nonempty] = np.maximum.reduceat(t, batch.offsets[:-1][nonempty])
        pos_from_end = np.rint((t_last[sid] - t) / steps[sid]).astype(np.int64)
    glen = np.zeros(n, dtype=np.int64)
    if len(v):
        np.maximum.at(glen, sid, pos_from_end + 1)
    return sid, v, pos_from_end, t_last, glen


def series_to_grid(y: np.ndarray, t: np.ndarray | None, step: int | None, *, max_len: int | None = None,
                   max_missing: float | None = None, name: str = "model"):
    """One series on its regular grid: ``(values, t_first, step)`` (NaN where missing).

    Only its last ``max_len`` grid points are kept.  With ``max_missing``, a series whose finite
    values cannot fill that share of its grid is skipped (:class:`SkipGroup`) before the grid is
    built: one stray timestamp years away (a row stamped 1970-01-01) made a grid of millions of
    points, 1.3 GiB for 10-second data, to find out it was too sparse.
    """
    from .base import SkipGroup

    b = SeriesBatch(np.asarray(y, dtype=np.float64), np.array([0, len(y)]),
                    None if t is None else np.asarray(t, dtype=np.int64))
    steps = infer_steps(b, step)
    if max_missing is not None and b.times is not None and len(y):
        span, finite, last = grid_spans(b, steps)
        window = int(span[0]) if max_len is None else min(int(span[0]), max_len)
        if finite[0] < (1.0 - max_missing) * window:
            gone = 1 - finite[0] / window
            first = int(b.times.min())
            raise SkipGroup(
                (f"{name}: {gone:.0%}" if gone < 0.995 else f"{name}: {gone:.3%}")
                + f" of the time steps are missing (NaN or absent), more than max_missing={max_missing}: "
                f"its {int(finite[0])} values span {int(span[0]):,} steps of {int(steps[0])} s, from "
                f"{np.datetime64(first, 's')} to {np.datetime64(int(last[0]), 's')}")
    Y, t_last, glen = batch_to_grid(b, steps, max_len=max_len)
    L = int(glen[0])
    vals = Y[0, Y.shape[1] - L:]
    return vals, int(t_last[0]) - (L - 1) * int(steps[0]), int(steps[0])


def seasonal_fill(Y: np.ndarray, m: int) -> np.ndarray:
    """Fill interior NaNs of each row from the same season slot nearby, then linearly.

    Leading NaNs (before a row's first value) stay NaN.  Used where a model's
    maths needs complete rows (a grid search); the exact fit handles gaps.
    """
    Y = Y.copy()
    first = np.argmax(np.isfinite(Y), axis=1)
    lead = np.arange(Y.shape[1])[None, :] < first[:, None]
    hole = np.isnan(Y) & ~lead
    if not hole.any():
        return Y
    if m > 1 and Y.shape[1] > m:
        for _ in range(3):  # look up to three seasons back and forth
            prev = np.full_like(Y, np.nan)
            prev[:, m:] = Y[:, :-m]
            nxt = np.full_like(Y, np.nan)
            nxt[:, :-m] = Y[:, m:]
            cand = np.where(np.isnan(prev), nxt, np.where(np.isnan(nxt), prev, 0.5 * (prev + nxt)))
            fill = np.isnan(Y) & ~lead & np.isfinite(cand)
            Y[fill] = cand[fill]
            if not (np.isnan(Y) & ~lead).any():
                return Y
    idx = np.arange(Y.shape[1])
    for i in np.flatnonzero((np.isnan(Y) & ~lead).any(axis=1)):
        ok = np.isfinite(Y[i])
        if ok.sum() == 0:
            continue
        gaps = np.isnan(Y[i]) & ~lead[i]
        Y[i, gaps] = np.interp(idx[gaps], idx[ok], Y[i, ok])
    return Y
