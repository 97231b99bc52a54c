"""Alembic environment: the engine is handed in by mailgate.store.db.

On SQLite, batch mode alters a table by copying it, dropping the original and
renaming the copy: with foreign keys enforced, the drop of a table other rows
point at fails once the database holds data (Alembic's "Dealing with
Referencing Foreign Keys"). They are off while the migration runs (the pragma
does nothing inside a transaction, so it is set before BEGIN), every row is
checked against them before the commit, and they are on again afterwards.
"""

from alembic import context
from sqlalchemy.engine import Connection

from mailgate.store.models import Base

config = context.config
engine = config.attributes["engine"]


def _check_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"the migration would leave rows without their parent: {broken[:5]}")


with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    raw = connection.connection.dbapi_connection
    if sqlite:
        raw.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,  # SQLite needs batch mode to alter tables
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                _check_foreign_keys(connection)
        connection.commit()
    except BaseException:
        if sqlite:  # never back in the pool with foreign keys off
            connection.invalidate()
        raise
    finally:
        if sqlite and not connection.invalidated:
            raw.execute("PRAGMA foreign_keys=ON")
