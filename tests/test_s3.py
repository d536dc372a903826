"""Object storage: input data, model store and scores on ``s3://``, against a real S3 HTTP API on
127.0.0.1 (moto's server mode, started here), read and written directly by the workers.

Credentials reach the workers two ways: ``storage_options`` (LocalCluster workers), and the usual
AWS environment variables of a fresh ``dask worker`` process.  Nothing secret may end up in a
manifest, a group table, an output file, an error message or a worker log.
"""
from __future__ import annotations

import json
import uuid

import botocore
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _servers import DaskProcesses, MotoS3, SlowMean, moto_with_bucket, wait_for

import modelfactory
from modelfactory import ModelStore
from modelfactory.dataset import discover, read_files
from modelfactory.exceptions import DatasetError, ModelFactoryError, StoreError

BUCKET = "mf-test"
SERIES, DAYS = 12, 3
TRAIN = dict(by=["app", "site"], time="ts", target="value", params={"season_length": 24})


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; dummy AWS credentials in this process's env."""
    with moto_with_bucket(BUCKET) as srv:
        yield srv


@pytest.fixture
def prefix(s3) -> str:
    """A fresh folder in the bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def data(s3, prefix) -> str:
    return modelfactory.demo.write_dataset(f"{prefix}/data", series=SERIES, days=DAYS,
                                           storage_options=s3.storage_options())


def assert_no_secret(s3: MotoS3, url: str) -> list[str]:
    """Neither the access key nor the secret is in any object under ``url`` (JSON and other text
    as written; Parquet decoded: every value and the footer's key-value metadata).  Returns the
    paths checked."""
    fs = s3.fs()
    words = (s3.key, s3.secret)
    paths = fs.find(url.removeprefix("s3://"))
    for path in paths:
        raw = fs.cat_file(path)
        if path.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(raw))
            meta = pq.read_metadata(pa.BufferReader(raw)).metadata or {}
            blobs = [k + v for k, v in meta.items()]
            for col in table.itercolumns():
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    blobs += [v.encode() for v in col.to_pylist() if v]
                elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                    blobs += [v for v in col.to_pylist() if v]
            text = b"\0".join(blobs)
        else:
            text = raw
        for w in words:
            assert w.encode() not in text, f"{w[:6]}… found in {path}"
    return paths


def assert_message_clean(err: BaseException, s3: MotoS3) -> None:
    """No secret in the error or anything it was raised from."""
    while err is not None:
        assert s3.secret not in str(err) and s3.key not in str(err), type(err).__name__
        err = err.__cause__ or err.__context__


# ---------------------------------------------------------------------------
# the whole path on S3, through a LocalCluster with storage_options
# ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_train_score_and_read_back_on_s3(s3, data, prefix, client, tmp_path):
    so = s3.storage_options()
    store, out = f"{prefix}/store", f"{prefix}/scores"
    run = modelfactory.train(data, store=store, cluster=client, storage_options=so, **TRAIN)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}

    st = ModelStore(store, storage_options=so)
    assert st.runs() == [run.id] and st.latest() == run.id
    man = st.manifest()
    assert man["input"]["url"] == data
    groups = st.groups()
    assert len(groups) == SERIES and (groups.status == "ok").all()
    model = st.load({"app": "app-00", "site": "site-00000"})
    assert model.is_fitted

    # The same job on a local copy of the data gives the same models, byte for byte.
    local = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=SERIES, days=DAYS)
    modelfactory.train(local, store=str(tmp_path / "store"), cluster="inline", **TRAIN)
    cols = ["app", "site", "status", "model"]
    pd.testing.assert_frame_equal(
        st.table(columns=cols).to_pandas().sort_values(cols[:2]).reset_index(drop=True),
        ModelStore(str(tmp_path / "store")).table(columns=cols).to_pandas().sort_values(cols[:2])
        .reset_index(drop=True))

    scored = modelfactory.score(data, store=store, out=out, cluster=client, storage_options=so)
    assert scored.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    assert len(scored.groups) == SERIES  # the group table, read back from s3://
    rows = pd.read_parquet(out, storage_options=so)
    assert len(rows) == SERIES * DAYS * 24
    assert {"expected", "lower", "upper", "score", "is_anomaly"} <= set(rows.columns)
    fs = s3.fs()
    assert json.loads(fs.cat_file(f"{out}/_manifest.json"))["summary"]["counts"]["ok"] == SERIES

    # A second scoring into the same folder: refused, then replaced with overwrite=True.
    with pytest.raises(StoreError, match="is not empty"):
        modelfactory.score(data, store=store, out=out, cluster="inline", storage_options=so)
    again = modelfactory.score(data, store=store, out=out, cluster="inline", storage_options=so, overwrite=True)
    assert again.summary["counts"]["ok"] == SERIES
    assert len(pd.read_parquet(out, storage_options=so)) == SERIES * DAYS * 24

    # Nothing secret was written: manifests, group tables, parts, scores, LATEST.
    checked = "\n".join(assert_no_secret(s3, prefix))
    for name in ("/store/LATEST", "/manifest.json", "/parts/", "/scores/_groups/", "/scores/_manifest.json",
                 "/scores/_anomalies.json", "/scores/app="):
        assert name in checked, name


# ---------------------------------------------------------------------------
# credentials from the AWS environment of a fresh `dask worker`
# ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_credentials_and_endpoint_from_the_aws_environment(s3, data, prefix, tmp_path, monkeypatch):
    import s3fs

    # botocore >= 1.31 reads AWS_ENDPOINT_URL_S3 (service-specific endpoints); s3fs goes through it.
    assert tuple(int(x) for x in botocore.__version__.split(".")[:2]) >= (1, 31)
    env = s3.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert s3fs.S3FileSystem(skip_instance_cache=True).ls(BUCKET)  # no endpoint given, found anyway
        procs = DaskProcesses(tmp_path / "dask", workers=1, env=env).start()
        try:
            store = f"{prefix}/store"
            run = modelfactory.train(data, store=store, cluster=procs.address, **TRAIN)  # no storage_options
            assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
            scored = modelfactory.score(data, store=store, out=f"{prefix}/scores", cluster=procs.address)
            assert scored.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
            logs = procs.logs()
        finally:
            procs.stop()
        assert ModelStore(store, storage_options=s3.storage_options()).latest() == run.id
        assert s3.secret not in logs and s3.key not in logs
        assert_no_secret(s3, prefix)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------
# bad input on S3
# ---------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["s3://no-such-bucket-mf/data", f"s3://{BUCKET}/no/such/prefix"])
def test_a_missing_bucket_or_prefix_is_a_dataset_error_naming_the_url(s3, where):
    with pytest.raises(DatasetError, match=f"No file or folder at '{where}'") as info:
        modelfactory.train(where, store=f"s3://{BUCKET}/unused", cluster="inline",
                           storage_options=s3.storage_options(), **TRAIN)
    assert_message_clean(info.value, s3)


@pytest.fixture
def auth_on(s3):
    """moto checks access keys while the test runs (none of ours is known to it)."""
    s3.require_auth(True)
    try:
        yield
    finally:
        s3.require_auth(False)


def _wrong(s3) -> dict:
    return {**s3.storage_options(), "key": "AKIAWRONGWRONGWRONG0", "secret": "wrong-" + s3.secret[6:]}


@pytest.mark.timeout(30)
def test_wrong_credentials_write_nothing_and_never_echo_the_secret(s3, data, prefix, auth_on):
    bad = _wrong(s3)
    store = f"{prefix}/store"
    # Whatever is raised today (see the xfail tests below for what should be): never the secret.
    with pytest.raises((OSError, ModelFactoryError)) as info:
        modelfactory.train(data, store=store, cluster="inline", storage_options=bad, **TRAIN)
    for word in (bad["secret"], bad["key"], s3.secret):
        assert word not in str(info.value)
    s3.require_auth(False)
    assert not s3.fs().exists(store.removeprefix("s3://"))


@pytest.mark.timeout(30)
def test_wrong_credentials_are_a_clear_error_naming_the_data(s3, data, prefix, auth_on):
    bad = _wrong(s3)
    with pytest.raises(DatasetError, match=f"(?s)'{data}'.*(credential|denied|forbidden|permission)") as info:
        modelfactory.train(data, store=f"{prefix}/store", cluster="inline", storage_options=bad, **TRAIN)
    assert bad["secret"] not in str(info.value)


@pytest.mark.timeout(30)
def test_wrong_credentials_for_a_new_output_are_a_credentials_error_not_a_network_one(s3, data, prefix, auth_on):
    from modelfactory._io import Location

    with pytest.raises(StoreError, match=rf"Access to '{prefix}/out' was denied .*: check the credentials"):
        Location.of(f"{prefix}/out", _wrong(s3)).check_bucket(StoreError)


def test_wrong_credentials_are_a_clear_error_naming_the_store(s3, data, prefix, auth_on):
    bad = _wrong(s3)
    with pytest.raises(StoreError, match=f"(?s)'{prefix}/store'.*(credential|denied|forbidden|permission)"):
        ModelStore(f"{prefix}/store", storage_options=bad).latest()


@pytest.mark.timeout(30)
def test_a_store_in_a_missing_bucket_is_refused_not_created(s3, data):
    store = "s3://no-such-store-bucket-mf/store"
    try:
        with pytest.raises(StoreError, match="no-such-store-bucket-mf"):
            modelfactory.train(data, store=store, cluster="inline", storage_options=s3.storage_options(), **TRAIN)
    finally:
        created = s3.fs().exists("no-such-store-bucket-mf")
        if created:
            s3.fs().rm("no-such-store-bucket-mf", recursive=True)
    assert not created


@pytest.mark.timeout(60)
def test_overwrite_never_deletes_a_whole_bucket(s3, data, prefix):
    """out= a bucket's root with overwrite=True used to delete the bucket and all in it."""
    so = s3.storage_options()
    store = f"{prefix}/store"
    modelfactory.train(data, store=store, cluster="inline", storage_options=so, **TRAIN)
    bucket = s3.make_bucket("mf-shared-bucket")
    fs = s3.fs()
    fs.pipe_file(f"{bucket}/other/precious.txt", b"keep me")
    with pytest.raises(StoreError, match=r"is a whole bucket, and it is not empty: overwrite would delete "
                                         r"everything in it\. Write to a folder inside it, such as "
                                         r"'s3://mf-shared-bucket/scores'"):
        modelfactory.score(data, store=store, out=f"s3://{bucket}", cluster="inline", storage_options=so,
                           overwrite=True)
    assert fs.cat_file(f"{bucket}/other/precious.txt") == b"keep me"
    modelfactory.score(data, store=store, out=f"s3://{bucket}/scores", cluster="inline", storage_options=so,
                       overwrite=True)
    assert fs.cat_file(f"{bucket}/other/precious.txt") == b"keep me"


@pytest.mark.timeout(30)
def test_a_read_from_an_unreachable_endpoint_names_the_endpoint(s3, data):
    """What a work unit sees when the object store goes away: today 'FileNotFoundError: <path>'."""
    other = MotoS3().start()  # a second endpoint on the same moto state (same buckets and objects)
    so = {**s3.storage_options(), "client_kwargs": {"endpoint_url": other.endpoint},
          "config_kwargs": {"retries": {"max_attempts": 1}}}
    try:
        info = discover(data, storage_options=so)
    finally:
        other.stop()
    paths = tuple(f.path for f in info.files[:1])
    with pytest.raises(DatasetError, match="Could not connect to the endpoint"):
        read_files(info.source, paths, ["site", "value"])
    # as a worker reads its unit, with the sizes and ETags from discovery: no HEAD came first to turn
    # it into a missing file, and botocore's own error left the run as "a work unit failed"
    known = tuple((f.size, f.stamp) for f in info.files[:1])
    with pytest.raises(DatasetError, match=r"Cannot read the files of .*Could not connect to the endpoint.*resume the run"):
        read_files(info.source, paths, ["site", "value"], known=known)


@pytest.mark.timeout(30)
def test_a_second_endpoint_sees_the_same_objects(s3, data):
    """The helper the test above relies on: moto keeps its state per process, not per server."""
    other = MotoS3().start()
    try:
        so = {**s3.storage_options(), "client_kwargs": {"endpoint_url": other.endpoint}}
        assert discover(data, storage_options=so).rows == SERIES * DAYS * 24
    finally:
        other.stop()


@pytest.mark.timeout(60)
def test_a_reader_sees_runs_committed_later_by_another_client(s3, data, prefix):
    so = s3.storage_options()
    store = f"{prefix}/store"
    first = modelfactory.train(data, store=store, cluster="inline", storage_options=so, **TRAIN)
    reader = ModelStore(store, storage_options=so)
    assert reader.runs() == [first.id]
    # Another client commits a second run: different (equivalent) options, so fsspec gives it its
    # own S3FileSystem, as another process would have.
    other = {**so, "version_aware": False}
    second = modelfactory.train(data, store=store, cluster="inline", storage_options=other,
                                **{**TRAIN, "params": {"season_length": 12}})
    assert reader.latest() == second.id  # a GET: always fresh
    assert reader.runs() == [first.id, second.id]


@pytest.mark.timeout(60)
def test_gc_never_takes_a_run_committed_by_another_client_for_an_interrupted_one(s3, data, prefix):
    import threading

    so = s3.storage_options()
    store = f"{prefix}/store"
    reader = ModelStore(store, storage_options=so)
    done: dict = {}

    def other_client():  # its own S3FileSystem (other, equivalent options), as in another process
        try:
            done["run"] = modelfactory.train(data, store=store, cluster="inline", model=SlowMean,
                                             storage_options={**so, "version_aware": False},
                                             **{**TRAIN, "params": None})
        finally:
            done["over"] = True

    th = threading.Thread(target=other_client, daemon=True)
    th.start()
    def started():
        fresh = ModelStore(store, storage_options={**so, "skip_instance_cache": True})
        return done.get("over") or fresh.pending()

    wait_for(started, 30, "the other client's run to start", every=0.05)
    assert reader.pending()  # this process lists the store while the run is pending ...
    th.join(30)  # ... and the other client commits it
    assert "run" in done
    assert reader.gc(keep=1, pending=True, dry_run=True) == []  # the committed run is LATEST: keep it


@pytest.mark.timeout(120)
def test_folder_markers_are_folders_not_files(s3, data, prefix):
    """Empty objects named like folders (``data/`` and ``scores/`` from the S3 console's "Create
    folder", an empty ``sub/`` from Hadoop's S3A, ``x_$folder$`` from EMR): s3fs lists them as files.
    The dataset was refused ("cannot read the Parquet footer of 'bucket/…/data'", naming the folder
    itself) and so was the output folder ("is a file")."""
    so, fs = s3.storage_options(), s3.fs()
    base = prefix.removeprefix("s3://")
    before = discover(data, storage_options=so)
    for marker in ("data/", "data/app=app-00/tmp/", "data/app=app-01_$folder$", "data_$folder$", "scores/",
                   "out/"):
        fs.pipe_file(f"{base}/{marker}", b"")
    fs.invalidate_cache()
    for url in (data, data + "/"):
        info = discover(url, storage_options=so)
        assert sorted(f.path for f in info.files) == sorted(f.path for f in before.files)
    run = modelfactory.train(data + "/", store=f"{prefix}/store", cluster="inline", storage_options=so, **TRAIN)
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    scores = modelfactory.score(data, store=f"{prefix}/store", out=f"{prefix}/scores", cluster="inline",
                                storage_options=so)
    assert scores.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    assert sorted(zip(scores.groups.app, scores.groups.site)) == sorted(zip(run.groups.app, run.groups.site))

    def count(df):
        return pd.DataFrame({"app": [df.app.iloc[0]], "site": [df.site.iloc[0]], "n": [len(df)]})

    out = modelfactory.apply(data, by=["app", "site"], func=count, schema="app string, site string, n int64",
                             out=f"{prefix}/out", cluster="inline", storage_options=so)
    assert out.summary["counts"]["ok"] == SERIES and out.to_pandas()["n"].sum() == before.rows
    # a real file where the output folder should be is still refused
    fs.pipe_file(f"{base}/taken", b"not a folder")
    with pytest.raises(StoreError, match="is a file"):
        modelfactory.score(data, store=f"{prefix}/store", out=f"{prefix}/taken", cluster="inline", storage_options=so)


def test_the_object_store_going_away_at_the_commit_is_a_store_error_and_nothing_changes(s3, data, prefix):
    # The run's units are done and the client commits as S3 goes away: botocore's connection
    # error (not an OSError) came out as it was, so the CLI printed an "internal error" with
    # status 1. It is a StoreError naming the store and the way back (resume).
    from dataclasses import fields

    from modelfactory._io import PartInfo

    so = s3.storage_options(config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    store = f"{prefix}/store"
    run = modelfactory.train(data, store=store, cluster="inline", storage_options=so, **TRAIN)
    st = ModelStore(store, storage_options=so)
    man = st.manifest(run.id)
    parts = [PartInfo(**{f.name: p[f.name] for f in fields(PartInfo)}) for p in man["parts"]]
    s3.stop()
    try:
        with pytest.raises(StoreError, match=rf"Cannot list the parts of run {run.id} in the store '{store}'.*"
                                             rf"Nothing was committed.*--resume {run.id}"):
            st.commit(run.id, {k: v for k, v in man.items() if k != "parts"}, parts)
        with pytest.raises(StoreError, match=rf"Cannot write 'LATEST' in the store '{store}'"):
            st.write("LATEST", b"x")
    finally:
        s3.start()
    assert st.latest() == run.id and st.manifest(run.id) == man


def _list_requests(store: ModelStore) -> list:
    """Record the LIST requests that ``store``'s own S3 client sends from now on (botocore's
    event hooks on the real client: the requests still go to the server)."""
    calls: list = []
    store.location.fs.s3.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(kw))
    return calls



@pytest.mark.timeout(120)
def test_listing_runs_and_reporting_cost_no_request_per_run(s3, data, prefix):
    # A nightly store gathers hundreds of runs. runs() globbed runs/*/manifest.json, which s3fs
    # does with one LIST per run folder (1.5 s for 300 runs on moto, tens of seconds on S3), and
    # report listed all runs only to learn that the store is not empty.
    from modelfactory.report import build_report

    so = s3.storage_options()
    counts = {}
    for n in (2, 6):
        store = f"{prefix}/store{n}"
        ids = [modelfactory.train(data, store=store, cluster="inline", storage_options=so, **TRAIN).id
               for _ in range(n)]
        st = ModelStore(store, storage_options=so)
        st.location.write_bytes("runs/zz-interrupted/pending.json", json.dumps({"run_id": "zz-interrupted"}).encode())
        assert ModelStore(store, storage_options=so).location.fs is st.location.fs  # the report's client too
        calls = _list_requests(st)
        assert st.runs() == ids
        assert [p["run_id"] for p in st.pending()] == ["zz-interrupted"]
        listed = len(calls)
        assert "<html" in build_report(store, storage_options=so)
        counts[n] = (listed, len(calls) - listed)
    assert counts[2] == counts[6], counts
    assert counts[6][1] == 0, "the report needs no listing of a store that has a LATEST"


def test_reading_a_runs_manifest_is_one_request(s3, data, prefix):
    # `models list` reads the manifest of every run: each read first asked whether the manifest
    # exists (a HEAD), doubling the requests per run.
    so = s3.storage_options()
    store = f"{prefix}/store"
    ids = [modelfactory.train(data, store=store, cluster="inline", storage_options=so, **TRAIN).id for _ in range(3)]
    st = ModelStore(store, storage_options=so)
    calls: list = []
    st.location.fs.s3.meta.events.register("before-call.s3", lambda event_name, **kw: calls.append(event_name))
    assert [st.manifest(rid)["run_id"] for rid in ids] == ids
    assert calls.count("before-call.s3.GetObject") == 3, calls
    # s3fs's cat_file asks for the size first (a HEAD of its own); no other request
    assert calls.count("before-call.s3.HeadObject") <= 3 and len(calls) <= 6, calls
    with pytest.raises(StoreError, match=r"No committed run .nope. .*Recent runs: .*" + ids[-1]):
        st.manifest("nope")
    st.location.rm(f"runs/{ids[-1]}/manifest.json")
    with pytest.raises(StoreError, match=rf"LATEST .* names run '{ids[-1]}', whose manifest .* is missing"):
        st.manifest()


def test_an_object_rewritten_in_place_changes_the_inputs_fingerprint(s3, data):
    # (what keeps `train --resume` from keeping models fitted on an object's earlier rows): the
    # objects' sizes and ETags, from one listing
    opts = s3.storage_options()
    before = discover(data, storage_options=opts)
    fs = s3.fs()
    assert [f.size for f in before.files] == [fs.size(f.path) for f in before.files]
    assert all(f.stamp for f in before.files)
    path = before.files[0].path
    with fs.open(path, "rb") as f:
        old = pq.read_table(f)
    with fs.open(path, "wb") as f:
        pq.write_table(old.set_column(old.schema.get_field_index("value"), "value",
                                      pa.compute.add(old["value"], 1000.0)), f)
    after = discover(data, storage_options=opts)
    assert [(f.path, f.rows) for f in after.files] == [(f.path, f.rows) for f in before.files]
    assert after.files[0].stamp != before.files[0].stamp and after.fingerprint() != before.fingerprint()


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_each_input_object_costs_one_request_to_discover_and_one_to_read(s3, data, prefix, layout, client):
    # pyarrow's fsspec handler asked whether each object was a file (a HEAD), s3fs asked its size
    # (another HEAD), then one ranged GET read a small file's footer, or all of it: three requests
    # an object to discover the dataset and three again to read it, where the listing already
    # gave every size and ETag (10,000 one-group objects: 60,000 requests).  The workers are
    # processes of their own: the server's log counts their requests too.
    so, url, unit_rows = s3.storage_options(), data, None
    if layout == "flat":  # no key folders: the groups are shuffled, the objects read in chunks
        url, table, fs = f"{prefix}/flat", modelfactory.demo.make_table(SERIES, days=DAYS), s3.fs()
        third = -(-table.num_rows // 3)
        for i in range(3):
            with fs.open(f"{url.removeprefix('s3://')}/part-{i}.parquet", "wb") as f:
                pq.write_table(table.slice(i * third, third), f)
        unit_rows = third
    objects = {"/" + p for p in s3.fs().find(url.removeprefix("s3://")) if p.endswith(".parquet")}
    with s3.requests() as calls:
        run = modelfactory.apply(url, by=["app", "site"], func=lambda df: pd.DataFrame({"n": [len(df)]}),
                                 schema={"n": "int64"}, cluster=client, storage_options=so, unit_rows=unit_rows)
    assert len(run.to_pandas()) == SERIES and run.summary["counts"]["ok"] == SERIES
    assert run.summary["mode"] == ("files" if layout == "folders" else "shuffle")
    per_object = {k: sorted(method for method, path in calls if path == k) for k in objects}
    assert per_object == {k: ["GET", "GET"] for k in objects}, per_object


def test_an_object_rewritten_after_discovery_is_refused_not_read(s3, prefix):
    # an object's size from the listing is what the read trusts: the read names the listed ETag
    # too, so a rewritten object is a clear error naming it, not its new rows (nor a footer sought
    # at the old size); s3fs's errors name no key (or the unit's first file), so the store is asked
    from modelfactory.plan import plan

    so, fs = s3.storage_options(), s3.fs()
    url = f"{prefix}/three"
    for i in range(3):
        with fs.open(f"{url.removeprefix('s3://')}/part-{i}.parquet", "wb") as f:
            pq.write_table(modelfactory.demo.make_table(2, days=2, seed=i), f)
    info = discover(url, storage_options=so)
    [unit] = plan(info, ("app", "site"), workers=1).units
    assert len(unit.paths) == 3 and [k[0] for k in unit.known] == [f.size for f in info.files]
    before = read_files(info.source, unit.paths, ["site", "value"], known=unit.known)
    second = unit.paths[1]
    with fs.open(second, "rb") as f:
        old = pq.read_table(f)
    with fs.open(second, "wb") as f:
        pq.write_table(pa.concat_tables([old, old]), f)
    with pytest.raises(DatasetError, match=rf"^'{second}' of '{url}' was rewritten after the run listed it"):
        read_files(info.source, unit.paths, ["site", "value"], known=unit.known)
    assert read_files(info.source, unit.paths, ["site", "value"]).num_rows == before.num_rows + old.num_rows
    fs.rm(unit.paths[2])
    with pytest.raises(DatasetError, match=rf"^Cannot read '{unit.paths[2]}' of '{url}': FileNotFoundError"):
        read_files(info.source, unit.paths[2:], ["site", "value"], known=unit.known[2:])


def test_an_object_rewritten_while_the_dataset_is_listed_is_named_as_such(s3, prefix, monkeypatch):
    # discovery reads each footer with the listing's size and ETag: a writer that replaced an object
    # in between got "cannot read the Parquet footer ... Move files that are not Parquet out"
    import modelfactory.dataset as dataset

    fs, url = s3.fs(), f"{prefix}/racing"
    path = f"{url.removeprefix('s3://')}/part-0.parquet"
    with fs.open(path, "wb") as f:
        pq.write_table(modelfactory.demo.make_table(2, days=2), f)
    listed = dataset._stamps

    def listed_then_rewritten(*a, **k):
        out = listed(*a, **k)
        with fs.open(path, "wb") as f:  # the writer, between the listing and the footer's read
            pq.write_table(modelfactory.demo.make_table(3, days=2), f)
        return out

    monkeypatch.setattr(dataset, "_stamps", listed_then_rewritten)
    with pytest.raises(DatasetError, match=rf"^'{path}' of '{url}' was rewritten while the dataset was being listed"):
        discover(url, storage_options=s3.storage_options())
    monkeypatch.undo()
    assert discover(url, storage_options=s3.storage_options()).rows == 3 * 48


def test_a_ctrl_c_while_the_object_store_is_away_stays_a_ctrl_c(s3, data, prefix):
    # a Ctrl-C after a job wrote part of its out= folder says what the folder holds, which it asks
    # the store: with the store gone (the reason one presses Ctrl-C), botocore's error replaced the
    # Ctrl-C, and the CLI said "internal error", exit 1, not 130
    other = MotoS3().start()  # a second endpoint on the same moto state, stopped mid-job
    so = {**s3.storage_options(), "client_kwargs": {"endpoint_url": other.endpoint},
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}

    def stalled(g):
        other.stop()
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            modelfactory.apply(data, by=["app", "site"], func=stalled, schema="app string, n double", input="numpy",
                               out=f"{prefix}/out", cluster="inline", storage_options=so)
    finally:
        other.stop()
