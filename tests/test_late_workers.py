"""Workers that join a running job (an adaptive cluster's) from an image without the user's module.

``run.check_code`` refuses a job whose code the scheduler or a connected worker cannot load;
a worker that joins later (dask-kubernetes scaling up from zero or few) was not checked.  Dask
unpickled the unit on such a worker in its connection to the scheduler, broke it on the
ImportError and shut the worker (and its nanny) down: the run lost the worker, then every one
that joined after it, and with no other worker it waited for ever.

Real processes over TCP: `dask scheduler` and `dask worker` (tests/_servers.DaskProcesses); the
user's module is a file in a temporary folder on the PYTHONPATH of this process, the scheduler
and the "good" worker, and not on that of the late "bad" one.
"""
from __future__ import annotations

import logging
import os
import re
import sys

import pyarrow as pa
import pytest
from _data import write
from _servers import DaskProcesses, wait_for
from test_distributed import in_background

import modelfactory
from modelfactory.demo import make_table

KEYS = ["app", "site"]
SERIES = 12
HOURS = 48

#: One row per group; the group of site-00000 waits for the file ``gate`` names to exist (60 s
#: at most), holding its worker's only thread, after writing ``<gate>.started``.
USER_MODULE = '''
import os
import time

import numpy as np
import pandas as pd

from modelfactory.models.base import Model


def gated_mean(gate, df):
    if df.site.iloc[0] == "site-00000":
        open(gate + ".started", "w").close()
        end = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.05)
    return pd.DataFrame({"app": [df.app.iloc[0]], "site": [df.site.iloc[0]], "m": [float(df.value.mean())]})


def hold(gate):
    """Hold the worker's only thread until ``gate`` exists (60 s at most)."""
    open(gate + ".held", "w").close()
    end = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.05)
    return True


def tagged(df):
    return pd.DataFrame({"app": [df.app.iloc[0]], "site": [df.site.iloc[0]], "tag": ["v1"]})


def per_key(key):
    return {"double": 2 * key}


def crash_on(marker, df):
    if df.site.iloc[0] == marker:
        os._exit(1)
    return tagged(df)


class LateMean(Model):
    """The mean of a series; nothing is an anomaly."""

    name = "late_mean"
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        self.mean_ = float(np.nanmean(y))

    def _score(self, y, t, X):
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, -np.inf), "upper": np.full(n, np.inf),
                "score": np.zeros(n), "is_anomaly": np.zeros(n, bool)}
'''

#: The same module in another version: what an older worker image holds.
OLD_MODULE = USER_MODULE.replace('"tag": ["v1"]', '"tag": ["v0"]')


@pytest.fixture
def late_module(tmp_path, monkeypatch):
    """(module folder, module): importable here, on the PYTHONPATH given to chosen Dask processes."""
    import importlib

    folder = tmp_path / "code"
    folder.mkdir()
    name = f"mf_late_{tmp_path.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    mod = importlib.import_module(name)
    yield str(folder), mod
    sys.modules.pop(name, None)


@pytest.fixture
def brief_wait(monkeypatch):
    """Where no worker that can run the job ever joins, wait 2 s for one instead of
    ``run.REFUSED_WAIT_SECONDS`` (10 s) before failing the refused work: the outcome is the same."""
    from modelfactory import run as run_module

    monkeypatch.setattr(run_module, "REFUSED_WAIT_SECONDS", 2.0)


@pytest.fixture
def leaves(tmp_path) -> str:
    """One Hive folder per group: one unit per group (unit_rows=HOURS), no shuffle."""
    return write(make_table(SERIES, days=HOURS // 24, apps=3, spikes=0), tmp_path / "data", KEYS)


@pytest.fixture
def spread(tmp_path) -> str:
    """Every group spread over six folders (``part=0..5``): the shuffle path."""
    t = make_table(SERIES, days=HOURS // 24, apps=3, spikes=0).to_pandas()
    t["part"] = (t["ts"].dt.hour % 6).astype(str)
    return write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "spread", ["part"])


def _cluster(tmp_path, code: str, good_workers: int, scheduler_code: bool = True, env: dict | None = None
             ) -> DaskProcesses:
    return DaskProcesses(tmp_path / "dask", workers=good_workers, env={"PYTHONPATH": code, **(env or {})},
                         scheduler_env={"PYTHONPATH": code if scheduler_code else "/nonexistent",
                                        **(env or {})}).start()


def _add_bad_worker(procs: DaskProcesses, name: str, path: str = "/nonexistent"):
    procs.env = {**procs.env, "PYTHONPATH": path}  # the module's folder is not on its path (or another one is)
    return procs.add_worker(name)


def _hold_the_good_worker(procs, mod, gate: str):
    """A client whose task holds the (one) connected worker's only thread until ``gate`` exists:
    the job's code check still reaches that worker, its work waits."""
    from distributed import fire_and_forget

    holder = procs.client()
    # forgotten once done: a worker lost later must not run it again (on the bad worker, which
    # cannot load it: Dask would shut that one down)
    fire_and_forget(holder.submit(mod.hold, gate, pure=False))
    wait_for(lambda: os.path.exists(gate + ".held"), 60, "the good worker to be held")
    return holder


def _job_submitted(client) -> bool:
    """The job's graph is on the scheduler (so its code check is over): more than the holder's task."""
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) > 1


def _apply(procs, leaves, func):
    return modelfactory.apply(leaves, by=KEYS, func=func, schema="app string, site string, m double",
                              cluster=procs.address, unit_rows=HOURS, progress=False)


@pytest.mark.timeout(150)
def test_a_worker_joining_without_the_users_module_leaves_its_units_to_the_others_and_stays(
        tmp_path, leaves, late_module, caplog):
    """The good worker is held by one unit while the bad one joins and is offered the others:
    before the fix Dask shut the bad worker down (the run still ended, on the good one)."""
    import functools

    code, mod = late_module
    gate = str(tmp_path / "gate")
    procs = _cluster(tmp_path, code, good_workers=1)
    try:
        caplog.set_level(logging.WARNING, logger="modelfactory.run")
        job = in_background(lambda: _apply(procs, leaves, functools.partial(mod.gated_mean, gate)))
        wait_for(lambda: (tmp_path / "gate.started").exists(), 60, "the gated unit to start")
        bad = _add_bad_worker(procs, "bad")
        with procs.client() as c:
            c.wait_for_workers(2, timeout=60)
            # the bad worker, idle, is given queued units: wait until one was refused there
            wait_for(lambda: "cannot run this job's code" in caplog.text or bad.poll() is not None, 60,
                     "a unit refused by the worker without the module")
            assert bad.poll() is None, f"the worker without the module was shut down: {procs.logs()[-2000:]}"
            (tmp_path / "gate").touch()
            run = job.result(timeout=90)
            assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
            assert bad.poll() is None, "the worker without the module was shut down"
            assert len(c.scheduler_info()["workers"]) == 2
        assert f"No module named '{mod.__name__}'" in caplog.text
    finally:
        (tmp_path / "gate").touch()
        procs.stop()


@pytest.mark.timeout(150)
def test_a_run_whose_only_workers_lack_the_users_module_fails_every_group_saying_why(tmp_path, leaves, late_module,
                                                                                     brief_wait):
    """No worker at the check (an adaptive cluster starting from zero), then only workers without
    the module: before the fix each was shut down in turn and the run waited for ever."""
    import functools

    code, mod = late_module
    gate = str(tmp_path / "gate")
    (tmp_path / "gate").touch()  # no waiting in this one
    procs = _cluster(tmp_path, code, good_workers=0)
    try:
        job = in_background(lambda: _apply(procs, leaves, functools.partial(mod.gated_mean, gate)))
        bad = _add_bad_worker(procs, "bad")
        run = job.result(timeout=120)
        assert run.summary["counts"] == {"ok": 0, "failed": SERIES, "skipped": 0}
        groups = run.groups
        assert len(groups) == SERIES and set(groups.site) == {f"site-{i:05d}" for i in range(SERIES)}
        for error in groups.error:
            assert f"No module named '{mod.__name__}'" in error
            assert "register_pickle_by_value" in error and "no worker of the cluster could load it" in error
        assert bad.poll() is None, "the worker without the module was shut down"
    finally:
        procs.stop()


@pytest.mark.timeout(180)
def test_map_keys_without_a_schema_on_workers_lacking_the_module_fails_every_key_saying_why(tmp_path, late_module,
                                                                                          brief_wait):
    """The refused keys of a map_keys job without a schema (its results a dict, not rows): before
    the fix their failed rows carried no results and building ``run.results`` raised a TypeError."""
    code, mod = late_module
    procs = _cluster(tmp_path, code, good_workers=0)
    try:
        job = in_background(lambda: modelfactory.map_keys(range(3), func=mod.per_key, cluster=procs.address))
        _add_bad_worker(procs, "bad")
        run = job.result(timeout=120)
        assert run.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
        assert run.results == {}
        assert sorted(run.groups.key) == [0, 1, 2]
        for error in run.groups.error:
            assert f"No module named '{mod.__name__}'" in error and "no worker of the cluster could load it" in error
    finally:
        procs.stop()


def test_a_spec_whose_code_a_process_cannot_import_loads_and_its_entry_points_say_why(tmp_path, late_module):
    """The paths run.execute does not guard (a shuffle partition, an isolated group) get the spec
    too: it must load in a process without the module (Dask unpickles it before any task code
    runs) and the unit must then fail naming the module and the fix, not fail every group."""
    import pickle
    import subprocess

    from modelfactory.kernel import JobSpec

    _, mod = late_module
    spec = JobSpec("apply", ("app", "site"), func=mod.gated_mean)
    blob = tmp_path / "spec.pickle"
    blob.write_bytes(pickle.dumps(spec))
    script = ("import pickle, sys, pyarrow as pa\n"
              "from modelfactory import kernel\n"
              f"spec = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
              "print(type(spec.func).__name__)\n"
              "try:\n"
              "    kernel.run_table(spec, 'u1', pa.table({'app': ['a'], 'site': ['s']}))\n"
              "except Exception as err:\n"
              "    print(type(err).__name__, err)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout only
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd="/", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "CodeUnavailable"
    assert second.startswith("ClusterError ")
    assert f"No module named '{mod.__name__}'" in second and "register_pickle_by_value" in second
    # and in this process, which has the module, the spec comes back whole
    assert pickle.loads(pickle.dumps(spec)) == spec


def _tagged(procs, data, func, **kw):
    return modelfactory.apply(data, by=KEYS, func=func, schema="app string, site string, tag string",
                              cluster=procs.address, unit_rows=HOURS * 3, progress=False, **kw)


@pytest.mark.timeout(180)
def test_shuffle_partitions_refused_by_a_late_worker_run_on_the_others(tmp_path, spread, late_module, caplog):
    """The worker without the module joins after the check, before the shuffle starts (the good
    one is busy), and is given shuffle partitions: before the fix the first one it refused failed
    the run (a ClusterError naming the module) though the good worker could run it."""
    code, mod = late_module
    gate = str(tmp_path / "gate")
    procs = _cluster(tmp_path, code, good_workers=1)
    holder = None
    try:
        caplog.set_level(logging.WARNING, logger="modelfactory.run")
        holder = _hold_the_good_worker(procs, mod, gate)
        job = in_background(lambda: _tagged(procs, spread, mod.tagged))
        wait_for(lambda: _job_submitted(holder), 60, "the job's graph on the scheduler")
        bad = _add_bad_worker(procs, "bad")
        holder.wait_for_workers(2, timeout=60)
        bad_address = next(a for a, w in holder.scheduler_info()["workers"].items() if w["name"] == "bad")
        (tmp_path / "gate").touch()
        run = job.result(timeout=120)
        assert run.summary["mode"] == "shuffle"
        assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        out = run.to_pandas()
        assert sorted(out.site) == [f"site-{i:05d}" for i in range(SERIES)] and set(out.tag) == {"v1"}
        # the scenario happened: partitions were given to the bad worker, which refused them
        assert f"the Dask worker at {bad_address} cannot run this job's code" in caplog.text
        assert f"No module named '{mod.__name__}'" in caplog.text
        assert bad.poll() is None, "the worker without the module was shut down"
    finally:
        (tmp_path / "gate").touch()
        if holder is not None:
            holder.close()
        procs.stop()


@pytest.mark.timeout(150)
def test_shuffle_partitions_no_worker_can_run_fail_their_groups_not_the_run(tmp_path, spread, late_module,
                                                                           brief_wait):
    """Only a worker without the module after the check: every group ``failed`` naming the module
    and the fix (before the fix: the run raised on the first partition, no group accounted for)."""
    code, mod = late_module
    procs = _cluster(tmp_path, code, good_workers=0)
    try:
        job = in_background(lambda: _tagged(procs, spread, mod.tagged))
        bad = _add_bad_worker(procs, "bad")
        run = job.result(timeout=120)
        assert run.summary["mode"] == "shuffle"
        assert run.summary["counts"] == {"ok": 0, "failed": SERIES, "skipped": 0}
        groups = run.groups
        assert sorted(groups.site) == [f"site-{i:05d}" for i in range(SERIES)]
        for error in groups.error:
            assert f"No module named '{mod.__name__}'" in error
            assert "register_pickle_by_value" in error and "no worker of the cluster could load it" in error
        assert bad.poll() is None
    finally:
        procs.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["leaves", "spread"])
def test_isolated_groups_refused_by_a_late_worker_run_on_the_others(tmp_path, layout, request, late_module, caplog):
    """A unit (or shuffle partition) whose group kills its worker is run group by group
    (``run.isolate``, ``run.isolate_partitions``), as many at once as the cluster has threads:
    with the bad worker connected by then, before the fix the first group it refused failed the
    run.  Now the crashing group alone fails."""
    import functools

    leaves = request.getfixturevalue(layout)

    code, mod = late_module
    gate = str(tmp_path / "gate")
    # a second death makes a task a KilledWorker (as in test_distributed): the crash costs less time
    procs = _cluster(tmp_path, code, good_workers=1, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    holder = None
    try:
        caplog.set_level(logging.WARNING, logger="modelfactory.run")
        holder = _hold_the_good_worker(procs, mod, gate)
        job = in_background(lambda: _tagged(procs, leaves, functools.partial(mod.crash_on, "site-00004")))
        wait_for(lambda: _job_submitted(holder), 60, "the job's graph on the scheduler")
        bad = _add_bad_worker(procs, "bad")
        holder.wait_for_workers(2, timeout=60)
        bad_address = next(a for a, w in holder.scheduler_info()["workers"].items() if w["name"] == "bad")
        (tmp_path / "gate").touch()
        run = job.result(timeout=200)
        assert run.summary["mode"] == ("files" if layout == "leaves" else "shuffle")
        assert run.summary["counts"] == {"ok": SERIES - 1, "failed": 1, "skipped": 0}
        g = run.groups.set_index("site")
        assert len(g) == SERIES and "died" in g.loc["site-00004", "error"]
        assert re.search(r"(keeps|kept) killing (its|their) workers?", caplog.text)
        assert f"the Dask worker at {bad_address} cannot run this job's code" in caplog.text
        assert bad.poll() is None
    finally:
        (tmp_path / "gate").touch()
        if holder is not None:
            holder.close()
        procs.stop()


@pytest.fixture
def old_module(tmp_path, late_module) -> str:
    """A folder holding another version of the user's module (``tagged`` says "v0"): an older image's."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / f"{late_module[1].__name__}.py").write_text(OLD_MODULE)
    return str(folder)


@pytest.mark.timeout(150)
def test_a_worker_joining_with_another_version_of_the_users_module_leaves_its_units_to_the_others(
        tmp_path, leaves, late_module, old_module, caplog):
    """The late worker imports the module from an older image: before the fix it ran its own
    version of ``tagged`` without a word (rows tagged "v0", every group ``ok``)."""
    code, mod = late_module
    gate = str(tmp_path / "gate")
    procs = _cluster(tmp_path, code, good_workers=1)
    holder = None
    try:
        caplog.set_level(logging.WARNING, logger="modelfactory.run")
        holder = _hold_the_good_worker(procs, mod, gate)
        job = in_background(lambda: _tagged(procs, leaves, mod.tagged))
        wait_for(lambda: _job_submitted(holder), 60, "the job's graph on the scheduler")
        stale = _add_bad_worker(procs, "stale", old_module)
        holder.wait_for_workers(2, timeout=60)
        # the stale worker, idle, is given queued units (the good one is held)
        wait_for(lambda: "cannot run this job's code" in caplog.text or stale.poll() is not None, 60,
                 "a unit refused by the worker with the other version")
        (tmp_path / "gate").touch()
        run = job.result(timeout=120)
        assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        out = run.to_pandas()
        assert len(out) == SERIES and set(out.tag) == {"v1"}
        assert f"{mod.__name__}.tagged differs from the client's" in caplog.text
        assert stale.poll() is None
    finally:
        (tmp_path / "gate").touch()
        if holder is not None:
            holder.close()
        procs.stop()


@pytest.mark.timeout(150)
def test_a_run_whose_only_workers_have_another_version_fails_every_group_saying_why(
        tmp_path, leaves, late_module, old_module, brief_wait):
    code, mod = late_module
    procs = _cluster(tmp_path, code, good_workers=0)
    try:
        job = in_background(lambda: _tagged(procs, leaves, mod.tagged))
        _add_bad_worker(procs, "stale", old_module)
        run = job.result(timeout=120)
        assert run.summary["counts"] == {"ok": 0, "failed": SERIES, "skipped": 0}
        assert sorted(run.groups.site) == [f"site-{i:05d}" for i in range(SERIES)]
        for error in run.groups.error:
            assert "another version of this job's code" in error and f"{mod.__name__}.tagged differs" in error
            assert "Restart that worker" in error and "no worker of the cluster could run the client's version" in error
    finally:
        procs.stop()


@pytest.mark.timeout(180)
def test_a_scheduler_without_the_users_module_runs_jobs_on_workers_that_have_it(
        tmp_path, leaves, spread, late_module):
    """A scheduler image without the user's code: the code check refused every job ("The
    scheduler cannot load this job's code"), though the scheduler never loads it."""
    code, mod = late_module
    procs = _cluster(tmp_path, code, good_workers=2, scheduler_code=False)
    try:
        with procs.client() as c:  # the scheduler indeed cannot import it
            assert c.run_on_scheduler(lambda m=mod.__name__: __import__("importlib").util.find_spec(m)) is None
        for data, mode in ((leaves, "files"), (spread, "shuffle")):
            run = _tagged(procs, data, mod.tagged)
            assert run.summary["mode"] == mode
            assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
            assert set(run.to_pandas().tag) == {"v1"}
        store = str(tmp_path / "store")
        fitted = modelfactory.train(spread, store=store, by=KEYS, time="ts", target="value", model=mod.LateMean,
                                    cluster=procs.address, unit_rows=HOURS * 3, progress=False)
        assert fitted.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        scored = modelfactory.score(leaves, store=store, out=str(tmp_path / "scores"), cluster=procs.address,
                                    trust=True, progress=False)
        assert scored.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
        keyed = modelfactory.map_keys(range(5), by="k", func=mod.per_key, schema="double bigint",
                                      cluster=procs.address)
        assert sorted(keyed.to_pandas()["double"]) == [0, 2, 4, 6, 8]
    finally:
        procs.stop()
