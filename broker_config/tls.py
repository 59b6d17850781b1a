"""A private certificate authority for the platform's TLS: brokers, the hub's HTTPS, and (mutual TLS) clients.

``create_pki`` makes a CA (ECDSA P-256 key + self-signed certificate) and, signed by it, one server certificate
per server name whose subject alternative names are the given hosts (IP addresses become IP SANs), and one client
certificate per identity (for ``require_certificate``). Private keys are written with mode 0600 from their first
byte, and never inside a git work tree unless git ignores the directory. An existing CA in the directory is
reused, so certificates can be added later with the same trust anchor.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mhp_wire import topics
from mhp_wire.secretfile import write_private

from .errors import BrokerError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 825
"""What browsers and Apple's TLS stack still accept for a server certificate."""


class TlsError(BrokerError):
    """Certificates could not be made or written (bad host, directory inside the repository, ...)."""


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate and its private key (PEM files)."""

    certfile: Path
    keyfile: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """What ``create_pki`` wrote: the CA, the server pairs and the client pairs by name."""

    ca: CertPair
    servers: dict[str, CertPair] = field(default_factory=dict)
    clients: dict[str, CertPair] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        """The CA certificate every party verifies its peer with."""
        return self.ca.certfile


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _save(pair: CertPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertPair:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_private(pair.keyfile, key_pem)
    write_private(pair.certfile, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pair


def check_outside_repository(directory: Path) -> None:
    """Raise ``TlsError`` if ``directory`` is inside a git work tree and git does not ignore it."""
    directory = directory.absolute()
    root = next((p for p in (directory, *directory.parents) if (p / ".git").exists()), None)
    if root is None:
        return
    try:
        ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(directory)],
                                 capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ignored = False
    if not ignored:
        raise TlsError(f"{directory} is inside the git work tree {root} and not ignored: private keys must never "
                       "go into the repository; choose a directory outside it (or a git-ignored one like state/)")


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise TlsError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host))
    if not names:
        raise TlsError("a server certificate needs at least one host name or IP address")
    return x509.SubjectAlternativeName(names)


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.certfile.read_bytes())
    key = serialization.load_pem_private_key(ca.keyfile.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{ca.keyfile}: not an EC private key")
    return cert, key


def make_ca(out: Path, common_name: str = "Market Hub Platform CA") -> CertPair:
    """A new CA in ``out`` (``ca.crt``, ``ca.key``): a self-signed certificate that may sign leaves only."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save(CertPair(out / CA_CERT, out / CA_KEY), cert, key)


def _issue(ca: CertPair, pair: CertPair, common_name: str, *, server_hosts: Sequence[str] | None) -> CertPair:
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_hosts is None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(_san(server_hosts), critical=False)
    return _save(pair, builder.sign(ca_key, hashes.SHA256()), key)


def issue_server(ca: CertPair, out: Path, name: str, hosts: Sequence[str]) -> CertPair:
    """A server certificate ``<name>.crt``/``<name>.key`` in ``out`` for ``hosts`` (DNS names or IP addresses)."""
    topics.check_id(name)
    return _issue(ca, CertPair(out / f"{name}.crt", out / f"{name}.key"), name, server_hosts=list(hosts))


def issue_client(ca: CertPair, out: Path, name: str) -> CertPair:
    """A client certificate ``client-<name>.crt``/``.key`` in ``out``; its common name is ``name``."""
    topics.check_id(name)
    return _issue(ca, CertPair(out / f"client-{name}.crt", out / f"client-{name}.key"), name, server_hosts=None)


def create_pki(out: Path, hosts: Sequence[str], *, servers: Sequence[str] = ("server",),
               clients: Sequence[str] = ()) -> Pki:
    """The CA of ``out`` (made if missing) and, signed by it, server certificates and client certificates."""
    out = Path(out)
    check_outside_repository(out)
    try:
        for name in [*servers, *clients]:
            topics.check_id(name)
    except topics.TopicError as exc:
        raise TlsError(str(exc)) from None
    _san(hosts)  # refuse bad hosts before writing anything
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = CertPair(out / CA_CERT, out / CA_KEY)
    if not (ca.certfile.exists() and ca.keyfile.exists()):
        ca = make_ca(out)
    return Pki(
        ca=ca,
        servers={name: issue_server(ca, out, name, hosts) for name in servers},
        clients={name: issue_client(ca, out, name) for name in clients},
    )
