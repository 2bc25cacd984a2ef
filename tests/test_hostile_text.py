"""Names and values that would lie on a terminal (issue 15, item 8).

A name may not hold a control, format (bidi, zero-width), line or paragraph
separator character; a value may hold anything, and the CLI's text output
escapes it, so one entry is one line that reads back as exactly what is
stored. ``--json`` stays exact.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess

import pytest
from conftest import BIN, Registry, run_cli

from geryon.cli import text_line, word
from geryon.errors import InvalidArgument, NotFound
from geryon.model import Service

# A line break and a forged entry after it, a NUL (which %q would end the
# word at), a colour, a right-to-left override, and a backslash-n that must
# not read as the line break.
HOSTILE = "x\nforged 1 2\0\x1b[31mred\u202eevil\\n"
SHOWN = r"'x\nforged 1 2\x00\x1b[31mred\u202eevil\\n'"
BAD_NAMES = {
    "a\u202eb": "U+202E, a format character",
    "a\u200bb": "U+200B, a format character",
    "a\u2028b": "U+2028, a line separator",
    "a\nb": "U+000A, a control character",
}


def cli(registry: Registry, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""})


def unescape(text: str) -> str:
    """What an escaped word stands for: the inverse of model.escape."""
    return codecs.decode(text.encode("raw_unicode_escape"), "unicode_escape")


def test_word_quotes_as_inferno_and_escapes() -> None:
    assert word("tcp!h0!1") == "tcp!h0!1"
    assert word("") == "''"
    assert word("it's") == "'it''s'"
    assert word("a b") == "'a b'"
    assert word(HOSTILE) == SHOWN
    assert unescape(SHOWN[1:-1]) == HOSTILE
    assert word("a\tb") == r"'a\tb'"  # quoted as %q would, and escaped
    assert word("a\\b") == r"a\\b"
    assert word("a\u00a0b") == "'a\u00a0b'"  # any white space is quoted: one word
    assert word("\0") == r"'\x00'"  # shown, not cut at the NUL


def test_text_line_is_one_line() -> None:
    s = Service("tcp!h0!1", {"note": HOSTILE, "svc": "x", "z": "\u2029\x85\r"})
    line = text_line(s)
    assert line.splitlines() == [line]
    assert line == rf"tcp!h0!1 note {SHOWN} svc x z '\u2029\x85\r'"


async def test_a_hostile_value_prints_as_one_line_and_json_is_exact(registry: Registry) -> None:
    async with registry.client() as c:
        await c.register("tcp!h0!1", {"note": HOSTILE, "svc": "x"}, persist=True)
        await c.register("d0.mbox", {"addr": "tcp!h0!1\n\x1b[2Jtcp!evil!1"}, persist=True)
    entry = f"tcp!h0!1 note {SHOWN} svc x"
    disk = r"d0.mbox addr 'tcp!h0!1\n\x1b[2Jtcp!evil!1'"
    for args in (["ls"], ["ls", "--attr", "svc"], ["get", "tcp!h0!1"]):
        r = cli(registry, *args)
        assert r.returncode == 0, (args, r.stderr)
        want = f"{entry}\n" if args != ["ls"] else f"{disk}\n{entry}\n"
        assert r.stdout == want, args
    assert cli(registry, "ls", "-n").stdout == "d0.mbox\ntcp!h0!1\n"

    listed = json.loads(cli(registry, "ls", "--json").stdout)
    assert listed[1]["attrs"]["note"] == HOSTILE
    assert json.loads(cli(registry, "get", "tcp!h0!1", "--json").stdout)["attrs"]["note"] == HOSTILE

    # set echoes the entry as ls does; resolve prints the addr on one line.
    r = cli(registry, "set", "tcp!h0!1", "tab=a\tb")
    assert r.stdout == f"tcp!h0!1 note {SHOWN} svc x tab 'a\\tb'\n", r.stderr
    r = cli(registry, "resolve", "d0.mbox")
    assert r.stdout == "tcp!h0!1\\n\\x1b[2Jtcp!evil!1\n", r.stderr

    # watch: the snapshot, then an event, each one line.
    proc = subprocess.Popen(
        [str(BIN / "geryon"), "--registry", registry.address, "watch", "--snapshot", "-a", "svc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GERYON_TLS_DIR": ""},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SNAPSHOT ") and line.endswith(" tab 'a\\tb'\n"), line
        assert proc.stdout.readline().startswith("SYNCED ")
        assert cli(registry, "set", "tcp!h0!1", "tab=\u2028").returncode == 0
        line = proc.stdout.readline()
        assert line.startswith("PUT ") and line.endswith(f"{SHOWN} svc x tab '\\u2028'\n"), line
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("name", "why"), BAD_NAMES.items())
async def test_names_with_hidden_characters_are_refused(
    registry: Registry, name: str, why: str
) -> None:
    async with registry.client() as c:
        with pytest.raises(
            InvalidArgument, match=f"^name: service name .* holds {re.escape(why)}$"
        ):
            await c.register(name, {"a": "b"}, persist=True)
        # Looking one up is allowed (an entry stored before the rule must
        # stay reachable, to be removed): there is none. Controls were
        # always refused.
        with pytest.raises(InvalidArgument if "control" in why else NotFound):
            await c.get(name)
    r = cli(registry, "set", name, "a=b", "--persist")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("geryon: name: ") and why in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert cli(registry, "ls", "-n").stdout == ""
