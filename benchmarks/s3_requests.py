"""Requests to an object store: what discovering and training on many small objects costs.

``--files`` Parquet objects of one group each (48 hourly rows, folders ``app=…/site=…/``) on a real
S3 HTTP API on 127.0.0.1 (moto's server mode, in this process: ``pip install -e ".[test]"``). Then
``modelfactory.dataset.discover`` and ``modelfactory.train(model="seasonal")`` on a 2-worker
LocalCluster, each timed, with every request the server answered meanwhile counted from its own
request log (workers' requests included), by kind: HEAD, GET of an object, LIST, PUT and the rest.

On real S3 each request costs money and 10-50 ms, so the request counts are what matter here; the
local server answers in about a millisecond.

Usage::

    python benchmarks/s3_requests.py                 # 2,000 objects
    python benchmarks/s3_requests.py --files 10000
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test suite's moto server helper
from _bench import local_cluster, markdown_table, print_machine

PACKAGES = ("modelfactory", "dask", "distributed", "pyarrow", "s3fs", "moto")
BUCKET = "bench"


def write_objects(fs, root: str, n: int) -> None:
    """``n`` one-group objects of 48 hourly rows under ``root`` (``app=…/site=…/part-0.parquet``)."""
    ts = pd.date_range("2026-01-01", periods=48, freq="h")
    rng = np.random.default_rng(0)
    apps = max(1, n // 100)
    for i in range(n):
        value = 10 + np.sin(np.arange(48) * 2 * np.pi / 24) + rng.normal(0, 0.1, 48)
        table = pa.table({"ts": ts, "value": value})
        with fs.open(f"{root}/app=a{i % apps:03d}/site=s{i:05d}/part-0.parquet", "wb") as f:
            pq.write_table(table, f)


def kinds(calls: list[tuple[str, str]]) -> dict[str, int]:
    """Requests by kind: a GET with no object key is a LIST."""
    out: collections.Counter = collections.Counter()
    for method, path in calls:
        out["LIST" if method == "GET" and path.count("/") < 2 else method] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)

    from _servers import moto_with_bucket

    import modelfactory
    from modelfactory.dataset import discover

    print_machine("Requests to an object store: many small objects", sys.argv[1:], PACKAGES,
                  {"modelfactory from": os.path.dirname(modelfactory.__file__)})
    with moto_with_bucket(BUCKET) as s3:
        so, root = s3.storage_options(), f"{BUCKET}/data"
        t0 = time.perf_counter()
        write_objects(s3.fs(), root, a.files)
        print(f"wrote {a.files:,} objects in {time.perf_counter() - t0:.1f} s")
        rows = []
        cluster, client = local_cluster(2)
        try:
            for what, job in (
                ("discover", lambda: discover(f"s3://{root}", storage_options=so)),
                ("train seasonal", lambda: modelfactory.train(
                    f"s3://{root}", by=["app", "site"], time="ts", target="value", model="seasonal",
                    params={"season_length": 24}, store=f"s3://{BUCKET}/store",
                    cluster=client, storage_options=so, progress=False)),
            ):
                with s3.requests() as calls:
                    t0 = time.perf_counter()
                    job()
                    seconds = time.perf_counter() - t0
                k = kinds(calls)
                other = sum(v for m, v in k.items() if m not in ("HEAD", "GET", "LIST"))
                rows.append([what, f"{a.files:,}", f"{seconds:.2f}", f"{len(calls):,}", f"{len(calls) / a.files:.2f}",
                             f"{k['HEAD']:,}", f"{k['GET']:,}", f"{k['LIST']:,}", f"{other:,}"])
        finally:
            client.close()
            cluster.close()
    header = ["job", "objects", "seconds", "requests", "per object", "HEAD", "GET object", "LIST", "other"]
    print(markdown_table(header, rows) if a.markdown else "\n".join(" | ".join(r) for r in [header, *rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
