"""Scoring against a model store on ``s3://`` (a real S3 HTTP API on 127.0.0.1, moto's server mode):
what the job reads from the store beyond the models it uses."""
from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs.core
from _servers import moto_with_bucket

from modelfactory._io import Location
from modelfactory.scoring import loose_key_matches

BUCKET = "mf-score-test"


@pytest.fixture(scope="module")
def s3():
    with moto_with_bucket(BUCKET) as srv:
        yield srv


def test_the_key_hint_reads_only_the_key_columns_of_the_parts(s3, monkeypatch):
    """Groups without a model make score compare their keys with every key of the run: on an
    object store that must cost the parts' key columns, not the parts (the models are most of
    their bytes: a run of a million series is 1.6 GB of them)."""
    rng = np.random.default_rng(0)
    n = 1500  # groups a part, as a seasonal run of four weeks of hourly points has
    part = pa.table({"app": ["app-01"] * n, "site": [f"site-{i:05d}" for i in range(n)],
                     "model": pa.array([rng.bytes(1600) for _ in range(n)], pa.binary())})
    buf = io.BytesIO()
    pq.write_table(part, buf)
    size = len(buf.getvalue())
    root = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    s3.fs().pipe_file(f"{root}/runs/r/parts/u00000.parquet", buf.getvalue())
    store = Location(f"s3://{root}", storage_options=s3.storage_options())

    fetched = []
    fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):  # every byte an s3fs file object reads from the server
        out = fetch(self, start, end)
        fetched.append(len(out))
        return out

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    matched, example = loose_key_matches(store, [{"path": "runs/r/parts/u00000.parquet"}], ("app", "site"),
                                         pa.table({"app": ["APP-01"], "site": ["site-00007"]}),
                                         pa.table({"app": ["app-01"], "site": ["site-00001"]}))
    assert matched == [0] and example[1] == {"app": "app-01", "site": "site-00007"}  # it did read the keys
    assert 0 < sum(fetched) < size / 10, (sum(fetched), size)


def test_an_output_folder_in_another_model_store_is_told_on_s3_too(s3):
    """overwrite refuses an out= folder that is a model store or lies in its runs/ (it emptied
    them): on an object store the store is told from one listing of runs/, as the store lists it."""
    from modelfactory.api import _model_store_at

    root = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    fs = s3.fs()
    fs.pipe_file(f"{root}/store/runs/r1/manifest.json", b"{}")  # no LATEST: its runs fitted nothing
    fs.pipe_file(f"{root}/store/runs/r1/parts/u0.parquet", b"x")
    fs.pipe_file(f"{root}/store/notes/a.txt", b"x")
    fs.pipe_file(f"{root}/other/a.txt", b"x")

    def at(rel: str):
        return _model_store_at(Location.of(f"s3://{root}/{rel}", s3.storage_options()))

    store = f"s3://{root}/store"
    assert at("store") == store and at("store/runs") == store and at("store/runs/r1/parts") == store
    assert at("store/notes") is None and at("other") is None
    fs.pipe_file(f"{root}/other/LATEST", b"r0")
    assert at("other") == f"s3://{root}/other"
