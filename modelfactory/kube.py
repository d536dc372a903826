"""Dask clusters on Kubernetes, through the dask-kubernetes operator.

``cluster="kube"`` makes one ``DaskCluster`` for the job and deletes it when
the job ends, on success, failure or Ctrl-C; ``kube.attach = "name"`` runs on
an existing DaskCluster instead, which is never scaled nor deleted.  Settings
come from :mod:`modelfactory.config`; the manifest is built here, checked
against the operator's own CRD (strictly: unknown fields are errors), and
printed by ``python -m modelfactory cluster-spec``.

>>> from modelfactory.config import load_settings
>>> s = load_settings({"cluster": "kube", "kube": {"image": "example/mf:1", "name": "demo"}}, env={})
>>> spec = make_spec(s)
>>> spec["metadata"]["name"], spec["spec"]["worker"]["spec"]["containers"][0]["args"][:4]
('demo', ['dask', 'worker', '--nthreads', '1'])

dask-kubernetes is imported only when used; without it the error says
``pip install -e '.[kube]'`` in a checkout.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import getpass
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .config import Settings
from .exceptions import ClusterError

__all__ = ["make_spec", "make_autoscaler_spec", "manifests", "validate_spec", "crd_schema",
           "dump_manifests", "cluster_spec", "kube_cluster", "KUBE_HINT", "OWNER_ANNOTATION"]

log = logging.getLogger(__name__)

#: Not ``pip install 'modelfactory[kube]'``: the ``modelfactory`` on PyPI is another project.
KUBE_HINT = ("install the kube extra from your modelfactory checkout, pip install -e '.[kube]' (or your "
             "modelfactory wheel with [kube]; the 'modelfactory' on PyPI is another project)")
API_VERSION = "kubernetes.dask.org/v1"
#: Annotation with a random token: a DaskCluster is deleted only if it carries ours.
OWNER_ANNOTATION = "modelfactory.dev/owner-token"
PART_OF = {"app.kubernetes.io/part-of": "modelfactory"}
_NAME = re.compile(r"^(?=.{1,53}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CRD_DIR = "operator/deployment/helm/dask-kubernetes-operator/crds"
_CLOSE_TIMEOUT = 120


def _operator():
    try:
        from dask_kubernetes import operator
    except ImportError as err:
        raise ClusterError(f"cluster='kube' needs dask-kubernetes, which cannot be imported ({err}): "
                           f"{KUBE_HINT}") from err
    return operator


# ---------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------
def _cluster_name(template: str, source: str) -> str:
    try:
        user = re.sub(r"[^a-z0-9-]", "-", getpass.getuser().lower()).strip("-") or "user"
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "user"
    try:
        name = template.format(uuid=uuid.uuid4().hex[:8], user=user)
    except (KeyError, IndexError, ValueError) as err:
        raise ClusterError(f"kube.name {template!r} (from {source}) may only use the placeholders "
                           f"{{uuid}} and {{user}}; got an error formatting it: {err!r}.") from None
    if not _NAME.match(name):
        raise ClusterError(f"kube.name {name!r} (from {source}) is not a valid DaskCluster name: use lower-case "
                           "letters, digits and '-', start and end with a letter or digit, at most 53 characters.")
    return name


def make_spec(settings: Settings) -> dict:
    """The ``DaskCluster`` manifest a ``cluster="kube"`` job creates, validated against the CRD.

    Built with ``dask_kubernetes.operator.make_cluster_spec``, then: workers run
    ``dask worker --nthreads <kube.threads>`` with one BLAS/OpenMP thread
    (``OMP_NUM_THREADS=1`` ...) and Dask's worker profiler off (as in a local
    cluster, ``run.WORKER_DASK_CONFIG``), plus ``kube.env``; the worker and scheduler
    resources, the labels and ``spec.idleTimeout`` come from the settings; the
    ``kube.custom_spec`` YAML, if any, is overlaid last (mappings merge, lists
    of named items such as containers merge by name, an ``env`` item replaces
    the item of the same name whole, other values and lists replace, ``null``
    removes a key).
    """
    from .run import WORKER_DASK_CONFIG, WORKER_ENV, dask_config_env

    k = settings.kube
    src = settings.sources.get
    if not k.image:
        raise ClusterError("kube.image is not set: build an image with modelfactory and your model code "
                           "installed (docs/kubernetes.md) and set it in the config file ([kube] image = "
                           "\"...\") or as MODELFACTORY_KUBE_IMAGE.")
    op = _operator()
    name = _cluster_name(k.name, src("kube.name", "default"))
    env = {**WORKER_ENV, **dask_config_env(WORKER_DASK_CONFIG), **k.env}
    for var, value in WORKER_ENV.items():
        if env[var] != value:
            log.warning("kube.env sets %s=%s: BLAS/OpenMP will use more than one thread per worker",
                        var, env[var])
    spec = op.make_cluster_spec(
        name=name, image=k.image, n_workers=settings.kube_workers, resources=k.resources or None, env=env,
        worker_command=["dask", "worker", "--nthreads", str(k.threads)],
        scheduler_service_type=k.scheduler_service_type, idle_timeout=k.idle_timeout)
    labels = {**PART_OF, **k.labels}
    spec["metadata"]["labels"] = dict(labels)
    if k.namespace:
        spec["metadata"]["namespace"] = k.namespace
    for role in ("worker", "scheduler"):
        spec["spec"][role] = {"metadata": {"labels": dict(labels)}, **spec["spec"][role]}
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    # Current distributed has no ``dask-scheduler`` script any more: use the ``dask`` CLI.
    scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0", *scheduler["args"][3:]]
    scheduler["resources"] = k.scheduler_resources or None
    if k.custom_spec:
        spec = _overlay(spec, _load_custom(k.custom_spec, src("kube.custom_spec", "default")))
    spec = _drop_none(spec)
    validate_spec(spec)
    return spec


def make_autoscaler_spec(name: str, minimum: int, maximum: int, labels: Mapping[str, str] | None = None,
                         namespace: str | None = None) -> dict:
    """A ``DaskAutoscaler`` with the name and ``spec`` of the one ``KubeCluster.adapt(minimum=,
    maximum=)`` creates, with labels (dask-kubernetes' own puts them under ``metadata`` itself)."""
    metadata: dict = {"name": name, **({"namespace": namespace} if namespace else {}),
                      "labels": {**PART_OF, **(labels or {})}}
    return {"apiVersion": API_VERSION, "kind": "DaskAutoscaler", "metadata": metadata,
            "spec": {"cluster": name, "minimum": minimum, "maximum": maximum}}


def manifests(settings: Settings) -> list[dict]:
    """What the job would create: the DaskCluster, and a DaskAutoscaler when adaptive."""
    if settings.kube.attach is not None:
        raise ClusterError(f"kube.attach is set ({settings.kube.attach!r}): the job runs on that existing "
                           "DaskCluster and creates nothing; unset kube.attach to see the manifest.")
    spec = make_spec(settings)
    docs = [spec]
    if settings.adaptive:
        auto = make_autoscaler_spec(spec["metadata"]["name"], settings.kube.minimum, settings.kube.maximum,
                                    settings.kube.labels, spec["metadata"].get("namespace"))
        validate_spec(auto)
        docs.append(auto)
    return docs


def dump_manifests(docs: Sequence[dict], fmt: str | None = None) -> str:
    """YAML documents (``---`` separated) or, for ``fmt="json"`` or without PyYAML, JSON
    (one object, or a ``v1/List`` of several); both are accepted by ``kubectl apply -f``."""
    if fmt not in (None, "yaml", "json"):
        raise ClusterError(f"The manifest format must be 'yaml' or 'json'; got {fmt!r}.")
    if fmt != "json":
        try:
            import yaml
        except ImportError:
            if fmt == "yaml":
                raise ClusterError("YAML output needs PyYAML: pip install pyyaml (or use --format json)."
                                   ) from None
        else:
            return yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False)
    body: Any = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    return json.dumps(body, indent=2) + "\n"


def cluster_spec(config_file: str | None = None, *, workers: int | None = None, fmt: str | None = None,
                 env: Mapping[str, str] | None = None) -> str:
    """What ``python -m modelfactory cluster-spec --config FILE`` prints: :func:`manifests`
    for the layered settings (``cluster`` forced to ``"kube"``), as YAML or JSON."""
    from .config import load_settings

    settings = load_settings({"cluster": "kube", "workers": workers}, config_file=config_file, env=env)
    return dump_manifests(manifests(settings), fmt)


def _load_custom(path: str, source: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ClusterError(f"kube.custom_spec file {path!r} (from {source}) not found.") from None
    except IsADirectoryError:
        raise ClusterError(f"kube.custom_spec {path!r} (from {source}) is a folder; give the path of a YAML "
                           "file.") from None
    except UnicodeDecodeError:
        raise ClusterError(f"kube.custom_spec file {path!r} (from {source}) is not valid UTF-8 YAML.") from None
    except OSError as err:
        raise ClusterError(f"kube.custom_spec file {path!r} (from {source}) cannot be read: "
                           f"{err.strerror or err}.") from None
    except yaml.YAMLError as err:
        raise ClusterError(f"kube.custom_spec file {path!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ClusterError(f"kube.custom_spec file {path!r} must hold a mapping (a DaskCluster manifest or a "
                           f"part of one, e.g. spec: worker: spec: tolerations: ...); got {type(data).__name__}.")
    if data.get("kind", "DaskCluster") != "DaskCluster":
        raise ClusterError(f"kube.custom_spec file {path!r} has kind {data['kind']!r}; it must be a DaskCluster.")
    return data


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


#: Lists whose named items are replaced whole, not merged: an env variable has either
#: ``value`` or ``valueFrom``, and an API server rejects an item with both.
_REPLACE_ITEMS = frozenset({"env"})


def _overlay(base: Any, over: Any, key: str | None = None) -> Any:
    """Merge ``over`` into ``base`` (see :func:`make_spec`); returns a new object."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, value in over.items():
            out[k] = _overlay(base[k], value, k) if k in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(over, list) and _named(base) and _named(over):
        extra = {i["name"]: i for i in over}
        whole = key in _REPLACE_ITEMS
        merged = [(copy.deepcopy(extra.pop(i["name"])) if whole else _overlay(i, extra.pop(i["name"])))
                  if i["name"] in extra else i for i in base]
        return merged + [copy.deepcopy(i) for i in over if i["name"] in extra]
    return copy.deepcopy(over)


def _drop_none(obj: Any) -> Any:
    """Remove None values (``make_worker_spec`` emits ``resources: None``; an API server prunes them)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj if v is not None]
    return obj


# ---------------------------------------------------------------------------
# validation against the CRDs shipped inside dask-kubernetes
# ---------------------------------------------------------------------------
def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": _NAME.pattern}, "namespace": {"type": "string"},
                   "labels": _STR_MAP, "annotations": _STR_MAP},
}


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str, strict: bool) -> dict:
    import importlib.resources

    import yaml

    _operator()
    fname = {"DaskCluster": "daskcluster.yaml", "DaskAutoscaler": "daskautoscaler.yaml",
             "DaskWorkerGroup": "daskworkergroup.yaml", "DaskJob": "daskjob.yaml"}.get(kind)
    if fname is None:
        raise ClusterError(f"No CRD for kind {kind!r}: expected DaskCluster, DaskAutoscaler, DaskWorkerGroup "
                           "or DaskJob.")
    res = importlib.resources.files("dask_kubernetes").joinpath(f"{_CRD_DIR}/{fname}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(res.read_text(), Loader=loader)  # noqa: S506 - a safe loader
    version = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
    schema = version["schema"]["openAPIV3Schema"]
    if not strict:
        return schema
    schema = _strict(schema)
    schema["properties"] = {"apiVersion": {"type": "string", "enum": [API_VERSION]},
                            "kind": {"type": "string", "enum": [kind]}, "metadata": _METADATA,
                            **schema["properties"]}
    schema["required"] = ["apiVersion", "kind", "metadata", *schema.get("required", ["spec"])]
    return schema


def crd_schema(kind: str = "DaskCluster", *, strict: bool = True) -> dict:
    """The ``openAPIV3Schema`` of a dask-kubernetes CRD, as shipped in the installed package.

    ``strict=True`` (default) adds apiVersion/kind/metadata at the root and
    ``additionalProperties: false`` to every object that lists its properties,
    so a misspelt field is an error (an API server would silently prune it).
    """
    return copy.deepcopy(_crd_schema(kind, strict))


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def _describe(err) -> list[str]:
    from difflib import get_close_matches

    where = _path(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}))
        lines = []
        for key in sorted(set(err.instance) - set(allowed)):
            close = get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{_path([*err.absolute_path, key])}: unknown field{hint}")
        return lines
    msg = err.message if len(err.message) < 160 else err.message[:157] + "..."
    return [f"{where}: {msg}"]


def validate_spec(spec: Mapping) -> None:
    """Check a DaskCluster (or DaskAutoscaler) manifest against the installed CRD, strictly.

    Raises :class:`ClusterError` listing the path of every bad field, e.g.
    ``spec.worker.spec.containers[0].resourcez: unknown field; did you mean 'resources'?``.
    """
    try:
        import jsonschema
    except ImportError as err:
        raise ClusterError(f"Validating Kubernetes manifests needs jsonschema: {KUBE_HINT}") from err
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in ("DaskCluster", "DaskAutoscaler", "DaskWorkerGroup", "DaskJob"):
        raise ClusterError(f"Expected a DaskCluster manifest (kind: DaskCluster); got kind {kind!r}.")
    validator = jsonschema.Draft7Validator(_crd_schema(kind, True))
    problems = [line for e in sorted(validator.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path)))
                for line in _describe(e)]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        shown = "\n  ".join(problems[:10]) + more
        name = spec.get("metadata", {}).get("name", "?") if isinstance(spec.get("metadata"), Mapping) else "?"
        raise ClusterError(f"The {kind} manifest {name!r} does not match the {kind} CRD of the installed "
                           f"dask-kubernetes:\n  {shown}")


# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------
class _StartupTimeout(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _job_cluster_class(base: type) -> type:
    """A KubeCluster that gives up after ``startup_timeout`` and, when its start fails or is
    interrupted, deletes the DaskCluster only if it carries this job's owner token."""

    class JobKubeCluster(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, mf_token: str | None, mf_startup_timeout: float, mf_holder: list, **kwargs):
            #: Workers the planner should size work units for (set by kube_cluster; None: count live ones).
            self.plan_slots: int | None = None
            self._mf_token = mf_token
            self._mf_startup_timeout = mf_startup_timeout
            self._mf_task: asyncio.Task | None = None
            self._mf_done = threading.Event()
            mf_holder.append(self)
            super().__init__(**kwargs)

        async def _start(self):
            self._mf_task = asyncio.current_task()
            start = asyncio.ensure_future(super()._start())
            try:
                done, _ = await asyncio.wait({start}, timeout=self._mf_startup_timeout)
                if not done:
                    raise _StartupTimeout(dict(getattr(self, "_startup_component_status", {})))
                await start
            except BaseException:
                # Ctrl-C cancels this task (distributed's sync() does, and so may _abort_start):
                # clean up in a task of its own, which a second cancellation cannot interrupt.
                cleanup = asyncio.ensure_future(self._mf_cleanup(start))
                cleanup.add_done_callback(lambda _: self._mf_done.set())
                with contextlib.suppress(BaseException):
                    await asyncio.shield(cleanup)
                raise
            self._mf_done.set()

        async def _mf_cleanup(self, start: asyncio.Future) -> None:
            if not start.done():
                start.cancel()
                with contextlib.suppress(BaseException):
                    await start
            with contextlib.suppress(Exception):
                await self._mf_delete_if_ours()
            # Nothing left to shut down: keep dask-kubernetes' exit hook from trying again.
            self.shutdown_on_close = False
            type(self)._instances.discard(self)

        async def _mf_delete_if_ours(self) -> None:
            if not self._mf_token:
                return
            import kr8s
            from kr8s.asyncio.objects import new_class

            kind = new_class("DaskCluster", API_VERSION, namespaced=True)
            try:
                obj = await kind.get(self.name, namespace=self.namespace, timeout=0.05)  # one look
            except kr8s.NotFoundError:
                return
            if obj.annotations.get(OWNER_ANNOTATION) == self._mf_token:
                log.info("deleting DaskCluster %s/%s after a failed start", self.namespace, self.name)
                await obj.delete()

    return JobKubeCluster


def _abort_start(cluster, wait: float = 30.0) -> None:
    """After Ctrl-C in the constructor: make sure the start still running on the cluster's loop
    is cancelled, and wait (bounded) for it to delete what it created."""
    task = cluster._mf_task
    if task is None:  # interrupted before the start began: it may still begin
        cluster._mf_done.wait(2.0)
        task = cluster._mf_task
    if task is not None:
        if not task.done():
            with contextlib.suppress(Exception):
                cluster.loop.add_callback(task.cancel)
        cluster._mf_done.wait(wait)


def _bad_kubeconfig(err: BaseException) -> bool:
    """kr8s reads a kubeconfig without a current context (an empty file, ``clusters: []``) as far
    as a KeyError ('current-context'), a TypeError or an IndexError, raised while it loads the kubeconfig."""
    import traceback

    if not isinstance(err, (KeyError, TypeError, AttributeError, IndexError)):
        return False
    if isinstance(err, KeyError) and err.args and err.args[0] in ("current-context", "contexts"):
        return True
    return any(frame.f_code.co_name in ("_load_kubeconfig", "current_context")
               and "kr8s" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(err.__traceback__))


def _not_found(response) -> dict:
    """What a 404 from the API server says is missing: its Status' ``details`` (``{"kind": "namespaces",
    "name": ...}`` for a namespace that does not exist; nothing when the resource type is unknown)."""
    try:
        details = response.json().get("details")
    except Exception:  # noqa: BLE001 - no JSON body: nothing more to say
        return {}
    return details if isinstance(details, dict) else {}


def _translate(err: BaseException, settings: Settings, name: str | None) -> ClusterError:
    k = settings.kube
    ns = k.namespace or "the current namespace"
    text = str(err)
    no_context = _bad_kubeconfig(err)
    if (isinstance(err, ValueError) and "valid credentials" in text) or no_context:
        why = " (the kubeconfig has no current-context)" if no_context else ""
        return ClusterError(f"no Kubernetes credentials found{why}: set KUBECONFIG (or create ~/.kube/config) "
                            "or run inside a cluster with a service account; `kubectl get daskclusters` should "
                            "work from this shell.")
    if isinstance(err, ValueError) and "already exists" in text:
        return ClusterError(f"A DaskCluster named {name!r} already exists in {ns}: set kube.attach = {name!r} "
                            "to run on it, or choose another kube.name (the default 'modelfactory-{uuid}' is "
                            "unique). It was left untouched.")
    if isinstance(err, ValueError) and "doesn't already exist" in text:
        return ClusterError(f"No DaskCluster named {k.attach!r} in {ns} to attach to "
                            f"(kube.attach, from {settings.sources.get('kube.attach', '?')}); list them with "
                            "`kubectl get daskclusters -A`.")
    response = getattr(err, "response", None)
    crd_missing = (response is not None and getattr(response, "status_code", None) == 404
                   and getattr(getattr(response, "request", None), "method", None) == "POST")
    missing = _not_found(response) if crd_missing else {}
    if missing.get("kind") == "namespaces":  # the API server's 404 names what is missing
        where = (f"kube.namespace, from {settings.sources.get('kube.namespace', '?')}" if k.namespace
                 else "the kubeconfig's current context; set kube.namespace")
        return ClusterError(f"The namespace {missing.get('name') or k.namespace!r} does not exist on this Kubernetes "
                            f"cluster ({where}): create it or choose another; `kubectl get namespaces` lists them.")
    if crd_missing or (isinstance(err, RuntimeError) and "Custom Resource Definitions" in text):
        return ClusterError("This Kubernetes cluster does not know the DaskCluster resource: install the "
                            "dask-kubernetes operator first (helm install dask-kubernetes-operator ...; see "
                            "docs/kubernetes.md).")
    if isinstance(err, TimeoutError) and "not actioned" in text:
        return ClusterError(f"The DaskCluster {name!r} was created but no dask-kubernetes operator acted on it "
                            f"within {k.resource_timeout} s: is the operator running (kubectl get pods -A -l "
                            "app.kubernetes.io/name=dask-kubernetes-operator)? The DaskCluster was deleted.")
    if isinstance(err, _StartupTimeout):
        status = ", ".join(f"{c}={s}" for c, s in (err.args[0] or {}).items()) or "no status seen"
        return ClusterError(f"The Dask scheduler of {name!r} did not answer within {k.startup_timeout} s "
                            f"(kube.startup_timeout; {status}). Look at `kubectl describe pods -n "
                            f"{k.namespace or '<namespace>'} -l dask.org/cluster-name={name}`: ImagePullBackOff "
                            "means a wrong kube.image or a missing pull secret, Pending means no node has the "
                            "requested cpu/memory. The DaskCluster was deleted.")
    if type(err).__name__ == "SchedulerStartupError":
        return ClusterError(f"The Dask scheduler of {name!r} crashed on start (the DaskCluster was deleted): "
                            f"{' '.join(map(str, err.args))[-2000:]}")
    if type(err).__name__ == "ServerError" or type(err).__name__.startswith("HTTP"):
        return ClusterError(f"The Kubernetes API refused a request for the DaskCluster {name!r}: {err}. Check "
                            "that your account may create daskclusters and daskautoscalers in "
                            f"{ns} (RBAC, docs/kubernetes.md).")
    return ClusterError(f"Could not start the Kubernetes Dask cluster {name!r}: {type(err).__name__}: {err}")


def _close(cluster, what: str) -> None:
    try:
        cluster.close(timeout=_CLOSE_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - never mask the job's own error
        log.warning("could not close %s: %s: %s", what, type(err).__name__, err)
    # KubeCluster.close leaves running the event loop thread it started (LocalCluster stops its
    # own): each job in a notebook or a service left a thread behind.
    runner = getattr(cluster, "_loop_runner", None)
    if runner is not None:
        with contextlib.suppress(Exception):
            runner.stop()


@contextlib.contextmanager
def kube_cluster(settings: Settings) -> Iterator[Any]:
    """Yield a started ``KubeCluster`` for the job; delete it on exit if the job created it.

    Creates a DaskCluster from :func:`make_spec` (and ``adapt(minimum=,
    maximum=)`` when ``kube.maximum`` is set), or attaches to ``kube.attach``.
    What was created is deleted when the block exits, normally, by an error
    or by Ctrl-C; an attached cluster is only disconnected from.  The cluster's
    ``plan_slots`` attribute says how many worker threads to plan work units for
    (``Settings.plan_slots``: the maximum of an adaptive cluster; for an attached
    cluster, the maximum of its DaskAutoscaler when it has one: it may have no
    workers yet, and a plan for the live ones would keep it from growing).

    Raises
    ------
    ClusterError
        No credentials, no operator, a name clash, a scheduler that does not
        start within ``kube.startup_timeout``, an API error.
    """
    op = _operator()
    k = settings.kube
    cls = _job_cluster_class(op.KubeCluster)
    if k.attach is not None:
        log.info("attaching to the DaskCluster %s", k.attach)
        cluster = _start(cls, settings, k.attach, name=k.attach, create_mode=_create_mode("CONNECT_ONLY"),
                         shutdown_on_close=False, mf_token=None)
        try:
            maximum = _autoscaler_maximum(cluster)  # pods: times their threads, as kube.threads says them
            cluster.plan_slots = maximum * k.threads if maximum else None
            yield cluster
        finally:
            _close(cluster, f"the connection to DaskCluster {k.attach}")  # shutdown_on_close=False: kept
        return

    spec = make_spec(settings)
    name = spec["metadata"]["name"]
    token = uuid.uuid4().hex
    spec["metadata"].setdefault("annotations", {})[OWNER_ANNOTATION] = token
    log.info("creating DaskCluster %s (image %s, %s)", name, k.image,
             f"adaptive {k.minimum}-{k.maximum} workers" if settings.adaptive
             else f"{settings.kube_workers} workers")
    cluster = _start(cls, settings, name, custom_cluster_spec=spec, create_mode=_create_mode("CREATE_ONLY"),
                     shutdown_on_close=True, mf_token=token)
    cluster.plan_slots = settings.plan_slots
    try:
        if settings.adaptive:
            try:
                cluster.adapt(minimum=k.minimum, maximum=k.maximum)
            except Exception as err:  # noqa: BLE001 - translated; the cluster is deleted below
                raise _translate(err, settings, name) from err
        yield cluster
    finally:
        _close(cluster, f"DaskCluster {name}")


def _autoscaler_maximum(cluster) -> int | None:
    """``spec.maximum`` of the DaskAutoscaler of an attached cluster (named as the cluster, as
    ``KubeCluster.adapt`` names it); None when it has none or it cannot be read."""
    from kr8s import NotFoundError
    from kr8s.asyncio.objects import new_class

    autoscaler = new_class("DaskAutoscaler", "kubernetes.dask.org/v1", namespaced=True)

    async def read() -> Any:
        return (await autoscaler.get(cluster.name, namespace=cluster.namespace)).spec.get("maximum")

    try:
        maximum = cluster.sync(read)
    except NotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - a plan for the live workers, as before; said
        log.warning("could not read the DaskAutoscaler of %s (%s: %s): work units are planned for its live "
                    "workers", cluster.name, type(err).__name__, err)
        return None
    return maximum if isinstance(maximum, int) and maximum > 0 else None


def _start(cls: type, settings: Settings, what: str, **kwargs) -> Any:
    """Construct (and so start) the cluster ``what``; translate failures, clean up after Ctrl-C."""
    k = settings.kube
    holder: list = []
    try:
        return cls(namespace=k.namespace, resource_timeout=k.resource_timeout, quiet=True,
                   mf_startup_timeout=k.startup_timeout, mf_holder=holder, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        if holder:
            from .run import _ctrl_c_held_while_closing

            # pressed again while what was created is deleted: the wait goes on (a third press breaks
            # it off), or the process could end before the delete, the pods left running
            with _ctrl_c_held_while_closing(deliver=False) as hold:
                hold()
                _abort_start(holder[0])
        raise
    except Exception as err:  # noqa: BLE001 - translated
        raise _translate(err, settings, what) from err


def _create_mode(mode: str) -> Any:
    from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

    return CreateMode[mode]
