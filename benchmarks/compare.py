"""modelfactory against the anchors -- PySpark, dask.dataframe, statsforecast -- same data, one run.

Workloads (data Hive-partitioned by ``app``, written before anything is timed):

``noop``  the no-op grouped map of benchmarks/overhead.py: groups of 48 hourly rows, the pandas
          function returns one row (keys and the mean of value).  Systems: ``modelfactory.apply``
          with that pandas function, ``modelfactory.apply(input="numpy")`` with the equivalent
          numpy function, PySpark ``groupBy().applyInPandas`` (``local[2]``, Arrow on) and
          dask.dataframe ``groupby().apply`` with the same pandas function.
``ets``   1,000 hourly series of 168 points, additive Holt-Winters, season 24: modelfactory
          ``train(model="holt_winters")``; statsforecast ``AutoETS(model="AAA")`` (in another
          Python environment, since it pins pandas<3: ``--statsforecast-python``); PySpark
          applyInPandas and dask groupby-apply running statsmodels ``ExponentialSmoothing`` per
          group; and, for reference, ``modelfactory.apply`` with that same statsmodels function.

Every timing includes reading the Parquet and bringing the results to the client (a pandas
frame).  Excluded: Spark session start-up, the statsforecast interpreter start-up, imports and
numba compilation; every system is warmed up once on a small dataset first.  Dask systems
share one 2-worker LocalCluster (one thread per worker).  Outputs are checked: row counts
everywhere, means within 1e-9 of numpy's for the no-op, identical SSE for the statsmodels runs.

Usage::

    python benchmarks/compare.py                      # 100,000 no-op groups; 1,000 ETS series
    python benchmarks/compare.py --quick              # 10,000 groups; 100 series
    python benchmarks/compare.py --statsforecast-python /tmp/sfvenv/bin/python
    python benchmarks/compare.py --workloads noop --columns used   # each system reads app, site, value only
    python benchmarks/compare.py --workloads noop --repeat 5       # modelfactory's median of 5 runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import (Measure, fmt_n, fmt_s, local_cluster, markdown_table, print_machine,  # noqa: E402
                    ratio, series_values, take_turn, turn_taker, write_series_dataset)
from _common import write_grouped_dataset  # noqa: E402  (the same no-op data as overhead.py)

BY = ["app", "site"]
NOOP_SCHEMA = "app string, site string, mean double"
NOOP_COLUMNS = ["app", "site", "value"]  # what the no-op function uses (--columns used)
ES_SCHEMA = "app string, site string, sse double"
SEASON = 24
TOLERANCE = 1e-9
PACKAGES = ("modelfactory", "dask", "distributed", "pandas", "numpy", "pyarrow", "pyspark", "statsmodels")
TURN = take_turn  # replaced in main() with the --quiet settings
_WARMING = False  # warm-up runs do not wait for their turn


def _turn(label: str) -> None:
    if not _WARMING:
        TURN(label)


# ---------------------------------------------------------------------------
# per-group functions (module level: Dask and Spark pickle them by value)
# ---------------------------------------------------------------------------
def mean_value(df):
    return pd.DataFrame({"app": [df["app"].iloc[0]], "site": [df["site"].iloc[0]], "mean": [df["value"].mean()]})


def mean_value_arrays(g):
    return {"app": g["app"][:1], "site": g["site"][:1], "mean": np.array([g["value"].mean()])}


def fit_es(df):
    """statsmodels additive Holt-Winters on one series, in time order; keys and SSE."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    df = df.sort_values("ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ExponentialSmoothing(df["value"].to_numpy(), trend="add", seasonal="add",
                                   seasonal_periods=SEASON).fit()
    return pd.DataFrame({"app": [str(df["app"].iloc[0])], "site": [df["site"].iloc[0]], "sse": [fit.sse]})


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class Result:
    workload: str
    system: str
    seconds: float
    groups: int
    others: float = float("nan")
    note: str = ""
    check: str = ""
    out: pd.DataFrame | None = field(default=None, repr=False)  # app, site, value column
    error: str | None = None


def normalise(df: pd.DataFrame, col: str) -> pd.DataFrame:
    out = pd.DataFrame({"app": np.asarray(df["app"].astype(str), dtype=object),
                        "site": np.asarray(df["site"].astype(str), dtype=object),
                        col: np.asarray(df[col], dtype=np.float64)})
    return out.sort_values(BY, ignore_index=True)


def compare_frames(got: pd.DataFrame, ref: pd.DataFrame, col: str, tol: float, relative: bool) -> str:
    """Raise ValueError if rows, keys or values differ; else a short description."""
    got, ref = normalise(got, col), normalise(ref, col)
    if len(got) != len(ref):
        raise ValueError(f"{len(got):,} rows, expected {len(ref):,}")
    if not (got[BY].to_numpy() == ref[BY].to_numpy()).all():
        raise ValueError("other keys than expected")
    a, b = got[col].to_numpy(), ref[col].to_numpy()
    diff = np.abs(a - b) / (np.maximum(np.abs(b), 1e-300) if relative else 1.0)
    worst = float(np.nanmax(diff)) if len(diff) else 0.0
    if not worst <= tol:
        raise ValueError(f"{col} differs by up to {worst:.3g} (> {tol:g}{' relative' if relative else ''})")
    return f"{len(got):,} rows ok, max {'rel. ' if relative else ''}diff {worst:.1e}"


# ---------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------
def run_mf_apply(workload, path, func, schema, client, input="pandas", label="", columns=None) -> Result:
    import modelfactory

    _turn(label)
    with Measure() as m:
        run = modelfactory.apply(path, by=BY, func=func, schema=schema, input=input, cluster=client,
                                 columns=columns)
        out = run.to_pandas()
    s = run.summary
    return Result(workload, label, m.seconds, len(out), m.others, out=out,
                  note=f"{s['units']} units; unit seconds summed {s['unit_seconds']:.2f}")


def spark_session(workers: int):
    """A local[workers] session with Arrow on (start-up is not timed)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
    warnings.filterwarnings("ignore", message=".*PySpark does not yet fully support pandas.*")
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{workers}]").appName("modelfactory-compare")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "4g")
             .config("spark.sql.session.timeZone", "UTC")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run_spark(workload, spark, path, func, schema, label, columns=None) -> Result:
    _turn(label)
    with Measure() as m:
        sdf = spark.read.parquet(path)
        if columns:
            sdf = sdf.select(*columns)
        out = sdf.groupBy(*BY).applyInPandas(func, schema=schema).toPandas()
    return Result(workload, label, m.seconds, len(out), m.others, out=out,
                  note="spark.read.parquet + groupBy.applyInPandas + toPandas; session start-up not timed")


def run_dask(workload, client, path, func, meta, label, columns=None) -> Result:
    import dask.dataframe as dd

    _turn(label)
    with Measure() as m:
        ddf = dd.read_parquet(path, columns=columns)
        out = ddf.groupby(BY, observed=True)[[*BY, *[c for c in ("ts", "value") if c in ddf.columns]]].apply(
            func, meta=meta).compute()
    return Result(workload, label, m.seconds, len(out), m.others, out=out,
                  note="read_parquet + shuffle + groupby.apply + compute() to the client")


def run_mf_train(path, store, client, label) -> Result:
    import modelfactory

    shutil.rmtree(store, ignore_errors=True)
    _turn(label)
    with Measure() as m:
        run = modelfactory.train(path, by=BY, time="ts", target="value", model="holt_winters",
                                 params={"season_length": SEASON}, store=store, cluster=client)
    s = run.summary
    return Result("ets", label, m.seconds, s["counts"]["ok"], m.others,
                  note=f"{s['counts']['ok']:,} ok of {s['groups']:,}; {s['units']} units; fits, serialises and "
                       "commits every model to the store")


_SF_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, pandas as pd
from statsforecast import StatsForecast
from statsforecast.models import AutoETS
path, warm, m, n_jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def run(p):
    df = pd.read_parquet(p)
    df = pd.DataFrame({"unique_id": df["app"].astype(str) + "/" + df["site"].astype(str),
                       "ds": df["ts"].dt.tz_localize(None), "y": df["value"].to_numpy()})
    sf = StatsForecast(models=[AutoETS(model="AAA", season_length=m)], freq="h", n_jobs=n_jobs)
    fc = sf.forecast(df=df, h=m, fitted=True)
    fitted = sf.forecast_fitted_values()
    return fc, fitted

run(warm)  # numba compilation and first-call caches, not timed
t0 = time.perf_counter()
fc, fitted = run(path)
secs = time.perf_counter() - t0
fitted = pd.DataFrame(fitted)
r = (fitted["y"] - fitted["AutoETS"]) ** 2
sse = r.groupby(fitted["unique_id"].astype(str)).sum()
print(json.dumps({"seconds": secs, "series": int(pd.DataFrame(fc)["unique_id"].nunique()),
                  "sse": {k: float(v) for k, v in sse.items()}}))
"""


def run_statsforecast(python: str, path: str, warm: str, n_jobs: int, label: str) -> Result:
    """AutoETS in a subprocess of the other environment; it times itself (read + fit + fitted)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as Dask and Spark give their workers
    _turn(label)
    with Measure() as m:
        proc = subprocess.run([python, "-c", _SF_SCRIPT, path, warm, str(SEASON), str(n_jobs)],
                              capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return Result("ets", label, float("nan"), 0, error=f"statsforecast failed: {' | '.join(tail)}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = [k.split("/", 1) for k in res["sse"]]
    out = pd.DataFrame({"app": [k[0] for k in keys], "site": [k[1] for k in keys],
                        "sse": list(res["sse"].values())})
    # others: measured over the whole subprocess (its warm-up included), the best we have
    return Result("ets", label, res["seconds"], res["series"], m.others, out=out,
                  note=f"n_jobs={n_jobs}; pd.read_parquet + StatsForecast.forecast(h=24, fitted=True), timed "
                       "inside the subprocess (interpreter start, imports, numba compilation excluded)")


def holt_winters_sse(path: str) -> pd.DataFrame:
    """In-sample SSE of modelfactory's holt_winters on the same series (untimed, for accuracy)."""
    from modelfactory.models import registry
    from modelfactory.models.base import SeriesBatch

    df = pd.read_parquet(path).sort_values([*BY, "ts"], ignore_index=True)
    df["app"] = df["app"].astype(str)
    keys = df[BY].drop_duplicates()
    starts = keys.index.to_numpy()
    offsets = np.append(starts, len(df))
    t = ((df["ts"] - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    fitted = registry["holt_winters"].fit_batch({"season_length": SEASON},
                                                SeriesBatch(df["value"].to_numpy(), offsets, t))
    return pd.DataFrame({"app": keys["app"].to_numpy(), "site": keys["site"].to_numpy(),
                         "sse": [getattr(f, "sse_", np.nan) for f in fitted]})


# ---------------------------------------------------------------------------
# the two workloads
# ---------------------------------------------------------------------------
def noop_workload(args, tmp, client, spark, only) -> list[Result]:
    data = write_grouped_dataset(os.path.join(tmp, "noop"), args.groups, rows_per_group=48, apps=100)
    warm = write_grouped_dataset(os.path.join(tmp, "noop-warm"), 200, rows_per_group=48, apps=4)
    expected = data.expected
    meta = pd.DataFrame({"app": pd.Series(dtype=object), "site": pd.Series(dtype=object),
                         "mean": pd.Series(dtype="float64")})
    cols = NOOP_COLUMNS if args.columns == "used" else None
    systems = {
        "mf-pandas": lambda p: run_mf_apply("noop", p, mean_value, NOOP_SCHEMA, client, columns=cols,
                                            label="modelfactory.apply, pandas function"),
        "mf-array": lambda p: run_mf_apply("noop", p, mean_value_arrays, NOOP_SCHEMA, client, input="numpy",
                                           columns=cols, label="modelfactory.apply(input='numpy'), numpy function"),
        "spark": lambda p: run_spark("noop", spark, p, mean_value, NOOP_SCHEMA,
                                     "PySpark groupBy().applyInPandas, local[2], Arrow", columns=cols),
        "dask": lambda p: run_dask("noop", client, p, mean_value, meta, "dask.dataframe groupby().apply",
                                   columns=cols),
    }
    names = [n for n in systems if n in only and not (n == "spark" and spark is None)]
    mine = [n for n in names if n.startswith("mf-")]
    # --repeat N: modelfactory's systems run N times, in rounds placed around the anchors' one
    # run each (half before, half after), and report the median: a run of one second lands
    # wherever this host's speed is at that moment, where an anchor's minutes average over it.
    before = (args.repeat + 1) // 2
    order = mine * before + [n for n in names if n not in mine] + mine * (args.repeat - before)
    runs: dict[str, list[Result]] = {}
    for name in order:
        fn = systems[name]
        if name not in runs:
            _warm_up(fn, warm.path)
            runs[name] = []
        print(f"[noop {args.groups:,}] {name} ...", file=sys.stderr, flush=True)
        r = fn(data.path)
        try:
            r.check = compare_frames(r.out, expected, "mean", TOLERANCE, relative=False)
        except ValueError as err:
            r.error = str(err)
        print(f"[noop {args.groups:,}] {name}: {r.seconds:.2f}s {r.check or r.error}", file=sys.stderr, flush=True)
        r.out = None
        runs[name].append(r)
    after = len(names) > len(mine)  # some anchor ran between the rounds
    return [_median_run(runs[n], after) for n in names]


def _median_run(rs: list[Result], after: bool) -> Result:
    """One system's runs as one result: the median run (the first failure, if one failed),
    its note saying how many runs there were and their spread."""
    failed = [r for r in rs if r.error is not None]
    if failed or len(rs) == 1:
        return failed[0] if failed else rs[0]
    secs = sorted(r.seconds for r in rs)
    median = float(np.median(secs))
    mid = min(rs, key=lambda r: abs(r.seconds - median))
    spread = (f"median of {len(rs)} runs ({secs[0]:.3f}-{secs[-1]:.3f} s"
              + (f"; {len(rs) // 2} of them after the anchors)" if after else ")"))
    return Result(mid.workload, mid.system, median, mid.groups, mid.others,
                  note=f"{spread}; {mid.note}" if mid.note else spread, check=mid.check)


def _warm_up(fn, path) -> None:
    """Run a system once on the small dataset, untimed (imports, first-call caches, workers)."""
    global _WARMING
    _WARMING = True
    try:
        fn(path)
    finally:
        _WARMING = False


def _default_sf_python() -> str:
    """This interpreter when it has statsforecast (``pip install -e ".[bench]"``, which brings
    pandas<3 with it), else a separate environment kept for it."""
    import importlib.util

    return sys.executable if importlib.util.find_spec("statsforecast") else "/tmp/sfvenv/bin/python"


def ets_workload(args, tmp, client, spark, only) -> list[Result]:
    path, warm = os.path.join(tmp, "ets"), os.path.join(tmp, "ets-warm")
    write_series_dataset(path, series_values(args.series, 168, SEASON), args.ets_apps)
    write_series_dataset(warm, series_values(8, 168, SEASON, seed=1), 2)
    meta = pd.DataFrame({"app": pd.Series(dtype=object), "site": pd.Series(dtype=object),
                         "sse": pd.Series(dtype="float64")})
    sf_python = args.statsforecast_python
    systems = {
        "mf-hw": lambda p: run_mf_train(p, os.path.join(tmp, "store"), client,
                                        "modelfactory.train(model='holt_winters')"),
        "sf": lambda p: run_statsforecast(sf_python, p, warm, 2, "statsforecast AutoETS(model='AAA'), n_jobs=2"),
        "sf1": lambda p: run_statsforecast(sf_python, p, warm, 1,
                                           "statsforecast AutoETS(model='AAA'), n_jobs=1 (its default)"),
        "spark": lambda p: run_spark("ets", spark, p, fit_es, ES_SCHEMA,
                                     "PySpark applyInPandas + statsmodels ExponentialSmoothing"),
        "dask": lambda p: run_dask("ets", client, p, fit_es, meta,
                                   "dask.dataframe groupby().apply + statsmodels ExponentialSmoothing"),
        "mf-es": lambda p: run_mf_apply("ets", p, fit_es, ES_SCHEMA, client,
                                        label="modelfactory.apply + statsmodels ExponentialSmoothing (reference)"),
    }
    results = []
    for name, fn in systems.items():
        if name not in only or (name == "spark" and spark is None) or (name.startswith("sf") and not sf_python):
            continue
        if name.startswith("sf"):
            r = fn(path)  # the subprocess warms itself up
        else:
            _warm_up(fn, warm)
            print(f"[ets {args.series:,}] {name} ...", file=sys.stderr, flush=True)
            r = fn(path)
        if r.error is None and r.groups != args.series:
            r.error = f"{r.groups:,} series, expected {args.series:,}"
        print(f"[ets {args.series:,}] {name}: {r.seconds:.2f}s {r.error or ''}", file=sys.stderr, flush=True)
        results.append(r)
    # outputs: every statsmodels run must give the same SSE; accuracy relative to statsmodels
    sm = [r for r in results if r.out is not None and "statsmodels" in r.system]
    ref = sm[0].out if sm else None
    hw = holt_winters_sse(path)
    for r in results:
        if r.error is not None:
            continue
        if r in sm:
            try:
                r.check = compare_frames(r.out, ref, "sse", 1e-9, relative=True)
            except ValueError as err:
                r.error = f"SSE differs from {sm[0].system}: {err}"
        else:
            r.check = f"{r.groups:,} series ok"
        if ref is not None:
            got = hw if r.system.startswith("modelfactory.train") else r.out
            if got is not None:
                a, b = normalise(got, "sse"), normalise(ref, "sse")
                if len(a) == len(b):
                    r.check += f"; median SSE / statsmodels {np.nanmedian(a['sse'] / b['sse']):.4f}"
        r.out = None
    return results


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def report(title: str, results: list[Result], unit: str) -> str:
    spark = next((r for r in results if r.system.startswith("PySpark") and r.error is None), None)
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.system, "FAILED", "-", "-", "-", "-", r.error])
            continue
        vs = ratio(spark.seconds / r.seconds) if spark is not None and r is not spark else "-"
        rows.append([r.system, fmt_s(r.seconds), fmt_n(r.groups / r.seconds), f"{1e6 * r.seconds / r.groups:,.1f}",
                     vs, f"{r.others:.2f}", r.check])
    out = [f"### {title}", "", markdown_table(["system", "seconds", f"{unit}/s", f"µs/{'group' if unit == 'groups' else 'series'}", "vs PySpark",
                                               "other load", "output check"], rows, align="lrrrrrl"), ""]
    out += [f"- {r.system}: {r.note}" for r in results if r.note]
    return "\n".join(out)


def targets(noop: list[Result], ets: list[Result], groups: int) -> list[str]:
    def get(rs, prefix):
        return next((r for r in rs if r.system.startswith(prefix) and r.error is None), None)

    lines = []
    sp, mp, ma = get(noop, "PySpark"), get(noop, "modelfactory.apply, pandas"), get(noop, "modelfactory.apply(input")
    note = "" if groups == 100_000 else f" (targets are set at 100,000 groups; this is {groups:,})"
    if sp and mp:
        x = sp.seconds / mp.seconds
        lines.append(f"noop: modelfactory pandas path vs PySpark: {x:.1f}x (target >= 10x){note}: "
                     f"{'MET' if x >= 10 else 'MISSED'}")
    if sp and ma:
        x = sp.seconds / ma.seconds
        lines.append(f"noop: modelfactory array path vs PySpark: {x:.0f}x (target >= 200x){note}: "
                     f"{'MET' if x >= 200 else 'MISSED'}")
    for name, rs, mine_prefix in (("noop", noop, "modelfactory"), ("ets", ets, "modelfactory.train")):
        mine = [r for r in rs if r.system.startswith(mine_prefix) and r.error is None]
        anchors = [r for r in rs if not r.system.startswith("modelfactory") and r.error is None]
        if not mine or not anchors:
            continue
        for m in mine:
            fastest = min(anchors, key=lambda r: r.seconds)
            x = fastest.seconds / m.seconds
            lines.append(f"{name}: {m.system} ahead of every anchor (fastest anchor: {fastest.system}, "
                         f"{x:.2f}x): {'MET' if x > 1 else 'MISSED'}")
    return lines


def profile_inline(args, tmp: str, system: str, top: int) -> str:
    """Run a modelfactory no-op path with cluster='inline' under cProfile; the top functions."""
    import cProfile
    import io
    import pstats

    import modelfactory

    data = write_grouped_dataset(os.path.join(tmp, "profile"), args.groups, rows_per_group=48, apps=100)
    func, input = (mean_value, "pandas") if system == "mf-pandas" else (mean_value_arrays, "numpy")
    modelfactory.apply(data.path, by=BY, func=func, schema=NOOP_SCHEMA, input=input, cluster="inline",
                       filter=None).to_pandas()  # warm (imports, caches)
    _turn(f"profile {system}")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run = modelfactory.apply(data.path, by=BY, func=func, schema=NOOP_SCHEMA, input=input, cluster="inline")
    res = run.to_pandas()
    prof.disable()
    secs = time.perf_counter() - t0
    compare_frames(res, data.expected, "mean", TOLERANCE, relative=False)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return (f"### cProfile: {system}, cluster='inline', {args.groups:,} groups: {secs:.2f}s under the profiler "
            f"({run.summary['units']} units, unit seconds {run.summary['unit_seconds']:.2f})\n\n```\n"
            f"{buf.getvalue()}```")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10,000 no-op groups, 100 ETS series")
    p.add_argument("--groups", type=int, default=100_000, help="no-op groups (default 100,000)")
    p.add_argument("--series", type=int, default=1000, help="ETS series (default 1,000)")
    p.add_argument("--ets-apps", type=int, default=20, help="app folders of the ETS data (default 20)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="no-op workload: run each modelfactory system N times, half before the anchors and "
                        "half after, and report the median (default 1)")
    p.add_argument("--columns", choices=("all", "used"), default="all",
                   help="no-op workload: every system reads every column (default, as spark.read.parquet and "
                        "modelfactory.apply do unless told), or only the three the function uses, each "
                        "the way its users would (select / columns=), as benchmarks/overhead.py does")
    p.add_argument("--workloads", default="noop,ets")
    p.add_argument("--only", default="mf-pandas,mf-array,mf-hw,mf-es,spark,dask,sf,sf1",
                   help="systems: mf-pandas, mf-array, mf-hw, mf-es, spark, dask, sf (n_jobs=2), sf1 (n_jobs=1)")
    p.add_argument("--statsforecast-python", default=os.environ.get("MF_STATSFORECAST_PYTHON", _default_sf_python()),
                   help="python of an environment with statsforecast (default %(default)s)")
    p.add_argument("--quiet", type=float, default=None, metavar="CORES",
                   help="before each timing, also wait (up to --quiet-timeout s) until processes outside "
                        "this one use fewer than CORES cores (default 0.3; with --quick -1: skip)")
    p.add_argument("--quiet-timeout", type=float, default=60.0)
    p.add_argument("--profile", default=None, metavar="SYSTEM",
                   help="only profile mf-pandas or mf-array on the no-op data with cluster='inline' (cProfile)")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--tmp", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    global TURN
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.groups, args.series = 10_000, 100
    if args.repeat < 1:
        print("error: --repeat takes a whole number of runs, 1 or more", file=sys.stderr)
        return 2
    TURN = turn_taker(args)
    if args.profile:
        if args.profile not in ("mf-pandas", "mf-array"):
            print("error: --profile takes mf-pandas or mf-array", file=sys.stderr)
            return 2
        print_machine("modelfactory no-op path under cProfile", argv, PACKAGES)
        with tempfile.TemporaryDirectory(prefix="mf-compare-", dir=args.tmp) as tmp:
            print(profile_inline(args, tmp, args.profile, args.profile_top))
        return 0
    only = {s.strip() for s in args.only.split(",")}
    workloads = {w.strip() for w in args.workloads.split(",")}
    sf_python = args.statsforecast_python
    sf_version = "not run"
    if sf_python and os.path.exists(sf_python):
        v = subprocess.run([sf_python, "-c", "import statsforecast, pandas; print(statsforecast.__version__, "
                            "pandas.__version__)"], capture_output=True, text=True, check=False)
        sf_version = (f"statsforecast {v.stdout.split()[0]} (pandas {v.stdout.split()[1]}) in {sf_python}"
                      if v.returncode == 0 else f"cannot import statsforecast with {sf_python}")
        if v.returncode != 0:
            args.statsforecast_python = None
    else:
        args.statsforecast_python = None
    print_machine("modelfactory against PySpark, dask.dataframe and statsforecast", argv, PACKAGES,
                  {"statsforecast": sf_version, "java": _java_version()})
    noop: list[Result] = []
    ets: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mf-compare-", dir=args.tmp) as tmp:
        lc, client = local_cluster(args.workers)
        spark = None
        try:
            if "spark" in only:
                t0 = time.perf_counter()
                spark = spark_session(args.workers)
                print(f"[spark] session started in {time.perf_counter() - t0:.1f}s (not timed)", file=sys.stderr)
            if "noop" in workloads:
                noop = noop_workload(args, tmp, client, spark, only)
            if "ets" in workloads:
                ets = ets_workload(args, tmp, client, spark, only)
        finally:
            if spark is not None:
                spark.stop()
            client.close()
            lc.close()
    if noop:
        print(report(f"No-op grouped map: {args.groups:,} groups x 48 rows ({args.groups * 48:,} rows, 100 app "
                     f"folders), {args.workers} cores", noop, "groups"))
        print()
    if ets:
        print(report(f"ETS: {args.series:,} hourly series x 168 points, season 24 ({args.ets_apps} app folders)",
                     ets, "series"))
        print()
    print("Notes:")
    print("- Every timing includes reading the Parquet and returning the results to this process (pandas); "
          "modelfactory.train instead commits the models to a store. Spark session start-up is NOT timed "
          "(started once, before everything). Each system ran once on a small warm-up dataset first.")
    print("- modelfactory and dask share one LocalCluster, the one a modelfactory job makes by default: 2 worker "
          "processes x 1 thread, Dask's worker profiler off. PySpark: local[2], "
          "spark.sql.execution.arrow.pyspark.enabled=true, default shuffle partitions and AQE, driver "
          "memory 4g; its Python workers run this interpreter. statsforecast runs in a subprocess that "
          "times itself (the interpreter named above: it pins pandas<3); OMP_NUM_THREADS=1 there, as "
          "Dask and Spark give their workers.")
    print("- vs PySpark = PySpark seconds / this system's seconds (for ETS: PySpark running statsmodels). "
          "other load = cores used by processes outside this benchmark during the timing (/proc/stat).")
    print("- ETS accuracy: median over series of in-sample SSE / statsmodels ExponentialSmoothing's SSE "
          "(modelfactory holt_winters: computed untimed with the same fit_batch on the same series).")
    lines = targets(noop, ets, args.groups)
    if lines:
        print("\nTargets:")
        print("\n".join(f"- {x}" for x in lines))
    failed = [r for r in noop + ets if r.error]
    if failed:
        print("\nerror: some systems failed or returned other results:", file=sys.stderr)
        for r in failed:
            print(f"  {r.workload} {r.system}: {r.error}", file=sys.stderr)
        return 1
    return 0


def _java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
        return (out.stderr or out.stdout).splitlines()[0]
    except (OSError, IndexError):
        return "not found"


if __name__ == "__main__":
    sys.exit(main())
