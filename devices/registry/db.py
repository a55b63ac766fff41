"""Engine, sessions and migrations of the registry database (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).with_name("migrations")
DEFAULT_URL = "sqlite:///var/registry.db"
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (SQLAlchemy's default driver is psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str = DEFAULT_URL) -> Engine:
    """An engine; for SQLite the file is made private first (:func:`private_sqlite_file`), foreign keys enforced
    and WAL used."""
    url = normalise_url(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        private_sqlite_file(Path(url.removeprefix("sqlite:///").split("?", 1)[0]))
    if url in ("sqlite://", "sqlite:///:memory:"):
        # One shared connection, or each thread would see its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def private_sqlite_file(path: Path) -> None:
    """Create ``path`` (and its folder, 0700 when new) with mode 0600, or take a wider mode back to 0600.

    The registry holds patient names and clinical notes: only its owner (the service's user) reads it. SQLite
    gives the -wal and -shm files the database file's mode. Other services reading it (the ingester, the monitor)
    run as the same user (the Dockerfile's ``compression``).
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=DIRECTORY_MODE)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
    for existing in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        if existing.exists() and existing.stat().st_mode & 0o777 & ~FILE_MODE:
            existing.chmod(FILE_MODE)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys unless asked per connection; WAL lets readers
    # (the ingester's refresh) run beside a writer; busy_timeout waits for a lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at our migrations and at ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (``base`` drops everything)."""
    command.downgrade(alembic_config(engine), revision)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session, one transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session
