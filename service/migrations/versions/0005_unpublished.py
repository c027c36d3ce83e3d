"""The ``unpublished`` table: store keys being written that no record names yet (``service.unpublished``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "unpublished",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(op.f("ix_unpublished_created_at"), "unpublished", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_unpublished_created_at"), table_name="unpublished")
    op.drop_table("unpublished")
