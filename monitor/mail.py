"""Alert e-mails to the responsible physio: composing them (text + HTML with an inline chart) and sending them by SMTP.

Three e-mails, each built from a plain, frozen description that the monitor fills from its own state
(nothing here touches a database, so an outbox can store the description or the composed bytes):

- :class:`EpisodeMail` (``kind="opened"`` / ``"resolved"``) -> :func:`compose_episode`: one e-mail when a
  flag's episode opens (at once for safety flags) and one when it resolves;
- :class:`DigestMail` -> :func:`compose_digest`: the daily digest per physio, every patient's adherence and
  what changed since the previous digest.

Every message is ``multipart/alternative``: a plain-text part and ``multipart/related`` holding the HTML and its
PNG chart(s) referenced by ``cid:``. Patients appear only by their pseudonymous code (the registry's rule for
e-mails): none of these inputs has a field for a display name. The ``Message-ID`` is derived from the outbox's
dedupe key, so a re-sent e-mail is recognisably the same message.

:class:`SmtpSender` sends one message per connection with aiosmtplib (STARTTLS or implicit TLS, AUTH) and raises
:class:`MailError` whose ``temporary`` says whether to retry; :func:`next_attempt` is the outbox's backoff.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiosmtplib
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from monitor.evidence import Evidence
from monitor.model import (
    BOOT_MISSED_SESSIONS,
    BOOT_OVERPRESSURE,
    BOOT_SHORT_SESSIONS,
    ROLLED_DOWN,
    SAFETY,
    SILENT,
    TOO_TIGHT,
    UNDER_USE,
    WORN_OUT,
    Severity,
    severity_of,
    split_flag,
)
from monitor.recipients import AddressError, checked_address, display_name, recipient_header

if TYPE_CHECKING:
    from monitor.settings import MonitorSettings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Words a physio understands

FLAG_TITLE: Final[dict[str, str]] = {
    SILENT: "No data from the garment",
    UNDER_USE: "Under-use",
    TOO_TIGHT: "Too tight",
    "too_loose": "Too loose",
    ROLLED_DOWN: "Rolled down",
    WORN_OUT: "Worn out",
    BOOT_OVERPRESSURE: "Boot over-pressure",
    BOOT_SHORT_SESSIONS: "Short boot sessions",
    "boot_long_sessions": "Long boot sessions",
    "low_battery": "Low battery",
    BOOT_MISSED_SESSIONS: "Missed boot sessions",
}
FLAG_EXPLANATION: Final[dict[str, str]] = {
    SILENT: "no reading at all from the garment for a whole day: not worn, battery flat, "
    "or the phone or hub that relays it is off",
    UNDER_USE: "worn for fewer hours a day than prescribed",
    TOO_TIGHT: "ankle pressure above the prescribed band for more than 30 minutes of wear in a day",
    "too_loose": "ankle pressure below the prescribed band for more than 30 minutes of wear in a day",
    ROLLED_DOWN: "calf pressure above ankle pressure (by more than 3 mmHg) for more than 30 minutes "
    "of wear in a day, the top of the stocking has probably rolled down and constricts the leg",
    WORN_OUT: "median ankle pressure over the last 7 days below the prescribed band: the garment has probably "
    "lost its compression and needs replacing",
    BOOT_OVERPRESSURE: "a chamber of the pneumatic boot went above the prescribed maximum pressure during a session",
    BOOT_SHORT_SESSIONS: "a boot session ended before the prescribed minimum duration",
    "boot_long_sessions": "a boot session lasted longer than the prescribed maximum duration",
    "low_battery": "the garment's battery is below 15 %: remind the client to charge it before it goes silent",
    BOOT_MISSED_SESSIONS: "fewer boot sessions over the last 7 days than prescribed",
}
SEVERITY_WORD: Final[dict[str, str]] = {"critical": "URGENT", "warning": "Warning", "info": "Info"}
_SEVERITY_RANK: Final[dict[str, int]] = {"critical": 0, "warning": 1, "info": 2}

DASHBOARD_PATH: Final = "/d/compression-patient/patient"


def flag_title(flag: str) -> str:
    """The flag's short name in words (``rolled_down`` -> ``Rolled down``, ``rolled_down:right`` -> ``Rolled down
    (right leg)``); unknown flags are de-underscored."""
    base, leg = split_flag(flag)
    title = FLAG_TITLE.get(base) or base.replace("_", " ").capitalize()
    return f"{title} ({leg} leg)" if leg in ("left", "right") else f"{title} ({leg} legs)" if leg else title


def flag_explanation(flag: str) -> str:
    """What the flag means, in a sentence a physio understands."""
    base, leg = split_flag(flag)
    words = FLAG_EXPLANATION.get(base) or flag_title(base).lower()
    return f"{words} (the stocking on the {leg} leg)" if leg in ("left", "right") else words


def dashboard_link(dashboard_url: str, patient: str) -> str:
    """The patient's Grafana dashboard: ``{dashboard_url}/d/compression-patient/patient?var-patient=<code>``."""
    return f"{dashboard_url.rstrip('/')}{DASHBOARD_PATH}?var-patient={quote(patient, safe='')}"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs (plain data, independent of the database; msgspec/JSON-serialisable)


@dataclass(frozen=True, slots=True)
class ChartSeries:
    """The last days of one patient for the chart: wear hours per day against the target, pressure against the band.

    One entry per local day, oldest first (usually 14); ``None`` where the day has no value (no data, not worn).
    Socks: ``pressure_mmhg`` is the day's median ankle pressure and ``band_low``/``band_high`` the prescribed
    range. Boots: give the day's peak chamber pressure, ``pressure_label="peak chamber"``, ``band_high`` the
    prescribed maximum and ``band_low=None``; ``target_hours`` may be ``None``.
    """

    days: tuple[date, ...]
    wear_hours: tuple[float | None, ...]
    target_hours: float | None
    pressure_mmhg: tuple[float | None, ...]
    band_low: float | None = None
    band_high: float | None = None
    pressure_label: str = "ankle median"
    # Each day's own target when the prescription changed within the chart's days (else ``None``: target_hours).
    day_targets: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        if not (len(self.days) == len(self.wear_hours) == len(self.pressure_mmhg)):
            raise ValueError("ChartSeries: days, wear_hours and pressure_mmhg must have the same length")
        if self.day_targets is not None and len(self.day_targets) != len(self.days):
            raise ValueError("ChartSeries: day_targets must have one entry per day")

    def targets(self) -> tuple[float | None, ...]:
        """Each day's wear target (the prescription version of that day)."""
        return self.day_targets if self.day_targets is not None else (self.target_hours,) * len(self.days)


@dataclass(frozen=True, slots=True)
class EpisodeMail:
    """An episode of one flag for one patient opened or resolved: what the e-mail says.

    ``dedupe_key`` is the outbox's unique key of this e-mail (the Message-ID derives from it); ``thread_key`` the
    key of the opening e-mail, given on a resolving one so mail clients show both as one thread.
    ``started_at``/``ended_at`` are aware datetimes, shown in the clinic's ``timezone``. ``summary`` holds short
    lines of evidence (e.g. ``"2025-11-08: 95 min with calf above ankle"``). A resolving e-mail says why the
    episode ended (``ended_reason``: ``data``, ``late_data`` or ``prescription``) and what shows it
    (``evidence``: the days whose data showed the flag gone, or the change of prescription).
    """

    dedupe_key: str
    kind: Literal["opened", "resolved", "handed_over"]
    patient: str
    clinic: str
    timezone: str
    flag: str
    severity: Severity
    started_at: datetime
    physio_email: str
    physio_name: str | None = None
    ended_at: datetime | None = None
    summary: tuple[str, ...] = ()
    chart: ChartSeries | None = None
    thread_key: str | None = None
    ended_reason: str | None = None
    evidence: tuple[str, ...] = ()
    # Filled in when the e-mail is sent (monitor.letters): the episode, what the stored readings show, what
    # physios did about it, who else is told (the colleague it was handed over to), and for a hand-over by whom.
    episode_id: int | None = None
    measured: Evidence | None = None
    handling: tuple[str, ...] = ()
    also_to: tuple[str, ...] = ()
    handed_by: str | None = None
    handover_note: str = ""


@dataclass(frozen=True, slots=True)
class DigestRow:
    """One patient in a physio's daily digest.

    Of the ``days_judged`` last complete days (usually 7): ``days_on_target`` met the daily target (socks: the
    prescribed hours worn; boots: a session), ``days_clear`` carried no flag at all (worn as prescribed, pressure
    and gradient included); ``previous_days_on_target`` the first figure in the previous digest (the change is
    shown). ``handling``: what physios did about the open episodes; ``evidence``: each open episode's measured
    headline (both filled in when the digest is sent, monitor.letters). ``wear_hours`` is
    the last complete day's wear against ``target_hours``. ``opened``/``resolved``: flags whose episode opened or
    resolved since the previous digest; ``open_flags``: every flag with an episode open now. ``notes``: what
    keeps the patient from being evaluated fully (``PatientContext.problems``).
    """

    patient: str
    kind: Literal["sock", "boot"] | None
    days_on_target: int | None
    days_judged: int = 7
    previous_days_on_target: int | None = None
    wear_hours: float | None = None
    target_hours: float | None = None
    open_flags: tuple[str, ...] = ()
    opened: tuple[str, ...] = ()
    resolved: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    chart: ChartSeries | None = None
    days_clear: int | None = None
    handling: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()

    @property
    def needs_attention(self) -> bool:
        """Something open, newly opened, or keeping the patient from being evaluated."""
        return bool(self.open_flags or self.opened or self.notes)

    @property
    def worst_severity(self) -> Severity | None:
        """The highest severity among the open flags."""
        severities = [severity_of(f) for f in (*self.open_flags, *self.opened)]
        return min(severities, key=_SEVERITY_RANK.__getitem__, default=None)

    def changes(self) -> list[str]:
        """What changed since the previous digest, in words (empty: nothing)."""
        out = [f"new: {flag_title(f)}" for f in self.opened]
        out += [f"resolved: {flag_title(f)}" for f in self.resolved]
        prev, now = self.previous_days_on_target, self.days_on_target
        if prev is not None and now is not None and prev != now:
            out.append(f"on target {now}/{self.days_judged} days, was {prev}/{self.days_judged}")
        return out


@dataclass(frozen=True, slots=True)
class DigestMail:
    """A physio's daily digest for one local ``day`` (the last complete day) of their clinic: every patient."""

    dedupe_key: str
    physio_email: str
    clinic: str
    timezone: str
    day: date
    rows: tuple[DigestRow, ...]
    physio_name: str | None = None
    charts: Literal["attention", "all", "none"] = field(default="attention")


# ---------------------------------------------------------------------------------------------------------------------
# Composition


def message_id(dedupe_key: str, sender: str) -> str:
    """The deterministic ``Message-ID`` of the e-mail with this outbox key: ``<hash@sender's domain>``."""
    digest = hashlib.sha256(dedupe_key.encode()).hexdigest()[:32]
    domain = parseaddr(sender)[1].rpartition("@")[2] or "compression-monitor.invalid"
    return f"<{digest}@{domain}>"


def _local(moment: datetime, timezone: str) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(timezone)).strftime("%a %d %b %Y %H:%M %Z")


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} h"


def _duration(start: datetime, end: datetime) -> str:
    seconds = max(0.0, (end - start).total_seconds())
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# Why an episode ended (monitor.evaluate's ENDED_BY_*), in a physio's words.
ENDED_BY_PRESCRIPTION: Final = "prescription"
_ENDED_WORDS: Final[dict[str, str]] = {
    "data": "resolved",
    "late_data": "resolved (late data)",
    ENDED_BY_PRESCRIPTION: "ended by a change of prescription, not by a change in wear",
}
_EVIDENCE_HEAD: Final[dict[str, str]] = {
    "data": "What shows it resolved (the days since, judged on their data):",
    "late_data": "Why it resolved:",
    ENDED_BY_PRESCRIPTION: "Why it ended:",
}


def _ended_words(reason: str | None) -> str:
    return _ENDED_WORDS.get(reason or "", "resolved")


def episode_subject(mail: EpisodeMail) -> str:
    """``[URGENT] Boot over-pressure: PT-57EEBB (demo-clinic)``, ``[Resolved] Rolled down: PT-96965D (...)``."""
    tag = SEVERITY_WORD.get(mail.severity, mail.severity)
    if mail.kind == "resolved":
        tag = "Prescription changed" if mail.ended_reason == ENDED_BY_PRESCRIPTION else "Resolved"
    return f"[{tag}] {flag_title(mail.flag)}: {mail.patient} ({mail.clinic})"


def digest_subject(mail: DigestMail) -> str:
    """``Daily digest 2025-11-08, demo-clinic: 13 patients, 3 need attention``."""
    attention = sum(1 for r in mail.rows if r.needs_attention)
    urgent = sum(1 for r in mail.rows if r.worst_severity == "critical")
    tail = f", {urgent} urgent" if urgent else ""
    return (f"Daily digest {mail.day.isoformat()}, {mail.clinic}: {len(mail.rows)} patients, "
            f"{attention} need attention{tail}")  # fmt: skip


def _new_message(subject: str, sender: str, to_email: str, to_name: str | None, dedupe_key: str,
                 now: datetime | None) -> EmailMessage:  # fmt: skip
    msg = EmailMessage(policy=policy.SMTP)
    msg["Subject"] = subject
    msg["From"] = sender
    # The address is checked (one plain local@domain); the name is display text, quoted or encoded by the e-mail
    # library: no name can add a recipient or a header (monitor/recipients.py).
    msg["To"] = recipient_header(to_email, to_name)
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = message_id(dedupe_key, sender)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Compression-Dedupe-Key"] = dedupe_key
    return msg


def _attach(msg: EmailMessage, text: str, html_body: str, images: Sequence[tuple[str, bytes]]) -> None:
    """multipart/alternative: text/plain, then multipart/related (text/html + inline PNGs by Content-ID)."""
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html_body, subtype="html", charset="utf-8")
    html_part = next(p for p in msg.iter_parts() if p.get_content_type() == "text/html")
    for cid, png in images:
        html_part.add_related(png, maintype="image", subtype="png", cid=f"<{cid}>", disposition="inline",
                              filename=f"{cid.partition('@')[0]}.png")  # fmt: skip


def _chart_cid(dedupe_key: str, index: int = 0) -> str:
    return f"chart{index}-{hashlib.sha256(dedupe_key.encode()).hexdigest()[:16]}@compression"


def _chart_text(series: ChartSeries) -> list[str]:
    """The chart's numbers as a small table for the plain-text part."""
    varying = series.day_targets is not None
    lines = [f"  {'day':<10}  {'wear':>7}" + (f"  {'target':>7}" if varying else "")
             + f"  {series.pressure_label + ' (mmHg)':>20}"]  # fmt: skip
    rows = zip(series.days, series.wear_hours, series.targets(), series.pressure_mmhg, strict=True)
    for day, wear, target_h, pressure in rows:
        p = "-" if pressure is None else f"{pressure:.1f}"
        lines.append(f"  {day.isoformat():<10}  {_hours(wear):>7}" + (f"  {_hours(target_h):>7}" if varying else "")
                     + f"  {p:>20}")  # fmt: skip
    target = "none" if series.target_hours is None else _hours(series.target_hours)
    target = "per day (the prescription changed)" if varying else target
    band = _band_words(series)
    lines.append(f"  target wear {target}" + (f"; {band}" if band else ""))
    return lines


def _band_words(series: ChartSeries) -> str:
    if series.band_low is not None and series.band_high is not None:
        return f"prescribed band {series.band_low:g}-{series.band_high:g} mmHg"
    if series.band_high is not None:
        return f"prescribed maximum {series.band_high:g} mmHg"
    if series.band_low is not None:
        return f"prescribed minimum {series.band_low:g} mmHg"
    return ""


_SEVERITY_COLOUR: Final[dict[str, str]] = {"critical": "#b00020", "warning": "#8a4b00", "info": "#2f5f8f"}
_FOOTER: Final = (
    "You get one e-mail when an episode opens and one when it resolves (never one per check), "
    "and a daily digest of all your patients. Patients appear only by their pseudonymous code."
)
# The workspace's page of a patient (workspace.web.patient_path; a test keeps the two the same).
WORKSPACE_PATIENT_PATH: Final = "/ui/workspace/patients/"
_TEMPLATES: Final = Path(__file__).with_name("templates")


def workspace_link(workspace_url: str, patient: str, episode_id: int | None = None) -> str:
    """The patient's page in the workspace (reached after sign-in), at the episode when given."""
    anchor = f"#episode-{episode_id}" if episode_id is not None else ""
    return f"{workspace_url.rstrip('/')}{WORKSPACE_PATIENT_PATH}{quote(patient, safe='')}{anchor}"


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    """The e-mails' templates: ``*.html`` escaped, ``*.txt`` as written."""
    return Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(("html",)),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)  # fmt: skip


def _fill(name: str, context: Mapping[str, Any]) -> str:
    return _environment().get_template(name).render(context)


def _greeting(name: str | None) -> str:
    shown = display_name(name)
    return f"Dear {shown}," if shown else "Hello,"


def _day(moment: datetime, timezone: str) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(timezone)).strftime("%a %d %b %Y")


def _when(mail: EpisodeMail) -> list[tuple[str, str]]:
    """The e-mail's dates: the first day flagged (a day, not a time: flags judge whole days) or, for a safety
    flag measured in a session, the session's start; when it resolved and how long it lasted."""
    session = (mail.measured.values.get("session_start_ms") if mail.measured else None)
    if session is not None:
        start = datetime.fromtimestamp(session / 1000, UTC)
        rows = [("Session", _local(start, mail.timezone))]
    else:
        rows = [("First day", _day(mail.started_at, mail.timezone))]
    if mail.ended_at is not None:
        ended = "Ended" if mail.ended_reason == ENDED_BY_PRESCRIPTION else "Resolved"
        rows += [(ended, _day(mail.ended_at, mail.timezone)), ("Lasted", _duration(mail.started_at, mail.ended_at))]
    return rows


def _why(mail: EpisodeMail) -> str:
    if mail.kind == "handed_over":
        return "It is yours now: you get the e-mail when it resolves, and it shows in your digest."
    if mail.kind == "opened" and mail.flag in SAFETY:
        return "This is a safety flag: it is e-mailed as soon as it is seen, also during the current day."
    if mail.kind == "opened":
        return "You will get one more e-mail when it resolves."
    return "No further e-mails about this episode; a new one opens if the flag comes back."


def _headline(mail: EpisodeMail) -> str:
    title = flag_title(mail.flag)
    severity = SEVERITY_WORD.get(mail.severity, mail.severity)
    if mail.kind == "opened":
        return f"{title}: opened ({severity})"
    if mail.kind == "handed_over":
        return f"{title}: handed over to you ({severity})"
    return f"{title}: {_ended_words(mail.ended_reason)}"


def _colour(mail: EpisodeMail) -> str:
    if mail.kind != "resolved":
        return _SEVERITY_COLOUR.get(mail.severity, "#222")
    # Not green when a change of prescription ended it: the client did not do better, the target moved.
    return "#37618e" if mail.ended_reason == ENDED_BY_PRESCRIPTION else "#1e6b34"


def episode_context(mail: EpisodeMail, *, dashboard_url: str, workspace_url: str | None,
                    chart_cid: str | None) -> dict[str, Any]:  # fmt: skip
    """What the episode templates show."""
    resolved = mail.kind == "resolved"
    chart = None
    if mail.chart is not None:
        alt = f"Last {len(mail.chart.days)} days: wear hours against the target, {mail.chart.pressure_label} pressure"
        chart = {"cid": chart_cid, "alt": alt, "lines": _chart_text(mail.chart), "size": CHART_DISPLAY_PX}
    return {"mail": mail, "greeting": _greeting(mail.physio_name), "headline": _headline(mail),
            "colour": _colour(mail),
            "ended_head": _EVIDENCE_HEAD.get(mail.ended_reason or "", "What shows it resolved:") if resolved else None,
            "when": _when(mail), "explanation": flag_explanation(mail.flag), "why": _why(mail),
            "measured": mail.measured, "handling": mail.handling, "summary": mail.summary, "chart": chart,
            "handed_by": display_name(mail.handed_by) if mail.handed_by else None, "note": mail.handover_note,
            "page": workspace_link(workspace_url, mail.patient, mail.episode_id) if workspace_url else None,
            "dashboard": dashboard_link(dashboard_url, mail.patient), "footer": _FOOTER,
            "subject": episode_subject(mail)}  # fmt: skip


def compose_episode(mail: EpisodeMail, *, sender: str, dashboard_url: str, now: datetime | None = None,
                    workspace_url: str | None = None) -> EmailMessage:  # fmt: skip
    """The opening, resolving or hand-over e-mail of an episode (text + HTML from ``monitor/templates``, the chart
    inline).

    ``sender`` is the From header (``Name <address>``); ``dashboard_url`` Grafana's base URL; ``workspace_url`` the
    workspace's (the link to the patient's page); ``now`` the Date header (default: now). The chart is rendered
    once, only if ``mail.chart`` is given.
    """
    cid = _chart_cid(mail.dedupe_key) if mail.chart is not None else None
    context = episode_context(mail, dashboard_url=dashboard_url, workspace_url=workspace_url, chart_cid=cid)
    images = [(cid, render_chart(mail.chart))] if cid is not None and mail.chart is not None else []
    msg = _new_message(episode_subject(mail), sender, mail.physio_email, mail.physio_name, mail.dedupe_key, now)
    for address in mail.also_to:
        msg["Cc"] = recipient_header(address, None)
    if mail.thread_key is not None:
        msg["In-Reply-To"] = message_id(mail.thread_key, sender)
        msg["References"] = message_id(mail.thread_key, sender)
    if mail.kind != "resolved" and mail.severity == "critical":
        msg["Importance"] = "high"
        msg["X-Priority"] = "1"
    _attach(msg, _fill("episode.txt", context), _fill("episode.html", context), images)
    return msg


DIGEST_LEGEND: Final = (
    "Wear target met: of the last complete days (usually 7), how many met the daily target (stockings: the "
    "prescribed hours worn; boots: a session). Without a flag: how many carried no flag at all, pressure and "
    "gradient included."
)


def _digest_rows(mail: DigestMail, dashboard_url: str, workspace_url: str | None) -> list[dict[str, Any]]:
    rows = sorted(mail.rows, key=lambda r: (not r.needs_attention, _SEVERITY_RANK.get(r.worst_severity or "", 3),
                                            r.patient))  # fmt: skip
    out = []
    for index, r in enumerate(rows):
        wanted = mail.charts == "all" or (mail.charts == "attention" and r.needs_attention)
        chart = _chart_cid(mail.dedupe_key, index) if r.chart is not None and wanted else None
        status = ", ".join(flag_title(f) for f in r.open_flags) or ("not fully evaluated" if r.notes else "on track")
        out.append({"row": r, "status": status, "chart_cid": chart, "changes": r.changes(),
                    "colour": _SEVERITY_COLOUR.get(r.worst_severity or "", "#1e6b34" if not r.notes else "#8a4b00"),
                    "target_days": _share(r.days_on_target, r.days_judged),
                    "clear_days": _share(r.days_clear, r.days_judged),
                    "wear": _hours(r.wear_hours) + ("" if r.target_hours is None else f" of {_hours(r.target_hours)}"),
                    "page": workspace_link(workspace_url, r.patient) if workspace_url else None,
                    "dashboard": dashboard_link(dashboard_url, r.patient)})  # fmt: skip
    return out


def _share(part: int | None, whole: int) -> str:
    return "-" if part is None else f"{part}/{whole} days"


def compose_digest(mail: DigestMail, *, sender: str, dashboard_url: str, now: datetime | None = None,
                   workspace_url: str | None = None) -> EmailMessage:  # fmt: skip
    """A physio's daily digest: every patient given, those needing attention first, with what changed and what
    was done (text + HTML from ``monitor/templates``).

    Charts (rows with ``chart``) are inlined for the rows needing attention (``mail.charts="attention"``), all
    of them (``"all"``) or none.
    """
    rows = _digest_rows(mail, dashboard_url, workspace_url)
    attention = sum(1 for r in rows if r["row"].needs_attention)
    context = {"mail": mail, "greeting": _greeting(mail.physio_name), "rows": rows, "attention": attention,
               "day": mail.day.strftime("%a %d %b %Y"), "legend": DIGEST_LEGEND, "footer": _FOOTER,
               "subject": digest_subject(mail), "size": CHART_DISPLAY_PX}  # fmt: skip
    images = [(r["chart_cid"], render_chart(r["row"].chart)) for r in rows if r["chart_cid"] and r["row"].chart]
    msg = _new_message(digest_subject(mail), sender, mail.physio_email, mail.physio_name, mail.dedupe_key, now)
    _attach(msg, _fill("digest.txt", context), _fill("digest.html", context), images)
    return msg


def parse_message(raw: bytes) -> EmailMessage:
    """An e-mail stored as bytes (``msg.as_bytes()``, e.g. in the outbox) back as an :class:`EmailMessage`."""
    # Stored with SMTP's CRLF line ends; parsed with \n so text parts read as they were composed.
    parsed = BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n"))
    assert isinstance(parsed, EmailMessage)
    return parsed


# ---------------------------------------------------------------------------------------------------------------------
# Chart

CHART_SIZE_PX: Final = (800, 720)  # rendered; shown at CHART_DISPLAY_PX, so it stays sharp on phones
CHART_DISPLAY_PX: Final = (400, 360)
_DPI: Final = 200
_FONT: Final = 8.5  # points at 200 dpi: about 12 CSS px at the display size, 11 px on a 390 px phone
_GREEN, _ORANGE, _RED, _BLUE, _GREY = "#2e7d32", "#e08a00", "#b00020", "#37618e", "#9e9e9e"


@functools.lru_cache(maxsize=64)
def render_chart(series: ChartSeries) -> bytes:
    """A PNG of two panels one above the other (readable at a phone's width): wear hours per day against the
    target; pressure against the prescribed band.

    Pure (no pyplot state, safe in a worker thread) and memoised per series; matplotlib is imported on first use.
    """
    with _RENDER_LOCK:  # matplotlib does not promise thread safety; renders are short, one at a time
        return _render(series)


_RENDER_LOCK: Final = threading.Lock()


def _ticks(series: ChartSeries) -> tuple[list[int], list[str]]:
    x = list(range(len(series.days)))
    step = max(1, (len(x) + 4) // 5)
    ticks = x[::step]
    return ticks, [series.days[i].strftime("%d %b") for i in ticks]


def _wear_panel(ax: Any, series: ChartSeries) -> None:
    x = list(range(len(series.days)))
    wear = [w if w is not None else 0.0 for w in series.wear_hours]
    target = series.target_hours
    targets = series.targets()  # each day against its own prescription version
    colours = [_GREY if w is None else (_GREEN if t is None or w >= t else _ORANGE)
               for w, t in zip(series.wear_hours, targets, strict=True)]  # fmt: skip
    ax.bar(x, wear, color=colours, width=0.75)
    for i, w in enumerate(series.wear_hours):
        if w is None:
            ax.text(i, 0.0, "?", ha="center", va="bottom", fontsize=_FONT, color="#555")
    if series.day_targets is not None:
        steps = [math.nan if t is None else t for t in targets]
        ax.step(x, steps, where="mid", color=_BLUE, linestyle="--", linewidth=1.2,
                label="target (prescription changed)")  # fmt: skip
        ax.legend(loc="upper left", fontsize=_FONT, frameon=False)
    elif target is not None:
        ax.axhline(target, color=_BLUE, linestyle="--", linewidth=1.2, label=f"target {target:g} h")
        ax.legend(loc="upper left", fontsize=_FONT, frameon=False)
    ax.set_ylim(0, max([*wear, *(t for t in targets if t is not None), target or 0.0, 1.0]) * 1.35)
    boot = series.pressure_label == "peak chamber"
    ax.set_title("Time in sessions per day (hours)" if boot else "Wear per day (hours)", fontsize=_FONT + 1,
                 loc="left")  # fmt: skip


def _pressure_panel(ax: Any, series: ChartSeries) -> None:
    x = list(range(len(series.days)))
    low_band, high_band = series.band_low, series.band_high
    if low_band is not None and high_band is not None:
        ax.axhspan(low_band, high_band, color=_GREEN, alpha=0.15, linewidth=0, label="prescribed band")
    elif high_band is not None:
        ax.axhline(high_band, color=_RED, linestyle="--", linewidth=1.2, label="prescribed maximum")
    elif low_band is not None:
        ax.axhline(low_band, color=_ORANGE, linestyle="--", linewidth=1.2, label="prescribed minimum")
    # Gaps (None) break the line rather than bridging days without data.
    py = [math.nan if p is None else p for p in series.pressure_mmhg]
    ax.plot(x, py, color=_BLUE, linewidth=1.2, label=series.pressure_label)
    outside = [(high_band is not None and p > high_band) or (low_band is not None and p < low_band) for p in py]
    ax.scatter(x, py, s=14, zorder=3, color=[_RED if o else _BLUE for o in outside])
    values = [p for p in py if not math.isnan(p)] + [v for v in (low_band, high_band) if v is not None]
    if values:
        low, high = min(values), max(values)
        pad = max(2.0, (high - low) * 0.15)
        ax.set_ylim(max(0.0, low - pad), high + pad * 2.5)  # room for the legend above the data
    ax.legend(loc="upper left", fontsize=_FONT, frameon=False, ncols=2)
    ax.set_title(f"Pressure, {series.pressure_label} (mmHg)", fontsize=_FONT + 1, loc="left")


def _render(series: ChartSeries) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(CHART_SIZE_PX[0] / _DPI, CHART_SIZE_PX[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    wear_ax, pressure_ax = fig.subplots(2, 1)
    _wear_panel(wear_ax, series)
    _pressure_panel(pressure_ax, series)
    ticks, labels = _ticks(series)
    for ax in (wear_ax, pressure_ax):
        ax.set_xlim(-0.6, max(len(series.days), 1) - 0.4)
        ax.set_xticks(ticks, labels)
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=_FONT)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.07, top=0.93, hspace=0.42)  # fixed: tight_layout is slow
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI, metadata={"Software": None})
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Sending

TlsMode = Literal["starttls", "optional", "implicit", "off"]


class MailError(Exception):
    """An e-mail was not sent. ``temporary``: try again later (server down, timeout, 4xx); else a 5xx or a
    configuration problem that retrying the same message will not fix (still never dropped silently: the
    outbox keeps it and says so)."""

    def __init__(self, message: str, *, temporary: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.temporary = temporary
        self.code = code


def _code_error(what: str, code: int, message: str) -> MailError:
    return MailError(f"{what}: {code} {message}", temporary=400 <= code < 500, code=code)


def classify(exc: BaseException) -> MailError:
    """The :class:`MailError` for an exception of an SMTP attempt (aiosmtplib's, OS or TLS errors)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        return MailError(f"every recipient refused: {detail}", temporary=all(400 <= c < 500 for c in codes),
                         code=codes[0] if codes else None)  # fmt: skip
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return _code_error("authentication refused", exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return _code_error("server refused the connection", exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _code_error(type(exc).__name__, exc.code, exc.message)
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return MailError(f"timed out: {exc}", temporary=True)
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected)):
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return MailError(f"server certificate not trusted: {cause}", temporary=False)
        return MailError(f"cannot reach the server: {exc}", temporary=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return MailError(f"server certificate not trusted: {exc}", temporary=False)
    if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):
        return MailError(f"connection failed: {exc}", temporary=True)
    if isinstance(exc, aiosmtplib.SMTPNotSupported | aiosmtplib.SMTPException):
        return MailError(f"server does not support what is configured: {exc}", temporary=False)
    return MailError(f"cannot send: {exc!r}", temporary=False)  # e.g. ValueError: an address that cannot be sent


class SmtpSender:
    """Sends e-mails over SMTP with aiosmtplib, one connection per message.

    ``tls``: ``starttls`` (required: the session is upgraded or the attempt fails), ``optional`` (upgrade when the
    server offers it), ``implicit`` (TLS from the first byte, port 465) or ``off`` (only for a local catcher).
    Credentials are never sent without TLS. ``ca_file`` trusts a private CA for the server's certificate (else the
    system's CAs). ``mail_from`` is the envelope sender (its address part); default: the message's From.
    ``timeout_s`` bounds each SMTP step, and the whole attempt at 3 × ``timeout_s``.
    """

    def __init__(self, host: str, port: int, *, tls: TlsMode = "starttls", username: str | None = None,
                 password: str | None = None, timeout_s: float = 30.0, ca_file: str | Path | None = None,
                 mail_from: str | None = None, local_hostname: str | None = None) -> None:  # fmt: skip
        if tls not in ("starttls", "optional", "implicit", "off"):
            raise ValueError(f"tls must be starttls, optional, implicit or off, not {tls!r}")
        if username is not None and tls == "off":
            raise ValueError("SMTP credentials are never sent without TLS: set tls to starttls or implicit")
        self.host = host
        self.port = port
        self.tls: TlsMode = tls
        self.username = username
        self.password = password
        self.timeout_s = timeout_s
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.mail_from = parseaddr(mail_from)[1] if mail_from else None
        self.local_hostname = local_hostname
        self._tls_context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: MonitorSettings) -> SmtpSender:
        """The sender configured by the monitor's ``COMPRESSION_MONITOR_SMTP_*`` settings."""
        return cls(settings.smtp_host, settings.smtp_port, tls=settings.smtp_tls, username=settings.smtp_username,
                   password=settings.smtp_password, timeout_s=settings.smtp_timeout_s, ca_file=settings.smtp_ca_file,
                   mail_from=settings.mail_from)  # fmt: skip

    def __repr__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"SmtpSender(smtp://{user}{self.host}:{self.port}, tls={self.tls})"

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        return self._tls_context

    async def send(self, message: EmailMessage, recipients: Sequence[str]) -> None:
        """Deliver ``message`` to ``recipients``, the SMTP envelope's recipients, given explicitly (never read from
        the message's headers, which carry display text); each must be one plain address (:func:`checked_address`).
        :class:`MailError` (``temporary`` or not) if not delivered."""
        if not recipients:
            raise MailError("the message has no recipient", temporary=False)
        try:
            recipients = [checked_address(r) for r in recipients]
        except AddressError as exc:
            raise MailError(f"unusable recipient address: {exc}", temporary=False) from exc
        use_tls = self.tls == "implicit"
        start_tls: bool | None = {"starttls": True, "optional": None, "implicit": False, "off": False}[self.tls]
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                _, response = await aiosmtplib.send(
                    message,
                    sender=self.mail_from,
                    recipients=recipients,
                    hostname=self.host,
                    port=self.port,
                    username=self.username,
                    password=self.password,
                    use_tls=use_tls,
                    start_tls=start_tls,
                    tls_context=self._context() if self.tls != "off" else None,
                    timeout=self.timeout_s,
                    local_hostname=self.local_hostname,
                )
        except MailError:
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            raise classify(exc) from exc
        log.info("mail sent: %s to %s via %r in %.2f s (%s)", message.get("Message-ID"), ", ".join(recipients),
                 self, time.monotonic() - started, response)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Retry schedule

RETRY_FIRST_S: Final = 5.0  # first retry after about 5 s: a blip costs seconds, not minutes
RETRY_FACTOR: Final = 2.0
RETRY_MAX_S: Final = 300.0  # never wait more than 5 minutes: mail flows again soon after the server returns
RETRY_JITTER: Final = 0.2  # ±20 %, so replicas and queued mails do not retry in lockstep


def next_attempt(attempts: int, *, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S,
                 rng: random.Random | None = None) -> float:  # fmt: skip
    """Seconds to wait after ``attempts`` failed attempts (1, 2, ...): capped exponential with ±20 % jitter.

    5, 10, 20, 40, 80, 160, 300, 300, ... seconds (before jitter); never more than ``max_s``.
    """
    n = max(1, attempts)
    base = min(max_s, first_s * RETRY_FACTOR ** min(n - 1, 64))
    jitter = 1.0 + (rng or random).uniform(-RETRY_JITTER, RETRY_JITTER)
    return min(max_s, base * jitter)


__all__ = [
    "CHART_SIZE_PX",
    "FLAG_EXPLANATION",
    "FLAG_TITLE",
    "RETRY_FIRST_S",
    "RETRY_MAX_S",
    "ChartSeries",
    "DigestMail",
    "DigestRow",
    "EpisodeMail",
    "MailError",
    "SmtpSender",
    "classify",
    "compose_digest",
    "compose_episode",
    "dashboard_link",
    "digest_subject",
    "episode_subject",
    "flag_explanation",
    "flag_title",
    "message_id",
    "next_attempt",
    "parse_message",
    "render_chart",
]
