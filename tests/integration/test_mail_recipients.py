"""Hostile physio records in the registry cannot add recipients or break e-mails (issue 10, finding 4).

Through the real monitor, a real InfluxDB and a real SMTP server (aiosmtpd): three physios of one clinic, each
responsible for a boot whose chamber goes over the prescribed maximum today (an urgent e-mail at once), then the
daily digest:

- Ann's display name carries an address: ``Eve <attacker@evil.example>, Ann``;
- Bob's display name carries a CR/LF and a header: ``Bob\\r\\nBcc: attacker@evil.example`` (written straight into
  the registry's table, like an old row its checks never saw);
- Cat's e-mail address itself smuggles a second address: ``cat,attacker@evil.example`` (the registry refuses it
  today; written straight into its table too, like a row from before that check).

The attacker's address receives nothing, in no envelope and in no header; Ann and Bob receive their urgent e-mail
and their digest; Cat's record is refused where it enters the monitor and shows as a registry problem (counted,
logged once, in the ``registry_problem`` points and in the other physios' digests), and nothing else is held up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from email.headerregistry import AddressHeader
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from monitor.app import Monitor
from monitor.mail import DigestMail, DigestRow
from tests.integration.test_monitor_e2e import (
    World,
    boot_lines,
    influx_query,
    midday_zone,
    overpressure,
    settings,
    texts,
    write_lines,
)
from tests.smtp import ReceivedMail, SmtpTestServer

pytestmark = pytest.mark.integration

ATTACKER = "attacker@evil.example"
ANN, BOB, CAT = "ann@bow.example", "bob@bow.example", "cat,attacker@evil.example"
# What the registry's checks let in; the rows are then changed behind their back (build()).
ADMITTED = {CAT: "cat@bow.example"}
NAMES = {ANN: f"Eve <{ATTACKER}>, Ann", BOB: f"Bob\r\nBcc: {ATTACKER}", CAT: "Cat"}
PATIENTS = {"P-ANN": ANN, "P-BOB": BOB, "P-CAT": CAT}


def build(path: Path, timezone: str) -> str:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(session_factory(engine))
    reg.create_clinic(SYSTEM, s.ClinicIn(code="bow", name="Bow Valley", timezone=timezone))
    for email in NAMES:
        reg.create_physio(SYSTEM, s.PhysioIn(clinic="bow", name="placeholder", email=ADMITTED.get(email, email)))
    since = datetime.now(UTC) - timedelta(days=40)
    today = datetime.now(UTC).astimezone(ZoneInfo(timezone)).date()
    for code, physio in PATIENTS.items():
        device = "dev-" + code.lower()
        reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code=code, physio=ADMITTED.get(physio, physio)))
        reg.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic="bow", kind="boot"))
        reg.assign(SYSTEM, s.AssignmentIn(device_id=device, patient=code, valid_from=since))
        reg.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="boot", valid_from=today - timedelta(days=30),
                                               sessions_per_week=3, session_min_minutes=30, session_max_minutes=60,
                                               max_chamber_mmhg=80))  # fmt: skip
    engine.dispose()
    # The names as a registry user (or an old row) left them, whatever the registry's checks say today.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for hostile, admitted in ADMITTED.items():
            db.execute("UPDATE physios SET email = ? WHERE email = ?", (hostile, admitted))
        for email, name in NAMES.items():
            db.execute("UPDATE physios SET name = ? WHERE email = ?", (name, email))
    return url


def envelope_and_header_addresses(mail: ReceivedMail) -> set[str]:
    """Every address the message went to or names as a recipient (envelope, To, Cc, Bcc)."""
    found = set(mail.rcpt_tos)
    for name in ("To", "Cc", "Bcc"):
        for header in mail.message.get_all(name, []):
            assert isinstance(header, AddressHeader)
            found |= {a.addr_spec for a in header.addresses}
    return found


async def test_hostile_physio_names_add_no_recipient_and_break_no_mail(
    influx: InfluxDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    now = datetime.now(UTC)
    tz = midday_zone(now)
    zone = ZoneInfo(tz)
    today = now.astimezone(zone).date()
    registry = build(tmp_path / "registry.db", tz)
    database = f"t_mail_recipients_{os.getpid()}_{int(time.time())}"
    influx_query(influx.url, database, f'CREATE DATABASE "{database}"')
    lines: list[str] = []
    for code in PATIENTS:
        device = "dev-" + code.lower()
        for back in range(3, -1, -1):
            day = today - timedelta(days=back)
            lines += boot_lines(code, device, datetime(day.year, day.month, day.day, tzinfo=zone))
        lines.append(overpressure(code, device, now - timedelta(minutes=3)))
    write_lines(influx.url, database, lines)
    world = World(influx.url, database, registry, tz, int(now.timestamp() * 1000), "", tmp_path)

    with SmtpTestServer() as smtp:
        mon = Monitor(settings(world, smtp, tmp_path / "monitor.db"))
        assert await mon.evaluate_once(now_ms=world.now_ms)
        await mon.send_due()
        assert await mon.digest_if_due() >= 2
        await mon.send_due()
        mails = smtp.received()

        reached = set().union(*(envelope_and_header_addresses(m) for m in mails)) if mails else set()
        assert ATTACKER not in reached, "a display name or an address field added the attacker as a recipient"
        assert not [m for m in mails if ATTACKER in m.rcpt_tos]
        assert reached <= {ANN, BOB}, reached

        def kinds(rcpt: str) -> list[str]:
            return sorted(str(m.message["X-Compression-Dedupe-Key"]).split(":")[0] for m in mails
                          if m.rcpt_tos == (rcpt,))  # fmt: skip

        assert "opened" in kinds(ANN) and "digest" in kinds(ANN), "Ann gets her urgent e-mail and her digest"
        assert "opened" in kinds(BOB) and "digest" in kinds(BOB), "a CR/LF in a name does not stop Bob's e-mails"
        for mail in mails:
            msg = mail.message
            assert msg.get_all("Bcc") is None and msg.get_all("Cc") is None
            (to,) = msg.get_all("To")
            assert [a.addr_spec for a in to.addresses] == list(mail.rcpt_tos), "To names exactly the envelope"
        urgent_bob = next(m for m in mails if m.rcpt_tos == (BOB,) and "URGENT" in str(m.message["Subject"]))
        assert "Dear Bob" in texts(urgent_bob.message)
        assert mon.counters.failed == 0, "no e-mail failed for good"

        # Cat's unusable address: refused where it enters, shown to the clinic, logged once.
        cat_problems = mon.counters.problems.get("P-CAT", ())
        assert any("e-mail address" in p for p in cat_problems), mon.counters.problems
        stored = rows(influx.url, database, "SELECT problems FROM registry_problem WHERE patient = 'P-CAT'")
        assert stored and "e-mail address" in str(stored[-1]["problems"])
        assert any("P-CAT" in texts(m.message) and "e-mail address" in texts(m.message) for m in mails
                   if str(m.message["X-Compression-Dedupe-Key"]).startswith("digest:"))  # fmt: skip
        assert await mon.evaluate_once(now_ms=world.now_ms)
        assert caplog.text.count("P-CAT (bow):") == 1, "one log line per cause, not one per evaluation"


async def test_a_recipient_refused_for_good_is_counted_logged_once_and_shown(
    influx: InfluxDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """550 for every e-mail to one physio: each counted and kept as failed, one log line for the cause, a problem
    on their patients; the other physio's e-mail goes out between them; the next accepted e-mail clears it."""
    caplog.set_level(logging.INFO)
    now = datetime.now(UTC)
    tz = midday_zone(now)
    registry = build(tmp_path / "registry.db", tz)
    database = f"t_mail_refused_{os.getpid()}_{int(time.time())}"
    influx_query(influx.url, database, f'CREATE DATABASE "{database}"')
    world = World(influx.url, database, registry, tz, int(now.timestamp() * 1000), "", tmp_path)

    def queue(key: str, physio: str) -> None:
        mail = DigestMail(key, physio, "bow", tz, now.date(), (DigestRow("P-ANN", "boot", 7),), physio_name=None)
        assert mon._enqueue(key, "digest", physio, {"mail": msgspec.to_builtins(mail)})

    with SmtpTestServer() as smtp:
        mon = Monitor(settings(world, smtp, tmp_path / "monitor.db", digest_hour=23))
        for i in range(3):
            queue(f"test:{i}:ann", ANN)
        queue("test:bob", BOB)
        smtp.reject_rcpt = ["550 5.1.1 no such mailbox"] * 3
        assert await mon.send_due() == 1, "Bob's e-mail goes out; Ann's three fail for good"
        assert [m.rcpt_tos for m in smtp.received()] == [(BOB,)]
        assert mon.counters.failed == 3
        assert caplog.text.count(f"e-mails to {ANN} fail for good") == 1, "one log line per recipient and cause"
        assert await mon.evaluate_once(now_ms=world.now_ms)
        assert any("fail for good" in p and "550" in p for p in mon.counters.problems["P-ANN"])
        stored = rows(influx.url, database, "SELECT problems FROM registry_problem WHERE patient = 'P-ANN'")
        assert stored and "fail for good" in str(stored[-1]["problems"])
        queue("test:3:ann", ANN)
        assert await mon.send_due() == 1
        assert ANN not in mon.counters.undeliverable
        assert await mon.evaluate_once(now_ms=world.now_ms)
        assert "P-ANN" not in mon.counters.problems
