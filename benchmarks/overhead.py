"""Per-group overhead of a grouped map: modelfactory against pandas and Dask.

Times, side by side on the same generated data (groups of 48 rows, Hive-
partitioned by ``app``), the same tiny per-group function -- it returns one row:
the keys and the mean of ``value`` -- run by:

========== ================================================================
pandas      ``df.groupby(...).apply`` in this process, data already in memory
dask        ``dd.read_parquet(...).groupby(...).apply`` on the cluster
futures     one Dask future per group, each reading its group with a filter
mf-pandas   ``modelfactory.apply`` with the pandas function
mf-array    ``modelfactory.apply(input="numpy")`` with the array function
*-out       the same two with ``out=`` (workers write Parquet)
mf-pandas-floor  pandas input, a function that returns constants: the
            framework's own cost on the pandas path (output not checked)
========== ================================================================

Every system hands the function the same columns (``app``, ``site``, ``value``:
pandas and dask select them after the groupby, modelfactory reads them with
``columns=``).  Every Dask-based system runs on one ``LocalCluster`` made
once, the one a modelfactory job makes by default (``modelfactory.run.local_cluster``:
``--workers`` processes, one thread each, Dask's worker profiler off); its
workers are restarted and warmed up on a small dataset before each system
(``--no-restart`` keeps them).  Every output is checked against means
computed with numpy when the data was written; a mismatch exits with status 1.

Besides wall time, each row shows the CPU seconds used (this process and the
workers) and how many cores *other* processes used meanwhile: on a shared
2-core machine that column says whether a row can be trusted.  ``--quiet``
waits for a quiet machine before each timing, ``--repeat`` keeps the best of
several runs, and by default the script waits its turn while another
benchmark script runs.

Usage::

    python benchmarks/overhead.py --groups 10000,100000
    python benchmarks/overhead.py --groups 1000000 --only mf-array
    python benchmarks/overhead.py --groups 100000 --only 'mf-*' --repeat 3 --quiet 0.2
    python benchmarks/overhead.py --groups 100000 --only mf-pandas,mf-array --profile mf-pandas

``--markdown`` prints the tables as Markdown (for docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import cProfile
import fnmatch
import functools
import gc
import io
import logging
import math
import os
import pstats
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
# Measure the modelfactory of this checkout, not whatever is installed (an editable install may
# point at another clone).  Dask's spawned workers inherit sys.path, so they import it too.
sys.path[:0] = [os.path.dirname(HERE), HERE]
from _common import (  # after the sys.path line, on purpose
    GroupedDataset,
    Timer,
    busy_cpu_seconds,
    fmt_int,
    fmt_sec,
    format_table,
    load_average,
    machine_info,
    parse_sizes,
    wait_for_quiet,
    wait_for_turn,
    write_grouped_dataset,
)

BY = ["app", "site"]
# What every system hands the function: pandas and dask select these after the groupby,
# modelfactory reads just these (``columns=``); the data's ``ts`` column is left out by all.
COLUMNS = [*BY, "value"]
SCHEMA = "app string, site string, mean double"
TOLERANCE = 1e-9


# ---------------------------------------------------------------------------
# the per-group functions (defined here, in the script, so Dask pickles them
# by value: the workers need nothing but the installed libraries)
# ---------------------------------------------------------------------------
def mean_value(df):
    return pd.DataFrame({"app": [df["app"].iloc[0]], "site": [df["site"].iloc[0]], "mean": [df["value"].mean()]})


def mean_value_arrays(g):
    return {"app": g["app"][:1], "site": g["site"][:1], "mean": np.array([g["value"].mean()])}


_ONE_APP, _ONE_MEAN = np.array(["-"], dtype=object), np.array([0.0])


def floor_value(df):
    """The framework's own cost: a pandas-input function that does nothing (its rows are constants,
    so this system's output is not checked)."""
    return {"app": _ONE_APP, "site": _ONE_APP, "mean": _ONE_MEAN}


def read_group_and_apply(root: str, key: tuple[str, str]) -> pd.DataFrame:
    """One task per group: read the group from its partition folder with a filter, then apply."""
    app, site = key
    table = pq.read_table(os.path.join(root, f"app={app}"), columns=["site", "value"],
                          filters=[("site", "==", site)])
    df = table.to_pandas()
    df.insert(0, "app", app)
    return mean_value(df)


def _process_cpu() -> float:
    return time.process_time()


def _modelfactory_file() -> str:
    import modelfactory

    return os.path.dirname(os.path.abspath(modelfactory.__file__))


class Measure:
    """Wall seconds, and CPU seconds of this process (client and scheduler) plus every worker.

    On a 2-core machine shared with other work the wall time swells; the CPU
    seconds much less, so both are reported.
    """

    def __init__(self, client=None) -> None:
        self.client = client
        self.seconds = self.cpu = self.others = float("nan")

    def _cpu(self) -> float:
        workers = sum(self.client.run(_process_cpu).values()) if self.client is not None else 0.0
        return time.process_time() + workers

    def __enter__(self) -> Measure:
        self._c0 = self._cpu()
        self._b0 = busy_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        busy = busy_cpu_seconds() - self._b0
        self.cpu = self._cpu() - self._c0
        # cores' worth of CPU that other processes used meanwhile (nannies etc. count too)
        self.others = max(0.0, busy - self.cpu) / self.seconds


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
class VerificationError(AssertionError):
    """A system returned other rows or other means than the reference."""


@dataclass
class Result:
    system: str
    label: str
    seconds: float  # measured
    groups_timed: int  # groups in the measured run
    groups_total: int  # groups of the dataset
    note: str = ""
    cpu: float = float("nan")  # CPU seconds, this process + workers, for the groups timed
    others: float = float("nan")  # cores used by other processes during the run
    extra: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def extrapolated(self) -> bool:
        return self.groups_timed != self.groups_total

    @property
    def full_seconds(self) -> float:
        """Seconds for all groups (extrapolated linearly when only some were timed)."""
        return self.seconds * self.groups_total / self.groups_timed

    @property
    def groups_per_second(self) -> float:
        return self.groups_timed / self.seconds

    @property
    def us_per_group(self) -> float:
        return 1e6 * self.seconds / self.groups_timed


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Columns app, site (str), mean; sorted; a fresh index (Dask adds key index levels)."""
    out = pd.DataFrame({"app": np.asarray(df["app"].astype(str), dtype=object),
                        "site": np.asarray(df["site"].astype(str), dtype=object),
                        "mean": np.asarray(df["mean"], dtype=np.float64)})
    return out.sort_values(BY, ignore_index=True)


def verify(system: str, got: pd.DataFrame, expected: pd.DataFrame) -> None:
    got = normalise(got)
    if len(got) != len(expected):
        raise VerificationError(f"{system}: {len(got):,} rows, expected {len(expected):,}")
    for k in BY:
        bad = np.flatnonzero(got[k].to_numpy() != expected[k].to_numpy())
        if len(bad):
            i = bad[0]
            raise VerificationError(f"{system}: {len(bad):,} rows with other keys, first at row {i}: "
                                    f"{tuple(got.loc[i, BY])} != {tuple(expected.loc[i, BY])}")
    diff = np.abs(got["mean"].to_numpy() - expected["mean"].to_numpy())
    worst = float(np.nanmax(diff)) if len(diff) else 0.0
    if not worst <= TOLERANCE:  # also catches NaN
        i = int(np.nanargmax(diff))
        raise VerificationError(f"{system}: means differ by up to {worst:.3g} (> {TOLERANCE:g}), "
                                f"first worst at {tuple(expected.loc[i, BY])}")


# ---------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------
@dataclass
class Context:
    data: GroupedDataset
    client: object
    workers: int
    tmp: str
    max_future_groups: int
    repeat: int


def _best(repeat: int, fn: Callable[[], tuple[Measure, object]]) -> tuple[Measure, object]:
    best, out = None, None
    for _ in range(repeat):
        gc.collect()
        m, res = fn()
        if repeat > 1:
            print(f"    run: {m.seconds:.3f}s wall, {m.cpu:.3f}s CPU, other load {m.others:.2f}",
                  file=sys.stderr, flush=True)
        if best is None or m.seconds < best.seconds:
            best, out = m, res
    return best, out


def run_pandas(ctx: Context) -> list[Result]:
    """Apply only (frame already in memory), and read + apply (the read timed separately)."""
    d = ctx.data
    with Measure() as tr:
        df = pd.read_parquet(d.path, columns=COLUMNS)
    gb_cols = COLUMNS

    def once():
        with Measure() as t:
            out = df.groupby(BY, group_keys=False, observed=True)[gb_cols].apply(mean_value)
        return t, out

    m, out = _best(ctx.repeat, once)
    verify("pandas", out, d.expected)
    note = ("in this process; keys selected after groupby ([app, site, value]) so the function sees "
            "them without pandas' include_groups FutureWarning (include_groups=False would drop them); "
            "observed=True (app is categorical, read from the Hive folders)")
    return [Result("pandas", "pandas groupby-apply (apply only)", m.seconds, d.groups, d.groups,
                   note + "; Parquet read NOT timed", m.cpu, m.others),
            Result("pandas+read", "pandas groupby-apply (read+apply)", tr.seconds + m.seconds, d.groups,
                   d.groups, f"pd.read_parquet {tr.seconds:.2f}s + the apply above", tr.cpu + m.cpu,
                   m.others)]


def run_dask(ctx: Context) -> list[Result]:
    import dask.dataframe as dd

    d = ctx.data
    meta = pd.DataFrame({"app": pd.Series(dtype=object), "site": pd.Series(dtype=object),
                         "mean": pd.Series(dtype="float64")})

    def once():
        with Measure(ctx.client) as t:
            ddf = dd.read_parquet(d.path)
            out = ddf.groupby(BY, observed=True)[COLUMNS].apply(mean_value, meta=meta).compute()
        return t, out

    m, out = _best(ctx.repeat, once)
    verify("dask", out, d.expected)
    note = ("read_parquet + shuffle + apply + result to the client, all timed; same groupby "
            "arguments as pandas")
    return [Result("dask", "dask.dataframe groupby-apply", m.seconds, d.groups, d.groups, note, m.cpu,
                   m.others)]


def run_futures(ctx: Context) -> list[Result]:
    d = ctx.data
    n = min(d.groups, ctx.max_future_groups)
    # An even spread of keys over the whole dataset (every app), chosen before the timer.
    pick = np.unique(np.linspace(0, d.groups - 1, n).round().astype(np.int64))
    expected = d.expected.iloc[pick].reset_index(drop=True)
    keys = list(zip(expected["app"], expected["site"]))
    fn = functools.partial(read_group_and_apply, d.path)

    def once():
        with Measure(ctx.client) as t:
            futures = ctx.client.map(fn, keys, pure=False)
            parts = ctx.client.gather(futures)
            out = pd.concat(parts, ignore_index=True)
        del futures
        return t, out

    m, out = _best(ctx.repeat, once)
    verify("futures", out, expected)
    note = "client.map(read group with a pyarrow filter + apply, keys); gather + concat timed"
    if len(keys) != d.groups:
        note += f"; EXTRAPOLATED linearly from {len(keys):,} of {d.groups:,} groups"
    return [Result("futures", "one Dask future per group", m.seconds, len(keys), d.groups, note, m.cpu,
                   m.others)]


def _mf(ctx: Context, system: str, func, input: str, out: bool, check: bool = True) -> list[Result]:
    import modelfactory

    d = ctx.data

    def once():
        target = tempfile.mkdtemp(prefix=f"{system}-", dir=ctx.tmp) if out else None
        with Measure(ctx.client) as t:
            run = modelfactory.apply(d.path, by=BY, func=func, schema=SCHEMA, input=input, columns=COLUMNS,
                                     cluster=ctx.client, out=target, overwrite=out)
            res = None if out else run.to_pandas()
        return t, (run, res)

    m, (run, res) = _best(ctx.repeat, once)
    if check:
        verify(system, run.to_pandas() if out else res, d.expected)
    groups = run.groups
    extra = {
        "wall": run.summary["wall_seconds"],
        "units": run.summary["units"],
        "unit_seconds": run.summary["unit_seconds"],
        "func_seconds": float(groups["seconds"].sum()),
    }
    how = "results written by the workers (out=), not returned" if out else "results returned, to_pandas() timed"
    label = f"modelfactory.apply, {'pandas' if input == 'pandas' else 'array'} function"
    if not check:
        label, how = "modelfactory.apply, pandas input, function returning constants", how + " (not checked)"
    return [Result(system, label + (", out=" if out else ""), m.seconds, d.groups, d.groups,
                   f"discover + plan + read Parquet + run + {how}", m.cpu, m.others, extra)]


SYSTEMS: dict[str, Callable[[Context], list[Result]]] = {
    "pandas": run_pandas,
    "dask": run_dask,
    "futures": run_futures,
    "mf-pandas": lambda ctx: _mf(ctx, "mf-pandas", mean_value, "pandas", False),
    "mf-array": lambda ctx: _mf(ctx, "mf-array", mean_value_arrays, "numpy", False),
    "mf-pandas-out": lambda ctx: _mf(ctx, "mf-pandas-out", mean_value, "pandas", True),
    "mf-array-out": lambda ctx: _mf(ctx, "mf-array-out", mean_value_arrays, "numpy", True),
    # the framework's floor on the pandas path: the same run with a function that does nothing
    "mf-pandas-floor": lambda ctx: _mf(ctx, "mf-pandas-floor", floor_value, "pandas", False, check=False),
}


def select(only: str | None) -> list[str]:
    if not only:
        return list(SYSTEMS)
    chosen = []
    for pat in (p.strip() for p in only.split(",") if p.strip()):
        hits = [s for s in SYSTEMS if fnmatch.fnmatchcase(s, pat)]
        if not hits:
            raise SystemExit(f"error: --only {pat!r} matches no system; choose from {', '.join(SYSTEMS)}")
        chosen += [h for h in hits if h not in chosen]
    return [s for s in SYSTEMS if s in chosen]


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------
def report(data: GroupedDataset, results: list[Result], workers: int, markdown: bool,
           load: tuple[str, str] = ("", ""), restarted: bool = True) -> str:
    by = {r.system: r for r in results if r.error is None}
    base_pd = by.get("pandas")
    base_dd = by.get("dask")

    def ratio(r: Result, base: Result | None) -> str:
        if base is None or r.system == base.system:
            return "-"
        return f"{base.full_seconds / r.full_seconds:.2f}x"

    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.label, "FAILED", "-", "-", "-", "-", "-"])
            continue
        secs = fmt_sec(r.full_seconds) + ("*" if r.extrapolated else "")
        cpu_us = 1e6 * r.cpu / r.groups_timed
        rows.append([r.label, fmt_int(r.groups_timed), secs, fmt_int(r.groups_per_second),
                     f"{r.us_per_group:,.1f}", ratio(r, base_pd), ratio(r, base_dd),
                     "-" if math.isnan(cpu_us) else f"{cpu_us:,.1f}",
                     "-" if math.isnan(r.others) else f"{r.others:.2f}"])
    headers = ["system", "groups timed", "seconds", "groups/s", "µs/group", "vs pandas", "vs dask",
               "CPU µs/group", "other load"]
    title = (f"{data.groups:,} groups x {data.rows_per_group} rows ({data.rows:,} rows, "
             f"{data.apps} app partitions), {workers} workers x 1 thread")
    out = [("### " if markdown else "== ") + title, "", format_table(headers, rows, markdown=markdown), ""]
    notes = [("'vs pandas' = pandas apply-only seconds / this system's seconds (speed-up); "
              "'vs dask' likewise against dask groupby-apply. All wall-clock."),
             ("CPU µs/group = CPU seconds of this process (client + scheduler) and all workers during "
              "the run, per group: the cost of the work on any number of cores, and less sensitive "
              "than wall time to other load on the machine."),
             ("other load = cores' worth of CPU that other processes on the machine used during the "
              "run (from /proc/stat); above ~0.1 the wall-clock numbers of that row are inflated.")]
    notes.append(("Dask workers restarted, then warmed up on a 200-group dataset, before each system"
                  if restarted else "the same Dask workers for every system (--no-restart), warmed up "
                  "on a 200-group dataset before each") + "; the data written before any timing.")
    if any(r.extrapolated for r in results):
        notes.append("* extrapolated linearly to all groups from the groups timed; groups/s and "
                     "µs/group are measured on those groups.")
    notes += [f"{r.system}: {r.note}" for r in results if r.note]
    notes += [f"{r.system}: FAILED: {r.error}" for r in results if r.error]
    if load[0]:
        notes.append(f"machine {load[0]} before this size, {load[1]} after (anything else running "
                     "on the 2 cores skews the numbers)")
    out += [("- " if markdown else "  ") + n for n in notes]
    mf = [r for r in results if r.extra and r.error is None]
    if mf:
        out += ["", "modelfactory: where the time goes (from run.summary and run.groups)", ""]
        brows = []
        for r in mf:
            e = r.extra
            kernel = e["unit_seconds"] / workers  # per worker, assuming balanced units
            func = e["func_seconds"] / workers
            outside = r.seconds - kernel
            brows.append([r.system, fmt_sec(r.seconds), str(e["units"]), fmt_sec(kernel), fmt_sec(func),
                          fmt_sec(kernel - func), fmt_sec(outside), f"{100 * outside / r.seconds:.0f}%"])
        out.append(format_table(["system", "total s", "units", "kernel s/worker", "in func s/worker",
                                 "kernel excl. func", "outside kernel s", "outside %"], brows,
                                markdown=markdown, align="lrrrrrrr"))
        out += ["", ("- " if markdown else "  ") +
                "kernel = sum of the work units' own seconds (read + split + run + collect [+ write]) / "
                "workers; outside = total - kernel: discovery, planning, scheduling, moving results, "
                "concat, to_pandas, and any imbalance between workers."]
    targets = []
    mp, ma = by.get("mf-pandas"), by.get("mf-array")
    if mp and base_pd:
        x = base_pd.full_seconds / mp.full_seconds
        targets.append(f"mf-pandas vs pandas groupby-apply: {x:.2f}x (target >= 3.5x) "
                       f"{'MET' if x >= 3.5 else 'MISSED'}")
    if mp and base_dd:
        x = base_dd.full_seconds / mp.full_seconds
        targets.append(f"mf-pandas vs dask groupby-apply: {x:.2f}x (target >= 2x) "
                       f"{'MET' if x >= 2 else 'MISSED'}")
    if ma:
        targets.append(f"mf-array: {ma.groups_per_second:,.0f} groups/s (target >= 150,000) "
                       f"{'MET' if ma.groups_per_second >= 150_000 else 'MISSED'}")
    if targets:
        hdr = "targets (set for 100,000 groups on 2 cores)" + ("" if data.groups == 100_000 else
                                                               f"; this is {data.groups:,} groups")
        out += ["", hdr + ":"] + [("- " if markdown else "  ") + t for t in targets]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# profiling (inline, one process)
# ---------------------------------------------------------------------------
def profile_inline(data: GroupedDataset, system: str, top: int) -> str:
    """Run a modelfactory system with ``cluster="inline"`` under cProfile; the top functions."""
    import modelfactory

    func, input = (mean_value, "pandas") if system.startswith("mf-pandas") else (mean_value_arrays, "numpy")
    prof = cProfile.Profile()
    with Timer() as t:
        prof.enable()
        run = modelfactory.apply(data.path, by=BY, func=func, schema=SCHEMA, input=input, columns=COLUMNS,
                                 cluster="inline")
        res = run.to_pandas()
        prof.disable()
    verify(f"{system} (inline)", res, data.expected)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return (f"== cProfile of {system} with cluster='inline' on {data.groups:,} groups: "
            f"{t.seconds:.2f}s under the profiler\n{buf.getvalue()}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overhead.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="10000,100000",
                   help="comma-separated group counts (10k, 1m allowed); default %(default)s")
    p.add_argument("--workers", type=int, default=2, help="Dask workers, 1 thread each (default 2)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated systems or globs (e.g. 'mf-*'); from: {', '.join(SYSTEMS)}")
    p.add_argument("--max-future-groups", type=int, default=10_000,
                   help="time the one-future-per-group system on at most this many groups and "
                        "extrapolate (default %(default)s)")
    p.add_argument("--rows-per-group", type=int, default=48)
    p.add_argument("--apps", type=int, default=100, help="Hive partitions (app=...) (default 100)")
    p.add_argument("--repeat", type=int, default=1, help="time each system this many times, keep the best")
    p.add_argument("--tmp", default=None, help="folder for the generated data (default: system temp)")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--profile", default=None, metavar="SYSTEM",
                   help="also run mf-pandas or mf-array with cluster='inline' under cProfile at the "
                        "largest size")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--quiet", type=float, default=None, metavar="CORES",
                   help="before each timing, wait (up to --quiet-timeout s) until other processes "
                        "use less than CORES cores (for shared machines)")
    p.add_argument("--quiet-timeout", type=float, default=120.0)
    p.add_argument("--wait-turn", type=float, default=1200.0, metavar="SECONDS",
                   help="before each timing, wait up to this long while another benchmark script "
                        "(benchmarks/million.py, heavy.py, ...) runs; 0 to not wait (default %(default)s)")
    p.add_argument("--no-restart", action="store_true",
                   help="keep the same worker processes for every system (default: restart the "
                        "workers before each system, so none inherits another's heap)")
    return p


def _warm_up(ctx: Context, system: str, restart: bool) -> None:
    """Give ``system`` fresh workers (``restart``) and run it once on a small dataset: imports on
    the workers and in this process happen here, not in the timing."""
    if restart and ctx.client is not None and system != "pandas":
        ctx.client.restart(wait_for_workers=True)
    SYSTEMS[system](ctx)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.groups)
    except ValueError as err:
        print(f"error: --groups: {err}", file=sys.stderr)
        return 2
    systems = select(args.only)
    if args.profile and args.profile not in ("mf-pandas", "mf-array"):
        print("error: --profile takes mf-pandas or mf-array", file=sys.stderr)
        return 2
    # Dask's own chatter (e.g. about the p2p shuffle) is not what is measured.
    warnings.filterwarnings("ignore", category=UserWarning, module="distributed")
    logging.getLogger("distributed").setLevel(logging.ERROR)

    info = machine_info()
    info["modelfactory path"] = _modelfactory_file()
    md = args.markdown
    print(("## " if md else "") + "modelfactory overhead benchmark")
    print()
    for k, v in info.items():
        print(f"{'- ' if md else ''}{k}: {v}")
    print(f"{'- ' if md else ''}command: python benchmarks/overhead.py {' '.join(argv or sys.argv[1:])}")
    print()
    sys.stdout.flush()

    need_cluster = any(s != "pandas" for s in systems)
    failed = False
    with tempfile.TemporaryDirectory(prefix="mf-overhead-", dir=args.tmp) as tmp:
        client = cluster = None
        if need_cluster:
            from distributed import Client

            from modelfactory.run import local_cluster

            cluster = local_cluster(args.workers, silence_logs=logging.CRITICAL)
            client = Client(cluster)
            here = _modelfactory_file()
            there = set(client.run(_modelfactory_file).values())
            if there != {here}:
                print(f"error: the workers import modelfactory from {sorted(there)}, this process from "
                      f"{here}", file=sys.stderr)
                return 2
        try:
            datasets = []
            for n in sizes:  # all data written before anything is timed
                with Timer() as t:
                    datasets.append(write_grouped_dataset(os.path.join(tmp, f"data-{n}"), n,
                                                          rows_per_group=args.rows_per_group,
                                                          apps=args.apps))
                print(f"wrote {n:,} groups ({datasets[-1].rows:,} rows) in {t.seconds:.1f}s", file=sys.stderr)
            small = write_grouped_dataset(os.path.join(tmp, "warm-up"), 200, apps=4,
                                          rows_per_group=args.rows_per_group)
            warm = Context(small, client, args.workers, tmp, args.max_future_groups, 1)
            for data in datasets:
                ctx = Context(data, client, args.workers, tmp, args.max_future_groups, args.repeat)
                results: list[Result] = []
                load0 = load_average()
                for s in systems:
                    _warm_up(warm, s, not args.no_restart)
                    if args.wait_turn > 0:
                        wait_for_turn(args.wait_turn)
                    if args.quiet is not None:
                        used = wait_for_quiet(args.quiet, args.quiet_timeout)
                        print(f"[{data.groups:,}] other processes use {used:.2f} cores", file=sys.stderr)
                    print(f"[{data.groups:,}] {s} ...", file=sys.stderr, flush=True)
                    try:
                        got = SYSTEMS[s](ctx)
                    except VerificationError as err:
                        failed = True
                        got = [Result(s, s, float("nan"), data.groups, data.groups, error=str(err))]
                    results += got
                    for r in got:
                        print(f"[{data.groups:,}] {r.system}: "
                              + (f"{r.seconds:.3f}s" if r.error is None else f"FAILED {r.error}"),
                              file=sys.stderr, flush=True)
                print(report(data, results, args.workers, md, (load0, load_average()), not args.no_restart))
                print()
                sys.stdout.flush()
            if args.profile:
                print(profile_inline(datasets[-1], args.profile, args.profile_top))
        finally:
            if client is not None:
                client.close()
                cluster.close()
    if failed:
        print("error: some systems returned wrong results (see FAILED above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
