"""Tests for geryon.ndb: attrdb(6) parsing, line binding, database= files and
ndb/query output, checked against Inferno's attrdb.b and query.b."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geryon.ndb import (
    Database,
    Entry,
    NdbError,
    Pair,
    parse_text,
    query,
    query_main,
    quote,
)

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "200"))

# The seed's /lib/ndb/cluster, trailing spaces and all.
CLUSTER = (
    "name=d0.mbox kfs \n"
    "  master=host0!chunk0 \n"
    "  replica=d0.replica\n"
    "\n"
    "name=d1.mbox kfs \n"
    "  master=host0!chunk1 \n"
    "  replica=d1.replica\n"
    "\n"
    "name=d0.replica kfs \n"
    "  master=host1!chunk0 replica\n"
    "\n"
    "name=d1.replica kfs \n"
    "  master=host1!chunk1 replica\n"
)

# attrdb(6)'s example.
PEOPLE = """\
name='Paul Wilson' business company='Fruitbat Villas Ltd'
   title='Key Grip'
   address='39 Willis Street, York' tel='+44 1904 20927'
   address='On the road' tel='+44 7904 169 704'
name='James Mason' personal=
   address='10 St James''s, East Grinstead' tel='01342 7674'
"""


@pytest.fixture
def cluster() -> Database:
    return Database.from_text(CLUSTER, "cluster")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- tokenizer -------------------------------------------------------------


def test_bare_attributes_continuation_and_trailing_spaces(cluster: Database) -> None:
    entries = list(cluster)
    assert len(entries) == 4
    first = entries[0]
    assert first.lines == (
        (Pair("name", "d0.mbox"), Pair("kfs", "")),
        (Pair("master", "host0!chunk0"),),
        (Pair("replica", "d0.replica"),),
    )
    assert first.lineno == 1 and first.file == "cluster"
    assert entries[2].lines[1] == (Pair("master", "host1!chunk0"), Pair("replica", ""))
    assert first.get("kfs") == ""
    assert first.get("missing") is None
    assert entries[3].values("replica") == [""]


def test_attrdb6_example() -> None:
    paul, james = parse_text(PEOPLE, "people")
    assert paul.get("name") == "Paul Wilson"
    assert paul.get("business") == ""
    assert paul.get("company") == "Fruitbat Villas Ltd"
    assert paul.values("address") == ["39 Willis Street, York", "On the road"]
    assert james.get("personal") == ""
    assert james.get("address") == "10 St James's, East Grinstead"
    assert len(paul.lines) == 4 and len(james.lines) == 2


def test_attrdb6_line_binding() -> None:
    db = Database.from_text(PEOPLE)
    # The tel on the address's own line first, then tels on other lines.
    assert db.lookup("address", "On the road", "tel") == ["+44 7904 169 704", "+44 1904 20927"]
    assert db.lookup("address", "39 Willis Street, York", "tel") == [
        "+44 1904 20927",
        "+44 7904 169 704",
    ]
    # A line without rattr contributes nothing; a line holding the pair but
    # not rattr does not bind.
    assert db.lookup("name", "Paul Wilson", "tel") == ["+44 1904 20927", "+44 7904 169 704"]
    assert db.lookup("name", "Paul Wilson", "nope") == []


@pytest.mark.parametrize(
    ("line", "pairs"),
    [
        ("a=1 b=2\n", [("a", "1"), ("b", "2")]),
        ("a b c\n", [("a", ""), ("b", ""), ("c", "")]),
        ("a= \n", [("a", "")]),
        ('a=\'x y\' b="p ""q"""\n', [("a", "x y"), ("b", 'p "q"')]),
        ("a='it''s'\n", [("a", "it's")]),
        ("a='#=\"' b\n", [("a", '#="'), ("b", "")]),
        ("'odd name'=v\n", [("odd name", "v")]),
        ("a=b#c d\n", [("a", "b")]),
        ("a=b # c\n", [("a", "b")]),
        ("a=''\n", [("a", "")]),
        ("a '' b\n", [("a", ""), ("b", "")]),  # a quoted empty word is no word
        ("a\tb=c\n", [("a", ""), ("b", "c")]),
        ("a=x'y z'w\n", [("a", "xy zw")]),  # quotes join a word
        ("a=b\r\n", [("a", "b\r")]),  # only \n ends a line
        # Inferno quirks kept: x= is lost to y=, and a pending second word is
        # dropped when the line does not end in white space.
        ("x=y=z\n", [("y", "z")]),
        ("a= b\n", [("a", "b")]),  # "attr=" takes the next word as its value
        ("a= b=c\n", [("b", "c")]),
        ("a b", [("a", "")]),
        ("a b#c\n", [("a", "")]),
        ("a=b c", [("a", "b"), ("c", "")]),
    ],
)
def test_tokenizer(line: str, pairs: list[tuple[str, str]]) -> None:
    (entry,) = parse_text(line)
    assert entry.pairs == [Pair(a, v) for a, v in pairs]


def test_comments_and_blank_lines_do_not_end_an_entry() -> None:
    text = (
        "  orphan=1\n"  # before any entry: never part of one
        "# leading comment\n"
        "a=1\n"
        "\n"
        "# a comment inside\n"
        "\tb=2 # trailing comment\n"
        "   \n"
        "  c=3\n"
        "d=4\n"
    )
    first, second = parse_text(text)
    assert first.pairs == [Pair("a", "1"), Pair("b", "2"), Pair("c", "3")]
    assert len(first.lines) == 3
    assert first.lineno == 3 and second.lineno == 9
    assert second.pairs == [Pair("d", "4")]


def test_entry_with_no_pairs_is_dropped() -> None:
    assert parse_text("''\n  # nothing\na=1\n") == [Entry(((Pair("a", "1"),),))]


def test_errors_name_file_and_line() -> None:
    with pytest.raises(NdbError, match=r"^cluster:3: unterminated quote$"):
        parse_text("a=1\n  b=2\n  c='oops\n", "cluster")
    with pytest.raises(NdbError, match=r"^f:1: empty attribute name$"):
        parse_text("=x\n", "f")
    # Inferno drops the bad line and carries on.
    (entry,) = parse_text("a=1\n  c='oops\n  d=2\n", "cluster", strict=False)
    assert entry.pairs == [Pair("a", "1"), Pair("d", "2")]


def test_unreadable_top_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(NdbError, match=rf"^{missing}: cannot open: "):
        Database.open(missing)


def test_error_in_listed_file_names_it(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad", "x=1\n\ny='\n")
    top = write(tmp_path / "top", f"database=\n  file={bad}\n")
    with pytest.raises(NdbError, match=rf"^{bad}:3: unterminated quote$"):
        Database.open(top)


# --- database= ---------------------------------------------------------------


def test_database_files_in_order_missing_skipped(tmp_path: Path) -> None:
    f1 = write(tmp_path / "file1", "n=1\n")
    f3 = write(tmp_path / "file3", "n=3\n")
    top = tmp_path / "top"
    write(
        top,
        f"database=\n   file={f1}\n   file={tmp_path / 'file2'}\n   file={top}\n   file={f3}\n"
        "n=top\n",
    )
    db = Database.open(str(top))
    assert [e.get("n") for e in db.find("n")] == ["1", "top", "3"]
    assert db.files() == [f1, top, f3]
    assert db.files(missing=True) == [top, f1, tmp_path / "file2", f3]
    assert [e.file for e in db.find("n")] == [str(f1), str(top), str(f3)]


def test_database_top_file_first_when_not_listed(tmp_path: Path) -> None:
    f1 = write(tmp_path / "file1", "n=1\n")
    top = write(tmp_path / "top", f"n=top\ndatabase\n  file={f1}\n")
    db = Database.open(top)
    assert [e.get("n") for e in db.find("n")] == ["top", "1"]


def test_database_value_must_be_empty(tmp_path: Path) -> None:
    f1 = write(tmp_path / "file1", "n=1\n")
    top = write(tmp_path / "top", f"database=x file={f1}\nn=top\n")
    assert [e.get("n") for e in Database.open(top).find("n")] == ["top"]


def test_relative_names_resolve_against_cwd(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "local", "n=sub\n")
    write(tmp_path / "local", "n=cwd\n")
    top = write(sub / "top", "database=\n  file=local\n")
    monkeypatch.chdir(tmp_path)
    assert [e.get("n") for e in Database.open(top).find("n")] == ["cwd"]


def test_top_file_matched_by_exact_name(tmp_path: Path, monkeypatch) -> None:
    # As in Db.open, "./top" is not the string "top": the file is read twice.
    write(tmp_path / "top", "database=\n  file=./top\nn=1\n")
    monkeypatch.chdir(tmp_path)
    assert [e.get("n") for e in Database.open("top").find("n")] == ["1", "1"]
    assert [e.get("n") for e in Database.open("./top").find("n")] == ["1"]


def test_changed(tmp_path: Path) -> None:
    f1 = write(tmp_path / "file1", "n=1\n")
    late = tmp_path / "late"
    top = tmp_path / "top"
    write(top, f"database=\n  file={top}\n  file={f1}\n  file={late}\n")
    db = Database.open(top)
    assert not db.changed()
    write(f1, "n=1 m=2\n")
    assert db.changed()
    db = Database.open(top)
    assert not db.changed()
    write(late, "n=late\n")  # a listed file appearing is a change too
    assert db.changed()
    assert not Database.from_text("a=1\n").changed()


# --- quote -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("", "''"),
        ("abc", "abc"),
        ("a b", "'a b'"),
        ("it's", "'it''s'"),
        ("a\tb", "'a\tb'"),
        ("\x01", "'\x01'"),
        ("a=b", "a=b"),
        ("a#b", "a#b"),
        ('a"b', 'a"b'),
        ("host0!chunk0", "host0!chunk0"),
        ("\x7f", "\x7f"),
        ("é", "é"),
        ("ab\0cd", "ab"),  # %q formats a C string
    ],
)
def test_quote(word: str, quoted: str) -> None:
    assert quote(word) == quoted


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.text(st.sampled_from(list("ab =#'\"\t\r\x01é")) | st.characters(blacklist_characters="\0\n"))
)
def test_quote_round_trips_through_tokenizer(word: str) -> None:
    q = quote(word)
    if q == word and any(c in word for c in '=#"'):
        return  # %q leaves these bare; ndb cannot read them back unquoted
    (entry,) = parse_text(f"a={q}\n")
    assert entry.pairs == [Pair("a", word)]


# --- query -----------------------------------------------------------------


def test_query_rattr(cluster: Database) -> None:
    assert query(cluster, "kfs", "", "name", all=True) == [
        "d0.mbox",
        "d1.mbox",
        "d0.replica",
        "d1.replica",
    ]
    assert query(cluster, "kfs", "", "name") == ["d0.mbox"]
    assert query(cluster, "replica", "", "name", all=True) == ["d0.replica", "d1.replica"]
    assert query(cluster, "name", "d0.mbox", "replica") == ["d0.replica"]
    # The bound value is a bare attribute: %q prints it as ''.
    assert query(cluster, "master", "host1!chunk0", "replica") == ["''"]
    assert query(cluster, "name", "d0.mbox", "nothing") == []
    assert query(cluster, "name", "d0.mbox", "") == [
        "name=d0.mbox kfs='' master=host0!chunk0 replica=d0.replica"
    ]


def test_query_whole_entries(cluster: Database) -> None:
    assert query(cluster, "name", "d0.mbox") == [
        "name=d0.mbox kfs='' master=host0!chunk0 replica=d0.replica"
    ]
    assert query(cluster, "kfs") == ["name=d0.mbox kfs='' master=host0!chunk0 replica=d0.replica"]
    assert query(cluster, "replica", "", all=True) == [
        "name=d0.replica kfs='' master=host1!chunk0 replica=''",
        "name=d1.replica kfs='' master=host1!chunk1 replica=''",
    ]
    assert query(cluster, "replica", all=True)[3] == (
        "name=d1.replica kfs='' master=host1!chunk1 replica=''"
    )
    assert len(query(cluster, "", all=True)) == 4  # nil attr: every entry
    assert query(cluster, "name", "nope") == []


def test_query_people() -> None:
    db = Database.from_text(PEOPLE)
    assert query(db, "name", "James Mason") == [
        "name='James Mason' personal='' address='10 St James''s, East Grinstead' tel='01342 7674'"
    ]
    assert query(db, "address", "On the road", "tel", all=True) == [
        "'+44 7904 169 704'",
        "'+44 1904 20927'",
    ]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = query_main(argv, out, err)
    return status, out.getvalue(), err.getvalue()


def test_query_main(tmp_path: Path) -> None:
    f = write(tmp_path / "cluster", CLUSTER)
    assert run(["-a", "-f", str(f), "kfs", "", "name"]) == (
        0,
        "d0.mbox\nd1.mbox\nd0.replica\nd1.replica\n",
        "",
    )
    assert run(["-af", str(f), "kfs", "", "name"])[1].count("\n") == 4
    assert run([f"-f{f}", "name", "d1.mbox"]) == (
        0,
        "name=d1.mbox kfs='' master=host0!chunk1 replica=d1.replica\n",
        "",
    )
    assert run(["-f", str(f), "--", "name", "nope"]) == (1, "", "")


def test_query_main_errors(tmp_path: Path) -> None:
    status, out, err = run(["-f", str(tmp_path / "nope"), "name"])
    assert (status, out) == (1, "")
    assert err.startswith(f"geryon ndb query: {tmp_path / 'nope'}: cannot open: ")
    assert err.count("\n") == 1
    bad = write(tmp_path / "bad", "a='x\n")
    assert run(["-f", str(bad), "a"]) == (1, "", f"geryon ndb query: {bad}:1: unterminated quote\n")
    for argv in ([], ["-x", "a"], ["-f"], ["-a"]):
        status, out, err = run(argv)
        assert (status, out) == (1, "") and err.startswith("usage: geryon ndb query ")


# --- fuzz ------------------------------------------------------------------

_TEXT = st.text(st.sampled_from(list(" \t\n\r#'\"=ab")) | st.characters(), max_size=300)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_TEXT, st.booleans())
def test_parser_returns_entries_or_ndberror(text: str, strict: bool) -> None:
    try:
        entries = parse_text(text, "fuzz", strict=strict)
    except NdbError as e:
        assert strict
        assert str(e).startswith("fuzz:")
        return
    assert all(isinstance(e, Entry) and e.lines and all(e.lines) for e in entries)
    db = Database(files=[("fuzz", entries)])
    for e in entries:
        for p in e.pairs:
            assert p.attr  # Inferno never makes an empty attribute name
            assert query(db, p.attr, p.value)
            assert query(db, p.attr, p.value, p.attr, all=True)
