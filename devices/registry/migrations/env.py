"""Alembic environment: runs online against the engine given by :func:`devices.registry.db.migrate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from devices.registry.db import make_engine
from devices.registry.models import Base

config = context.config
engine = config.attributes.get("engine")
if not isinstance(engine, Engine):
    # `alembic -x url=...` from the command line.
    engine = make_engine(context.get_x_argument(as_dictionary=True).get("url", "sqlite:///var/registry.db"))

with engine.connect() as connection:
    # render_as_batch: SQLite can alter tables only by copying them.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()
