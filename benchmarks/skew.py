"""Skew: one group of 5,000,000 rows among 100,000 small ones -- no OOM, and no straggler.

The data is Hive-partitioned by ``app``: 100,000 groups (app, site) of 48 hourly rows in 100 app
folders (the no-op data of benchmarks/overhead.py), plus one group of 5,000,000 rows (one point a
minute, about 9.5 years) alone in its own folder ``app=app-big``.  ``seasonal`` is trained per
group with ``modelfactory.train`` on a 2-worker LocalCluster (one thread each, warmed up first).

Target: the run completes without running out of memory, and

    wall <= 1.5 x max(big group's own fit time, total fit time / workers)

where the big group's own fit time is measured by training it alone (``filter=app == app-big``,
its unit's seconds from that run's manifest), and the total fit time is the sum of the unit
seconds in the full run's manifest (each unit: read + fit + serialise + write its part).  Peak
RSS is that of the whole process tree (client, scheduler, workers), sampled every 0.1 s.

Usage::

    python benchmarks/skew.py            # 5,000,000-row group + 100,000 groups of 48 rows
    python benchmarks/skew.py --quick    # 500,000-row group + 10,000 groups
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import (Measure, PeakRSS, fmt_s, local_cluster, markdown_table, print_machine,  # noqa: E402
                    turn_taker)
from _common import write_grouped_dataset  # noqa: E402

BY = ["app", "site"]
BIG_APP = "app-big"
PACKAGES = ("modelfactory", "dask", "distributed", "pandas", "numpy", "pyarrow", "psutil")


def write_big_group(root: str, rows: int, seed: int = 0) -> None:
    """One series of ``rows`` points a minute apart, alone in ``root/app=app-big/``."""
    rng = np.random.default_rng(seed)
    t0 = np.datetime64("2017-01-01T00:00:00", "s")
    i = np.arange(rows, dtype=np.int64)
    ts = t0 + (i * 60).astype("timedelta64[s]")
    value = 200 + 30 * np.sin(2 * np.pi * (i % 1440) / 1440) + rng.standard_normal(rows) * 5
    table = pa.table({"site": pa.array(np.full(rows, "site-big", dtype=object), pa.string()),
                      "ts": pa.array(ts, pa.timestamp("s", tz="UTC")), "value": value})
    folder = os.path.join(root, f"app={BIG_APP}")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, "part-0.parquet"), compression="zstd")


def train(data: str, store: str, client, **kw):
    import modelfactory

    shutil.rmtree(store, ignore_errors=True)
    return modelfactory.train(data, by=BY, time="ts", target="value", model="seasonal", store=store,
                              cluster=client, **kw)


def unit_seconds(store: str) -> list[float]:
    import modelfactory

    return [u["seconds"] for u in modelfactory.ModelStore(store).manifest()["units"]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skew.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500,000-row big group, 10,000 small groups")
    p.add_argument("--big-rows", type=int, default=5_000_000)
    p.add_argument("--groups", type=int, default=100_000, help="small groups of 48 rows")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", type=float, default=None, metavar="CORES",
                   help="before each timing, also wait (up to --quiet-timeout s) until processes outside "
                        "this one use fewer than CORES cores (default 0.3; with --quick -1: skip)")
    p.add_argument("--quiet-timeout", type=float, default=60.0)
    p.add_argument("--tmp", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.big_rows, args.groups = 500_000, 10_000
    turn = turn_taker(args)
    print_machine("modelfactory: one huge group among many small ones", argv, PACKAGES)
    with tempfile.TemporaryDirectory(prefix="mf-skew-", dir=args.tmp) as tmp:
        data = os.path.join(tmp, "data")
        write_grouped_dataset(data, args.groups, rows_per_group=48, apps=100)
        write_big_group(data, args.big_rows)
        warm = os.path.join(tmp, "warm")
        write_grouped_dataset(warm, 200, rows_per_group=48, apps=4)
        write_big_group(warm, 10_000)
        lc, client = local_cluster(args.workers)
        try:
            train(warm, os.path.join(tmp, "store-warm"), client)  # warm-up, not timed
            turn("skew: big group alone")
            alone_store = os.path.join(tmp, "store-big")
            with PeakRSS() as mem_alone, Measure() as m_alone:
                alone = train(data, alone_store, client, filter=pds.field("app") == BIG_APP)
            big_fit = sum(unit_seconds(alone_store))
            turn("skew: full run")
            full_store = os.path.join(tmp, "store-full")
            with PeakRSS() as mem, Measure() as m:
                run = train(data, full_store, client)
            units = unit_seconds(full_store)
            total_fit = sum(units)
        finally:
            client.close()
            lc.close()
    n = args.groups + 1
    c = run.summary["counts"]
    rows = [
        ["big group alone (filter app == app-big)", f"{alone.summary['groups']:,}", f"{alone.summary['rows']:,}",
         fmt_s(m_alone.seconds), str(alone.summary["units"]), fmt_s(big_fit), "-",
         f"{mem_alone.peak / 2**30:.2f}", f"{alone.summary['counts']['ok']:,}", f"{m_alone.others:.2f}"],
        ["full run", f"{run.summary['groups']:,}", f"{run.summary['rows']:,}", fmt_s(m.seconds),
         str(run.summary["units"]), fmt_s(total_fit), fmt_s(max(units)), f"{mem.peak / 2**30:.2f}",
         f"{c['ok']:,}", f"{m.others:.2f}"],
    ]
    print(f"### seasonal per group: one group of {args.big_rows:,} rows + {args.groups:,} groups of 48 rows, "
          f"{args.workers} workers\n")
    print(markdown_table(["run", "groups", "rows", "wall s", "units", "sum of unit s", "largest unit s",
                          "peak RSS GiB", "ok", "other load"], rows))
    bound = 1.5 * max(big_fit, total_fit / args.workers)
    completed = c["ok"] == n and run.summary["groups"] == n
    met = m.seconds <= bound
    print()
    print("Notes:")
    print("- wall s: the whole train call (discover, plan, read, fit, write parts, commit); sum of unit s: "
          "the units' own seconds from the run's manifest (read + fit + serialise + write per unit); "
          "peak RSS: client + scheduler + workers. other load: cores used by processes outside this "
          "benchmark during the run.")
    print(f"- work units of the full run, seconds: {', '.join(f'{u:.2f}' for u in sorted(units, reverse=True))}")
    print()
    print("Targets:")
    print(f"- completes without running out of memory: {c['ok']:,} of {n:,} groups ok, peak RSS "
          f"{mem.peak / 2**30:.2f} GiB of {_total_gib():.1f} GiB: {'PASS' if completed else 'FAIL'}")
    print(f"- wall {m.seconds:.2f} s <= 1.5 x max(big group alone {big_fit:.2f} s, total fit {total_fit:.2f} s / "
          f"{args.workers} = {total_fit / args.workers:.2f} s) = {bound:.2f} s: {'PASS' if met else 'FAIL'}")
    return 0 if completed and met else 1


def _total_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


if __name__ == "__main__":
    sys.exit(main())
