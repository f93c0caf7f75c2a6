"""The relay's certificate for a benchmark run (RELAY_TLS_CERT / RELAY_TLS_KEY): made fresh in
the run's work folder, for 127.0.0.1, with an ECDSA P-256 key (what current ACME clients
issue by default) or RSA 2048 (``--tls-key rsa2048``, a dearer handshake)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_KINDS = ("p256", "rsa2048")


def write_certificate(directory: Path, kind: str = "p256") -> tuple[Path, Path]:
    """Paths of a new self-signed certificate and its key, written in ``directory``."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "rsa2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.bench.invalid")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("relay.bench.invalid"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay-cert.pem", directory / "relay-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
