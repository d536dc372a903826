"""A real cluster, and faults: `dask scheduler` + two `dask worker` processes on 127.0.0.1, reached
through their address; a worker killed mid-run, the object store going away mid-run, and a task
that kills its own worker.

The user models live in tests/_servers.py; the Dask processes import them by name (tests/ is on
their PYTHONPATH), so model bytes are the same from run to run and can be compared.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _data import MEAN_MODEL_SOURCE, write
from _servers import (
    DUMMY_AWS_ENV,
    MARKER,
    TESTS_DIR,
    CrashOnMarker,
    CrashOnMarkerAtScore,
    DaskProcesses,
    MotoS3,
    NotAScheduler,
    SlowerMean,
    SlowMean,
    alive,
    die_on_key,
    die_on_key_rows,
    executing_units,
    finished_units,
    kill_if_mid_unit,
    tagged_mean,
    wait_for,
)

import modelfactory
from modelfactory import ModelStore
from modelfactory.demo import make_table
from modelfactory.exceptions import ClusterError, ModelFactoryError

SERIES = 40
OUTAGE_SERIES = 20  # on S3: fewer, each unit pays for its S3 requests
HOURS = 48
UNIT_ROWS = 2 * HOURS  # two groups per unit: 20 units
KEYS = ["app", "site"]
TRAIN = dict(by=KEYS, time="ts", target="value", unit_rows=UNIT_ROWS)


@pytest.fixture(scope="module")
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in DUMMY_AWS_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def procs(tmp_path_factory, aws_env):
    """`dask scheduler` and two `dask worker` processes (nanny + child each), killed by PID at the end."""
    env = {"PYTHONPATH": TESTS_DIR, **DUMMY_AWS_ENV}
    # A task may be on a worker that dies once (the kill tests); the second death makes it a
    # KilledWorker (default 3: the crash test would take twice as long).
    sched = {**env, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    p = DaskProcesses(tmp_path_factory.mktemp("dask"), workers=2, env=env, scheduler_env=sched).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def dclient(procs):
    with procs.client() as c:
        yield c


@pytest.fixture(autouse=True)
def _two_workers(request):
    """Every test starts with both workers up (a previous test may have killed one)."""
    if "procs" in request.fixturenames:
        c = request.getfixturevalue("dclient")
        c.wait_for_workers(2, timeout=60)


def _table(series: int = SERIES) -> pa.Table:
    return make_table(series, days=HOURS // 24, apps=4, spikes=0)


@pytest.fixture(scope="module")
def leaves(tmp_path_factory) -> str:
    """One Hive folder per group (app=…/site=…/): many small units without a shuffle."""
    return write(_table(), tmp_path_factory.mktemp("leaves") / "data", KEYS)


def committed(store: str, run: str = "latest", storage_options: dict | None = None) -> pd.DataFrame:
    """What a run decided per group (keys, status, error, rows, model bytes), sorted by key."""
    t = ModelStore(store, storage_options=storage_options).table(run).to_pandas()
    assert not t.duplicated(KEYS).any(), "a group is in the store twice"
    return t[[*KEYS, "status", "error", "rows", "model"]].sort_values(KEYS).reset_index(drop=True)


def in_background(fn):
    """Run ``fn`` in a thread; ``.result()`` joins it and re-raises what it raised."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    th = threading.Thread(target=target, daemon=True)
    th.start()

    class _Handle:
        @staticmethod
        def result(timeout: float = 30):
            th.join(timeout)
            assert not th.is_alive(), "background helper did not finish"
            if "error" in box:
                raise box["error"]
            return box.get("value")

    return _Handle()


# ---------------------------------------------------------------------------
# through a scheduler address
# ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_train_and_score_through_a_scheduler_address(procs, leaves, tmp_path):
    store = str(tmp_path / "store")
    run = modelfactory.train(leaves, store=store, cluster=procs.address, params={"season_length": 24}, **TRAIN)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    assert run.summary["units"] == SERIES * HOURS // UNIT_ROWS
    # The same job in-process gives the same models, byte for byte.
    modelfactory.train(leaves, store=str(tmp_path / "inline"), cluster="inline", params={"season_length": 24},
                       **TRAIN)
    pd.testing.assert_frame_equal(committed(store), committed(str(tmp_path / "inline")))

    scored = modelfactory.score(leaves, store=store, out=str(tmp_path / "scores"), cluster=procs.address,
                                unit_rows=UNIT_ROWS)
    assert scored.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    assert len(pd.read_parquet(tmp_path / "scores")) == SERIES * HOURS


@pytest.mark.timeout(90)
def test_a_scheduler_without_workers_makes_the_run_say_so_and_wait_for_one(tmp_path, leaves, aws_env, caplog,
                                                                           monkeypatch):
    """No worker has joined the scheduler yet: the run says so every few seconds (not a silent
    hang), then finishes once a worker joins."""
    import modelfactory.run

    monkeypatch.setattr(modelfactory.run, "NO_WORKER_WARNING_SECONDS", 0.5)
    bare = DaskProcesses(tmp_path / "dask", workers=0, env={"PYTHONPATH": TESTS_DIR, **DUMMY_AWS_ENV}).start()
    try:
        caplog.set_level("WARNING", logger="modelfactory")
        job = in_background(lambda: modelfactory.train(leaves, store=str(tmp_path / "store"), cluster=bare.address,
                                                       params={"season_length": 24}, **TRAIN))
        waiting = f"the scheduler at {bare.address} has had no Dask worker for"
        wait_for(lambda: sum(waiting in r.getMessage() for r in caplog.records) >= 2, 30, "two warnings")
        assert f"`dask worker {bare.address}`" in caplog.text
        bare.add_worker("late")
        run = job.result(timeout=60)
        assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        heard = sum(waiting in r.getMessage() for r in caplog.records)
        time.sleep(1.5)  # the watch stopped with the run: no warning after it
        assert sum(waiting in r.getMessage() for r in caplog.records) == heard
    finally:
        bare.stop()


@pytest.mark.timeout(90)
def test_a_run_on_workers_all_paused_by_their_memory_limit_says_so(tmp_path, leaves, aws_env, caplog, monkeypatch):
    """Workers paused by Dask's memory limit (past the pause fraction of it) run nothing, and the
    job waited without a word (the review waited 75 s, then pressed Ctrl-C)."""
    import modelfactory.run

    monkeypatch.setattr(modelfactory.run, "NO_WORKER_WARNING_SECONDS", 0.5)
    env = {"PYTHONPATH": TESTS_DIR, **DUMMY_AWS_ENV, "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "0.01"}
    held = DaskProcesses(tmp_path / "dask", workers=1, env=env).start()
    try:
        caplog.set_level("WARNING", logger="modelfactory")
        job = in_background(lambda: modelfactory.train(leaves, store=str(tmp_path / "store"), cluster=held.address,
                                                       params={"season_length": 24}, **TRAIN))
        said = "every Dask worker of the scheduler at"
        wait_for(lambda: said in caplog.text, 30, "the paused warning")
        assert re.search(r"\(1\) has been paused by its memory limit for \d+ s \([\d,]+ MiB of its [\d,]+ MiB "
                         r"limit\): nothing runs until memory is freed", caplog.text), caplog.text
    finally:
        held.stop()
    with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone: whatever the run says of it
        job.result(timeout=60)


@pytest.mark.timeout(90)
def test_workers_without_a_built_in_models_package_are_refused_before_anything_runs(tmp_path, leaves, aws_env):
    """A worker on which statsmodels does not import trained `ets` as far as fitting, where every
    group failed one by one (a run of 75 % failed groups became LATEST, exit status 0): the class
    imports statsmodels lazily, so the code check passed. The check imports it on the workers."""
    from modelfactory.exceptions import ClusterError

    stub = tmp_path / "stub" / "statsmodels"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'statsmodels'\", name='statsmodels')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(stub.parent), TESTS_DIR]), **DUMMY_AWS_ENV}
    lacking = DaskProcesses(tmp_path / "dask", workers=1, env=env).start()
    try:
        with pytest.raises(ClusterError, match=r"The worker at tcp://\S+ cannot import statsmodels, which the model "
                                               r"'ets' needs to fit \(ModuleNotFoundError: No module named "
                                               r"'statsmodels'\): every group would fail on it\. Install it where the Dask "
                                               r"workers run \(pip install statsmodels\), and restart them\. Nothing "
                                               r"ran\."):
            modelfactory.train(leaves, store=str(tmp_path / "store"), cluster=lacking.address, model="ets",
                               params={"season_length": 24}, **TRAIN)
        assert not (tmp_path / "store").exists()
        run = modelfactory.train(leaves, store=str(tmp_path / "store"), cluster=lacking.address,
                                 params={"season_length": 24}, **TRAIN)  # seasonal needs none of it
        assert run.summary["counts"]["ok"] == SERIES
        # scoring ets rebuilds its models with statsmodels: refused too (review P)
        modelfactory.train(leaves, store=str(tmp_path / "ets"), cluster="inline", model="ets",
                           params={"season_length": 12, "maxiter": 20}, **TRAIN)
        with pytest.raises(ClusterError, match=r"cannot import statsmodels, which the model 'ets' needs to score"):
            modelfactory.score(leaves, store=str(tmp_path / "ets"), out=str(tmp_path / "o"), cluster=lacking.address)
    finally:
        lacking.stop()


@pytest.mark.timeout(120)
def test_losing_the_scheduler_mid_run_says_so_and_how_to_resume(tmp_path, leaves, aws_env):
    from _servers import _signal_group

    env = {"PYTHONPATH": TESTS_DIR, **DUMMY_AWS_ENV}
    lone = DaskProcesses(tmp_path / "dask", workers=1, env=env, scheduler_env=env).start()
    store = tmp_path / "store"
    try:
        def kill_the_scheduler_after_a_part():
            wait_for(lambda: list(store.glob("runs/*/parts/*.parquet")), 60, "a first part")
            _signal_group(lone.procs["scheduler"].pid, signal.SIGKILL)

        killer = in_background(kill_the_scheduler_after_a_part)
        with pytest.raises(ModelFactoryError) as caught:
            modelfactory.train(leaves, store=str(store), model=SlowMean, cluster=lone.address, **TRAIN)
        killer.result()
    finally:
        lone.stop()
    st = ModelStore(str(store))
    (pending,) = st.pending()
    assert st.runs() == []
    message = str(caught.value)
    assert message.startswith(f"Run {pending['run_id']} stopped: the connection to the Dask scheduler was lost. "
                              "Nothing was committed")  # not Dask's words, its task key and a line of its source
    assert message.endswith(f"run again with resume={pending['run_id']!r} (--resume {pending['run_id']}): "
                            "the units already done are kept.")


def test_a_connection_closed_while_a_result_is_fetched_is_the_scheduler_lost():
    """When the scheduler goes while the client fetches a unit's result, the error is the
    client's CommClosedError, not a cancelled future: the run said "a work unit failed outside
    any group" (the test above, now and then).  Both are the scheduler lost."""
    from distributed.comm.core import CommClosedError

    from modelfactory.api import _raise_unit_failure

    for err in (CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp://127.0.0.1:1 "
                                "remote=tcp://127.0.0.1:2>: Stream is closed"), OSError("disk full")):
        with pytest.raises(ModelFactoryError) as caught:
            _raise_unit_failure("r1", err, resumable=True)
        lost = str(caught.value).startswith("Run r1 stopped: the connection to the Dask scheduler was lost")
        assert lost == isinstance(err, CommClosedError), str(caught.value)


@pytest.fixture(scope="module")
def calm(procs, leaves, tmp_path_factory) -> str:
    """An uninterrupted run of the slow user model through the address: the store's folder."""
    store = str(tmp_path_factory.mktemp("calm") / "store")
    run = modelfactory.train(leaves, store=store, model=SlowMean, cluster=procs.address, **TRAIN)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    return store


@pytest.mark.timeout(60)
def test_a_user_model_scores_on_the_cluster_with_trust(procs, leaves, calm, tmp_path):
    store = calm
    assert ModelStore(store).manifest()["spec"]["serializer"] == "pickle"
    scored = modelfactory.score(leaves, store=store, out=str(tmp_path / "scores"), cluster=procs.address,
                                trust=True, unit_rows=UNIT_ROWS)
    assert scored.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    s = pd.read_parquet(tmp_path / "scores")
    g = s.groupby("site", observed=True)["value"].mean()
    np.testing.assert_allclose(s.groupby("site", observed=True)["expected"].first(), g, rtol=1e-9)


USER_MODULE = """
import numpy as np
from modelfactory.models.base import Model


class ByValueMean(Model):
    name = "by_value_mean"
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        self.mean_ = float(np.nanmean(y))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of user models importable here only (not by the scheduler or the workers)."""
    import importlib

    name = f"mf_user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    yield mod
    sys.modules.pop(name, None)


@pytest.mark.timeout(60)
def test_a_model_class_registered_by_value_trains_on_a_cluster_without_its_module(procs, leaves, tmp_path,
                                                                                   user_module):
    import cloudpickle

    cloudpickle.register_pickle_by_value(user_module)
    try:
        run = modelfactory.train(leaves, store=str(tmp_path / "store"), cluster=procs.address,
                                 model=user_module.ByValueMean, **TRAIN)
    finally:
        cloudpickle.unregister_pickle_by_value(user_module)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}


# ---------------------------------------------------------------------------
# a worker killed mid-run
# ---------------------------------------------------------------------------
def _train_while(kill, procs, leaves, tmp_path):
    """The run of ``calm`` again (into tmp_path/store), with ``kill`` going on in a thread."""
    killer = in_background(kill)
    run = modelfactory.train(leaves, store=str(tmp_path / "store"), model=SlowMean, cluster=procs.address,
                             **TRAIN)
    killer.result()
    return run


def _accounted_for_exactly_once(run, tmp_path, calm: str) -> None:
    units = SERIES * HOURS // UNIT_ROWS
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    man = ModelStore(str(tmp_path / "store")).manifest()
    assert sorted(u["id"] for u in man["units"]) == sorted({u["id"] for u in man["units"]})
    assert len(man["units"]) == units
    # Every group exactly once, with the same status and model bytes as the uninterrupted run
    # (reading the table also verifies every part against its checksum in the manifest).
    pd.testing.assert_frame_equal(committed(str(tmp_path / "store")), committed(calm))


@pytest.mark.timeout(90)
def test_a_worker_killed_in_the_middle_of_a_unit_loses_and_duplicates_nothing(procs, dclient, leaves, calm,
                                                                               tmp_path):
    addr, victim = next(iter(procs.worker_pids(dclient).items()))

    def kill_mid_unit() -> None:
        def killed() -> bool:
            # The worker answers unless it killed itself; never ask a dead worker again (the
            # scheduler would keep trying to connect to it for distributed.comm.timeouts.connect).
            return addr not in dclient.run(kill_if_mid_unit, workers=[addr], on_error="ignore")
        wait_for(killed, 30, "the worker to be busy with its first unit", every=0.005)
        wait_for(lambda: not alive(victim), 10, "the worker process to be gone")

    run = _train_while(kill_mid_unit, procs, leaves, tmp_path)
    assert not alive(victim)
    _accounted_for_exactly_once(run, tmp_path, calm)
    dclient.wait_for_workers(2, timeout=60)  # the nanny brought a new worker process up
    assert victim not in procs.worker_pids(dclient).values()


@pytest.mark.timeout(90)
def test_a_worker_killed_after_the_client_took_its_results_loses_and_duplicates_nothing(
        procs, dclient, leaves, calm, tmp_path):
    addr, victim = next(iter(procs.worker_pids(dclient).items()))

    def kill_after_a_unit() -> None:
        wait_for(lambda: dclient.run(finished_units, workers=[addr])[addr], 30, "a finished unit", every=0.005)
        time.sleep(0.3)  # the client has collected it by now (it keeps the future until the end)
        os.kill(victim, signal.SIGKILL)  # the worker child, not its nanny: like an OOM kill

    run = _train_while(kill_after_a_unit, procs, leaves, tmp_path)
    assert not alive(victim)
    _accounted_for_exactly_once(run, tmp_path, calm)


# ---------------------------------------------------------------------------
# the object store goes away mid-run
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(aws_env):
    srv = MotoS3().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def outage(procs, dclient, s3):
    """A committed run in an S3 store, then a second run during which the S3 server stops.

    Returns what the tests check: the error, the committed run, the store URL and options.
    The server is back (same port, same objects) when this returns.
    """
    # No botocore retries: an unreachable endpoint fails a unit at once instead of after a minute.
    so = s3.storage_options(config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    s3.make_bucket("outage")
    fs = s3.fs()
    ds.write_dataset(_table(OUTAGE_SERIES), "outage/data", filesystem=fs, format="parquet",
                     partitioning=ds.partitioning(pa.schema([(k, pa.string()) for k in KEYS]), flavor="hive"))
    data, store = "s3://outage/data", "s3://outage/store"
    kw = dict(model=SlowerMean, cluster=procs.address, storage_options=so, **TRAIN)
    calm = modelfactory.train(data, store=store, **kw)

    def new_parts():
        fs.invalidate_cache()
        return [p for p in fs.glob("outage/store/runs/*/parts/*.parquet") if f"/{calm.id}/" not in p]

    def stop_after_the_first_part() -> None:
        wait_for(new_parts, 30, "the first part file of the second run", every=0.02)
        s3.stop()

    stopper = in_background(stop_after_the_first_part)
    try:
        with pytest.raises(ModelFactoryError) as info:
            modelfactory.train(data, store=store, **kw)
        stopper.result()
    finally:
        s3.stop()
        s3.start()
    # Units of the failed run that were still executing finish on their own (Dask does not stop a
    # released task) and write their parts now that S3 is back: let them, before anyone resumes.
    wait_for(lambda: not sum(dclient.run(executing_units).values()), 30, "the workers to be idle", every=0.05)
    return {"error": info.value, "calm": calm, "store": store, "data": data, "so": so, "kw": kw}


@pytest.mark.timeout(90)
def test_losing_the_object_store_mid_run_fails_clearly_and_commits_nothing(outage, s3, procs):
    err, calm = outage["error"], outage["calm"]
    msg = str(err)
    m = re.match(r"Run (\S+) stopped: a work unit failed outside any group \((.*)\)\. Nothing was committed",
                 msg, re.S)
    assert m, msg
    assert m.group(1) != calm.id
    # It names what could not be reached: the endpoint, or (a read through pyarrow, see
    # test_s3.py::test_a_read_from_an_unreachable_endpoint_names_the_endpoint) the file.
    assert re.search(r"(?i)could not connect to the endpoint|outage/", m.group(2)), msg
    assert s3.secret not in msg and s3.key not in msg
    st = ModelStore(outage["store"], storage_options=outage["so"])
    assert st.runs() == [calm.id]
    assert st.latest() == calm.id
    assert not st.location.exists(f"runs/{m.group(1)}/manifest.json")
    assert [p["run_id"] for p in st.pending()] == [m.group(1)]  # left for resume (or gc)
    logs = procs.logs()
    assert s3.secret not in logs and s3.key not in logs


@pytest.mark.timeout(90)
def test_resuming_after_the_outage_commits_what_an_uninterrupted_run_would(outage, s3):
    run = modelfactory.train(outage["data"], store=outage["store"], resume=True, **outage["kw"])
    assert run.summary["counts"] == {"ok": OUTAGE_SERIES, "failed": 0, "skipped": 0}
    st = ModelStore(outage["store"], storage_options=outage["so"])
    assert st.latest() == run.id
    assert st.runs() == sorted([outage["calm"].id, run.id])
    pd.testing.assert_frame_equal(committed(outage["store"], run.id, outage["so"]),
                                  committed(outage["store"], outage["calm"].id, outage["so"]))


# ---------------------------------------------------------------------------
# a group whose task kills its worker, every time
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_crasher(tmp_path_factory) -> str:
    t = _table().to_pandas()
    t.loc[(t.site == "site-00007") & (t.index % HOURS == 5), "value"] = MARKER
    return write(pa.Table.from_pandas(t, preserve_index=False), tmp_path_factory.mktemp("crash") / "data", KEYS)


@pytest.fixture(scope="module")
def with_crasher_by_day(tmp_path_factory) -> str:
    """The same rows partitioned by day: every group spans two folders (the shuffle path)."""
    t = _table().to_pandas()
    t.loc[(t.site == "site-00007") & (t.index % HOURS == 5), "value"] = MARKER
    t["day"] = t["ts"].dt.strftime("%Y-%m-%d")
    t["tags"] = [[float(i % 3)] * (i % 2) for i in range(len(t))]  # a nested column: apply reads it too
    return write(pa.Table.from_pandas(t, preserve_index=False), tmp_path_factory.mktemp("crash") / "by_day",
                 ["day"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["by_key", "by_day"])
def test_a_group_that_kills_its_worker_fails_alone(procs, layout, request, tmp_path):
    data = request.getfixturevalue("with_crasher" if layout == "by_key" else "with_crasher_by_day")
    run = modelfactory.train(data, store=str(tmp_path / "store"), model=CrashOnMarker,
                             cluster=procs.address, **TRAIN)
    assert run.summary["mode"] == ("files" if layout == "by_key" else "shuffle")
    assert run.summary["counts"] == {"ok": SERIES - 1, "failed": 1, "skipped": 0}
    g = committed(str(tmp_path / "store")).set_index("site")
    assert g.loc["site-00007", "status"] == "failed"
    assert re.search(r"(?i)worker.*(died|killed|crashed|lost)", g.loc["site-00007", "error"])
    assert (g.drop(index="site-00007").status == "ok").all()
    # The crashed unit's groups were written one part each: every other group's model is still
    # found by key (through the run's leaf index, which names the parts that hold each folder),
    # and scored.
    st = ModelStore(str(tmp_path / "store"))
    for app, site in g.drop(index="site-00007").reset_index()[KEYS].itertuples(index=False):
        assert st.load({"app": app, "site": site}, trust=True).is_fitted
    if layout == "by_key":  # each part of a group run by itself is indexed under its own folder only
        index = st.manifest()["index"]
        assert len(index["parts"]) > 4 and sum(len(leaves) for leaves in index["parts"]) == SERIES, index
    if layout == "by_day":  # the parts of groups run one by one know their shuffle partition too,
        # or every scoring unit (and every load) reads every one of them first
        buckets = st.manifest()["buckets"]
        assert len(buckets["parts"]) > buckets["n"] and None not in buckets["parts"], buckets
    scored = modelfactory.score(data, store=str(tmp_path / "store"), out=str(tmp_path / "scores"),
                                cluster=procs.address, trust=True)
    assert scored.summary["counts"] == {"ok": SERIES - 1, "failed": 0, "skipped": 1}
    assert "failed" in scored.groups.set_index("site").loc["site-00007", "error"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("out", [False, True])
def test_a_key_that_kills_its_worker_fails_alone_in_map_keys(procs, out, tmp_path):
    """A key whose call kept killing its worker stopped the whole map_keys job ("a work unit
    failed outside any group (KilledWorker ...)"); now that key alone fails, as a group does in
    train, apply and score, and every other key's result is kept."""
    keys = list(range(12))
    if out:
        run = modelfactory.map_keys(keys, func=die_on_key_rows, schema="v bigint", out=str(tmp_path / "out"),
                                    cluster=procs.address, keys_per_unit=4)
        assert sorted(pd.read_parquet(str(tmp_path / "out")).v) == [k * 10 for k in keys if k != 7]
    else:
        run = modelfactory.map_keys(keys, func=die_on_key, cluster=procs.address, keys_per_unit=4)
        assert run.results == {k: k * 10 for k in keys if k != 7}
    assert run.summary["counts"] == {"ok": 11, "failed": 1, "skipped": 0}
    g = run.groups.set_index("key")
    assert sorted(g.index) == keys and g.loc[7, "status"] == "failed"
    assert re.search(r"(?i)worker.*died", g.loc[7, "error"])
    assert (g.drop(index=7).status == "ok").all()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("layout", ["by_key", "by_day"])
def test_a_group_that_kills_its_worker_while_scored_fails_alone(procs, with_crasher, layout, request, tmp_path):
    store = str(tmp_path / "store")
    fitted = modelfactory.train(with_crasher, store=store, model=CrashOnMarkerAtScore, cluster=procs.address,
                                **TRAIN)
    assert fitted.summary["counts"]["ok"] == SERIES
    data = with_crasher if layout == "by_key" else request.getfixturevalue("with_crasher_by_day")
    out = tmp_path / "scores"
    run = modelfactory.score(data, store=store, out=str(out), cluster=procs.address, unit_rows=UNIT_ROWS,
                             trust=True)
    assert run.summary["mode"] == ("files" if layout == "by_key" else "shuffle")
    assert run.summary["counts"] == {"ok": SERIES - 1, "failed": 1, "skipped": 0}
    g = run.groups.set_index("site")
    assert len(g) == SERIES and re.search(r"(?i)worker.*died", g.loc["site-00007", "error"])
    assert g.loc["site-00007", "anomalies"] == 0 and pd.isna(g.loc["site-00007", "max_score"])
    # every other group's rows are scored once, in the input's partition folders
    scored = ds.dataset(str(out), format="parquet", partitioning="hive", exclude_invalid_files=False,
                        ignore_prefixes=["_", "."]).to_table().to_pandas()
    assert sorted(set(scored["site"])) == sorted(set(g.index) - {"site-00007"})
    assert scored.groupby(["app", "site"], observed=True).size().eq(HOURS).all()
    on_disk = pq.read_table(out / "_groups").to_pandas()
    assert len(on_disk) == SERIES and not on_disk.duplicated(KEYS).any()


def crash_on_marker(df: pd.DataFrame) -> pd.DataFrame:
    if (df["value"] == MARKER).any():
        os._exit(1)
    if any(isinstance(t, str) for t in df["tags"]):  # the nested column must arrive as lists
        raise TypeError(f"tags arrived as text: {df['tags'].iloc[0]!r}")
    return pd.DataFrame({"app": [df["app"].iloc[0]], "site": [df["site"].iloc[0]], "n": [len(df)]})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("written", [False, True], ids=["returned", "out"])
def test_an_applied_function_that_kills_its_worker_fails_its_group_alone_after_a_shuffle(
        procs, with_crasher_by_day, written, tmp_path):
    run = modelfactory.apply(with_crasher_by_day, by=KEYS, func=crash_on_marker,
                             schema="app string, site string, n bigint", cluster=procs.address,
                             unit_rows=UNIT_ROWS, out=str(tmp_path / "out") if written else None)
    assert run.summary["mode"] == "shuffle"
    assert run.summary["counts"] == {"ok": SERIES - 1, "failed": 1, "skipped": 0}
    g = run.groups.set_index("site")
    assert len(g) == SERIES and re.search(r"(?i)worker.*died", g.loc["site-00007", "error"])
    out = run.to_pandas()
    assert sorted(out["site"]) == sorted(set(g.index) - {"site-00007"}) and set(out["n"]) == {HOURS}


# ---------------------------------------------------------------------------------------------
# An address that is not a Dask scheduler's: a clear ClusterError, in bounded time
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["silent", "http400"])
def not_a_scheduler(request):
    server = NotAScheduler(request.param)
    yield server
    server.close()


@pytest.mark.timeout(60)
def test_an_address_that_is_not_a_dask_schedulers_fails_clearly_in_bounded_time(not_a_scheduler, by_app, tmp_path,
                                                                              monkeypatch):
    from modelfactory.exceptions import ClusterError

    monkeypatch.setenv("MODELFACTORY_CONNECT_TIMEOUT", "3")  # the silent server takes it all (default 20 s)
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        modelfactory.train(by_app, by=KEYS, time="ts", target="value", store=str(tmp_path / "s"),
                           cluster=not_a_scheduler.address)
    assert time.monotonic() - start < 3 + 8
    message = str(info.value)
    assert repr(not_a_scheduler.address) in message and "tcp://host:8786" in message and "dashboard" in message
    assert not (tmp_path / "s" / "LATEST").exists()


@pytest.mark.timeout(60)
def test_the_scheduler_check_works_where_an_event_loop_runs_already(not_a_scheduler, procs):
    """As in a notebook: no asyncio.run in the caller's thread, whose loop is running."""
    import asyncio

    from modelfactory.exceptions import ClusterError
    from modelfactory.run import check_scheduler

    async def in_a_loop():
        check_scheduler(procs.address, timeout=3)  # the real scheduler passes
        with pytest.raises(ClusterError, match=re.escape(repr(not_a_scheduler.address))):
            check_scheduler(not_a_scheduler.address, timeout=3)

    asyncio.run(in_a_loop())


@pytest.mark.timeout(60)
def test_an_address_where_nothing_listens_is_said_at_once_then_waited_for(procs, caplog):
    """A mistyped port said nothing for the whole connect_timeout (20 s by default) before its
    error: a second without an answer says so (with no probe of its own, which a TLS scheduler
    logged as a failed handshake on every job); a scheduler still starting is waited for as
    before, and a live one draws no warning."""
    import socket

    from modelfactory.exceptions import ClusterError
    from modelfactory.run import check_scheduler

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level("WARNING", logger="modelfactory.run")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=rf"Cannot reach the Dask scheduler at 'tcp://127.0.0.1:{port}': nothing "
                                           rf"listens at 127.0.0.1:{port} \(connection refused for 2 s\)") as err:
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - start >= 2  # waited for one that may be starting
    # the reason is in the message: Dask's own chain (over 100 lines in a notebook) is not shown above it
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # what cannot start later is said at once: an unknown host, a port beyond 65535
    with pytest.raises(ClusterError, match=r"the host 'nosuchhost\.invalid' is not known"):
        check_scheduler("tcp://nosuchhost.invalid:8786", timeout=2)
    with pytest.raises(ClusterError, match="port 99999 is not between 1 and 65535"):
        check_scheduler("tcp://127.0.0.1:99999", timeout=2)
    (record,) = [r for r in caplog.records if r.name == "modelfactory.run"]
    assert record.getMessage() == (f"no answer yet from tcp://127.0.0.1:{port}: waiting up to 2 s for a Dask "
                                   "scheduler there (the connect_timeout setting)")
    caplog.clear()
    check_scheduler(procs.address, timeout=3)
    assert not [r for r in caplog.records if r.name == "modelfactory.run"]


def _self_signed(folder) -> tuple[str, str]:
    """A certificate and its key (PEM files), valid for a day: Dask's TLS does not check host names."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(folder / "cert.pem"), str(folder / "key.pem")


@pytest.mark.timeout(120)
def test_a_tls_scheduler_needs_dasks_tls_settings_and_runs_with_them(tmp_path, by_app):
    """A tls:// address without Dask's TLS settings was called "not a Dask handshake (an HTTP server,
    such as the dashboard, answers so)"; Dask's own error is a TypeError about an ssl_context."""
    import dask
    import distributed  # noqa: F401 - its defaults are in Dask's config before the sets below, which would drop them

    cert, key = _self_signed(tmp_path)
    tls = {f"distributed.comm.tls.{k}": v for k, v in {
        "ca-file": cert, "scheduler.cert": cert, "scheduler.key": key, "worker.cert": cert, "worker.key": key,
        "client.cert": cert, "client.key": key}.items()}
    env = {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): v for k, v in tls.items()}
    with dask.config.set(tls):
        procs = DaskProcesses(tmp_path / "dask", workers=1, env=env, scheduler_env=env,
                              scheduler_args=("--protocol", "tls")).start()
    try:
        assert procs.address.startswith("tls://")
        with pytest.raises(ClusterError, match=rf"^'{re.escape(procs.address)}' is a TLS address, and Dask's TLS "
                                               r"settings are not set: set distributed.comm.tls.ca-file"):
            modelfactory.train(by_app, by=KEYS, time="ts", target="value", store=str(tmp_path / "s"),
                               cluster=procs.address)
        with dask.config.set(tls):
            run = modelfactory.train(by_app, by=KEYS, time="ts", target="value", store=str(tmp_path / "s"),
                                     cluster=procs.address)
        assert run.summary["counts"]["failed"] == 0 and run.summary["counts"]["ok"] > 0
    finally:
        procs.stop()


@pytest.mark.timeout(60)
def test_a_workers_address_is_not_taken_for_the_schedulers(procs, dclient, by_app, tmp_path):
    from modelfactory.exceptions import ClusterError

    worker = next(iter(dclient.scheduler_info(n_workers=-1)["workers"]))
    with pytest.raises(ClusterError, match="is the address of a Dask worker, not of the scheduler"):
        modelfactory.train(by_app, by=KEYS, time="ts", target="value", store=str(tmp_path / "s"), cluster=worker)


# ---------------------------------------------------------------------------
# a job interrupted (Ctrl-C) while its units run
# ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_unit_still_running_after_ctrl_c_writes_nothing_into_the_next_jobs_output(procs, dclient, leaves,
                                                                                    tmp_path):
    """Ctrl-C stops the client, but Dask cannot stop a task that is running: the interrupted
    job's unit finishes on its worker later.  A user who fixed the function and ran the job
    again (overwrite) had that unit's old rows written over the new job's files of the same
    name, inside a folder committed as the new job's (all `ok`)."""
    import _thread

    gate, out = tmp_path / "gate", str(tmp_path / "out")
    gate.mkdir()
    job = dict(by=KEYS, schema="app string, site string, m double, tag string", out=out, unit_rows=UNIT_ROWS)

    def interrupt_once_the_unit_waits():
        wait_for(lambda: (gate / "started").exists(), 60, "the gated group to start")
        _thread.interrupt_main()  # what Ctrl-C does

    interrupter = in_background(interrupt_once_the_unit_waits)
    with pytest.raises(KeyboardInterrupt):
        modelfactory.apply(leaves, func=functools.partial(tagged_mean, "old", str(gate)), cluster=procs.address,
                           **job)
    interrupter.result()
    # the other units end (they run in no time); the gated one runs on
    wait_for(lambda: sum(dclient.run(executing_units).values()) == 1, 30, "only the gated unit to run")

    run = modelfactory.apply(leaves, func=functools.partial(tagged_mean, "new", None), cluster="inline",
                             overwrite=True, **job)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    (gate / "open").touch()  # the interrupted job's unit ends now
    wait_for(lambda: sum(dclient.run(executing_units).values()) == 0, 60, "the interrupted unit to end")

    rows = pd.read_parquet(out)
    assert len(rows) == SERIES and set(rows.tag) == {"new"}
    man = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    for part in man["parts"]:  # every file is still the one the committed run wrote
        assert hashlib.sha256((tmp_path / "out" / part["path"]).read_bytes()).hexdigest() == part["sha256"]


# ---------------------------------------------------------------------------
# user code the cluster cannot import
# ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_function_whose_module_the_cluster_lacks_is_a_clear_error_and_the_workers_stay(procs, dclient, leaves,
                                                                                       tmp_path, monkeypatch):
    """A function from a module only the client has (a file beside the user's notebook): the
    run failed with Dask's "Error during deserialization of the task graph" and nothing named
    the module (only the scheduler's log did).  The workers are named: the scheduler needs no
    user code (test_late_workers: a scheduler without the module)."""
    (tmp_path / "only_here_fns.py").write_text(
        "import pandas as pd\n"
        "def first(df):\n"
        "    return pd.DataFrame({'app': [df.app.iloc[0]], 'site': [df.site.iloc[0]]})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_fns

    with pytest.raises(ClusterError, match=r"(?s)The worker at tcp://\S+ \(and 1 more\) cannot load this job's code: "
                                           r"ModuleNotFoundError: No module named 'only_here_fns'.*PYTHONPATH.*register_pickle_by_value"):
        modelfactory.apply(leaves, by=KEYS, func=only_here_fns.first, schema="app string, site string",
                           out=str(tmp_path / "out"), cluster=procs.address)
    assert not (tmp_path / "out").exists()
    assert len(dclient.scheduler_info()["workers"]) == 2  # and the next job runs at once
    run = modelfactory.apply(leaves, by=KEYS, func=functools.partial(tagged_mean, "ok", None),
                             schema="app string, site string, m double, tag string", cluster=procs.address)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}


@pytest.mark.timeout(90)
def test_scoring_models_whose_class_the_workers_lack_is_a_clear_error_before_any_unit(procs, leaves, tmp_path,
                                                                                      monkeypatch):
    """Models trained here (inline) with a class from a module only this process has: every
    group of the score failed with the ImportError, after each unit had read its data."""
    name = f"only_here_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MEAN_MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    store = str(tmp_path / "store")
    run = modelfactory.train(leaves, store=store, model=module.Mean, cluster="inline", **TRAIN)
    assert run.summary["counts"]["ok"] == SERIES
    with pytest.raises(ClusterError) as err:
        modelfactory.score(leaves, store=store, out=str(tmp_path / "scores"), trust=True, cluster=procs.address)
    assert re.fullmatch(rf"The worker at tcp://\S+ \(and 1 more\) cannot load the models of run '{run.id}': they "
                        rf"need {name}\.Mean, which cannot be imported there \(ModuleNotFoundError: No module named "
                        rf"'{name}'\)\. Install that module .* where the Dask workers run, .*restart them\. Nothing ran\.",
                        str(err.value)), err.value
    assert not (tmp_path / "scores").exists()


@pytest.mark.timeout(60)
def test_a_cluster_running_another_modelfactory_version_is_a_clear_error(procs, leaves, tmp_path, monkeypatch):
    """A client upgraded before the cluster (or the other way round) ran its units with the
    other side's code, without a word."""
    monkeypatch.setattr(modelfactory, "__version__", "99.0.0")
    with pytest.raises(ClusterError, match=r"The scheduler \(and 2 more\) runs modelfactory 0\.\d+\.\d+, this client "
                                           r"modelfactory 99\.0\.0: install the same version"):
        modelfactory.train(leaves, store=str(tmp_path / "store"), model="seasonal", cluster=procs.address, **TRAIN)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.parquet"))


# ---------------------------------------------------------------------------
# workers without the client's S3 credentials
# ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_workers_without_the_clients_s3_credentials_fail_naming_the_workers_and_the_fix(s3, tmp_path, monkeypatch):
    """The client's shell has AWS_* set, the workers (started by a platform team, elsewhere)
    have none: the run stopped with "NoCredentialsError: Unable to locate credentials", though
    this process had just read the same data, and nothing said whose credentials were missing."""
    s3.make_bucket("nocreds")
    ds.write_dataset(_table(OUTAGE_SERIES), "nocreds/data", filesystem=s3.fs(), format="parquet",
                     partitioning=ds.partitioning(pa.schema([(k, pa.string()) for k in KEYS]), flavor="hive"))
    with monkeypatch.context() as mp:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.delenv(k, raising=False)
        bare = DaskProcesses(tmp_path / "dask", workers=1).start()
    try:
        for k, v in s3.env().items():  # this process has them
            monkeypatch.setenv(k, v)
        with pytest.raises(ModelFactoryError, match=r"(?s)NoCredentialsError.*the Dask workers read and write with "
                                                    r"their own credentials.*storage_options") as info:
            modelfactory.train("s3://nocreds/data", store="s3://nocreds/store", model="seasonal",
                               cluster=bare.address, **TRAIN)
        assert s3.secret not in str(info.value)
        # what the message says works: the credentials in storage_options travel with the job
        run = modelfactory.train("s3://nocreds/data", store="s3://nocreds/store", model="seasonal",
                                 cluster=bare.address, storage_options=s3.storage_options(), **TRAIN)
        assert run.summary["counts"] == {"ok": OUTAGE_SERIES, "failed": 0, "skipped": 0}
    finally:
        bare.stop()


@contextlib.contextmanager
def _importable_on_cluster(procs, folder, module: str):
    """The module file ``module`` in ``folder`` importable by the cluster's scheduler and workers,
    as by this process (a shared home, or the same machine), and forgotten by all of them after."""
    here = str(folder)
    dclient = procs.client()
    try:
        dclient.run(lambda: sys.path.append(here) if here not in sys.path else None)
        dclient.run_on_scheduler(lambda: sys.path.append(here) if here not in sys.path else None)
        yield
    finally:
        dclient.run(lambda: [sys.modules.pop(module, None), sys.path.remove(here)])
        dclient.run_on_scheduler(lambda: [sys.modules.pop(module, None), sys.path.remove(here)])
        dclient.close()


@pytest.mark.timeout(90)
def test_a_function_edited_since_the_workers_imported_it_is_refused_not_run_as_it_was(procs, leaves, tmp_path,
                                                                                      monkeypatch):
    """A user edits the module beside their notebook and runs the job again on the same cluster:
    the workers had imported the module for the first job and kept it, so the second job ran
    the old code, every group `ok` with the old function's rows."""
    import importlib

    mod = tmp_path / "edited_fns.py"
    body = ("import pandas as pd\n"
            "def tag(df):\n"
            "    return pd.DataFrame({{'app': [df.app.iloc[0]], 'site': [df.site.iloc[0]], 'tag': [{!r}]}})\n")
    mod.write_text(body.format("first"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_fns

    job = dict(by=KEYS, schema="app string, site string, tag string", cluster=procs.address)
    with _importable_on_cluster(procs, tmp_path, "edited_fns"):
        first = modelfactory.apply(leaves, func=edited_fns.tag, **job)
        assert set(first.to_pandas().tag) == {"first"}
        mod.write_text(body.format("second"))
        importlib.reload(edited_fns)
        with pytest.raises(ClusterError, match=r"(?s)another version of edited_fns\.tag than this client.*"
                                               r"Restart the workers"):
            modelfactory.apply(leaves, func=edited_fns.tag, **job)


@pytest.mark.timeout(90)
def test_a_default_argument_edited_since_the_workers_imported_it_is_refused_not_run_as_it_was(procs, tmp_path,
                                                                                               monkeypatch):
    """The user changes only a default (``factor=2`` to ``factor=10``) in the module beside their
    notebook, reloads it and runs the job again on the same cluster: the check compared the
    function's bytecode only, which a default is not part of, and the workers ran the old
    default, every key `ok` with the old values.  A mutable default (a dict used as a cache,
    filled on the client only) is no edit."""
    import importlib

    mod = tmp_path / "default_fns.py"
    body = ("def scale(key, factor={}, *, offset=0.0, _seen={{}}):\n"
            "    _seen[key] = True\n"
            "    return {{'v': float(key) * factor + offset}}\n")
    mod.write_text(body.format(2))
    monkeypatch.syspath_prepend(str(tmp_path))
    import default_fns

    job = {"schema": "v double", "cluster": procs.address}
    with _importable_on_cluster(procs, tmp_path, "default_fns"):
        assert sorted(modelfactory.map_keys([1, 2], func=default_fns.scale, **job).to_pandas().v) == [2.0, 4.0]
        default_fns.scale(7)  # the client's cache differs from the workers' now: no edit
        assert sorted(modelfactory.map_keys([1, 2], func=default_fns.scale, **job).to_pandas().v) == [2.0, 4.0]
        mod.write_text(body.format(10))
        importlib.reload(default_fns)
        with pytest.raises(ClusterError, match=r"(?s)another version of default_fns\.scale than this client.*"
                                               r"Restart the workers"):
            modelfactory.map_keys([1, 2], func=default_fns.scale, **job)


@pytest.mark.timeout(120)
def test_a_constant_or_helper_edited_since_the_workers_imported_it_is_refused_not_run_as_it_was(
        procs, leaves, tmp_path, monkeypatch):
    """The user edits a module-level constant, or a helper the function calls, in the module beside
    their notebook and reloads it: the check compared the function's own code and defaults only,
    and the workers ran the old constant or helper, every group `ok` with the old rows.  What
    differs between processes by nature (a value computed at import, a counter the function keeps
    with ``global``) is no edit."""
    import importlib

    mod = tmp_path / "const_fns.py"
    body = ("import os\n"
            "import pandas as pd\n"
            "LABEL = {label!r}\n"
            "PID = os.getpid()\n"
            "_CALLS = 0\n"
            "def suffix():\n"
            "    return {suffix!r}\n"
            "def tag(df):\n"
            "    global _CALLS\n"
            "    _CALLS += 1\n"
            "    label = LABEL + suffix() + ('' if PID else '?')\n"
            "    return pd.DataFrame({{'app': [df.app.iloc[0]], 'site': [df.site.iloc[0]], 'tag': [label]}})\n")
    mod.write_text(body.format(label="first", suffix="!"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import const_fns

    job = {"by": KEYS, "schema": "app string, site string, tag string", "cluster": procs.address}
    refused = r"(?s)another version of const_fns\.tag than this client.*Restart the workers"
    with _importable_on_cluster(procs, tmp_path, "const_fns"):
        assert set(modelfactory.apply(leaves, func=const_fns.tag, **job).to_pandas().tag) == {"first!"}
        assert const_fns._CALLS == 0
        const_fns.tag(pd.DataFrame({"app": ["a"], "site": ["s"]}))  # a counter of this process's own: no edit
        assert set(modelfactory.apply(leaves, func=const_fns.tag, **job).to_pandas().tag) == {"first!"}
        for label, suffix in [("second", "!"), ("first", "?")]:  # the constant, then the helper
            mod.write_text(body.format(label=label, suffix=suffix))
            importlib.reload(const_fns)
            with pytest.raises(ClusterError, match=refused):
                modelfactory.apply(leaves, func=const_fns.tag, **job)


def _digest_of(tmp_path, monkeypatch, module: str, source: str, func: str = "fit", env=None, before=None,
               keys: str | None = None) -> dict:
    """The digests of ``module.func`` (and of what it wraps), ``source`` imported afresh as
    ``module`` (as another process would import it: ``env`` set, ``before(mod)`` run first)."""
    import importlib
    import textwrap

    from modelfactory import kernel

    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path))
        for k, v in (env or {}).items():
            m.setenv(k, v)
        sys.modules.pop(module, None)
        try:
            mod = importlib.import_module(module)
            if before is not None:
                before(mod)
            found = kernel.code_digests(getattr(mod, func), None)
            return {k: v for k, v in found.items() if k.startswith(keys or f"{module}.{func}")}
        finally:
            sys.modules.pop(module, None)


def test_what_differs_between_processes_by_nature_is_not_an_edit(tmp_path, monkeypatch):
    """The same source in two processes: a helper built at run time (``_scorer = None``, set on
    first use), a helper defined in a try/except as an environment allows, and defaults computed
    as the module loads (``os.environ.get``) differ between them by nature.  Each refused every
    job on workers whose state or environment was not the client's ("Restart the workers", which
    changed nothing); the function run once on the client first was enough."""
    lazy = """
        _scorer = None
        def _make(w):
            def score(x):
                return x * w
            return score
        def get():
            global _scorer
            if _scorer is None:
                _scorer = _make(2.0)
            return _scorer
        def fit(x):
            return get()(x)
    """
    fresh = _digest_of(tmp_path, monkeypatch, "lazy_helper_fns", lazy)
    assert _digest_of(tmp_path, monkeypatch, "lazy_helper_fns", lazy, before=lambda m: m.fit(1.0)) == fresh
    fallback = """
        try:
            from mf_fast_maths import expit
        except ImportError:
            def expit(x):
                return x / 2
        def fit(x):
            return expit(x)
    """
    without = _digest_of(tmp_path, monkeypatch, "fallback_fns", fallback)
    fast = type(sys)("mf_fast_maths")
    fast.expit = lambda x: x / 3
    monkeypatch.setitem(sys.modules, "mf_fast_maths", fast)
    assert _digest_of(tmp_path, monkeypatch, "fallback_fns", fallback) == without
    computed = """
        import os
        def helper(x, root=os.environ.get("MF_TEST_ROOT", "/data"), *, n=os.cpu_count(), scale=2):
            return x * scale
        def fit(x, base=os.environ.get("MF_TEST_ROOT")):
            return helper(x)
    """
    one = _digest_of(tmp_path, monkeypatch, "computed_fns", computed, env={"MF_TEST_ROOT": "/a"})
    assert _digest_of(tmp_path, monkeypatch, "computed_fns", computed, env={"MF_TEST_ROOT": "/b"}) == one
    assert _digest_of(tmp_path, monkeypatch, "computed_fns", computed.replace("scale=2", "scale=3"),
                      env={"MF_TEST_ROOT": "/a"}) != one  # a literal default is compared
    # a line added above the function after this process imported it: the same function, the
    # same defaults (they were looked up by the old line number in the new file, and refused)
    shifted = "import os\ndef fit(df, window=24, *, root=os.sep):\n    return len(df) * window\n"
    kept = _digest_of(tmp_path, monkeypatch, "shifted_fns", shifted,
                      before=lambda m: (tmp_path / "shifted_fns.py").write_text("# a comment\n" + shifted))
    assert kept == _digest_of(tmp_path, monkeypatch, "shifted_fns", "# a comment\n" + shifted)


def test_an_edit_behind_a_decorator_or_a_deep_expression_is_still_seen(tmp_path, monkeypatch):
    """A helper cached with ``functools.lru_cache`` or wrapped with ``functools.wraps``, and a job
    function wrapped so: the wrapper was digested without the body it wraps, and an edit of it
    ran as the workers' old copy.  A module with a long top-level expression made the check give
    up on everything (a RecursionError in reading the source), the function's own body too."""
    cached = """
        import functools
        def logged(f):
            @functools.wraps(f)
            def inner(*a):
                return f(*a)
            return inner
        @functools.lru_cache
        def weight(x):
            return x * 1.5
        @logged
        def shift(x):
            return x + 1
        @logged
        def fit(x):
            return weight(x) + shift(x)
    """
    base = _digest_of(tmp_path, monkeypatch, "deco_fns", cached)
    for old, new in (("x * 1.5", "x * 2.5"), ("x + 1", "x + 2"), ("weight(x) + shift(x)", "weight(x) - shift(x)")):
        assert _digest_of(tmp_path, monkeypatch, "deco_fns", cached.replace(old, new)) != base, new
    methods = """
        class Fitter:
            def fit(self, x):
                return x * 1.5
        class Scale:
            def __call__(self, x):
                return x * 1.5
        fit = Fitter().fit
        scale = Scale()
    """
    for func in ("fit", "scale"):  # func=obj.method, func=an object with __call__: nothing was digested
        one = _digest_of(tmp_path, monkeypatch, "method_fns", methods, func=func, keys="method_fns.")
        assert one and one != _digest_of(tmp_path, monkeypatch, "method_fns", methods.replace("1.5", "2.5"),
                                         func=func, keys="method_fns."), func
    deep = "TOTAL = " + " + ".join(["1"] * 1000) + "\nLIMIT = 3\ndef fit(x):\n    return x * LIMIT + TOTAL\n"
    first = _digest_of(tmp_path, monkeypatch, "deep_fns", deep)
    assert "+" in first["deep_fns.fit"] and _digest_of(tmp_path, monkeypatch, "deep_fns", deep.replace("LIMIT = 3", "LIMIT = 4")) != first


class _UsersEstimator:  # a user's class on a library's base (below)
    def predict(self, x):
        return x


def test_library_code_is_no_part_of_the_digest():
    """A callable object or a method of a library's class (numpy's, scikit-learn's), and the
    library bases of a user's class, were digested method by method: a patch version of the
    library on the workers would have refused every job, though the user's code was the same."""
    import numpy as np
    from sklearn.base import BaseEstimator

    from modelfactory.kernel import code_digests

    assert set(code_digests(np.vectorize(float), None)) == {"<python>"}
    assert set(code_digests(BaseEstimator().get_params, None)) == {"<python>"}
    cls = type("UsersModel", (_UsersEstimator, BaseEstimator), {"__module__": __name__})
    found = code_digests(cls(), None)  # callable? no: a class's instance without __call__ is not digested
    assert set(found) == {"<python>"}
    found = code_digests(cls().predict, None)
    assert [k for k in found if k != "<python>"] == [f"{__name__}._UsersEstimator.predict"]
    found = code_digests(None, type("Spec", (), {"cls": cls})())
    assert not [k for k in found if "sklearn" in k] and f"{__name__}._UsersEstimator.predict" in found


def test_a_function_kept_from_before_a_reload_has_the_digest_of_the_module_as_it_is_now(tmp_path, monkeypatch):
    """``from tuned import fit``, a job, the constant edited, the workers restarted, the module
    reloaded, the same ``fit`` passed again: it runs with the new constant (it reads its module's
    globals), but its digest was kept from before, and every restarted worker refused the job."""
    import importlib

    from modelfactory import kernel

    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "tuned_fns.py"
    mod.write_text("LIMIT = 3\ndef fit(x):\n    return x * LIMIT\n")
    import tuned_fns

    try:
        fit = tuned_fns.fit
        before = kernel.code_digests(fit, None)
        mod.write_text("LIMIT = 44\ndef fit(x):\n    return x * LIMIT\n")
        importlib.reload(tuned_fns)
        assert fit(1) == 44
        assert kernel.code_digests(fit, None) == kernel.code_digests(tuned_fns.fit, None) != before
    finally:
        sys.modules.pop("tuned_fns", None)


def test_the_constants_compared_are_those_bound_once_to_a_literal():
    from modelfactory.kernel import _source_facts

    src = b"""
import os
from json import loads as parse
LIMIT = 3.5
MODE: str = "fast"
WEIGHTS = (1, 2)
DEBUG = False
if os.environ.get("DEBUG"):
    DEBUG = True
PID = os.getpid()
_MODEL = None
RETRIES = 3
RETRIES += 1
for STEP in range(3):
    pass
STEP = 1
def load():
    global _MODEL
    _MODEL = parse("{}")
"""
    assert _source_facts(src).constants == {"LIMIT", "MODE", "WEIGHTS"}
    assert _source_facts(b"LIMIT = 3\nfrom os.path import *\n").constants == set()
    facts = _source_facts(src + b"""
def helper(x, a=1, b=os.sep, *, c=(1, 2), d=os.getcwd()):
    return x
if DEBUG:
    def debug_only():
        pass
try:
    from fast import expit
except ImportError:
    def expit(x):
        return x
""")
    assert facts.functions == {"load", "helper"}  # not expit (bound twice), nor debug_only (in an if)
    (flags,) = [v for k, v in facts.defaults.items() if v[1]]
    assert flags == ((True, False), {"c": True, "d": False})


@pytest.mark.timeout(60)
def test_memory_storage_with_workers_in_other_processes_is_a_clear_error(procs, leaves, tmp_path):
    """memory:// lives in the client's process: the workers found no input (a FileNotFoundError
    read as storage that is unreachable), or wrote the output into their own memory, the run then
    refused as if "another job emptied it meanwhile (with overwrite)"."""
    from pathlib import Path

    import fsspec

    fs = fsspec.filesystem("memory")
    for f in pq.ParquetDataset(leaves).files[:2]:
        fs.pipe(f"/mem-in/data/{f[len(leaves) + 1:]}", Path(f).read_bytes())
    with pytest.raises(ClusterError, match=r"'memory://mem-in/data' is in this Python process's memory.*"
                                           r"cluster='inline'.*Nothing ran"):
        modelfactory.train("memory://mem-in/data", store=str(tmp_path / "store"), model="seasonal",
                           cluster=procs.address, **TRAIN)
    with pytest.raises(ClusterError, match=r"'memory://mem-out/out' is in this Python process's memory"):
        modelfactory.apply(leaves, by=KEYS, func=functools.partial(tagged_mean, "ok", None),
                           schema="app string, site string, m double, tag string", out="memory://mem-out/out",
                           cluster=procs.address)
    assert not fs.exists("/mem-out/out")
    run = modelfactory.apply("memory://mem-in/data", by=KEYS, func=functools.partial(tagged_mean, "ok", None),
                             schema="app string, site string, m double, tag string", out="memory://mem-out/out",
                             cluster="inline")
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    fs.rm("/mem-in", recursive=True)
    fs.rm("/mem-out", recursive=True)


def _checked_double(key):
    assert key >= 0, "keys are counts"
    return {"v": 2.0 * key}


@pytest.mark.timeout(60)
def test_a_function_of_a_test_module_with_an_assert_runs_on_a_cluster_that_imports_it(procs):
    """A user tests their job with pytest and a real cluster, its function in the test module:
    pytest rewrote the function's assert on the client, the workers import the same file without
    rewriting it, and the job was refused as "another version of test_...._checked_double than
    this client ... Restart the workers", which nothing the user could do changed."""
    assert "@pytest_ar" in _checked_double.__code__.co_names  # rewritten here; the workers import tests/
    run = modelfactory.map_keys([1, 2], func=_checked_double, schema="v double", cluster=procs.address)
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert sorted(run.to_pandas().v) == [2.0, 4.0]


@pytest.mark.timeout(90)
def test_a_worker_running_python_with_O_runs_an_unchanged_function_with_an_assert(tmp_path):
    """Workers started with PYTHONOPTIMIZE (or ``python -O``, as some images do) compile the user's
    module without its asserts (and -OO without its docstrings): the same file, another bytecode.
    The job was refused as "another version of fns.check than this client ... Restart the
    workers", which restarting did not change."""
    (tmp_path / "o_fns.py").write_text(
        "def check(key):\n"
        "    \"A docstring.\"\n"
        "    assert key is not None, 'no key'\n"
        "    return {'v': float(key)}\n")
    sys.path.insert(0, str(tmp_path))
    env = {"PYTHONPATH": str(tmp_path)}
    cluster = DaskProcesses(tmp_path / "dask", workers=1, env={**env, "PYTHONOPTIMIZE": "2"},
                            scheduler_env=env).start()
    try:
        import o_fns

        run = modelfactory.map_keys([1, 2], func=o_fns.check, schema="v double", cluster=cluster.address)
        assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
        assert sorted(run.to_pandas().v) == [1.0, 2.0]
    finally:
        cluster.stop()
        sys.path.remove(str(tmp_path))
        sys.modules.pop("o_fns", None)


def test_code_digests_compare_only_between_processes_of_one_python_version():
    """Bytecode differs between Python versions: a worker on another Python holds the same source
    under another digest, which is no edit (nor is the scheduler's copy: it runs no unit)."""
    from modelfactory.run import _stale_code

    mine = {"<python>": "3.11", "m.f": "aaa"}
    answers = {"the scheduler": ("0.1.0", None, {"<python>": "3.11", "m.f": "old"}),
               "the worker at tcp://a": ("0.1.0", None, {"<python>": "3.12", "m.f": "bbb"}),
               "the worker at tcp://b": ("0.1.0", None, {"<python>": "3.11", "m.f": "aaa"})}
    assert _stale_code(answers, mine) == {}
    answers["the worker at tcp://b"] = ("0.1.0", None, {"<python>": "3.11", "m.f": "old"})
    assert _stale_code(answers, mine) == {"the worker at tcp://b": "m.f"}


def test_what_a_function_reads_from_its_module_is_compared_only_where_both_read_its_source(tmp_path, monkeypatch):
    """A worker image with compiled files only (no .py) cannot tell which globals are literal
    constants: its digests lack that part, and the rest is still compared."""
    import importlib
    import py_compile

    from modelfactory.kernel import code_digests, stale_names

    source, compiled = tmp_path / "src", tmp_path / "pyc"
    source.mkdir()
    compiled.mkdir()
    (source / "sourced_fns.py").write_text("LIMIT = 2\ndef f(x):\n    return x * LIMIT\n")
    py_compile.compile(str(source / "sourced_fns.py"), cfile=str(compiled / "sourced_fns.pyc"))
    digests = []
    for folder in (source, compiled):
        with monkeypatch.context() as m:
            m.syspath_prepend(str(folder))
            sys.modules.pop("sourced_fns", None)
            digests.append(code_digests(importlib.import_module("sourced_fns").f, None))
            sys.modules.pop("sourced_fns", None)
    with_source, without = digests[0]["sourced_fns.f"], digests[1]["sourced_fns.f"]
    assert "+" in with_source and "+" not in without and with_source.startswith(without + "+")
    assert stale_names(digests[0], digests[1]) == []

    py = "3.11 -O0"
    client = {"<python>": py, "m.f": "aaa+111", "m.g": "bbb+222"}
    assert stale_names(client, {"<python>": py, "m.f": "aaa", "m.g": "bbb+222"}) == []
    assert stale_names(client, {"<python>": py, "m.f": "aaa+999", "m.g": "bbb"}) == ["m.f"]
    assert stale_names(client, {"<python>": py, "m.f": "zzz", "m.g": "bbb+222"}) == ["m.f"]


def test_the_digest_of_functions_calling_each_other_does_not_depend_on_which_came_first(tmp_path, monkeypatch):
    """A worker that digested ``walk`` as the helper of an earlier job's ``tree`` kept that digest;
    a new client digesting ``walk`` first must get the same one, or the job is refused."""
    import importlib

    from modelfactory import kernel

    (tmp_path / "mutual_fns.py").write_text("DEPTH = 3\n"
                                            "def tree(n):\n    return walk(n) if n < DEPTH else n\n"
                                            "def walk(n):\n    return tree(n + 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = []
    for first in ("tree", "walk"):
        sys.modules.pop("mutual_fns", None)
        mod = importlib.import_module("mutual_fns")
        kernel.code_digests(getattr(mod, first), None)
        got.append(kernel.code_digests(mod.walk, None)["mutual_fns.walk"])
    sys.modules.pop("mutual_fns", None)
    assert got[0] == got[1] and "+" in got[0]


@pytest.mark.timeout(90)
def test_a_ctrl_c_pressed_again_while_the_client_of_a_scheduler_address_closes_is_held(procs, leaves, tmp_path,
                                                                                     monkeypatch):
    """A second Ctrl-C landing in Client.close broke the close off, with two chained tracebacks:
    only the clients of clusters the job made held it."""
    import signal

    import distributed

    import modelfactory.api

    pressed = []

    class PressedAgainAsItCloses(distributed.Client):  # the job's client (an earlier test's may be collected)
        def close(self, *a, **k):
            if not pressed:
                pressed.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            return super().close(*a, **k)

    def interrupted(*a, **k):  # the first press, as the units run
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "Client", PressedAgainAsItCloses)
    monkeypatch.setattr(modelfactory.api, "run_units", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as err:
            modelfactory.apply(leaves, by=KEYS, func=lambda df: df.head(1)[KEYS], schema="app string, site string",
                               out=str(tmp_path / "out"), cluster=procs.address)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed and err.value.__context__ is None, "a second KeyboardInterrupt, raised in the close"
    assert not list((tmp_path / "out").glob("*"))  # and the claim went with the job


@pytest.mark.timeout(150)
def test_a_job_leaves_a_worker_still_running_an_interrupted_jobs_task_to_the_others_and_says_so(
        procs, dclient, leaves, tmp_path, caplog):
    """An interrupted job's unit runs on to its end (Dask cannot stop a thread): the scheduler
    queued the next job's units behind it while the other worker sat idle, and that job waited
    with no word (for good, behind a group that hangs)."""
    import time

    procs.wait_workers(dclient)
    busy = min(dclient.scheduler_info()["workers"])
    zombie = dclient.submit(time.sleep, 90, workers=[busy], pure=False, key="an-interrupted-unit")
    deadline = time.monotonic() + 30
    while not dclient.processing().get(busy):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # started on its thread
    zombie.release()  # what an interrupted job does with its futures
    try:
        with caplog.at_level("WARNING", logger="modelfactory"):
            run = modelfactory.apply(leaves, by=KEYS, func=functools.partial(tagged_mean, "ok", None),
                                     schema="app string, site string, m double, tag string", cluster=procs.address)
        assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        (said,) = [r.getMessage() for r in caplog.records if "interrupted job" in r.getMessage()]
        assert said.startswith(f"the worker at {busy} still runs 1 task(s) of an interrupted job (e.g. "
                               "an-interrupted-unit), which Dask cannot stop: this job's units go to the other "
                               "workers; restart it to free it (Client.restart_workers(")
        # done while it still runs: no unit waited behind it
        assert dclient.run(modelfactory.run._cancelled_tasks)[busy] == ["an-interrupted-unit"]
    finally:
        dclient.restart_workers([busy])
        procs.wait_workers(dclient)


def test_dasks_version_mismatch_warning_is_one_line(caplog):
    # its eight-line table reached the CLI's console only with -v: a cluster of mixed packages unseen
    import copy
    import warnings

    from distributed import versions

    from modelfactory.run import _say_mismatched_versions

    mine = versions.get_versions()
    other = copy.deepcopy(mine)
    other["packages"]["toolz"] = "0.12.1"
    table = versions.error_message(mine, {"tcp://a": other, "tcp://b": mine}, mine)["warning"]
    said = [warnings.WarningMessage(versions.VersionMismatchWarning(table), versions.VersionMismatchWarning, "x", 1)]
    with caplog.at_level("WARNING", logger="modelfactory"):
        _say_mismatched_versions("tcp://127.0.0.1:8786", said)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("the Dask cluster at tcp://127.0.0.1:8786 runs other versions of some packages than "
                           f"this client (toolz client {mine['packages']['toolz']}, scheduler ")
    assert "0.12.1" in line and "\n" not in line


@pytest.mark.timeout(60)
def test_the_dashboard_link_is_shown_only_where_a_dashboard_answers(tmp_path):
    # `dask scheduler --no-dashboard` still serves health routes on the dashboard's port: the link
    # printed answered 404
    import socket

    from distributed import Client

    from modelfactory.run import _has_dashboard

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    found = {}
    for name, extra in (("none", ["--no-dashboard"]), ("dashboard", ["--dashboard-address", f":{free_port()}"])):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(f"tcp://127.0.0.1:{port}", timeout="30s") as c:
                found[name] = _has_dashboard(c)
        finally:
            proc.kill()
            proc.wait()
    assert found == {"none": False, "dashboard": True}
