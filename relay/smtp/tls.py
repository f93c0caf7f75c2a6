"""TLS for the SMTP listener: the operator's certificate, or a self-signed development one.

With no ``tls_cert``/``tls_key`` configured the relay makes a self-signed certificate in the
state folder (loudly logged), so STARTTLS and therefore AUTH work on a fresh machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# TLS 1.2 suites: forward-secret AEAD only. Python's default list still has the CBC suites
# with SHA-256/384 (ECDHE-*-AES*-SHA256/384), open to padding-oracle and Lucky13-style
# attacks; TLS 1.3's suites (not set here) are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, AEAD suites only, no client certificates
    asked for."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert, key)
    # One TLS 1.3 ticket per handshake instead of Python's 2: a client resumes with one (and
    # every resumption brings a fresh one); each ticket is server CPU. Their lifetime is
    # OpenSSL's default, 7200 s. Workers share the ticket key: relay/smtp/tickets.py.
    context.num_tickets = 1
    return context


def ensure_dev_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Paths of a self-signed certificate and key for ``hostname``, made if missing or due."""
    cert_path, key_path = directory / "dev-cert.pem", directory / "dev-key.pem"
    now = dt.datetime.now(dt.UTC)
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if existing.not_valid_after_utc > now + dt.timedelta(days=7):
            return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_self_signed(hostname, now)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path


def make_self_signed(hostname: str, now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """PEM certificate and key valid for ``hostname``, localhost, 127.0.0.1 and ::1."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
