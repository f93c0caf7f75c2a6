"""Password hashing for SMTP credentials (STYLE §1 step 2).

Only slow salted scrypt hashes are stored (stdlib ``hashlib.scrypt``, which releases the GIL,
so verification runs in a worker thread without stalling the event loop).
Format: ``scrypt$N$r$p$<salt b64>$<hash b64>``; parameters travel with the hash so they can
be raised later without invalidating stored credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# RFC 7914 parameters: N=2**14, r=8, p=1 is about 16 MiB and tens of milliseconds per check.
_N, _R, _P = 2**14, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    """A new salted scrypt hash of ``password`` for storage."""
    salt = os.urandom(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P,
                            maxmem=_MAXMEM, dklen=_KEY_BYTES)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


# Verified against when the login is unknown, so an unknown login costs the same time as a
# wrong password and logins cannot be enumerated by timing.
DUMMY_HASH = hash_password("not a real password")


def verify_password(password: bytes, stored: str) -> bool:
    """True when ``password`` matches ``stored``. Blocking (tens of ms): call it in a thread."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        actual = hashlib.scrypt(password, salt=salt, n=int(n), r=int(r), p=int(p),
                                maxmem=_MAXMEM, dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)
