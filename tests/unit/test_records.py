"""The FHIR export and the report from hand-made read models: socks with two legs and a prescription change, boots.

No server: the read model is the export's only input (records.model). Every bundle is validated by the library
(fhirclient, strict) and by FHIR.js (tests/fhirjs), read back through the library, and the PDF is rendered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from records import codes, fhir, report
from records.fhirread import expected_days, read_days
from records.model import (
    DayFigures,
    EpisodeAction,
    EpisodeRecord,
    Garment,
    GarmentUse,
    LegFigures,
    PatientRecord,
    PatientRef,
    Period,
    PeriodError,
    PrescriptionVersion,
)
from records.settings import RecordsSettings

ROOT = Path(__file__).resolve().parents[2]
TZ = ZoneInfo("Europe/Berlin")
MARCH = Period.month("2025-03")


def _day(d: date, **kw: object) -> DayFigures:
    start = datetime.combine(d, datetime.min.time(), TZ)
    return DayFigures(d, start, datetime.combine(d + timedelta(days=1), datetime.min.time(), TZ), **kw)  # type: ignore[arg-type]


def sock_record(names: bool = False) -> PatientRecord:
    days = []
    for d in MARCH.days():
        if d.day in (5, 6):
            days.append(_day(d, points=0, wear_s=0.0, target_s=28800.0, flags=("silent",)))
            continue
        legs = (LegFigures("left", 30000.5, 60.0, 0.0, 1900.0, (("ankle", 24.25),)),
                LegFigures("right", 29000.0, 0.0, 120.0, 0.0, (("ankle", 26.0),))) if d.day > 20 else ()  # fmt: skip
        days.append(_day(d, points=700 + d.day, wear_s=27000.0 + 137.33 * d.day, target_s=28800.0 if d.day < 15
                         else 21600.0, band_low_mmhg=23.0, band_high_mmhg=32.0,
                         median_mmhg=(("ankle", 25.0 + d.day / 10), ("calf", 19.123456)), above_band_s=61.0,
                         below_band_s=0.0, reversed_gradient_s=1900.0 if d.day % 3 == 0 else 0.0,
                         flags=("rolled_down",) if d.day % 3 == 0 else ("compliant",), legs=legs))  # fmt: skip
    rx1 = PrescriptionVersion(11, "sock", date(2025, 2, 1), date(2025, 3, 14), datetime(2025, 2, 1, 9, tzinfo=UTC),
                              "ral", "2", 23.0, 32.0, ("ankle", "calf"), 8.0, 7)  # fmt: skip
    rx2 = PrescriptionVersion(12, "sock", date(2025, 3, 15), None, datetime(2025, 3, 14, 16, tzinfo=UTC), "ral", "2",
                              23.0, 32.0, ("ankle", "calf"), 6.0, 5, leg="both", supersedes=11)  # fmt: skip
    episodes = (
        EpisodeRecord(3, "rolled_down", "warning", date(2025, 3, 3), date(2025, 3, 30), None,
                      (EpisodeAction("acknowledge", datetime(2025, 3, 4, 8, tzinfo=UTC), "Ann Lee",
                                     "the top rolls at the knee; new size ordered"),
                       EpisodeAction("snooze", datetime(2025, 3, 4, 8, 5, tzinfo=UTC), "Ann Lee", "until the new size",
                                     until=date(2025, 3, 12)))),
        EpisodeRecord(4, "silent", "warning", date(2025, 3, 5), date(2025, 3, 6), date(2025, 3, 7),
                      (EpisodeAction("monitor", datetime(2025, 3, 7, 1, tzinfo=UTC), "monitor", "readings resumed"),)),
    )  # fmt: skip
    return PatientRecord(
        PatientRef("PT-1A2B3C", "clinic-a", "Clinic A", "Europe/Berlin", "Ada Example" if names else None),
        MARCH, datetime(2025, 4, 1, 7, tzinfo=UTC),
        garments=(Garment("sock-L", "sock", ("ankle", "calf"), "SN-1", "2.1"), Garment("sock-R", "sock", ("ankle",))),
        uses=(GarmentUse(1, "sock-L", datetime(2025, 2, 1, tzinfo=UTC), None, "left"),
              GarmentUse(2, "sock-R", datetime(2025, 3, 20, tzinfo=UTC), None, "right")),
        prescriptions=(rx1, rx2), days=tuple(days), episodes=episodes,
    )  # fmt: skip


def boot_record() -> PatientRecord:
    days = [_day(d, points=0 if d.day == 9 else 90, wear_s=1500.0, sessions=0 if d.day == 9 else 1,
                 session_durations_s=() if d.day == 9 else (1500.0 - d.day,), peak_mmhg=None if d.day == 9 else 58.5,
                 max_chamber_mmhg=60.0, flags=("silent",) if d.day == 9 else ("compliant",))
            for d in MARCH.days()]  # fmt: skip
    rx = PrescriptionVersion(20, "boot", date(2025, 1, 1), None, datetime(2025, 1, 1, tzinfo=UTC),
                             sessions_per_week=7, session_min_minutes=20, session_max_minutes=30,
                             max_chamber_mmhg=60.0, zones=("foot",))  # fmt: skip
    use = GarmentUse(5, "boot-1", datetime(2024, 12, 30, tzinfo=UTC), None)
    return PatientRecord(PatientRef("PT-B00T", "clinic-a", "Clinic A", "Europe/Berlin"), MARCH,
                         datetime(2025, 4, 1, 7, tzinfo=UTC), (Garment("boot-1", "boot", ("foot", "calf")),),
                         (use,), (rx,), tuple(days))  # fmt: skip


def _fhirjs(paths: list[Path]) -> dict[str, object]:
    node = shutil.which("node")
    assert node and (ROOT / "tests/fhirjs/node_modules/fhir").is_dir(), "FHIR.js not installed: run scripts/bootstrap"
    done = subprocess.run([node, str(ROOT / "tests/fhirjs/validate.js"), *map(str, paths)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return dict(json.loads(done.stdout), returncode=done.returncode)


@pytest.mark.parametrize("make", [sock_record, boot_record])
def test_bundles_validate_and_round_trip(make: object, tmp_path: Path) -> None:
    record = make()  # type: ignore[operator]
    bundle = fhir.bundle(record, RecordsSettings())
    assert read_days(json.loads(json.dumps(bundle))) == expected_days(record)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    result = _fhirjs([path])
    assert result["returncode"] == 0 and result["errors"] == []
    assert result["resources"] == 1 + len(bundle["entry"])


def test_a_broken_resource_is_refused_by_both_validators(tmp_path: Path) -> None:
    bad = {"resourceType": "Observation", "status": "finished", "code": {"text": "x"}, "valueQuantity": {"value": "1"}}
    with pytest.raises(fhir.InvalidResourceError):
        fhir.validated({"resourceType": "Observation", "code": {"text": "x"}})  # no status: required
    with pytest.raises(fhir.InvalidResourceError):
        fhir.validated({**bad, "status": "final", "bogus": 1})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = _fhirjs([path])
    assert result["returncode"] == 1 and result["errors"]


def test_legs_become_member_observations_and_versions_replace_each_other() -> None:
    record = sock_record()
    bundle = fhir.bundle(record, RecordsSettings())
    observations = list(fhir.entries(bundle, "Observation"))
    legs = [o for o in observations if "bodySite" in o]
    assert len(legs) == 2 * 11  # March 21-31, left and right
    day21 = next(o for o in observations if "hasMember" in o and fhir.day_of(o) == date(2025, 3, 21))
    assert {m["reference"] for m in day21["hasMember"]} == {f"urn:uuid:{o['id']}" for o in legs
                                                           if fhir.day_of(o) == date(2025, 3, 21)}  # fmt: skip
    requests = {r["identifier"][0]["value"]: r for r in fhir.entries(bundle, "DeviceRequest")}
    prior = [{"reference": f"urn:uuid:{requests['11']['id']}", "type": "DeviceRequest"}]
    assert requests["12"]["priorRequest"] == prior
    assert requests["11"]["status"] == "completed" and requests["12"]["status"] == "active"
    # Days without data have no Observation; the silent episode is over, so only the open one is a Flag.
    assert len(observations) - len(legs) == 29
    assert [f["code"]["coding"][0]["code"] for f in fhir.entries(bundle, "Flag")] == ["rolled_down"]


def test_no_name_leaves_unless_the_clinic_configured_it() -> None:
    plain = json.dumps(fhir.bundle(sock_record(), RecordsSettings()))
    assert "Ada" not in plain and "urn:compression-telemetry:clinic:clinic-a:patient-code" in plain
    settings = RecordsSettings(names_for_clinics=["clinic-a"],
                               patient_identifier_systems={"clinic-a": "https://a.example/sid/code"})  # fmt: skip
    named = fhir.bundle(sock_record(names=True), settings)
    device_use = next(fhir.entries(named, "DeviceUseStatement"))
    assert device_use["subject"] == {"type": "Patient", "display": "Ada Example",
                                     "identifier": {"system": "https://a.example/sid/code", "value": "PT-1A2B3C"}}
    with pytest.raises(ValueError, match="absolute"):
        RecordsSettings(patient_identifier_systems={"clinic-a": "not a uri"})


def test_the_same_export_twice_has_the_same_ids() -> None:
    one, two = (fhir.bundle(sock_record(), RecordsSettings()) for _ in range(2))
    assert [e["fullUrl"] for e in one["entry"]] == [e["fullUrl"] for e in two["entry"]]


def test_code_systems_are_valid_and_complete() -> None:
    for identifier in codes.CODE_SYSTEM_IDS:
        resource = fhir.validated(codes.code_system(identifier))
        assert resource["count"] == len(resource["concept"])
    used = json.dumps(fhir.bundle(sock_record(), RecordsSettings())) + json.dumps(fhir.bundle(boot_record(),
                                                                                               RecordsSettings()))
    assert codes.COMPRESSION in used and codes.FLAG in used


def test_periods() -> None:
    assert Period.month("2024-02").length == 29
    with pytest.raises(PeriodError):
        Period(date(2025, 3, 2), date(2025, 3, 1))
    with pytest.raises(PeriodError):
        Period(date(2025, 1, 1), date(2025, 12, 31))
    with pytest.raises(PeriodError):
        Period.month("2025-13")


def test_summary_and_csv() -> None:
    record = sock_record()
    s = report.summarise(record)
    assert (s.days_complete, s.data_days, s.rtm_met) == (31, 29, True)
    assert s.target_days == sum(1 for d in record.days if d.has_data and d.wear_s >= (d.target_s or 0))
    lines = report.csv_text(record).splitlines()
    assert lines[0].split(",") == list(report.CSV_COLUMNS) and len(lines) == 32
    assert lines[5].split(",")[:3] == ["2025-03-05", "0", "0.0"]
    boot = report.summarise(boot_record())
    assert (boot.kind, boot.target_days, boot.sessions) == ("boot", 30, 30)


@pytest.mark.parametrize("make", [sock_record, boot_record])
def test_the_pdf_renders_with_its_figures(make: object, tmp_path: Path) -> None:
    record = make()  # type: ignore[operator]
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(report.pdf(record))
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                                   check=True).stdout.split())  # fmt: skip
    s = report.summarise(record)
    assert f"Days with data {s.data_days} of {s.days_monitored}" in text
    assert "Adherence report, March 2025" in text and record.patient.code in text
    if s.kind == "sock":
        assert "the top rolls at the knee" in text and "Snoozed until 12 Mar" in text
        assert "target 8 h a day, 6 h a day from 15 Mar" in text
    subprocess.run(["pdftoppm", "-r", "60", "-png", str(pdf), str(tmp_path / "page")], check=True)
    assert (tmp_path / "page-1.png").stat().st_size > 10_000
