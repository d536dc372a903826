"""What one work unit does on a worker: read, split into groups, run each group, write.

Plain functions with no Dask in them: the same code runs in-process (tests,
``cluster="inline"``), on a LocalCluster, on a remote scheduler, on Kubernetes.
Everything a unit needs arrives in one frozen :class:`JobSpec`.

Every group of the unit gets one row in the group table: its keys, ``status``
(``ok`` / ``failed`` / ``skipped``), ``error``, ``rows`` and ``seconds``.  A
group that raises is ``failed``; it never fails the unit.
"""
from __future__ import annotations

import re
import time as _time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._io import Location, PartInfo, write_parquet
from ._threads import thread_pools
from .dataset import DECODE, Source, read_files
from .exceptions import GROUP_ERRORS, ModelError, describe_error
from .grouped_map import apply_groups, to_table
from .models.base import Model, SeriesBatch, SkipGroup
from .plan import WorkUnit

__all__ = ["JobSpec", "ModelSpec", "UnitResult", "Groups", "split_groups", "run_unit", "run_table",
           "run_keys", "key_table", "unit_keys", "unit_groups", "run_group", "keys_condition", "failed_rows", "merge_results",
           "describe_error", "STATUS", "one_thread", "check_claim", "claimed_by", "OUTPUT_CLAIM",
           "CodeUnavailable", "code_error", "require_code", "refused_rows", "code_digests", "stale_names"]

STATUS = ("ok", "failed", "skipped")
_UNIT_SECONDS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class ModelSpec:
    """A model to fit per group: its registry name (or a label), class and parameters."""

    name: str
    cls: type
    params: dict
    serializer: str = "native"  # "native" (Model.to_bytes) or "pickle" (user models)

    def data_needs(self) -> tuple[bool, bool]:
        """(needs a time column, needs features) for these parameters, not only the class's
        (``autoencoder`` needs a time with ``input="window"``, features with ``"features"``)."""
        return self.cls(**self.params).data_needs()

    def uses_features(self) -> bool:
        """Whether the model reads feature columns at all, with these parameters."""
        return self.cls(**self.params).uses_features()

    def __reduce__(self):
        # User classes travel with cloudpickle: by value when defined in a notebook or script
        # (or registered with cloudpickle.register_pickle_by_value), by reference otherwise.
        import cloudpickle

        return _model_spec, (self.name, cloudpickle.dumps(self.cls), self.params, self.serializer)


def _model_spec(name: str, cls_bytes: bytes, params: dict, serializer: str) -> ModelSpec:
    import cloudpickle

    try:
        cls = cloudpickle.loads(cls_bytes)
    except ImportError as err:
        from .exceptions import ModelError

        raise ModelError(
            f"The model class of {name!r} cannot be imported on this worker ({err}). Install its package "
            "on every worker (e.g. in the image), or call cloudpickle.register_pickle_by_value(module) "
            "before training so the class travels with the job.") from err
    return ModelSpec(name, cls, params, serializer)


@dataclass(frozen=True)
class JobSpec:
    """Everything a work unit needs, passed down the chain instead of a dozen arguments."""

    kind: str  # "train", "apply", "score" or "map_keys"
    by: tuple[str, ...]
    source: Source | None = None
    columns: tuple[str, ...] = ()
    time: str | None = None
    target: str | None = None
    features: tuple[str, ...] = ()
    filter: Any = None  # a pyarrow.dataset.Expression pushed down to the reader
    model: ModelSpec | None = None
    func: Callable | None = None
    input: str = "pandas"  # how apply/map_keys functions receive a group
    out_schema: pa.Schema | None = None
    sink: Location | None = None  # where parts go; None returns them to the client
    groups_prefix: str = "groups/"  # where group tables go under the sink
    data_prefix: str = "data/"  # where result rows go under the sink
    key_types: tuple = ()  # arrow types of the keys (for map_keys)
    leaf_keys: tuple[str, ...] = ()  # partition keys that are also group keys (the store's index)
    models: Any = None  # a scoring.ModelSource: the models to score with, or to carry over
    resume: bool = False  # reuse parts an interrupted attempt of the same run already wrote
    retrain: str | None = None  # with models: refit only "failed" or "changed" groups
    run_id: str = ""
    claim: str = ""  # an out= folder's run: the id its claim file must name when a unit writes

    def __reduce__(self):
        # The job's code (its function, its model class) travels as bytes of its own, loaded
        # by _job_spec in a try/except: a worker that joined after run.check_code and cannot
        # import the user's module gets a spec whose code is a CodeUnavailable, and the unit
        # says so (run.execute sends it to another worker).  Left to Dask's deserialisation,
        # the ImportError broke the worker's connection to the scheduler, and Dask shut the
        # worker down (nanny too): every such worker in turn, the job waiting for ever.
        # With the bytes go the digests of that code as this process has it (code_digests):
        # a late worker that imports another version of the user's module (an older image)
        # gets a CodeUnavailable too, instead of running its own version without a word.
        # Both are made once per spec object (the scheduler sends each unit's spec again).
        code = self.__dict__.get("_code")
        if code is None:
            import cloudpickle

            code = cloudpickle.dumps((self.func, self.model))
            object.__setattr__(self, "_code", code)
            object.__setattr__(self, "_digests", _digests_or_none(self.func, self.model))
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("func", "model")}
        return _job_spec, (code, state, self.__dict__.get("_digests"))


class CodeUnavailable:
    """Stands for a job's function and model class in a process that cannot load them, or
    (``stale``) that loads another version of them than the client's; ``error`` says why."""

    def __init__(self, error: str, stale: bool = False) -> None:
        self.error = error
        self.stale = stale

    def __repr__(self) -> str:
        return f"CodeUnavailable({self.error!r}, stale={self.stale})"

    def message(self, where: str | None = None, outcome: str | None = None) -> str:
        """The sentence a unit's groups (or the run's error) say: the worker, the error, the fix,
        then ``outcome`` (what became of the unit) if given.  ``where`` defaults to this worker."""
        where = where or _worker_name()
        if self.stale:
            text = (f"The Dask worker {where}, which joined after the job's code check, has another version of "
                    f"this job's code (its function or model class) than the client: {self.error}. Restart that "
                    "worker with the client's version of the module (in its image or on its PYTHONPATH) so it "
                    "imports it afresh, or send the code by value with cloudpickle.register_pickle_by_value(module)")
        else:
            text = (f"This job's code (its function or model class) cannot be loaded on the Dask worker {where}, "
                    f"which joined after the job's code check: {self.error}. A function or model class goes to "
                    "the workers by the name of its module: install that module (and what it imports) in every "
                    "worker's image or on its PYTHONPATH, or send it by value with "
                    "cloudpickle.register_pickle_by_value(module)")
        return f"{text}; {outcome}." if outcome else f"{text}."


def _job_spec(code: bytes, state: dict, digests: dict | None = None) -> JobSpec:
    """A :class:`JobSpec` rebuilt from its pickle, its code (function, model class) still bytes:
    they are loaded on first use (:class:`_Code`), by the unit that runs them."""
    spec = object.__new__(JobSpec)
    for name, value in state.items():
        object.__setattr__(spec, name, value)
    spec.__dict__["_code"] = code
    spec.__dict__["_digests"] = digests
    return spec


def _load_code(spec: JobSpec) -> None:
    """Load the function and model class of a spec rebuilt from its pickle (:func:`_job_spec`),
    or a :class:`CodeUnavailable` saying why they cannot be (see :meth:`JobSpec.__reduce__`)."""
    import pickle

    code, digests = spec.__dict__.get("_code"), spec.__dict__.get("_digests")
    try:
        func, model = pickle.loads(code) if code is not None else (None, None)
    except Exception as err:  # noqa: BLE001 - any failure to load user code is this worker's to report
        func = model = CodeUnavailable(_load_error(err))
    else:
        if digests and (stale := stale_names(digests, _digests_or_none(func, model) or {})):
            func = model = CodeUnavailable(f"{', '.join(stale)} differs from the client's (its module was imported "
                                           "here from another file, or in another version, or before it changed)",
                                           stale=True)
    spec.__dict__.setdefault("func", func)
    spec.__dict__.setdefault("model", model)


class _Code:
    """:attr:`JobSpec.func` and :attr:`JobSpec.model`: as given to a spec made here; loaded from
    the pickled code on first use in a spec rebuilt from its pickle (:func:`_load_code`).

    Loaded when the spec was rebuilt, the code was loaded wherever that happened, and a
    LocalCluster's scheduler runs in the client's process (a notebook's kernel), where it
    rebuilds each task's spec from the graph: unpickling a class sent by value there, cloudpickle
    found the user's live class by its tracking id and set the pickled methods on it, whose
    globals are a copy: a later cell's ``K = 5`` or redefined helper no longer reached the class,
    in local fits and later trains alike, without a word.  Only a unit's task uses the code now,
    in the worker that runs it.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # (the dataclass default)
        if self.name not in obj.__dict__:
            _load_code(obj)
        return obj.__dict__[self.name]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value


for _name in ("func", "model"):
    _field = _Code()
    _field.__set_name__(JobSpec, _name)
    setattr(JobSpec, _name, _field)


def _load_error(err: BaseException) -> str:
    """``Type: message`` of the innermost cause (ModelSpec wraps the ImportError in a ModelError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


#: function -> ((its code, defaults, keyword defaults), its own digest, the global names it reads):
#: :func:`code_digests` hashes a function once while these stay the same objects.
_FUNCTION_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def code_digests(func, model) -> dict[str, str]:
    """``{module.name: digest of its code}`` of the user's function (``func``, partials looked
    into) and model class (``model``, a :class:`ModelSpec`) as loaded in this process, plus
    ``"<python>"``: a function or class that travels by reference runs as the module a process
    imported first, so two processes run the same code only if these agree
    (:func:`stale_names`).  A function's digest covers its code (and which arguments have
    defaults) and, for one that travels by reference, what it reads from its module as its
    source shows it (:func:`_source_facts`): its defaults written as literals, the constants
    bound once to a literal, and the functions of that module it calls.  modelfactory's own code
    is left out (its version is checked apart), and so are the standard library's and installed
    packages' classes (:func:`_users_module`) and a function whose asserts pytest rewrote (not
    comparable)."""
    import functools
    import hashlib
    import sys
    import types

    # bytecode differs between Python versions, and with -O (asserts) or -OO (docstrings,
    # PYTHONOPTIMIZE in a worker's image): digests compare between processes of one only
    found: dict = {"<python>": "%d.%d -O%d" % (*sys.version_info[:2], sys.flags.optimize)}

    def const(k):
        if isinstance(k, types.CodeType):
            return code(k)
        if isinstance(k, (tuple, frozenset)):  # a set's order varies with PYTHONHASHSEED
            items = [const(x) for x in k]
            return repr(sorted(items) if isinstance(k, frozenset) else items)
        return repr(k)

    def code(c) -> str:
        parts = [c.co_code.hex(), repr(c.co_names)] + [const(k) for k in c.co_consts]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def default(v, depth: int = 0) -> str:
        # a default argument's value when it is a constant: editing it edits the function
        # (the workers' copy would run the old value), and its repr is the same in every
        # process; of any other value only its type: a dict used as a cache fills in one
        # process only, an object's repr holds its address
        if isinstance(v, (str, bytes, int, float, complex, type(None))):  # bool is an int
            return repr(v)
        if isinstance(v, (tuple, frozenset)) and depth < 3:
            items = [default(x, depth + 1) for x in v]
            return f"{type(v).__name__}({sorted(items) if isinstance(v, frozenset) else items})"
        return f"<{type(v).__module__}.{type(v).__qualname__}>"

    def rewritten(c) -> bool:
        # pytest rewrote its asserts (a test module, a conftest): a process not under pytest
        # imports the same source as other bytecode
        return "@pytest_ar" in c.co_names or any(isinstance(k, types.CodeType) and rewritten(k)
                                                 for k in c.co_consts)

    def own(f) -> str:
        # a function's code, and which arguments have defaults; their values are compared with
        # what it reads from its module (module_globals): only where the source shows a literal
        known = _FUNCTION_DIGESTS.get(f)
        what = (f.__code__, f.__defaults__, f.__kwdefaults__)
        if known is not None and all(a is b for a, b in zip(known[0], what)):
            return known[1]
        parts = [code(f.__code__), str(len(f.__defaults__ or ())), *sorted(f.__kwdefaults__ or ())]
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        _FUNCTION_DIGESTS[f] = (what, digest, _globals_read(f.__code__))
        return digest

    def function(f) -> str | None:
        # each unit's spec is checked as it loads (_job_spec): a function's own digest is kept
        # while its code and defaults are the same objects (a module reloaded makes new ones);
        # what it reads from its module is looked at each time (a reload changes it under the
        # same function object)
        if rewritten(f.__code__):
            return None
        digest = own(f)
        read = module_globals(f)
        if read is not None:  # compared only with a process that could read the module's source too
            digest += "+" + hashlib.sha256("\0".join(read).encode()).hexdigest()
        return digest

    def literal_defaults(g, facts) -> list[str]:
        # the values of g's defaults written as literals in its source (``factor=2``), not those
        # computed as the module loads (``root=os.environ.get(...)``, ``n=os.cpu_count()``): those
        # differ between processes by nature; nor a mutable one (``cache={}``: filled in one)
        flags = facts.defaults.get(g.__qualname__)
        values = g.__defaults__ or ()
        if flags is None or len(flags[0]) != len(values):
            return []
        kw = g.__kwdefaults__ or {}
        return [f"{g.__qualname__}:{i}={default(v)}" for i, (v, lit) in enumerate(zip(values, flags[0])) if lit] + \
               [f"{g.__qualname__}:{k}={default(kw[k])}" for k in sorted(kw) if flags[1].get(k)]

    def module_globals(f) -> list[str] | None:
        # what a function that travels by reference reads from its module: its literal defaults,
        # the constants its source binds once to a literal (their values), and the functions of
        # the same module it calls (bound once, by a def at the top level), theirs in turn (their
        # own digests and literal defaults): editing any edits what the workers run.  A name
        # bound otherwise (a helper built at run time, one defined in a try/except or an if, as
        # an environment allows) may differ between processes by nature: it is not followed.
        # Sorted: the same whichever function of a cycle of calls is digested first.  None: it
        # travels by value, with what it reads (cloudpickle), or its module's source cannot be
        # read here (compiled files only, a zip)
        mod = sys.modules.get(f.__module__)
        if mod is None or f.__module__ == "__main__" or f.__globals__ is not vars(mod) or _by_value(f.__module__):
            return None
        facts = _module_source(mod)
        if facts is None:
            return None
        parts, seen, todo = set(literal_defaults(f, facts)), {f}, [f]
        while todo:
            g = todo.pop()
            own(g)
            for name in _FUNCTION_DIGESTS[g][2]:
                v = g.__globals__.get(name, _MISSING)
                if v is _MISSING:
                    continue
                if name in facts.constants:
                    parts.add(f"{name}={default(v)}")
                    continue
                if name not in facts.functions:
                    continue
                for depth in range(4):  # a decorated helper: the wrapper, then what it wraps
                    if isinstance(v, types.FunctionType) and v.__globals__ is f.__globals__ and v not in seen:
                        seen.add(v)
                        todo.append(v)
                        parts.add(f"{name}:{depth}:{v.__qualname__}()={own(v)}")
                        parts.update(literal_defaults(v, facts))
                    v = getattr(v, "__wrapped__", None)
                    if v is None:
                        break
        return sorted(parts)

    def put(name: str, f) -> None:
        digest = function(f)
        if digest is not None:  # None: not comparable
            found[name] = digest

    def walk(o, depth: int = 0) -> None:
        if depth > 3 or o is None:
            return
        if isinstance(o, functools.partial):
            for x in (o.func, *o.args):
                walk(x, depth + 1)
        elif isinstance(o, types.FunctionType) and not o.__module__.startswith("modelfactory"):
            put(f"{o.__module__}.{o.__qualname__}", o)
            wrapped = getattr(o, "__wrapped__", None)  # functools.wraps: the body is in the wrapper's closure
            if wrapped is not None:
                walk_wrapped(f"{o.__module__}.{o.__qualname__}", wrapped, depth + 1)
        elif isinstance(o, type):
            for cls in o.__mro__:
                if cls.__module__.startswith("modelfactory") or not _users_module(cls.__module__):
                    continue  # a library's base class (sklearn's, numpy's): its version is not the user's edit
                for name, v in sorted(vars(cls).items()):
                    f = getattr(v, "__func__", v)
                    if isinstance(f, types.FunctionType):
                        put(f"{cls.__module__}.{cls.__qualname__}.{name}", f)
        elif isinstance(o, types.MethodType):  # func=obj.method: its function
            if _users_module(getattr(o.__func__, "__module__", None) or ""):
                walk(o.__func__, depth + 1)
        elif callable(o) and isinstance(getattr(o, "__wrapped__", None), types.FunctionType):  # functools.lru_cache
            walk(o.__wrapped__, depth + 1)
        elif callable(o) and _users_module(type(o).__module__):  # an object with __call__: its class
            walk(type(o), depth + 1)

    def walk_wrapped(name: str, o, depth: int) -> None:
        while isinstance(o, types.FunctionType) and depth <= 3:
            name += ".__wrapped__"  # wraps() gives the wrapper the wrapped one's name
            put(name, o)
            o, depth = getattr(o, "__wrapped__", None), depth + 1

    walk(func)
    walk(getattr(model, "cls", None))
    return found


_MISSING = object()


class _Source(NamedTuple):
    """What :func:`code_digests` needs to know of a module's source (:func:`_source_facts`)."""

    #: names bound once, at the top level, to a literal, and rebound by no ``global``
    constants: frozenset[str]
    #: names bound once, by a ``def`` at the top level, and rebound by no ``global``
    functions: frozenset[str]
    #: each function's qualified name (``fit``, ``Model.fit``, ``outer.<locals>.inner``) -> which
    #: of its positional defaults, and of its keyword-only ones (by name), are written as literals
    defaults: dict[str, tuple[tuple[bool, ...], dict[str, bool]]]


#: path of a module's source -> ((its mtime, size), :func:`_source_facts` of it, None if unreadable)
_SOURCES: dict[str, tuple[tuple, _Source | None]] = {}


def _users_module(name: str) -> bool:
    """Whether ``name`` is a module of the user's own code, not the standard library's or an
    installed package's (site-packages): a library's classes differ between patch versions of
    it, which is no edit of the job, and comparing them would refuse good workers."""
    import os
    import sys

    if name == "__main__":
        return True
    if not name or name.split(".")[0] in sys.stdlib_module_names or name == "builtins":
        return False
    path = getattr(sys.modules.get(name), "__file__", None)
    if not isinstance(path, str):
        return False  # compiled in, or a namespace: nothing of the user's to compare
    parts = set(os.path.normpath(path).split(os.sep))
    return not parts & {"site-packages", "dist-packages"}


def _by_value(module: str) -> bool:
    """Whether cloudpickle sends the functions of ``module`` by value (registered, or a
    submodule of a registered package)."""
    import cloudpickle

    return any(module == m or module.startswith(m + ".") for m in cloudpickle.list_registry_pickle_by_value())


def _globals_read(c) -> list[str]:
    """The global names the code object ``c`` (and the code nested in it) reads, sorted."""
    import dis
    import types

    names: set[str] = set()

    def scan(c) -> None:
        names.update(i.argval for i in dis.get_instructions(c)
                     if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"))
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                scan(k)

    scan(c)
    return sorted(names)


def _module_source(module) -> _Source | None:
    """:func:`_source_facts` of a module's source file, cached for its last version read; None
    when it has none that can be read (or parsed: a file too deeply nested for this parser)."""
    import os

    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    version = (st.st_mtime_ns, st.st_size)
    known = _SOURCES.get(path)
    if known is None or known[0] != version:
        try:
            with open(path, "rb") as f:
                facts = _source_facts(f.read())
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            facts = None
        known = _SOURCES[path] = (version, facts)
    return known[1]


def _source_facts(source: bytes) -> _Source:
    """What a module's source says of its names: those it binds once, at its top level, to a
    literal (``LIMIT = 3.5``, ``MODE = "fast"``), or by a ``def``, and that no function rebinds
    (``global``): their values are the same in every process that imported that source.  A name
    bound otherwise as well (in an ``if``, a ``try``, a ``for``, an import), or any in a module
    with ``import *``, may differ between processes (``DEBUG = False`` then ``if
    os.environ.get(...): DEBUG = True``; ``try: from fastmath import expit`` then ``except
    ImportError: def expit(...)``): it is left out.  And which defaults of each function are
    literals (``factor=2``, not ``root=os.environ.get(...)``)."""
    import ast

    tree = ast.parse(source)
    bound: dict[str, int] = {}
    rebound: set[str] = set()
    defaults: dict[str, tuple[tuple[bool, ...], dict[str, bool]] | None] = {}

    def bind(name: str | None) -> None:
        if name:
            bound[name] = bound.get(name, 0) + 1

    def literal(node) -> bool:
        try:
            ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
        return True

    def function(node, qualname: str) -> None:
        # by qualified name, not line: a process that imported the file before a line was added
        # above the function reads its defaults under the same name as one that imported it after
        flags = (tuple(literal(d) for d in node.args.defaults),
                 {a.arg: literal(d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None})
        defaults[qualname] = None if qualname in defaults else flags  # defined twice: which is which?

    # the top level's bindings (not in the bodies of functions and classes, which bind their
    # own names), without recursion: a long expression is no reason to give up
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(node.name)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bind(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return _Source(frozenset(), frozenset(), {})
            for a in node.names:
                bind((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
            bind(node.name)
        elif isinstance(node, ast.MatchMapping):
            bind(node.rest)
        stack.extend(ast.iter_child_nodes(node))
    rebound.update(n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names)  # iterative
    scopes = [(node, "") for node in tree.body]  # (node, the qualified name of the scope it is in, dotted)
    while scopes:
        node, scope = scopes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function(node, scope + node.name)
            inner = scope + node.name + ".<locals>."
        elif isinstance(node, ast.ClassDef):
            inner = scope + node.name + "."
        else:
            inner = scope
        # statements only: a def is one (a lambda, named "<lambda>", has no name to find it by)
        scopes.extend((child, inner) for child in ast.iter_child_nodes(node) if not isinstance(child, ast.expr))
    constants, functions = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.add(node.name)
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        if literal(value):
            constants.add(name)

    def once(names: set[str]) -> frozenset[str]:
        return frozenset(n for n in names if bound.get(n) == 1 and n not in rebound)

    return _Source(once(constants), once(functions), {k: v for k, v in defaults.items() if v is not None})


def _digests_or_none(func, model) -> dict[str, str] | None:
    """:func:`code_digests`, or None when they cannot be taken (then nothing is compared), or
    when there is no user code to compare (a built-in model): nothing to ship."""
    try:
        found = code_digests(func, model)
    except Exception:  # noqa: BLE001 - a check, never a reason to fail
        return None
    return found if len(found) > 1 else None


def stale_names(mine: dict, theirs: dict) -> list[str]:
    """The names of the user's code whose digests differ between ``mine`` and ``theirs``
    (:func:`code_digests` of two processes); none when their Python versions or -O levels
    differ (their bytecode does then)."""
    if theirs.get("<python>") != mine.get("<python>"):
        return []
    return [name for name in sorted(mine) if name != "<python>" and name in theirs
            and not _same_code(theirs[name], mine[name])]


def _same_code(a: str, b: str) -> bool:
    """Two digests of a function (:func:`code_digests`): its own code, then ``+`` and what it
    reads from its module (its literal defaults among it), which is compared only when both
    processes could read the module's source (a worker image may ship compiled files only)."""
    own_a, _, read_a = a.partition("+")
    own_b, _, read_b = b.partition("+")
    return own_a == own_b and (read_a == read_b or not (read_a and read_b))


def _worker_name() -> str:
    import socket

    try:
        from distributed import get_worker

        return f"at {get_worker().address} (host {socket.gethostname()})"
    except (ImportError, ValueError):  # not in a task (the scheduler, a client)
        return f"on host {socket.gethostname()}"


def code_error(spec: JobSpec) -> CodeUnavailable | None:
    """Why this process cannot run ``spec``'s code, or None when it can."""
    for code in (spec.func, spec.model):
        if isinstance(code, CodeUnavailable):
            return code
    return None


def require_code(spec: JobSpec) -> None:
    """Raise :class:`ClusterError` when this worker could not load ``spec``'s code (or loads
    another version of it): a unit's entry points say so clearly even when called outside
    :mod:`run`'s refusal paths, instead of failing every group with an odd error."""
    if (missing := code_error(spec)) is not None:
        from .exceptions import ClusterError

        raise ClusterError(missing.message())


def refused_rows(spec: JobSpec, item, error: str) -> UnitResult:
    """Every group of a unit no worker could load the code for, ``failed`` with ``error``.
    ``item`` is a :class:`WorkUnit` (its files are read for their keys, which needs no user
    code) or map_keys' ``(unit id, key tuples)``."""
    if isinstance(item, WorkUnit):
        return failed_rows(spec, item.id, unit_keys(spec, item.paths), error)
    uid, keys = item
    return failed_rows(spec, uid, key_table(spec, keys), error)


def key_table(spec: JobSpec, keys: list[tuple]) -> pa.Table:
    """map_keys' key tuples as a table of the job's key columns and types."""
    return pa.table({k: pa.array([key[i] for key in keys], type=spec.key_types[i]) for i, k in enumerate(spec.by)})


#: The file in an ``out=`` folder naming the run that emptied it last and writes to it:
#: readers of the folder skip it as they skip ``_manifest.json`` (a name starting with "_",
#: no "=").
OUTPUT_CLAIM = "_run_id"


def claimed_by(sink) -> str | None:
    """The run an ``out=`` folder's claim names, or None when it has none."""
    try:
        return sink.read_bytes(OUTPUT_CLAIM).decode().strip()
    except FileNotFoundError:
        return None


def check_claim(spec: JobSpec, unit_id: str) -> None:
    """Refuse to write a unit's files into an ``out=`` folder that is no longer its run's, or
    that its run has committed meanwhile.

    Ctrl-C (or a lost client) releases a job's tasks, but Dask cannot stop one that is running:
    it ends on its worker later and writes its files.  If a job was started again meanwhile
    (the function fixed, ``overwrite``), those files have the new job's names and would
    replace its files, even after it committed.  The new job's claim tells them apart.
    """
    from .exceptions import StoreError

    if not spec.claim or spec.sink is None:
        return
    owner = claimed_by(spec.sink)
    if owner is None:  # a job that empties the folder claims it at once: most likely not the same folder
        import socket

        raise StoreError(f"The output folder {spec.sink.url!r} changed while run {spec.claim} wrote to it, or is "
                         f"not the same folder on the worker on host {socket.gethostname()!r} that ran unit "
                         f"{unit_id}: that worker finds no {OUTPUT_CLAIM} file there, which the run wrote before "
                         "its units started. A local path with a cluster on other machines does this: use an "
                         "object store, or a file system shared by the client and every worker. Or another job "
                         "emptied it meanwhile (with overwrite): give each job a folder of its own. The unit wrote "
                         f"nothing there; run {spec.claim} was not committed (no _manifest.json).")
    if owner != spec.claim:
        who = f"run {owner}"
        raise StoreError(f"The output folder {spec.sink.url!r} changed while run {spec.claim} wrote to it: {who} "
                         "emptied it meanwhile (with overwrite), or this run was interrupted and its unit "
                         f"{unit_id} outlived it on a Dask worker. The unit wrote nothing there; run {spec.claim} "
                         "was not committed (no _manifest.json): give each job a folder of its own, and run it "
                         "again.")
    if spec.sink.exists("_manifest.json"):
        # A worker taken for lost (a long pause, a network split) runs on: its unit ran again
        # elsewhere and the run committed.  Its files have the names the committed ones have
        # (the output's are not named per attempt: readers take the folder as it is), and would
        # replace them under the manifest's checksums.  (A window of a few milliseconds between
        # this look and the write stays open.)
        raise StoreError(f"Run {spec.claim} was committed while its unit {unit_id} still ran here (this worker "
                         "was taken for lost, and the unit ran again on another): this late attempt wrote "
                         f"nothing, and the files in {spec.sink.url!r} stay as the run's manifest lists them.")


#: What the error of a retrain's group says when its refit failed where the base run had a model.
LOST_MODEL = "has a model for this group, which this run does not carry over"


@dataclass
class UnitResult:
    """The small summary a unit sends back to the client."""

    unit_id: str
    groups: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS, 0))
    rows: int = 0
    seconds: float = 0.0
    parts: list[PartInfo] = field(default_factory=list)
    errors: list[tuple[tuple, str]] = field(default_factory=list)  # a few failed groups
    #: (status, error) -> groups, of the groups that are not ok: the unit's PROBLEM_KINDS commonest
    problems: dict[tuple[str, str], int] = field(default_factory=dict)
    problems_cut: int = 0  # groups not ok whose kind of problem is not among ``problems``
    table: pa.Table | None = None  # apply results, when there is no sink
    group_table: pa.Table | None = None  # group table, when there is no sink
    leaves: list[tuple] = field(default_factory=list)  # values of JobSpec.leaf_keys in this unit
    # per part, the leaves it holds, when the unit wrote several (its groups ran one by one:
    # merge_results); otherwise each part holds all of ``leaves``
    part_leaves: list[list[tuple]] | None = None
    carried: dict[str, int] = field(default_factory=dict)  # models carried over, by the run that fitted them
    lost: int = 0  # a retrain's groups whose refit failed or was skipped, that had a model in the base run
    anomalies: int = 0  # anomalous points (scoring)
    imports: list[str] = field(default_factory=list)  # what loading its pickled models imports (training)

    def leaves_by_part(self) -> list[list[tuple]]:
        """The leaves each of :attr:`parts` holds, in the order of the parts."""
        return self.part_leaves if self.part_leaves is not None else [self.leaves] * len(self.parts)


class Groups:
    """A unit's rows in key (and time) order, with each group's ``[start, end)`` row range.

    When the rows had to be reordered, the reordered table is only built when
    something asks for :attr:`table`: numpy inputs and model fitting gather just
    the columns they use (:meth:`column`), and string keys come from their encoding.
    """

    def __init__(self, table: pa.Table, starts: np.ndarray, ends: np.ndarray, keys: pa.Table,
                 encoded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 order: np.ndarray | None = None, decode: tuple[str, ...] = ()) -> None:
        self.starts, self.ends = starts, ends
        self.keys = keys  # one row per group: its key values
        # String key columns as (distinct values, per-row index in the rows' order as read),
        # kept from the dictionary encoding that found the groups: a numpy view of them is
        # one gather instead of a second encoding.
        self.encoded = encoded or {}
        self._source, self._order = table, order  # rows as read, and the order that groups them
        self._decode = decode  # columns read dictionary-encoded that users see as strings
        self._table = table if order is None and not decode else None

    @property
    def table(self) -> pa.Table:
        """The rows in group order, every column with the dataset's own type."""
        if self._table is None:
            t = self._source if self._order is None else self._source.take(pa.array(self._order)).combine_chunks()
            self._table = _decoded(t, self._decode)
        return self._table

    @property
    def column_names(self) -> list[str]:
        return self._source.column_names

    @property
    def schema(self) -> pa.Schema:
        """The rows' schema as read (columns read dictionary-encoded are still encoded)."""
        return self._source.schema

    def null_count(self, name: str) -> int:
        return self._source[name].null_count

    @property
    def num_rows(self) -> int:
        return self._source.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        """One column in group order, without building the whole reordered table."""
        if self._table is not None:
            return self._table[name]
        col = self._source[name]
        if self._order is not None:
            col = col.take(pa.array(self._order))
        return pc.cast(col, pa.string()) if name in self._decode else col

    def __len__(self) -> int:
        return len(self.starts)

    def key_tuples(self) -> list[tuple]:
        cols = [c.to_pylist() for c in self.keys.columns]
        return list(zip(*cols)) if cols else []

    def numpy_column(self, name: str) -> np.ndarray:
        """Column ``name`` as one numpy array in group order (zero-copy for numbers when no
        reordering was needed; strings as Python objects, one per distinct value)."""
        if name in self.encoded:  # a key: one value a group, repeated (cheaper than a gather per row)
            values, idx = self.encoded[name]
            first = self.starts if self._order is None else self._order[self.starts]
            return np.repeat(values[idx[first]], self.ends - self.starts)
        if self._order is None or self._table is not None or name in self._decode:
            return numpy_column(self.column(name))
        # one numpy gather of the rows as read: a new array, where Arrow's take and then a
        # copy of its read-only view would move the column twice
        return numpy_column(self._source[name])[self._order]


def numpy_column(col: pa.ChunkedArray) -> np.ndarray:
    """A column as one numpy array: zero-copy for numbers; strings through their dictionary,
    so each distinct value becomes one Python object, shared by every row that holds it."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        enc = arr.dictionary_encode()
        idx = enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)
        return _dictionary_objects(enc.dictionary)[idx]
    return arr.to_numpy(zero_copy_only=False)


def _dictionary_objects(dictionary: pa.Array) -> np.ndarray:
    """A dictionary's values as Python objects, then None (the index that nulls are filled with)."""
    return np.asarray(dictionary.to_pylist() + [None], dtype=object)


def _boundaries(table: pa.Table, by: tuple[str, ...]) -> np.ndarray:
    """Row positions where the key changes from the row before (nulls compare equal)."""
    n = table.num_rows
    change = np.zeros(max(n - 1, 0), dtype=bool)
    for k in by:
        col = table[k].chunk(0) if table[k].num_chunks else pa.array([], table[k].type)
        a, b = col.slice(1), col.slice(0, n - 1)
        ne = pc.fill_null(pc.not_equal(a, b), False)
        if col.null_count:
            ne = pc.or_(ne, pc.xor(pc.is_null(a), pc.is_null(b)))
        change |= ne.to_numpy(zero_copy_only=False)
    return np.flatnonzero(change) + 1


def _grouped_already(table: pa.Table, by: tuple[str, ...], time: str | None, cuts: np.ndarray) -> bool:
    """True when every group is one contiguous run of rows, in time order (then no sort is needed)."""
    if len(cuts) + 1 != table.select(list(by)).group_by(list(by)).aggregate([]).num_rows:
        return False
    if time is None or table.num_rows < 2:
        return True
    t = _sortable_times(table[time])
    back = np.flatnonzero(np.diff(t) < 0) + 1  # rows whose time goes backwards ...
    return bool(np.isin(back, cuts).all())  # ... only where a new group starts


def _sortable_times(col) -> np.ndarray:
    """A time column as int64, missing times last (as Arrow sorts them): with a null in it, the
    column came out as float64 with NaN, which hid a step back in time beside it and rounded
    nanosecond times into ties, so a unit's groups were left out of time order."""
    if col.null_count:
        col = pc.fill_null(pc.cast(col, pa.int64()), np.iinfo(np.int64).max)
    return pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)


def _key_codes(table: pa.Table, by: tuple[str, ...],
               encoded: dict | None = None) -> np.ndarray | None:
    """One integer per row that orders like the key tuple (nulls last), or None if it cannot.

    Each key is dictionary-encoded and its (small) dictionary ranked, so the codes sort
    like the values; the codes of several keys are combined positionally.  String keys'
    encodings are stored in ``encoded`` (name -> (values as objects, per-row index)).
    """
    encs, span = [], 1
    for k in by:
        col = table[k].chunk(0) if table[k].num_chunks else pa.array([], table[k].type)
        try:
            enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
            order = pc.sort_indices(enc.dictionary).to_numpy()
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        span *= len(enc.dictionary) + 1
        if span >= 2**62:
            return None
        encs.append((k, enc, order))
    # int32 codes when they fit: half the memory to move, and a faster sort
    dtype = np.int32 if span < 2**31 else np.int64
    codes = None
    for k, enc, order in encs:
        m = len(enc.dictionary)
        rank = np.empty(m + 1, dtype=dtype)
        rank[order] = np.arange(m, dtype=dtype)
        rank[m] = m  # null keys: one group, last
        indices = enc.indices.fill_null(m) if enc.indices.null_count else enc.indices
        idx = indices.to_numpy(zero_copy_only=False)
        if codes is None:
            codes = rank[idx]
        else:
            codes *= m + 1
            codes += rank[idx]
        if encoded is not None and pa.types.is_string(enc.dictionary.type):
            encoded[k] = (_dictionary_objects(enc.dictionary), idx)
    if codes is None:
        codes = np.zeros(table.num_rows, dtype=dtype)
    return codes


def one_thread():
    """Limit BLAS/OpenMP pools to one thread for a unit: each worker process is one core."""
    return thread_pools().limit(limits=1)


def split_groups(table: pa.Table, by: tuple[str, ...], time: str | None = None) -> Groups:
    """Find each group's contiguous row range; groups are zero-copy slices.

    Data written in key and time order (the usual case) is used as it is;
    otherwise the table is sorted once by keys and time.
    """
    table = table.combine_chunks()
    n = table.num_rows
    decode = tuple(f.name for f in table.schema if f.metadata == DECODE)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        table = _decoded(table, decode)
        return Groups(table, empty, empty, table.select(list(by)).slice(0, 0))
    encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    order = None  # the row order that groups the rows, when they are not grouped as read
    codes = _key_codes(table, by, encoded)
    if codes is None:  # a key type that cannot be dictionary-encoded: compare values instead
        table, decode = _decoded(table, decode), ()
        cuts = _boundaries(table, by)
        if not _grouped_already(table, by, time, cuts):
            # (name, order) pairs, nulls last (the default): per-key (name, order, null_placement)
            # triples are pyarrow >= 25 only, and pyproject.toml admits pyarrow 22
            sort_keys = [(k, "ascending") for k in by] + ([(time, "ascending")] if time else [])
            table = table.take(pc.sort_indices(table, sort_keys=sort_keys)).combine_chunks()
            cuts = _boundaries(table, by)
    else:
        t = _sortable_times(table[time]) if time else None
        step = np.diff(codes)
        in_order = bool((step >= 0).all())
        if in_order and t is not None:
            back = np.diff(t) < 0
            in_order = not bool((back & (step == 0)).any())  # time goes back only at a new group
        if not in_order:
            order = np.lexsort((t, codes)) if t is not None else np.argsort(codes, kind="stable")
            codes = codes[order]
        cuts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    starts, ends = _ranges(cuts, n)
    first = starts if order is None else order[starts]  # each group's first row, as read
    keys = _decoded(table.select(list(by)).take(pa.array(first)), decode)
    return Groups(table, starts, ends, keys, encoded, order, decode)


def _decoded(table: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """``table`` with the columns ``names`` (read dictionary-encoded) back as plain strings."""
    for name in names:
        if name in table.column_names:
            i = table.schema.get_field_index(name)
            field = table.schema.field(i).with_type(pa.string()).remove_metadata()
            table = table.set_column(i, field, pc.cast(table[name], pa.string()))
    return table


def _ranges(cuts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate(([0], cuts)).astype(np.int64)
    return starts, np.concatenate((starts[1:], [n])).astype(np.int64)


def _times(spec: JobSpec, groups: Groups) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """The time column as int64 seconds, the groups whose times cannot be used, with why:
    missing times (any model), or, in training, a timestamp repeated within the group (models
    of one series in time, ``needs_time``: most often a key missing from ``by``); and the column
    in its own unit (missing times as 0), which tells repeats to the second from exact ones."""
    col = groups.column(spec.time)
    unusable: dict[int, str] = {}
    if col.null_count:
        missing = _per_group(pc.is_null(col).to_numpy(zero_copy_only=False), groups)
        for i in np.flatnonzero(missing).tolist():
            unusable[i] = (f"the time column {spec.time!r} has {missing[i]} missing value(s) in this group: "
                           f"fill them, or leave those rows out (filter=\"{spec.time} is not null\", CLI: --where "
                           f"\"{spec.time} is not null\")")
        col = pc.fill_null(col, pa.scalar(0, col.type))
    raw = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    unit = col.type.unit
    seconds = raw // _UNIT_SECONDS[unit] if unit != "s" else raw
    if spec.model is not None and _needs_time(spec.model) and len(raw) > 1:  # training
        for i, why in repeated_times(raw, seconds, groups, spec.model.name).items():
            unusable.setdefault(i, why)
    return seconds, unusable, raw


def repeated_times(raw: np.ndarray, seconds: np.ndarray, groups: Groups, name: str,
                   only: np.ndarray | None = None) -> dict[int, str]:
    """The groups (of those ``only`` marks, default all) in which a row repeats a time of the
    group before it, with why that makes the group unusable to ``name``, a model of one value
    per time.  Compared in seconds, as the models see them: two rows 500 ms apart are one time
    to them.  The rows are in time order within each group."""
    if len(raw) < 2:
        return {}
    again = np.concatenate(([False], seconds[1:] == seconds[:-1]))
    again[groups.starts] = False
    repeated = _per_group(again, groups)
    exact = _per_group(again & np.concatenate(([False], raw[1:] == raw[:-1])), groups)
    hits = repeated > 0 if only is None else (repeated > 0) & only
    return {i: (f"{repeated[i]} row(s) repeat a timestamp of this group"
                + (" to the second (models see whole seconds)" if exact[i] < repeated[i] else "")
                + f", and {name!r} models one value per time: is a key missing from by=, or do the rows "
                  "need aggregating first?") for i in np.flatnonzero(hits).tolist()}


def _needs_time(m) -> bool:
    """Whether the model (a :class:`ModelSpec`, or a fitted model), with its parameters, models
    one series in time (``autoencoder`` does with ``input="window"``, not with ``"features"``)."""
    try:
        return bool(m.data_needs()[0])
    except GROUP_ERRORS:  # noqa: BLE001 - a class that cannot say: its class attribute
        return bool(getattr(getattr(m, "cls", m), "needs_time", False))


def _per_group(rows: np.ndarray, groups: Groups) -> np.ndarray:
    """How many of each group's rows are set in the boolean ``rows``."""
    total = np.concatenate(([0], np.cumsum(rows, dtype=np.int64)))
    return total[groups.ends] - total[groups.starts]


def _seconds(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    unit = col.type.unit
    raw = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    return raw // _UNIT_SECONDS[unit] if unit != "s" else raw


def _floats(col) -> np.ndarray:
    """A numeric column as float64, as models take it: an integer past 2**53 (a byte counter, a
    duration in ns) to the nearest float, as numpy converts it (Arrow's safe cast refused it,
    and the unit failed outside any group); a decimal likewise."""
    return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------
def run_unit(spec: JobSpec, unit: WorkUnit) -> UnitResult:
    """Read the unit's files on this worker and run it."""
    t0 = _time.perf_counter()
    require_code(spec)
    if (done := recover(spec, unit.id)) is not None:
        return done
    table = read_files(spec.source, unit.paths, list(spec.columns), spec.filter, encode=spec.by, known=unit.known)
    return run_table(spec, unit.id, table, t0=t0)


def unit_keys(spec: JobSpec, paths: tuple[str, ...]) -> pa.Table:
    """The distinct group keys in the files ``paths`` (a unit's; reads the key columns only)."""
    return unit_groups(spec, paths)[0]


def unit_groups(spec: JobSpec, paths: tuple[str, ...]) -> tuple[pa.Table, np.ndarray]:
    """:func:`unit_keys`, and the rows of each of those groups."""
    table = read_files(spec.source, paths, list(spec.by), spec.filter, encode=spec.by)
    groups = split_groups(table, spec.by)
    return groups.keys, (groups.ends - groups.starts).astype(np.int64)


def run_group(spec: JobSpec, unit: WorkUnit, key: pa.Table, sub_id: str, runner=None) -> UnitResult:
    """Run one group of a unit on its own (to isolate a group that kills its worker);
    ``key`` is its one-row key table, ``runner`` what runs a unit's rows (default
    :func:`run_table`; scoring passes its own)."""
    t0 = _time.perf_counter()
    require_code(spec)
    if (done := recover(spec, sub_id)) is not None:
        return done
    table = read_files(spec.source, unit.paths, list(spec.columns), keys_condition(key, spec.filter),
                       encode=spec.by, known=unit.known)
    return (runner or run_table)(spec, sub_id, table.filter(keys_condition(key, stored=False)), t0=t0)


def keys_condition(keys: pa.Table, also=None, *, stored: bool = True):
    """A filter for the rows of the groups ``keys`` names: each key column within its values
    (exactly those groups for one key row; for more, a superset to semi-join), and ``also``.

    The values stay Arrow values (plain ones: ``is_in`` takes no dictionary): a Python one
    would lose a nanosecond timestamp's last digits, and ``==`` never matches a NaN key.
    A condition for the Parquet reader (``stored``) leaves out a float key whose values
    include NaN: the reader skips row groups by their min/max statistics, which leave NaN
    out, so it would find no NaN rows (even with ``is_nan``); the caller matches such keys
    again in memory.
    """
    import functools

    import pyarrow.dataset as ds

    conds = [] if also is None else [also]
    for k in keys.column_names:
        values = pc.unique(keys[k])
        if pa.types.is_dictionary(values.type):  # a key stored dictionary-encoded (a categorical)
            values = values.dictionary_decode()
        if stored and pa.types.is_floating(values.type) and pc.any(pc.is_nan(values)).as_py():
            continue
        conds.append(ds.field(k).isin(values))
    return functools.reduce(lambda a, b: a & b, conds) if conds else None


def failed_rows(spec: JobSpec, unit_id: str, keys: pa.Table, error: str,
                sizes: np.ndarray | None = None) -> UnitResult:
    """A unit result (and part) for groups that could not run at all: all ``failed`` with ``error``;
    ``sizes``, when known, are their rows (a group that killed its worker got its rows)."""
    n = keys.num_rows
    rows = {"status": ["failed"] * n, "error": [error] * n, "seconds": np.zeros(n)}
    if spec.kind == "train":
        rows["extra_columns"] = {"model": pa.nulls(n, pa.binary()), "fingerprint": pa.nulls(n, pa.binary(8)),
                                 "fitted_in": pa.array([spec.run_id] * n, pa.string())}
    elif spec.kind == "score":  # the columns of scoring's group table (scoring.score_table)
        rows["extra_columns"] = {"anomalies": pa.array(np.zeros(n, np.int64)),
                                 "max_score": pa.nulls(n, pa.float64())}
    if spec.kind == "apply" or (spec.kind == "map_keys" and spec.out_schema is not None):
        extra = spec.out_schema.empty_table()
    elif spec.kind == "map_keys":
        extra = [None] * n  # each key's result (run_keys): none
    else:
        extra = None
    sizes = np.zeros(n, np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    return _finish(spec, unit_id, keys, rows, extra, sizes, _time.perf_counter())


def run_table(spec: JobSpec, unit_id: str, table: pa.Table, *, t0: float | None = None) -> UnitResult:
    """Run a unit whose rows are already in memory (a shuffle partition, or a test)."""
    t0 = _time.perf_counter() if t0 is None else t0
    require_code(spec)
    if (done := recover(spec, unit_id)) is not None:
        return done
    with one_thread():
        groups = split_groups(table, spec.by, spec.time)
        if spec.kind == "train":
            rows, extra = _train(spec, groups), None
        elif spec.kind == "apply":
            rows, extra = apply_groups(spec, groups)
        else:
            raise ValueError(f"unknown job kind {spec.kind!r}")
    read = groups.ends - groups.starts
    # a retrain's carried-over models keep the rows they were fitted on; the unit read `read`
    return _finish(spec, unit_id, groups.keys, rows, extra, rows.pop("nrows", read), t0, int(read.sum()))


def run_keys(spec: JobSpec, unit_id: str, keys: list[tuple]) -> UnitResult:
    """Run ``spec.func`` once per key; the function loads its own data."""
    t0 = _time.perf_counter()
    require_code(spec)
    status, errors, secs, outs = [], [], [], []
    with one_thread():
        for key in keys:
            s = _time.perf_counter()
            try:
                arg = key[0] if len(key) == 1 else key
                out = spec.func(arg)
                # rows converted as the call returns: a frame or buffer the function fills again for
                # the next key would otherwise give every key the last key's values
                outs.append(to_table(out, spec.out_schema) if spec.out_schema is not None and out is not None
                            else out)
                status.append("ok")
                errors.append(None)
            except SkipGroup as err:
                status.append("skipped"), errors.append(str(err)), outs.append(None)
            except GROUP_ERRORS as err:  # noqa: BLE001 - recorded per key
                status.append("failed"), errors.append(describe_error(err)), outs.append(None)
            secs.append(_time.perf_counter() - s)
    extra = None
    if spec.out_schema is not None:
        parts = [o if st == "ok" and o is not None else None for o, st in zip(outs, status)]
        for i, p in enumerate(parts):
            if isinstance(p, Exception):
                status[i], errors[i], parts[i] = "failed", describe_error(p, located=False), None
        good = [p for p in parts if p is not None]
        extra = pa.concat_tables(good) if good else spec.out_schema.empty_table()
    else:
        extra = outs
    rows = {"status": status, "error": errors, "seconds": secs}
    return _finish(spec, unit_id, key_table(spec, keys), rows, extra, np.zeros(len(keys), np.int64), t0)


def _finish(spec, unit_id, key_table, rows, extra, nrows, t0, read: int | None = None) -> UnitResult:
    """The unit's group table (``nrows``: each group's rows) and result; ``read``, when given, is
    the rows the unit read (its summary's count), where the group table records other counts."""
    # the input's schema metadata (Spark's row schema, pandas' columns) describes the input, not
    # this table: Spark reads its columns from that metadata when present
    gt = key_table.replace_schema_metadata(None)
    gt = gt.append_column("status", pa.array(rows["status"], pa.string()))
    gt = gt.append_column("error", pa.array(rows["error"], pa.string()))
    gt = gt.append_column("rows", pa.array(np.asarray(nrows, dtype=np.int64)))
    gt = gt.append_column("seconds", pa.array(np.asarray(rows["seconds"], dtype=np.float64)))
    for name, values in rows.get("extra_columns", {}).items():
        gt = gt.append_column(name, values)
    res = summarize(spec, unit_id, gt)
    if read is not None:
        res.rows = read
    if spec.sink is not None:
        check_claim(spec, unit_id)
        res.parts.append(write_parquet(spec.sink, part_path(spec, unit_id), gt))
        if isinstance(extra, pa.Table):
            res.parts.append(write_parquet(spec.sink, f"{spec.data_prefix}{unit_id}.parquet", extra))
    else:
        res.group_table = gt
        res.table = extra
    res.seconds = _time.perf_counter() - t0
    return res


def part_path(spec: JobSpec, unit_id: str) -> str:
    """Where a unit writes its group table.  A training part gets a name of its own per
    attempt (``<unit>.<random>.parquet``): if two attempts of a unit run at once (a worker
    presumed dead that is still writing), the late one writes a file nothing points to,
    and never the bytes under a checksum the run's result already holds."""
    if spec.kind == "train":
        import secrets

        return f"{spec.groups_prefix}{unit_id}.{secrets.token_hex(4)}.parquet"
    return f"{spec.groups_prefix}{unit_id}.parquet"


#: How many kinds of problem (status and error) a unit reports, the commonest first.
PROBLEM_KINDS = 20


def _problems(gt: pa.Table) -> tuple[dict[tuple[str, str], int], int]:
    """The commonest (status, error) pairs of the groups that are not ok, with their counts, and the
    number of such groups left out (their pairs were not among the commonest)."""
    bad = gt.select(["status", "error"]).filter(pc.not_equal(gt["status"], "ok"))
    if not bad.num_rows:
        return {}, 0
    counted = bad.group_by(["status", "error"], use_threads=False).aggregate([([], "count_all")]).to_pylist()
    kept = dict(commonest({(r["status"], r["error"]): r["count_all"] for r in counted}, PROBLEM_KINDS))
    return kept, bad.num_rows - sum(kept.values())


def commonest(problems: dict[tuple[str, str], int], k: int) -> list[tuple[tuple[str, str], int]]:
    """The ``k`` commonest ``(status, error) -> groups`` of ``problems``, the commonest first (ties by
    status, then error)."""
    return sorted(problems.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1] or ""))[:k]


def summarize(spec: JobSpec, unit_id: str, gt: pa.Table) -> UnitResult:
    """The :class:`UnitResult` of a unit from its group table (counts, a few errors, leaves)."""
    res = UnitResult(unit_id, groups=gt.num_rows, rows=int(pc.sum(gt["rows"]).as_py() or 0))
    for item in pc.value_counts(gt["status"]).to_pylist():
        res.counts[item["values"]] = item["counts"]
    failed = gt.filter(pc.equal(gt["status"], "failed")).slice(0, 5)
    names = list(spec.by)
    res.errors = [(tuple(r[k] for k in names), r["error"]) for r in failed.select([*names, "error"]).to_pylist()]
    res.problems, res.problems_cut = _problems(gt)
    if "fitted_in" in gt.column_names:
        for item in pc.value_counts(gt["fitted_in"]).to_pylist():
            if item["values"] not in (None, spec.run_id):
                res.carried[item["values"]] = item["counts"]
    if spec.retrain and res.counts.get("ok", 0) < res.groups:
        res.lost = int(pc.sum(pc.match_substring(gt["error"].cast(pa.string()), LOST_MODEL)).as_py() or 0)
    if spec.leaf_keys:
        res.leaves = sorted(set(zip(*[gt[k].to_pylist() for k in spec.leaf_keys])),
                            key=lambda k: tuple(str(v) for v in k))
    if spec.kind == "train" and getattr(spec.model, "serializer", "native") != "native" and "model" in gt.column_names:
        res.imports = _pickled_imports(gt)
    return res


def _pickled_imports(gt: pa.Table, sample: int = 16, ops: int = 200_000) -> list[str]:
    """What loading a unit's pickled models imports by name (:func:`store.model_imports`), read
    off the first ``ok`` model fitted in each run (this one, and those a retrain carried models
    over from) and up to ``sample`` more spread over the unit (a model that keeps a library's
    object for some groups only), reading at most ``ops`` pickle opcodes in all.  What these
    miss is checked as each model loads, and its group says so."""
    from .store import model_imports

    ok = pc.indices_nonzero(pc.equal(gt["status"], "ok")).to_numpy()  # indices only: no copy of the models
    if not len(ok):
        return []
    origins = (pc.take(gt["fitted_in"], pa.array(ok)).to_pylist() if "fitted_in" in gt.column_names
               else [None] * len(ok))
    first = {origin: i for i, origin in reversed(list(enumerate(origins)))}
    picks = dict.fromkeys([*sorted(first.values()), *np.linspace(0, len(ok) - 1, min(sample, len(ok))).astype(int)])
    names: list[str] = []
    budget = ops
    for i in picks:
        blob = gt["model"][int(ok[i])].as_py()
        names += model_imports(blob, budget)
        budget -= min(budget, len(blob) // 2 + 1)  # a rough count of the opcodes just read
        if budget <= 0:
            break
    return list(dict.fromkeys(names))


def recover(spec: JobSpec, unit_id: str) -> UnitResult | None:
    """The result of a unit whose part an earlier, interrupted attempt already wrote (or None)."""
    import hashlib

    import pyarrow.parquet as pq

    # A training part is written once per run: a unit recomputed later (its worker died after
    # the result was taken, a resumed run, leftover tasks of a failed attempt) reuses the first
    # complete part an attempt wrote, so parts never change under the checksums of a result.
    if spec.kind != "train" or spec.sink is None:
        return None
    for rel in spec.sink.glob(f"{spec.groups_prefix}{unit_id}.*.parquet"):
        data = spec.sink.read_bytes(rel)
        try:
            gt = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError):
            continue  # a damaged leftover: try the next, or recompute
        res = summarize(spec, unit_id, gt)
        res.parts.append(PartInfo(rel, len(data), hashlib.sha256(data).hexdigest(), gt.num_rows))
        return res
    return None


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def _is_batch_model(cls: type) -> bool:
    return issubclass(cls, Model) and cls.fit_batch.__func__ is not Model.fit_batch.__func__


def _serialize(model, serializer: str) -> bytes:
    if serializer == "native":
        return model.to_bytes()
    import cloudpickle

    return cloudpickle.dumps(model)


def _unserialisable(model, serializer: str, err: Exception) -> str:
    """Why a fitted model could not be stored, naming the attribute that holds what cannot be
    (each attribute tried alone): "cannot pickle '_thread.lock' object (at cloudpickle.py:1327 in
    dump)" named neither it nor the fix."""
    what = f"{type(err).__name__}: " + "; ".join(p.strip() for p in str(err).splitlines() if p.strip())
    culprits = []
    for name, value in vars(model).items() if serializer != "native" else ():  # (native: no pickle to try)
        try:
            _serialize(value, "pickle")
        except Exception:  # noqa: BLE001 - this one
            culprits.append(f"{name} ({type(value).__name__})")
    if not culprits:
        return f"cannot serialise the fitted {type(model).__name__}: {what}"
    return (f"cannot serialise the fitted {type(model).__name__}: its attribute {', '.join(culprits[:3])} cannot be "
            f"pickled ({what}); keep only data in the fitted state (arrays, numbers, fitted estimators), and make "
            "what cannot be pickled (locks, open files, clients, generators) when it is needed, or drop it at the "
            "end of _fit")


def fingerprints(batch: SeriesBatch) -> list[bytes]:
    """An 8-byte digest of each series' values, times and features (to find changed groups)."""
    import hashlib

    out = []
    for i in range(len(batch)):
        h = hashlib.blake2b(digest_size=8)
        for a in batch.series(i):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        out.append(h.digest())
    return out


def _subset(batch: SeriesBatch, idx: np.ndarray) -> SeriesBatch:
    """The series ``idx`` of ``batch`` as a new, smaller ragged batch."""
    return batch.subset(idx)


def _fit(m: ModelSpec, batch: SeriesBatch) -> tuple[list, np.ndarray]:
    """Fit every series of ``batch``: (fitted model or exception per series, seconds per series)."""
    n = len(batch)
    seconds = np.zeros(n)
    if _is_batch_model(m.cls):
        s = _time.perf_counter()
        try:
            fitted = m.cls.fit_batch(m.params, batch)
        except GROUP_ERRORS as err:  # noqa: BLE001 - a failed batch fails its groups, not the run
            fitted = [err] * n
        lengths = np.diff(batch.offsets).astype(np.float64)
        seconds = (_time.perf_counter() - s) * lengths / max(1.0, lengths.sum())  # apportioned by rows
        return fitted, seconds
    proto = m.cls(**m.params)
    fitted = []
    for i in range(n):
        s = _time.perf_counter()
        yi, ti, Xi = batch.series(i)
        try:
            fitted.append(proto.clone().fit(yi, t=ti, X=Xi))
        except GROUP_ERRORS as err:  # noqa: BLE001 - recorded per group
            fitted.append(err)
        seconds[i] = _time.perf_counter() - s
    return fitted, seconds


_NTH_FEATURE = re.compile(r"the (\d+)(?:st|nd|rd|th) feature column \(in the order of features=\)")


def _feature_named(reason: str, features) -> str:
    """A built-in model's skip reason with the feature column it counts ("the 5th feature column
    (in the order of features=)": the model sees an array) named as the job has it."""
    def named(m: re.Match) -> str:
        k = int(m.group(1))
        return f"the feature column {features[k - 1]!r}" if 1 <= k <= len(features) else m.group(0)

    return _NTH_FEATURE.sub(named, reason) if features else reason


def _train(spec: JobSpec, groups: Groups) -> dict:
    m = spec.model
    n, rows = len(groups), groups.num_rows
    y = _floats(groups.column(spec.target)) if spec.target else np.zeros(rows)
    t, unusable, _ = _times(spec, groups) if spec.time else (None, {}, None)
    X = (np.column_stack([_floats(groups.column(f)) for f in spec.features])
         if spec.features else None)
    batch = SeriesBatch(y, np.concatenate((groups.starts, [rows])), t, X)
    prints = fingerprints(batch)
    status: list = [None] * n
    errors: list = [None] * n
    blobs: list = [None] * n
    fitted_in = [spec.run_id] * n
    seconds = np.zeros(n)
    nrows = (groups.ends - groups.starts).astype(np.int64)  # a carried-over model's: those it was fitted on
    todo = np.arange(n)
    if spec.retrain and spec.models is not None:
        from .scoring import load_model_rows

        base = load_model_rows(spec.models, groups, spec.by, extra=("rows", "seconds", "fingerprint", "fitted_in"))
        keep = []
        had = {}  # group -> the run whose model it had (a refit that fails takes it away: LOST_MODEL)
        for i, key in enumerate(groups.key_tuples()):
            row = base.get(key)
            if row is None or (row["status"] != "ok" if spec.retrain == "failed"
                               else row["fingerprint"] != prints[i]):
                keep.append(i)
                if row is not None and row["status"] == "ok":
                    had[i] = row["fitted_in"] or spec.models.run_id
                continue
            status[i], errors[i], blobs[i] = row["status"], row["error"], row["model"]
            seconds[i], fitted_in[i] = row["seconds"], row["fitted_in"] or spec.models.run_id
            if row["fingerprint"] is not None:  # the data the carried model was fitted on, not today's
                prints[i] = row["fingerprint"]
            if row["rows"] is not None:
                nrows[i] = row["rows"]
        todo = np.asarray(keep, dtype=np.int64)
    else:
        had = {}
    fitting = set(todo.tolist())
    unusable = {i: why for i, why in unusable.items() if i in fitting}  # not the ones carried over
    if unusable:  # groups whose times no series model can use fail alone, not with their batch
        for i in unusable:
            status[i], errors[i] = "failed", unusable[i]
        todo = np.asarray([i for i in todo.tolist() if i not in unusable], dtype=np.int64)
    fitted, secs = _fit(m, _subset(batch, todo) if len(todo) < n else batch)
    if len(fitted) != len(todo):
        fitted = [ModelError(f"{m.cls.__name__}.fit_batch returned {len(fitted)} results for {len(todo)} "
                             "series; it must return one fitted model or exception per series")] * len(todo)
    seconds[todo] = secs
    for i, f in zip(todo.tolist(), fitted):
        if isinstance(f, SkipGroup):
            status[i], errors[i] = "skipped", _feature_named(str(f), spec.features)
        elif isinstance(f, BaseException):
            status[i], errors[i] = "failed", describe_error(f)
        elif not isinstance(f, Model):
            status[i], errors[i] = "failed", (f"{m.cls.__name__}.fit returned {type(f).__name__}, not the fitted "
                                              "model: end fit() with `return self`")
        elif not f.is_fitted:  # it would be `ok` here and "not fitted yet" in every score
            status[i], errors[i] = "failed", _unfitted(f)
        else:
            try:
                blobs[i], status[i] = _serialize(f, m.serializer), "ok"
            except Exception as err:  # noqa: BLE001
                status[i], errors[i] = "failed", _unserialisable(f, m.serializer, err)
    for i, run in had.items():  # a nightly retrain that could not refit a group took its working model away
        if status[i] != "ok":
            errors[i] = f"{errors[i]} (run {run} {LOST_MODEL}: score the group with run={run!r} (--run {run}) until it refits)"
    return {"status": status, "error": errors, "seconds": seconds, "nrows": nrows,
            "extra_columns": {"model": pa.array(blobs, pa.binary()),
                              "fingerprint": pa.array(prints, pa.binary(8)),
                              "fitted_in": pa.array(fitted_in, pa.string())}}


def _unfitted(model: Model) -> str:
    """Why a model fit returned is not fitted: the state_attrs it left unset, or none declared."""
    name = type(model).__name__
    if not model.state_attrs:
        return (f"{name} declares no state_attrs, so it can never be scored or loaded as fitted: list the "
                "attributes its fit sets (e.g. state_attrs = ('mean_',))")
    missing = [a for a in model.state_attrs if not hasattr(model, a)]
    return (f"{name}.fit left {', '.join(missing)} unset (state_attrs = {tuple(model.state_attrs)!r}): set every "
            "attribute of state_attrs in _fit, or list in state_attrs the ones it sets")


def merge_results(unit_id: str, results: list[UnitResult]) -> UnitResult:
    """One result for a unit that ran as several pieces (isolated groups)."""
    out = UnitResult(unit_id, part_leaves=[])
    imports: dict[str, None] = {}
    leaves: set[tuple] = set()
    for r in results:
        out.groups += r.groups
        out.rows += r.rows
        out.seconds += r.seconds
        for k, v in r.counts.items():
            out.counts[k] = out.counts.get(k, 0) + v
        for k, v in r.carried.items():
            out.carried[k] = out.carried.get(k, 0) + v
        out.lost += r.lost
        for k, v in r.problems.items():
            out.problems[k] = out.problems.get(k, 0) + v
        out.problems_cut += r.problems_cut
        out.anomalies += r.anomalies
        imports.update(dict.fromkeys(r.imports))
        out.part_leaves += r.leaves_by_part()  # each piece's part holds that piece's leaves only
        out.parts += r.parts
        out.errors += r.errors
        leaves.update(r.leaves)
    out.imports = list(imports)
    out.leaves = sorted(leaves, key=lambda k: tuple(str(v) for v in k))
    tables = [r.group_table for r in results if r.group_table is not None]
    if tables:
        out.group_table = pa.concat_tables(tables, promote_options="permissive")
    data = [r.table for r in results if isinstance(r.table, pa.Table)]
    if data:
        out.table = pa.concat_tables(data)
    elif any(isinstance(r.table, list) for r in results):  # map_keys without a schema: each key's result
        out.table = [v for r in results for v in (r.table if isinstance(r.table, list) else [None] * r.groups)]
    out.errors = out.errors[:5]
    return out
