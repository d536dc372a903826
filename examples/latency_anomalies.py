"""Per-application latency anomalies with seasonal models: generate, train, score, print the top anomalies.

Every (app, region) has its own daily latency profile.  Two weeks of 15-minute p95 latency train one
``seasonal`` model per series (``season_length=96``: one slot per 15 minutes of the day); the next day
is scored, with a few incidents injected, and the series with the most anomalous points are printed
with when they happened and how far they were from the expected latency.

    python examples/latency_anomalies.py                    # 40 apps x 3 regions, a local Dask cluster
    python examples/latency_anomalies.py --apps 2000 --plot top.png --workdir latency/
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import modelfactory

REGIONS = ("eu-west", "us-east", "ap-south")
STEP = pd.Timedelta(minutes=15)
START = pd.Timestamp("2026-03-02", tz="UTC")  # a Monday


def make_latency(apps: int, days: int, seed: int = 0) -> pd.DataFrame:
    """p95 latency in ms every 15 minutes: a base level, a busy-hours bump, log-normal noise."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range(START, periods=days * 96, freq=STEP)
    hour = (ts.hour + ts.minute / 60).to_numpy()
    frames = []
    for a in range(apps):
        for region in REGIONS:
            base = rng.uniform(40, 400)
            busy = rng.uniform(0.1, 0.6) * base * np.exp(-((hour - rng.uniform(10, 16)) ** 2) / 8)
            p95 = (base + busy) * rng.lognormal(0, rng.uniform(0.03, 0.08), len(ts))
            frames.append(pd.DataFrame({"app": f"app-{a:04d}", "region": region, "ts": ts, "p95_ms": p95}))
    return pd.concat(frames, ignore_index=True)


def inject_incidents(df: pd.DataFrame, n: int, seed: int = 1) -> list[tuple[str, str]]:
    """Make latency jump 3-6x for 45 minutes in ``n`` random series; return their keys."""
    rng = np.random.default_rng(seed)
    keys = df[["app", "region"]].drop_duplicates().sample(n, random_state=seed)
    t0 = df.ts.min()
    hit = []
    for app, region in keys.itertuples(index=False):
        start = t0 + STEP * int(rng.integers(8, 80))
        rows = (df.app == app) & (df.region == region) & df.ts.between(start, start + 2 * STEP)
        df.loc[rows, "p95_ms"] *= rng.uniform(3, 6)
        hit.append((app, region))
    return hit


@contextlib.contextmanager
def dask_cluster(address: str | None, workers: int):
    """The ``cluster=`` to pass: the given address (or 'inline'), else one local_cluster() for every call."""
    if address:
        yield address
        return
    from distributed import Client

    from modelfactory.run import local_cluster  # the one a job makes: 1 thread a worker, quiet logs

    with local_cluster(workers) as lc, Client(lc) as client:
        yield client


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--apps", type=int, default=40, help="applications (each in 3 regions; default %(default)s)")
    p.add_argument("--days", type=int, default=14, help="days of history to train on (default %(default)s)")
    p.add_argument("--incidents", type=int, default=3, help="incidents injected into the new day")
    p.add_argument("--top", type=int, default=5, help="series to print (default %(default)s)")
    p.add_argument("--cluster", help="'inline', a scheduler address, or leave out for a LocalCluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default %(default)s)")
    p.add_argument("--workdir", help="keep data, store and scores here (default: a temporary folder)")
    p.add_argument("--plot", metavar="PNG", help="also draw the most anomalous series to this file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mf-latency-") as tmp, dask_cluster(args.cluster, args.workers) as cluster:
        work = Path(args.workdir or tmp)
        df = make_latency(args.apps, args.days + 1)
        cut = START + pd.Timedelta(days=args.days)
        history, new = df[df.ts < cut], df[df.ts >= cut].copy()
        injected = inject_incidents(new, min(args.incidents, args.apps * len(REGIONS)))
        for name, part in (("history", history), ("new", new)):
            shutil.rmtree(work / name, ignore_errors=True)  # a rerun in --workdir starts afresh
            part.to_parquet(work / name, partition_cols=["app"])

        run = modelfactory.train(work / "history", by=["app", "region"], time="ts", target="p95_ms",
                                 model="seasonal", params={"season_length": 96, "threshold": 5.0},
                                 store=work / "store", cluster=cluster)
        print(run)
        scores = modelfactory.score(work / "new", store=work / "store", out=work / "scores", overwrite=True,
                                    cluster=cluster)
        print(scores)

        groups = scores.groups
        top = groups[groups.anomalies > 0].sort_values(["anomalies", "max_score"], ascending=False)
        print(f"{int(groups.anomalies.sum())} anomalous points in {len(top)} of {len(groups)} series; "
              f"incidents were injected into {', '.join(f'{a}/{r}' for a, r in injected)}")
        rows = pd.read_parquet(work / "scores", filters=[("is_anomaly", "==", True)])
        rows["app"] = rows["app"].astype(str)
        for app, region, n in top[["app", "region", "anomalies"]].head(args.top).itertuples(index=False):
            r = rows[(rows.app == app) & (rows.region == region)].sort_values("ts")
            worst = r.loc[(r.p95_ms / r.expected).idxmax()]
            print(f"  {app}/{region}: {n} anomalous points from {r.ts.min():%H:%M} to {r.ts.max():%H:%M} UTC, "
                  f"worst {worst.p95_ms:.0f} ms at {worst.ts:%H:%M} (expected {worst.expected:.0f} ms, "
                  f"upper bound {worst.upper:.0f} ms)")
        found = {(a, r) for a, r in top[["app", "region"]].itertuples(index=False)}
        print(f"found {len(found & set(injected))} of {len(injected)} injected incidents")
        if args.plot and len(top):
            from modelfactory.plot import plot_series

            plot_series(work / "scores", {"app": top.iloc[0].app, "region": top.iloc[0].region}, out=args.plot)
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
