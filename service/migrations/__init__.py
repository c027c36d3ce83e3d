"""Alembic revisions of the database schema (``versions/``) and the ``env.py`` that runs them.

Run through ``service.schema`` (``zoofit db upgrade``), which builds the Alembic configuration in
code: no alembic.ini. ``env.py`` migrates ``service.db.Base.metadata`` on the connection it is
handed, or else on the configured database URL.
"""
