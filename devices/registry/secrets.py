"""Secrets the registry hands out once and keeps only as hashes.

- MQTT passwords: Mosquitto's own ``$7$`` PBKDF2-SHA512 format, so the password
  file is written straight from the database. The passwords are 32 random bytes,
  so Mosquitto's default 101 iterations already make guessing hopeless and keep
  each CONNECT cheap for the broker.
- API tokens: SHA-256 (high-entropy random strings need no slow hash).
- Physio web passwords: scrypt (chosen by people, so slow by design), checked
  against :func:`password_problem` (length, zxcvbn's estimate with its lists of
  common passwords, words and names, and the physio's own e-mail and name).
- The bootstrap admin token from the environment: :func:`token_problem` refuses
  one worth less than 32 random bytes (a placeholder, a repeat, a short value).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import secrets
import string
from collections.abc import Sequence
from typing import Final

from zxcvbn import zxcvbn

MOSQUITTO_ITERATIONS: Final = 101
MOSQUITTO_SALT_BYTES: Final = 12
TOKEN_PREFIX: Final = "ct_"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

PASSWORD_MIN_LENGTH: Final = 12
PASSWORD_MAX_LENGTH: Final = 128
# zxcvbn's score: 3 is "safely unguessable: moderate protection from offline slow-hash scenario" (>= 10^8 guesses).
PASSWORD_MIN_SCORE: Final = 3
# zxcvbn looks at this many characters at most (its own limit); a longer password is judged by its start.
ZXCVBN_MAX_LENGTH: Final = 72
# Words of this platform an attacker tries first, beside the physio's own e-mail and name.
PLATFORM_WORDS: Final = ("compression", "registry", "physio", "clinic", "garment", "stocking")

TOKEN_MIN_BITS: Final = 256  # 32 random bytes
# zxcvbn estimates a random token at about one digit of guesses (10^n) per character (measured: at least 0.93 per
# character over 1,200 random hex, base64url and base64 tokens); repeats, sequences and words make far less.
TOKEN_MIN_GUESS_DIGITS_PER_CHAR: Final = 0.85
# Dictionary words (4 letters or more) covering this much of a token make it a phrase ("set-this-to-a-random-value").
TOKEN_MAX_WORD_SHARE: Final = 0.3
TOKEN_ADVICE: Final = "make one with: openssl rand -hex 32"
_HEX: Final = frozenset(string.hexdigits)
_URLSAFE: Final = frozenset(string.ascii_letters + string.digits + "-_")
_PRINTABLE_SIZE: Final = 94


def new_password() -> str:
    """A fresh MQTT password (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """``$7$iterations$salt$hash`` as ``mosquitto_passwd`` writes it (PBKDF2-HMAC-SHA512, base64)."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, stored: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (used by tests and by the CLI's check)."""
    try:
        _, seven, iterations, salt, _digest = stored.split("$")
    except ValueError:
        return False
    if seven != "7":
        return False
    expected = mosquitto_hash(password, base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(expected, stored)


def new_token() -> str:
    """A fresh API token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What is stored of an API token."""
    return hashlib.sha256(token.encode()).hexdigest()


def password_hash(password: str) -> str:
    """scrypt hash of a person's password: ``scrypt$salt$hash`` (hex)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


@functools.cache
def _dummy_hash() -> str:
    return password_hash(secrets.token_urlsafe(16))


def password_verify(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches :func:`password_hash` output (``None``: no password set).

    Without a usable hash (unknown account, none set) the same scrypt work is done
    against a dummy hash, so the answer takes as long either way: the time
    tells no one which e-mail addresses have an account.
    """
    usable = bool(stored) and str(stored).startswith("scrypt$")
    _, salt, digest = (stored if usable and stored else _dummy_hash()).split("$")
    actual = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=32, **_SCRYPT)
    return hmac.compare_digest(actual.hex(), digest) and usable


def _token_bits(token: str) -> float:
    """Entropy of ``token`` if each character were random over the smallest usual alphabet it fits (hex, base64url)."""
    chars = set(token)
    alphabet = 16 if chars <= _HEX else 64 if chars <= _URLSAFE else _PRINTABLE_SIZE
    return len(token) * math.log2(alphabet)


def token_problem(token: str) -> str | None:
    """Why ``token`` is no good as a long-lived admin token (a sentence), or None.

    It must be worth :data:`TOKEN_MIN_BITS` random bits by its length and alphabet
    (64 hex characters, 43 base64url ones) and show no pattern zxcvbn knows
    (repeats, sequences, words: placeholders such as ``change-me-...``).
    """
    if not token.isprintable() or any(c.isspace() for c in token):
        return "has spaces or control characters"
    bits = _token_bits(token)
    if bits < TOKEN_MIN_BITS:
        return f"is too short: about {bits:.0f} bits, at least {TOKEN_MIN_BITS} needed (32 random bytes)"
    head = token[:ZXCVBN_MAX_LENGTH]
    result = zxcvbn(head)
    words = sum(len(m["token"]) for m in result["sequence"] if m["pattern"] == "dictionary" and len(m["token"]) >= 4)
    patterned = result["guesses_log10"] < TOKEN_MIN_GUESS_DIGITS_PER_CHAR * len(head)
    if patterned or words > TOKEN_MAX_WORD_SHARE * len(head):
        return "is not random (a repeat, a sequence or words: a placeholder?)"
    return None


def password_problem(password: str, personal: Sequence[str] = ()) -> str | None:
    """Why a person's new password is refused (a sentence that never repeats it), or None.

    ``personal``: the physio's e-mail, name and the like, which the password may
    not be or lean on.
    """
    if len(password) < PASSWORD_MIN_LENGTH:
        return f"use at least {PASSWORD_MIN_LENGTH} characters"
    if len(password) > PASSWORD_MAX_LENGTH:
        return f"use at most {PASSWORD_MAX_LENGTH} characters"
    folded = password.casefold()
    inputs = [p.casefold() for p in personal if p]
    for item in inputs:
        local = item.split("@", 1)[0]
        if folded == item or (len(local) >= 4 and local in folded) or _same_letters(folded, item):
            return "do not use your e-mail address or name in it"
    words = [*inputs, *(part for item in inputs for part in _parts(item)), *PLATFORM_WORDS]
    result = zxcvbn(password[:ZXCVBN_MAX_LENGTH], user_inputs=words)
    if result["score"] >= PASSWORD_MIN_SCORE:
        return None
    return "too easy to guess. " + _advice(result)


def _parts(text: str) -> list[str]:
    return [part for part in "".join(c if c.isalnum() else " " for c in text).split() if len(part) >= 3]


def _same_letters(password: str, personal: str) -> bool:
    # anna-clinica-example for anna@clinica.example: the e-mail with other separators.
    return len(personal) >= 6 and [c for c in password if c.isalnum()] == [c for c in personal if c.isalnum()]


def _advice(result: dict[str, object]) -> str:
    feedback = result.get("feedback")
    warning = suggestions = ""
    if isinstance(feedback, dict):
        warning = str(feedback.get("warning") or "")
        tips = feedback.get("suggestions") or []
        suggestions = " ".join(str(t) for t in tips) if isinstance(tips, list) else ""
    text = " ".join(part for part in (warning, suggestions) if part)
    return text or "add more words or characters that do not follow a pattern"
