"""Alembic environment of the store.

Normally run by ``controlplane.store.migrate`` over a connection it passes in
``config.attributes["connection"]``. Also works from the alembic CLI:
``alembic -c controlplane/store/alembic.ini [-x url=...] upgrade head``; the URL comes from
``-x url=``, else ``sqlalchemy.url`` in the ini, else the ``CP_DATABASE_URL`` setting.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from controlplane.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from controlplane.config import get_settings

        url = get_settings().database_url.get_secret_value()
    return url


async def _run_cli_online() -> None:
    from controlplane.store.database import lock_for_migration, open_database

    def locked_run(conn: Connection) -> None:
        lock_for_migration(conn)
        _run(conn)

    database = open_database(_cli_url())
    try:
        await database.write(locked_run)
    finally:
        await database.close()


def _run_offline() -> None:
    from controlplane.store.engine import parse_url

    context.configure(url=parse_url(_cli_url()), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


given = config.attributes.get("connection")
if given is not None:
    _run(given)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        _run_offline()
    else:
        asyncio.run(_run_cli_online())
