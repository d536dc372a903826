"""Shared fixtures: a real LocalCluster, small partitioned Parquet datasets in tmp_path, and a
file whose values cannot be decoded."""
from __future__ import annotations

import signal

import pytest
from _data import metrics_table, write

# The Ctrl-C tests send SIGINT to this process and to the CLI processes they start.  A runner that
# starts pytest in the background of a shell without job control (`cmd &` in a script) has it
# ignore SIGINT, and its children inherit that: those tests then failed for the runner's sake.
# Python's own handler again (children started from here get the default, as from a terminal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture
def corrupt_values(tmp_path) -> str:
    """One Parquet file whose footer and key columns read, but whose value column's gzip data is
    garbled: the unit fails on its worker, outside any group, when it reads its rows."""
    import pyarrow.parquet as pq

    folder = tmp_path / "corrupt"
    folder.mkdir()
    path = folder / "part-0.parquet"
    table = metrics_table()
    pq.write_table(table, path, compression="gzip", use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(table.schema.get_field_index("value"))
    with open(path, "r+b") as f:
        f.seek(chunk.data_page_offset + chunk.total_compressed_size // 2)
        f.write(b"\xff" * 300)
    assert pq.read_table(path, columns=["app", "site", "ts"]).num_rows == table.num_rows
    with pytest.raises(OSError, match="GZip"):
        pq.read_table(path)
    return str(folder)
