"""``seasonal``: a robust seasonal profile, fitted for a whole batch of series at once.

For each series and each season slot (e.g. hour of day with ``season_length=24``
on hourly data, hour of week with 168) the model keeps the median and the
median absolute deviation (MAD) of the values in that slot.  A new point is
expected at its slot's median; its robust z-score is the deviation divided by
``1.4826 * MAD``.  The slot of a point comes from its timestamp
(``floor(t / step) mod season_length``), so gaps, missing points and scoring
days later all line up without an origin.  Times are UTC unless ``tz`` names a
time zone: then slots follow its wall-clock time, so a daily cycle that people
make (traffic in local time) stays in its slots across daylight-saving changes.

Data it needs: a time column; at least ``min_seasons * season_length`` finite
values.  NaNs are ignored; a slot with no values falls back to the series'
overall median, with the spread of all its values about it as the scale.  A
series no slot of which holds two values (one season) is skipped: it shows no
spread.  A constant series gets a tiny floor scale, so any change from the
constant is anomalous.  Cost: two sorts over the batch, O(N log N).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..exceptions import ModelError, ParameterError
from ._timegrid import infer_steps, segment_median
from ._util import scale_floor
from .base import SCORING_PARAMS, Model, Param, SeriesBatch, SkipGroup, robust_score

__all__ = ["SeasonalProfile", "segment_median"]

_MAD_TO_SIGMA = 1.4826

# Small-sample factors for Gaussian noise, by the number c of values in a slot (1..50), simulated
# (4,000,000 draws each: benchmarks/seasonal_factors.py prints them).  _POOLED_MAD: what makes the
# median of the non-zero residuals pooled from many slots of c values (about each slot's median)
# equal sigma / 1.4826: for odd c one residual is exactly 0 and dropped, so it is nearly unbiased;
# for even c the two middle residuals are equal and small (c=4: a third low).  _PREDICTION: the
# spread of a new value about a slot's median over sigma, sqrt(1 + var(median of c) / sigma^2),
# since the median is estimated too.  Before them (one sqrt(k / (k - 1)) for all), the scale of
# four weeks of hourly data with season_length 168 came out at 0.83 sigma, and clean data was
# flagged 15 times as often as a threshold of 3.5 means (0.72 % of points, 0.047 % meant).
_POOLED_MAD = np.array([
    1.000, 1.415, 0.980, 1.387, 0.985, 1.278, 0.988, 1.196, 0.991, 1.148, 0.991, 1.117, 0.994, 1.096, 0.993,
    1.081, 0.996, 1.071, 0.995, 1.062, 0.996, 1.055, 0.996, 1.051, 0.996, 1.046, 0.998, 1.042, 0.997, 1.040,
    0.997, 1.037, 0.996, 1.034, 0.998, 1.034, 0.998, 1.031, 0.997, 1.030, 0.998, 1.027, 0.998, 1.026, 0.998,
    1.025, 0.999, 1.023, 0.998, 1.023])
_PREDICTION = np.array([
    1.414, 1.225, 1.204, 1.140, 1.134, 1.102, 1.101, 1.081, 1.080, 1.067, 1.066, 1.057, 1.057, 1.050, 1.050,
    1.044, 1.044, 1.040, 1.040, 1.036, 1.036, 1.033, 1.033, 1.030, 1.031, 1.028, 1.028, 1.026, 1.026, 1.025,
    1.025, 1.023, 1.023, 1.022, 1.022, 1.021, 1.021, 1.020, 1.020, 1.019, 1.019, 1.018, 1.018, 1.017, 1.017,
    1.016, 1.016, 1.016, 1.016, 1.015])


def _factors(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two factors above for counts ``c`` (>= 1); past 50 values, their large-c forms."""
    c = np.maximum(np.asarray(c, dtype=np.int64), 1)
    i = np.minimum(c, 50) - 1
    pooled, pred = _POOLED_MAD[i], _PREDICTION[i]
    big = c > 50
    if big.any():
        cb = c.astype(np.float64)
        pooled = np.where(big, np.where(c % 2 == 0, 1 + 1.15 / cb, 1.0), pooled)
        pred = np.where(big, np.sqrt(1 + np.pi / (2 * cb)), pred)
    return pooled, pred


def _zone(name: str):
    """The time zone named ``name``, or a ParameterError saying what names look like."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ParameterError(
            f"The 'tz' parameter of seasonal must be an IANA time zone name such as 'Europe/Berlin' "
            f"or 'America/New_York'; got {name!r} ({err})."
        ) from None


def wall_clock(t: np.ndarray, tz: str | None) -> np.ndarray:
    """UTC seconds ``t`` as the wall-clock seconds of time zone ``tz`` (``t`` itself for None).

    >>> t = np.array([1711846800, 1711850400])  # 2024-03-31 01:00 and 02:00 UTC
    >>> (wall_clock(t, "Europe/Berlin") - t).tolist()  # CET, then CEST from 01:00 UTC
    [7200, 7200]
    >>> (wall_clock(t - 3600, "Europe/Berlin") - (t - 3600)).tolist()
    [3600, 7200]
    """
    if tz is None or len(t) == 0:
        return t
    import pandas as pd

    utc = pd.DatetimeIndex(np.asarray(t, dtype=np.int64).astype("datetime64[s]"), tz="UTC")
    local = utc.tz_convert(_zone(tz)).tz_localize(None)
    return local.asi8 // {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[local.unit]


def _shifts(wall: np.ndarray, sid: np.ndarray, step: np.ndarray, n: int) -> np.ndarray:
    """Per series, the seconds to add to its times so that each slot's boundaries fall half a step
    from where its times sit within a step (their circular mean).

    Without it, a slot began exactly at the hour: times stamped a few seconds early (10:59:58 for
    11:00) fell into the slot before, mixing two hours in every slot; the band came out twice too
    wide.  Times on the hour (or on the half hour) get the slots they always had, as do times spread
    over the whole step (their shift is 0).  Series whose times all sit on their step (most data)
    are not computed: their shift is half a step.
    """
    shift = step // 2
    if not len(wall):
        return np.zeros(n, dtype=np.int64)
    off = wall % step[sid]
    uneven = np.bincount(sid[off != 0], minlength=n) > 0
    if uneven.any():
        rows = uneven[sid]
        s, st = sid[rows], step[sid[rows]]
        ang = 2 * np.pi * off[rows] / st
        sin, cos = np.bincount(s, np.sin(ang), minlength=n), np.bincount(s, np.cos(ang), minlength=n)
        phase = np.rint(np.mod(np.arctan2(sin, cos), 2 * np.pi) / (2 * np.pi) * step).astype(np.int64)
        # Times spread over the whole step (5-minute data with step=3600 for an hour-of-day profile,
        # event times) sit nowhere in particular: their circular mean is noise, and centring on it
        # put the slots' boundaries at some minute past the hour (a change at 09:00 then fell inside
        # a slot, and 2 % of clean points were flagged).  Their slots begin at the step, as before.
        settled = np.hypot(sin, cos) >= 0.5 * np.maximum(np.bincount(s, minlength=n), 1)
        shift = np.where(uneven, np.where(settled, (step // 2 - phase) % step, 0), shift)
    return shift % step


class SeasonalProfile(Model):
    """Median and MAD per season slot; the default for very large runs.

    Parameters
    ----------
    season_length : int, default 24
        Slots per season (24 = hour of day on hourly data, 168 = hour of week).
    step : int or None, default None
        Seconds between points; None infers it per series (median spacing).
    threshold : float, default 3.5
        Robust z-score beyond which a point is anomalous.
    min_seasons : int, default 2
        Whole seasons of data needed to fit; shorter series are skipped.
    debounce : {"none", "first"}, default "none"
        Alert on every anomalous point, or only on the first of an episode.
    quiet : int, default 1
        Quiet points that end an episode (with ``debounce="first"``).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.arange(72) * 3600
    >>> y = np.tile(np.arange(24.0), 3)
    >>> m = SeasonalProfile().fit(y, t=t)
    >>> m.score([5.0, 50.0], t=[5 * 3600, 6 * 3600])["is_anomaly"].tolist()
    [False, True]
    """

    expects_what_it_scores = True
    name = "seasonal"
    needs_time = True
    ignores_features = True
    skips_huge_values = False  # medians and MADs: no squares to overflow, as fit_batch (a run) fits them
    params: ClassVar = {
        "season_length": Param(24, int, low=1, doc="slots per season"),
        "step": Param(None, (int, type(None)), low=1, doc="seconds between points"),
        "threshold": Param(3.5, float, low=0.0, doc="robust z beyond which a point is anomalous"),
        "min_seasons": Param(2, int, low=1, doc="whole seasons needed to fit"),
        "tz": Param(None, (str, type(None)),
                    doc="time zone whose wall-clock time the slots follow (e.g. 'Europe/Berlin'); None: UTC"),
        **SCORING_PARAMS,
    }
    state_attrs = ("step_", "median_", "scale_", "shift_")

    def required_rows(self) -> int:
        return self.season_length * self.min_seasons

    def validate_params(self) -> None:
        super().validate_params()
        if self.tz is not None:
            _zone(self.tz)

    @classmethod
    def fit_batch(cls, params: dict, batch: SeriesBatch) -> list:
        proto = cls(**params)
        proto.validate_params()
        if batch.times is None:
            raise ModelError("seasonal needs a time column: pass time=.")
        S, n = proto.season_length, len(batch)
        lengths = np.diff(batch.offsets)
        sid = np.repeat(np.arange(n), lengths)
        t, v = batch.times, batch.values
        # Step per series, as the other time-series models infer it (infer_steps)
        step = infer_steps(batch, proto.step, sid=sid)
        ok = np.isfinite(v)
        sid_f, v_f = sid[ok], v[ok]
        finite = np.bincount(sid_f, minlength=n)
        wall = wall_clock(t[ok], proto.tz)
        shift = _shifts(wall, sid_f, step, n)
        slot = ((wall + shift[sid_f]) // step[sid_f]) % S
        seg = sid_f * S + slot
        med, count = segment_median(v_f, seg, n * S)
        series_med, _ = segment_median(v_f, sid_f, n)
        med = med.reshape(n, S)
        med = np.where(np.isnan(med), series_med[:, None], med)
        resid = np.abs(v_f - med.reshape(-1)[seg])
        mad, _ = segment_median(resid, seg, n * S)
        # Residuals about a slot median of a few points are biased low (for odd counts one of
        # them is exactly 0): the non-zero ones, each corrected for the count of its own slot and
        # pooled per series, are the floor of every slot (corrected all alike, for finite / S,
        # slots of 0 to 5 values in a gappy series made the floor a third too low).  A slot's own
        # MAD (not corrected: of a few values it is too noisy, and corrected it widened half the
        # slots' bands) takes over where that slot is clearly noisier.  Both are widened by the
        # spread of a new value about an estimated median.
        nz = resid > 0
        per_slot, pred = _factors(count)  # each residual corrected for the count of its own slot
        count, per_slot, pred = count.reshape(n, S), per_slot.reshape(n, S), pred.reshape(n, S)
        if (count == count[:, :1]).all():  # every slot of a series holds as many (most data): after the median
            series_mad, _ = segment_median(resid[nz], sid_f[nz], n)
            series_mad = series_mad * per_slot[:, 0]
        else:
            series_mad, _ = segment_median(resid[nz] * per_slot.reshape(-1)[seg[nz]], sid_f[nz], n)
        series_mad = np.nan_to_num(series_mad, nan=0.0)
        typical = np.maximum(np.rint(finite / S), 1)
        _, typical_pred = _factors(typical)
        mad = mad.reshape(n, S)
        # An empty slot expects the series' median, which its values need not be near (with half the
        # values missing, a 24th of hourly slots had none, and a fifth of the clean points that fell in
        # them were flagged): its scale is the spread of all the series' values about that median.
        empty = count == 0
        spread = series_mad.copy()
        gappy = empty.any(axis=1)
        if gappy.any():
            rows = gappy[sid_f]
            whole, _ = segment_median(np.abs(v_f[rows] - series_med[sid_f[rows]]), sid_f[rows], n)
            spread = np.where(gappy, np.fmax(spread, whole), spread)
        mad = np.where(empty, spread[:, None], mad)  # a slot's MAD is NaN only where it had no value
        pred = np.where(count > 0, pred, typical_pred[:, None])  # an empty slot expects the series' median
        # A tiny floor (relative to the values) so a constant series does not divide by zero.
        # the largest |value| per series: rows are grouped by series, so one reduceat (np.maximum.at
        # took 0.36 s for 100,000 series of 168 points, reduceat 0.04 s)
        starts = np.concatenate(([0], np.cumsum(finite)[:-1])).astype(np.intp)
        biggest = np.where(finite > 0, np.maximum.reduceat(np.append(np.abs(v_f), 0.0), starts), 0.0)
        floor = np.maximum(series_mad, scale_floor(biggest))
        scale = _MAD_TO_SIGMA * pred * np.maximum(mad, floor[:, None])
        need = proto.required_rows()
        # a series no slot of which holds two values (one season with min_seasons=1) has no
        # spread to learn: its scale was the tiny floor of a constant series, and every point
        # scored later was flagged, the group ok
        paired = (count >= 2).any(axis=1)
        out: list = []
        for i in range(n):
            if finite[i] < need:
                out.append(SkipGroup(f"seasonal needs at least {need} non-missing values "
                                     f"({proto.min_seasons} x season_length {S}); got {finite[i]}"))
                continue
            if not paired[i]:
                out.append(SkipGroup(f"seasonal cannot tell how far a value may stray from its slot: none of the "
                                     f"{S} slots of its season holds two of its {finite[i]} values (one season of "
                                     f"data); train on two seasons or more (min_seasons=2 asks for them)"))
                continue
            m = cls(**params)
            m.step_, m.median_, m.scale_, m.shift_ = int(step[i]), med[i], scale[i], int(shift[i])
            out.append(m)
        return out

    def set_state(self, state):
        # models stored before the slots were centred on their times began slots at the step
        return super().set_state({"shift_": 0, **state})

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        slot = ((wall_clock(t, self.tz) + self.shift_) // self.step_) % self.season_length
        expected = self.median_[slot]
        scale = self.scale_[slot]
        z = (y - expected) / scale
        finite = np.isfinite(z)
        score = np.where(finite, robust_score(np.where(finite, z, 0.0)), 0.0)
        return {
            "expected": expected,
            "lower": expected - self.threshold * scale,
            "upper": expected + self.threshold * scale,
            "score": score,
            "is_anomaly": finite & (np.abs(np.where(finite, z, 0.0)) > self.threshold),
        }

    @classmethod
    def score_batch(cls, models: list, batch: SeriesBatch, **kwargs) -> dict[str, np.ndarray]:
        """Score a whole batch at once: one gather from the stacked profiles, no per-series loop.

        Falls back to the per-series path when debouncing is asked for or the models
        do not share season length and threshold.
        """
        live = [m for m in models if m is not None]
        if (not live or kwargs or batch.times is None
                or any(m.debounce != "none" for m in live)
                or len({(m.season_length, m.threshold, m.tz) for m in live}) != 1):
            return super().score_batch(models, batch, **kwargs)
        S, thr, tz = live[0].season_length, live[0].threshold, live[0].tz
        n = len(models)
        have = np.array([m is not None for m in models])
        med = np.full((n, S), np.nan)
        scale = np.ones((n, S))
        step = np.ones(n, dtype=np.int64)
        shift = np.zeros(n, dtype=np.int64)
        for i, m in enumerate(models):
            if m is not None:
                m.check_fitted()
                med[i], scale[i], step[i], shift[i] = m.median_, m.scale_, m.step_, m.shift_
        lengths = np.diff(batch.offsets)
        sid = np.repeat(np.arange(n), lengths)
        t = wall_clock(batch.times.astype(np.int64), tz)
        slot = ((t + shift[sid]) // step[sid]) % S
        expected = med[sid, slot]
        sc = scale[sid, slot]
        y = np.asarray(batch.values, dtype=np.float64)
        z = (y - expected) / sc
        finite = np.isfinite(z) & have[sid]
        zf = np.where(finite, z, 0.0)
        broken = np.isinf(y) & np.isfinite(expected) & have[sid]  # as Model.score: +-inf is anomalous
        return {
            "expected": expected,
            "lower": expected - thr * sc,
            "upper": expected + thr * sc,
            "score": np.where(broken, 1.0, np.clip(np.where(finite, robust_score(zf), 0.0), 0.0, 1.0)),
            "is_anomaly": (finite & (np.abs(zf) > thr) & np.isfinite(y)) | broken,
        }
