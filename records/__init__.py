"""Into the clinical record: FHIR R4 export and the monthly adherence report (docs/records.md)."""
