"""train end to end on a real LocalCluster, the store it commits, and every bad input."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from _data import metrics_table, write

import modelfactory
from modelfactory.exceptions import DatasetError, ModelError, ParameterError, SchemaError, StoreError
from modelfactory.models.base import Model, Param, SkipGroup

ARGS = dict(by=["app", "site"], time="ts", target="value")


def test_train_commits_one_model_per_group(by_app, tmp_path, client):
    store = str(tmp_path / "store")
    run = modelfactory.train(by_app, store=store, cluster=client, **ARGS)
    assert run.summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0}
    assert run.summary["rows"] == 12 * 72
    groups = run.groups
    assert len(groups) == 12 and set(groups["status"]) == {"ok"} and (groups["rows"] == 72).all()
    st = modelfactory.ModelStore(store)
    assert st.latest() == run.id and st.runs() == [run.id]
    assert len(st.groups()) == 12
    man = st.manifest()
    assert man["spec"]["model"] == "seasonal" and man["summary"]["counts"]["ok"] == 12
    assert man["input"]["rows"] == 12 * 72 and len(man["parts"]) == run.summary["units"]
    model = st.load({"app": "app1", "site": "s004"})
    t = np.arange(48) * 3600 + np.datetime64("2026-03-05T00:00:00", "s").astype(np.int64)
    y = 104 + 10 * np.sin(2 * np.pi * (np.arange(48) % 24) / 24) + np.random.default_rng(1).normal(0, 1, 48)
    y[10] += 50
    scored = model.score(y, t=t)
    assert scored["is_anomaly"][10] and np.argmax(scored["score"]) == 10
    assert 0.0 <= scored["score"].min() and scored["score"].max() <= 1.0


def test_shuffled_and_partitioned_layouts_give_the_same_models(by_app, by_day, tmp_path, client):
    modelfactory.train(by_app, store=str(tmp_path / "a"), cluster=client, **ARGS)
    b = modelfactory.train(by_day, store=str(tmp_path / "b"), cluster=client, unit_rows=300, **ARGS)
    assert b.summary["mode"] == "shuffle" and b.summary["units"] == 4  # ceil(864 / 300), even for 2 workers
    ta = modelfactory.ModelStore(str(tmp_path / "a")).table().sort_by([("app", "ascending"), ("site", "ascending")])
    tb = modelfactory.ModelStore(str(tmp_path / "b")).table().sort_by([("app", "ascending"), ("site", "ascending")])
    assert ta.select(["app", "site", "status", "rows", "model"]).equals(tb.select(["app", "site", "status", "rows", "model"]))


class Flaky(Model):
    """A user model that fails on huge values, skips short series, and learns the mean otherwise."""

    name = "flaky"
    params = {"limit": Param(1000.0, float)}
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        if np.mean(y) > self.limit:
            raise RuntimeError("values above the limit")
        if len(y) < 48:
            raise SkipGroup("too short for flaky")
        self.mean_ = float(np.mean(y))


def test_one_failing_group_never_fails_the_run(tmp_path):
    df = metrics_table(series=4, hours=72, apps=1).to_pandas()
    df.loc[df.site == "s001", "value"] += 10_000
    df = df[(df.site != "s002") | (df.ts < df.ts.min() + pd.Timedelta(hours=24))]
    path = write(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d", ["app"])
    run = modelfactory.train(path, store=str(tmp_path / "s"), model=Flaky, cluster="inline", **ARGS)
    g = run.groups.set_index("site")
    assert run.summary["counts"] == {"ok": 2, "failed": 1, "skipped": 1}
    assert g.loc["s001", "status"] == "failed"
    assert g.loc["s001", "error"].startswith("RuntimeError: values above the limit (at test_train.py:")
    assert g.loc["s002", "status"] == "skipped" and g.loc["s002", "error"] == "too short for flaky"
    assert g.loc["s002", "rows"] == 24
    st = modelfactory.ModelStore(str(tmp_path / "s"))
    assert st.manifest()["spec"]["serializer"] == "pickle"
    assert st.groups().set_index("site").loc["s001", "status"] == "failed"


def test_an_integer_target_or_feature_past_2_to_the_53_trains_and_scores(tmp_path):
    # a byte counter: Arrow's safe cast to float64 refused 2**53 + 1, and the unit (every group
    # in it) failed "outside any group" with an ArrowInvalid naming no column
    t = metrics_table(series=3, hours=72, apps=1)
    big = pa.array(np.round(t["value"].to_numpy()).astype(np.int64) + (2**53 + 1) * (t["site"].to_numpy() == "s001"))
    t = t.set_column(t.schema.get_field_index("value"), "value", big).append_column("bytes", big)
    path = write(t, tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    run = modelfactory.train(path, store=store, cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 3, "failed": 0, "skipped": 0}
    forest = modelfactory.train(path, store=str(tmp_path / "f"), model="random_forest", features=["bytes"],
                                by=["app", "site"], time="ts", target="value", cluster="inline")
    assert forest.summary["counts"]["ok"] == 3
    scored = modelfactory.score(path, store=store, out=str(tmp_path / "o"), cluster="inline")
    assert scored.summary["counts"]["ok"] == 3


class KeepsALock(Model):
    """A user model whose fitted state holds a lock (a cache guarded by it)."""

    name = "keeps_a_lock"
    state_attrs = ("mean_", "cache_")

    def _fit(self, y, t, X):
        import threading

        self.mean_ = float(np.nanmean(y))
        self.cache_ = {"lock": threading.Lock(), "n": len(y)}


def test_a_fitted_state_that_cannot_be_pickled_fails_its_groups_naming_the_attribute(tmp_path):
    # "cannot serialise: TypeError: cannot pickle '_thread.lock' object (at cloudpickle.py:1327 in dump)"
    path = write(metrics_table(series=2, hours=48, apps=1), tmp_path / "d", ["app"])
    run = modelfactory.train(path, store=str(tmp_path / "s"), model=KeepsALock, cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 0, "failed": 2, "skipped": 0}
    assert set(run.groups.error) == {(
        "cannot serialise the fitted KeepsALock: its attribute cache_ (dict) cannot be pickled (TypeError: cannot "
        "pickle '_thread.lock' object); keep only data in the fitted state (arrays, numbers, fitted estimators), and "
        "make what cannot be pickled (locks, open files, clients, generators) when it is needed, or drop it at the "
        "end of _fit")}


def test_a_train_run_asked_for_rows_says_where_its_models_are(tmp_path):
    # run.to_pandas() on a train run said "This run has no tabular result (no schema was given)":
    # train takes no schema, so the hint pointed at nothing; run.results said "use to_pandas()",
    # which then failed. Both now say where the models are, and what they name exists.
    from modelfactory.exceptions import ModelFactoryError

    path = write(metrics_table(series=2, hours=72, apps=1), tmp_path / "d", ["app"])
    run = modelfactory.train(path, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    for get in (run.to_pandas, run.to_arrow, lambda: run.results):
        with pytest.raises(ModelFactoryError, match=r"train run has no rows.*run\.groups.*run\.store\.load\(key, run=") as err:
            get()
        assert "no schema was given" not in str(err.value) and "use to_pandas" not in str(err.value)
    key = run.groups.iloc[0][["app", "site"]].to_dict()
    assert run.store.load(key, run=run.id) is not None and run.store.table(run.id).num_rows == 2
    keys = modelfactory.map_keys(["a", "b"], func=str.upper, cluster="inline")
    with pytest.raises(ModelFactoryError, match=r"no schema was given.*run\.results"):
        keys.to_pandas()
    assert keys.results == {"a": "A", "b": "B"}


def test_the_time_column_among_the_keys_and_a_base_without_a_retrain_are_refused(tmp_path, capsys):
    # by=[..., "ts"] ran and failed every group ("repeats a timestamp ... a key missing from by="),
    # 13,440 groups of one row each; --base without --only-failed/--only-changed was ignored, and
    # a full training ran and committed as if the named run meant nothing
    from modelfactory.cli import main
    from modelfactory.exceptions import ModelFactoryError

    path = write(metrics_table(series=2, hours=72, apps=1), tmp_path / "d", ["app"])
    store = str(tmp_path / "s")
    with pytest.raises(SchemaError, match=r"The time column 'ts' is also one of the keys by=\['app', 'ts'\].*"
                                          r"Drop 'ts' from by="):
        modelfactory.train(path, store=store, **{**ARGS, "by": ["app", "ts"]}, cluster="inline")
    with pytest.raises(ModelFactoryError, match=r"base='old' \(--base\) names the run that retrain='failed' or "
                                                r"'changed' \(--only-failed, --only-changed\) starts from"):
        modelfactory.train(path, store=store, base="old", cluster="inline", **ARGS)
    assert not (tmp_path / "s").exists()
    assert main(["train", path, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--base", "latest", "--scheduler", "inline", "-q"]) == 0  # the default, said aloud
    capsys.readouterr()
    assert main(["train", path, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--base", "bogus", "--scheduler", "inline", "-q"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: base='bogus' (--base) names the run"), line
    assert len(modelfactory.ModelStore(store).runs()) == 1


def test_the_target_given_as_a_feature_too_is_refused(tmp_path):
    # random_forest trained with features=["value", ...] and target="value" copied each value:
    # it "expected" a dip to the daily low at noon (and a peak at midnight), flagged neither,
    # and alerted on ordinary points within its 0.3-wide band; every group was ok.
    df = metrics_table(series=2, hours=72, apps=1).to_pandas()
    df["hour"] = df.ts.dt.hour
    path = write(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d", ["app"])
    with pytest.raises(SchemaError, match=r"The target column 'value' is also one of the features "
                                          r"\['hour', 'value'\].*Drop 'value' from features"):
        modelfactory.train(path, store=str(tmp_path / "s"), model="random_forest", features=["hour", "value"],
                           cluster="inline", **ARGS)
    assert not (tmp_path / "s").exists()
    run = modelfactory.train(path, store=str(tmp_path / "s"), model="random_forest", features=["hour"],
                             cluster="inline", **ARGS)
    assert run.summary["counts"]["ok"] == 2


def test_a_group_with_too_few_rows_is_skipped_with_the_reason(tmp_path):
    t = metrics_table(series=3, hours=72, apps=1)
    df = t.to_pandas()
    df = df[(df.site != "s001") | (df.ts < df.ts.min() + pd.Timedelta(hours=20))]
    path = write(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "d", ["app"])
    run = modelfactory.train(path, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    g = run.groups.set_index("site")
    assert g.loc["s001", "status"] == "skipped"
    assert g.loc["s001", "error"] == "seasonal needs at least 48 non-missing values (2 x season_length 24); got 20"
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 1}


# ---------------------------------------------------------------------------
# bad input: a clear error, and nothing written to the store
# ---------------------------------------------------------------------------
def _refused(tmp_path, data, exc, match, **kw):
    store = tmp_path / "refused-store"
    args = {**ARGS, **kw}
    with pytest.raises(exc, match=match):
        modelfactory.train(data, store=str(store), cluster="inline", **args)
    assert not store.exists()


def test_missing_path(tmp_path):
    _refused(tmp_path, str(tmp_path / "nope"), DatasetError, r"No file or folder at '.*nope'")


def test_folder_without_parquet(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    _refused(tmp_path, str(tmp_path / "empty"), DatasetError, r"(No Parquet files under|Cannot open the Parquet dataset at) '.*empty'")


def test_empty_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(metrics_table().slice(0, 0), tmp_path / "d" / "part-0.parquet")
    path = str(tmp_path / "d")
    _refused(tmp_path, path, DatasetError, "has 1 Parquet file.* but no rows")


def test_missing_columns_list_the_columns_that_exist(by_app, tmp_path):
    _refused(tmp_path, by_app, SchemaError, r"key column 'host' is not in .*Columns: site, day, ts, value, x1, app",
             by=["app", "host"])
    _refused(tmp_path, by_app, SchemaError, "time column 'when' is not in", time="when")
    _refused(tmp_path, by_app, SchemaError, "target column 'latency' is not in", target="latency")
    _refused(tmp_path, by_app, SchemaError, "feature column 'x9' is not in", features=["x1", "x9"],
             model="random_forest")


@pytest.mark.parametrize("model", ["seasonal", "holt_winters", "ets", "sarimax", "autoencoder"])
def test_features_for_a_model_that_never_reads_them_are_refused(by_app, tmp_path, model):
    # taken, stored with the run, and then required by score in the new data, for nothing
    _refused(tmp_path, by_app, ModelError, rf"Model '{model}' does not use feature columns \(it models 'value' over "
             r"time.*\): leave features= \(--features x1\) out", features=["x1"], model=model)
    run = modelfactory.train(by_app, store=str(tmp_path / "s"), cluster="inline", **{**ARGS, "features": ["x1"]},
                             model="autoencoder", params={"input": "features"})
    assert run.summary["counts"]["ok"] == 12


def test_non_numeric_target_and_non_timestamp_time(by_app, tmp_path):
    _refused(tmp_path, by_app, SchemaError, r"target column 'site' of '.*by_app' has type string; it must be numeric "
             r"\(int, float or decimal\)\. Write it as numbers \(pandas: pd\.to_numeric", target="site")
    _refused(tmp_path, by_app, SchemaError, "time column 'day' has type string, not a timestamp", time="day")


def test_null_keys_are_refused_with_their_count(tmp_path):
    t = metrics_table(series=4, hours=24, apps=2)
    site = pc.if_else(pc.equal(t["site"], "s002"), pa.scalar(None, pa.string()), t["site"])
    path = write(t.set_column(t.schema.get_field_index("site"), "site", site), tmp_path / "d", ["app"])
    _refused(tmp_path, path, SchemaError, r"24 null value\(s\) in 'site'.*fill them")


def test_null_partition_keys_are_refused(tmp_path):
    t = metrics_table(series=4, hours=24, apps=2)
    app = pc.if_else(pc.equal(t["site"], "s001"), pa.scalar(None, pa.string()), t["app"])
    path = write(t.set_column(0, "app", app), tmp_path / "d", ["app"])
    _refused(tmp_path, path, SchemaError, r"24 null value\(s\) in 'app'")


def test_unknown_model_suggests_the_closest(by_app, tmp_path):
    _refused(tmp_path, by_app, ModelError, "Unknown model 'seasonl'. Did you mean 'seasonal'?", model="seasonl")


def test_bad_model_parameter(by_app, tmp_path):
    _refused(tmp_path, by_app, ParameterError, "no parameter 'season_lenght'. Did you mean 'season_length'",
             params={"season_lenght": 24})
    _refused(tmp_path, by_app, ParameterError, r"'season_length' parameter of SeasonalProfile must be an int >= 1. Got 0",
             params={"season_length": 0})


def test_store_without_runs_says_so(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match="has no committed run yet"):
        modelfactory.ModelStore(str(tmp_path / "s")).groups()


def test_a_store_path_with_nothing_there_or_a_file_is_not_a_store_yet_to_train(tmp_path):
    # score with a misspelt store= said "has no committed run yet. Train first", as for a new store
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"No model store at '.*/nostore': there is nothing at that path"):
        modelfactory.ModelStore(str(tmp_path / "nostore")).groups()
    with pytest.raises(StoreError, match=r"'.*/file' is a file, not a model store"):
        modelfactory.ModelStore(str(tmp_path / "file")).groups()
    assert not (tmp_path / "nostore").exists()


def test_a_second_run_moves_latest_and_keeps_the_first(by_app, tmp_path):
    store = str(tmp_path / "s")
    a = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    b = modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": 12}, **ARGS)
    st = modelfactory.ModelStore(store)
    assert st.runs() == sorted([a.id, b.id]) and st.latest() == b.id
    assert st.manifest(a.id)["spec"]["params"]["season_length"] == 24
    assert json.loads((tmp_path / "s" / "runs" / b.id / "manifest.json").read_text())["run_id"] == b.id


def test_a_train_run_that_fits_no_model_warns_with_the_commonest_reason(by_app, tmp_path, caplog):
    """In Python as on the command line, a run whose every group was skipped says why."""
    import logging

    with caplog.at_level(logging.WARNING, logger="modelfactory"):
        run = modelfactory.train(by_app, by=["app", "site"], time="ts", target="value", store=str(tmp_path / "s"),
                                 params={"season_length": 500}, cluster="inline")
    assert run.summary["counts"]["skipped"] == 12
    (reason,) = set(run.groups["error"])
    assert "season_length" in reason
    (msg,) = [r.getMessage() for r in caplog.records if "fitted no model" in r.getMessage()]
    assert f"(0 failed, 12 skipped; most often, 12 skipped: {reason})" in msg


def test_the_summary_counts_the_commonest_problems_so_the_client_reads_no_group_table(tmp_path):
    """The commonest reason groups failed or were skipped came from the whole group table, read into
    the client (a million skipped groups: 450 MiB) to print one line.  The units count them."""
    from modelfactory.models.base import Model

    class Picky(Model):
        name = "picky"
        state_attrs = ("m_",)

        def _fit(self, y, t, X):
            from modelfactory.models.base import SkipGroup

            if len(y) % 3 == 0:
                raise SkipGroup("a multiple of three")
            if len(y) % 6 == 1:
                raise ValueError("one too many")
            self.m_ = 0.0

        def _score(self, y, t, X):
            return {"score": np.zeros(len(y)), "is_anomaly": np.zeros(len(y), dtype=bool)}

    rows = [n for n in range(4, 34)]
    t = pd.DataFrame({"g": np.repeat([f"g{n:02d}" for n in rows], rows), "value": 1.0})
    t.to_parquet(tmp_path / "d.parquet")
    run = modelfactory.train(str(tmp_path / "d.parquet"), by="g", target="value", model=Picky(),
                             store=str(tmp_path / "s"), cluster="inline", unit_rows=100)
    assert run.summary["units"] > 1
    g = run.groups[lambda d: d["status"] != "ok"]
    want = g.groupby(["status", "error"]).size().sort_values(ascending=False, kind="stable")
    got = {(p["status"], p["error"]): p["groups"] for p in run.summary["problems"]}
    assert got == want.to_dict() and list(want) == [10, 5] and run.summary["problems_complete"]
    store = run.store
    run.store = None  # no group table to read: the summary says it
    assert run.commonest_problem() == "most often, 10 skipped: a multiple of three"
    # a unit with more kinds than it reports (an error naming each group's own values) leaves the
    # summary incomplete: the commonest in the run may be in no unit's list, and the group table says it
    run.store, run.summary = store, dict(run.summary, problems_complete=False, problems=[])
    assert run.commonest_problem() == "most often, 10 skipped: a multiple of three"


def test_the_commonest_problem_of_a_run_is_found_when_units_report_only_part_of_theirs(tmp_path, monkeypatch):
    """Each unit reports its 20 commonest kinds of problem: one common in the run but rare in each
    unit (errors naming each group's value beside it) was left out, and the summary named a
    one-group reason as the commonest."""
    from modelfactory import kernel

    monkeypatch.setattr(kernel, "PROBLEM_KINDS", 2)

    def f(key):
        if key % 10 == 0:  # once in each unit of ten keys, four times in the run
            raise ValueError("the common reason")
        raise ValueError(f"a reason of keys {key // 2 * 2} and {key // 2 * 2 + 1}")  # twice in a unit

    run = modelfactory.map_keys(range(40), func=f, cluster="inline", keys_per_unit=10)
    assert run.summary["units"] == 4 and not run.summary["problems_complete"]
    assert all(p["groups"] == 2 for p in run.summary["problems"])  # what the units' lists hold
    assert run.commonest_problem().startswith("most often, 4 failed: ValueError: the common reason")


@pytest.mark.parametrize("name", ["status", "error", "seconds", "fitted_in"])
def test_a_key_column_named_as_a_column_of_the_group_table_is_refused_up_front(tmp_path, name):
    # a key `status` (an HTTP status) stopped the run in its unit with `KeyError: Field "status"
    # exists 2 times in schema`, a pending run left behind and the advice to resume it
    data = str(tmp_path / "d.parquet")
    metrics_table(series=3).to_pandas().rename(columns={"site": name}).to_parquet(data)
    store = tmp_path / "store"
    with pytest.raises(SchemaError, match=f"The key column {name!r} has the name of a column of the group table"):
        modelfactory.train(data, by=["app", name], time="ts", target="value", store=str(store), cluster="inline")
    assert not store.exists()


def test_a_skip_for_a_feature_without_values_names_the_column(tmp_path):
    """The forests' skip reason counted the feature ("the 2nd feature column (in the order of
    features=)"): the model sees an array. The run names it as the job does."""
    rng = np.random.default_rng(0)
    n = 60
    t = pd.DataFrame({"user": np.repeat(["a", "b"], n), "hour": np.tile(np.arange(n) % 24, 2).astype(float),
                      "latency": rng.gamma(4, 20, 2 * n), "bytes": rng.lognormal(8, 0.3, 2 * n)})
    t.loc[t.user == "b", "latency"] = np.nan
    t.to_parquet(tmp_path / "r.parquet")
    run = modelfactory.train(str(tmp_path / "r.parquet"), by="user", target="bytes", features=["hour", "latency"],
                             model="random_forest", store=str(tmp_path / "s"), cluster="inline")
    g = run.groups.set_index("user")
    assert g.loc["a", "status"] == "ok" and g.loc["b", "status"] == "skipped"
    assert g.loc["b", "error"] == "random_forest: the feature column 'latency' has no finite value in this group"


# --- help() documents every argument ---------------------------------------------------------------
FUNCTIONS = ("train", "score", "apply", "map_keys")


def _documented(doc: str) -> list[str]:
    """The names the numpydoc Parameters section of ``doc`` documents (``a, b, c : type`` lines too)."""
    lines = doc.split("Parameters\n----------\n", 1)[1].splitlines()
    names = []
    for line in lines:
        if re.fullmatch(r"[A-Z][a-z]+", line.strip()) or line.startswith("-"):  # the next section
            break
        if line and not line.startswith(" "):
            names += [n.strip() for n in line.split(" : ")[0].split(",")]
    return names


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_parameter_of_the_public_functions_is_documented(name):
    # help(score) had no Parameters section at all; train lacked storage_options, config and progress
    import inspect

    func = getattr(modelfactory, name)
    doc = inspect.getdoc(func)
    assert "Parameters\n----------\n" in doc, f"{name} has no Parameters section"
    documented = _documented(doc)
    params = list(inspect.signature(func).parameters)
    assert [p for p in params if p not in documented] == [], f"{name}: not documented"
    assert [p for p in documented if p not in params] == [], f"{name}: documented, but no such parameter"
    assert documented == params, f"{name}: documented in another order than the signature's"


LEVEL = 1.0  # read by the class below at fit time, as a notebook's constant would be


def test_training_a_class_sent_by_value_leaves_the_users_class_reading_its_globals(by_app, tmp_path, client):
    """A model class defined where cloudpickle sends it by value (a notebook's cell; here a
    function's body), trained on a LocalCluster, whose scheduler runs in this process and rebuilt
    each task's spec there: cloudpickle found the live class by its tracking id and set the
    pickled methods on it, whose globals are a copy. A later `LEVEL = 5` no longer reached the
    class, in local fits and later trains alike."""
    global LEVEL

    class Level(Model):
        name = "level"
        needs_time = False
        params = Model.params
        state_attrs = ("level_",)

        def _fit(self, y, t, X):
            self.level_ = LEVEL

        def _score(self, y, t, X):
            e = np.full(len(y), self.level_)
            return {"expected": e, "lower": e, "upper": e, "score": np.zeros(len(y)),
                    "is_anomaly": np.zeros(len(y), dtype=bool)}

    store = str(tmp_path / "s")
    try:
        LEVEL = 1.0
        modelfactory.train(by_app, model=Level, store=store, cluster=client, **ARGS)
        assert Level._fit.__globals__ is globals()
        LEVEL = 5.0
        assert Level().fit(np.arange(10.0)).level_ == 5.0
        modelfactory.train(by_app, model=Level, store=store, cluster=client, **ARGS)
        key = modelfactory.ModelStore(store).groups().iloc[0][["app", "site"]].to_dict()
        assert modelfactory.ModelStore(store).load(key, trust=True).level_ == 5.0
    finally:
        LEVEL = 1.0


def test_a_closed_client_or_cluster_passed_as_cluster_is_named_as_such(by_app, tmp_path):
    """A notebook's train cell run again after its `client.close(); cluster.close()` cell:
    "AttributeError: 'NoneType' object has no attribute 'run_function'" through 77 lines of Dask."""
    from distributed import Client

    from modelfactory.exceptions import ClusterError
    from modelfactory.run import local_cluster

    with local_cluster(1) as lc:
        client = Client(lc)
        client.close()
        with pytest.raises(ClusterError, match=r"^The Client passed as cluster= is closed: make a new one"):
            modelfactory.train(by_app, store=str(tmp_path / "s"), cluster=client, **ARGS)
    with pytest.raises(ClusterError, match=r"^The LocalCluster passed as cluster= is closed: make a new one"):
        modelfactory.train(by_app, store=str(tmp_path / "s"), cluster=lc, **ARGS)
    assert not (tmp_path / "s").exists()


def test_a_local_cluster_without_workers_is_not_told_to_start_dask_workers(client):
    """Workers of the job's own LocalCluster that died (and were restarting) were met with "start
    workers with `dask worker tcp://...`", advice for a scheduler nobody gave workers."""
    from modelfactory.run import no_worker_hint

    hint = no_worker_hint(client.cluster, client.scheduler.address)
    assert hint.startswith("its local workers died (out of memory, or a crash in native code)")
    assert "dask worker" not in hint


def test_the_stale_code_message_names_a_methods_module_not_its_class():
    # "its module 'mymod.M' was imported on one side before it changed", for mymod.M._score
    import modelfactory.models.seasonal  # noqa: F401 - (the user's module: imported, as its class is here)
    from modelfactory.run import _module_of

    assert _module_of("modelfactory.models.seasonal.SeasonalProfile._fit") == "modelfactory.models.seasonal"
    assert _module_of("modelfactory.demo.make_table") == "modelfactory.demo"
