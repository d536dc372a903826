"""A million models on one small machine: train and score hourly series on a LocalCluster.

Generates N hourly series of 168 points (one week) plus the next 24 points, Hive-partitioned by
``app`` (5,000 series per app folder), trains ``seasonal`` and ``holt_winters`` on a LocalCluster,
then scores the next 24 points of every series with each model. Prints, per size and model:
wall time, series/s, µs per series, the ratio of µs per series to the smallest size, peak RSS of
the whole process tree (client, scheduler, workers: sampled every 0.1 s), and the store size.
One LocalCluster serves every run; a small warm-up run per model (imports, first-call caches on
the workers) is not timed.

    python benchmarks/million.py --series 10000,100000,1000000 [--models seasonal,holt_winters]

The data is cached under --dir (default /tmp/mf-million); generating 1M series takes a few minutes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from _bench import PeakRSS  # benchmarks/_bench.py: peak RSS of the whole process tree (first: this checkout)

import modelfactory
from modelfactory.demo import make_table

PER_APP = 5_000
TRAIN_DAYS = 7


def generate(root: Path, series: int) -> tuple[str, str]:
    train, new = root / f"train-{series}", root / f"new-{series}"
    if (root / f"done-{series}").exists():
        return str(train), str(new)
    for p in (train, new):
        shutil.rmtree(p, ignore_errors=True)
    cut = pa.scalar(pd.Timestamp("2026-01-05T00:00:00", tz="UTC") + pd.Timedelta(days=TRAIN_DAYS),
                    pa.timestamp("s", tz="UTC"))
    for a in range(0, series, PER_APP):
        n = min(PER_APP, series - a)
        t = make_table(n, days=TRAIN_DAYS + 1, apps=1, seed=a).drop_columns(["app"])
        app = f"app-{a // PER_APP:04d}"
        for dest, part in ((train, t.filter(pc.less(t["ts"], cut))), (new, t.filter(pc.greater_equal(t["ts"], cut)))):
            (dest / f"app={app}").mkdir(parents=True, exist_ok=True)
            pq.write_table(part, dest / f"app={app}" / "part-0.parquet", compression="zstd")
    (root / f"done-{series}").touch()
    return str(train), str(new)


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="10000,100000")
    ap.add_argument("--models", default="seasonal,holt_winters")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/mf-million")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.series.split(",")]
    models = args.models.split(",")
    params = {"seasonal": {"season_length": 24}, "holt_winters": {"season_length": 24}}
    from distributed import Client

    from modelfactory.run import local_cluster

    rows = []
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"modelfactory {modelfactory.__version__}, pyarrow {pa.__version__}, numpy {np.__version__}")
    paths = {}
    for n in sizes:
        t = time.perf_counter()
        paths[n] = generate(root, n)
        print(f"{n:,} series: data ready in {time.perf_counter() - t:.0f} s")
    warm = generate(root, 1000)
    lc = local_cluster(args.workers, dashboard_address=None)  # the cluster a job makes by default
    client = Client(lc)
    for model in models:  # warm-up: imports and first-call caches on every worker, not timed
        shutil.rmtree(root / "warm", ignore_errors=True)
        modelfactory.train(warm[0], by=["app", "site"], time="ts", target="value", model=model,
                           params=params.get(model), store=str(root / "warm"), cluster=client, unit_rows=24_000)
    for n in sizes:
        train_path, new_path = paths[n]
        for model in models:
            store, out = root / f"store-{n}-{model}", root / f"scores-{n}-{model}"
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            with PeakRSS() as mem:
                t = time.perf_counter()
                run = modelfactory.train(train_path, by=["app", "site"], time="ts", target="value", model=model,
                                         params=params.get(model), store=str(store), cluster=client)
                fit = time.perf_counter() - t
                t = time.perf_counter()
                sc = modelfactory.score(new_path, store=str(store), out=str(out), cluster=client)
                score = time.perf_counter() - t
            c, s = run.summary["counts"], sc.summary["counts"]
            assert run.summary["groups"] == n and sum(c.values()) == n, run.summary
            assert sc.summary["groups"] == n and sum(s.values()) == n, sc.summary
            rows.append((n, model, fit, score, mem.peak, du(str(store)), c["ok"], s["ok"]))
            print(f"  {n:,} {model}: train {fit:.1f} s, score {score:.1f} s, peak {mem.peak / 2**30:.2f} GiB",
                  flush=True)
    client.close()
    lc.close()
    base = {m: next(r for r in rows if r[1] == m) for m in models}
    print()
    print("| series | model | train s | train series/s | train µs/series | vs smallest | score s | score µs/series "
          "| peak RSS GiB | store MB | bytes/model | ok (train/score) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, model, fit, score, peak, size, ok_t, ok_s in rows:
        b = base[model]
        ratio = (fit / n) / (b[2] / b[0])
        print(f"| {n:,} | {model} | {fit:.1f} | {n / fit:,.0f} | {fit / n * 1e6:.1f} | {ratio:.2f}x | {score:.1f} "
              f"| {score / n * 1e6:.1f} | {peak / 2**30:.2f} | {size / 1e6:.1f} | {size / n:.0f} | {ok_t:,}/{ok_s:,} |")


if __name__ == "__main__":
    main()
