"""Alembic migrations of the audit database, runnable from code (``medcap db upgrade``).

The same revisions run on PostgreSQL and SQLite; the tests run them on both.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)


def revision_module(revision: str) -> ModuleType:
    """The module of one revision (its file names start with digits: not importable by name)."""
    script = ScriptDirectory.from_config(alembic_config(None)).get_revision(revision)  # type: ignore[arg-type]
    if script is None:
        raise LookupError(f"no migration revision {revision!r}")
    return script.module


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
