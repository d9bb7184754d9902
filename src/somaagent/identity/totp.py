"""Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): secrets, codes, the otpauth URI and
its QR code.

Owns: the TOTP arithmetic. Pure: no database, no clock (callers pass the time), no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import secrets
import struct
from urllib.parse import quote, urlencode

import segno

SECRET_BYTES = 20  # RFC 4226 §4 recommends 160 bits, the size of an HMAC-SHA1 key
ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def generate_secret() -> bytes:
    """A new shared secret: 20 random bytes."""
    return secrets.token_bytes(SECRET_BYTES)


def time_step(at: float, step: int = 30) -> int:
    """The RFC 6238 counter T for the Unix time `at`."""
    return int(at // step)


def hotp(secret: bytes, counter: int, *, digits: int = 6, algorithm: str = "sha1") -> str:
    """The RFC 4226 code for `counter`, zero-padded to `digits`."""
    digest = hmac.new(secret, struct.pack(">Q", counter), ALGORITHMS[algorithm]).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def totp(secret: bytes, at: float, *, step: int = 30, digits: int = 6, algorithm: str = "sha1") -> str:
    """The code valid at Unix time `at`."""
    return hotp(secret, time_step(at, step), digits=digits, algorithm=algorithm)


def matching_step(
    secret: bytes,
    code: str,
    at: float,
    *,
    window: int = 1,
    step: int = 30,
    digits: int = 6,
    algorithm: str = "sha1",
) -> int | None:
    """The step in [now-window, now+window] whose code equals `code` (the latest, if several), or None."""
    # compare_digest refuses non-ASCII strings, and a code of the wrong shape matches nothing anyway.
    if len(code) != digits or not (code.isascii() and code.isdigit()):
        return None
    now = time_step(at, step)
    found: int | None = None
    # Every candidate is computed and compared, matching or not, so the time taken does not tell an
    # attacker which step (or how many digits) matched.
    for counter in range(now - window, now + window + 1):
        if hmac.compare_digest(hotp(secret, counter, digits=digits, algorithm=algorithm), code):
            found = counter
    return found


def base32_secret(secret: bytes) -> str:
    """The secret as authenticator apps take it: RFC 4648 base32 without padding."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def otpauth_uri(secret: bytes, account: str, issuer: str) -> str:
    """The Key URI authenticator apps import: `otpauth://totp/Issuer:account?secret=…&issuer=…`."""
    # The label's colon separates issuer from account, so neither part may carry a raw one.
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    query = urlencode(
        {"secret": base32_secret(secret), "issuer": issuer, "algorithm": "SHA1", "digits": 6, "period": 30},
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{query}"


def qr_png(uri: str, *, scale: int = 5, border: int = 4) -> bytes:
    """`uri` as a QR code PNG (error correction M, 4-module quiet zone as the standard asks)."""
    buffer = io.BytesIO()
    segno.make(uri, error="m", micro=False).save(buffer, kind="png", scale=scale, border=border)
    return buffer.getvalue()
