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
    assert "would remove 2 run(s)" in capsys.readouterr().out and st.runs() == ids
    assert st.gc(keep=1) == ids[:2]
    assert st.runs() == ids[2:] and st.latest() == ids[2]
    assert not (tmp_path / "s" / "runs" / ids[0]).exists()


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
    assert "error: No group {'app': 'app1', 'site': 'nope'}" in capsys.readouterr().err


def test_an_index_that_does_not_line_up_with_the_parts_is_not_used():
    from modelfactory.store import leaf_index

    parts = [{"path": "a"}, {"path": "b"}, {"path": "c"}]
    good = {"keys": ["app"], "parts": [[["x"]], [["x"]], [["y"]]]}
    assert leaf_index({"parts": parts, "index": good}) is good
    # earlier versions: one entry per unit, though the unit of "x" wrote two parts
    assert leaf_index({"parts": parts, "index": {"keys": ["app"], "parts": [[["x"]], [["y"]]]}})["keys"] == []
    assert leaf_index({"parts": parts})["keys"] == []
