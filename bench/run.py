"""make bench: Geryon beside etcd and a bare grpc.aio echo, in one bounded run.

    python -m bench.run [--quick] [--no-etcd] [--out FILE] [--profile DIR]

Starts a geryon-registryd on SQLite, an etcd 3.4 (Debian's; ``make
etcd-deps`` installs it), a geryon-registryd front on its etcd store over a
three-member etcd cluster, and an echo server, on free loopback ports with
their data in one temporary directory; runs every workload in
bench/workloads/ with the registries alternating round by round (A/B/C, then
C/B/A), prints the median of each row and writes them to
bench/results/latest.json (plus a copy named for the release when HEAD
carries a tag).

Bounded and self-cleaning: every wait has a timeout, every process started is
killed (in ``finally``, at exit, on SIGTERM and Ctrl-C) and the temporary
directory is removed (kept with BENCH_KEEP=1).

``--quick`` (or BENCH_QUICK=1) is a small smoke run: tiny sizes, one round,
nothing written unless ``--out`` says where. ``--no-etcd`` runs Geryon (on
SQLite) and the echo only. ``--profile DIR`` runs the registries under
cProfile and writes one summary per workload into DIR (its figures are
slower). ``--only``,
``--rounds`` and ``--registryd-arg`` are for experiments; like the others
they leave bench/results/ alone unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import etcd_side, geryon_etcd_side, geryon_side, procs, report
from bench.core import ECHO, ETCD, GERYON, GERYON_ETCD, Bench, Side, Sizes, Workload, bounded
from bench.echo import EchoSide
from bench.workloads import WORKLOADS

TOTAL_BUDGET_S = 20 * 60  # the whole run, whatever happens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark Geryon's registry beside etcd and a bare grpc.aio echo.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
        help="a small smoke run (also BENCH_QUICK=1)",
    )
    p.add_argument(
        "--no-etcd", action="store_true", help="Geryon on SQLite and the echo only (no etcd)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write the results here (default: bench/results/latest.json for a "
        "complete run; nowhere after --quick, --no-etcd, --only, --rounds, --profile "
        "or --registryd-arg)",
    )
    p.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the registry into DIR")
    p.add_argument(
        "--only", action="append", metavar="WORKLOAD", help="run only these workloads (repeatable)"
    )
    p.add_argument("--rounds", type=int, help="rounds per workload (default 3; quick 1)")
    p.add_argument(
        "--registryd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to every geryon-registryd (both stores; repeatable), "
        "e.g. --registryd-arg=--log-level=warning",
    )
    return p.parse_args(argv)


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def run_workload(
    bench: Bench, wl: Workload, values: dict[str, dict[str, list[float]]]
) -> None:
    active = [s for s in wl.sides if s in bench.sides]
    if not active:
        return
    for name, side in bench.sides.items():
        if name not in active:
            side.idle()
    t0 = time.monotonic()
    for name in active:
        side = bench.sides[name]
        await bounded(side.reset(), 60, f"{name} start")
        if wl.prepare is not None:
            await bounded(wl.prepare(bench, side), wl.timeout, f"{wl.name}: prepare {name}")
    for r in range(bench.sizes.rounds):
        order = active if r % 2 == 0 else active[::-1]
        for name in order:
            side = bench.sides[name]
            if r and wl.reset_each_round:
                await bounded(side.reset(), 60, f"{name} restart")
            got = await bounded(
                wl.measure(bench, side), wl.timeout, f"{wl.name}: round {r + 1} on {name}"
            )
            for key, value in got.items():
                for row, column in wl.cells(name, key):
                    values.setdefault(row, {}).setdefault(column, []).append(value)
            shown = ", ".join(f"{k} {v:,.1f}" for k, v in got.items())
            log(f"{wl.name} round {r + 1}/{bench.sizes.rounds} {name}: {shown}")
    for cleanup in bench.cleanups:
        await bounded(cleanup(), 30, f"{wl.name}: clean up")
    bench.cleanups.clear()
    bench.state.clear()
    log(f"{wl.name}: {time.monotonic() - t0:.1f}s")


async def main_async(args: argparse.Namespace, tmp: Path) -> int:
    sizes = Sizes.quick_sizes() if args.quick else Sizes()
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    versions = {"geryon": geryon_side.version()}
    sides: dict[str, Side] = {}
    workloads = [make(sizes) for make in WORKLOADS]
    if args.only:
        unknown = set(args.only) - {w.name for w in workloads}
        if unknown:
            log(f"no workload {', '.join(sorted(unknown))}; have {[w.name for w in workloads]}")
            return 2
        workloads = [w for w in workloads if w.name in args.only]
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    geryon = geryon_side.GeryonSide(tmp, profile_dir=profile_dir, extra_args=args.registryd_arg)
    geryons: list[geryon_side.GeryonSide] = [geryon]
    load_start = os.getloadavg()[0]
    echo = EchoSide(tmp)
    try:
        await bounded(echo.start(), 60, "echo start")
        sides[ECHO] = echo
        await bounded(geryon.start(), 60, "geryon start")
        sides[GERYON] = geryon
        if not args.no_etcd:
            versions["etcd"] = etcd_side.version()
            if not versions["etcd"].startswith("etcd 3."):
                raise RuntimeError(f"bench: want etcd 3.x (its v3 API), have {versions['etcd']}")
            etcd = etcd_side.EtcdSide(tmp)
            await bounded(etcd.start(), 60, "etcd start")
            sides[ETCD] = etcd
            # Started (a fresh cluster and front) by the first workload using it.
            on_etcd = geryon_etcd_side.GeryonEtcdSide(
                tmp, profile_dir=profile_dir, extra_args=args.registryd_arg
            )
            sides[GERYON_ETCD] = on_etcd
            geryons.append(on_etcd)
        log(f"{', '.join(versions.values())}; sizes: {'quick' if sizes.quick else 'full'}")
        bench = Bench(sizes, tmp, sides)
        if ETCD not in sides:
            bench.note("etcd not run (--no-etcd): no etcd figures, no (etcd store) figures")
        else:
            bench.note(f"{versions['etcd']}: one member, defaults (its WAL fsynced per commit)")
        if GERYON_ETCD in sides and any(GERYON_ETCD in wl.sides for wl in workloads):
            bench.note(
                "(etcd store): Geryon is a geryon-registryd front with --etcd over a fresh "
                f"{geryon_etcd_side.MEMBERS}-member etcd cluster (defaults); etcd is the one above"
            )
        values: dict[str, dict[str, list[float]]] = {}
        for wl in workloads:
            for g in geryons:
                g.tag = wl.name
            await run_workload(bench, wl, values)
        load_end = os.getloadavg()[0]
        versions["loadavg"] = f"{load_start:.1f} at start, {load_end:.1f} at end"
        if max(load_start, load_end) > (os.cpu_count() or 1) / 2:
            bench.note(
                f"machine busy: load average {load_start:.1f} at start, {load_end:.1f} at "
                "end (other processes): figures are noisy"
            )
        if args.registryd_arg:
            bench.note(f"geryon-registryd run with {' '.join(args.registryd_arg)}")
        rows = report.build_rows([row for wl in workloads for row in wl.table_rows], values)
        print(report.table(rows, bench.notes), flush=True)
        out = args.out
        partial = (
            args.quick
            or args.no_etcd
            or profile_dir
            or args.only
            or args.rounds
            or args.registryd_arg
        )
        if out is None and not partial:
            out = report.RESULTS / "latest.json"
        if out is not None:
            for path in report.write(
                out, rows, sizes=sizes, notes=bench.notes, extra_machine=versions
            ):
                log(f"wrote {path}")
        return 0
    finally:
        for side in sides.values():
            side.stop()
        if profile_dir is not None:
            for g in geryons:
                summarize_profiles(g, profile_dir)


def summarize_profiles(geryon: geryon_side.GeryonSide, out: Path) -> None:
    """One text summary per profiled registry process (killed ones have none)."""
    for path, tag in geryon.profiles:
        if not path.exists():
            continue
        with open(out / f"{path.stem}-{tag}.txt", "w") as f:
            stats = pstats.Stats(str(path), stream=f)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(60)
        log(f"profile: {out / f'{path.stem}-{tag}.txt'}")


def sweep_stale(prefix: str = "geryon-bench-") -> None:
    """Remove temporary dirs of earlier runs that were killed outright (their
    processes died with them: see procs.py)."""
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid = int((old / "pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (OSError, ValueError):
            pass


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep_stale()
    tmp = Path(tempfile.mkdtemp(prefix="geryon-bench-"))
    (tmp / "pid").write_text(str(os.getpid()))
    code = 1
    try:

        async def guarded() -> int:
            task = asyncio.current_task()
            assert task is not None
            # SIGTERM ends the run like Ctrl-C: cancel, clean up, exit.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await bounded(main_async(args, tmp), TOTAL_BUDGET_S, "the whole run")

        code = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        code = 130
    except Exception as exc:
        traceback.print_exc()
        log(f"failed: {exc}")
        clusters = sorted(tmp.glob("etcd-cluster-*"), key=lambda p: p.stat().st_mtime)
        members = sorted(clusters[-1].glob("*.log")) if clusters else []
        for path in [
            *(tmp / name for name in ("geryon.log", "etcd.log", "geryon-etcd.log", "echo.log")),
            *members,
        ]:
            name = path.relative_to(tmp)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"---- {name} (last lines) ----", *tail, sep="\n", file=sys.stderr)
        code = 1
    finally:
        procs.kill_all()
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
