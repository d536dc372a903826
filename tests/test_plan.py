"""The planner: every group in exactly one unit, size limits, deterministic ids."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfactory.dataset import discover
from modelfactory.exceptions import PlanError
from modelfactory.plan import (MAX_UNIT_ROWS, MIN_UNIT_ROWS, Leaf, aligned_count, auto_target_rows, pack,
                               plan, unit_count)

from _data import metrics_table, write

key_values = st.one_of(st.none(), st.text(min_size=0, max_size=6))
leaves = st.lists(
    st.tuples(st.tuples(key_values, key_values), st.integers(min_value=0, max_value=5_000)),
    min_size=0, max_size=60, unique_by=lambda t: t[0],
).map(lambda items: [Leaf(k, (f"f{i}.parquet", f"g{i}.parquet"), rows) for i, (k, rows) in enumerate(items)])


@given(leaves, st.integers(min_value=1, max_value=20_000))
@settings(max_examples=200, deadline=None)
def test_every_leaf_lands_in_exactly_one_unit(lvs, target):
    units = pack(lvs, target)
    seen = Counter(p for u in units for p in u.paths)
    assert seen == Counter(p for lf in lvs for p in lf.paths)
    assert all(n == 1 for n in seen.values())
    assert sum(u.rows for u in units) == sum(lf.rows for lf in lvs)
    assert sum(u.leaves for u in units) == len(lvs)


@given(leaves, st.integers(min_value=1, max_value=20_000))
@settings(max_examples=200, deadline=None)
def test_size_limit_holds_except_for_single_big_leaves(lvs, target):
    for u in pack(lvs, target):
        assert u.rows <= target or u.leaves == 1


@given(leaves, st.integers(min_value=1, max_value=20_000), st.integers(min_value=1, max_value=8),
       st.integers(min_value=0, max_value=40_000))
@settings(max_examples=300, deadline=None)
def test_balanced_packing_keeps_every_leaf_and_the_limit(lvs, target, workers, slack):
    units = pack(lvs, target, multiple=workers, limit=target + slack)
    assert Counter(p for u in units for p in u.paths) == Counter(p for lf in lvs for p in lf.paths)
    assert all(u.rows <= target + slack or u.leaves == 1 for u in units)
    rank = {p: i for i, lf in enumerate(sorted(lvs, key=lambda lf: [(v is None, v or "") for v in lf.key]))
            for p in lf.paths}
    for u in units:  # each unit's leaves in key order
        assert [rank[p] for p in u.paths] == sorted(rank[p] for p in u.paths)


@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=5_000),
       st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=10**6))
@settings(max_examples=300, deadline=None)
def test_equal_leaves_pack_into_even_units_a_multiple_of_the_workers(count, rows, workers, target):
    lvs = [Leaf((f"k{i:04d}",), (f"f{i}",), rows) for i in range(count)]
    units = pack(lvs, target, multiple=workers, limit=10**9)
    n = unit_count(count * rows, target, workers)
    assert len(units) == min(n, count)
    if n <= count and n > 1:
        assert len(units) % workers == 0
    sizes = [u.leaves for u in units]
    assert max(sizes) - min(sizes) <= 1  # even to within one leaf


@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=5_000),
       st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=40))
@settings(max_examples=300, deadline=None)
def test_equal_leaves_under_a_bound_pack_into_as_few_even_units_as_the_bound_allows(count, rows, workers, per):
    # unit_rows=20,000 over 20 folders of 6,720 rows: 13 units, six of them one folder (equal
    # shares of three folders, each over the bound, split into two and one); two a unit is the
    # most the bound allows, so 10 even units
    lvs = [Leaf((f"k{i:04d}",), (f"f{i}",), rows) for i in range(count)]
    bound = rows * per + rows // 2  # room for `per` leaves a unit, not one more
    units = pack(lvs, bound, multiple=workers)
    fewest = -(-count // per)
    expected = min(count, max(unit_count(count * rows, bound, workers), unit_count(fewest, 1, workers)))
    assert len(units) == expected
    sizes = [u.leaves for u in units]
    assert max(sizes) - min(sizes) <= 1 and max(u.rows for u in units) <= bound
    six = pack([Leaf((f"a{i:02d}",), (f"p{i}",), 6720) for i in range(20)], 20_000, multiple=2)
    assert [u.leaves for u in six] == [2] * 10


@given(st.lists(st.integers(min_value=50, max_value=150), min_size=2, max_size=30),
       st.integers(min_value=100, max_value=600), st.integers(min_value=1, max_value=4))
@settings(max_examples=300, deadline=None)
def test_units_are_no_more_than_the_larger_of_the_two_counts(rows, target, workers):
    # an equal share over the bound was split in two after the cut: four folders that fit in
    # three units made four
    def filled_in_turn(rows: list[int], limit: int) -> int:  # each unit takes leaves until the next would pass
        units, held = 1, 0
        for r in rows:
            if held and held + r > limit:
                units, held = units + 1, 0
            held += r
        return units

    lvs = [Leaf((f"k{i:03d}",), (f"f{i}",), r) for i, r in enumerate(rows)]
    units = pack(lvs, target, multiple=workers)
    assert sorted(p for u in units for p in u.paths) == sorted(lf.paths[0] for lf in lvs)
    assert all(u.rows <= target or u.leaves == 1 for u in units)
    assert len(units) <= max(unit_count(sum(rows), target, workers), unit_count(filled_in_turn(rows, target), 1,
                                                                               workers))
    assert len(pack([Leaf((f"k{i}",), (f"/p/{i}",), r) for i, r in enumerate([8106, 9617, 10104, 6728])],
                    17624)) == 3


def test_uneven_leaves_are_cut_near_equal_shares():
    # 10 folders, three of them big, 2 workers.  Filling units up to 30 rows in turn gives
    # 30/30/30/10: one worker gets 60 rows, the other 40.  Cutting at the leaf boundaries
    # nearest to 25, 50 and 75 rows gives 25/30/15/30: 55 and 45 (largest unit first).
    lvs = [Leaf((f"k{i}",), (f"f{i}",), r) for i, r in enumerate([20, 5, 5, 5, 20, 5, 5, 5, 20, 10])]
    assert [u.rows for u in pack(lvs, 30, multiple=2, limit=60)] == [25, 30, 15, 30]
    assert [u.rows for u in pack(lvs, 30)] == [25, 30, 15, 30]  # the same without the limit's slack


def test_a_huge_leaf_is_a_unit_and_the_rest_share_the_other_units_evenly():
    # one folder of 1,000 rows among 20 of 10 (the skew benchmark's shape), units of about 150:
    # 8 units for 2 workers; the huge folder alone, the 20 small ones in the other 7
    lvs = [Leaf((f"k{i:02d}",), (f"f{i}",), 1000 if i == 7 else 10) for i in range(21)]
    units = pack(lvs, 150, multiple=2, limit=300)
    assert len(units) == 8
    assert [u.rows for u in units if u.leaves == 1 and u.rows == 1000] == [1000]
    sizes = [u.leaves for u in units if u.rows != 1000]
    assert len(sizes) == 7 and sum(sizes) == 20 and max(sizes) - min(sizes) <= 1


@given(leaves, st.integers(min_value=1, max_value=20_000))
@settings(max_examples=100, deadline=None)
def test_ids_are_deterministic_and_unique(lvs, target):
    a = [u.id for u in pack(lvs, target)]
    b = [u.id for u in pack(list(reversed(lvs)), target)]
    assert a == b
    assert len(set(a)) == len(a)


@given(st.integers(min_value=0, max_value=10**10), st.integers(min_value=1, max_value=1000))
def test_auto_target_rows_is_bounded(total, workers):
    t = auto_target_rows(total, workers)
    assert MIN_UNIT_ROWS <= t <= MAX_UNIT_ROWS


def test_pack_refuses_a_nonpositive_size():
    with pytest.raises(PlanError, match="at least 1 row"):
        pack([Leaf(("a",), ("f",), 3)], 0)


def test_keys_in_partition_path_plan_by_files(tmp_path):
    info = discover(write(metrics_table(series=9, apps=3), tmp_path / "d", ["app"]))
    p = plan(info, ("app", "site"), workers=2, target_rows=72 * 3)
    assert p.mode == "files"
    assert len(p.units) == 3  # one app folder (3 series x 72 rows) per unit
    assert sorted(x for u in p.units for x in u.paths) == sorted(f.path for f in info.files)


def test_a_leaf_bigger_than_the_target_gets_its_own_unit(tmp_path):
    info = discover(write(metrics_table(series=9, apps=3), tmp_path / "d", ["app"]))
    p = plan(info, ("app", "site"), workers=2, target_rows=10)
    assert len(p.units) == 3 and all(u.leaves == 1 for u in p.units)


def test_groups_spread_over_files_plan_a_shuffle(tmp_path):
    info = discover(write(metrics_table(series=9, hours=72), tmp_path / "d", ["day"]))
    p = plan(info, ("app", "site"), workers=2, target_rows=100)
    assert p.mode == "shuffle"
    assert len(p.units) == 8  # ceil(648 / 100) = 7 units, rounded up to a multiple of the 2 workers
    assert p == plan(info, ("app", "site"), workers=2, target_rows=100)  # deterministic


@given(st.integers(1, 500), st.integers(0, 200))
def test_an_aligned_unit_count_divides_or_is_a_multiple_of_the_partitions_and_is_never_fewer(n, align):
    c = aligned_count(n, align)
    assert n <= c <= 2 * n  # never more than twice the tasks planned (a prime count of 101: not 2 -> 101)
    if align < 2:
        assert c == n
    elif c != n:
        assert align % c == 0 or c % align == 0
        assert c < n + align  # the nearest one above
        assert all(not (align % d == 0 or d % align == 0) for d in range(n, c))
    else:
        nearest = next(d for d in range(n, n + align + 1) if align % d == 0 or d % align == 0)
        assert nearest == n or nearest > 2 * n


def test_a_shuffle_aligned_with_a_runs_partitions(tmp_path):
    """Scoring against a run shuffled into 12 partitions: 7 units (rounded to 8 for 2 workers)
    become 12, so each scoring unit holds the groups of one training partition."""
    info = discover(write(metrics_table(series=9, hours=72), tmp_path / "d", ["day"]))
    assert len(plan(info, ("app", "site"), workers=2, target_rows=100, align=12).units) == 12
    assert len(plan(info, ("app", "site"), workers=2, target_rows=100, align=3).units) == 9
    assert len(plan(info, ("app", "site"), workers=2, target_rows=1000, align=3).units) == 1  # no shuffle


def test_small_spread_dataset_needs_no_shuffle(tmp_path):
    info = discover(write(metrics_table(series=3, hours=48), tmp_path / "d", ["day"]))
    p = plan(info, ("site",), workers=2)
    assert p.mode == "files" and len(p.units) == 1


@pytest.mark.parametrize("workers_then", [1, 3, 8])
def test_a_resumed_run_plans_the_same_units_on_any_number_of_workers(tmp_path, workers_then):
    # 24 folders of uneven size planned automatically for 2 workers, then planned again as a
    # resumed run does (the settings from pending.json) on another number of workers
    info = discover(write(metrics_table(series=24, hours=72, apps=24), tmp_path / "d", ["app"]))
    first = plan(info, ("app", "site"), workers=2, target_rows=100)
    again = plan(info, ("app", "site"), workers=workers_then, target_rows=first.target_rows,
                 limit=first.limit, multiple=first.multiple)
    assert [u.id for u in again.units] == [u.id for u in first.units]
    auto = plan(info, ("app", "site"), workers=2)
    assert plan(info, ("app", "site"), workers=workers_then, target_rows=auto.target_rows, limit=auto.limit,
                multiple=auto.multiple).units == auto.units
