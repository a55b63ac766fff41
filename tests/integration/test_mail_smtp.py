"""Alert e-mails through a real SMTP server (aiosmtpd): STARTTLS with a private CA, AUTH, outages and refusals."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from compression.mailcatcher import start_mailcatcher
from monitor.mail import (
    ChartSeries,
    EpisodeMail,
    MailError,
    SmtpSender,
    compose_episode,
    next_attempt,
    parse_message,
)
from tests.smtp import SmtpTestServer, make_certificates

pytestmark = pytest.mark.integration

USER, PASSWORD = "monitor", "correct horse battery staple"
SENDER = "Compression monitor <monitor@clinic.example>"
PHYSIO = "physio1@demo-clinic.example"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("smtp-certs"))


@pytest.fixture
def server(certs: tuple[Path, Path, Path]) -> Iterator[SmtpTestServer]:
    _, cert, key = certs
    with SmtpTestServer(tls="starttls", cert=cert, key=key, users={USER: PASSWORD}) as srv:
        yield srv


def sender_for(server: SmtpTestServer, ca: Path, password: str = PASSWORD, **kwargs: object) -> SmtpSender:
    options: dict[str, object] = {"tls": "starttls", "username": USER, "password": password, "ca_file": ca,
                                  "timeout_s": 5.0, "mail_from": SENDER} | kwargs  # fmt: skip
    return SmtpSender(server.host, server.port, **options)  # type: ignore[arg-type]


def alert(key: str = "episode:42:opened") -> EmailMessage:
    days = tuple(date(2025, 11, 1) + timedelta(days=i) for i in range(14))
    chart = ChartSeries(days, tuple(0.4 for _ in days), None, tuple(58.0 if i != 12 else 74.5 for i in range(14)),
                        None, 60.0, "peak chamber")  # fmt: skip
    mail = EpisodeMail(
        dedupe_key=key, kind="opened", patient="PT-57EEBB", clinic="demo-clinic", timezone="Europe/Berlin",
        flag="boot_overpressure", severity="critical", started_at=datetime(2025, 11, 13, 17, 5, tzinfo=UTC),
        physio_email="physio1@demo-clinic.example", physio_name="Alex Physio",
        summary=("2025-11-13 18:05: chamber at 74.5 mmHg (maximum 60)",), chart=chart,
    )  # fmt: skip
    return compose_episode(mail, sender=SENDER, dashboard_url="http://grafana.example")


async def test_delivered_with_starttls_and_auth(server: SmtpTestServer, certs: tuple[Path, Path, Path]) -> None:
    message = alert()
    started = time.monotonic()
    await sender_for(server, certs[0]).send(message, [PHYSIO])
    elapsed = time.monotonic() - started
    [got] = await server.wait_for_async(1)
    assert elapsed < 5
    assert got.tls and got.login == USER
    assert got.mail_from == "monitor@clinic.example"
    assert got.rcpt_tos == ("physio1@demo-clinic.example",)
    received = got.message
    assert received["Message-ID"] == message["Message-ID"]
    assert received["Subject"] == "[URGENT] Boot over-pressure: PT-57EEBB (demo-clinic)"
    [png] = [p for p in received.walk() if p.get_content_type() == "image/png"]
    payload = png.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"\x89PNG\r\n\x1a\n")


async def test_wrong_password_is_permanent(server: SmtpTestServer, certs: tuple[Path, Path, Path]) -> None:
    with pytest.raises(MailError) as caught:
        await sender_for(server, certs[0], password="wrong").send(alert(), [PHYSIO])
    assert not caught.value.temporary
    assert caught.value.code == 535
    assert caught.value.__cause__ is not None
    assert server.received() == []


async def test_server_down_is_temporary_and_the_mail_arrives_after_it_returns(
    server: SmtpTestServer, certs: tuple[Path, Path, Path]
) -> None:
    """An outbox-style loop: try, back off by next_attempt, try again; the same message arrives once."""
    sender = sender_for(server, certs[0])
    message = parse_message(alert("episode:7:opened").as_bytes())  # as an outbox stores it
    server.stop()
    with pytest.raises(MailError) as caught:
        await sender.send(message, [PHYSIO])
    assert caught.value.temporary

    async def bring_back() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)

    returning = asyncio.create_task(bring_back())
    attempts, failures = 0, 0
    rng = random.Random(1)
    while True:
        attempts += 1
        try:
            await sender.send(message, [PHYSIO])
            break
        except MailError as error:
            assert error.temporary, error
            failures += 1
            await asyncio.sleep(next_attempt(failures, first_s=0.2, max_s=0.5, rng=rng))
    await returning
    [got] = await server.wait_for_async(1)
    assert failures >= 1 and attempts == failures + 1
    assert got.message["Message-ID"] == message["Message-ID"]
    assert got.message["Subject"] == "[URGENT] Boot over-pressure: PT-57EEBB (demo-clinic)"


@pytest.mark.parametrize(("reply", "temporary"), [("451 4.3.0 Mailbox busy, try later", True),
                                                   ("550 5.1.1 No such user", False)])  # fmt: skip
async def test_refused_recipient(server: SmtpTestServer, certs: tuple[Path, Path, Path], reply: str,
                                 temporary: bool) -> None:  # fmt: skip
    server.reject_rcpt.append(reply)
    with pytest.raises(MailError) as caught:
        await sender_for(server, certs[0]).send(alert(), [PHYSIO])
    assert caught.value.temporary is temporary
    assert caught.value.code == int(reply[:3])


async def test_untrusted_certificate_is_refused(server: SmtpTestServer, tmp_path: Path) -> None:
    other_ca, _, _ = make_certificates(tmp_path)  # trusts a CA that did not sign the server's certificate
    with pytest.raises(MailError) as caught:
        await sender_for(server, other_ca).send(alert(), [PHYSIO])
    assert not caught.value.temporary
    assert "certificate" in str(caught.value)
    assert server.received() == []


async def test_required_starttls_is_never_skipped(certs: tuple[Path, Path, Path]) -> None:
    with SmtpTestServer(tls="off") as plain:
        sender = SmtpSender(plain.host, plain.port, tls="starttls", ca_file=certs[0], timeout_s=5.0)
        with pytest.raises(MailError) as caught:
            await sender.send(alert(), [PHYSIO])
        assert not caught.value.temporary
        assert plain.received() == []
        # "optional" sends in the clear when the server offers no STARTTLS (a local catcher), without credentials
        await SmtpSender(plain.host, plain.port, tls="optional", timeout_s=5.0).send(alert(), [PHYSIO])
        [got] = await plain.wait_for_async(1)
        assert not got.tls and got.login is None


async def test_implicit_tls(certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    with SmtpTestServer(tls="implicit", cert=cert, key=key, users={USER: PASSWORD}) as implicit:
        sender = SmtpSender(implicit.host, implicit.port, tls="implicit", username=USER, password=PASSWORD,
                            ca_file=ca, timeout_s=5.0)  # fmt: skip
        await sender.send(alert(), [PHYSIO])
        [got] = await implicit.wait_for_async(1)
        assert got.login == USER


async def test_a_server_that_never_answers_times_out_as_temporary() -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        sender = SmtpSender("127.0.0.1", port, tls="optional", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(MailError) as caught:
            await sender.send(alert(), [PHYSIO])
        assert caught.value.temporary
        assert time.monotonic() - started < 3


def test_credentials_are_never_sent_in_the_clear() -> None:
    with pytest.raises(ValueError, match="TLS"):
        SmtpSender("127.0.0.1", 25, tls="off", username=USER, password=PASSWORD)


async def test_demo_mail_catcher_keeps_each_mail_as_an_eml_file(tmp_path: Path) -> None:
    catcher = start_mailcatcher(tmp_path)
    try:
        sender = SmtpSender(catcher.host, catcher.port, tls="off", timeout_s=5.0, mail_from=SENDER)
        await sender.send(alert("episode:1:opened"), [PHYSIO])
        catcher.stop()
        catcher.start()  # numbering continues, files stay
        await sender.send(alert("episode:1:resolved"), [PHYSIO])
        first, second = catcher.messages()
    finally:
        catcher.stop()
    assert [first.path.name[:5], second.path.name[:5]] == ["0001-", "0002-"]
    assert first.sender == "monitor@clinic.example"
    assert first.recipients == ("physio1@demo-clinic.example",)
    assert first.subject == "[URGENT] Boot over-pressure: PT-57EEBB (demo-clinic)"
    stored = parse_message(second.path.read_bytes())
    assert stored["Message-ID"] == alert("episode:1:resolved")["Message-ID"]
    assert not list(catcher.folder.glob(".incoming-*"))


async def test_envelope_recipients_are_explicit(server: SmtpTestServer, certs: tuple[Path, Path, Path]) -> None:
    """Headers that name other addresses do not make them recipients; an address that is not one plain address is
    refused before RCPT TO, for good."""
    message = alert()
    message["Cc"] = "attacker@evil.example"
    message["Bcc"] = "attacker2@evil.example"
    await sender_for(server, certs[0]).send(message, [PHYSIO])
    [got] = await server.wait_for_async(1)
    assert got.rcpt_tos == (PHYSIO,)
    for bad in ("physio1@demo-clinic.example>, <attacker@evil.example", "cat,attacker@evil.example",
                "physio1@demo-clinic.example\r\nRCPT TO:<attacker@evil.example>", ""):  # fmt: skip
        with pytest.raises(MailError) as caught:
            await sender_for(server, certs[0]).send(alert(), [bad])
        assert not caught.value.temporary
    with pytest.raises(MailError):
        await sender_for(server, certs[0]).send(alert(), [])
    await asyncio.sleep(0.2)
    assert len(server.received()) == 1
