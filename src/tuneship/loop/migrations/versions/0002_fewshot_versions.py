"""Versions get a kind ("finetune" or "fewshot") and the few-shot turns of a few-shot version.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="finetune"))
        batch.add_column(sa.Column("shots", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("shots")
        batch.drop_column("kind")
