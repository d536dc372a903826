"""The run report: one self-contained HTML file about a training run (and its scores).

What it shows: the run (model, parameters, input, versions), counts by status
and by each key dimension (e.g. per app), the failed and skipped groups with
their errors (grouped by message), the slowest groups and the distribution of
fit times (a histogram), and, given a scores folder, the series with the most
anomalies, each drawn by :mod:`modelfactory.plot`.

Pictures are PNGs embedded as ``data:`` URIs and the styles are inline: the
file has no outside references, so it can be mailed, attached to a ticket or
published as a CI artifact.  Every text that comes from data (keys, errors,
paths) is HTML-escaped.

``python -m modelfactory report`` is the command-line front end (:func:`add_parser`).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import html
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .exceptions import ModelFactoryError
from .plot import ScoresFolder, format_key

__all__ = ["build_report", "write_report", "add_parser"]

_STATUS = ("ok", "failed", "skipped")
_MAX_DIMENSION_ROWS = 25
_MAX_FAILED_ROWS = 50
_SLOWEST = 10

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2430;
     margin:0;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:32px 0 8px;border-bottom:1px solid #dde1e7;
     padding-bottom:4px} h3{font-size:15px;margin:20px 0 6px}
.sub{color:#5b6472;margin:0 0 16px} .note{color:#5b6472;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e6e9ee;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.err{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;max-width:640px;
     overflow-wrap:anywhere}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.card{border:1px solid #dde1e7;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} .ok b{color:#1a7f37} .failed b{color:#cf222e} .skipped b{color:#9a6700}
.bar{display:flex;height:10px;border-radius:5px;overflow:hidden;background:#eee;max-width:600px}
.bar span.ok{background:#2da44e} .bar span.failed{background:#cf222e} .bar span.skipped{background:#d4a72c}
img{max-width:100%;height:auto;border:1px solid #eef0f3}
figure{margin:10px 0 18px} figcaption{color:#5b6472;font-size:13px}
"""


def esc(value: Any) -> str:
    """HTML-escape any value's text (None shows as an empty cell).

    >>> esc('<script>alert("x")</script>')
    '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;'
    """
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else html.escape(str(value))


def _num(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{v:,.{digits}f}"


def _secs(v: float) -> str:
    if v is None or not np.isfinite(v):
        return ""
    if v < 1e-3:
        return f"{v * 1e6:,.0f} µs"
    if v < 1:
        return f"{v * 1e3:,.1f} ms"
    return f"{v:,.2f} s"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
           code: Sequence[int] = ()) -> str:
    """An HTML table; every cell is escaped here (cells given as ``(text, title)`` get a tooltip)."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ' class="err"' if i in code else ""
            if isinstance(cell, tuple):
                text, tip = cell
                out.append(f'<td{cls} title="{esc(tip)}">{esc(text)}</td>')
            else:
                out.append(f"<td{cls}>{esc(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def _short(text: Any, n: int = 300) -> tuple[str, str] | str:
    s = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    return (s[: n - 1] + "…", s) if len(s) > n else s


def _pattern(message: Any) -> str:
    """An error message with its numbers blanked, so one cause counts once."""
    s = "" if message is None or (isinstance(message, float) and np.isnan(message)) else str(message)
    s = re.sub(r" \(at [^()]*\)$", "", s)  # the file:line describe_error appends
    # run ids ("no model for this group in run 20260119T060000123Z-1a2b3c-9f8e7d") are kept whole: blanked,
    # they named no run ("NTNZ-aNbNcN"); every group a run skips names the same one
    pieces = _RUN_ID.split(s)
    return "".join(p if i % 2 else re.sub(r"\d+(\.\d+)?", "N", p) for i, p in enumerate(pieces))[:400]


_RUN_ID = re.compile(r"(\b\d{8}T\d{9}Z-[0-9a-f]{6}(?:-[0-9a-f]{6})?\b)")  # earlier ids: no random part


# ---------------------------------------------------------------------------
# what the report is made of
# ---------------------------------------------------------------------------
@dataclass
class _Facts:
    store: str
    manifest: dict
    groups: pd.DataFrame
    by: list[str]
    scores: ScoresFolder | None = None
    scores_manifest: dict = field(default_factory=dict)
    top: int = 6


def _collect(store: Any, run: str, scores: Any, top: int, storage_options: dict | None) -> _Facts:
    from .store import ModelStore

    st = store if isinstance(store, ModelStore) else ModelStore(os.fspath(store), storage_options=storage_options)
    # LATEST first: listing every run of a large store on S3 costs a request per few runs
    if not isinstance(store, ModelStore) and st.latest_named() == "no run" and not st.runs():
        from .exceptions import StoreError

        if st.location.exists("runs"):  # a store whose one run was interrupted: its manifest() says so
            st.manifest(run)
        raise StoreError(f"No model store at {st.location.url!r} (no committed run there). Pass the store= "
                         "folder of modelfactory.train (python -m modelfactory train ... --store STORE).")
    man = st.manifest(run)
    if (man.get("lineage") or {}).get("carried_over"):  # a retrain: which run fitted each group
        cols = [*man["spec"]["by"], "status", "error", "rows", "seconds", "fitted_in"]
        groups = st.table(man["run_id"], columns=cols).to_pandas()
    else:
        groups = st.groups(man["run_id"])
    facts = _Facts(st.location.url, man, groups, list(man["spec"]["by"]), top=top)
    if scores is not None:
        url = scores._out.url if hasattr(scores, "_out") and scores._out is not None else os.fspath(scores)
        facts.scores = ScoresFolder(url, storage_options)
        facts.scores_manifest = facts.scores.manifest()
    return facts


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------
def _header(f: _Facts) -> str:
    m, sp = f.manifest, f.manifest["spec"]
    s = m.get("summary", {})
    inp = m.get("input", {})
    params = ", ".join(f"{k}={v!r}" for k, v in sorted((sp.get("params") or {}).items())) or "defaults"
    rows = [
        ("Run", m["run_id"]),
        ("Committed", m.get("committed", "")),
        ("Store", f.store),
        ("Model", f"{sp.get('model')} ({params})"),
        ("Groups by", ", ".join(f.by)),
        ("Time / target / features", f"{sp.get('time') or '-'} / {sp.get('target')} / "
                                     f"{', '.join(sp.get('features') or []) or '-'}"),
        ("Input", f"{inp.get('url', '')}: {_num(inp.get('rows'))} rows in {_num(inp.get('files'))} files"),
        ("Work", f"{_num(s.get('units'))} unit{'' if s.get('units') == 1 else 's'} ({s.get('mode', '')}), "
                 f"{_secs(s.get('wall_seconds', float('nan')))} wall, "
                 f"{_secs(s.get('unit_seconds', float('nan')))} in units"),
    ]
    if sp.get("filter"):
        rows.append(("Filter", sp["filter"]))
    lineage = m.get("lineage") or {}
    if lineage.get("retrain"):
        carried = int(_carried(f).sum())
        left_out = ""
        if lineage.get("not_in_input"):
            from .store import left_out_text

            left_out = f"; {left_out_text(lineage)}"
        rows.append(("Retrain", (f"{lineage['retrain']} groups of run {lineage.get('base_run')}: "
                                 f"{len(f.groups) - carried:,} fitted in this run, {carried:,} carried over"
                                 f"{left_out}")))
    versions = m.get("versions") or {}
    if versions:
        rows.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _status(f: _Facts) -> str:
    g = f.groups
    n = len(g)
    counts = {s: int((g["status"] == s).sum()) for s in _STATUS}
    cards = "".join(f'<div class="card {s}"><b>{counts[s]:,}</b>{s}</div>' for s in _STATUS)
    bar = "".join(f'<span class="{s}" style="width:{100 * counts[s] / max(n, 1):.3f}%"></span>'
                  for s in _STATUS if counts[s])
    rows = int(g["rows"].sum()) if "rows" in g else 0
    return (f"<h2>Status</h2><p>{n:,} groups, {rows:,} rows.</p><div class='cards'>{cards}</div>"
            f"<div class='bar' title='ok / failed / skipped'>{bar}</div>")


def _dimensions(f: _Facts) -> str:
    g = f.groups
    carried = _carried(f)
    out = ["<h2>By dimension</h2>"]
    skipped = []
    for k in f.by:
        values = g[k].astype(str)
        distinct = values.nunique()
        if distinct == len(g) and len(f.by) > 1:
            skipped.append(f"{k} ({distinct:,} values, one group each)")
            continue
        t = pd.crosstab(values, g["status"]).reindex(columns=list(_STATUS), fill_value=0)
        t["groups"] = t.sum(axis=1)
        t["rows"] = g.groupby(values, observed=True)["rows"].sum()
        # fit time in this run: a retrain's carried-over groups were fitted (and timed) in another
        t["seconds"] = g["seconds"].where(~carried, 0.0).groupby(values, observed=True).sum()
        t = t.sort_values(["failed", "skipped", "groups"], ascending=False, kind="stable")
        shown = t.head(_MAX_DIMENSION_ROWS)
        out.append(f"<h3>{esc(k)}</h3>")
        out.append(_table([k, "groups", "ok", "failed", "skipped", "rows", "fit time"],
                          [(i, _num(r.groups), _num(r.ok), _num(r.failed), _num(r.skipped), _num(r.rows),
                            _secs(r.seconds)) for i, r in shown.iterrows()], numeric=range(1, 7)))
        if len(t) > len(shown):
            out.append(f"<p class='note'>{len(t) - len(shown):,} more values of {esc(k)} "
                       "(sorted by failed, skipped, then groups).</p>")
    if skipped:
        out.append(f"<p class='note'>Not tabulated: {esc('; '.join(skipped))}.</p>")
    return "".join(out)


def _problems(f: _Facts, status: str, title: str) -> str:
    g = f.groups[f.groups["status"] == status]
    if g.empty:
        return f"<h2>{esc(title)}</h2><p>None.</p>"
    out = [f"<h2>{esc(title)} ({len(g):,})</h2>"]
    kinds = g.assign(_p=g["error"].map(_pattern)).groupby("_p", sort=False)
    summary = sorted(((len(x), p, x.iloc[0]) for p, x in kinds), key=lambda t: -t[0])
    out.append("<h3>By message</h3>")
    out.append(_table(["groups", "message (numbers shown as N)", "example group", "example message"],
                      [(_num(n), _short(p, 200), format_key({k: r[k] for k in f.by}), _short(r["error"]))
                       for n, p, r in summary[:20]], numeric=[0], code=[1, 3]))
    out.append("<h3>Groups</h3>")
    shown = g.head(_MAX_FAILED_ROWS)
    out.append(_table([*f.by, "rows", "error"],
                      [(*(r[k] for k in f.by), _num(r["rows"]), _short(r["error"])) for _, r in shown.iterrows()],
                      numeric=[len(f.by)], code=[len(f.by) + 1]))
    if len(g) > len(shown):
        out.append(f"<p class='note'>And {len(g) - len(shown):,} more; all are in "
                   "<code>ModelStore(...).groups()</code>.</p>")
    return "".join(out)


def _carried(f: _Facts) -> pd.Series:
    """Which groups a retrain carried over from an earlier run (their models and times are that
    run's), as a boolean Series; all False for a run that fitted every group itself."""
    g = f.groups
    if "fitted_in" not in g:
        return pd.Series(False, index=g.index)
    return g["fitted_in"].notna() & (g["fitted_in"] != f.manifest["run_id"])


def _timing(f: _Facts) -> str:
    g = f.groups
    carried = _carried(f)
    fitted = g[(g["status"] != "skipped") & ~carried]
    secs = fitted["seconds"].to_numpy(dtype=float)
    secs = secs[np.isfinite(secs)]
    out = ["<h2>Fit time</h2>"]
    if carried.any():
        runs = ", ".join(sorted(g.loc[carried, "fitted_in"].unique()))
        out.append(f"<p class='note'>{int(carried.sum()):,} groups carried over from run {esc(runs)} (their "
                   "models and times are that run's) are not counted here.</p>")
    if secs.size == 0:
        return "".join(out) + "<p>No group was fitted in this run.</p>"
    q = np.quantile(secs, [0.5, 0.9, 0.99])
    out.append(f"<p>{secs.size:,} groups fitted in {_secs(secs.sum())} of work: median {_secs(q[0])}, "
               f"p90 {_secs(q[1])}, p99 {_secs(q[2])}, max {_secs(secs.max())}.</p>")
    if _is_batch_model(f.manifest["spec"].get("model")):
        out.append("<p class='note'>This model fits all groups of a work unit at once; each group's time "
                   "is its unit's time shared out by rows.</p>")
    out.append(f"<figure>{_img(_histogram(secs), 'histogram of fit seconds per group')}"
               "<figcaption>Fit seconds per group.</figcaption></figure>")
    slow = fitted.sort_values("seconds", ascending=False, kind="stable").head(_SLOWEST)
    out.append("<h3>Slowest groups</h3>")
    out.append(_table([*f.by, "status", "rows", "seconds"],
                      [(*(r[k] for k in f.by), r["status"], _num(r["rows"]), _secs(r["seconds"]))
                       for _, r in slow.iterrows()], numeric=[len(f.by) + 1, len(f.by) + 2]))
    units = f.manifest.get("units") or []
    if units:
        u = np.array([x.get("seconds", np.nan) for x in units], dtype=float)
        out.append(f"<p class='note'>{len(units):,} work unit{'' if len(units) == 1 else 's'}: "
                   f"median {_secs(float(np.nanmedian(u)))}, slowest {_secs(float(np.nanmax(u)))}.</p>")
    return "".join(out)


def _is_batch_model(name: str | None) -> bool:
    from .models import registry
    from .models.base import Model

    try:
        cls = registry[name]
    except (KeyError, ModelFactoryError, TypeError):
        return False
    return cls.fit_batch.__func__ is not Model.fit_batch.__func__


def _histogram(secs: np.ndarray) -> bytes:
    import io

    from .plot import new_figure

    fig = new_figure((8.0, 2.8), 100)
    ax = fig.add_subplot()
    unit, scale = ("milliseconds", 1e3) if secs.max() < 1 else ("seconds", 1.0)
    x = secs * scale
    lo, hi = float(x.min()), float(x.max())
    if lo > 0 and hi / lo > 100:
        bins: Any = np.geomspace(lo, hi, 40)
        ax.set_xscale("log")
    elif hi > lo:
        bins = np.linspace(lo, hi, 41)
    else:  # every group took the same time (a batch model's shares): one bar, not a 1-wide range at 0
        bins = np.linspace(lo * 0.9, hi * 1.1 + 1e-9, 21)
    ax.hist(x, bins=bins, color="#4c78a8", edgecolor="white", linewidth=0.4)
    ax.set_xlabel(f"{unit} per group")
    ax.set_ylabel("groups")
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scores(f: _Facts) -> str:
    from .plot import png_bytes

    sc = f.scores
    g = sc.groups
    out = [f"<h2>Scores</h2><p>From <code>{esc(sc.url)}</code>: {len(g):,} groups, "
           f"{int(g['rows'].sum()):,} rows, {int(g['anomalies'].sum()):,} anomalies in "
           f"{int((g['anomalies'] > 0).sum()):,} groups.</p>"]
    inp = f.scores_manifest.get("input") or {}  # scores of earlier versions do not record it
    if inp.get("url"):
        where = (inp.get("filter") or {}).get("text")
        out.append(f"<p>Scored data: <code>{esc(inp['url'])}</code>"
                   + (f", the rows where <code>{esc(where)}</code>" if where else "") + ".</p>")
    model_run = (f.scores_manifest.get("summary") or {}).get("model_run")
    if model_run and model_run != f.manifest["run_id"]:
        out.append(f"<p class='note'>These scores were made with the models of run {esc(model_run)}, "
                   f"not of run {esc(f.manifest['run_id'])} shown above.</p>")
    counts = {s: int((g["status"] == s).sum()) for s in _STATUS}
    out.append(f"<p>Scored: ok {counts['ok']:,}, failed {counts['failed']:,}, skipped {counts['skipped']:,}.</p>")
    summary = f.scores_manifest.get("summary") or {}
    for said in ("models_without_rows", "key_mismatch"):  # what the job warned of, on the page too
        if isinstance(summary.get(said), dict) and summary[said].get("warning"):
            out.append(f"<p class='note'>{esc(summary[said]['warning'])}.</p>")
    bad = g[g["status"] != "ok"]
    if not bad.empty:
        kinds = bad.assign(_p=bad["error"].map(_pattern)).groupby(["status", "_p"], sort=False)
        rows = sorted(((len(x), s, p, x.iloc[0]) for (s, p), x in kinds), key=lambda t: -t[0])[:10]
        out.append(_table(["groups", "status", "reason", "example group"],
                          [(_num(n), s, _short(p, 200), format_key({k: r[k] for k in sc.by}))
                           for n, s, p, r in rows], numeric=[0], code=[2]))
    top = g[g["anomalies"] > 0].sort_values(["anomalies", "max_score"], ascending=False, kind="stable")
    if top.empty:
        out.append("<p>No anomalies.</p>")
        return "".join(out)
    head = top.head(f.top)
    out.append(f"<h3>Most anomalies (top {len(head)} of {len(top):,} series with any)</h3>")
    out.append(_table([*sc.by, "rows", "anomalies", "max score"],
                      [(*(r[k] for k in sc.by), _num(r["rows"]), _num(r["anomalies"]), _num(r["max_score"], 4))
                       for _, r in head.iterrows()], numeric=[len(sc.by), len(sc.by) + 1, len(sc.by) + 2]))
    for _, r in head.iterrows():
        key = {k: r[k] for k in sc.by}
        try:
            s = sc.series(key)
            pic = _img(png_bytes(s), f"series {format_key(key)}")
        except (ModelFactoryError, ValueError) as err:  # one series unreadable or undrawable: report goes on
            pic = f"<p class='note'>Cannot draw {esc(format_key(key))}: {esc(err)}</p>"
        out.append(f"<figure>{pic}<figcaption>{esc(format_key(key))}: {int(r['anomalies']):,} anomalies "
                   f"in {int(r['rows']):,} points.</figcaption></figure>")
    return "".join(out)


# ---------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------
def build_report(store: Any, run: str = "latest", *, scores: Any = None, top: int = 6,
                 storage_options: dict | None = None) -> str:
    """The HTML report of one training run of ``store`` (and of ``scores``, if given), as a string.

    Parameters
    ----------
    store : str or ModelStore
        The model store.
    run : str
        The run id (default: the latest).
    scores : str or Run, optional
        A scores folder (``out=`` of :func:`modelfactory.score`): adds the
        scoring summary and the ``top`` series with the most anomalies, drawn.
    top : int
        How many anomalous series to draw.

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=6, days=3)
    >>> _ = modelfactory.train(f"{d}/data", by="app,site", time="ts", target="value",
    ...                        store=f"{d}/store", cluster="inline")
    >>> html = build_report(f"{d}/store")
    >>> html.startswith("<!DOCTYPE html>") and "6 groups" in html
    True
    """
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise ModelFactoryError(f"top must be an int >= 0; got {top!r}.")
    f = _collect(store, run, scores, top, storage_options)
    from . import __version__

    n = len(f.groups)
    title = f"modelfactory run {f.manifest['run_id']}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [_header(f), _status(f), _dimensions(f), _problems(f, "failed", "Failed groups"),
                _problems(f, "skipped", "Skipped groups"), _timing(f)]
    if f.scores is not None:
        sections.append(_scores(f))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"modelfactory {esc(__version__)}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><p class='sub'>{n:,} groups, model {esc(f.manifest['spec'].get('model'))}; "
            f"report made {esc(now)}.</p>" + "\n".join(sections) + "</main></body></html>\n")


def write_report(out: str | os.PathLike, store: Any, run: str = "latest", *, scores: Any = None, top: int = 6,
                 storage_options: dict | None = None) -> str:
    """Write :func:`build_report` to the file ``out`` (atomically); return its path.

    >>> import modelfactory, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=6, days=3)
    >>> _ = modelfactory.train(f"{d}/data", by="app,site", time="ts", target="value",
    ...                        store=f"{d}/store", cluster="inline")
    >>> _ = modelfactory.score(f"{d}/data", store=f"{d}/store", out=f"{d}/scores", cluster="inline")
    >>> path = write_report(f"{d}/report.html", f"{d}/store", scores=f"{d}/scores", top=2)
    >>> os.path.getsize(path) > 10_000
    True
    >>> write_report("/no/such/folder/report.html", f"{d}/store")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    modelfactory.exceptions.ModelFactoryError: Cannot write '/no/such/folder/report.html': the folder ... not exist.
    """
    path = os.path.expanduser(os.fspath(out))  # "--out=~/r.html": no shell expands that ~
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ModelFactoryError(f"Cannot write {path!r}: the folder {parent!r} does not exist.")
    text = build_report(store, run, scores=scores, top=top, storage_options=storage_options)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as err:  # the report's own file, not the store: say so
        with contextlib.suppress(OSError):  # the part written, not left beside it
            os.remove(tmp)
        raise ModelFactoryError(f"Cannot write {path!r}: {err.strerror or err}.") from err
    return path


_EPILOG = """\
examples:
  python -m modelfactory report --store models/ --out report.html
  python -m modelfactory report --store models/ --run 20260119T060000123Z-1a2b3c-9f8e7d \\
      --scores scores/ --top 10 --out report.html
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` command to ``subparsers``; return its parser.

    >>> sub = argparse.ArgumentParser(prog="python -m modelfactory").add_subparsers()
    >>> args = add_parser(sub).parse_args(["--store", "models/"])
    >>> args.run, args.out, args.top, args.func is run_command
    ('latest', 'report.html', 6, True)
    """
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run (and its scores)",
        description="Write one self-contained HTML file about a training run: counts by status and\n"
                    "dimension, failed and slowest groups, fit times; with --scores, the series with\n"
                    "the most anomalies, drawn.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    p.add_argument("--run", default="latest", help="run id (default: latest)")
    p.add_argument("--scores", metavar="DIR", help="a scores folder (the --out of `score`) to add")
    p.add_argument("--top", type=int, default=6, help="anomalous series to draw (default: %(default)s)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default: %(default)s)")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace, storage_options: dict | None = None) -> int:
    """Run ``report`` from parsed ``args``: write the file, print one line, return 0."""
    path = write_report(args.out, args.store, args.run, scores=args.scores, top=args.top,
                        storage_options=storage_options)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:,.0f} KiB)")
    return 0
