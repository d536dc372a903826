"""Calibration of the built-in models on clean data of awkward shapes: how many clean points each
flags, and how many injected spikes it still catches.

quality.py measures detection on well-behaved Gaussian series; this script measures the cases where
a robust scale goes wrong: counts that are mostly 0, integer gauges that sit on one value, series
most of whose points are missing, and times that jitter about their grid.  A calibrated model flags
clean points near its threshold's nominal rate (3.5 sigmas: 0.047 %) whatever the data's shape.

Data.  ``--series`` hourly series per case: four weeks to train on, then a week to score with three
spikes injected at random hours (the size depends on the case, in the table).  Cases:

* ``gauss``: a daily cycle (amplitude 3) plus N(0, 1) noise; spikes of 6;
* ``poisson 0.05`` / ``0.3`` / ``3``: counts with that mean an hour; spikes of 10 (12 for 3);
* ``gauge``: the value 3, at 4 in 8 % of the hours; spikes of 6;
* ``gappy 50 %`` / ``70 %``: ``gauss`` with that share of the training points missing; spikes of 6;
* ``jittered``: ``gauss`` with times up to 5 minutes off the hour, and 50 % missing; spikes of 6.

Each model is fitted per series on the four weeks (``season_length=24``; random_forest and
isolation_forest get the hour of the day and the day of the week as features) and scores the fifth.
Columns: the share of series it fitted (the others were skipped, with a reason), the share of the
clean points of the scored week it flagged, and the share of spikes it caught.

Usage::

    python benchmarks/calibration.py                       # 20 series a case, about two minutes
    python benchmarks/calibration.py --series 50 --models seasonal,holt_winters
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings

import numpy as np

from _bench import markdown_table, print_machine

H = 3600
TRAIN, SCORE = 28 * 24, 7 * 24
CASES = ("gauss", "poisson 0.05", "poisson 0.3", "poisson 3", "gauge", "gappy 50 %", "gappy 70 %", "jittered")
MODELS = ("seasonal", "holt_winters", "ets", "random_forest", "autoencoder")


def make_case(case: str, rng: np.random.Generator):
    """(times, values, spike size, share of training points missing, jitter in seconds) of one series."""
    n = TRAIN + SCORE
    hour = np.arange(n)
    gauss = 10 + 3 * np.sin(2 * np.pi * (hour % 24) / 24 + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 1, n)
    missing, jitter, spike = 0.0, 0, 6.0
    if case.startswith("poisson"):
        mean = float(case.split()[1])
        y, spike = rng.poisson(mean, n).astype(float), 12.0 if mean >= 1 else 10.0
    elif case == "gauge":
        y = 3.0 + (rng.random(n) < 0.08)
    else:
        y = gauss
        if case.startswith("gappy"):
            missing = float(case.split()[1]) / 100
        elif case == "jittered":
            missing, jitter = 0.5, 300
    t = hour * H + (rng.integers(-jitter, jitter + 1, n) if jitter else 0)
    return t.astype(np.int64), y, spike, missing


def features(t: np.ndarray) -> np.ndarray:
    hours = np.rint(t / H).astype(np.int64)
    return np.column_stack([hours % 24, (hours // 24) % 7]).astype(float)


def evaluate(name: str, case: str, series: int, seed: int) -> dict:
    from modelfactory import models
    from modelfactory.models import SkipGroup

    rng = np.random.default_rng(seed)
    fitted = clean = flagged = spikes = caught = 0
    reasons: dict[str, int] = {}
    t0 = time.perf_counter()
    for _ in range(series):
        t, y, size, missing = make_case(case, rng)
        keep = np.r_[rng.random(TRAIN) >= missing, np.ones(SCORE, dtype=bool)]
        t, y = t[keep], y[keep].copy()
        k = int(keep[:TRAIN].sum())
        hit = np.zeros(len(y) - k, dtype=bool)
        hit[rng.choice(len(hit), 3, replace=False)] = True
        y[k:][hit] += size
        kw = {"season_length": 24} if name in ("seasonal", "holt_winters", "ets", "sarimax") else {}
        X = features(t) if name in ("random_forest", "isolation_forest") else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = models.get(name, **kw).fit(y[:k], t=t[:k], X=None if X is None else X[:k])
                flags = m.score(y[k:], t=t[k:], X=None if X is None else X[k:])["is_anomaly"]
        except SkipGroup as err:
            why = re.sub(r"\d+(\.\d+)?", "N", str(err).split(": ", 1)[-1])[:48]  # one cause counts once
            reasons[why] = reasons.get(why, 0) + 1
            continue
        fitted += 1
        clean += int((~hit).sum())
        flagged += int(flags[~hit].sum())
        spikes += int(hit.sum())
        caught += int(flags[hit].sum())
    return {"fitted": fitted / series, "clean": flagged / clean if clean else float("nan"),
            "caught": caught / spikes if spikes else float("nan"), "seconds": time.perf_counter() - t0,
            "reasons": reasons}


def pct(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{100 * x:.{digits}f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=20, help="series a case (default: %(default)s)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; pick from {list(CASES)}", file=sys.stderr)
        return 2
    print_machine("calibration: clean points flagged and spikes caught", sys.argv,
                  ("modelfactory", "numpy", "statsmodels", "scikit-learn"))
    rows = []
    for name in names:
        for i, case in enumerate(cases):
            r = evaluate(name, case, args.series, args.seed + i)
            rows.append([name, case, pct(r["fitted"], 0), pct(r["clean"]), pct(r["caught"], 0),
                         f"{r['seconds']:.1f}", "; ".join(f"{k} ({v})" for k, v in r["reasons"].items())])
            print(f"[{name} / {case}] done in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(markdown_table(["model", "case", "fitted", "clean points flagged", "spikes caught", "s", "skipped"],
                         rows, align="llrrrrl"))
    print("\nThe threshold's nominal rate (3.5 sigmas, two-sided) is 0.047 % of clean points.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
