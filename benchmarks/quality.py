"""A labelled synthetic anomaly benchmark for the built-in models.

Data.  ``--series`` hourly series (default 300) of five weeks: a level, a
daily cycle (amplitude 20-50 % of the level, random phase), a weekly cycle
(weekends 10-25 % lower), a small trend and Gaussian noise (2, 5 or 10 % of
the level).  The first four weeks are for training (with a few unlabelled
spikes, as real history has); the last week is scored.  In the scored week
about 85 % of the series get one or two labelled anomalies, each of one kind:

* ``spike`` / ``dip``: one point, 6-10 noise sigmas up / down;
* ``level_shift``: 4-7 sigmas up or down for 12-48 hours;
* ``variance``: the noise 5-8 times larger for 12-24 hours;
* ``season_break``: the daily cycle shifted by 8-16 hours for 12-24 hours.

Evaluation.  Each model is trained per series on the four weeks and scores
the fifth with its default threshold (``is_anomaly``, no debounce).

* Point level: precision, recall and F1 of the flagged points against the
  labelled points, pooled over all series.
* Episode level: a labelled episode is a maximal run of labelled points.  An
  alert episode is a maximal group of flagged points in which consecutive
  flags are separated by fewer than ``--quiet`` (default 3) unflagged points
  (what ``debounce="first", quiet=3`` would alert once for).  An alert
  episode is a true positive if it overlaps a labelled episode, allowing
  ``--tolerance`` (default 3) points after the labelled end (a model may
  notice a change a little late or alert on its end).  Precision = true
  positive alert episodes / alert episodes; recall = labelled episodes hit by
  at least one alert episode / labelled episodes; F1 = their harmonic mean.
  Counts are pooled over all series.

Time per series is the fit time (batch models: the batch's time divided by
the series) plus the scoring time.  ``ets`` and ``sarimax`` (seconds per
series) run on the first ``--slow-series`` series only (default 10), marked
in the table, fitted on the last two weeks of the history (``max_length``); their
rows are not comparable line by line with the others.

Usage::

    python benchmarks/quality.py            # 300 series, a few minutes
    python benchmarks/quality.py --quick    # 60 series
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

import _common  # noqa: F401 - puts this checkout's modelfactory first on sys.path

HOUR = 3600
WEEK = 168
KINDS = ("spike", "dip", "level_shift", "variance", "season_break")


def make_data(n_series: int, seed: int = 0):
    """``(Y, T, labels, kinds)``: values, int64 times, bool labels (test week only), kind per episode."""
    rng = np.random.default_rng(seed)
    n = 5 * WEEK
    i = np.arange(n)
    T = 1_767_571_200 + i.astype(np.int64) * HOUR  # a Monday 00:00 UTC
    Y = np.empty((n_series, n))
    labels = np.zeros((n_series, n), dtype=bool)
    kinds: list[str] = []
    for s in range(n_series):
        level = rng.uniform(50, 1000)
        amp = rng.uniform(0.2, 0.5) * level
        noise = rng.choice([0.02, 0.05, 0.1]) * level
        phase = rng.uniform(0, 2 * np.pi)
        weekend = rng.uniform(0.1, 0.25) * level
        trend = rng.uniform(-0.1, 0.1) * level / n

        def season(shift=0.0, idx=i):
            return amp * np.sin(2 * np.pi * (idx + shift) / 24 + phase)

        base = level + trend * i + season() - weekend * ((i // 24) % 7 >= 5)
        eps = rng.standard_normal(n) * noise
        y = base + eps
        for _ in range(rng.integers(0, 3)):  # unlabelled spikes in the history
            y[rng.integers(0, 4 * WEEK)] += rng.choice([-1, 1]) * rng.uniform(6, 10) * noise
        if rng.random() < 0.85:
            count = rng.integers(1, 3)
            starts = np.sort(rng.choice(np.arange(4 * WEEK + 2, n - 50, 60), size=count, replace=False))
            for st in starts:
                kind = KINDS[rng.integers(len(KINDS))]
                if kind in ("spike", "dip"):
                    y[st] += (1 if kind == "spike" else -1) * rng.uniform(6, 10) * noise
                    span = slice(st, st + 1)
                elif kind == "level_shift":
                    span = slice(st, min(n, st + rng.integers(12, 49)))
                    y[span] += rng.choice([-1, 1]) * rng.uniform(4, 7) * noise
                elif kind == "variance":
                    span = slice(st, min(n, st + rng.integers(12, 25)))
                    y[span] += eps[span] * (rng.uniform(5, 8) - 1)
                else:
                    span = slice(st, min(n, st + rng.integers(12, 25)))
                    idx = i[span]
                    y[span] += season(rng.uniform(8, 16), idx) - season(0.0, idx)
                labels[s, span] = True
                kinds.append(kind)
        Y[s] = y
    return Y, T, labels, kinds


def _features(T: np.ndarray) -> np.ndarray:
    hour = (T // HOUR) % 24
    dow = (T // (24 * HOUR) + 3) % 7  # 1970-01-01 was a Thursday
    return np.column_stack([np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
                            (dow >= 5).astype(float)])


def _runs(flags: np.ndarray, quiet: int) -> list[tuple[int, int]]:
    """Maximal groups of flagged indices with gaps of fewer than ``quiet`` unflagged points."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) - 1 >= quiet)
    starts = np.r_[idx[0], idx[cut + 1]]
    ends = np.r_[idx[cut], idx[-1]]
    return list(zip(starts.tolist(), ends.tolist()))


def evaluate(pred: np.ndarray, truth: np.ndarray, quiet: int = 3, tolerance: int = 3) -> dict:
    """Point and episode precision / recall / F1 (see the module docstring), pooled over rows."""
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    alerts = hits = labelled = found = 0
    for p, t in zip(pred, truth):
        lab = _runs(t, 1)
        alr = _runs(p, quiet)
        labelled += len(lab)
        alerts += len(alr)
        hits += sum(any(a0 <= l1 + tolerance and a1 >= l0 for l0, l1 in lab) for a0, a1 in alr)
        found += sum(any(a0 <= l1 + tolerance and a1 >= l0 for a0, a1 in alr) for l0, l1 in lab)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0

    pp = tp / (tp + fp) if tp + fp else 0.0
    pr = tp / (tp + fn) if tp + fn else 0.0
    ep = hits / alerts if alerts else 0.0
    er = found / labelled if labelled else 0.0
    return {"point_p": pp, "point_r": pr, "point_f1": f1(pp, pr),
            "ep_p": ep, "ep_r": er, "ep_f1": f1(ep, er), "episodes": labelled, "alerts": alerts}


def run_model(name: str, params: dict, Y, T, X, use_batch: bool):
    """Fit on the first four weeks, score the fifth: (flags, seconds per series, skipped)."""
    from modelfactory.models import registry
    from modelfactory.models.base import SeriesBatch

    cls = registry[name]
    S = Y.shape[0]
    tr = 4 * WEEK
    flags = np.zeros((S, WEEK), dtype=bool)
    t0 = time.perf_counter()
    if use_batch:
        batch = SeriesBatch(Y[:, :tr].ravel(), np.arange(S + 1) * tr, np.tile(T[:tr], S),
                            np.tile(X[:tr], (S, 1)))
        fitted = cls.fit_batch(params, batch)
    else:
        fitted = []
        for s in range(S):
            try:
                fitted.append(cls(**params).fit(Y[s, :tr], t=T[:tr], X=X[:tr]))
            except Exception as err:  # noqa: BLE001 - recorded as skipped
                fitted.append(err)
    skipped = 0
    for s, m in enumerate(fitted):
        if isinstance(m, Exception):
            skipped += 1
            continue
        flags[s] = m.score(Y[s, tr:], t=T[tr:], X=X[tr:])["is_anomaly"]
    return flags, (time.perf_counter() - t0) / S, skipped


MODELS = [
    ("seasonal", {"season_length": WEEK}, True, False),
    ("seasonal", {"season_length": 24}, True, False),
    ("holt_winters", {"season_length": WEEK}, True, False),
    ("holt_winters", {"season_length": 24}, True, False),
    ("ets", {"season_length": 24, "max_length": 2 * WEEK}, False, True),
    ("sarimax", {"season_length": 24, "max_length": 2 * WEEK, "maxiter": 50}, False, True),
    ("isolation_forest", {}, False, False),
    ("random_forest", {}, False, False),
    ("autoencoder", {"window": 24}, False, False),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=300)
    ap.add_argument("--slow-series", type=int, default=10, help="series for ets and sarimax")
    ap.add_argument("--quiet", type=int, default=3)
    ap.add_argument("--tolerance", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--quick", action="store_true", help="60 series, 5 for ets/sarimax")
    args = ap.parse_args(argv)
    S = 60 if args.quick else args.series
    slow = min(S, 5 if args.quick else args.slow_series)
    Y, T, labels, kinds = make_data(S)
    X = _features(T)
    counts = {k: kinds.count(k) for k in KINDS}
    print(f"{S} series x {Y.shape[1]} hourly points (train 4 weeks, score 1 week); "
          f"labelled episodes: {sum(counts.values())} {counts}\n")
    print("| model | params | series | skipped | point P | point R | point F1 | episode P | episode R "
          "| episode F1 | ms per series |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, params, batch, is_slow in MODELS:
            if only and name not in only:
                continue
            k = slow if is_slow else S
            flags, secs, skipped = run_model(name, params, Y[:k], T, X, batch)
            r = evaluate(flags, labels[:k, 4 * WEEK:], args.quiet, args.tolerance)
            ptxt = ", ".join(f"{a}={b}" for a, b in params.items()) or "defaults"
            print(f"| {name} | {ptxt} | {k}{'*' if is_slow else ''} | {skipped} | {r['point_p']:.2f} | "
                  f"{r['point_r']:.2f} | {r['point_f1']:.2f} | {r['ep_p']:.2f} | {r['ep_r']:.2f} | "
                  f"{r['ep_f1']:.2f} | {1000 * secs:.1f} |", flush=True)
    print(f"\n* first {slow} series only (slow per-series statsmodels fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
