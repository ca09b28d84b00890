"""Beyond one machine: versions.artifacts (each served file's key and sha256 in loop.artifacts_url) and the
replicas table (one heartbeat row per `tuneship serve` process: what it serves, when it last said so, why not).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("artifacts", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("replicas")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("artifacts")
