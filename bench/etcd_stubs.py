"""etcd's Python grpc.aio stubs, generated at bench time; nothing of etcd's is
committed.

The .proto files come from Debian's golang-etcd-server-dev (installed by
``make bench-deps``). They import gogoproto and google.api annotations, which
only steer Go code generation and an HTTP gateway; both are stripped before
``grpc_tools.protoc`` compiles them into a temporary directory. The generated
modules keep etcd's own import paths (``etcd/mvcc/mvccpb/kv.proto`` becomes
``etcd.mvcc.mvccpb.kv_pb2``), so the directory goes on ``sys.path`` as is.
"""

from __future__ import annotations

import glob
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

GOCODE = "/usr/share/gocode/src"
# Import path inside the tree we generate -> path under etcd's source root.
PROTOS = {
    "etcd/mvcc/mvccpb/kv.proto": "mvcc/mvccpb/kv.proto",
    "etcd/auth/authpb/auth.proto": "auth/authpb/auth.proto",
    "etcd/etcdserver/etcdserverpb/rpc.proto": "etcdserver/etcdserverpb/rpc.proto",
}

_STRIP = [
    re.compile(r'^import "(gogoproto|google/api)/[^"]*";\s*$', re.M),
    re.compile(r"^option \(gogoproto\.[^)]*\)[^;]*;\s*$", re.M),
    # field options such as [(gogoproto.nullable) = false]
    re.compile(r"\s*\[\(gogoproto\.[^\]]*\]"),
]


def source_root() -> Path:
    """Where golang-etcd-server-dev put etcd's sources."""
    hits = sorted(glob.glob(f"{GOCODE}/**/etcdserver/etcdserverpb/rpc.proto", recursive=True))
    if not hits:
        raise FileNotFoundError(
            f"bench: no etcd .proto files under {GOCODE}: "
            "install golang-etcd-server-dev (make bench-deps)"
        )
    return Path(hits[0]).parents[2]


def _drop_http_options(text: str) -> str:
    """Remove ``option (google.api.http) = { ... };`` blocks, whose braces nest."""
    marker = "option (google.api.http)"
    while (start := text.find(marker)) >= 0:
        i = text.index("{", start)
        depth = 0
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        end = text.index(";", i) + 1
        text = text[:start] + text[end:]
    return text


def strip(text: str) -> str:
    text = _drop_http_options(text)
    for pattern in _STRIP:
        text = pattern.sub("", text)
    if "gogoproto" in text or "google.api" in text:
        raise ValueError("bench: etcd .proto still mentions gogoproto or google.api")
    return text


def generate(out: Path) -> Path:
    """Write stripped .proto files and their generated modules under ``out``."""
    root = source_root()
    for dest, src in PROTOS.items():
        path = out / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strip((root / src).read_text()))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{out}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *(str(out / p) for p in PROTOS),
        ],
        check=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return out


def load(stubs: Path) -> tuple[ModuleType, ModuleType]:
    """Import (rpc_pb2, rpc_pb2_grpc) from a directory ``generate`` filled."""
    if str(stubs) not in sys.path:
        sys.path.insert(0, str(stubs))
    pb = importlib.import_module("etcd.etcdserver.etcdserverpb.rpc_pb2")
    grpc_mod = importlib.import_module("etcd.etcdserver.etcdserverpb.rpc_pb2_grpc")
    return pb, grpc_mod
