"""The clinic registry: clinics, physios, patients, garments, gateways, prescriptions, credentials.

Layout, following the data flow:

- ``models``: the SQLAlchemy tables (migrated by Alembic, ``migrations/``).
- ``db``: engine, sessions, ``migrate()``.
- ``classes``: compression class tables (RAL, UK, US) and the contraindication rules.
- ``schemas``: pydantic models of what comes in and goes out (API, CLI, CSV share them).
- ``service``: every operation, one transaction each, audited; raises :mod:`errors`.
- ``api`` / ``web`` / ``cli`` / ``csvimport``: the interfaces over ``service``.
- ``broker``: Mosquitto password and ACL files (device listeners, services listener) from the registry,
  reloaded with SIGHUP; ``brokerconf``: ``mosquitto.conf`` for the deployment, the demo and the tests.
- ``snapshot``: the compact device -> patient/clinic history the ingester caches.
"""
