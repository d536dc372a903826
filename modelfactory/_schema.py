"""Output schemas for grouped-map functions.

``apply`` accepts the schema three ways: a :class:`pyarrow.Schema`, a mapping
of column name to type (a pyarrow type or a type name), or the DDL string a
Spark user already has (``"app string, site string, m double"``).

The DDL is read as Spark reads it: ``name [:] type [NOT NULL] [COMMENT 'text']``
per column, comma-separated; names may be backticked (```my col```, with ````
for a backtick); types nest (``array<struct<a:int,b:string>>``,
``map<string,array<double>>``). A comment is kept in the field's metadata
under ``comment``, as Spark keeps it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple, NoReturn

import pyarrow as pa

from .exceptions import SchemaError

__all__ = ["parse_schema", "parse_type", "plain_type"]

_SIMPLE = {
    "string": pa.string(), "str": pa.string(), "varchar": pa.string(), "char": pa.string(),
    "double": pa.float64(), "float64": pa.float64(), "float": pa.float32(),
    "float32": pa.float32(), "real": pa.float32(),
    "bigint": pa.int64(), "long": pa.int64(), "int64": pa.int64(),
    "int": pa.int32(), "integer": pa.int32(), "int32": pa.int32(),
    "smallint": pa.int16(), "short": pa.int16(), "int16": pa.int16(),
    "tinyint": pa.int8(), "byte": pa.int8(), "int8": pa.int8(),
    # pyarrow's (numpy's) names for the types Spark lacks
    "uint64": pa.uint64(), "uint32": pa.uint32(), "uint16": pa.uint16(), "uint8": pa.uint8(),
    "float16": pa.float16(),
    "boolean": pa.bool_(), "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"), "timestamp_ltz": pa.timestamp("us", tz="UTC"),
    "timestamp_ntz": pa.timestamp("us"),
    "date": pa.date32(), "binary": pa.binary(), "bytes": pa.binary(),
}
_ACCEPTED = (
    "Use a Spark DDL type ("
    + ", ".join(sorted(k for k in _SIMPLE if not any(c.isdigit() for c in k)))
    + ", decimal(p,s), array<type>, map<key,value>, struct<name:type,...>) or a pyarrow type."
)
_HINT = " Each column is 'name type', separated by commas, e.g. 'app string, m double'."

_TOKEN = re.compile(r"""\s*(?:
    (?P<name>`(?:[^`]|``)*`)                                # `a name`; `` is one backtick
  | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")   # the text of a COMMENT
  | (?P<punct>[<>(),:])
  | (?P<word>[^\s<>(),:`'"]+)                               # a bare name, a type or a keyword
)""", re.VERBOSE | re.DOTALL)


class _Tok(NamedTuple):
    kind: str
    text: str
    start: int
    end: int


class _Reader:
    """A recursive-descent reader of one DDL schema (``columns``) or one type (``datatype``)."""

    def __init__(self, text: str, column: str | None = None):
        self.text, self.column, self.one_type = text, column, column is not None
        self.toks: list[_Tok] = []
        pos = 0
        while m := _TOKEN.match(text, pos):
            self.toks.append(_Tok(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup), m.end()))
            pos = m.end()
        if text[pos:].strip():
            at = len(text) - len(text[pos:].lstrip())
            self.fail(f"the {text[at]!r} at position {at} is never closed")
        self.i = 0
        self.type_start = 0

    # -- tokens ------------------------------------------------------------
    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, word: str) -> bool:
        """Consume the next token if it is ``word`` (a keyword or punctuation, any case)."""
        tok = self.peek()
        if tok is not None and tok.kind in ("word", "punct") and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def need(self, word: str, what: str) -> None:
        if not self.take(word):
            self.expected(what)

    # -- errors ------------------------------------------------------------
    def fail(self, problem: str, hint: str = "") -> NoReturn:
        if self.one_type:
            where = f"the type {self.text!r} of column {self.column!r}"
        elif self.column is None:
            where = f"schema {self.text!r}"
        else:
            where = f"column {self.column!r} in schema {self.text!r}"
        raise SchemaError(f"Cannot read {where}: {problem}.{hint}")

    def expected(self, what: str, hint: str = "") -> NoReturn:
        tok = self.peek()
        found = f"found {tok.text!r}" if tok else f"the {'type' if self.one_type else 'schema'} ends"
        self.fail(f"expected {what}, but {found}", hint)

    def unknown(self, tok: _Tok) -> NoReturn:
        """Unknown type ``tok``: name it, and the whole type of the column if that is longer."""
        depth, end = 0, tok.end
        for t in self.toks[self.type_start:]:
            if t.kind == "punct":
                depth += (t.text in "<(") - (t.text in ">)")
            if depth < 0 or (depth == 0 and (t.text == "," or t.text.lower() in ("not", "comment"))):
                break
            end = t.end
        whole = self.text[self.toks[self.type_start].start:end]
        inside = f" in {whole!r}" if whole != tok.text else ""
        raise SchemaError(f"Unknown type {tok.text!r}{inside} for column {self.column!r}. {_ACCEPTED}")

    # -- grammar -----------------------------------------------------------
    def columns(self) -> list[pa.Field]:
        """``field (',' field)*`` up to the end of the text."""
        fields = [self.field(top=True)]
        while self.take(","):
            self.column = None
            fields.append(self.field(top=True))
        if self.peek() is not None:
            self.expected("',' or the end after the type (NOT NULL and COMMENT 'text' may follow it)")
        return fields

    def field(self, top: bool = False) -> pa.Field:
        """``name [:] type [NOT NULL] [COMMENT 'text']``."""
        tok = self.peek()
        if tok is None or tok.kind not in ("word", "name"):
            self.expected("a column name" if top else "a struct field name", _HINT if top else "")
        self.i += 1
        name = tok.text[1:-1].replace("``", "`") if tok.kind == "name" else tok.text
        if top:
            self.column = name
        self.take(":")
        typ = self.datatype(top)
        nullable = not self.take("not")
        if not nullable:
            self.need("null", "NULL after NOT")
        meta = None
        if self.take("comment"):
            tok = self.peek()
            if tok is None or tok.kind != "string":
                self.expected("a quoted text after COMMENT")
            self.i += 1
            quote = tok.text[0]
            meta = {"comment": re.sub(rf"\\(.)|{quote}{quote}", lambda m: m.group(1) or quote,
                                      tok.text[1:-1], flags=re.DOTALL)}
        return pa.field(name, typ, nullable, meta)

    def datatype(self, top: bool = False) -> pa.DataType:
        tok = self.peek()
        if tok is None or tok.kind != "word":
            self.expected("a type after the column name" if top else "a type", _HINT if top else "")
        if top:
            self.type_start = self.i
        self.i += 1
        t = tok.text.lower()
        if t in ("array", "list"):
            self.need("<", f"'<' after {tok.text!r}: array<type>")
            item = self.datatype()
            self.need(">", f"'>' to close '{tok.text}<'")
            return pa.list_(item)
        if t == "map":
            self.need("<", "'<' after 'map': map<key,value>")
            key = self.datatype()
            self.need(",", "',' and a value type (a map is map<key,value>, e.g. map<string,double>)")
            value = self.datatype()
            self.need(">", "'>' to close 'map<'")
            return pa.map_(key, value)
        if t == "struct":
            self.need("<", "'<' after 'struct': struct<name:type,...>")
            fields = []
            if not self.take(">"):
                fields.append(self.field())
                while self.take(","):
                    fields.append(self.field())
                self.need(">", "',' or '>' to close 'struct<'")
            if dup := _duplicates([f.name for f in fields]):
                self.fail(f"the struct names {dup} more than once")
            return pa.struct(fields)
        if t in ("decimal", "dec", "numeric"):  # Spark: decimal is decimal(10,0), decimal(p) is decimal(p,0)
            p, s = 10, 0
            if self.take("("):
                p = self.integer()
                s = self.integer() if self.take(",") else 0
                self.need(")", f"')' to close '{tok.text}('")
            if not (1 <= p <= 38 and s <= p):
                self.fail(f"{tok.text}({p},{s}) is out of range: the precision is 1 to 38 and the scale "
                          "0 to the precision")
            return pa.decimal128(p, s)
        if t in ("varchar", "char") and self.take("("):  # the length is not enforced
            self.integer()
            self.need(")", f"')' to close '{tok.text}('")
            return pa.string()
        if t in _SIMPLE:
            return _SIMPLE[t]
        self.unknown(tok)

    def integer(self) -> int:
        tok = self.peek()
        if tok is None or not re.fullmatch(r"[0-9]+", tok.text):
            self.expected("a whole number")
        self.i += 1
        return int(tok.text)


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def parse_type(text: str, *, column: str = "?") -> pa.DataType:
    """Turn a type name (Spark DDL or pyarrow spelling) into a pyarrow type.

    >>> parse_type("double")
    DataType(double)
    >>> parse_type("array<bigint>")
    ListType(list<item: int64>)
    >>> parse_type("map<string, decimal>")
    MapType(map<string, decimal128(10, 0)>)
    """
    reader = _Reader(text, column=column)
    typ = reader.datatype()
    if reader.peek() is not None:
        reader.expected("the end of the type")
    return typ


def parse_schema(schema: pa.Schema | Mapping | str) -> pa.Schema:
    """Normalise a user-given output schema to a :class:`pyarrow.Schema`.

    >>> parse_schema("app string, m double").names
    ['app', 'm']
    >>> parse_schema("`my col`: string, m double NOT NULL").field("m")
    pyarrow.Field<m: double not null>
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
        if not schema.strip():
            raise SchemaError("The output schema has no columns." + _HINT)
        out = pa.schema(_Reader(schema).columns())
    else:
        raise SchemaError(
            f"schema must be a pyarrow.Schema, a mapping of column to type, or a DDL "
            f"string like 'app string, m double'; got {type(schema).__name__}."
        )
    if len(out) == 0:
        raise SchemaError("The output schema has no columns.")
    if dup := _duplicates(out.names):
        raise SchemaError(f"The output schema names {dup} more than once.")
    return out


def plain_type(t: pa.DataType) -> pa.DataType:
    """``t`` as its values read decoded: a dictionary type's value type, any other type itself.

    >>> plain_type(pa.dictionary(pa.int32(), pa.string())), plain_type(pa.int64())
    (DataType(string), DataType(int64))
    """
    return t.value_type if pa.types.is_dictionary(t) else t
