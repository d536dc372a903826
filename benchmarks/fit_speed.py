"""Per-series fit time of the exponential-smoothing style models, side by side in one run.

The same hourly series (default 1,000 series of 168 points, a daily season
of 24) are fitted by:

* ``seasonal``      modelfactory's robust seasonal profile (batch)
* ``holt_winters``  modelfactory's Holt-Winters (batch, numpy)
* ``statsmodels``   ``statsmodels ExponentialSmoothing(trend="add", seasonal="add")``, one series at a time
* ``AutoETS``       statsforecast's ``AutoETS(model="AAA")``, one series at a time, when installed

All run on one thread (``threadpool_limits(1)``, as on a modelfactory worker),
in ``--repeat`` interleaved rounds (default 3) of which the best time counts,
so that a change in the load of a shared machine does not favour one side
(statsmodels, which takes minutes, runs once).
The table gives the time per series, its ratio to ``holt_winters``, and the
median in-sample SSE relative to statsmodels (the accuracy check).

statsforecast pins ``pandas<3``; when it cannot be imported here, pass
``--statsforecast-python /path/to/python`` of an environment that has it
(with numpy): that part then runs in a subprocess on the same series.

Usage::

    python benchmarks/fit_speed.py                  # 1,000 series (statsmodels on the first 200)
    python benchmarks/fit_speed.py --quick          # 100 series
    python benchmarks/fit_speed.py --statsforecast-python /tmp/sfvenv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import series_values  # noqa: E402  (the same series as compare.py and heavy.py)

_SF_SCRIPT = r"""
import json, sys, time, numpy as np
from statsforecast.models import AutoETS
Y = np.load(sys.argv[1]); m = int(sys.argv[2])
AutoETS(season_length=m, model="AAA").fit(Y[0])  # compile (numba) outside the clock
t0 = time.perf_counter(); sse = []
for y in Y:
    fit = AutoETS(season_length=m, model="AAA").fit(y)
    sse.append(float(np.sum(np.asarray(fit.model_["residuals"]) ** 2)))
print(json.dumps({"seconds": time.perf_counter() - t0, "sse": sse}))
"""


def time_modelfactory(name: str, Y: np.ndarray, season: int):
    from modelfactory.models import registry
    from modelfactory.models.base import SeriesBatch

    S, n = Y.shape
    t = np.tile(np.arange(n, dtype=np.int64) * 3600, S)
    batch = SeriesBatch(Y.ravel(), np.arange(S + 1) * n, t)
    cls = registry[name]
    cls.fit_batch({"season_length": season}, SeriesBatch(Y[:2].ravel(), np.array([0, n, 2 * n]), t[:2 * n]))
    t0 = time.perf_counter()
    fitted = cls.fit_batch({"season_length": season}, batch)
    secs = time.perf_counter() - t0
    sse = [getattr(f, "sse_", np.nan) for f in fitted]
    return secs, np.asarray(sse, dtype=np.float64)


def time_statsmodels(Y: np.ndarray, season: int):
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    sse = []
    t0 = time.perf_counter()
    for y in Y:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sse.append(ExponentialSmoothing(y, trend="add", seasonal="add", seasonal_periods=season).fit().sse)
    return time.perf_counter() - t0, np.asarray(sse)


def time_statsforecast(Y: np.ndarray, season: int, python: str | None):
    try:
        import statsforecast  # noqa: F401
        python = python or sys.executable
    except ImportError:
        if not python:
            return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "series.npy")
        np.save(path, Y)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMBA_NUM_THREADS="1")
        out = subprocess.run([python, "-c", _SF_SCRIPT, path, str(season)], capture_output=True, text=True,
                             env=env, check=False)
    if out.returncode != 0:
        print(f"statsforecast failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["seconds"], np.asarray(res["sse"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--length", type=int, default=168)
    ap.add_argument("--season", type=int, default=24)
    ap.add_argument("--statsmodels-series", type=int, default=200,
                    help="fit statsmodels (slow) on only the first N series (default 200)")
    ap.add_argument("--statsforecast-python", default=os.environ.get("MF_STATSFORECAST_PYTHON"))
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best time counts")
    ap.add_argument("--quick", action="store_true", help="100 series")
    args = ap.parse_args(argv)
    S = 100 if args.quick else args.series
    Y = series_values(S, args.length, args.season)
    best: dict[str, tuple[float, np.ndarray]] = {}

    def keep(key, res):
        if res is not None and (key not in best or res[0] < best[key][0]):
            best[key] = res

    with threadpool_limits(1):
        # Interleaved rounds, best of each: the machine may be shared, and its load may change.
        for _ in range(args.repeat):
            for name in ("seasonal", "holt_winters"):
                keep(name, time_modelfactory(name, Y, args.season))
            keep("sf", time_statsforecast(Y, args.season, args.statsforecast_python))
        k = min(S, args.statsmodels_series or S)
        sm_secs, sm_sse = time_statsmodels(Y[:k], args.season)
    rows = [("seasonal (batch)", S, *best["seasonal"]), ("holt_winters (batch)", S, *best["holt_winters"]),
            ("statsmodels ExponentialSmoothing", k, sm_secs, sm_sse)]
    sf = best.get("sf")
    if sf is not None:
        rows.append(("statsforecast AutoETS(model='AAA')", S, *sf))
    hw = rows[1][2] / rows[1][1]
    print(f"{S} series x {args.length} points, season {args.season}, one thread, "
          f"best of {args.repeat} interleaved rounds\n")
    print(f"| model | series | ms per series | x holt_winters | median SSE / statsmodels (first {k}) |")
    print("|---|---:|---:|---:|---:|")
    for name, n, secs, sse in rows:
        per = secs / n
        acc = np.nanmedian(sse[:k] / sm_sse[:k]) if np.isfinite(sse[:k]).any() else np.nan
        acc_s = "-" if not np.isfinite(acc) else f"{acc:.4f}"
        print(f"| {name} | {n} | {1000 * per:.3f} | {per / hw:.1f} | {acc_s} |")
    if sf is None:
        print("\n(statsforecast not run: install it, or pass --statsforecast-python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
