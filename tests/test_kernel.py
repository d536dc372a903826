"""The kernel's group splitting: every row in exactly one group, groups contiguous and in time order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfactory.kernel import split_groups

rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(0, 3), st.integers(0, 50)),
                min_size=0, max_size=80)


@given(rows, st.booleans())
@settings(max_examples=200, deadline=None)
def test_split_groups_partitions_the_rows(data, presort):
    if presort:
        data = sorted(data, key=lambda r: (r[0] is None, r[0] or "", r[1], r[2]))
    table = pa.table({"k": pa.array([r[0] for r in data], pa.string()),
                      "j": pa.array([r[1] for r in data], pa.int64()),
                      "t": pa.array([r[2] for r in data], pa.timestamp("s")),
                      "i": pa.array(np.arange(len(data)))})
    g = split_groups(table, ("k", "j"), "t")
    assert g.table.num_rows == len(data)
    assert sorted(g.table["i"].to_pylist()) == list(range(len(data)))  # nothing lost or repeated
    keys = g.key_tuples()
    assert len(set(keys)) == len(keys) == len({(r[0], r[1]) for r in data})
    for (s, e), key in zip(zip(g.starts, g.ends), keys):
        part = g.table.slice(s, e - s)
        assert set(zip(part["k"].to_pylist(), part["j"].to_pylist())) == {key}
        ts = part["t"].cast(pa.int64()).to_pylist()
        assert ts == sorted(ts)
