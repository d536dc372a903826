"""The public functions: :func:`train`, :func:`score`, :func:`apply` and :func:`map_keys`.

Each composes the pieces in one direction: discover the dataset and check the
columns (on the client, before anything is written), open the cluster, plan
units, run the kernel on the workers, commit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time as _time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from . import kernel
from ._io import Location
from ._schema import parse_schema, plain_type
from .config import job_settings
from .dataset import DatasetInfo, check_columns, check_time_zone, check_value_types, discover, value_types
from .exceptions import (ClusterError, DatasetError, ModelError, ModelFactoryError, PlanError, SchemaError,
                         StoreError)
from .kernel import JobSpec, ModelSpec, UnitResult
from .models import get as get_model
from .models import registry, unknown_model
from .models.base import Model
from .plan import Plan, plan
from .result import Run, table_run
from .run import (Progress, check_code, execute, isolate, isolate_keys, open_client, run_shuffled, run_units,
                  task_slots, task_tag)
from .store import ModelStore, bucket_index, filter_record, leaf_index, new_run_id, read_part

__all__ = ["train", "apply", "map_keys", "score", "Run"]

log = logging.getLogger(__name__)

_INPUTS = ("pandas", "arrow", "numpy")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _as_tuple(x, what: str) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        x = [p.strip() for p in x.split(",") if p.strip()]
    out = tuple(x)
    if not all(isinstance(v, str) for v in out):
        raise ModelFactoryError(f"{what} must be column names; got {list(out)!r}.")
    dup = list(dict.fromkeys(v for v in out if out.count(v) > 1))
    if dup:
        raise ModelFactoryError(f"{what} names {', '.join(map(repr, dup))} more than once ({', '.join(out)}); "
                                "name each column once.")
    return out


def resolve_model(model, params: Mapping | None = None) -> ModelSpec:
    """A registered name (built-in or :func:`register_model`), or a :class:`Model` class or instance."""
    params = dict(params or {})
    if isinstance(model, str):
        if model not in registry:
            raise unknown_model(model)
        proto = get_model(model, **params)
        proto.validate_params()
        # a class registered by the user is pickled like any user class: a process that has
        # not registered it (a worker, a later `score`) could not rebuild it from its name
        return ModelSpec(model, type(proto), _recordable(model, proto.get_params()), _serializer(type(proto)))
    if isinstance(model, type) and issubclass(model, Model):
        proto = model(**params)
        proto.validate_params()
        name = getattr(model, "name", model.__name__)
        return ModelSpec(name, model, _recordable(name, proto.get_params()), _serializer(model))
    if isinstance(model, Model):
        if params:
            raise ModelError("Pass parameters either on the model instance or as params=, not both.")
        model.validate_params()
        return ModelSpec(model.name, type(model), _recordable(model.name, model.get_params()), _serializer(type(model)))
    raise ModelError(f"model must be a built-in name ({', '.join(registry)}), a modelfactory Model class "
                     f"or instance; got {type(model).__name__}.")


def _recordable(model: str, params: dict) -> dict:
    """``params``, checked to be recordable: a run records its model's parameters as JSON (in
    its manifest, and to compare a resume or a retrain with it).  numpy values and arrays are
    recorded as numbers and lists, dates and times as ISO text; any other value that JSON
    cannot hold (a set, bytes, a function, an object) is refused, naming the parameter.
    The model itself gets the values as they are."""
    for name, value in params.items():
        try:
            json.dumps(value, default=_json_value)
        except (TypeError, ValueError) as err:
            from .exceptions import ParameterError

            text = str(err)
            what = (f"holds a value of type {text.split(' is not a JSON value')[0]}" if "is not a JSON value" in text
                    else f"cannot be written as JSON ({type(err).__name__}: {text})")
            raise ParameterError(
                f"The {name!r} parameter of {model} {what}, which a run cannot record: a run records its model's "
                "parameters as JSON, to compare a rerun or a retrain with it. Pass it as a number, text, a bool, "
                "None, or a list or dict (with text keys) of those (a numpy array, a date or a time is recorded as "
                "such), or set it inside the model class.") from None
    return params


def _json_value(value):
    """``json.dumps``' ``default`` for model parameters: numpy values as Python ones, dates and
    times as ISO text; anything else is refused (TypeError)."""
    import datetime

    import numpy as np

    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, (datetime.date, datetime.time)):  # (datetime is a date)
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _as_json(value):
    """``value`` as its JSON record reads back (tuples as lists, numpy values as Python's)."""
    return json.loads(json.dumps(value, default=_json_value))


def _same_json(a, b) -> bool:
    """Whether two values record as the same JSON: a tuple is its list, a dict's int keys are
    text, and NaN is NaN (``nan != nan`` in Python)."""
    def text(v):
        return json.dumps(v, sort_keys=True, default=_json_value)

    try:
        return text(a) == text(b)
    except (TypeError, ValueError):  # (not from parameters that were checked when recorded)
        return a == b


def _serializer(cls: type) -> str:
    from .models import _BUILTIN

    return "native" if cls.name in _BUILTIN and registry[cls.name] is cls else "pickle"


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _summarise(kind: str, results: list[UnitResult], plan_: Plan | None, wall: float) -> dict:
    counts = {s: sum(r.counts[s] for r in results) for s in kernel.STATUS}
    problems: dict[tuple[str, str], int] = {}
    for r in results:
        for k, v in r.problems.items():
            problems[k] = problems.get(k, 0) + v
    top = kernel.commonest(problems, 5)
    return {
        "kind": kind,
        "groups": sum(r.groups for r in results),
        "counts": counts,
        "rows": sum(r.rows for r in results),
        "units": len(results),
        "mode": plan_.mode if plan_ else "keys",
        "unit_rows": plan_.target_rows if plan_ else None,
        "wall_seconds": round(wall, 3),
        "unit_seconds": round(sum(r.seconds for r in results), 3),
        # the commonest reasons groups failed or were skipped, counted by the units (each reports its
        # own commonest kinds: the client reads no group table for them).  Not complete when a unit
        # had more kinds than it reports (errors naming each group's values): the counts are then
        # lower bounds, and the commonest in the run may be missing
        "problems": [{"status": st, "error": err, "groups": n} for (st, err), n in top],
        "problems_complete": not any(r.problems_cut for r in results),
    }


def model_source(st: ModelStore, man: dict, info: DatasetInfo, trust: bool):
    """Where units find the models of a committed run (through its leaf index)."""
    from .scoring import INLINE_LEAVES, ModelSource, lookup_of
    from .store import _digest_of

    index = leaf_index(man)
    leaf_keys = tuple(index["keys"])
    lookup: dict = {}
    digest = ""
    if leaf_keys and all(k in info.source.partition_keys or k in info.schema.names for k in leaf_keys):
        if sum(len(leaves) for leaves in index["parts"]) <= INLINE_LEAVES:
            lookup = lookup_of(index["parts"])
        else:  # each worker reads it from the manifest, once (scoring.leaf_lookup)
            digest = _digest_of(man)
    sp = man["spec"]
    src = ModelSource(st.location, man["run_id"], sp["model"], sp.get("serializer", "native"),
                      tuple(man["parts"]), lookup, leaf_keys, trust, index_digest=digest)
    buckets = bucket_index(man)
    if not lookup and not digest and buckets:
        from .scoring import stored_key_types

        types = stored_key_types(src, tuple(sp["by"]))  # one footer, read here rather than by every unit
        if len(types) == len(sp["by"]):
            src = dataclasses.replace(src, buckets=tuple(buckets["parts"]), n_buckets=buckets["n"],
                                      key_types=tuple(plain_type(types[k]) for k in sp["by"]))
    return src


def _part_bucket(st: ModelStore, part, by: tuple[str, ...], n: int) -> int | None:
    """The shuffle partition of a part written outside its partition's unit (a group run by itself
    after its partition's worker died: one part a group), from the keys it holds, as a scoring unit
    computes them; None (any scoring unit reads it) when they do not all hash to one."""
    from .run import shuffle_buckets
    from .scoring import _plain

    try:
        keys = read_part(st.location, dataclasses.asdict(part) if dataclasses.is_dataclass(part) else part,
                         columns=list(by))
    except (OSError, ModelFactoryError, pa.ArrowException):
        return None
    keys = _plain(keys, by)  # as a scoring unit hashes them
    got = shuffle_buckets(keys, n) if keys.num_rows else None
    return int(got[0]) if got is not None and len(got) and (got == got[0]).all() else None


#: The columns a job's group table holds beside the keys (train's parts, score's ``_groups/``).
_GROUP_TABLE = {"train": ("status", "error", "rows", "seconds", "model", "fingerprint", "fitted_in"),
                "score": ("status", "error", "rows", "seconds", "anomalies", "max_score"),
                "apply": ("status", "error", "rows", "seconds"), "map_keys": ("status", "error", "rows", "seconds")}


def _refuse_reserved_names(kind: str, *, keys: tuple[str, ...] = (), scored: Mapping[str, str] | None = None,
                           of: str = "", fix: str) -> None:
    """Refuse, before anything is written, a key column named as a column of the job's group table,
    and (score) a column of the scored rows (``scored``: name -> role) named as a score column:
    the files would hold two columns of one name.  ``of`` follows the column's name in the
    message (" of run X"), ``fix`` says what to do."""
    from .scoring import SCORE_COLUMNS

    for k in keys:
        if k in _GROUP_TABLE[kind]:
            raise SchemaError(f"The key column {k!r}{of} has the name of a column of the group table that {kind} "
                              f"writes beside the keys ({', '.join(_GROUP_TABLE[kind])}): {fix}")
    if kind == "score":
        # the scored rows hold the keys too: a key `expected` made files of two columns 'expected'
        # that no reader opens ("Can't unify schema with duplicate field names"), committed ok
        scored = {**{k: "key" for k in keys}, **(scored or {})}
    for col, role in (scored or {}).items():
        if col in SCORE_COLUMNS:
            raise SchemaError(f"The {role} column {col!r}{of} has the name of a column that score writes beside "
                              f"it ({', '.join(SCORE_COLUMNS)}), so the scored rows would hold two columns {col!r}: "
                              f"{fix}")


#: What to do about a committed run whose column names clash with the columns score writes.
TRAIN_AGAIN = "rename it in the data and train again (a run scores the columns it was trained on)."


def scored_columns(time: str | None, target: str | None, features: Sequence[str]) -> dict[str, str]:
    """The columns of a run that scored rows hold beside the scores: name -> role."""
    return {c: role for c, role in [(time, "time"), (target, "target"), *((f, "feature") for f in features)] if c}


def _differs(p: dict, now: dict) -> str:
    """What differs between an interrupted run's record ``p`` (its pending.json) and this job
    (``now``: its ``spec``, ``retrain`` and ``base_run``), in a few words: the refusal to resume
    it said only "its data, columns, base run, model or parameters differ"."""
    was = {**(p.get("spec") or {}), "retrain": p.get("retrain"), "base_run": p.get("base_run")}
    mine = {**now["spec"], "retrain": now["retrain"], "base_run": now["base_run"]}
    diff = []
    was, mine = (json.loads(json.dumps(d, default=str)) for d in (was, mine))  # (32, 16) is [32, 16] in JSON
    for k in dict.fromkeys([*was, *mine]):
        a, b = was.get(k), mine.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}.{n} {a.get(n)!r} then, {b.get(n)!r} now" for n in dict.fromkeys([*a, *b])
                     if not _same_json(a.get(n), b.get(n))]
        elif not _same_json(a, b):
            diff.append(f"{k} {a!r} then, {b!r} now")
    return ("; ".join(diff[:3]) if diff else
            "the input's files (or the model's class) changed since, or the run was begun by an earlier version "
            "of modelfactory, which marked its input otherwise")


def _begin_run(st: ModelStore, digest: str, resume, unit_rows, now: dict | None = None) -> tuple[str, dict]:
    """The run id (new, or the interrupted run to resume) and the planner's settings: a
    resumed run is planned as it first was, so its units (and their parts) are the same."""
    if resume is False or resume is None:
        return new_run_id(digest), {"target_rows": unit_rows}
    pending = st.pending()
    if resume is True:
        same = [p for p in pending if p.get("digest") == digest]
        if not same:
            # at INFO, by design: a scheduled job passes --resume every time, and most nights there
            # is nothing to resume; the run's summary says it (summary["resumed"])
            log.info("nothing to resume for this job; starting a new run")
            return new_run_id(digest), {"target_rows": unit_rows}
        p = same[-1]
    else:
        match = [p for p in pending if p["run_id"] == resume]
        if not match:
            if resume in st.runs():
                raise StoreError(f"Run {resume!r} is already committed; there is nothing to resume.")
            raise StoreError(f"No interrupted run {resume!r} in {st.location.url!r}. "
                             f"Interrupted runs: {', '.join(p['run_id'] for p in pending) or 'none'}.")
        p = match[0]
        if "unreadable" in p:
            raise StoreError(f"Run {resume!r} cannot be resumed: its record runs/{resume}/pending.json in "
                             f"{st.location.url!r} cannot be read ({p['unreadable']}). Start a new run, and remove "
                             "this one with `models gc --pending`.")
        if p.get("digest") != digest:
            why = f" ({_differs(p, now)})" if now else ""
            raise StoreError(f"Run {resume!r} was started for another job or input{why}; it cannot be resumed with "
                             "these arguments: resume it with those it started with, or start a new run.")
    return p["run_id"], {"target_rows": p["unit_rows"], "limit": p.get("unit_limit"),
                         "multiple": p.get("unit_multiple")}


def _resume_argument(resume) -> bool | str:
    """``resume=`` as train takes it: True/False (1 and 0 too), or a run id (text).

    ``resume=1`` (a flag read from a config or a command line as a number) was taken as the run
    id 1: "No interrupted run 1".  Any other value (2, a float, a list...) is no flag and no run
    id, and is refused here, naming it, where it reached the store as an id nothing could match.
    """
    if resume is None or isinstance(resume, str):
        return False if resume is None else resume
    if isinstance(resume, int) and resume in (0, 1):  # (bool is an int: True, False, 1, 0)
        return bool(resume)
    raise ModelFactoryError(f"resume must be True or False (1 or 0), or the id of an interrupted run as text; "
                            f"got {resume!r} ({type(resume).__name__}). The store's interrupted runs are listed "
                            "by `python -m modelfactory models list --store STORE`.")


def _finish_interrupted_commit(st: ModelStore, digest: str, resume, now: dict | None = None) -> Run | None:
    """The run that ``resume`` names (or, for True, the newest one of this job) when its train
    stopped between committing its manifest and moving LATEST: its commit finished (LATEST moved
    if it fitted a model), and nothing trained again.  None when there is no such run."""
    if resume is False or resume is None:
        return None
    cut = st.interrupted_commits()
    mine = [r for r in cut if (resume is True and st._pending(r).get("digest") == digest) or r == resume]
    if not mine:
        return None
    rid = mine[-1]
    if st._pending(rid).get("digest") != digest:
        why = _differs(st._pending(rid), now) if now else "its data, columns, base run, model or parameters differ"
        raise StoreError(f"Run {rid!r} was started for another job or input ({why}); it cannot be resumed with "
                         "these arguments.")
    man = st.finish_commit(rid)
    log.info("run %s was committed but its train stopped before moving LATEST: its commit is finished", rid)
    latest = st.latest_named()
    if man["summary"]["counts"].get("ok", 0) and latest != rid:
        log.warning("LATEST stays on run %s, committed after run %s: use run %s by its id (run=%r, --run %s)",
                    latest, rid, rid, rid, rid)
    return Run(rid, "train", dict(man["summary"], resumed=True), store=st)


def _output(out: str, storage_options: dict | None, overwrite: bool, *, cli: bool = False, **apart: str) -> Location:
    """The folder a job writes its rows to: new or empty, or (with ``overwrite``) to be emptied
    by :func:`_empty_output` once the job's cluster is up; never one that holds, or lies inside,
    a folder of ``apart`` (what -> path: the input data, the model store), which emptying it
    would delete or writing to it would mix into.  Nothing is removed here: a job that stops
    before it runs (its scheduler cannot be reached) leaves the scores it would replace."""
    import os

    out = os.fspath(out)  # (a pathlib.Path showed as PosixPath('...') in every message below)
    sink = Location.of(out, storage_options)
    for what, path in apart.items():
        _keep_apart(sink, "output folder", Location.of(path, storage_options), what.replace("_", " "))
    sink.check_bucket(StoreError)
    fs = sink.fs
    # An empty object named like the folder, on an object store, is a folder marker (the S3
    # console's "Create folder" makes ``scores/``): s3fs may call it a file, or list it as the
    # folder's one entry, but the folder is empty.
    root, remote = sink.root, not sink.is_local
    if fs.isfile(root) and not (remote and fs.size(root) == 0):
        # never removed, even with overwrite: it is not an output folder
        raise StoreError(f"The output folder {out!r} is a file; pick a folder (new or empty).")
    if _holds_files(sink):
        if not overwrite:
            raise StoreError(_not_empty(sink, out, cli))
        if sink.is_bucket():
            raise StoreError(f"The output {out!r} is a whole bucket, and it is not empty: overwrite would delete "
                             "everything in it. Write to a folder inside it, such as "
                             f"{out.rstrip('/') + '/scores'!r}.")
        store = _model_store_at(sink)
        if store is not None:  # another store than the job's (its own is kept apart above)
            raise StoreError(f"The output folder {out!r} {'is' if store == sink.url else 'lies inside'} "
                             f"a model store ({store!r}, the runs of {store!r}): overwrite would delete its runs. "
                             "Nothing was removed; pick another output folder.")
        inner = _stores_within(sink)
        if inner:  # another job's store in a subfolder (--out jobs/errors for jobs/errors/scores)
            raise StoreError(f"The output folder {out!r} holds the model store {inner[0]!r} (its LATEST or runs/): "
                             "overwrite would delete its runs. Nothing was removed; pick another output folder.")
    return sink


def _stores_within(sink: Location) -> list[str]:
    """The model stores in the folders under ``sink`` (a ``LATEST``, or a run's ``manifest.json`` or
    ``pending.json`` under ``runs/``), as URLs; one listing of ``sink``."""
    import re

    try:
        rels = [p[len(sink.root.rstrip("/")) + 1:] for p in sink.fs.find(sink.root)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    roots = {r.rsplit("/", 1)[0] for r in rels if r.endswith("/LATEST")}
    roots |= {m[1] for r in rels if (m := re.match(r"(.+?)/runs/[^/]+/(?:manifest|pending)\.json$", r))}
    return sorted(f"{sink.url.rstrip('/')}/{r}" for r in roots)


def _model_store_at(sink: Location) -> str | None:
    """The model store that ``sink`` is, or in whose ``runs/`` it lies (at any depth): its URL;
    None for any other folder (one beside ``runs/`` in a store's folder too: emptying it removes
    no run)."""
    scheme, sep, path = sink.url.rpartition("://")
    parts = path.split("/")
    try:
        for i in range(len(parts), 0, -1):
            here = "/".join(parts[:i])
            if here and (i == len(parts) or parts[i] == "runs"):
                url = f"{scheme}{sep}{here}"
                if ModelStore(url, storage_options=dict(sink.storage_options)).holds_runs():
                    return url
    except Exception:  # noqa: BLE001 - a look, not a reason to fail
        return None
    return None


def _not_empty(sink: Location, out: str, cli: bool = False) -> str:
    """Why a job without ``overwrite`` refuses ``out``: an interrupted job's folder (its claim
    and no manifest) is named as one, since running the same command again is what one tries.
    ``cli``: the job has a command (``score``), whose flag is named too."""
    from .kernel import claimed_by

    owner = None if sink.exists("_manifest.json") else claimed_by(sink)
    if owner:
        return (f"The output folder {out!r} holds the unfinished output of run {owner} (it has no _manifest.json: "
                f"that job stopped before it committed, or is still running). Pass {_overwrite(cli)} "
                "to replace it, or pick a new folder.")
    return f"The output folder {out!r} is not empty; pick a new folder or pass {_overwrite(cli)}."


def _overwrite(cli: bool) -> str:
    """How to ask for ``overwrite``: the flag too for a job that has a command (apply and map_keys have none)."""
    return "overwrite=True (--overwrite)" if cli else "overwrite=True"


def _holds_files(sink: Location) -> bool:
    root, fs = sink.root, sink.fs
    return bool(fs.exists(root) and [p for p in fs.ls(root, detail=False)
                                     if not (not sink.is_local and p.rstrip("/") == root)])


def _empty_output(sink: Location | None, run_id: str, overwrite: bool, cli: bool = False) -> None:
    """Empty the ``out=`` folder that :func:`_output` accepted (with ``overwrite``), right
    before the job's units run, and mark it as this run's (:func:`result.claim_output`).
    Without ``overwrite`` nothing is removed: files that appeared since :func:`_output` found
    the folder empty (another job's, committed while this one's cluster started) are refused."""
    from .exceptions import StoreError
    from .result import claim_output

    if sink is None:
        return
    sink.fs.invalidate_cache()
    if _holds_files(sink):
        if not overwrite:
            raise StoreError(f"The output folder {sink.url!r} is not empty any more: it was empty when this job "
                             "started, and another job wrote to it while this one's cluster started. Nothing was "
                             f"removed nor run: pick a new folder, or pass {_overwrite(cli)} to replace "
                             "what it holds.")
        if sink.is_bucket():
            raise StoreError(f"The output {sink.url!r} is a whole bucket, and it is not empty any more: overwrite "
                             "would delete everything in it. Write to a folder inside it.")
        try:
            sink.rm(recursive=True)
        except OSError as err:  # "Directory not empty": a file appeared while it was emptied
            raise StoreError(f"Could not empty the output folder {sink.url!r} ({type(err).__name__}: {err}): another "
                             "job may be writing to it. Give each job a folder of its own.") from err
    claim_output(sink, run_id)


def _release_unused_claim(sink: Location | None, run_id: str) -> None:
    """Remove this job's claim on its ``out=`` folder when the job stopped before writing any
    file there: the folder is empty again, as it was, so running the job again needs no
    ``overwrite`` (a score stopped by a damaged part left ``_run_id`` alone in the folder, and
    the rerun its error asked for was refused as "unfinished output").  Best effort: never in the
    way of the error that stopped the job."""
    from .kernel import OUTPUT_CLAIM, claimed_by
    from .result import written_files

    if sink is None:
        return
    try:
        sink.fs.invalidate_cache()
        if claimed_by(sink) == run_id and not written_files(sink):
            sink.rm(OUTPUT_CLAIM)
    except Exception as err:  # noqa: BLE001
        log.debug("claim of %s on %s left: %s", run_id, sink.url, err)


def _units_stopped(sink: Location | None, run_id: str, err: BaseException, passthrough: tuple = (),
                   cli: bool = False) -> None:
    """Raise for the units of an apply, map_keys or score job stopped by ``err``: its claim on
    its ``out=`` folder removed when nothing was written (:func:`_release_unused_claim`); ``err``
    itself for the ``passthrough`` errors and other exceptions that are not Exceptions, a Ctrl-C
    saying what the ``out=`` folder holds now, :func:`_raise_unit_failure`'s for the others."""
    _release_unused_claim(sink, run_id)  # nothing written: the folder as it was, for a rerun
    if isinstance(err, KeyboardInterrupt) and sink is not None and _holds_files_or_none(sink):
        # "nothing was committed" alone: the folder held the earlier output (gone, when overwrite
        # emptied it) and now part of this run's, which plain Parquet readers take for all of it,
        # and the rerun was refused for "unfinished output" without a word of overwrite
        raise KeyboardInterrupt(f"nothing was committed: {sink.url} holds the unfinished output of run {run_id} "
                                f"(and no _manifest.json, which marks a finished one; an earlier output there, if any, "
                                f"was removed when the job began). Run the job again with {_overwrite(cli)}") from None
    if isinstance(err, passthrough) or not isinstance(err, Exception):
        raise err
    _raise_unit_failure(run_id, err)


def _holds_files_or_none(sink: Location) -> bool | None:
    """:func:`_holds_files`, or None when the storage cannot say (a Ctrl-C pressed because the
    object store stalled must still end as a Ctrl-C, not as the store's error)."""
    try:
        return _holds_files(sink)
    except Exception:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        return None


def _keep_apart(a: Location, a_name: str, b: Location, b_name: str, *, may_hold: bool = False) -> None:
    """Refuse ``a`` if it is ``b``, lies inside it, or (unless ``may_hold``) holds it
    (on the same file system)."""
    if a.protocol != b.protocol:
        return
    ra, rb = (_real(x) for x in (a, b))
    how = ("is" if ra == rb else "is inside" if ra.startswith(rb + "/")
           else "holds" if rb.startswith(ra + "/") and not may_hold else None)
    if how:
        raise ModelFactoryError(f"The {a_name} {a.url!r} {how} {b_name} {b.url!r}; pick another "
                                "folder, apart from it (nothing was written).")


def _real(loc: Location) -> str:
    import os

    root = loc.root.rstrip("/")
    return os.path.realpath(root) if loc.is_local else root


def _with_defaults(cls: type, params):
    """The parameters of a stored run as this version of its model class reads them: a parameter
    the class gained since the run was stored (seasonal's ``tz``) takes its default, as it does
    when the run's models are loaded, so the run still matches a job that leaves it at its default."""
    declared = getattr(cls, "params", None)
    if not isinstance(params, dict) or not isinstance(declared, dict):
        return params
    return {**{k: p.default for k, p in declared.items() if k not in params and hasattr(p, "default")}, **params}


def _base_groups_left_out(st: ModelStore, base_id: str, by: tuple[str, ...], parts: list) -> int | None:
    """How many groups of run ``base_id`` the new run's ``parts`` (not committed yet) lack:
    keys only are read, matched as scoring matches them (a key value that does not convert
    exactly to the stored type matches nothing).  None if they cannot be counted: a count
    never stops a commit."""
    from dataclasses import asdict

    from .scoring import keys_as_stored

    cols = list(by)
    try:
        base = st.table(base_id, columns=cols)
        new = [read_part(st.location, asdict(p), cols) for p in parts]
        if not new:
            return base.num_rows
        stored = [plain_type(t) for t in base.schema.types]
        arrays, _ = keys_as_stored(pa.concat_tables(new, promote_options="permissive"), by, stored, base_id)
        base = base.select(cols).cast(pa.schema([(c, arrays[i].type) for i, c in enumerate(cols)]))
        new_keys = pa.table(arrays, names=cols).group_by(cols).aggregate([])
        return base.join(new_keys, cols, join_type="left anti").num_rows
    except Exception as err:  # noqa: BLE001 - a count for the manifest, not worth a failed commit
        log.warning("could not count the groups of run %s missing from this input: %s", base_id,
                    kernel.describe_error(err))
        return None


def _as_filter(filter: Any, data: str, storage_options: dict | None):
    """``filter=`` as a pyarrow expression: one already, or the ``--where`` text (one condition,
    or a list of them that must all hold: ``"app = checkout"``, ``["ts >= '2026-01-12'",
    "value > 0"]``), read as the CLI reads it, its times typed as the data's columns."""
    if filter is None or (isinstance(filter, (list, tuple)) and not filter):  # no conditions: every row
        return None
    texts = [filter] if isinstance(filter, str) else filter
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        from .dataset import column_types
        from .where import parse_where

        return parse_where(list(texts), column_types(data, storage_options), name="filter=")
    import pyarrow.compute as pc

    if not isinstance(filter, pc.Expression):
        raise ModelFactoryError(f"filter= takes a pyarrow expression (ds.field('app') == 'checkout') or the "
                                f"--where text ('app = checkout', or a list of such conditions); got "
                                f"{type(filter).__name__} {filter!r}.")
    return filter


def _input_record(info: DatasetInfo, filter: Any) -> dict:
    """What a job read, for its manifest: the data (url, fingerprint, rows and files as discovered,
    partition keys) and the filter (``--where``) its rows were read with."""
    return {"url": info.source.url, "fingerprint": info.fingerprint(), "rows": info.rows, "files": len(info.files),
            "partition_keys": list(info.source.partition_keys), "filter": filter_record(filter)}


def _raise_unit_failure(run_id: str, err: BaseException, *, resumable: bool = False) -> None:
    again = (f"run again with resume={run_id!r} (--resume {run_id}): the units already done are kept"
             if resumable else "run again")
    # the scheduler gone: futures cancelled, or (when it went while a result was being fetched)
    # the client's own connection closed under it
    if ("scheduler-connection-lost" in str(err)
            or type(err).__name__ in ("FutureCancelledError", "CommClosedError")):
        # (Dask's own words, a task key and a line of its source, say no more to a user: -v shows them)
        raise ModelFactoryError(
            f"Run {run_id} stopped: the connection to the Dask scheduler was lost. "
            f"Nothing was committed; once the scheduler and its workers are back, {again}.") from err
    what = kernel.describe_error(err)
    # the client reached the data (discovery) with its credentials; a unit on a worker did not
    access = ("" if not any(name in what for name in _WORKER_ACCESS_ERRORS) else
              " This process reached the data before the run started, but the Dask workers read and write with "
              "their own credentials and endpoint (their environment, ~/.aws, an instance role): give them the "
              "same AWS_* settings, or pass them in storage_options (--config), which travel with the job.")
    raise ModelFactoryError(
        f"Run {run_id} stopped: a work unit failed outside any group ({what}).{access} "
        f"Nothing was committed; fix the cause and {again}."
    ) from err


#: Errors of a unit reaching S3 that mean the worker lacks what this process has.
#: (Not a refused connection: the endpoint going away mid-run gives that too.)
_WORKER_ACCESS_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId",
                         "SignatureDoesNotMatch")


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def train(data: str, *, by: Sequence[str] | str, store: str, model: Any = "seasonal",
          time: str | None = None, target: str | None = None, features: Sequence[str] | str = (),
          params: Mapping | None = None, cluster: Any = None, workers: int | None = None,
          unit_rows: int | None = None, filter: Any = None, storage_options: dict | None = None,
          resume: bool | str = False, retrain: str | None = None, base: str = "latest",
          config: str | None = None, progress: bool = False) -> Run:
    """Fit one model per group of ``data`` and commit them to ``store`` as one run.

    Parameters
    ----------
    data : str
        A Parquet file or folder (Hive-partitioned or not), local or ``s3://``.
    by : list of str, or str
        The group keys: partition keys, ordinary columns, or both (a string is split at commas:
        ``"app,site"``).
    store : str
        The model store folder or URL (made by the first run).
    model : str, Model class or instance
        A built-in model name (see ``modelfactory.models.registry``; default ``"seasonal"``), a name
        given to :func:`register_model`, or your own :class:`~modelfactory.models.base.Model`.
    time : str, optional
        The time column (a timestamp); needed by models of a series over time (most).
    target : str
        The numeric column the models fit and score (required; None is refused).
    features : list of str, or str
        Feature columns, for models that use them (``random_forest``, ``isolation_forest``...).
    params : dict, optional
        Model parameters, when ``model`` is a name or a class (not with an instance).
    cluster : None, "local", "inline", "kube", address, Client or cluster
        Where to run: a LocalCluster made for the call and closed after it (``"local"``, the
        default), this process without Dask (``"inline"``), a DaskCluster on Kubernetes made for
        the job (``"kube"``, see docs/kubernetes.md), an existing scheduler (``"tcp://host:8786"``),
        or a ``distributed.Client`` or cluster object, used as it is and never closed (see
        :mod:`modelfactory.run`).
    workers : int, optional
        Workers of the cluster the call makes: local processes (default: one per CPU this process
        may use) or the pods of a fixed-size ``"kube"`` cluster (default 2).  Not used with
        ``"inline"``, an address, a Client or a cluster object (a warning says so).
    unit_rows : int, optional
        Rows per work unit (default: chosen from the Parquet row counts and the workers).  A
        resumed run keeps the units it was planned with, and says so when this differs.
    filter : pyarrow.dataset.Expression, str or list of str, optional
        Rows to keep, pushed down to the Parquet reader: an expression
        (``ds.field("app") == "checkout"``), or the CLI's ``--where`` text
        (``"app = checkout"``, ``["ts >= '2026-01-12'", "value > 0"]``: all must hold).
        ``apply`` and ``score`` take it the same way.
    storage_options : dict, optional
        fsspec options (credentials, endpoint...) for ``s3://`` and other remote paths of the data
        and the store, used on the client and on the workers.
    resume : bool or str
        A run id (or True, or 1, for the newest one of the same job) that was interrupted: units
        it already wrote are reused, not recomputed.  True with nothing of this job to resume
        starts a new run (``summary["resumed"]`` says which).  False (0, the default): a new run.
    retrain : "failed" or "changed", optional
        Refit only the groups that failed or were skipped in ``base``, or whose
        input changed since it; the other models are carried over.
    base : str
        The run that ``retrain`` starts from (default: the latest; when resuming a
        retrain by its run id, the run it started from).  Only with ``retrain``.
    config : str or path, optional
        A TOML settings file (default: ``$MODELFACTORY_CONFIG``, if set); see
        :mod:`modelfactory.config` and docs/kubernetes.md.
    progress : bool
        Show a progress bar (tqdm) and the Dask dashboard's address on stderr (default False).

    Returns
    -------
    Run
        ``.summary`` and ``.groups``; the models are in ``ModelStore(store)``.

    Notes
    -----
    ``cluster``, ``workers``, ``unit_rows`` and ``storage_options`` left as None come from the
    settings: the ``MODELFACTORY_CLUSTER``, ``MODELFACTORY_WORKERS``, ``MODELFACTORY_UNIT_ROWS``
    and ``MODELFACTORY_STORAGE_OPTIONS`` environment variables, then the config file, then the
    defaults (:mod:`modelfactory.config`).  The same holds for :func:`score`,
    :func:`apply` and :func:`map_keys`.

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=20, days=3)
    >>> run = modelfactory.train(f"{d}/data", by=["app", "site"], time="ts", target="value",
    ...                          store=f"{d}/store", cluster="inline")
    >>> run.summary["counts"]
    {'ok': 20, 'failed': 0, 'skipped': 0}
    """
    conf = job_settings(cluster, workers=workers, unit_rows=unit_rows, storage_options=storage_options,
                        config=config)
    storage_options, unit_rows = conf.storage_options or None, conf.unit_rows
    resume = _resume_argument(resume)
    by_ = _as_tuple(by, "by")
    feats = _as_tuple(features, "features")
    mspec = resolve_model(model, params)
    needs_time, needs_features = mspec.data_needs()  # may depend on the parameters
    if needs_time and time is None:
        raise ModelError(f"Model {mspec.name!r} needs a time column: pass time='...' (--time).")
    if target is None:
        raise ModelError("train needs a target column: pass target='...' (--target).")
    if needs_features and not feats:
        raise ModelError(f"Model {mspec.name!r} needs feature columns: pass features=[...] (--features).")
    if feats and not mspec.uses_features():  # stored with the run, score would need them in the new data
        raise ModelError(f"Model {mspec.name!r} does not use feature columns (it models {target!r} over time"
                         f"{' from its window' if mspec.name == 'autoencoder' else ''}): leave features= "
                         f"(--features {','.join(feats)}) out. Models that use them: random_forest, "
                         "isolation_forest, autoencoder with input='features', or your own.")
    if time is not None and time in by_:  # each group one row: every group failed, "repeats a timestamp"
        raise SchemaError(f"The time column {time!r} is also one of the keys by={list(by_)}: each group would be "
                          f"one point in time. Drop {time!r} from by= (--by); the series of a group run along it.")
    if base not in (None, "latest") and retrain is None:  # it named a run that nothing read
        raise ModelFactoryError(f"base={base!r} (--base) names the run that retrain='failed' or 'changed' "
                                "(--only-failed, --only-changed) starts from: pass one of them too, or leave base "
                                "out to train every group.")
    if target in feats:  # random_forest then copies each value: its dips and peaks are "expected"
        raise SchemaError(f"The target column {target!r} is also one of the features {list(feats)}: a regressor "
                          "given the value it is to predict learns to copy it and expects each anomaly as it "
                          "comes (isolation_forest uses the target already: include_target). Drop "
                          f"{target!r} from features (--features).")
    # a key named as a column of score's group table (anomalies, max_score) too: such a run could never be scored
    for kind in ("train", "score"):
        _refuse_reserved_names(kind, keys=by_, fix="rename it in the data (e.g. http_status) and pass that to by=.")
    _refuse_reserved_names("train", scored=scored_columns(time, target, feats),
                           fix="rename it in the data; a run with it could never be scored.")
    filter = _as_filter(filter, data, storage_options)
    info = discover(data, storage_options=storage_options, null_check=by_, filter=filter)
    check_columns(info, by=by_, time=time, target=target, features=feats)
    st = ModelStore(store, storage_options=storage_options)
    # a store inside the data would be read as data by the next run
    _keep_apart(st.location, "model store", Location.of(data, storage_options), "the input data", may_hold=True)
    st.location.check_bucket(StoreError)
    if unit_rows is not None and unit_rows < 1:
        raise PlanError(f"unit_rows must be a positive number of rows; got {unit_rows}.")
    columns = tuple(dict.fromkeys([*by_, *([time] if time else []), target, *feats]))
    job = {"by": list(by_), "time": time, "target": target, "features": list(feats),
           "model": mspec.name, "params": _as_json(mspec.params), "serializer": mspec.serializer,
           "filter": None if filter is None else str(filter)}
    base_src, base_id = None, None
    if retrain is not None:
        if retrain not in ("failed", "changed"):
            raise ModelFactoryError(f"retrain must be 'failed' or 'changed'; got {retrain!r}.")
        if isinstance(resume, str) and base in (None, "latest"):
            # the run being resumed retrains from the base it started from, whichever run is
            # LATEST now (another run may have committed since it was interrupted)
            started = [p for p in st.pending() if p.get("run_id") == resume and p.get("base_run")]
            if started:
                base = started[0]["base_run"]
        base_man = st.manifest(base)
        base_id = base_man["run_id"]
        was = dict(base_man["spec"])
        if was.get("model") == mspec.name:  # (another model's parameters are shown as the run has them)
            was["params"] = _with_defaults(mspec.cls, was.get("params"))
        diff = [k for k in ("by", "time", "target", "features", "model", "params") if not _same_json(was.get(k), job[k])]
        if diff:
            raise ModelFactoryError(
                f"Cannot retrain only the {retrain} groups of run {base_id}: it differs in {diff} "
                f"(was {[was.get(k) for k in diff]}, now {[job[k] for k in diff]}). Train a full run instead.")
        base_src = model_source(st, base_man, info, trust=True)
        from .scoring import check_key_types

        check_key_types(base_src, by_, info.schema)
        # the models carried over were fitted on the base run's times: a run of them recorded with
        # times of the other kind (naive vs zoned) would let scoring take such data as theirs
        check_time_zone(info, time, base_man)
        check_value_types(info, base_man)
    digest = _digest(info.fingerprint(), job, retrain, base_id, mspec.cls.__module__, mspec.cls.__qualname__)
    finished = _finish_interrupted_commit(st, digest, resume, {"spec": job, "retrain": retrain, "base_run": base_id})
    if finished is not None:
        return finished
    new_store = not st.location.fs.exists(st.location.root)  # this run makes it
    run_id, planning = _begin_run(st, digest, resume, unit_rows,
                                  {"spec": job, "retrain": retrain, "base_run": base_id})
    resumed = "limit" in planning  # planned as the interrupted run was
    if resumed and unit_rows is not None and unit_rows != planning["target_rows"]:
        # By design (its units, and so its parts, must be those it began with), but the new value
        # went unused without a word: a user resuming with a smaller unit_rows to get past a
        # worker's memory limit saw the same units run out of memory again.
        where = {"argument": "unit_rows=, --unit-rows"}.get(conf.sources["unit_rows"], conf.sources["unit_rows"])
        log.warning("unit_rows=%d (%s) is ignored: run %s resumes with the units it was planned with "
                    "(unit_rows=%s), so the units it already finished are kept; start a new run (without resume) "
                    "to plan with another unit_rows", unit_rows, where, run_id, planning["target_rows"])
    leaf_keys = tuple(k for k in info.source.partition_keys if k in by_)
    spec = JobSpec("train", by_, info.source, columns, time, target, feats, filter, mspec,
                   sink=st.location, groups_prefix=f"runs/{run_id}/parts/", leaf_keys=leaf_keys,
                   models=base_src, resume=resume is not False, retrain=retrain, run_id=run_id)
    t0 = _time.perf_counter()
    resumable = False  # once its pending.json is written
    try:
        with open_client(cluster, settings=conf) as client:
            check_code(client, spec)
            plan_ = plan(info, by_, workers=task_slots(client), **planning)
            st.write(f"runs/{run_id}/pending.json", json.dumps(
                {"run_id": run_id, "digest": digest, "unit_rows": plan_.target_rows, "unit_limit": plan_.limit,
                 "unit_multiple": plan_.multiple, "spec": job, "retrain": retrain, "base_run": base_id}).encode(),
                "Nothing was trained: pick a store this user can write to (with room).")
            resumable = True
            bar = Progress(len(plan_.units), f"train {mspec.name}", progress, client)
            try:
                results = run_units(client, spec, info, plan_, bar)
            except ModelFactoryError:
                raise
            except Exception as err:  # noqa: BLE001 - a unit failed: nothing is committed
                _raise_unit_failure(run_id, err, resumable=True)
            finally:
                bar.close()
    except KeyboardInterrupt:  # Ctrl-C, while units ran or their cluster closed: which run to resume
        if not resumable:
            raise
        raise KeyboardInterrupt(f"run {run_id} was not committed; resume it with resume={run_id!r} "
                                f"(train --resume {run_id}): the units already done are kept") from None
    summary = _summarise("train", results, plan_, _time.perf_counter() - t0)
    if summary["groups"] == 0:  # an empty run must not become LATEST: remove it, commit nothing
        st.location.rm(f"runs/{run_id}", recursive=True)
        if new_store and not st.location.fs.find(st.location.root):  # nor leave an empty store behind
            with contextlib.suppress(OSError, ValueError):  # (a tidy-up: never in the way of the error below)
                st.location.rm(recursive=True)
        what = f"The filter {filter} leaves no rows" if filter is not None else "There are no rows"
        raise DatasetError(f"{what} of {info.source.url!r}: there is no group to train, so nothing was "
                           f"committed (LATEST still names {st.latest_named()}). Check the filter.")
    carried: dict[str, int] = {}
    for r in results:
        for k, v in r.carried.items():
            carried[k] = carried.get(k, 0) + v
    lineage = {"retrain": retrain, "base_run": base_id, "carried_over": carried}
    if resume not in (False, None):  # whether there was a run to resume, in the summary a scheduled job logs
        summary["resumed"] = resumed
    if retrain is not None:
        kept = sum(carried.values())  # what the retrain did, where its summary is read (the CLI's, --json)
        lost = sum(r.lost for r in results)
        summary["retrain"] = {"mode": retrain, "base_run": base_id, "refit": summary["groups"] - kept,
                              "carried_over": kept, "lost": lost}
        if lost:  # a nightly retrain that could not refit a group took its working model away, exit 0
            log.warning("%d group(s) had a model in run %s whose refit in run %s failed or was skipped: this run has "
                        "no model for them (each one's error says why). Score them with run=%r (--run) until they "
                        "refit, or fix their data and retrain them (retrain='failed', --only-failed)", lost, base_id,
                        run_id, base_id)
        lineage["not_in_input"] = _base_groups_left_out(st, base_id, by_, [p for r in results for p in r.parts])
        if lineage["not_in_input"]:
            log.warning("%d group(s) of run %s are not in this input, so run %s has no model for them: a retrain's "
                        "groups are those of its input (score them with run=%r)", lineage["not_in_input"], base_id,
                        run_id, base_id)
    # What loading the pickled models imports by name, read off the models the units wrote (and
    # carried over): score checks it before it runs.  Out of `job`, so out of the run's digest: an
    # interrupted run resumes whatever its models need (or an earlier modelfactory recorded).
    imports = list(dict.fromkeys(name for r in results for name in r.imports))
    manifest = {
        "kind": "train",
        "spec": {**job, **({"imports": imports} if mspec.serializer != "native" else {})},
        "lineage": lineage,
        "input": {"url": info.source.url, "fingerprint": info.fingerprint(), "rows": info.rows,
                  "files": len(info.files), "partition_keys": list(info.source.partition_keys),
                  **({"time_type": str(info.schema.field(time).type)} if time else {}),
                  "value_types": value_types(info, [target, *feats]),
                  # the rows of the input the run was fitted on: `plot --store` draws only those
                  "filter": filter_record(filter)},
        "summary": summary,
        "units": [{"id": r.unit_id, "groups": r.groups, "seconds": round(r.seconds, 4)} for r in results],
        # Which part holds which leaf (values of the partition keys that are group keys), so a
        # lookup or a scoring unit reads only the parts it needs: one entry per part, in the order
        # of the parts (a unit whose groups ran one by one wrote a part per group: each lists
        # its own group's leaves).
        "index": {"keys": list(leaf_keys), "parts": [[list(k) for k in leaves] for r in results
                                                     for leaves in r.leaves_by_part()]},
    }
    if plan_.mode == "shuffle":
        # Without key folders the groups were spread over the units by Dask's hash of their keys:
        # which partition each part holds, so a scoring unit reads only the parts its keys hash
        # to (store.bucket_index).  The part of a group run by itself after its partition's worker
        # died gets the partition its keys hash to (None, read by every unit, if they hash to several).
        partition = {u.id: u.partition for u in plan_.units}
        n = len(plan_.units)
        manifest["buckets"] = {"keys": list(by_), "n": n,
                               "parts": [partition[r.unit_id] if r.unit_id in partition else
                                         _part_bucket(st, p, by_, n) for r in results for p in r.parts]}
    fitted_any = summary["counts"]["ok"] > 0
    st.commit(run_id, manifest, [p for r in results for p in r.parts], latest=fitted_any)
    run = Run(run_id, "train", summary, store=st, errors=[e for r in results for e in r.errors])
    if not fitted_any and summary["groups"]:  # kept for inspection; scoring with it would score nothing
        log.warning("run %s fitted no model (%d failed, %d skipped; %s): it is committed for inspection, but "
                    "LATEST still names %s", run_id, summary["counts"]["failed"], summary["counts"]["skipped"],
                    run.commonest_problem(), st.latest_named(),
                    extra={"no_model": True})  # the CLI says it in its error: line
    return run


# ---------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------
def apply(data: str, *, by: Sequence[str] | str, func: Callable, schema: Any,
          input: str = "pandas", out: str | None = None, time: str | None = None,
          columns: Sequence[str] | None = None, cluster: Any = None, workers: int | None = None,
          unit_rows: int | None = None, filter: Any = None, storage_options: dict | None = None,
          overwrite: bool = False, config: str | None = None, progress: bool = False) -> Run:
    """Grouped map: run ``func`` on every group and collect the rows it returns.

    This is Spark's ``groupBy(...).applyInPandas(func, schema)`` without a JVM.

    Parameters
    ----------
    data : str
        A Parquet file or folder (Hive-partitioned or not), local or ``s3://``.
    by : list of str, or str
        The group keys: partition keys, ordinary columns, or both (``"app,site"`` too).
    func : callable
        Gets one group and returns rows matching ``schema`` (a pandas
        DataFrame, a dict of columns or of scalars for one row, or a
        pyarrow Table).  An exception it
        raises fails that group only (its message in ``run.groups``);
        ``raise modelfactory.SkipGroup("too few rows")`` marks it skipped.
    schema : pyarrow.Schema, mapping or DDL string
        The output columns, e.g. ``"app string, m double"``.
    input : "pandas", "arrow" or "numpy"
        What ``func`` gets: a pandas DataFrame (the default), a pyarrow Table
        slice, or a dict of column name to numpy array (views, no copies; a time with a
        zone as ``datetime64`` in UTC: numpy has no zones).
    out : str, optional
        Write results as Parquet to this folder (``part-*.parquet``, the
        group table under ``_groups/``, ``_manifest.json`` last); it must be new or empty,
        unless ``overwrite``.  Without it, results come back to the client: keep them small.
    time : str, optional
        Sort each group by this column.
    columns : list of str, optional
        Columns to read (default: all); the keys and ``time`` are read in any case.
    cluster : None, "local", "inline", "kube", address, Client or cluster
        Where to run, as for :func:`train` (default: a LocalCluster made for the call).
    workers : int, optional
        Workers of the cluster the call makes, as for :func:`train`.
    unit_rows : int, optional
        Rows per work unit (default: chosen from the Parquet row counts and the workers).
    filter : pyarrow.dataset.Expression, str or list of str, optional
        Rows to keep, as for :func:`train`.
    storage_options : dict, optional
        fsspec options for ``s3://`` and other remote paths of ``data`` and ``out``.
    overwrite : bool
        Empty a non-empty ``out`` folder (right before the units run) instead of refusing it
        (default False).  A folder that is, or holds, a model store or the input is refused even so.
    config : str or path, optional
        A TOML settings file (default: ``$MODELFACTORY_CONFIG``, if set).
    progress : bool
        Show a progress bar on stderr (default False).

    Notes
    -----
    ``cluster``, ``workers``, ``unit_rows`` and ``storage_options`` left as None come from the
    ``MODELFACTORY_*`` environment variables or the config file (see :func:`train`).

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=6, days=1)
    >>> import pandas as pd
    >>> def mean(df):
    ...     return pd.DataFrame({"app": [df.app.iloc[0]], "site": [df.site.iloc[0]],
    ...                          "m": [df.value.mean()]})
    >>> run = modelfactory.apply(f"{d}/data", by=["app", "site"], func=mean,
    ...                          schema="app string, site string, m double", cluster="inline")
    >>> len(run.to_pandas())
    6
    """
    conf = job_settings(cluster, workers=workers, unit_rows=unit_rows, storage_options=storage_options,
                        config=config)
    storage_options, unit_rows = conf.storage_options or None, conf.unit_rows
    by_ = _as_tuple(by, "by")
    if not callable(func):
        raise ModelFactoryError(f"func must be callable; got {type(func).__name__}.")
    if input not in _INPUTS:
        raise ModelFactoryError(f"input must be one of {_INPUTS}; got {input!r}.")
    out_schema = parse_schema(schema)
    _refuse_reserved_names("apply", keys=by_, fix="rename it in the data (e.g. http_status) and pass that to by=.")
    filter = _as_filter(filter, data, storage_options)
    info = discover(data, storage_options=storage_options, null_check=by_, filter=filter)
    wanted = tuple(columns) if columns is not None else tuple(info.schema.names)
    check_columns(info, by=by_, time=time, columns=wanted)
    cols = tuple(dict.fromkeys([*by_, *([time] if time else []), *wanted]))
    sink = _output(out, storage_options, overwrite, the_input_data=data) if out is not None else None
    run_id = new_run_id(_digest(info.fingerprint(), by_, repr(func), str(out_schema)))
    spec = JobSpec("apply", by_, info.source, cols, time, filter=filter, func=func, input=input,
                   out_schema=out_schema, sink=sink, groups_prefix="_groups/", data_prefix="part-",
                   claim=run_id if sink is not None else "")
    t0 = _time.perf_counter()
    with open_client(cluster, settings=conf) as client:
        check_code(client, spec)
        plan_ = plan(info, by_, workers=task_slots(client), target_rows=unit_rows)
        _empty_output(sink, run_id, overwrite)
        bar = Progress(len(plan_.units), "apply", progress, client)
        try:
            results = run_units(client, spec, info, plan_, bar)
        except BaseException as err:  # noqa: BLE001 - _units_stopped raises it, or the unit failure
            _units_stopped(sink, run_id, err, passthrough=(ModelFactoryError,))
        finally:
            bar.close()
    summary = _summarise("apply", results, plan_, _time.perf_counter() - t0)
    return _said_if_none_ok(table_run(run_id, "apply", summary, results, sink, out_schema,
                                      input=_input_record(info, filter)))


# ---------------------------------------------------------------------------
# map_keys
# ---------------------------------------------------------------------------
def map_keys(keys: Iterable, *, func: Callable, by: Sequence[str] | str | None = None,
             schema: Any = None, out: str | None = None, cluster: Any = None,
             workers: int | None = None, keys_per_unit: int | None = None,
             storage_options: dict | None = None, overwrite: bool = False, config: str | None = None,
             progress: bool = False) -> Run:
    """Run ``func(key)`` once per key on the cluster; the function loads its own data.

    ``keys`` are all scalars, all tuples of one length, or all dicts with the
    same names (then ``by`` defaults to those names); ``func`` gets each key as
    it was given (a dict key as a dict, its names in ``by`` order).  The values of each part of the keys
    make one column of the group table, so they must be of one type (ints and
    floats mix as floats).  Keys that do not fit are refused before anything
    runs, naming the first such key.  So are keys given more than once (a
    dict key with its names in another order is the same key): each key runs
    once and has one result.  An exception ``func`` raises for a key (even
    ``SystemExit``, from ``sys.exit()``) fails that key only, with its message
    in ``run.groups``; ``modelfactory.SkipGroup(reason)`` skips it.  So does a call that keeps
    killing its worker process (a crash in native code, out of memory): on a
    cluster the keys of its unit run again one by one, and that key fails.

    With ``schema``, each call returns rows (like :func:`apply`) and
    ``run.to_pandas()`` gives them all; without, ``run.results`` maps each ok
    key to what ``func`` returned (keep those small); a tuple or dict key is
    a tuple of its values there (in ``by`` order), a one-part key its value.
    ``out`` (with ``schema``) writes the rows as Parquet under that folder
    instead, with the group table under ``out/_groups/``; like :func:`apply`,
    the folder must be new or empty, or ``overwrite=True`` empties it first.

    Parameters
    ----------
    keys : iterable
        The keys: scalars, tuples of one length, or dicts with the same names (at least one).
    func : callable
        Called once per key, with the key as it was given.
    by : list of str, or str, optional
        Names of the key's parts, the group table's key columns (default: the dict keys'
        names, else ``key``, or ``key0``, ``key1``... for tuples).
    schema : pyarrow.Schema, mapping or DDL string, optional
        The columns of the rows ``func`` returns (as for :func:`apply`); without it,
        ``run.results`` holds what ``func`` returned.
    out : str, optional
        With ``schema``: write the rows as Parquet to this folder, new or empty unless
        ``overwrite``.
    cluster : None, "local", "inline", "kube", address, Client or cluster
        Where to run, as for :func:`train` (default: a LocalCluster made for the call).
    workers : int, optional
        Workers of the cluster the call makes, as for :func:`train`.
    keys_per_unit : int, optional
        Keys per work unit (task), at least 1 (default: the keys spread over about eight units
        per worker thread, at most 1000 keys each).
    storage_options : dict, optional
        fsspec options for an ``s3://`` (or other remote) ``out``.
    overwrite : bool
        Empty a non-empty ``out`` folder instead of refusing it (default False).
    config : str or path, optional
        A TOML settings file (default: ``$MODELFACTORY_CONFIG``, if set).
    progress : bool
        Show a progress bar on stderr (default False).

    Notes
    -----
    ``cluster``, ``workers`` and ``storage_options`` left as None come from the
    ``MODELFACTORY_*`` environment variables or the config file (see :func:`train`).

    Examples
    --------
    >>> run = map_keys(["a", "b", "c"], func=str.upper, cluster="inline")
    >>> run.results
    {'a': 'A', 'b': 'B', 'c': 'C'}
    """
    conf = job_settings(cluster, workers=workers, storage_options=storage_options, config=config)
    storage_options = conf.storage_options or None
    # Checked as unit_rows is (config's "an integer >= 1", the same error class): a negative
    # count made `rows[i:i + per]` empty, so -1 ran no key at all and said "0 groups", 0 fell
    # back to the default unseen, and 1.5 or "2" reached range() as a bare TypeError.  A bool is
    # an int to Python but no count; numpy integers are refused as unit_rows refuses them.
    if keys_per_unit is not None and (isinstance(keys_per_unit, bool) or not isinstance(keys_per_unit, int)
                                      or keys_per_unit < 1):
        raise ClusterError(f"keys_per_unit must be an integer >= 1 (keys per work unit; leave it None to choose "
                           f"it from the number of keys and workers); got {keys_per_unit!r} "
                           f"({type(keys_per_unit).__name__}).")
    if not callable(func):
        raise ModelFactoryError(f"func must be callable; got {type(func).__name__}.")
    keys = list(keys)
    if not keys:
        raise ModelFactoryError("map_keys got no keys.")
    rows, names = _key_rows(keys)
    width = len(rows[0])
    by_ = _as_tuple(by, "by") or names or tuple(f"key{i}" if width > 1 else "key" for i in range(width))
    if len(by_) != width:
        raise ModelFactoryError(f"by names {len(by_)} column(s) but the keys have {width} part(s).")
    _refuse_reserved_names("map_keys", keys=by_, fix="name the key otherwise (by=..., or the keys' dict names).")
    key_columns = _key_columns(keys, rows, by_)
    key_types = tuple(c.type for c in key_columns)
    # duplicates as the group table will hold them ("a" and b"a" are one binary value there)
    _refuse_duplicates(keys, list(zip(*[c.to_pylist() for c in key_columns])))
    out_schema = parse_schema(schema) if schema is not None else None
    if out is not None and out_schema is None:
        raise ModelFactoryError("out= needs schema= (the rows func returns are written as Parquet).")
    sink = _output(out, storage_options, overwrite) if out is not None else None
    run_id = new_run_id(_digest(rows[:1000], repr(func)))
    # func gets each key as it was given: a dict as a dict, a one-part tuple as a tuple
    call = (functools.partial(_call_with_dict, func, names) if names
            else functools.partial(_call_with_tuple, func) if width == 1 and isinstance(keys[0], tuple) else func)
    spec = JobSpec("map_keys", by_, func=call, out_schema=out_schema, sink=sink,
                   groups_prefix="_groups/", data_prefix="part-", key_types=key_types,
                   claim=run_id if sink is not None else "")
    t0 = _time.perf_counter()
    with open_client(cluster, settings=conf) as client:
        check_code(client, spec)
        slots = task_slots(client)
        per = keys_per_unit or max(1, min(1000, math.ceil(len(rows) / (slots * 8))))
        chunks = [rows[i:i + per] for i in range(0, len(rows), per)]
        ids = [f"k{i:05d}-{_digest(c)[:12]}" for i, c in enumerate(chunks)]
        _empty_output(sink, run_id, overwrite)
        bar = Progress(len(chunks), "map_keys", progress, client)
        tag = task_tag()
        try:
            results = execute(client, functools.partial(_run_keys, spec), list(zip(ids, chunks)),
                              keys=[f"mf-{i}-{tag}" for i in ids], progress=bar,
                              on_killed=functools.partial(isolate_keys, spec, run_keys=_run_keys))
        except BaseException as err:  # noqa: BLE001 - _units_stopped raises it, or the unit failure
            _units_stopped(sink, run_id, err)
        finally:
            bar.close()
    summary = _summarise("map_keys", results, None, _time.perf_counter() - t0)
    return _said_if_none_ok(table_run(run_id, "map_keys", summary, results, sink, out_schema))


def _key_rows(keys: list) -> tuple[list[tuple], tuple[str, ...] | None]:
    """The keys as tuples of values, and the names of dict keys (None for scalars and tuples).

    Every key is of one kind (all dicts with the same names, all tuples of one length, or all
    scalars); anything else is refused here, naming the first key that does not fit."""
    def kind(k):
        return "dict" if isinstance(k, dict) else "tuple" if isinstance(k, tuple) else "scalar"

    for i, k in enumerate(keys):
        if isinstance(k, (list, set, frozenset)):
            raise ModelFactoryError(f"map_keys: key #{i} {_short(k)} is a {type(k).__name__}; keys are scalars, "
                                    "tuples or dicts (pass a tuple).")
    first = keys[0]
    k0 = kind(first)
    for i, k in enumerate(keys):
        if kind(k) != k0:
            what = type(k).__name__ if kind(k) == "scalar" else kind(k)
            raise ModelFactoryError(f"map_keys: key #{i} {_short(k)} is a {what}, but key #0 is a {k0}: "
                                    "give every key as the same kind (all scalars, all tuples or all dicts).")
    if k0 == "dict":
        names = tuple(first)
        if not names:
            raise ModelFactoryError("map_keys: key #0 {} has no parts.")
        if not all(isinstance(n, str) for n in names):
            raise ModelFactoryError(f"map_keys: key #0 {_short(first)}: dict keys name their parts with strings "
                                    "(the column names of the key).")
        want = set(names)
        rows = []
        for i, k in enumerate(keys):
            if k.keys() != want:
                raise ModelFactoryError(
                    f"map_keys: key #{i} {_short(k)} has the names {', '.join(map(str, k))}; every dict key "
                    f"must have the names of the first: {', '.join(names)}.")
            rows.append(tuple(k[n] for n in names))
        return rows, names
    if k0 == "tuple":
        width = len(first)
        if not width:
            raise ModelFactoryError("map_keys: key #0 () has no parts.")
        for i, k in enumerate(keys):
            if len(k) != width:
                raise ModelFactoryError(f"map_keys: key #{i} {_short(k)} has {len(k)} part(s); key #0 has {width}: "
                                        "all keys must have the same number of parts.")
        return keys, None
    return [(k,) for k in keys], None


def _key_columns(keys: list, rows: list[tuple], by: tuple[str, ...]) -> list[pa.Array]:
    """Each part of the keys as an Arrow column; a part whose values do not make one column
    (``1`` and ``"a"``) is refused, naming the first key that does not fit."""
    columns = []
    for i, name in enumerate(by):
        values = [r[i] for r in rows]
        part = "" if len(by) == 1 and not isinstance(keys[0], (dict, tuple)) else f"{name!r} "
        try:
            column = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            column = _uint64_column(values)  # ids of 2**63 and more (a uint64 key column of data)
            # (a NaN among strings, what a column's unique() gives, does not convert: None)
        if column is None or column.null_count or (pa.types.is_floating(column.type)
                                                   and pa.compute.any(pa.compute.is_nan(column)).as_py()):
            bad = next((j for j, v in enumerate(values) if _missing_value(v)), None)  # (one by one: 0.4 µs a key)
            if bad is not None:
                raise ModelFactoryError(f"map_keys: key #{bad} {_short(keys[bad])}: its {part}value is missing; keys "
                                        "must not be null (None, NaN, NA or NaT), as group keys anywhere: leave it "
                                        "out, or give it a value (e.g. 'unknown').")
        _refuse_mixed_zones(keys, values, name if len(by) > 1 or isinstance(keys[0], (dict, tuple)) else None)
        if column is not None and pa.types.is_date(column.type):  # Arrow cut a datetime beside dates to its day
            import datetime

            kinds = [isinstance(v, datetime.datetime) for v in values]
            if any(kinds) and not all(kinds):
                bad = kinds.index(not kinds[0])
                raise ModelFactoryError(
                    f"map_keys: key #{bad} {_short(keys[bad])}: its {part}value {_short(values[bad])} "
                    f"({type(values[bad]).__name__}) does not go with the earlier keys' "
                    f"({type(values[0]).__name__}); give each part of the keys values of one type.")
        if column is not None:
            columns.append(column)
            continue
        # the shortest failing prefix: values[:hi] fails, values[:lo] converts (none do, when the first
        # value alone fails: with lo = 1 the key after it was named, a 5 that "does not fit")
        lo, hi = 0, len(values)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                pa.array(values[:mid])
                lo = mid
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                hi = mid
        bad, v = hi - 1, values[hi - 1]
        whole = [isinstance(x, int) and not isinstance(x, bool) for x in values]
        if all(whole) and min(values) < 0 and max(values) >= 2**63 and max(values) < 2**64:
            # each fits a 64-bit integer type (int64 or uint64), but no one type holds both
            big, neg = values.index(max(values)), values.index(min(values))
            raise ModelFactoryError(
                f"map_keys: key #{big} {_short(keys[big])} has a {part}value of 2**63 or more, which only an "
                f"unsigned 64-bit key column holds, and key #{neg} {_short(keys[neg])} a negative one, which "
                "it cannot; pass these keys as text.")
        if isinstance(v, int) and not isinstance(v, bool) and all(whole[:bad]):
            raise ModelFactoryError(f"map_keys: key #{bad} {_short(keys[bad])}: its value {_short(v)} does not fit "
                                    "in a 64-bit integer, the type of a key column; pass it as text.")
        try:
            before = str(pa.array(values[:bad]).type) if bad else None
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            before = None
        raise ModelFactoryError(
            f"map_keys: key #{bad} {_short(keys[bad])}: its {part}value {_short(v)} ({type(v).__name__}) does not go "
            f"with the earlier keys' ({before or 'values'}); give each part of the keys values of one type.")
    return columns


def _uint64_column(values: list) -> pa.Array | None:
    """``values`` as a uint64 column when they are whole numbers from 0 to 2**64 - 1 (Arrow infers
    int64, which stops at 2**63 - 1), else None."""
    if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in values):
        return pa.array(values, pa.uint64())
    return None


def _missing_value(v) -> bool:
    """None, a float NaN, pandas' NA or NaT, numpy's NaT: a missing value as a key."""
    if v is None or type(v).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(v, float) or type(v).__module__ in ("numpy", "decimal"):
        try:
            return bool(v != v)  # noqa: PLR0124 - NaN and NaT are the values not equal to themselves
        except (TypeError, ValueError):
            return False
    return False


def _refuse_mixed_zones(keys: list, values: list, name: str | None) -> None:
    """Refuse times with a zone beside times without one in one part of the keys: Arrow takes a
    naive time as UTC, a guess (it may be local), as the time columns of data are not taken."""
    import datetime

    import numpy as np

    aware = naive = None
    for j, v in enumerate(values):
        if isinstance(v, datetime.datetime):
            zoned = v.tzinfo is not None and v.utcoffset() is not None
        elif isinstance(v, np.datetime64):
            zoned = False
        else:
            continue
        if zoned and aware is None:
            aware = j
        elif not zoned and naive is None:
            naive = j
        if aware is not None and naive is not None:
            part = f"{name!r} " if name else ""
            raise ModelFactoryError(
                f"map_keys: key #{aware} {_short(keys[aware])} has a {part}time with a time zone and key #{naive} "
                f"{_short(keys[naive])} one without: a time without a zone could be UTC or local, so the mix is "
                "refused rather than guessed. Give every time a zone (or none).")


def _refuse_duplicates(keys: list, rows: list[tuple]) -> None:
    """Refuse keys given more than once (each key runs once and has one result), naming a few."""
    seen: dict[tuple, list] = {}
    for i, r in enumerate(rows):
        try:
            hit = seen.get(r)
        except TypeError:
            raise ModelFactoryError(f"map_keys: key #{i} {_short(keys[i])} holds a value that cannot be hashed; "
                                    "keys are scalars, tuples or dicts of plain values.") from None
        if hit is None:
            seen[r] = [i, 1]
        else:
            hit[1] += 1
    dups = [(i, n) for i, n in seen.values() if n > 1]
    if dups:
        shown = ", ".join(f"{_short(keys[i])} ({n} times)" for i, n in dups[:3])
        more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
        raise ModelFactoryError(
            f"map_keys got {len(dups)} key{'s' if len(dups) > 1 else ''} more than once: {shown}{more} "
            f"({len(keys)} keys, {len(seen)} distinct). Each key runs once and has one result: pass each key "
            "once (for scalars and tuples, list(dict.fromkeys(keys)) drops repeats and keeps the order).")


def _call_with_tuple(func: Callable, key):
    """Call ``func`` with a one-part tuple key (the unit holds its value)."""
    return func((key,))


def _short(value, n: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def _call_with_dict(func: Callable, names: tuple[str, ...], key):
    """Call ``func`` with a dict key, rebuilt from the values the unit holds."""
    return func(dict(zip(names, key if len(names) > 1 else (key,))))


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------
def score(data: str, *, store: str, out: str, run: str = "latest", cluster: Any = None,
          workers: int | None = None, unit_rows: int | None = None, filter: Any = None,
          storage_options: dict | None = None, overwrite: bool = False, trust: bool = False,
          config: str | None = None, progress: bool = False, keep: Sequence[str] | str | None = None) -> Run:
    """Score new rows of ``data`` with the models of one committed run of ``store``.

    Data and models meet on the workers: each unit reads its slice of the data
    and only the store parts that hold its groups.  Scored rows (keys, time,
    target, features, the columns of ``keep`` -- a request id, say -- then
    ``expected``, ``lower``, ``upper``, ``score``, ``is_anomaly``) are
    written under ``out`` as Parquet partitioned like the input; the group
    table (with ``anomalies`` and ``max_score`` per group) under
    ``out/_groups/``; ``out/_manifest.json`` last.  Groups without a model are
    ``skipped`` with the reason.

    Parameters
    ----------
    data : str
        A Parquet file or folder with the run's key, time, target and feature columns, local or
        ``s3://``.
    store : str
        The model store folder or URL.
    out : str
        The folder to write the scores to: new or empty, unless ``overwrite``.
    run : str
        The run whose models score: ``"latest"`` (the default, the run LATEST names) or a run id.
    cluster : None, "local", "inline", "kube", address, Client or cluster
        Where to run, as for :func:`train` (default: a LocalCluster made for the call).
    workers : int, optional
        Workers of the cluster the call makes, as for :func:`train`.
    unit_rows : int, optional
        Rows per work unit (default: chosen from the Parquet row counts and the workers).
    filter : pyarrow.dataset.Expression, str or list of str, optional
        Rows to score, as for :func:`train` (``"ts >= '2026-01-12'"``: a scheduled score's window).
    storage_options : dict, optional
        fsspec options for ``s3://`` and other remote paths of the data, the store and ``out``.
    overwrite : bool
        Empty a non-empty ``out`` folder (right before the units run) instead of refusing it
        (default False).  A folder that is, or holds, a model store or the input is refused even so.
    trust : bool
        Allow loading a run of pickled user models (not built-in ones), which runs code from the
        store: only for a store you trust (default False: such a run is refused).
    config : str or path, optional
        A TOML settings file (default: ``$MODELFACTORY_CONFIG``, if set).
    progress : bool
        Show a progress bar on stderr (default False).
    keep : list of str, or str, optional
        Other columns of ``data`` to copy into the scored rows (a request id, say).

    Returns
    -------
    Run
        ``.summary`` (counts, ``anomalies``, ``model_run``...) and ``.groups``; the scored rows
        are under ``out`` (``run.to_pandas()`` reads them).

    Notes
    -----
    ``cluster``, ``workers``, ``unit_rows`` and ``storage_options`` left as None come from the
    ``MODELFACTORY_*`` environment variables or the config file (see :func:`train`).

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=10, days=3)
    >>> _ = modelfactory.train(f"{d}/data", by=["app", "site"], time="ts", target="value",
    ...                        store=f"{d}/store", cluster="inline")
    >>> run = modelfactory.score(f"{d}/data", store=f"{d}/store", out=f"{d}/scores", cluster="inline")
    >>> run.summary["counts"]
    {'ok': 10, 'failed': 0, 'skipped': 0}
    """
    conf = job_settings(cluster, workers=workers, unit_rows=unit_rows, storage_options=storage_options,
                        config=config)
    storage_options, unit_rows = conf.storage_options or None, conf.unit_rows
    from .scoring import check_key_types, score_table, score_unit

    st = ModelStore(store, storage_options=storage_options)
    st.location.check_bucket(StoreError)  # an unreachable store: an error naming it, not botocore's
    man = st.manifest(run)
    sp = man["spec"]
    by_ = tuple(sp["by"])
    feats = tuple(sp["features"])
    if sp.get("serializer", "native") != "native" and not trust:
        raise StoreError(f"Run {man['run_id']!r} holds pickled user models: loading them runs code from the "
                         "store. Pass trust=True (CLI: --trust) only if you trust who wrote it.")
    filter = _as_filter(filter, data, storage_options)
    info = discover(data, storage_options=storage_options, null_check=by_, filter=filter,
                    allow_empty=True)
    kept = _as_tuple(keep, "keep")
    check_columns(info, by=by_, time=sp["time"], target=sp["target"], features=feats, columns=kept,
                  null_target=True, columns_role="kept (keep=, --keep)")
    # the run's names: a clash is fixed by training again on renamed columns
    _refuse_reserved_names("score", keys=by_, of=f" of run {man['run_id']}", fix=TRAIN_AGAIN,
                           scored=scored_columns(sp["time"], sp["target"], feats))
    _refuse_reserved_names("score", scored={c: "kept" for c in kept}, of=f" of {data!r}",
                           fix="rename it in the data to keep it (or leave it out of keep=, --keep).")
    _refuse_reserved_names("score", scored={k: "partition" for k in info.source.partition_keys if k not in by_},
                           of=f" of {data!r}", fix="rename those folders (or score a folder below them).")
    check_time_zone(info, sp["time"], man)
    check_value_types(info, man)
    src = model_source(st, man, info, trust)
    check_key_types(src, by_, info.schema)
    sink = _output(out, storage_options, overwrite, cli=True, the_input_data=data, the_model_store=store)
    extra = [k for k in info.source.partition_keys if k not in by_]
    columns = tuple(c for c in dict.fromkeys([*by_, *extra, sp["time"], sp["target"], *feats, *kept]) if c)
    run_id = new_run_id(_digest(info.fingerprint(), man["run_id"], *kept))
    spec = JobSpec("score", by_, info.source, columns, sp["time"], sp["target"], feats, filter,
                   sink=sink, models=src, groups_prefix="_groups/", data_prefix="part-", claim=run_id)
    t0 = _time.perf_counter()
    with open_client(cluster, settings=conf) as client:
        check_code(client, spec, models=(man["run_id"], sp["imports"]) if sp.get("imports") else None,
                   scored_model=sp["model"] if sp.get("serializer", "native") == "native" else None)
        # Against a run trained without key folders, shuffled into as many partitions as the run's
        # (or a divisor or multiple), on the keys as the run's types: each unit then needs only the
        # parts of the partitions its groups hashed to in training.  Data in key folders too: units
        # of folders would each hold groups of nearly every part, and read them all.
        plan_ = plan(info, by_, workers=task_slots(client), target_rows=unit_rows, align=src.n_buckets,
                     shuffle=bool(src.n_buckets))
        _empty_output(sink, run_id, overwrite, cli=True)
        bar = Progress(len(plan_.units), f"score {sp['model']}", progress, client)
        try:
            if plan_.mode == "files":
                units, tag = sorted(plan_.units, key=lambda u: -u.rows), task_tag()
                results = execute(client, functools.partial(score_unit, spec), units,
                                  keys=[f"mf-{u.id}-score-{tag}" for u in units], progress=bar,
                                  on_killed=functools.partial(isolate, spec, runner=score_table))
            else:
                results = run_shuffled(client, spec, info, plan_, bar, runner=score_table)
        except BaseException as err:  # noqa: BLE001 - _units_stopped raises it, or the unit failure
            _units_stopped(sink, run_id, err, passthrough=(ModelFactoryError,), cli=True)
        finally:
            bar.close()
    summary = _summarise("score", results, plan_, _time.perf_counter() - t0)
    summary["model_run"] = man["run_id"]
    summary["anomalies"] = sum(r.anomalies for r in results)
    summary["spec"] = {k: sp[k] for k in ("by", "time", "target", "features", "model")}
    if kept:
        summary["spec"]["keep"] = list(kept)
    import pyarrow.dataset as pds

    from .result import check_output, output_errors

    check_output(sink, run_id, results)  # before reading _groups/: it holds this job's files only
    with output_errors(sink, run_id):
        groups = pds.dataset(sink.path("_groups"), filesystem=sink.fs, format="parquet").to_table()
        mismatch = _loose_keys(st, man, sink, results, groups, by_)
    if mismatch:
        summary["key_mismatch"] = mismatch
        if summary["problems_complete"]:
            summary["problems"] = _reason_moved(summary["problems"], man["run_id"], mismatch)
        log.warning("%s", mismatch["warning"], extra={"key_mismatch": True})  # the CLI says it its own way
    silent = _models_without_rows(st, man, groups, by_, filter, info.schema, mismatch)
    if silent:
        summary["models_without_rows"] = silent
        log.warning("%s", silent["warning"], extra={"models_without_rows": True})
    top = groups.filter(pa.compute.greater(groups["anomalies"], 0)).sort_by(
        [("anomalies", "descending"), ("max_score", "descending")]).slice(0, 20)
    with output_errors(sink, run_id, "_anomalies.json"):
        sink.write_bytes("_anomalies.json", json.dumps(top.to_pylist(), indent=1, default=str).encode())
    folders = [k for k in info.source.partition_keys if k in columns]  # read back from folder names, as text
    from .scoring import SCORE_COLUMNS

    written = pa.schema([info.schema.field(c) for c in columns if c not in folders]
                        + [pa.field(c, pa.bool_() if c == "is_anomaly" else pa.float64()) for c in SCORE_COLUMNS]
                        + [pa.field(k, pa.string()) for k in folders])
    return _said_if_none_ok(table_run(run_id, "score", summary, results, sink, None,
                                      input=_input_record(info, filter), written=written))


def _said_if_none_ok(run: Run) -> Run:
    """``run``, with a warning when every one of its groups failed or was skipped: such a run
    returned without a word (train warns so too; the CLI says it in its error: line)."""
    s = run.summary
    if s["groups"] and not s["counts"]["ok"]:
        log.warning("run %s (%s): every one of its %d group(s) failed or was skipped (%s); run.groups has each "
                    "one's reason", run.id, run.kind, s["groups"], run.commonest_problem(), extra={"no_model": True})
    return run


def _models_without_rows(st: ModelStore, man: dict, groups: pa.Table, by: tuple[str, ...], filter,
                         schema: pa.Schema, mismatch: dict | None = None, shown: int = 5) -> dict | None:
    """The fitted models of run ``man`` whose groups have no row in the data a score job read
    (``groups``: its group table), as ``{"models": n, "examples": [key, ...], "warning": text}``;
    None when there is none, or when the keys cannot be compared (types that do not cast).

    A series that went silent (a pod deleted, an exporter down) sends no row at all: its group is
    not in the input, so not in the output either, and the job said nothing of a model it had
    and could not use.  Models that ``filter`` leaves out by their keys (``app == 'checkout'``,
    beside a time window or ``value IS NOT NULL`` or not) are not counted; a condition on other
    columns alone leaves every model in.  The filter is judged on each model's keys with the other
    columns unknown (null, then zero): where neither tells the keys' part apart (a scored group
    would fail it), every model is counted.  Nor are models whose keys the data writes in another
    type or format (``mismatch``, from :func:`_loose_keys`, says so already).  Only the key and status columns of the run's
    parts are read (:func:`scoring._stored_keys`: no model bytes).
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from .scoring import _loose_hits, _stored_keys

    cols = list(by)
    stored = _stored_keys(st.location, man["parts"], by, also=("status",))
    if stored is None:
        return None
    try:
        models = stored.filter(pc.equal(stored["status"].cast(pa.string()), "ok")).select(cols)
        scored = groups.select(cols)
        scored = pa.table([scored[k].cast(models.schema.field(k).type) for k in cols], names=cols)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as err:
        log.debug("could not compare the run's model keys with the scored groups: %s", err)
        return None
    missing = models.join(scored, keys=cols, join_type="left anti")
    if mismatch and missing.num_rows:
        explained, _ = _loose_hits(missing, groups.select(cols), missing.slice(0, 0), by)
        unexplained = [True] * missing.num_rows
        for i in explained:
            unexplained[i] = False
        missing = missing.filter(pa.array(unexplained))
    if filter is not None and missing.num_rows:
        # The filter on the keys as the data types them, every other column unknown (null): a row
        # it rules out for certain (False) is a model the user left out on purpose.  Trusted only
        # if it rules out none of the groups that were scored (they passed it, with their rows):
        # a term that is False on a null whatever the keys (`value IS NOT NULL`) would otherwise
        # rule out every model, the silent ones too.
        # A term such as `value IS NOT NULL` is False on nulls and True on a zero: the other
        # columns are tried as nulls, then as zeros ("", False, the epoch), the first that no
        # scored group fails being the one the keys are judged by.
        def ruled_out(keys: pa.Table, zero: bool) -> pa.Array:
            probe = pa.table([keys[f.name].cast(f.type) if f.name in cols else _filler(keys.num_rows, f.type, zero)
                              for f in schema], schema=schema)
            kept = pds.dataset(probe).to_table(columns={"kept": filter})["kept"]
            return pc.invert(pc.fill_null(kept, True))

        try:
            for zero in (False, True):
                if not pc.any(ruled_out(groups.select(cols), zero)).as_py():
                    missing = missing.filter(pc.invert(ruled_out(missing, zero)))
                    break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as err:
            log.debug("could not apply the filter to the run's model keys: %s", err)
    if not missing.num_rows:
        return None
    from .plot import format_key

    examples = [format_key(k) for k in missing.slice(0, shown).to_pylist()]
    n = missing.num_rows
    more = f" and {n - shown:,} more" if n > shown else ""
    return {"models": n, "examples": examples,
            "warning": f"{n:,} of the {models.num_rows:,} models of run {man['run_id']} had no row in the data scored "
                       f"({', '.join(examples)}{more}): a series that went silent, or one the data leaves out. They "
                       "are not in the output; ModelStore.groups() lists every model"}


def _filler(n: int, t: pa.DataType, zero: bool) -> pa.Array:
    """``n`` nulls of type ``t``, or (``zero``) ``n`` of its zero: 0, "", False, the epoch
    (nulls for a type with none, such as a list)."""
    if zero:
        for v in (0, "", False, b""):
            try:
                return pa.array([v] * n, pa.scalar(v).type).cast(t)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError):
                continue
    return pa.nulls(n, t)


def _reason_moved(problems: list[dict], run_id: str, mismatch: dict) -> list[dict]:
    """The summary's ``problems`` once :func:`_loose_keys` gave ``mismatch["groups"]`` of the groups
    without a model its own reason: counted from them, the commonest was the plain "no model"."""
    from .scoring import no_model_reason

    plain = no_model_reason(run_id)
    counts = {(p["status"], p["error"]): p["groups"] - (mismatch["groups"] if p["error"] == plain else 0)
              for p in problems}
    counts = {k: n for k, n in counts.items() if n > 0}
    counts[("skipped", mismatch["reason"])] = mismatch["groups"]
    return [{"status": st, "error": err, "groups": n} for (st, err), n in kernel.commonest(counts, 5)]


def _loose_keys(st: ModelStore, man: dict, sink: Location, results: list[UnitResult], groups: pa.Table,
                by: tuple[str, ...]) -> dict | None:
    """When groups found no model in run ``man`` because their keys are written in another
    type or format than the run's (``7`` for ``"07"``), say so in their skip reason (their
    ``_groups/`` files are written again) and return ``{"groups": n, "reason": ..., "warning": ...}``; None
    when there is no such group.  Keys are never matched loosely: the user decides."""
    from .scoring import loose_key_matches, loose_key_reason, no_model_reason

    error = groups["error"]
    if pa.types.is_dictionary(error.type):
        error = error.cast(error.type.value_type)
    lost = pa.compute.fill_null(pa.compute.equal(error, no_model_reason(man["run_id"])), False)
    if not pa.compute.any(lost).as_py():
        return None
    keys = groups.select(list(by))
    missing = keys.filter(lost)
    try:
        matched, example = loose_key_matches(st.location, man["parts"], by, missing,
                                             keys.filter(pa.compute.invert(lost)))
        if not matched:
            return None
        types = {k: plain_type(t) for k, t in zip(by, missing.schema.types)}
        reason, warning = loose_key_reason(man["run_id"], by, example, types, len(matched))
        wrong = set(zip(*[missing.take(pa.array(matched))[k].to_pylist() for k in by]))
    except (pa.ArrowException, ValueError, TypeError, KeyError) as err:  # a hint: never worth a failed job
        log.warning("could not compare the keys without a model with those of run %s: %s", man["run_id"],
                    kernel.describe_error(err))
        return None
    for r in results:
        r.parts = [_with_reason(sink, p, by, wrong, reason) if p.path.startswith("_groups/") else p
                   for p in r.parts]
    return {"groups": len(matched), "reason": reason, "warning": warning}


def _with_reason(sink: Location, part, by: tuple[str, ...], wrong: set, reason: str):
    """The group table ``part`` written again with ``reason`` as the error of the groups of ``wrong``."""
    import pyarrow.parquet as pq

    from ._io import write_parquet

    t = pq.read_table(pa.BufferReader(sink.read_bytes(part.path)))
    hit = [key in wrong for key in zip(*[t[k].to_pylist() for k in by])]
    if not any(hit):
        return part
    i = t.schema.get_field_index("error")
    t = t.set_column(i, t.schema.field(i), pa.compute.if_else(pa.array(hit), pa.scalar(reason), t["error"]))
    return write_parquet(sink, part.path, t)


def _run_keys(spec: JobSpec, item) -> UnitResult:
    """One unit of map_keys.  With a schema, each key's ``rows`` in the group table is the number
    of rows its call returned (the kernel has no input rows to count, and wrote 0 for every key)."""
    uid, keys = item
    if spec.out_schema is None:
        return kernel.run_keys(spec, uid, keys)
    from .grouped_map import to_table

    counts: list[int] = []  # one per call, in the order of the keys (the kernel calls each once)

    def counted(key):
        n = 0
        try:
            out = spec.func(key)
            table = to_table(out, spec.out_schema)
            if isinstance(table, Exception):  # the kernel fails the key with the same error
                return out
            n = table.num_rows
            return table
        finally:
            counts.append(n)

    res = kernel.run_keys(dataclasses.replace(spec, func=counted, sink=None), uid, keys)
    gt = res.group_table
    ok = [s == "ok" for s in gt["status"].to_pylist()]
    rows = pa.array([n if good else 0 for n, good in zip(counts, ok)], pa.int64())
    res.group_table = gt.set_column(gt.schema.get_field_index("rows"), "rows", rows)
    res.rows = int(pa.compute.sum(rows).as_py() or 0)
    if spec.sink is not None:  # written here, as kernel._finish writes them, now that the rows are counted
        from ._io import write_parquet

        kernel.check_claim(spec, uid)
        res.parts = [write_parquet(spec.sink, kernel.part_path(spec, uid), res.group_table),
                     write_parquet(spec.sink, f"{spec.data_prefix}{uid}.parquet", res.table)]
        res.group_table = res.table = None
    return res
