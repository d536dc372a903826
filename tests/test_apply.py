"""apply and map_keys on a real LocalCluster, against a pandas groupby-apply reference."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _data import metrics_table, write

import modelfactory
from modelfactory.exceptions import SchemaError, StoreError

SCHEMA = "app string, site string, n bigint, mean double, first_ts timestamp"


def stats(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"app": [df["app"].iloc[0]], "site": [df["site"].iloc[0]], "n": [len(df)],
                         "mean": [df["value"].mean()], "first_ts": [df["ts"].min()]})


def reference(path: str) -> pd.DataFrame:
    df = ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()
    df["app"] = df["app"].astype(str)
    rows = [stats(g) for _, g in df.groupby(["app", "site"])]
    return pd.concat(rows, ignore_index=True)


def canon(df: pd.DataFrame) -> pd.DataFrame:
    out = df.sort_values(["app", "site"]).reset_index(drop=True)
    # One unit on both sides: pandas 2.1 builds the reference's timestamps in ns (pandas 3 keeps
    # the data's unit) and its assert_frame_equal(check_dtype=False) compares ns with us as raw
    # integers; modelfactory's own output is timestamp[us] (the schema's) under every pandas.
    out["first_ts"] = pd.to_datetime(out["first_ts"], utc=True).dt.as_unit("us")
    out["app"] = out["app"].astype(str)
    out["site"] = out["site"].astype(str)
    return out


@pytest.mark.parametrize("layout", ["by_app", "by_day"])
def test_apply_matches_pandas_groupby_apply(layout, request, client):
    path = request.getfixturevalue(layout)
    run = modelfactory.apply(path, by=["app", "site"], func=stats, schema=SCHEMA, cluster=client,
                             unit_rows=200)
    got, want = canon(run.to_pandas()), canon(reference(path))
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert run.summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0}
    assert run.summary["mode"] == ("files" if layout == "by_app" else "shuffle")
    assert len(run.groups) == 12 and set(run.groups["rows"]) == {72}


def test_apply_numpy_input_gets_column_arrays(by_app, client):
    def mean(g):
        assert isinstance(g["value"], np.ndarray)
        return {"app": g["app"][:1], "site": g["site"][:1], "mean": np.array([g["value"].mean()])}

    run = modelfactory.apply(by_app, by=["app", "site"], func=mean, input="numpy",
                             schema={"app": "string", "site": "string", "mean": pa.float64()}, cluster=client)
    want = canon(reference(by_app))
    got = run.to_pandas().sort_values(["app", "site"]).reset_index(drop=True)
    np.testing.assert_allclose(got["mean"], want["mean"])


def test_apply_arrow_input_and_several_rows_per_group(by_app):
    def head2(t: pa.Table) -> pa.Table:
        return t.select(["app", "site", "value"]).slice(0, 2)

    run = modelfactory.apply(by_app, by=["app", "site"], func=head2, input="arrow",
                             schema="app string, site string, value double", cluster="inline")
    assert run.to_arrow().num_rows == 24


def test_apply_writes_parquet_and_accounts_for_every_group(by_app, tmp_path, client):
    def sometimes_bad(df):
        site = df["site"].iloc[0]
        if site == "s001":
            raise ValueError("bad site s001")
        if site == "s002":
            return pd.DataFrame({"app": ["x"], "wrong": [1.0]})
        if site == "s003":
            return pd.DataFrame({"app": ["x"], "site": ["y"], "mean": ["not a number"]})
        return stats(df)[["app", "site", "mean"]]

    out = tmp_path / "out"
    run = modelfactory.apply(by_app, by=["app", "site"], func=sometimes_bad, out=str(out),
                             schema="app string, site string, mean double", cluster=client)
    assert run.summary["counts"] == {"ok": 9, "failed": 3, "skipped": 0}
    g = run.groups.set_index("site")
    assert "ValueError: bad site s001" in g.loc["s001", "error"]
    assert "missing ['site', 'mean']" in g.loc["s002", "error"] and "unexpected ['wrong']" in g.loc["s002", "error"]
    assert g.loc["s003", "status"] == "failed" and "not a number" in g.loc["s003", "error"]
    assert (out / "_manifest.json").exists()
    assert len(pd.read_parquet(out)) == 9  # readers skip _groups/ and _manifest.json
    with pytest.raises(StoreError, match="not empty"):
        modelfactory.apply(by_app, by=["app", "site"], func=stats, out=str(out), schema=SCHEMA, cluster="inline")


def test_a_job_stopped_before_its_commit_is_named_when_its_folder_is_used_again(tmp_path):
    """Running the same command again after a job was stopped (Ctrl-C, a killed cron job) said
    only 'is not empty', as if the folder held someone's files; it holds that job's unfinished
    output, which only --overwrite replaces."""
    data = write(metrics_table(series=12, hours=24, apps=12), tmp_path / "d", ["app"])
    out = tmp_path / "out"

    def stop_at_app5(g):
        if g["app"][0] == "app5":
            raise KeyboardInterrupt  # Ctrl-C while app5's unit runs
        return {"app": g["app"][:1], "mean": np.array([g["value"].mean()])}

    kw = dict(by=["app"], schema="app string, mean double", input="numpy", cluster="inline", unit_rows=24)
    with pytest.raises(KeyboardInterrupt) as stopped:
        modelfactory.apply(data, func=stop_at_app5, out=str(out), **kw)
    parts = sorted(out.glob("*.parquet"))
    assert 0 < len(parts) < 12 and not (out / "_manifest.json").exists()
    run_id = (out / "_run_id").read_text()
    # the Ctrl-C itself says so (the CLI prints it after "interrupted; "): "nothing was committed"
    # alone left a folder that plain Parquet readers take for the whole output
    assert str(stopped.value) == (f"nothing was committed: {out} holds the unfinished output of run {run_id} (and no "
                                  "_manifest.json, which marks a finished one; an earlier output there, if any, was "
                                  "removed when the job began). Run the job again with overwrite=True")
    with pytest.raises(StoreError) as err:
        modelfactory.apply(data, func=stop_at_app5, out=str(out), **kw)
    assert f"holds the unfinished output of run {run_id} (it has no _manifest.json" in str(err.value)
    # (apply has no command: no --overwrite flag to name)
    assert "Pass overwrite=True to replace it" in str(err.value) and "--overwrite" not in str(err.value)
    assert sorted(out.glob("*.parquet")) == parts  # nothing removed
    run = modelfactory.apply(data, func=lambda g: {"app": g["app"][:1], "mean": np.array([g["value"].mean()])},
                             out=str(out), overwrite=True, **kw)
    assert run.summary["counts"]["ok"] == 12 and len(pd.read_parquet(out)) == 12
    with pytest.raises(StoreError, match="is not empty; pick a new folder"):  # committed: no run to name
        modelfactory.apply(data, func=stop_at_app5, out=str(out), **kw)
    with pytest.raises(StoreError, match=rf"^The output folder '{out}' is not empty"):  # a Path: not PosixPath('...')
        modelfactory.apply(data, func=stop_at_app5, out=out, **kw)


def test_apply_refuses_a_bad_schema(by_app):
    with pytest.raises(SchemaError, match="Unknown type 'dubble' for column 'm'"):
        modelfactory.apply(by_app, by=["app"], func=stats, schema="m dubble", cluster="inline")


def test_map_keys_runs_once_per_key(client):
    def load(key):
        if key == "boom":
            raise RuntimeError("cannot load boom")
        return pd.DataFrame({"key": [key], "n": [len(key)]})

    run = modelfactory.map_keys(["a", "bb", "boom", "ccc"], func=load, schema="key string, n bigint",
                                cluster=client)
    assert sorted(run.to_pandas()["n"]) == [1, 2, 3]
    assert run.summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    g = run.groups.set_index("key")
    assert "RuntimeError: cannot load boom" in g.loc["boom", "error"]


def test_map_keys_with_dict_keys_returns_objects():
    run = modelfactory.map_keys([{"app": "a", "site": 1}, {"app": "b", "site": 2}],
                                func=lambda k: k["site"] * 10, cluster="inline")
    assert run.results == {("a", 1): 10, ("b", 2): 20}
    assert list(run.groups.columns[:2]) == ["app", "site"]


def test_many_small_groups_share_units(tmp_path, client):
    path = write(metrics_table(series=300, hours=24, apps=5), tmp_path / "d", ["app"])
    run = modelfactory.apply(path, by=["app", "site"], func=stats, schema=SCHEMA, cluster=client)
    assert run.summary["groups"] == 300
    assert run.summary["units"] <= 5


def test_apply_names_a_missing_requested_column(by_app):
    with pytest.raises(SchemaError, match=r"The requested column 'nope' is not in .*Columns: site, day, ts"):
        modelfactory.apply(by_app, by=["app"], func=stats, schema=SCHEMA, columns=["value", "nope"],
                           cluster="inline")


@pytest.mark.parametrize("input", ["pandas", "arrow", "numpy"])
def test_string_keys_read_encoded_reach_users_as_plain_strings(by_app, input, tmp_path):
    # The kernel reads group keys dictionary-encoded (partition key "app" from the folder
    # names, "site" from the Parquet dictionary pages); functions and outputs see strings.
    def look(g):
        if input == "pandas":
            assert not isinstance(g["app"].dtype, pd.CategoricalDtype), g.dtypes
            assert not isinstance(g["site"].dtype, pd.CategoricalDtype), g.dtypes
            return pd.DataFrame({"app": [g["app"].iloc[0]], "site": [g["site"].iloc[0]], "n": [len(g)]})
        if input == "arrow":
            assert g.schema.field("app").type == pa.string() and g.schema.field("site").type == pa.string()
            return pa.table({"app": g["app"].slice(0, 1), "site": g["site"].slice(0, 1), "n": [g.num_rows]})
        assert isinstance(g["app"][0], str) and isinstance(g["site"][0], str)
        return {"app": g["app"][:1], "site": g["site"][:1], "n": np.array([len(g["site"])])}

    flt = (ds.field("app") == "app1") & (ds.field("site") != "s004")
    out = tmp_path / f"out-{input}"
    run = modelfactory.apply(by_app, by=["app", "site"], func=look, input=input, schema="app string, site string, n bigint",
                             cluster="inline", filter=flt, out=str(out))
    assert run.summary["counts"]["ok"] == len(run.groups) > 0, run.groups
    assert set(run.groups["app"]) == {"app1"} and "s004" not in set(run.groups["site"])
    written = pq.read_table(out, partitioning=None, ignore_prefixes=["_"])
    assert written.schema.field("app").type == pa.string() and written.schema.field("site").type == pa.string()
    groups = pq.read_table(out / "_groups")
    assert groups.schema.field("app").type == pa.string() and groups.schema.field("site").type == pa.string()


def worker_setup(key):
    """What a worker of the job's own cluster runs with (read inside the worker)."""
    import os

    from distributed import get_worker

    w = get_worker()
    every = {k: v.callback_time for k, v in w.periodic_callbacks.items()}  # milliseconds
    return {"profiler": "profile" in every, "threads": w.state.nthreads, "omp": os.environ.get("OMP_NUM_THREADS"),
            "tick": every.get("tick"), "memory": every.get("memory_monitor")}


def test_the_cluster_a_job_makes_has_one_thread_per_worker_no_stack_profiler_and_a_quiet_event_loop():
    # cluster left unset: the job makes its own LocalCluster (and closes it)
    run = modelfactory.map_keys(["a", "b"], func=worker_setup, workers=1)
    assert run.summary["counts"]["ok"] == 2
    want = {"profiler": False, "threads": 1, "omp": "1", "tick": 1000, "memory": 1000}
    assert set(map(str, run.results.values())) == {str(want)}


def test_a_restarted_worker_of_the_cluster_a_job_makes_keeps_its_settings(monkeypatch):
    """A nanny starts a new worker after a crash (or Client.restart) with the config it holds:
    the job's settings, not Dask's defaults.  What the nannies put in this process's
    environment to start the workers (PYTHONHASHSEED, Dask's malloc setting) is taken out again,
    so that a Spark session or subprocess started later starts as it would have."""
    from distributed import Client

    from modelfactory.run import local_cluster

    for k in ("MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED", "__DASK_PARENT_PID"):  # left by earlier clusters
        monkeypatch.delenv(k, raising=False)
    want = {"profiler": False, "threads": 1, "omp": "1", "tick": 1000, "memory": 1000}
    environ = dict(os.environ)
    with local_cluster(1) as lc, Client(lc) as client:
        assert dict(os.environ) == environ
        assert client.submit(worker_setup, "a", pure=False).result() == want
        client.restart()
        assert client.submit(worker_setup, "b", pure=False).result() == want
    # settings of the caller's own go on top, keywords too
    with local_cluster(1, config={"distributed.admin.tick.interval": "2s"}, threads_per_worker=2) as lc, \
            Client(lc) as client:
        client.restart()
        assert client.submit(worker_setup, "c", pure=False).result() == {**want, "tick": 2000, "threads": 2}


_ONE_CPU = """
import os
from modelfactory.run import local_cluster

if __name__ == "__main__":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with local_cluster() as lc:
        print(len(lc.workers))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_the_default_local_cluster_has_one_worker_per_cpu_the_process_may_use(tmp_path):
    """A process pinned to one CPU (taskset, a container's cpuset) gets one worker, not one per core
    of the machine: each worker gets a share of the memory, and a pod limited to 2 CPUs on a
    64-core node started 64 workers."""
    script = tmp_path / "one_cpu.py"
    script.write_text(_ONE_CPU)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "1\n", (proc.stdout, os.cpu_count())


def test_units_are_planned_for_the_workers_threads():
    """A worker runs a unit on each of its threads: a worker of 3 threads was planned as one slot
    (units sized for one, their count a multiple of one), and 2 of its 3 threads could sit idle."""
    from distributed import Client, LocalCluster

    from modelfactory.run import task_slots

    with LocalCluster(n_workers=2, threads_per_worker=3, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        assert task_slots(client) == 6


def test_a_column_pandas_wrote_as_the_index_reaches_the_function(tmp_path, client):
    """A file written with df.set_index("rid").to_parquet() names rid as pandas' index in its
    metadata: to_pandas made it the index, which the group frame replaces, so the pandas function
    never saw rid, even grouped by it; the numpy and arrow inputs (and Spark) had it."""
    df = pd.DataFrame({"u": ["a", "a", "b", "b"], "v": pd.array([1, None, 3, 4], dtype="Int64"),
                       "rid": [10, 17, 12, 30]})
    (tmp_path / "data").mkdir()
    df.set_index("rid").to_parquet(tmp_path / "data" / "part.parquet")

    def seen(g):
        return pd.DataFrame({"u": [g["u"].iloc[0]], "cols": [",".join(g.columns)], "rids": [int(g["rid"].sum())],
                             "v": [str(g["v"].dtype)]})

    for by in ("u", "rid"):
        out = modelfactory.apply(str(tmp_path / "data"), by=by, func=seen, cluster=client,
                                 schema="u string, cols string, rids int64, v string").to_pandas()
        assert set(out["cols"]) == {"rid,u,v" if by == "rid" else "u,v,rid"}, out
        assert out["rids"].sum() == 69 and set(out["v"]) == {"Int64"}  # pandas' own dtypes kept
    # an unnamed index (a filtered frame's, stored as __index_level_0__) is not data: no column for it
    (tmp_path / "data" / "part.parquet").unlink()
    df[df["rid"] != 17].drop(columns="rid").to_parquet(tmp_path / "data" / "part.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "data" / "part.parquet").names
    run = modelfactory.apply(str(tmp_path / "data"), by="u", func=lambda g: g, schema="u string, v bigint",
                             cluster=client)
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}


def test_an_apply_whose_every_group_failed_says_so(by_app, caplog):
    """A run in which every group failed returned without a word, in Python (train warns)."""
    import logging

    def broken(df):
        raise KeyError("valeu")

    with caplog.at_level(logging.WARNING, logger="modelfactory"):
        run = modelfactory.apply(by_app, by=["app", "site"], func=broken, schema="m double", cluster="inline")
    assert run.summary["counts"]["failed"] == 12
    (msg,) = [r.getMessage() for r in caplog.records if "every one of its" in r.getMessage()]
    assert msg == (f"run {run.id} (apply): every one of its 12 group(s) failed or was skipped (most often, 12 "
                   f"failed: {run.groups['error'].iloc[0]}); run.groups has each one's reason")


def _kill_at_s007(df):
    if df["site"].iloc[0] == "s007":
        os.kill(os.getpid(), 9)
    return df[["app", "site"]].head(1)


@pytest.mark.timeout(180)
def test_a_local_cluster_that_closed_its_lost_workers_gets_them_again(by_app):
    """A LocalCluster closes the nanny of a worker gone for lost-worker-timeout (15 s) and starts
    none in its place: a group killing its worker again and again, as the isolation runs it, on a
    loaded machine, closed both nannies, and the job waited for ever (4 runs in 6 in a trial).
    Here the timeout is 0 s, so each death closes the only worker's nanny at once."""
    import dask
    import distributed  # noqa: F401 - its defaults are in Dask's config before the set below, which would drop them

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s",
                          "distributed.scheduler.allowed-failures": 0}):
        run = modelfactory.apply(by_app, by=["app", "site"], func=_kill_at_s007, schema="app string, site string",
                                 workers=1, progress=False)
    assert run.summary["counts"] == {"ok": 11, "failed": 1, "skipped": 0}
    g = run.groups.set_index("site")
    assert "worker process died" in g.loc["s007", "error"]
    # the group that killed its worker got its rows, and counts them (it was 0, and the run short of them)
    sizes = pd.read_parquet(by_app).groupby("site").size()
    assert g.loc["s007", "rows"] == sizes["s007"] and run.summary["rows"] == sizes.sum()


def _exit_now():
    os._exit(1)


def test_a_task_that_killed_its_worker_and_is_pending_again_is_taken_as_killed():
    """A unit that as_completed gave back as failed (KilledWorker) could be pending again when the
    job looked at its status (retried), and the KilledWorker of its next attempt stopped the run
    uncaught ("a work unit failed outside any group"), with no group isolated."""
    import dask
    from distributed import Client, KilledWorker

    from modelfactory.run import _KILLED, _outcome, local_cluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), local_cluster(1) as lc, \
            Client(lc) as client:
        fut = client.submit(_exit_now, pure=False)
        with pytest.raises(KilledWorker):
            fut.result()
        client.retry([fut])  # as the scheduler's retries do: pending again, and killed again
        assert fut.status == "pending"
        assert _outcome(fut) is _KILLED
        with pytest.raises(KilledWorker):
            _outcome(fut, killed_too=False)


_SLOW_HEARTBEATS = """
import asyncio, time
from distributed import Client
from modelfactory.run import local_cluster

def slow_heartbeats(dask_scheduler):
    real = dask_scheduler.handlers["heartbeat_worker"]
    async def slow(*args, **kwargs):  # so that every worker has one in flight as the cluster closes
        await asyncio.sleep(1)
        return real(*args, **kwargs)
    dask_scheduler.handlers["heartbeat_worker"] = slow

if __name__ == "__main__":
    with local_cluster(2) as lc, Client(lc) as client:
        client.run_on_scheduler(slow_heartbeats)
        time.sleep(1.5)
    print("closed")
"""


def test_closing_the_cluster_a_job_makes_with_heartbeats_in_flight_prints_no_traceback(tmp_path):
    """A worker's heartbeat waiting for the scheduler's answer as the cluster closes at the end
    of a job failed with "Failed to communicate with scheduler during heartbeat." and two
    tracebacks on the console (an example script in CI, now and then).  Here every heartbeat is
    in flight at the close."""
    script = tmp_path / "close.py"
    script.write_text(_SLOW_HEARTBEATS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "closed\n", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "heartbeat" not in proc.stderr, proc.stderr[-3000:]


_SCHEDULER_GOES_FIRST = """
import asyncio, time
from distributed import Client
from modelfactory.run import local_cluster

def slow_heartbeats(dask_scheduler):
    real = dask_scheduler.handlers["heartbeat_worker"]
    async def slow(*args, **kwargs):
        await asyncio.sleep(1)
        return real(*args, **kwargs)
    dask_scheduler.handlers["heartbeat_worker"] = slow

def late_close(dask_worker):  # a loaded worker: its close begins a second late
    real = dask_worker.close
    async def late(*args, **kwargs):
        await asyncio.sleep(1)
        return await real(*args, **kwargs)
    dask_worker.close = dask_worker.handlers["close"] = dask_worker.stream_handlers["close"] = late

if __name__ == "__main__":
    import dask
    dask.config.set({"distributed.comm.timeouts.connect": "2s"})  # the close after: no 30 s on the gone scheduler
    with local_cluster(2) as lc:
        with Client(lc) as client:
            client.run(late_close)
            client.run_on_scheduler(slow_heartbeats)
            time.sleep(1.5)
        lc.sync(lc.scheduler.close)
        time.sleep(3)
    print("closed")
"""


def test_a_scheduler_gone_before_its_workers_begin_to_close_prints_no_heartbeat_traceback(tmp_path):
    """The same record, from a worker still running when the scheduler went (once in eight
    example runs on a loaded machine): the worker had not begun to close, so it was shown; and
    after the worker's close, which puts Dask's console handler back to INFO, "Received
    'close-stream'" lines."""
    script = tmp_path / "close.py"
    script.write_text(_SCHEDULER_GOES_FIRST)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "closed\n", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "heartbeat" not in proc.stderr, proc.stderr[-3000:]
    assert "close-stream" not in proc.stderr, proc.stderr[-3000:]


def test_a_heartbeat_failing_on_a_running_worker_is_still_logged():
    """Held for the grace period, then shown if the worker is still running; dropped if its
    close began meanwhile; dropped at once on a closing worker.  Other records pass."""
    import asyncio
    from types import SimpleNamespace

    from distributed.core import Status

    from modelfactory._quiet_close import HEARTBEAT_FAILED, _ClosingHeartbeat

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    worker = SimpleNamespace(status=Status.running)
    quiet = _ClosingHeartbeat(worker)
    quiet.grace = 0.2
    seen = Seen()
    log = logging.getLogger("modelfactory.tests.heartbeat")
    log.propagate = False
    log.addHandler(seen)
    log.addFilter(quiet)

    async def main():
        log.error(HEARTBEAT_FAILED)
        log.error("Compute Failed")
        assert seen.messages == ["Compute Failed"]
        await asyncio.sleep(0.5)
        assert seen.messages == ["Compute Failed", HEARTBEAT_FAILED]  # still running: shown
        log.error(HEARTBEAT_FAILED)
        worker.status = Status.closing  # its close began within the grace
        await asyncio.sleep(0.5)
        log.error(HEARTBEAT_FAILED)
        log.error("Compute Failed")
        await asyncio.sleep(0.5)
        assert seen.messages == ["Compute Failed", HEARTBEAT_FAILED, "Compute Failed"]

    try:
        asyncio.run(main())
        worker.status = Status.running
        log.error(HEARTBEAT_FAILED)  # no event loop to wait on (not a worker's): shown at once
        assert seen.messages[-1] == HEARTBEAT_FAILED and len(seen.messages) == 4
    finally:
        log.removeHandler(seen)
        log.removeFilter(quiet)


_TAGGING_PRELOAD = """
import click


@click.command()
@click.option("--tag", default="none")
def dask_setup(worker, tag):
    worker.mf_test_tag = tag
"""


def _worker_tag(key):
    from distributed import get_worker

    return f"{key}:{get_worker().mf_test_tag}"


@pytest.mark.timeout(120)
def test_worker_preloads_configured_with_arguments_of_their_own_still_start(tmp_path):
    """A Dask config with worker preloads and one argument list per preload (``preload-argv`` as
    a list of lists, as Dask documents it): adding modelfactory's own preload to the list, and
    none to the arguments, made Dask refuse the pair ("mismatched lengths 2 != 1"), so every job
    on a local cluster failed with "Could not start a local Dask cluster ... Nanny failed"."""
    import dask

    preload = tmp_path / "tagging_preload.py"
    preload.write_text(_TAGGING_PRELOAD)
    with dask.config.set({"distributed.worker.preload": [str(preload)],
                          "distributed.worker.preload-argv": [["--tag", "prod"]]}):
        run = modelfactory.map_keys(["a", "b"], func=_worker_tag, cluster="local", workers=1)
    assert run.results == {"a": "a:prod", "b": "b:prod"}


_KEPT: list = []


def _memory_burst(mib: int) -> int:
    """Make and drop ``mib`` 1 MiB arrays, keeping a little between them (as results and caches
    are), so that memory kept on the heap could not go back to the system by itself."""
    arrays = []
    for i in range(mib):
        arrays.append(np.ones(1 << 17))
        if i % 10 == 0:
            _KEPT.append(np.ones(100))
    del arrays
    return mib


def _rss_mib(dask_worker) -> tuple[int, str]:
    import psutil

    return psutil.Process().memory_info().rss >> 20, dask_worker.status.name


def test_a_worker_paused_for_memory_by_a_large_unit_resumes_after_it():
    """A worker that goes over Dask's pause threshold during a unit is back under it once the
    unit has freed its memory, and the next unit runs.  (A version that kept freed memory on the
    workers' heaps for speed left such a worker paused for good, and the job waiting for it.)"""
    from distributed import Client

    from modelfactory.run import local_cluster

    with local_cluster(1, memory_limit="1GiB") as lc, Client(lc) as client:
        run = modelfactory.map_keys([760], func=_memory_burst, cluster=client)  # about 88 % at its peak
        assert run.results == {760: 760}
        time.sleep(2.5)  # Dask reads the worker's memory once a second (WORKER_DASK_CONFIG)
        ((rss, status),) = client.run(_rss_mib).values()
        assert rss < 500 and status == "running", (rss, status)
        assert modelfactory.map_keys([1], func=_memory_burst, cluster=client).results == {1: 1}


def _stop_a_child_with_sigint(key):
    """What a user's function may do on a worker: start a process and stop it with SIGINT."""
    import signal
    import subprocess
    import sys

    code = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('clean stop')"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the child is in its sleep
    child.send_signal(signal.SIGINT)
    try:
        out, _ = child.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        return "did not stop on SIGINT"
    return out.strip()


def test_ctrl_c_stays_the_clients_but_a_process_a_worker_starts_gets_sigint():
    """The local cluster's workers start with SIGINT blocked, so that a terminal's Ctrl-C is the
    client's alone; a block outlives exec, and a process that a function started on a worker never
    got SIGINT (a server stopped with send_signal(SIGINT) hung).  The worker itself still lives
    through a SIGINT."""
    import signal

    from distributed import Client

    from modelfactory.run import local_cluster

    with local_cluster(1) as lc, Client(lc) as client:
        assert modelfactory.map_keys([1], func=_stop_a_child_with_sigint, cluster=client).results == {1: "clean stop"}
        (pid,) = client.run(os.getpid).values()
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert modelfactory.map_keys([2], func=str, cluster=client).results == {2: "2"}


def test_a_ctrl_c_while_the_cluster_starts_goes_to_the_callers_own_handler(monkeypatch):
    """Held while the cluster starts, then given to the program's own SIGINT handler (a service
    that stops gracefully), not raised as a KeyboardInterrupt it never asked for; and the caller's
    own block of SIGINT is left as it was."""
    import signal

    import distributed

    from modelfactory.run import local_cluster

    class Interrupted(distributed.LocalCluster):  # a Ctrl-C arrives in the middle of the start
        def __init__(self, *a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            super().__init__(*a, **k)

    monkeypatch.setattr(distributed, "LocalCluster", Interrupted)
    calls = []
    previous = signal.signal(signal.SIGINT, lambda *_: calls.append(time.monotonic()))
    try:
        with local_cluster(1) as lc:
            assert calls and lc.status.name == "running"
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        monkeypatch.setattr(distributed, "LocalCluster", distributed.deploy.LocalCluster)
        with local_cluster(1):
            assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 1


def test_a_ctrl_c_held_during_the_start_then_pressed_again_as_the_cluster_closes_lets_the_close_finish(monkeypatch):
    """The held Ctrl-C is raised once the cluster is up, and the cluster closed; pressed again as
    that close began, it broke the close off and left the cluster to Dask's exit hook."""
    import signal

    import distributed

    from modelfactory.run import local_cluster

    made = []

    class PressedTwice(distributed.LocalCluster):
        def __init__(self, *a, **k):
            made.append(self)
            os.kill(os.getpid(), signal.SIGINT)  # during the start: held
            super().__init__(*a, **k)

        def close(self, *a, **k):
            if not getattr(self, "pressed_again", False):  # again, as the (first) close begins
                self.pressed_again = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().close(*a, **k)

    monkeypatch.setattr(distributed, "LocalCluster", PressedTwice)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            local_cluster(1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert made and made[0].status.name == "closed"


def test_a_sigterm_the_program_handles_is_held_while_the_cluster_closes_as_a_ctrl_c_is():
    # the CLI takes SIGTERM as a Ctrl-C: one landing in the close broke it off (the process went
    # 10 s later, Dask's exit hook closing the cluster), where a Ctrl-C was held
    import signal

    from modelfactory.run import _ctrl_c_held_while_closing

    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *_: calls.append("caller"))
    try:
        with _ctrl_c_held_while_closing() as hold:
            hold()
            signal.raise_signal(signal.SIGTERM)  # while it closes
            seen = list(calls)
        assert seen == [] and calls == ["caller"]  # held, then delivered once the close is done
        assert signal.getsignal(signal.SIGTERM) is not None and calls == ["caller"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_while_the_cluster_closes_is_held_then_dropped_after_ctrl_c_and_delivered_otherwise():
    """The rules of run._ctrl_c_held_while_closing, on this process's real SIGINT (the CLI test
    presses Ctrl-C twice on a real job)."""
    import signal

    from modelfactory.run import _ctrl_c_held_while_closing

    calls = []
    previous = signal.signal(signal.SIGINT, lambda *_: calls.append("caller"))

    def closing(error: BaseException | None = None, presses: int = 1) -> None:
        with _ctrl_c_held_while_closing() as hold:
            try:
                if error is not None:
                    raise error
            finally:
                hold()
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)  # pressed while it closes
                seen = list(calls)
        calls.append(("closed", seen))

    try:
        closing()  # a job that went well: held, then the caller's handler once closed
        assert calls == ["caller", ("closed", [])]
        calls.clear()
        with pytest.raises(KeyboardInterrupt):  # the first Ctrl-C's: pressed again, dropped
            closing(KeyboardInterrupt())
        assert calls == []
        with pytest.raises(RuntimeError, match="the job's own"):  # another error: still delivered
            closing(RuntimeError("the job's own"))
        assert calls == ["caller"]
        calls.clear()
        closing(presses=2)  # a double press: held, delivered once
        assert calls == ["caller", ("closed", [])]
        calls.clear()
        closing(presses=3)  # pressed again and again: the user means it, at once, and once only
        assert calls == ["caller", ("closed", ["caller"])]
        assert callable(signal.getsignal(signal.SIGINT)) and signal.getsignal(signal.SIGINT) is not None
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_as_the_cluster_of_a_finished_training_closes_says_which_run_to_resume(by_app, tmp_path,
                                                                                       monkeypatch):
    """Held until the cluster is closed, then raised: the run is not committed, and the error
    says which run to resume (it said "nothing was committed", its run id lost)."""
    import signal

    import distributed

    real = distributed.Client.close
    pressed = []

    def close(self, *a, **k):
        # Ctrl-C as the job's client and cluster close, every unit done (not as a client of an
        # earlier test, collected meanwhile, closes: the press then fell before the job began)
        if not pressed and list((tmp_path / "store").glob("runs/*/parts/*.parquet")):
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(distributed.Client, "close", close)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match=r"^run (\S+) was not committed; resume it with resume='\1'"):
            modelfactory.train(by_app, by="app,site", time="ts", target="value", store=str(tmp_path / "store"),
                               workers=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed and modelfactory.ModelStore(str(tmp_path / "store")).pending()


def test_a_unit_run_group_by_group_leaves_no_files_of_its_own_attempts(tmp_path):
    """What an earlier attempt of an isolated unit wrote under out= goes (its groups get other
    names), and nothing else; training parts are read through the manifest and stay."""
    from types import SimpleNamespace

    from modelfactory._io import Location
    from modelfactory.run import drop_unit_files

    sink = Location.of(str(tmp_path))
    for rel in ("part-u1.parquet", "_groups/u1.parquet", "part-u2.parquet", "_groups/u2.parquet"):
        sink.write_bytes(rel, b"x")
    spec = SimpleNamespace(sink=sink, kind="apply", data_prefix="part-", groups_prefix="_groups/")
    assert drop_unit_files(spec, ["u1", "u3"]) == ["part-u1.parquet", "_groups/u1.parquet"]
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["part-u2.parquet", "u2.parquet"]
    assert drop_unit_files(SimpleNamespace(**{**vars(spec), "kind": "train"}), ["u2"]) == []
    assert drop_unit_files(SimpleNamespace(**{**vars(spec), "sink": None}), ["u2"]) == []
    # scoring writes its rows under the input's partition folders, at any depth
    for rel in ("app=a/part-u3.parquet", "app=b/site=c/part-u3.parquet", "_groups/u3.parquet",
                "app=a/part-u4.parquet", "app=a/part-u33.parquet"):
        sink.write_bytes(rel, b"x")
    score = SimpleNamespace(**{**vars(spec), "kind": "score"})
    assert sorted(drop_unit_files(score, ["u3"])) == ["_groups/u3.parquet", "app=a/part-u3.parquet",
                                                      "app=b/site=c/part-u3.parquet"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*u[34]*.parquet")) == [
        "app=a/part-u33.parquet", "app=a/part-u4.parquet"]


def test_a_group_run_alone_gets_exactly_its_rows_whatever_the_type_of_its_keys(tmp_path):
    """How a group that killed its worker is run again on its own: its key becomes a pushed-down
    filter.  Keys a Python value would not match (a nanosecond timestamp, a NaN) still find
    their rows, and only theirs."""
    from modelfactory._schema import parse_schema
    from modelfactory.dataset import discover
    from modelfactory.kernel import JobSpec, keys_condition, run_group, unit_keys
    from modelfactory.plan import plan

    n = 60
    t = pa.table({"app": ["a"] * n,
                  "start": pa.array([10**18 + i % 3 for i in range(n)], pa.timestamp("ns")),  # 1 ns apart
                  "level": pa.array([[1.5, float("nan")][i % 2] for i in range(n)], pa.float64()),
                  "kind": pa.array([["x", "y", "z"][i % 3] for i in range(n)]).dictionary_encode(),  # categorical
                  "value": np.arange(n, dtype=np.float64)})
    data = write(t, tmp_path / "d", ["app"])
    by = ("app", "start", "level", "kind")
    schema = parse_schema("n bigint, total double")
    assert pa.types.is_dictionary(discover(data).schema.field("kind").type)
    spec = JobSpec("apply", by, discover(data, null_check=by).source, ("app", "start", "level", "kind", "value"),
                   func=lambda df: {"n": [len(df)], "total": [df["value"].sum()]}, out_schema=schema)
    (unit,) = plan(discover(data), by, workers=1, target_rows=10**6).units
    keys = unit_keys(spec, unit.paths)
    assert keys.num_rows == 6
    ref = t.set_column(3, "kind", t["kind"].cast(pa.string())).group_by(list(by)).aggregate(
        [("value", "count"), ("value", "sum")])
    for i in range(keys.num_rows):
        key = keys.slice(i, 1)
        assert "is_in" in str(keys_condition(key))
        res = run_group(spec, unit, key, f"g{i}")
        assert res.counts == {"ok": 1, "failed": 0, "skipped": 0}
        match = ref.join(key.cast(ref.select(list(by)).schema), keys=list(by), join_type="inner")
        assert keys_condition(key) is not None  # every key pushed down or matched in memory
        assert match.num_rows == 1 and match["value_count"][0].as_py() == 10
        assert res.table.to_pylist() == [{"n": 10, "total": match["value_sum"][0].as_py()}]


# ---------------------------------------------------------------------------
# what a group gets does not depend on the groups packed with it (as in Spark's applyInPandas)
# ---------------------------------------------------------------------------
def _write(tmp_path, table: pa.Table) -> str:
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    return str(path)


def test_a_group_frame_is_indexed_from_zero_whatever_unit_it_is_in(tmp_path):
    path = _write(tmp_path, pa.table({"app": [f"a{i // 3}" for i in range(9)], "x": [float(i) for i in range(9)]}))

    def scaled(pdf):  # Spark users' idiom: a Series of model output assigned to the frame
        pdf = pdf.copy()
        pdf["y"] = pd.Series(pdf["x"].to_numpy() * 10)
        return pdf.assign(first=pdf.loc[0, "x"])

    run = modelfactory.apply(path, by="app", func=scaled, schema="app string, x double, y double, first double",
                             cluster="inline")
    assert run.summary["units"] == 1 and run.summary["counts"]["ok"] == 3
    got = run.to_pandas().sort_values("x").reset_index(drop=True)
    assert got["y"].tolist() == [10.0 * i for i in range(9)]
    assert got["first"].tolist() == [0.0] * 3 + [3.0] * 3 + [6.0] * 3


@pytest.mark.parametrize("input", ["pandas", "numpy"])
def test_a_groups_input_types_depend_on_its_own_nulls_not_on_its_neighbours(tmp_path, input):
    table = pa.table({"app": ["a", "a", "b", "b", "c", "c"],
                      "n": pa.array([1, 2, 3, None, 5, 6], pa.int64()),
                      "flag": pa.array([True, False, True, True, None, True], pa.bool_()),
                      "small": pa.array([1, 2, None, 4, 5, 6], pa.int32())})
    path = _write(tmp_path, table)

    def types(g):
        return {"app": np.asarray(g["app"])[:1],
                "types": np.array([f"{g['n'].dtype}/{g['flag'].dtype}/{g['small'].dtype}"], dtype=object),
                "first": np.array([str(g["n"][0])], dtype=object)}

    def each(**kw):
        run = modelfactory.apply(path, by="app", func=types, schema="app string, types string, first string",
                                 input=input, cluster="inline", **kw)
        assert run.summary["counts"]["ok"] == 3
        return run.to_pandas().sort_values("app").values.tolist()

    together, alone = each(), each(unit_rows=2)
    assert together == alone == [["a", "int64/bool/int32", "1"], ["b", "float64/bool/float64", "3.0"],
                                 ["c", "int64/object/int32", "5"]]


def test_numpy_inputs_can_be_changed_in_place_and_only_change_their_own_group(tmp_path):
    path = _write(tmp_path, pa.table({"app": ["a", "a", "b", "b"], "x": [1.0, 3.0, 10.0, 30.0]}))

    def centred(g):
        x = g["x"]
        x -= x.mean()  # in place
        return {"app": g["app"], "x": x}

    run = modelfactory.apply(path, by="app", func=centred, schema="app string, x double", input="numpy",
                             cluster="inline")
    assert run.summary["counts"]["ok"] == 2
    assert sorted(run.to_pandas()["x"]) == [-10.0, -1.0, 1.0, 10.0]


def test_a_container_refilled_and_returned_by_every_group_gives_each_its_own_rows(tmp_path):
    from collections import OrderedDict

    path = _write(tmp_path, pa.table({"app": [f"a{i // 2}" for i in range(8)], "x": [float(i) for i in range(8)]}))
    box: OrderedDict = OrderedDict()  # not a plain dict: the careful path

    def refill(pdf):
        box.clear()
        box["app"], box["s"] = pdf["app"].iloc[0], pdf["x"].sum()
        if box["app"] == "a0":
            box["debug"] = 1  # this group's columns are wrong: it alone fails
        return box

    run = modelfactory.apply(path, by="app", func=refill, schema="app string, s double", cluster="inline")
    g = run.groups.set_index("app")
    assert g.loc["a0", "status"] == "failed" and "unexpected ['debug']" in g.loc["a0", "error"]
    assert sorted(run.to_pandas().values.tolist()) == [["a1", 5.0], ["a2", 9.0], ["a3", 13.0]]


def test_a_killed_shuffle_partitions_groups_are_found_again_with_categorical_keys_of_other_dictionaries(tmp_path):
    # Isolating a partition whose group killed its worker joins its files' keys with those done:
    # with a categorical key, each file with its own categories, Arrow refused ("Unifying differing
    # dictionaries") and the whole run failed instead of the one group.
    from modelfactory.dataset import discover
    from modelfactory.kernel import JobSpec
    from modelfactory.run import _read_groups, _remaining_keys

    data = tmp_path / "d"
    for day in range(3):
        (data / f"day={day}").mkdir(parents=True)
        keys = [f"k{i:02d}" for i in range(day, day + 4)] * 2  # other categories in each file
        pd.DataFrame({"k": pd.Categorical(keys), "v": np.arange(8.0)}).to_parquet(data / f"day={day}" / "p.parquet")
    info = discover(str(data), null_check=("k",))
    assert pa.types.is_dictionary(info.schema.field("k").type)
    spec = JobSpec("apply", ("k",), info.source, ("k", "v"))
    paths = tuple(f.path for f in info.files)
    done = pa.table({"k": pa.array(["k00", "k03"]).dictionary_encode()})
    left = _remaining_keys(spec, paths, [done], [])
    assert sorted(left["k"].to_pylist()) == ["k01", "k02", "k04", "k05"]
    groups = _read_groups(spec, paths, left.slice(0, 2))
    assert [len(groups)] + groups.keys["k"].to_pylist() == [2, "k01", "k02"]
    assert (groups.ends - groups.starts).tolist() == [4, 6]  # k01 in two files, k02 in three


def test_a_shuffle_reads_a_large_file_in_shares_of_its_row_groups(tmp_path, client):
    """A shuffle's tasks read whole files: one large file (12 million rows) went whole to one worker
    (4.4 GiB, where the same rows in 24 files took 1.2 GiB a worker).  A file of more rows than a
    unit's is read in shares of its row groups; the groups come out whole all the same."""
    import pyarrow.parquet as pq

    from modelfactory.dataset import discover
    from modelfactory.run import _read_chunks

    rng = np.random.default_rng(4)
    (tmp_path / "d" / "day=1").mkdir(parents=True)
    big = pd.DataFrame({"k": rng.integers(0, 300, 12_000).astype(str), "v": rng.normal(size=12_000)})
    pq.write_table(pa.Table.from_pandas(big, preserve_index=False), tmp_path / "d" / "day=1" / "big.parquet",
                   row_group_size=1_000)
    small = pd.DataFrame({"k": rng.integers(0, 300, 500).astype(str), "v": rng.normal(size=500)})
    small.to_parquet(tmp_path / "d" / "day=1" / "small.parquet", index=False)
    info = discover(str(tmp_path / "d"), null_check=("k",))
    chunks = _read_chunks(sorted(info.files, key=lambda f: f.path), 3_000)
    assert [c[0][1] for c in chunks[:4]] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    assert chunks[4] == (str(tmp_path / "d" / "day=1" / "small.parquet"),)
    run = modelfactory.apply(str(tmp_path / "d"), by="k", unit_rows=3_000, cluster=client,
                             func=lambda g: pd.DataFrame({"k": [g["k"].iloc[0]], "n": [len(g)], "day": [g["day"].iloc[0]],
                                                          "s": [g["v"].sum()]}),
                             schema="k string, n int64, day string, s double")
    got = run.to_pandas().set_index("k").sort_index()
    want = pd.concat([big, small]).groupby("k")["v"].agg(["size", "sum"])
    assert run.summary["counts"] == {"ok": len(want), "failed": 0, "skipped": 0}
    assert (got["n"] == want["size"]).all() and np.allclose(got["s"], want["sum"]) and set(got["day"]) == {"1"}


def test_spark_int96_timestamps_past_2262_keep_their_date(tmp_path):
    # Spark writes timestamps as INT96 by default; Arrow read them as nanoseconds, and a
    # 9999-12-31 "valid until" wrapped to 1816-03-29 without a word (no statistics to catch it)
    import datetime

    from modelfactory.dataset import discover

    t = pa.table({"k": ["a", "a", "b"], "v": [1.0, 2.0, 3.0],
                  "until": pa.array([datetime.datetime(2026, 1, 1), datetime.datetime(9999, 12, 31),
                                     datetime.datetime(2026, 1, 2)], pa.timestamp("us"))})
    path = tmp_path / "d.parquet"
    pq.write_table(t, path, use_deprecated_int96_timestamps=True)
    assert pq.ParquetFile(path).metadata.schema.column(2).physical_type == "INT96"
    assert discover(str(path)).schema.field("until").type == pa.timestamp("us")
    run = modelfactory.apply(str(path), by="k", func=lambda df: {"k": df["k"][:1], "last": df["until"][-1:]},
                             schema=pa.schema([("k", pa.string()), ("last", pa.timestamp("us"))]), input="numpy",
                             time="until", cluster="inline")
    rows = run.to_pandas().sort_values("k")
    assert [str(x) for x in rows["last"]] == ["9999-12-31 00:00:00", "2026-01-02 00:00:00"]


def test_a_buffer_or_frame_filled_again_and_returned_by_every_group_gives_each_its_own_rows(tmp_path):
    # Values are converted when the unit's groups have run: a frame or an array refilled in place
    # and returned again gave every group the last group's values (the keys, copied, stayed right).
    path = _write(tmp_path, pa.table({"k": [f"g{i:02d}" for i in range(12) for _ in range(2)],
                                      "x": [float(i) for i in range(24)]}))
    expected = [[f"g{i:02d}", float(4 * i + 1)] for i in range(12)]
    row = pd.DataFrame({"k": ["?"], "s": [0.0]})
    buf, pool = np.zeros(4), [np.zeros(1), np.zeros(1)]
    calls = [0]

    def frame(pdf):
        row.loc[0, "k"], row.loc[0, "s"] = pdf["k"].iloc[0], pdf["x"].sum()
        return row

    def array(g):
        buf[0] = g["x"].sum()
        return {"k": g["k"][:1], "s": buf[:1]}  # a view of the one buffer

    def two_buffers(g):  # taken in turn: the third group is the first to come back with one
        calls[0] += 1
        b = pool[calls[0] % 2]
        b[0] = g["x"].sum()
        return {"k": g["k"][:1], "s": b}

    def constant(g):  # one array for every group, never changed: right either way
        return {"k": g["k"][:1], "s": np.array([g["x"].sum()]), "one": _ONE}

    class Framed(pd.DataFrame):  # not exactly a DataFrame: converted group by group (the careful path)
        pass

    framed = Framed({"s": [0.0], "k": ["?"]})

    def careful(pdf):
        framed.loc[0, "k"], framed.loc[0, "s"] = pdf["k"].iloc[0], pdf["x"].sum()
        return framed

    series_buf = np.zeros(1)

    def series(g):  # a Series over the one buffer (pandas 2 does not copy it)
        series_buf[0] = g["x"].sum()
        return {"k": g["k"][:1], "s": pd.Series(series_buf, copy=False)}

    for func, kind in ((frame, "pandas"), (array, "numpy"), (two_buffers, "numpy"), (series, "numpy"),
                       (careful, "pandas")):
        run = modelfactory.apply(path, by="k", func=func, schema="k string, s double", input=kind, cluster="inline")
        assert sorted(run.to_pandas().values.tolist()) == expected, func.__name__
    run = modelfactory.apply(path, by="k", func=constant, schema="k string, s double, one double", input="numpy",
                             cluster="inline")
    assert sorted(run.to_pandas().values.tolist()) == [e + [1.0] for e in expected]


_ONE = np.array([1.0])


def test_frames_spark_takes_as_no_rows_or_by_position_are_taken_alike(tmp_path):
    # Spark's applyInPandas takes `return pd.DataFrame()` as no rows, and columns labelled 0, 1, ...
    # as the schema's by position; both failed their group ("returned columns [] do not match")
    path = _write(tmp_path, pa.table({"k": ["a", "a", "b", "c"], "x": [1.0, 2.0, 3.0, 4.0]}))

    def spark_style(pdf):
        k = pdf["k"].iloc[0]
        if k == "b":
            return pd.DataFrame()
        return pd.DataFrame([[k, pdf["x"].sum()]])

    run = modelfactory.apply(path, by="k", func=spark_style, schema="k string, s double", cluster="inline")
    assert run.summary["counts"] == {"ok": 3, "failed": 0, "skipped": 0}
    assert sorted(run.to_pandas().values.tolist()) == [["a", 3.0], ["c", 4.0]]

    def three_columns(pdf):  # by position only when the counts agree
        return pd.DataFrame([[pdf["k"].iloc[0], 1.0, 2.0]])

    run = modelfactory.apply(path, by="k", func=three_columns, schema="k string, s double", cluster="inline")
    assert set(run.groups["status"]) == {"failed"}
    assert run.groups["error"].str.contains("returned columns ['0', '1', '2'] do not match", regex=False).all()


def test_returned_values_convert_alike_whatever_their_column_order(tmp_path):
    path = _write(tmp_path, pa.table({"app": ["a", "b"], "x": [1.0, 2.0]}))

    def returning(order):
        def mid(pdf):  # a nanosecond timestamp into a microsecond column: refused, never cut short
            app = pdf["app"].iloc[0]
            ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(nanoseconds=1 if app == "a" else 1000)
            return pd.DataFrame({"app": [app], "mid": [ts], "code": [str(len(app) * 42)]})[order]
        return mid

    seen = []
    for order in (["app", "mid", "code"], ["code", "mid", "app"]):
        run = modelfactory.apply(path, by="app", func=returning(order), schema="app string, mid timestamp, "
                                 "code bigint", cluster="inline")
        g = run.groups.set_index("app")
        assert g.loc["a", "status"] == "failed" and "would lose data" in g.loc["a", "error"], order
        got = run.to_pandas()
        seen.append((g.loc["b", "status"], got.values.tolist()))
        if g.loc["b", "status"] == "ok":  # text into a bigint column, cast as Arrow (and Spark) cast it
            assert got["mid"].tolist() == [pd.Timestamp("2026-01-01 00:00:00.000001", tz="UTC")]
            assert got["code"].tolist() == [42] and str(got["code"].dtype) == "int64"  # the schema's type
    # pandas 3's text is Arrow's, which casts "42" to 42; pandas 2's is Python's, which Arrow
    # refuses: either way, both orders alike
    assert seen[0] == seen[1]


@pytest.mark.parametrize("written", [False, True], ids=["returned", "out"])
def test_a_null_in_a_column_the_schema_says_is_not_nullable_fails_its_group_alone(tmp_path, written):
    path = _write(tmp_path, pa.table({"app": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]}))
    schema = pa.schema([pa.field("app", pa.string(), nullable=False), pa.field("m", pa.float64(), nullable=False)])

    def f(pdf):
        return pd.DataFrame({"app": [pdf["app"].iloc[0]], "m": [None if pdf["app"].iloc[0] == "b" else 1.0]})

    run = modelfactory.apply(path, by="app", func=f, schema=schema, cluster="inline",
                             out=str(tmp_path / "out") if written else None)
    g = run.groups.set_index("app")
    assert g["status"].to_dict() == {"a": "ok", "b": "failed", "c": "ok"}
    # (no place: it was "(at grouped_map.py:74 in _checked)", modelfactory's, not the function's)
    assert g.loc["b", "error"] == "ValueError: column 'm' is not nullable in the schema, but 1 value is missing"
    got = run.to_pandas()
    assert sorted(got["app"]) == ["a", "c"] and str(got["m"].dtype) == "float64"  # read back as written


def test_a_dict_may_return_a_list_per_row_for_a_nested_column(tmp_path):
    path = _write(tmp_path, pa.table({"app": ["a", "a", "b"], "x": [1.0, 2.0, 3.0]}))

    def spread(g):
        return {"app": g["app"][:1], "xs": [g["x"].tolist()]}  # one row: the group's values as a list

    run = modelfactory.apply(path, by="app", func=spread, schema="app string, xs array<double>", input="numpy",
                             cluster="inline")
    assert run.summary["counts"]["ok"] == 2
    assert sorted(run.to_arrow().to_pylist(), key=lambda r: r["app"]) == [{"app": "a", "xs": [1.0, 2.0]},
                                                                          {"app": "b", "xs": [3.0]}]


def test_per_group_types_hold_with_more_nullable_columns_than_bits_in_a_word(tmp_path):
    cols = {f"n{j}": pa.array([1, 2, None if j % 2 else 3, 4], pa.int64()) for j in range(70)}
    path = _write(tmp_path, pa.table({"app": ["a", "a", "b", "b"], **cols}))

    def kinds(pdf):
        return {"app": [pdf["app"].iloc[0]], "kinds": ["".join(pdf[c].dtype.kind for c in cols)]}

    run = modelfactory.apply(path, by="app", func=kinds, schema="app string, kinds string", cluster="inline")
    got = dict(run.to_pandas().values.tolist())
    assert got == {"a": "i" * 70, "b": "if" * 35}


def test_every_null_pattern_gets_its_own_types_and_rows(tmp_path):
    groups = 16  # every combination of nulls in 4 int columns, one group each, in one unit
    app = [f"g{g:02d}" for g in range(groups) for _ in range(3)]
    cols = {f"n{j}": pa.array([None if (g >> j & 1 and r == 1) else 10 * g + r for g in range(groups)
                               for r in range(3)], pa.int64()) for j in range(4)}
    path = _write(tmp_path, pa.table({"app": app, **cols}))

    def kinds(pdf):
        return {"app": [pdf["app"].iloc[0]], "kinds": ["".join(pdf[c].dtype.kind for c in cols)],
                "total": [float(sum(pdf[c].sum() for c in cols))]}

    run = modelfactory.apply(path, by="app", func=kinds, schema="app string, kinds string, total double",
                             cluster="inline")
    assert run.summary["units"] == 1
    got = {a: (k, t) for a, k, t in run.to_pandas().values.tolist()}
    for g in range(groups):
        want_kinds = "".join("f" if g >> j & 1 else "i" for j in range(4))
        want_total = sum(10 * g + r for j in range(4) for r in range(3) if not (g >> j & 1 and r == 1))
        assert got[f"g{g:02d}"] == (want_kinds, float(want_total)), g


def test_pandas_missing_markers_in_a_returned_dict_are_null(tmp_path):
    path = _write(tmp_path, pa.table({"app": ["a", "b"], "x": [1.0, 2.0]}))

    def f(g):
        return {"app": g["app"][:1], "n": np.array([pd.NA if g["app"][0] == "a" else 3], dtype=object)}

    run = modelfactory.apply(path, by="app", func=f, schema="app string, n bigint", input="numpy",
                             cluster="inline")
    assert run.summary["counts"]["ok"] == 2
    assert sorted(run.to_arrow().to_pylist(), key=lambda r: r["app"]) == [{"app": "a", "n": None},
                                                                          {"app": "b", "n": 3}]


def test_an_output_folder_that_is_a_file_is_refused_and_kept(tmp_path):
    path = _write(tmp_path, pa.table({"app": ["a"], "x": [1.0]}))
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(StoreError, match="is a file; pick a folder"):
        modelfactory.apply(path, by="app", func=len, schema="n bigint", cluster="inline",
                           out=str(tmp_path / "afile"), overwrite=True)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_overwrite_empties_a_top_level_folder_of_a_store_without_buckets(by_app):
    """Only object stores' first path segment is a bucket: memory://scores is a folder."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/mf-top-level-out/old.parquet", b"old")
    run = modelfactory.apply(by_app, by=["app", "site"], func=lambda df: df[["app", "site"]].head(1),
                             schema="app string, site string", out="memory://mf-top-level-out", overwrite=True,
                             cluster="inline")
    assert run.summary["counts"]["ok"] == 12
    assert not fs.exists("/mf-top-level-out/old.parquet")
    fs.rm("/mf-top-level-out", recursive=True)


@pytest.mark.parametrize("where", ["inline", "cluster"])  # Dask's tasks shuffle; its p2p shuffle on workers
def test_groups_spread_over_files_keep_every_integer_exactly(tmp_path, where, request):
    """The shuffle went through pandas' default conversion: a null anywhere in a file's chunk made
    its int64 column float64, rounding values above 2**53 in every group, null-free ones too."""
    import pyarrow.parquet as pq

    for d in range(2):
        folder = tmp_path / "d" / f"day={d}"
        folder.mkdir(parents=True)
        big = [None if (k == 0 and d == 0) else 2**60 + 2 * k + 1 + d for k in range(8)]
        pq.write_table(pa.table({"app": [f"a{k % 4}" for k in range(8)], "big": pa.array(big, pa.int64())}),
                       folder / "part.parquet")

    def exact(df):
        return pd.DataFrame({"app": [df["app"].iloc[0]], "dtype": [str(df["big"].dtype)],
                             "total": [str(sum(int(v) for v in df["big"].dropna()))]})

    got = {}
    for unit_rows in (None, 4):  # one unit of the files; then groups spread over units: the shuffle
        run = modelfactory.apply(str(tmp_path / "d"), by="app", func=exact, unit_rows=unit_rows,
                                 cluster="inline" if where == "inline" else request.getfixturevalue("client"),
                                 schema="app string, dtype string, total string")
        got[run.summary["mode"]] = run.to_pandas().sort_values("app").reset_index(drop=True)
    assert set(got) == {"files", "shuffle"}
    pd.testing.assert_frame_equal(got["files"], got["shuffle"])
    clean = got["shuffle"][got["shuffle"].app != "a0"]  # a0 holds the null: float64, as pandas makes it
    assert (clean.dtype == "int64").all()
    want = {f"a{j}": str(sum(2**60 + 2 * k + 1 + d for d in range(2) for k in range(8) if k % 4 == j)) for j in range(1, 4)}
    assert dict(zip(clean.app, clean.total)) == want


def _slow_first_row(df):
    import time

    time.sleep(0.1)
    return df[["app", "site"]].head(1)


def test_a_worker_that_does_not_see_the_output_folder_says_so_not_that_another_job_emptied_it(tmp_path):
    """A local out= path with a cluster on other machines: the worker finds no claim file in its
    own (empty) folder of that name, and the run was refused as "another job emptied it
    meanwhile (with overwrite), or this run was interrupted", neither of which happened."""
    from modelfactory._io import Location
    from modelfactory.kernel import JobSpec, check_claim

    out = tmp_path / "out"  # what the worker sees: the client wrote _run_id in its own folder of that name
    spec = JobSpec("apply", ("app",), sink=Location.of(str(out)), claim="20260101T000000000Z-abcdef")
    with pytest.raises(StoreError, match=r"(?s)changed while run 20260101T000000000Z-abcdef wrote to it, or is not "
                                         r"the same folder on the worker on host '[^']+' that ran unit u00000-x: "
                                         r"that worker finds no _run_id file there.*shared by the client and every "
                                         r"worker.*was not committed"):
        check_claim(spec, "u00000-x")
    assert not out.exists()
    out.mkdir()
    (out / "_run_id").write_text("20260101T000000000Z-abcdef")
    check_claim(spec, "u00000-x")  # its own folder: no error


@pytest.mark.timeout(120)
def test_a_second_job_writing_the_same_output_folder_meanwhile_makes_the_first_refuse_to_commit(tmp_path):
    # A scheduled job runs again (with overwrite) into the folder an earlier run of it is still
    # writing: the second empties the folder and writes its own files, the first goes on
    # writing. The first reported success with a _manifest.json claiming all its rows while the
    # folder held a part of them, mixed with the second's; now it refuses to commit, by name.
    import threading
    import time

    first_data = write(metrics_table(series=12, hours=24, apps=12), tmp_path / "a", ["app"])
    second_data = write(metrics_table(series=4, hours=24, apps=4, seed=1), tmp_path / "b", ["app"])
    out = tmp_path / "out"
    kw = dict(by=["app", "site"], schema="app string, site string", cluster="inline", unit_rows=24)
    box: dict = {}

    def first_job():
        try:
            box["run"] = modelfactory.apply(first_data, func=_slow_first_row, out=str(out), **kw)
        except StoreError as err:
            box["error"] = err

    th = threading.Thread(target=first_job)
    th.start()
    deadline = time.monotonic() + 60
    while not list(out.glob("part-*.parquet")):  # the first job has written a part
        assert th.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    try:  # the second may refuse too (files of the first appear while it runs), never mix silently
        modelfactory.apply(second_data, func=lambda df: df[["app", "site"]].head(1), out=str(out),
                           overwrite=True, **kw)
    except StoreError as err:
        assert "changed while run" in str(err) or "Could not empty" in str(err)
    th.join(60)
    assert "run" not in box, "the first job committed an output folder that another job had emptied"
    assert "changed while run" in str(box["error"]) and "was not committed" in str(box["error"])


def test_a_key_named_as_a_column_of_the_group_table_is_refused_up_front(tmp_path):
    # apply(by=["status"]) (an HTTP status) stopped in its unit with `KeyError: Field "status"
    # exists 2 times in schema`; map_keys of {"status": ...} keys the same
    from modelfactory.exceptions import SchemaError

    data = str(tmp_path / "d.parquet")
    pd.DataFrame({"status": [200, 200, 500], "v": [1.0, 2.0, 3.0]}).to_parquet(data)
    with pytest.raises(SchemaError, match="The key column 'status' has the name of a column of the group table"):
        modelfactory.apply(data, by=["status"], func=lambda d: d, schema="status bigint, v double", cluster="inline")
    with pytest.raises(SchemaError, match="The key column 'rows' has the name of a column of the group table"):
        modelfactory.map_keys([{"rows": 1}, {"rows": 2}], func=lambda k: k, cluster="inline")


@pytest.mark.parametrize("layout", ["by_app", "by_day"])  # units of files, and a shuffle's partitions
def test_a_job_whose_units_stop_finishing_says_so(layout, request, tmp_path, client, monkeypatch, caplog):
    # a group that hangs held the job with no word where no progress bar shows (cron, CI, Kubernetes)
    import modelfactory.run

    monkeypatch.setattr(modelfactory.run, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(modelfactory.run, "STALL_CHECK_SECONDS", 0.2)

    def hangs_a_while(df):
        import time

        if df["app"].iloc[0] == "app2" and df["site"].iloc[0] == "s002":
            time.sleep(4)
        return df.head(1)[["app", "site"]]

    with caplog.at_level("WARNING", logger="modelfactory"):
        run = modelfactory.apply(request.getfixturevalue(layout), by=["app", "site"], func=hangs_a_while,
                                 schema="app string, site string", cluster=client, unit_rows=200)
    assert run.summary["counts"]["ok"] == 12 and run.summary["mode"] == ("files" if layout == "by_app" else "shuffle")
    said = [r.getMessage() for r in caplog.records if "no unit of this job has finished" in r.getMessage()]
    assert said and said[0].startswith("no unit of this job has finished for ") and "a group in one may hang" in said[0]


def test_the_check_for_busy_workers_does_not_hold_a_job_back(client, monkeypatch, caplog):
    # a leftover task holding a worker's GIL kept it from answering the check, and the job waited
    # (22 s for a 25-s task) before submitting anything
    import time

    import modelfactory.run

    def holds_the_gil(seconds):
        import ctypes

        ctypes.PyDLL(None).sleep(seconds)  # libc's sleep, the GIL held throughout
        return seconds

    busy = min(client.scheduler_info()["workers"])
    fut = client.submit(holds_the_gil, 4, workers=[busy], pure=False)
    time.sleep(1)  # running
    monkeypatch.setattr(modelfactory.run, "BUSY_CHECK_SECONDS", 0.5)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="modelfactory"):
        assert modelfactory.run._busy_with_cancelled(client) == {}
    waited = time.monotonic() - start
    assert fut.result() == 4
    assert any("did not answer within 0.5 s" in r.getMessage() for r in caplog.records), waited
