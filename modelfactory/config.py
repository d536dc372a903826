"""Layered settings for where and how a job runs.

Every setting has one name (``workers``, ``kube.image`` ...) and is looked up
in four layers, the first that sets it wins:

1. explicit arguments (``load_settings({"workers": 8})``, CLI flags); None means "not set";
2. environment variables: ``MODELFACTORY_<NAME>`` for top-level settings and
   ``MODELFACTORY_KUBE_<NAME>`` for ``kube.<name>`` (upper case; tables such as
   ``kube.env`` are given as JSON objects);
3. a TOML file: ``config_file=``, else ``$MODELFACTORY_CONFIG`` (top-level keys
   and a ``[kube]`` table, see ``examples/job.toml``);
4. the packaged defaults (the field defaults below).

A setting is replaced whole by the layer that sets it: a ``[kube.env]`` table
in the file replaces the default (empty) table, and ``MODELFACTORY_KUBE_ENV``
replaces the file's.  An unknown key, an unknown ``MODELFACTORY_KUBE_*``
variable or a ``MODELFACTORY_*`` variable that looks like a misspelt setting
or a misspelt variable of another part (``OTHER_ENV_VARS``: the config file,
the signing key, the ingest credentials) is an error naming where it was found,
with a "did you mean" hint; so is a value of the wrong type.  Any other
``MODELFACTORY_*`` variable is ignored with a warning naming it (it may be a
newer version's).  ``MODELFACTORY_SCHEDULER`` is another name of
``MODELFACTORY_CLUSTER``, as the CLI's ``--scheduler`` is ``--cluster``.
In the file, a setting written after a ``[table]`` header belongs to that table
(TOML's rule): under ``[storage_options]``, ``[kube]`` or the resources' tables,
where nothing could take it, it is an error; under ``[kube.env]`` or
``[kube.labels]``, where it is a legal if unlikely key, a warning.
There is no setting for a local cluster's threads or memory: pass your own
``modelfactory.run.local_cluster(threads_per_worker=..., memory_limit=...)``.

>>> s = load_settings({"workers": 4}, env={"MODELFACTORY_CLUSTER": "kube",
...                                        "MODELFACTORY_KUBE_IMAGE": "example/mf:1"})
>>> s.cluster, s.workers, s.kube.image, s.sources["kube.image"]
('kube', 4, 'example/mf:1', 'MODELFACTORY_KUBE_IMAGE')
>>> load_settings({"kube.imgae": "x"}, env={})
Traceback (most recent call last):
...
modelfactory.exceptions.ClusterError: Unknown setting 'kube.imgae' in the arguments; did you mean 'kube.image'?
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ClusterError

log = logging.getLogger(__name__)

__all__ = ["Settings", "KubeSettings", "load_settings", "job_settings", "env_var", "setting_names",
           "parse_int", "OTHER_ENV_VARS", "CONFIG_ENV"]

#: The variable that names a config file when ``config_file`` is not given.
CONFIG_ENV = "MODELFACTORY_CONFIG"
#: ``MODELFACTORY_*`` variables read by other parts of modelfactory, not settings: the config
#: file (here), the ingest module's Prometheus credentials (``ingest.prometheus``) and the key
#: that signs manifests (``store.signing_key``).
OTHER_ENV_VARS = frozenset({CONFIG_ENV, "MODELFACTORY_PROM_TOKEN", "MODELFACTORY_PROM_PASSWORD",
                            "MODELFACTORY_SIGNING_KEY"})
_PREFIX = "MODELFACTORY_"
#: Other names of a setting's variable.  The CLI's ``--scheduler`` is ``--cluster`` (one option,
#: two spellings, both the ``cluster`` setting), so ``MODELFACTORY_SCHEDULER=tcp://...`` is what
#: the flag makes one write; it was ignored, and the job ran on a LocalCluster instead.
ENV_ALIASES = {"MODELFACTORY_SCHEDULER": "cluster"}

# What a local cluster's threads and memory are set with: no setting does it (kube.threads and
# kube.resources are the Kubernetes pods'), and the hints for `threads = 2` or
# MODELFACTORY_THREADS pointed at kube.threads, which changes nothing on a local cluster.
LOCAL_CLUSTER_HINT = (
    "kube.threads and kube.resources (MODELFACTORY_KUBE_THREADS, MODELFACTORY_KUBE_RESOURCES) are for "
    "Kubernetes worker pods only (cluster = \"kube\"); no setting sets the threads or memory of a local "
    "cluster's workers (one thread each). From Python, make the local cluster yourself and pass it: "
    "`with modelfactory.run.local_cluster(workers=2, threads_per_worker=4, memory_limit=\"4GiB\") as c: "
    "modelfactory.train(..., cluster=c)`; from the command line, start `dask scheduler` and "
    "`dask worker ADDRESS --nthreads 4 --memory-limit 4GiB` and pass --scheduler ADDRESS")
# Names (of a setting or a variable, without MODELFACTORY_) that people reach for and that no
# setting is, with what to do instead.
_NOT_SETTINGS = {**dict.fromkeys(("threads", "threads_per_worker", "nthreads", "memory", "memory_limit"),
                                 LOCAL_CLUSTER_HINT),
                 "store": "the model store is an argument (store=, --store), not a setting"}

CLUSTER_WORDS = ("local", "inline", "kube")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
# Kubernetes' resource.Quantity: a number, then a binary suffix, a decimal exponent or a decimal suffix.
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[eE][+-]?[0-9]+|[numkMGTPE])?$")
# Label names and values (at most 63 characters), DNS-1123 subdomains (label key prefixes) and labels (namespaces).
_LABEL_NAME = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _opt(kind: str, doc: str, default: Any = None, factory: Any = None) -> Any:
    meta = {"kind": kind, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: Settings whose values may hold credentials: masked in reprs, never echoed in errors.
SECRET_SETTINGS = frozenset({"storage_options", "kube.env"})


def _masked(table: Mapping) -> dict:
    return {k: "***" for k in table}


def _masking_repr(obj, secret: set[str]) -> str:
    parts = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        parts.append(f"{f.name}={_masked(value) if f.name in secret and isinstance(value, Mapping) else value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class KubeSettings:
    """How a ``cluster="kube"`` job's Dask cluster is made (dask-kubernetes operator)."""

    image: str | None = _opt("str", "container image with modelfactory and your model code installed")
    namespace: str | None = _opt("namespace", "Kubernetes namespace (default: the kubeconfig's current one)")
    name: str = _opt("str", "name of the DaskCluster to create; {uuid} is replaced by 8 random hex digits",
                     "modelfactory-{uuid}")
    attach: str | None = _opt("str", "name of an existing DaskCluster to use instead of creating one "
                                     "(never scaled nor deleted; implies cluster='kube' unless cluster is "
                                     "set, and kube.maximum is then ignored)")
    minimum: int = _opt("int>=0", "adaptive: fewest workers (with maximum)", 0)
    maximum: int | None = _opt("int>=1", "adaptive: most workers; set it to make the cluster adaptive")
    threads: int = _opt("int>=1", "threads per worker pod (BLAS/OpenMP stay at one thread)", 1)
    resources: dict = _opt("resources", "worker container requests/limits (cpu, memory)",
                           factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"},
                                            "limits": {"memory": "2Gi"}})
    scheduler_resources: dict = _opt("resources", "scheduler container requests/limits",
                                     factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"},
                                                      "limits": {"memory": "2Gi"}})
    env: dict = _opt("str_map", "extra environment variables of the scheduler and workers", factory=dict)
    labels: dict = _opt("labels", "extra labels on the DaskCluster and its pods", factory=dict)
    idle_timeout: int = _opt("duration", "the operator deletes a cluster idle this long (seconds or "
                                         "'15m'); 0 = never", 900)
    resource_timeout: int = _opt("duration>=1", "seconds for the operator to act on a new DaskCluster", 60)
    startup_timeout: int = _opt("duration>=1", "seconds until the scheduler answers (image pull included)", 600)
    scheduler_service_type: str = _opt("service_type", "scheduler Service type: " + ", ".join(SERVICE_TYPES),
                                       "ClusterIP")
    custom_spec: str | None = _opt("path", "YAML file overlaid on the generated DaskCluster "
                                           "(tolerations, nodeSelector, volumes ...)")

    def __repr__(self) -> str:  # kube.env values may be credentials
        return _masking_repr(self, {"env"})


@dataclass(frozen=True, repr=False)
class Settings:
    """Where a job runs: the result of :func:`load_settings`."""

    cluster: str = _opt("cluster", "'local', 'inline', 'kube' or a scheduler address (tcp://host:8786)",
                        "local")
    workers: int | None = _opt("int>=1", "workers: local processes (default one per CPU the job may use) or kube pods "
                                         "of a fixed-size cluster (default 2)")
    unit_rows: int | None = _opt("int>=1", "rows per work unit (default: planned from the data)")
    storage_options: dict = _opt("dict", "fsspec options for s3:// and other remote paths", factory=dict)
    connect_timeout: int = _opt("duration>=1", "seconds to reach a scheduler given by its address and get "
                                               "its first answer (seconds or '1m')", 20)
    kube: KubeSettings = field(default_factory=KubeSettings)
    #: where each value came from: "default", a file path, an environment variable or "argument"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:  # storage_options may hold keys and secrets
        return _masking_repr(self, {"storage_options"})

    @property
    def adaptive(self) -> bool:
        """True when the job creates a Kubernetes cluster that scales with ``adapt``."""
        return self.cluster == "kube" and self.kube.attach is None and self.kube.maximum is not None

    @property
    def kube_workers(self) -> int:
        """Worker pods the DaskCluster starts with (``replicas``)."""
        if self.workers is not None:
            return self.workers
        return self.kube.minimum if self.adaptive else 2

    @property
    def plan_slots(self) -> int | None:
        """Worker threads (units running at once) the planner should size units for, before
        the workers exist: pods times ``kube.threads``.

        An adaptive cluster is planned for its maximum (so there is enough pending
        work to scale up); a fixed Kubernetes cluster for its size (pods start
        slowly, counting live workers would undersize).  None: count the live workers'
        threads (an attached cluster: see :func:`modelfactory.kube.kube_cluster`).
        """
        if self.cluster != "kube" or self.kube.attach is not None:
            return None
        return (self.kube.maximum if self.adaptive else self.kube_workers) * self.kube.threads


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "kind" in f.metadata}


_TOP = _fields(Settings)
_KUBE = _fields(KubeSettings)


def setting_names() -> list[str]:
    """All setting names, ``kube.*`` included.

    >>> setting_names()[:4]
    ['cluster', 'workers', 'unit_rows', 'storage_options']
    """
    return [*_TOP, *(f"kube.{k}" for k in _KUBE)]


def env_var(name: str) -> str:
    """The environment variable of a setting: ``env_var("kube.image") == "MODELFACTORY_KUBE_IMAGE"``."""
    return _PREFIX + name.replace(".", "_").upper()


_ENV_TO_NAME = {env_var(n): n for n in setting_names()}


def _field(name: str) -> dataclasses.Field:
    if name.startswith("kube."):
        return _KUBE[name[5:]]
    return _TOP[name]


def _hint(word: str, choices) -> str:
    """A "did you mean" for ``word``: the choice equal to it but for case, else the closest one."""
    lower = {str(c).lower(): c for c in choices}
    if word.lower() in lower:
        return f"; did you mean {lower[word.lower()]!r}?"
    close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f"; did you mean {lower[close[0]]!r}?" if close else ""


# ---------------------------------------------------------------------------
# value checks, one per kind
# ---------------------------------------------------------------------------
def _is_secret(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SECRET_SETTINGS)


def _type_error(name: str, where: str, expected: str, value: Any) -> ClusterError:
    shown = f"a {type(value).__name__} (value not shown)" if _is_secret(name) else \
        f"{value!r} ({type(value).__name__})"
    return ClusterError(f"Setting {name!r} {where} must be {expected}; got {shown}.")


def _coerce(name: str, kind: str, value: Any, where: str, base_dir: str | None) -> Any:
    """Check (and normalise) one value; ``value`` may be a string from the environment."""
    from_env = where.startswith("from " + _PREFIX)
    if kind in ("str", "path", "cluster", "service_type", "namespace"):
        if not isinstance(value, str) or not value:
            raise _type_error(name, where, "a non-empty string", value)
        if kind == "path" and base_dir and not os.path.isabs(value) and "://" not in value:
            value = os.path.normpath(os.path.join(base_dir, value))
        if kind == "cluster":
            _check_cluster(value, name, where)
        if kind == "namespace" and not _DNS_LABEL.fullmatch(value):
            raise ClusterError(f"Setting {name!r} {where} must be a Kubernetes namespace name: lower-case "
                               "letters, digits and '-', starting and ending with a letter or digit, at most "
                               f"63 characters; got {value!r}.")
        if kind == "service_type" and value not in SERVICE_TYPES:
            raise ClusterError(f"Setting {name!r} {where} must be one of {', '.join(SERVICE_TYPES)}; "
                               f"got {value!r}{_hint(value, SERVICE_TYPES)}")
        return value
    if kind.startswith("int>="):
        low = int(kind[5:])
        if from_env and isinstance(value, str):
            try:
                value = parse_int(value)
            except ValueError:
                raise _type_error(name, where, f"an integer >= {low}", value) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _type_error(name, where, f"an integer >= {low}", value)
        return value
    if kind.startswith("duration"):
        return _duration(name, value, where, int(kind[10:] or 0))
    if from_env and isinstance(value, str) and kind in ("dict", "str_map", "resources", "labels"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ClusterError(f"Setting {name!r} {where} must be a JSON object "
                               f"(e.g. '{{\"KEY\": \"value\"}}'); it is not valid JSON: {err}.") from None
    if not isinstance(value, Mapping):
        raise _type_error(name, where, "a table (a TOML [section] or a JSON object)", value)
    if kind == "str_map":
        return {str(k): _env_string(name, k, v, where) for k, v in value.items()}
    if kind == "labels":
        return {str(k): _label(name, str(k), _env_string(name, k, v, where), where) for k, v in value.items()}
    if kind == "resources":
        return _resources(name, value, where)
    return dict(value)


_INT_TEXT = re.compile(r"[+-]?[0-9]+")  # ASCII digits: re's \d would take any script's


def parse_int(text: str) -> int:
    """An integer written in ASCII digits, with an optional sign and spaces around it.

    Python's ``int()`` also takes ``"2_0"`` (20: an underscore is a digit separator in code) and
    the digits of every script (``"٣"``, Arabic-Indic three, is 3): one typo in
    ``MODELFACTORY_WORKERS=2_0`` started 20 workers on a 2-core machine.  Text from the
    environment (or a command line) is read strictly; anything else is a ValueError.

    >>> parse_int(" 20 "), parse_int("+3")
    (20, 3)
    >>> parse_int("2_0")
    Traceback (most recent call last):
    ...
    ValueError: '2_0' is not a whole number written in the digits 0-9
    """
    stripped = text.strip()
    if not _INT_TEXT.fullmatch(stripped):
        raise ValueError(f"{text!r} is not a whole number written in the digits 0-9")
    return int(stripped)


def _check_cluster(value: str, name: str, where: str) -> None:
    if value in CLUSTER_WORDS or "://" in value or re.fullmatch(r"[\w.\-\[\]:]+:\d+", value):
        return
    alias = {"kubernetes": "kube", "k8s": "kube", "localcluster": "local"}.get(value.lower())
    hint = f"; did you mean {alias!r}?" if alias else _hint(value, CLUSTER_WORDS)
    raise ClusterError(f"Setting {name!r} {where} must be 'local', 'inline', 'kube' or a scheduler "
                       f"address like 'tcp://10.0.0.5:8786'; got {value!r}{hint}")


def _env_string(name: str, key: Any, value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _type_error(f"{name}.{key}", where, "a string (quote it)", value)
    return str(value)


_LABEL_RULE = ("at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a "
               "letter or digit")


def _label(name: str, key: str, value: str, where: str) -> str:
    """Check a label against Kubernetes' rules (an API server refuses the whole DaskCluster otherwise)."""
    prefix, _, key_name = key.rpartition("/")
    if not _LABEL_NAME.fullmatch(key_name) or ("/" in key and not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ClusterError(f"Label key {key!r} ({name}) {where} is not a valid Kubernetes label key: "
                           f"{_LABEL_RULE}, optionally after a DNS prefix and '/' (example.com/team).")
    if value and not _LABEL_NAME.fullmatch(value):
        raise ClusterError(f"Setting '{name}.{key}' {where} is not a valid Kubernetes label value: "
                           f"{_LABEL_RULE} (or empty); got {value!r}.")
    return value


def _resources(name: str, value: Mapping, where: str) -> dict:
    out: dict = {}
    for part, table in value.items():
        if part not in ("requests", "limits"):
            raise ClusterError(f"Unknown key '{name}.{part}' {where}: resources take 'requests' and "
                               f"'limits'{_hint(part, ('requests', 'limits'))}")
        if not isinstance(table, Mapping):
            raise _type_error(f"{name}.{part}", where, "a table like {cpu = \"1\", memory = \"2Gi\"}", table)
        out[part] = {}
        for res, qty in table.items():
            q = _env_string(f"{name}.{part}", res, qty, where)
            if not _QUANTITY.fullmatch(q):
                raise ClusterError(f"Setting '{name}.{part}.{res}' {where} must be a Kubernetes quantity "
                                   f"such as \"500m\", \"2\", \"4Gi\", \"1.5G\" (suffixes m, k, M, G, T, P, E, "
                                   f"Ki, Mi, Gi, Ti, Pi, Ei or an exponent like 1e9); got {qty!r}.")
            out[part][str(res)] = q
    return out


def _duration(name: str, value: Any, where: str, low: int = 0) -> int:
    """Whole seconds, rounded up (``"500ms"`` is 1 s, not 0, which may mean "never")."""
    expected = "a duration in seconds (an integer) or a string like '15m' or '1h'"
    if low:
        expected += f", at least {low} s"
    if isinstance(value, bool):
        raise _type_error(name, where, expected, value)
    if isinstance(value, str):
        from dask.utils import parse_timedelta

        # parse_timedelta reads its number with float(), which takes "2_0" as 20 and any script's
        # digits ("٣" is 3), as int() does (see parse_int)
        if not value.isascii() or "_" in value:
            raise _type_error(name, where, expected, value)
        try:
            value = parse_timedelta(value.strip(), default="seconds")
        except (ValueError, KeyError, TypeError):
            raise _type_error(name, where, expected, value) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or math.ceil(value) < low:
        raise _type_error(name, where, expected, value)
    return math.ceil(value)


# ---------------------------------------------------------------------------
# the layers
# ---------------------------------------------------------------------------
def _flatten(data: Mapping, where: str) -> dict[str, Any]:
    """``{"kube": {"image": ...}}`` or ``{"kube.image": ...}`` -> ``{"kube.image": ...}``; unknown keys raise."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key == "kube":
            if isinstance(value, KubeSettings):
                value = {f: getattr(value, f) for f in _KUBE}
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise _type_error("kube", where, "a table of kube settings", value)
            items.extend((f"kube.{sub}", v) for sub, v in value.items())
        else:
            items.append((key, value))
    known = setting_names()
    out: dict[str, Any] = {}
    for key, value in items:
        if key not in known:
            # "kube" is a section, not a setting, but [kueb] or [Kube] should point to it.
            hint = _hint(str(key), [*known, "kube"]) or f". Known settings: {', '.join(known)}."
            if str(key).lower() in _NOT_SETTINGS:  # `threads = 2` was "did you mean 'kube.threads'?"
                hint = f": {_NOT_SETTINGS[str(key).lower()]}."
            raise ClusterError(f"Unknown setting {key!r} {where}{hint}")
        if value is not None:
            out[key] = value
    return out


def _where(origin: str) -> str:
    if origin == "argument":
        return "in the arguments"
    if origin.startswith(_PREFIX):
        return f"from {origin}"
    return f"in {origin}"


def _env_guess(var: str, cutoff: float = 0.75) -> str | None:
    """The known variable (a setting's, an alias or one of ``OTHER_ENV_VARS``) that ``var`` is
    probably a misspelling of, if any."""
    suffix = var[len(_PREFIX):]
    # Compare without the common prefix (it would make every name look close), and let
    # MODELFACTORY_IMAGE find MODELFACTORY_KUBE_IMAGE.
    known = [*_ENV_TO_NAME, *ENV_ALIASES, *sorted(OTHER_ENV_VARS)]
    candidates = {v[len(_PREFIX):]: v for v in known}
    candidates.update({v[len(_PREFIX) + 5:]: v for v in _ENV_TO_NAME if v.startswith(_PREFIX + "KUBE_")})
    close = difflib.get_close_matches(suffix, list(candidates), n=1, cutoff=cutoff)
    if close:
        return candidates[close[0]]
    # MODELFACTORY_CONFIG_FILE, MODELFACTORY_SIGNING_KEY_FILE: a known name and more
    longer = [v for k, v in candidates.items() if cutoff < 0.75 and suffix.startswith(k + "_")]
    return max(longer, key=len) if longer else None


#: What Kubernetes sets in every pod for each Service of its namespace (``<NAME>_SERVICE_HOST``,
#: ``<NAME>_PORT_8786_TCP_ADDR``...; Docker's links did the same): a Service called
#: ``modelfactory-scheduler`` (as ``kube.attach`` names one) or ``modelfactory-kube-<id>`` gave
#: every pod of the namespace variables that stopped its jobs as unknown settings.  Not ours.
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$")

#: The unknown variables warned about already: once a process, not once a job (a notebook runs
#: many, and the CLI reads the settings more than once).
_WARNED: set[str] = set()


def _unknown_env(var: str) -> None:
    """Refuse or warn about a ``MODELFACTORY_*`` variable that nothing reads.

    Refused: a near-miss of a variable modelfactory reads (``MODELFACTORY_WROKERS``, and as much
    ``MODELFACTORY_SIGNING_KY``: the key it was meant to be is then unused, and a run committed
    unsigned says nothing of it), an unknown ``MODELFACTORY_KUBE_*``, and a name for a local
    cluster's threads or memory (it would run with other ones than asked).  Those are typos, or
    settings that do not exist; either way the job would not run as asked.  Any other name is a
    warning, not an error: it may be a variable of a newer modelfactory (one environment serving
    two versions: a pod spec, a CI image) or of a script of the user's, which an error would
    break for nothing.  The warning names it, and the closest known name if any.
    """
    suffix = var[len(_PREFIX):]
    advice = _NOT_SETTINGS.get(suffix.lower())
    guess = _env_guess(var)
    if advice == LOCAL_CLUSTER_HINT:
        raise ClusterError(f"Unknown environment variable {var}: {advice}. Unset it.")
    if guess is not None or suffix.startswith("KUBE_"):
        hint = f"; did you mean {guess}?" if guess else ""
        raise ClusterError(f"Unknown environment variable {var}{hint} (setting variables are "
                           f"{_PREFIX}<NAME> and {_PREFIX}KUBE_<NAME>, see docs/kubernetes.md; "
                           "unset it or fix the name).")
    if var in _WARNED:
        return
    _WARNED.add(var)
    near = _env_guess(var, cutoff=0.6)
    hint = f"; {advice}" if advice else f"; did you mean {near}?" if near else ""
    log.warning("%s is ignored: no part of modelfactory reads it%s (setting variables are %s<NAME> and "
                "%sKUBE_<NAME>, see docs/kubernetes.md; the others are %s)", var, hint, _PREFIX, _PREFIX,
                ", ".join(sorted(OTHER_ENV_VARS)))


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Settings from ``MODELFACTORY_*`` variables.  ``OTHER_ENV_VARS`` belong to other parts of
    modelfactory and are left alone; any other variable that is no setting's is refused or
    warned about (:func:`_unknown_env`)."""
    out: dict[str, tuple[Any, str]] = {}
    for var, value in env.items():
        if not var.startswith(_PREFIX) or var in OTHER_ENV_VARS:
            continue
        name = _ENV_TO_NAME.get(var) or ENV_ALIASES.get(var)
        if name is None:
            if not _SERVICE_LINK.search(var):
                _unknown_env(var)
            continue
        if value.strip() == "":
            continue  # an empty variable counts as unset
        if name in out and out[name][0].strip() != value.strip():  # MODELFACTORY_CLUSTER and _SCHEDULER
            raise ClusterError(f"{out[name][1]}={out[name][0]!r} and {var}={value!r} both set {name!r}, "
                               f"to different values: unset one (they are the same setting).")
        if name not in out or var == env_var(name):  # the setting's own name, in sources and errors
            out[name] = (value, var)
    return out


def _read_toml(path: str, given: str) -> dict:
    """The TOML file at ``path``; ``given``: how it was named, for the not-found error."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ClusterError("Reading a TOML config file on Python 3.10 needs tomli: pip install tomli"
                               ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ClusterError(f"Config file {path!r} not found (from {given}).") from None
    except IsADirectoryError:
        raise ClusterError(f"Config file {path!r} is a folder; give the path of a .toml file.") from None
    except tomllib.TOMLDecodeError as err:
        with open(path, "rb") as f:
            bom = f.read(3) == b"\xef\xbb\xbf"
        hint = " It starts with a byte-order mark (BOM), which TOML does not allow: save it as UTF-8 without BOM." if bom else ""
        raise ClusterError(f"Config file {path!r} is not valid TOML: {err}.{hint}") from err
    except UnicodeDecodeError as err:
        raise ClusterError(f"Config file {path!r} is not valid UTF-8 TOML (byte {err.start}: "
                           f"{err.object[err.start:err.start + 1]!r}); save it as UTF-8.") from None
    except OSError as err:
        raise ClusterError(f"Config file {path!r} cannot be read: {err.strerror or err}.") from None


_TOML_RULE = ("TOML puts every key written after a [table] header into that table, up to the next header: "
              "move top-level settings above the first [table] of the file, and kube settings into [kube] "
              "above its sub-tables")


def _swallowed(data: Mapping, path: str) -> None:
    """Refuse (or warn about) a setting that TOML put into a table of the file that takes keys of
    its own.

    ``[storage_options]`` then ``workers = 1`` is, by TOML's rule, ``storage_options = {workers =
    1}``: the worker count was handed to fsspec, and ``workers`` stayed unset, without a word;
    ``workers = 8`` appended to ``examples/job.toml`` became a Kubernetes label.  A key of such a
    table that is the name of a setting (top-level, or of ``[kube]`` in its sub-tables) cannot be
    meant there when nothing could take it: no fsspec file system has a ``workers`` or
    ``unit_rows`` option (nested tables such as ``config_kwargs`` are not looked at), and no
    container resource is called ``workers`` or ``threads`` (an API server refuses the cluster):
    those are errors.  An environment variable or a label called ``workers``, ``name`` or
    ``image`` is legal and may be meant, if unlikely: those are a warning.  Only the file is
    checked: the environment's JSON tables have no headers to fall under.
    """
    top = [n for n in _TOP if n != "storage_options"]
    kube = data.get("kube") if isinstance(data.get("kube"), Mapping) else {}
    settings_of_kube = [*_TOP, *_KUBE]
    tables: list[tuple[str, Any, list[str], str]] = [
        ("storage_options", data.get("storage_options"), top, "which no fsspec file system takes"),
        ("kube", kube, list(_TOP), "a top-level setting, which [kube] does not take")]
    for res in ("resources", "scheduler_resources"):
        table = kube.get(res)
        tables.append((f"kube.{res}", table, settings_of_kube, "which resources do not take (requests, limits)"))
        for part in ("requests", "limits"):
            sub = table.get(part) if isinstance(table, Mapping) else None
            tables.append((f"kube.{res}.{part}", sub, settings_of_kube, "which is no container resource"))
    for name, value, names, why in tables:
        for key in value if isinstance(value, Mapping) else ():
            if key in names:
                meant = key if key in _TOP else f"kube.{key}"
                raise ClusterError(f"In {path}, {key!r} is a key of the [{name}] table, but it is the name of the "
                                   f"setting {meant!r}, {why}. {_TOML_RULE}.")
    for name in ("env", "labels"):
        value = kube.get(name)
        for key in value if isinstance(value, Mapping) else ():
            mark = f"{path}:kube.{name}.{key}"
            if key in settings_of_kube and mark not in _WARNED:
                _WARNED.add(mark)
                meant = key if key in _TOP else f"kube.{key}"
                what = "an environment variable" if name == "env" else "a label"
                log.warning("In %s, %r is a key of the [kube.%s] table, so it is %s of the cluster, but it is also the "
                            "name of the setting %r: if the setting was meant, it is not set. %s. (If %s called %r is "
                            "meant, this warning can be ignored.)", path, key, name, what, meant, _TOML_RULE, what,
                            key)


def load_settings(args: Mapping[str, Any] | None = None, *, config_file: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Resolve the settings: ``args`` > environment > config file > defaults.

    Parameters
    ----------
    args : mapping, optional
        Explicit values; None values are ignored.  Keys are setting names
        (``"workers"``, ``"kube.image"``) or ``"kube"`` with a mapping.
    config_file : path, optional
        A TOML file; default ``$MODELFACTORY_CONFIG`` if set.
    env : mapping, optional
        The environment to read (default ``os.environ``).

    Raises
    ------
    ClusterError
        An unknown setting or variable, a value of the wrong type, an unreadable file.
    """
    env = os.environ if env is None else env
    layers: list[tuple[dict[str, Any], dict[str, str], str | None]] = []  # (values, origin per key, base dir)

    path = os.fspath(config_file) if config_file is not None else (env.get(CONFIG_ENV) or None)
    if path:
        path = os.path.expanduser(path)  # "--config=~/mf.toml", or a systemd or Docker ENV: no shell expands it
        # train(config=...) and the other jobs' config=, the CLI's --config, load_settings'
        # config_file=: the message named config_file= and $MODELFACTORY_CONFIG, not config=
        data = _read_toml(path, "--config, config= or config_file=" if config_file is not None else f"${CONFIG_ENV}")
        _swallowed(data, path)
        values = _flatten(data, f"in {path}")
        layers.append((values, {k: path for k in values}, os.path.dirname(os.path.abspath(path))))
    from_env = _from_env(env)
    layers.append(({k: v for k, (v, _) in from_env.items()}, {k: var for k, (_, var) in from_env.items()}, None))
    arg_values = _flatten(dict(args or {}), "in the arguments")
    layers.append((arg_values, {k: "argument" for k in arg_values}, None))

    top: dict[str, Any] = {}
    kube: dict[str, Any] = {}
    sources = {name: "default" for name in setting_names()}
    for values, origins, base_dir in layers:
        for name, value in values.items():
            origin = origins[name]
            v = _coerce(name, _field(name).metadata["kind"], value, _where(origin), base_dir)
            (kube if name.startswith("kube.") else top)[name.removeprefix("kube.")] = v
            sources[name] = origin
    if kube.get("attach") is not None and sources["cluster"] == "default":
        # Attaching only makes sense on Kubernetes: kube.attach alone means cluster = "kube".
        top["cluster"] = "kube"
        sources["cluster"] = sources["kube.attach"]
    settings = Settings(**top, kube=KubeSettings(**kube), sources=sources)
    _check_consistency(settings)
    return settings


def job_settings(cluster: Any = None, *, workers: int | None = None, unit_rows: int | None = None,
                 storage_options: dict | None = None, config: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> Settings:
    """Settings for one job, from the arguments of ``train``/``apply``/... and the layers below.

    A Client or cluster object given as ``cluster`` is not a setting: it is
    used as it is, and ``Settings.cluster`` comes from the other layers.

    >>> job_settings("inline", workers=2, env={}).cluster
    'inline'
    """
    named = cluster is None or isinstance(cluster, str)
    return load_settings({"cluster": cluster if named else None, "workers": workers, "unit_rows": unit_rows,
                          "storage_options": storage_options}, config_file=config, env=env)


def _check_consistency(s: Settings) -> None:
    k = s.kube

    def src(name: str) -> str:
        return s.sources.get(name, "default")

    if k.attach is None and k.maximum is not None and k.minimum > k.maximum:  # attach ignores maximum
        raise ClusterError(f"kube.minimum ({k.minimum}, from {src('kube.minimum')}) is larger than "
                           f"kube.maximum ({k.maximum}, from {src('kube.maximum')}).")
    if s.adaptive and s.workers is not None and s.workers > k.maximum:
        raise ClusterError(f"workers ({s.workers}, from {src('workers')}) is more than kube.maximum "
                           f"({k.maximum}, from {src('kube.maximum')}): an adaptive cluster starts with "
                           "`workers` pods and scales between kube.minimum and kube.maximum.")
    # kube.attach with kube.maximum: the attached cluster keeps its own scaling and kube.maximum
    # is ignored (``adaptive`` is False), so one config file serves both kinds of job.
