"""Store keys instead of host paths: ``datasets.path``, ``models.path`` and ``exports.path`` become ``store_key``.

The artifact store (``service.storage``) addresses everything by keys relative to its root, so
records no longer name a folder of the host that wrote them. The layout under the data dir was
always ``datasets/<id>``, ``models/<id>`` and ``models/<model id>/exports/<export id>.zip``: the
keys follow from the ids, whatever absolute path the old rows held (a data dir that moved since
reads back too).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("datasets", "models", "exports"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("path", new_column_name="store_key", existing_type=sa.Text())
    op.execute("UPDATE datasets SET store_key = 'datasets/' || id")
    op.execute("UPDATE models SET store_key = 'models/' || id")
    op.execute(
        "UPDATE exports SET store_key = 'models/' || model_id || '/exports/' || id || '.zip' "
        "WHERE store_key IS NOT NULL"
    )


def downgrade() -> None:
    # Back to paths relative to the data dir (the old code resolved them against its working folder).
    for table in ("datasets", "models", "exports"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("store_key", new_column_name="path", existing_type=sa.Text())
