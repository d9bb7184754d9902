"""TOTP arithmetic against RFC 6238 Appendix B, the acceptance window, the otpauth URI and its QR PNG."""

from __future__ import annotations

import base64
import hmac
import struct
import sys
import zlib
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import segno

from somaagent.identity import totp

SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
# RFC 6238 Appendix B: (time, {algorithm: 8-digit code}).
VECTORS = [
    (59, {"sha1": "94287082", "sha256": "46119246", "sha512": "90693936"}),
    (1111111109, {"sha1": "07081804", "sha256": "68084774", "sha512": "25091201"}),
    (1111111111, {"sha1": "14050471", "sha256": "67062674", "sha512": "99943326"}),
    (1234567890, {"sha1": "89005924", "sha256": "91819424", "sha512": "93441116"}),
    (2000000000, {"sha1": "69279037", "sha256": "90698825", "sha512": "38618901"}),
    (20000000000, {"sha1": "65353130", "sha256": "77737706", "sha512": "47863826"}),
]
# The step counters the RFC lists beside those times (hex T).
STEPS = {
    59: 0x1,
    1111111109: 0x23523EC,
    1111111111: 0x23523ED,
    1234567890: 0x273EF07,
    2000000000: 0x3F940AA,
    20000000000: 0x27BC86AA,
}


@pytest.mark.parametrize(
    ("at", "algorithm", "expected"),
    [(at, alg, code) for at, codes in VECTORS for alg, code in codes.items()],
    ids=[f"{alg}-{at}" for at, codes in VECTORS for alg in codes],
)
def test_rfc6238_appendix_b(at: int, algorithm: str, expected: str) -> None:
    assert totp.totp(SEEDS[algorithm], at, digits=8, algorithm=algorithm) == expected
    assert totp.time_step(at) == STEPS[at]
    # The same code is accepted at that time, and names the step it belongs to.
    found = totp.matching_step(SEEDS[algorithm], expected, at, window=0, digits=8, algorithm=algorithm)
    assert found == STEPS[at]


def test_six_digit_codes_are_the_last_six_of_the_truncation() -> None:
    # RFC 4226 Appendix D: HOTP values for the SHA1 seed, counters 0..9.
    expected = [
        "755224",
        "287082",
        "359152",
        "969429",
        "338314",
        "254676",
        "287922",
        "162583",
        "399871",
        "520489",
    ]
    assert [totp.hotp(SEEDS["sha1"], c) for c in range(10)] == expected


def test_generated_secrets_are_20_random_bytes() -> None:
    secrets_ = {totp.generate_secret() for _ in range(50)}
    assert len(secrets_) == 50
    assert all(len(s) == 20 for s in secrets_)


def test_window_accepts_one_step_either_side_and_no_more() -> None:
    secret = totp.generate_secret()
    now = 1_700_000_015.0
    step = totp.time_step(now)
    for offset in (-1, 0, 1):
        code = totp.hotp(secret, step + offset)
        assert totp.matching_step(secret, code, now) == step + offset
    for offset in (-3, -2, 2, 3):
        code = totp.hotp(secret, step + offset)
        # A code of a step outside the window matches nothing (unless it collides with one inside).
        inside = {totp.hotp(secret, step + o) for o in (-1, 0, 1)}
        if code not in inside:
            assert totp.matching_step(secret, code, now) is None
    code_two_ahead = totp.hotp(secret, step + 2)
    assert totp.matching_step(secret, code_two_ahead, now, window=2) == step + 2
    assert totp.matching_step(secret, totp.hotp(secret, step + 1), now, window=0) in (None, step)


def test_step_boundaries() -> None:
    secret = SEEDS["sha1"]
    assert totp.time_step(29.999) == 0
    assert totp.time_step(30.0) == 1
    assert totp.totp(secret, 30.0) == totp.totp(secret, 59.999) != totp.totp(secret, 29.999)
    assert totp.time_step(90, step=60) == 1


@pytest.mark.parametrize("junk", ["", "12345", "1234567", "12345a", "١٢٣٤٥٦", " 12345", "12 345"])
def test_codes_of_the_wrong_shape_match_nothing(junk: str) -> None:
    # "١٢٣٤٥٦" is six Arabic-Indic digits: str.isdigit() says yes, compare_digest would raise on it.
    assert totp.matching_step(SEEDS["sha1"], junk, 59) is None


def _compare_digest_calls(call: Any) -> tuple[Any, int]:
    """Run `call()` and count the calls it makes to hmac.compare_digest (a C function) while it runs."""
    seen = 0

    def profile(_frame: FrameType, event: str, arg: Any) -> None:
        nonlocal seen
        if event == "c_call" and arg is hmac.compare_digest:
            seen += 1

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return result, seen


def test_every_candidate_is_compared_in_constant_time() -> None:
    secret = totp.generate_secret()
    now = 1_700_000_000.0
    step = totp.time_step(now)
    current = totp.hotp(secret, step)
    wrong = str((int(current) + 1) % 10**6).zfill(6)
    for code, window in ((current, 1), (wrong, 1), (current, 3)):
        _, calls = _compare_digest_calls(
            lambda c=code, w=window: totp.matching_step(secret, c, now, window=w)
        )
        # No early exit: a hit in the middle of the window costs as much as a miss.
        assert calls == 2 * window + 1


def test_base32_secret_has_no_padding_and_round_trips() -> None:
    secret = bytes(range(20))
    encoded = totp.base32_secret(secret)
    assert "=" not in encoded
    assert len(encoded) == 32
    assert base64.b32decode(encoded) == secret
    assert totp.base32_secret(b"\x00" * 10).rstrip("A") == ""  # 16 chars, padding stripped


def test_otpauth_uri_parses_back() -> None:
    secret = totp.generate_secret()
    uri = totp.otpauth_uri(secret, "acme/alice@example.com", "Soma Agent: Prod")
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth"
    assert parts.netloc == "totp"
    label = parts.path.lstrip("/")
    issuer_part, sep, account_part = label.partition(":")
    assert sep == ":"
    # The issuer's own colon is escaped, so the label splits in exactly one place.
    assert unquote(issuer_part) == "Soma Agent: Prod"
    assert unquote(account_part) == "acme/alice@example.com"
    query = parse_qs(parts.query, strict_parsing=True)
    assert query["issuer"] == ["Soma Agent: Prod"]
    assert query["algorithm"] == ["SHA1"]
    assert query["digits"] == ["6"]
    assert query["period"] == ["30"]
    assert base64.b32decode(query["secret"][0] + "=" * (-len(query["secret"][0]) % 8)) == secret
    assert " " not in uri


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks = []
    position = 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC on {kind!r}"
        chunks.append((kind, body))
        position += 12 + length
    return chunks


def _decode_bilevel_png(data: bytes) -> list[list[int]]:
    """Pixels (0 black, 1 white) of a 1-bit greyscale PNG using filters None, Sub or Up."""
    chunks = _png_chunks(data)
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (1, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = (width + 7) // 8
    assert len(raw) == height * (stride + 1)
    rows: list[list[int]] = []
    previous = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        kind, scan = line[0], bytearray(line[1:])
        if kind == 1:
            for i in range(1, stride):
                scan[i] = (scan[i] + scan[i - 1]) & 0xFF
        elif kind == 2:
            scan = bytearray((a + b) & 0xFF for a, b in zip(scan, previous, strict=True))
        else:
            assert kind == 0, f"filter type {kind} not expected from segno"
        rows.append([(scan[x // 8] >> (7 - x % 8)) & 1 for x in range(width)])
        previous = scan
    return rows


def test_qr_png_is_a_png_of_the_uri() -> None:
    uri = totp.otpauth_uri(totp.generate_secret(), "acme/alice", "SomaAgent")
    png = totp.qr_png(uri, scale=5, border=4)
    pixels = _decode_bilevel_png(png)
    symbol = segno.make(uri, error="m", micro=False)
    modules = len(symbol.matrix)
    assert len(pixels) == len(pixels[0]) == (modules + 2 * 4) * 5
    # Each module's centre pixel is dark exactly where the QR matrix is.
    for row in range(modules):
        for col in range(modules):
            pixel = pixels[(4 + row) * 5 + 2][(4 + col) * 5 + 2]
            assert pixel == (0 if symbol.matrix[row][col] else 1), (row, col)
    # The quiet zone is white.
    assert set(pixels[0]) == {1}
    assert all(line[0] == 1 for line in pixels)
