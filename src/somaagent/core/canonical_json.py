"""Canonical JSON (RFC 8785, JCS): the exact bytes a signature or a digest is computed over.

Owns: `canonicalize`. May import: stdlib, core.errors. Used by signed tool manifests and, later, the
signed constitution: two parties that serialize the same JSON value get the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from somaagent.core.errors import InvalidRequest

_MAX_SAFE_INT = 2**53 - 1


class NotCanonicalJson(InvalidRequest):
    """A value that has no canonical JSON form (NaN, a huge integer, a non-string key, ...)."""

    code = "not_canonical_json"


def canonicalize(value: Any) -> bytes:
    """Canonical JSON bytes of a JSON value (RFC 8785 JCS rules, I-JSON integers); see below.

    Exactly this is done: objects have their members sorted by key, compared as UTF-16 code units
    (RFC 8785 §3.2.3; differs from code-point order only above U+FFFF); there is no whitespace
    between tokens; strings are written as UTF-8 with only `"`, `\\` and U+0000..U+001F escaped
    (`\\b \\t \\n \\f \\r` short forms, other controls as lowercase `\\u00xx`); `true`/`false`/`null`
    literally; integers in decimal (refused beyond ±(2**53-1), as I-JSON requires); other floats in
    ECMAScript `Number.prototype.toString` form (shortest round-trip digits, `1e+21`, `1e-7`, `-0` as
    `0`); NaN and infinities, non-string keys, lone surrogates and non-JSON types are refused.
    """
    parts: list[str] = []
    _write(value, parts, "$")
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotCanonicalJson(f"text is not valid Unicode (lone surrogate?): {exc.reason}") from exc


def _write(value: Any, out: list[str], path: str) -> None:
    # bool before int: True is an int to Python but a literal to JSON.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise NotCanonicalJson(f"integer at {path} is beyond ±(2**53-1), not portable JSON", param=path)
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_es_number(value, path))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise NotCanonicalJson(f"object key {key!r} at {path} is not a string", param=path)
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out, f"{path}.{key}")
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, f"{path}[{i}]")
        out.append("]")
    else:
        raise NotCanonicalJson(f"value at {path} is a {type(value).__name__}, not JSON", param=path)


def _es_number(value: float, path: str) -> str:
    """A finite float as ECMAScript's Number.prototype.toString writes it (what RFC 8785 requires)."""
    if not math.isfinite(value):
        raise NotCanonicalJson(f"number at {path} is {value}; JSON has no NaN or infinity", param=path)
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr gives the shortest digits that round-trip, the same digits ECMAScript picks.
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    all_digits = int_part + frac_part
    digits = all_digits.lstrip("0").rstrip("0")
    trailing_zeros = len(all_digits.lstrip("0")) - len(digits)
    # value = int(digits) * 10**scale; ECMAScript's n is where the decimal point sits after the digits.
    scale = int(exp_text or 0) - len(frac_part) + trailing_zeros
    k = len(digits)
    n = scale + k
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        exponent = n - 1
        exp_sign = "+" if exponent >= 0 else "-"
        head = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{head}e{exp_sign}{abs(exponent)}"
    return sign + text
