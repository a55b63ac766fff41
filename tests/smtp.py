"""A real SMTP server for tests (aiosmtpd): records what it receives, STARTTLS or implicit TLS, AUTH, restartable.

Usage::

    ca, cert, key = make_certificates(tmp_path)
    with SmtpTestServer(tls="starttls", cert=cert, key=key, users={"monitor": "secret"}) as server:
        ...  # SmtpSender("127.0.0.1", server.port, tls="starttls", ca_file=ca, username="monitor", password="secret")
        [mail] = server.wait_for(1)
        server.stop()   # connection refused from now on
        server.start()  # the same port again

The server runs aiosmtpd's threaded controller (its own event loop in a thread), so it serves while a test's own
event loop awaits a client. ``reject_rcpt`` queues replies to the next RCPT commands (e.g. ``"451 4.3.0 later"``)
to test how a client treats a refusal.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from compression.localservers import free_port


class _Controller(Controller):
    def factory(self) -> SMTP:
        # aiosmtpd warns about AUTH without STARTTLS even when the whole connection is TLS (implicit TLS).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning)
            smtp: SMTP = super().factory()  # type: ignore[no-untyped-call]
            return smtp


def make_certificates(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for ``host`` (an IP address) signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert, ext = (folder / n for n in ("smtp-ca.key", "smtp-ca.crt", "smtp.key", "smtp.csr",
                                                            "smtp.crt", "smtp-san.ext"))  # fmt: skip
    ext.write_text(f"subjectAltName=IP:{host}\n")

    def openssl(*args: object) -> None:
        subprocess.run(["openssl", *(str(a) for a in args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=compression test SMTP CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={host}")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
            "-extfile", ext)  # fmt: skip
    return ca, cert, key


@dataclass(frozen=True)
class ReceivedMail:
    """One message as the server received it: envelope, raw bytes, who had logged in, whether over TLS."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    login: str | None
    tls: bool
    received_at: float

    @property
    def message(self) -> EmailMessage:
        """The parsed message."""
        parsed = BytesParser(policy=policy.default).parsebytes(self.raw)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class _Handler:
    server: SmtpTestServer

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        with self.server.lock:
            if self.server.reject_rcpt:
                return self.server.reject_rcpt.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        mail = ReceivedMail(envelope.mail_from or "", tuple(envelope.rcpt_tos), raw, login, session.ssl is not None,
                            time.time())  # fmt: skip
        with self.server.lock:
            self.server.messages.append(mail)
        return "250 Message accepted for delivery"


@dataclass
class SmtpTestServer:
    """aiosmtpd on 127.0.0.1 (a free port unless given) recording every message; stop/start keep the port.

    ``tls``: ``starttls`` (offered and required before MAIL/AUTH), ``implicit`` (TLS from the first byte) or
    ``off`` (needs ``cert``/``key`` for the first two). ``users``: accepted logins (AUTH PLAIN/LOGIN), AUTH then
    required; ``None``: no authentication.
    """

    tls: Literal["starttls", "implicit", "off"] = "off"
    cert: Path | None = None
    key: Path | None = None
    users: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    messages: list[ReceivedMail] = field(default_factory=list)
    reject_rcpt: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _controller: Controller | None = field(default=None, repr=False)

    def _context(self) -> ssl.SSLContext:
        if self.cert is None or self.key is None:
            raise ValueError("TLS needs cert and key (tests.smtp.make_certificates)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:  # fmt: skip
        ok = (isinstance(auth_data, LoginPassword) and self.users is not None
              and self.users.get(auth_data.login.decode()) == auth_data.password.decode())  # fmt: skip
        # handled=False: aiosmtpd itself answers (235, or 535 for a wrong password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    @property
    def running(self) -> bool:
        """True while the server listens."""
        return self._controller is not None

    def start(self) -> None:
        """Listen (again) on ``port``; messages received before are kept."""
        if self._controller is not None:
            return
        kwargs: dict[str, Any] = {"server_hostname": "smtp.test", "ready_timeout": 10.0}
        if self.tls == "starttls":
            kwargs |= {"tls_context": self._context(), "require_starttls": True}
        elif self.tls == "implicit":
            kwargs |= {"ssl_context": self._context(), "auth_require_tls": False}
        if self.users is not None:
            kwargs |= {"authenticator": self._authenticate, "auth_required": True}
        deadline = time.monotonic() + 10
        while True:
            controller = _Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)
            try:
                controller.start()
                break
            except OSError:  # the port of a just-stopped server may linger a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._controller = controller

    def stop(self) -> None:
        """Stop listening (clients get 'connection refused'); ``start`` again serves on the same port."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpTestServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()

    def received(self) -> list[ReceivedMail]:
        """A copy of the messages received so far."""
        with self.lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """Block until at least ``count`` messages arrived; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {count} e-mails arrived within {timeout} s")
            time.sleep(0.02)

    async def wait_for_async(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """:meth:`wait_for` for a test's event loop (polls without blocking it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"{len(self.received())} of {count} e-mails arrived within {timeout} s")
