"""Layered settings: arguments > MODELFACTORY_* environment > TOML file > packaged defaults."""
from __future__ import annotations

import os
import re

import pytest

from modelfactory.config import KubeSettings, Settings, env_var, job_settings, load_settings, setting_names
from modelfactory.exceptions import ClusterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def toml(tmp_path):
    def write(text: str, name: str = "job.toml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def test_defaults_without_any_layer():
    s = load_settings(env={})
    assert s == Settings()
    assert (s.cluster, s.workers, s.unit_rows, s.storage_options) == ("local", None, None, {})
    assert s.kube == KubeSettings()
    assert s.kube.image is None and s.kube.name == "modelfactory-{uuid}" and s.kube.idle_timeout == 900
    assert s.kube.resources == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert set(s.sources.values()) == {"default"}
    assert not s.adaptive and s.plan_slots is None


def test_each_layer_overrides_the_one_below(toml):
    path = toml('cluster = "kube"\nworkers = 3\nunit_rows = 1000\n'
                '[kube]\nimage = "file/image:1"\nnamespace = "from-file"\nmaximum = 9\n')
    env = {"MODELFACTORY_WORKERS": "5", "MODELFACTORY_KUBE_NAMESPACE": "from-env"}
    s = load_settings({"workers": 7, "unit_rows": None, "kube": {"maximum": None}}, config_file=path, env=env)
    assert s.cluster == "kube" and s.sources["cluster"] == path
    assert s.workers == 7 and s.sources["workers"] == "argument"
    assert s.unit_rows == 1000  # None in the arguments means "not set"
    assert s.kube.image == "file/image:1" and s.sources["kube.image"] == path
    assert s.kube.namespace == "from-env" and s.sources["kube.namespace"] == "MODELFACTORY_KUBE_NAMESPACE"
    assert s.kube.maximum == 9 and s.sources["kube.maximum"] == path
    assert s.kube.threads == 1 and s.sources["kube.threads"] == "default"


def test_tables_are_replaced_whole_by_the_layer_that_sets_them(toml):
    path = toml('[kube.env]\nA = "1"\nB = "2"\n[kube.resources.requests]\ncpu = "2"\n')
    s = load_settings(config_file=path, env={"MODELFACTORY_KUBE_ENV": '{"C": "3"}'})
    assert s.kube.env == {"C": "3"}
    assert s.kube.resources == {"requests": {"cpu": "2"}}  # no default limits mixed in


def test_config_file_from_the_environment(toml):
    path = toml('workers = 4\n')
    assert load_settings(env={"MODELFACTORY_CONFIG": path}).workers == 4
    other = toml('workers = 6\n', "other.toml")
    assert load_settings(config_file=other, env={"MODELFACTORY_CONFIG": path}).workers == 6


def test_a_config_file_in_the_home_folder(toml, tmp_path, monkeypatch):
    # "--config=~/mf.toml" (no shell expands a ~ after "="), MODELFACTORY_CONFIG=~/mf.toml from a
    # systemd unit or a Dockerfile: "Config file '~/mf.toml' not found"
    toml('workers = 4\n', "mf.toml")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(config_file="~/mf.toml", env={}).workers == 4
    assert load_settings(env={"MODELFACTORY_CONFIG": "~/mf.toml"}).workers == 4


def test_default_environment_is_os_environ(monkeypatch):
    monkeypatch.setenv("MODELFACTORY_UNIT_ROWS", "12345")
    assert load_settings().unit_rows == 12345


def test_environment_values_are_parsed():
    env = {
        "MODELFACTORY_CLUSTER": "kube",
        "MODELFACTORY_KUBE_MINIMUM": "1",
        "MODELFACTORY_KUBE_MAXIMUM": " 20 ",
        "MODELFACTORY_KUBE_IDLE_TIMEOUT": "1h",
        "MODELFACTORY_KUBE_LABELS": '{"team": "ml", "tier": 2}',
        "MODELFACTORY_KUBE_RESOURCES": '{"requests": {"cpu": 0.5, "memory": "1Gi"}}',
        "MODELFACTORY_STORAGE_OPTIONS": '{"anon": true}',
        "MODELFACTORY_WORKERS": "",  # empty counts as unset
        "MODELFACTORY_PROM_TOKEN": "not a setting, read by the ingest module",
    }
    s = load_settings(env=env)
    assert (s.kube.minimum, s.kube.maximum, s.kube.idle_timeout) == (1, 20, 3600)
    assert s.kube.labels == {"team": "ml", "tier": "2"}
    assert s.kube.resources == {"requests": {"cpu": "0.5", "memory": "1Gi"}}
    assert s.storage_options == {"anon": True} and s.workers is None
    assert s.adaptive and s.plan_slots == 20 and s.kube_workers == 1


def test_env_var_names_follow_the_setting_names():
    assert env_var("workers") == "MODELFACTORY_WORKERS"
    assert env_var("kube.scheduler_service_type") == "MODELFACTORY_KUBE_SCHEDULER_SERVICE_TYPE"
    assert len(setting_names()) == len({env_var(n) for n in setting_names()})


def test_unknown_key_in_the_file_names_it_the_file_and_a_suggestion(toml):
    path = toml('[kube]\nimgae = "x"\n')
    with pytest.raises(ClusterError, match=rf"Unknown setting 'kube.imgae' in {path}; did you mean 'kube.image'"):
        load_settings(config_file=path, env={})
    path = toml('wrokers = 2\n')
    with pytest.raises(ClusterError, match=rf"Unknown setting 'wrokers' in {path}; did you mean 'workers'\?"):
        load_settings(config_file=path, env={})
    path = toml('[gpu]\nkind = "a100"\n')
    with pytest.raises(ClusterError, match=r"Unknown setting 'gpu' in .*\. Known settings: cluster, workers"):
        load_settings(config_file=path, env={})


def test_unknown_resources_key_is_an_error(toml):
    path = toml('[kube.resources.limitz]\nmemory = "1Gi"\n')
    with pytest.raises(ClusterError, match=r"Unknown key 'kube.resources.limitz' in .*did you mean 'limits'\?"):
        load_settings(config_file=path, env={})


def test_unknown_environment_variable_is_an_error_with_a_hint():
    with pytest.raises(ClusterError, match=r"Unknown environment variable MODELFACTORY_KUBE_IMAGES; "
                                           r"did you mean MODELFACTORY_KUBE_IMAGE\?"):
        load_settings(env={"MODELFACTORY_KUBE_IMAGES": "x"})
    with pytest.raises(ClusterError, match=r"MODELFACTORY_WROKERS; did you mean MODELFACTORY_WORKERS\?"):
        load_settings(env={"MODELFACTORY_WROKERS": "2"})
    with pytest.raises(ClusterError, match=r"MODELFACTORY_IMAGE; did you mean MODELFACTORY_KUBE_IMAGE\?"):
        load_settings(env={"MODELFACTORY_IMAGE": "x"})
    with pytest.raises(ClusterError, match=r"Unknown environment variable MODELFACTORY_KUBE_GPU \(setting "):
        load_settings(env={"MODELFACTORY_KUBE_GPU": "1"})


def test_other_modelfactory_variables_are_left_alone():
    env = {"OTHER_WORKERS": "x", "MODELFACTORY_PROM_PASSWORD": "p", "MODELFACTORY_SIGNING_KEY": "k",
           "MODELFACTORY_SOMETHING_NEW": "belongs to another module"}
    assert load_settings(env=env) == Settings()


def test_unknown_argument_is_an_error():
    with pytest.raises(ClusterError, match=r"Unknown setting 'unit_row' in the arguments; did you mean 'unit_r"):
        load_settings({"unit_row": 5}, env={})
    with pytest.raises(ClusterError, match=r"Unknown setting 'kube.maximun' in the arguments; did you mean 'kube.m"):
        load_settings({"kube": {"maximun": 5}}, env={})


@pytest.mark.parametrize("text, message", [
    ('workers = "eight"', r"Setting 'workers' in .* must be an integer >= 1; got 'eight' \(str\)\."),
    ('workers = 0', r"Setting 'workers' in .* must be an integer >= 1; got 0 \(int\)\."),
    ('workers = true', r"Setting 'workers' in .* must be an integer >= 1; got True \(bool\)\."),
    ('cluster = 3', r"Setting 'cluster' in .* must be a non-empty string; got 3 \(int\)\."),
    ('storage_options = "anon"', r"Setting 'storage_options' in .* must be a table"),
    ('kube = 1', r"Setting 'kube' in .* must be a table of kube settings; got 1"),
    ('[kube]\nenv = {A = true}', (r"Setting 'kube.env.A' in .* must be a string \(quote it\); got a bool "
                                  r"\(value not shown\)")),
    ('[kube.labels]\nteam = true', r"Setting 'kube.labels.team' in .* must be a string \(quote it\); got True"),
    ('[kube]\nidle_timeout = -5', r"Setting 'kube.idle_timeout' in .* must be a duration in seconds"),
    ('[kube]\nidle_timeout = "whenever"', r"Setting 'kube.idle_timeout' in .* must be a duration"),
    ('[kube]\nscheduler_service_type = "Loadbalancer"',
     r"must be one of ClusterIP, NodePort, LoadBalancer; got 'Loadbalancer'; did you mean 'LoadBalancer'\?"),
    ('[kube.resources.requests]\nmemory = "lots"',
     r"Setting 'kube.resources.requests.memory' in .* must be a Kubernetes quantity"),
    ('[kube]\nresources = {requests = "1"}', r"Setting 'kube.resources.requests' in .* must be a table"),
])
def test_wrong_types_name_the_key_and_the_expected_type(toml, text, message):
    with pytest.raises(ClusterError, match=message):
        load_settings(config_file=toml(text + "\n"), env={})


def test_wrong_type_from_the_environment_names_the_variable():
    with pytest.raises(ClusterError, match=r"Setting 'kube.maximum' from MODELFACTORY_KUBE_MAXIMUM must be an "
                                           r"integer >= 1; got 'many' \(str\)\."):
        load_settings(env={"MODELFACTORY_KUBE_MAXIMUM": "many"})
    with pytest.raises(ClusterError, match=r"'kube.env' from MODELFACTORY_KUBE_ENV must be a JSON object"):
        load_settings(env={"MODELFACTORY_KUBE_ENV": "A=1"})


@pytest.mark.parametrize("value", ["local", "inline", "kube", "tcp://10.0.0.5:8786", "tls://sched:8786",
                                   "scheduler.internal:8786", "[::1]:8786"])
def test_cluster_values_accepted(value):
    assert load_settings({"cluster": value}, env={}).cluster == value


@pytest.mark.parametrize("value, hint", [("kubernetes", "kube"), ("k8s", "kube"), ("locl", "local"),
                                         ("inlne", "inline")])
def test_cluster_typos_get_a_hint(value, hint):
    with pytest.raises(ClusterError, match=rf"must be 'local', 'inline', 'kube' or a scheduler address.*"
                                           rf"got '{value}'; did you mean '{hint}'\?"):
        load_settings(env={"MODELFACTORY_CLUSTER": value})


def test_relative_custom_spec_is_relative_to_the_config_file(toml, tmp_path):
    path = toml('[kube]\ncustom_spec = "specs/overlay.yaml"\n')
    assert load_settings(config_file=path, env={}).kube.custom_spec == str(tmp_path / "specs" / "overlay.yaml")
    s = load_settings({"kube.custom_spec": "overlay.yaml"}, env={})
    assert s.kube.custom_spec == "overlay.yaml"  # arguments stay as given (relative to the working folder)


def test_bad_files_are_explained(toml, tmp_path):
    with pytest.raises(ClusterError, match=r"Config file '.*nope.toml' not found \(from --config"):
        load_settings(config_file=str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ClusterError, match=r"Config file '.*' is a folder"):
        load_settings(config_file=str(tmp_path), env={})
    with pytest.raises(ClusterError, match=r"Config file '.*bad.toml' is not valid TOML: .*line 1"):
        load_settings(config_file=toml("workers = = 2\n", "bad.toml"), env={})
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'cluster = "inl\xffine"\n')
    with pytest.raises(ClusterError, match=r"Config file '.*latin1.toml' is not valid UTF-8 TOML"):
        load_settings(config_file=str(latin1), env={})
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfworkers = 2\n")  # as some Windows editors save
    with pytest.raises(ClusterError, match=r"starts with a byte-order mark \(BOM\), which TOML does not allow"):
        load_settings(config_file=str(bom), env={})


def test_a_non_utf8_config_file_is_a_usage_error_on_the_command_line(tmp_path, capsys):
    from modelfactory.cli import main

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[kube]\nimage = "caf\xe9"\n')
    assert main(["cluster-spec", "--config", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8 TOML" in err and "internal error" not in err


def test_adaptive_bounds_are_checked():
    with pytest.raises(ClusterError, match=r"kube.minimum \(5, from argument\) is larger than kube.maximum "
                                           r"\(2, from MODELFACTORY_KUBE_MAXIMUM\)"):
        load_settings({"kube": {"minimum": 5}}, env={"MODELFACTORY_KUBE_MAXIMUM": "2"})


def test_planning_slots():
    fixed = load_settings({"cluster": "kube", "workers": 6}, env={})
    assert (fixed.adaptive, fixed.kube_workers, fixed.plan_slots) == (False, 6, 6)
    assert load_settings({"cluster": "kube"}, env={}).plan_slots == 2
    adaptive = load_settings({"cluster": "kube", "kube": {"maximum": 30}}, env={})
    assert (adaptive.adaptive, adaptive.kube_workers, adaptive.plan_slots) == (True, 0, 30)
    threaded = load_settings({"cluster": "kube", "workers": 6, "kube": {"threads": 4}}, env={})
    assert threaded.plan_slots == 24  # a unit on each thread of each pod
    attached = load_settings({"cluster": "kube", "kube": {"attach": "shared"}}, env={})
    assert attached.plan_slots is None  # someone else's cluster: its autoscaler's maximum, or its live threads
    assert load_settings({"cluster": "local", "workers": 3}, env={}).plan_slots is None


def test_settings_are_frozen():
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.workers = 3  # type: ignore[misc]


def test_example_config_loads_cleanly():
    s = load_settings(config_file=os.path.join(ROOT, "examples", "job.toml"), env={})
    assert s.cluster == "kube" and s.kube.image and s.kube.maximum == 50
    assert s.kube.idle_timeout == 900 and s.kube.startup_timeout == 600
    assert s.kube.resources["requests"] == {"cpu": "1", "memory": "3Gi"}


def test_adaptive_start_size_must_fit_the_maximum():
    with pytest.raises(ClusterError, match=r"workers \(9, from argument\) is more than kube.maximum \(4, from"):
        load_settings({"cluster": "kube", "workers": 9, "kube": {"maximum": 4}}, env={})
    assert load_settings({"cluster": "local", "workers": 9, "kube": {"maximum": 4}}, env={}).workers == 9


def test_job_settings_from_function_arguments(toml):
    path = toml('cluster = "kube"\nunit_rows = 100000\n[storage_options]\nanon = true\n')
    s = job_settings(None, workers=None, unit_rows=None, storage_options=None, config=path, env={})
    assert (s.cluster, s.unit_rows, s.storage_options) == ("kube", 100000, {"anon": True})
    s = job_settings("inline", unit_rows=5, storage_options={"key": "k"}, config=path, env={})
    assert (s.cluster, s.unit_rows, s.storage_options) == ("inline", 5, {"key": "k"})
    client_like = object()  # a Client or cluster object is used as is, not a setting
    assert job_settings(client_like, config=path, env={}).cluster == "kube"


def test_the_docs_list_every_setting_and_its_variable():
    with open(os.path.join(ROOT, "docs", "kubernetes.md"), encoding="utf-8") as f:
        doc = f.read()
    missing = [n for n in setting_names() if f"| `{n}` | `{env_var(n)}` |" not in doc]
    assert missing == [], f"docs/kubernetes.md's settings table lacks {missing}"


def test_a_local_cluster_that_fails_to_start_hints_at_the_main_guard(monkeypatch):
    import modelfactory.run as run

    def fail(workers):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(run, "local_cluster", fail)
    with pytest.raises(ClusterError, match=r"with 2 workers: Nanny failed to start\. If this runs from a "
                                           r"script, put the code under `if __name__ == \"__main__\":`"):
        with run.open_client(settings=load_settings({"workers": 2}, env={})):
            pass


def test_secrets_are_masked_in_the_repr_and_not_echoed_in_errors(toml):
    path = toml('cluster = "kube"\n[kube]\nimage = "x/y:1"\n[kube.env]\nAWS_SECRET_ACCESS_KEY = "ENVSECRET"\n'
                '[storage_options]\nsecret = "SUPERSECRET123"\nkey = "AKIAXXXX"\n')
    s = load_settings(config_file=path, env={})
    assert s.storage_options["secret"] == "SUPERSECRET123"
    for text in (repr(s), str(s), repr(s.kube)):
        assert "SUPERSECRET" not in text and "AKIA" not in text and "ENVSECRET" not in text
    assert "'secret': '***'" in repr(s) and "'AWS_SECRET_ACCESS_KEY': '***'" in repr(s)
    assert "image='x/y:1'" in repr(s)
    for args, env in [({"storage_options": "key=AKIA secret=SUPERSECRET"}, {}),
                      ({}, {"MODELFACTORY_STORAGE_OPTIONS": '["key=AKIA secret=SUPERSECRET"]'}),
                      ({"kube": {"env": "SECRET=SUPERSECRET"}}, {}),
                      ({"kube": {"env": {"K": ["SUPERSECRET"]}}}, {})]:
        with pytest.raises(ClusterError) as info:
            load_settings(args, env=env)
        assert "SUPERSECRET" not in str(info.value) and "AKIA" not in str(info.value)
        assert "value not shown" in str(info.value)


@pytest.mark.parametrize("value, seconds", [('"500ms"', 1), ("0.2", 1), ("1.2", 2), ('"15m"', 900), ("0", 0)])
def test_durations_round_up_so_a_short_idle_timeout_is_not_never(toml, value, seconds):
    s = load_settings(config_file=toml(f"[kube]\nidle_timeout = {value}\n"), env={})
    assert s.kube.idle_timeout == seconds
    assert load_settings(env={"MODELFACTORY_KUBE_STARTUP_TIMEOUT": "1500ms"}).kube.startup_timeout == 2


@pytest.mark.parametrize("name", ["startup_timeout", "resource_timeout"])
@pytest.mark.parametrize("value", ["0", '"0s"', "nan"])
def test_start_up_timeouts_must_be_at_least_a_second(toml, name, value):
    with pytest.raises(ClusterError, match=rf"Setting 'kube.{name}' in .* must be a duration .*at least 1 s"):
        load_settings(config_file=toml(f"[kube]\n{name} = {value}\n"), env={})


def test_the_connect_timeout_is_a_duration_of_at_least_a_second(toml):
    assert load_settings(env={}).connect_timeout == 20
    assert load_settings(env={"MODELFACTORY_CONNECT_TIMEOUT": "1m"}).connect_timeout == 60
    assert load_settings(config_file=toml("connect_timeout = 5\n"), env={}).connect_timeout == 5
    with pytest.raises(ClusterError, match=r"Setting 'connect_timeout' from MODELFACTORY_CONNECT_TIMEOUT must be "
                                           r"a duration .*at least 1 s"):
        load_settings(env={"MODELFACTORY_CONNECT_TIMEOUT": "0"})


@pytest.mark.parametrize("text, hint", [('[kueb]\nimage = "x"', "kube"), ('[Kube]\nimage = "x"', "kube"),
                                        ('[KUBE]\nimage = "x"', "kube"), ('[kub]\nimage = "x"', "kube"),
                                        ("Workers = 3", "workers"), ('[kube]\nImage = "x"', "kube.image")])
def test_misspelt_sections_and_case_get_a_hint(toml, text, hint):
    with pytest.raises(ClusterError, match=rf"Unknown setting .* in .*job.toml; did you mean '{hint}'\?"):
        load_settings(config_file=toml(text + "\n"), env={})


@pytest.mark.parametrize("qty", ["2", "500m", "0.5", ".5", "1.5G", "4Gi", "2Mi", "100k", "1e9", "2E3", "1E",
                                 "3Ti", "250u", "+1"])
def test_kubernetes_quantities_are_accepted(qty):
    s = load_settings({"kube": {"resources": {"limits": {"memory": qty}}}}, env={})
    assert s.kube.resources["limits"]["memory"] == qty


@pytest.mark.parametrize("qty", ["2mi", "2GB", "2K", "2ki", "2gi", "2 Gi", "-1", "1e", "Gi", "2Gib"])
def test_quantities_an_api_server_rejects_are_refused(qty):
    with pytest.raises(ClusterError, match=r"'kube.resources.limits.memory' in the arguments must be a "
                                           r"Kubernetes quantity"):
        load_settings({"kube": {"resources": {"limits": {"memory": qty}}}}, env={})


@pytest.mark.parametrize("labels", [{"team": "forecasting"}, {"team": ""}, {"app.kubernetes.io/team": "a.b_c-1"},
                                    {"example.com/cost-center": "X9"}, {"t": "a" * 63}])
def test_valid_labels_are_accepted(labels):
    assert load_settings({"kube": {"labels": labels}}, env={}).kube.labels == labels


@pytest.mark.parametrize("labels, message", [
    ({"team": "Forecasting Team"}, r"'kube.labels.team' in .* is not a valid Kubernetes label value"),
    ({"team": "a" * 80}, r"'kube.labels.team' in .* is not a valid Kubernetes label value"),
    ({"team": "-x"}, r"not a valid Kubernetes label value"),
    ({"team name": "x"}, r"Label key 'team name' \(kube.labels\) in .* is not a valid Kubernetes label key"),
    ({"k" * 64: "x"}, r"is not a valid Kubernetes label key"),
    ({"Example.com/team": "x"}, r"is not a valid Kubernetes label key"),
    ({"/team": "x"}, r"is not a valid Kubernetes label key"),
])
def test_labels_an_api_server_rejects_are_refused(labels, message):
    with pytest.raises(ClusterError, match=message):
        load_settings({"kube": {"labels": labels}}, env={})
    with pytest.raises(ClusterError, match=message.replace("in .*", "from MODELFACTORY_KUBE_LABELS")
                       if "in .*" in message else message):
        import json
        load_settings(env={"MODELFACTORY_KUBE_LABELS": json.dumps(labels)})


@pytest.mark.parametrize("ns", ["ML_Jobs", "ml-jobs-", "Ml", "a" * 64, "ml.jobs"])
def test_namespaces_must_be_dns_labels(ns):
    with pytest.raises(ClusterError, match=r"Setting 'kube.namespace' in the arguments must be a Kubernetes "
                                           r"namespace name"):
        load_settings({"kube": {"namespace": ns}}, env={})
    assert load_settings({"kube": {"namespace": "ml-jobs-2"}}, env={}).kube.namespace == "ml-jobs-2"


def test_attach_implies_kube_and_overrides_maximum(toml):
    s = load_settings(env={"MODELFACTORY_KUBE_ATTACH": "shared"})
    assert s.cluster == "kube" and s.sources["cluster"] == "MODELFACTORY_KUBE_ATTACH"
    assert s.kube.attach == "shared" and s.plan_slots is None
    # the example config (adaptive, maximum = 50) with an attach from the environment: attached, not adaptive
    example = os.path.join(ROOT, "examples", "job.toml")
    s = load_settings(config_file=example, env={"MODELFACTORY_KUBE_ATTACH": "shared"})
    assert s.cluster == "kube" and s.kube.maximum == 50 and not s.adaptive and s.plan_slots is None
    s = load_settings({"cluster": "kube", "kube": {"attach": "shared", "maximum": 3}}, env={})
    assert not s.adaptive and s.kube.attach == "shared"
    # an explicitly chosen cluster still wins
    s = load_settings({"cluster": "inline"}, env={"MODELFACTORY_KUBE_ATTACH": "shared"})
    assert s.cluster == "inline" and s.sources["cluster"] == "argument"
    path = toml('[kube]\nattach = "shared"\n')
    assert load_settings(config_file=path, env={}).sources["cluster"] == path


def test_a_trailing_newline_is_not_a_valid_kubernetes_name_or_quantity():
    """Python's $ matches before a final newline: the checks must match the whole value."""
    for settings in ({"kube.namespace": "team\n"}, {"kube.labels": {"team": "a\n"}},
                     {"kube.worker_resources": {"requests": {"memory": "2Gi\n"}}}):
        with pytest.raises(ClusterError):
            load_settings({"cluster": "kube", **settings}, env={})


def test_attach_ignores_maximum_for_the_minimum_check_too():
    s = load_settings({"cluster": "kube", "kube.attach": "dc", "kube.maximum": 2, "kube.minimum": 3}, env={})
    assert s.kube.attach == "dc"


@pytest.mark.parametrize("text", ["2_0", "1_0", "٣", "２", "3.0", "0x10", "1e3", "+", "2 0"])
@pytest.mark.parametrize("var", ["MODELFACTORY_WORKERS", "MODELFACTORY_UNIT_ROWS", "MODELFACTORY_KUBE_MAXIMUM"])
def test_integers_from_the_environment_are_ascii_digits_only(var, text):
    # int() takes "2_0" as 20 and any script's digits ("٣" is 3): one typo started 20 workers on a 2-core box
    with pytest.raises(ClusterError, match=rf"from {var} must be an integer >= 1; got {re.escape(repr(text))} \(str\)"):
        load_settings(env={var: text})


@pytest.mark.parametrize("text, n", [("20", 20), (" 7 ", 7), ("+3", 3), ("007", 7)])
def test_integers_from_the_environment_may_have_a_sign_and_spaces(text, n):
    assert load_settings(env={"MODELFACTORY_WORKERS": text}).workers == n


@pytest.mark.parametrize("text", ["2_0", "٣", "1_0m"])
def test_durations_from_the_environment_are_ascii_without_separators(text):
    with pytest.raises(ClusterError, match=r"from MODELFACTORY_CONNECT_TIMEOUT must be a duration"):
        load_settings(env={"MODELFACTORY_CONNECT_TIMEOUT": text})


# --- MODELFACTORY_* variables that no part of modelfactory reads ---------------------------------------
@pytest.mark.parametrize("var, meant", [("MODELFACTORY_SIGNING_KY", "MODELFACTORY_SIGNING_KEY"),
                                        ("MODELFACTORY_SIGNINGKEY", "MODELFACTORY_SIGNING_KEY"),
                                        ("MODELFACTORY_PROM_TOKN", "MODELFACTORY_PROM_TOKEN"),
                                        ("MODELFACTORY_CONFG", "MODELFACTORY_CONFIG")])
def test_a_misspelt_variable_of_another_part_is_an_error_with_a_hint(var, meant):
    # MODELFACTORY_SIGNING_KY=secret committed an unsigned run without a word
    with pytest.raises(ClusterError, match=rf"Unknown environment variable {var}; did you mean {meant}\?"):
        load_settings(env={var: "secret"})


@pytest.fixture
def warned(monkeypatch, caplog):
    from modelfactory import config

    monkeypatch.setattr(config, "_WARNED", set(), raising=False)  # each variable is warned about once a process
    caplog.set_level("WARNING", logger="modelfactory.config")
    return caplog


@pytest.mark.parametrize("var, hint", [
    ("MODELFACTORY_SOMETHING_NEW", r" \(setting variables are"),
    ("MODELFACTORY_CONFIG_FILE", r"; did you mean MODELFACTORY_CONFIG\? \("),
    ("MODELFACTORY_STORE", r"; the model store is an argument \(store=, --store\), not a setting \("),
])
def test_other_unknown_variables_are_a_warning_naming_them(warned, var, hint):
    # not an error: it may be a newer modelfactory's variable, or a script's of the user's
    assert load_settings(env={var: "x"}) == Settings()
    assert load_settings(env={var: "x"}) == Settings()
    messages = [r.getMessage() for r in warned.records]
    assert len(messages) == 1, messages  # once, not once a job
    assert re.match(rf"{var} is ignored: no part of modelfactory reads it{hint}", messages[0]), messages[0]
    assert "MODELFACTORY_SIGNING_KEY" in messages[0]  # the variables there are


def test_known_variables_are_not_warned_about(warned):
    load_settings(env={"MODELFACTORY_SIGNING_KEY": "k", "MODELFACTORY_PROM_TOKEN": "t", "MODELFACTORY_WORKERS": "2",
                       "MODELFACTORY_PROM_PASSWORD": "p", "MODELFACTORY_KUBE_IMAGE": "i", "OTHER_THING": "x"})
    assert warned.records == []


def test_kubernetes_service_variables_are_neither_errors_nor_warnings(warned):
    """Kubernetes gives every pod <SERVICE>_SERVICE_HOST, _PORT, _PORT_<n>_TCP... for each Service of
    its namespace: a Service called modelfactory-scheduler (or modelfactory-kube-<id>, or
    modelfactory) stopped every job in the namespace as an unknown setting, or warned 8 times."""
    env = {}
    for service in ("MODELFACTORY_SCHEDULER", "MODELFACTORY_KUBE_AB12CD", "MODELFACTORY"):
        env.update({f"{service}_SERVICE_HOST": "10.0.0.1", f"{service}_SERVICE_PORT": "8786",
                    f"{service}_SERVICE_PORT_TCP_COMM": "8786", f"{service}_PORT": "tcp://10.0.0.1:8786",
                    f"{service}_PORT_8786_TCP": "tcp://10.0.0.1:8786", f"{service}_PORT_8786_TCP_PROTO": "tcp",
                    f"{service}_PORT_8786_TCP_PORT": "8786", f"{service}_PORT_8786_TCP_ADDR": "10.0.0.1"})
    assert load_settings(env=env) == Settings()
    assert warned.records == []
    with pytest.raises(ClusterError, match="did you mean MODELFACTORY_WORKERS"):  # still: a misspelt setting
        load_settings(env={**env, "MODELFACTORY_WROKERS": "2"})


def test_the_scheduler_variable_is_the_cluster_setting_as_the_flag_is():
    # --scheduler and --cluster are one option (the cluster setting); MODELFACTORY_SCHEDULER=tcp://...
    # was ignored, and the job ran on a LocalCluster
    s = load_settings(env={"MODELFACTORY_SCHEDULER": "tcp://10.0.0.5:8786"})
    assert s.cluster == "tcp://10.0.0.5:8786" and s.sources["cluster"] == "MODELFACTORY_SCHEDULER"
    assert load_settings({"cluster": "inline"}, env={"MODELFACTORY_SCHEDULER": "tcp://h:1"}).cluster == "inline"
    s = load_settings(env={"MODELFACTORY_SCHEDULER": "kube ", "MODELFACTORY_CLUSTER": "kube"})
    assert s.cluster == "kube" and s.sources["cluster"] == "MODELFACTORY_CLUSTER"
    with pytest.raises(ClusterError, match=r"MODELFACTORY_\w+='tcp://h:1' and MODELFACTORY_\w+='local' both set "
                                           r"'cluster', to different values"):
        load_settings(env={"MODELFACTORY_SCHEDULER": "tcp://h:1", "MODELFACTORY_CLUSTER": "local"})
    with pytest.raises(ClusterError, match=r"Setting 'cluster' from MODELFACTORY_SCHEDULER must be 'local'"):
        load_settings(env={"MODELFACTORY_SCHEDULER": "bogus"})


LOCAL = r"kube.threads and kube.resources .* are for Kubernetes worker pods only .*local_cluster\(workers=2, " \
        r"threads_per_worker=4, memory_limit=\"4GiB\"\).*--nthreads 4 --memory-limit 4GiB"


@pytest.mark.parametrize("var", ["MODELFACTORY_THREADS", "MODELFACTORY_THREADS_PER_WORKER", "MODELFACTORY_MEMORY",
                                 "MODELFACTORY_MEMORY_LIMIT"])
def test_threads_or_memory_from_the_environment_say_how_a_local_cluster_gets_them(var):
    # was "did you mean MODELFACTORY_KUBE_THREADS?" (or nothing), which does nothing on a local cluster
    with pytest.raises(ClusterError, match=rf"Unknown environment variable {var}: {LOCAL}"):
        load_settings(env={var: "4"})


@pytest.mark.parametrize("text", ["threads = 2", "threads_per_worker = 2", 'memory_limit = "4GiB"'])
def test_threads_or_memory_in_the_file_say_how_a_local_cluster_gets_them(toml, text):
    with pytest.raises(ClusterError, match=rf"Unknown setting '\w+' in .*: {LOCAL}"):
        load_settings(config_file=toml(text + "\n"), env={})


# --- settings TOML puts into the table above them ----------------------------------------------------
@pytest.mark.parametrize("text, key, table, meant", [
    ('[storage_options]\n# endpoint_url = "http://minio:9000"\n\nworkers = 1\nunit_rows = 20000\n', "workers",
     "storage_options", "workers"),
    ('[storage_options]\nanon = true\ncluster = "inline"\n', "cluster", "storage_options", "cluster"),
    ('[kube]\nimage = "x"\nworkers = 2\n', "workers", "kube", "workers"),
    ('[kube.resources]\nunit_rows = 5\n', "unit_rows", "kube.resources", "unit_rows"),
    ('[kube.resources.limits]\nmemory = "1Gi"\nthreads = 2\n', "threads", "kube.resources.limits", "kube.threads"),
    ('[kube.scheduler_resources.requests]\ncpu = "1"\nworkers = 8\n', "workers",
     "kube.scheduler_resources.requests", "workers"),
])
def test_a_setting_written_under_a_table_that_cannot_take_it_is_refused(toml, text, key, table, meant):
    # it went to fsspec (or a resource) and the setting stayed unset, without a word
    path = toml(text)
    with pytest.raises(ClusterError, match=rf"In {re.escape(path)}, '{key}' is a key of the \[{re.escape(table)}\] "
                                           rf"table, but it is the name of the setting '{meant}', .*TOML puts every key "
                                           r"written after a \[table\] header into that table.*move top-level settings "
                                           r"above the first \[table\]"):
        load_settings(config_file=path, env={})


def test_options_of_a_file_system_are_not_mistaken_for_settings(toml):
    path = toml('workers = 2\n[storage_options]\nanon = true\nendpoint_url = "http://minio:9000"\n'
                'config_kwargs = {connect_timeout = 5, read_timeout = 20}\n')
    s = load_settings(config_file=path, env={})
    assert s.workers == 2 and set(s.storage_options) == {"anon", "endpoint_url", "config_kwargs"}


@pytest.mark.parametrize("added, table, key, meant", [("workers = 8", "labels", "workers", "workers"),
                                                      ("maximum = 20", "labels", "maximum", "kube.maximum"),
                                                      ('[kube.env]\nimage = "x"', "env", "image", "kube.image")])
def test_a_setting_written_under_labels_or_env_is_a_warning(toml, warned, added, table, key, meant):
    # a label (or variable) called `workers` is legal, if unlikely: warned about, not refused
    with open(os.path.join(ROOT, "examples", "job.toml"), encoding="utf-8") as f:
        path = toml(_without_env(f.read()) + "\n" + added + "\n")
    s = load_settings(config_file=path, env={})
    assert getattr(s.kube, table)[key] in ("8", "20", "x") and s.workers is None and s.kube.maximum == 50
    messages = [r.getMessage() for r in warned.records]
    assert len(messages) == 1 and re.match(rf"In {re.escape(path)}, '{key}' is a key of the \[kube.{table}\] table, "
                                           rf".* also the name of the setting '{meant}': if the setting was meant, it "
                                           r"is not set\. TOML puts every key", messages[0]), messages


def _without_env(text: str) -> str:
    """examples/job.toml without its [kube.env] table (a test adds its own)."""
    head, _, tail = text.partition("[kube.env]")
    return head + tail[tail.index("[kube.labels]"):]


def test_a_missing_config_file_is_named_with_the_argument_that_gave_it(tmp_path):
    # train(config="nope.toml") said "(from --config, config_file= or $MODELFACTORY_CONFIG)": no config=
    import modelfactory

    with pytest.raises(ClusterError, match=r"Config file 'nope.toml' not found \(from --config, config= or "
                                           r"config_file=\)\.$"):
        modelfactory.train(str(tmp_path), by="app", target="value", store=str(tmp_path / "s"), cluster="inline",
                           config="nope.toml")
    with pytest.raises(ClusterError, match=r"Config file 'nope.toml' not found \(from \$MODELFACTORY_CONFIG\)\.$"):
        load_settings(env={"MODELFACTORY_CONFIG": "nope.toml"})
