"""Compression classes and contraindications: the clinical tables the registry checks against.

Class tables give the ankle pressure band (mmHg) each class must deliver. The
standards differ: RAL-GZ 387 (Germany, most of Europe), BS 6612 (UK) and the
US ready-to-wear classes, which vendors label inconsistently; the US table here
is the one our simulators and most US fitters use (class 1 = 15-20 mmHg).
An explicit range replaces the table where a clinic prescribes in mmHg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

ClassSystem = Literal["ral", "uk", "us", "explicit"]
CLASS_SYSTEMS: Final[tuple[ClassSystem, ...]] = ("ral", "uk", "us", "explicit")

# (low, high) ankle mmHg per class; an open-ended top class gets a practical ceiling.
CLASS_TABLES: Final[dict[str, dict[str, tuple[float, float]]]] = {
    "ral": {"1": (18.0, 21.0), "2": (23.0, 32.0), "3": (34.0, 46.0), "4": (49.0, 70.0)},
    "uk": {"1": (14.0, 17.0), "2": (18.0, 24.0), "3": (25.0, 35.0)},
    "us": {"1": (15.0, 20.0), "2": (20.0, 30.0), "3": (30.0, 40.0), "4": (40.0, 50.0)},
}

# Consensus limits (e.g. Wounds UK best practice, 2015; SIGN 120): below 0.6 no
# compression; 0.6 to below 0.8 reduced compression only, taken here as at most
# this ankle pressure; above 1.3 the arteries may be calcified and the index unreliable.
ABPI_NO_COMPRESSION: Final = 0.6
ABPI_REDUCED_ONLY: Final = 0.8
ABPI_UNRELIABLE_ABOVE: Final = 1.3  # incompressible (calcified) arteries: the index says nothing about perfusion
REDUCED_COMPRESSION_MAX_MMHG: Final = 25.0

ContraindicationKind = Literal["abpi", "decompensated_heart_failure", "untreated_dvt", "severe_arterial_disease"]
CONTRAINDICATION_KINDS: Final[tuple[ContraindicationKind, ...]] = (
    "abpi",
    "decompensated_heart_failure",
    "untreated_dvt",
    "severe_arterial_disease",
)
ABSOLUTE: Final[dict[str, str]] = {
    "decompensated_heart_failure": "decompensated heart failure: compression would shift fluid to a failing heart",
    "untreated_dvt": "untreated deep-vein thrombosis: compression may dislodge the clot",
    "severe_arterial_disease": "severe peripheral arterial disease: compression may cause ischaemia",
}


class ClassError(ValueError):
    """A class that is not in its table, or an explicit range that is not a range."""


@dataclass(frozen=True, slots=True)
class Band:
    """A prescribed ankle pressure band in mmHg."""

    low_mmhg: float
    high_mmhg: float


def band_for(system: ClassSystem, class_name: str | None, low: float | None, high: float | None) -> Band:
    """The ankle band of a class, or of an explicit range (``system='explicit'``)."""
    if system == "explicit":
        if low is None or high is None:
            raise ClassError("an explicit class needs ankle_min_mmhg and ankle_max_mmhg")
        if not 0 < low < high <= 120:
            raise ClassError(f"explicit ankle range must satisfy 0 < min < max <= 120 mmHg, got {low}-{high}")
        return Band(low, high)
    table = CLASS_TABLES.get(system)
    if table is None:
        raise ClassError(f"unknown class system {system!r}; use one of {', '.join(CLASS_SYSTEMS)}")
    name = (class_name or "").strip().upper().removeprefix(system.upper()).removeprefix("CCL").removeprefix("CLASS")
    if name.strip() not in table:
        raise ClassError(f"{system.upper()} has classes {', '.join(table)}; got {class_name!r}")
    low_t, high_t = table[name.strip()]
    return Band(low_t, high_t)


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason a prescription conflicts with the patient's record."""

    kind: str
    explanation: str


def conflicts(contraindications: list[tuple[str, float | None]], garment_kind: str, band: Band | None) -> list[Finding]:
    """Every way a prescription conflicts with active contraindications ``(kind, abpi)``.

    ``band`` is the ankle band of a sock prescription; for a boot (intermittent
    pneumatic compression) only the absolute contraindications and the ABPI apply.
    """
    found = []
    for kind, abpi in contraindications:
        if kind in ABSOLUTE:
            found.append(Finding(kind, ABSOLUTE[kind]))
        elif kind == "abpi" and abpi is not None:
            finding = _abpi_finding(abpi, garment_kind, band)
            if finding is not None:
                found.append(finding)
    return found


def _abpi_finding(abpi: float, garment_kind: str, band: Band | None) -> Finding | None:
    if abpi > ABPI_UNRELIABLE_ABOVE:
        return Finding("abpi", f"ABPI {abpi:.2f} is above {ABPI_UNRELIABLE_ABOVE}: the arteries cannot be compressed "
                       "(calcified) and the ABPI is not reliable; assess perfusion otherwise (toe pressure / TBPI, "
                       "duplex) before compression")  # fmt: skip
    if abpi < ABPI_NO_COMPRESSION:
        return Finding("abpi", f"ABPI {abpi:.2f} is below {ABPI_NO_COMPRESSION}: no compression")
    if abpi < ABPI_REDUCED_ONLY:
        if garment_kind == "boot":
            return Finding("abpi", f"ABPI {abpi:.2f} is below {ABPI_REDUCED_ONLY}: reduced compression only, no boot")
        if band is not None and band.high_mmhg > REDUCED_COMPRESSION_MAX_MMHG:
            return Finding(
                "abpi",
                f"ABPI {abpi:.2f} is below {ABPI_REDUCED_ONLY}: reduced compression only "
                f"(at most {REDUCED_COMPRESSION_MAX_MMHG:g} mmHg at the ankle), prescribed up to {band.high_mmhg:g}",
            )
    return None
