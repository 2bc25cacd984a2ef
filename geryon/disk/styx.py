"""9P2000 (Inferno's Styx): the messages, and their bytes.

Every message is size[4] type[1] tag[2] followed by its fields, little-endian;
a string s is len[2] followed by that many bytes of UTF-8, a qid[13] is
type[1] vers[4] path[8], a stat is size[2] followed by the directory entry
below. The table, from intro(5):

    Tversion tag msize[4] version[s]         Rversion tag msize[4] version[s]
    Tauth    tag afid[4] uname[s] aname[s]   Rauth    tag aqid[13]
    Tattach  tag fid[4] afid[4] uname[s] aname[s]
                                             Rattach  tag qid[13]
                                             Rerror   tag ename[s]
    Tflush   tag oldtag[2]                   Rflush   tag
    Twalk    tag fid[4] newfid[4] nwname[2] nwname*(wname[s])
                                             Rwalk    tag nwqid[2] nwqid*(qid[13])
    Topen    tag fid[4] mode[1]              Ropen    tag qid[13] iounit[4]
    Tcreate  tag fid[4] name[s] perm[4] mode[1]
                                             Rcreate  tag qid[13] iounit[4]
    Tread    tag fid[4] offset[8] count[4]   Rread    tag count[4] data[count]
    Twrite   tag fid[4] offset[8] count[4] data[count]
                                             Rwrite   tag count[4]
    Tclunk   tag fid[4]                      Rclunk   tag
    Tremove  tag fid[4]                      Rremove  tag
    Tstat    tag fid[4]                      Rstat    tag stat[n]
    Twstat   tag fid[4] stat[n]              Rwstat   tag

    stat:    size[2] type[2] dev[4] qid[13] mode[4] atime[4] mtime[4]
             length[8] name[s] uid[s] gid[s] muid[s]

In a Twstat, ~0 (all bits set) in a number and "" in a string mean "don't
touch"; a Twstat that touches nothing asks for the file to be made durable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

VERSION = "9P2000"
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
IOHDRSZ = 24  # what a Twrite or Rread adds to its data
MAXWELEM = 16  # most names one Twalk may carry

# Open modes (open(5)).
OREAD, OWRITE, ORDWR, OEXEC = 0, 1, 2, 3
OTRUNC, OCEXEC, ORCLOSE = 0x10, 0x20, 0x40

# Mode bits (stat(5)) and the matching qid type bits.
DMDIR, DMAPPEND, DMEXCL, DMAUTH, DMTMP = 0x80000000, 0x40000000, 0x20000000, 0x08000000, 0x04000000
QTDIR, QTAPPEND, QTEXCL, QTAUTH, QTTMP, QTFILE = 0x80, 0x40, 0x20, 0x08, 0x04, 0x00
PERM_MASK = 0o777

(
    Tversion, Rversion, Tauth, Rauth, Tattach, Rattach, Terror, Rerror, Tflush, Rflush,
    Twalk, Rwalk, Topen, Ropen, Tcreate, Rcreate, Tread, Rread, Twrite, Rwrite,
    Tclunk, Rclunk, Tremove, Rremove, Tstat, Rstat, Twstat, Rwstat,
) = range(100, 128)  # fmt: skip

# Field kinds: 1 2 4 8 unsigned integers; s string; q qid; S stat[n];
# W nwname*(wname[s]); Q nwqid*(qid[13]); D count[4] data[count].
FIELDS: dict[int, tuple[tuple[str, str], ...]] = {
    Tversion: (("msize", "4"), ("version", "s")),
    Rversion: (("msize", "4"), ("version", "s")),
    Tauth: (("afid", "4"), ("uname", "s"), ("aname", "s")),
    Rauth: (("aqid", "q"),),
    Tattach: (("fid", "4"), ("afid", "4"), ("uname", "s"), ("aname", "s")),
    Rattach: (("qid", "q"),),
    Rerror: (("ename", "s"),),
    Tflush: (("oldtag", "2"),),
    Rflush: (),
    Twalk: (("fid", "4"), ("newfid", "4"), ("wname", "W")),
    Rwalk: (("wqid", "Q"),),
    Topen: (("fid", "4"), ("mode", "1")),
    Ropen: (("qid", "q"), ("iounit", "4")),
    Tcreate: (("fid", "4"), ("name", "s"), ("perm", "4"), ("mode", "1")),
    Rcreate: (("qid", "q"), ("iounit", "4")),
    Tread: (("fid", "4"), ("offset", "8"), ("count", "4")),
    Rread: (("data", "D"),),
    Twrite: (("fid", "4"), ("offset", "8"), ("data", "D")),
    Rwrite: (("count", "4"),),
    Tclunk: (("fid", "4"),),
    Rclunk: (),
    Tremove: (("fid", "4"),),
    Rremove: (),
    Tstat: (("fid", "4"),),
    Rstat: (("stat", "S"),),
    Twstat: (("fid", "4"), ("stat", "S")),
    Rwstat: (),
}
NAMES = {
    t: n
    for n, t in globals().items()
    if isinstance(t, int) and len(n) > 1 and n[0] in "TR" and n[1:].islower() and t in FIELDS
}
NAMES[Terror] = "Terror"

_INT = {"1": struct.Struct("<B"), "2": struct.Struct("<H"), "4": struct.Struct("<I"),
        "8": struct.Struct("<Q")}  # fmt: skip
_HEADER = struct.Struct("<IBH")
_QID = struct.Struct("<BIQ")
_STAT_FIXED = struct.Struct("<HHIBIQIIIQ")  # size type dev qid mode atime mtime length


class ProtocolError(Exception):
    """Bytes that are not a well-formed 9P2000 message."""


class Qid(NamedTuple):
    type: int
    vers: int
    path: int


@dataclass(slots=True)
class Stat:
    """A directory entry (stat(5)). In a Twstat, ~0 and "" mean don't touch."""

    type: int = 0
    dev: int = 0
    qid: Qid = Qid(0, 0, 0)  # noqa: RUF009 - an immutable tuple, safe to share
    mode: int = 0
    atime: int = 0
    mtime: int = 0
    length: int = 0
    name: str = ""
    uid: str = ""
    gid: str = ""
    muid: str = ""

    @classmethod
    def dont_touch(cls) -> Stat:
        """The Twstat that changes nothing (a sync request, until fields are set)."""
        return cls(0xFFFF, 0xFFFFFFFF, Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
                   0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)  # fmt: skip


class Fcall:
    """One message: its type, tag and the fields FIELDS names for that type."""

    __slots__ = ("__dict__", "tag", "type")

    def __init__(self, type: int, tag: int = NOTAG, **fields: Any) -> None:
        self.type = type
        self.tag = tag
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        fields = " ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{NAMES.get(self.type, self.type)} tag={self.tag} {fields}".rstrip()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Fcall)
            and (self.type, self.tag, self.__dict__) == (other.type, other.tag, other.__dict__)
        )


def _pstr(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ProtocolError("string longer than 65535 bytes")
    return _INT["2"].pack(len(b)) + b


def pack_stat(st: Stat) -> bytes:
    """A stat's bytes, its own size[2] first."""
    tail = b"".join(_pstr(s) for s in (st.name, st.uid, st.gid, st.muid))
    size = _STAT_FIXED.size - 2 + len(tail)
    q = st.qid
    return (
        _STAT_FIXED.pack(size, st.type, st.dev, q.type, q.vers, q.path, st.mode, st.atime,
                         st.mtime, st.length) + tail
    )  # fmt: skip


def pack(f: Fcall) -> bytes:
    """A message's bytes, size[4] first."""
    try:
        spec = FIELDS[f.type]
    except KeyError:
        raise ProtocolError(f"unknown message type {f.type}") from None
    out = [b""]
    for name, kind in spec:
        v = getattr(f, name)
        if kind in _INT:
            out.append(_INT[kind].pack(v))
        elif kind == "s":
            out.append(_pstr(v))
        elif kind == "q":
            out.append(_QID.pack(*v))
        elif kind == "S":
            b = pack_stat(v) if isinstance(v, Stat) else bytes(v)
            out.append(_INT["2"].pack(len(b)) + b)
        elif kind == "W":
            out.append(_INT["2"].pack(len(v)) + b"".join(_pstr(w) for w in v))
        elif kind == "Q":
            out.append(_INT["2"].pack(len(v)) + b"".join(_QID.pack(*q) for q in v))
        else:  # D
            out.append(_INT["4"].pack(len(v)))
            out.append(bytes(v) if not isinstance(v, bytes | bytearray | memoryview) else v)
    body = b"".join(out)
    return _HEADER.pack(_HEADER.size + len(body), f.type, f.tag) + body


class _Reader:
    __slots__ = ("buf", "off")

    def __init__(self, buf: bytes | memoryview, off: int = 0) -> None:
        self.buf = memoryview(buf)
        self.off = off

    def take(self, n: int) -> memoryview:
        if self.off + n > len(self.buf):
            raise ProtocolError("message too short for its fields")
        v = self.buf[self.off : self.off + n]
        self.off += n
        return v

    def int(self, kind: str) -> int:
        s = _INT[kind]
        return s.unpack(self.take(s.size))[0]

    def str(self) -> str:
        raw = bytes(self.take(self.int("2")))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def qid(self) -> Qid:
        return Qid(*_QID.unpack(self.take(_QID.size)))


def unpack_stat(buf: bytes | memoryview) -> Stat:
    """One stat from its bytes (size[2] first); the size must match."""
    r = _Reader(buf)
    st = _read_stat(r)
    if r.off != len(r.buf):
        raise ProtocolError("stat size does not match its contents")
    return st


def _read_stat(r: _Reader) -> Stat:
    size = r.int("2")
    end = r.off + size
    if end > len(r.buf):
        raise ProtocolError("stat longer than its message")
    typ, dev = r.int("2"), r.int("4")
    qid = r.qid()
    mode, atime, mtime, length = r.int("4"), r.int("4"), r.int("4"), r.int("8")
    name, uid, gid, muid = r.str(), r.str(), r.str(), r.str()
    if r.off != end:
        raise ProtocolError("stat size does not match its contents")
    return Stat(typ, dev, qid, mode, atime, mtime, length, name, uid, gid, muid)


def unpack_stats(buf: bytes | memoryview) -> list[Stat]:
    """The stats a directory read returned, back to back."""
    r = _Reader(buf)
    out = []
    while r.off < len(r.buf):
        out.append(_read_stat(r))
    return out


def unpack(buf: bytes | memoryview) -> Fcall:
    """One message from its bytes, size[4] included; ProtocolError if malformed."""
    r = _Reader(buf)
    size, typ, tag = r.int("4"), r.int("1"), r.int("2")
    if size != len(r.buf):
        raise ProtocolError("message size does not match its length")
    spec = FIELDS.get(typ)
    if spec is None:
        raise ProtocolError(f"unknown message type {typ}")
    fields: dict[str, Any] = {}
    for name, kind in spec:
        if kind in _INT:
            fields[name] = r.int(kind)
        elif kind == "s":
            fields[name] = r.str()
        elif kind == "q":
            fields[name] = r.qid()
        elif kind == "S":
            n = r.int("2")
            fields[name] = unpack_stat(r.take(n))
        elif kind == "W":
            fields[name] = [r.str() for _ in range(r.int("2"))]
        elif kind == "Q":
            fields[name] = [r.qid() for _ in range(r.int("2"))]
        else:  # D
            fields[name] = bytes(r.take(r.int("4")))
    if r.off != len(r.buf):
        raise ProtocolError("message longer than its fields")
    return Fcall(typ, tag, **fields)


def mode_string(mode: int) -> str:
    """ls -l's mode column for a Plan 9 mode, as Plan 9's ls prints it."""
    kind = "d" if mode & DMDIR else "a" if mode & DMAPPEND else "l" if mode & DMEXCL else "-"
    bits = "".join(
        c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx")
    )
    return kind + "-" + bits
