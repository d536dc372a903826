"""Score new data every few minutes with the latest trained run: a cron-like loop.

The pattern: models are trained now and then (say nightly, ``python -m modelfactory train ...`` from
cron); a short job every few minutes scores only the data that arrived since the last time, with
whatever run is the store's latest, and alerts on the anomalies.

Here each iteration simulates the arrival: it writes the next ``--minutes`` of 5-minute metrics for
every (app, host) as a new batch folder, scores that batch into its own output folder, and prints the
anomalies.  Iteration 2 carries an injected incident.  One Dask cluster is kept for the whole loop.
A rerun in ``--workdir`` keeps its store (training only when it has no run) and writes each batch
afresh.

    python examples/score_every_few_minutes.py                              # 10 batches, 60 s apart
    python examples/score_every_few_minutes.py --iterations 3 --interval 0  # as the tests run it
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import modelfactory

STEP = pd.Timedelta(minutes=5)
START = pd.Timestamp("2026-03-02", tz="UTC")


def metrics(hosts: int, start: pd.Timestamp, end: pd.Timestamp, seed: int) -> pd.DataFrame:
    """Requests per second every 5 minutes in [start, end): a daily cycle per host, plus noise."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range(start, end, freq=STEP, inclusive="left")
    day = ((ts - ts.normalize()) / pd.Timedelta(days=1)).to_numpy()
    frames = []
    for h in range(hosts):
        level = 100 + 40 * (h % 7)  # fixed per host, so every batch continues the same series
        phase = 2 * np.pi * (h % 5) / 5
        rps = level * (1 + 0.4 * np.sin(2 * np.pi * day + phase)) + rng.normal(0, 0.03 * level, len(ts))
        frames.append(pd.DataFrame({"app": f"app-{h % 4}", "host": f"host-{h:03d}", "ts": ts, "rps": rps}))
    return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def dask_cluster(address: str | None, workers: int):
    """The ``cluster=`` to pass: the given address (or 'inline'), else one local_cluster() for the loop."""
    if address:
        yield address
        return
    from distributed import Client

    from modelfactory.run import local_cluster  # the one a job makes: 1 thread a worker, quiet logs

    with local_cluster(workers) as lc, Client(lc) as client:
        yield client


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=40, help="(app, host) series (default %(default)s)")
    p.add_argument("--minutes", type=int, default=15, help="minutes of new data per batch (default %(default)s)")
    p.add_argument("--iterations", type=int, default=10, help="batches to score (default %(default)s)")
    p.add_argument("--interval", type=float, default=60, help="seconds to wait between batches (default %(default)s)")
    p.add_argument("--cluster", help="'inline', a scheduler address, or leave out for a LocalCluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default %(default)s)")
    p.add_argument("--workdir", help="keep data, store and scores here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.minutes < 5 or args.minutes % 5:
        p.error("--minutes must be a multiple of 5 (the data has one point every 5 minutes)")

    with tempfile.TemporaryDirectory(prefix="mf-cron-") as tmp, dask_cluster(args.cluster, args.workers) as cluster:
        work = Path(args.workdir or tmp)
        store = work / "store"
        now = START + pd.Timedelta(days=3)
        if modelfactory.ModelStore(store).latest() is None:
            # The nightly job: three days of history, one seasonal model per (app, host), a day = 288 slots.
            shutil.rmtree(work / "history", ignore_errors=True)  # what a run stopped before training left
            metrics(args.hosts, START, now, seed=0).to_parquet(work / "history", partition_cols=["app"])
            run = modelfactory.train(work / "history", by=["app", "host"], time="ts", target="rps",
                                     params={"season_length": 288, "threshold": 5.0}, store=store,
                                     cluster=cluster)
            print(f"trained {run.id}: {run.summary['counts']['ok']} models")
        for i in range(1, args.iterations + 1):
            t0 = time.perf_counter()
            end = now + pd.Timedelta(minutes=args.minutes)
            batch = metrics(args.hosts, now, end, seed=i)
            if i == 2:  # an incident: one host's traffic collapses
                batch.loc[batch.host == "host-003", "rps"] *= 0.2
            name = f"{now:%Y%m%dT%H%M}"
            shutil.rmtree(work / "incoming" / name, ignore_errors=True)  # a rerun in --workdir replaces the batch
            batch.to_parquet(work / "incoming" / name, partition_cols=["app"])
            scores = modelfactory.score(work / "incoming" / name, store=store, out=work / "scores" / name,
                                        cluster=cluster, overwrite=True)
            g = scores.groups
            print(f"[{i}] {now:%H:%M}-{end:%H:%M} scored {len(batch):,} points of {len(g)} series with run "
                  f"{scores.summary['model_run']}: {int(g.anomalies.sum())} anomalies "
                  f"({time.perf_counter() - t0:.1f} s)")
            if g.anomalies.sum():
                rows = pd.read_parquet(work / "scores" / name, filters=[("is_anomaly", "==", True)])
                for r in rows.sort_values(["host", "ts"]).itertuples():
                    print(f"    ALERT {r.app}/{r.host} at {r.ts:%H:%M}: {r.rps:.0f} rps, expected "
                          f"{r.expected:.0f} ({r.lower:.0f}..{r.upper:.0f})")
            now = end
            if i < args.iterations:
                time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
