"""Who an e-mail goes to: the registry's address, checked where it enters; names only as display text.

A physio record is typed by registry users (or imported from a CSV), so both its fields are untrusted text:

- the **address** is the only thing that decides a recipient. :func:`checked_address` accepts one plain
  ``local@domain`` and nothing that could carry a second address or a header (no ``,``, ``;``, ``<``, ``>``,
  quotes, spaces or control characters). The monitor checks it when it reads the registry (an unusable address
  is a registry problem, reported to the clinic) and the SMTP sender checks it again before ``RCPT TO``; the
  envelope recipient is always given explicitly, never parsed from headers;
- the **display name** only ever reaches a message as text: :func:`display_name` removes control, line-separator
  and bidirectional-override characters and bounds its length, and the header is built with
  :class:`email.headerregistry.Address`, which quotes or encodes it, so no name can add a recipient or a header.
"""

from __future__ import annotations

import unicodedata
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Final

MAX_ADDRESS: Final = 254  # RFC 5321's path limit, and the registry's column
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN_LABEL: Final = 63
MAX_DISPLAY_NAME: Final = 200  # the registry's column

# RFC 5322 atext: what an unquoted local part may hold. Nothing here separates addresses or ends a header.
_ATEXT: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# Unicode categories removed from display names: controls (CR, LF, TAB, ESC, ...), line and paragraph separators,
# surrogates, private use and unassigned code points.
_DROP_CATEGORIES: Final = frozenset({"Cc", "Cs", "Co", "Cn", "Zl", "Zp"})
# Bidirectional embeddings, overrides and isolates (format characters that can make a name read as another).
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class AddressError(ValueError):
    """An e-mail address the monitor will not send to: not exactly one plain ``local@domain``."""


def _local_ok(local: str) -> bool:
    if not 1 <= len(local) <= MAX_LOCAL_PART or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return all(c in _ATEXT or c == "." for c in local)


def _label_ok(label: str) -> bool:
    if not 1 <= len(label) <= MAX_DOMAIN_LABEL or label.startswith("-") or label.endswith("-"):
        return False
    return all(c.isascii() and (c.isalnum() or c == "-") for c in label)


def checked_address(address: str) -> str:
    """``address`` unchanged if it is one plain ASCII ``local@domain`` (a dot-atom local part, a domain of at least
    two labels of letters, digits and hyphens: an international domain in its ``xn--`` form); :class:`AddressError`
    otherwise. (Python's e-mail library itself refuses a non-ASCII local part under the SMTP policy.)"""
    if not isinstance(address, str) or not 3 <= len(address) <= MAX_ADDRESS:
        raise AddressError("not an e-mail address of 3 to 254 characters")
    local, at, domain = address.partition("@")
    if not at or "@" in domain:
        raise AddressError("not exactly one '@'")
    if not _local_ok(local):
        raise AddressError("the part before '@' holds characters an address may not hold unquoted")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_label_ok(label) for label in labels):
        raise AddressError("the domain is not a host name")
    try:
        parsed = Address(addr_spec=address)  # the e-mail library must read it as the very same single address
    except (HeaderParseError, ValueError, IndexError) as exc:
        raise AddressError(f"the e-mail library does not read it as one address: {exc}") from exc
    if parsed.addr_spec != address:
        raise AddressError("the e-mail library reads it as another address")
    return address


def display_name(name: str | None) -> str | None:
    """``name`` fit for a header's display name and a greeting: control, separator and bidi-override characters
    become spaces, runs of white space one space, at most :data:`MAX_DISPLAY_NAME` characters; ``None`` if empty."""
    if not name:
        return None
    kept = "".join(" " if unicodedata.category(c) in _DROP_CATEGORIES or c in _BIDI_CONTROLS else c for c in name)
    text = " ".join(kept.split())[:MAX_DISPLAY_NAME].strip()
    return text or None


def recipient_header(address: str, name: str | None) -> Address:
    """The To header's value: the checked ``address`` with ``name`` as display text only (quoted or encoded by the
    e-mail library, so it can never become a second address)."""
    return Address(display_name=display_name(name) or "", addr_spec=checked_address(address))


__all__ = ["MAX_DISPLAY_NAME", "AddressError", "checked_address", "display_name", "recipient_header"]
