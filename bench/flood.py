"""`python -m bench.flood`: a polite node's writes beside nodes flooding the
registry, over mutual TLS, with the default quotas.

The polite node writes one entry at a time (the next write when the last is
acknowledged) for a few seconds alone, then beside one, two and four
flooders (alone again between them): each its own identity in its own
process, keeping 64 writes in flight and sending the next the moment one is
answered, refused or not. The row is the polite node's acknowledged writes a
second beside the flooders over its rate alone in the phases around it; the
flooders' own rates are printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.report import pct

BIN = Path(sys.executable).parent
IN_FLIGHT = 64


async def write_loop(
    address: str, tls_dir: Path | None, name: str, seconds: float, width: int
) -> dict:
    """``width`` writers of ``name``'s entries under one lease for ``seconds``
    (plain text when ``tls_dir`` is None)."""
    from geryon import errors
    from geryon.client import Client

    ok = refused = failed = 0
    took: list[float] = []
    async with Client(address, tls_dir=tls_dir, retry_for=30) as c:
        lease = c.lease(60_000)
        await lease.start()
        deadline = time.monotonic() + seconds

        async def writer(i: int) -> None:
            nonlocal ok, refused, failed
            n = 0
            while time.monotonic() < deadline:
                n += 1
                t = time.perf_counter()
                try:
                    await c.register(f"{name}-{i}", {"n": str(n)}, lease=lease.id)
                    ok += 1
                    took.append(time.perf_counter() - t)
                except errors.ResourceExhausted:
                    refused += 1
                except errors.GeryonError as exc:  # timed out, most likely
                    failed += 1
                    if failed == 1:
                        print(f"{name}: {type(exc).__name__}: {exc}", flush=True)

        started = time.monotonic()
        await asyncio.gather(*(writer(i) for i in range(width)))
        elapsed = time.monotonic() - started
        await lease.close(revoke=True)
    return {
        "ok_s": ok / elapsed,
        "refused_s": refused / elapsed,
        "failed": failed,
        "p50_ms": pct(took, 50) * 1000,
        "p99_ms": pct(took, 99) * 1000,
    }


async def run(seconds: float, floods: list[int]) -> list[dict]:
    from geryon import tls

    with tempfile.TemporaryDirectory(prefix="geryon-bench-flood-") as tmp:
        root = Path(tmp)
        ca = root / "ca"
        tls.init_ca(ca)
        ids = {"registry": tls.issue(ca, "registry", role="server", out=root / "id" / "registry")}
        for name in ["polite", *(f"flood{i}" for i in range(max(floods)))]:
            ids[name] = tls.issue(ca, name, role="node", out=root / "id" / name)
        port = procs.free_port()
        address = f"127.0.0.1:{port}"
        registry = procs.Proc(
            [str(BIN / "geryon-registryd"), "--listen", address, "--data-dir",
             str(root / "data"), "--tls-dir", str(ids["registry"])],
            root / "registry.log",
            ready="serving on",
        )  # fmt: skip
        await registry.start()
        rows = []
        try:
            for n in floods:
                flooders = [
                    procs.Proc(
                        [
                            sys.executable,
                            "-m",
                            "bench.flood",
                            "--flooder",
                            address,
                            str(ids[f"flood{i}"]),
                            f"flood{i}",
                            str(seconds + 2),
                        ],
                        root / f"flood{i}-of-{n}.log",
                        ready="flooding",
                    )
                    for i in range(n)
                ]
                for f in flooders:
                    await f.start()
                await asyncio.sleep(1.0 if n else 0)  # the flood at full strength first
                polite = await write_loop(address, ids["polite"], "polite", seconds, 1)
                floods_seen = []
                for f in flooders:
                    await f.wait_for("}", timeout=seconds + 60)
                    last = [ln for ln in f.output().splitlines() if ln.startswith("{")][-1]
                    floods_seen.append(json.loads(last))
                    f.stop()
                rows.append({"flooders": n, "polite": polite, "floods": floods_seen})
        finally:
            registry.stop()
            procs.kill_all()
        return rows


def print_rows(rows: list[dict]) -> None:
    """A row per flood size; its ratio is over the polite node's rate alone
    in the phases just before and after it (the machine drifts)."""
    print("flood (TLS, default quotas): a node writing one write at a time beside")
    print("flooders keeping 64 writes in flight each, every identity its own process")
    print(f"  {'flooders':>8}  {'polite ok/s':>11}  {'of alone':>8}  {'p50 ms':>6}  {'p99 ms':>6}"
          "  each flooder ok/s")  # fmt: skip
    for i, r in enumerate(rows):
        p = r["polite"]
        if r["flooders"] == 0:
            ratio_text = "-"
        else:
            alone = [
                rows[j]["polite"]["ok_s"]
                for j in (i - 1, i + 1)
                if 0 <= j < len(rows) and rows[j]["flooders"] == 0
            ]
            ratio_text = f"{p['ok_s'] / (sum(alone) / len(alone)):.2f}x"
        each = ", ".join(f"{f['ok_s']:.0f}" for f in r["floods"]) or "-"
        print(f"  {r['flooders']:>8}  {p['ok_s']:>11.0f}  {ratio_text:>8}  {p['p50_ms']:>6.2f}"
              f"  {p['p99_ms']:>6.2f}  {each}")  # fmt: skip
        failed = p["failed"] + sum(f["failed"] for f in r["floods"])
        refused = sum(f["refused_s"] for f in r["floods"])
        if failed or refused:
            print(f"    ({failed} writes failed; flooders refused {refused:.0f}/s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: short phases")
    p.add_argument("--seconds", type=float, default=None, help="length of each phase (default 5)")
    p.add_argument("--flooder", nargs=4, metavar=("ADDRESS", "TLS_DIR", "NAME", "SECONDS"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args(argv)
    if args.flooder:
        address, tls_dir, name, secs = args.flooder
        print("flooding", flush=True)
        tls = Path(tls_dir) if tls_dir else None
        result = asyncio.run(write_loop(address, tls, name, float(secs), IN_FLIGHT))
        print(json.dumps(result), flush=True)
        return
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    # Alone between every flood size, so each ratio has its own baseline.
    floods = [0, 1, 0] if args.quick else [0, 1, 0, 2, 0, 4, 0]
    with contextlib.suppress(KeyboardInterrupt):
        print_rows(asyncio.run(run(seconds, floods)))


if __name__ == "__main__":
    main()
