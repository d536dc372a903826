"""Small helpers shared by the built-in models (private)."""
from __future__ import annotations

import warnings

import numpy as np

from .._threads import thread_pools

__all__ = ["fit_quietly", "center_scale", "scale_floor", "max_abs", "grid_step", "tie_floor", "one_blas_thread",
           "MAD_TO_SIGMA"]

MAD_TO_SIGMA = 1.4826


def one_blas_thread():
    """A context that runs BLAS and LAPACK on one thread (restoring the pools' counts after).

    For the many small matrices of a batch fit (a QR of ``n x (m + 1)`` per grid point), a
    threaded BLAS only waits for its threads: 225 QRs of 672 x 25 took 3.1 s with OpenBLAS's
    default threads on a busy two-core machine and 0.1 s on one.  A run's workers already run one
    thread per unit (``kernel.one_thread``); this gives ``Model.fit`` in the caller's process the
    same speed and the same arithmetic (the kernel's controller: :func:`.._threads.thread_pools`).
    """
    return thread_pools().limit(limits=1, user_api="blas")


#: Warnings that speak of the libraries' versions, not of the data: never a model's note.
_LIBRARY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def fit_quietly(fit):
    """Run ``fit()`` recording its warnings as short notes instead of raising or printing them.

    Returns ``(result, notes)``; ``notes`` holds at most five distinct
    ``"Category: first line of the message"`` strings.  Warnings about the libraries rather
    than the fit (a deprecation: scipy's about the ``iprint`` that statsmodels 0.14 passes to
    L-BFGS-B) are left out: they say nothing of the series, and were stored in every model
    (150 bytes of each ets model).

    >>> def fit():
    ...     warnings.warn("a solver option is deprecated", DeprecationWarning)
    ...     warnings.warn("did not converge", RuntimeWarning)
    ...     return 1
    >>> fit_quietly(fit)
    (1, ['RuntimeWarning: did not converge'])
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit()
    notes: list[str] = []
    for w in caught:
        if issubclass(w.category, _LIBRARY_WARNINGS):
            continue
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
        if text not in notes:
            notes.append(text)
    return res, notes[:5]


def scale_floor(magnitude):
    """The smallest scale a model may use for values of this ``magnitude`` (their largest absolute
    value): ``1e-9`` of it, so a constant series gets a tiny scale (any change is anomalous), and
    ``1e-9`` for an all-zero one.  Relative, not absolute: an absolute floor of 1e-9 was wider than
    the whole spread of a series of values around 1e-8 (a latency in seconds of tens of
    nanoseconds) and made it unable to alert.

    >>> scale_floor(0.0), scale_floor(2.0), scale_floor(np.array([4e-9, 0.0])).tolist()
    (1e-09, 2e-09, [4e-18, 1e-09])
    """
    m = np.abs(np.asarray(magnitude, dtype=np.float64))
    out = np.where((m > 0) & np.isfinite(m), 1e-9 * m, 1e-9)
    return float(out) if out.ndim == 0 else out


def max_abs(values) -> float:
    """The largest absolute finite value (0 when there is none): the magnitude for :func:`scale_floor`."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _row_grid(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grid_step` of each row of ``V`` (NaN where missing), and its count of distinct values."""
    S = np.sort(V, axis=1)  # NaN last
    n = (~np.isnan(S)).sum(axis=1)
    lo = S[:, 0]
    hi = np.take_along_axis(S, np.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.diff(S, axis=1)
        gap = np.where(gap > 1e-9 * np.fmax(np.abs(lo), np.abs(hi))[:, None], gap, np.inf)  # NaN: inf
        distinct = 1 + np.isfinite(gap).sum(axis=1)
        q = gap.min(axis=1, initial=np.inf)  # the smallest gap between two of the values
        q = _common_step(S - lo[:, None], q)
    return np.where(np.isfinite(q), q, 0.0), distinct


#: How many times finer than the smallest gap the step may be (Euclid's halvings, at most 6).
_FINER = 64


def _common_step(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The step of which every offset ``d`` (values less the row's smallest, NaN missing) is a whole
    number (to 1e-6 of a step), found from the smallest gap ``q`` by Euclid's algorithm; 0 where
    there is none at least ``q / 64``.

    The smallest gap is a multiple of the step where values skip grid points (a count only ever 0,
    2 or 5: gaps 2 and 3, step 1).  Each round replaces the candidate by the smallest distance of
    an offset from its multiples (a whole combination of the values, so still a multiple of the
    step, and at most half the candidate) until every offset is a multiple: the greatest common
    divisor.  Measurements fall below ``q / 64`` within a few rounds.
    """
    q, floor = q.copy(), q / _FINER
    todo = np.isfinite(q)
    while todo.any():
        rows = np.flatnonzero(todo)
        qr = q[rows, None]
        off = np.abs(d[rows] - np.rint(d[rows] / qr) * qr)  # distance to the nearest multiple (NaN: missing)
        bad = off > 1e-6 * qr
        done = ~bad.any(axis=1)
        todo[rows[done]] = False
        rows, off, bad = rows[~done], off[~done], bad[~done]
        if not rows.size:
            break
        q[rows] = np.where(bad, off, np.inf).min(axis=1)
        fail = q[rows] < floor[rows]
        q[rows[fail]] = 0.0
        todo[rows[fail]] = False
    return q


def grid_step(values) -> np.ndarray | float:
    """The step ``q`` of the grid the finite values lie on (per row of a 2-d array), 0 for none.

    Counts (errors per hour) and integer gauges (replicas) lie on a grid of step 1, halves on one
    of 0.5; measurements lie on none.  The candidate is the smallest gap between two distinct
    values; it is the step if every value is a whole number of it from the smallest (to 1e-6 of
    a step).  Where that gap is a multiple of the step (values 0, 2 and 5 only: gaps 2 and 3), the
    step is their greatest common divisor (:func:`_common_step`); before, the answer was 0 and such
    series kept the scale that collapses on ties.  A step finer than a 64th of the smallest gap is
    none (measurements).  The last 16 values of each row are looked at first, so rows of
    measurements (most) cost a tenth of a full check.

    >>> grid_step(np.array([0.0, 0, 1, 0, 3, np.nan, 0])), grid_step(np.array([3.0, 3, 3.5, 3]))
    (1.0, 0.5)
    >>> grid_step(np.array([0.0, 2, 0, 5, 0, 2]))  # gaps 2 and 3: a step of 1
    1.0
    >>> grid_step(np.array([[0.1234, 0.7391, 0.2057], [2.0, 2.0, 2.0]])).tolist()  # measurements; a constant
    [0.0, 0.0]
    >>> round(grid_step(np.array([0.1, 0.73, 0.2])), 12)  # two decimals and no two of them 0.01 apart
    0.01
    """
    V = np.asarray(values, dtype=np.float64)
    one = V.ndim == 1
    V = V.reshape(1, -1) if one else V
    out = np.zeros(V.shape[0])
    if V.shape[1] == 0:
        return float(out[0]) if one else out
    # A row on a grid is on one in any window too, though the window's smallest gap may be a
    # multiple of its step (0, 2, 5): a window of few distinct values is passed on as well;
    # measurements have as many distinct values as the window has values.
    q, distinct = _row_grid(np.where(np.isfinite(V[:, -16:]), V[:, -16:], np.nan))  # +-inf is missing too
    keep = (distinct <= 8) | (q > 0)
    rows = np.flatnonzero(keep)
    if rows.size:
        out[rows] = _row_grid(np.where(np.isfinite(V[rows]), V[rows], np.nan))[0]
    return float(out[0]) if one else out


def _row_median(A: np.ndarray) -> np.ndarray:
    """The median of the non-NaN values of each row (NaN for none): a sort, for many short rows
    several times faster than ``np.nanmedian``."""
    S = np.sort(A, axis=1)  # NaN last
    n = (~np.isnan(A)).sum(axis=1)
    lo = np.take_along_axis(S, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(S, np.minimum(n // 2, A.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def tie_floor(resid, step) -> np.ndarray | float:
    """Per row: the robust sigma of the residuals that are not ties, 0 where ``step`` is 0.

    Residuals of values on a grid of step ``q`` (:func:`grid_step`) are mostly tied when the values
    mostly sit on one point of it (a count that is mostly 0, a gauge mostly at 3): their MAD
    collapses, and every value off that point was flagged.  This is 1.4826 x the median absolute
    deviation from the row's median of the residuals at least ``q / 2`` from it, as ``seasonal``
    takes its floor from its non-zero residuals: about ``1.5 q`` for sparse counts.  Measurements
    (``q = 0``) get 0, so a scale floored by it does not change.

    >>> r = np.r_[np.full(90, -0.3), np.full(10, 0.7)]  # 90 % zeros, 10 % ones, predicted 0.3
    >>> round(tie_floor(r, 1.0), 4), tie_floor(r, 0.0)
    (1.4826, 0.0)
    """
    R = np.asarray(resid, dtype=np.float64)
    one = R.ndim == 1
    R = R.reshape(1, -1) if one else R
    q = np.broadcast_to(np.asarray(step, dtype=np.float64), (R.shape[0],))
    out = np.zeros(R.shape[0])
    rows = np.flatnonzero(q > 0)  # only series on a grid pay for the medians
    if rows.size:
        r = np.where(np.isfinite(R[rows]), R[rows], np.nan)
        with np.errstate(invalid="ignore"):
            dev = np.abs(r - _row_median(r)[:, None])
            dev[~(dev >= q[rows, None] / 2)] = np.nan  # the ties (and the missing)
        out[rows] = MAD_TO_SIGMA * np.nan_to_num(_row_median(dev))
    return float(out[0]) if one else out


def center_scale(r: np.ndarray, floor: float = 1e-9, step: float = 0.0) -> tuple[float, float]:
    """Median and robust sigma (1.4826 x MAD, at least a quarter of the RMS about the median,
    at least ``floor``, and at least :func:`tie_floor` for residuals of values on a grid of
    ``step``) of the finite values of ``r``; (0, floor) when there are none."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return 0.0, floor
    med = float(np.median(r))
    dev = np.abs(r - med)
    sig = max(MAD_TO_SIGMA * float(np.median(dev)), 0.25 * float(np.sqrt(np.mean(dev * dev))), floor)
    if step > 0:
        sig = max(sig, tie_floor(r, step))
    return med, sig
