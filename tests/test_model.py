"""Unit tests of geryon.model: the validation rules and Find's filter.

Every rejection must be InvalidArgument with a message naming the field, so a
client can tell which part of its request was wrong.
"""

from __future__ import annotations

import codecs
import os
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geryon.errors import InvalidArgument
from geryon.model import (
    HIDDEN,
    MAX_ATTRS,
    MAX_NAME_BYTES,
    MAX_TTL_MS,
    MAX_VALUE_BYTES,
    MIN_TTL_MS,
    RESERVED_NAMES,
    Caller,
    Filter,
    Service,
    escape,
    validate_attr_name,
    validate_attrs,
    validate_filter,
    validate_name,
    validate_ttl,
)

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "50"))


def svc(name: str, **attrs: str) -> Service:
    return Service(name, attrs)


# ---- names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "tcp!host0!6701",
        "x",
        "a" * MAX_NAME_BYTES,
        "é" * (MAX_NAME_BYTES // 2),  # 254 bytes of UTF-8
        "news",  # only the exact reserved names are reserved
        "NEW",
        "héllo-wörld",
        "a\u00a0b",  # no-break space is not a control character
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a" * (MAX_NAME_BYTES + 1), "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes
        ("a b", "space"),
        ("a/b", "'/'"),
        ("/", "'/'"),
        ("a\tb", "control"),
        ("a\nb", "control"),
        ("a\x00b", "control"),
        ("a\x7fb", "control"),
        ("a\x85b", "control"),  # C1 controls count too
        ("\ud800", "UTF-8"),  # a lone surrogate has no UTF-8 form
        # Format characters: bidi overrides and isolates, zero-width ones, BOM.
        ("a\u202eb", "holds U+202E, a format character"),
        ("a\u202ab", "holds U+202A, a format character"),
        ("\u2066a", "holds U+2066, a format character"),
        ("a\u200bb", "holds U+200B, a format character"),
        ("a\u200db", "holds U+200D, a format character"),
        ("\ufeffa", "holds U+FEFF, a format character"),
        ("a\u00adb", "holds U+00AD, a format character"),  # soft hyphen: invisible
        ("a\U000e0041", "holds U+E0041, a format character"),  # a tag character
        ("a\u2028b", "holds U+2028, a line separator"),
        ("a\u2029b", "holds U+2029, a paragraph separator"),
        ("a\x1b[31m", "holds U+001B, a control character"),
        *((r, "reserved") for r in sorted(RESERVED_NAMES)),
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_name(name)
    assert str(info.value).startswith("name: ")
    assert why in str(info.value)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_a_valid_name_holds_nothing_hidden(name: str) -> None:
    try:
        validate_name(name)
    except InvalidArgument as exc:
        assert "\n" not in str(exc)  # the name shows escaped, in repr
        return
    assert not any(unicodedata.category(ch) in HIDDEN for ch in name)
    assert escape(name) == name.replace("\\", "\\\\")


def test_name_error_names_the_given_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^service\.name: "):
        validate_name("", "service.name")


# ---- text for a terminal -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("", ""),
        ("tcp!h0!1 é", "tcp!h0!1 é"),  # printable text as it is, spaces and all
        ("a\\b", r"a\\b"),  # a backslash doubled: the escapes stay unambiguous
        ("x\nforged 1 2", r"x\nforged 1 2"),
        ("\r\t", r"\r\t"),
        ("a\0b", r"a\x00b"),  # the whole value shows, past the NUL
        ("\x1b[31m\x7f\x85", r"\x1b[31m\x7f\x85"),
        ("\u202eevil\u2066\u200b\ufeff", r"\u202eevil\u2066\u200b\ufeff"),
        ("\u2028\u2029", r"\u2028\u2029"),
        ("\U000e0041", r"\U000e0041"),
        ("\udc80", r"\udc80"),  # a lone surrogate would not even print
        ("a\u00a0b", "a\u00a0b"),  # visible white space is left to quoting
    ],
)
def test_escape(text: str, shown: str) -> None:
    assert escape(text) == shown


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text())
def test_escape_is_one_line_and_reads_back(text: str) -> None:
    shown = escape(text)
    assert shown.splitlines() in ([shown], [])
    assert not any(unicodedata.category(ch) in HIDDEN for ch in shown)
    assert codecs.decode(shown.encode("raw_unicode_escape"), "unicode_escape") == text


# ---- attributes --------------------------------------------------------------


@pytest.mark.parametrize("attr", ["a", "A-Z_0.9", "x" * 64, "proto", "sys.name"])
def test_valid_attr_names(attr: str) -> None:
    assert validate_attr_name(attr) == attr


@pytest.mark.parametrize(
    "attr", ["", "x" * 65, "a b", "a/b", "a=b", "é", "a\n", "a*", "*", "a!b", "\ud800"]
)
def test_invalid_attr_names(attr: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^attrs: bad attribute name"):
        validate_attr_name(attr)
    with pytest.raises(InvalidArgument, match=r"^set_attrs: bad attribute name"):
        validate_attrs({attr: "v"}, "set_attrs")


def test_attr_values() -> None:
    ok = {"a": "", "b": "x" * MAX_VALUE_BYTES, "c": "é" * (MAX_VALUE_BYTES // 2), "d": "a b\t"}
    got = validate_attrs(ok)
    assert got == ok and got is not ok  # a plain copy
    with pytest.raises(InvalidArgument, match=r"^attrs: value of 'v' longer than 1024 bytes"):
        validate_attrs({"v": "x" * (MAX_VALUE_BYTES + 1)})
    with pytest.raises(InvalidArgument, match=r"^attrs: value of 'v' longer"):
        validate_attrs({"v": "é" * 513})  # 1026 bytes
    with pytest.raises(InvalidArgument, match=r"^attrs: value of 'v'"):
        validate_attrs({"v": "\udc80"})


def test_attr_count() -> None:
    assert len(validate_attrs({f"a{i}": "" for i in range(MAX_ATTRS)})) == MAX_ATTRS
    with pytest.raises(InvalidArgument, match=r"^attrs: more than 64 attributes"):
        validate_attrs({f"a{i}": "" for i in range(MAX_ATTRS + 1)})


# ---- TTLs ---------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [MIN_TTL_MS, 1000, MAX_TTL_MS])
def test_valid_ttl(ttl: int) -> None:
    assert validate_ttl(ttl) == ttl


@pytest.mark.parametrize("ttl", [-1, 0, MIN_TTL_MS - 1, MAX_TTL_MS + 1])
def test_invalid_ttl(ttl: int) -> None:
    with pytest.raises(InvalidArgument, match=r"^ttl_ms: "):
        validate_ttl(ttl)


# ---- filters ------------------------------------------------------------------


def test_empty_filter_matches_everything_but_none() -> None:
    assert Filter().matches(svc("a"))
    assert Filter().matches(svc("b", x="1"))
    assert not Filter().matches(None)


def test_exact_value() -> None:
    f = Filter({"proto": "tcp"})
    assert f.matches(svc("a", proto="tcp"))
    assert f.matches(svc("a", proto="tcp", port="1"))
    assert not f.matches(svc("a", proto="udp"))
    assert not f.matches(svc("a", port="tcp"))
    assert not f.matches(svc("a", proto="TCP"))


def test_empty_value_matches_only_empty() -> None:
    f = Filter({"x": ""})
    assert f.matches(svc("a", x=""))
    assert not f.matches(svc("a", x="1"))
    assert not f.matches(svc("a"))


def test_wildcard_matches_any_value_even_empty_but_needs_the_attr() -> None:
    f = Filter({"x": "*"})
    assert f.matches(svc("a", x="1"))
    assert f.matches(svc("a", x=""))
    assert f.matches(svc("a", x="*"))
    assert not f.matches(svc("a", y="1"))
    # A literal '*' value is matched by the wildcard, and only then by itself.
    assert not Filter({"x": "1"}).matches(svc("a", x="*"))


def test_every_attr_must_match() -> None:
    f = Filter({"proto": "tcp", "port": "*", "sys": "h0"})
    assert f.matches(svc("a", proto="tcp", port="1", sys="h0", extra="e"))
    assert not f.matches(svc("a", proto="tcp", port="1"))
    assert not f.matches(svc("a", proto="tcp", port="1", sys="h1"))


def test_prefix() -> None:
    f = Filter(prefix="tcp!h0!")
    assert f.matches(svc("tcp!h0!1"))
    assert f.matches(svc("tcp!h0!"))
    assert not f.matches(svc("tcp!h1!1"))
    assert not f.matches(svc("tcp!h0"))
    both = Filter({"x": "1"}, prefix="a")
    assert both.matches(svc("ab", x="1"))
    assert not both.matches(svc("ba", x="1"))
    assert not both.matches(svc("ab", x="2"))


def test_validate_filter() -> None:
    f = validate_filter({"a": "*", "b": ""}, "p")
    assert f == Filter({"a": "*", "b": ""}, "p")
    assert validate_filter({}) == Filter()
    with pytest.raises(InvalidArgument, match=r"^attrs: bad attribute name"):
        validate_filter({"a b": "1"})


def test_caller_roles() -> None:
    assert Caller("root").admin  # the default role is admin (no TLS identities)
    assert Caller("root", "admin").admin
    for role in ("server", "node", "reader"):
        assert not Caller("x", role).admin


ATTR = st.sampled_from(["a", "b", "c"])
VALUE = st.sampled_from(["", "1", "2", "*"])


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    attrs=st.dictionaries(ATTR, VALUE),
    want=st.dictionaries(ATTR, VALUE),
    name=st.sampled_from(["", "a", "ab", "b"]),
    prefix=st.sampled_from(["", "a", "ab", "b", "c"]),
)
def test_filter_matches_its_definition(
    attrs: dict[str, str], want: dict[str, str], name: str, prefix: str
) -> None:
    expected = name.startswith(prefix) and all(
        a in attrs and (v == "*" or attrs[a] == v) for a, v in want.items()
    )
    assert Filter(want, prefix).matches(Service(name, attrs)) == expected
