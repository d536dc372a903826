"""Shared fixtures: a real LocalCluster, and small partitioned Parquet datasets in tmp_path."""
from __future__ import annotations

import pytest
from _data import metrics_table, write


@pytest.fixture(scope="session")
def client():
    """A real two-worker LocalCluster (processes over TCP on 127.0.0.1), shared by the session."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture
def by_app(tmp_path):
    """Hive-partitioned by app: every (app, site) group lives in one folder."""
    return write(metrics_table(), tmp_path / "by_app", ["app"])


@pytest.fixture
def by_day(tmp_path):
    """Partitioned by day: every group is spread over several folders (needs a shuffle)."""
    return write(metrics_table(), tmp_path / "by_day", ["day"])
