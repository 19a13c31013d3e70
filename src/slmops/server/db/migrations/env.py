"""Alembic environment: runs on the connection handed over in ``config.attributes``.

``slmops.server.db.session.upgrade`` passes its connection; for ad-hoc use
(``alembic -x url=...``) a URL can be given instead. Batch mode keeps ALTERs working on SQLite.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from slmops.server.db.metadata import metadata

config = context.config
target_metadata = metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no connection and no database URL (pass -x url=...)")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
