"""Awkward layouts: what the client holds to discover many small files, and what a worker holds to
shuffle one large file.

1. ``files``: ``--files`` Parquet files of one group each (48 hourly rows, folders
   ``app=…/site=…/``).  ``modelfactory.dataset.discover`` runs in a fresh process; the table gives
   its time and how much the process's resident memory grew (the footers it kept).
2. ``one-file``: ``--rows`` rows of 48-row groups in a single file of 100,000-row row groups, no
   key folders, so ``apply`` by (app, site) shuffles.  The table gives the wall time and the peak
   resident memory of the largest worker process (sampled every 0.05 s) on a 2-worker LocalCluster,
   with units of ``--unit-rows`` rows.

Usage::

    python benchmarks/layouts.py                      # 20,000 files; 2,400,000 rows in one file
    python benchmarks/layouts.py --files 2000 --rows 600000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import fmt_s, markdown_table, print_machine

PACKAGES = ("modelfactory", "dask", "distributed", "pandas", "pyarrow", "psutil")

_DISCOVER = """
import gc, json, sys, time, psutil
from modelfactory.dataset import discover
before = psutil.Process().memory_info().rss
t = time.perf_counter(); info = discover(sys.argv[1], null_check=("app", "site")); took = time.perf_counter() - t
gc.collect()
print(json.dumps({"files": len(info.files), "seconds": took, "grew": psutil.Process().memory_info().rss - before}))
"""


def write_files(root: str, n: int) -> None:
    rng = np.random.default_rng(0)
    ts = pd.date_range("2026-01-01", periods=48, freq="h", tz="UTC")
    for i in range(n):
        folder = os.path.join(root, f"app=a{i % 20}", f"site=s{i}")
        os.makedirs(folder, exist_ok=True)
        pq.write_table(pa.table({"ts": ts, "value": rng.normal(size=48)}), os.path.join(folder, "part-0.parquet"))


def write_one_file(root: str, rows: int) -> None:
    g = np.arange(rows) // 48
    os.makedirs(root, exist_ok=True)
    t = pa.table({"app": pa.array(np.char.add("a", (g % 100).astype(str))),
                  "site": pa.array(np.char.add("s", g.astype(str))),
                  "value": np.random.default_rng(0).normal(size=rows)})
    pq.write_table(t, os.path.join(root, "all.parquet"), row_group_size=100_000)


def largest_worker_peak(stop: threading.Event, out: list) -> None:
    me = psutil.Process()
    while not stop.is_set():
        for c in me.children(recursive=True):
            try:
                out[0] = max(out[0], c.memory_info().rss)
            except psutil.Error:
                pass
        stop.wait(0.05)


def mean_of(g):
    return {"app": g["app"][:1], "site": g["site"][:1], "m": np.array([g["value"].mean()])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--rows", type=int, default=2_400_000)
    ap.add_argument("--unit-rows", type=int, default=300_000)
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    print_machine("Awkward layouts: discovering many files, shuffling one large file", sys.argv[1:], PACKAGES)
    import modelfactory

    with tempfile.TemporaryDirectory(prefix="mf-layouts-", dir=args.tmp) as tmp:
        write_files(os.path.join(tmp, "files"), args.files)
        proc = subprocess.run([sys.executable, "-c", _DISCOVER, os.path.join(tmp, "files")],
                              capture_output=True, text=True, check=True)
        import json

        d = json.loads(proc.stdout)
        rows = [["discover, one group a file", f"{d['files']:,} files", fmt_s(d["seconds"]),
                 f"{d['grew'] / 2**20:,.0f} MiB (client, grown)"]]
        write_one_file(os.path.join(tmp, "one"), args.rows)
        stop, peak = threading.Event(), [0]
        watcher = threading.Thread(target=largest_worker_peak, args=(stop, peak), daemon=True)
        watcher.start()
        t = time.perf_counter()
        run = modelfactory.apply(os.path.join(tmp, "one"), by=["app", "site"], func=mean_of, input="numpy",
                                 schema="app string, site string, m double", unit_rows=args.unit_rows,
                                 workers=2, progress=False)
        took = time.perf_counter() - t
        stop.set()
        watcher.join()
        assert run.summary["counts"]["ok"] == args.rows // 48, run.summary
        rows.append([f"apply, shuffle of one file ({run.summary['units']} units)", f"{args.rows:,} rows",
                     fmt_s(took), f"{peak[0] / 2**20:,.0f} MiB (largest worker, peak)"])
    print(markdown_table(["what", "size", "seconds", "memory"], rows))


if __name__ == "__main__":
    main()
