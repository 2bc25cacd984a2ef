"""Mutual TLS and owners against a real registry: no one in where they don't belong."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from pathlib import Path

import pytest
from conftest import Registry, eventually, run_cli

from geryon import errors, tls
from geryon.client import Client
from geryon.model import Registration


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    ids = {}
    for name, role in [
        ("registry", "server"),
        ("root", "admin"),
        ("host0", "node"),
        ("host1", "node"),
        ("viewer", "reader"),
    ]:
        ids[name] = tls.issue(ca, name, role=role, out=tmp_path / "id" / name)
    ids["ca"] = ca
    return ids


@pytest.fixture
def secure(start_registry, pki) -> Registry:
    return start_registry(extra=["--tls-dir", str(pki["registry"])])


def as_(registry: Registry, who: Path, **kw) -> Client:
    return Client(registry.address, tls_dir=who, retry_for=kw.pop("retry_for", 5.0), **kw)


async def test_nodes_own_their_things_admin_owns_all(secure: Registry, pki) -> None:
    async with (
        as_(secure, pki["host0"]) as a,
        as_(secure, pki["host1"]) as b,
        as_(secure, pki["root"]) as root,
        as_(secure, pki["viewer"]) as viewer,
    ):
        lease = await a.grant(30_000)
        s = await a.register("tcp!host0!1", {"id": "chunk0"}, lease=lease)
        assert s.owner == "host0"
        # Anyone authenticated reads.
        assert (await viewer.get("tcp!host0!1")).owner == "host0"
        assert len((await viewer.find())[0]) == 1
        # Node B can't touch node A's things.
        with pytest.raises(errors.PermissionDenied, match="belongs to host0"):
            await b.update("tcp!host0!1", {"x": "1"})
        with pytest.raises(errors.PermissionDenied):
            await b.unregister("tcp!host0!1")
        # Leases are private: another's is not found, as one that never was.
        with pytest.raises(errors.NotFound, match=f"lease {lease} not found"):
            await b.revoke(lease)
        with pytest.raises(errors.NotFound, match=f"lease {lease} not found"):
            await b.register("tcp!host1!1", {}, lease=lease)
        mine = await b.grant(30_000)
        assert [x.id for x in await b.leases()] == [mine]
        assert await viewer.leases() == []
        assert [(x.id, x.owner) for x in await root.leases()] == [
            (lease, "host0"),
            (mine, "host1"),
        ]
        await b.revoke(mine)
        with pytest.raises(errors.AlreadyExists):
            await b.register("tcp!host0!1", {}, lease=await b.grant(30_000))
        stolen = b.lease(30_000)
        await stolen.start(lease)  # keepalive of another's lease
        await eventually(lambda: stolen.lost.is_set(), timeout=10)
        await stolen.close(revoke=False)
        # Nodes can't litter the registry with persistent entries; readers write nothing.
        with pytest.raises(errors.PermissionDenied, match="persistent"):
            await a.register("d0.mbox", {}, persist=True)
        with pytest.raises(errors.PermissionDenied, match="reader viewer"):
            await viewer.register("x", {}, persist=True)
        with pytest.raises(errors.PermissionDenied):
            await viewer.grant(30_000)
        # An admin creates persistent entries and may remove anything.
        await root.register("d0.mbox", {"addr": "tcp!host0!1"}, persist=True)
        await root.update("tcp!host0!1", {"health": "critical"})
        await root.unregister("tcp!host0!1")
        assert [s.name for s in (await viewer.find())[0]] == ["d0.mbox"]


@pytest.mark.parametrize("case", ["none", "other-ca", "expired"])
async def test_bad_credentials_refused(secure: Registry, pki, tmp_path: Path, case: str) -> None:
    if case == "none":
        client = Client(secure.address, retry_for=1.0)  # plain text against TLS
    elif case == "other-ca":
        tls.init_ca(tmp_path / "evil")
        client = as_(
            secure,
            tls.issue(tmp_path / "evil", "root", role="admin", out=tmp_path / "evil-id"),
            retry_for=1.0,
        )
    elif case == "expired":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        client = as_(
            secure,
            tls.issue(
                pki["ca"],
                "host0",
                role="node",
                out=tmp_path / "old",
                _not_before=past - dt.timedelta(days=1),
                _not_after=past,
            ),
            retry_for=1.0,
        )
    async with client:
        with pytest.raises((errors.Unavailable, errors.Unauthenticated, errors.DeadlineExceeded)):
            await client.find()


async def test_denied_certificate_refused_and_streams_closed(
    start_registry, pki, tmp_path: Path
) -> None:
    deny = tmp_path / "deny"
    deny.write_text("# revoked identities\n")
    registry = start_registry(extra=["--tls-dir", str(pki["registry"]), "--deny", str(deny)])
    async with as_(registry, pki["host1"]) as b:
        watch = b.watch()
        it = aiter(watch)
        await anext(it)
        deny.write_text("host1\n")
        registry.signal(signal.SIGHUP)
        # The open stream is closed, and every new call is refused.
        with pytest.raises(errors.GeryonError):
            await asyncio.wait_for(anext(it), 10)
        with pytest.raises(errors.Unauthenticated, match="denied"):
            await b.find()
    async with as_(registry, pki["host0"]) as a:
        assert (await a.find())[0] == []


async def test_cli_over_tls_and_rotation(secure: Registry, pki, tmp_path: Path) -> None:
    env = {"GERYON_REGISTRY": secure.address, "GERYON_TLS_DIR": str(pki["root"])}
    r = run_cli("set", "d0.mbox", "addr=tcp!host0!1", "--persist", env=env)
    assert r.returncode == 0, r.stderr
    assert run_cli("ls", "-n", env=env).stdout == "d0.mbox\n"
    r = run_cli(
        "set", "d1.mbox", "a=b", "--persist", env={**env, "GERYON_TLS_DIR": str(pki["viewer"])}
    )
    assert r.returncode == 1 and "may not" in r.stderr and "Traceback" not in r.stderr
    # Renew the server's certificate on disk: new connections get it, no restart.
    before = tls.show(pki["registry"])
    tls.issue(pki["ca"], "registry", role="server", out=pki["registry"])
    assert tls.show(pki["registry"]) != before
    assert run_cli("ls", "-n", env=env).stdout == "d0.mbox\n"
    assert secure.running


def test_ca_cli(tmp_path: Path) -> None:
    assert run_cli("ca", "init", str(tmp_path / "ca")).returncode == 0
    r = run_cli(
        "ca",
        "issue",
        str(tmp_path / "ca"),
        "host0",
        "--role",
        "node",
        "--out",
        str(tmp_path / "host0"),
    )
    assert r.returncode == 0 and "role:       node" in r.stdout
    assert (tmp_path / "host0" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in r.stdout
    r = run_cli("ca", "show", str(tmp_path / "host0"))
    assert ("host0" in r.stdout and "expires" in r.stdout) or "not after" in r.stdout
    r = run_cli("ca", "init", str(tmp_path / "ca"))
    assert r.returncode != 0 and r.stderr.startswith("geryon: ") and "Traceback" not in r.stderr


async def test_flooding_client_is_exhausted_others_carry_on(start_registry) -> None:
    registry = start_registry(extra=["--write-rate", "50"])
    async with (
        registry.client(user="flood", retry_for=10) as flood,
        registry.client(user="calm") as calm,
    ):
        results = await asyncio.gather(
            *(flood.register(f"tcp!flood!{i}", {"svc": "x"}, persist=True) for i in range(400)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
        assert refused and "quota" in str(refused[0])
        assert all(not isinstance(r, Exception) or r in refused for r in results)
        # The calm client's writes all go through; nothing acknowledged was lost.
        for i in range(20):
            await calm.register(f"tcp!calm!{i}", {"svc": "y"}, persist=True)
        assert len((await calm.find({"svc": "y"}))[0]) == 20
        assert len((await calm.find({"svc": "x"}))[0]) == 400 - len(refused)
    # A batch spends one token per entry: the first of two takes the whole
    # burst (100 at 50/s), the second would wait 2 s for its and is refused.
    async with registry.client(user="batcher") as b:

        def batch(k: int) -> list[Registration]:
            return [Registration(f"tcp!b{k}!{i}", {}, persist=True) for i in range(100)]

        results = await asyncio.gather(
            b.register_batch(batch(0)), b.register_batch(batch(1)), return_exceptions=True
        )
        assert [type(r) for r in results].count(errors.ResourceExhausted) == 1, results


async def test_denied_node_hears_its_lease_is_refused(start_registry, pki, tmp_path: Path) -> None:
    deny = tmp_path / "deny"
    deny.write_text("")
    registry = start_registry(extra=["--tls-dir", str(pki["registry"]), "--deny", str(deny)])
    async with as_(registry, pki["host1"]) as b:
        lease = b.lease(30_000)
        await lease.start()
        deny.write_text("host1\n")
        registry.signal(signal.SIGHUP)
        await eventually(lambda: lease.lost.is_set(), timeout=10)
        await lease.close(revoke=False)


async def test_streams_end_when_the_certificate_expires(
    secure: Registry, pki, tmp_path: Path
) -> None:
    """The handshake checks a certificate once; a Watch and a KeepAlive
    stream must not go on past its expiry."""
    now = dt.datetime.now(dt.UTC)
    short = tls.issue(
        pki["ca"],
        "host7",
        role="node",
        out=tmp_path / "short",
        _not_before=now - dt.timedelta(hours=1),
        _not_after=now + dt.timedelta(seconds=6),
    )
    async with as_(secure, short, retry_for=1.0) as c:
        lease = c.lease(30_000)
        await lease.start()
        watch = aiter(c.watch())
        assert (await anext(watch)).kind == "progress"
        with pytest.raises(errors.Unauthenticated, match="host7: certificate expired"):
            async with asyncio.timeout(60):
                async for _ in watch:
                    pass
        await eventually(lambda: lease.lost.is_set(), timeout=30)
        await lease.close(revoke=False)
