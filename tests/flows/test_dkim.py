"""A DKIM-signed message still verifies after the relay: the relay adds only a Received:
header above the signature and changes no signed byte."""

from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import add_user, smtp_client


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    return private, record


@pytest.mark.parametrize("canonicalization", [(b"simple", b"simple"), (b"relaxed", b"relaxed")])
async def test_dkim_signature_verifies_after_relay(relay, upstream, accounts, dkim_key,
                                                   canonicalization):
    """simple/simple (the strictest) and relaxed/relaxed signatures both verify upstream."""
    private, record = dkim_key
    await add_user(accounts)
    original = (b"From: Agent <agent@kw.test>\r\nTo: client@example.test\r\n"
                b"Subject: Your showing on Saturday\r\nDate: Sun, 15 Nov 2026 12:00:00 +0000\r\n"
                b"Message-ID: <dkim-1@kw.test>\r\nX-KW-Contact-Id: c-9\r\n\r\n"
                b"Hello,\r\n..a line with a leading dot\r\n  indented  \r\n\r\nBye\r\n")
    signature = dkim.sign(original, b"sel", b"kw.test", private,
                          canonicalize=canonicalization,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["client@example.test"], signature + original)
    forwarded = upstream.messages[0].content

    def dns(name: bytes, timeout: int = 5) -> bytes:
        # Answers only our selector: the verification makes no DNS lookup.
        assert name == b"sel._domainkey.kw.test."
        return record

    assert dkim.verify(forwarded, dnsfunc=dns)
    tampered = forwarded.replace(b"Saturday", b"Sunday")
    assert not dkim.verify(tampered, dnsfunc=dns)
