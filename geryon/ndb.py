"""Read Inferno's attribute database (attrdb(6), the format of ndb(6)) files.

Geryon's cluster description lives in an ndb file such as ``/lib/ndb/cluster``
that operators also read with Inferno's own ``ndb/query``, so this module
follows Inferno's ``appl/lib/attrdb.b`` and ``appl/cmd/ndb/query.b`` closely
enough that a file reads, and a query prints, the same here as there. Where
Inferno's behaviour is odd, it is kept and the comment says so. It is a pure
library (stdlib only, no I/O beyond reading the files) so the reconciler, the
CLI and tests can all use it.

Relative ``file=`` names in a ``database=`` entry are opened as given, that
is relative to the current directory, as Inferno's ``Dbf.open`` does; the
file holding the entry is recognised only by the exact string it was opened
by (``Db.open`` compares names, not files).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TextIO

__all__ = [
    "DEFAULT_FILE",
    "Database",
    "Entry",
    "FileSig",
    "NdbError",
    "Pair",
    "parse_text",
    "query",
    "query_main",
    "quote",
]

# query.b's default database.
DEFAULT_FILE = "/lib/ndb/local"

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), or None for a file that
# could not be opened. Like attrdb.b's samefile, but with size and ctime too
# so that a rewrite that keeps the mtime is still noticed.
FileSig = tuple[int, int, int, int, int] | None


class NdbError(Exception):
    """A database that cannot be read: ``FILE:LINE: what`` or ``FILE: what``."""


class Pair(NamedTuple):
    """One ``attr=value``; a bare ``attr`` has value ``''``."""

    attr: str
    value: str


def quote(word: str) -> str:
    """Quote ``word`` as Inferno's ``%q`` does (lib9 fmtquote.c).

    The word is single-quoted when it is empty or holds a character at or
    below space (any control character, space itself) or a single quote, which
    is doubled inside. Inferno's emu never sets ``doquote``, so nothing else
    (not ``=``, ``#`` or ``"``) is quoted. ``%q`` formats a C string, so the
    word ends at its first NUL.
    """
    word = word.split("\0", 1)[0]
    if word and not any(c <= " " or c == "'" for c in word):
        return word
    return "'" + word.replace("'", "''") + "'"


def _parse_line(s: str) -> tuple[list[Pair], str | None]:
    """Tokenize one line as attrdb.b's ``parseline``: (pairs, error).

    Limbo's nil string and ``""`` are the same, which is why a quoted empty
    word (``''``) vanishes unless it is a value. When the line does not end in
    white space (the last line of a file with no final newline, or text cut by
    ``#``) a second pending word is dropped: ``a b`` at end of file reads as
    ``a`` alone. That is Inferno's behaviour and is kept.
    """
    pairs: list[Pair] = []
    quoting = ""
    word = ""
    lastword = ""
    name = ""
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if quoting:
            if c == quoting:
                if i + 1 >= n or s[i + 1] != quoting:
                    quoting = ""
                    i += 1
                    continue
                i += 1  # a doubled quote stands for one
            word += s[i]
            i += 1
            continue
        if c in "'\"":
            quoting = c
        elif c == "#":
            break
        elif c in " \t\n":
            if word:
                if lastword:
                    pairs.append(Pair(lastword, ""))  # "lastword word ": bare
                lastword, word = word, ""
                if name:
                    pairs.append(Pair(name, lastword))  # "name=lastword "
                    name = lastword = ""
        elif c == "=":
            if not lastword:
                lastword, word = word, ""  # "word="
            if word:
                pairs.append(Pair(lastword, ""))  # "lastword word="
                lastword, word = word, ""
            if not lastword:
                return [], "empty attribute name"
            name, lastword = lastword, ""
        else:
            word += c
        i += 1
    if quoting:
        return [], "unterminated quote"
    if not lastword:
        lastword, word = word, ""
    if not name:
        name, lastword = lastword, ""
    if name:
        pairs.append(Pair(name, lastword))
    return pairs, None


@dataclass(frozen=True)
class Entry:
    """One entry: its lines in file order, each a tuple of pairs.

    Lines matter: pairs on one line bind tighter than pairs in the entry
    (attrdb(6)), which ``lookup`` uses.
    """

    lines: tuple[tuple[Pair, ...], ...]
    file: str = field(default="", compare=False)
    lineno: int = field(default=0, compare=False)  # line the entry starts on

    @property
    def pairs(self) -> list[Pair]:
        return [p for line in self.lines for p in line]

    def get(self, attr: str) -> str | None:
        """The first value of ``attr`` (``''`` when bare), None when absent."""
        for line in self.lines:
            for p in line:
                if p.attr == attr:
                    return p.value
        return None

    def values(self, attr: str) -> list[str]:
        """Every value of ``attr``, in file order."""
        return [p.value for line in self.lines for p in line if p.attr == attr]

    def has(self, attr: str) -> bool:
        return any(p.attr == attr for line in self.lines for p in line)

    def has_pair(self, attr: str, value: str) -> bool:
        return any(p.attr == attr and p.value == value for line in self.lines for p in line)

    def lookup(self, attr: str, value: str, rattr: str) -> list[str]:
        """Values of ``rattr`` bound to ``attr=value``, as ``Dbentry.findbyattr``.

        Values on lines that hold both ``attr=value`` and ``rattr`` come first,
        then those on lines holding ``rattr`` without the pair, each group in
        file order; lines without ``rattr`` give nothing. (The issue's wording
        and attrdb.b agree on this.)
        """
        bound: list[str] = []
        loose: list[str] = []
        for line in self.lines:
            vals = [p.value for p in line if p.attr == rattr]
            if not vals:
                continue
            if any(p.attr == attr and p.value == value for p in line):
                bound.extend(vals)
            else:
                loose.extend(vals)
        return bound + loose

    def __str__(self) -> str:
        """The entry on one line, as query.b's ``printentry`` (no newline)."""
        return " ".join(f"{quote(p.attr)}={quote(p.value)}" for p in self.pairs)


def _split_lines(text: str) -> list[str]:
    # Bufio's gets('\n'): each line keeps its newline, and a last line without
    # one comes back as it is (see _parse_line for why that matters). Only
    # '\n' ends a line; '\r' is an ordinary character to Inferno.
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def parse_text(text: str, filename: str = "<string>", *, strict: bool = True) -> list[Entry]:
    """Parse one file's text into its entries, in order.

    An entry starts at a line whose first character is not space, tab,
    newline or ``#`` (attrdb.b's ``isentry``); every other line, blank and
    comment lines included, continues it. Lines before the first entry are
    never parsed, as in Inferno, and an entry whose lines hold no pairs is
    dropped. Inferno silently drops a line it cannot parse; with ``strict``
    (the default) that raises NdbError instead, naming the file and line.
    """
    entries: list[Entry] = []
    current: list[tuple[Pair, ...]] | None = None
    start = 0
    for lineno, raw in enumerate(_split_lines(text), 1):
        if raw[0] not in " \t\n#":
            if current:
                entries.append(Entry(tuple(current), filename, start))
            current = []
            start = lineno
        elif current is None:
            continue
        pairs, err = _parse_line(raw)
        if err is not None and strict:
            raise NdbError(f"{filename}:{lineno}: {err}")
        if pairs:
            current.append(tuple(pairs))
    if current:
        entries.append(Entry(tuple(current), filename, start))
    return entries


def _read(name: str, *, strict: bool) -> tuple[list[Entry], FileSig]:
    with open(name, "rb") as f:
        # Stat before reading, so a write racing the read shows as a change.
        st = os.fstat(f.fileno())
        data = f.read()
    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return parse_text(data.decode("utf-8", "replace"), name, strict=strict), sig


def _stat(name: str) -> FileSig:
    try:
        st = os.stat(name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Database:
    """A logical database: the entries of one or more files, searched in order."""

    def __init__(
        self,
        files: Sequence[tuple[str, Sequence[Entry]]],
        signature: Sequence[tuple[str, FileSig]] = (),
    ) -> None:
        self._files = [(name, list(entries)) for name, entries in files]
        self._signature = tuple(signature)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, strict: bool = True) -> Database:
        """Open ``path`` and the files its ``database=`` entry lists (Db.open).

        The first entry of ``path`` with a bare ``database`` (or
        ``database=``) supplies ``file=`` names in order; ``path`` itself is
        searched where it is listed, or first when it is not. Files that
        cannot be opened are skipped; ``path`` itself must open.
        """
        top = os.fspath(path)
        try:
            top_entries, top_sig = _read(top, strict=strict)
        except OSError as e:
            raise NdbError(f"{top}: cannot open: {e.strerror or e}") from e
        sigs: dict[str, FileSig] = {top: top_sig}
        files: list[tuple[str, list[Entry]]] = []
        dbent = next((e for e in top_entries if e.has_pair("database", "")), None)
        names = [] if dbent is None else dbent.values("file")
        top_placed = False
        for name in names:
            # Db.open compares the string, so "./x" does not stand for "x".
            if name == top and not top_placed:
                files.append((top, top_entries))
                top_placed = True
                continue
            try:
                entries, sig = _read(name, strict=strict)
            except OSError:
                sigs.setdefault(name, None)  # watched: it may appear later
                continue
            sigs.setdefault(name, sig)
            files.append((name, entries))
        if not top_placed:
            files.insert(0, (top, top_entries))
        return cls(files, list(sigs.items()))

    @classmethod
    def from_text(cls, text: str, filename: str = "<string>", *, strict: bool = True) -> Database:
        """A database of one in-memory file (Db.sopen: no ``database=`` handling)."""
        return cls([(filename, parse_text(text, filename, strict=strict))])

    def entries(self) -> Iterator[Entry]:
        """Every entry, file by file in search order."""
        for _, entries in self._files:
            yield from entries

    __iter__ = entries

    def find(self, attr: str, value: str | None = None) -> Iterator[Entry]:
        """Entries with ``attr`` (any value) or, given ``value``, ``attr=value``.

        ``value=''`` matches only an empty value (a bare attribute). An empty
        ``attr`` matches every entry, as Inferno's nil attr does.
        """
        for e in self.entries():
            if not attr:
                yield e
            elif value is None:
                if e.has(attr):
                    yield e
            elif e.has_pair(attr, value):
                yield e

    def lookup(self, attr: str, value: str, rattr: str) -> list[str]:
        """``rattr`` values bound to ``attr=value`` (Entry.lookup), all entries."""
        out: list[str] = []
        for e in self.find(attr, value):
            out.extend(e.lookup(attr, value, rattr))
        return out

    def files(self, *, missing: bool = False) -> list[Path]:
        """The files read, in search order; with ``missing``, also the listed
        files that could not be opened (a watcher needs those too)."""
        if missing:
            return [Path(name) for name, _ in self._signature]
        seen: dict[str, None] = {}
        for name, _ in self._files:
            seen.setdefault(name, None)
        return [Path(name) for name in seen]

    def signature(self) -> tuple[tuple[str, FileSig], ...]:
        """What the files look like on disk now; compare with ``changed``."""
        return tuple((name, _stat(name)) for name, _ in self._signature)

    def changed(self) -> bool:
        """Whether any file read, or listed but missing, differs from when opened.

        Always False for a database made ``from_text``.
        """
        return self.signature() != self._signature

    def __repr__(self) -> str:
        names = [name for name, _ in self._files]
        return f"Database({names!r})"


def query(
    db: Database,
    attr: str,
    value: str | None = None,
    rattr: str | None = None,
    *,
    all: bool = False,
) -> list[str]:
    """The lines (without newlines) Inferno's ``ndb/query`` prints.

    With ``rattr``: the ``%q``-quoted ``rattr`` values bound to ``attr=value``
    in entries that have ``rattr``, one per line. Without it: each entry with
    ``attr=value`` (or, with no ``value``, with ``attr``) as ``attr=value``
    pairs on one line. Without ``all``, only the first such line (the first
    value of the first bound line when ``rattr`` is given).
    """
    if rattr == "":
        rattr = None  # Limbo's "" is nil: an empty RATTR is no RATTR
    out: list[str] = []
    if rattr is None:
        for e in db.find(attr, value):
            out.append(str(e))
            if not all:
                break
        return out
    if value is None:
        raise ValueError("query: rattr needs a value")
    for e in db.find(attr, value):
        if not e.has(rattr):
            continue
        vals = e.lookup(attr, value, rattr)
        if not all:
            return [quote(vals[0])]
        out.extend(quote(v) for v in vals)
    return out


_PROG = "geryon ndb query"
_USAGE = f"usage: {_PROG} [-a] [-f FILE] ATTR [VALUE [RATTR]]\n"


def query_main(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    """``geryon ndb query [-a] [-f FILE] ATTR [VALUE [RATTR]]``.

    ``argv`` holds the arguments after ``query``. Options parse as Inferno's
    arg(2): flags may be grouped (``-af FILE``), ``--`` ends them. Exit status
    is 0 when something printed and 1 when nothing matched (Inferno's query
    exits 0 then), on a usage error, or when the database cannot be read.
    Extra arguments past RATTR are ignored, as in query.b.
    """
    dbfile = DEFAULT_FILE
    all_ = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        i += 1
        if arg == "--":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c == "a":
                all_ = True
            elif c == "f":
                if j < len(arg):
                    dbfile = arg[j:]
                elif i < len(argv):
                    dbfile = argv[i]
                    i += 1
                else:
                    stderr.write(_USAGE)
                    return 1
                break
            else:
                stderr.write(_USAGE)
                return 1
    rest = argv[i:]
    if not rest:
        stderr.write(_USAGE)
        return 1
    attr = rest[0]
    value = rest[1] if len(rest) > 1 else None
    rattr = rest[2] if len(rest) > 2 else None
    try:
        lines = query(Database.open(dbfile), attr, value, rattr, all=all_)
    except NdbError as e:
        stderr.write(f"{_PROG}: {e}\n")
        return 1
    for line in lines:
        stdout.write(line + "\n")
    return 0 if lines else 1
