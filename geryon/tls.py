"""Geryon's identity layer: a cluster CA, issued identities and mutual TLS.

This rebuilds Inferno's signer and keyring on X.509. One cluster CA (EC P-256)
lives in a CA directory (``ca.crt``, ``ca.key``). Every party -- servers,
administrators, node agents, read-only clients -- holds an identity directory
with exactly three files: ``ca.crt`` (the CA certificates it trusts),
``cert.pem`` and ``key.pem``.

Who a peer is travels in its certificate as one URI subject alternative name,
``geryon://ROLE/NAME``. The common name is informational only and grants
nothing, so a certificate from the right CA without that URI is refused.

TLS itself (expiry, CA, presence of a client certificate) is enforced by gRPC
at the handshake; this module turns the verified peer certificate into an
``Identity`` for authorization, and lets servers pick up renewed certificates,
keys and CA bundles without a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geryon import errors
from geryon.model import ROLES

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CERT",
    "KEY",
    "LOCAL_ADMIN",
    "ROLES",
    "TLS_DIR_ENV",
    "DenyList",
    "Identity",
    "ServerTLS",
    "channel_credentials",
    "dial_name",
    "dns_names_of_dir",
    "identity_from_context",
    "identity_from_der",
    "identity_of_dir",
    "init_ca",
    "issue",
    "reload_server_credentials",
    "server_credentials",
    "show",
    "ssl_context",
    "tls_dir_from",
]

log = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CERT = "cert.pem"
KEY = "key.pem"
TLS_DIR_ENV = "GERYON_TLS_DIR"
URI_SCHEME = "geryon://"
# RFC 2606's .invalid: never a real host, so never a registry's name.
DIAL_DOMAIN = "id.geryon.invalid"

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_RE = re.compile(
    r"(?=.{1,253}\Z)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# Loopback names every server certificate carries so local clients just work.
_DEFAULT_SERVER_SANS = ("localhost", "127.0.0.1", "::1")
# Tolerate modest clock skew between the issuer and the peers.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Identity:
    """Who a peer is: its certificate's name and role, and the serial (hex)."""

    name: str
    role: str
    serial: str
    # When the certificate expires (POSIX time; 0: never, plain text): a
    # stream that outlives it is ended.
    expires: float = dataclasses.field(default=0.0, compare=False)


# The caller's identity when a server runs in plain-text (no TLS) mode.
LOCAL_ADMIN = Identity("admin", "admin", "")


# --------------------------------------------------------------------------
# Small helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise errors.InvalidArgument(f"tls: invalid name {name!r}: want 1-64 of [A-Za-z0-9._-]")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise errors.InvalidArgument(f"tls: invalid role {role!r}: want one of {'|'.join(ROLES)}")


def _read(path: Path) -> bytes:
    """Read a file, turning OS errors into a one-line InvalidArgument."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise errors.InvalidArgument(f"tls: {path}: no such file") from None
    except PermissionError:
        raise errors.InvalidArgument(f"tls: {path}: permission denied") from None
    except IsADirectoryError:
        raise errors.InvalidArgument(f"tls: {path}: is a directory") from None
    except OSError as e:
        raise errors.InvalidArgument(f"tls: {path}: {e.strerror or e}") from None


def _load_certs(data: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise errors.InvalidArgument(f"tls: {path}: no PEM certificate")
    return certs


def _load_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise errors.InvalidArgument(f"tls: {path}: no unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.InvalidArgument(f"tls: {path}: not an EC private key")
    return key


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file and rename, so readers (a server watching the
    directory for rotation) never see a half-written file, and create it with
    its final mode so a key is never briefly world-readable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed it; make it exact
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------
# CA and issuing


def init_ca(cadir: Path, *, days: int = 3650) -> None:
    """Create a cluster CA (EC P-256, self-signed) as CADIR/ca.crt and ca.key.

    Refuses to overwrite an existing CA: losing its key orphans every
    identity it issued.
    """
    cadir = Path(cadir)
    if days <= 0:
        raise errors.InvalidArgument(f"tls: days must be positive, got {days}")
    for fname in (CA_CERT, CA_KEY):
        if (cadir / fname).exists():
            raise errors.InvalidArgument(
                f"tls: {cadir / fname}: a CA already exists; refusing to overwrite"
            )
    try:
        cadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise errors.InvalidArgument(f"tls: {cadir}: {e.strerror or e}") from None

    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix gives each CA a distinct subject, so two CAs trusted
    # side by side during a rollover never shadow each other in chain lookup.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geryon"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"geryon-ca-{secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # O_EXCL so two racing inits cannot both think they made the CA.
    try:
        fd = os.open(cadir / CA_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise errors.InvalidArgument(
            f"tls: {cadir / CA_KEY}: a CA already exists; refusing to overwrite"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_pem_key(key))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(cadir / CA_KEY, 0o600)
        _write_atomic(cadir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        # Leave no half-made CA behind to block the retry.
        with contextlib.suppress(OSError):
            os.unlink(cadir / CA_KEY)
        raise


def _server_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in [*sans, *_DEFAULT_SERVER_SANS]:
        s = raw.strip()
        if not s or s.lower() in seen:
            continue
        seen.add(s.lower())
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
            continue
        except ValueError:
            pass
        if not _HOST_RE.fullmatch(s):
            raise errors.InvalidArgument(f"tls: invalid SAN {raw!r}: want a DNS name or IP")
        if s.lower().endswith("." + DIAL_DOMAIN):
            raise errors.InvalidArgument(f"tls: invalid SAN {raw!r}: {DIAL_DOMAIN} is Geryon's")
        out.append(x509.DNSName(s.lower()))
    return out


def issue(
    cadir: Path,
    name: str,
    *,
    role: str,
    out: Path,
    days: int = 365,
    sans: Sequence[str] = (),
    _not_before: dt.datetime | None = None,
    _not_after: dt.datetime | None = None,
) -> Path:
    """Issue identity ``geryon://ROLE/NAME`` into OUT (ca.crt, cert.pem, key.pem).

    Existing files in OUT are replaced atomically (this is also how a
    certificate is renewed), except that an OUT/ca.crt that already trusts the
    issuing CA is kept, so a multi-CA rollover bundle is not trimmed.
    ``_not_before``/``_not_after`` override the validity window; tests only.
    Returns OUT.
    """
    cadir, out = Path(cadir), Path(out)
    _check_name(name)
    _check_role(role)
    if days <= 0 and _not_after is None:
        raise errors.InvalidArgument(f"tls: days must be positive, got {days}")
    if sans and role != "server":
        raise errors.InvalidArgument("tls: DNS/IP names apply only to role server")

    ca_pem = _read(cadir / CA_CERT)
    ca_cert = _load_certs(ca_pem, cadir / CA_CERT)[0]
    ca_key = _load_key(_read(cadir / CA_KEY), cadir / CA_KEY)
    if ca_key.public_key() != ca_cert.public_key():
        raise errors.InvalidArgument(f"tls: {cadir}: ca.key does not match ca.crt")

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_before = _not_before or (now - _BACKDATE)
    not_after = _not_after or (now + dt.timedelta(days=days))
    if not_after <= not_before:
        raise errors.InvalidArgument("tls: certificate would expire before it starts")

    uri = x509.UniformResourceIdentifier(f"{URI_SCHEME}{role}/{name}")
    alt_names: list[x509.GeneralName] = [uri]
    if role == "server":
        alt_names += _server_sans(sans)
    # A node's cpu service is dialled over gRPC, which checks a DNS name: its
    # clients expect the identity that registered its entry, by a name under
    # a reserved domain that no host dialled by its own name can carry.
    if role in ("server", "node"):
        alt_names.append(x509.DNSName(dial_name(name)))
    # A node serves too: its chunk servers speak 9P in TLS with its identity
    # (their clients check the CA and the identity, not a host name).
    if role in ("server", "node"):
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]

    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geryon"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        # Critical: the URI is the identity, so a verifier must understand it.
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise errors.InvalidArgument(f"tls: {out}: {e.strerror or e}") from None
    # Key before cert: a server reloading mid-way sees a key/cert mismatch and
    # keeps its old pair until both are in place (see ServerTLS).
    _write_atomic(out / KEY, _pem_key(key), 0o600)
    _write_atomic(out / CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not _bundle_has(out / CA_CERT, ca_cert):
        _write_atomic(out / CA_CERT, ca_pem, 0o644)
    return out


def _bundle_has(path: Path, cert: x509.Certificate) -> bool:
    try:
        return cert in x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------
# Reading identities


def _identity_of(cert: x509.Certificate) -> Identity:
    """The geryon:// identity a certificate names; Unauthenticated if none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(URI_SCHEME)
        ]
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise errors.Unauthenticated("certificate names no geryon:// identity")
    if len(uris) > 1:
        raise errors.Unauthenticated("certificate names more than one geryon:// identity")
    role, _, name = uris[0][len(URI_SCHEME) :].partition("/")
    if role not in ROLES or not _NAME_RE.fullmatch(name):
        raise errors.Unauthenticated(f"certificate names an invalid identity {uris[0]!r}")
    return Identity(name=name, role=role, serial=_serial_hex(cert.serial_number))


def show(dir_or_cert: Path) -> str:
    """Describe the certificate in a directory (cert.pem, else ca.crt) or file."""
    p = Path(dir_or_cert)
    if p.is_dir():
        p = p / CERT if (p / CERT).exists() or not (p / CA_CERT).exists() else p / CA_CERT
    cert = _load_certs(_read(p), p)[0]
    lines = [f"file:       {p}"]
    try:
        ident = _identity_of(cert)
        lines += [f"name:       {ident.name}", f"role:       {ident.role}"]
    except errors.Unauthenticated as e:
        is_ca = False
        with contextlib.suppress(x509.ExtensionNotFound):
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        lines.append("identity:   none (CA certificate)" if is_ca else f"identity:   none ({e})")
    nb, na, now = cert.not_valid_before_utc, cert.not_valid_after_utc, _now()
    if now > na:
        status = "EXPIRED"
    elif now < nb:
        status = "not yet valid"
    else:
        status = f"valid ({(na - now).days} days left)"
    lines += [
        f"serial:     {_serial_hex(cert.serial_number)}",
        f"subject:    {cert.subject.rfc4514_string()}",
        f"issuer:     {cert.issuer.rfc4514_string()}",
        f"not before: {nb:%Y-%m-%d %H:%M:%S}Z",
        f"not after:  {na:%Y-%m-%d %H:%M:%S}Z",
        f"status:     {status}",
    ]
    return "\n".join(lines)


class _IdentityCache:
    """Bounded LRU of parsed peer certificates, keyed by their PEM bytes.

    identity_from_context runs on every RPC, while a peer's certificate is the
    same for the life of its connection; parsing X.509 each time would be the
    dominant cost of authorization.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        self._maxsize = maxsize
        self._lock = threading.Lock()  # servicers may run on thread pools too
        self._entries: OrderedDict[bytes, tuple[Identity | None, dt.datetime, str]] = OrderedDict()

    def get(self, pem: bytes) -> tuple[Identity, dt.datetime]:
        with self._lock:
            hit = self._entries.get(pem)
            if hit is not None:
                self._entries.move_to_end(pem)
        if hit is None:
            hit = self._parse(pem)
            with self._lock:
                self._entries[pem] = hit
                while len(self._entries) > self._maxsize:
                    self._entries.popitem(last=False)
        ident, not_after, err = hit
        if ident is None:
            raise errors.Unauthenticated(err)
        return ident, not_after

    @staticmethod
    def _parse(pem: bytes) -> tuple[Identity | None, dt.datetime, str]:
        # Failures are cached too, so a bad peer cannot make us re-parse.
        never = dt.datetime.min.replace(tzinfo=dt.UTC)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            return None, never, "unparseable client certificate"
        try:
            ident = _identity_of(cert)
            expires = cert.not_valid_after_utc
            return dataclasses.replace(ident, expires=expires.timestamp()), expires, ""
        except errors.Unauthenticated as e:
            return None, never, e.message

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_identity_cache = _IdentityCache()


def _auth_value(auth: dict[str, Any], key: str) -> bytes | None:
    vals = auth.get(key) or []
    return vals[0] if vals else None


def identity_from_context(context: Any) -> Identity:
    """The verified caller of an RPC, from its grpc(.aio) servicer context.

    Raises errors.Unauthenticated when the peer presented no certificate, it
    names no geryon:// identity, or it has expired since the handshake.
    """
    auth = context.auth_context() or {}
    pem = _auth_value(auth, "x509_pem_cert")
    if not pem:
        raise errors.Unauthenticated("no client certificate")
    ident, not_after = _identity_cache.get(pem)
    # The handshake checked expiry, but an HTTP/2 connection can outlive it.
    if _now() > not_after:
        raise errors.Unauthenticated("client certificate expired")
    return ident


# --------------------------------------------------------------------------
# Credentials


def tls_dir_from(arg: str | None) -> Path | None:
    """The TLS directory: ARG if given, else $GERYON_TLS_DIR, else None (plain text)."""
    val = arg if arg else os.environ.get(TLS_DIR_ENV, "")
    return Path(val).expanduser() if val else None


@dataclass(frozen=True)
class _Material:
    ca: bytes
    cert: bytes
    key: bytes
    serial: str


def _load_material(tls_dir: Path) -> _Material:
    """Read and cross-check the three files; InvalidArgument on any problem."""
    ca_path, cert_path, key_path = tls_dir / CA_CERT, tls_dir / CERT, tls_dir / KEY
    ca, cert_pem, key_pem = _read(ca_path), _read(cert_path), _read(key_path)
    _load_certs(ca, ca_path)
    cert = _load_certs(cert_pem, cert_path)[0]
    key = _load_key(key_pem, key_path)
    # Catches a rotation caught half-way (new key, old cert or vice versa).
    if key.public_key() != cert.public_key():
        raise errors.InvalidArgument(f"tls: {key_path} does not match {cert_path}")
    return _Material(ca, cert_pem, key_pem, _serial_hex(cert.serial_number))


def channel_credentials(tls_dir: Path) -> grpc.ChannelCredentials:
    """Client credentials from TLS_DIR's ca.crt, cert.pem and key.pem."""
    m = _load_material(Path(tls_dir))
    return grpc.ssl_channel_credentials(
        root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert
    )


def ssl_context(tls_dir: Path, *, server: bool) -> ssl.SSLContext:
    """An ssl context for protocols outside gRPC (9P between chunk servers and
    their clients): TLS 1.2 or later both ways, the peer's certificate required and
    checked against TLS_DIR's CA, our own certificate presented."""
    tls_dir = Path(tls_dir)
    _load_material(tls_dir)  # the same one-line errors as gRPC's side
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls_dir / CA_CERT))
    ctx.load_cert_chain(str(tls_dir / CERT), str(tls_dir / KEY))
    return ctx


def identity_of_dir(tls_dir: Path) -> Identity:
    """Who TLS_DIR's certificate says we are."""
    return _identity_of(_load_certs(_read(Path(tls_dir) / CERT), Path(tls_dir) / CERT)[0])


def dial_name(name: str) -> str:
    """The DNS name identity NAME's services are dialled as (its certificate
    carries it when its role is node or server): a readable label, then a
    hash of the exact name, since DNS ignores case and allows no "_"."""
    label = re.sub(r"[^a-z0-9-]", "-", name.lower())[:40].strip("-") or "x"
    return f"{label}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.{DIAL_DOMAIN}"


def dns_names_of_dir(tls_dir: Path) -> list[str]:
    """The DNS names TLS_DIR's certificate may be dialled as."""
    cert = _load_certs(_read(Path(tls_dir) / CERT), Path(tls_dir) / CERT)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def identity_from_der(der: bytes | None) -> Identity:
    """The identity of a verified peer certificate (ssl's getpeercert(True))."""
    if not der:
        raise errors.Unauthenticated("no client certificate")
    return _identity_of(x509.load_der_x509_certificate(der))


_StatKey = tuple[tuple[int, int, int, int], ...]


class ServerTLS:
    """Server credentials for TLS_DIR that follow the files as they change.

    gRPC calls our fetcher before every TLS handshake. The fetcher stats the
    three files and, only when one changed (mtime, size, inode) or reload()
    was called, re-reads them and hands gRPC a new configuration, which then
    serves every new connection; existing connections keep what they
    negotiated. A broken or half-rotated set of files is logged and ignored:
    the last good configuration stays in use and is retried next handshake.
    """

    def __init__(self, tls_dir: Path) -> None:
        self.tls_dir = Path(tls_dir)
        self._lock = threading.Lock()
        self._paths = tuple(self.tls_dir / f for f in (CA_CERT, CERT, KEY))
        self._stat = self._stat_files()
        self._material = _load_material(self.tls_dir)  # fail fast at startup
        self._force = False
        self._pending: _Material | None = None
        self._last_error = ""
        _live_servers.add(self)

    @property
    def serial(self) -> str:
        """Serial (hex) of the server certificate currently being served."""
        return self._material.serial

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(self._material),
            self._fetch,
            require_client_authentication=True,
        )

    def reload(self) -> None:
        """Re-read the files now (e.g. on SIGHUP); used from the next handshake.

        Raises InvalidArgument, keeping the current configuration, if the
        files on disk are not a usable set.
        """
        stat = self._stat_files()
        material = _load_material(self.tls_dir)
        with self._lock:
            self._pending, self._stat, self._force = material, stat, True

    @staticmethod
    def _config(m: _Material) -> grpc.ServerCertificateConfiguration:
        # root_certificates may hold several CAs (old+new during a rollover).
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], m.ca)

    def _stat_files(self) -> _StatKey | None:
        try:
            sts = [os.stat(p) for p in self._paths]
        except OSError:
            return None
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino, s.st_dev) for s in sts)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Runs inside gRPC's handshake path: it must be cheap and never raise.
        try:
            with self._lock:
                if self._force:
                    self._force = False
                    material, self._pending = self._pending, None
                    if material is not None:
                        self._material = material
                        log.info(
                            "tls: %s: reloaded, serving serial %s", self.tls_dir, material.serial
                        )
                        return self._config(material)
                stat = self._stat_files()
                if stat is None or stat == self._stat:
                    return None
                try:
                    material = _load_material(self.tls_dir)
                except errors.InvalidArgument as e:
                    if e.message != self._last_error:  # log once per problem
                        log.warning("tls: keeping current certificate: %s", e.message)
                        self._last_error = e.message
                    return None
                self._stat, self._material, self._last_error = stat, material, ""
                log.info("tls: %s changed, serving serial %s", self.tls_dir, material.serial)
                return self._config(material)
        except Exception:
            log.exception("tls: certificate reload failed; keeping current")
            return None


_live_servers: weakref.WeakSet[ServerTLS] = weakref.WeakSet()


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials from TLS_DIR that follow file rotation.

    Client certificates are required and must chain to a CA in ca.crt. To
    reload by hand, use reload_server_credentials() or keep a ServerTLS.
    """
    return ServerTLS(Path(tls_dir)).credentials()


def reload_server_credentials() -> None:
    """Force every live server credential to re-read its files (for SIGHUP).

    Raises InvalidArgument for the first directory whose files are unusable
    (after trying all of them); those keep their current configuration.
    """
    first: errors.InvalidArgument | None = None
    for s in list(_live_servers):
        try:
            s.reload()
        except errors.InvalidArgument as e:
            first = first or e
    if first is not None:
        raise first


# --------------------------------------------------------------------------
# Deny list


def _parse_serial(s: str) -> int | None:
    h = s.replace(":", "").lower()
    h = h.removeprefix("0x")
    if not h or any(c not in "0123456789abcdef" for c in h):
        return None
    return int(h, 16)


class DenyList:
    """Certificates refused even though they verify: a revocation list.

    The file holds one certificate name or serial per line (hex, any case,
    colons optional); ``#`` starts a comment. A line that could be either,
    such as ``cafe``, denies both the name and the serial. A missing or
    malformed file is an error rather than an empty list: failing open would
    silently re-admit revoked peers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._names: frozenset[str] = frozenset()
        self._serials: frozenset[int] = frozenset()
        self._entries = 0
        self.reload()

    def reload(self) -> None:
        """Re-read the file; on error raise InvalidArgument and keep the old list."""
        try:
            text = _read(self.path).decode()
        except UnicodeDecodeError:
            raise errors.InvalidArgument(f"tls: {self.path}: not UTF-8 text") from None
        names: set[str] = set()
        serials: set[int] = set()
        entries = 0
        for n, raw in enumerate(text.splitlines(), 1):
            entry = raw.split("#", 1)[0].strip()
            if not entry:
                continue
            serial = _parse_serial(entry)
            is_name = bool(_NAME_RE.fullmatch(entry))
            if serial is None and not is_name:
                raise errors.InvalidArgument(
                    f"tls: {self.path}:{n}: {entry!r} is neither a name nor a hex serial"
                )
            entries += 1
            if serial is not None:
                serials.add(serial)
            if is_name:
                names.add(entry)
        self._names, self._serials = frozenset(names), frozenset(serials)
        self._entries = entries

    def denied(self, identity: Identity) -> bool:
        if identity.name in self._names:
            return True
        serial = _parse_serial(identity.serial) if identity.serial else None
        return serial is not None and serial in self._serials

    def __len__(self) -> int:
        """Number of entries (non-comment lines) in the file."""
        return self._entries
