"""Fuzzing the command line's edges: ``attr=value`` parsing, and the real
``geryon`` binary given garbage arguments.

Any input gives a result or a clear error: ``parse_attr``/``parse_attrs``
return or raise UsageError, nothing else; the binary exits non-zero with one
line on stderr starting ``geryon:`` (or argparse's usage and error lines),
never a traceback. The binary runs against a loopback port nobody listens
on, so arguments that happen to parse end in "unreachable", not in a change.
(The ndb parser's fuzz lives in test_ndb.py.)
"""

from __future__ import annotations

import os
import re

from conftest import free_port, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geryon.cli import UsageError, parse_attr, parse_attrs

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "200"))
# Each binary run is a process start (about half a second): a handful.
CLI_RUNS = max(6, EXAMPLES // 50)
ATTR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Arbitrary text, and text near the valid form, so both paths are exercised.
attr_texts = st.one_of(
    st.text(),
    st.from_regex(r"[A-Za-z0-9._*-]{0,66}(=.{0,8})?", fullmatch=True),
    st.sampled_from(["a=b", "a", "=", "=v", "a==b", "a=*", "*", "a b=c", "k" * 64, "k" * 65]),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(text=attr_texts, wildcard=st.booleans())
def test_parse_attr_returns_a_pair_or_usage_error(text: str, wildcard: bool) -> None:
    attr, sep, value = text.partition("=")
    try:
        got = parse_attr(text, wildcard=wildcard)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not ATTR_NAME.fullmatch(attr) or (not sep and not wildcard), (
            f"{text!r} refused: {exc}"
        )
        return
    assert ATTR_NAME.fullmatch(got[0])
    assert got == ((attr, value) if sep else (attr, "*")), got
    assert sep or wildcard


@settings(max_examples=EXAMPLES, deadline=None)
@given(items=st.lists(attr_texts, max_size=5), wildcard=st.booleans())
def test_parse_attrs_returns_a_dict_or_usage_error(items: list[str], wildcard: bool) -> None:
    try:
        got = parse_attrs(items, wildcard=wildcard)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
        try:
            pairs = [parse_attr(i, wildcard=wildcard) for i in items]
        except UsageError:
            return  # one item is bad on its own
        names = [a for a, _ in pairs]
        assert len(set(names)) < len(names), f"{items!r} refused: {exc}"
        return
    assert got == dict(parse_attr(i, wildcard=wildcard) for i in items)
    assert len(got) == len(items), "an attribute given twice was accepted"


def test_parse_attrs_of_nothing() -> None:
    assert parse_attrs(None) == {} == parse_attrs([], wildcard=True)


# ---- the binary ------------------------------------------------------------

COMMANDS = ("ls", "get", "set", "rm", "watch", "leases")
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
flags = st.sampled_from(
    [
        "--attr",
        "-a",
        "--prefix",
        "--rev",
        "--rev=-1",
        "--persist",
        "--rm-attr",
        "--json",
        "-n",
        "--",
        "-",
        "=",
        "a=b",
        "bad key=1",
        "a=b=c",
        "-x",
        "--nope",
        "-1",
        "1.5",
        "9" * 20,  # beyond int64
        "",
    ]
)
token = st.one_of(words, flags).filter(
    # -h, --he, -nh...: help exits 0, which is no error to fuzz.
    lambda t: not (t.startswith("-") and "h" in t)
)
# The first word picks the command; it never starts with "-", so garbage
# cannot reach the top-level --registry/--timeout given below.
first = st.one_of(st.sampled_from(COMMANDS), words).filter(
    lambda t: not t.startswith("-") and t not in ("ca", "ndb")
)


def check_failure(args: list[str]) -> None:
    r = run_cli("--registry", f"127.0.0.1:{free_port()}", "--timeout", "0.3", *args, timeout=30)
    assert r.returncode > 0, f"geryon {args!r} exited {r.returncode}: {r.stdout!r} {r.stderr!r}"
    assert "Traceback" not in r.stderr, f"geryon {args!r}:\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert lines, f"geryon {args!r} failed silently"
    if lines[0].startswith("usage:"):
        # argparse echoes the offending argument as it is, line breaks and all.
        assert any(x.startswith("geryon") and ": error: " in x for x in lines), r.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("geryon: "), r.stderr


@settings(
    max_examples=CLI_RUNS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(command=first, rest=st.lists(token, max_size=4))
def test_cli_garbage_fails_cleanly(command: str, rest: list[str]) -> None:
    check_failure([command, *rest])


# Once tracebacks (fixed in 96155ad); the text strategies above cannot make them.
def test_cli_non_utf8_argument_fails_cleanly() -> None:
    check_failure(["get", "\udcff"])  # the byte 0xff on the command line


def test_cli_revision_beyond_int64_fails_cleanly() -> None:
    check_failure(["rm", "x", "--rev", "9" * 20])
