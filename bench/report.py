"""The results: medians, ratios, the printed table and the JSON file.

ratio is Geryon over etcd, oriented so that above 1 means Geryon is better:
geryon/etcd for throughputs, etcd/geryon for times. ``of echo`` is a Geryon
throughput (times the round trips one operation takes) over the bare
grpc.aio echo measured in the same run: how close Geryon gets to the Python
limit. Echo rows show the echo server's own figure in the Geryon column.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from bench.core import ECHO, ETCD, GERYON, Row, Sizes, median

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def pct(values: list[float], q: float) -> float:
    """The Q-th percentile (linear between the closest ranks)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_rows(rows: list[Row], values: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """One dict per row: medians, ratio, fraction of echo, every round."""
    med: dict[str, dict[str, float | None]] = {}
    for row in rows:
        per = values.get(row.key, {})
        med[row.key] = {side: (median(v) if v else None) for side, v in per.items()}
    out = []
    for row in rows:
        m = med[row.key]
        is_echo = ECHO in m
        g = m.get(ECHO) if is_echo else m.get(GERYON)
        e = m.get(ETCD)
        ratio = None
        if g and e:
            ratio = g / e if row.better == "higher" else e / g
        of_echo = None
        if row.echo and g is not None and row.better == "higher":
            limit = med.get(row.echo, {}).get(ECHO)
            if limit:
                of_echo = g * row.rpcs / limit
        entry: dict[str, Any] = {
            "operation": row.label,
            "geryon": _round(g),
            "etcd": _round(e),
            "ratio": _round(ratio, 3),
            "unit": row.unit,
            "key": row.key,
            "better": row.better,
            "of_echo": _round(of_echo, 3),
            "rounds": {side: [_round(x) for x in v] for side, v in values.get(row.key, {}).items()},
        }
        if is_echo:
            entry["note"] = "a bare grpc.aio echo server, not Geryon: the ceiling for Geryon"
        out.append(entry)
    return out


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    head = ("operation", "unit", "Geryon", "etcd", "ratio", "of echo")
    lines = [
        (
            r["operation"],
            r["unit"],
            _fmt(r["geryon"]),
            _fmt(r["etcd"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
            "-" if r["of_echo"] is None else f"{r['of_echo']:.0%}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cols: tuple[str, ...]) -> str:
        left = cols[0].ljust(widths[0]) + "  " + cols[1].ljust(widths[1])
        return left + "".join("  " + c.rjust(w) for c, w in zip(cols[2:], widths[2:], strict=True))

    text = [fmt(head), "-" * len(fmt(head)), *(fmt(x) for x in lines)]
    text.append("ratio: Geryon over etcd, above 1 = Geryon better (for ms: etcd/Geryon).")
    text.append("of echo: Geryon round trips/s over the echo server's at the same concurrency.")
    text.extend(f"note: {n}" for n in notes)
    return "\n".join(text)


def machine(extra: dict[str, str]) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "system": f"{platform.system()} {platform.release()}",
        **extra,
    }


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit() -> str:
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")


def release() -> str | None:
    return _git("describe", "--tags", "--exact-match") or None


def write(
    path: Path,
    rows: list[dict[str, Any]],
    *,
    sizes: Sizes,
    notes: list[str],
    extra_machine: dict[str, str],
) -> list[Path]:
    """Write the results to ``path`` and, at a release tag, a copy named for it."""
    doc = {
        "rows": rows,
        "machine": machine(extra_machine),
        "commit": commit(),
        "sizes": asdict(sizes),
        "notes": notes,
    }
    text = json.dumps(doc, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written = [path]
    tag = release()
    if tag:
        copy = path.parent / f"{tag.replace('/', '_')}.json"
        copy.write_text(text)
        written.append(copy)
    return written


def save(path: Path, doc: dict[str, Any], *, stem: str, copy: bool = True) -> None:
    """Write DOC as JSON to PATH and, at a release tag (when COPY), beside it
    as STEM-TAG.json: bench.disk's and bench.replica's results."""
    text = json.dumps(doc, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"bench: wrote {path}", file=sys.stderr)
    tag = release()
    if tag and copy:
        other = path.parent / f"{stem}-{tag.replace('/', '_')}.json"
        other.write_text(text)
        print(f"bench: wrote {other}", file=sys.stderr)
