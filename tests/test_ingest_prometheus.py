"""modelfactory.ingest.prometheus against a real Prometheus (Debian's package) with
backfilled history, plus a recording HTTP server for headers, odd answers and TLS."""
from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from modelfactory.exceptions import IngestError
from modelfactory.ingest import prometheus
from modelfactory.ingest._cli import add_parser

try:
    from . import _prometheus_server as ps
except ImportError:
    import _prometheus_server as ps
from _servers import moto_with_bucket

promod = sys.modules["modelfactory.ingest.prometheus"]
T0, LAST = ps.T0, ps.LAST
H = 3600
DEFINITION = "_ingest.json"   # the query, step and by of the dataset in a folder


@pytest.fixture(scope="module")
def prom_server(tmp_path_factory):
    if not ps.have_prometheus():
        pytest.skip("prometheus/promtool binaries not installed (apt-get install prometheus)")
    server = ps.start_prometheus(tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prom(prom_server):
    return prom_server.url


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(promod, "_BACKOFF_S", 0.01)


def read(out, by=("app", "site")) -> pa.Table:
    part = ds.partitioning(pa.schema([(c, pa.string()) for c in by]), flavor="hive")
    return ds.dataset(str(out), format="parquet", partitioning=part).to_table()


def rows(out) -> list[tuple]:
    t = read(out)
    cols = [t[c].to_pylist() for c in ("app", "site", "instance", "metric")]
    return sorted(zip(*cols, t["ts"].cast(pa.int64()).to_pylist(), t["value"].to_pylist()))


def files(out) -> set[str]:
    """Every file under ``out`` but the dataset's definition (_ingest.json): data, and anything left behind."""
    return {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()} - {DEFINITION}


def definition(out) -> dict:
    return json.loads((Path(out) / DEFINITION).read_text())


def ingest(url, out, first, last, step, **kw):
    return prometheus(url, "mf_load", first, last, step, by=["app", "site"], out=str(out), **kw)


# -- a real Prometheus ---------------------------------------------------------------------


def test_roundtrip_matches_history_exactly(prom, tmp_path):
    s = ingest(prom, tmp_path, "2024-03-01T00:00:00Z", LAST, "1m")
    chunks = len(promod.plan_chunks(T0 * 1000, LAST * 1000, 60_000))
    assert (s.series, s.rows, s.chunks, s.files) == (4, 4 * ps.SAMPLES, chunks, 3 * chunks)
    assert f"Ingested 4 series, 11520 rows into {3 * chunks} files under {tmp_path}" in str(s)
    assert rows(tmp_path) == sorted(ps.expected(T0, LAST, 60))
    assert definition(tmp_path) == {"source": "prometheus", "query": "mf_load", "step_ms": 60_000,
                                    "by": ["app", "site"]}
    assert {p.split("/")[0] + "/" + p.split("/")[1] for p in files(tmp_path)} == {
        "app=shop/site=eu", "app=shop/site=us", "app=search/site=eu%2Fwest 1"}
    schema = ds.dataset(str(tmp_path / "app=shop" / "site=eu"), format="parquet").schema
    assert schema == pa.schema([("metric", pa.string()), ("instance", pa.string()),
                                ("ts", pa.timestamp("ms", tz="UTC")), ("value", pa.float64())])


def test_rerun_into_a_dataset_written_before_spark_escaping_keeps_its_folders(prom, tmp_path):
    """Ingests before Spark-style folder names wrote 'site=eu%2Fwest%201' (the space escaped too).
    A rerun of the same range (documented as idempotent) wrote a second folder for the series,
    'site=eu%2Fwest 1': its rows were read twice and training failed on repeated timestamps."""
    first, last = T0 + 3 * H, T0 + 6 * H
    ingest(prom, tmp_path, first, last, "1m")
    (tmp_path / "app=search" / "site=eu%2Fwest 1").rename(tmp_path / "app=search" / "site=eu%2Fwest%201")
    names = files(tmp_path)
    ingest(prom, tmp_path, first, last, "1m")  # a rerun
    assert files(tmp_path) == names
    ingest(prom, tmp_path, first, last + H, "1m")  # an append
    assert not (tmp_path / "app=search" / "site=eu%2Fwest 1").exists()
    assert rows(tmp_path) == sorted(ps.expected(first, last + H, 60))


def test_long_range_is_split_at_the_point_cap(prom, tmp_path):
    first, last = T0 + H, T0 + 17 * H       # 11,521 points per series at 5 s: over the cap
    s = ingest(prom, tmp_path, first, last, 5)
    assert s.chunks >= 2 and s.requests == s.chunks and s.rows == 4 * 11_521
    assert rows(tmp_path) == sorted(ps.expected(first, last, 5))
    assert len(list((tmp_path / "app=shop" / "site=us").iterdir())) == s.chunks


def test_max_points_splits_requests_with_same_result(prom, tmp_path):
    first, last = T0 + 2 * H, T0 + 4 * H
    s = ingest(prom, tmp_path / "a", first, last, "5s", max_points=500, concurrency=2)
    assert s.requests >= 3
    ingest(prom, tmp_path / "b", first, last, "5s")
    assert rows(tmp_path / "a") == rows(tmp_path / "b") == sorted(ps.expected(first, last, 5))


def test_rerun_is_idempotent(prom, tmp_path):
    first, last = T0 + 3 * H, T0 + 20 * H
    ingest(prom, tmp_path, first, last, "5s")
    before, names = rows(tmp_path), files(tmp_path)
    ingest(prom, tmp_path, first, last, "5s")
    assert files(tmp_path) == names
    assert rows(tmp_path) == before == sorted(ps.expected(first, last, 5))


def test_append_adds_files_without_duplicates(prom, tmp_path):
    ingest(prom, tmp_path, T0, T0 + 14 * H, "5s")
    old = files(tmp_path)
    ingest(prom, tmp_path, T0 + 12 * H, T0 + 40 * H, "5s")   # overlaps, then reaches further
    assert old < files(tmp_path)
    got = rows(tmp_path)
    assert len(got) == len(set(got))
    assert got == sorted(ps.expected(T0, T0 + 40 * H, 5))


def test_labels_with_slashes_and_spaces_round_trip(prom, tmp_path):
    prometheus(prom, 'mf_load{app="search"}', T0, T0 + H, "1m", by=["site", "instance"],
               out=str(tmp_path))
    t = read(tmp_path, by=("site", "instance"))
    assert set(t["site"].to_pylist()) == {"eu/west 1"} and t.num_rows == 61


@pytest.mark.parametrize("query, match", [
    ("rate(mf_load[5m]", r"rejected the query .*HTTP 400, bad_data.*parse error: unclosed left parenthesis"),
    ('"text"', r'invalid expression type \\?"string\\?" for range query'),
    ("mf_does_not_exist", r"returned no series between 2024-03-01T00:00:00Z and .*Check the metric"),
    ('{__name__=~"mf_load|mf_nosite"}',
     r'1 of 5 series lack the label\(s\) site given in by=\[\'app\', \'site\'\], e\.g\. '
     r'mf_nosite\{app="shop",instance="a"\}'),
])
def test_query_errors(prom, tmp_path, query, match):
    with pytest.raises(IngestError, match=match):
        prometheus(prom, query, T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    assert files(tmp_path) == set()


def test_http_404_and_unreachable(prom, tmp_path):
    with pytest.raises(IngestError, match=r"HTTP 404 for http://127\.0\.0\.1:\d+/nope/api/v1/query_range"):
        ingest(prom + "/nope", tmp_path, T0, T0 + H, 60)
    url = f"http://127.0.0.1:{ps.free_port()}"
    with pytest.raises(IngestError, match=rf"Could not reach Prometheus at {url} \(1 attempt\).*refused"):
        ingest(url, tmp_path, T0, T0 + H, 60, retries=0)


@pytest.mark.parametrize("kw, match", [
    ({"start": "yesterday"}, r"start must be .*Got 'yesterday' instead"),
    ({"end": T0 - 60}, r"No evaluation step between start=2024-03-01T00:00:00Z and end="),
    ({"step": "5 minutes"}, r"step must be .*Got '5 minutes' instead"),
    ({"max_points": 20_000}, r"max_points / --max-points must be an int between 1 and 11000\. Got 20000"),
    # errors name the argument and the CLI's flag: the CLI's messages spoke Python
    ({"by": ["app", "site-name"]}, r"by / --by must list distinct Prometheus label names"),
    ({"by": "a b"}, r"by / --by must list distinct Prometheus label names .*--by app,site\. Got \['a b'\] instead"),
    ({"bearer_token_file": "/no/such/token"}, (r"Could not read bearer_token_file / --bearer-token-file "
                                               r"'/no/such/token': No such file or directory\.$")),
    ({"by": ["_shard"]}, r"The by label '_shard' starts with '_': its folders \(_shard=\.\.\.\) would be hidden "
                         r"from every Parquet reader.*label_replace\(<query>, 'shard', \"\$1\", '_shard', \"\(\.\*\)\"\)"),
    ({"url": "prometheus:9090"}, r"url must look like http\(s\)://host:port"),
    # Grafana's from= / to= are milliseconds: year 56134 once ended in 'internal error: ValueError'
    ({"start": T0 * 1000, "end": (T0 + H) * 1000},
     rf"start={T0 * 1000} is in the year 56134: it looks like milliseconds \(as in Grafana URLs\); pass unix "
     rf"seconds \({T0}\)"),
    ({"end": str((T0 + H) * 1000)}, r"end='1709254800000' is in the year 56134: it looks like milliseconds"),
    ({"start": "now+9000y"}, r"start='now\+9000y' is in the year 110\d\d: times must lie between 1970 and 9999"),
    ({"start": -60}, r"start=-60 is in the year 1969: times must lie between 1970 and 9999"),
    # NaN and inf passed "> 0": internal errors from the socket (ValueError, OverflowError)
    ({"timeout": float("nan")}, r"timeout must be a number of seconds > 0\. Got nan instead\."),
    ({"timeout": float("inf")}, r"timeout must be a number of seconds > 0\. Got inf instead\."),
])
def test_argument_errors(tmp_path, kw, match):
    args = {"url": "http://127.0.0.1:1", "query": "up", "start": T0, "end": T0 + H, "step": 60,
            "by": ["app", "site"], "out": str(tmp_path), **kw}
    with pytest.raises(IngestError, match=match):
        prometheus(**args)


class _Py310Datetime(datetime):
    """``datetime`` with ``fromisoformat`` as Python 3.10 (which pyproject allows) has it: no ``Z``
    for UTC, and a fraction of a second of 3 or 6 digits only."""

    @classmethod
    def fromisoformat(cls, text):
        fraction = re.search(r":\d\d[.,](\d+)", text)
        if text.endswith(("Z", "z")) or (fraction and len(fraction.group(1)) not in (3, 6)):
            raise ValueError(f"Invalid isoformat string: {text!r}")
        return super().fromisoformat(text)


@pytest.mark.parametrize("python", ["this one", "3.10"])
@pytest.mark.parametrize("text, ms", [
    ("2024-03-01T00:00:00Z", T0 * 1000), ("2024-03-01T00:00Z", T0 * 1000),
    ("2024-03-01T00:00:00.25Z", T0 * 1000 + 250), ("2024-03-01 00:00:00.123456789z", T0 * 1000 + 123),
    ("2024-03-01T01:00:00,5+01:00", T0 * 1000 + 500), ("2024-03-01", T0 * 1000),
])
def test_iso_times_with_z_and_any_fraction_parse_on_every_python(monkeypatch, python, text, ms):
    """'2024-03-01T00:00:00Z', the form the error message and --help recommend, was refused on
    Python 3.10, whose fromisoformat takes no 'Z' (nor a fraction but of 3 or 6 digits)."""
    if python == "3.10":
        monkeypatch.setattr(promod, "datetime", _Py310Datetime)
    assert promod._parse_time(text, "start", datetime.now(timezone.utc)) == ms


def test_numpy_numbers_paths_and_header_pairs_are_taken_for_what_they_are(tmp_path):
    """np.int64 start and step were refused as not unix seconds / not a step, a pathlib.Path out
    as not a path (train takes one), headers as (name, value) pairs raised AttributeError."""
    np = pytest.importorskip("numpy")
    with ps.FakeServer() as srv:
        s = prometheus(srv.url, "up", np.int64(T0), np.float64(T0 + 600), np.int64(300), by=["app"],
                       out=tmp_path / "out", headers=[("X-Scope-OrgID", "t1")], max_points=np.int64(2),
                       concurrency=np.int32(2), retries=np.int64(0), timeout=np.float32(30))
    assert (s.rows, s.requests, s.out) == (3, 2, str(tmp_path / "out"))
    assert srv.requests[0].headers["X-Scope-OrgID"] == "t1"
    assert definition(tmp_path / "out")["step_ms"] == 300_000   # written as JSON: a plain int


@pytest.mark.parametrize("kw, match", [
    ({"by": None}, (r"by / --by must list the labels to partition by, e.g\. \['app', 'site'\] / --by app,site, or "
                    r"be empty \(\[\] / --by ''\) for no partition folders\. Got None instead\.")),
    ({"headers": ["X-Api-Key=key-SECRET"]}, (r"headers must be a mapping of header names to values.*or a list of "
                                             r"\(name, value\) pairs\. Got a list \(not shown")),
    ({"headers": "X-Api-Key: key-SECRET"}, r"headers must be a mapping .*Got a str \(not shown"),
])
def test_arguments_of_the_wrong_type_are_named(tmp_path, kw, match):
    args = {"url": "http://127.0.0.1:1", "query": "up", "start": T0, "end": T0 + H, "step": 60,
            "by": ["app"], "out": str(tmp_path), **kw}
    with pytest.raises(IngestError, match=match) as err:
        prometheus(**args)
    assert "SECRET" not in str(err.value)


def test_an_out_that_is_a_file_is_named_as_one(tmp_path):
    """--out afile said 'Could not create the lock afile/_ingest.lock: FileExistsError ... (at <frozen
    os>:225 in makedirs). Check that out / --out is writable', which it was."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "binary-token").write_bytes(b"\xff\xfe\x00")
    with ps.FakeServer() as srv:
        for out, match in ((tmp_path / "afile", r"out='[^']+/afile' is a file, not a folder\. Pass a folder"),
                           (tmp_path / "afile" / "sub", (r"out='[^']+/afile/sub' lies under '[^']+/afile', which is "
                                                         r"a file, not a folder"))):
            with pytest.raises(IngestError, match=match):
                prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(out))
        # a token file that is not text: UnicodeDecodeError, an 'internal error' to the CLI
        with pytest.raises(IngestError, match=r"bearer_token_file / --bearer-token-file '[^']+' is not UTF-8 text"):
            prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path / "o"),
                       bearer_token_file=str(tmp_path / "binary-token"))
    assert not srv.requests and (tmp_path / "afile").read_text() == "mine"


def test_storage_errors_are_quoted_without_a_code_location(tmp_path, monkeypatch):
    """Errors of the disk or of a JSON file ended in '(at <frozen os>:225 in makedirs)' or '(at
    decoder.py:353 in raw_decode)': describe_error's place in user code, which this is not."""
    def denied(self):
        raise PermissionError(13, "Permission denied", self.root)

    monkeypatch.setattr(promod.FolderLock, "acquire", denied)
    with pytest.raises(IngestError, match=r"Could not create the lock \S+_ingest\.lock: PermissionError: \[Errno 13\] "
                                          r"Permission denied: '[^']+'\. Check that out / --out is writable") as err:
        prometheus("http://127.0.0.1:1", "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path))
    assert "(at " not in str(err.value)


def test_cli(prom, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="modelfactory")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", "prometheus", "--url", prom, "--query", "mf_load",
                              "--start", "2024-03-01T00:00:00Z", "--end", str(T0 + H), "--step", "5m",
                              "--by", "app,site", "--out", str(tmp_path), "--concurrency", "2"])
    assert args.func(args) == 0
    assert "Ingested 4 series, 52 rows" in capsys.readouterr().out
    assert rows(tmp_path) == sorted(ps.expected(T0, T0 + H, 300))
    for argv in (["ingest", "--help"], ["ingest", "prometheus", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 0
    assert "--bearer-token-file" in capsys.readouterr().out


def test_the_cli_reaches_an_s3_out_through_the_configs_storage_options(prom, tmp_path, moto, capsys):
    # ingest had no --config: an s3:// --out on another endpoint than AWS's could not be reached
    opts = moto
    (tmp_path / "job.toml").write_text(
        f'[storage_options]\nkey = "{opts["key"]}"\nsecret = "{opts["secret"]}"\n'
        f'client_kwargs = {{endpoint_url = "{opts["client_kwargs"]["endpoint_url"]}"}}\n')
    parser = argparse.ArgumentParser(prog="modelfactory")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", "prometheus", "--url", prom, "--query", "mf_load", "--start", str(T0),
                              "--end", str(T0 + H), "--step", "5m", "--by", "app", "--out", "s3://prom-bucket/cfg",
                              "--config", str(tmp_path / "job.toml")])
    assert args.func(args) == 0
    assert "rows into" in capsys.readouterr().out
    assert fsspec.filesystem("s3", **opts).find("prom-bucket/cfg")


def test_train_on_the_result(prom, tmp_path):
    try:
        train = getattr(importlib.import_module("modelfactory"), "train", None)
    except ImportError:
        train = None
    if train is None:
        pytest.skip("core not available")
    out = tmp_path / "data"
    prometheus(prom, "sum by (app, site) (mf_load)", T0, LAST, "5m", by=["app", "site"], out=str(out))
    train(str(out), by=["app", "site"], time="ts", target="value", model="seasonal",
          store=str(tmp_path / "store"), cluster="inline")
    assert any(p.is_file() for p in (tmp_path / "store").rglob("*"))


# -- a recording HTTP server: headers, secrets, odd answers, TLS ----------------------------


def test_bearer_and_custom_headers_are_sent(tmp_path):
    (tmp_path / "token").write_text("file-token\n")
    with ps.FakeServer() as srv:
        s = prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path / "o1"),
                       bearer_token="arg-token", headers={"X-Scope-OrgID": "tenant-1"})
        prometheus(srv.url + "/api/v1/", "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path / "o2"),
                   bearer_token_file=str(tmp_path / "token"))
    assert s.rows == 11 and [r.path for r in srv.requests] == ["/api/v1/query_range"] * 2
    assert srv.requests[0].headers["Authorization"] == "Bearer arg-token"
    assert srv.requests[0].headers["X-Scope-OrgID"] == "tenant-1"
    assert srv.requests[0].form == {"query": "up", "start": f"{T0}.000", "end": f"{T0 + 600}.000",
                                    "step": "60"}
    assert srv.requests[1].headers["Authorization"] == "Bearer file-token"


def test_credentials_from_environment_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFACTORY_PROM_TOKEN", "env-token")
    monkeypatch.setenv("MODELFACTORY_PROM_PASSWORD", "env-pass")
    with ps.FakeServer() as srv:
        prometheus(srv.url, "up", T0, T0 + 60, 60, by=[], out=str(tmp_path / "1"))
        prometheus(srv.url, "up", T0, T0 + 60, 60, by=[], out=str(tmp_path / "2"), basic_auth_user="ann")
        url = srv.url.replace("://", "://bob:p%40ss@")
        prometheus(url, "up", T0, T0 + 60, 60, by=[], out=str(tmp_path / "3"))
    basic = lambda up: "Basic " + base64.b64encode(up.encode()).decode()  # noqa: E731
    assert [r.headers["Authorization"] for r in srv.requests] == [
        "Bearer env-token", basic("ann:env-pass"), basic("bob:p@ss")]


def test_cli_reads_secrets_from_env_and_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELFACTORY_PROM_TOKEN", "env-token")
    (tmp_path / "pw").write_text("file-pass\n")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    common = ["--query", "up", "--start", str(T0), "--end", str(T0 + 60), "--step", "60", "--by", "app"]
    with ps.FakeServer() as srv:
        for extra in (["--header", "X-Scope-OrgID: t1", "--header", "X-Other:v"],
                      ["--basic-auth-user", "ann", "--basic-auth-password-file", str(tmp_path / "pw")]):
            args = parser.parse_args(["ingest", "prometheus", "--url", srv.url, *common,
                                      "--out", str(tmp_path / str(len(srv.requests))), *extra])
            assert args.func(args) == 0
    first, second = (r.headers for r in srv.requests)
    assert (first["Authorization"], first["X-Scope-OrgID"], first["X-Other"]) == ("Bearer env-token", "t1", "v")
    assert second["Authorization"] == "Basic " + base64.b64encode(b"ann:file-pass").decode()
    args = parser.parse_args(["ingest", "prometheus", "--url", srv.url, *common, "--out", str(tmp_path),
                              "--header", "X-Api-Key secret-value"])
    with pytest.raises(IngestError, match=r"--header number 1 must look like 'Name: value'") as err:
        args.func(args)
    assert "secret-value" not in str(err.value)


@pytest.mark.parametrize("kw, match", [
    ({"headers": {"X-Scope-OrgID": "团队"}}, (r"The value of the HTTP header 'X-Scope-OrgID' \(headers / --header\) "
                                            r"holds a character outside Latin-1 \(character 1\)")),
    ({"headers": {"X-Bad\nName": "v"}}, r"The HTTP header name 'X-Bad\\nName' \(headers / --header\) is not a valid"),
    ({"headers": {"X-Api-Key": "key-SECRET\nmore"}}, r"'X-Api-Key' \(headers / --header\) holds a line break"),
    ({"bearer_token": "团队-token"}, r"The bearer token \(bearer_token\) holds a character outside Latin-1"),
    ({"url": "http://[::1:19391"}, (r"url must look like http\(s\)://host:port\[/prefix\] \(Invalid IPv6 URL\)\. "
                                    r"Got 'http://\[::1:19391' instead")),
    ({"url": "http://ann:pw-SECRET@127.0.0.1:99999"}, r"\(Port out of range 0-65535\)\. Got 'http://\*\*\*@127"),
])
def test_headers_and_urls_http_cannot_carry_are_named_before_any_request(tmp_path, kw, match):
    """A header value outside Latin-1, a line break in a header name, an unclosed IPv6 bracket in
    the URL raised ValueError or UnicodeEncodeError from http.client or urlsplit: 'internal error'."""
    with ps.FakeServer() as srv:
        args = {"url": srv.url, "query": "up", "start": T0, "end": T0 + 60, "step": 60, "by": ["app"],
                "out": str(tmp_path / "out"), **kw}
        with pytest.raises(IngestError, match=match) as err:
            prometheus(**args)
    assert not srv.requests and not (tmp_path / "out").exists()
    assert not re.search("团|SECRET", str(err.value))   # a value may be a secret: never shown


def test_the_cli_names_a_header_or_token_http_cannot_carry_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("团队-token\n")
    common = ["--query", "up", "--start", str(T0), "--end", str(T0 + 60), "--step", "60", "--by", "app",
              "--out", str(tmp_path / "out")]
    with ps.FakeServer() as srv:
        for extra, said in ((["--header", "X-Scope-OrgID: 团队"], "header 'X-Scope-OrgID'"),
                            (["--bearer-token-file", str(tmp_path / "token")], "--bearer-token-file"),
                            (["--header", "X-Bad\nName: v"], "header name 'X-Bad\\nName'")):
            done = subprocess.run([sys.executable, "-m", "modelfactory", "ingest", "prometheus", "--url", srv.url,
                                   *common, *extra], capture_output=True, text=True, timeout=300, check=False)
            (line,) = done.stderr.strip().splitlines()
            assert done.returncode == 2 and line.startswith("error: ") and said in line, done.stderr
            assert "internal error" not in line and "团" not in line
    assert not srv.requests


def test_secrets_never_in_errors_logs_or_files(tmp_path, caplog, fast_retries):
    secrets = ["tok-SECRET", "pw-SECRET", base64.b64encode(b"ann:pw-SECRET").decode(), "key-SECRET"]

    def leaky(req):
        if req.form["start"] == f"{T0}.000":   # a warning quoting the credentials, data still good
            return ps.matrix([{"metric": {"app": "x"}, "values": [[T0, "1"]]}],
                             warnings=[f"seen {req.headers}"])
        sent = (req.headers.get("Authorization"), req.headers.get("X-Api-Key"))
        return 500, {}, f"boom, you sent {sent}".encode()

    caplog.set_level(logging.DEBUG)
    with ps.FakeServer(leaky) as srv:
        prometheus(srv.url, "up", T0, T0, 60, by=["app"], out=str(tmp_path / "ok"),
                   bearer_token="tok-SECRET", headers={"X-Api-Key": "key-SECRET"})
        for auth in ({"bearer_token": "tok-SECRET"}, {"basic_auth_user": "ann", "basic_auth_password": "pw-SECRET"}):
            with pytest.raises(IngestError, match=r"answered HTTP 500 \(after 2 attempts\): \"boom") as err:
                prometheus(srv.url, "up", T0 + 60, T0 + 120, 60, by=["app"], out=str(tmp_path / "bad"),
                           retries=1, headers={"X-Api-Key": "key-SECRET"}, **auth)
            text = "".join(traceback.format_exception(err.value))
            assert "***" in text and not any(s in text for s in secrets)
        with pytest.raises(IngestError, match="Both a bearer token and basic auth") as err:
            prometheus(srv.url, "up", T0, T0, 60, by=["app"], out=str(tmp_path), bearer_token="tok-SECRET",
                       basic_auth_user="ann", basic_auth_password="pw-SECRET")
        assert not any(s in str(err.value) for s in secrets)
    assert "seen" in caplog.text and not any(s in caplog.text for s in secrets)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert not any(s.encode() in written for s in secrets)


@pytest.mark.parametrize("answer, match", [
    ((200, {"Content-Type": "application/json"},
      b'{"status":"success","data":{"resultType":"vector","result":[]}}'),
     r"returned a 'vector' result from http://127\.0\.0\.1:\d+, expected a 'matrix'"),
    ((200, {"Content-Type": "text/html"}, b"<html>Grafana</html>"),
     r"did not answer with Prometheus API JSON \(HTTP 200, text/html, starting '<html>Grafana"),
    ((302, {"Location": "https://elsewhere/login"}, b""),
     r"answered HTTP 302, a redirect to 'https://elsewhere/login'"),
    ((401, {}, b"unauthorized"), r"refused the request with HTTP 401: check the bearer token"),
    # a Prometheus JSON body (Mimir, a proxy) keeps the status's hint and adds the server's words
    ((401, {"Content-Type": "application/json"}, b'{"status":"error","error":"bad token"}'),
     r"refused the request with HTTP 401: check the bearer token.*: bad token"),
    ((403, {"Content-Type": "application/json"}, b'{"status":"error","errorType":"forbidden","error":"no access"}'),
     r"refused the request with HTTP 403: check the bearer token.*: no access"),
    ((404, {"Content-Type": "application/json"}, b'{"status":"error","error":"not found"}'),
     r"HTTP 404 for http://127\.0\.0\.1:\d+/api/v1/query_range: url must be the root.*: not found"),
    ((422, {}, b'{"status":"error","errorType":"execution","error":"query processing would load too many samples"}'),
     r"HTTP 422, execution\): query processing would load too many samples\. Narrow the query"),
    # the deadline passing inside the engine is a 422 'execution', not the 503 'timeout': same hint
    ((422, {}, b'{"status":"error","errorType":"execution","error":"expanding series: context deadline exceeded"}'),
     (r"HTTP 422, execution\): expanding series: context deadline exceeded\. The query ran past the server's "
      r"query timeout \(Prometheus' --query\.timeout\)")),
])
def test_bad_answers(tmp_path, answer, match):
    with ps.FakeServer(lambda req: answer) as srv:
        with pytest.raises(IngestError, match=match):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path), retries=0)
    assert files(tmp_path) == set()


def test_transient_errors_are_retried(tmp_path, fast_retries):
    answers = iter([(503, {}, b"busy"), (502, {}, b"bad gateway")])
    with ps.FakeServer(lambda req: next(answers, None) or ps.echo_matrix(req)) as srv:
        s = prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path), retries=2)
    assert s.rows == 11 and len(srv.requests) == 3


def test_failed_chunk_leaves_nothing_behind(tmp_path, fast_retries):
    bad_start = f"{(T0 // 660 + 2) * 660:.3f}"   # the third chunk at step 60 ms (grid of 660 s)

    def respond(req):
        return (500, {}, b"disk full") if req.form["start"] == bad_start else ps.echo_matrix(req)

    with ps.FakeServer(respond) as srv:
        with pytest.raises(IngestError, match="answered HTTP 500"):
            prometheus(srv.url, "up", T0, T0 + 3000, 0.06, by=["app"], out=str(tmp_path),
                       retries=0, concurrency=1, max_points=11_000)
    assert files(tmp_path) == set()


def test_a_failed_ingest_removes_the_folders_it_made_and_only_those(tmp_path, fast_retries):
    """A failed first ingest left app=x/ (empty once its staged files were discarded), and train
    then said "No Parquet files under ..." of a dataset the failed run was to leave as it was."""
    bad_start = f"{(T0 // 660 + 2) * 660:.3f}"   # the third chunk at step 60 ms: two staged before it

    def respond(req):
        return (500, {}, b"disk full") if req.form["start"] == bad_start else ps.echo_matrix(req)

    (tmp_path / "kept" / "app=y").mkdir(parents=True)   # an empty folder made before: not the ingest's
    with ps.FakeServer(respond) as srv:
        for out in (tmp_path / "new" / "data", tmp_path / "kept"):
            with pytest.raises(IngestError, match="answered HTTP 500"):
                prometheus(srv.url, "up", T0, T0 + 3000, 0.06, by=["app", "site"], out=str(out), retries=0,
                           concurrency=1, max_points=11_000)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["app=y", "kept"]   # not new/ either


def test_chunks_run_in_parallel_within_the_concurrency_bound(tmp_path):
    lock, state, two = threading.Lock(), {"now": 0, "max": 0}, threading.Event()

    def slow(req):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            if state["now"] == 2:
                two.set()
        two.wait(30)  # not a fixed sleep: under load a second request could start after the first ended
        with lock:
            state["now"] -= 1
        return ps.echo_matrix(req)

    with ps.FakeServer(slow) as srv:
        s = prometheus(srv.url, "up", T0, T0 + 50, "1ms", by=["app"], out=str(tmp_path), concurrency=2)
    assert s.chunks == s.requests >= 5 and state["max"] == 2    # chunks of 11 s at 1 ms


def test_tls_is_verified_by_default(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl binary not installed (needed to make a test certificate)")
    server_pem, ca = ps.self_signed_cert(tmp_path)
    with ps.FakeServer(certfile=server_pem) as srv:
        with pytest.raises(IngestError, match=r"TLS error talking to https://127\.0\.0\.1:\d+: .*CERTIFICATE_VERIFY_FAILED"):
            prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path / "a"))
        assert prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path / "b"),
                          ca_file=str(ca)).rows == 2
        assert prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path / "c"),
                          verify_tls=False).rows == 2


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server with the bucket prom-bucket: its storage_options."""
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    with moto_with_bucket("prom-bucket") as srv:
        yield srv.storage_options()


def test_writes_to_s3_through_fsspec(prom, tmp_path, moto):
    fs = fsspec.filesystem("s3", **moto)
    for _ in range(2):   # the second run overwrites the same objects
        s = ingest(prom, "s3://prom-bucket/data", T0, T0 + 6 * H, "1m", storage_options=moto)
    fs.invalidate_cache()
    keys = fs.find("prom-bucket/data")
    assert "prom-bucket/data/_ingest.json" in keys and "prom-bucket/data/_ingest.lock" not in keys
    keys.remove("prom-bucket/data/_ingest.json")
    assert len(keys) == s.files and all(k.endswith(".parquet") for k in keys)
    part = ds.partitioning(pa.schema([("app", pa.string()), ("site", pa.string())]), flavor="hive")
    t = ds.dataset("prom-bucket/data", filesystem=fs, format="parquet", partitioning=part).to_table()
    assert t.num_rows == len(ps.expected(T0, T0 + 6 * H, 60)) == s.rows


def test_a_body_that_trickles_in_is_bounded_by_the_timeout(tmp_path):
    """The socket timeout bounds each read; a server that sends a byte a second must still fail
    after about `timeout` seconds, not hang."""
    import socket

    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not stop.wait(0.3):
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(IngestError, match=r"Prometheus at http://127\.0\.0\.1:\d+ did not send its whole answer "
                                              r"within 1\.5 s \(1 attempt\)\. Narrow the query"):
            prometheus(f"http://127.0.0.1:{listener.getsockname()[1]}", "up", T0, T0 + 60, 60, by=["app"],
                       out=str(tmp_path), timeout=1.5, retries=0)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - t0 < 10
    assert files(tmp_path) == set()


def test_s3_outputs_with_glob_characters_are_readable_and_a_missing_bucket_is_not_created(tmp_path, moto):
    fs = fsspec.filesystem("s3", **moto)
    fs.mkdir("prom-glob-bucket")
    part = ds.partitioning(pa.schema([("app", pa.string())]), flavor="hive")
    with ps.FakeServer(ps.echo_matrix) as srv:
        for name in ("prom*", "prom [x]", "prom?"):
            s = prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=f"s3://prom-glob-bucket/{name}",
                           storage_options=moto)
            fs.invalidate_cache()
            keys = [k for k in fs.find(f"prom-glob-bucket/{name}") if not k.endswith("/_ingest.json")]
            assert all(k.endswith(".parquet") and "/." not in k for k in keys) and len(keys) == s.files, keys
            t = ds.dataset([k for k in keys], filesystem=fs, format="parquet", partitioning=part).to_table()
            assert t.num_rows == s.rows == 11
        with pytest.raises(IngestError, match=r"The bucket 'prom-typo' of 's3://prom-typo/data' does not exist"):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out="s3://prom-typo/data",
                       storage_options=moto)
        assert len(srv.requests) == 3  # refused before asking
    fs.invalidate_cache()
    assert not fs.exists("prom-typo")


def test_an_unreachable_object_store_is_an_ingest_error(tmp_path):
    opts = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{ps.free_port()}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with ps.FakeServer(ps.echo_matrix) as srv:
        with pytest.raises(IngestError, match=r"Cannot reach the object store for 's3://prom-bucket/data': "
                                              r"EndpointConnectionError: .*Check the endpoint"):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out="s3://prom-bucket/data",
                       storage_options=opts)


def test_a_label_value_parquet_reads_as_null_is_refused(tmp_path):
    def answer(req):
        values = [[float(req.form["start"]), "1"]]
        return ps.matrix([{"metric": {"app": "x", "site": "__HIVE_DEFAULT_PARTITION__"}, "values": values},
                          {"metric": {"app": "x", "site": "ok"}, "values": values}])

    with ps.FakeServer(answer) as srv:
        with pytest.raises(IngestError, match=r"has site='__HIVE_DEFAULT_PARTITION__', the folder name Hive and "
                                              r"Arrow read as a missing value: rename that value"):
            prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app", "site"], out=str(tmp_path))
    assert files(tmp_path) == set()


def test_long_non_ascii_label_values_fit_in_a_folder_name(tmp_path):
    """pyarrow-style escaping wrote every byte of a non-ASCII character as %XX: a label value of
    30 Chinese characters (90 bytes) made a 275-byte folder name, past the 255 bytes a file name
    may have, and the ingest failed.  Folders are now named as Spark names them."""
    long = "服务" * 15 + " a/b"

    def answer(req):
        values = [[float(req.form["start"]), "1"]]
        return ps.matrix([{"metric": {"app": long, "site": "s1"}, "values": values}])

    with ps.FakeServer(answer) as srv:
        prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app", "site"], out=str(tmp_path))
    t = read(tmp_path)
    assert t["app"].to_pylist() == [long] and t["site"].to_pylist() == ["s1"]
    (folder,) = {Path(f).parts[0] for f in files(tmp_path)}
    assert folder == "app=" + "服务" * 15 + " a%2Fb"


def test_a_rerun_keeps_points_prometheus_no_longer_holds(tmp_path):
    """Parquet is where history outlives Prometheus' retention: rerunning a range after the server
    dropped its oldest samples (retention, a deletion, Thanos pruning raw data) must not delete the
    rows already committed for them.  Rows the server still holds are replaced by the fresh ones."""
    state = {"from": T0, "shift": 0.0}

    def respond(req):  # like echo_matrix, but holding data only from state["from"] on
        start, end, step = (float(req.form[k]) for k in ("start", "end", "step"))
        times = [start + i * step for i in range(int((end - start) / step) + 1)]
        values = [[t, str(t + state["shift"])] for t in times if t >= state["from"]]
        return ps.matrix([{"metric": {"__name__": "up", "app": "x", "site": "y"}, "values": values}] if values else [])

    with ps.FakeServer(respond) as srv:
        prometheus(srv.url, "up", T0, T0 + 3600, 60, by=["app"], out=str(tmp_path))
        state.update({"from": T0 + 1800, "shift": 0.5})     # older half gone, newer values revised
        s = prometheus(srv.url, "up", T0, T0 + 3600, 60, by=["app"], out=str(tmp_path))
    assert s.rows == 31
    t = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table().sort_by("ts")
    got = list(zip((v // 1000 for v in t["ts"].cast(pa.int64()).to_pylist()), t["value"].to_pylist()))
    assert got == [(x, float(x) + (0.5 if x >= T0 + 1800 else 0)) for x in range(T0, T0 + 3601, 60)]
    assert set(t["site"].to_pylist()) == {"y"} and set(t["metric"].to_pylist()) == {"up"}


def test_a_rerun_after_a_series_gained_a_label_does_not_store_it_twice(tmp_path):
    """Querying through Thanos or Mimir (external labels), or after a relabelling, returns the same
    series with one more label: the rerun kept every earlier row beside its fresh copy (2 rows a
    time), and train then skipped every group for its repeated timestamps."""
    state = {"labels": {"__name__": "up", "app": "x", "site": "y"}}

    def respond(req):
        start, end, step = (float(req.form[k]) for k in ("start", "end", "step"))
        values = [[start + i * step, "1"] for i in range(int((end - start) / step) + 1)]
        return ps.matrix([{"metric": dict(state["labels"]), "values": values}])

    with ps.FakeServer(respond) as srv:
        prometheus(srv.url, "up", T0, T0 + 3600, 60, by=["app"], out=str(tmp_path))
        state["labels"]["replica"] = "a"
        s = prometheus(srv.url, "up", T0, T0 + 3600, 60, by=["app"], out=str(tmp_path))
    assert s.rows == 61
    t = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert t.num_rows == 61 and set(t["replica"].to_pylist()) == {"a"}
    assert len(set(t["ts"].to_pylist())) == 61


def test_a_server_that_answers_too_slowly_is_not_called_unreachable(tmp_path):
    """A heavy query that Prometheus is still evaluating when the timeout passes is a timeout to
    raise or a query to narrow, not a server to look for: the message must say so."""
    def respond(req):
        time.sleep(2)
        return ps.echo_matrix(req)

    with ps.FakeServer(respond) as srv:
        with pytest.raises(IngestError, match=r"did not answer within 0\.5 s \(1 attempt\)\. Narrow the query"
                                              r".*raise timeout / --timeout") as err:
            prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path), timeout=0.5, retries=0)
    assert "Could not reach" not in str(err.value)
    assert files(tmp_path) == set()


@pytest.mark.parametrize("label", ["value", "ts", "metric"])
def test_a_label_named_like_an_output_column_is_named_and_the_suggested_query_works(prom, tmp_path, label):
    """A label called value or ts (or metric, next to __name__) would collide with a column of the
    output. The error names the label and gives a query that renames it; running that query works
    (label_replace alone copies a label and keeps the original, so 'use label_replace()' did not)."""
    query = f'label_replace(mf_load, "{label}", "$1", "instance", "(.*)")'
    with pytest.raises(IngestError, match=f"the label {label!r}, which would clash with the output column") as err:
        prometheus(prom, query, T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    assert files(tmp_path) == set()
    suggested = str(err.value).split("Rename it in the query: ")[1].rstrip(".").replace("<query>", query)
    prometheus(prom, suggested, T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    t = read(tmp_path)
    assert sorted(t.column_names) == sorted(["app", "site", "instance", "metric", "ts", "value", f"{label}_label"])
    assert set(t["metric"].to_pylist()) == {"mf_load"}
    assert sorted(set(t[f"{label}_label"].to_pylist())) == ["a", "b"]
    assert len(t) == len(ps.expected(T0, T0 + H, 60))


def test_a_by_value_too_long_for_a_folder_name_is_named(prom, tmp_path, caplog):
    """Label values can be any length; a folder name cannot pass 255 bytes on local disks. The
    error names the label and the series, not 'check that --out is writable'."""
    long = "x" * 300
    query = f'label_replace(mf_load, "site", "{long}$1", "site", "(.*)")'
    with pytest.raises(IngestError, match=r"The by label 'site' has a value of 30\d characters \('xxx.*in series "
                                          r"mf_load\{app=.*over the 255 bytes a folder name may have.*--by") as err:
        prometheus(prom, query, T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    assert "writable" not in str(err.value) and long not in str(err.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert files(tmp_path) == set()


@pytest.mark.parametrize("before, after", [(["app", "site"], ["app"]), (["app"], ["app", "site"]),
                                           ([], ["app"]), (["app", "site"], ["site", "app"])])
def test_another_by_into_the_same_dataset_is_refused(prom, tmp_path, before, after):
    """An ingest with another --by into the same --out wrote every point a second time in a
    second folder layout (app=x/ next to app=x/site=y/), reported success, and the dataset could
    no longer be read by train.  The message shows both definitions and offers --overwrite, as
    for another query or step (it offered neither)."""
    prometheus(prom, "mf_load", T0, T0 + H, 60, by=before, out=str(tmp_path))
    names = files(tmp_path)
    b, a = re.escape(repr(before)), re.escape(repr(after))
    with pytest.raises(IngestError, match=rf"already holds a dataset partitioned by {b}.*this ingest partitions by "
                                          rf"{a}: .* Its _ingest\.json records the query 'mf_load' at step 60s by {b}; "
                                          rf"this ingest asks for the query 'mf_load' at step 60s by {a}\. Use the "
                                          r"same by / --by as before, .*or pass overwrite=True / --overwrite"):
        prometheus(prom, "mf_load", T0, T0 + 2 * H, 60, by=after, out=str(tmp_path))
    assert files(tmp_path) == names
    prometheus(prom, "mf_load", T0, T0 + 2 * H, 60, by=before, out=str(tmp_path))  # the same by still appends
    s = prometheus(prom, "mf_load", T0, T0 + H, 60, by=after, out=str(tmp_path), overwrite=True)  # starts over
    assert read(tmp_path, by=after).num_rows == s.rows == len(ps.expected(T0, T0 + H, 60))


def test_another_by_into_an_s3_dataset_is_refused(prom, tmp_path, moto):
    out = "s3://prom-bucket/ds"
    prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app", "site"], out=out, storage_options=moto)
    with pytest.raises(IngestError, match=r"already holds a dataset partitioned by \['app', 'site'\]"):
        prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app"], out=out, storage_options=moto)


def test_another_by_is_refused_when_a_failed_run_left_an_empty_folder_first_in_line(prom, tmp_path):
    # the layout walk followed the first folder by name: an empty app=0/ that a failed run made
    # for a value it saw showed no data, another --by was taken, and every point was stored twice
    prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app"], out=str(tmp_path))
    (tmp_path / "app=0").mkdir()
    names = files(tmp_path)
    with pytest.raises(IngestError, match=r"already holds a dataset partitioned by \['app'\]"):
        prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    assert files(tmp_path) == names
    # an empty folder deeper down (app=0/site=s1/) too
    (tmp_path / "app=0" / "site=s1").mkdir()
    with pytest.raises(IngestError, match=r"already holds a dataset partitioned by \['app'\]"):
        prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))
    # with no data file left to show the layout, the recorded definition says it
    for p in tmp_path.glob("app=*/*.parquet"):
        p.unlink()
    with pytest.raises(IngestError, match=r"partitioned by \['app'\] \(its _ingest.json records it\), but this "
                                          r"ingest partitions by \['app', 'site'\]"):
        prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app", "site"], out=str(tmp_path))


def test_an_ingest_with_no_by_into_s3_writes_at_the_root_and_another_by_is_refused(prom, moto):
    # "prefix//file": a key with an empty folder name, which the layout walk did not see (another
    # --by was taken: every point twice) and --overwrite failed on (IndexError)
    out = "s3://prom-bucket/noby"
    first = prometheus(prom, "mf_load", T0, T0 + H, 60, by=[], out=out, storage_options=moto)
    fs = fsspec.filesystem("s3", **moto)
    keys = fs.find("prom-bucket/noby")
    assert keys and not [k for k in keys if "//" in k] and any(k.endswith(".parquet") for k in keys)
    with pytest.raises(IngestError, match=r"partitioned by \[\].* but this ingest partitions by \['app'\]"):
        prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app"], out=out, storage_options=moto)
    again = prometheus(prom, "mf_load", T0, T0 + H, 60, by=[], out=out, storage_options=moto, overwrite=True)
    assert again.rows == first.rows and sorted(fs.find("prom-bucket/noby")) == sorted(keys)
    # a dataset an earlier version wrote under "noby//": a rerun merges into its files there (it wrote
    # a second copy of each beside them at the root, every point then twice)
    for k in [k for k in keys if k.endswith(".parquet")]:
        fs.mv(k, k.replace("noby/", "noby//"))
    legacy = sorted(fs.find("prom-bucket/noby"))
    prometheus(prom, "mf_load", T0, T0 + H, 60, by=[], out=out, storage_options=moto)
    assert sorted(fs.find("prom-bucket/noby")) == legacy
    assert sum(pq.read_table(fs.open(k, "rb")).num_rows for k in legacy if k.endswith(".parquet")) == first.rows


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_an_ingest_interrupted_stops_fetching_and_leaves_nothing_staged(tmp_path, sig, code, said):
    # Ctrl-C (or SIGTERM) left the pool to fetch every chunk still queued, 21 of 21 here, for as
    # long as they took, holding the folder's lock, and left their staged files behind; and the
    # partition folders (app=x/) a first ingest made stayed, empty, so train said "No Parquet files"
    served = []

    def slow(req):
        served.append(time.monotonic())
        time.sleep(0.3)
        return ps.echo_matrix(req)

    with ps.FakeServer(slow) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "modelfactory", "ingest", "prometheus", "--url", srv.url,
                                 "--query", "up", "--start", "0", "--end", "220000", "--step", "1", "--by", "app",
                                 "--out", str(tmp_path / "out"), "--concurrency", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(served) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        asked = len(served)
    assert proc.returncode == code and err.strip() == f"error: {said}; nothing was committed", err
    assert asked <= 3  # the request under way, and none after it
    assert not (tmp_path / "out").exists()  # no staged file, no lock, no folder: as it was before


def test_a_failing_chunk_stops_the_others_between_their_requests(tmp_path, monkeypatch):
    # the chunks still running went on with every request and retry they had, for as long as
    # those took, before the first one's error was reported
    monkeypatch.setattr(promod, "_BACKOFF_S", 1.0)
    first = f"{T0:.3f}"

    def respond(req):
        if req.form["start"] == first:
            return 400, {}, b'{"status":"error","errorType":"bad_data","error":"boom"}'
        time.sleep(0.2)
        return 503, {}, b"busy"  # the others: retried, with a back-off of 1 s, 2 s, 4 s

    started = time.monotonic()
    with ps.FakeServer(respond) as srv:
        with pytest.raises(IngestError, match="bad_data"):
            prometheus(srv.url, "up", T0, T0 + 3000, 0.06, by=["app"], out=str(tmp_path), retries=3,
                       concurrency=3, max_points=11_000)
        asked = len(srv.requests)
    assert time.monotonic() - started < 5 and asked <= 4, (asked, time.monotonic() - started)
    assert files(tmp_path) == set()


def test_empty_folders_left_by_a_failed_run_do_not_fix_the_layout(prom, tmp_path):
    (tmp_path / "app=shop" / "site=eu").mkdir(parents=True)
    s = prometheus(prom, "mf_load", T0, T0 + H, 60, by=["app"], out=str(tmp_path))
    assert s.rows == len(ps.expected(T0, T0 + H, 60))


@pytest.mark.parametrize("query", ['label_replace(mf_load, "site", "x", "", "")',
                                   'mf_load + on(app) mf_load'])
def test_series_that_collide_get_a_hint_about_labels_not_about_size(prom, tmp_path, query):
    """Prometheus answers 422 'execution' both for a query too big to evaluate and for one whose
    series collide; the second is not fixed by narrowing the query or lowering --max-points."""
    with pytest.raises(IngestError, match=r"\(HTTP 422, execution\): .*(same labelset|many-to-many).*"
                                          r"Two or more series end up with the same labels") as err:
        prometheus(prom, query, T0, T0 + H, 60, by=["app"], out=str(tmp_path))
    assert "max-points" not in str(err.value)


def test_a_query_prometheus_timed_out_is_not_retried(tmp_path, fast_retries):
    """Prometheus answers HTTP 503 with errorType 'timeout' when a query runs past its
    --query.timeout (2 minutes by default). Sending the same query again only repeated the wait
    and the load: 4 attempts, 8 minutes, before the error that says to narrow the query.
    Whether the deadline passes in the query queue (503 'timeout') or inside the engine
    (422 'execution', "context deadline exceeded") depends on timing: both get the same hint."""
    if not ps.have_prometheus():
        pytest.skip("prometheus/promtool binaries not installed (apt-get install prometheus)")
    (tmp_path / "server").mkdir()
    server = ps.start_prometheus(tmp_path / "server", "--query.timeout=1ms")
    try:
        with pytest.raises(IngestError, match=r"\(HTTP (503, timeout\): query timed out|422, execution\): .*context "
                                              r"deadline exceeded).*ran past the server's query timeout.*"
                                              r"narrow the query"):
            prometheus(server.url, "quantile_over_time(0.5, mf_load[1d])", T0, T0 + 24 * H, 60, by=["app"],
                       out=str(tmp_path / "out"), retries=3, concurrency=1)
        assert ps.query_range_requests(server.url) == 1
    finally:
        server.stop()


def test_a_read_timeout_is_not_retried(tmp_path, fast_retries):
    """A server that takes the request and does not answer in time was asked again, `retries`
    times: a query too heavy to answer within the timeout runs out of time again, so the run took
    (retries + 1) x timeout, loaded Prometheus as often, and then said to narrow the query."""
    release = threading.Event()

    def never(req):  # takes the request and answers only once the test is over
        release.wait(30)
        return ps.echo_matrix(req)

    try:
        with ps.FakeServer(never) as srv:
            with pytest.raises(IngestError, match=r"did not answer within 0\.5 s \(1 attempt\)\. Narrow the query, "
                                                  r"lower max_points.*raise timeout / --timeout; a timeout is not "
                                                  r"retried") as err:
                prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path), timeout=0.5, retries=3)
            release.set()
        assert len(srv.requests) == 1
    finally:
        release.set()
    assert "Could not reach" not in str(err.value) and files(tmp_path) == set()


def test_a_stopped_prometheus_times_out_once(prom_server, tmp_path, fast_retries):
    """The real server, stopped (SIGSTOP): the kernel still accepts the connection and takes the
    request, and no answer comes, as from a Prometheus busy with a huge query."""
    os.kill(prom_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(IngestError, match=r"Prometheus at http://127\.0\.0\.1:\d+ did not answer within 1 s "
                                              r"\(1 attempt\)\. Narrow the query"):
            ingest(prom_server.url, tmp_path, T0, T0 + H, 60, timeout=1, retries=2, concurrency=1)
    finally:
        os.kill(prom_server.proc.pid, signal.SIGCONT)
    assert files(tmp_path) == set()


def test_a_gateway_timeout_is_not_retried(tmp_path, fast_retries):
    """HTTP 504 is a proxy (nginx, a load balancer) that gave up waiting for Prometheus: the same
    query keeps Prometheus as long again, like a read timeout."""
    with ps.FakeServer(lambda req: (504, {}, b"<html>504 Gateway Time-out</html>")) as srv:
        with pytest.raises(IngestError, match=r"answered HTTP 504 \(Gateway Timeout, 1 attempt\): a proxy in front "
                                              r"of Prometheus gave up.*Narrow the query.*raise the proxy's timeout"):
            prometheus(srv.url, "up", T0, T0 + 60, 60, by=["app"], out=str(tmp_path), retries=3)
    assert len(srv.requests) == 1


def test_a_dropped_connection_is_still_retried(tmp_path, fast_retries):
    """A connection closed before any answer (a proxy or Prometheus restarting) is transient."""
    answers = iter([None, None])
    with ps.FakeServer(lambda req: next(answers, ps.echo_matrix(req))) as srv:
        s = prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path), retries=2)
    assert s.rows == 11 and len(srv.requests) == 3


# -- one folder, one dataset: a changed query or step is refused ------------------------------


def offset_rows(first, last):
    """rows() of `mf_load offset 1m` at step 1m: each point holds the sample of a minute before."""
    return sorted((*r[:4], r[4] + 60_000, r[5]) for r in ps.expected(first - 60, last - 60, 60))


def test_another_query_or_step_into_the_same_folder_is_refused(prom, tmp_path):
    """A nightly ingest rerun with an edited query (or step) wrote a second set of files beside
    the first ones (their names hash the query and the step): the dataset then held both
    definitions, read as one, every time twice.  It is refused before any query, naming the
    folder and both definitions; overwrite starts the dataset over."""
    ingest(prom, tmp_path, T0 + H, T0 + 2 * H, "1m")
    names, asked = files(tmp_path), ps.query_range_requests(prom)
    with pytest.raises(IngestError, match=rf"out='{re.escape(str(tmp_path))}' holds the dataset of another query: its "
                                          r"_ingest\.json records the query 'mf_load' at step 60s, and this ingest "
                                          r"asks for the query 'mf_load offset 1m' at step 60s\..*Ingest into "
                                          r"another out / --out, or pass overwrite=True / --overwrite"):
        prometheus(prom, "mf_load offset 1m", T0 + H, T0 + 2 * H, "1m", by=["app", "site"], out=str(tmp_path))
    with pytest.raises(IngestError, match=r"holds the dataset of another step: .*the query 'mf_load' at step 60s, "
                                          r"and this ingest asks for the query 'mf_load' at step 300s"):
        ingest(prom, tmp_path, T0, T0 + H, "5m")
    assert files(tmp_path) == names and ps.query_range_requests(prom) == asked
    s = prometheus(prom, "mf_load offset 1m", T0 + H, T0 + 2 * H, "1m", by=["app", "site"], out=str(tmp_path),
                   overwrite=True)
    assert s.rows == len(offset_rows(T0 + H, T0 + 2 * H)) and not files(tmp_path) & names
    assert rows(tmp_path) == offset_rows(T0 + H, T0 + 2 * H)   # the earlier query's rows are gone
    assert definition(tmp_path)["query"] == "mf_load offset 1m"
    ingest_again = prometheus(prom, "mf_load offset 1m", T0 + 60, T0 + H, "1m", by=["app", "site"], out=str(tmp_path))
    assert ingest_again.rows and rows(tmp_path) == offset_rows(T0 + 60, T0 + 2 * H)


def test_the_cli_refuses_another_query_in_one_line_and_overwrite_starts_over(prom, tmp_path):
    def cli(query, *extra):
        return subprocess.run([sys.executable, "-m", "modelfactory", "ingest", "prometheus", "--url", prom,
                               "--query", query, "--start", str(T0 + 60), "--end", str(T0 + H), "--step", "1m",
                               "--by", "app,site", "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=300)

    assert cli("mf_load").returncode == 0
    refused = cli("mf_load offset 1m")
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: out=") and "the query 'mf_load'" in line and "--overwrite" in line
    done = cli("mf_load offset 1m", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert rows(tmp_path) == offset_rows(T0 + 60, T0 + H)


def test_a_dataset_written_before_the_definition_was_recorded_is_judged_by_its_file_names(prom, tmp_path):
    """Datasets ingested by an earlier modelfactory have no _ingest.json; their file names (a hash
    of query, step and chunk start) tell whether the same query and step wrote them."""
    ingest(prom, tmp_path, T0, T0 + H, 5)   # 5 s: chunks of 55,000 s, not whole days
    (tmp_path / DEFINITION).unlink(missing_ok=True)   # (an earlier modelfactory wrote none)
    names = files(tmp_path)
    for query, step in (("mf_load offset 1m", 5), ("mf_load", 10)):
        with pytest.raises(IngestError, match=r"holds the dataset of another query or step: the name of its file "
                                              r"app=.+?\.parquet is not one this query and step give"):
            prometheus(prom, query, T0, T0 + H, step, by=["app", "site"], out=str(tmp_path))
    assert files(tmp_path) == names and not (tmp_path / DEFINITION).exists()
    ingest(prom, tmp_path, T0 + H, T0 + 2 * H, 5)   # the same query and step: appended, and now recorded
    assert rows(tmp_path) == sorted(ps.expected(T0, T0 + 2 * H, 5))
    assert definition(tmp_path)["step_ms"] == 5000


def test_another_query_into_an_s3_dataset_is_refused_and_overwrite_replaces_it(prom, moto):
    out, fs = "s3://prom-bucket/redefined", fsspec.filesystem("s3", **moto)
    ingest(prom, out, T0, T0 + H, "1m", storage_options=moto)
    with pytest.raises(IngestError, match=r"out='s3://prom-bucket/redefined' holds the dataset of another query"):
        prometheus(prom, "mf_load offset 1m", T0, T0 + H, "1m", by=["app", "site"], out=out, storage_options=moto)
    s = prometheus(prom, "mf_load offset 1m", T0 + 60, T0 + H, "1m", by=["app", "site"], out=out,
                   storage_options=moto, overwrite=True)
    fs.invalidate_cache()
    keys = fs.find("prom-bucket/redefined")
    assert len(keys) == s.files + 1 and "prom-bucket/redefined/_ingest.json" in keys
    part = ds.partitioning(pa.schema([("app", pa.string()), ("site", pa.string())]), flavor="hive")
    t = ds.dataset("prom-bucket/redefined", filesystem=fs, format="parquet", partitioning=part).to_table()
    assert t.num_rows == s.rows == len(offset_rows(T0 + 60, T0 + H))


# -- one ingest at a time per folder ---------------------------------------------------------


class Gate:
    """A FakeServer answer that holds the first request until ``open`` is set: an ingest caught
    in the middle of its run.  Later requests are answered at once."""

    def __init__(self) -> None:
        self.asked, self.open, self._lock, self.count = threading.Event(), threading.Event(), threading.Lock(), 0

    def __call__(self, req):
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            self.asked.set()
            self.open.wait(120)
        return ps.echo_matrix(req)


def cli_ingest(url, out):
    return [sys.executable, "-m", "modelfactory", "ingest", "prometheus", "--url", url, "--query", "up",
            "--start", str(T0), "--end", str(T0 + 600), "--step", "60", "--by", "app", "--out", str(out)]


def test_a_second_ingest_into_a_folder_in_use_is_refused(tmp_path):
    """Two ingests into one folder both read a chunk's file, each merged its own rows into it, and
    the second rename dropped the first one's rows.  The second (a real process) now refuses, in
    one line naming the folder and the first one's pid and host, before asking Prometheus."""
    gate = Gate()
    with ps.FakeServer(gate) as srv:
        first = subprocess.Popen(cli_ingest(srv.url, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            assert gate.asked.wait(120), first.communicate()
            second = subprocess.run(cli_ingest(srv.url, tmp_path), capture_output=True, text=True, timeout=300)
        finally:
            gate.open.set()
            out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and second.stdout == ""
    (line,) = second.stderr.strip().splitlines()
    assert re.match(rf"error: Another ingest is writing to '{re.escape(str(tmp_path))}': \S+/_ingest\.lock is held "
                    rf"by pid {first.pid} on host '{re.escape(socket.gethostname())}' \(started \S+Z\).*Wait for it "
                    r"to finish and run again", line), line
    assert gate.count == 1   # the second asked nothing
    assert "Ingested 1 series, 11 rows" in out and not (tmp_path / "_ingest.lock").exists()


def test_a_crashed_ingest_does_not_block_the_next_one(tmp_path, caplog):
    """An ingest killed in the middle (SIGKILL: no cleanup) leaves its lock; its process is gone,
    so the next ingest on this host takes the lock over, with a warning."""
    gate = Gate()
    with ps.FakeServer(gate) as srv:
        first = subprocess.Popen(cli_ingest(srv.url, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert gate.asked.wait(120)
            first.kill()
            first.wait(60)
        finally:
            gate.open.set()
        assert (tmp_path / "_ingest.lock").exists()
        s = prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path))
    assert s.rows == 11 and not (tmp_path / "_ingest.lock").exists()
    assert f"its process {first.pid} is not running on this host any more" in caplog.text


def test_a_lock_from_another_host_is_taken_over_only_once_stale(tmp_path, caplog):
    """A pid means nothing on another host: its lock goes stale when its heartbeat stops."""
    lock = tmp_path / "_ingest.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "t", "started": "2026-01-01T00:00:00Z"}))
    with ps.FakeServer() as srv:
        with pytest.raises(IngestError, match=r"_ingest\.lock is held by pid 1 on host 'elsewhere'"):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path))
        assert srv.requests == [] and lock.exists()
        old = time.time() - sys.modules["modelfactory.ingest._lock"].STALE_S - 60
        os.utime(lock, (old, old))
        assert prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path)).rows == 11
    assert "has had no heartbeat for" in caplog.text and not lock.exists()


def test_an_ingest_whose_lock_was_taken_over_commits_nothing(tmp_path):
    """If another ingest took the lock over meanwhile (this one looked dead: a suspended machine),
    both would merge into the same files: the one that lost its lock commits nothing."""
    lock = tmp_path / "_ingest.lock"

    def respond(req):
        lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "token": "other", "started": "now"}))
        return ps.echo_matrix(req)

    with ps.FakeServer(respond) as srv:
        with pytest.raises(IngestError, match=r"The lock \S+_ingest\.lock of this ingest is now held by pid 4242 on "
                                              r"host 'elsewhere'.*Nothing was committed"):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path))
    assert files(tmp_path) == {"_ingest.lock"} and "other" in lock.read_text()   # not ours to remove


def test_the_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    """A long ingest refreshes its lock, so other hosts never take it for a crashed one."""
    lockmod = sys.modules["modelfactory.ingest._lock"]
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 0.05)
    lock, seen = tmp_path / "_ingest.lock", {}

    def respond(req):  # age the lock, then wait for the heartbeat to make it fresh again
        old = time.time() - lockmod.STALE_S - 60
        os.utime(lock, (old, old))
        deadline = time.monotonic() + 60
        while lock.stat().st_mtime == old and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["age"] = time.time() - lock.stat().st_mtime
        return ps.echo_matrix(req)

    with ps.FakeServer(respond) as srv:
        prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path))
    assert seen["age"] < lockmod.STALE_S


def test_two_ingests_into_one_s3_folder_at_once(tmp_path, moto):
    """The lock on an object store is a conditional put (If-None-Match: *)."""
    script = ("import json, sys\nfrom modelfactory.ingest import prometheus\n"
              "print(prometheus(**json.loads(sys.argv[1])))")
    gate = Gate()
    with ps.FakeServer(gate) as srv:
        kw = {"url": srv.url, "query": "up", "start": T0, "end": T0 + 600, "step": 60, "by": ["app"],
              "out": "s3://prom-bucket/two", "storage_options": moto}
        first = subprocess.Popen([sys.executable, "-c", script, json.dumps(kw)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert gate.asked.wait(120), first.communicate()
            second = subprocess.run([sys.executable, "-c", script, json.dumps(kw)], capture_output=True, text=True,
                                    timeout=300)
        finally:
            gate.open.set()
            out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1 and re.search(
        rf"IngestError: Another ingest is writing to 's3://prom-bucket/two': s3://prom-bucket/two/_ingest\.lock "
        rf"is held by pid {first.pid} on host", second.stderr), second.stderr
    assert gate.count == 1 and "Ingested 1 series, 11 rows" in out
    fs = fsspec.filesystem("s3", **moto)
    fs.invalidate_cache()
    assert not fs.exists("prom-bucket/two/_ingest.lock")


class _Clock:
    """This host's clock, ``skew`` seconds off (the lock module's ``time``; sleeps are real)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def sleep(self, s: float) -> None:
        time.sleep(s)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_host_whose_clock_runs_ahead_does_not_take_a_live_lock_over(tmp_path, monkeypatch, request, where):
    """A lock's age is its modification time as the store stamped it (S3's clock, an NFS server's)
    against the store's clock, never this host's: a host ten minutes ahead took every fresh lock
    for a stale one, and two ingests merged into the same files."""
    lockmod = sys.modules["modelfactory.ingest._lock"]
    if where == "s3":
        opts = request.getfixturevalue("moto")
        fs, root = fsspec.filesystem("s3", **opts), f"prom-bucket/skew-{os.getpid()}"
        out = f"s3://{root}"
    else:
        opts, fs, root, out = {}, fsspec.filesystem("file"), str(tmp_path), str(tmp_path)
    fs.pipe_file(f"{root}/{lockmod.LOCK_NAME}", json.dumps(   # a live ingest on another host, fresh
        {"pid": 1, "host": "elsewhere", "token": "theirs", "started": "2026-01-01T00:00:00Z"}).encode())
    monkeypatch.setattr(lockmod, "time", _Clock(lockmod.STALE_S + 300))
    with ps.FakeServer() as srv:
        with pytest.raises(IngestError, match=r"_ingest\.lock is held by pid 1 on host 'elsewhere' \(started \S+\), "
                                              r"last heartbeat \d s ago"):
            prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=out, storage_options=opts or None)
        assert srv.requests == []
    fs.invalidate_cache()
    assert b"theirs" in fs.cat_file(f"{root}/{lockmod.LOCK_NAME}")


def test_an_ingest_killed_while_taking_a_lock_over_does_not_block_the_next_one(tmp_path, caplog):
    """Killed (SIGKILL) between creating _ingest.lock.break and removing it, an ingest left both
    files of a dead process: the next one on this host takes them over at once, as it does a lock."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(60)
    info = {"pid": dead.pid, "host": socket.gethostname(), "token": "dead", "started": "2026-01-01T00:00:00Z"}
    (tmp_path / "_ingest.lock").write_text(json.dumps(info))
    (tmp_path / "_ingest.lock.break").write_text(json.dumps(info))
    with ps.FakeServer() as srv:
        assert prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path)).rows == 11
    assert not (tmp_path / "_ingest.lock").exists() and not (tmp_path / "_ingest.lock.break").exists()


def test_a_definition_cut_short_is_judged_by_the_file_names_and_written_again(prom, tmp_path, caplog):
    """An _ingest.json cut short (a crash while it was written) said 'pass --overwrite to start the
    dataset over': deleting the history (maybe past Prometheus' retention) to fix a file that the
    file names stand in for.  It is judged as a missing one, and written again."""
    ingest(prom, tmp_path, T0, T0 + H, 5)
    (tmp_path / DEFINITION).write_text('{"source": "prometheus", "query": "mf_lo')
    names = files(tmp_path)
    # (it said that an earlier modelfactory wrote the files and recorded no definition)
    with pytest.raises(IngestError, match=r"holds the dataset of another query or step: the name of its file .+? is "
                                          r"not one this query and step give, and its _ingest\.json, which records "
                                          r"them, is corrupt \(JSONDecodeError: .*; cut short by a crash, or edited\)"
                                          r", so the file names stand in for it, and this ingest asks") as err:
        prometheus(prom, "mf_load", T0, T0 + H, 10, by=["app", "site"], out=str(tmp_path))
    assert "earlier modelfactory" not in str(err.value) and "(at " not in str(err.value) + caplog.text
    assert files(tmp_path) == names
    ingest(prom, tmp_path, T0 + H, T0 + 2 * H, 5)   # the same query and step: appended, the definition recorded
    assert rows(tmp_path) == sorted(ps.expected(T0, T0 + 2 * H, 5))
    assert definition(tmp_path)["step_ms"] == 5000
    assert f"{DEFINITION} cannot be read" in caplog.text


# -- what a killed ingest leaves behind ------------------------------------------------------

_STAGED = re.compile(r"(^|/)\.\d{8}T\d{6}Z-[0-9a-f]{16}\.parquet\.[0-9a-f]{32}\.tmp$")


def _listing(fs, root) -> list[str]:
    fs.invalidate_cache()
    return sorted(p[len(root) + 1:] for p in fs.find(root))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_temporary_files_of_a_killed_ingest_are_removed_by_the_next_one(tmp_path, request, where):
    """An ingest killed (SIGKILL) after staging some chunks left their hidden .tmp files in the
    dataset folder for ever: every later ingest took its lock over and went on, never looking at
    them.  The next lock holder removes them (only a lock holder writes there)."""
    if where == "s3":
        opts = request.getfixturevalue("moto")
        fs, root = fsspec.filesystem("s3", **opts), f"prom-bucket/killed-{os.getpid()}"
        out = f"s3://{root}"
    else:
        opts, fs, root, out = None, fsspec.filesystem("file"), str(tmp_path / "data"), str(tmp_path / "data")
    script = ("import json, sys\nfrom modelfactory.ingest import prometheus\n"
              "prometheus(**json.loads(sys.argv[1]))")
    chunks = len(promod.plan_chunks(T0 * 1000, (T0 + 30) * 1000, 1))   # of 11 s: one held, the others staged
    kw = {"query": "up", "start": T0, "end": T0 + 30, "step": "1ms", "by": ["app"], "out": out,
          "storage_options": opts, "concurrency": chunks}
    gate = Gate()
    with ps.FakeServer(gate) as srv:
        killed = subprocess.Popen([sys.executable, "-c", script, json.dumps({"url": srv.url, **kw})],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert gate.asked.wait(120), killed.communicate()
            deadline = time.monotonic() + 120   # the other chunks stage their files meanwhile
            while time.monotonic() < deadline and sum(map(bool, map(_STAGED.search, _listing(fs, root)))) < chunks - 1:
                time.sleep(0.05)
            killed.kill()
            killed.wait(60)
        finally:
            gate.open.set()
        left = _listing(fs, root)
        assert "_ingest.lock" in left and [bool(_STAGED.search(r)) for r in left].count(True) == chunks - 1, left
        if where == "local":   # as a kill while _ingest.json was being written leaves it
            Path(root, f"._ingest.json.{'0' * 32}.tmp").write_text('{"source": "prom')
        s = prometheus(srv.url, "up", T0, T0 + 30, "1ms", by=["app"], out=out, storage_options=opts)
    after = _listing(fs, root)
    assert s.rows == 30_001 and s.files == chunks
    assert after[0] == "_ingest.json" and len(after) == 1 + chunks, after   # no .tmp, no lock: the data
    assert all(re.fullmatch(r"app=x/\d{8}T\d{6}Z-[0-9a-f]{16}\.parquet", r) for r in after[1:]), after


def test_overwrite_refuses_parquet_files_no_ingest_wrote_and_names_them(prom, tmp_path):
    """--overwrite deleted the files ingests wrote and left any other .parquet file in the folder,
    to be read beside the new dataset's rows as one dataset.  It now refuses before any query,
    naming them; once they are moved away, it starts the dataset over."""
    ingest(prom, tmp_path, T0 + H, T0 + 2 * H, "1m")
    ours = sorted(files(tmp_path))
    stray = tmp_path / "app=shop" / "site=eu" / "part-0.parquet"
    shutil.copy(tmp_path / ours[0], stray)
    asked = ps.query_range_requests(prom)
    with pytest.raises(IngestError, match=rf"out='{re.escape(str(tmp_path))}' holds 1 Parquet file\(s\) that no "
                                          rf"ingest wrote: {re.escape(str(stray))}\. Overwrite deletes only"):
        prometheus(prom, "mf_load offset 1m", T0 + H, T0 + 2 * H, "1m", by=["app", "site"], out=str(tmp_path),
                   overwrite=True)
    assert sorted(files(tmp_path)) == sorted(ours + [str(stray.relative_to(tmp_path))])
    assert ps.query_range_requests(prom) == asked and definition(tmp_path)["query"] == "mf_load"
    stray.unlink()
    prometheus(prom, "mf_load offset 1m", T0 + H, T0 + 2 * H, "1m", by=["app", "site"], out=str(tmp_path),
               overwrite=True)
    assert rows(tmp_path) == offset_rows(T0 + H, T0 + 2 * H)


def test_a_plain_ingest_refuses_parquet_files_no_ingest_wrote_and_changes_nothing(tmp_path):
    """Only --overwrite looked for Parquet files that no ingest wrote: a plain ingest took the folder
    over (recorded its definition there) and wrote its rows beside them, and train then failed every
    group found in both, its times repeated."""
    stray = tmp_path / "app=x" / "part-0.parquet"
    stray.parent.mkdir()
    pq.write_table(pa.table({"ts": pa.array([T0 * 1000], pa.timestamp("ms", tz="UTC")), "value": [1.0]}), stray)
    refused = pytest.raises(IngestError, match=rf"out='{re.escape(str(tmp_path))}' holds 1 Parquet file\(s\) that no "
                                               rf"ingest wrote: {re.escape(str(stray))}\. An ingest adds its own files "
                                               r".*Nothing was written; ingest into another out / --out")
    with ps.FakeServer() as srv, refused:
        prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=str(tmp_path))
    assert not srv.requests and files(tmp_path) == {"app=x/part-0.parquet"}
    assert not (tmp_path / DEFINITION).exists()


def test_an_ingest_into_a_model_store_is_refused_and_writes_nothing(tmp_path):
    """ingest --out pointed at a model store (by a slip: --out models for --store models) wrote its
    lock, partition folders and _ingest.json among the store's runs."""
    store = tmp_path / "models"
    (store / "runs" / "r1" / "parts").mkdir(parents=True)
    (store / "runs" / "r1" / "manifest.json").write_text("{}")
    (store / "runs" / "r1" / "parts" / "u0.parquet").write_bytes(b"PAR1")
    (store / "LATEST").write_text("r1")
    before = files(store)
    with ps.FakeServer() as srv:
        for out, how in ((store, "is"), (store / "runs" / "r1", "lies inside")):
            with pytest.raises(IngestError, match=rf"out='{re.escape(str(out))}' {how} the model store "
                                                  rf"'{re.escape(str(store))}'.*Nothing was written; ingest into a "
                                                  r"folder of its own"):
                prometheus(srv.url, "up", T0, T0 + 600, 60, by=["app"], out=out)
    assert not srv.requests and files(store) == before and not (store / DEFINITION).exists()


def test_a_query_reformatted_outside_its_strings_is_the_same_dataset_and_names_the_same_files(prom, tmp_path):
    """A nightly query reformatted (line breaks, spaces) was refused as another query and needed
    --overwrite, which deletes history Prometheus may no longer hold.  Whitespace outside string
    literals does not change a query: it is accepted and writes the files the recorded text named
    (their names hash the query), so no row is stored twice.  Inside a quoted label value a space
    is a real change, and is refused."""
    recorded = 'sum by (app, site, instance, __name__) (mf_load{app=~"shop|search", site!="eu/west 1"})'
    prometheus(prom, recorded, T0, T0 + H, "1m", by=["app", "site"], out=str(tmp_path))
    names = files(tmp_path)
    again = 'sum by(app,site,instance,__name__)(\n    mf_load{ app =~ "shop|search" , site != "eu/west 1" }\n)'
    s = prometheus(prom, again, T0 + 60, T0 + 2 * H, "1m", by=["app", "site"], out=str(tmp_path))
    assert s.rows and files(tmp_path) == names and definition(tmp_path)["query"] == recorded   # one chunk: its files
    want = sorted(r for r in ps.expected(T0, T0 + 2 * H, 60) if r[1] != "eu/west 1")
    assert rows(tmp_path) == want   # each point once
    changed = recorded.replace("eu/west 1", "eu/west  1")   # the same but for a space inside a quoted value
    asked = ps.query_range_requests(prom)
    with pytest.raises(IngestError, match=r"holds the dataset of another query: its _ingest\.json records the query "
                                          r"'sum by \(app, site, instance, __name__\) \(mf_load\{.*site!=\"eu/west 1\"\}\)'"):
        prometheus(prom, changed, T0, T0 + H, "1m", by=["app", "site"], out=str(tmp_path))
    assert ps.query_range_requests(prom) == asked and rows(tmp_path) == want


@pytest.mark.parametrize("a, b, same", [
    ("sum by (app) (rate(x[5m]))", "sum  by(app)(\n\trate( x [ 5m ] ) )", True),
    ("x[1h : 5m] offset 1d", "x[1h:5m] offset 1d", True),
    ("x offset 1d", "x offset1d", False),                        # a space between words separates them
    ('x{a="b c"}', 'x{a="b  c"}', False),                        # inside a string: a real change
    ("x{a='it\\'s  b'}", "x{a='it\\'s b'}", False),             # an escaped quote does not end it
    ("x{a=`raw  \\`}", "x{a=`raw \\`}", False),                  # nor does a backslash in a raw string
    ('x # a comment with a "quote\n + 1', 'x  # a comment with a "quote\n+ 1', True),
    ("x # + 1\n", "x + 1", False),                               # a comment is not code
])
def test_promql_whitespace_outside_strings_is_not_a_change(a, b, same):
    assert (promod._promql_form(a) == promod._promql_form(b)) is same


def test_the_chunk_fetcher_is_not_public():
    """fetch_chunk was exported and documented as mappable on a cluster, but called on its own it
    skipped the folder's lock and the definition check (and a lock holder now deletes the files it
    stages): it is private, and the old name says what to call instead."""
    with pytest.raises(AttributeError, match=r"fetch_chunk is no longer public: called on its own it skipped the "
                                             r"folder's lock .*Call prometheus\(\.\.\.\)"):
        promod.fetch_chunk
    with pytest.raises(ImportError):
        from modelfactory.ingest.prometheus import fetch_chunk  # noqa: F401
    assert "fetch_chunk" not in promod.__all__ and "fetch_chunk" not in Path(promod.__file__).with_name(
        "__init__.py").read_text()
