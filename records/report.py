"""The monthly adherence report of one patient: a PDF for the record and a CSV for the clinic's own tools.

Both are made from a :class:`~records.model.PatientRecord` of one calendar month (the same figures as the FHIR
export, the monitor and the dashboards). :func:`summarise` computes the month's key figures once; the PDF
(:func:`pdf`, fpdf2 with matplotlib charts) and the CSV (:func:`csv_text`) show them.

What a physio reads on the first page: days with data (and whether the month reaches the 16 days remote
monitoring bills a 30-day period on), days meeting the wear target, wear per day against the target, the pressure
against the prescribed band. Then the episodes with what was done about them, the prescription versions and the
figures of every day.
"""

from __future__ import annotations

import csv
import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace

from monitor.compliance import RTM_MIN_DAYS
from monitor.mail import SEVERITY_WORD, flag_title
from records.model import DayFigures, EpisodeRecord, PatientRecord, PrescriptionVersion

CSV_COLUMNS: Final = ("date", "data_points", "wear_min", "wear_target_min", "wear_target_met", "ankle_median_mmhg",
                      "calf_median_mmhg", "band_low_mmhg", "band_high_mmhg", "above_band_min", "below_band_min",
                      "reversed_gradient_min", "sessions", "session_minutes", "peak_mmhg", "max_chamber_mmhg",
                      "flags")  # fmt: skip
_GREEN, _ORANGE, _RED, _BLUE, _GREY = "#2e7d32", "#e08a00", "#b00020", "#37618e", "#9e9e9e"
_CHART_DPI: Final = 200
_CHART_SIZE_IN: Final = (7.1, 2.3)
_FONT_DIR: Final = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"
_RENDER_LOCK: Final = threading.Lock()
ACTION_WORDS: Final = {"acknowledge": "Acknowledged", "snooze": "Snoozed", "note": "Note", "handover": "Handed over",
                       "monitor": "Monitor"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class MonthSummary:
    """The month's key figures (complete days only: a month still running counts the days so far)."""

    days_in_month: int
    days_complete: int
    days_monitored: int  # complete days on which the patient held a garment
    data_days: int
    rtm_met: bool
    kind: str | None  # "sock", "boot" or None (no prescription in the month)
    target_days: int  # sock: worn at least the target; boot: a session started
    wear_mean_h: float | None  # over the days with data
    ankle_median_mmhg: float | None  # the median of the daily ankle medians
    days_in_band: int  # sock days with data and no time above or below the band beyond the tolerance
    sessions: int
    episodes: int
    open_episodes: int


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def monitored(record: PatientRecord, d: DayFigures) -> bool:
    """Did the patient hold a garment on ``d`` (days before the first or after the last are not missed days)?"""
    return any(u.start < d.end and (u.end is None or u.end > d.start) for u in record.uses)


def summarise(record: PatientRecord) -> MonthSummary:
    """The key figures of ``record`` (a month)."""
    days = list(record.days)
    with_data = [d for d in days if d.has_data]
    kinds = {p.kind for p in record.prescriptions}
    kind = "sock" if "sock" in kinds else "boot" if "boot" in kinds else None
    if kind == "sock":
        target = sum(1 for d in with_data if d.target_met)
    else:
        target = sum(1 for d in with_data if d.sessions > 0)
    ankles = [m for d in with_data if (m := d.median("ankle")) is not None]
    in_band = sum(1 for d in with_data if d.target_s is not None and not ({"too_tight", "too_loose"} & set(d.flags)))
    return MonthSummary(
        days_in_month=record.period.length, days_complete=len(days),
        days_monitored=sum(1 for d in days if monitored(record, d) or d.has_data), data_days=len(with_data),
        rtm_met=len(with_data) >= RTM_MIN_DAYS, kind=kind, target_days=target,
        wear_mean_h=sum(d.wear_s for d in with_data) / 3600 / len(with_data) if with_data else None,
        ankle_median_mmhg=_median(ankles), days_in_band=in_band, sessions=sum(d.sessions for d in with_data),
        episodes=len(record.episodes), open_episodes=sum(1 for e in record.episodes if e.open),
    )  # fmt: skip


# --- CSV ------------------------------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_row(d: DayFigures) -> list[str]:
    """One day as the CSV's cells (minutes with one decimal, pressures with one; blank: not measured)."""
    sock = d.target_s is not None
    return [d.day.isoformat(), str(d.points), _n(d.wear_s / 60), _n(d.target_s / 60 if sock and d.target_s else None),
            "" if d.target_met is None else ("yes" if d.target_met else "no"), _n(d.median("ankle")),
            _n(d.median("calf")), _n(d.band_low_mmhg), _n(d.band_high_mmhg),
            _n(d.above_band_s / 60 if sock else None), _n(d.below_band_s / 60 if sock else None),
            _n(d.reversed_gradient_s / 60 if sock else None), "" if sock else str(d.sessions),
            " ".join(_n(s / 60) for s in d.session_durations_s), _n(d.peak_mmhg), _n(d.max_chamber_mmhg),
            " ".join(d.flags)]  # fmt: skip


def csv_text(record: PatientRecord) -> str:
    """Every complete day of the month, a row each, under a header row (comma-separated, UTF-8)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for d in record.days:
        writer.writerow(csv_row(d))
    return out.getvalue()


# --- charts ---------------------------------------------------------------------------------------------------------


def _chart(record: PatientRecord, kind: str | None, what: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    all_days = list(record.period.days())
    figures = {d.day: d for d in record.days}
    fig = Figure(figsize=_CHART_SIZE_IN, dpi=_CHART_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = list(range(len(all_days)))
    if what == "wear":
        _wear_panel(ax, x, all_days, figures, record)
    else:
        _pressure_panel(ax, x, all_days, figures, kind, record)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_xticks(x[::2], [str(d.day) for d in all_days[::2]])
    ax.set_xlabel(record.period.start.strftime("%B %Y"), fontsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.2, top=0.88)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_CHART_DPI, metadata={"Software": None})
    return out.getvalue()


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def _wear_panel(ax: object, x: list[int], all_days: list[date], figures: dict[date, DayFigures],
                record: PatientRecord) -> None:  # fmt: skip
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    wear = [figures[d].wear_s / 3600 if d in figures and figures[d].has_data else 0.0 for d in all_days]
    held = {d for d in all_days if d in figures and (monitored(record, figures[d]) or figures[d].has_data)}
    targets = [_hours(figures[d].target_s) if d in held else None for d in all_days]
    colours = [_GREY if d not in figures or not figures[d].has_data
               else (_GREEN if targets[i] is None or wear[i] >= (targets[i] or 0) else _ORANGE)
               for i, d in enumerate(all_days)]  # fmt: skip
    ax.bar(x, wear, color=colours, width=0.75)
    for i, d in enumerate(all_days):
        if d in figures and not figures[d].has_data and monitored(record, figures[d]):
            ax.text(i, 0.05, "no data", rotation=90, ha="center", va="bottom", fontsize=5.5, color="#666")
    if any(t is not None for t in targets):
        line = [math.nan if t is None else t for t in targets]
        ax.step([i - 0.5 for i in x] + [len(x) - 0.5], [*line, line[-1]], where="post", color=_BLUE,
                linestyle="--", linewidth=1.1, label="prescribed wear")  # fmt: skip
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_ylim(0, max([*wear, *(t or 0 for t in targets), 1.0]) * 1.25)
    ax.set_title("Hours worn per day (green: target met, orange: below target; 'no data': a garment, no reading)",
                 fontsize=8)  # fmt: skip


def _pressure_panel(ax: object, x: list[int], all_days: list[date], every: dict[date, DayFigures],
                    kind: str | None, record: PatientRecord) -> None:  # fmt: skip
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    # The band is drawn on the days the patient held a garment only.
    figures = {d: f for d, f in every.items() if monitored(record, f) or f.has_data}
    boot = kind == "boot"
    values = [(figures[d].peak_mmhg if boot else figures[d].median("ankle")) if d in figures else None
              for d in all_days]  # fmt: skip
    lows = [figures[d].band_low_mmhg if d in figures else None for d in all_days]
    highs = [(figures[d].max_chamber_mmhg if boot else figures[d].band_high_mmhg) if d in figures else None
             for d in all_days]  # fmt: skip
    edges = [i - 0.5 for i in x] + [len(x) - 0.5]
    if not boot and any(v is not None for v in lows):
        low = [math.nan if v is None else v for v in lows]
        high = [math.nan if v is None else v for v in highs]
        ax.fill_between(edges, [*low, low[-1]], [*high, high[-1]], step="post", color=_GREEN, alpha=0.15,
                        linewidth=0, label="prescribed band")  # fmt: skip
    elif any(v is not None for v in highs):
        high = [math.nan if v is None else v for v in highs]
        ax.step(edges, [*high, high[-1]], where="post", color=_RED, linestyle="--", linewidth=1.1,
                label="prescribed maximum")  # fmt: skip
    y = [math.nan if v is None else v for v in values]
    outside = [v is not None and ((h is not None and v > h) or (lo is not None and v < lo))
               for v, lo, h in zip(values, lows, highs, strict=True)]  # fmt: skip
    ax.plot(x, y, color=_BLUE, linewidth=1.1, label="peak chamber pressure" if boot else "ankle, median of the day")
    ax.scatter(x, y, s=9, zorder=3, color=[_RED if o else _BLUE for o in outside])
    known = [v for v in (*values, *lows, *highs) if v is not None]
    if known:
        pad = max(2.0, (max(known) - min(known)) * 0.15)
        ax.set_ylim(max(0.0, min(known) - pad), max(known) + pad * 2.5)
    ax.legend(loc="upper right", fontsize=7, frameon=False, ncols=2)
    ax.set_title("Peak chamber pressure per day (mmHg)" if boot else "Ankle pressure per day (mmHg)", fontsize=8)


def chart_png(record: PatientRecord, kind: str | None, what: str) -> bytes:
    """One of the report's charts (``wear`` or ``pressure``) as a PNG; one render at a time (matplotlib)."""
    with _RENDER_LOCK:
        return _chart(record, kind, what)


# --- PDF ------------------------------------------------------------------------------------------------------------


class _Report(FPDF):
    """A4 portrait with the report's footer."""

    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("DejaVu", size=7)
        self.set_text_color(110)
        self.cell(0, 5, f"{self.footer_text}    page {self.page_no()} of {{nb}}", align="C")


def _words(value: float | None, unit: str, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f} {unit}"


def _rx_line(p: PrescriptionVersion) -> tuple[str, str]:
    until = p.valid_to.isoformat() if p.valid_to else "open"
    when = f"{p.valid_from.isoformat()} to {until}"
    if p.kind == "sock":
        klass = f"class {p.class_name} ({p.class_system.upper()})" if p.class_system not in (None, "explicit") else ""
        band = f"ankle {p.band_low_mmhg:g}–{p.band_high_mmhg:g} mmHg" if p.band_low_mmhg and p.band_high_mmhg else ""
        wear = f"{p.wear_hours_per_day:g} h a day" if p.wear_hours_per_day else ""
        days = f"{p.wear_days_per_week} days a week" if p.wear_days_per_week else ""
        what = ", ".join(x for x in ("Stocking", klass, band, wear, days) if x)
    else:
        sessions = f"{p.sessions_per_week} sessions a week" if p.sessions_per_week else ""
        length = (f"{p.session_min_minutes:g}–{p.session_max_minutes:g} min each"
                  if p.session_min_minutes and p.session_max_minutes else "")  # fmt: skip
        peak = f"at most {p.max_chamber_mmhg:g} mmHg" if p.max_chamber_mmhg else ""
        what = ", ".join(x for x in ("Pneumatic boot", sessions, length, peak) if x)
    if p.leg:
        what += f", {p.leg} leg" if p.leg != "both" else ", both legs"
    return when, what


def _episode_done(e: EpisodeRecord, zone: ZoneInfo) -> str:
    if not e.actions:
        return "nothing recorded"
    lines = []
    for a in e.actions:
        when = a.at.astimezone(zone).strftime("%d %b %H:%M")
        what = ACTION_WORDS.get(a.kind, a.kind.capitalize())
        if a.kind == "snooze" and a.until:
            what += f" until {a.until.strftime('%d %b')}"
        if a.kind == "handover" and a.to:
            what += f" to {a.to}"
        by = "" if a.kind == "monitor" else f" by {a.by}"
        lines.append(f"{when}: {what}{by}" + (f": {a.note}" if a.note else ""))
    return "\n".join(lines)


def pdf(record: PatientRecord) -> bytes:
    """The month's report as a PDF (A4)."""
    s = summarise(record)
    zone = ZoneInfo(record.patient.timezone)
    doc = _Report(format="A4")
    doc.add_font("DejaVu", "", str(_FONT_DIR / "DejaVuSans.ttf"))
    doc.add_font("DejaVu", "B", str(_FONT_DIR / "DejaVuSans-Bold.ttf"))
    doc.set_title(f"Adherence report {record.patient.code} {record.period.start:%Y-%m}")
    doc.set_creator("compression-telemetry")
    generated = record.generated_at.astimezone(zone)
    doc.footer_text = (f"{record.patient.code} · {record.patient.clinic_name} · {record.period.start:%B %Y} · "
                       f"made {generated:%Y-%m-%d %H:%M} ({record.patient.timezone})")  # fmt: skip
    doc.set_auto_page_break(True, margin=16)
    doc.set_margins(15, 14, 15)
    doc.add_page()
    _heading(doc, record, s)
    _key_figures(doc, record, s)
    for what in ("wear", "pressure"):
        doc.image(io.BytesIO(chart_png(record, s.kind, what)), w=doc.epw)
        doc.ln(1)
    _episodes(doc, record, zone)
    _prescriptions(doc, record)
    _daily_table(doc, record)
    return bytes(doc.output())


def _heading(doc: FPDF, record: PatientRecord, s: MonthSummary) -> None:
    doc.set_font("DejaVu", "B", 15)
    doc.cell(0, 8, f"Adherence report, {record.period.start:%B %Y}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.set_font("DejaVu", size=9.5)
    who = f"Client {record.patient.code}" + (f" ({record.patient.display_name})" if record.patient.display_name
                                             else "")  # fmt: skip
    garments = ", ".join(f"{g.device_id} ({'stocking' if g.kind == 'sock' else 'pneumatic boot'})"
                         for g in record.garments) or "none assigned"  # fmt: skip
    doc.cell(0, 5.5, f"{who} · {record.patient.clinic_name} · garments: {garments}",
             new_x=XPos.LMARGIN, new_y=YPos.NEXT)  # fmt: skip
    if s.days_complete < s.days_in_month:
        last = record.days[-1].day.strftime("%d %B") if record.days else "no complete day yet"
        doc.set_text_color(150, 80, 0)
        doc.cell(0, 5.5, f"The month is not over: figures up to {last} ({s.days_complete} of {s.days_in_month} "
                         "days).", new_x=XPos.LMARGIN, new_y=YPos.NEXT)  # fmt: skip
        doc.set_text_color(0)
    for problem in record.problems:
        doc.set_text_color(150, 80, 0)
        doc.multi_cell(0, 5, f"Note: {problem}.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        doc.set_text_color(0)
    doc.ln(1.5)


def _key_figures(doc: FPDF, record: PatientRecord, s: MonthSummary) -> None:
    rtm = (f"meets remote monitoring's {RTM_MIN_DAYS} days" if s.rtm_met
           else f"remote monitoring needs {RTM_MIN_DAYS}")  # fmt: skip
    held = f"; garment held {s.days_monitored} of {s.days_complete} days" if s.days_monitored < s.days_complete else ""
    rows = [("Days with data", f"{s.data_days} of {s.days_monitored}", rtm + held)]
    if s.kind == "sock":
        rows.append(("Days meeting the wear target", f"{s.target_days} of {s.data_days}", _targets(record)))
        rows.append(("Average wear on days with data", _words(s.wear_mean_h, "h"), ""))
        rows.append(("Ankle pressure, median of the days", _words(s.ankle_median_mmhg, "mmHg"),
                     f"{s.days_in_band} of {s.data_days} days without too tight or too loose"))  # fmt: skip
    elif s.kind == "boot":
        rows.append(("Days with a boot session", f"{s.target_days} of {s.data_days}", f"{s.sessions} sessions"))
    rows.append(("Episodes in the month", str(s.episodes), f"{s.open_episodes} still open"))
    doc.set_fill_color(242, 245, 249)
    for label, value, note in rows:
        doc.set_font("DejaVu", size=9.5)
        doc.cell(66, 6.5, label, fill=True)
        doc.set_font("DejaVu", "B", 10.5)
        doc.cell(28, 6.5, value, fill=True)
        doc.set_font("DejaVu", size=8)
        doc.cell(0, 6.5, note, fill=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        doc.ln(0.6)
    doc.ln(2)


def _targets(record: PatientRecord) -> str:
    """The wear targets of the month in words: ``target 8 h a day`` or ``target 8 h a day, 6 h from 15 Mar``."""
    parts = []
    for p in record.prescriptions:
        if p.kind != "sock" or not p.wear_hours_per_day:
            continue
        since = "" if p.valid_from <= record.period.start else f" from {p.valid_from:%d %b}"
        parts.append(f"{p.wear_hours_per_day:g} h a day{since}")
    return ("target " + ", ".join(parts)) if parts else ""


def _section(doc: FPDF, title: str, room_mm: float = 45) -> None:
    if doc.get_y() > doc.h - room_mm:
        doc.add_page()
    doc.ln(2)
    doc.set_font("DejaVu", "B", 11.5)
    doc.cell(0, 7, title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.set_font("DejaVu", size=8.5)


def _episodes(doc: FPDF, record: PatientRecord, zone: ZoneInfo) -> None:
    _section(doc, "Episodes and what was done")
    if not record.episodes:
        doc.cell(0, 6, "No episode in this month.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        return
    with doc.table(col_widths=(34, 17, 40, 89), line_height=4.6, text_align="LEFT",
                   headings_style=_heading_style()) as table:  # fmt: skip
        table.row(("Flag", "Severity", "When", "What was done"))
        for e in record.episodes:
            last = (e.end_day.strftime("%d %b") + " (ended)") if e.end_day else "open"
            table.row((flag_title(e.flag), SEVERITY_WORD.get(e.severity, e.severity),
                       f"{e.start_day:%d %b} to {last}", _episode_done(e, zone)))  # fmt: skip


def _prescriptions(doc: FPDF, record: PatientRecord) -> None:
    _section(doc, "Prescription versions")
    if not record.prescriptions:
        doc.cell(0, 6, "No prescription in force this month.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        return
    with doc.table(col_widths=(45, 135), line_height=4.6, text_align="LEFT",
                   headings_style=_heading_style()) as table:  # fmt: skip
        table.row(("In force", "Prescribed"))
        for p in record.prescriptions:
            table.row(_rx_line(p))


def _daily_table(doc: FPDF, record: PatientRecord) -> None:
    _section(doc, "Every day", room_mm=90)
    boot = any(d.target_s is None for d in record.days if d.has_data)
    doc.multi_cell(0, 4.2, "Session lengths in minutes, peak chamber pressure in mmHg." if boot else
                   "Hours worn; ankle and calf: median pressure of the worn readings in mmHg; minutes worn outside "
                   "the prescribed band and with a reversed gradient (calf above ankle).",
                   new_x=XPos.LMARGIN, new_y=YPos.NEXT)  # fmt: skip
    doc.ln(1)
    head: tuple[str, ...]
    if boot:
        head = ("Day", "Readings", "Sessions", "Lengths", "Peak", "Flags")
        widths: tuple[float, ...] = (22, 20, 18, 40, 20, 60)
    else:
        head = ("Day", "Readings", "Worn", "Target", "Ankle", "Calf", "Outside band", "Reversed", "Flags")
        widths = (17, 18, 13, 14, 14, 14, 22, 18, 50)
    with doc.table(col_widths=widths, line_height=4.2, text_align="LEFT", headings_style=_heading_style(),
                   first_row_as_headings=True) as table:  # fmt: skip
        table.row(head)
        for d in record.days:
            flags = ", ".join(flag_title(f) for f in d.flags if f != "compliant") or ("–" if d.flags else "")
            if not d.has_data:
                none = "none" if monitored(record, d) else "no garment"
                table.row((f"{d.day:%a %d}", none, *("" for _ in head[2:-1]), flags if none == "none" else ""))
            elif boot:
                table.row((f"{d.day:%a %d}", str(d.points), str(d.sessions),
                           ", ".join(f"{s / 60:.0f}" for s in d.session_durations_s), _n(d.peak_mmhg, 0), flags))
            else:
                out = (d.above_band_s + d.below_band_s) / 60
                table.row((f"{d.day:%a %d}", str(d.points), _n(d.wear_s / 3600),
                           "met" if d.target_met else "below", _n(d.median("ankle")), _n(d.median("calf")),
                           f"{out:.0f}", f"{d.reversed_gradient_s / 60:.0f}", flags))  # fmt: skip


def _heading_style() -> FontFace:
    return FontFace(emphasis="BOLD", fill_color=(228, 233, 240))
