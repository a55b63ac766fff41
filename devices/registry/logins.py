"""Password attempts: counted per account and per client address, locked for a while after too many failures.

Every failed password (a sign-in, or the current password when changing it)
counts against the account tried (the e-mail as typed, known or not, so an
unknown one behaves exactly like a known one) and against the client's address.
Past a number of free failures each further failure locks that key for a time
that doubles, from :data:`FIRST_LOCK_S` up to ``max_lock_s``; while locked,
attempts are refused without looking at the password (no hash work, nothing
to learn). A key with no failure for :data:`FORGET_AFTER_S` starts again.

So that the account lock is no lever to keep a physio out (anyone can type her
e-mail), it does not apply from an address she signed in from successfully
(for :data:`TRUSTED_FOR_S`); the address lock still does. Counts live in this
process's memory (bounded to :data:`MAX_KEYS` keys): a restart forgets them,
and each replica counts on its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

FIRST_LOCK_S: Final = 30.0
FORGET_AFTER_S: Final = 3600.0
TRUSTED_FOR_S: Final = 30 * 24 * 3600.0
MAX_KEYS: Final = 100_000


@dataclass(frozen=True, slots=True)
class LoginLimits:
    """How many failures are free per account and per address, and the longest lock."""

    free_per_account: int = 5
    free_per_address: int = 20
    max_lock_s: float = 900.0


@dataclass(frozen=True, slots=True)
class Lock:
    """A lock that a failure just started: on what (``account`` or ``address``), for how long, after how many."""

    scope: str
    key: str
    seconds: float
    failures: int
    refused_meanwhile: int


@dataclass(slots=True)
class _Count:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0
    refused: int = 0


@dataclass
class LoginGuard:
    """Thread-safe failure counts and locks (the API runs in a thread pool)."""

    limits: LoginLimits = field(default_factory=LoginLimits)
    clock: Callable[[], float] = time.monotonic
    _counts: OrderedDict[tuple[str, str], _Count] = field(default_factory=OrderedDict)
    _trusted: OrderedDict[tuple[str, str], float] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, account: str, address: str) -> float:
        """Seconds until ``account`` may be tried from ``address`` again (0: now); a refusal is counted."""
        now = self.clock()
        with self._lock:
            waits = [(count, count.locked_until - now) for count in self._applicable(account, address, now)]
            locked = [(count, wait) for count, wait in waits if wait > 0]
            for count, _ in locked:
                count.refused += 1
            return max((wait for _, wait in locked), default=0.0)

    def failed(self, account: str, address: str) -> list[Lock]:
        """Count a failure; the locks it starts."""
        now = self.clock()
        started = []
        with self._lock:
            for scope, key, free in (("account", account, self.limits.free_per_account),
                                     ("address", address, self.limits.free_per_address)):  # fmt: skip
                count = self._count(scope, key, now)
                count.failures += 1
                count.last = now
                over = count.failures - free
                if over > 0:
                    seconds = min(FIRST_LOCK_S * 2 ** (over - 1), self.limits.max_lock_s)
                    count.locked_until = now + seconds
                    started.append(Lock(scope, key, seconds, count.failures, count.refused))
                    count.refused = 0
        return started

    def succeeded(self, account: str, address: str) -> None:
        """A right password: the account's count starts again and its lock no longer applies from ``address``.

        The address's count is left alone: signing in to one's own account must not clear the way for guessing
        another's.
        """
        now = self.clock()
        with self._lock:
            self._counts.pop(("account", account), None)
            self._trusted[(account, address)] = now
            self._trusted.move_to_end((account, address))
            while len(self._trusted) > MAX_KEYS:
                self._trusted.popitem(last=False)

    def _applicable(self, account: str, address: str, now: float) -> list[_Count]:
        trusted = now - self._trusted.get((account, address), -TRUSTED_FOR_S - 1) <= TRUSTED_FOR_S
        keys = [("address", address)] if trusted else [("account", account), ("address", address)]
        return [self._counts[key] for key in keys if key in self._counts]

    def _count(self, scope: str, key: str, now: float) -> _Count:
        count = self._counts.get((scope, key))
        if count is None or (now - count.last > FORGET_AFTER_S and count.locked_until <= now):
            count = _Count()
            self._counts[(scope, key)] = count
        self._counts.move_to_end((scope, key))
        while len(self._counts) > MAX_KEYS:
            self._counts.popitem(last=False)
        return count
