"""The store: integrity checks, signing, pickled models and trust, hostile keys, gc, the models CLI."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest
from _data import metrics_table, write

import modelfactory
from modelfactory.cli import main
from modelfactory.exceptions import IntegrityError, StoreError
from modelfactory.models.seasonal import SeasonalProfile

ARGS = dict(by=["app", "site"], time="ts", target="value")


@pytest.fixture
def trained(by_app, tmp_path):
    store = tmp_path / "store"
    run = modelfactory.train(by_app, store=str(store), cluster="inline", **ARGS)
    return store, run


def test_a_tampered_part_is_refused_by_name(trained):
    store, run = trained
    man = modelfactory.ModelStore(str(store)).manifest()
    part = store / man["parts"][0]["path"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"Part '{man['parts'][0]['path']}' .* does not match its checksum"):
        modelfactory.ModelStore(str(store)).groups()


def test_a_tampered_manifest_is_refused(trained):
    store, run = trained
    path = store / "runs" / run.id / "manifest.json"
    body = json.loads(path.read_text())
    body["spec"]["params"]["threshold"] = 99.0
    path.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="does not match its checksum: it was changed after it was committed"):
        modelfactory.ModelStore(str(store)).load({"app": "app0", "site": "s000"})


def test_signed_stores_refuse_unsigned_and_wrongly_signed_manifests(by_app, tmp_path, monkeypatch):
    store = str(tmp_path / "s")
    modelfactory.train(by_app, store=store, cluster="inline", **ARGS)  # unsigned
    monkeypatch.setenv("MODELFACTORY_SIGNING_KEY", "k1")
    with pytest.raises(IntegrityError, match="is not signed, and MODELFACTORY_SIGNING_KEY is set"):
        modelfactory.ModelStore(store).groups()
    run = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)  # signed with k1
    assert len(modelfactory.ModelStore(store).groups(run.id)) == 12
    monkeypatch.setenv("MODELFACTORY_SIGNING_KEY", "k2")
    with pytest.raises(IntegrityError, match="signature .* does not match: it was changed, or signed with another key"):
        modelfactory.ModelStore(store).groups(run.id)


def test_a_signed_manifest_copied_into_another_runs_folder_is_refused(by_app, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("MODELFACTORY_SIGNING_KEY", "k1")
    store = str(tmp_path / "s")
    old = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    new = modelfactory.train(by_app, store=store, cluster="inline", params={"threshold": 5.0}, **ARGS)
    for name in ("manifest.json", "manifest.sig"):  # checksummed and signed, but another run's
        shutil.copy(tmp_path / "s" / "runs" / old.id / name, tmp_path / "s" / "runs" / new.id / name)
    with pytest.raises(IntegrityError, match=f"The manifest in the folder of run '{new.id}' .* is that of run "
                                             f"'{old.id}': it was copied there"):
        modelfactory.ModelStore(store).manifest()
    assert modelfactory.ModelStore(store).manifest(old.id)["run_id"] == old.id


class PickledSeasonal(SeasonalProfile):
    """A user model class (not a built-in): stored pickled."""


def test_pickled_models_need_trust(by_app, tmp_path):
    store = str(tmp_path / "s")
    modelfactory.train(by_app, store=store, model=PickledSeasonal, cluster="inline", **ARGS)
    st = modelfactory.ModelStore(store)
    assert st.manifest()["spec"]["serializer"] == "pickle"
    with pytest.raises(StoreError, match="holds pickled user models: loading one runs code from the store"):
        st.load({"app": "app0", "site": "s000"})
    assert isinstance(st.load({"app": "app0", "site": "s000"}, trust=True), PickledSeasonal)
    with pytest.raises(StoreError, match=r"Pass trust=True \(CLI: --trust\)"):
        modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline")
    run = modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline", trust=True)
    assert run.summary["counts"]["ok"] == 12


HOSTILE = ["a/b", "..", "x=1", "ünï", "../../etc", "a b%2F"]


def test_hostile_key_values_round_trip_and_stay_inside_the_store(tmp_path):
    t = metrics_table(series=len(HOSTILE), hours=48, apps=1).to_pandas()
    mapping = {f"s{i:03d}": v for i, v in enumerate(HOSTILE)}
    t["app"] = t["site"].map(mapping)
    data = write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "d", ["app"])
    store, out = tmp_path / "store", tmp_path / "scores"
    run = modelfactory.train(data, store=str(store), cluster="inline", unit_rows=48, **ARGS)
    assert sorted(run.groups["app"]) == sorted(HOSTILE)
    for v in HOSTILE:
        site = [k for k, x in mapping.items() if x == v][0]
        assert modelfactory.ModelStore(str(store)).load({"app": v, "site": site}).is_fitted
    modelfactory.score(data, store=str(store), out=str(out), cluster="inline")
    scored = pd.read_parquet(out)
    assert sorted(set(scored["app"].astype(str))) == sorted(HOSTILE)
    root = tmp_path.resolve()
    for p in tmp_path.rglob("*"):
        assert root in p.resolve().parents
    assert not (tmp_path.parent / "etc").exists()


def test_gc_keeps_the_newest_runs_and_latest(by_app, tmp_path, capsys):
    store = str(tmp_path / "s")
    ids = [modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": n}, **ARGS).id
           for n in (6, 8, 12)]
    st = modelfactory.ModelStore(store)
    assert main(["models", "gc", "--store", store, "--keep", "1", "--dry-run"]) == 0
    # one run a line (198 runs made one line of 7,000 characters)
    assert capsys.readouterr().out == f"would remove 2 run(s)\n  {ids[0]}\n  {ids[1]}\n" and st.runs() == ids
    assert st.gc(keep=1) == ids[:2]
    assert st.runs() == ids[2:] and st.latest() == ids[2]
    assert not (tmp_path / "s" / "runs" / ids[0]).exists()


def test_models_set_latest_rolls_back_to_an_earlier_run(by_app, tmp_path, capsys):
    """After a bad nightly run, on call needs the run before it back as LATEST: the docs promised
    runs to roll back, and only writing LATEST by hand did it."""
    store = str(tmp_path / "s")
    good, bad = (modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": n}, **ARGS).id
                 for n in (12, 6))
    st = modelfactory.ModelStore(store)
    key = {"app": "app0", "site": "s000"}
    assert st.latest() == bad and st.load(key).season_length == 6
    assert main(["models", "set-latest", "--store", store, "--run", good]) == 0
    assert capsys.readouterr().out == f"LATEST: {good} (was {bad})\n"
    assert st.latest() == good and st.load(key).season_length == 12 and st.gc(keep=1) == []
    assert main(["models", "set-latest", "--store", store, "--run", good]) == 0
    assert capsys.readouterr().out == f"LATEST: {good} (unchanged)\n"
    none = modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": 500}, **ARGS).id
    assert main(["models", "set-latest", "--store", store, "--run", none]) == 2
    assert capsys.readouterr().err == (f"error: Run {none} fitted no model: scoring with it would skip every group. "
                                       "Name a run that fitted models (models list).\n")
    assert main(["models", "set-latest", "--store", store, "--run", "20990101T000000000Z-000000-000000"]) == 2
    assert "error: No committed run '20990101T000000000Z-000000-000000'" in capsys.readouterr().err
    assert st.latest() == good
    assert modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id == st.latest()  # a commit moves it on


def test_gc_on_a_read_only_file_system_is_told_so_not_to_check_the_endpoint(by_app, tmp_path, capsys, monkeypatch):
    import errno

    from modelfactory._io import Location

    store = str(tmp_path / "s")
    for n in (6, 8):
        modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": n}, **ARGS)

    def read_only(self, rel="", recursive=False):
        raise OSError(errno.EROFS, "Read-only file system", self.path(rel))

    monkeypatch.setattr(Location, "rm", read_only)
    assert main(["models", "gc", "--store", store, "--keep", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot change the store '{store}': OSError: [Errno 30] Read-only file system")
    assert err.endswith("Run it where the store can be written (and has room).\n") and "endpoint" not in err


def test_models_list_and_show(by_app, tmp_path, capsys):
    store = str(tmp_path / "s")
    run = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    assert main(["models", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"* {run.id}  seasonal") and "12 groups  ok 12" in out
    assert main(["models", "show", "--store", store]) == 0
    assert "12 groups: ok 12, failed 0, skipped 0" in capsys.readouterr().out
    assert main(["models", "show", "--store", store, "--key", "app=app1,site=s004", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "SeasonalProfile" and len(shown["state"]["median_"]) == 24
    assert main(["models", "show", "--store", store, "--key", "app=app1,site=nope"]) == 2
    assert "error: No group app=app1,site=nope" in capsys.readouterr().err


def test_an_index_that_does_not_line_up_with_the_parts_is_not_used():
    from modelfactory.store import leaf_index

    parts = [{"path": "a"}, {"path": "b"}, {"path": "c"}]
    good = {"keys": ["app"], "parts": [[["x"]], [["x"]], [["y"]]]}
    assert leaf_index({"parts": parts, "index": good}) is good
    # earlier versions: one entry per unit, though the unit of "x" wrote two parts
    assert leaf_index({"parts": parts, "index": {"keys": ["app"], "parts": [[["x"]], [["y"]]]}})["keys"] == []
    assert leaf_index({"parts": parts})["keys"] == []


def test_load_takes_a_numpy_datetime64_key_of_any_unit(tmp_path):
    """A timestamp key given as numpy's datetime64 in minutes (or days) stopped load with
    ArrowNotImplementedError: Unsupported datetime64 time unit; it is the same instant in seconds."""
    import numpy as np

    t = metrics_table(series=4, hours=48, apps=2)
    t = t.append_column("start", pa.array(np.repeat(np.datetime64("2026-03-01T00:00", "s") +
                                                    np.arange(4).astype("timedelta64[h]"), 48)))
    data = write(t, tmp_path / "d", [])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["start"], time="ts", target="value", params={"season_length": 24}, store=store,
                       cluster="inline")
    st = modelfactory.ModelStore(store)
    want = st.load({"start": "2026-03-01 02:00:00"}).to_bytes()
    assert st.load({"start": np.datetime64("2026-03-01T02:00", "m")}).to_bytes() == want
    assert st.load({"start": np.datetime64("2026-03-01T02", "h")}).to_bytes() == want
    assert st.load({"start": np.datetime64("2026-03-01", "D")}).to_bytes() != want  # 00:00, another group


def test_load_refuses_a_key_without_one_value_for_each_by_column(trained):
    store, _ = trained
    st = modelfactory.ModelStore(str(store))
    need = r"The key needs a value for each of the `by` columns of run .* \(app, site\)"
    for key in ["app0", ("app0",), ("app0", "s000", "extra"), ("s000",)]:
        with pytest.raises(StoreError, match=need + r".*got \d value\(s\)"):
            st.load(key)
    with pytest.raises(StoreError, match=need + r".*missing \['site'\]"):
        st.load({"app": "app0"})
    with pytest.raises(StoreError, match=need + r".*'sight' is not a `by` column"):
        st.load({"app": "app0", "site": "s000", "sight": "s001"})
    assert st.load(("app0", "s000")).to_bytes() == st.load({"app": "app0", "site": "s000"}).to_bytes()


def test_a_short_key_is_refused_before_the_leaf_index_is_used(tmp_path):
    # partitioned by the second `by` column: the index lookup reads want[1]
    data = write(metrics_table(), tmp_path / "by_site", ["site"])
    store = str(tmp_path / "store")
    modelfactory.train(data, store=store, cluster="inline", **ARGS)
    with pytest.raises(StoreError, match="needs a value for each of the `by` columns"):
        modelfactory.ModelStore(store).load(("app0",))


def test_key_text_is_parsed_once_with_escapes_and_converted_to_the_key_type(tmp_path, capsys):
    from modelfactory.exceptions import SchemaError
    from modelfactory.plot import format_key
    from modelfactory.plot import parse_key as plot_parse_key
    from modelfactory.store import parse_key

    assert parse_key(r"app=a\,b, site=x") == {"app": "a,b", "site": "x"}
    assert parse_key(r"app=a\\,site=x=y") == {"app": "a\\", "site": "x=y"}
    key = {"app": "a,b\\", "site": "c=d"}
    assert parse_key(format_key(key)) == plot_parse_key(format_key(key)) == key
    with pytest.raises(StoreError, match="A key looks like 'app=checkout,site=eu-1'"):
        parse_key("app")
    with pytest.raises(SchemaError, match="A key looks like 'app=checkout,site=eu-1'"):
        plot_parse_key("app")

    t = metrics_table(series=3, hours=48, apps=3).to_pandas()
    t["shard"] = t["app"].str[-1].astype("int64") + 7  # 7, 8, 9
    t["hour"] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(t["shard"], unit="h")
    t["label"] = t["app"] + ",x"  # "app0,x": a comma inside a value
    data = str(tmp_path / "d.parquet")
    t.to_parquet(data)
    for by, text in [(["shard"], "shard=8"), (["hour"], "hour=2026-01-01 08:00:00+00:00"),
                     (["label", "site"], r"label=app1\,x,site=s001")]:
        store = str(tmp_path / f"store-{by[0]}")
        modelfactory.train(data, by=by, time="ts", target="value", store=store, cluster="inline")
        assert modelfactory.ModelStore(store).load(text).is_fitted
        assert main(["models", "show", "--store", store, "--key", text, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["model"] == "SeasonalProfile"
    store = str(tmp_path / "store-shard")
    assert main(["models", "show", "--store", store, "--key", "shard=x"]) == 2
    assert "The key value 'x' for 'shard' does not convert to int64" in capsys.readouterr().err
    with pytest.raises(StoreError, match="No group shard=10 "):
        modelfactory.ModelStore(store).load("shard=10")
    with pytest.raises(StoreError, match=r"The key value '2026-01-01' for 'hour' does not convert to "
                                         r"timestamp\[[nu]s, tz=UTC\].*expected a zone offset"):
        modelfactory.ModelStore(str(tmp_path / "store-hour")).load({"hour": "2026-01-01"})


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_store_path_with_glob_characters_lists_its_runs(by_app, tmp_path, where):
    store = str(tmp_path / "models[prod]") if where == "local" else f"memory://{tmp_path.name}/models[prod]*?"
    twin = str(tmp_path / "modelsp") if where == "local" else f"memory://{tmp_path.name}/modelsp*?"
    modelfactory.train(by_app, store=twin, cluster="inline", **ARGS)  # what the unescaped pattern matches
    ids = [modelfactory.train(by_app, store=store, cluster="inline", params={"season_length": n}, **ARGS).id
           for n in (6, 8)]
    st = modelfactory.ModelStore(store)
    assert st.runs() == ids and st.latest() == ids[1] and st.pending() == []
    st.location.write_bytes("runs/20200101T000000000Z-abcdef/pending.json",
                            json.dumps({"run_id": "20200101T000000000Z-abcdef"}).encode())
    assert [p["run_id"] for p in st.pending()] == ["20200101T000000000Z-abcdef"]
    assert st.location.glob("runs/*/pending.json") == ["runs/20200101T000000000Z-abcdef/pending.json"]
    assert st.gc(keep=1, pending=True) == [ids[0], "20200101T000000000Z-abcdef"]
    assert st.runs() == ids[1:] and st.pending() == []
    assert not st.location.exists(f"runs/{ids[0]}")
    assert len(modelfactory.ModelStore(twin).runs()) == 1


@pytest.mark.parametrize("where", ["local", "memory"])
def test_gc_pending_removes_orphan_run_folders_but_not_files_beside_them(by_app, tmp_path, where):
    """gc --pending took every entry of runs/ without a manifest or pending.json for an orphan
    run: a Finder's .DS_Store or a README there was reported (and removed) as a run."""
    store = str(tmp_path / "models[prod]") if where == "local" else f"memory://{tmp_path.name}/orphans[x]"
    rid = modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id
    st = modelfactory.ModelStore(store)
    for rel in ("runs/.DS_Store", "runs/README.txt", "runs/20200101T000000000Z-abcdef/parts/u0.0.parquet"):
        st.location.write_bytes(rel, b"x")
    assert st.gc(keep=1, pending=True, dry_run=True) == ["20200101T000000000Z-abcdef"]
    assert st.gc(keep=1, pending=True) == ["20200101T000000000Z-abcdef"]
    assert st.runs() == [rid] and st.location.exists("runs/.DS_Store") and st.location.exists("runs/README.txt")
    assert not st.location.exists("runs/20200101T000000000Z-abcdef")


def test_an_unreadable_pending_record_is_listed_and_removed_by_gc_not_an_internal_error(by_app, tmp_path, capsys):
    """A run's pending.json damaged outside modelfactory made `models list`, `--resume` and
    `models gc --pending` fail with an internal error: the one command that cleans up could not."""
    store = str(tmp_path / "s")
    rid = modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id
    st = modelfactory.ModelStore(store)
    bad = "20200101T000000000Z-abcdef"
    st.location.write_bytes(f"runs/{bad}/pending.json", b'{"run_id": "2020')  # cut short
    assert [p["run_id"] for p in st.pending()] == [bad] and "unreadable" in st.pending()[0]
    assert main(["models", "list", "--store", store]) == 0
    assert bad in capsys.readouterr().out
    with pytest.raises(StoreError, match=rf"Run '{bad}' cannot be resumed: its record runs/{bad}/pending.json .*"
                                         r"cannot be read .*models gc --pending"):
        modelfactory.train(by_app, store=store, cluster="inline", resume=bad, **ARGS)
    assert modelfactory.train(by_app, store=store, cluster="inline", resume=True, **ARGS).id not in (rid, bad)
    assert main(["models", "gc", "--store", store, "--pending"]) == 0
    assert st.pending() == [] and not st.location.exists(f"runs/{bad}")


def test_bytes_that_are_not_text_in_latest_or_a_manifest_are_damage_named_as_such(by_app, tmp_path, capsys):
    # one flipped byte (0xff) in LATEST or a manifest: every command said "internal error:
    # UnicodeDecodeError", `models list` hid the intact runs, and train fitted all, then crashed in
    # its commit, leaving a manifest and pending.json
    import shutil

    store = tmp_path / "s"
    first, second = (modelfactory.train(by_app, store=str(store), cluster="inline", **ARGS).id for _ in range(2))
    shutil.copytree(store, tmp_path / "s2")
    latest = bytearray((store / "LATEST").read_bytes())
    latest[3] = 0xFF
    (store / "LATEST").write_bytes(bytes(latest))
    assert main(["models", "show", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: LATEST in '{store}' does not hold a run id (") and "changed or damaged" in err
    assert main(["models", "list", "--store", str(store)]) == 2  # the runs listed, LATEST the error
    out, err = capsys.readouterr()
    assert first in out and second in out and "does not hold a run id" in err and err.count("\n") == 1
    # commands that name their run, or speak of LATEST in passing, do not stop at it
    assert main(["report", "--store", str(store), "--run", first, "--out", str(tmp_path / "r.html")]) == 0
    capsys.readouterr()
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", str(store),
                 "--scheduler", "inline", "-p", "season_length=500"]) == 2  # fits no model: said so
    out, err = capsys.readouterr()
    assert "skipped 12" in out and "fitted no model" in err and "does not hold a run id" not in err
    third = modelfactory.train(by_app, store=str(store), cluster="inline", **ARGS)  # commits, LATEST afresh
    assert modelfactory.ModelStore(str(store)).latest() == third.id
    assert modelfactory.ModelStore(str(store)).pending() == []
    man = tmp_path / "s2" / "runs" / second / "manifest.json"
    raw = bytearray(man.read_bytes())
    raw[100] = 0xFF
    man.write_bytes(bytes(raw))
    assert main(["models", "list", "--store", str(tmp_path / "s2")]) == 2
    out, err = capsys.readouterr()
    assert first in out and f"The manifest of run '{second}'" in err and "not valid JSON (UnicodeDecodeError" in err
    assert "changed or truncated" in err and "internal error" not in err


def test_models_list_says_when_latest_names_no_listed_run_and_which_interrupted_runs_cannot_resume(
        by_app, tmp_path, capsys):
    # listed with no `*` and exit 0; and "resume with train --resume R" for a run whose record is unreadable
    import shutil

    store = str(tmp_path / "s")
    first, second = (modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id for _ in range(2))
    shutil.rmtree(tmp_path / "s" / "runs" / second)
    bad = "20200101T000000000Z-abcdef"
    modelfactory.ModelStore(store).location.write_bytes(f"runs/{bad}/pending.json", b'{"run_')
    assert main(["models", "list", "--store", store]) == 2
    out, err = capsys.readouterr()
    assert f"  {first}  seasonal" in out and f"  {bad}  (interrupted: its record cannot be read" in out
    assert err == (f"error: LATEST in '{store}' names run '{second}', which is not among the committed runs "
                   "(removed, or not copied): pass a run by its id (--run), or train again, which writes LATEST "
                   "afresh.\n")


def test_a_latest_that_names_a_missing_run_is_a_store_error(by_app, tmp_path, capsys):
    import shutil

    store = str(tmp_path / "s")
    first, second = (modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id for _ in range(2))
    shutil.rmtree(tmp_path / "s" / "runs" / second)
    msg = (f"LATEST in .* names run '{second}', whose manifest .* is missing.*Committed runs: {first}. "
           "Pass one as run=")
    with pytest.raises(StoreError, match=msg):
        modelfactory.ModelStore(store).manifest()
    assert modelfactory.ModelStore(store).load({"app": "app0", "site": "s000"}, run=first).is_fitted
    assert main(["models", "show", "--store", store]) == 2
    assert f"names run '{second}'" in capsys.readouterr().err
    with pytest.raises(StoreError, match=msg):
        modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline")
    assert not (tmp_path / "o").exists()


def test_a_train_whose_filter_leaves_no_rows_commits_nothing(by_app, tmp_path):
    import pyarrow.dataset as pds

    from modelfactory.exceptions import DatasetError

    store = str(tmp_path / "s")
    good = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    late = pds.field("ts") > pd.Timestamp("2030-01-01", tz="UTC")
    with pytest.raises(DatasetError, match=r"The filter .*ts > 2030-01-01.* leaves no rows of .*by_app.*: "
                                           f"there is no group to train, so nothing was committed "
                                           rf"\(LATEST still names {good.id}\)"):
        modelfactory.train(by_app, store=store, cluster="inline", filter=late, **ARGS)
    st = modelfactory.ModelStore(store)
    assert st.runs() == [good.id] and st.latest() == good.id and st.pending() == []
    assert [p.name for p in (tmp_path / "s" / "runs").iterdir()] == [good.id]
    # scoring with such a filter scores nothing and leaves the store alone
    s = modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline", filter=late)
    assert s.summary["groups"] == 0 and len(s.to_pandas()) == 0
    assert st.runs() == [good.id] and st.latest() == good.id
    # into a store it would have made: no empty store is left behind (it had runs/ and nothing else);
    # a folder that was there stays
    with pytest.raises(DatasetError, match="leaves no rows"):
        modelfactory.train(by_app, store=str(tmp_path / "new"), cluster="inline", filter=late, **ARGS)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="leaves no rows"):
        modelfactory.train(by_app, store=str(tmp_path / "mine"), cluster="inline", filter=late, **ARGS)
    assert (tmp_path / "mine").is_dir()


# ---------------------------------------------------------------------------
# a writer that dies or fails before its rename
# ---------------------------------------------------------------------------
_WRITER = """
import sys, numpy as np, pyarrow as pa
from modelfactory._io import Location, write_parquet
loc = Location.of(sys.argv[1])
big = pa.table({"x": np.random.default_rng(0).random(1_500_000)})  # ~12 MB: a write takes a while
while True:  # the same part again and again, as a retried unit writes it; killed from outside
    write_parquet(loc, "app=a/part-u00001.parquet", big)
"""


@pytest.mark.timeout(120)
def test_a_writer_killed_before_its_rename_leaves_no_file_that_readers_of_the_folder_see(tmp_path):
    # A worker killed (OOM, kill -9) while it writes a part of a score or apply output: the
    # unit is retried and the job reports success, and readers of the folder (Run.to_arrow,
    # pandas, Spark) must see each row once; a temporary file named part-….parquet.tmp-… was
    # read by them: truncated (an error), or whole (its rows twice).
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pyarrow.dataset as ds

    from modelfactory._io import Location, write_parquet

    out = tmp_path / "out"
    write_parquet(Location.of(str(out)), "app=b/part-u00002.parquet", pa.table({"x": np.arange(10.0)}))
    survivors: list = []
    for _ in range(20):  # until a kill lands between the temporary file's creation and its rename
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not (out / "app=a").exists() or not any("tmp-" in n for n in os.listdir(out / "app=a")):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.0005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        survivors = [n for n in os.listdir(out / "app=a") if "tmp-" in n]
        if survivors:
            break
    assert survivors, "no kill landed before a rename in 20 tries"
    table = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    whole = 1_500_000 if (out / "app=a" / "part-u00001.parquet").exists() else 0
    assert table.num_rows == 10 + whole
    assert len(pd.read_parquet(out)) == 10 + whole


def test_a_write_that_fails_leaves_no_partial_file(tmp_path):
    # A full disk (here: a file size limit, which makes write() fail with EFBIG as ENOSPC
    # would) fails the write, and the partial temporary file goes with it.
    import subprocess
    import sys

    script = ("import resource, sys, numpy as np, pyarrow as pa\n"
              "from modelfactory._io import Location, write_parquet\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
              "try:\n"
              "    write_parquet(Location.of(sys.argv[1]), 'part-0.parquet',"
              " pa.table({'x': np.random.default_rng(0).random(100_000)}))\n"
              "except OSError as err:\n"
              "    print(err.errno)\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "27", done.stderr  # EFBIG: the write failed
    assert list(out.iterdir()) == []


_LIMITED_CLI = ("import resource, sys\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
                "from modelfactory.cli import main\n"
                "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.timeout(120)
def test_a_commit_that_cannot_be_written_is_one_error_line_and_the_run_resumes(tmp_path):
    # The store's disk fills up as the run commits (here a file size limit: the parts, a few KB
    # each, fit; the manifest, which lists 200 of them, does not): one `error:` line naming the
    # file and saying how to resume, status 2, the committed run untouched. It was an
    # "internal error: OSError: [Errno 27] File too large", status 1.
    import subprocess
    import sys

    data = write(metrics_table(series=200, hours=48, apps=200), tmp_path / "d", ["app", "site"])
    store = str(tmp_path / "store")
    args = ["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
            "--scheduler", "inline", "--unit-rows", "48", "-q"]
    assert main(args) == 0
    st = modelfactory.ModelStore(store)
    (before,) = st.runs()
    done = subprocess.run([sys.executable, "-c", _LIMITED_CLI, "30000", *args], capture_output=True, text=True,
                          timeout=100)
    (pending,) = st.pending()
    rid = pending["run_id"]
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert f"runs/{rid}/manifest.json" in done.stderr and f"--resume {rid}" in done.stderr
    assert st.runs() == [before] and st.latest() == before
    assert len(st.groups(before)) == 200
    assert main([*args, "--resume", rid]) == 0
    assert st.latest() == rid and st.pending() == []


def test_groups_reads_one_run_when_another_commits_meanwhile(by_app, tmp_path, monkeypatch):
    """groups() resolved "latest" twice: once for the manifest, once for the parts.  A run
    committed between the two (a nightly train while a dashboard reads) mixed two runs: the
    manifest of one, the parts of the other (here: the groups of the new run, one app only)."""
    import pyarrow.dataset as ds

    store = str(tmp_path / "s")
    kw = dict(time="ts", target="value", store=store, cluster="inline", params={"season_length": 12})
    first = modelfactory.train(by_app, by=["app", "site"], **kw)
    st = modelfactory.ModelStore(store)
    real, calls = modelfactory.ModelStore.manifest, []

    def manifest_then_commit(self, run="latest"):
        out = real(self, run)
        if not calls:  # a real run commits right after groups() read its manifest
            calls.append(None)
            calls[0] = modelfactory.train(by_app, by=["app", "site"], filter=ds.field("app") == "app0", **kw).id
        return out

    monkeypatch.setattr(modelfactory.ModelStore, "manifest", manifest_then_commit)
    groups = st.groups()
    assert calls and st.latest() == calls[0] != first.id
    assert len(modelfactory.ModelStore(store).groups()) < len(first.groups)  # the new run: app0 only
    pd.testing.assert_frame_equal(groups.drop(columns="seconds"), first.groups.drop(columns="seconds"))


def test_an_unknown_key_names_some_that_exist(by_app, tmp_path, capsys):
    """`models show --key` (and ModelStore.load) with a key the run lacks said only 'No group
    {...} in run ...', while `plot --store` for the same key lists some that exist."""
    store = str(tmp_path / "s")
    modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    assert main(["models", "show", "--store", store, "--key", "app=checkout,site=eu-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Some that exist: app=app0,site=s" in err, err
    with pytest.raises(StoreError, match=r"Some that exist: app=app\d,site=s\d+; "):
        modelfactory.ModelStore(store).load({"app": "checkout", "site": "eu-1"})


def test_an_unknown_key_never_says_no_group_exists_when_the_part_it_read_is_empty(tmp_path):
    # a run trained without key folders has a part per shuffle partition, some empty: the examples
    # came from the one part read, and said "Some that exist: none"
    from _data import metrics_table, write

    data = write(metrics_table(series=8, hours=48, apps=1), tmp_path / "flat", [])
    store = str(tmp_path / "s")
    modelfactory.train(data, store=store, cluster="inline", unit_rows=100, **ARGS)
    st = modelfactory.ModelStore(store)
    assert st.manifest()["summary"]["mode"] == "shuffle"
    assert any(p["rows"] == 0 for p in st.manifest()["parts"]), st.manifest()["parts"]  # the case at hand
    for i in range(30):
        with pytest.raises(StoreError, match=r"Some that exist: app=") as err:
            st.load({"app": "app0", "site": f"x{i}"})
        assert "none" not in str(err.value)


def test_an_unknown_key_reads_one_part_for_its_examples_not_the_whole_run(by_app, tmp_path, monkeypatch):
    import modelfactory.store

    store = str(tmp_path / "s")
    modelfactory.train(by_app, store=store, cluster="inline", unit_rows=1, **ARGS)  # a unit (a part) per app
    st = modelfactory.ModelStore(store)
    assert len(st.manifest()["parts"]) > 2
    reads, read_part = [], modelfactory.store.read_part
    monkeypatch.setattr(modelfactory.store, "read_part", lambda *a, **k: reads.append(a[1]) or read_part(*a, **k))
    for key in ({"app": "checkout", "site": "eu-1"},  # no part holds its folder: one read, for the examples
                {"app": "app0", "site": "eu-1"}):  # the part of app0's folder, read once
        reads.clear()
        with pytest.raises(StoreError, match=r"No group .* Some that exist: app=app\d,site=s\d+; "):
            st.load(key)
        assert len(reads) == 1, reads


def test_reading_an_interrupted_run_says_it_was_interrupted_and_how_to_finish_it(corrupt_values, tmp_path, capsys):
    # A run stopped by a unit failing outside any group (here a file whose values cannot be
    # decoded) leaves its pending.json: `models show --run` or `score --run` with its id (the id
    # `models list` prints) said "No committed run", as for a typo.
    folder = corrupt_values
    store = str(tmp_path / "store")
    with pytest.raises(modelfactory.ModelFactoryError, match="failed outside any group"):
        modelfactory.train(folder, store=store, cluster="inline", **ARGS)
    st = modelfactory.ModelStore(store)
    (pending,) = st.pending()
    rid = pending["run_id"]
    with pytest.raises(StoreError, match=f"Run '{rid}' .* was interrupted and never committed.*--resume {rid}"):
        st.groups(rid)
    capsys.readouterr()
    assert main(["models", "show", "--store", store, "--run", rid]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "was interrupted" in err and f"--resume {rid}" in err
    with pytest.raises(StoreError, match="No committed run 'no-such-run'"):
        st.groups("no-such-run")


def test_a_run_removed_by_gc_while_a_job_reads_it_is_named_as_removed_not_as_damaged(by_app, tmp_path):
    # A score every few minutes reads the models of the run that was LATEST when it started; the
    # nightly train commits and `models gc --keep 1` removes that run meanwhile. The job said
    # "Part ... listed in the manifest is missing ... Retrain, or restore the file from a backup",
    # as for a damaged store, which it is not.
    from modelfactory.store import read_part

    store = str(tmp_path / "store")
    first = modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    st = modelfactory.ModelStore(store)
    man = st.manifest(first.id)  # what a job that started now holds
    modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    assert st.gc(keep=1) == [first.id]
    with pytest.raises(StoreError, match=f"Run '{first.id}' was removed from .* while this job was reading"):
        read_part(st.location, man["parts"][0])
    # a part missing from a run that is still there is damage, as before
    second = st.manifest()
    st.location.rm(second["parts"][0]["path"])
    with pytest.raises(IntegrityError, match="is missing from .* restore the file from a backup"):
        read_part(st.location, second["parts"][0])


def test_models_show_lists_failed_groups_before_skipped_ones_as_keys_it_takes_back(tmp_path, capsys):
    # 22 groups too short (skipped) sort before the one that failed: `show` printed the first 20
    # not-ok groups in key order, so the failure and its error were not shown at all, nor how
    # many were left out; and a key with a comma was printed so that --key could not take it back
    t = metrics_table(series=24, hours=72, apps=1).to_pandas()
    t = t[(t.site >= "s022") | (t.ts.dt.hour < 3)]
    t["site"] = t.site.replace({"s023": "z,23"})
    t = pd.concat([t, t[t.site == "z,23"]])  # every time twice: the group fails
    data = str(tmp_path / "d.parquet")
    t.to_parquet(data)
    store = str(tmp_path / "store")
    run = modelfactory.train(data, store=store, cluster="inline", params={"season_length": 24}, **ARGS)
    assert run.summary["counts"] == {"ok": 1, "failed": 1, "skipped": 22}
    assert main(["models", "show", "--store", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith(r"  failed   app=app0,site=z\,23: 72 row(s) repeat a timestamp")
    assert sum(line.startswith("  skipped ") for line in lines) == 19
    assert "3 more groups not ok" in lines[-1]
    assert main(["models", "show", "--store", store, "--key", r"app=app0,site=z\,23"]) == 2
    assert "Group app=app0,site=z\\,23 has no model: failed" in capsys.readouterr().err
    assert main(["models", "show", "--store", store, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["not_ok"][0]["status"] == "failed" and shown["not_ok_count"] == 23


def test_models_gc_of_a_store_that_is_not_there_is_an_error(trained, capsys):
    # a misspelt --store (a cron clean-up job) printed "removed 0 run(s)" and exit 0, every time
    store, run = trained
    typo = str(store) + "e"
    assert main(["models", "gc", "--store", typo, "--keep", "1"]) == 2
    assert f"error: No model store at '{typo}': there is nothing at that path" in capsys.readouterr().err
    assert main(["models", "gc", "--store", str(store), "--keep", "1"]) == 0
    assert "removed 0 run(s)" in capsys.readouterr().out


def test_models_show_of_a_store_that_is_not_there_says_so(trained, capsys):
    # a misspelt --store said "has no committed run yet. Train first", as for a store yet to train
    store, _ = trained
    typo = str(store) + "e"
    for extra in ([], ["--key", "app=app0,site=s000"]):
        assert main(["models", "show", "--store", typo, *extra]) == 2
        assert f"error: No model store at '{typo}': there is nothing at that path" in capsys.readouterr().err
    empty = store.parent / "empty"
    empty.mkdir()
    assert main(["models", "show", "--store", str(empty)]) == 2
    assert "has no committed run yet" in capsys.readouterr().err


def test_scoring_with_a_store_that_is_not_there_says_so(trained, by_app, tmp_path, capsys):
    # a misspelt --store said "has no committed run yet. Train first": the user was sent to retrain
    store, _ = trained
    typo = str(store) + "e"
    (tmp_path / "afile").write_text("x")
    for bad, said in ((typo, f"error: No model store at '{typo}': there is nothing at that path"),
                      (str(tmp_path / "afile"), f"error: '{tmp_path / 'afile'}' is a file, not a model store")):
        assert main(["score", by_app, "--store", bad, "--out", str(tmp_path / "out"),
                     "--scheduler", "inline", "-q"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(said), line
        assert not (tmp_path / "out").exists()


def test_models_show_and_the_report_of_a_retrain_say_which_base_groups_it_has_no_model_for(tmp_path, capsys):
    # the input of an --only-changed run lacked a group of its base: only a warning at train time
    # said so; `models show` and the report of the run (now LATEST, so `score` skips that group:
    # "no model for this group") were silent
    import re
    import shutil

    from modelfactory.report import build_report

    t = metrics_table(series=4, hours=48, apps=1)
    data = write(t, tmp_path / "d", ["site"])
    store = str(tmp_path / "s")
    first = modelfactory.train(data, store=store, cluster="inline", params={"season_length": 24}, **ARGS)
    shutil.rmtree(tmp_path / "d" / "site=s003")
    modelfactory.train(data, store=store, cluster="inline", params={"season_length": 24}, retrain="changed", **ARGS)
    assert main(["models", "show", "--store", store]) == 0
    said = f"1 group of run {first.id} is not in this run (its input lacked it): score it with --run {first.id}"
    assert said in capsys.readouterr().out
    text = " ".join(re.sub("<[^>]+>", " ", build_report(store)).split())
    assert f"1 group of run {first.id} is not in this run (its input lacked it)" in text


def test_the_run_that_train_returns_is_taken_as_run(trained, tmp_path, by_app):
    # score(run=train(...)) and load(key, run=run) said "No committed run <Run ...>"
    store, run = trained
    modelfactory.train(by_app, store=str(store), cluster="inline", params={"season_length": 12}, **ARGS)
    st = modelfactory.ModelStore(str(store))
    assert st.latest() != run.id
    assert st.manifest(run)["run_id"] == run.id and len(st.groups(run)) == 12
    assert st.load({"app": "app0", "site": "s000"}, run=run).season_length == 24
    scores = modelfactory.score(by_app, store=str(store), out=str(tmp_path / "o"), run=run, cluster="inline")
    assert scores.summary["model_run"] == run.id


def test_a_score_run_passed_as_run_is_named_as_one(trained, tmp_path, by_app):
    # score(run=<the Run score returned>) said "No committed run '<its id>' in '<store>'", as for a typo
    store, run = trained
    scores = modelfactory.score(by_app, store=str(store), out=str(tmp_path / "o"), run=run, cluster="inline")
    with pytest.raises(StoreError, match=rf"run= takes a train run .*; {scores.id} is a score run: its models "
                                         rf"are run {run.id}'s, pass that"):
        modelfactory.score(by_app, store=str(store), out=str(tmp_path / "o2"), run=scores, cluster="inline")
    assert not (tmp_path / "o2").exists()


def test_two_identical_jobs_started_in_the_same_millisecond_get_runs_of_their_own(tmp_path, monkeypatch, by_app):
    """A run id was the time to the millisecond and the job's digest: two identical jobs started
    in the same millisecond had one id, one run folder and one claim on an out= folder."""
    import datetime as dt

    import modelfactory.store as store_mod

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 19, 6, 0, 0, 123456, tzinfo=dt.timezone.utc)

    monkeypatch.setattr(store_mod._dt, "datetime", Frozen)
    runs = [modelfactory.map_keys(["a", "b"], func=str.upper, cluster="inline") for _ in range(2)]
    assert runs[0].id != runs[1].id and all(r.id.startswith("20260119T060000123Z-") for r in runs)
    store = str(tmp_path / "s")
    trained = [modelfactory.train(by_app, by="app,site", time="ts", target="value", store=store, cluster="inline")
               for _ in range(2)]
    assert trained[0].id != trained[1].id
    assert modelfactory.ModelStore(store).runs() == sorted(r.id for r in trained)
    # the report keeps such an id whole in the reasons it groups
    from modelfactory.report import _pattern

    assert _pattern(f"no model for this group in run {trained[0].id} (12 rows)") == \
        f"no model for this group in run {trained[0].id} (N rows)"


def test_a_train_runs_way_to_its_own_models_names_the_run(by_app, tmp_path):
    """A train run's to_pandas() error said "one model is run.store.load(key)": the store's load
    reads LATEST, so after another train the first run's advice loaded the second run's model."""
    store = str(tmp_path / "store")
    kw = {"by": ["app", "site"], "time": "ts", "target": "value", "store": store, "cluster": "inline"}
    first = modelfactory.train(by_app, params={"season_length": 24}, **kw)
    modelfactory.train(by_app, params={"season_length": 12}, **kw)
    with pytest.raises(modelfactory.exceptions.ModelFactoryError) as err:
        first.to_pandas()
    assert f"one model is run.store.load(key, run={first.id!r})" in str(err.value)
    key = first.groups.iloc[0][["app", "site"]].to_dict()
    assert first.store.load(key, run=first.id).season_length == 24
    assert first.store.load(key).season_length == 12  # what the old advice gave


def test_models_list_says_an_interrupted_run_older_than_latest_may_be_stale(by_app, tmp_path, capsys, monkeypatch):
    """A nightly run killed, then the next night's committed: `models list` kept advising
    `train --resume OLD`, which the changed input then refused, for good."""
    store = str(tmp_path / "s")
    monkeypatch.setattr(modelfactory.api, "run_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        modelfactory.train(by_app, store=store, cluster="inline", **ARGS)
    monkeypatch.undo()
    [old] = [p["run_id"] for p in modelfactory.ModelStore(store).pending()]
    assert main(["models", "list", "--store", store]) == 0
    assert f"  {old}  (interrupted: resume with train --resume {old} and the arguments it started with)\n" in \
        capsys.readouterr().out
    new = modelfactory.train(by_app, store=store, cluster="inline", **ARGS).id
    assert main(["models", "list", "--store", store]) == 0
    assert (f"  {old}  (interrupted, before run {new} was committed: train --resume {old} resumes it only on the "
            "input and with the arguments it started with; models gc --pending removes it, once no train runs "
            "into this store)\n") in capsys.readouterr().out
