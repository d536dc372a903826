"""The Kubernetes path, as far as it goes without an API server.

- Manifests: built from settings and checked against a strict copy of the
  DaskCluster CRD shipped inside dask-kubernetes (unknown fields rejected).
- Lifecycle: the real ``KubeCluster`` talks over HTTP to kmock's Kubernetes
  emulator on 127.0.0.1 (run in a thread), with a tiny stand-in for the
  operator that marks the DaskCluster running and publishes a LoadBalancer
  Service pointing at a real Dask scheduler on 127.0.0.1.  The tests check
  what was POSTed (it validates against the CRD), that DELETE follows on
  success, failure and Ctrl-C, and that an attached cluster is never deleted.
- ``@pytest.mark.kube``: a real job on a real cluster, only with a kubeconfig.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid

import pytest

from modelfactory.config import load_settings
from modelfactory.exceptions import ClusterError

pytest.importorskip("dask_kubernetes", reason="needs dask-kubernetes: pip install -e '.[kube]'")
jsonschema = pytest.importorskip("jsonschema")

from modelfactory import kube  # noqa: E402

# Every KubeCluster here subscribes to the same stand-in scheduler, which says so.
pytestmark = pytest.mark.filterwarnings("ignore:Scheduler already contains a plugin:UserWarning")

IMAGE = "registry.example.com/modelfactory:0.1.0"


def settings(**kube_settings):
    top = {k: kube_settings.pop(k) for k in ("workers", "cluster") if k in kube_settings}
    return load_settings({"cluster": "kube", **top, "kube": {"image": IMAGE, **kube_settings}}, env={})


def container(spec, role="worker"):
    return spec["spec"][role]["spec"]["containers"][0]


def env_of(spec, role="worker"):
    return {e["name"]: e["value"] for e in container(spec, role)["env"]}


# ---------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------
def test_make_spec_sets_threads_env_resources_labels_and_idle_timeout():
    s = settings(name="job-{uuid}", workers=5, env={"AWS_REGION": "eu-west-1"}, labels={"team": "ml"},
                 idle_timeout="30m", threads=2,
                 resources={"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"memory": "4Gi"}})
    spec = kube.make_spec(s)
    name = spec["metadata"]["name"]
    assert name.startswith("job-") and len(name) == len("job-") + 8
    w = container(spec)
    assert w["image"] == IMAGE and container(spec, "scheduler")["image"] == IMAGE
    assert w["args"][:4] == ["dask", "worker", "--nthreads", "2"]
    assert container(spec, "scheduler")["args"][:4] == ["dask", "scheduler", "--host", "0.0.0.0"]
    env = env_of(spec)
    assert env == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
                   "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "'1s'",
                   "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "'1s'", "AWS_REGION": "eu-west-1"}
    # what a pod's Dask makes of them: the settings of the clusters modelfactory makes
    import dask.config

    from modelfactory.run import WORKER_DASK_CONFIG

    got = dask.config.collect_env({k: v for k, v in env.items() if k.startswith("DASK_")})
    assert {key: dask.config.get(key, config=got) for key in WORKER_DASK_CONFIG} == WORKER_DASK_CONFIG
    assert w["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert container(spec, "scheduler")["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert spec["spec"]["worker"]["replicas"] == 5
    assert spec["spec"]["idleTimeout"] == 1800
    labels = {"app.kubernetes.io/part-of": "modelfactory", "team": "ml"}
    assert spec["metadata"]["labels"] == labels
    assert spec["spec"]["worker"]["metadata"]["labels"] == labels
    assert spec["spec"]["scheduler"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 8786
    kube.validate_spec(spec)  # make_spec validates too; this states it


def test_make_spec_without_image_names_the_setting():
    s = load_settings({"cluster": "kube"}, env={})
    with pytest.raises(ClusterError, match=r"kube.image is not set.*MODELFACTORY_KUBE_IMAGE"):
        kube.make_spec(s)


def test_bad_cluster_name_is_explained():
    with pytest.raises(ClusterError, match=r"kube.name 'My_Job' \(from argument\) is not a valid DaskCluster"):
        kube.make_spec(settings(name="My_Job"))
    with pytest.raises(ClusterError, match=r"only use the placeholders \{uuid\} and \{user\}"):
        kube.make_spec(settings(name="job-{date}"))


def test_adaptive_manifests_include_the_autoscaler_and_validate():
    docs = kube.manifests(settings(minimum=1, maximum=40, name="adaptive-job"))
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskAutoscaler"]
    assert docs[0]["spec"]["worker"]["replicas"] == 1  # starts at the minimum
    assert docs[1]["spec"] == {"cluster": "adaptive-job", "minimum": 1, "maximum": 40}
    for d in docs:
        kube.validate_spec(d)
    assert [d["kind"] for d in kube.manifests(settings(workers=3))] == ["DaskCluster"]


def test_manifests_refuse_an_attached_cluster():
    with pytest.raises(ClusterError, match=r"kube.attach is set \('shared'\).*creates nothing"):
        kube.manifests(settings(attach="shared"))


def test_dump_manifests_yaml_and_json_round_trip():
    yaml = pytest.importorskip("yaml")
    docs = kube.manifests(settings(maximum=4, name="dump"))
    assert list(yaml.safe_load_all(kube.dump_manifests(docs))) == docs
    assert json.loads(kube.dump_manifests(docs, "json")) == {"apiVersion": "v1", "kind": "List", "items": docs}
    assert json.loads(kube.dump_manifests(docs[:1], "json")) == docs[0]
    with pytest.raises(ClusterError, match="must be 'yaml' or 'json'; got 'xml'"):
        kube.dump_manifests(docs, "xml")


def test_cluster_spec_text_for_the_cli(tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = tmp_path / "job.toml"
    cfg.write_text(f'cluster = "local"\n[kube]\nimage = "{IMAGE}"\nname = "from-file"\nmaximum = 3\n')
    docs = list(yaml.safe_load_all(kube.cluster_spec(str(cfg), env={})))
    assert [d["metadata"]["name"] for d in docs] == ["from-file", "from-file"]  # cluster forced to kube
    as_json = json.loads(kube.cluster_spec(str(cfg), workers=2, fmt="json", env={}))
    assert as_json["kind"] == "List" and as_json["items"][0]["spec"]["worker"]["replicas"] == 2
    with pytest.raises(ClusterError, match="kube.image is not set"):
        kube.cluster_spec(None, env={})


def test_strict_schema_rejects_unknown_fields_with_their_path():
    spec = kube.make_spec(settings(name="strict"))
    container(spec)["resourcez"] = container(spec).pop("resources")
    spec["spec"]["worker"]["spec"]["nodeSelectr"] = {"pool": "spot"}
    with pytest.raises(ClusterError) as info:
        kube.validate_spec(spec)
    msg = str(info.value)
    assert "does not match the DaskCluster CRD" in msg
    assert "spec.worker.spec.containers[0].resourcez: unknown field; did you mean 'resources'?" in msg
    assert "spec.worker.spec.nodeSelectr: unknown field; did you mean 'nodeSelector'?" in msg
    # The CRD as shipped (not strict) would have let both through, as an API server would prune them.
    jsonschema.validate(spec, kube.crd_schema(strict=False))


def test_strict_schema_checks_types_and_required_fields():
    spec = kube.make_spec(settings(name="types"))
    spec["spec"]["worker"]["replicas"] = "three"
    del spec["metadata"]["name"]
    spec["kind"] = "DaskCluster"
    with pytest.raises(ClusterError) as info:
        kube.validate_spec(spec)
    assert "spec.worker.replicas: 'three' is not of type 'integer'" in str(info.value)
    assert "metadata: 'name' is a required property" in str(info.value)
    with pytest.raises(ClusterError, match="Expected a DaskCluster manifest"):
        kube.validate_spec({"kind": "Pod"})


def test_custom_spec_overlays_by_name_and_removes_nulls(tmp_path):
    custom = tmp_path / "overlay.yaml"
    custom.write_text(
        "spec:\n"
        "  worker:\n"
        "    spec:\n"
        "      nodeSelector: {pool: spot}\n"
        "      tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]\n"
        "      containers:\n"
        "        - name: worker\n"
        "          env: [{name: OMP_NUM_THREADS, value: '2'}, {name: EXTRA, value: x}]\n"
        "          volumeMounts: [{name: scratch, mountPath: /scratch}]\n"
        "      volumes: [{name: scratch, emptyDir: {}}]\n"
        "  scheduler:\n"
        "    spec:\n"
        "      containers:\n"
        "        - name: scheduler\n"
        "          livenessProbe: null\n")
    spec = kube.make_spec(settings(name="custom", custom_spec=str(custom)))
    w = spec["spec"]["worker"]["spec"]
    assert w["nodeSelector"] == {"pool": "spot"} and w["tolerations"][0]["key"] == "spot"
    assert env_of(spec)["OMP_NUM_THREADS"] == "2" and env_of(spec)["EXTRA"] == "x"
    assert env_of(spec)["MKL_NUM_THREADS"] == "1"  # merged by name, not replaced
    assert w["containers"][0]["image"] == IMAGE and w["containers"][0]["volumeMounts"][0]["name"] == "scratch"
    assert "livenessProbe" not in container(spec, "scheduler")


def test_custom_spec_env_item_replaces_the_whole_variable(tmp_path):
    custom = tmp_path / "valuefrom.yaml"
    custom.write_text(
        "spec:\n  worker:\n    spec:\n      containers:\n        - name: worker\n          env:\n"
        "            - name: AWS_DEFAULT_REGION\n              valueFrom: {configMapKeyRef: {name: cm, key: region}}\n"
        "            - name: OMP_NUM_THREADS\n              valueFrom: {configMapKeyRef: {name: cm, key: omp}}\n")
    spec = kube.make_spec(settings(custom_spec=str(custom), env={"AWS_DEFAULT_REGION": "eu-west-1"}))
    items = {e["name"]: e for e in container(spec)["env"]}
    assert items["AWS_DEFAULT_REGION"] == {"name": "AWS_DEFAULT_REGION",
                                           "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "region"}}}
    assert "value" not in items["OMP_NUM_THREADS"] and items["MKL_NUM_THREADS"]["value"] == "1"
    assert container(spec)["image"] == IMAGE  # containers still merge by name
    assert all(("value" in e) != ("valueFrom" in e) for e in container(spec, "scheduler")["env"])


def test_custom_spec_typo_is_caught_and_bad_files_are_explained(tmp_path):
    custom = tmp_path / "typo.yaml"
    custom.write_text("spec:\n  worker:\n    spec:\n      tolerationz: []\n")
    with pytest.raises(ClusterError, match=r"spec.worker.spec.tolerationz: unknown field; did you mean 'toler"):
        kube.make_spec(settings(name="typo", custom_spec=str(custom)))
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ClusterError, match="must hold a mapping"):
        kube.make_spec(settings(custom_spec=str(tmp_path / "list.yaml")))
    (tmp_path / "pod.yaml").write_text("kind: Pod\n")
    with pytest.raises(ClusterError, match="has kind 'Pod'; it must be a DaskCluster"):
        kube.make_spec(settings(custom_spec=str(tmp_path / "pod.yaml")))
    with pytest.raises(ClusterError, match="custom_spec file .*missing.yaml.* not found"):
        kube.make_spec(settings(custom_spec=str(tmp_path / "missing.yaml")))
    with pytest.raises(ClusterError, match=r"kube.custom_spec '.*' \(from argument\) is a folder; give the path"):
        kube.make_spec(settings(custom_spec=str(tmp_path)))
    (tmp_path / "latin1.yaml").write_bytes(b"spec:\n  idleTimeout: 5 # caf\xe9\n")
    with pytest.raises(ClusterError, match=r"kube.custom_spec file .*latin1.yaml.* is not valid UTF-8 YAML"):
        kube.make_spec(settings(custom_spec=str(tmp_path / "latin1.yaml")))


def test_example_job_toml_gives_a_valid_manifest():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    s = load_settings(config_file=os.path.join(root, "examples", "job.toml"), env={})
    assert s.cluster == "kube" and s.adaptive
    # requests = limits for memory, on the workers and the scheduler (docs/kubernetes.md, Costs)
    for res in (s.kube.resources, s.kube.scheduler_resources):
        assert res["limits"]["memory"] == res["requests"]["memory"]
    docs = kube.manifests(s)
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskAutoscaler"]
    spec, auto = docs
    assert container(spec, "scheduler")["resources"]["limits"]["memory"] == "2Gi"
    assert spec["metadata"]["namespace"] == auto["metadata"]["namespace"] == s.kube.namespace == "ml-jobs"


def test_the_manifest_carries_the_namespace_only_when_set():
    assert "namespace" not in kube.make_spec(settings(name="no-ns"))["metadata"]
    spec = kube.make_spec(settings(name="ns", namespace="team-a"))
    assert spec["metadata"]["namespace"] == "team-a"
    assert "namespace: team-a" in kube.cluster_spec(env={"MODELFACTORY_KUBE_IMAGE": IMAGE,
                                                         "MODELFACTORY_KUBE_NAMESPACE": "team-a"})


def test_missing_dask_kubernetes_gives_the_install_hint(monkeypatch):
    # The hint was pip install 'modelfactory[kube]', which installs the unrelated 'modelfactory'
    # of PyPI (ModelFactory 15), as docs/kubernetes.md warns; the extra comes from the checkout.
    import sys

    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    with pytest.raises(ClusterError, match=r"needs dask-kubernetes.*pip install -e '\.\[kube\]'") as err:
        kube.make_spec(settings())
    assert "modelfactory[kube]" not in str(err.value)


# ---------------------------------------------------------------------------
# a fake Kubernetes API over real HTTP (kmock), with a stand-in operator
# ---------------------------------------------------------------------------
DASK = "kubernetes.dask.org/v1"


class FakeKube:
    """kmock's KubernetesEmulator served on 127.0.0.1 from a background thread.

    ``operator`` says what the stand-in operator does with a new DaskCluster:
    ``"ok"`` marks it Running and publishes a ready scheduler Pod and a
    LoadBalancer Service at ``scheduler`` (a real Dask scheduler's host:port);
    ``"absent"`` does nothing (no operator installed); ``"pending"`` marks it
    Running but the scheduler Pod never leaves Pending (as with ImagePullBackOff).
    """

    def __init__(self, scheduler: tuple[str, int] | None = None):
        import kmock

        self.kmock = kmock
        self.scheduler = scheduler
        self.operator = "ok"
        self.on_create = None  # called (in the server's thread) when a new DaskCluster appears
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kube", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Kubernetes API did not start")

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._main())

    async def _main(self):
        kmock = self.kmock
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k, kmock.Server(k) as server:
            self.k, self.url = k, str(server.url).rstrip("/")
            for res, kind in [("v1/pods", "Pod"), ("v1/services", "Service"),
                              (f"{DASK}/daskclusters", "DaskCluster"),
                              (f"{DASK}/daskautoscalers", "DaskAutoscaler"),
                              (f"{DASK}/daskworkergroups", "DaskWorkerGroup")]:
                k.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=True)
            # kr8s asks for /version/, /api/ and /apis/ (with the slash); kmock serves them without.
            k["get /version/"] << {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
            k["get /api/"] << {"kind": "APIVersions", "versions": ["v1"]}
            k["get /apis/"] << {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                "name": "kubernetes.dask.org", "versions": [{"groupVersion": DASK, "version": "v1"}],
                "preferredVersion": {"groupVersion": DASK, "version": "v1"}}]}
            self._ready.set()
            operator = asyncio.ensure_future(self._operate())
            await self._stop.wait()
            operator.cancel()

    async def _operate(self):
        handled: set = set()
        while True:
            for (res, ns, name), obj in list(self.k.objects.items()):
                if res.plural != "daskclusters":
                    continue
                if obj.deleted:
                    for key in list(self.k.objects):
                        if (key[0].plural in ("pods", "services") and key[1] == ns
                                and key[2].startswith(name + "-")):
                            del self.k.objects[key]
                    handled.discard((ns, name))
                elif (ns, name) not in handled:
                    handled.add((ns, name))
                    if self.on_create is not None:
                        self.on_create()
                    if self.operator != "absent":
                        self._start_cluster(ns, name)
            await asyncio.sleep(0.05)

    def _start_cluster(self, ns: str, name: str):
        self.k.objects[f"{DASK}/daskclusters", ns, name].patch({"status": {"phase": "Running"}})
        labels = {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
        ready = self.operator == "ok"
        self.k.objects["v1/pods", ns, f"{name}-scheduler"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-scheduler", "namespace": ns, "labels": labels},
            "status": {"phase": "Running" if ready else "Pending",
                       "conditions": [{"type": "Ready", "status": str(ready)},
                                      {"type": "ContainersReady", "status": str(ready)}]},
        }
        host, port = self.scheduler or ("127.0.0.1", 1)
        self.k.objects["v1/services", ns, f"{name}-scheduler"] = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{name}-scheduler", "namespace": ns},
            "spec": {"type": "LoadBalancer", "selector": labels,
                     "ports": [{"name": "tcp-comm", "port": port}, {"name": "http-dashboard", "port": 8787}]},
            "status": {"loadBalancer": {"ingress": [{"ip": host}]}},
        }

    # -- what the client did ------------------------------------------------
    def calls(self, ns: str | None = None) -> list[tuple[str, str]]:
        """(METHOD, path) of the DaskCluster/DaskAutoscaler requests, oldest first."""
        out = []
        for r in self.k._requests:
            path = r.url.path
            if "/kubernetes.dask.org/" in path and (ns is None or f"/namespaces/{ns}/" in path):
                out.append((r.method.value, path))
        return out

    def created(self, ns: str, plural: str = "daskclusters") -> list[dict]:
        return [r.data for r in self.k._requests if r.method.value == "POST"
                and r.url.path.endswith(f"/namespaces/{ns}/{plural}")]

    def deletes(self, ns: str) -> list[str]:
        return [p for m, p in self.calls(ns) if m == "DELETE"]

    def exists(self, ns: str, name: str) -> bool:
        return any(res.plural == "daskclusters" and (n, nm) == (ns, name) and not obj.deleted
                   for (res, n, nm), obj in list(self.k.objects.items()))

    def close(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def add_cluster(self, ns: str, name: str) -> None:
        """A DaskCluster made by someone else (and, with the stand-in operator, running)."""
        done = threading.Event()

        def add():
            self.k.objects[f"{DASK}/daskclusters", ns, name] = {
                "apiVersion": DASK, "kind": "DaskCluster", "metadata": {"name": name, "namespace": ns},
                "spec": {"worker": {"replicas": 1, "spec": {"containers": [{"name": "worker", "image": IMAGE}]}},
                         "scheduler": {"spec": {"containers": [{"name": "scheduler", "image": IMAGE,
                                                                "args": ["dask", "scheduler"]}]}}}}
            done.set()

        self.loop.call_soon_threadsafe(add)
        assert done.wait(5)

    def add_autoscaler(self, ns: str, name: str, maximum: int) -> None:
        """The DaskAutoscaler that ``KubeCluster.adapt`` makes for the DaskCluster ``name``."""
        done = threading.Event()

        def add():
            self.k.objects[f"{DASK}/daskautoscalers", ns, name] = {
                "apiVersion": DASK, "kind": "DaskAutoscaler", "metadata": {"name": name, "namespace": ns},
                "spec": {"cluster": name, "minimum": 0, "maximum": maximum}}
            done.set()

        self.loop.call_soon_threadsafe(add)
        assert done.wait(5)

    def react(self, criteria: str, payload) -> None:
        self.loop.call_soon_threadsafe(lambda: self.k[criteria] << payload)
        time.sleep(0.05)


def kubeconfig(url: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
    })


class BareScheduler:
    """A real Dask scheduler and one worker on 127.0.0.1, standing in for the DaskCluster's pods.

    No cluster manager owns it (a LocalCluster would publish its own name as the
    scheduler's cluster-manager-info, which every KubeCluster adopts).
    """

    def __init__(self):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="bare-dask", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Dask scheduler did not start")

    async def _main(self):
        from distributed import Scheduler, Worker

        async with Scheduler(host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0") as s, \
                Worker(s.address, nthreads=1, host="127.0.0.1", dashboard=False):
            self.scheduler, self.loop, self._stop = s, asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def forget_cluster(self):
        """As if each DaskCluster got a fresh scheduler: drop what the last KubeCluster published."""
        self.loop.call_soon_threadsafe(self.scheduler.task_metadata.pop, "cluster-manager-info", None)

    def close(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def scheduler():
    s = BareScheduler()
    yield s
    s.close()


@pytest.fixture(scope="module")
def fake_api(scheduler, tmp_path_factory):
    host, port = scheduler.scheduler.address.removeprefix("tcp://").rsplit(":", 1)
    fake = FakeKube((host, int(port)))
    cfg = tmp_path_factory.mktemp("kube") / "config"
    cfg.write_text(kubeconfig(fake.url))
    fake.kubeconfig = str(cfg)
    yield fake
    fake.close()


@pytest.fixture
def fake(fake_api, scheduler, monkeypatch):
    scheduler.forget_cluster()
    monkeypatch.setenv("KUBECONFIG", fake_api.kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake_api.operator = "ok"
    fake_api.on_create = None
    return fake_api


def new_ns() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def job(ns: str, **kw):
    kw.setdefault("resource_timeout", 5)
    kw.setdefault("startup_timeout", 20)
    return settings(namespace=ns, **kw)


def test_job_cluster_is_created_validated_adapted_used_and_deleted(fake):
    from distributed import Client

    ns = new_ns()
    with kube.kube_cluster(job(ns, name="life", minimum=1, maximum=3)) as cluster:
        assert fake.exists(ns, "life")
        assert cluster.plan_slots == 3  # plan work units for the maximum
        [posted] = fake.created(ns)
        kube.validate_spec(posted)  # what reached the API server passes the strict CRD check
        assert posted["metadata"]["annotations"][kube.OWNER_ANNOTATION]
        assert env_of(posted)["OMP_NUM_THREADS"] == "1"
        [autoscaler] = fake.created(ns, "daskautoscalers")
        assert autoscaler["spec"] == {"cluster": "life", "minimum": 1, "maximum": 3}
        with Client(cluster) as client:
            assert client.submit(lambda x: x + 1, 1).result() == 2
        assert fake.deletes(ns) == []
    assert not fake.exists(ns, "life")
    assert fake.deletes(ns) == [f"/apis/{DASK}/namespaces/{ns}/daskclusters/life"]


def test_a_cluster_without_workers_points_at_its_worker_pods(fake):
    """The wait for a worker said to start one with `dask worker <address>`, an address that on
    Kubernetes is a port-forward or a service: the pods are what to look at."""
    from modelfactory.run import no_worker_hint

    ns = new_ns()
    with kube.kube_cluster(job(ns, name="podless")) as cluster:
        hint = no_worker_hint(cluster, cluster.scheduler_address)
    assert hint.startswith(f"its worker pods have not joined: `kubectl get pods -n {ns} -l "
                           "dask.org/cluster-name=podless,dask.org/component=worker`")
    assert no_worker_hint(None, "tcp://h:1") == "start workers with `dask worker tcp://h:1`"


def test_jobs_leave_no_threads_behind(fake):
    """KubeCluster.close left running the event loop thread it started: a thread or two more
    in the process after each job."""
    with kube.kube_cluster(job(new_ns(), name="warm")):  # what stays for the process (kr8s' own, Dask's offload)
        pass
    before = threading.active_count()
    for i in range(2):  # a namespace each: kmock ignores label selectors
        with kube.kube_cluster(job(new_ns(), name=f"job{i}")):
            pass
    assert threading.active_count() <= before, [t.name for t in threading.enumerate()]


def test_a_train_job_runs_through_the_kube_cluster(fake, tmp_path):
    import modelfactory

    modelfactory.demo.write_dataset(str(tmp_path / "data"), series=12, days=3)
    ns = new_ns()
    with kube.kube_cluster(job(ns, name="train")) as cluster:
        run = modelfactory.train(str(tmp_path / "data"), by=["app", "site"], time="ts", target="value",
                                 store=str(tmp_path / "store"), cluster=cluster)
    assert run.summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0}
    assert not fake.exists(ns, "train")


def test_a_failing_job_still_deletes_its_cluster(fake):
    ns = new_ns()
    with pytest.raises(ZeroDivisionError):
        with kube.kube_cluster(job(ns, name="boom")):
            1 / 0
    assert fake.deletes(ns) and not fake.exists(ns, "boom")


def test_ctrl_c_during_the_job_deletes_the_cluster(fake):
    ns = new_ns()
    with pytest.raises(KeyboardInterrupt):
        with kube.kube_cluster(job(ns, name="interrupted")):
            raise KeyboardInterrupt
    assert fake.deletes(ns) and not fake.exists(ns, "interrupted")


def test_ctrl_c_while_the_cluster_starts_deletes_what_was_created(fake):
    import signal

    fake.operator = "absent"  # the start waits for an operator that never comes...
    fake.on_create = lambda: os.kill(os.getpid(), signal.SIGINT)  # ...and a real Ctrl-C arrives
    ns = new_ns()
    with pytest.raises(KeyboardInterrupt):
        with kube.kube_cluster(job(ns, name="early", resource_timeout=30)):
            pytest.fail("the cluster cannot have started")
    assert fake.created(ns) and fake.deletes(ns) and not fake.exists(ns, "early")


def test_ctrl_c_pressed_again_while_the_start_cleans_up_still_waits_for_the_delete(fake, monkeypatch):
    """The second press broke off the wait for the clean-up: the process could end before the
    delete, leaving the DaskCluster and its pods."""
    import asyncio
    import signal

    from dask_kubernetes.operator import KubeCluster

    cls = kube._job_cluster_class(KubeCluster)
    real = cls._mf_delete_if_ours

    async def slow_delete(self):  # an API server that takes a second to answer
        await asyncio.sleep(1.0)
        await real(self)

    monkeypatch.setattr(cls, "_mf_delete_if_ours", slow_delete)
    fake.operator = "absent"

    def ctrl_c_twice():
        os.kill(os.getpid(), signal.SIGINT)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # during the clean-up

    fake.on_create = ctrl_c_twice
    ns = new_ns()
    with pytest.raises(KeyboardInterrupt), kube.kube_cluster(job(ns, name="twice", resource_timeout=30)):
        pytest.fail("the cluster cannot have started")
    assert fake.deletes(ns), "raised before the delete"  # at once: not later, in the loop's thread
    time.sleep(0.5)  # (the second press, if it was not held, is not left to land elsewhere)


def test_an_attached_cluster_is_used_but_never_deleted(fake):
    from distributed import Client

    ns = new_ns()
    fake.add_cluster(ns, "shared")
    with kube.kube_cluster(job(ns, attach="shared")) as cluster:
        assert cluster.plan_slots is None  # someone else's cluster: count its live workers
        with Client(cluster) as client:
            assert client.submit(sum, [1, 2]).result() == 3
    with pytest.raises(RuntimeError):
        with kube.kube_cluster(job(ns, attach="shared")):
            raise RuntimeError("the job failed")
    assert fake.created(ns) == [] and fake.deletes(ns) == []
    assert fake.exists(ns, "shared")


def test_an_attached_adaptive_cluster_is_planned_for_its_maximum(fake):
    """Planned for its live workers, an adaptive cluster idling at none got work units for one, and
    the scheduler, which asks for at most a worker per pending task, could never grow it past them."""
    ns = new_ns()
    fake.add_cluster(ns, "elastic")
    fake.add_autoscaler(ns, "elastic", maximum=50)
    with kube.kube_cluster(job(ns, attach="elastic", threads=2)) as cluster:
        assert cluster.plan_slots == 100  # its pods' maximum, times their threads (kube.threads)
        from distributed import Client

        from modelfactory.run import task_slots

        with Client(cluster) as client:
            assert task_slots(client) == 100


def test_attaching_to_a_missing_cluster_is_explained(fake):
    with pytest.raises(ClusterError, match=r"No DaskCluster named 'nope' in t-\w+ to attach to"):
        with kube.kube_cluster(job(new_ns(), attach="nope")):
            pass


def test_a_name_in_use_is_not_taken_over(fake):
    ns = new_ns()
    fake.add_cluster(ns, "taken")
    with pytest.raises(ClusterError, match=r"A DaskCluster named 'taken' already exists.*kube.attach = 'taken'"):
        with kube.kube_cluster(job(ns, name="taken")):
            pass
    assert fake.created(ns) == [] and fake.deletes(ns) == [] and fake.exists(ns, "taken")


def test_no_operator_is_explained_and_the_cluster_deleted(fake):
    fake.operator = "absent"
    ns = new_ns()
    with pytest.raises(ClusterError, match=r"no dask-kubernetes operator acted on it within 1 s"):
        with kube.kube_cluster(job(ns, name="orphan", resource_timeout=1)):
            pass
    assert fake.deletes(ns) and not fake.exists(ns, "orphan")


def test_a_scheduler_that_never_starts_times_out_and_is_deleted(fake):
    fake.operator = "pending"
    ns = new_ns()
    with pytest.raises(ClusterError, match=r"did not answer within 2 s .*ImagePullBackOff"):
        with kube.kube_cluster(job(ns, name="stuck", startup_timeout=2)):
            pass
    assert fake.deletes(ns) and not fake.exists(ns, "stuck")


def test_missing_crd_is_explained(fake):
    ns = new_ns()
    fake.react(f"post /apis/{DASK}/namespaces/{ns}/daskclusters", 404)
    with pytest.raises(ClusterError, match="does not know the DaskCluster resource: install the dask-kubernetes"):
        with kube.kube_cluster(job(ns, name="nocrd")):
            pass


def test_a_namespace_that_does_not_exist_is_named_not_taken_for_a_missing_operator(fake):
    """The API server answers a create in a missing namespace with 404 too, as for an unknown
    resource type, and the job said to install the operator."""
    ns = new_ns()
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
              "message": f'namespaces "{ns}" not found', "details": {"name": ns, "kind": "namespaces"}}
    fake.react(f"post /apis/{DASK}/namespaces/{ns}/daskclusters", fake.kmock.Response(status=404, payload=status))
    with pytest.raises(ClusterError, match=rf"^The namespace '{ns}' does not exist on this Kubernetes cluster "
                                           r"\(kube.namespace, from .*\): create it or choose another"), \
            kube.kube_cluster(job(ns, name="nons")):
        pass


def test_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match=r"^no Kubernetes credentials found: set KUBECONFIG"):
        with kube.kube_cluster(settings(namespace="default")):
            pass


@pytest.mark.parametrize("text", ["apiVersion: v1\nkind: Config\nclusters: []\n", "",
                                  ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n"
                                   "current-context: ''\n")])
def test_a_kubeconfig_without_a_context_is_the_no_credentials_error(monkeypatch, tmp_path, text):
    (tmp_path / "kc.yaml").write_text(text)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match=r"^no Kubernetes credentials found \(the kubeconfig has no "
                                           r"current-context\): set KUBECONFIG"):
        with kube.kube_cluster(settings(namespace="default")):
            pass


# ---------------------------------------------------------------------------
# a real cluster, when there is one
# ---------------------------------------------------------------------------
def _kubeconfig_found() -> bool:
    paths = (os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")).split(os.pathsep)
    return any(os.path.isfile(p) for p in paths) or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


@pytest.mark.kube
@pytest.mark.skipif(not _kubeconfig_found(), reason="needs a real Kubernetes cluster with the dask-kubernetes "
                    "operator: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a pod")
def test_a_real_job_on_kubernetes():
    """Settings from MODELFACTORY_KUBE_* (at least MODELFACTORY_KUBE_IMAGE: an image with this
    modelfactory installed); creates a two-worker cluster, runs a job, and checks it is deleted."""
    import modelfactory

    if not os.environ.get("MODELFACTORY_KUBE_IMAGE"):
        pytest.skip("set MODELFACTORY_KUBE_IMAGE to an image with this version of modelfactory installed")
    s = load_settings({"cluster": "kube", "workers": 2, "kube": {"name": "mf-test-{uuid}"}})

    def probe(key):  # defined here, so cloudpickle ships it by value, as for a notebook model
        import os

        import modelfactory as mf

        return key * key, os.environ.get("OMP_NUM_THREADS"), mf.__version__

    with kube.kube_cluster(s) as cluster:
        name, namespace = cluster.name, cluster.namespace
        run = modelfactory.map_keys(range(8), func=probe, cluster=cluster)
    assert run.results == {k: (k * k, "1", modelfactory.__version__) for k in range(8)}
    import kr8s
    from kr8s.objects import new_class

    with pytest.raises(kr8s.NotFoundError):
        new_class("DaskCluster", DASK, asyncio=False).get(name, namespace=namespace, timeout=0.05)
