"""A user model whose module the loading process cannot import: one clear error that names the
class and says what to do, from ModelStore.load, `models show --trust`, and `score` before it
reads any data (each group of it, for a run that recorded nothing to check)."""
from __future__ import annotations

import importlib
import re
import sys
import textwrap
import uuid

import pytest
from _data import MEAN_MODEL_SOURCE as _SOURCE

import modelfactory
from modelfactory import ModelStore
from modelfactory.cli import main
from modelfactory.exceptions import StoreError


@pytest.fixture
def gone(by_app, tmp_path, monkeypatch):
    """A store trained with a model of a module that is then made unimportable: (store, run id, class path)."""
    name, folder, store, run = _trained_with_a_module_model(by_app, tmp_path, monkeypatch, "gone_model")
    assert run.summary["counts"]["ok"] == 12
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    del sys.modules[name]
    importlib.invalidate_caches()
    return store, run.id, f"{name}.Mean"


def _trained_with_a_module_model(by_app, tmp_path, monkeypatch, prefix: str):
    """A store trained with the model ``Mean`` of a module of its own in ``tmp_path/mods``:
    (module name, its folder, the store, the run)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    cls = importlib.import_module(name).Mean
    store = str(tmp_path / "store")
    run = modelfactory.train(by_app, by="app,site", time="ts", target="value", model=cls, store=store,
                             cluster="inline")
    return name, folder, store, run


def _hint(run_id: str, cls: str) -> str:
    return (f"The models of run {run_id!r} need {cls}, which this process cannot import "
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
    return (f"This process cannot load the models of run {run_id!r}: they need {cls}, which cannot be imported "
            f"here (ModuleNotFoundError: No module named '{cls.split('.')[0]}'). Install that module (and what "
            "it imports), or put it on PYTHONPATH. Nothing ran.")


def test_score_refuses_before_reading_any_data(gone, by_app, tmp_path):
    """Each group failed, after the whole input had been read, where `models show` refused at once."""
    store, run_id, cls = gone
    with pytest.raises(StoreError) as err:
        modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")
    assert str(err.value) == _refusal(run_id, cls)
    assert not (tmp_path / "scores").exists()


def test_score_on_a_local_cluster_says_to_fix_it_here_when_this_process_cannot_import_it_either(
        gone, by_app, tmp_path, client):
    # "... restart them": the workers of the local cluster a CLI job makes start from its own
    # environment, so the fix is this process's PYTHONPATH, and there is nothing to restart
    from modelfactory.exceptions import ClusterError

    store, run_id, cls = gone
    with pytest.raises(ClusterError) as err:
        modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster=client)
    assert re.fullmatch(rf"The worker at tcp://\S+ \(and 1 more\) cannot load the models of run '{run_id}': they "
                        rf"need {cls}, which cannot be imported there \(.*\)\. Neither can this process, whose "
                        r"environment a local cluster's workers start from: make that module importable here \(run "
                        r"from the folder that holds it, put that folder on PYTHONPATH, or install it\)\. Nothing "
                        r"ran\.", str(err.value)), err.value
    assert not (tmp_path / "scores").exists()


def test_score_cli_is_one_error_line_exit_2(gone, by_app, tmp_path, capsys):
    store, run_id, cls = gone
    code = main(["score", by_app, "--store", store, "--out", str(tmp_path / "scores"), "--trust", "--cluster", "inline"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {_refusal(run_id, cls)}\n", err
    assert main(["models", "show", "--store", store]) == 0  # what the run's models need, shown
    assert f"\nits models need {cls}\n" in capsys.readouterr().out


def test_a_run_committed_before_its_class_was_recorded_fails_each_group_with_the_hint(gone, by_app, tmp_path):
    """A run of an earlier modelfactory names no class in its manifest: nothing to check up
    front, and each group says why it has no score."""
    import json

    from modelfactory.store import _digest_of

    store, run_id, cls = gone
    path = tmp_path / "store" / "runs" / run_id / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    assert body["spec"].pop("imports") == [cls.replace(".", ":")]
    path.write_text(json.dumps({**body, "checksum": _digest_of(body)}))
    run = modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")
    groups = run.groups
    assert set(groups.status) == {"failed"} and len(groups) == 12
    assert all(_hint(run_id, cls) in e for e in groups.error), groups.error.iloc[0]


_SUBCLASSES = textwrap.dedent('''
    import {module}


    def make():
        class Local({module}.Mean):  # a class made in a function: it goes by value
            pass
        return Local


    class Tuned({module}.Mean):
        pass
''')


def _users(imports: list[str]) -> list[str]:
    """The names of the user's and the libraries' modules (cloudpickle's and modelfactory's own are
    recorded too, for a by-value class: a later version of either may lack them)."""
    return [n for n in imports if not n.startswith(("cloudpickle", "modelfactory"))]


def _imports(by_app, store, model) -> list[str]:
    modelfactory.train(by_app, by="app,site", time="ts", target="value", model=model, store=store, cluster="inline")
    return _users(ModelStore(store).manifest()["spec"]["imports"])


def test_the_manifest_names_what_loading_the_models_imports_by_name(tmp_path, by_app, monkeypatch):
    """Read off the models written: the class when it goes by name; when it goes by value (a
    notebook's, one made in a function, a module registered so), what its pickle still names,
    such as a base class of the user's; a library's class the model keeps as state; a module the
    class's code uses under another name (``import statsmodels.api as sm``)."""
    import cloudpickle

    name = f"named_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_SOURCE)
    (tmp_path / f"{name}_sub.py").write_text(_SUBCLASSES.format(module=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    sub = importlib.import_module(f"{name}_sub")
    stores = iter(str(tmp_path / f"store{i}") for i in range(10))
    assert _imports(by_app, next(stores), module.Mean) == [f"{name}:Mean"]
    assert _imports(by_app, next(stores), sub.Tuned) == [f"{name}_sub:Tuned"]
    assert _imports(by_app, next(stores), sub.make()) == [f"{name}:Mean"]
    cloudpickle.register_pickle_by_value(module)
    try:
        assert _imports(by_app, next(stores), module.Mean) == ["numpy:"]  # whole with each model, but its np
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    namespace = {"base": module}
    exec(_NOTEBOOK_CELL, namespace)  # noqa: S102 - a notebook cell's classes
    for cls in ("Cell", "WithLibrary"):
        namespace[cls].__module__ = "__main__"
        monkeypatch.setattr(sys.modules["__main__"], cls, namespace[cls], raising=False)
    assert _imports(by_app, next(stores), namespace["Cell"]) == [f"{name}:Mean"]
    assert _imports(by_app, next(stores), namespace["WithLibrary"]) == [
        f"{name}:Mean", "statsmodels.api:", "sklearn.linear_model._base:LinearRegression"]
    store = next(stores)
    modelfactory.train(by_app, by="app,site", time="ts", target="value", store=store, cluster="inline")
    assert "imports" not in ModelStore(store).manifest()["spec"]  # a built-in model: nothing to import


_NOTEBOOK_CELL = """
import statsmodels.api as sm


class Cell(base.Mean):
    pass


class WithLibrary(base.Mean):
    state_attrs = ("mean_", "line_")

    def _fit(self, y, t, X):
        from sklearn.linear_model import LinearRegression

        super()._fit(y, t, X)
        self.line_ = LinearRegression()  # a library's object in the model's state
        return self

    def design(self, x):  # code that uses a module under another name
        return sm.add_constant(x)
"""


_SOME_KEEP_A_LIBRARY_OBJECT = """
class Fallback(base.Mean):
    def _fit(self, y, t, X):
        super()._fit(y, t, X)
        if self.mean_ > 108:  # the last group of each unit only
            from sklearn.linear_model import LinearRegression

            self.line_ = LinearRegression()
        return self
"""


def test_models_sampled_across_each_unit_find_what_only_some_of_them_keep(tmp_path, by_app, monkeypatch):
    name = f"fallback_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {"base": importlib.import_module(name)}
    exec(_SOME_KEEP_A_LIBRARY_OBJECT, namespace)  # noqa: S102 - a notebook cell's class
    namespace["Fallback"].__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "Fallback", namespace["Fallback"], raising=False)
    imports = _imports(by_app, str(tmp_path / "store"), namespace["Fallback"])
    assert imports == [f"{name}:Mean", "sklearn.linear_model._base:LinearRegression"], imports


def test_pickle_globals_reads_what_unpickling_imports(tmp_path):
    """Checked against an Unpickler that records every name it imports, for every protocol, with
    the pickle's frames (64 KiB) falling at every place around a model's names."""
    import io
    import pickle

    import cloudpickle
    import cloudpickle.cloudpickle as cp
    import numpy as np
    import statsmodels.api as sm
    from sklearn.linear_model import LinearRegression

    from modelfactory.store import pickle_globals

    class Recorder(pickle.Unpickler):
        def __init__(self, blob):
            super().__init__(io.BytesIO(blob))
            self.seen = []

        def find_class(self, module, name):
            self.seen.append((module, name))
            found = super().find_class(module, name)
            if found is cp.subimport:
                return lambda module: (self.seen.append((module, "")), cp.subimport(module))[1]
            return found

    def uses_sm(y):
        return sm.OLS, np.mean(y)

    uses_sm.__module__ = "__main__"  # sent by value, its modules through subimport
    fitted = LinearRegression().fit(np.arange(10.0).reshape(-1, 1), np.arange(10.0))
    for protocol in (2, 3, 4, 5):
        for obj in (np.arange(5.0), fitted, uses_sm, [uses_sm, fitted, fitted]):
            for pad in (0, *range(65_300, 65_540, 4)):
                blob = cloudpickle.dumps(("x" * pad, obj), protocol=protocol)
                recorder = Recorder(blob)
                recorder.load()
                assert set(pickle_globals(blob)) == set(recorder.seen), (protocol, type(obj), pad)
    # a model of a million objects is read only so far (the names of what comes after are checked
    # as it loads)
    blob = cloudpickle.dumps([{"k": float(i)} for i in range(100_000)] + [fitted])
    assert ("sklearn.linear_model._base", "LinearRegression") in pickle_globals(blob)
    assert pickle_globals(blob, ops=10_000) == []


def test_a_subclass_made_in_a_function_is_checked_by_its_base_class(tmp_path, by_app, monkeypatch):
    name = f"base_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_SOURCE)
    (tmp_path / f"{name}_sub.py").write_text(_SUBCLASSES.format(module=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(name)
    local = importlib.import_module(f"{name}_sub").make()
    store = str(tmp_path / "store")
    run = modelfactory.train(by_app, by="app,site", time="ts", target="value", model=local, store=store,
                             cluster="inline")
    imports = ModelStore(store).manifest()["spec"]["imports"]
    assert _users(imports) == [f"{name}:Mean"] and any(n.startswith("cloudpickle") for n in imports)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    for m in (name, f"{name}_sub"):
        del sys.modules[m]
    importlib.invalidate_caches()
    with pytest.raises(StoreError, match=f"^{re.escape(_refusal(run.id, f'{name}.Mean'))}$"):
        modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")


def test_the_run_id_does_not_depend_on_how_the_class_travels(tmp_path, by_app, monkeypatch):
    """Sending the class by value (what check_code advises) after an interrupted run must still
    find that run to resume: the recorded imports are out of the run's digest."""
    import cloudpickle

    name = f"travel_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    kw = {"by": "app,site", "time": "ts", "target": "value", "model": module.Mean, "cluster": "inline"}
    by_name = modelfactory.train(by_app, store=str(tmp_path / "a"), **kw)
    cloudpickle.register_pickle_by_value(module)
    try:
        by_value = modelfactory.train(by_app, store=str(tmp_path / "b"), **kw)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert ModelStore(str(tmp_path / "a")).manifest()["spec"]["imports"] == [f"{name}:Mean"]
    assert _users(ModelStore(str(tmp_path / "b")).manifest()["spec"]["imports"]) == ["numpy:"]  # its own np
    assert by_name.id.split("-")[1] == by_value.id.split("-")[1]  # the digest part


def test_a_retrain_that_carries_models_over_needs_the_base_runs_imports_too(tmp_path, by_app, monkeypatch):
    """The class moved to another module between the runs, and every model was carried over:
    they still need the old module, and not the new one."""
    old, new = (f"{w}_model_{uuid.uuid4().hex[:8]}" for w in ("old", "new"))
    for m in (old, new):
        (tmp_path / f"{m}.py").write_text(_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    store = str(tmp_path / "store")
    kw = {"by": "app,site", "time": "ts", "target": "value", "store": store, "cluster": "inline"}
    base = modelfactory.train(by_app, model=importlib.import_module(old).Mean, **kw)
    run = modelfactory.train(by_app, model=importlib.import_module(new).Mean, retrain="changed", **kw)
    assert run.summary["retrain"]["carried_over"] == 12 and base.id != run.id
    assert ModelStore(store).manifest()["spec"]["imports"] == [f"{old}:Mean"]
    (tmp_path / f"{new}.py").unlink()
    del sys.modules[new]
    importlib.invalidate_caches()
    scored = modelfactory.score(by_app, store=store, out=str(tmp_path / "scores-1"), trust=True, cluster="inline")
    assert scored.summary["counts"]["ok"] == 12
    (tmp_path / f"{old}.py").unlink()
    del sys.modules[old]
    importlib.invalidate_caches()
    with pytest.raises(StoreError, match=f"^{re.escape(_refusal(run.id, f'{old}.Mean'))}$"):
        modelfactory.score(by_app, store=store, out=str(tmp_path / "scores"), trust=True, cluster="inline")


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
    with pytest.raises(StoreError, match=rf"^The models of run '{run_id}' need {cls}, which this "
                                         r"process cannot import \(AttributeError: .*PYTHONPATH\)\.$"):
        ModelStore(store).load(key, trust=True)


def test_a_class_renamed_since_training_is_told_to_take_its_name_back(by_app, tmp_path, monkeypatch):
    # "Install that module (and what it imports), or put it on PYTHONPATH": the module imported
    # fine; the class had been renamed
    name, folder, store, _ = _trained_with_a_module_model(by_app, tmp_path, monkeypatch, "renamed_model")
    (folder / f"{name}.py").write_text(_SOURCE.replace("class Mean(", "class MeanV2("))
    del sys.modules[name]
    importlib.invalidate_caches()
    with pytest.raises(StoreError, match=rf"The module '{name}' imports, but holds no Mean: the class was renamed "
                                         r"or moved since the run was trained\. Give it its name there again \(or an "
                                         r"alias: Mean = TheNewName\)"):
        modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline", trust=True)


def test_a_class_this_process_has_is_not_called_renamed():
    # the workers' copy of the module is older (a worker started before the class was added):
    # "renamed or moved" sent the user to rename a class that is there; the generic fix stands
    from modelfactory.run import _renamed_fix

    assert _renamed_fix("modelfactory.models.base:Model", "AttributeError: module has no attribute 'Model'") == ""
    assert "holds no NoSuchModel: the class was renamed or moved" in _renamed_fix(
        "modelfactory.models.base:NoSuchModel", "AttributeError: module has no attribute 'NoSuchModel'")
    assert _renamed_fix("no_such_module_x:Model", "AttributeError: ...") == ""
