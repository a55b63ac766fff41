"""A local SMTP catcher for ``compression demo``: accepts every e-mail on a loopback port and keeps it as a .eml file.

Nothing is relayed anywhere. Each message is written atomically as ``NNNN-<utc time>.eml`` in the catcher's
folder, with the SMTP envelope as ``X-Envelope-From``/``X-Envelope-To`` headers in front; any mail client opens
the files. The server is aiosmtpd's threaded controller (its own event loop in a background thread), plain SMTP
without TLS or authentication: point the monitor at it with ``COMPRESSION_MONITOR_SMTP_TLS=off``.

    catcher = start_mailcatcher(Path("var/demo"))
    ...  # COMPRESSION_MONITOR_SMTP_HOST=127.0.0.1 COMPRESSION_MONITOR_SMTP_PORT=catcher.port
    for mail in catcher.messages():
        print(mail.path, mail.recipients, mail.subject)
    catcher.stop()
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from compression.localservers import ServerError, free_port


@dataclass(frozen=True)
class CaughtMail:
    """One caught e-mail: its file, envelope sender and recipients, subject and Date header."""

    path: Path
    sender: str
    recipients: tuple[str, ...]
    subject: str
    date: str


@dataclass
class _Handler:
    catcher: MailCatcher

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd)
        try:
            self.catcher.store(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b"")
        except OSError as exc:
            return f"451 4.3.0 cannot store the message: {exc.strerror}"
        return "250 Message caught"


@dataclass
class MailCatcher:
    """The catcher on ``host:port`` storing into ``folder``; ``start``/``stop`` like the other local servers."""

    folder: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    _controller: Controller | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        """``smtp://127.0.0.1:PORT``."""
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen; e-mails already in the folder are kept and numbering continues after them."""
        if self._controller is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count = len(list(self.folder.glob("*.eml")))
        controller = Controller(_Handler(self), hostname=self.host, port=self.port, server_hostname="mailcatcher.local",
                                ready_timeout=10.0)  # fmt: skip
        try:
            controller.start()
        except (OSError, TimeoutError) as exc:
            raise ServerError(f"mail catcher could not listen on {self.host}:{self.port}: {exc}") from exc
        self._controller = controller

    def stop(self) -> None:
        """Stop listening (the files stay)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        """True while listening."""
        return self._controller is not None

    def store(self, sender: str, recipients: list[str], raw: bytes) -> Path:
        """Write one message as the next .eml file (atomically: a reader never sees half a file)."""
        envelope = f"X-Envelope-From: <{sender}>\r\nX-Envelope-To: {', '.join(recipients)}\r\n".encode()
        with self._lock:
            self._count += 1
            name = f"{self._count:04d}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.eml"
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(envelope + raw)
                os.replace(tmp, self.folder / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return self.folder / name

    def messages(self) -> list[CaughtMail]:
        """Every caught e-mail, oldest first."""
        parser = BytesHeaderParser(policy=policy.default)
        out = []
        for path in sorted(self.folder.glob("*.eml")):
            with path.open("rb") as f:
                headers = parser.parse(f)
            to = str(headers.get("X-Envelope-To", ""))
            out.append(CaughtMail(path=path, sender=str(headers.get("X-Envelope-From", "")).strip("<>"),
                                  recipients=tuple(r.strip() for r in to.split(",") if r.strip()),
                                  subject=str(headers.get("Subject", "")),
                                  date=str(headers.get("Date", ""))))  # fmt: skip
        return out

    def __enter__(self) -> MailCatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mailcatcher(root: Path, port: int | None = None) -> MailCatcher:
    """A started catcher with its folder ``root/mail-<port>``."""
    port = port or free_port()
    catcher = MailCatcher(root / f"mail-{port}", port)
    catcher.start()
    return catcher
