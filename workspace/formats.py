"""How numbers, times and days read on the workspace's pages (Jinja filters)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Final

from jinja2 import Environment

DASH: Final = "—"


def hours(value: float | None, digits: int = 1) -> str:
    """``7.5 h``; ``—`` when unknown."""
    return DASH if value is None else f"{value:.{digits}f} h"


def minutes(value: float | None) -> str:
    """``95 min``, ``3 h 20 min`` past two hours; ``—`` when unknown."""
    if value is None:
        return DASH
    if value < 120:
        return f"{value:.0f} min"
    return f"{int(value // 60)} h {int(value % 60):02d} min"


def mmhg(value: float | None) -> str:
    """``34.2 mmHg``; ``—`` when unknown."""
    return DASH if value is None else f"{value:.1f} mmHg"


def percent(value: float | None) -> str:
    """``62 %``; ``—`` when unknown."""
    return DASH if value is None else f"{value:.0f} %"


def day(value: date | None) -> str:
    """``Tue 18 Nov``."""
    return DASH if value is None else value.strftime("%a %d %b")


def ago(moment: datetime | None, now: datetime) -> str:
    """``5 min ago``, ``3 h ago``, ``2 days ago``; unknown: longer ago than the monitor looks (a day)."""
    if moment is None:
        return "more than a day ago"
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def local(moment: datetime | None, zone: object) -> str:
    """``2025-11-18 14:32`` in the clinic's time zone."""
    if moment is None:
        return DASH
    from zoneinfo import ZoneInfo

    tz = zone if isinstance(zone, ZoneInfo) else ZoneInfo(str(zone))
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def number(value: float | int | None, digits: int = 0) -> str:
    """``12`` / ``12.5``; ``—`` when unknown."""
    return DASH if value is None else f"{value:.{digits}f}"


def install(env: Environment) -> None:
    """Register the filters on a Jinja environment."""
    env.filters.update(hours=hours, minutes=minutes, mmhg=mmhg, percent=percent, day=day, ago=ago, local=local,
                       number=number)  # fmt: skip
