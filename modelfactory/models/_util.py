"""Small helpers shared by the built-in models (private)."""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["fit_quietly", "center_scale", "scale_floor", "max_abs", "MAD_TO_SIGMA"]

MAD_TO_SIGMA = 1.4826


def fit_quietly(fit):
    """Run ``fit()`` recording its warnings as short notes instead of raising or printing them.

    Returns ``(result, notes)``; ``notes`` holds at most five distinct
    ``"Category: first line of the message"`` strings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit()
    notes: list[str] = []
    for w in caught:
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


def center_scale(r: np.ndarray, floor: float = 1e-9) -> tuple[float, float]:
    """Median and robust sigma (1.4826 x MAD, at least a quarter of the RMS about the median,
    at least ``floor``) of the finite values of ``r``; (0, floor) when there are none."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return 0.0, floor
    med = float(np.median(r))
    dev = np.abs(r - med)
    sig = max(MAD_TO_SIGMA * float(np.median(dev)), 0.25 * float(np.sqrt(np.mean(dev * dev))), floor)
    return med, sig
