"""PII detectors: Luhn, cards, phones, e-mail addresses and secrets, with exact spans and the decided
non-matches (UUIDs, identifiers, dates, IP addresses, numbers inside longer numbers)."""

from __future__ import annotations

import secrets

import pytest

from somaagent.policy.detectors import (
    KeywordMatcher,
    casefold_in_place,
    detect,
    find_cards,
    find_emails,
    find_phones,
    find_secrets,
    fold,
    luhn_valid,
    word_tokens,
)


def found(finder_name: str, text: str) -> list[str]:
    return [text[s:e] for s, e in detect(finder_name, text)]


# --- Luhn and cards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111 1111 1111 1111", True),
        ("4111-1111-1111-1111", True),
        ("4111111111111112", False),
        ("4111 1111 1111 1112", False),
        ("378282246310005", True),  # Amex test number
        ("5555555555554444", True),  # Mastercard test number
        ("79927398713", True),  # the textbook Luhn example
        ("79927398710", False),
        ("0", False),
        ("", False),
    ],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "3782 822463 10005",
        "5555555555554444",
    ],
)
def test_cards_that_pass_luhn_are_found_with_exact_spans(card: str) -> None:
    text = f"My card is {card}, expiring soon."
    spans = find_cards(text)
    assert spans == [(11, 11 + len(card))]
    assert text[spans[0][0] : spans[0][1]] == card


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 please",  # fails Luhn
        "card 4111-1111-1111-1112 please",
        "id 41111111111111110000 is long",  # 20 digits: not a card, and no fragment of it is one
        "hash x4111111111111111 glued to a letter",
        "pi 3.4111111111111111 is a decimal",
        "zeros 0000 0000 0000 0000 are a placeholder",
        "groups of two 41 11 11 11 11 11 11 11",
        "a year 2024 and a count 12",
    ],
)
def test_not_cards(text: str) -> None:
    assert find_cards(text) == []


def test_cards_in_other_scripts_digits_are_cards_too() -> None:
    fullwidth = "\uff14\uff11\uff11\uff11 " * 3 + "\uff14\uff11\uff11\uff11"  # 4111 ... in fullwidth
    assert luhn_valid("\uff14\uff11\uff11\uff11" * 4) is False  # 4111411141114111
    assert luhn_valid("\u0664\u0661\u0661\u0661" + "\u0661" * 12) is True  # Arabic-Indic 4111111111111111
    text = (
        "card " + "\uff14\uff11\uff11\uff11 " + "\uff11\uff11\uff11\uff11 " * 2 + "\uff11\uff11\uff11\uff11"
    )
    assert find_cards(text) == [(5, len(text))]
    assert find_cards("card " + fullwidth) == []
    assert luhn_valid("4111 1111 1111 1111\u00b2") is True  # a superscript is not a digit: ignored


def test_a_card_beside_other_numbers_in_one_run_is_found() -> None:
    text = "pay with 4111 1111 1111 1111 12/25 or call 555-1234 4111 1111 1111 1111"
    assert [text[s:e] for s, e in find_cards(text)] == ["4111 1111 1111 1111", "4111 1111 1111 1111"]


def test_cards_limit_and_start() -> None:
    text = " ".join(["4111111111111111"] * 30)
    assert len(find_cards(text, limit=5)) == 5
    spans = find_cards(text, start=17)
    assert spans[0] == (17, 33) and all(s >= 17 for s, _ in spans)


# --- phones ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "+1 415 555 2671",
        "+14155552671",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "+44 20 7946 0958",
        "020 7946 0958",
        "01 23 45 67 89",
        "+33 1 23 45 67 89",
    ],
)
def test_phone_numbers_are_found(phone: str) -> None:
    text = f"Call me on {phone} tomorrow."
    assert found("phone", text) == [phone]


@pytest.mark.parametrize(
    "text",
    [
        "the date 2024-01-15 at noon",
        "host 192.168.100.200 is down",
        "order 1234567890 shipped",  # a bare run of digits is not a phone
        "extension 555-1234 only",  # 7 digits
        "card 4111 1111 1111 1111",  # 16 digits
        "serial 12345678901234567890",
        "version 1.2.3 and 10 20 30",
    ],
)
def test_not_phone_numbers(text: str) -> None:
    assert find_phones(text) == []


# --- e-mail ------------------------------------------------------------------------------------------


def test_emails_are_found_without_trailing_punctuation() -> None:
    text = "Write to a.b+tag@example.co.uk, or USER@EXAMPLE.COM. Not .dot@x.io either way."
    assert found("email", text) == ["a.b+tag@example.co.uk", "USER@EXAMPLE.COM", "dot@x.io"]


@pytest.mark.parametrize("text", ["bob@localhost", "at @ sign", "x@y", "me@ex.c", "@example.com alone"])
def test_not_emails(text: str) -> None:
    assert find_emails(text) == []


def test_an_email_seen_from_inside_its_local_part_is_still_found() -> None:
    # A scan that starts inside an address (the stream guard's windows) reports the rest of it.
    text = "contact dana.kim@example.com now"
    assert find_emails(text, start=13) == [(13, 28)]


# --- secrets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2",
        "sk-proj-" + "Zx9" * 10,
        "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "xoxb-1234567890-abcdefghij",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",  # 40 hex digits: reported (a key or a digest)
        "Qx7fT2mZp9LkV4sR8wYc1NbH6dJ3gU0e",  # 32 random base62 characters
    ],
)
def test_secrets_are_found(secret: str) -> None:
    text = f"here is it: {secret} (do not share)"
    assert found("secret", text) == [secret]


def test_random_tokens_from_a_csprng_are_found() -> None:
    hits = sum(bool(find_secrets(f"token={secrets.token_urlsafe(48)}")) for _ in range(200))
    assert hits >= 198  # 64 random base64url characters look word-like in ~0.1% of cases


@pytest.mark.parametrize(
    "text",
    [
        "internationalization and pneumonoultramicroscopicsilicovolcanoconiosis",
        "a UUID 550e8400-e29b-41d4-a716-446655440000 identifies the row",
        "the UUID 550E8400-E29B-41D4-A716-446655440000 in upper case",
        "call getUserById2FromTheDatabaseOrCache() then AbstractSingletonProxyFactoryBean2024Edition",
        "a name like internationalization_and_localization_settings_v2",
        "the path src/somaagent/policy/detectors/finders.py has many slashes",
        "sk-short and AKIA123 are too short; task-1 is not a key",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1A is low entropy",
    ],
)
def test_not_secrets(text: str) -> None:
    assert find_secrets(text) == []


def test_a_key_inside_a_longer_identifier_is_not_a_prefixed_key() -> None:
    assert find_secrets("mask-" + "abcdefghijklmnopqrstuvwx") == []


# --- folding and keywords ----------------------------------------------------------------------------


def test_fold_equates_what_re_ignorecase_equates() -> None:
    assert fold("\u017fecret") == "secret"  # long s
    assert fold("\u212aey") == "key"  # Kelvin sign
    assert fold("\u0131gnore") == "ignore"  # dotless i: casefold keeps it, `re` does not
    assert casefold_in_place("Straße") is None  # ß -> ss moves every later position
    assert casefold_in_place("ABC") == "abc"


def test_keyword_matcher_words_phrases_and_punctuation() -> None:
    matcher = KeywordMatcher(["bomb", "credit card", "c++", ".env"], ignore_case=True)
    text = "A BOMB, not a bombastic concatenate; my Credit \n card; c++ code; app.env"
    folded = casefold_in_place(text)
    spans = matcher.find(text, folded, tokens=word_tokens(folded or text))
    assert [text[s:e] for s, e in spans] == ["BOMB", "Credit \n card", "c++", ".env"]


def test_keyword_matcher_token_prefilter_is_sound_and_skips() -> None:
    matcher = KeywordMatcher(["ransomware", "wire fraud"], ignore_case=True)
    assert matcher.first_tokens == frozenset({"ransomware", "wire"})
    benign = "nothing to see here"
    assert matcher.find(benign, casefold_in_place(benign), tokens=word_tokens(benign)) == []
    # Glued to punctuation the token is still whole: found.
    text = "(RANSOMWARE)"
    assert matcher.find(text, casefold_in_place(text), tokens=word_tokens(fold(text))) == [(1, 11)]


def test_keyword_matcher_case_sensitive_and_unfoldable_text() -> None:
    exact = KeywordMatcher(["Bomb"], ignore_case=False)
    assert exact.find("bomb Bomb", None) == [(5, 9)]
    loose = KeywordMatcher(["istanbul", "strasse"], ignore_case=True)
    text = "İstanbul and STRASSE and Straße"  # folding changes length: matched with re.IGNORECASE
    assert casefold_in_place(text) is None
    assert [text[s:e] for s, e in loose.find(text, None)] == ["İstanbul", "STRASSE"]
