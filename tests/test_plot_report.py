"""Pictures and the HTML run report: real PNGs, clear key errors, escaped HTML, a real headless browser."""
from __future__ import annotations

import base64
import html.parser
import importlib
import io
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from _data import write

import modelfactory
from modelfactory import cli
from modelfactory.demo import make_table
from modelfactory.exceptions import DatasetError, ModelFactoryError, SchemaError, StoreError
from modelfactory.models import Model, Param
from modelfactory.plot import load_series, plot_series
from modelfactory.report import build_report, write_report

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

EVIL = "<img src=x onerror=alert(1)>&amp;"
CUT = pd.Timestamp("2026-01-09", tz="UTC")


class Fussy(Model):
    """Mean and standard deviation; refuses huge series with an error that looks like HTML."""

    name = "fussy"
    params = {"threshold": Param(3.0, float, low=0.0)}
    min_rows = 24
    state_attrs = ("mean_", "std_")

    def _fit(self, y, t, X):
        if np.nanmax(y) > 1e6:
            raise ValueError(f"<script>alert('boom')</script> values up to {np.nanmax(y):.0f} & more")
        self.mean_, self.std_ = float(np.nanmean(y)), float(np.nanstd(y)) or 1.0

    def _score(self, y, t, X):
        z = (y - self.mean_) / self.std_
        band = self.threshold * self.std_
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, self.mean_ - band),
                "upper": np.full(n, self.mean_ + band), "score": np.abs(z) / 10,
                "is_anomaly": np.abs(z) > self.threshold}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two stores on the same data: seasonal (with skipped groups) and Fussy (with failures), both scored."""
    d = tmp_path_factory.mktemp("plots")
    df = make_table(16, days=5, apps=2, spikes=0).to_pandas()
    df["app"] = df["app"].astype(str)
    df.loc[df.site == "site-00003", "site"] = EVIL
    df = df[~((df.site == "site-00005") & (df.ts >= df.ts.min() + pd.Timedelta(hours=20)))]  # 20 rows: skipped
    df.loc[df.site == "site-00006", "value"] *= 1e5  # Fussy fails on it
    hist, new = df[df.ts < CUT], df[df.ts >= CUT].copy()
    for site, k in (("site-00002", 3), (EVIL, 1)):  # incidents in the new data
        idx = new.index[new.site == site][[10, 11, 12][:k]]
        new.loc[idx, "value"] += 30 * new.loc[new.site == site, "value"].std()
    data = write(pa.Table.from_pandas(hist, preserve_index=False), d / "history", ["app"])
    fresh = write(pa.Table.from_pandas(new, preserve_index=False), d / "new", ["app"])
    out = {"dir": d, "data": data, "new": fresh}
    for name, model in (("seasonal", "seasonal"), ("fussy", Fussy)):
        store = str(d / f"store-{name}")
        out[f"train_{name}"] = modelfactory.train(data, by="app,site", time="ts", target="value", model=model,
                                                  store=store, cluster="inline")
        out[f"score_{name}"] = modelfactory.score(fresh, store=store, out=str(d / f"scores-{name}"),
                                                  cluster="inline", trust=True)
        out[f"store_{name}"], out[f"scores_{name}"] = store, str(d / f"scores-{name}")
    return out


def _is_png(data: bytes) -> tuple[int, int]:
    img = PIL.open(io.BytesIO(data))
    img.verify()
    assert img.format == "PNG"
    return img.size


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------
def test_plot_from_a_scores_folder_writes_a_png(runs, tmp_path):
    png = tmp_path / "series.png"
    ax = plot_series(runs["scores_fussy"], "app=app-00,site=site-00002", out=png)
    assert _is_png(png.read_bytes()) == (1000, 360)
    assert ax.get_title(loc="left") == "app=app-00,site=site-00002: 3 anomalies"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["expected band", "expected", "value", "anomaly (3)"]
    import matplotlib.image

    assert matplotlib.image.imread(png).shape == (360, 1000, 4)


def test_plot_from_a_forecasting_store_says_its_training_rows_are_not_scored(tmp_path):
    """holt_winters stopped scoring points at or before the end of training (as ets and sarimax):
    plot --store on its training data then drew no band at all, titled '0 anomalies'."""
    from _data import metrics_table

    table = metrics_table(series=2, hours=96, apps=1)
    data = write(table, tmp_path / "d")
    store = str(tmp_path / "s")
    first_days = pa.concat_tables([table.slice(0, 72), table.slice(96, 72)])  # each series' first 3 days
    modelfactory.train(write(first_days, tmp_path / "t"), by=["app", "site"], time="ts", target="value",
                       model="holt_winters", params={"season_length": 24}, store=store, cluster="inline")
    with pytest.raises(DatasetError, match="do not score points at or before the end of their training"):
        plot_series(store, "app=app0,site=s000", out=str(tmp_path / "p.png"))
    s = load_series(store, "app=app0,site=s000", data=data)  # newer rows too: scored from 2026-03-05
    assert np.isfinite(s.frame["expected"]).sum() == 24


def test_time_and_boolean_keys_are_read_as_models_show_reads_them(runs):
    # plot --key matched the text of str(value) only: "k=2026-01-02 00:00:00+00:00" and "k=True"
    frame = pd.read_parquet(runs["scores_seasonal"])
    two = frame["site"] == "site-00002"
    frame = frame.assign(slot=np.where(two, pd.Timestamp("2026-01-02", tz="UTC"), pd.Timestamp("2026-01-03", tz="UTC")),
                         flag=two).drop(columns=["app", "site"])
    frame["slot"] = pd.to_datetime(frame["slot"], utc=True)
    want = frame[two].sort_values("ts")["value"].to_numpy()
    for key in ("slot=2026-01-02T00:00:00Z,flag=true", "slot=2026-01-02,flag=1", "slot=2026-01-02 01:00+01:00,flag=True",
                "slot=2026-01-02 00:00:00+00:00,flag=True"):
        np.testing.assert_array_equal(load_series(frame, key).frame["value"].to_numpy(), want)
    with pytest.raises(DatasetError, match="No rows for slot=2026-01-04"):
        load_series(frame, "slot=2026-01-04,flag=true")


def test_every_kind_of_source_gives_the_same_rows(runs):
    key = {"site": "site-00002"}  # a subset of the keys that names one group
    from_folder = load_series(runs["scores_seasonal"], key)
    from_run = load_series(runs["score_seasonal"], key)
    frame = pd.read_parquet(runs["scores_seasonal"])
    from_frame = load_series(frame, "app=app-00,site=site-00002")
    assert from_folder.key == {"app": "app-00", "site": "site-00002"}
    groups = runs["score_seasonal"].groups.set_index("site")
    assert len(from_folder.frame) == 24 and from_folder.anomalies == groups.loc["site-00002", "anomalies"] >= 3
    assert from_folder.frame["is_anomaly"].iloc[10:13].all()  # the injected incident
    pd.testing.assert_frame_equal(from_folder.frame, from_run.frame)
    pd.testing.assert_frame_equal(from_folder.frame, from_frame.frame, check_dtype=False)
    # The store scores the group's training data (or new data) with its model, here.
    fitted = load_series(runs["store_seasonal"], key)
    assert len(fitted.frame) == 4 * 24 and fitted.time == "ts" and fitted.target == "value"
    rescored = load_series(runs["train_seasonal"], key, data=runs["new"])
    np.testing.assert_allclose(rescored.frame["expected"], from_folder.frame["expected"])
    assert rescored.frame["is_anomaly"].tolist() == from_folder.frame["is_anomaly"].tolist()


def test_time_window_and_other_formats(runs, tmp_path):
    s = load_series(runs["scores_seasonal"], "site=site-00002", start="2026-01-09T10:00", end="2026-01-09T13:00")
    assert len(s.frame) == 4 and s.frame["ts"].iloc[0] == pd.Timestamp("2026-01-09T10:00", tz="UTC")
    with pytest.raises(DatasetError, match="No rows of app=app-00,site=site-00002 from 2027-01-01 on: its rows run from "):
        load_series(runs["scores_seasonal"], "site=site-00002", start="2027-01-01")
    plot_series(runs["scores_seasonal"], "site=site-00002", out=tmp_path / "s.svg")
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ModelFactoryError, match=r"Cannot write .*x\.docx.*Use \.png, \.svg or \.pdf"):
        plot_series(runs["scores_seasonal"], "site=site-00002", out=tmp_path / "x.docx")


def test_a_window_with_no_rows_says_which_window_and_where_the_rows_are(runs):
    # --start alone said "No rows of ... between 2030-01-01 and None."
    with pytest.raises(DatasetError, match=r"No rows of app=app-00,site=site-00002 from 2030-01-01 on: its rows "
                                           r"run from 2026-01-09 00:00 to 2026-01-09 23:00 UTC\.$"):
        load_series(runs["scores_seasonal"], "app=app-00,site=site-00002", start="2030-01-01")
    with pytest.raises(DatasetError, match=r"site-00002 up to 2020-01-01: its rows run from 2026-"):
        load_series(runs["scores_seasonal"], "app=app-00,site=site-00002", end="2020-01-01")


def test_plot_draws_on_a_given_axes(runs):
    from modelfactory.plot import new_figure

    fig = new_figure()
    axes = fig.subplots(1, 2)
    assert plot_series(runs["scores_fussy"], "site=site-00002", ax=axes[1]) is axes[1]
    assert axes[1].get_title(loc="left").startswith("app=app-00,site=site-00002: ")


def test_unknown_key_lists_existing_keys_most_anomalous_first(runs):
    with pytest.raises(DatasetError) as err:
        load_series(runs["scores_seasonal"], "app=app-00,site=site-99999")
    msg = str(err.value)
    assert msg.startswith(f"No group app=app-00,site=site-99999 in the scores at {runs['scores_seasonal']!r} "
                          "(15 groups). Some that exist: app=app-00,site=site-00002; ")
    assert msg.count("; ") == 4  # five examples


@pytest.mark.parametrize("key, error, message", [
    ("sight=site-00002", SchemaError, "The groups of the scores at .* are keyed by app, site; 'sight' is not one"),
    ("app=app-00", SchemaError,
     r"The key app=app-00 matches 8 groups .*; \.\.\.\. Name every key column \(app, site\)"),
    ("site-00002", SchemaError, "A key looks like 'app=checkout,site=eu-1'"),
    ("site=site-00005", DatasetError, "No group site=site-00005 in the scores at "),  # skipped: never scored
])
def test_bad_keys(runs, key, error, message):
    with pytest.raises(error, match=message):
        load_series(runs["scores_seasonal"], key)


def test_missing_or_wrong_folders(runs, tmp_path):
    with pytest.raises(DatasetError, match=f"No scores folder at '{tmp_path / 'nope'}'. Pass the out= folder"):
        plot_series(tmp_path / "nope", "app=a", out=tmp_path / "x.png")
    with pytest.raises(DatasetError, match="is neither a scores folder .* nor a model store"):
        load_series(runs["data"], "app=a")
    applied = modelfactory.apply(runs["new"], by="app,site", func=lambda df: df[["app", "site", "value"]],
                                 schema="app string, site string, value double", out=str(tmp_path / "applied"),
                                 cluster="inline")
    assert applied.summary["counts"]["ok"] == 15
    with pytest.raises(DatasetError, match="holds no scored rows .*: it is not the output of modelfactory.score"):
        load_series(tmp_path / "applied", "site=site-00002")
    with pytest.raises(SchemaError, match="matches more than one series in the DataFrame"):
        load_series(pd.read_parquet(runs["scores_seasonal"]), "app=app-00")
    with pytest.raises(StoreError, match="holds pickled user models: loading one runs code .* trust=True"):
        load_series(runs["store_fussy"], "site=site-00002")
    trusted = load_series(runs["store_fussy"], "site=site-00002", trust=True)  # scored here by Fussy
    assert len(trusted.frame) == 96 and trusted.frame["expected"].nunique() == 1
    with pytest.raises(StoreError, match="has no model in run .*: skipped"):
        load_series(runs["store_seasonal"], "site=site-00005")
    assert not (tmp_path / "x.png").exists()


def test_a_store_whose_training_data_cannot_be_found(runs, tmp_path, monkeypatch):
    gone = tmp_path / "history-copy"
    shutil.copytree(runs["data"], gone)
    modelfactory.train(str(gone), by="app,site", time="ts", target="value", store=str(tmp_path / "rel"),
                       cluster="inline")
    shutil.rmtree(gone)  # the training data is no longer where the manifest says
    with pytest.raises(DatasetError, match=r"Cannot read the training data of run .* Pass the data to score "
                                           r"instead: data=\.\.\. \(CLI: --data DATA\)"):
        load_series(tmp_path / "rel", "site=site-00002")
    assert len(load_series(tmp_path / "rel", "site=site-00002", data=runs["new"]).frame) == 24


@pytest.fixture
def two_envs(tmp_path):
    """One series per site in each of two environments, at the same times: prod and a staging
    copy 50 higher; a store trained by site on prod alone (train --where "env = prod")."""
    t = make_table(2, days=4, apps=1, spikes=0).to_pandas()
    both = pd.concat([t.assign(env="prod"), t.assign(env="staging", value=t["value"] + 50)])
    data = write(pa.Table.from_pandas(both, preserve_index=False), tmp_path / "d", ["env"])
    store = str(tmp_path / "s")
    assert cli.main(["train", data, "--by", "site", "--time", "ts", "--target", "value", "--store", store,
                     "--where", "env = prod", "--scheduler", "inline", "--quiet"]) == 0
    return t, data, store


def test_a_store_draws_the_rows_its_run_was_trained_on_not_those_its_where_left_out(two_envs, tmp_path, capsys,
                                                                                      monkeypatch):
    """plot --store scored every row of the group in the training data, staging's too (which
    train --where left out): two series interleaved at the same times, drawn as one."""
    t, data, store = two_envs
    prod = t[t.site == "site-00000"].sort_values("ts")
    s = load_series(store, "site=site-00000")
    assert len(s.frame) == len(prod) == 96
    np.testing.assert_allclose(s.frame["value"], prod["value"])
    assert "the rows where (env == \"prod\"), as the run was trained" in s.notes
    capsys.readouterr()
    assert _main(["plot", "--store", store, "--key", "site=site-00000", "--out", str(tmp_path / "p.png")],
                 monkeypatch) == 0
    assert "site=site-00000, 96 points" in capsys.readouterr().out
    # --where narrows what is drawn (here the last day), within the rows the run was trained on
    assert _main(["plot", "--store", store, "--key", "site=site-00000", "--out", str(tmp_path / "p.png"),
                  "--where", "ts >= '2026-01-08'"], monkeypatch) == 0
    assert "site=site-00000, 24 points" in capsys.readouterr().out
    # other data (--data) is drawn as given, but for --where: the run's filter was about its input
    s = load_series(store, "site=site-00000", data=data, filter=pa.compute.field("env") == "staging")
    np.testing.assert_allclose(s.frame["value"], prod["value"] + 50)


def test_plot_where_on_a_scores_folder(two_envs, tmp_path, capsys, monkeypatch):
    t, data, store = two_envs
    out = str(tmp_path / "scores")
    assert cli.main(["score", data, "--store", store, "--out", out, "--where", "env = prod", "--scheduler",
                     "inline", "--quiet"]) == 0
    capsys.readouterr()
    assert _main(["plot", "--scores", out, "--key", "site=site-00001", "--out", str(tmp_path / "p.png"),
                  "--where", "ts < '2026-01-06'"], monkeypatch) == 0
    assert "site=site-00001, 24 points" in capsys.readouterr().out
    # the report says which data was scored, and with which --where
    html = build_report(store, scores=out)
    assert f"Scored data: <code>{data}</code>, the rows where <code>(env == &quot;prod&quot;)</code>." in html
    assert _main(["plot", "--scores", out, "--key", "site=site-00001", "--out", str(tmp_path / "p.png"),
                  "--where", "ts < '2020-01-02'"], monkeypatch) == 2
    assert "No scored rows of group site=site-00001 in " in capsys.readouterr().err
    assert _main(["plot", "--scores", out, "--key", "site=site-00001", "--out", str(tmp_path / "p.png"),
                  "--where", "nope = 1"], monkeypatch) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: The filter (nope == 1) does not fit the rows of the scores at ")


def test_a_filtered_run_whose_filter_cannot_be_read_back_is_not_drawn_whole(two_envs):
    """A run of an earlier version recorded its filter as text only: drawing all of its input
    would draw rows the model never saw, so plot asks for the rows to draw."""
    import json

    t, data, store = two_envs
    st = modelfactory.ModelStore(store)
    man = st.manifest()
    path = st.location.path(f"runs/{man['run_id']}/manifest.json")
    del man["input"]["filter"]
    from modelfactory.store import _digest_of

    man["checksum"] = _digest_of(man)
    with open(path, "w") as f:
        json.dump(man, f)
    with pytest.raises(DatasetError, match=r"trained on the rows of its input where \(env == \"prod\"\).*filter=\.\.\. "
                                           r"\(CLI: --where"):
        load_series(store, "site=site-00000")
    s = load_series(store, "site=site-00000", filter=pa.compute.field("env") == "prod")
    assert len(s.frame) == 96 and any("could not be read back" in n for n in s.notes)


def _main(argv, monkeypatch):
    """cli.main with plot and report wired in the way the lead wires them (if they are not yet)."""
    build = cli.build_parser

    def patched():
        parser = build()
        sub = parser._subparsers._group_actions[0]
        for name in ("plot", "report"):
            if name not in sub.choices:  # modelfactory.plot may be the function: import the module by path
                importlib.import_module(f"modelfactory.{name}").add_parser(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", patched)
    return cli.main(argv)


def test_plot_command(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.png"
    assert _main(["plot", "--scores", runs["scores_fussy"], "--key", "app=app-00,site=site-00002",
                  "--out", str(out)], monkeypatch) == 0
    assert capsys.readouterr().out == f"wrote {out}: app=app-00,site=site-00002, 24 points, 3 anomalies\n"
    assert _is_png(out.read_bytes())
    assert _main(["plot", "--store", runs["store_seasonal"], "--key", "site=site-00002", "--out",
                  str(tmp_path / "fit.png")], monkeypatch) == 0
    assert "96 points" in capsys.readouterr().out
    code = _main(["plot", "--scores", str(tmp_path / "none"), "--key", "app=a", "--out", str(out)], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: No scores folder at '{tmp_path / 'none'}'") and err.count("\n") == 1
    code = _main(["plot", "--scores", runs["scores_seasonal"], "--key", "site=nope"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: No group site=nope in the scores at ") and "Some that exist" in err


def test_without_matplotlib_the_hint_installs_the_extra_from_the_checkout(runs, tmp_path, capsys, monkeypatch):
    # The hint was pip install 'modelfactory[plot]': the 'modelfactory' on PyPI is another project
    # (the README, index.md and the quickstart say so), so following it installed that one.
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = _main(["plot", "--scores", runs["scores_fussy"], "--key", "app=app-00,site=site-00002",
                  "--out", str(tmp_path / "x.png")], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Plotting needs matplotlib") and err.count("\n") == 1, err
    assert "pip install -e '.[plot]'" in err and "modelfactory[plot]" not in err


def test_plot_and_report_write_to_a_home_relative_out(runs, tmp_path, capsys, monkeypatch):
    # `--out=~/report.html`: no shell expands a ~ after "=", and the store's ~ is expanded since
    # today; the report's and the plot's own files were "Cannot write '~/r.html': the folder
    # '<cwd>/~' does not exist"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _main(["report", "--store", runs["store_seasonal"], "--out=~/r.html"], monkeypatch) == 0
    assert _main(["plot", "--scores", runs["scores_fussy"], "--key", "app=app-00,site=site-00002",
                  "--out=~/p.png"], monkeypatch) == 0
    assert (tmp_path / "r.html").exists() and _is_png((tmp_path / "p.png").read_bytes())


def test_an_out_that_cannot_be_written_and_a_broken_drawing_backend_are_one_error_line(runs, tmp_path, capsys,
                                                                                      monkeypatch):
    # a folder named like the picture: "error: internal error: IsADirectoryError", exit 1; the
    # report said it well, but left its temporary file beside it; a matplotlib whose compiled
    # backend does not import was an internal error too
    import sys

    (tmp_path / "taken.png").mkdir()
    (tmp_path / "taken.html").mkdir()
    key = ["--key", "app=app-00,site=site-00002"]
    assert _main(["plot", "--scores", runs["scores_fussy"], *key, "--out", str(tmp_path / "taken.png")],
                 monkeypatch) == 2
    assert capsys.readouterr().err == f"error: Cannot write '{tmp_path / 'taken.png'}': Is a directory.\n"
    assert _main(["report", "--store", runs["store_seasonal"], "--out", str(tmp_path / "taken.html")], monkeypatch) == 2
    assert capsys.readouterr().err.startswith(f"error: Cannot write '{tmp_path / 'taken.html'}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.html", "taken.png"]  # no .tmp-<pid> left
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert _main(["plot", "--scores", runs["scores_fussy"], *key, "--out", str(tmp_path / "x.png")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Plotting needs matplotlib, which cannot be imported") and err.count("\n") == 1
    monkeypatch.undo()
    # a key naming a column twice (the last one was taken), and --key "" (the whole run was shown)
    assert _main(["plot", "--scores", runs["scores_fussy"], "--key", "app=app-00,app=app-01"], monkeypatch) == 2
    assert "names 'app' twice" in capsys.readouterr().err
    assert cli.main(["models", "show", "--store", runs["store_seasonal"], "--key", ""]) == 2
    assert capsys.readouterr().err.startswith("error: The key is empty")


def test_plot_and_report_have_help(capsys, monkeypatch):
    for name in ("plot", "report"):
        with pytest.raises(SystemExit) as exit_:
            _main([name, "--help"], monkeypatch)
        assert exit_.value.code == 0
        assert f"usage: python -m modelfactory {name}" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
class _Html(html.parser.HTMLParser):
    """Every tag with its attributes, and the text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def check_report_html(text: str) -> _Html:
    """The checks every report must pass: well-formed enough to parse, self-contained, images are PNGs."""
    p = _Html()
    p.feed(text)
    p.close()
    tags = [t for t, _ in p.tags]
    assert tags[:1] == ["html"] and "title" in tags and "body" in tags
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    for tag, attrs in p.tags:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith("data:image/png;base64,"), (tag, attrs[name][:80])
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
    images = [a["src"] for t, a in p.tags if t == "img"]
    for src in images:
        w, h = _is_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert w > 100 and h > 100
    return p


def test_report_html(runs, tmp_path):
    text = build_report(runs["store_fussy"], scores=runs["scores_fussy"], top=3)
    p = check_report_html(text)
    words = " ".join(p.text)
    man = modelfactory.ModelStore(runs["store_fussy"]).manifest()
    assert f"modelfactory run {man['run_id']}" in words
    assert "16 groups, 1,460 rows." in words  # 15 x 4 days x 24 h + 20
    imgs = [a["alt"] for t, a in p.tags if t == "img"]
    assert imgs == ["histogram of fit seconds per group", "series app=app-00,site=site-00002",
                    f"series app=app-01,site={EVIL}"]  # only two series have anomalies
    # Data reaches the page only as text: the evil key and the HTML-looking error are shown, escaped.
    assert EVIL in words and "<script>alert('boom')</script> values up to" in words
    assert "<img src=x" not in text and "<script>" not in text
    assert html_escape(EVIL) in text
    # Counts by status and by dimension, failures grouped by message, the skipped reason.
    assert "By dimension" in words and "app-00" in words and "app-01" in words
    assert "Failed groups (1)" in words and "Skipped groups (1)" in words
    assert "fussy needs at least 24 non-missing values; got 20" in words
    assert "Fit time" in words and "Slowest groups" in words
    assert "Most anomalies (top 2 of 2 series with any)" in words


def html_escape(s: str) -> str:
    import html

    return html.escape(s)


def test_report_without_scores_and_for_an_older_run(runs, tmp_path):
    store = runs["store_seasonal"]
    first = modelfactory.ModelStore(store).latest()
    modelfactory.train(runs["data"], by="app,site", time="ts", target="value", store=store, cluster="inline",
                       params={"season_length": 12})
    path = write_report(tmp_path / "r.html", store, first, scores=runs["scores_seasonal"])
    text = open(path, encoding="utf-8").read()
    p = check_report_html(text)
    words = " ".join(p.text)
    assert f"modelfactory run {first}" in words and "site (16 values, one group each)" in words
    assert "Skipped groups (1)" in words and "Failed groups" in words
    latest = build_report(store)
    assert modelfactory.ModelStore(store).latest() in latest
    assert "season_length=12" in latest and "Scores" not in latest
    assert "These scores were made with the models of run" in build_report(store, scores=runs["scores_seasonal"])


def test_report_command_and_errors(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report.html"
    assert _main(["report", "--store", runs["store_seasonal"], "--scores", runs["scores_seasonal"],
                  "--out", str(out)], monkeypatch) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    check_report_html(out.read_text(encoding="utf-8"))
    taken = tmp_path / "taken.html"
    taken.mkdir()
    for argv, message in [
        (["--store", str(tmp_path / "nostore")], f"error: No model store at '{tmp_path / 'nostore'}'"),
        (["--store", runs["store_seasonal"], "--run", "nope"], "error: No committed run 'nope'"),
        (["--store", runs["store_seasonal"], "--scores", str(tmp_path / "x")], "error: No scores folder at"),
        (["--store", runs["store_seasonal"], "--out", str(tmp_path / "no" / "r.html")], "error: Cannot write"),
        # the report's own file cannot be written (a folder of that name): not the store's error
        (["--store", runs["store_seasonal"], "--out", str(taken)], f"error: Cannot write '{taken}': Is a directory"),
    ]:
        assert _main(["report", *argv], monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


# ---------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_PROBE = """<script>window.addEventListener("load", () => {
  const p = document.createElement("pre"); p.id = "mf-probe";
  p.textContent = [...document.images].map(i => i.complete + ":" + i.naturalWidth + "x" + i.naturalHeight).join(" ");
  document.body.appendChild(p);
});</script>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                 "the HTML checks above still ran")
def test_report_in_headless_chromium(runs, tmp_path):
    page = tmp_path / "report.html"
    write_report(page, runs["store_fussy"], scores=runs["scores_fussy"], top=2)
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = PIL.open(shot).convert("L")
    assert img.size == (1200, 2000)
    pixels = np.asarray(img)
    dark = (pixels < 100).mean()
    assert 0.002 < dark < 0.5, f"screenshot looks blank or broken ({dark:.4f} dark pixels)"
    assert len(np.unique(pixels)) > 50
    # The images decode in the browser: a copy of the page with a probe that reports naturalWidth.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([*base, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = dom.split('<pre id="mf-probe">', 1)[1].split("</pre>", 1)[0].split()
    assert len(found) == 3, dom[-500:]
    for item in found:
        complete, size = item.split(":")
        w, h = map(int, size.split("x"))
        assert complete == "true" and w > 100 and h > 100, found
    assert os.path.getsize(page) < 2_000_000


# ---------------------------------------------------------------------------
# keys that look like mathtext or end in spaces
# ---------------------------------------------------------------------------
MATH_BAD = "price $\\notacommand$"  # matplotlib's mathtext cannot parse this
MATH_OK = "$x_1$ and $y^2$"  # parses, but must not be drawn as x with subscript 1
SPACED = " spaced "


@pytest.fixture(scope="module")
def odd_keys(tmp_path_factory):
    """A small Fussy store and its scores, keyed by sites with '$' and with leading/trailing spaces."""
    d = tmp_path_factory.mktemp("oddkeys")
    df = make_table(3, days=3, apps=1, spikes=0).to_pandas()
    df["app"] = df["app"].astype(str)
    df["site"] = df["site"].map(dict(zip(sorted(df["site"].unique()), [MATH_BAD, MATH_OK, SPACED])))
    cut = df["ts"].min() + pd.Timedelta(hours=48)
    hist, new = df[df.ts < cut], df[df.ts >= cut].copy()
    for site in (MATH_BAD, MATH_OK, SPACED):  # one incident each, so every series is drawn in the report
        idx = new.index[new.site == site][5]
        new.loc[idx, "value"] += 30 * new.loc[new.site == site, "value"].std()
    hist.to_parquet(d / "hist.parquet")
    new.to_parquet(d / "new.parquet")
    store, scores = str(d / "store"), str(d / "scores")
    modelfactory.train(str(d / "hist.parquet"), by="app,site", time="ts", target="value", model=Fussy,
                       store=store, cluster="inline")
    modelfactory.score(str(d / "new.parquet"), store=store, out=scores, cluster="inline", trust=True)
    return {"dir": d, "store": store, "scores": scores, "app": df["app"].iloc[0]}


def _data_texts(ax):
    return [ax.title, ax._left_title, ax.xaxis.label, ax.yaxis.label, *ax.get_legend().get_texts()]


def test_dollar_signs_in_keys_and_columns_are_drawn_literally(tmp_path):
    from modelfactory.plot import format_key

    rows = pd.DataFrame({"site": MATH_BAD, "t $a$": pd.date_range("2026-01-05", periods=3, freq="h", tz="UTC"),
                         "v$x_1$": [1.0, 5.0, 1.2], "expected": 1.0, "lower": 0.0, "upper": 2.0,
                         "score": [0.1, 0.99, 0.2], "is_anomaly": [False, True, False]})
    for site in (MATH_BAD, MATH_OK, "cost $5 to $6"):
        rows["site"] = site
        ax = plot_series(rows, {"site": site}, out=tmp_path / "m.png")  # was: "Use .png, .svg or .pdf"
        assert _is_png((tmp_path / "m.png").read_bytes())
        assert ax.get_title(loc="left") == f"{format_key({'site': site})}: 1 anomaly"
        assert ax.get_ylabel() == "v$x_1$" and ax.get_xlabel() == "t $a$ (UTC)"
        assert "v$x_1$" in [t.get_text() for t in ax.get_legend().get_texts()]
        for text in _data_texts(ax):  # drawn as typed, never as mathtext
            assert not text._preprocess_math(text.get_text())[1], text.get_text()


def test_report_draws_keys_with_dollar_signs(odd_keys, tmp_path):
    text = build_report(odd_keys["store"], scores=odd_keys["scores"])  # was: ValueError (ParseException)
    p = check_report_html(text)
    alts = [a["alt"] for t, a in p.tags if t == "img"]
    assert len(alts) == 4 and "Cannot draw" not in text, alts  # the histogram and all three series
    out = tmp_path / "p.png"
    from modelfactory.plot import format_key

    for site in (MATH_BAD, MATH_OK):
        key = format_key({"app": odd_keys["app"], "site": site})
        plot_series(odd_keys["scores"], key, out=out)
        assert _is_png(out.read_bytes())


def test_a_series_that_cannot_be_drawn_does_not_lose_the_report(runs, monkeypatch):
    plot_module = importlib.import_module("modelfactory.plot")  # modelfactory.plot may be the function

    def broken(series, **kw):
        raise ValueError("matplotlib could not draw <this>")

    monkeypatch.setattr(plot_module, "png_bytes", broken)
    text = build_report(runs["store_fussy"], scores=runs["scores_fussy"], top=3)
    p = check_report_html(text)
    words = " ".join(p.text)
    assert "Cannot draw app=app-00,site=site-00002: matplotlib could not draw <this>" in words
    assert "Most anomalies (top 2 of 2 series with any)" in words
    assert [a["alt"] for t, a in p.tags if t == "img"] == ["histogram of fit seconds per group"]


def test_keys_with_leading_or_trailing_spaces_round_trip():
    from modelfactory.plot import format_key
    from modelfactory.plot import parse_key as plot_parse_key
    from modelfactory.store import parse_key

    key = {"app": " spaced ", "site": "s0"}
    assert format_key(key) == r"app=\ spaced\ ,site=s0"
    for value in (" spaced ", "  two  ", "\tt\t", " ", "a\\ ", "a,b ", " a\\,b\\\\ ", "in side", "x"):
        k = {"app": value, "site": " s "}
        assert parse_key(format_key(k)) == plot_parse_key(format_key(k)) == k, (value, format_key(k))
    # unescaped spaces around names and values are still not part of them
    assert parse_key(r"app = a b , site= \ x\  ") == {"app": "a b", "site": " x "}
    assert parse_key("app=a\\\\ ,site=x") == {"app": "a\\", "site": "x"}  # an escaped backslash, then a space


def test_the_suggested_key_can_be_typed_back(odd_keys, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.png"
    code = _main(["plot", "--scores", odd_keys["scores"], "--key", "site=nope", "--out", str(out)], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    shown = err.split("Some that exist: ", 1)[1].rstrip(".\n").split("; ")
    spaced = [k for k in shown if "spaced" in k]
    assert spaced == [rf"app={odd_keys['app']},site=\ spaced\ "], shown
    assert _main(["plot", "--scores", odd_keys["scores"], "--key", spaced[0], "--out", str(out)], monkeypatch) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert _main(["plot", "--store", odd_keys["store"], "--trust", "--key", spaced[0], "--out", str(out)],
                 monkeypatch) == 0
    from modelfactory.plot import format_key

    for site in (MATH_BAD, MATH_OK):  # was: "Use .png, .svg or .pdf" for the first
        assert _main(["plot", "--scores", odd_keys["scores"], "--key", format_key({"site": site}), "--out",
                      str(out)], monkeypatch) == 0, capsys.readouterr().err


@pytest.mark.timeout(120)
def test_the_scores_of_a_killed_score_run_are_refused_by_plot_and_report(tmp_path):
    # A score process killed mid-run leaves some units' files and no _manifest.json. The report
    # showed them as a finished scoring ("Scored: ok 10,000, failed 0, skipped 0" of 20,000
    # groups), plot drew from them: half of a run, visible. Both now refuse, saying why.
    import signal
    import sys
    import time
    from pathlib import Path

    from _data import metrics_table, write

    tests = str(Path(__file__).parent)
    data = write(metrics_table(series=8, hours=72, apps=8), tmp_path / "d", ["app"])
    store, out = str(tmp_path / "store"), tmp_path / "scores"
    script = (f"import sys; sys.path.insert(0, {tests!r}); from _slow_model import SlowSeasonal; import modelfactory; "
              f"modelfactory.train({data!r}, by=['app', 'site'], time='ts', target='value', model=SlowSeasonal, "
              f"store={store!r}, cluster='inline'); "
              f"modelfactory.score({data!r}, store={store!r}, out={str(out)!r}, cluster='inline', unit_rows=72, "
              "trust=True)")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "MF_SLOW_SCORE": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (out / "_groups").exists() or not list((out / "_groups").glob("*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "_manifest.json").exists() and len(list((out / "_groups").glob("*.parquet"))) < 8
    for argv in (["report", "--store", store, "--scores", str(out), "--out", str(tmp_path / "r.html")],
                 ["plot", "--scores", str(out), "--key", "app=app0,site=s000", "--out", str(tmp_path / "p.png")]):
        done = subprocess.run([sys.executable, "-m", "modelfactory", *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [tests, os.environ.get("PYTHONPATH", "")])})
        assert done.returncode == 2, (argv[0], done.stdout, done.stderr)
        assert "has no _manifest.json: its scoring run did not finish" in done.stderr, done.stderr


def test_the_reasons_groups_were_not_scored_keep_the_run_id_they_name(runs):
    # The scoring summary groups the reasons with their numbers blanked; the run id in "no model
    # for this group in run 20260119T060000123Z-1a2b3c" came out as "run NTNZ-aNbNcN", an id that
    # names nothing to look up.
    rid = modelfactory.ModelStore(runs["store_fussy"]).latest()
    words = " ".join(check_report_html(build_report(runs["store_fussy"], scores=runs["scores_fussy"])).text)
    assert f"in run {rid}" in words
    assert "NTNZ" not in words


def test_the_report_of_a_retrain_says_which_groups_it_fitted_and_which_it_carried_over(tmp_path):
    # the report of an --only-changed run that refitted 1 group of 6 said "6 groups fitted in ...
    # of work", timing the 5 models carried over from the base run as its own, and said nothing of
    # the retrain (models show does)
    import re

    from _data import metrics_table

    t = metrics_table(series=6, apps=3)
    args = dict(by=["app", "site"], time="ts", target="value", params={"season_length": 24}, cluster="inline")
    store = str(tmp_path / "store")
    base = modelfactory.train(write(t, tmp_path / "v1", ["app"]), store=store, **args)
    df = t.to_pandas()
    df.loc[df.site == "s004", "value"] += 50
    changed = write(pa.Table.from_pandas(df, schema=t.schema, preserve_index=False), tmp_path / "v2", ["app"])
    run = modelfactory.train(changed, store=store, retrain="changed", **args)
    text = " ".join(html.unescape(re.sub("<[^>]+>", " ", build_report(store, run.id))).split())
    assert f"Retrain changed groups of run {base.id}: 1 fitted in this run, 5 carried over" in text
    assert "1 groups fitted in" in text and "5 groups carried over from run " + base.id in text
    slowest = text[text.index("Slowest groups"):]
    by_app = text[text.index("By dimension"):text.index("Fit time")]
    assert "app0 2 2 0 0 144 0 µs" in by_app and "app2 2 2 0 0 144 0 µs" in by_app  # s004 is app1's
    assert "app1 2 2 0 0 144 0 µs" not in by_app
    assert "s004" in slowest and "s000" not in slowest
    # a run that is no retrain says nothing of it
    assert "Retrain" not in " ".join(build_report(store, base.id).split())


def test_the_report_says_which_models_had_no_row_in_the_scored_data(runs, tmp_path):
    """score warned that two models' series sent no row (two pods deleted), and the report of those
    scores, the page an on-call engineer reads, said nothing of them."""
    new = pd.read_parquet(runs["new"])
    gone = new[~new.site.isin(["site-00001", "site-00002"])].astype({"app": str})
    data = write(pa.Table.from_pandas(gone, preserve_index=False), tmp_path / "gone", ["app"])
    run = modelfactory.score(data, store=runs["store_seasonal"], out=str(tmp_path / "scores"), cluster="inline")
    said = run.summary["models_without_rows"]
    assert said["models"] == 2
    html = build_report(runs["store_seasonal"], scores=str(tmp_path / "scores"))
    from modelfactory.report import esc

    assert esc(said["warning"]) in html and "site-00001" in html


def test_the_report_of_a_store_whose_one_run_was_interrupted_says_so(tmp_path, monkeypatch):
    """'No model store at ... (no committed run there)', where score and models show say the run was
    interrupted and how to finish it."""
    data = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=3)
    store = str(tmp_path / "store")
    monkeypatch.setattr(modelfactory.api, "run_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    monkeypatch.undo()
    [pending] = modelfactory.ModelStore(store).pending()
    with pytest.raises(StoreError, match=rf"has no committed run yet: its run {pending['run_id']} was interrupted\. "
                                         rf"Finish it with train --resume {pending['run_id']}"):
        build_report(store)


def test_modelfactory_plot_draws_and_is_the_module_too(runs, tmp_path):
    """modelfactory.plot was bound to plot_series, hiding the module: `import modelfactory.plot as p`
    gave the function, and modelfactory.plot.load_series an AttributeError."""
    import modelfactory.plot as p

    assert p is modelfactory.plot and p.load_series is load_series and p.plot_series is plot_series
    ax = modelfactory.plot(runs["scores_fussy"], "app=app-00,site=site-00002", out=tmp_path / "s.png")
    assert ax.get_title(loc="left") == "app=app-00,site=site-00002: 3 anomalies"
