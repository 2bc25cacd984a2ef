"""A client in another language works from the .proto files alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from geryon import tls

NODE_DIR = ROOT / "clients" / "node"


def npm_test(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("clients/node/node_modules missing: run `make node-deps` (make test does)")
    return subprocess.run(
        ["npm", "test", "--silent"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_node_client_plaintext(registry) -> None:
    r = npm_test({"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""})
    assert r.returncode == 0, r.stdout + r.stderr


def test_node_client_tls(start_registry, tmp_path: Path) -> None:
    tls.init_ca(tmp_path / "ca")
    server = tls.issue(tmp_path / "ca", "registry", role="server", out=tmp_path / "server")
    node = tls.issue(tmp_path / "ca", "nodejs", role="node", out=tmp_path / "node")
    registry = start_registry(extra=["--tls-dir", str(server)])
    r = npm_test({"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": str(node)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_node_client_moves_past_a_dead_endpoint(registry) -> None:
    # The first endpoint never answers: the client moves to the next one.
    dead = f"127.0.0.1:{free_port()}"
    r = npm_test({"GERYON_REGISTRY": f"{dead},{registry.address}", "GERYON_TLS_DIR": ""})
    assert r.returncode == 0, r.stdout + r.stderr
