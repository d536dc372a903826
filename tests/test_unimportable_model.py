"""A user model whose module the loading process cannot import: one clear error that names the
class and says what to do, from ModelStore.load, `models show --trust`, and `score` before it
reads any data (each group of it, when no model could be sampled up front)."""
from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest

import modelfactory
from modelfactory import ModelStore
from modelfactory.cli import main
from modelfactory.exceptions import StoreError

_SOURCE = textwrap.dedent('''
    from typing import ClassVar

    import numpy as np

    from modelfactory.models import Model


    class Mean(Model):
        name = "mean"
        params: ClassVar = {}
        state_attrs = ("mean_",)

        def _fit(self, y, t, X):
            self.mean_ = float(np.nanmean(y))

        def _score(self, y, t, X):
            n = len(y)
            return {"expected": np.full(n, self.mean_), "lower": np.full(n, self.mean_ - 1),
                    "upper": np.full(n, self.mean_ + 1), "score": np.zeros(n), "is_anomaly": np.zeros(n, bool)}
''')


@pytest.fixture
def gone(by_app, tmp_path, monkeypatch):
    """A store trained with a model of a module that is then made unimportable: (store, run id, class path)."""
    name = f"gone_model_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    cls = importlib.import_module(name).Mean
    store = str(tmp_path / "store")
    run = modelfactory.train(by_app, by="app,site", time="ts", target="value", model=cls, store=store,
                             cluster="inline")
    assert run.summary["counts"]["ok"] == 12
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    del sys.modules[name]
    importlib.invalidate_caches()
    return store, run.id, f"{name}.Mean"


def _hint(run_id: str, cls: str) -> str:
    return (f"The models of run {run_id!r} are instances of {cls}, which this process cannot import "
            f"(ModuleNotFoundError: No module named '{cls.split('.')[0]}'): make that module importable "
            "here (install it or put it on PYTHONPATH)")


def test_load_names_the_class_and_what_to_do(gone):
    store, run_id, cls = gone
    key = ModelStore(store).groups().iloc[0][["app", "site"]].to_dict()
    with pytest.raises(StoreError) as err:
        ModelStore(store).load(key, trust=True)
    assert str(err.value).startswith(_hint(run_id, cls)), err.value


def test_models_show_key_is_one_error_line_exit_2(gone, capsys):
    store, run_id, cls = gone
    key = ModelStore(store).groups().iloc[0]
    code = main(["models", "show", "--store", store, "--key", f"app={key.app},site={key.site}", "--trust"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: " + _hint(run_id, cls)) and err.count("\n") == 1, err


def _refusal(run_id: str, cls: str) -> str:
    return (f"This process cannot load the models of run {run_id!r}: their class {cls} cannot be imported "
            f"(ModuleNotFoundError: No module named '{cls.split('.')[0]}'). Install that module (and what it "
            "imports) here, or put it on PYTHONPATH. Nothing ran.")


def test_score_refuses_before_reading_any_data(gone, by_app, tmp_path):
    """Each group failed, after the whole input had been read, where `models show` refused at once."""
    store, run_id, cls = gone
    with pytest.raises(StoreError) as err:
        modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")
    assert str(err.value) == _refusal(run_id, cls)
    assert not (tmp_path / "scores").exists()


def test_score_cli_is_one_error_line_exit_2(gone, by_app, tmp_path, capsys):
    store, run_id, cls = gone
    code = main(["score", by_app, "--store", store, "--out", str(tmp_path / "scores"), "--trust", "--cluster", "inline"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {_refusal(run_id, cls)}\n", err


def test_a_run_committed_before_its_class_was_recorded_fails_each_group_with_the_hint(gone, by_app, tmp_path):
    """A run of an earlier modelfactory names no class in its manifest: nothing to check up
    front, and each group says why it has no score."""
    import json

    from modelfactory.store import _digest_of

    store, run_id, cls = gone
    path = tmp_path / "store" / "runs" / run_id / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    assert body["spec"].pop("class") == cls.replace(".", ":")
    path.write_text(json.dumps({**body, "checksum": _digest_of(body)}))
    run = modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")
    groups = run.groups
    assert set(groups.status) == {"failed"} and len(groups) == 12
    assert all(_hint(run_id, cls) in e for e in groups.error), groups.error.iloc[0]


def test_the_manifest_names_a_class_its_models_refer_to_by_name_only(tmp_path, monkeypatch):
    """A class pickled by value (a notebook's, or registered so) travels with each model: no
    import to check."""
    import cloudpickle

    from modelfactory.api import _class_by_reference, resolve_model

    name = f"named_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    assert _class_by_reference(resolve_model(module.Mean)) == f"{name}:Mean"
    assert _class_by_reference(resolve_model("seasonal")) is None
    cloudpickle.register_pickle_by_value(module)
    try:
        assert _class_by_reference(resolve_model(module.Mean)) is None
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    namespace: dict = {}
    exec(compile(_SOURCE, "<notebook cell>", "exec"), namespace)  # noqa: S102 - a class of no importable module
    namespace["Mean"].__module__ = "__main__"
    assert _class_by_reference(resolve_model(namespace["Mean"])) is None
    monkeypatch.setattr(sys.modules["__main__"], "Mean", namespace["Mean"], raising=False)  # a notebook's own
    assert _class_by_reference(resolve_model(namespace["Mean"])) is None


def test_a_module_without_the_class_is_named_too(gone, tmp_path, monkeypatch):
    """The module is importable here but is another version, without the class."""
    store, run_id, cls = gone
    module = cls.split(".")[0]
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{module}.py").write_text("VERSION = 2\n")
    monkeypatch.syspath_prepend(str(other))
    monkeypatch.delitem(sys.modules, module, raising=False)
    key = ModelStore(store).groups().iloc[0][["app", "site"]].to_dict()
    with pytest.raises(StoreError, match=rf"^The models of run '{run_id}' are instances of {cls}, which this "
                                         r"process cannot import \(AttributeError: .*PYTHONPATH\)\.$"):
        ModelStore(store).load(key, trust=True)
