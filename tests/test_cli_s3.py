"""The store commands (`models list|show|gc`, `plot`, `report`) on an S3 endpoint other than AWS:
they read `[storage_options]` from `--config FILE` or `$MODELFACTORY_CONFIG` like train and score, and
a storage error is one `error:` line naming the store, exit 2 (a real S3 API: moto's server mode)."""
from __future__ import annotations

import json
import socket
import uuid

import pytest
from _servers import MotoS3, moto_with_bucket

import modelfactory
from modelfactory.cli import main

BUCKET = "mf-cli"
TRAIN = {"by": ["app", "site"], "time": "ts", "target": "value", "params": {"season_length": 24}}


@pytest.fixture(scope="module")
def s3():
    with moto_with_bucket(BUCKET) as srv:
        yield srv


@pytest.fixture(scope="module")
def trained(s3):
    """A store on S3 with one committed run: (store url, run id)."""
    so = s3.storage_options()
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    data = modelfactory.demo.write_dataset(f"{prefix}/data", series=4, days=3, storage_options=so)
    run = modelfactory.train(data, store=f"{prefix}/store", cluster="inline", storage_options=so, **TRAIN)
    return f"{prefix}/store", run.id


def _toml(path, s3: MotoS3, endpoint: str | None = None) -> str:
    path.write_text(f'[storage_options]\nkey = "{s3.key}"\nsecret = "{s3.secret}"\n'
                    f'client_kwargs = {{endpoint_url = "{endpoint or s3.endpoint}"}}\n'
                    'config_kwargs = {retries = {max_attempts = 1}, connect_timeout = 2}\n')
    return str(path)


@pytest.fixture
def config(s3, tmp_path) -> str:
    return _toml(tmp_path / "job.toml", s3)


def _commands(store: str, tmp_path) -> list[list[str]]:
    return [["models", "list", "--store", store, "--json"],
            ["models", "show", "--store", store, "--json"],
            ["models", "show", "--store", store, "--key", "app=app-00,site=site-00000"],
            ["models", "gc", "--store", store, "--dry-run"],
            ["report", "--store", store, "--out", str(tmp_path / "r.html")],
            ["plot", "--store", store, "--key", "app=app-00,site=site-00000", "--out", str(tmp_path / "p.png")]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["--config", "MODELFACTORY_CONFIG"])
def test_store_commands_reach_the_endpoint_of_the_config(s3, trained, config, tmp_path, monkeypatch, capsys, how):
    store, run_id = trained
    if how == "MODELFACTORY_CONFIG":
        monkeypatch.setenv("MODELFACTORY_CONFIG", config)
    extra = ["--config", config] if how == "--config" else []
    for argv in _commands(store, tmp_path):
        code = main([*argv, *extra])
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        if argv[:2] == ["models", "list"]:
            assert [r["run"] for r in json.loads(out)["runs"]] == [run_id]
    assert (tmp_path / "r.html").stat().st_size > 1000 and (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.timeout(120)
def test_an_unreachable_endpoint_is_one_error_line_naming_the_store(s3, trained, tmp_path, capsys):
    store, _ = trained
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    bad = _toml(tmp_path / "bad.toml", s3, endpoint=closed)
    for argv in _commands(store, tmp_path):
        code = main([*argv, "--config", bad])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and store in err, (argv, err)
        assert "internal error" not in err and s3.secret not in err and s3.key not in err, (argv, err)


@pytest.mark.timeout(120)
def test_demo_writes_its_dataset_to_the_endpoint_of_the_config(s3, config, capsys):
    # `demo --out s3://... --config FILE` wrote the dataset with no storage options (to AWS: an
    # internal error), while it trained with them
    out = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    code = main(["demo", "--out", out, "--series", "4", "--days", "3", "--scheduler", "inline", "-q",
                 "--config", config])
    assert code == 0, capsys.readouterr().err
    assert modelfactory.ModelStore(f"{out}/store", storage_options=s3.storage_options()).groups().shape[0] == 4


@pytest.mark.timeout(120)
def test_train_score_and_demo_on_an_unreachable_endpoint_are_one_error_line(s3, trained, tmp_path, capsys):
    store, _ = trained
    data = store.rsplit("/", 1)[0] + "/data"
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    bad = _toml(tmp_path / "bad.toml", s3, endpoint=closed)
    local = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=3)
    cases = {data: ["train", data, "--by", "app,site", "--time", "ts", "--target", "value",
                    "--store", str(tmp_path / "store")],
             store: ["score", local, "--store", store, "--out", str(tmp_path / "scores")],
             f"s3://{BUCKET}/demo": ["demo", "--out", f"s3://{BUCKET}/demo", "--series", "4", "--days", "3"]}
    for url, argv in cases.items():
        code = main([*argv, "--scheduler", "inline", "-q", "--config", bad])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and url in err, (argv, err)
        assert "internal error" not in err and s3.secret not in err, (argv, err)
