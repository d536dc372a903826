"""The ``--where`` conditions (and ``filter=`` given as text): a small, strict language of column
comparisons, read into one pyarrow filter that the Parquet reader pushes down.

``app = checkout and site != '007'``, ``value >= 1.5``, ``ts >= '2026-01-12'``, ``host is not
null``, ``site in (a, b)``: see :func:`parse_where`.
"""
from __future__ import annotations

import contextvars
import re
from collections.abc import Sequence

from .exceptions import ModelFactoryError

__all__ = ["parse_where"]

#: what the errors call the conditions: ``--where`` on the command line, ``filter=`` from Python
_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("where_name", default="--where")

_WHERE_TOKEN = re.compile(r"""\s*(?:(?P<q>'(?:[^']|'')*'|"(?:[^"]|"")*")|(?P<op><=|>=|!=|<>|==|=|<|>|\(|\)|,)|(?P<w>[^\s=!<>(),'"]+))""")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WHERE_OPS = {"=": "equal", "==": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less",
              "<=": "less_equal", ">": "greater", ">=": "greater_equal"}


def parse_where(clauses: Sequence[str], types: dict | None = None, *, name: str = "--where"):
    """``--where`` clauses as one pyarrow filter (all must hold), or None for none.

    Each clause is ``COLUMN OP VALUE`` (OP one of ``= != < <= > >=``), ``COLUMN [not] in
    (V1, V2, ...)`` or ``COLUMN is [not] null``; ``and`` joins several in one clause.  A
    quoted value (``'007'``) is text; unquoted, a number written in digits (``12``, ``-1.5``,
    ``2e3``) is a number, ``true``/``false`` a boolean, anything else text (``nan``, ``1_000``).
    Hive partition keys are text: quote number-like ones.
    ``types`` (column name -> Arrow type) turns text compared with a timestamp or date column
    into one of its type (``ts >= '2026-01-12'``; a time without a zone is in the column's).
    ``name`` is what an error calls the conditions (``filter=`` from Python).

    >>> str(parse_where(["app = checkout and site != '007'", "value >= 1.5", "host is not null"]))
    '((((app == "checkout") and (site != "007")) and (value >= 1.5)) and is_valid(host))'
    """
    import pyarrow.compute as pc

    token = _NAME.set(name)
    try:
        return _parse(clauses, types, pc)
    finally:
        _NAME.reset(token)


def _parse(clauses: Sequence[str], types: dict | None, pc):
    expr = None
    for clause in clauses:
        tokens, pos = [], 0
        text = clause.strip()
        while pos < len(text):
            m = _WHERE_TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise _WhereError(clause, f"cannot read it from {text[pos:]!r}")
            pos = m.end()
            if m.group("q") is not None:
                q = m.group("q")
                tokens.append(("str", q[1:-1].replace(q[0] * 2, q[0])))
            elif m.group("op") is not None:
                tokens.append(("op", m.group("op")))
            elif m.group("w") is not None:
                tokens.append(("word", m.group("w")))
        for part in _split_and(tokens, clause):
            e = _where_one(part, clause, pc, types or {})
            expr = e if expr is None else expr & e
    return expr


class _WhereError(ModelFactoryError):
    def __init__(self, clause: str, why: str):
        super().__init__(f"{_NAME.get()} {clause!r}: {why}. Write COLUMN = VALUE (or != < <= > >=), COLUMN in "
                         "(A, B), COLUMN is [not] null, joined by 'and'; quote text that looks like a number ('007').")


def _split_and(tokens: list, clause: str) -> list[list]:
    parts, cur = [], []
    for kind, v in tokens:
        if kind == "word" and v.lower() == "and":
            if not cur:
                raise _WhereError(clause, "'and' needs a condition on each side")
            parts.append(cur)
            cur = []
        else:
            cur.append((kind, v))
    if not cur:
        raise _WhereError(clause, "it is empty" if not parts else "'and' needs a condition on each side")
    return [*parts, cur]


def _literal(tok, clause: str):
    kind, v = tok
    if kind == "str":
        return v
    if kind != "word":
        raise _WhereError(clause, f"expected a value, got {v!r}")
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        raise _WhereError(clause, "compare with null as 'COLUMN is null' or 'COLUMN is not null'")
    if _NUMBER.fullmatch(v):  # digits as written: Python's int() and float() also take 1_000, nan, inf
        number = float(v) if any(c in v for c in ".eE") else int(v)
        if isinstance(number, int) and not -2**63 <= number < 2**63:  # Arrow's scalar: an internal error
            raise _WhereError(clause, f"{v} is beyond a 64-bit integer; quote it to compare text")
        if number in (float("inf"), float("-inf")):  # 1e400: every row is less
            raise _WhereError(clause, f"{v} is beyond a double")
        return number
    return v


def _typed(value, column: str, types: dict, clause: str):
    """``value`` as a scalar of ``column``'s type when that is a timestamp or a date and the
    value is text: Arrow compares timestamps only with timestamps of the same zone."""
    import pyarrow as pa

    t = types.get(column)
    if t is None or not isinstance(value, str) or not (pa.types.is_timestamp(t) or pa.types.is_date(t)):
        return value
    import pandas as pd

    try:
        if value.strip().lower() in ("now", "today"):  # pandas reads them as this machine's local clock
            raise ValueError(value)
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise _WhereError(clause, f"{value!r} is not a time for the {t} column {column!r} (write e.g. "
                                  "'2026-01-12' or '2026-01-12T06:00:00Z')") from None
    if pa.types.is_date(t):
        return pa.scalar(stamp.date(), t)
    if t.tz is not None:
        stamp = stamp.tz_localize(t.tz) if stamp.tzinfo is None else stamp.tz_convert(t.tz)
    elif stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    try:
        exact = pa.scalar(stamp, pa.timestamp("ns", t.tz))
    except (OverflowError, pa.ArrowInvalid):  # past 2262 (a "never" of 9999-12-31): in the column's own unit
        return _beyond_ns(stamp, t, column, clause)
    try:
        return exact.cast(t)
    except pa.ArrowInvalid:  # finer than the column's unit ('...00.0005' for milliseconds): compare exactly
        return exact


def _beyond_ns(stamp, t, column: str, clause: str):
    """The time ``stamp``, which nanoseconds cannot hold (before 1677 or after 2262), as a scalar
    of the column's type ``t``, whose coarser unit can."""
    import numpy as np
    import pyarrow as pa

    utc = stamp if stamp.tzinfo is None else stamp.tz_convert("UTC").tz_localize(None)
    value = utc.to_datetime64()
    if t.unit == "ns" or value.astype(f"datetime64[{t.unit}]") != value:
        raise _WhereError(clause, f"{str(stamp)!r} is past what the {t} column {column!r} can hold "
                                  "(nanoseconds: 1677-09-21 to 2262-04-11), or finer than its unit: compare it with "
                                  "a time in that range")
    return pa.scalar(int(value.astype(f"datetime64[{t.unit}]").astype(np.int64)), t)


def _check_kind(tok, column: str, types: dict, clause: str) -> None:
    """Refuse a value written as one kind for a column of another, with the fix in the user's own
    words: ``shard = 07`` on a text partition key (Arrow: "no kernel matching (string, int8)", and
    the hint then said ``--where "shard = '7'"``, which matches no ``shard=07`` folder), or an
    unquoted word such as ``1_000`` for a number column."""
    import pyarrow as pa

    t, (kind, v) = types.get(column), tok
    if t is None or kind not in ("word", "str"):
        return
    number = kind == "word" and _NUMBER.fullmatch(v) is not None
    boolean = kind == "word" and v.lower() in ("true", "false")
    if (pa.types.is_string(t) or pa.types.is_large_string(t)) and (number or boolean):
        raise _WhereError(clause, f"the column {column!r} is text ({t}), and "
                                  f"{v} unquoted is a {'number' if number else 'boolean'}: quote it to compare "
                                  f"text, as in --where \"{column} = '{v}'\"")
    if (pa.types.is_timestamp(t) or pa.types.is_date(t)) and (number or boolean):
        raise _WhereError(clause, f"the column {column!r} is a time ({t}), and {v} unquoted is a "
                                  f"{'number' if number else 'boolean'}: compare it with a quoted time, as in "
                                  f"{column} >= '2026-01-12' or '2026-01-12T06:00:00Z'")
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)) and not number:
        shown = f"'{v}'" if kind == "str" else v
        what = "a boolean" if boolean else "text (quoted)" if kind == "str" else "text"
        raise _WhereError(clause, f"the column {column!r} is a number ({t}), and {shown} is {what}: write a "
                                  "number unquoted, in digits (12, -1.5, 2e3)")


def _where_one(toks: list, clause: str, pc, types: dict):
    if not toks or toks[0][0] not in ("word", "str"):
        raise _WhereError(clause, "each condition starts with a column name")
    col = pc.field(toks[0][1])
    rest = toks[1:]
    words = [v.lower() if k == "word" else None for k, v in rest]
    if words in (["is", "null"], ["is", "not", "null"]):
        return col.is_null() if len(words) == 2 else col.is_valid()
    if len(rest) == 2 and rest[0][0] == "op" and rest[0][1] in _WHERE_OPS:
        _check_kind(rest[1], toks[0][1], types, clause)
        value = _typed(_literal(rest[1], clause), toks[0][1], types, clause)
        return getattr(pc, _WHERE_OPS[rest[0][1]])(col, pc.scalar(value))
    negate = words[:1] == ["not"]
    body = rest[1:] if negate else rest
    if (len(body) >= 3 and body[0][0] == "word" and body[0][1].lower() == "in" and body[1] == ("op", "(")
            and body[-1] == ("op", ")")):
        items = body[2:-1]
        values = [_typed(_literal(t, clause), toks[0][1], types, clause) for t in items[0::2]]
        if not values or any(t != ("op", ",") for t in items[1::2]) or len(items) % 2 == 0:
            raise _WhereError(clause, "write a list as (A, B, C)")
        import pyarrow as pa

        if any(isinstance(v, pa.Scalar) and v.type != types.get(toks[0][1]) for v in values):
            raise _WhereError(clause, f"a time in the list is finer than the {types.get(toks[0][1])} column "
                                      f"{toks[0][1]!r} holds, so it matches no row: drop the extra digits")
        kinds = {float if type(v) is int else (v.type if isinstance(v, pa.Scalar) else type(v)) for v in values}
        if len(kinds) > 1:  # (1 and 2.5 are both numbers)
            raise _WhereError(clause, f"the values {values!r} mix types: quote them all to compare text")
        for t in items[0::2]:
            _check_kind(t, toks[0][1], types, clause)
        e = col.isin(pa.array([v.as_py() if isinstance(v, pa.Scalar) else v for v in values],
                              values[0].type if isinstance(values[0], pa.Scalar) else None))
        return ~e if negate else e
    shown = " ".join("'" + str(v).replace("'", "''") + "'" if k == "str" else str(v) for k, v in toks)
    lowered = [v.lower() if k == "word" else None for k, v in toks]
    hint = ""
    if "or" in lowered:
        hint = ("; 'or' is not supported: for values of one column write COLUMN in (A, B), and conditions "
                "that must all hold are joined by 'and' (or given as more than one --where)")
    elif "between" in lowered:
        hint = "; 'between' is not supported: write COLUMN >= A and COLUMN <= B"
    elif "like" in lowered:
        hint = "; 'like' is not supported: list the values, COLUMN in (A, B)"
    elif len(rest) > 2 and rest[0][0] == "op" and rest[0][1] in _WHERE_OPS and all(k == "word" for k, _ in rest[1:]):
        hint = (f"; quote text that has spaces in it: {toks[0][1]} {rest[0][1]} "
                f"'{' '.join(str(v) for _, v in rest[1:])}'")
    raise _WhereError(clause, f"cannot read the condition {shown!r}{hint}")
