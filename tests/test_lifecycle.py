"""Resume after the client is killed, and retraining only failed or changed groups."""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data import metrics_table, write
from _slow_model import SlowSeasonal

import modelfactory
from modelfactory.exceptions import ModelFactoryError, StoreError
from modelfactory.models.base import Model, Param

ARGS = dict(by=["app", "site"], time="ts", target="value")
HERE = Path(__file__).parent


def _table(store):
    t = modelfactory.ModelStore(store).table().sort_by([("app", "ascending"), ("site", "ascending")])
    return t.select(["app", "site", "status", "rows", "fingerprint", "model"])


def _kill_once_written(script: str, store, *, parts: int, slow: str) -> None:
    """Run ``script`` (a training, its model slowed by ``slow`` seconds a unit) in a process of
    its own, and kill it (and its workers) with SIGKILL once ``store`` holds ``parts`` part files."""
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "MF_SLOW": slow},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(store.glob("runs/*/parts/*.parquet"))) < parts:
            assert proc.poll() is None, "the training process ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.timeout(180)
def test_resume_after_killing_the_client_equals_an_uninterrupted_run(tmp_path):
    data = write(metrics_table(series=24, hours=72, apps=24), tmp_path / "d", ["app"])
    store = tmp_path / "store"
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from _slow_model import SlowSeasonal; "
              f"import modelfactory; modelfactory.train({data!r}, by=['app', 'site'], time='ts', target='value', "
              f"model=SlowSeasonal, store={str(store)!r}, cluster='local', workers=2, unit_rows=72)")
    _kill_once_written(script, store, parts=4, slow="0.5")
    st = modelfactory.ModelStore(str(store))
    assert st.runs() == [] and st.latest() is None  # nothing visible
    (pending,) = st.pending()
    # the resume below runs inline (1 worker): it must plan the units as they were planned for 2
    assert (pending["unit_rows"], pending["unit_limit"], pending["unit_multiple"]) == (72, 72, 2)
    written = {p: p.stat().st_mtime_ns for p in store.glob("runs/*/parts/*.parquet")}
    assert 4 <= len(written) < 24

    run = modelfactory.train(data, model=SlowSeasonal, store=str(store), cluster="inline", resume=pending["run_id"], **ARGS)
    assert run.id == pending["run_id"] and st.latest() == run.id
    assert run.summary["counts"] == {"ok": 24, "failed": 0, "skipped": 0}
    assert all(p.stat().st_mtime_ns == m for p, m in written.items())  # not recomputed
    fresh = modelfactory.train(data, model=SlowSeasonal, store=str(tmp_path / "fresh"), cluster="inline", unit_rows=72, **ARGS)
    assert fresh.summary["counts"] == run.summary["counts"]
    a, b = _table(str(store)), _table(str(tmp_path / "fresh"))
    assert a.drop_columns(["model"]).equals(b.drop_columns(["model"]))
    for x, y in zip(a["model"].to_pylist(), b["model"].to_pylist()):
        import cloudpickle

        np.testing.assert_array_equal(cloudpickle.loads(x).median_, cloudpickle.loads(y).median_)


def test_resume_refuses_another_job(by_app, tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    with pytest.raises(StoreError, match="No interrupted run 'nope'"):
        modelfactory.train(by_app, store=str(store), cluster="inline", resume="nope", **ARGS)
    run = modelfactory.train(by_app, store=str(store), cluster="inline", **ARGS)
    with pytest.raises(StoreError, match="already committed"):
        modelfactory.train(by_app, store=str(store), cluster="inline", resume=run.id, **ARGS)


def test_a_resume_refused_for_other_arguments_says_which_differ(by_app, tmp_path, monkeypatch):
    # "its data, columns, base run, model or parameters differ", and no word of which
    import shutil

    import modelfactory.api

    data = str(tmp_path / "d")
    shutil.copytree(by_app, data)
    store = str(tmp_path / "s")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelfactory.api, "run_units", interrupted)
    with pytest.raises(KeyboardInterrupt):
        modelfactory.train(data, store=store, cluster="inline", **ARGS)
    monkeypatch.undo()
    (pending,) = modelfactory.ModelStore(store).pending()
    rid = pending["run_id"]
    with pytest.raises(StoreError, match=rf"Run '{rid}' was started for another job or input \(params\.threshold "
                                         r"3\.5 then, 5\.0 now\); it cannot be resumed with these arguments"):
        modelfactory.train(data, store=store, cluster="inline", resume=rid, params={"threshold": 5.0}, **ARGS)
    (tmp_path / "d" / "app=app0" / "more.parquet").write_bytes((next((tmp_path / "d" / "app=app1").glob("*.parquet")))
                                                              .read_bytes())
    with pytest.raises(StoreError, match=r"\(the input's files \(or the model's class\) changed since, or the run was begun "
                                         r"by an earlier version of modelfactory, which marked its input otherwise\)"):
        modelfactory.train(data, store=store, cluster="inline", resume=rid, **ARGS)


def test_input_rewritten_in_place_with_rows_of_the_same_shape_is_not_resumed(tmp_path, monkeypatch):
    # A nightly export rewrites app=x/part-0.parquet: same path, rows and footer size. The input's
    # fingerprint took the footer's size for the file's, so `train --resume` resumed yesterday's
    # interrupted run and committed the models it had fitted on yesterday's rows beside today's.
    import pyarrow.parquet as pq

    import modelfactory.api
    from modelfactory.dataset import discover

    t = metrics_table(series=3, hours=48, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    before = discover(data)
    assert [f.size for f in before.files] == [os.path.getsize(f.path) for f in before.files]
    monkeypatch.setattr(modelfactory.api, "run_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt, match="was not committed"):
        modelfactory.train(data, store=store, cluster="inline", **ARGS)
    monkeypatch.undo()
    path = before.files[0].path
    time.sleep(0.01)  # (a coarse clock: the rewrite gets a later modification time)
    old = pq.read_table(path)
    pq.write_table(old.set_column(old.schema.get_field_index("value"), "value",
                                          pa.compute.add(old["value"], 1000.0)), path)
    after = discover(data)
    assert [(f.path, f.rows) for f in after.files] == [(f.path, f.rows) for f in before.files]
    assert after.fingerprint() != before.fingerprint()
    run = modelfactory.train(data, store=store, cluster="inline", resume=True, **ARGS)
    assert run.summary["resumed"] is False


def test_two_resumes_of_one_run_at_once_commit_it_once(by_app, tmp_path, monkeypatch):
    # a scheduled `train --resume` overlapping the one before: both trained it all, both committed
    # the same run id, and the second commit rewrote the first's manifest
    import modelfactory.api

    store = str(tmp_path / "s")
    real_units = modelfactory.api.run_units

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelfactory.api, "run_units", interrupted)
    with pytest.raises(KeyboardInterrupt, match="was not committed"):
        modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    monkeypatch.setattr(modelfactory.api, "run_units", real_units)
    st = modelfactory.ModelStore(store)
    (pending,) = st.pending()
    # a store holding only that run said "Train first", where `models list` offers the resume
    with pytest.raises(StoreError, match=rf"has no committed run yet: its run {pending['run_id']} was interrupted\. "
                                         rf"Finish it with train --resume {pending['run_id']}"):
        st.manifest()
    real_commit, other = modelfactory.ModelStore.commit, []

    def the_other_commits_first(self, run_id, *a, **k):
        if not other:  # the overlapping resume finishes first
            other.append(None)
            other[0] = modelfactory.train(by_app, store=store, cluster="inline", resume=run_id, **ARGS)
        return real_commit(self, run_id, *a, **k)

    monkeypatch.setattr(modelfactory.ModelStore, "commit", the_other_commits_first)
    with pytest.raises(StoreError, match=f"Run {pending['run_id']} .* was committed meanwhile by another process"):
        modelfactory.train(by_app, store=store, cluster="inline", resume=pending["run_id"], **ARGS)
    (first,) = other
    assert first.id == pending["run_id"] and st.latest() == first.id and st.pending() == []
    assert first.summary["resumed"] is True
    # Two resumes computing one unit at once write it under two names (<unit>.<random>.parquet);
    # the refused one's stayed in the committed run for good, listed by nothing, removed by no gc.
    from modelfactory._io import PartInfo

    man = st.manifest(first.id)
    listed = [PartInfo(**p) for p in man["parts"]]
    extra = listed[0].path.replace(".parquet", ".0ther.parquet")
    st.location.write_bytes(extra, st.location.read_bytes(listed[0].path))
    with pytest.raises(StoreError, match="removed those the commit does not list"):
        real_commit(st, first.id, {"summary": man["summary"]}, [*listed[1:], dataclasses.replace(listed[0], path=extra)])
    assert sorted(st.location.sizes(f"runs/{first.id}/parts")) == sorted(p.path for p in listed)
    assert st.manifest(first.id) == man
    before = st.manifest(first.id)["committed"]
    assert st.manifest()["committed"] == before and len(st.groups()) == 12


class Moody(Model):
    """Fails on large values while ``broken`` is set; counts its fits."""

    name = "moody"
    params = {"limit": Param(1000.0, float)}
    state_attrs = ("mean_",)
    broken = True
    fits = 0

    def _fit(self, y, t, X):
        type(self).fits += 1
        if type(self).broken and np.mean(y) > self.limit:
            raise RuntimeError("too big today")
        self.mean_ = float(np.mean(y))


def test_only_failed_retrains_exactly_the_failed_groups(tmp_path):
    df = metrics_table(series=5, hours=48, apps=1).to_pandas()
    df.loc[df.site.isin(["s001", "s003"]), "value"] += 5000
    data = write(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    Moody.broken, Moody.fits = True, 0
    first = modelfactory.train(data, model=Moody, store=store, cluster="inline", **ARGS)
    assert first.summary["counts"] == {"ok": 3, "failed": 2, "skipped": 0}
    Moody.broken, Moody.fits = False, 0
    second = modelfactory.train(data, model=Moody, store=store, cluster="inline", retrain="failed", **ARGS)
    assert Moody.fits == 2
    assert second.summary["counts"] == {"ok": 5, "failed": 0, "skipped": 0}
    t = modelfactory.ModelStore(store).table().to_pandas().set_index("site")
    assert set(t.index[t.fitted_in == second.id]) == {"s001", "s003"}
    assert set(t.index[t.fitted_in == first.id]) == {"s000", "s002", "s004"}
    lineage = modelfactory.ModelStore(store).manifest()["lineage"]
    assert lineage == {"retrain": "failed", "base_run": first.id, "carried_over": {first.id: 3}, "not_in_input": 0}


def _rewrite_site(table: pa.Table, root: Path, site: str, change) -> None:
    """Rewrite the Hive folder ``site=<site>`` under ``root`` with ``change`` applied to its values."""
    df = table.to_pandas()
    rows = df[df.site == site].drop(columns="site")
    rows["value"] = change(rows["value"])
    (part,) = list((root / f"site={site}").glob("*.parquet"))
    rows.to_parquet(part, index=False)


def test_a_retrain_that_cannot_refit_a_group_says_it_left_the_group_without_its_model(tmp_path, caplog, capsys):
    """A nightly --only-changed retrain whose refit of a group failed (a file delivered twice: repeated
    timestamps) committed 'ok 3, failed 1', exit 0, and the next score skipped the group with 'no
    model', though the base run had a working one: nothing said a model had been lost."""
    from modelfactory.cli import main

    t = metrics_table(series=4, hours=72, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    first = modelfactory.train(data, store=store, cluster="inline", **ARGS)
    (part,) = list((tmp_path / "d" / "site=s002").glob("*.parquet"))
    pq.write_table(pq.read_table(part), part.with_name("again.parquet"))  # delivered twice
    with caplog.at_level("WARNING", logger="modelfactory.api"):
        second = modelfactory.train(data, store=store, cluster="inline", retrain="changed", **ARGS)
    assert second.summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    assert second.summary["retrain"] == {"mode": "changed", "base_run": first.id, "refit": 1, "carried_over": 3,
                                         "lost": 1}
    error = second.groups.set_index("site").loc["s002", "error"]
    assert error.endswith(f"(run {first.id} has a model for this group, which this run does not carry over: score "
                          f"the group with run={first.id!r} (--run {first.id}) until it refits)"), error
    [said] = [r.getMessage() for r in caplog.records if "whose refit" in r.getMessage()]
    assert said.startswith(f"1 group(s) had a model in run {first.id} whose refit in run {second.id} failed")
    assert main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "--only-changed", "--base", first.id]) == 0
    assert ", 3 carried over, 1 left without a model\n" in capsys.readouterr().out


def test_only_changed_retrains_the_groups_whose_data_changed(tmp_path):
    t = metrics_table(series=4, hours=72, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    first = modelfactory.train(data, store=store, cluster="inline", **ARGS)
    _rewrite_site(t, tmp_path / "d", "s002", lambda v: v * 2)
    second = modelfactory.train(data, store=store, cluster="inline", retrain="changed", **ARGS)
    tab = modelfactory.ModelStore(store).table().to_pandas().set_index("site")
    assert list(tab.index[tab.fitted_in == second.id]) == ["s002"]
    assert modelfactory.ModelStore(store).manifest()["lineage"]["carried_over"] == {first.id: 3}
    # the summary says it too (the CLI printed "4 groups, ok 4" and nothing of what was refit)
    assert second.summary["retrain"] == {"mode": "changed", "base_run": first.id, "refit": 1, "carried_over": 3,
                                         "lost": 0}
    assert "retrain" not in first.summary
    old = modelfactory.ModelStore(store).load({"app": "app0", "site": "s002"}, run=first.id)
    new = modelfactory.ModelStore(store).load({"app": "app0", "site": "s002"})
    np.testing.assert_allclose(new.median_, 2 * old.median_)


def test_gc_keeps_the_base_of_an_interrupted_retrain_until_it_is_resumed(by_app, tmp_path, monkeypatch):
    """gc removed the run an interrupted --only-changed retrain started from, when a later run was
    LATEST: `models list` still offered the resume, which then failed on a run the user never named."""
    import modelfactory.api

    store = str(tmp_path / "s")
    base = modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id
    monkeypatch.setattr(modelfactory.api, "run_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt, match="was not committed"):
        modelfactory.train(by_app, store=store, cluster="inline", retrain="changed", **ARGS)
    monkeypatch.undo()
    later = modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": 12}, **ARGS).id
    st = modelfactory.ModelStore(store)
    (cut,) = st.pending()
    assert cut["base_run"] == base and st.gc(keep=1) == [] and st.runs() == [base, later]
    run = modelfactory.train(by_app, store=store, cluster="inline", retrain="changed", resume=cut["run_id"], **ARGS)
    assert run.summary["resumed"] is True and run.summary["retrain"]["base_run"] == base
    # resumed (an older id than `later`, now LATEST): the base is an old run like any other
    assert st.latest() == cut["run_id"] and st.gc(keep=1) == [base]
    assert st.gc(keep=1, pending=True) == []


def test_retrain_refuses_a_different_model(by_app, tmp_path):
    store = str(tmp_path / "s")
    modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    with pytest.raises(ModelFactoryError, match=r"it differs in \['params'\]"):
        modelfactory.train(by_app, store=store, cluster="inline", retrain="failed",
                           params={"season_length": 12}, **ARGS)
    # another model: the base's parameters as the run has them (they were shown filled with the
    # new model's defaults, which the base never had)
    with pytest.raises(ModelFactoryError) as err:
        modelfactory.train(by_app, store=store, cluster="inline", retrain="failed",
                           **dict(ARGS, model="holt_winters"))
    was = str(err.value).split("(was ", 1)[1].split(", now ")[0]
    assert "it differs in ['model', 'params']" in str(err.value) and "'seasonal'" in was
    assert "'interval'" not in was and "'max_missing'" not in was, was


class Quantiles(Model):
    """A user model with a tuple parameter (an ARIMA order, a pair of quantiles)."""

    name = "quantiles"
    params: ClassVar = {"quantiles": Param((0.05, 0.95), object), "weight": Param(float("nan"), object)}
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        self.mean_ = float(np.nanmean(y))

    def _score(self, y, t, X):
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, -np.inf), "upper": np.full(n, np.inf),
                "score": np.zeros(n), "is_anomaly": np.zeros(n, bool)}


def test_retrain_compares_parameters_as_they_are_recorded(tmp_path):
    # the manifest holds [0.05, 0.95] and NaN: compared with the live (0.05, 0.95) and nan, every
    # retrain was refused, "it differs in ['params'] (was [{'quantiles': [0.05, 0.95]}], now ...)"
    data = write(metrics_table(series=3, hours=48, apps=1), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    args = {"by": ["app", "site"], "time": "ts", "target": "value", "model": Quantiles, "store": store,
            "cluster": "inline"}
    first = modelfactory.train(data, **args)
    assert modelfactory.ModelStore(store).manifest()["spec"]["params"]["quantiles"] == [0.05, 0.95]
    for mode in ("failed", "changed"):
        again = modelfactory.train(data, retrain=mode, **args)
        assert again.summary["retrain"]["carried_over"] == 3
    with pytest.raises(ModelFactoryError, match=r"it differs in \['params'\]"):
        modelfactory.train(data, retrain="failed", params={"quantiles": (0.1, 0.9)}, **args)
    assert first.summary["counts"]["ok"] == 3


@pytest.mark.parametrize("value, recorded", [
    (np.array([0.2, 0.8]), [0.2, 0.8]),
    (np.int64(3), 3),
    (datetime.date(2026, 1, 1), "2026-01-01"),
])
def test_numpy_and_date_parameters_are_recorded_as_json(tmp_path, value, recorded):
    data = write(metrics_table(series=2, hours=48, apps=1), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", model=Quantiles,
                             params={"quantiles": value}, store=store, cluster="inline")
    assert run.summary["counts"]["ok"] == 2
    assert modelfactory.ModelStore(store).manifest()["spec"]["params"]["quantiles"] == recorded


@pytest.mark.parametrize("value, kind", [({1, 2}, "set"), (b"x", "bytes"), ([0.1, print], "builtin_function_or_method"),
                                         ({(1, 2): "a"}, r"cannot be written as JSON \(TypeError: keys must be")])
def test_a_parameter_json_cannot_record_is_refused_naming_it(tmp_path, value, kind):
    # it was "builtins.TypeError: Object of type set is not JSON serializable", from deep in train
    from modelfactory.exceptions import ParameterError

    data = write(metrics_table(series=2, hours=48, apps=1), tmp_path / "d", ["app"])
    what = kind if kind.startswith("cannot") else f"holds a value of type {kind}"
    with pytest.raises(ParameterError, match=rf"The 'quantiles' parameter of quantiles {what}.*, which a run cannot "
                                             "record"):
        modelfactory.train(data, by=["app", "site"], time="ts", target="value", model=Quantiles,
                           params={"quantiles": value}, store=str(tmp_path / "s"), cluster="inline")
    assert not (tmp_path / "s").exists()


def test_retrain_accepts_a_run_stored_before_a_parameter_was_added(by_app, tmp_path):
    # A store written before seasonal had `tz` lists no tz in its manifest: the nightly
    # --only-changed must still retrain from it (tz=None is what its models load with), not
    # refuse it for "differing in params" until someone runs a full retrain.
    import json

    from modelfactory.store import _digest_of

    store = str(tmp_path / "s")
    first = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    path = tmp_path / "s" / "runs" / first.id / "manifest.json"
    man = json.loads(path.read_text())
    del man["spec"]["params"]["tz"], man["checksum"]
    man["checksum"] = _digest_of(man)
    path.write_text(json.dumps(man))
    assert "tz" not in modelfactory.ModelStore(store).manifest()["spec"]["params"]
    second = modelfactory.train(by_app, store=store, cluster="inline", retrain="changed", **ARGS)
    assert second.summary["counts"]["ok"] == first.summary["counts"]["ok"]
    assert modelfactory.ModelStore(store).manifest()["lineage"]["carried_over"] == {first.id: first.summary["groups"]}
    # a parameter set to another value than its default is still a different model
    with pytest.raises(ModelFactoryError, match=r"it differs in \['params'\].*'tz': 'Europe/Berlin'"):
        modelfactory.train(by_app, store=store, cluster="inline", retrain="changed",
                           params={"tz": "Europe/Berlin"}, **ARGS)


def test_two_attempts_of_a_unit_at_once_never_overwrite_each_others_part(tmp_path, monkeypatch):
    # A worker presumed dead can still be writing when its unit runs again elsewhere. Both
    # attempts pass the "already written?" check before either writes (the model sleeps),
    # so both write: each to its own file, and each file keeps the checksum its result holds.
    import hashlib
    import threading

    from modelfactory._io import Location
    from modelfactory.api import resolve_model
    from modelfactory.dataset import discover
    from modelfactory.kernel import JobSpec, recover, run_unit
    from modelfactory.plan import plan

    monkeypatch.setenv("MF_SLOW", "0.5")
    data = write(metrics_table(series=4, hours=72, apps=2), tmp_path / "d", ["app"])
    info = discover(data)
    sink = Location.of(str(tmp_path / "store"))
    spec = JobSpec("train", ("app", "site"), info.source, ("app", "site", "ts", "value"), "ts", "value",
                   model=resolve_model(SlowSeasonal), sink=sink, groups_prefix="runs/r1/parts/", run_id="r1",
                   resume=True)
    (unit,) = plan(info, ("app", "site"), workers=1, target_rows=10**6).units
    results = []
    threads = [threading.Thread(target=lambda: results.append(run_unit(spec, unit))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = [r.parts[0].path for r in results]
    assert len(set(paths)) == 2 and all(p.startswith(f"runs/r1/parts/{unit.id}.") for p in paths)
    for r in results:  # every result's checksum still matches the bytes on disk
        assert hashlib.sha256(sink.read_bytes(r.parts[0].path)).hexdigest() == r.parts[0].sha256
        assert r.counts == {"ok": 4, "failed": 0, "skipped": 0}
    again = recover(spec, unit.id)  # a later attempt reuses one of them, whole
    assert again is not None and again.parts[0].path == sorted(paths)[0]


class ForgetsReturnSelf(Model):
    """A user model whose fit() fits in place but returns None (it forgot `return self`)."""

    name = "forgets_return_self"
    state_attrs = ("mean_",)

    def fit(self, y, *, t=None, X=None):
        self.mean_ = float(np.nanmean(y))


class OneValueScore(Model):
    """A user model whose _score returns one value for every row."""

    name = "one_value_score"
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        self.mean_ = float(np.nanmean(y))

    def _score(self, y, t, X):
        one = np.array([self.mean_])
        return {"expected": one, "lower": one - 1, "upper": one + 1, "score": np.zeros(1),
                "is_anomaly": np.zeros(len(y), dtype=bool)}


def _trained_then_scored(model, tmp_path):
    """Three series trained with the user model ``model`` (all ok), then scored: the score Run."""
    data = write(metrics_table(series=3, hours=48, apps=1), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    assert modelfactory.train(data, model=model, store=store, cluster="inline", **ARGS).summary["counts"]["ok"] == 3
    return modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline", trust=True)


class TupleScore(OneValueScore):
    """A user model whose _score returns (expected, lower, upper), not a dict."""

    name = "tuple_score"

    def _score(self, y, t, X):
        e = np.full(len(y), self.mean_)
        return e, e - 1, e + 1


def test_a_score_that_returns_a_tuple_fails_its_groups_saying_it_must_be_a_dict(tmp_path):
    # it failed them with "ValueError: The truth value of an array with more than one element is
    # ambiguous. Use a.any() or a.all() (at base.py:364 in score)", about modelfactory's own line
    scored = _trained_then_scored(TupleScore, tmp_path)
    assert scored.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert scored.groups.error.str.startswith(
        "ModelError: TupleScore._score returned tuple, not a dict; it must return a dict of expected, lower, "
        "upper, score, is_anomaly, one value per row.").all(), scored.groups.error.tolist()


class SetsOtherState(OneValueScore):
    """A user model whose _fit sets avg_ while state_attrs says mean_."""

    name = "sets_other_state"

    def _fit(self, y, t, X):
        self.avg_ = float(np.nanmean(y))


class NoStateAttrs(OneValueScore):
    name = "no_state_attrs"
    state_attrs = ()


@pytest.mark.parametrize("cls, error", [
    (SetsOtherState, ("SetsOtherState.fit left mean_ unset (state_attrs = ('mean_',)): set every attribute of "
                      "state_attrs in _fit, or list in state_attrs the ones it sets")),
    (NoStateAttrs, ("NoStateAttrs declares no state_attrs, so it can never be scored or loaded as fitted: list "
                    "the attributes its fit sets (e.g. state_attrs = ('mean_',))")),
])
def test_a_fit_that_leaves_the_model_unfitted_fails_its_groups_instead_of_ok(tmp_path, cls, error):
    # Such a run was `ok 3`, and every score of it failed "NotFittedError: This SetsOtherState is
    # not fitted yet: call fit() first": a model marked ok that no one could use.
    data = write(metrics_table(series=3, hours=48, apps=1), tmp_path / "d", ["app"])
    run = modelfactory.train(data, model=cls, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert set(run.groups.error) == {error}


class NoScore(OneValueScore):
    name = "no_score"
    _score = Model._score


def test_a_model_without_score_fails_its_groups_saying_what_to_write(tmp_path):
    # it was "NotImplementedError:  (at base.py:387 in _score)", with no message at all
    scored = _trained_then_scored(NoScore, tmp_path)
    assert scored.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert scored.groups.error.str.startswith(
        "NotImplementedError: NoScore does not implement _score(self, y, t, X), so it cannot score: return a dict "
        "of expected, lower, upper, score, is_anomaly, one value per row (see examples/custom_model.py)").all()


def test_a_score_in_which_no_group_scored_gives_no_rows_with_the_columns_of_scores(tmp_path):
    # to_pandas() was a frame of no columns: scores.to_pandas().query("is_anomaly") raised
    none = _trained_then_scored(NoScore, tmp_path / "none").to_pandas()
    some = _trained_then_scored(SomeNaNScores, tmp_path / "some").to_arrow()
    assert none.empty and list(none.columns) == some.column_names
    assert [str(t) for t in none.dtypes] == [str(t) for t in some.schema.empty_table().to_pandas().dtypes]
    assert none.query("is_anomaly").empty


def test_a_fit_that_returns_none_fails_its_groups_with_the_reason(tmp_path):
    data = write(metrics_table(series=3, hours=48, apps=1), tmp_path / "d", ["app"])
    run = modelfactory.train(data, model=ForgetsReturnSelf, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert set(run.groups.error) == {"ForgetsReturnSelf.fit returned NoneType, not the fitted model: "
                                     "end fit() with `return self`"}


def test_scores_of_the_wrong_length_fail_their_groups_instead_of_being_broadcast(tmp_path):
    scored = _trained_then_scored(OneValueScore, tmp_path)
    assert scored.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert scored.groups.error.str.contains("OneValueScore._score returned 'expected' of shape (1,) for 48 rows; "
                                            "it must return one value per row", regex=False).all()


class SomeNaNScores(OneValueScore):
    """A user model whose vectorised score_batch leaves some scores NaN, and flags row 3 of each series."""

    name = "some_nan_scores"

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        n = len(batch.values)
        out = {"expected": np.zeros(n), "lower": np.zeros(n) - 1, "upper": np.zeros(n) + 1,
               "score": np.tile(np.r_[np.nan, 0.5, 0.25, 2.0], n // 4 + 1)[:n], "is_anomaly": np.zeros(n, bool)}
        out["is_anomaly"][batch.offsets[:-1] + 3] = True
        return out


def test_nan_scores_from_a_users_score_batch_leave_each_groups_max_score_the_largest_real_one(tmp_path):
    scored = _trained_then_scored(SomeNaNScores, tmp_path)
    assert scored.summary["counts"] == {"ok": 3, "failed": 0, "skipped": 0}
    # (2.0 is clipped to 1, as Model.score clips: a score is in [0, 1])
    assert scored.groups.max_score.tolist() == [1.0, 1.0, 1.0] and scored.groups.anomalies.tolist() == [1, 1, 1]
    rows = scored.to_pandas()
    assert rows.score.between(0, 1).all() and rows.score.notna().all()


class BatchOnlyNaNFlags(OneValueScore):
    """A user model that scores in batches only (no _score): NaN scores and NaN flags ("no opinion")."""

    name = "batch_only_nan_flags"
    _score = Model._score

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        n = len(batch.values)
        return {"expected": np.zeros(n), "lower": np.zeros(n) - 1, "upper": np.zeros(n) + 1,
                "score": np.full(n, np.nan), "is_anomaly": np.where(np.arange(n) % 48 == 5, 1.0, np.nan)}


def test_a_users_score_batch_is_held_to_the_rules_of_score(tmp_path):
    # NaN scores were written as NaN, and a NaN flag (no opinion) flagged every row: 144 of 144
    scored = _trained_then_scored(BatchOnlyNaNFlags, tmp_path)
    assert scored.summary["counts"] == {"ok": 3, "failed": 0, "skipped": 0}
    rows = scored.to_pandas()
    assert (rows.score == 0).all() and int(rows.is_anomaly.sum()) == 3
    assert scored.groups.anomalies.tolist() == [1, 1, 1]


class BatchOnlyRaises(BatchOnlyNaNFlags):
    name = "batch_only_raises"

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        raise ValueError("my vectorised scorer broke: column 3 is missing")


class BatchOnlyNoFlags(BatchOnlyNaNFlags):
    name = "batch_only_no_flags"

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        out = super().score_batch(models, batch)
        del out["is_anomaly"]
        return out


@pytest.mark.parametrize("cls, error", [
    (BatchOnlyRaises, "ValueError: my vectorised scorer broke: column 3 is missing (at "),
    (BatchOnlyNoFlags, ("ModelError: BatchOnlyNoFlags.score_batch returned no 'is_anomaly'; it must return "
                        "expected, lower, upper, score, is_anomaly, one value per row of the batch.")),
])
def test_a_batch_only_scorer_that_fails_fails_every_group_with_its_own_error(tmp_path, cls, error):
    # each group was scored again alone with the _score the class never wrote, and failed
    # "NotImplementedError: ... does not implement _score": the real error was lost
    scored = _trained_then_scored(cls, tmp_path)
    assert scored.summary["counts"] == {"ok": 0, "failed": 3, "skipped": 0}
    assert scored.groups.error.str.startswith(error).all(), scored.groups.error.tolist()


class NaNFlags(OneValueScore):
    name = "nan_flags"

    def _score(self, y, t, X):
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, -np.inf), "upper": np.full(n, np.inf),
                "score": np.zeros(n), "is_anomaly": np.where(np.arange(n) == 7, 1.0, np.nan)}


def test_a_nan_flag_from_score_is_no_flag():
    m = NaNFlags().fit(np.arange(48.0))
    assert np.flatnonzero(m.score(np.arange(10.0))["is_anomaly"]).tolist() == [7]
    assert np.flatnonzero(NaNFlags._score(m, np.arange(3.0), None, None)["is_anomaly"].astype(bool)).tolist() == [0, 1, 2]


def test_only_failed_on_new_data_keeps_the_carried_models_fingerprints_so_only_changed_refits_them(tmp_path):
    t = metrics_table(series=3, hours=48, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    first = modelfactory.train(data, store=store, cluster="inline", **ARGS)
    _rewrite_site(t, tmp_path / "d", "s001", lambda v: v + 1000)  # new data for one group
    # nothing failed: every model is carried over, fitted on the old data
    second = modelfactory.train(data, store=store, cluster="inline", retrain="failed", **ARGS)
    assert modelfactory.ModelStore(store).manifest()["lineage"]["carried_over"] == {first.id: 3}
    third = modelfactory.train(data, store=store, cluster="inline", retrain="changed", **ARGS)
    tab = modelfactory.ModelStore(store).table().to_pandas().set_index("site")
    assert list(tab.index[tab.fitted_in == third.id]) == ["s001"]
    assert second.id != third.id


def test_a_carried_over_model_keeps_the_rows_it_was_fitted_on(tmp_path):
    """A retrain that carries a model over recorded today's row count beside yesterday's model
    (and yesterday's seconds and fingerprint)."""
    t = metrics_table(series=3, hours=72, apps=1)
    store = str(tmp_path / "s")
    two_days = t.filter(pa.compute.less(t["ts"], t["ts"][48]))
    first = modelfactory.train(write(two_days, tmp_path / "d1", ["site"]), store=store, cluster="inline", **ARGS)
    assert set(first.groups["rows"]) == {48}
    second = modelfactory.train(write(t, tmp_path / "d2", ["site"]), store=store, cluster="inline",
                                retrain="failed", **ARGS)  # nothing failed: all three carried over, unrefitted
    assert set(modelfactory.ModelStore(store).table(second.id)["fitted_in"].to_pylist()) == {first.id}
    assert set(second.groups["rows"]) == {48}
    assert second.summary["rows"] == first.summary["rows"] * 72 // 48  # the rows the retrain read


class ExitsOnBigValues(Model):
    """A user model that calls sys.exit() in one group: when fitting, and when scoring."""

    name = "exits_on_big_values"
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        if np.nanmean(y) > 1000:
            sys.exit("bad series")
        self.mean_ = float(np.nanmean(y))

    def _score(self, y, t, X):
        if self.mean_ > 20:
            sys.exit(3)
        e = np.full(y.shape, self.mean_)
        return {"expected": e, "lower": e - 1, "upper": e + 1, "score": np.zeros(y.shape),
                "is_anomaly": np.zeros(y.shape, dtype=bool)}


def test_sys_exit_in_user_code_fails_its_group_not_the_process(tmp_path):
    df = metrics_table(series=4, hours=48, apps=1).to_pandas()
    df.loc[df.site == "s001", "value"] += 5000
    data = write(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    run = modelfactory.train(data, model=ExitsOnBigValues, store=store, cluster="inline", **ARGS)
    g = run.groups.set_index("site")
    assert run.summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    assert g.loc["s001", "error"].startswith("SystemExit: bad series")
    scored = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline", trust=True)
    assert sum(scored.summary["counts"].values()) == 4  # every group accounted for, whatever its mean

    def stop(df):
        if df["site"].iloc[0] == "s002":
            sys.exit(1)
        return df[["app", "site"]].head(1)

    applied = modelfactory.apply(data, by=["app", "site"], func=stop, schema="app string, site string",
                                 cluster="inline")
    assert applied.summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    assert applied.groups.set_index("site").loc["s002", "error"].startswith("SystemExit: 1")


def test_a_retrain_says_how_many_groups_of_its_base_its_input_lacks(tmp_path, caplog):
    """A retrain's groups are those of its input: a base group missing from it is left out,
    counted in the lineage and said in a warning, not dropped without a word."""
    t = metrics_table(series=4, hours=48, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    first = modelfactory.train(data, store=store, cluster="inline", **ARGS)
    import shutil

    shutil.rmtree(tmp_path / "d" / "site=s003")
    caplog.set_level("WARNING", logger="modelfactory")
    second = modelfactory.train(data, store=store, cluster="inline", retrain="changed", **ARGS)
    lineage = modelfactory.ModelStore(store).manifest()["lineage"]
    assert lineage["not_in_input"] == 1 and lineage["carried_over"] == {first.id: 3}
    assert (f"1 group(s) of run {first.id} are not in this input, so run {second.id} has no model for them"
            in caplog.text)


def test_a_retrain_counts_left_out_groups_across_key_types_the_store_accepts(tmp_path):
    """Base keys int64 (a flat file), new keys text with a value that is no int: the count of
    left-out groups matches as scoring does, instead of a raw ArrowInvalid after every unit ran."""
    import pyarrow.parquet as pq

    t = metrics_table(series=4, hours=48, apps=1)
    ints = t.set_column(t.schema.get_field_index("site"), "site",
                        pa.array([int(s[1:]) for s in t["site"].to_pylist()], pa.int64()))
    texts = t.set_column(t.schema.get_field_index("site"), "site",
                         pa.array([s[1:].lstrip("0") or "0" if s != "s003" else "x" for s in t["site"].to_pylist()]))
    for name, table in (("d1", ints), ("d2", texts)):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "a.parquet")
    store = str(tmp_path / "s")
    first = modelfactory.train(str(tmp_path / "d1"), store=store, cluster="inline", **ARGS)
    modelfactory.train(str(tmp_path / "d2"), store=store, cluster="inline", retrain="changed", **ARGS)
    lineage = modelfactory.ModelStore(store).manifest()["lineage"]
    assert lineage["carried_over"] == {first.id: 3} and lineage["not_in_input"] == 1  # site 3 became "x"


@pytest.mark.timeout(120)
def test_gc_of_pending_runs_while_a_run_trains_makes_it_refuse_to_commit(tmp_path, monkeypatch):
    # `models gc --pending` while a training runs removes its parts (the run looks interrupted).
    # The run then committed a manifest listing the removed parts and moved LATEST to it: it
    # reported success, and every score or load of it failed ("Part ... is missing").
    import threading

    from modelfactory.cli import main

    monkeypatch.setenv("MF_SLOW", "0.3")
    data = write(metrics_table(series=12, hours=48, apps=12), tmp_path / "d", ["app"])
    store = tmp_path / "store"
    box: dict = {}

    def training():
        try:
            box["run"] = modelfactory.train(data, model=SlowSeasonal, store=str(store), cluster="inline",
                                            unit_rows=48, **ARGS)
        except StoreError as err:
            box["error"] = err

    th = threading.Thread(target=training)
    th.start()
    deadline = time.monotonic() + 60
    while not list(store.glob("runs/*/parts/*.parquet")):
        assert th.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    assert main(["models", "gc", "--store", str(store), "--pending"]) == 0
    th.join(90)
    st = modelfactory.ModelStore(str(store))
    assert "run" not in box, f"committed a run whose parts were removed; LATEST is {st.latest()}"
    assert "part files of run" in str(box["error"]) and "Nothing was committed" in str(box["error"])
    assert st.runs() == [] and st.latest() is None
    # what the run wrote after gc (parts, without the pending.json gc removed) is neither committed
    # nor pending: gc --pending removes it too, or nothing ever would
    leftover = [p.parent.parent.name for p in store.glob("runs/*/parts/*.parquet")]
    assert leftover and st.pending() == []
    assert main(["models", "gc", "--store", str(store), "--pending"]) == 0
    assert list((store / "runs").iterdir()) == []


@pytest.mark.timeout(180)
def test_resuming_a_retrain_by_id_uses_the_base_it_started_from_after_another_run_committed(tmp_path):
    # The nightly `train --only-changed` is killed; a manual run commits before anyone resumes it.
    # `--resume ID` then took the new LATEST as the base, and refused the run as "started for
    # another job or input" (same data, model and parameters): it could not be resumed at all
    # without knowing to pass --base with the id of a run it had resolved by itself.
    week1 = write(metrics_table(series=24, hours=72, apps=24), tmp_path / "w1", ["app"])
    week2 = write(metrics_table(series=24, hours=72, apps=24, seed=1), tmp_path / "w2", ["app"])
    store = tmp_path / "store"
    first = modelfactory.train(week1, model=SlowSeasonal, store=str(store), cluster="inline", **ARGS)
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from _slow_model import SlowSeasonal; "
              f"import modelfactory; modelfactory.train({week2!r}, by=['app', 'site'], time='ts', target='value', "
              f"model=SlowSeasonal, store={str(store)!r}, cluster='inline', unit_rows=72, retrain='changed')")
    _kill_once_written(script, store, parts=1 + 3, slow="0.3")  # the first run's part, then 3
    st = modelfactory.ModelStore(str(store))
    (pending,) = st.pending()
    manual = modelfactory.train(week1, model=SlowSeasonal, store=str(store), cluster="inline", **ARGS)
    assert st.latest() == manual.id != first.id

    run = modelfactory.train(week2, model=SlowSeasonal, store=str(store), cluster="inline", unit_rows=72,
                             retrain="changed", resume=pending["run_id"], **ARGS)
    assert run.id == pending["run_id"] and st.pending() == []
    assert run.summary["counts"] == {"ok": 24, "failed": 0, "skipped": 0}
    assert st.manifest(run.id)["lineage"]["base_run"] == first.id


class PlainDictParams(OneValueScore):
    """A user model that declares its parameters as plain values, not Param."""

    name = "plain_dict_params"
    params = {"k": 3.0}


def test_parameters_declared_without_param_are_refused_up_front_by_name(tmp_path, capsys):
    # train raised "AttributeError: 'float' object has no attribute 'default'" (the CLI: an
    # internal error) from Model.__init__
    from modelfactory.exceptions import ModelError

    data = write(metrics_table(series=3, hours=48, apps=1), tmp_path / "d", ["app"])
    want = ("PlainDictParams.params['k'] is 3.0, a float: declare each parameter as a Param with its default, "
            "e.g. params = {'k': Param(3.0)} (from modelfactory.models import Param; Param(3.0, float, low=0) "
            "also checks the value).")
    with pytest.raises(ModelError) as err:
        modelfactory.train(data, model=PlainDictParams, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert str(err.value) == want and not (tmp_path / "s").exists()


class _Killed(BaseException):
    """Stands for the process being killed (no except clause of the library catches it)."""


def _train_killed_at_latest(monkeypatch, source: str, store: str, **kw) -> None:
    """A train killed after writing its manifest, as it was about to move LATEST."""
    real = modelfactory.ModelStore.write

    def killed_at_latest(self, rel, data, then=""):
        if rel == "LATEST":
            raise _Killed
        return real(self, rel, data, then)

    with monkeypatch.context() as m, pytest.raises(_Killed):
        m.setattr(modelfactory.ModelStore, "write", killed_at_latest)
        modelfactory.train(source, store=store, cluster="inline", **ARGS, **kw)


def test_a_train_killed_between_its_manifest_and_latest_is_shown_and_resume_finishes_its_commit(
        by_app, tmp_path, monkeypatch, capsys):
    """A train killed after writing its manifest but before moving LATEST left a committed run
    that `models list` showed as any other, LATEST on the run before, and `train --resume RUN`
    said 'already committed; there is nothing to resume'.  LATEST stays the commit point of
    "latest" (readers do not take the newer manifest by themselves); resume finishes the commit."""
    from modelfactory.cli import main

    store = str(tmp_path / "s")
    argv = ["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
            "--scheduler", "inline", "--quiet"]
    assert main(argv) == 0
    st = modelfactory.ModelStore(store)
    before = st.latest()
    _train_killed_at_latest(monkeypatch, by_app, store, params={"season_length": 12})
    (cut,) = [r for r in st.runs() if r != before]
    assert st.latest() == before and st.interrupted_commits() == [cut]
    capsys.readouterr()
    assert main(["models", "list", "--store", store]) == 0
    assert f"(its train stopped before moving LATEST: train --resume {cut} finishes the commit)" in capsys.readouterr().out
    # with other arguments: which ones differ (it said only "its data, columns, base run, model or parameters")
    assert main([*argv, "-p", "season_length=10", "--resume", cut]) == 2
    assert "(params.season_length 12 then, 10 now)" in capsys.readouterr().err
    assert main([*argv, "-p", "season_length=12", "--resume", cut]) == 0
    out = capsys.readouterr().out  # it resumed, as the guide promises a scheduled job's log says
    assert f"run {cut} (train): 12 groups, ok 12" in out and f"resumed run {cut}" in out
    assert st.latest() == cut and st.interrupted_commits() == [] and st.runs() == sorted([before, cut])
    assert main([*argv, "-p", "season_length=12", "--resume", cut]) == 2  # now it is done
    assert "is already committed; there is nothing to resume" in capsys.readouterr().err


def test_finishing_an_interrupted_commit_never_moves_latest_back_to_it(by_app, tmp_path, monkeypatch, caplog):
    """A train killed between its manifest and LATEST, then another train of the job that committed:
    resuming the first finished its commit by pointing LATEST at it, so scoring took its older
    models instead of the newer run's.  Its commit is finished; LATEST stays on the later run."""
    store = str(tmp_path / "s")
    st = modelfactory.ModelStore(store)
    _train_killed_at_latest(monkeypatch, by_app, store)
    (cut,) = st.interrupted_commits()
    later = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    assert st.latest() == later.id and st.interrupted_commits() == [cut]
    with caplog.at_level("WARNING", logger="modelfactory"):
        resumed = modelfactory.train(by_app, store=store, cluster="inline", resume=cut, **ARGS)
    assert resumed.id == cut and st.interrupted_commits() == []
    assert st.latest() == later.id
    assert f"LATEST stays on run {later.id}, committed after run {cut}" in caplog.text
    # with no run after it, finishing the commit moves LATEST, as the commit would have
    _train_killed_at_latest(monkeypatch, by_app, store, params={"season_length": 12})
    (cut2,) = st.interrupted_commits()
    modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": 12}, resume=True, **ARGS)
    assert st.latest() == cut2 and st.interrupted_commits() == []


# --- resume=, as train takes it ------------------------------------------------------------------
def _interrupted(monkeypatch, data, store, **kw):
    """A train of ``data`` into ``store`` stopped by Ctrl-C once its pending.json is written; its run id."""
    import modelfactory.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(modelfactory.api, "run_units", interrupted)
        with pytest.raises(KeyboardInterrupt, match="was not committed"):
            modelfactory.train(data, store=store, cluster="inline", **ARGS, **kw)
    (pending,) = modelfactory.ModelStore(store).pending()
    return pending


@pytest.mark.parametrize("flag, resumed", [(1, True), (0, None), (True, True), (False, None)])
def test_resume_takes_1_and_0_as_true_and_false(by_app, tmp_path, monkeypatch, flag, resumed):
    # resume=1 was the run id 1: "No interrupted run 1"
    store = str(tmp_path / "s")
    pending = _interrupted(monkeypatch, by_app, store)
    run = modelfactory.train(by_app, store=store, cluster="inline", resume=flag, **ARGS)
    assert run.summary.get("resumed") is resumed
    assert (run.id == pending["run_id"]) is bool(flag)


@pytest.mark.parametrize("value", [2, -1, 1.0, 0.0, ["r1"], b"r1"])
def test_resume_that_is_neither_a_flag_nor_a_run_id_is_refused(by_app, tmp_path, value):
    with pytest.raises(ModelFactoryError, match=rf"resume must be True or False \(1 or 0\), or the id of an "
                                                rf"interrupted run as text; got {re.escape(repr(value))} "
                                                rf"\({type(value).__name__}\)"):
        modelfactory.train(by_app, store=str(tmp_path / "s"), cluster="inline", resume=value, **ARGS)
    assert not (tmp_path / "s").exists()


def test_a_resumed_run_says_it_ignores_a_new_unit_rows(by_app, tmp_path, monkeypatch, caplog):
    # a resumed run keeps the units it was planned with (by design), and the new value went unused unseen
    store = str(tmp_path / "s")
    pending = _interrupted(monkeypatch, by_app, store, unit_rows=50)
    caplog.set_level("WARNING", logger="modelfactory.api")
    run = modelfactory.train(by_app, store=store, cluster="inline", resume=True, unit_rows=7, **ARGS)
    assert run.id == pending["run_id"] and run.summary["unit_rows"] == 50
    warnings = [r.getMessage() for r in caplog.records if "unit_rows" in r.getMessage()]
    expected = (f"unit_rows=7 (unit_rows=, --unit-rows) is ignored: run {run.id} resumes with the units it was "
                "planned with (unit_rows=50), so the units it already finished are kept; start a new run (without "
                "resume) to plan with another unit_rows")
    assert warnings == [expected]


def test_a_resumed_run_given_its_own_unit_rows_or_none_says_nothing(by_app, tmp_path, monkeypatch, caplog):
    store = str(tmp_path / "s")
    _interrupted(monkeypatch, by_app, store, unit_rows=50)
    caplog.set_level("WARNING", logger="modelfactory.api")
    modelfactory.train(by_app, store=store, cluster="inline", resume=True, unit_rows=50, **ARGS)
    _interrupted(monkeypatch, by_app, str(tmp_path / "s2"), unit_rows=50)
    modelfactory.train(by_app, store=str(tmp_path / "s2"), cluster="inline", resume=True, **ARGS)
    assert [r.getMessage() for r in caplog.records if "unit_rows" in r.getMessage()] == []
