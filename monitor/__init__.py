"""The compliance monitor: daily compliance per patient, flags as episodes, alert e-mails to the responsible physio.

Pipeline, one module per stage:

- ``registry``: who is monitored: patients, their clinic's time zone, physio, prescription
  (``model.PatientContext``).
- ``queries`` / ``compliance``: per patient and local day, the stored data's statistics (``model.DayStats``) from
  InfluxDB by InfluxQL, and the flags of each day (the definitions of ``docs/ground-truth.md``).
- ``episodes``: flags over days become episodes (start, end, severity), with hysteresis; written to InfluxDB.
- ``state``: the durable state (day results, episodes, the e-mail outbox, the replicas' lease) in SQL.
- ``mail``: e-mails (opening, resolving, daily digest; HTML with an inline chart and plain text), sent by SMTP.
- ``app``: the loop that runs it all (``compression monitor``).
"""
