"""`python -m bench.cpu`: what a cpu session costs, beside the same work done
locally on the same machine (there is no ssh here to compare with).

- start-up: `geryon cpu -- true` from a shell, p50 and p99, beside a local
  fork+exec of `true`; and a session alone (open, run `true`, its exit) from
  a client that is already running, which leaves out the CLI's own start;
- throughput: `cat` of a 256 MiB file through a session into /dev/null,
  beside `cat FILE | cat > /dev/null` (a local pipe).

A real registry and a real `geryon cpu serve` on loopback, plain text; the
commands run as nobody when the bench runs as root.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs, report
from bench.report import pct

BIN = Path(sys.executable).parent
ACCOUNT = "nobody" if os.geteuid() == 0 else getpass.getuser()


def timed(argv: list[str], n: int, **kw: object) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]
        out.append(time.perf_counter() - t)
    return out


async def sessions(port: int, n: int, argv: list[str]) -> list[float]:
    """N sessions of ARGV, one after another, from this process: their times."""
    from geryon.cpu import client as cpu_client

    cpu = cpu_client.Cpu(f"tcp!127.0.0.1!{port}", "b", "", 1, 0, 0)
    ch = cpu_client.channel(cpu, tls_dir=None)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            s = cpu_client.Session(ch, cpu_client.start_message(argv))
            await s.open()
            await s.close_stdin()
            async for _fd, piece in s.output():
                await s.consumed(len(piece))
            assert s.exit is not None and s.exit.code == 0
            out.append(time.perf_counter() - t)
    finally:
        await ch.close()
    return out


async def measure(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float, str]]:
    n_cli, n_sessions, n_local = (5, 10, 20) if args.quick else (40, 200, 400)
    size = (16 if args.quick else 256) << 20
    registry, cpu_port = f"127.0.0.1:{procs.free_port()}", procs.free_port()
    await procs.Proc([str(BIN / "geryon-registryd"), "--listen", registry, "--data-dir",
                      str(tmp / "reg")], tmp / "reg.log", ready="serving on").start()
    await procs.Proc([str(BIN / "geryon"), "--registry", registry, "cpu", "serve", "--listen",
                      f"127.0.0.1:{cpu_port}", "--node", "b", "--runas", f"@admin={ACCOUNT}"],
                     tmp / "cpu.log", ready="serving on").start()  # fmt: skip
    subprocess.run([str(BIN / "geryon"), "--registry", registry, "set", "--persist",
                    f"tcp!127.0.0.1!{cpu_port}", "svc=rstyx", "host=b"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    local = timed([shutil.which("true") or "true"], n_local)
    cli = timed([str(BIN / "geryon"), "--registry", registry, "cpu", "-n", "--", "true"], n_cli)
    alone = await sessions(cpu_port, n_sessions, ["true"])
    data = tmp / "data"
    with open(data, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    os.chmod(data, 0o644)
    pipe = min(timed(["sh", "-c", f"cat {data} | cat > /dev/null"], 3))
    remote = min(await sessions(cpu_port, 3, ["cat", str(data)]))
    mb = size / 1e6
    return [
        ("session start-up: `geryon cpu -- true`, p50", pct(cli, 50) * 1e3, "ms"),
        ("session start-up: `geryon cpu -- true`, p99", pct(cli, 99) * 1e3, "ms"),
        ("  a session alone (client running), p50", pct(alone, 50) * 1e3, "ms"),
        ("  a session alone (client running), p99", pct(alone, 99) * 1e3, "ms"),
        ("  local fork+exec of true, p50", pct(local, 50) * 1e3, "ms"),
        ("  local fork+exec of true, p99", pct(local, 99) * 1e3, "ms"),
        (f"stdout: cat of {size >> 20} MiB through a session (client running)", mb / remote,
         "MB/s"),
        (f"  local pipe: cat | cat of {size >> 20} MiB", mb / pipe, "MB/s"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                   help="a smoke run: few sessions, a 16 MiB file")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the results here")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="geryon-bench-cpu-"))
    os.chmod(tmp, 0o755)  # the file is read by the session's account
    try:
        rows = asyncio.run(measure(args, tmp))
    finally:
        procs.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'cpu sessions':<{width}}  {'figure':>10}")
    for label, value, unit in rows:
        print(f"{label:<{width}}  {value:>10.2f} {unit}")
    alone, local, remote, pipe = rows[2][1], rows[4][1], rows[6][1], rows[7][1]
    print(f"(a session alone / local fork+exec, p50: {alone / local:.1f}x; "
          f"session stdout / local pipe: {remote / pipe:.2f}x)")  # fmt: skip
    out = args.out or (None if args.quick else report.RESULTS / "cpu-latest.json")
    if out is not None:
        doc = {
            "rows": [{"operation": r[0], "value": round(r[1], 3), "unit": r[2]} for r in rows],
            "machine": report.machine({"kernel": os.uname().release}),
            "commit": report.commit(),
        }
        report.save(out, doc, stem="cpu", copy=args.out is None)


if __name__ == "__main__":
    main()
