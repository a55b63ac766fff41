"""Secrets the registry hands out once and keeps only as hashes.

- MQTT passwords: Mosquitto's own ``$7$`` PBKDF2-SHA512 format, so the password
  file is written straight from the database. The passwords are 32 random bytes,
  so Mosquitto's default 101 iterations already make guessing hopeless and keep
  each CONNECT cheap for the broker.
- API tokens: SHA-256 (high-entropy random strings need no slow hash).
- Physio web passwords: scrypt (chosen by people, so slow by design).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

MOSQUITTO_ITERATIONS: Final = 101
MOSQUITTO_SALT_BYTES: Final = 12
TOKEN_PREFIX: Final = "ct_"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


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


def password_verify(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches :func:`password_hash` output (``None``: no password set)."""
    if not stored or not stored.startswith("scrypt$"):
        return False
    _, salt, digest = stored.split("$")
    actual = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=32, **_SCRYPT)
    return hmac.compare_digest(actual.hex(), digest)
