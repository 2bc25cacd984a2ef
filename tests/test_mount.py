"""`geryon mount` end to end: a real registry, a real chunk server, a real
FUSE mount, and the programs people run on it (ls, cat, cp, mv, rm, mkdir,
rmdir, find, an editor's write-then-rename), plus a mount that follows its
disk through a chunk server restarted on another port.

Skipped, saying why, where FUSE cannot be used (no pyfuse3, no /dev/fuse
we may open, no fusermount3); `make fuse-deps` installs what it can.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, free_port, run_cli

from geryon.disk.mount import errno_of, fuse_unavailable, mounts


def _fuse_missing() -> str | None:
    why = fuse_unavailable()
    if why is None and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        why = "/dev/fuse is not ours to open"
    return why


needs_fuse = pytest.mark.skipif(
    _fuse_missing() is not None, reason=f"FUSE is not usable here: {_fuse_missing()}"
)

WAIT = "2"  # --wait: how long calls wait for a disk that went away


def poll(check: Callable[[], object], timeout: float = 15.0) -> object:
    """Poll CHECK until it returns truthy; fail after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not so in {timeout}s (last: {got!r})")
        time.sleep(0.05)


def sh(*argv: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=30)
    if ok:
        assert r.returncode == 0, f"{argv}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def set_entry(registry: Registry, name: str, **attrs: str) -> None:
    async def go() -> None:
        async with registry.client() as c:
            await c.register(name, attrs, persist=True)

    asyncio.run(go())


class ChunkServer(Daemon):
    def __init__(self, chunk: Path, port: int, create: str | None) -> None:
        self.port = port
        argv = [str(BIN / "geryon"), "disk", "serve", str(chunk)]
        argv += ["--listen", f"127.0.0.1:{port}"] + (["--create", create] if create else [])
        super().__init__(argv, chunk.with_suffix(f".{port}.log"), "disk: serving")

    @property
    def addr(self) -> str:
        return f"tcp!127.0.0.1!{self.port}"


@dataclass
class Disk:
    registry: Registry
    name: str
    chunk: Path
    server: ChunkServer


@pytest.fixture
def disk(start_registry: Callable[..., Registry], daemons: list[Daemon], tmp_path: Path) -> Disk:
    """A 2 MiB disk served on loopback, and its entry in a fresh registry."""
    registry = start_registry()
    chunk = tmp_path / "chunk0"
    server = ChunkServer(chunk, free_port(), "2MiB")
    daemons.append(server)
    server.start()
    set_entry(registry, "d0", addr=server.addr, size=str(2 << 20))
    return Disk(registry, "d0", chunk, server)


@dataclass
class Mounted:
    point: Path
    log: Path

    def pid(self) -> int:
        return int(re.findall(r"mount: pid (\d+)", self.log.read_text())[-1])


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """``mount(disk, *flags)`` runs `geryon mount` and checks it worked; every
    mount is undone afterwards (fusermount3 -u -z) and its process gone."""
    made: list[Mounted] = []

    def go(d: Disk, *flags: str) -> Mounted:
        log = tmp_path / f"mount{len(made)}.log"
        at = flags[flags.index("--at") + 1] if "--at" in flags else None
        point = Path(at) if at else tmp_path / "n" / d.name
        m = Mounted(point, log)
        made.append(m)
        args = ["--root", str(tmp_path / "n")] if at is None else []
        r = run_cli(
            "--registry", d.registry.address, "mount", "--wait", WAIT, "--log", str(log),
            *args, *flags, d.name,
        )  # fmt: skip
        assert r.returncode == 0, f"{r.stderr}\n{log.read_text() if log.exists() else ''}"
        assert mounts().get(str(point)) == "fuse.geryon"
        return m

    yield go
    for m in made:
        subprocess.run(["fusermount3", "-u", "-z", str(m.point)], capture_output=True)
        if not m.log.exists() or "mount: pid" not in m.log.read_text():
            continue
        pid = m.pid()
        try:
            poll(lambda pid=pid: not Path(f"/proc/{pid}").exists(), timeout=5)
        except AssertionError:
            os.kill(pid, signal.SIGKILL)  # our own mount process, by its pid
            raise


# ---- without FUSE --------------------------------------------------------------


def test_errno_of_server_strings() -> None:
    import errno

    assert errno_of("file does not exist") == errno.ENOENT
    assert errno_of("permission denied") == errno.EACCES
    assert errno_of("file system full") == errno.ENOSPC
    assert errno_of("directory not empty") == errno.ENOTEMPTY
    assert errno_of("exclusive use file already open") == errno.EBUSY
    assert errno_of("wstat -- attempt to change owner") == errno.EPERM
    assert errno_of("file system is read-only: replica of d0.mbox (...)") == errno.EROFS
    assert errno_of("i/o error: disk I/O error") == errno.EIO


def test_without_fusermount3_mount_says_fuse_is_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    r = run_cli("mount", "--root", str(tmp_path / "n"), "d0", env={"PATH": str(empty)})
    assert r.returncode == 1
    assert r.stderr.startswith("geryon: mount: FUSE is not available here (")
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "n").exists()


# ---- through FUSE --------------------------------------------------------------


@needs_fuse
def test_unknown_or_down_names_are_one_line_and_mount_nothing(
    start_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    registry = start_registry()
    set_entry(registry, "d1", addr="tcp!127.0.0.1!1", status="down", host="h1", chunk="c1")
    root = tmp_path / "n"
    for name, want in (("nope", "no disk named nope"), ("d1", "d1 is down (chunk h1!c1)")):
        r = run_cli("--registry", registry.address, "mount", "--root", str(root), name)
        assert (r.returncode, r.stderr) == (1, f"geryon: mount: {want}\n")
        assert not (root / name).exists()
    r = run_cli("umount", "--root", str(root), "nope")
    assert (r.returncode, r.stderr) == (1, f"geryon: umount: {root}/nope: not mounted\n")


@needs_fuse
def test_programs_work_on_a_mount(
    disk: Disk, mount: Callable[..., Mounted], tmp_path: Path
) -> None:
    m = mount(disk)
    d = m.point
    assert d == tmp_path / "n" / "d0"

    (tmp_path / "hello").write_text("hello, disk\n")
    sh("cp", str(tmp_path / "hello"), str(d / "a.txt"))
    assert sh("cat", str(d / "a.txt")).stdout == "hello, disk\n"
    sh("mkdir", str(d / "sub"))
    sh("cp", str(d / "a.txt"), str(d / "sub" / "b.txt"))
    sh("mv", str(d / "sub" / "b.txt"), str(d / "sub" / "c.txt"))  # a wstat of the name
    sh("mv", str(d / "a.txt"), str(d / "sub"))  # EXDEV: mv copies, then removes

    ls = sh("ls", "-l", str(d / "sub")).stdout
    assert re.search(r"^-rw.* 12 .* a\.txt$", ls, re.M), ls
    assert re.search(r"^-rw.* 12 .* c\.txt$", ls, re.M), ls
    found = sh("find", ".", cwd=d).stdout.split()
    assert sorted(found) == [".", "./adm", "./adm/users", "./sub", "./sub/a.txt", "./sub/c.txt"]

    # An editor's save: a temporary file, then renamed over the original.
    target = d / "sub" / "c.txt"
    tmp = d / "sub" / ".c.txt.swp"
    with open(tmp, "w") as f:
        f.write("edited\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    assert sh("cat", str(target)).stdout == "edited\n"
    assert sorted(os.listdir(d / "sub")) == ["a.txt", "c.txt"]

    # Links the disk does not have are refused at once, and the mount lives on.
    for argv in (["ln", str(target), str(d / "hard")], ["ln", "-s", "c.txt", str(d / "sym")]):
        r = sh(*argv, ok=False)  # (a handler that dies leaves it hanging: sh times out)
        assert r.returncode != 0 and "failed to create" in r.stderr, r.stderr
    assert sh("cat", str(target)).stdout == "edited\n"
    # touch: the times a utimes sets (9P2000 keeps the atime itself).
    sh("touch", "-d", "2020-01-02 03:04:05", str(target))
    assert int(os.stat(target).st_mtime) == int(time.mktime((2020, 1, 2, 3, 4, 5, 0, 0, -1)))

    # A disk that is full says so: ENOSPC, and the disk works after.
    (tmp_path / "big").write_bytes(os.urandom(3 << 20))
    r = sh("cp", str(tmp_path / "big"), str(d / "big"), ok=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    sh("rm", str(d / "big"))
    sh("cp", str(tmp_path / "hello"), str(d / "after"))
    assert (d / "after").read_text() == "hello, disk\n"

    r = sh("rmdir", str(d / "sub"), ok=False)
    assert "Directory not empty" in r.stderr, r.stderr
    sh("rm", str(d / "sub" / "a.txt"), str(d / "sub" / "c.txt"))
    sh("rmdir", str(d / "sub"))
    assert sorted(os.listdir(d)) == ["adm", "after"]

    # statfs: the entry's size.
    st = os.statvfs(d)
    assert st.f_blocks * st.f_frsize == 2 << 20

    # Undone by name (ROOT/NAME); its process goes with it.
    pid = m.pid()
    r = run_cli("umount", "--root", str(tmp_path / "n"), "d0")
    assert (r.returncode, r.stderr) == (0, "")
    assert str(d) not in mounts()
    poll(lambda: not Path(f"/proc/{pid}").exists())


@needs_fuse
def test_a_mount_follows_its_disk_to_a_new_port(
    disk: Disk, mount: Callable[..., Mounted], daemons: list[Daemon], tmp_path: Path
) -> None:
    m = mount(disk, "--at", str(tmp_path / "at"))
    f = m.point / "mbox"
    f.write_bytes(b"before\n")
    held = open(f, "r+b")  # open across the restart: reopened, never truncated
    try:
        disk.server.stop()

        # While the disk is gone, calls fail with EIO after --wait, not never.
        r = sh("cat", str(f), ok=False)
        assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr

        moved = ChunkServer(disk.chunk, free_port(), None)
        daemons.append(moved)
        moved.start()
        set_entry(disk.registry, "d0", addr=moved.addr, size=str(2 << 20))
        poll(lambda: sh("cat", str(f), ok=False).stdout == "before\n")

        held.seek(0, os.SEEK_END)
        held.write(b"after\n")
    finally:
        held.close()
    assert f.read_bytes() == b"before\nafter\n"

    # SIGTERM ends the mount process, and it unmounts first.
    pid = m.pid()
    os.kill(pid, signal.SIGTERM)
    poll(lambda: str(m.point) not in mounts())
    poll(lambda: not Path(f"/proc/{pid}").exists())
    assert "unmounting" in m.log.read_text()
