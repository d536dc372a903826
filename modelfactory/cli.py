"""The command line: ``python -m modelfactory COMMAND ...``.

Thin by design: each command is one call into the public API.  Library errors
become one ``error: ...`` line and exit status 2; no traceback unless ``-v``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Iterator, Sequence

from .exceptions import ModelFactoryError
from .where import parse_where as _where

__all__ = ["main", "build_parser"]

log = logging.getLogger("modelfactory")


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if v.strip() == "None":  # Python's spelling of JSON's null (not "none": debounce=none is text)
        return k.strip(), None
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _at_least_one(text: str) -> int:
    """argparse's type of a count: a whole number, 1 or more (the error then names the option,
    where the settings' check said "Setting 'workers' in the arguments must be an integer >= 1")."""
    from .config import parse_int  # (int() took "1_0" as 10 and "٣" as 3)

    try:
        n = parse_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (the digits 0-9)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is less than 1")
    return n


def _filter(args):
    """The ``--where`` conditions of a train or score command as one pyarrow filter (or None),
    their time literals typed as the data's columns."""
    if not args.where:
        return None
    from .dataset import column_types

    return _where(args.where, column_types(args.data, _storage_options(args)))


def _where_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", action="append", default=[], metavar="CONDITION",
                   help="read only the rows where CONDITION holds, e.g. \"app = checkout\", \"site is not null\", "
                        "\"site in ('007', '008')\" (repeatable: all must hold; quote number-like text)")


def _common_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", "--cluster", dest="cluster", metavar="ADDRESS",
                   help="'local' (default), 'inline', 'kube' or a Dask scheduler address (tcp://host:8786)")
    g.add_argument("--config", metavar="FILE", help="TOML settings file (default: $MODELFACTORY_CONFIG); "
                                                    "see docs/kubernetes.md")
    g.add_argument("--workers", type=_at_least_one, help="workers of the cluster the job makes: local worker processes (default: one per CPU this "
                        "process may use), or Kubernetes worker pods with --scheduler kube (docs/kubernetes.md)")
    g.add_argument("--unit-rows", type=_at_least_one, help="rows per work unit (default: automatic)")
    o = p.add_argument_group("output")
    o.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar (there is one only when stderr is a terminal)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (with the closest option for a
    misspelled one) and exit status 2, like every other error of the CLI.

    Unrecognized arguments are reported by the command that was given (``train``, ``models
    show``), with hints from that command's own options only."""

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            _Parser._unrecognized(_chosen(self, ns), extras, root=self)
        return ns

    def _unrecognized(self, extras: list[str], root: argparse.ArgumentParser) -> None:
        import difflib

        own = sorted({o for a in self._actions for o in a.option_strings})
        elsewhere = {o for parser in _parsers(root) for a in parser._actions for o in a.option_strings}
        top = {o for a in root._actions for o in a.option_strings}
        command = self.prog.removeprefix(root.prog).strip()
        hints = []
        for word in extras:
            if not word.startswith("-") or word == "-":
                continue
            name = word.split("=", 1)[0]
            if self is not root and name in top:
                hints.append(f"{name} goes before the command: {root.prog} {name} {command} ...")
            elif self is not root and name in elsewhere:
                hints.append(f"{name} is not an option of `{command}`")
            elif name in _CLUSTER_SIZES:  # ("did you mean --where?" for --threads)
                hints.append(_CLUSTER_SIZES[name])
            elif close := difflib.get_close_matches(name, own, n=1):
                hints.append(f"did you mean {close[0]}?")
        hint = "".join(f" ({h})" for h in hints)
        _Parser._fail(self, f"unrecognized arguments: {' '.join(extras)}{hint}")

    def error(self, message: str):
        import difflib
        import re

        hint = ""
        if (m := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)):
            close = difflib.get_close_matches(m[1], re.findall(r"'([^']*)'", m[2]), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        self._fail(f"{message}{hint}")

    def _fail(self, message: str):
        sys.stderr.write(f"error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


_SIZES_HINT = ("the workers of the local cluster a job makes have one thread each and Dask's memory limit (the "
               "machine's memory shared out): for others, start one with `dask scheduler` and `dask worker ADDRESS "
               "--nthreads N --memory-limit 8GiB` and pass --scheduler ADDRESS; on Kubernetes, kube.threads and "
               "kube.resources (docs/kubernetes.md)")
#: Options a user reaches for to size the workers, which the job's own local cluster does not take.
_CLUSTER_SIZES = dict.fromkeys(("--threads", "--nthreads", "--threads-per-worker", "--memory", "--memory-limit",
                                "--mem"), _SIZES_HINT)


def _chosen(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that ``ns`` was parsed by: ``models show`` for ``models show ...``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(ns, action.dest, None) or "")
            if sub is not None:
                return _chosen(sub, ns)
    return parser


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and all its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def _version() -> str:
    """``modelfactory 0.1.0 (Python 3.11.7; dask ..., pandas ..., pyarrow ..., ...)``: what a bug report needs."""
    import platform
    from importlib import metadata

    from . import __version__

    libs = []
    for name in ("dask", "distributed", "pandas", "numpy", "pyarrow", "scikit-learn", "statsmodels", "fsspec"):
        try:
            libs.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            libs.append(f"{name} not installed")
    return f"modelfactory {__version__} (Python {platform.python_version()}; {', '.join(libs)})"


class _Version(argparse.Action):
    """``--version``: one line, not wrapped to the terminal as argparse's own version action wraps it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m modelfactory", description="One model per group, for millions of groups, on Dask.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print the versions of modelfactory, Python and the libraries it runs on, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="fit one model per group and commit them to a store",
                       description="Fit one model per group of a Parquet dataset and commit them to a store.")
    t.add_argument("data", metavar="DATA", help="Parquet file or folder (local or s3://)")
    t.add_argument("--by", required=True, help="group keys, comma-separated (e.g. app,site)")
    t.add_argument("--time", help="time column (a timestamp)")
    t.add_argument("--target", required=True, help="numeric target column")
    t.add_argument("--features", default="", help="feature columns, comma-separated")
    t.add_argument("--model", default="seasonal", help="built-in model name (default: seasonal)")
    t.add_argument("--param", "-p", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="model parameter, repeatable (e.g. -p season_length=168); a JSON value, "
                        "None (or null) or text")
    t.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    r = t.add_argument_group("lifecycle")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="resume an interrupted run (its id, or the newest one of this job)")
    x = r.add_mutually_exclusive_group()
    x.add_argument("--only-failed", dest="retrain", action="store_const", const="failed",
                   help="refit only the groups that failed or were skipped in --base")
    x.add_argument("--only-changed", dest="retrain", action="store_const", const="changed",
                   help="refit only the groups whose input changed since --base")
    r.add_argument("--base", default="latest", help="the run --only-* starts from (default: latest)")
    _common_run(t)
    _where_option(t)
    t.set_defaults(func=_cmd_train)

    sc = sub.add_parser("score", help="score new data with the models of a run",
                        description="Score new rows with the stored models of one run; write scored "
                                    "rows partitioned like the input, and an anomalies summary.")
    sc.add_argument("data", metavar="DATA", help="Parquet file or folder of new rows")
    sc.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    sc.add_argument("--out", required=True, help="folder for the scored rows (must be new or empty)")
    sc.add_argument("--run", default="latest", help="run id to score with (default: latest)")
    sc.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    sc.add_argument("--trust", action="store_true", help="allow loading pickled user models")
    sc.add_argument("--keep", default=None, metavar="COL,COL",
                    help="more columns of the data to carry into the scored rows (a request id, say)")
    _common_run(sc)
    _where_option(sc)
    sc.set_defaults(func=_cmd_score)

    m = sub.add_parser("models", help="list, inspect and clean up the runs of a store",
                       description="List, inspect and clean up the runs of a model store.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ml = msub.add_parser("list", help="committed and interrupted runs", description="List the runs of a store.")
    ml.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    _config_option(ml)
    ml.set_defaults(func=_cmd_models_list)
    ms = msub.add_parser("show", help="one run: counts and failures; or one group's model",
                         description="Show one run (counts, failures with their errors) or, with --key, one model.")
    ms.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    ms.add_argument("--run", default="latest", help="run id (default: latest)")
    ms.add_argument("--key", help="one group, e.g. app=a,site=b: show its model")
    ms.add_argument("--trust", action="store_true", help="allow loading pickled user models")
    ms.add_argument("--full", action="store_true", help=f"with --key: every value of the model's state (arrays "
                    f"of more than {SHOWN_VALUES} values are summed up otherwise)")
    ms.add_argument("--json", action="store_true", help="machine-readable output")
    _config_option(ms)
    ms.set_defaults(func=_cmd_models_show)
    mu = msub.add_parser("set-latest", help="point LATEST at another run (roll back)",
                         description="Point LATEST at a committed run: roll back to an earlier run after a "
                         "bad one (or forward again). Scoring, models show and the next --only-changed or "
                         "--only-failed read LATEST; the next train that commits moves it on.")
    mu.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    mu.add_argument("--run", required=True, help="the run id LATEST is to name (models list shows them)")
    _config_option(mu)
    mu.set_defaults(func=_cmd_models_set_latest)
    mg = msub.add_parser("gc", help="remove old runs", description="Remove all but the newest runs of a store. "
                         "The run LATEST names stays whatever --keep says: scoring reads it; so does the run "
                         "an interrupted retrain started from, while that run is kept to be resumed.")
    mg.add_argument("--store", required=True, help="model store folder (or s3:// prefix)")
    mg.add_argument("--keep", type=int, default=3, help="committed runs to keep, newest first (default: "
                    "%(default)s); LATEST's run is kept besides")
    mg.add_argument("--pending", action="store_true", help="also remove interrupted runs; a run still training looks interrupted too: use it only when no job is training into this store")
    mg.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    _config_option(mg)
    mg.set_defaults(func=_cmd_models_gc)

    d = sub.add_parser("demo", help="write a synthetic metrics dataset and train on it",
                       description="Write a deterministic synthetic metrics dataset (hourly, "
                                   "Hive-partitioned by app) and train a seasonal model per series.")
    d.add_argument("--out", default="modelfactory-demo", help="folder for data/ and store/ (default: %(default)s)")
    d.add_argument("--series", type=int, default=10_000, help="number of series (default: %(default)s)")
    # default: demo.DAYS, not imported here (it imports pyarrow, and the CLI starts without it)
    d.add_argument("--days", type=int, default=28, help="days of hourly points (default: %(default)s; with 28 "
                   "or more, seasonal learns the data's weekly cycle)")
    d.add_argument("--model", default="seasonal", help="built-in model name, one without feature columns (the "
                   "demo data has none): seasonal (default), ets, holt_winters, ...")
    _common_run(d)
    d.set_defaults(func=_cmd_demo)

    cs = sub.add_parser("cluster-spec", help="print the DaskCluster manifest a cluster='kube' job would create",
                        description="Print the DaskCluster (and, when adaptive, DaskAutoscaler) manifest that "
                                    "a cluster='kube' job would create, for review or `kubectl apply -f -`.")
    cs.add_argument("--config", metavar="FILE", help="TOML settings file (default: $MODELFACTORY_CONFIG)")
    cs.add_argument("--workers", type=_at_least_one, help="worker pods of a fixed-size cluster")
    cs.add_argument("--format", choices=("yaml", "json"), help="default: yaml (json without PyYAML)")
    cs.set_defaults(func=_cmd_cluster_spec)

    try:
        from .ingest import _cli as ingest_cli
    except ImportError:  # pragma: no cover - the ingest package is optional at import time
        ingest_cli = None
    if ingest_cli is not None:
        ingest_cli.add_parser(sub)
    from .plot import add_parser as add_plot_parser
    from .report import add_parser as add_report_parser

    pp = add_plot_parser(sub)
    _config_option(pp)
    pp.set_defaults(func=_cmd_plot)
    rp = add_report_parser(sub)
    _config_option(rp)
    rp.set_defaults(func=_cmd_report)
    return p


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: $MODELFACTORY_CONFIG): "
                                                    "its [storage_options] reach an s3:// store")


def _progress(args) -> bool:
    """Whether a job shows its progress bar (and the Dask dashboard's address): on a terminal, and
    not with --quiet or --json.  Into a file or a pipe (cron, CI) the bar's redraws were a line of
    carriage returns per job, and the dashboard of a cluster gone by the time anyone reads the log
    is no use."""
    return not (args.quiet or args.json) and sys.stderr.isatty()


def _storage_options(args) -> dict | None:
    """The ``storage_options`` setting, read as ``train`` and ``score`` read it (``--config`` or
    ``$MODELFACTORY_CONFIG``, then the environment)."""
    from .config import job_settings

    return job_settings(config=args.config).storage_options or None


def _store_errors(url: str, what: str = "the store") -> contextlib.AbstractContextManager[None]:
    """An error of the storage under ``url`` (fsspec's, botocore's, an OSError) as a StoreError
    that names it: one ``error:`` line and exit status 2, not an internal error."""
    import errno

    from ._io import error_text, storage_errors
    from .exceptions import StoreError

    def said(err) -> str:
        # a file system's own answer: no endpoint, credentials or network in it (`models gc` on a
        # read-only mount was sent to check them)
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.ENOSPC):
            return f"Cannot change {what} {url!r}: {error_text(err)}. Run it where {what} can be written (and has room)."
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM) and "://" not in str(url):
            return f"Cannot access {what} {url!r}: {error_text(err)}. Check that this user may read and write it."
        return (f"Cannot access {what} {url!r}: {error_text(err)}. Check the endpoint ([storage_options] in "
                "--config or $MODELFACTORY_CONFIG, AWS_ENDPOINT_URL), the credentials and the network.")

    return storage_errors(StoreError, said,
                          passthrough=(ModelFactoryError, BrokenPipeError))  # a broken pipe: stdout's (see _run)


def _print_summary(run, args, where: str) -> None:
    """The summary of a job that wrote to ``where`` (train's store, score's --out)."""
    if args.json:
        # "store" (train, demo) or "out" (score) as the options name them; "where" (the same path,
        # a misnomer beside --where) is kept for this release only, as docs/guide.md says
        named = {"store": where} if run.kind == "train" else {"store": args.store, "out": where}
        print(json.dumps({"run": run.id, **run.summary, **named, "where": where}, default=str))
        return
    s, c = run.summary, run.summary["counts"]
    print(f"run {run.id} ({s['kind']}): {s['groups']:,} group{'' if s['groups'] == 1 else 's'}, ok {c['ok']:,}, "
          f"failed {c['failed']:,}, skipped {c['skipped']:,}")
    print(f"{s['rows']:,} rows in {s['units']} unit{'' if s['units'] == 1 else 's'} ({s['mode']}); "
          f"{s['wall_seconds']:.1f} s wall")
    if s.get("model_run"):  # which models scored: "latest" is whichever run was LATEST then
        print(f"scored with the models of run {s['model_run']}")
    if "resumed" in s:  # asked for --resume: was there a run to resume?
        print(f"resumed run {run.id}" if s["resumed"] else "nothing to resume: a new run")
    if s.get("retrain"):
        r = s["retrain"]
        lost = r.get("lost") or 0  # had a model in the base run, and none in this one
        print(f"retrain ({r['mode']}) of run {r['base_run']}: {r['refit']:,} group{'' if r['refit'] == 1 else 's'} "
              f"refit, {r['carried_over']:,} carried over" + (f", {lost:,} left without a model" if lost else ""))
    by = getattr(args, "by", None) or s.get("spec", {}).get("by")  # train's --by; score's from its models
    shown = run.errors[:5]
    for key, err in shown:
        print(f"  failed {_key_text(key, by)}: {err}")
    if c["failed"] > len(shown) and shown:
        every = (f"models show --store {where} --run {run.id}" if run.kind == "train"
                 else f"status 'failed' in {where.rstrip('/')}/_groups/")
        print(f"  ... and {c['failed'] - len(shown):,} more failed: {every}")
    print(f"written to {where}")


def _cmd_train(args) -> int:
    from .api import train

    with _api_warning_dropped("no_model"):  # told once, by _fitted_some's error: line
        run = train(args.data, by=args.by, time=args.time, target=args.target, features=args.features,
                    model=args.model, params=dict(args.param), store=args.store, cluster=args.cluster,
                    workers=args.workers, unit_rows=args.unit_rows, resume=args.resume,
                    retrain=args.retrain, base=args.base, config=args.config, filter=_filter(args),
                    progress=_progress(args))
    _print_summary(run, args, args.store)
    return _fitted_some(run, args.store)


def _fitted_some(run, store: str) -> int:
    """0, or 2 with an ``error:`` line when the training run ``run`` fitted no model."""
    if not run.summary["counts"]["ok"]:
        print(f"error: run {run.id} fitted no model: every group failed or was skipped{_why_none(run)}; it is kept "
              f"for inspection (models show --store {store} --run {run.id}), and LATEST was not moved",
              file=sys.stderr)
        return 2
    return 0


def _key_text(key, by) -> str:
    """A failed group's key as ``--key`` takes it (``app=a,site=b``) when its columns are known."""
    from .api import _as_tuple
    from .plot import format_key

    by = _as_tuple(by, "by") if by else ()
    if by and isinstance(key, tuple) and len(key) == len(by):
        return format_key(dict(zip(by, key)))
    return str(key)


def _why_none(run) -> str:
    """The commonest reason the groups of a run that did nothing failed or were skipped."""
    why = run.commonest_problem()
    return f" ({why})" if why else ""


def _cmd_score(args) -> int:
    from .api import score

    with _api_warning_dropped("key_mismatch", "no_model", "models_without_rows"):
        run = score(args.data, store=args.store, out=args.out, run=args.run, cluster=args.cluster,
                    workers=args.workers, unit_rows=args.unit_rows, overwrite=args.overwrite, trust=args.trust,
                    config=args.config, filter=_filter(args), progress=_progress(args), keep=args.keep)
    _print_summary(run, args, args.out)
    if not args.json:
        n = run.summary["anomalies"]
        print(f"{n:,} anomalous point{'' if n == 1 else 's'}"
              + (f"; top groups in {args.out.rstrip('/')}/_anomalies.json" if n else ""))
    none_ok = run.summary["groups"] and not run.summary["counts"]["ok"]
    why = _why_none(run) if none_ok else ""
    mismatch = run.summary.get("key_mismatch")
    if mismatch and mismatch["reason"] not in why:  # keys written otherwise than in training: said once
        print(f"warning: {mismatch['warning']}", file=sys.stderr)
    if run.summary.get("models_without_rows"):  # models whose series sent no row: gone silent?
        print(f"warning: {run.summary['models_without_rows']['warning']}", file=sys.stderr)
    if none_ok:  # a scheduled job must not pass silently
        print(f"error: run {run.id} scored no group: every group failed or was skipped{why}", file=sys.stderr)
        return 2
    return 0


class _DropFlagged(logging.Filter):
    """Drops the log records an API call marked with ``flag`` (``extra={flag: True}``): what
    the CLI says in a line of its own."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, self.flag, False)


@contextlib.contextmanager
def _api_warning_dropped(*flags: str) -> Iterator[None]:
    """While the CLI runs a job: the API's warnings marked with one of ``flags`` are left to the CLI's
    own lines."""
    logger, drops = logging.getLogger("modelfactory.api"), [_DropFlagged(flag) for flag in flags]
    for drop in drops:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for drop in drops:
            logger.removeFilter(drop)


def _cmd_models_list(args) -> int:
    from .exceptions import IntegrityError
    from .store import ModelStore

    st = ModelStore(args.store, storage_options=_storage_options(args))
    unreadable: list[tuple[str, str]] = []
    with _store_errors(args.store):
        try:
            latest = st.latest()
        except IntegrityError as err:  # a damaged LATEST: the runs are still listed, and it is the error
            latest = None
            unreadable.append(("LATEST", str(err)))
        rows = []
        for rid in st.runs():
            try:  # one damaged run must not hide the others (nor keep gc from being chosen)
                man = st.manifest(rid)
            except IntegrityError as err:
                unreadable.append((rid, str(err)))
                rows.append({"run": rid, "latest": rid == latest, "error": str(err)})
                continue
            rows.append({"run": rid, "latest": rid == latest, "model": man["spec"]["model"],
                         **man["summary"]["counts"], "groups": man["summary"]["groups"],
                         "committed": man["committed"]})
        if latest is not None and latest not in {r["run"] for r in rows}:  # listed with no `*`, and exit 0
            unreadable.append(("LATEST", (f"LATEST in {st.location.url!r} names run {latest!r}, which is not "
                                          "among the committed runs (removed, or not copied): pass a run by its "
                                          "id (--run), or train again, which writes LATEST afresh.")))
        records = st.pending()
        pending = [p["run_id"] for p in records]
        cannot = {p["run_id"] for p in records if "unreadable" in p}
        cut = set(st.interrupted_commits()) if rows else set()
        for r in rows:
            r["commit_interrupted"] = r["run"] in cut
        if not rows and not pending:
            # a misspelt --store printed "no runs in stroe" and exit 0, as for a store yet to train
            _refuse_no_store(st)
    if args.json:
        print(json.dumps({"runs": rows, "interrupted": pending}))
    else:
        if not rows and not pending:
            print(f"no runs in {args.store}")
        for r in rows:
            mark = "*" if r["latest"] else " "
            if "error" in r:
                print(f"{mark} {r['run']}  (cannot be read: see below)")
                continue
            print(f"{mark} {r['run']}  {r['model']:<14} {r['groups']:>10,} groups  ok {r['ok']:,}  "
                  f"failed {r['failed']:,}  skipped {r['skipped']:,}")
            if r["commit_interrupted"]:
                print(f"    (its train stopped before moving LATEST: train --resume {r['run']} finishes the commit)")
        for rid in pending:
            if rid in cannot:
                print(f"  {rid}  (interrupted: its record cannot be read, so it cannot be resumed; models gc --pending "
                      "removes it)")
            elif latest is not None and rid < latest:  # (run ids begin with their start time)
                # a nightly run killed, then the next night's committed: the resume listed here was
                # refused ("started for another job or input") once the input had changed
                print(f"  {rid}  (interrupted, before run {latest} was committed: train --resume {rid} resumes it "
                      "only on the input and with the arguments it started with; models gc --pending removes it, "
                      "once no train runs into this store)")
            else:
                print(f"  {rid}  (interrupted: resume with train --resume {rid} and the arguments it started with)")
    if unreadable:
        rid, why = unreadable[0]
        more = f" {len(unreadable) - 1} more run(s) cannot be read either." if len(unreadable) > 1 else ""
        raise ModelFactoryError(f"{why}{more}")
    return 0


def _refuse_no_store(st) -> None:
    """A StoreError when there is no store at the store's path (a misspelt --store): nothing, or a
    file."""
    st.require_exists(fix="Pass the --store of python -m modelfactory train.")


def _cmd_models_show(args) -> int:
    from .exceptions import StoreError
    from .store import ModelStore, parse_key

    st = ModelStore(args.store, storage_options=_storage_options(args))
    with _store_errors(args.store):
        try:
            return _show(st, args, parse_key)
        except StoreError:
            # a misspelt --store said "has no committed run yet. Train first", as for a new store
            _refuse_no_store(st)
            raise


#: Values of a model's state array that ``models show --key`` prints (without ``--full``).
SHOWN_VALUES = 1000


def _shown_value(v, full: bool):
    """A state value as ``models show --key`` prints it: an array of more than
    :data:`SHOWN_VALUES` values as its type, shape, first values and range (a model that keeps a
    window of ten million values printed 230 MB), unless ``full``."""
    import numpy as np

    if not hasattr(v, "tolist"):
        return v
    a = np.asarray(v)
    if full or a.size <= SHOWN_VALUES:
        return v.tolist()
    out = {"array": f"{a.dtype} {list(a.shape)}", "first": a.reshape(-1)[:5].tolist()}
    if a.dtype.kind in "iuf":
        finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
        if finite.size:
            out.update(min=finite.min().item(), max=finite.max().item(), mean=float(finite.mean()))
        if finite.size < a.size:
            out["not finite"] = int(a.size - finite.size)
    out["all of it"] = "--full"
    return out


def _show(st, args, parse_key) -> int:
    if args.key is not None:  # (--key "" is a key, refused as empty, not the whole run)
        from .plot import format_key

        key = parse_key(args.key)
        model = _load_for_show(st, key, args)
        # the key as looked up (spaces around names and values dropped): which group this is
        info = {"key": format_key(key), "model": type(model).__name__,
                "params": model.get_params() if hasattr(model, "get_params") else {}}
        if hasattr(model, "get_state"):
            info["state"] = {k: _shown_value(v, args.full) for k, v in model.get_state().items()}
        print(json.dumps(info, default=str) if args.json else json.dumps(info, indent=1, default=str))
        return 0
    import pandas as pd

    from .plot import format_key
    from .store import import_name

    man = st.manifest(args.run)
    groups = st.groups(man["run_id"])
    # the failed groups first: a run with many groups too short to fit (skipped) must not push
    # its failures and their errors out of the first 20
    not_ok = pd.concat([groups[groups.status == "failed"], groups[~groups.status.isin(["ok", "failed"])]])
    failed = not_ok.head(20)
    if args.json:
        print(json.dumps({"manifest": man, "not_ok": failed.to_dict(orient="records"),
                          "not_ok_count": len(not_ok)}, default=str))
        return 0
    s = man["summary"]
    print(f"run {man['run_id']}: {man['spec']['model']} {man['spec']['params']}")
    print(f"input {man['input']['url']} ({man['input']['rows']:,} rows, {man['input']['files']} "
          f"file{'' if man['input']['files'] == 1 else 's'})")
    if (man["input"].get("filter") or {}).get("text"):  # the run's --where: the rows it was fitted on
        print(f"where {' '.join(man['input']['filter']['text'].split())}: {s['rows']:,} of those rows")
    print(f"{s['groups']:,} group{'' if s['groups'] == 1 else 's'}: ok {s['counts']['ok']:,}, failed {s['counts']['failed']:,}, "
          f"skipped {s['counts']['skipped']:,}; {s['wall_seconds']:.1f} s wall")
    need = [import_name(p) for p in man["spec"].get("imports", [])
            if not p.startswith(("cloudpickle", "modelfactory"))]  # those two: not the user's to install
    if need:  # pickled user models: what score checks that every worker imports
        print("its models need " + ", ".join(need))
    if man.get("lineage", {}).get("retrain"):
        carried = man["lineage"].get("carried_over") or {}  # run -> groups whose models were copied from it
        said = (", ".join(f"{n:,} from {r}" for r, n in carried.items()) if isinstance(carried, dict)
                else str(carried)) or "none"
        print(f"retrained {man['lineage']['retrain']} groups of {man['lineage']['base_run']}; "
              f"carried over {said}")
        if man["lineage"].get("not_in_input"):  # scoring with this run skips them: "no model for this group"
            from .store import left_out_text

            print(f"{left_out_text(man['lineage'])}: score {'it' if man['lineage']['not_in_input'] == 1 else 'them'} "
                  f"with --run {man['lineage']['base_run']}")
    by = man["spec"]["by"]
    for row in failed.to_dict(orient="records"):
        key = format_key({k: row[k] for k in by})  # as --key takes it back (a comma in a value: \,)
        print(f"  {row['status']:<8} {key}: {row['error']}")
    if len(not_ok) > len(failed):
        print(f"  ... {len(not_ok) - len(failed):,} more groups not ok: all are in ModelStore(...).groups() "
              f"and in `report --store {args.store} --run {man['run_id']}`")
    return 0


def _load_for_show(st, key: dict, args):
    """``st.load(key)``; when it fails and a stored key matches ``key`` in another type or format
    (``site=7`` for a run keyed ``"07"``), the error says so, as scoring does."""
    from .exceptions import StoreError
    from .scoring import loose_key_hint

    try:
        return st.load(key, run=args.run, trust=args.trust)
    except StoreError as err:
        try:
            man = st.manifest(args.run)
            hint = loose_key_hint(st.location, man["parts"], tuple(man["spec"]["by"]), key)
        except Exception as why:  # noqa: BLE001 - a hint: never worth hiding the error it adds to
            log.debug("no loose-key hint for %s: %s", key, why)
            hint = None
        if hint is None:
            raise
        raise StoreError(f"{err} {hint}") from err


def _cmd_plot(args) -> int:
    """``plot``, with the storage options of ``--config``."""
    from .plot import draw_command, load_command

    with _store_errors(*((args.scores, "the scores folder") if args.scores is not None else (args.store,))):
        series = load_command(args, _storage_options(args))
    return draw_command(args, series)  # outside: a local file error is not the store's


def _cmd_report(args) -> int:
    """``report``, with the storage options of ``--config``."""
    from .report import run_command

    with _store_errors(args.store):
        return run_command(args, _storage_options(args))


def _cmd_cluster_spec(args) -> int:
    from .kube import cluster_spec

    sys.stdout.write(cluster_spec(args.config, workers=args.workers, fmt=args.format))
    return 0


def _cmd_models_set_latest(args) -> int:
    from .store import ModelStore

    st = ModelStore(args.store, storage_options=_storage_options(args))
    with _store_errors(args.store):
        before = st.set_latest(args.run)
    now = st.latest()
    print(f"LATEST: {now} (was {before or 'no run'})" if before != now else f"LATEST: {now} (unchanged)")
    return 0


def _cmd_models_gc(args) -> int:
    from .store import ModelStore

    st = ModelStore(args.store, storage_options=_storage_options(args))
    with _store_errors(args.store):
        removed = st.gc(keep=args.keep, pending=args.pending, dry_run=args.dry_run)
        if not removed:  # a misspelt --store (a clean-up job from cron) removed nothing, every time
            _refuse_no_store(st)
    verb = "would remove" if args.dry_run else "removed"
    # one run a line: 198 runs on one line of 7,000 characters could be neither read nor grepped
    print(f"{verb} {len(removed)} run(s)" + "".join(f"\n  {rid}" for rid in removed))
    return 0


def _cmd_demo(args) -> int:
    import os

    import numpy as np

    from .api import resolve_model, train
    from .demo import _START as DEMO_START
    from .demo import demo_params, write_dataset
    from .models import registry

    data, store = os.path.join(args.out, "data"), os.path.join(args.out, "store")
    if args.series < 1 or args.days < 1:
        raise ModelFactoryError("--series and --days must be at least 1.")
    mspec = resolve_model(args.model)  # an unknown model is refused before the dataset is written
    if mspec.data_needs()[1]:  # the demo's dataset has no feature columns, and demo no --features
        def fits(name: str) -> bool:
            try:
                return not resolve_model(name).data_needs()[1]
            except Exception:  # noqa: BLE001 - a registered model that needs parameters: not for demo
                return False

        demo_ok = ", ".join(n for n in sorted(registry) if fits(n))
        raise ModelFactoryError(f"Model {args.model!r} needs feature columns, and the demo dataset has none (only "
                                f"app, site, ts, value). Pick one of {demo_ok} for demo, or train {args.model} on "
                                "your own data with train --features.")
    need = resolve_model(args.model, demo_params(args.model, args.days)).cls(
        **demo_params(args.model, args.days)).required_rows()
    if args.days * 24 < need:  # every series skipped, after writing the dataset
        raise ModelFactoryError(f"--days {args.days} gives each series {args.days * 24} hourly points, and {args.model} "
                                f"needs at least {need}: pass --days {-(-need // 24)} or more.")
    # Models other than seasonal score only the rows after the end of their training: a day more
    # is written, and left out of training, so that `score OUT/data` has rows for them to score.
    extra = 0 if args.model == "seasonal" else 1
    if not args.quiet and not args.json:
        more = (f", plus 1 day for score (not trained on: {args.model} scores only rows after its training),"
                if extra else "")
        print(f"writing {args.series:,} hourly series x {args.days} day{'s' if args.days != 1 else ''}{more} to {data}")
    with _store_errors(data, "the demo dataset folder"):
        write_dataset(data, args.series, days=args.days + extra, storage_options=_storage_options(args))
    end = (DEMO_START + np.timedelta64(args.days, "D")).astype(str) + "Z"
    try:
        with _api_warning_dropped("no_model"):  # told once, by _fitted_some's error: line
            run = train(data, by=["app", "site"], time="ts", target="value", model=args.model,
                        params=demo_params(args.model, args.days), store=store,
                        filter=f"ts < '{end}'" if extra else None, cluster=args.cluster, workers=args.workers,
                        unit_rows=args.unit_rows, config=args.config, progress=_progress(args))
    except KeyboardInterrupt as err:
        # train's own words name `train --resume RUN`, which demo has not (and a train of its own
        # would not match the demo's hidden filter and parameters): demo again starts over
        said = str(err)
        rid = said.split()[1] if said.startswith("run ") else None
        raise KeyboardInterrupt(f"the demo's run {rid} was not committed; run the demo again to start over "
                                f"(`models gc --store {store} --pending` removes the unfinished run)" if rid
                                else said) from None
    _print_summary(run, args, store)
    return _fitted_some(run, store)


#: Loggers of Dask and the web stack under it, whose lines the CLI shows only with -v.
DASK_LOGGERS = ("distributed", "bokeh", "tornado")


@contextlib.contextmanager
def _dask_logs(verbose: int) -> Iterator[None]:
    """Dask's own log lines reach stderr only with ``-v``: those of this process (the
    client, and the scheduler and nannies of a local cluster) and, through
    :func:`modelfactory.run.dask_log_level`, those of the worker processes of a cluster made
    here.  Without ``-v`` the user sees modelfactory's messages (a unit that failed, one
    that kept killing its worker...) and the one ``error:`` line; with ``-v`` Dask's INFO
    lines too, all through the root handler.  What is changed is restored on leaving."""
    from .run import dask_log_level

    undo: list = []
    for name in DASK_LOGGERS:
        logger = logging.getLogger(name)
        undo.append(functools.partial(setattr, logger, "propagate", logger.propagate))
        logger.propagate = bool(verbose)
        if not verbose:
            # distributed adds no handler of its own when the root logger has one already; a
            # logger with no handler on its way would fall back to logging.lastResort (stderr)
            quiet = logging.NullHandler()
            logger.addHandler(quiet)
            undo.append(functools.partial(logger.removeHandler, quiet))
    if not verbose:  # the handlers distributed added when imported before logging was set up
        loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                   if n.split(".")[0] in DASK_LOGGERS]
        for handler in {h for lg in loggers for h in lg.handlers if type(h) is not logging.NullHandler}:
            undo.append(functools.partial(handler.setLevel, handler.level))
            handler.setLevel(logging.CRITICAL + 1)
    try:
        with dask_log_level([logging.CRITICAL, logging.INFO, logging.DEBUG][min(verbose, 2)]):
            yield
    finally:
        for step in reversed(undo):
            step()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input or library error, 1 internal error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    before = list(logging.getLogger().handlers)  # a caller's own (main() run in a notebook): left alone
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a warning reads as the CLI's own "warning:" lines do; -v names the logger
        for handler in logging.getLogger().handlers:
            if handler not in before:
                handler.setFormatter(_WarningFormatter("%(levelname)s %(name)s: %(message)s"))
    with _dask_logs(args.verbose), _sigterm_as_interrupt() as terminated:
        return _run(args, terminated)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list]:
    """SIGTERM (how ``timeout``, cron and Kubernetes stop a job) taken as a Ctrl-C: the job stops
    the same way, its local cluster closed and, for ``train``, the run to resume named in its
    ``error:`` line; it ended with no word at all.  Yields a list that the signal appends to."""
    import signal
    import threading

    terminated: list = []
    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return

    def stop(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, old)


class _WarningFormatter(logging.Formatter):
    """``warning: …`` for a WARNING record (as the CLI's own warning lines), the given format for
    the others (an ERROR one is not the CLI's one ``error:`` line, and reads otherwise)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            text = f"warning: {record.getMessage()}"
            if record.exc_info:  # (as logging's own formatter adds it)
                text = f"{text}\n{self.formatException(record.exc_info)}"
            return text
        return super().format(record)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail again."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _run(args, terminated: Sequence = ()) -> int:
    try:
        return int(args.func(args) or 0)
    except ModelFactoryError as err:
        if args.verbose:
            log.exception("details")
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"error: {how}; {str(err) or 'nothing was committed'}", file=sys.stderr)
        return 143 if terminated else 130  # 128 + the signal, as a shell reports a process it ended
    except BrokenPipeError:
        # whoever read the output stopped reading (`models list | head -1`): stop quietly, as
        # `git log | head` does, instead of an "internal error" (or a store error) about stdout
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    except Exception as err:  # noqa: BLE001 - one line, not a traceback
        if args.verbose:
            log.exception("details")
        if _raised_by_storage(err) and _has_storage_options(args):  # a setting it refused (a key, a type)
            print(f"error: the storage library refused its settings: {type(err).__name__}: {err}. Check the "
                  "[storage_options] of the --config file (or $MODELFACTORY_CONFIG) against its options "
                  "(s3fs's for s3://).", file=sys.stderr)
            return 2
        print(f"error: internal error: {type(err).__name__}: {err} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


def _has_storage_options(args) -> bool:
    """Whether the job has storage options set (``--config``, ``$MODELFACTORY_CONFIG``, the environment)."""
    try:
        return bool(_storage_options(args))
    except Exception:  # noqa: BLE001 - settings that cannot be read: not this case
        return False


def _raised_by_storage(err: BaseException) -> bool:
    """Whether ``err``, a TypeError, AttributeError or ValueError (say: "unexpected keyword
    argument 'auto_mkdir'"), was raised inside a storage library (s3fs, aiobotocore, fsspec...),
    not in modelfactory's own code: with storage options set, most likely one of them refused."""
    import traceback

    from ._io import STORAGE_LIBRARIES

    if not isinstance(err, (TypeError, AttributeError, ValueError)):
        return False
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    if not frames:
        return False
    name = frames[-1].filename.replace("\\", "/")
    return any(f"/{lib}/" in name for lib in STORAGE_LIBRARIES if lib not in ("urllib3", "requests"))
