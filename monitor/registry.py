"""Who is monitored, from the device registry: each patient's clinic time zone, physio and current prescription.

Read through the registry's own service (as the system), so the monitor sees
exactly what the API shows. Whatever keeps a patient from being monitored
fully (no physio, an inactive physio, a physio whose e-mail address is not
one plain address, no prescription, a prescription missing a field, several
garment kinds) goes into ``PatientContext.problems``: it is logged and
reported to the clinic, never a crash. A physio's name is display text only
(``monitor.recipients.display_name``); the checked address alone decides
where e-mails go.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from devices.registry import schemas as s
from devices.registry.errors import NotFoundError
from devices.registry.service import SYSTEM, Registry
from monitor.model import BootRx, Garment, PatientContext, RxVersion, SockRx
from monitor.recipients import AddressError, checked_address, display_name


def load_contexts(registry: Registry, now: datetime | None = None) -> list[PatientContext]:
    """Every patient of every clinic, with what the monitor needs (sorted by patient code)."""
    return _contexts(registry, now or datetime.now(UTC), None)


def load_context(registry: Registry, code: str, now: datetime | None = None) -> PatientContext | None:
    """One patient's context, as :func:`load_contexts` gives it (``None``: no such patient), reading that patient's
    rows only (the workspace's patient page and the exports: not the whole registry for one patient)."""
    try:
        found = _contexts(registry, now or datetime.now(UTC), code)
    except NotFoundError:
        return None
    return found[0] if found else None


def _contexts(registry: Registry, now: datetime, code: str | None) -> list[PatientContext]:
    clinics = {c.code: c for c in registry.list_clinics(SYSTEM)}
    physios = {p.email: p for p in registry.list_physios(SYSTEM)}
    prescriptions: dict[str, list[s.PrescriptionOut]] = defaultdict(list)
    for rx in registry.list_prescriptions(SYSTEM, patient=code):
        prescriptions[rx.patient].append(rx)
    holding: dict[str, list[str]] = defaultdict(list)
    garments: dict[str, list[Garment]] = defaultdict(list)
    now_ms = int(now.timestamp() * 1000)
    for a in registry.list_assignments(SYSTEM, patient=code):
        start, end = _ms(a.valid_from), _ms(a.valid_to) if a.valid_to else None
        garments[a.patient].append(Garment(a.device_id, a.leg or "", start, end))
        if start <= now_ms and (end is None or now_ms < end):
            holding[a.patient].append(a.device_id)
    contexts = []
    for patient in _patients(registry, code):
        tz = clinics[patient.clinic].timezone
        today = now.astimezone(ZoneInfo(tz)).date()
        physio = physios.get(patient.physio) if patient.physio else None
        current = _current(prescriptions[patient.code], today)
        ctx = _context(patient, tz, physio, current, tuple(sorted(holding[patient.code])))
        worn_now = [g for g in garments[patient.code] if g.device in ctx.devices]
        legs = _legs_problem(current[0].legs if current else None, worn_now)
        contexts.append(replace(ctx, versions=_versions(prescriptions[patient.code], ctx.kind),
                                garments=tuple(garments[patient.code]),
                                problems=ctx.problems + ((legs,) if legs else ())))  # fmt: skip
    return contexts


def _patients(registry: Registry, code: str | None) -> list[s.PatientOut]:
    return registry.list_patients(SYSTEM) if code is None else [registry.get_patient(SYSTEM, code)]


class Contexts:
    """:func:`load_contexts`, read again only when it could give something else: the registry changed (its
    ``version``, the newest audit id: every change is audited) or the time passed a moment the contexts depend
    on (a local midnight of a clinic, where today's prescription is chosen; an assignment's start or end). At
    10,000 patients a read costs about 12 s of CPU, most of an evaluation's when little else changed."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.reads = 0
        self._kept: tuple[int, int, list[PatientContext]] | None = None  # version, valid until (ms), contexts

    def get(self, now: datetime | None = None) -> list[PatientContext]:
        now = now or datetime.now(UTC)
        now_ms = _ms(now)
        version = self.registry.version()  # before reading: a change made meanwhile is read next time
        if self._kept is not None and self._kept[0] == version and now_ms < self._kept[1]:
            return self._kept[2]
        contexts = load_contexts(self.registry, now)
        self.reads += 1
        self._kept = (version, valid_until(contexts, now), contexts)
        return contexts


def valid_until(contexts: list[PatientContext], now: datetime) -> int:
    """The first moment after ``now`` (ms) at which :func:`load_contexts` may give other contexts with the registry
    unchanged: the next local midnight of any patient's clinic, an assignment starting or ending."""
    now_ms = _ms(now)
    moments = []
    for tz in {c.timezone for c in contexts}:
        local = now.astimezone(ZoneInfo(tz))
        moments.append(_ms(datetime.combine(local.date() + timedelta(days=1), time(), ZoneInfo(tz))))
    for c in contexts:
        moments += [m for g in c.garments for m in (g.from_ms, g.to_ms) if m is not None and m > now_ms]
    return min(moments, default=now_ms + 3_600_000)


def _address(physio: s.PhysioOut | None) -> str | AddressError | None:
    """The physio's address if it is one plain address (the only thing that becomes a recipient), else why not."""
    if physio is None:
        return None
    try:
        return checked_address(physio.email)
    except AddressError as exc:
        return exc
def _legs_problem(prescribed: str | None, worn_now: list[Garment]) -> str:
    """What the prescription's legs and the garments worn now disagree on ("" when nothing, or nothing recorded)."""
    legs = {g.leg for g in worn_now if g.leg}
    if not prescribed or not legs:
        return ""
    covered = {"left", "right"} if "both" in legs else legs
    wanted = {"left", "right"} if prescribed == "both" else {prescribed}
    missing = sorted(wanted - covered)
    if not missing:
        return ""
    where = f"the {' and '.join(missing)} leg{'s' if len(missing) > 1 else ''}"
    return f"prescribed for {where}, but no garment is recorded there (garments on: {', '.join(sorted(legs))})"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _versions(rxs: list[s.PrescriptionOut], kind: str | None) -> tuple[RxVersion, ...]:
    """Every usable version of the patient's prescription of ``kind``, oldest first (unusable ones are gaps)."""
    out = []
    for rx in sorted(rxs, key=lambda r: r.valid_from):
        if rx.garment_kind != kind:
            continue
        try:
            out.append(RxVersion(rx.id, rx.valid_from, rx.valid_to, _sock(rx) if kind == "sock" else _boot(rx)))
        except ValueError:
            continue  # reported for the current version in problems; an old broken one leaves its days unjudged
    return tuple(out)


def _current(rxs: list[s.PrescriptionOut], today: date) -> list[s.PrescriptionOut]:
    return [rx for rx in rxs if rx.valid_from <= today and (rx.valid_to is None or today <= rx.valid_to)]


def _context(
    patient: s.PatientOut,
    tz: str,
    physio: s.PhysioOut | None,
    current: list[s.PrescriptionOut],
    devices: tuple[str, ...],
) -> PatientContext:
    problems: list[str] = []
    address = _address(physio)
    if physio is None:
        problems.append("no responsible physio: alerts cannot be sent")
    elif isinstance(address, AddressError):
        problems.append(f"responsible physio's e-mail address {physio.email!r} cannot be used ({address}): "
                        "alerts cannot be sent")  # fmt: skip
    elif not physio.active:
        problems.append(f"responsible physio {physio.email} is inactive: alerts cannot be sent")
    if not devices:
        problems.append("no garment assigned")
    rx, rx_problems = _prescription(current)
    problems += rx_problems
    reachable = physio is not None and physio.active and isinstance(address, str)
    return PatientContext(
        patient=patient.code,
        clinic=patient.clinic,
        timezone=tz,
        kind="sock" if isinstance(rx, SockRx) else "boot" if isinstance(rx, BootRx) else None,
        rx=rx,
        physio_email=physio.email if reachable and physio else None,
        physio_name=display_name(physio.name) if reachable and physio else None,
        devices=devices,
        max_silence_hours=current[0].max_silence_hours if current else 24.0,
        problems=tuple(problems),
    )


def _prescription(current: list[s.PrescriptionOut]) -> tuple[SockRx | BootRx | None, list[str]]:
    if not current:
        return None, ["no current prescription: wear and pressure cannot be judged"]
    problems = []
    if len(current) > 1:
        kinds = ", ".join(sorted(rx.garment_kind for rx in current))
        problems.append(f"several garment kinds prescribed ({kinds}): monitoring the {current[0].garment_kind} only")
    rx = current[0]
    try:
        return (_sock(rx) if rx.garment_kind == "sock" else _boot(rx)), problems
    except ValueError as exc:
        return None, [*problems, f"prescription #{rx.id} cannot be used: {exc}"]


def _need(value: float | int | None, name: str) -> float:
    if value is None:
        raise ValueError(f"{name} is missing")
    return float(value)


def _sock(rx: s.PrescriptionOut) -> SockRx:
    return SockRx(low_mmhg=_need(rx.ankle_min_mmhg, "ankle_min_mmhg"),
                  high_mmhg=_need(rx.ankle_max_mmhg, "ankle_max_mmhg"),
                  wear_hours_per_day=_need(rx.wear_hours_per_day, "wear_hours_per_day"),
                  wear_days_per_week=int(rx.wear_days_per_week or 7), zones=tuple(rx.zones),
                  tolerance_s=rx.out_of_range_tolerance_minutes * 60.0)  # fmt: skip


def _boot(rx: s.PrescriptionOut) -> BootRx:
    return BootRx(sessions_per_week=int(_need(rx.sessions_per_week, "sessions_per_week")),
                  session_min_s=_need(rx.session_min_minutes, "session_min_minutes") * 60.0,
                  session_max_s=_need(rx.session_max_minutes, "session_max_minutes") * 60.0,
                  max_chamber_mmhg=_need(rx.max_chamber_mmhg, "max_chamber_mmhg"), zones=tuple(rx.zones))  # fmt: skip
