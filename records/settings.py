"""Settings of the clinical-record export: environment variables prefixed ``COMPRESSION_RECORDS_``.

Where the figures come from is the monitor's business: the export reads InfluxDB and the monitor's state database
with the monitor's own settings (``COMPRESSION_MONITOR_INFLUX_*``, ``COMPRESSION_MONITOR_STATE_DATABASE_URL``), and
the registry with the registry's. Only what is the clinic's choice is set here.
"""

from __future__ import annotations

import re
from typing import Final

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The patient identifier system of a clinic that configured none: a URN naming the clinic and the platform's code.
DEFAULT_PATIENT_SYSTEM: Final = "urn:compression-telemetry:clinic:{clinic}:patient-code"
_ABSOLUTE_URI: Final = re.compile(r"^(https?://[^\s]+|urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}:[^\s]+)$")


class RecordsSettings(BaseSettings):
    """What each clinic chose for the records it pulls: its identifier system, whether names may go along."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSION_RECORDS_", env_file=".env", extra="ignore")

    patient_identifier_systems: dict[str, str] = Field(default_factory=dict, description="Per clinic code, the identifier system URI (the clinic's own, e.g. https://clinic.example/fhir/sid/compression) under which the pseudonymous patient code goes into FHIR resources; JSON, e.g. {\"clinic-a\": \"https://clinic-a.example/sid/compression\"}. A clinic without one gets urn:compression-telemetry:clinic:<code>:patient-code.")  # noqa: E501
    names_for_clinics: list[str] = Field(default_factory=list, description="Clinic codes whose patients' display names may leave the registry (as the display text of the patient reference and on the PDF report); JSON list. Empty (the default): only the pseudonymous code leaves.")  # noqa: E501

    @field_validator("patient_identifier_systems")
    @classmethod
    def _absolute(cls, value: dict[str, str]) -> dict[str, str]:
        for clinic, system in value.items():
            if not _ABSOLUTE_URI.match(system):
                raise ValueError(f"the identifier system of clinic {clinic!r} is not an absolute http(s) URL or URN: "
                                 f"{system!r}")  # fmt: skip
        return value

    def patient_system(self, clinic: str) -> str:
        """The identifier system of ``clinic``'s patient codes."""
        return self.patient_identifier_systems.get(clinic) or DEFAULT_PATIENT_SYSTEM.format(clinic=clinic)

    def names_leave(self, clinic: str) -> bool:
        """May ``clinic``'s patients' display names go into exports?"""
        return clinic in self.names_for_clinics
