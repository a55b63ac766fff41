"""Alert e-mails as composed: MIME structure, inline chart, links, Message-ID, words, no names; the retry schedule."""

from __future__ import annotations

import dataclasses
import random
import re
import struct
import time
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage

import aiosmtplib
import msgspec
import pytest

from monitor.mail import (
    CHART_SIZE_PX,
    FLAG_EXPLANATION,
    FLAG_TITLE,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    ChartSeries,
    DigestMail,
    DigestRow,
    EpisodeMail,
    classify,
    compose_digest,
    compose_episode,
    dashboard_link,
    message_id,
    next_attempt,
    parse_message,
    render_chart,
)
from monitor.model import SEVERITY, PatientContext, SockRx
from monitor.recipients import MAX_DISPLAY_NAME, AddressError, checked_address

SENDER = "Compression monitor <monitor@clinic.example>"
DASHBOARD = "https://grafana.clinic.example/"
DISPLAY_NAME = "Margaret Thornbury-Example"  # what the registry may hold for PT-96965D, never in an e-mail
DAYS = tuple(date(2025, 11, 1) + timedelta(days=i) for i in range(14))


def sock_chart(shift: float = 0.0) -> ChartSeries:
    wear = (8.5, 9.1, None, 4.2, 7.9, 10.0, 8.8, 9.2, 3.1, 8.4, 8.0, 9.9, 7.2, 8.6)
    ankle = (27.8, 27.5, None, 26.9, 26.0, 25.8, 25.1, 24.9, 24.0, 23.9, 23.1, 22.8, 22.5, 22.0)
    return ChartSeries(DAYS, wear, 8.0, tuple(None if a is None else a + shift for a in ankle), 23.0, 32.0)


CONTEXT = PatientContext(patient="PT-96965D", clinic="demo-clinic", timezone="America/Edmonton", kind="sock",
                         rx=SockRx(23.0, 32.0, 8.0, 7, ("ankle", "calf")), physio_email="physio1@demo-clinic.example",
                         physio_name="Alex Physio")  # fmt: skip
REGISTRY_PATIENT = {"code": "PT-96965D", "display_name": DISPLAY_NAME}


def episode(kind: str = "opened", key: str = "episode:12:opened", **changes: object) -> EpisodeMail:
    base = EpisodeMail(
        dedupe_key=key, kind="opened", patient=CONTEXT.patient, clinic=CONTEXT.clinic, timezone=CONTEXT.timezone,
        flag="rolled_down", severity=SEVERITY["rolled_down"], started_at=datetime(2025, 11, 8, 7, 0, tzinfo=UTC),
        physio_email=CONTEXT.physio_email or "", physio_name=CONTEXT.physio_name,
        summary=("2025-11-08: 95 min of wear with calf above ankle",), chart=sock_chart(),
    )  # fmt: skip
    if kind == "resolved":
        base = dataclasses.replace(base, kind="resolved", ended_at=datetime(2025, 11, 11, 7, 0, tzinfo=UTC),
                                   thread_key="episode:12:opened")  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def compose(mail: EpisodeMail) -> EmailMessage:
    return compose_episode(mail, sender=SENDER, dashboard_url=DASHBOARD)


def texts(msg: EmailMessage) -> dict[str, str]:
    """Decoded text parts by content type."""
    out: dict[str, str] = {}
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            assert isinstance(part, EmailMessage)
            out[part.get_content_type()] = part.get_content()
    return out


def pngs(msg: EmailMessage) -> list[EmailMessage]:
    return [p for p in msg.walk() if p.get_content_type() == "image/png"]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_episode_structure_text_html_and_inline_chart() -> None:
    msg = compose(episode())
    assert msg.get_content_type() == "multipart/alternative"
    top = list(msg.iter_parts())
    assert [p.get_content_type() for p in top] == ["text/plain", "multipart/related"]
    related = list(top[1].iter_parts())
    assert [p.get_content_type() for p in related] == ["text/html", "image/png"]
    html = texts(msg)["text/html"]
    [image] = pngs(msg)
    cid = image["Content-ID"].strip("<>")
    assert f"cid:{cid}" in html
    assert image.get_content_disposition() == "inline"
    data = image.get_payload(decode=True)
    assert isinstance(data, bytes)
    assert png_size(data) == CHART_SIZE_PX
    assert len(data) < 60_000


def test_subject_triage_and_flag_in_words() -> None:
    opened = compose(episode())
    assert opened["Subject"] == "[Warning] Rolled down: PT-96965D (demo-clinic)"
    urgent = compose(episode(flag="boot_overpressure", severity="critical", chart=None))
    assert urgent["Subject"] == "[URGENT] Boot over-pressure: PT-96965D (demo-clinic)"
    assert urgent["Importance"] == "high"
    assert "safety flag" in texts(urgent)["text/plain"]
    resolved = compose(episode("resolved", key="episode:12:resolved"))
    assert resolved["Subject"] == "[Resolved] Rolled down: PT-96965D (demo-clinic)"
    for part in texts(opened).values():
        assert "calf pressure above ankle pressure" in part and "30 minutes of wear" in part
    resolved_text = texts(resolved)["text/plain"]
    assert "Resolved:" in resolved_text and "Lasted:" in resolved_text and "3.0 days" in resolved_text
    # Flags judge whole local days: the first day flagged, not a midnight "start time" (the clinic's date).
    assert "First day: Sat 08 Nov 2025\n" in resolved_text and "00:00" not in resolved_text


def test_a_resolving_mail_says_what_shows_it_gone_or_that_the_prescription_changed() -> None:
    shown = compose(episode("resolved", key="episode:12:resolved", ended_reason="data",
                            evidence=("2025-11-10: worn 9.1 h, 0 min with calf above ankle",)))  # fmt: skip
    for part in texts(shown).values():
        assert "What shows it resolved" in part and "2025-11-10: worn 9.1 h, 0 min with calf above ankle" in part
    why = ("the prescription changed on 2025-11-10: wear target 8 h -> 4 h",)
    changed = compose(episode("resolved", key="episode:13:resolved", flag="under_use", ended_reason="prescription",
                              evidence=why))  # fmt: skip
    assert changed["Subject"] == "[Prescription changed] Under-use: PT-96965D (demo-clinic)"
    text = texts(changed)["text/plain"]
    assert "ended by a change of prescription, not by a change in wear" in text
    assert "Ended:" in text and "Resolved:" not in text and "wear target 8 h -> 4 h" in text


def test_dashboard_link_in_both_parts() -> None:
    link = "https://grafana.clinic.example/d/compression-patient/patient?var-patient=PT-96965D"
    assert dashboard_link(DASHBOARD, "PT-96965D") == link
    parts = texts(compose(episode()))
    assert link in parts["text/plain"]
    assert f'href="{link}"' in parts["text/html"]


def test_message_id_is_derived_from_the_dedupe_key() -> None:
    first = compose_episode(episode(), sender=SENDER, dashboard_url=DASHBOARD, now=datetime(2025, 11, 8, tzinfo=UTC))
    again = compose_episode(episode(), sender=SENDER, dashboard_url=DASHBOARD, now=datetime(2025, 11, 9, tzinfo=UTC))
    other = compose(episode(key="episode:13:opened"))
    assert first["Message-ID"] == again["Message-ID"] == message_id("episode:12:opened", SENDER)
    assert re.fullmatch(r"<[0-9a-f]{32}@clinic\.example>", first["Message-ID"])
    assert other["Message-ID"] != first["Message-ID"]
    assert first["X-Compression-Dedupe-Key"] == "episode:12:opened"
    resolved = compose(episode("resolved", key="episode:12:resolved"))
    assert resolved["In-Reply-To"] == first["Message-ID"]  # threads under the opening e-mail


def test_no_display_name_anywhere() -> None:
    """The registry's display name has no way in: no input field for it, and nothing of it in any part."""
    for cls in (EpisodeMail, DigestMail, DigestRow, ChartSeries):
        assert {f.name for f in dataclasses.fields(cls) if "name" in f.name} <= {"physio_name"}
    assert REGISTRY_PATIENT["code"] == CONTEXT.patient
    digest = compose_digest(digest_mail(), sender=SENDER, dashboard_url=DASHBOARD)
    for msg in (compose(episode()), compose(episode("resolved")), digest):
        raw = msg.as_bytes()
        decoded = " ".join(texts(msg).values())
        for needle in (DISPLAY_NAME, "Thornbury", "Margaret"):
            assert needle not in decoded and needle.encode() not in raw
        assert CONTEXT.patient in decoded


def test_html_escapes_its_inputs() -> None:
    msg = compose(episode(clinic="<b>clinic</b>", summary=("<script>alert(1)</script>",)))
    html = texts(msg)["text/html"]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>clinic</b>" not in html


@pytest.mark.parametrize("name", [
    "Eve <attacker@evil.example>, Ann", "Bob\r\nBcc: attacker@evil.example", "Bob\nTo: attacker@evil.example",
    '"attacker@evil.example" <attacker@evil.example>,', "=?utf-8?q?x?= <attacker@evil.example>", "Zo\u00eb \u202eevil",
    "x" * 5000, "\x00\x1b[31m", "attacker@evil.example", ";attacker@evil.example:", "\u2028Bcc: attacker@evil.example",
])  # fmt: skip
def test_hostile_physio_names_are_display_text_only(name: str) -> None:
    """Whatever the name, the composed message has exactly one recipient header naming exactly the physio."""
    for msg in (compose(episode(physio_name=name)),
                compose_digest(dataclasses.replace(digest_mail(), physio_name=name), sender=SENDER,
                               dashboard_url=DASHBOARD)):  # fmt: skip
        parsed = parse_message(msg.as_bytes())
        (to,) = parsed.get_all("To")
        assert [a.addr_spec for a in to.addresses] == ["physio1@demo-clinic.example"]
        assert parsed.get_all("Cc") is None and parsed.get_all("Bcc") is None
        assert len(str(to.addresses[0].display_name)) <= MAX_DISPLAY_NAME
        greeting = texts(parsed)["text/plain"].splitlines()[0]
        assert greeting.startswith(("Dear ", "Hello")) and not any(ord(c) < 32 for c in greeting)


@pytest.mark.parametrize(("address", "ok"), [
    ("physio1@demo-clinic.example", True), ("a.b+tag@sub.clinic.example", True), ("o'neil@x.example", True),
    ("cat,attacker@evil.example", False), ("a@b.example>, <attacker@evil.example", False), ("a b@x.example", False),
    ('"a"@x.example', False), ("a@x.example\n", False), ("a@x.example\r\nBcc: e@x.example", False), ("a@x", False),
    ("a..b@x.example", False), (".a@x.example", False), ("a@-x.example", False), ("a;b@x.example", False),
    ("a@b@x.example", False), ("j\u00fcrgen@x.example", False), ("a@x.example:25", False), ("", False),
    ("x" * 65 + "@x.example", False), ("a@" + "x" * 64 + ".example", False), ("<a@x.example>", False),
])  # fmt: skip
def test_only_plain_addresses_are_recipients(address: str, ok: bool) -> None:
    if ok:
        assert checked_address(address) == address
    else:
        with pytest.raises(AddressError):
            checked_address(address)
        with pytest.raises(AddressError):
            compose(episode(physio_email=address))


def test_every_flag_has_words() -> None:
    for flag in SEVERITY:
        assert flag in FLAG_TITLE and flag in FLAG_EXPLANATION
    compose(episode(flag="some_future_flag", chart=None))  # unknown flags still compose


def digest_mail(n: int = 13) -> DigestMail:
    rows = [DigestRow(patient=f"PT-{i:06X}", kind="sock", days_on_target=7, wear_hours=9.0, target_hours=8.0,
                      chart=sock_chart(i)) for i in range(n - 3)]  # fmt: skip
    rows += [
        DigestRow(patient="PT-96965D", kind="sock", days_on_target=4, previous_days_on_target=6, wear_hours=8.4,
                  target_hours=8.0, open_flags=("rolled_down",), opened=("rolled_down",), chart=sock_chart()),
        DigestRow(patient="PT-57EEBB", kind="boot", days_on_target=5, open_flags=("boot_overpressure",),
                  resolved=("boot_short_sessions",), chart=sock_chart(30)),
        DigestRow(patient="PT-0C84F6", kind=None, days_on_target=None, notes=("no prescription",)),
    ]  # fmt: skip
    return DigestMail(dedupe_key="digest:physio1@demo-clinic.example:2025-11-14",
                      physio_email="physio1@demo-clinic.example", physio_name="Alex Physio", clinic="demo-clinic",
                      timezone="America/Edmonton", day=date(2025, 11, 14), rows=tuple(rows))  # fmt: skip


def test_digest_lists_every_patient_attention_first() -> None:
    mail = digest_mail()
    msg = compose_digest(mail, sender=SENDER, dashboard_url=DASHBOARD)
    assert msg["Subject"] == "Daily digest 2025-11-14, demo-clinic: 13 patients, 3 need attention, 1 urgent"
    parts = texts(msg)
    for row in mail.rows:
        for body in parts.values():
            assert row.patient in body
        assert dashboard_link(DASHBOARD, row.patient) in parts["text/plain"]
    text = parts["text/plain"]
    order = [text.index(code) for code in ("PT-57EEBB", "PT-96965D", "PT-0C84F6", "PT-000000")]
    assert order == sorted(order)  # urgent, warning, problem, then the rest
    assert "new: Rolled down" in text and "on target 4/7 days, was 6/7" in text
    assert "resolved: Short boot sessions" in text
    assert "no prescription" in text
    images = pngs(msg)
    assert len(images) == 2  # charts only for the rows needing attention that have one
    for image in images:
        assert f"cid:{image['Content-ID'].strip('<>')}" in parts["text/html"]
    everything = compose_digest(dataclasses.replace(mail, charts="none"), sender=SENDER, dashboard_url=DASHBOARD)
    assert pngs(everything) == []


def test_chart_is_small_and_fast() -> None:
    render_chart.cache_clear()
    render_chart(sock_chart(0.5))  # matplotlib import and font cache
    timings = []
    for shift in (1.0, 2.0, 3.0):
        started = time.perf_counter()
        data = render_chart(sock_chart(shift))
        timings.append(time.perf_counter() - started)
        assert png_size(data) == CHART_SIZE_PX and len(data) < 60_000
    assert min(timings) < 1.0, timings
    started = time.perf_counter()
    assert render_chart(sock_chart(3.0)) == data  # memoised: rendered once per series
    assert time.perf_counter() - started < 0.01


@pytest.mark.parametrize("series", [
    ChartSeries((), (), None, ()),
    ChartSeries(DAYS[:1], (None,), 8.0, (None,), 23.0, 32.0),
    ChartSeries(DAYS, (0.4,) * 14, None, (58.0,) * 13 + (74.5,), None, 60.0, "peak chamber"),
])  # fmt: skip
def test_chart_edge_cases(series: ChartSeries) -> None:
    assert png_size(render_chart(series)) == CHART_SIZE_PX


def test_chart_series_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="same length"):
        ChartSeries(DAYS, (1.0,), 8.0, (20.0,))


def test_inputs_round_trip_as_json_and_messages_as_bytes() -> None:
    """The outbox may store the description (JSON) or the composed bytes: both give back the same e-mail."""
    mail = episode()
    assert msgspec.json.decode(msgspec.json.encode(mail), type=EpisodeMail) == mail
    digest = digest_mail()
    assert msgspec.json.decode(msgspec.json.encode(digest), type=DigestMail) == digest
    msg = compose(mail)
    back = parse_message(msg.as_bytes())
    assert back["Message-ID"] == msg["Message-ID"]
    assert texts(back) == texts(msg)


def test_next_attempt_is_capped_exponential_with_jitter() -> None:
    rng = random.Random(3)
    for attempts in range(1, 40):
        base = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
        delay = next_attempt(attempts, rng=rng)
        assert 0.8 * base <= delay <= min(RETRY_MAX_S, 1.2 * base)
    assert next_attempt(0, rng=rng) <= 1.2 * RETRY_FIRST_S
    assert next_attempt(10**6, rng=rng) <= RETRY_MAX_S
    assert next_attempt(3, first_s=0.1, max_s=0.3, rng=rng) <= 0.3


@pytest.mark.parametrize(("error", "temporary"), [
    (aiosmtplib.SMTPConnectError("refused"), True),
    (aiosmtplib.SMTPServerDisconnected("lost"), True),
    (aiosmtplib.SMTPReadTimeoutError("slow"), True),
    (TimeoutError(), True),
    (ConnectionRefusedError(), True),
    (aiosmtplib.SMTPResponseException(421, "shutting down"), True),
    (aiosmtplib.SMTPAuthenticationError(454, "temporary auth failure"), True),
    (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), False),
    (aiosmtplib.SMTPDataError(554, "rejected"), False),
    (aiosmtplib.SMTPSenderRefused(553, "not allowed", "a@b"), False),
    (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(450, "busy", "a@b")]), True),
    (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(450, "busy", "a@b"),
                                       aiosmtplib.SMTPRecipientRefused(550, "unknown", "c@d")]), False),
    (aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server."), False),
    (ValueError("address cannot be sent"), False),
])  # fmt: skip
def test_errors_are_classified(error: Exception, temporary: bool) -> None:
    assert classify(error).temporary is temporary
