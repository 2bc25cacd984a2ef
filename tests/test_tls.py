"""Tests for geryon.tls: CA, issuing, identities, and mutual TLS end to end.

The end-to-end tests run real grpc.aio servers on 127.0.0.1 (port 0) with a
generic unary handler that answers with the caller's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geryon import errors, tls

SERVICE = "geryon.test.Who"
METHOD = f"/{SERVICE}/Who"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def load_cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def serial_of(p: Path) -> str:
    return format(load_cert(p).serial_number, "x")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    return {
        "ca": ca,
        "server": tls.issue(ca, "registry", role="server", out=tmp_path / "server"),
        "node": tls.issue(ca, "node-1", role="node", out=tmp_path / "node"),
        "tmp": tmp_path,
    }


class Who:
    """A generic service whose one method returns the caller's identity."""

    def __init__(self) -> None:
        self.calls = 0

    async def who(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        try:
            ident = tls.identity_from_context(context)
        except errors.Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, e.message)
        return f"{ident.role}/{ident.name}/{ident.serial}".encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(self.who)}
        )


@asynccontextmanager
async def serving(creds: grpc.ServerCredentials) -> AsyncIterator[tuple[int, Who]]:
    who = Who()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((who.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port, who
    finally:
        await server.stop(None)


async def call_who(port: int, creds: grpc.ChannelCredentials) -> str:
    # A fresh channel per call means a fresh TLS handshake.
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        reply = await ch.unary_unary(METHOD)(b"", timeout=10)
    return reply.decode()


async def assert_refused(port: int, creds: grpc.ChannelCredentials, who: Who) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call_who(port, creds)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert who.calls == 0  # refused at the handshake, never reached the handler


async def served_serial(port: int, client_dir: Path) -> str:
    """Serial of the certificate the server presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(client_dir / tls.CA_CERT))
    ctx.load_cert_chain(str(client_dir / tls.CERT), str(client_dir / tls.KEY))
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        # The server may drop us for not speaking HTTP/2; that is fine here.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def backdated(days_ago: int, days_long: int) -> dict[str, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=days_ago)
    return {"_not_before": start, "_not_after": start + dt.timedelta(days=days_long)}


# --------------------------------------------------------------------------
# CA, issue, show


def test_init_ca_files_and_modes(tmp_path: Path) -> None:
    ca = tmp_path / "deep" / "ca"
    tls.init_ca(ca, days=30)
    assert mode(ca) == 0o700
    assert mode(ca / "ca.key") == 0o600
    cert = load_cert(ca / "ca.crt")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.issuer == cert.subject


def test_init_ca_refuses_overwrite(tmp_path: Path) -> None:
    tls.init_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(errors.InvalidArgument) as exc:
        tls.init_ca(tmp_path / "ca")
    assert "\n" not in str(exc.value) and "already exists" in str(exc.value)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before


def test_issue_node(pki: dict[str, Path]) -> None:
    out = pki["node"]
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "cert.pem", "key.pem"]
    assert mode(out / "key.pem") == 0o600
    assert (out / "ca.crt").read_bytes() == (pki["ca"] / "ca.crt").read_bytes()
    cert = load_cert(out / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["geryon://node/node-1"]
    # Its cpu service is dialled by this name (gRPC checks a DNS name).
    assert san.get_values_for_type(x509.DNSName) == [tls.dial_name("node-1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # A node serves its disks in TLS with this identity too.
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == load_cert(pki["ca"] / "ca.crt").subject


def test_issue_server_sans(pki: dict[str, Path]) -> None:
    out = tls.issue(
        pki["ca"],
        "api",
        role="server",
        out=pki["tmp"] / "api",
        sans=["grid.example.org", "10.0.0.7"],
    )
    cert = load_cert(out / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["geryon://server/api"]
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "grid.example.org", "localhost", tls.dial_name("api")
    }  # fmt: skip
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"10.0.0.7", "127.0.0.1"} <= ips
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("ok", {"role": "root"}),
        ("bad name", {"role": "node"}),
        ("", {"role": "node"}),
        ("x" * 65, {"role": "node"}),
        ("a/b", {"role": "node"}),
        ("ok", {"role": "node", "sans": ["h.example"]}),
        ("ok", {"role": "server", "sans": ["not a host!"]}),
        ("ok", {"role": "node", "days": 0}),
    ],
)
def test_issue_rejects(pki: dict[str, Path], name: str, kw: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidArgument):
        tls.issue(pki["ca"], name, out=pki["tmp"] / "bad", **kw)
    assert not (pki["tmp"] / "bad").exists()


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        tls.issue(tmp_path / "nope", "n", role="node", out=tmp_path / "out")
    assert str(exc.value) == f"tls: {tmp_path / 'nope' / 'ca.crt'}: no such file"


def test_issue_keeps_rollover_bundle(pki: dict[str, Path]) -> None:
    other = pki["tmp"] / "ca2"
    tls.init_ca(other)
    bundle = (pki["ca"] / "ca.crt").read_bytes() + (other / "ca.crt").read_bytes()
    (pki["node"] / "ca.crt").write_bytes(bundle)
    tls.issue(pki["ca"], "node-1", role="node", out=pki["node"])  # renew
    assert (pki["node"] / "ca.crt").read_bytes() == bundle


def test_show(pki: dict[str, Path]) -> None:
    text = tls.show(pki["node"])
    assert "name:       node-1" in text
    assert "role:       node" in text
    assert serial_of(pki["node"] / "cert.pem") in text
    assert "issuer:" in text and "not after:" in text and "valid" in text
    assert "PRIVATE" not in text and "BEGIN" not in text
    assert tls.show(pki["node"] / "cert.pem") == text
    assert "CA certificate" in tls.show(pki["ca"])

    old = tls.issue(pki["ca"], "old", role="reader", out=pki["tmp"] / "old", **backdated(10, 2))
    assert "EXPIRED" in tls.show(old)


def test_tls_dir_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(tls.TLS_DIR_ENV, raising=False)
    assert tls.tls_dir_from(None) is None
    assert tls.tls_dir_from("") is None
    monkeypatch.setenv(tls.TLS_DIR_ENV, str(tmp_path))
    assert tls.tls_dir_from(None) == tmp_path
    assert tls.tls_dir_from("/x") == Path("/x")


def test_missing_file_errors(pki: dict[str, Path]) -> None:
    (pki["node"] / "cert.pem").unlink()
    with pytest.raises(errors.InvalidArgument) as exc:
        tls.channel_credentials(pki["node"])
    assert str(exc.value) == f"tls: {pki['node'] / 'cert.pem'}: no such file"
    (pki["server"] / "ca.crt").unlink()
    with pytest.raises(errors.InvalidArgument, match=r"ca\.crt: no such file"):
        tls.server_credentials(pki["server"])


def test_mismatched_key_refused(pki: dict[str, Path]) -> None:
    (pki["server"] / "key.pem").write_bytes((pki["node"] / "key.pem").read_bytes())
    with pytest.raises(errors.InvalidArgument, match="does not match"):
        tls.server_credentials(pki["server"])


# --------------------------------------------------------------------------
# identity_from_context without a network


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def pem_ctx(p: Path) -> FakeContext:
    return FakeContext({"transport_security_type": [b"ssl"], "x509_pem_cert": [p.read_bytes()]})


def test_identity_from_context(pki: dict[str, Path]) -> None:
    ident = tls.identity_from_context(pem_ctx(pki["node"] / "cert.pem"))
    assert ident == tls.Identity("node-1", "node", serial_of(pki["node"] / "cert.pem"))
    # Cached: the same PEM yields the same object.
    assert tls.identity_from_context(pem_ctx(pki["node"] / "cert.pem")) is ident

    with pytest.raises(errors.Unauthenticated, match="no client certificate"):
        tls.identity_from_context(FakeContext({}))
    with pytest.raises(errors.Unauthenticated, match="no client certificate"):
        tls.identity_from_context(FakeContext({"transport_security_type": [b"insecure"]}))


def test_identity_needs_uri_not_cn(pki: dict[str, Path]) -> None:
    # A certificate from the right CA whose CN says admin, without the URI SAN.
    ca_key = serialization.load_pem_private_key((pki["ca"] / "ca.key").read_bytes(), None)
    ca_cert = load_cert(pki["ca"] / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://admin/x")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ctx = FakeContext({"x509_pem_cert": [cert.public_bytes(serialization.Encoding.PEM)]})
    for _ in range(2):  # the failure is cached too
        with pytest.raises(errors.Unauthenticated, match="no geryon:// identity"):
            tls.identity_from_context(ctx)


def test_identity_expired_since_handshake(pki: dict[str, Path]) -> None:
    old = tls.issue(pki["ca"], "old", role="node", out=pki["tmp"] / "old", **backdated(10, 2))
    with pytest.raises(errors.Unauthenticated, match="expired"):
        tls.identity_from_context(pem_ctx(old / "cert.pem"))


# --------------------------------------------------------------------------
# Mutual TLS end to end


async def test_node_identity_end_to_end(pki: dict[str, Path]) -> None:
    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        seen = await call_who(port, tls.channel_credentials(pki["node"]))
        assert seen == f"node/node-1/{serial_of(pki['node'] / 'cert.pem')}"
        assert who.calls == 1
        # The standard health service works over the same credentials.
        creds = tls.channel_credentials(pki["node"])
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_no_client_cert_refused(pki: dict[str, Path]) -> None:
    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        creds = grpc.ssl_channel_credentials((pki["node"] / "ca.crt").read_bytes())
        await assert_refused(port, creds, who)


async def test_other_ca_refused(pki: dict[str, Path]) -> None:
    tls.init_ca(pki["tmp"] / "evil-ca")
    evil = tls.issue(pki["tmp"] / "evil-ca", "node-1", role="node", out=pki["tmp"] / "evil")
    # Trusts the real server CA, so only the server side's check can refuse.
    (evil / "ca.crt").write_bytes((pki["ca"] / "ca.crt").read_bytes())
    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        await assert_refused(port, tls.channel_credentials(evil), who)


async def test_expired_client_refused(pki: dict[str, Path]) -> None:
    old = tls.issue(pki["ca"], "node-1", role="node", out=pki["tmp"] / "old", **backdated(10, 2))
    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        await assert_refused(port, tls.channel_credentials(old), who)


async def test_expired_server_refused_by_client(pki: dict[str, Path]) -> None:
    tls.issue(pki["ca"], "registry", role="server", out=pki["server"], **backdated(10, 2))
    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        await assert_refused(port, tls.channel_credentials(pki["node"]), who)


async def test_server_cert_rotation_without_restart(pki: dict[str, Path]) -> None:
    old_serial = serial_of(pki["server"] / "cert.pem")
    async with serving(tls.server_credentials(pki["server"])) as (port, _):
        assert await served_serial(port, pki["node"]) == old_serial
        # An established channel keeps working across the rotation.
        creds = tls.channel_credentials(pki["node"])
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as live:
            assert (await live.unary_unary(METHOD)(b"", timeout=10)).startswith(b"node/")

            tls.issue(pki["ca"], "registry", role="server", out=pki["server"])
            new_serial = serial_of(pki["server"] / "cert.pem")
            assert new_serial != old_serial
            assert await served_serial(port, pki["node"]) == new_serial
            assert (await call_who(port, creds)).startswith("node/node-1/")

            assert (await live.unary_unary(METHOD)(b"", timeout=10)).startswith(b"node/")


async def test_half_rotation_keeps_old_pair(pki: dict[str, Path]) -> None:
    old_serial = serial_of(pki["server"] / "cert.pem")
    spare = tls.issue(pki["ca"], "registry", role="server", out=pki["tmp"] / "spare")
    async with serving(tls.server_credentials(pki["server"])) as (port, _):
        # Only the new key has landed: the server must keep serving the old pair.
        os.replace(spare / "key.pem", pki["server"] / "key.pem")
        assert await served_serial(port, pki["node"]) == old_serial
        assert (await call_who(port, tls.channel_credentials(pki["node"]))).startswith("node/")
        # Then the matching cert arrives, and the next handshake uses both.
        os.replace(spare / "cert.pem", pki["server"] / "cert.pem")
        assert await served_serial(port, pki["node"]) == serial_of(pki["server"] / "cert.pem")


async def test_forced_reload(pki: dict[str, Path]) -> None:
    server_tls = tls.ServerTLS(pki["server"])
    async with serving(server_tls.credentials()) as (port, _):
        old = server_tls.serial
        tls.issue(pki["ca"], "registry", role="server", out=pki["server"])
        tls.reload_server_credentials()  # what a SIGHUP handler calls
        assert await served_serial(port, pki["node"]) == serial_of(pki["server"] / "cert.pem")
        assert server_tls.serial != old
        # A broken set of files is reported and the current one kept.
        (pki["server"] / "cert.pem").write_text("garbage")
        with pytest.raises(errors.InvalidArgument, match="no PEM certificate"):
            server_tls.reload()
        assert await served_serial(port, pki["node"]) == server_tls.serial


async def test_ca_rollover_accepts_both(pki: dict[str, Path]) -> None:
    new_ca = pki["tmp"] / "ca-new"
    tls.init_ca(new_ca)
    new_client = tls.issue(new_ca, "node-2", role="node", out=pki["tmp"] / "node2")
    # Clients trust both CAs too, as they would during a rollover.
    bundle = (pki["ca"] / "ca.crt").read_bytes() + (new_ca / "ca.crt").read_bytes()
    (new_client / "ca.crt").write_bytes(bundle)

    async with serving(tls.server_credentials(pki["server"])) as (port, who):
        # Before the server trusts the new CA, its clients are refused...
        await assert_refused(port, tls.channel_credentials(new_client), who)
        # ...then ca.crt gains the new CA on disk, with no restart.
        tmp = pki["server"] / "ca.crt.new"
        tmp.write_bytes(bundle)
        os.replace(tmp, pki["server"] / "ca.crt")
        assert (await call_who(port, tls.channel_credentials(pki["node"]))).startswith(
            "node/node-1/"
        )
        assert (await call_who(port, tls.channel_credentials(new_client))).startswith(
            "node/node-2/"
        )


async def test_server_started_with_two_cas(pki: dict[str, Path]) -> None:
    new_ca = pki["tmp"] / "ca-new"
    tls.init_ca(new_ca)
    new_client = tls.issue(new_ca, "node-2", role="node", out=pki["tmp"] / "node2")
    (new_client / "ca.crt").write_bytes((pki["ca"] / "ca.crt").read_bytes())
    with (pki["server"] / "ca.crt").open("ab") as f:
        f.write((new_ca / "ca.crt").read_bytes())
    async with serving(tls.server_credentials(pki["server"])) as (port, _):
        for d, name in ((pki["node"], "node-1"), (new_client, "node-2")):
            assert (await call_who(port, tls.channel_credentials(d))).startswith(f"node/{name}/")


# --------------------------------------------------------------------------
# Deny list


def test_deny_list(tmp_path: Path) -> None:
    p = tmp_path / "deny"
    p.write_text("# revoked\nnode-7   # lost laptop\n\n  AB:CD:EF:01  \n0x1f\n")
    deny = tls.DenyList(p)
    assert len(deny) == 3
    assert deny.denied(tls.Identity("node-7", "node", "1234"))
    assert deny.denied(tls.Identity("x", "node", "abcdef01"))
    assert deny.denied(tls.Identity("x", "admin", "00ABCDEF01"))
    assert deny.denied(tls.Identity("x", "node", "1f"))
    assert not deny.denied(tls.Identity("node-8", "node", "abcdef02"))
    assert not deny.denied(tls.LOCAL_ADMIN)

    p.write_text("node-8\n")
    deny.reload()
    assert deny.denied(tls.Identity("node-8", "node", "1"))
    assert not deny.denied(tls.Identity("node-7", "node", "1"))

    # A malformed file fails closed: error, and the old list stays.
    p.write_text("node-9\nthis is bad\n")
    with pytest.raises(errors.InvalidArgument, match=r"deny:2:"):
        deny.reload()
    assert deny.denied(tls.Identity("node-8", "node", "1"))


def test_deny_list_missing(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="no such file"):
        tls.DenyList(tmp_path / "nope")


def test_deny_list_matches_issued_serial(pki: dict[str, Path]) -> None:
    cert = load_cert(pki["node"] / "cert.pem")
    colon = cert.serial_number.to_bytes(20, "big").hex(":").upper()
    (pki["tmp"] / "deny").write_text(colon + "\n")
    ident = tls.identity_from_context(pem_ctx(pki["node"] / "cert.pem"))
    assert tls.DenyList(pki["tmp"] / "deny").denied(ident)
