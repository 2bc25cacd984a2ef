"""The geryon command line against a real registry: output formats and errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import BIN, Registry, run_cli


def cli(registry: Registry, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""})


def test_ls_prints_registry4_text_quoted_as_inferno(registry: Registry) -> None:
    assert (
        cli(
            registry, "set", "tcp!h0!1", "svc=rstyx", "note=a b", "empty=", "q=it's", "--persist"
        ).returncode
        == 0
    )
    assert cli(registry, "set", "d0.mbox", "addr=tcp!h0!1", "--persist").returncode == 0
    out = cli(registry, "ls").stdout
    assert out == "d0.mbox addr tcp!h0!1\ntcp!h0!1 empty '' note 'a b' q 'it''s' svc rstyx\n"
    assert cli(registry, "ls", "--attr", "svc=rstyx", "-n").stdout == "tcp!h0!1\n"
    assert cli(registry, "ls", "--attr", "empty", "-n").stdout == "tcp!h0!1\n"
    assert cli(registry, "ls", "--attr", "empty=*", "--attr", "svc=rstyx", "-n").stdout == (
        "tcp!h0!1\n"
    )
    assert cli(registry, "ls", "--prefix", "d0", "-n").stdout == "d0.mbox\n"
    listed = json.loads(cli(registry, "ls", "--json").stdout)
    assert [s["name"] for s in listed] == ["d0.mbox", "tcp!h0!1"]
    assert listed[1]["attrs"]["note"] == "a b" and listed[1]["lease"] == 0


def test_set_get_rm_and_fences(registry: Registry) -> None:
    r = cli(registry, "set", "d0.mbox", "addr=x")
    assert r.returncode == 2 and "--persist" in r.stderr
    assert cli(registry, "set", "d0.mbox", "addr=x", "automount=1", "--persist").returncode == 0
    assert cli(registry, "set", "d0.mbox", "addr=y", "--rm-attr", "automount").stdout == (
        "d0.mbox addr y\n"
    )
    got = json.loads(cli(registry, "get", "d0.mbox", "--json").stdout)
    stale = got["mod_revision"] - 1
    r = cli(registry, "rm", "d0.mbox", "--rev", str(stale))
    assert r.returncode == 1 and "mod_revision" in r.stderr
    assert cli(registry, "rm", "d0.mbox", "--rev", str(got["mod_revision"])).returncode == 0
    r = cli(registry, "get", "d0.mbox")
    assert r.returncode == 1 and r.stderr == "geryon: no service 'd0.mbox'\n"


def test_bad_input_one_line_errors(registry: Registry) -> None:
    for args in (
        ["set", "a/b", "x=1", "--persist"],
        ["ls", "--attr", "b@d=1"],
        ["set", "ok", "noequals", "--persist"],
        ["rm", "new"],
        ["set", "ok", "x=1", "--persist", "--rev", "-3"],
    ):
        r = cli(registry, *args)
        assert r.returncode != 0, args
        assert r.stderr.startswith("geryon: ") and r.stderr.count("\n") == 1, (args, r.stderr)
    r = run_cli("--registry", "127.0.0.1:1", "--timeout", "1", "ls")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_watch_prints_events_until_interrupted(registry: Registry) -> None:
    assert cli(registry, "set", "a", "svc=x", "--persist").returncode == 0
    proc = subprocess.Popen(
        [
            str(BIN / "geryon"),
            "--registry",
            registry.address,
            "watch",
            "--snapshot",
            "--attr",
            "svc=x",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("SNAPSHOT ")
        assert proc.stdout.readline().startswith("SYNCED ")
        cli(registry, "set", "a", "svc=y")
        line = proc.stdout.readline().split()
        assert line[0] == "DELETE" and line[2] == "a"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    assert code == 128 + signal.SIGINT
    assert "Traceback" not in proc.stderr.read()


def test_a_second_sigint_ends_a_command_stuck_outside_the_loop(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: nobody will
    proc = subprocess.Popen(
        [str(BIN / "geryon"), "ndb", "query", "-f", str(fifo), "name"],
        stderr=subprocess.PIPE,
        text=True,
    )
    wchan = Path(f"/proc/{proc.pid}/wchan")
    deadline = time.monotonic() + 10  # until it waits on the fifo (a SIGINT
    while time.monotonic() < deadline:  # during start-up is Python's, not ours)
        if wchan.read_text() == "wait_for_partner":
            break
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    assert proc.wait(10) == 128 + signal.SIGINT
    assert "Traceback" not in proc.stderr.read()


def test_help_texts() -> None:
    for args in ([], ["ls"], ["watch"], ["set"], ["ca"], ["ndb"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: geryon" in r.stdout
    r = subprocess.run([str(BIN / "geryon-registryd"), "--help"], capture_output=True, text=True)
    assert "--data-dir" in r.stdout and "--tls-dir" in r.stdout


def test_registryd_refuses_etcd_flags_without_etcd() -> None:
    for args in (
        ["--etcd-prefix", "/g/"],
        ["--etcd-timeout", "3"],
        ["--etcd-compact-interval", "0"],
    ):
        r = subprocess.run(
            [str(BIN / "geryon-registryd"), "--listen", "127.0.0.1:0", *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 2, args
        assert r.stderr.splitlines()[-1].endswith(f"{args[0]}: needs --etcd"), r.stderr
    r = subprocess.run([str(BIN / "geryon-registryd"), "--help"], capture_output=True, text=True)
    assert "(default /geryon/)" in r.stdout and "default 60)" in r.stdout
