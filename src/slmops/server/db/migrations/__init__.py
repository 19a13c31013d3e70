"""Alembic migrations of the control-plane database (run by ``db.session.upgrade``)."""
