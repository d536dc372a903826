"""Output schemas for grouped-map functions.

``apply`` accepts the schema three ways: a :class:`pyarrow.Schema`, a mapping
of column name to type (a pyarrow type or a type name), or the DDL string a
Spark user already has (``"app string, site string, m double"``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import pyarrow as pa

from .exceptions import SchemaError

__all__ = ["parse_schema", "parse_type"]

_SIMPLE = {
    "string": pa.string(), "str": pa.string(), "varchar": pa.string(), "char": pa.string(),
    "double": pa.float64(), "float64": pa.float64(), "float": pa.float32(),
    "float32": pa.float32(), "real": pa.float32(),
    "bigint": pa.int64(), "long": pa.int64(), "int64": pa.int64(),
    "int": pa.int32(), "integer": pa.int32(), "int32": pa.int32(),
    "smallint": pa.int16(), "short": pa.int16(), "int16": pa.int16(),
    "tinyint": pa.int8(), "byte": pa.int8(), "int8": pa.int8(),
    "boolean": pa.bool_(), "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"), "timestamp_ntz": pa.timestamp("us"),
    "date": pa.date32(), "binary": pa.binary(), "bytes": pa.binary(),
}


def parse_type(text: str, *, column: str = "?") -> pa.DataType:
    """Turn a type name (Spark DDL or pyarrow spelling) into a pyarrow type.

    >>> parse_type("double")
    DataType(double)
    >>> parse_type("array<bigint>")
    ListType(list<item: int64>)
    """
    t = text.strip().lower()
    if t in _SIMPLE:
        return _SIMPLE[t]
    m = re.fullmatch(r"decimal\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", t)
    if m:
        return pa.decimal128(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"(?:array|list)\s*<(.+)>", t)
    if m:
        return pa.list_(parse_type(m.group(1), column=column))
    raise SchemaError(
        f"Unknown type {text!r} for column {column!r}. Use a Spark DDL type "
        f"({', '.join(sorted(k for k in _SIMPLE if k.isalpha()))}, decimal(p,s), "
        "array<type>) or a pyarrow type."
    )


def _split_top_level(ddl: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in ddl:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_schema(schema: pa.Schema | Mapping | str) -> pa.Schema:
    """Normalise a user-given output schema to a :class:`pyarrow.Schema`.

    >>> parse_schema("app string, m double").names
    ['app', 'm']
    >>> parse_schema({"app": "string", "n": "bigint"}).field("n").type
    DataType(int64)
    """
    if isinstance(schema, pa.Schema):
        out = schema
    elif isinstance(schema, Mapping):
        fields = []
        for name, typ in schema.items():
            if isinstance(typ, str):
                typ = parse_type(typ, column=str(name))
            elif not isinstance(typ, pa.DataType):
                try:
                    typ = pa.from_numpy_dtype(typ)
                except (TypeError, NotImplementedError) as err:
                    raise SchemaError(
                        f"Column {name!r} has type {typ!r}, which is not a pyarrow type, "
                        "a numpy dtype or a type name such as 'double'."
                    ) from err
            fields.append(pa.field(str(name), typ))
        out = pa.schema(fields)
    elif isinstance(schema, str):
        fields = []
        for item in _split_top_level(schema):
            bits = item.split(None, 1)
            if len(bits) != 2:
                raise SchemaError(
                    f"Cannot read {item!r} in schema {schema!r}: each column is "
                    "'name type', separated by commas, e.g. 'app string, m double'."
                )
            name = bits[0].strip("`")
            fields.append(pa.field(name, parse_type(bits[1], column=name)))
        out = pa.schema(fields)
    else:
        raise SchemaError(
            f"schema must be a pyarrow.Schema, a mapping of column to type, or a DDL "
            f"string like 'app string, m double'; got {type(schema).__name__}."
        )
    if len(out) == 0:
        raise SchemaError("The output schema has no columns.")
    if len(set(out.names)) != len(out.names):
        dup = sorted({n for n in out.names if out.names.count(n) > 1})
        raise SchemaError(f"The output schema names {dup} more than once.")
    return out
