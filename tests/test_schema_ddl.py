"""The Spark DDL that ``apply(schema=...)`` reads, string by string, against the pyarrow schema
it must give.  The expected schemas follow what Spark 4 itself reads (``_parse_datatype_string``),
with Spark's ``timestamp`` as a UTC instant and ``timestamp_ntz`` as naive time."""
from __future__ import annotations

import pyarrow as pa
import pytest

from modelfactory._schema import parse_schema, parse_type
from modelfactory.exceptions import SchemaError

F = pa.field
UTC = pa.timestamp("us", tz="UTC")

CASES = [
    # the simple spellings that worked before
    ("app string, m double", [F("app", pa.string()), F("m", pa.float64())]),
    ("APP STRING,   m    DOUBLE", [F("APP", pa.string()), F("m", pa.float64())]),
    ("`app` string", [F("app", pa.string())]),
    ("a int, b bigint, c smallint, d tinyint, e float, f real, g boolean",
     [F("a", pa.int32()), F("b", pa.int64()), F("c", pa.int16()), F("d", pa.int8()),
      F("e", pa.float32()), F("f", pa.float32()), F("g", pa.bool_())]),
    ("t timestamp, l timestamp_ltz, n timestamp_ntz, d date, b binary",
     [F("t", UTC), F("l", UTC), F("n", pa.timestamp("us")), F("d", pa.date32()), F("b", pa.binary())]),
    ("m decimal(10,2)", [F("m", pa.decimal128(10, 2))]),
    ("m decimal( 10 , 2 )", [F("m", pa.decimal128(10, 2))]),
    ("m array<bigint>", [F("m", pa.list_(pa.int64()))]),
    ("m Array< Double >", [F("m", pa.list_(pa.float64()))]),
    ("m array<array<double>>", [F("m", pa.list_(pa.list_(pa.float64())))]),
    ("m list<int64>, x float64", [F("m", pa.list_(pa.int64())), F("x", pa.float64())]),  # pyarrow spellings
    ("n uint64, u uint8, h float16", [F("n", pa.uint64()), F("u", pa.uint8()), F("h", pa.float16())]),
    ("m varchar, c char", [F("m", pa.string()), F("c", pa.string())]),
    # name: type, as Spark also reads it
    ("app: string, m: double", [F("app", pa.string()), F("m", pa.float64())]),
    ("app:string,m:double", [F("app", pa.string()), F("m", pa.float64())]),
    ("`my col` :double", [F("my col", pa.float64())]),
    # backticked names
    ("app string, `my col` double", [F("app", pa.string()), F("my col", pa.float64())]),
    ("`a,b` double, `c:d` int", [F("a,b", pa.float64()), F("c:d", pa.int32())]),
    ("`a``b` int, `<x>` string", [F("a`b", pa.int32()), F("<x>", pa.string())]),
    ("`not` int, comment string", [F("not", pa.int32()), F("comment", pa.string())]),
    # maps and structs, nested
    ("m map<string,int>", [F("m", pa.map_(pa.string(), pa.int32()))]),
    ("m map<string, array<double>>", [F("m", pa.map_(pa.string(), pa.list_(pa.float64())))]),
    ("m struct<a:int,b:string>", [F("m", pa.struct([F("a", pa.int32()), F("b", pa.string())]))]),
    ("m struct<a int, b string>", [F("m", pa.struct([F("a", pa.int32()), F("b", pa.string())]))]),
    ("m struct<>", [F("m", pa.struct([]))]),
    ("m array<struct<a:int, `b c`:array<double>>>",
     [F("m", pa.list_(pa.struct([F("a", pa.int32()), F("b c", pa.list_(pa.float64()))])))]),
    ("m map<string, struct<x: double, y: map<int, string>>>",
     [F("m", pa.map_(pa.string(), pa.struct([F("x", pa.float64()), F("y", pa.map_(pa.int32(), pa.string()))])))]),
    # decimal without precision, and its synonyms
    ("m decimal", [F("m", pa.decimal128(10, 0))]),
    ("m DEC, n numeric", [F("m", pa.decimal128(10, 0)), F("n", pa.decimal128(10, 0))]),
    ("m dec(5,2), n numeric(7), o decimal(38, 38)",
     [F("m", pa.decimal128(5, 2)), F("n", pa.decimal128(7, 0)), F("o", pa.decimal128(38, 38))]),
    # char/varchar with a length are strings (the length is not enforced)
    ("m varchar(10), c char(3)", [F("m", pa.string()), F("c", pa.string())]),
    # NOT NULL and COMMENT
    ("app string not null, m double", [F("app", pa.string(), nullable=False), F("m", pa.float64())]),
    ("m double NOT NULL", [F("m", pa.float64(), nullable=False)]),
    ("m double comment 'the mean'", [F("m", pa.float64(), metadata={"comment": "the mean"})]),
    ('m double COMMENT "a, b: <c>"', [F("m", pa.float64(), metadata={"comment": "a, b: <c>"})]),
    ("m double comment 'it''s', n int comment 'it\\'s'",
     [F("m", pa.float64(), metadata={"comment": "it's"}), F("n", pa.int32(), metadata={"comment": "it's"})]),
    ("m double not null comment 'x', n int",
     [F("m", pa.float64(), nullable=False, metadata={"comment": "x"}), F("n", pa.int32())]),
    ("m struct<a: int not null comment 'c', b string>",
     [F("m", pa.struct([F("a", pa.int32(), nullable=False, metadata={"comment": "c"}), F("b", pa.string())]))]),
]


@pytest.mark.parametrize(("ddl", "fields"), CASES, ids=[c[0] for c in CASES])
def test_ddl_gives_exactly_this_schema(ddl, fields):
    got, want = parse_schema(ddl), pa.schema(fields)
    assert got.equals(want, check_metadata=True), f"{ddl!r}:\n{got}\n!=\n{want}"


def test_the_comment_is_kept_and_nothing_else_is_added():
    plain = parse_schema("m double")
    assert plain.field("m").metadata is None and plain.metadata is None
    assert not parse_schema("m double comment 'x'").equals(plain, check_metadata=True)


def test_mappings_and_pyarrow_schemas_are_unchanged_and_take_nested_type_names():
    s = pa.schema([F("a", pa.string()), F("b", pa.float64(), nullable=False)])
    assert parse_schema(s) is s
    got = parse_schema({"app": "string", "n": "bigint", "m": pa.float32(), "k": "map<string, array<decimal>>"})
    want = pa.schema([F("app", pa.string()), F("n", pa.int64()), F("m", pa.float32()),
                      F("k", pa.map_(pa.string(), pa.list_(pa.decimal128(10, 0))))])
    assert got.equals(want, check_metadata=True)
    assert parse_type("struct<a:int, b:string>") == pa.struct([F("a", pa.int32()), F("b", pa.string())])


BAD = [
    ("app string,", "Cannot read schema 'app string,': expected a column name, but the schema ends"),
    ("app string , m double ,", "expected a column name, but the schema ends"),
    (",", "expected a column name, but found ','"),
    ("app", "Cannot read column 'app' in schema 'app': expected a type after the column name, but the schema ends"),
    ("app: ", "column 'app'.*expected a type after the column name"),
    ("app strin", "Unknown type 'strin' for column 'app'. Use a Spark DDL type .*map<key,value>"),
    ("app string, m dubble", "Unknown type 'dubble' for column 'm'"),
    ("m array<dubble>", "Unknown type 'dubble' in 'array<dubble>' for column 'm'"),
    ("m struct<a:int, b:dubble> not null", "Unknown type 'dubble' in 'struct<a:int, b:dubble>' for column 'm'"),
    ("m interval day", "Unknown type 'interval' in 'interval day' for column 'm'"),
    ("m map<string>", "column 'm'.*map<key,value>.*found '>'"),
    ("m map<string,>", "column 'm'.*expected a type, but found '>'"),
    ("m array<int", "column 'm'.*expected '>' to close 'array<', but the schema ends"),
    ("m array<array<int>, n int", "column 'm'.*expected '>' to close 'array<', but found ','"),
    ("m struct<a:int", "column 'm'.*expected ',' or '>' to close 'struct<'"),
    ("m array<int>>", "column 'm'.*expected ',' or the end after the type.*found '>'"),
    ("m decimal(10,2", "column 'm'.*expected '\\)' to close 'decimal\\('"),
    ("m decimal(39,0)", "decimal\\(39,0\\) is out of range"),
    ("m decimal(5,6)", "decimal\\(5,6\\) is out of range"),
    ("m decimal(x)", "expected a whole number, but found 'x'"),
    ("app string m double", "column 'app'.*expected ',' or the end after the type.*found 'm'"),
    ("m double comment 'x' not null", "column 'm'.*found 'not'"),  # Spark wants NOT NULL before COMMENT
    ("m double not", "expected NULL after NOT, but the schema ends"),
    ("m double comment x", "expected a quoted text after COMMENT, but found 'x'"),
    ("`my col string", "the '`' at position 0 is never closed"),
    ("m double comment 'x", "the \"'\" at position 17 is never closed"),
    ("a int, b double, a string", "The output schema names \\['a'\\] more than once"),
    ("m struct<a:int, a:string>", "column 'm'.*the struct names \\['a'\\] more than once"),
    ("", "The output schema has no columns"),
]


@pytest.mark.parametrize(("ddl", "message"), BAD, ids=[b[0] or "empty" for b in BAD])
def test_malformed_ddl_is_refused_with_a_message_naming_the_problem(ddl, message):
    with pytest.raises(SchemaError, match=message):
        parse_schema(ddl)


def test_a_bad_type_in_a_mapping_names_the_column_and_the_type():
    with pytest.raises(SchemaError, match="Unknown type 'dubble' for column 'm'"):
        parse_schema({"m": "dubble"})
    with pytest.raises(SchemaError, match="Cannot read the type 'array<int' of column 'm': expected '>'"):
        parse_schema({"m": "array<int"})
    with pytest.raises(SchemaError, match="the type 'double not null' of column 'm': expected the end of the type"):
        parse_schema({"m": "double not null"})
