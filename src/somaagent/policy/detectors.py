"""Text detectors: e-mail addresses, phone numbers, payment card numbers, secrets and keyword lists.

Owns: `find_emails`, `find_phones`, `find_cards`, `find_secrets`, `luhn_valid`, `DETECTORS`, the
longest text each detector needs to see at once (`DETECTOR_MAX_CHARS`, used by the stream guard), and
`KeywordMatcher` (a keywords rule compiled into one trie regex).
May import: stdlib. Never: I/O, other somaagent packages.

Every finder takes `(text, start, limit)` and returns up to `limit` spans `(s, e)` with `s >= start`
and `text[s:e]` the match. Characters before `start` are read as left context where it matters: a
number that begins before `start` is not reported from its middle (cards, phones), while the rest of
an address or of a random token is (it is still an `@domain`, still random). Each finder first locates
candidates with one regular expression that the engine runs in C without a leading look-behind (so
it skips text that cannot start a match): `@domain`, runs of phone characters, runs of 13+ digits,
and long tokens only when a substring test says one may exist; boundaries and structure are then
checked in Python. Work is linear in the text (adversarial digit runs ~0.6 s/MB, prose ~0.01 s/MB).

Decisions worth knowing:
- e-mail: ASCII local part and domain with a 2-24 letter TLD; internationalised addresses are not found.
- phone: international numbers (`+` country code, E.164 with or without separators) and common
  national formats — NANP `415-555-2671` / `(415) 555-2671` / `415.555.2671`, and trunk-prefixed
  `020 7946 0958` / `01 23 45 67 89` — with 9-15 digits. A bare run of digits without `+` is not a
  phone (order numbers and amounts look the same); nor is a number glued to a longer digit run.
- card: 13-19 digits (any script's decimal digits), contiguous or in groups of 3-6 split by single
  spaces or dashes, passing the Luhn check and not all one digit; whole groups of a run only (a card
  beside an expiry date or a phone number in one run is found; a contiguous number inside a longer
  digit run is not a card).
- secret: well-known key formats (OpenAI/Anthropic `sk-…`, Stripe `sk_live_…`, AWS `AKIA…`/`ASIA…`,
  GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, PEM `-----BEGIN … PRIVATE KEY-----`) and long random
  tokens: ≥ 32 base64/base64url characters mixing lower case, upper case and digits, or ≥ 32 hex digits
  mixing digits and letters, with high per-character entropy. UUIDs are identifiers, not secrets, and
  are never reported; nor are ordinary long words, snake/kebab-case names, camelCase identifiers (half
  or more of them word-like runs such as `User`, `cache`) and paths (three or more `/`). The cost: ~3%
  of random 32-character base62 keys look word-like enough to be missed (~0.1% at 64 characters).
  Hex digests (a git commit id, a SHA-256) do look like hex keys and are reported.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

Span = tuple[int, int]
DetectorName = Literal["email", "phone", "card", "secret"]
Finder = Callable[[str, int, int], list[Span]]

# --- e-mail ------------------------------------------------------------------------------------------

_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# `@` and a domain with a 2-24 letter TLD; the engine skips every `@` without one (no Python per `@`).
_AT_DOMAIN = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*?"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-]|\.[A-Za-z0-9])"
)
_MAX_LOCAL = 64


def find_emails(text: str, start: int = 0, limit: int = 20) -> list[Span]:
    """Spans of e-mail addresses in `text[start:]`."""
    spans: list[Span] = []
    for domain in _AT_DOMAIN.finditer(text, start):
        at = local_start = domain.start()
        # Walk left over the local part, never before `start` (a scan that starts inside an address
        # still reports the rest of it) and at most 64 characters (longer is not an address).
        while local_start > start and text[local_start - 1] in _LOCAL_CHARS and at - local_start < _MAX_LOCAL:
            local_start -= 1
        too_long = at - local_start >= _MAX_LOCAL and text[local_start - 1 : local_start] in _LOCAL_CHARS
        while local_start < at and text[local_start] == ".":
            local_start += 1
        if local_start < at and not too_long:
            spans.append((local_start, domain.end()))
            if len(spans) >= limit:
                break
    return spans


# --- phone numbers -----------------------------------------------------------------------------------

_PHONE = re.compile(
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){1,5}"  # international, with groups
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"  # (415) 555-2671
    r"|(?:1[ .-])?\d{3}(?P<sep>[ .-])\d{3}(?P=sep)\d{4}"  # NANP 415-555-2671, 1 415 555 2671
    r"|0\d{1,4}(?:[ -]\d{2,8}){1,4}"  # trunk prefix: 020 7946 0958, 01 23 45 67 89
)
_NUMBER_GLUE = frozenset("0123456789+.-_")
# Runs of phone characters holding at least 9 of them; only these are searched with `_PHONE` (a
# leading charset lets the engine skip prose quickly; `_PHONE`'s alternation would not).
_PHONE_RUN = re.compile(r"[+(\d][\d ().-]{7,}\d")


def _digit_count(value: str) -> int:
    return sum(ch.isdigit() for ch in value)


def _free_standing(text: str, s: int, e: int) -> bool:
    """The match is not glued to a word, a decimal point or a longer number on either side."""
    before = text[s - 1] if s > 0 else " "
    if before.isalnum() or before in _NUMBER_GLUE:
        return False
    after = text[e] if e < len(text) else " "
    if after.isalnum() or after == "_":
        return False
    # "…2671-3", "…2671.5": the number goes on.
    return not (after in ".-" and e + 1 < len(text) and text[e + 1].isdigit())


def find_phones(text: str, start: int = 0, limit: int = 20) -> list[Span]:
    """Spans of phone numbers (9-15 digits, international or common national formats) in `text[start:]`."""
    spans: list[Span] = []
    for run in _PHONE_RUN.finditer(text, start):
        pos, run_end = run.span()
        while len(spans) < limit:
            match = _PHONE.search(text, pos, run_end)
            if match is None:
                break
            s, e = match.span()
            if _free_standing(text, s, e) and 9 <= _digit_count(match.group()) <= 15:
                spans.append((s, e))
                pos = e
            else:
                pos = s + 1
        if len(spans) >= limit:
            break
    return spans


# --- payment cards -----------------------------------------------------------------------------------

_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){12,}")  # runs of >= 13 digits split by single spaces or dashes
_DIGITS = re.compile(r"\d+")
_DOUBLED = str.maketrans("0123456789", "0246813579")  # Luhn: 2d, minus 9 when above 9


def _luhn_ascii(digits: str) -> bool:
    # Digit sums as sums of code points: the loop runs in C (a card check costs ~1 us).
    kept, doubled = digits[-1::-2], digits[-2::-2].translate(_DOUBLED)
    return (sum(kept.encode()) + sum(doubled.encode()) - 48 * len(digits)) % 10 == 0


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits (separators are ignored) passes the Luhn checksum."""
    values = "".join(ch for ch in digits if ch.isdecimal())
    if len(values) < 2:
        return False
    if not values.isascii():  # other scripts' digits: the same numbers
        values = "".join(str(int(ch)) for ch in values)
    return _luhn_ascii(values)


def _card_end(text: str, groups: list[Span], i: int) -> int | None:
    """The end (a group index) of the longest card number made of whole groups from `groups[i]`:
    one contiguous group of 13-19 digits, or 2-6 groups of 3-6 digits with 13-19 in all."""
    first = groups[i][1] - groups[i][0]
    if first > 6:
        candidates = [i + 1] if 13 <= first <= 19 else []
    elif first >= 3:
        candidates, total, j = [], 0, i
        while j < len(groups) and 3 <= groups[j][1] - groups[j][0] <= 6:
            total += groups[j][1] - groups[j][0]
            if total > 19:
                break
            j += 1
            if total >= 13 and j - i > 1:
                candidates.append(j)
    else:
        return None
    for end in reversed(candidates):
        digits = "".join(text[s:e] for s, e in groups[i:end])
        if digits.count(digits[0]) == len(digits):
            continue  # 0000 0000 0000 0000: a placeholder
        if _luhn_ascii(digits) if digits.isascii() else luhn_valid(digits):
            return end
    return None


def find_cards(text: str, start: int = 0, limit: int = 20) -> list[Span]:
    """Spans of payment card numbers (13-19 digits that pass Luhn) in `text[start:]`."""
    spans: list[Span] = []
    for run in _DIGIT_RUN.finditer(text, start):
        s, e = run.span()
        groups = [m.span() for m in _DIGITS.finditer(text, s, e)]
        before = text[s - 1] if s > 0 else " "
        if before.isalnum() or before in "._":
            groups = groups[1:]  # the end of a longer number or of a word: not a card's first group
        after = text[e] if e < len(text) else " "
        if after.isalnum() or after == "_" or (after == "." and e + 1 < len(text) and text[e + 1].isdigit()):
            groups = groups[:-1]
        # A run may hold other numbers beside a card ("4111 1111 1111 1111 12/25", "555-1234 4111 …"):
        # take, left to right, the longest card-shaped stretch of whole groups.
        i = 0
        while i < len(groups):
            end = _card_end(text, groups, i)
            if end is None:
                i += 1
                continue
            spans.append((groups[i][0], groups[end - 1][1]))
            if len(spans) >= limit:
                return spans
            i = end
    return spans


# --- secrets -----------------------------------------------------------------------------------------

_KEY_FORMATS = re.compile(
    r"sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}"
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|[AS]KIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
)
_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = frozenset("0123456789abcdefABCDEF")
# Bits per character: random base62 text of 32+ characters scores ~4.6-5, English camelCase ~3.6-4.1;
# random hex ~3.7-3.9 of its maximum 4.
_MIN_ENTROPY_B64 = 4.25
_MIN_ENTROPY_HEX = 3.0
# Identifiers are made of word-like runs ("getUserById2FromTheCache": 62% of its characters); random
# base64 rarely is (≥ 50% in ~3% of 32-character keys, ~0.1% of 64-character ones).
_WORDLIKE = re.compile(r"[A-Z][a-z]{3,}|[a-z]{4,}")
_MAX_WORDLIKE = 0.5


def _entropy(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _random_token(token: str) -> bool:
    core = token.rstrip("=")
    if _UUID.fullmatch(core) or core.count("/") >= 3:
        return False
    if all(ch in _HEX for ch in core):
        has_digit = any(ch.isdigit() for ch in core)
        return has_digit and any(ch.isalpha() for ch in core) and _entropy(core) >= _MIN_ENTROPY_HEX
    lower = any(ch.islower() for ch in core)
    upper = any(ch.isupper() for ch in core)
    digit = any(ch.isdigit() for ch in core)
    if not (lower and upper and digit) or _entropy(core) < _MIN_ENTROPY_B64:
        return False
    wordlike = sum(len(run) for run in _WORDLIKE.findall(core))
    return wordlike < _MAX_WORDLIKE * len(core)


# Each key format contains one of these; a text without any cannot hold one (cheap substring tests).
_KEY_MARKERS = ("sk-", "sk_", "KIA", "_", "xox", "-----BEGIN")


def _has_long_token(text: str, start: int) -> bool:
    """Whether some whitespace-free stretch of `text[start:]` is 32+ characters long (a random token
    needs one); `str.split` in C is ~2x faster than the token regex over prose."""
    return max(map(len, text[start:].split()), default=0) >= 32


def find_secrets(text: str, start: int = 0, limit: int = 20) -> list[Span]:
    """Spans of API keys, private-key headers and long random tokens in `text[start:]`."""
    spans: list[Span] = []
    pos = start
    if any(text.find(marker, start) != -1 for marker in _KEY_MARKERS):
        while len(spans) < limit:
            match = _KEY_FORMATS.search(text, pos)
            if match is None:
                break
            s, e = match.span()
            pem = text.startswith("-----", s)
            if pem or s == 0 or not (text[s - 1].isalnum() or text[s - 1] in "_-"):
                spans.append((s, e))
            pos = e
    pos = start
    if _has_long_token(text, start):
        while len(spans) < limit:
            match = _TOKEN.search(text, pos)
            if match is None:
                break
            s, e = match.span()
            pos = e
            # A token glued to more token characters on its left can only start at `start` (the
            # regex is greedy): a scan that starts inside a token judges the rest of it.
            overlaps = any(s < known_e and known_s < e for known_s, known_e in spans)
            if not overlaps and _random_token(match.group()):
                spans.append((s, e))
    spans.sort()
    return spans


DETECTORS: Mapping[str, Finder] = {
    "email": find_emails,
    "phone": find_phones,
    "card": find_cards,
    "secret": find_secrets,
}
# The longest text a detector must see whole to report a match (the stream guard re-scans this much
# of already-checked text). An address is found from any fragment holding its `@` and domain; a random
# token from any 32 characters of it; the bounds are assumptions for longer domains and keys.
DETECTOR_MAX_CHARS: Mapping[str, int] = {"email": 128, "phone": 32, "card": 40, "secret": 64}


def detect(name: str, text: str, start: int = 0, limit: int = 20) -> list[Span]:
    """Spans found by the named detector (`email`, `phone`, `card` or `secret`)."""
    return DETECTORS[name](text, start, limit)


# --- keyword lists -----------------------------------------------------------------------------------

PHRASE_GAP = 8  # whitespace between the words of a phrase: 1 to this many characters
_WORD_RUN = re.compile(r"\w+")


def fold(text: str) -> str:
    """Case-fold the way `re.IGNORECASE` compares, and then some: `str.casefold`, plus the dotless i
    (which `re` equates with `i` but casefold keeps apart; the only such pair, checked over all of
    Unicode against `re._casefix`)."""
    folded = text.casefold()
    return folded.replace("\u0131", "i") if "\u0131" in folded else folded


def casefold_in_place(text: str) -> str | None:
    """`fold(text)` when folding keeps every position (no `ß` -> `ss`), else None."""
    folded = fold(text)
    return folded if len(folded) == len(text) else None


def _atoms(word: str) -> tuple[str, ...]:
    """A keyword as characters, each whitespace run one " " atom."""
    atoms: list[str] = []
    for part in re.split(r"(\s+)", word.strip()):
        if part.isspace():
            atoms.append(" ")
        else:
            atoms.extend(part)
    return tuple(atoms)


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _trie_pattern(words: Iterable[tuple[str, ...]]) -> str:
    """One alternation for many words with shared prefixes merged (a position is tried once per
    branch point, not once per word), longer words first, and whole-word where a word starts or ends
    with a word character (`cat` is not found in `concatenate`, `.env` is found in `app.env`)."""
    root: dict[str, Any] = {}
    for atoms in words:
        node = root
        for atom in atoms:
            node = node.setdefault(atom, {})
        node[""] = {}

    def render(node: dict[str, Any], last: str) -> str:
        branches = []
        for atom in sorted(key for key in node if key):
            piece = rf"\s{{1,{PHRASE_GAP}}}" if atom == " " else re.escape(atom)
            branches.append(piece + render(node[atom], atom))
        if "" in node:  # a word ends here; after the longer words that go on
            branches.append(r"(?!\w)" if _is_word(last) else "")
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    word_initial = {key: child for key, child in root.items() if _is_word(key)}
    other = {key: child for key, child in root.items() if not _is_word(key)}
    parts = []
    if word_initial:
        parts.append(r"(?<!\w)" + render(word_initial, ""))
    if other:
        parts.append(render(other, ""))
    return "|".join(f"(?:{part})" for part in parts)


def word_tokens(text: str, start: int = 0) -> frozenset[str]:
    """The distinct maximal runs of word characters in `text[start:]`."""
    return frozenset(_WORD_RUN.findall(text, start))


class KeywordMatcher:
    """Whole words and phrases (whitespace inside a phrase matches 1-8 whitespace characters).

    Case-insensitive lists match the case-folded text with a case-sensitive trie (about twice as fast
    as `re.IGNORECASE`; folding also equates the long s with `s`, the Kelvin sign with `k`); a text
    whose folding changes length is matched with `re.IGNORECASE` instead, so spans stay positions in
    the original text.

    Prefilter: a match makes the word's first run of word characters a whole token of the text
    (boundaries: the start guard or the word's own non-word characters on the left; whitespace, a
    non-word character or the end guard on the right), so a list none of whose first tokens is among
    the text's tokens (`word_tokens`, computed once per text for all lists) cannot match.
    """

    def __init__(self, words: Sequence[str], ignore_case: bool) -> None:
        self.ignore_case = ignore_case
        atoms = [_atoms(fold(word) if ignore_case else word) for word in words]
        self._pattern = re.compile(_trie_pattern(atoms))
        self._fallback = re.compile(_trie_pattern(_atoms(word) for word in words), re.IGNORECASE)
        firsts = [_WORD_RUN.search("".join(a)) for a in atoms]
        # None: some word has no word character at all, so only the regex can tell.
        self.first_tokens = frozenset(m.group() for m in firsts if m) if all(firsts) else None
        self.max_chars = max(sum(PHRASE_GAP if a == " " else 1 for a in word) for word in atoms)

    def find(
        self,
        text: str,
        folded: str | None,
        start: int = 0,
        limit: int = 20,
        tokens: frozenset[str] | None = None,
    ) -> list[Span]:
        """Spans in `text[start:]`. `folded` is `casefold_in_place(text)` (read only when ignoring case);
        `tokens`, when given, is `word_tokens` of the text searched (folded or not) from `start`."""
        target, pattern = text, self._pattern
        if self.ignore_case:
            if folded is None:
                pattern = self._fallback
            else:
                target = folded
        if tokens is not None and self.first_tokens is not None and self.first_tokens.isdisjoint(tokens):
            return []
        spans: list[Span] = []
        for match in pattern.finditer(target, start):
            spans.append(match.span())
            if len(spans) >= limit:
                break
        return spans
