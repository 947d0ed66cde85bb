"""Alembic environment: runs on the engine handed over by ``migrations.upgrade``."""

from alembic import context

from service.schema import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A batch migration rebuilds a table (copy, drop, rename); with foreign keys enforced, the
        # drop of a table other rows point at fails. The pragma only takes effect outside a
        # transaction, so it is set on the driver's connection before SQLAlchemy begins one, and
        # the keys are checked in full before the commit.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite)
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        connection.commit()
    finally:
        if sqlite:  # the connection goes back to the pool: enforce the keys again for its next user
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
