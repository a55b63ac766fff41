"""A patient's record for a period as a FHIR R4 (4.0.1) Bundle, validated by the library before it leaves.

What goes in (docs/records.md):

- ``Device`` per garment held in the period: kind, sensor zones, the compression class of the prescription and
  the leg it is worn on when recorded (``Device.property``), serial number and firmware.
- ``DeviceUseStatement`` per assignment: which garment, from when to when, on which leg.
- ``Observation`` per patient-day with data (category ``therapy``): wear minutes against the target, the median
  pressure per zone in ``mm[Hg]`` against the band, minutes above and below the band and with a reversed gradient,
  boot sessions and their lengths and the peak chamber pressure against the maximum; the day's flags as its
  ``interpretation``. Per-leg figures (issue 11) become member Observations with a ``bodySite``.
- ``Flag`` per open episode; ``DeviceRequest`` per prescription version (``priorRequest``: the version before).

The patient is never a resource here: every ``subject`` is a logical reference by the pseudonymous code under the
clinic's identifier system (``RecordsSettings.patient_system``); a display name only where the clinic configured
it. Resources get stable ids (UUID v5 of the patient code and what they describe), so exporting the same period
twice gives the same ids and a receiving system can update rather than duplicate.

The library: ``fhirclient`` (SMART on FHIR's client-py), whose model classes are generated from the FHIR
4.0.1 structure definitions. Every resource is built as JSON by the small functions below and then parsed
by the library with ``strict=True`` (element names, types, cardinality, required elements): an export the library
would refuse is never returned (:class:`InvalidResourceError`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any, Final

from fhirclient.models.bundle import Bundle as FhirBundle
from fhirclient.models.fhirabstractbase import FHIRValidationError
from fhirclient.models.fhirelementfactory import FHIRElementFactory

from records import codes as c
from records.model import DayFigures, EpisodeRecord, Garment, GarmentUse, LegFigures, PatientRecord, PrescriptionVersion
from records.settings import RecordsSettings

FHIR_VERSION: Final = "4.0.1"
_NAMESPACE: Final = uuid.UUID("0f1c9e52-8f3c-4a57-9d8e-6c2b7f6f0e41")  # the export's own UUID v5 namespace
Json = dict[str, Any]


class InvalidResourceError(ValueError):
    """A resource the FHIR library refused: a bug of the export, never sent out."""


def _id(record: PatientRecord, *parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join([record.patient.clinic, record.patient.code, *map(str, parts)])))


def _ref(resource: Json) -> Json:
    return {"reference": f"urn:uuid:{resource['id']}", "type": resource["resourceType"]}


def _instant(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


def patient_reference(record: PatientRecord, settings: RecordsSettings) -> Json:
    """The subject of every resource: the pseudonymous code under the clinic's system, no resource, no name."""
    ref: Json = {"type": "Patient", "identifier": {"system": settings.patient_system(record.patient.clinic),
                                                   "value": record.patient.code}}  # fmt: skip
    if record.patient.display_name:
        ref["display"] = record.patient.display_name
    return ref


# --- resources ------------------------------------------------------------------------------------------------------


def device(record: PatientRecord, g: Garment) -> Json:
    """The garment: kind, zones, class and leg in the period, serial and firmware."""
    props: list[Json] = [{"type": c.concept(c.COMPRESSION, "sensor-zones"),
                          "valueCode": [c.concept(c.COMPRESSION, f"zone-{z}") for z in g.zones]}] if g.zones else []
    rx = next((p for p in record.prescriptions if p.kind == g.kind), None)
    klass = c.class_code(rx.class_system, rx.class_name) if rx else None
    if klass:
        props.append({"type": c.concept(c.COMPRESSION, "compression-class"),
                      "valueCode": [c.concept(c.COMPRESSION, klass)]})  # fmt: skip
    legs = sorted({u.leg for u in record.uses if u.device_id == g.device_id and u.leg})
    if legs:
        props.append({"type": c.concept(c.COMPRESSION, "leg"),
                      "valueCode": [c.concept(c.COMPRESSION, f"leg-{leg}") for leg in legs]})  # fmt: skip
    out: Json = {"resourceType": "Device", "id": _id(record, "device", g.device_id),
                 "identifier": [{"system": c.DEVICE_ID_SYSTEM, "value": g.device_id}],
                 "status": "inactive" if g.revoked else "active", "type": c.concept(c.COMPRESSION, g.kind)}  # fmt: skip
    if g.serial:
        out["serialNumber"] = g.serial
    if g.firmware:
        out["version"] = [{"value": g.firmware}]
    if props:
        out["property"] = props
    return out


def device_use(record: PatientRecord, u: GarmentUse, subject: Json, devices: dict[str, Json]) -> Json:
    """One assignment: the garment on the patient from ``start`` to ``end``."""
    period: Json = {"start": _instant(u.start)}
    if u.end is not None:
        period["end"] = _instant(u.end)
    out: Json = {"resourceType": "DeviceUseStatement", "id": _id(record, "use", u.id),
                 "identifier": [{"system": c.ASSIGNMENT_ID_SYSTEM, "value": str(u.id)}],
                 "status": "active" if u.end is None or u.end > record.generated_at else "completed",
                 "subject": subject, "timingPeriod": period, "device": _ref(devices[u.device_id])}  # fmt: skip
    if u.leg:
        out["bodySite"] = c.concept(c.COMPRESSION, f"leg-{u.leg}")
    return out


def _minutes(seconds: float) -> Json:
    return c.quantity(seconds / 60.0, "min")


def _component(code: str, value: Json | int | bool, reference: Json | None = None) -> Json:
    out: Json = {"code": c.concept(c.COMPRESSION, code)}
    if isinstance(value, bool):
        out["valueBoolean"] = value
    elif isinstance(value, int):
        out["valueInteger"] = value
    else:
        out["valueQuantity"] = value
    if reference:
        out["referenceRange"] = [reference]
    return out


def _band(low: float | None, high: float | None) -> Json | None:
    out: Json = {}
    if low is not None:
        out["low"] = c.quantity(low, "mm[Hg]")
    if high is not None:
        out["high"] = c.quantity(high, "mm[Hg]")
    return out or None


def day_components(d: DayFigures) -> list[Json]:
    """The figures of one day as Observation components (the order is the reading order of the report)."""
    out = [_component("data-points", d.points)]
    target = {"low": _minutes(d.target_s), "text": "prescribed wear"} if d.target_s is not None else None
    out.append(_component("wear-time", _minutes(d.wear_s), target))
    if d.target_met is not None:
        out.append(_component("wear-target-met", d.target_met))
    for zone, median in d.median_mmhg:
        band = _band(d.band_low_mmhg, d.band_high_mmhg) if zone == "ankle" else None
        out.append(_component(f"pressure-median-{zone}", c.quantity(median, "mm[Hg]"), band))
    if d.target_s is not None:  # a sock day
        out += [_component("time-above-band", _minutes(d.above_band_s)),
                _component("time-below-band", _minutes(d.below_band_s)),
                _component("reversed-gradient-time", _minutes(d.reversed_gradient_s))]  # fmt: skip
    if d.target_s is None:  # a boot day
        out.append(_component("sessions", d.sessions))
        out += [_component("session-duration", _minutes(s)) for s in d.session_durations_s]
        if d.peak_mmhg is not None:
            out.append(_component("peak-chamber-pressure", c.quantity(d.peak_mmhg, "mm[Hg]"),
                                  _band(None, d.max_chamber_mmhg)))  # fmt: skip
    return out


def _leg_components(leg: LegFigures, d: DayFigures) -> list[Json]:
    out = [_component("wear-time", _minutes(leg.wear_s))]
    for zone, median in leg.median_mmhg:
        band = _band(d.band_low_mmhg, d.band_high_mmhg) if zone == "ankle" else None
        out.append(_component(f"pressure-median-{zone}", c.quantity(median, "mm[Hg]"), band))
    out += [_component("time-above-band", _minutes(leg.above_band_s)),
            _component("time-below-band", _minutes(leg.below_band_s)),
            _component("reversed-gradient-time", _minutes(leg.reversed_gradient_s))]  # fmt: skip
    return out


def day_observations(record: PatientRecord, d: DayFigures, subject: Json, devices: dict[str, Json]) -> list[Json]:
    """The day's Observation, and one per leg (its members) when the day has per-leg figures."""
    base: Json = {"resourceType": "Observation", "status": "final",
                  "category": [{"coding": [{"system": c.OBSERVATION_CATEGORY, "code": "therapy",
                                            "display": "Therapy"}]}],
                  "code": c.concept(c.COMPRESSION, "daily-use"), "subject": subject,
                  "effectivePeriod": {"start": _instant(d.start), "end": _instant(d.end)}}  # fmt: skip
    worn = [u.device_id for u in record.uses if u.start < d.end and (u.end is None or u.end > d.start)]
    legs = [{**base, "id": _id(record, "day", d.day, leg.leg), "bodySite": c.concept(c.COMPRESSION, f"leg-{leg.leg}"),
             "component": _leg_components(leg, d)} for leg in d.legs]  # fmt: skip
    day: Json = {**base, "id": _id(record, "day", d.day), "component": day_components(d)}
    if len(set(worn)) == 1 and worn[0] in devices:
        day["device"] = _ref(devices[worn[0]])
    if d.flags:
        day["interpretation"] = [c.concept(c.FLAG, f) for f in d.flags]
    if legs:
        day["hasMember"] = [_ref(leg) for leg in legs]
    return [day, *legs]


def flag(record: PatientRecord, e: EpisodeRecord, subject: Json) -> Json:
    """An open episode as a Flag: what, since when; urgent (critical) ones also under ``safety``."""
    categories = [{"coding": [{"system": c.FLAG_CATEGORY, "code": "clinical", "display": "Clinical"}]}]
    if e.severity == "critical":
        categories.append({"coding": [{"system": c.FLAG_CATEGORY, "code": "safety", "display": "Safety"}]})
    return {"resourceType": "Flag", "id": _id(record, "episode", e.id),
            "identifier": [{"system": c.EPISODE_ID_SYSTEM, "value": str(e.id)}], "status": "active",
            "category": categories, "code": c.concept(c.FLAG, e.flag), "subject": subject,
            "period": {"start": e.start_day.isoformat()}}  # fmt: skip


def _parameters(p: PrescriptionVersion) -> list[Json]:
    out: list[Json] = []
    klass = c.class_code(p.class_system, p.class_name)
    if klass:
        out.append({"code": c.concept(c.COMPRESSION, "compression-class"),
                    "valueCodeableConcept": c.concept(c.COMPRESSION, klass)})  # fmt: skip
    if p.band_low_mmhg is not None and p.band_high_mmhg is not None:
        out.append({"code": c.concept(c.COMPRESSION, "ankle-pressure-band"),
                    "valueRange": _band(p.band_low_mmhg, p.band_high_mmhg)})  # fmt: skip
    if p.wear_hours_per_day is not None:
        out.append({"code": c.concept(c.COMPRESSION, "wear-hours-per-day"),
                    "valueQuantity": c.quantity(p.wear_hours_per_day, "h")})  # fmt: skip
    if p.wear_days_per_week is not None:
        out.append({"code": c.concept(c.COMPRESSION, "wear-days-per-week"),
                    "valueQuantity": c.quantity(p.wear_days_per_week, "/wk")})  # fmt: skip
    if p.kind == "sock":
        out.append({"code": c.concept(c.COMPRESSION, "out-of-band-tolerance"),
                    "valueQuantity": c.quantity(p.tolerance_minutes, "min")})  # fmt: skip
    if p.sessions_per_week is not None:
        out.append({"code": c.concept(c.COMPRESSION, "sessions-per-week"),
                    "valueQuantity": c.quantity(p.sessions_per_week, "/wk")})  # fmt: skip
    if p.session_min_minutes is not None and p.session_max_minutes is not None:
        out.append({"code": c.concept(c.COMPRESSION, "session-length"),
                    "valueRange": {"low": c.quantity(p.session_min_minutes, "min"),
                                   "high": c.quantity(p.session_max_minutes, "min")}})  # fmt: skip
    if p.max_chamber_mmhg is not None:
        out.append({"code": c.concept(c.COMPRESSION, "max-chamber-pressure"),
                    "valueQuantity": c.quantity(p.max_chamber_mmhg, "mm[Hg]")})  # fmt: skip
    out += [{"code": c.concept(c.COMPRESSION, "sensor-zones"),
             "valueCodeableConcept": c.concept(c.COMPRESSION, f"zone-{z}")} for z in p.zones]  # fmt: skip
    return out


def device_request(record: PatientRecord, p: PrescriptionVersion, subject: Json) -> Json:
    """One prescription version: the garment kind ordered, when in force, and its targets as parameters."""
    today = record.generated_at.date()
    period: Json = {"start": p.valid_from.isoformat()}
    if p.valid_to is not None:
        period["end"] = p.valid_to.isoformat()
    out: Json = {"resourceType": "DeviceRequest", "id": _id(record, "rx", p.id),
                 "identifier": [{"system": c.PRESCRIPTION_ID_SYSTEM, "value": str(p.id)}],
                 "status": "active" if p.valid_to is None or p.valid_to >= today else "completed",
                 "intent": "order", "codeCodeableConcept": c.concept(c.COMPRESSION, p.kind), "subject": subject,
                 "occurrencePeriod": period, "authoredOn": _instant(p.created_at)}  # fmt: skip
    params = _parameters(p)
    if p.leg:
        params.append({"code": c.concept(c.COMPRESSION, "leg"),
                       "valueCodeableConcept": c.concept(c.COMPRESSION, f"leg-{p.leg}")})  # fmt: skip
    if params:
        out["parameter"] = params
    if p.supersedes is not None and any(v.id == p.supersedes for v in record.prescriptions):
        prior = f"urn:uuid:{_id(record, 'rx', p.supersedes)}"
        out["priorRequest"] = [{"reference": prior, "type": "DeviceRequest"}]
    return out


# --- the bundle -----------------------------------------------------------------------------------------------------


def resources(record: PatientRecord, settings: RecordsSettings) -> list[Json]:
    """Every resource of the record, in the bundle's order."""
    subject = patient_reference(record, settings)
    devices = {g.device_id: device(record, g) for g in record.garments}
    out: list[Json] = list(devices.values())
    out += [device_use(record, u, subject, devices) for u in record.uses if u.device_id in devices]
    out += [device_request(record, p, subject) for p in record.prescriptions]
    for d in record.days:
        if d.has_data:
            out += day_observations(record, d, subject, devices)
    out += [flag(record, e, subject) for e in record.episodes if e.open]
    return out


def bundle(record: PatientRecord, settings: RecordsSettings) -> Json:
    """The record as a validated ``collection`` Bundle (JSON-ready)."""
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": validated(r)} for r in resources(record, settings)]
    out: Json = {"resourceType": "Bundle", "id": _id(record, "bundle", record.period.start, record.period.end),
                 "meta": {"lastUpdated": _instant(record.generated_at)},
                 "identifier": {"system": settings.patient_system(record.patient.clinic),
                                "value": f"{record.patient.code}/{record.period.start}/{record.period.end}"},
                 "type": "collection", "timestamp": _instant(record.generated_at), "entry": entries}  # fmt: skip
    return validated(out)


def validated(resource: Json) -> Json:
    """``resource`` as the library reads and writes it back (strict): refused resources raise."""
    return parse(resource).as_json()  # type: ignore[no-any-return]


def parse(resource: Json) -> Any:
    """The library's model of ``resource`` (strict: unknown elements, wrong types, missing required elements fail)."""
    kind = resource.get("resourceType")
    if not isinstance(kind, str):
        raise InvalidResourceError("not a FHIR resource: no resourceType")
    try:
        model = FHIRElementFactory.instantiate(kind, resource)
        if type(model).__name__ != kind:
            raise InvalidResourceError(f"not a FHIR R4 resource type: {kind}")
        model.as_json()  # checks the required elements once more, on the way out
    except FHIRValidationError as exc:
        raise InvalidResourceError(f"{kind} {resource.get('id', '')} is not valid FHIR R4: {exc}") from exc
    return model


def parse_bundle(data: Json) -> FhirBundle:
    """A received Bundle as the library's model (every entry's resource parsed strictly)."""
    model = parse(data)
    if not isinstance(model, FhirBundle):
        raise InvalidResourceError("not a Bundle")
    return model


def entries(data: Json, kind: str) -> Iterable[Json]:
    """The JSON of every entry of ``kind`` in a Bundle."""
    for entry in data.get("entry", []):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == kind:
            yield resource


def day_of(observation: Json) -> date:
    """The local day an exported daily Observation is about."""
    return datetime.fromisoformat(observation["effectivePeriod"]["start"]).date()
