"""The physios' workspace: who needs me today, why, with the evidence, and what was done about it.

Web pages mounted beside the registry's (same sign-in, session and CSRF): ``Today`` ranks a physio's patients (or
the clinic's) by need; a patient's page shows the open episodes with their evidence and actions, charts of wear,
pressure, gradient and boot sessions, prescriptions and device status. It reads the registry, the monitor's state
database (episodes, figures, actions) and InfluxDB; it writes actions (``monitor.actions``) and their audit entries
(the registry's audit trail). See docs/workspace.md.
"""
