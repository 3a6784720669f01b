"""Alembic environment, run programmatically by ``db.session.upgrade`` or by the alembic CLI.

``upgrade`` hands us an open connection in ``config.attributes["connection"]``; the CLI
(``alembic -c db/alembic.ini ...``) gives a URL instead.
"""

from __future__ import annotations

from alembic import context

from db.models import Base, UTCDateTime
from db.session import make_engine


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Autogenerate writes our UTCDateTime as plain DateTime: migrations never import models."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as connection:
            _configure_and_run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported; run them against a database.")
run_migrations_online()
