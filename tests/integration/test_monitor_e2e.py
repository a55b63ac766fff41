"""The monitor end to end: real InfluxDB, a real SMTP server (aiosmtpd), the registry and the state in SQLite files.

One small clinic's last ten local days are written straight to InfluxDB as
line protocol (the schema of ``docs/schema.md``, tagged with patient and
clinic as the ingester writes it), with the registry holding who is who:

- ``P-OK`` (Ann): a compliant sock; ``P-UNDER`` (Ann): under-use on days -5
  and -4, compliant again from day -3 (an episode that opens and resolves);
- ``P-LATE`` (Bob): under-use on days -2 and -1 (an episode open now);
- ``P-BOOT`` (Bob): a boot with an over-pressure sample today;
  ``P-PUMP`` (Ann): a boot whose over-pressure arrives between two checks;
- ``P-NOPHY``: no physio; ``P-NORX`` (Ann): a garment but no prescription;
  ``P-BADRX`` (Bob): a prescription missing its daily wear target.

The clinic's time zone is picked so that it is around midday there now,
so "today" has hours of data before the moment of evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from compression.influxql import rows
from compression.localservers import InfluxDB, free_port
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from monitor.app import Monitor
from monitor.settings import MonitorSettings
from monitor.state import Episode, Outbox, State
from tests.integration.conftest import ROOT
from tests.smtp import ReceivedMail, SmtpTestServer, _Handler

pytestmark = pytest.mark.integration

ANN, BOB = "ann@bow.example", "bob@bow.example"
PHYSIO_NAMES = {ANN: "Ann Physio", BOB: "Bob Physio"}
DISPLAY = {"P-OK": "Olivia Okafor", "P-UNDER": "Umberto Under", "P-LATE": "Laura Late", "P-BOOT": "Boris Boot",
           "P-PUMP": "Bea Boot", "P-NOPHY": "Nora Nophy", "P-NORX": "Norbert Norx", "P-BADRX": "Bad Rx"}  # fmt: skip
PHYSIO = {"P-OK": ANN, "P-UNDER": ANN, "P-PUMP": ANN, "P-NORX": ANN, "P-LATE": BOB, "P-BOOT": BOB, "P-BADRX": BOB,
          "P-NOPHY": None}  # fmt: skip
# Worn hours per day of each sock, by day offset (0 = today); 9 h meets the 8 h target, 3 h does not.
WEAR = {"P-OK": {}, "P-NOPHY": {}, "P-UNDER": {-5: 3, -4: 3}, "P-LATE": {-2: 3, -1: 3}}
DAYS = 12
BOOTS = {"P-BOOT", "P-PUMP"}
ZONE_CHOICES = ("Pacific/Kiritimati", "Pacific/Auckland", "Asia/Tokyo", "Asia/Kolkata", "Europe/Berlin",
                "America/Sao_Paulo", "America/Edmonton", "Pacific/Honolulu")  # fmt: skip
EXE = ROOT / ".venv" / "bin" / "compression"


def midday_zone(now: datetime) -> str:
    """The zone where it is closest to 13:00 now."""

    def distance(tz: str) -> float:
        local = now.astimezone(ZoneInfo(tz))
        return abs(local.hour + local.minute / 60 - 13)

    return min(ZONE_CHOICES, key=distance)


@dataclass
class World:
    influx_url: str
    database: str
    registry_url: str
    timezone: str
    now_ms: int  # "now" of the evaluations in this process (a little before the data was written)
    late_overpressure: str  # P-PUMP's over-pressure sample, written between an evaluation and a safety check
    tmp: Path


def receipts(lines: list[str]) -> list[str]:
    """The ingester's ``receipt`` points for these readings (one per clinic, patient and hour): what it writes with
    every stored message, and what tells the monitor the pipeline was working in those hours."""
    hours: dict[tuple[str, int], None] = {}
    for line in lines:
        if line.startswith(("sample,", "event,")) and ",patient=" in line:
            tags, _, rest = line.partition(" ")
            patient = tags.split(",patient=")[1].split(",")[0]
            hours[(patient, int(rest.rsplit(" ", 1)[1]) // 3_600_000_000_000 * 3_600_000_000_000)] = None
    now_ms = int(time.time() * 1000)
    return [f"receipt,clinic=bow,patient={p} received_ms={now_ms}i {hour}" for p, hour in hours]


def heartbeats(until: datetime, days: int = DAYS + 8) -> list[str]:
    """The ingester's heartbeat every 10 minutes for ``days`` up to ``until``: it was running, connected."""
    end = int(until.timestamp()) * 10**9
    step = 600 * 10**9
    return [f"ingest_health,ingester=ingest-e2e connected=true {t}" for t in range(end - days * 144 * step, end, step)]


def write_lines(url: str, database: str, lines: list[str]) -> None:
    lines = lines + receipts(lines)
    for i in range(0, len(lines), 5000):
        body = "\n".join(lines[i : i + 5000]).encode()
        request = urllib.request.Request(f"{url}/write?db={database}&precision=ns", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 204


def influx_query(url: str, database: str, q: str) -> None:
    params = urllib.parse.urlencode({"db": database, "q": q})
    with urllib.request.urlopen(urllib.request.Request(f"{url}/query?{params}", method="POST"), timeout=30):
        pass


def sock_lines(patient: str, device: str, day_start: datetime, hours: float, until_ns: int | None) -> list[str]:
    """Samples every 2 minutes from 06:00 local for ``hours`` (as the ingester stores them: worn_s 120 s)."""
    out = []
    first = day_start + timedelta(hours=6)
    for i in range(int(hours * 30)):
        t = int((first + timedelta(minutes=2 * i)).timestamp() * 1e9)
        if until_ns is not None and t > until_ns:
            break
        out.append(f"sample,clinic=bow,device={device},kind=sock,patient={patient} "
                   f"ankle_mmhg=25.0,calf_mmhg=20.0,worn=true,worn_s=120.0,seq={i}i {t}")  # fmt: skip
    return out


def boot_lines(patient: str, device: str, day_start: datetime) -> list[str]:
    """One 40-minute session at 06:00 local: start and end events, a sample a minute at 50 mmHg."""
    start = day_start + timedelta(hours=6)
    ns = int(start.timestamp() * 1e9)
    tags = f"clinic=bow,device={device},patient={patient}"
    out = [
        f'event,{tags},type=session_start count=1i,planned_s=2400i,program="standard",target_mmhg=50.0 {ns}',
        f'event,{tags},type=session_end count=1i,duration_s=2400i,reason="completed" {ns + 2400 * 10**9}',
    ]
    for i in range(40):
        out.append(f"sample,clinic=bow,device={device},kind=boot,patient={patient} "
                   f"ankle_mmhg=50.0,calf_mmhg=48.0,foot_mmhg=50.0,worn=true,worn_s=60.0,seq={i}i "
                   f"{ns + i * 60 * 10**9}")  # fmt: skip
    return out


def overpressure(patient: str, device: str, at: datetime) -> str:
    return (f"sample,clinic=bow,device={device},kind=boot,patient={patient} "
            f"ankle_mmhg=95.0,calf_mmhg=90.0,foot_mmhg=120.0,worn=true,worn_s=2.0,seq=999i "
            f"{int(at.timestamp() * 1e9)}")  # fmt: skip


def build_registry(path: Path, timezone: str, today: date, patients: dict[str, str | None]) -> str:
    """Clinic ``bow``, physios Ann and Bob, the patients, a garment each, prescriptions as described above."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(session_factory(engine))
    reg.create_clinic(SYSTEM, s.ClinicIn(code="bow", name="Bow Valley", timezone=timezone))
    for email, name in PHYSIO_NAMES.items():
        reg.create_physio(SYSTEM, s.PhysioIn(clinic="bow", name=name, email=email))
    since = datetime.now(UTC) - timedelta(days=40)
    for code, physio in patients.items():
        reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code=code, display_name=DISPLAY.get(code, code),
                                               physio=physio))  # fmt: skip
        kind = "boot" if code in BOOTS else "sock"
        device = device_of(code)
        reg.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic="bow", kind=kind))
        reg.assign(SYSTEM, s.AssignmentIn(device_id=device, patient=code, valid_from=since))
        if code == "P-NORX":
            continue
        valid = today - timedelta(days=30)
        if kind == "boot":
            reg.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="boot", valid_from=valid,
                                                   sessions_per_week=3, session_min_minutes=30,
                                                   session_max_minutes=60, max_chamber_mmhg=80))  # fmt: skip
        else:
            rx = reg.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="sock", valid_from=valid,
                                                        class_system="explicit", ankle_min_mmhg=20,
                                                        ankle_max_mmhg=30, wear_hours_per_day=8))  # fmt: skip
            if code == "P-BADRX":  # an old row the registry's checks never saw: its wear target is missing
                with contextlib.closing(sqlite3.connect(path)) as db, db:
                    db.execute("UPDATE prescriptions SET wear_hours_per_day = NULL WHERE id = ?", (rx.id,))
    engine.dispose()
    return url


def device_of(code: str) -> str:
    return "dev-" + code.lower().replace("p-", "")


@pytest.fixture(scope="module")
def world(influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> World:
    now = datetime.now(UTC)
    tz = midday_zone(now)
    zone = ZoneInfo(tz)
    local_now = now.astimezone(zone)
    today = local_now.date()
    tmp = tmp_path_factory.mktemp("monitor-e2e")
    registry = build_registry(tmp / "registry.db", tz, today, PHYSIO)
    database = f"t_monitor_e2e_{os.getpid()}_{int(time.time())}"
    influx_query(influx.url, database, f'CREATE DATABASE "{database}"')
    now_ns = int(now.timestamp() * 1e9)
    lines: list[str] = []
    for back in range(DAYS, -1, -1):
        day = today - timedelta(days=back)
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        until = now_ns - 60 * 10**9 if back == 0 else None
        for code, wear in WEAR.items():
            lines += sock_lines(code, device_of(code), start, wear.get(-back, 9), until)
        for code in sorted(BOOTS):
            lines += boot_lines(code, device_of(code), start)
    lines.append(overpressure("P-BOOT", device_of("P-BOOT"), now - timedelta(minutes=3)))
    write_lines(influx.url, database, lines + heartbeats(now))
    late = overpressure("P-PUMP", device_of("P-PUMP"), now - timedelta(minutes=2))
    return World(influx.url, database, registry, tz, int(now.timestamp() * 1000), late, tmp)


def settings(world: World, smtp: SmtpTestServer, state: Path, **extra: Any) -> MonitorSettings:
    values: dict[str, Any] = {
        "influx_url": world.influx_url, "influx_database": world.database,
        "registry_database_url": world.registry_url, "state_database_url": f"sqlite:///{state}",
        "days_back": 8, "interval_s": 2.0, "safety_interval_s": 1.0, "lease_s": 3.0,
        "smtp_host": "127.0.0.1", "smtp_port": smtp.port, "smtp_tls": "off", "smtp_timeout_s": 5.0,
        "mail_from": "Compression monitor <monitor@bow.example>", "digest_hour": 0, "log_format": "console",
    }  # fmt: skip
    values.update(extra)
    return MonitorSettings(**values)


# --- what arrived ----------------------------------------------------------------------------------------------------


def key_of(mail: ReceivedMail) -> str:
    return str(mail.message["X-Compression-Dedupe-Key"])


def texts(message: EmailMessage) -> str:
    """Every text part, decoded."""
    out = []
    for part in message.walk():
        if part.get_content_maintype() == "text":
            out.append(part.get_content())
    return "\n".join(out)


def summary(mails: list[ReceivedMail]) -> list[tuple[str, str, str]]:
    """(kind, patient or physio, recipient) of each episode e-mail, sorted; digests as ("digest", day, recipient)."""
    out = []
    for mail in mails:
        msg = mail.message
        key = key_of(mail)
        (rcpt,) = mail.rcpt_tos
        if key.startswith("digest:"):
            out.append(("digest", key.split(":")[1], rcpt))
        else:
            subject = str(msg["Subject"])
            patient = subject.split(": ", 1)[1].split(" (")[0]
            out.append((key.split(":")[0], f"{patient} {subject.split(']')[0].strip('[')}", rcpt))
    return sorted(out)


def assert_once_each(mails: list[ReceivedMail]) -> None:
    keys = Counter(key_of(m) for m in mails)
    ids = Counter(str(m.message["Message-ID"]) for m in mails)
    assert [k for k, n in keys.items() if n > 1] == [], "an e-mail arrived twice"
    assert [k for k, n in ids.items() if n > 1] == []


def outbox(state_path: Path) -> list[tuple[str, bool]]:
    st = State(f"sqlite:///{state_path}")
    try:
        with st.transaction() as session:
            return sorted((o.dedupe_key, o.sent_at is not None) for o in session.scalars(select(Outbox)))
    finally:
        st.close()


# --- in process: episodes, e-mails, digest, bad input, SMTP outage, InfluxDB outage -------------------------------


async def test_episodes_mails_digest_and_bad_input(world: World, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    state_path = tmp_path / "monitor.db"
    with SmtpTestServer() as smtp:
        mon = Monitor(settings(world, smtp, state_path))
        three_days_ago = world.now_ms - 3 * 86_400_000
        # Three days ago: P-UNDER's under-use run is on (days -5, -4 complete).
        assert await mon.evaluate_once(now_ms=three_days_ago)
        assert await mon.send_due() == 1
        assert await mon.evaluate_once(now_ms=three_days_ago)  # re-evaluation: nothing new
        assert await mon.send_due() == 0
        # Now: P-UNDER resolved (days -3, -2 compliant), P-LATE under-use, P-BOOT's over-pressure today: the
        # evaluation opened that one itself (no safety check ran before it) and sent its e-mail at once.
        assert await mon.evaluate_once(now_ms=world.now_ms)
        subjects = [str(m.message["Subject"]) for m in smtp.received()]
        assert len(subjects) == 2 and "P-UNDER" in subjects[0] and "P-BOOT" in subjects[1], subjects
        # P-PUMP's over-pressure arrives; the next safety check (not a full evaluation) opens it and sends its
        # e-mail at once, ahead of the two the evaluation queued.
        write_lines(world.influx_url, world.database, [world.late_overpressure])
        assert await mon.safety_once(now_ms=world.now_ms) == 1
        assert [m for m in smtp.received() if "P-PUMP" in str(m.message["Subject"])]
        assert await mon.send_due() == 2
        for _ in range(2):  # re-evaluations and checks send nothing new
            assert await mon.evaluate_once(now_ms=world.now_ms)
            await mon.safety_once(now_ms=world.now_ms)
        assert await mon.send_due() == 0
        episodes = smtp.received()
        assert summary(episodes) == [
            ("opened", "P-BOOT URGENT", BOB), ("opened", "P-LATE Warning", BOB), ("opened", "P-PUMP URGENT", ANN),
            ("opened", "P-UNDER Warning", ANN), ("resolved", "P-UNDER Resolved", ANN)]  # fmt: skip
        # Digest: once per physio per day, every patient of theirs and the clinic's patient without a physio.
        assert await mon.digest_if_due() == 2
        assert await mon.digest_if_due() == 0
        assert await mon.send_due() == 2
        mails = smtp.received()
        assert_once_each(mails)
        digests = {m.rcpt_tos[0]: m.message for m in mails if key_of(m).startswith("digest:")}
        assert sorted(digests) == [ANN, BOB]
        for physio, msg in digests.items():
            body = texts(msg)
            mine = [p for p, ph in PHYSIO.items() if ph == physio] + ["P-NOPHY"]
            assert all(p in body for p in mine), (physio, body)
            others = [p for p, ph in PHYSIO.items() if ph not in (physio, None)]
            assert not any(p in body for p in others), (physio, body)
            assert f"{len(mine)} patients" in str(msg["Subject"])
            assert "no responsible physio" in body
        assert "no current prescription" in texts(digests[ANN])
        assert "wear_hours_per_day is missing" in texts(digests[BOB])
        # Subjects name the flag and the code; no patient's display name anywhere.
        subjects = sorted(str(m.message["Subject"]) for m in mails if not key_of(m).startswith("digest:"))
        assert subjects[0].startswith("[Warning] Under-use: P-LATE (bow)") or "Under" in subjects[0], subjects
        for mail in mails:
            raw = mail.raw.decode(errors="replace") + texts(mail.message)
            assert not [name for name in DISPLAY.values() if name in raw]
        # Bad input: a clear log line naming the patient and the problem; nothing crashed.
        logged = caplog.text
        assert "P-NOPHY (bow): no responsible physio" in logged
        assert "P-NORX (bow): no current prescription" in logged
        assert "P-BADRX (bow): prescription #" in logged and "wear_hours_per_day is missing" in logged
        st = State(f"sqlite:///{state_path}")
        with st.transaction() as session:
            got = sorted((e.patient, e.flag, e.end_day is None, e.notified) for e in session.scalars(select(Episode)))
        st.close()
        assert got == [("P-BOOT", "boot_overpressure", True, True), ("P-LATE", "under_use", True, True),
                       ("P-PUMP", "boot_overpressure", True, True), ("P-UNDER", "under_use", False, True)]  # fmt: skip

        # InfluxDB unreadable: nothing evaluated, no episode changes, no e-mail.
        dead = Monitor(settings(world, smtp, state_path, influx_url=f"http://127.0.0.1:{free_port()}"))
        assert not await dead.evaluate_once()
        dead._contexts, dead._results = mon._contexts, mon._results
        await dead.safety_once()
        assert dead.counters.skipped_unreadable == 1 and dead.counters.opened == dead.counters.resolved == 0
        assert await dead.send_due() == 0
        st = State(f"sqlite:///{state_path}")
        with st.transaction() as session:
            assert session.scalar(select(func.count()).select_from(Episode)) == 4
            assert session.scalar(select(func.count()).select_from(Outbox)) == 7
        st.close()


async def test_smtp_down_then_back_every_mail_arrives_once(world: World, tmp_path: Path) -> None:
    write_lines(world.influx_url, world.database, [world.late_overpressure])
    state_path = tmp_path / "monitor.db"
    with SmtpTestServer() as smtp:
        mon = Monitor(settings(world, smtp, state_path, digest_hour=23, smtp_timeout_s=2.0))
        smtp.stop()  # connection refused from now on
        assert await mon.evaluate_once(now_ms=world.now_ms)
        for _ in range(4):  # each round tries one e-mail, finds the server away and leaves the rest queued
            assert await mon.send_due() == 0
        assert mon.counters.retries == 3 and mon.counters.failed == 0
        queued = outbox(state_path)
        assert [k.split(":")[0] for k, _ in queued] == ["opened"] * 3 and not any(sent for _, sent in queued)
        smtp.start()
        deadline = time.monotonic() + 20  # the first retry comes 4-6 s after the failure
        while len(smtp.received()) < 3 and time.monotonic() < deadline:
            await mon.send_due()
            await asyncio.sleep(0.2)
        mails = smtp.received()
        assert_once_each(mails)
        assert sorted(key_of(m).split(":")[0] for m in mails) == ["opened"] * 3
        assert summary(mails) == [("opened", "P-BOOT URGENT", BOB), ("opened", "P-LATE Warning", BOB),
                                  ("opened", "P-PUMP URGENT", ANN)]  # fmt: skip
        assert [sent for _, sent in outbox(state_path)] == [True] * 3


async def test_ingest_gap_opens_no_silence_storm(world: World, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """One garment silent: its episode opens. Then the pipeline stops (nothing stored from anyone, no heartbeat from
    an ingester): an outage, no silence alerts."""
    caplog.set_level(logging.WARNING)
    zone = ZoneInfo(world.timezone)
    now = datetime.fromtimestamp(world.now_ms / 1000, UTC)
    today = now.astimezone(zone).date()
    gap = {f"G-{i}": ANN for i in range(1, 5)}
    registry = build_registry(tmp_path / "registry.db", world.timezone, today, gap)
    lines: list[str] = []
    for back in range(DAYS, -1, -1):
        day = today - timedelta(days=back)
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        for code in gap:
            if code != "G-4" or back > 2:  # G-4's data stops three days ago
                lines += sock_lines(code, device_of(code), start, 9, int(now.timestamp() * 1e9) - 60 * 10**9)
    database = world.database + "_gap"
    influx_query(world.influx_url, database, f'CREATE DATABASE "{database}"')
    write_lines(world.influx_url, database, lines + heartbeats(now))  # then the ingester stops too
    gap_world = World(world.influx_url, database, registry, world.timezone, world.now_ms, "", tmp_path)
    with SmtpTestServer() as smtp:
        mon = Monitor(settings(gap_world, smtp, tmp_path / "monitor.db", digest_hour=23))
        assert await mon.evaluate_once(now_ms=world.now_ms)
        assert await mon.send_due() == 1
        assert summary(smtp.received()) == [("opened", "G-4 Warning", ANN)]
        # Two days on, nothing has arrived from anyone: an ingest or database gap, not four patients at once.
        later = world.now_ms + 2 * 86_400_000
        for _ in range(2):
            assert await mon.evaluate_once(now_ms=later)
        assert await mon.send_due() == 0
        assert "silence held back for 4 patient(s): the pipeline was down" in caplog.text
        st = State(f"sqlite:///{tmp_path / 'monitor.db'}")
        with st.transaction() as session:
            assert [(e.patient, e.flag, e.open_key is not None) for e in session.scalars(select(Episode))] == [
                ("G-4", "silent", True)]  # fmt: skip
        st.close()


async def test_seven_of_twelve_silent_with_a_working_pipeline_are_each_reported(world: World, tmp_path: Path) -> None:
    """A small clinic where seven of twelve stopped sending three days ago (holidays, a lost charger) while the
    others' readings kept arriving: the pipeline works, so each of the seven is reported."""
    zone = ZoneInfo(world.timezone)
    now = datetime.fromtimestamp(world.now_ms / 1000, UTC)
    today = now.astimezone(zone).date()
    clinic = {f"S-{i:02d}": ANN for i in range(1, 13)}
    quiet = {f"S-{i:02d}" for i in range(1, 8)}
    registry = build_registry(tmp_path / "registry.db", world.timezone, today, clinic)
    lines: list[str] = []
    for back in range(DAYS, -1, -1):
        day = today - timedelta(days=back)
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        for code in clinic:
            if code not in quiet or back > 2:
                lines += sock_lines(code, device_of(code), start, 9, int(now.timestamp() * 1e9) - 60 * 10**9)
    database = world.database + "_small"
    influx_query(world.influx_url, database, f'CREATE DATABASE "{database}"')
    write_lines(world.influx_url, database, lines + heartbeats(now))
    small = World(world.influx_url, database, registry, world.timezone, world.now_ms, "", tmp_path)
    with SmtpTestServer() as smtp:
        mon = Monitor(settings(small, smtp, tmp_path / "monitor.db", digest_hour=23))
        assert await mon.evaluate_once(now_ms=world.now_ms)
        await mon.send_due()
        assert summary(smtp.received()) == [("opened", f"{code} Warning", ANN) for code in sorted(quiet)]
        assert mon.counters.opened == 7


async def test_a_reattribution_asked_through_the_api_is_carried_out_by_the_monitor(world: World,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    """A garment that sent for three days before its assignment was recorded: its readings are unassigned and the
    patient's first days silent. Asked through the API (the registry service), the monitor rewrites the readings,
    marks the request done, and judges those days on them."""
    zone = ZoneInfo(world.timezone)
    now = datetime.fromtimestamp(world.now_ms / 1000, UTC)
    today = now.astimezone(zone).date()
    registry = build_registry(tmp_path / "registry.db", world.timezone, today, {"L-1": ANN})
    lines: list[str] = []
    starts = {}
    for back in range(DAYS, -1, -1):
        day = today - timedelta(days=back)
        starts[back] = start = datetime(day.year, day.month, day.day, tzinfo=zone)
        day_lines = sock_lines("L-1", device_of("L-1"), start, 9, int(now.timestamp() * 1e9) - 60 * 10**9)
        if 3 <= back <= 5:  # stored before the assignment was recorded: no patient, "unassigned"
            day_lines = [ln.replace(",patient=L-1", "").replace("clinic=bow,", "attribution=unassigned,")
                         for ln in day_lines]  # fmt: skip
        lines += day_lines
    database = world.database + "_late"
    influx_query(world.influx_url, database, f'CREATE DATABASE "{database}"')
    write_lines(world.influx_url, database, lines + heartbeats(now))
    late = World(world.influx_url, database, registry, world.timezone, world.now_ms, "", tmp_path)
    with SmtpTestServer() as smtp:
        mon = Monitor(settings(late, smtp, tmp_path / "monitor.db", digest_hour=23))
        assert await mon.evaluate_once(now_ms=world.now_ms)
        flags = {r.stats.day: r.flags for r in mon._results["L-1"]}
        assert [flags[today - timedelta(days=b)] for b in (5, 4, 3)] == [("silent",)] * 3
        engine = make_engine(registry)
        reg = Registry(session_factory(engine))
        row = reg.request_reattribution(SYSTEM, s.ReattributionIn(
            device_id=device_of("L-1"), patient="L-1", valid_from=starts[5], valid_to=starts[2]))  # fmt: skip
        assert await mon.evaluate_once(now_ms=world.now_ms)
        flags = {r.stats.day: r.flags for r in mon._results["L-1"]}
        assert [flags[today - timedelta(days=b)] for b in (5, 4, 3)] == [("compliant",)] * 3
        (done,) = reg.list_reattributions(SYSTEM)
        assert (done.id, done.state, done.points) == (row.id, "done", 3 * 9 * 30)
        engine.dispose()
    left = rows(world.influx_url, database, "SELECT count(worn) FROM sample WHERE attribution = 'unassigned'")
    assert left == []


# --- subprocesses: kill -9 and restart; two replicas ------------------------------------------------------------


@dataclass
class HoldingSmtp(SmtpTestServer):
    """An SMTP server that holds the DATA of message number ``hold_at`` (0-based) until released, then refuses it
    (451, nothing recorded) or, with ``accept_held``, takes it."""

    hold_at: int | None = None
    accept_held: bool = False
    holding: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        super().start()
        assert self._controller is not None
        self._controller.handler = _Holding(self)


@dataclass
class _Holding(_Handler):
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        owner = self.server
        assert isinstance(owner, HoldingSmtp)
        if owner.hold_at is not None and len(owner.received()) == owner.hold_at and not owner.holding.is_set():
            owner.holding.set()
            while not owner.released.is_set():
                await asyncio.sleep(0.02)
            if not owner.accept_held:
                return "451 4.3.0 held and dropped by the test"
        return await super().handle_DATA(server, session, envelope)


EXPECTED_NOW = [("digest", "ann@bow.example", ANN), ("digest", "bob@bow.example", BOB),
                ("opened", "P-BOOT URGENT", BOB), ("opened", "P-LATE Warning", BOB),
                ("opened", "P-PUMP URGENT", ANN)]  # fmt: skip


class MonitorProcess:
    """``compression monitor`` as a child process, configured by COMPRESSION_MONITOR_* variables."""

    def __init__(self, values: MonitorSettings, log_path: Path, replica: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSION_")}
        for name, value in values.model_dump().items():
            if value is not None:
                text = str(value).lower() if isinstance(value, bool) else str(value)
                env[f"COMPRESSION_MONITOR_{name.upper()}"] = text
        env["COMPRESSION_MONITOR_REPLICA_ID"] = replica
        env["COMPRESSION_MONITOR_WRITE_FLAGS"] = "false"
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(EXE), "monitor"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=log_path.parent)  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def wait_until(predicate: Any, timeout: float, what: str, procs: list[MonitorProcess] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.proc.poll() is None, f"monitor exited: {p.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: " + "\n".join(p.log() for p in procs)
        time.sleep(0.05)


def lease_holder(state_path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(state_path)) as db:
        row = db.execute("SELECT holder FROM leases WHERE name = 'monitor'").fetchone()
    return None if row is None else str(row[0])


def claimed_by(state_path: Path) -> dict[str, str | None]:
    with contextlib.closing(sqlite3.connect(state_path)) as db:
        return {k: c for k, c in db.execute("SELECT dedupe_key, claimed_by FROM outbox WHERE sent_at IS NOT NULL")}


def test_kill_9_mid_run_and_restart_sends_each_mail_once(world: World, tmp_path: Path) -> None:
    write_lines(world.influx_url, world.database, [world.late_overpressure])
    state_path = tmp_path / "monitor.db"
    with HoldingSmtp(hold_at=2) as smtp:
        values = settings(world, smtp, state_path, smtp_timeout_s=2.0)
        first = MonitorProcess(values, tmp_path / "first.log", "first")
        try:
            wait_until(smtp.holding.is_set, 40, "two e-mails sent and the third on its way", [first])
            first.kill()  # kill -9 while the third e-mail is in flight
        finally:
            if first.proc.poll() is None:
                first.kill()
            smtp.released.set()
        assert len(smtp.received()) == 2
        sent = [sent for _, sent in outbox(state_path)]
        # The safety checks queue (and send) the urgent e-mails while the evaluation runs, so how many others were
        # queued at the kill depends on timing; what follows must send each of them exactly once.
        assert sent.count(True) == 2 and 3 <= len(sent) <= len(EXPECTED_NOW)
        second = MonitorProcess(values, tmp_path / "second.log", "second")
        try:
            wait_until(lambda: len(smtp.received()) >= len(EXPECTED_NOW), 40, "the rest of the e-mails", [second])
            time.sleep(2.5)  # a few more rounds of the restarted monitor: nothing more
            assert second.terminate() == 0
        finally:
            if second.proc.poll() is None:
                second.kill()
        mails = smtp.received()
        assert_once_each(mails)
        assert summary(mails) == EXPECTED_NOW
        assert all(sent for _, sent in outbox(state_path))
        assert sorted(set(claimed_by(state_path).values())) == ["first", "second"]


def test_two_replicas_send_each_mail_once_and_hand_over(world: World, tmp_path: Path) -> None:
    write_lines(world.influx_url, world.database, [world.late_overpressure])
    state_path = tmp_path / "monitor.db"
    with HoldingSmtp(hold_at=3, accept_held=True) as smtp:
        # A lease longer than a slow first round, so it moves only when its holder is stopped.
        values = settings(world, smtp, state_path, smtp_timeout_s=10.0, lease_s=8.0)
        procs = {name: MonitorProcess(values, tmp_path / f"{name}.log", name) for name in ("rep-a", "rep-b")}
        try:
            wait_until(smtp.holding.is_set, 40, "three e-mails sent and the fourth on its way", list(procs.values()))
            holder = lease_holder(state_path)
            assert holder in procs
            other = next(name for name in procs if name != holder)
            procs[holder].proc.send_signal(signal.SIGTERM)  # stop the holder mid-send: it finishes that e-mail
            smtp.released.set()
            assert procs[holder].proc.wait(30) == 0
            wait_until(lambda: len(smtp.received()) >= len(EXPECTED_NOW), 30, "the other replica's e-mails",
                       [procs[other]])  # fmt: skip
            assert lease_holder(state_path) == other
            time.sleep(2.5)
            assert procs[other].terminate() == 0
        finally:
            for p in procs.values():
                if p.proc.poll() is None:
                    p.kill()
        mails = smtp.received()
        assert_once_each(mails)
        assert summary(mails) == EXPECTED_NOW
        by = claimed_by(state_path)
        assert set(by.values()) == {holder, other}, by  # both worked, one after the other
