"""At most one champion (a partial unique index on versions.status); feedback records its client, and an
Idempotency-Key is unique per client and bound to the hash of the request it came with.

A database where a race left two champions keeps the latest promoted one; the others become "retired".

Revision ID: 0003
Revises: 0002
"""

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

ONE_CHAMPION = "ux_versions_one_champion"
CHAMPION_ONLY = "status = 'champion'"
FEEDBACK_KEY = "uq_feedback_client_idempotency_key"
CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}  # names SQLite's unnamed UNIQUE(idempotency_key)


def upgrade() -> None:
    _keep_one_champion()
    op.create_index(
        ONE_CHAMPION,
        "versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text(CHAMPION_ONLY),
        postgresql_where=sa.text(CHAMPION_ONLY),
    )
    old_key = _global_key_constraint()
    with op.batch_alter_table("feedback", naming_convention=CONVENTION) as batch:
        batch.add_column(sa.Column("request_hash", sa.String(64)))
        batch.add_column(sa.Column("client", sa.String(200), nullable=False, server_default="anonymous"))
        batch.drop_constraint(old_key, type_="unique")
        batch.create_unique_constraint(FEEDBACK_KEY, ["client", "idempotency_key"])


def _keep_one_champion() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, promoted_at FROM versions WHERE status = 'champion'")).all()
    if len(rows) < 2:
        return
    keep = max(rows, key=lambda row: (row.promoted_at or datetime.min, row.id)).id
    bind.execute(
        sa.text("UPDATE versions SET status = 'retired' WHERE status = 'champion' AND id != :keep"), {"keep": keep}
    )


def _global_key_constraint() -> str:
    """The name of 0001's UNIQUE(idempotency_key): PostgreSQL named it; SQLite's gets the batch's convention name."""
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints("feedback"):
        if constraint["column_names"] == ["idempotency_key"] and constraint["name"]:
            return constraint["name"]
    return "uq_feedback_idempotency_key"


def downgrade() -> None:
    with op.batch_alter_table("feedback", naming_convention=CONVENTION) as batch:
        batch.drop_constraint(FEEDBACK_KEY, type_="unique")
        batch.create_unique_constraint("uq_feedback_idempotency_key", ["idempotency_key"])
        batch.drop_column("client")
        batch.drop_column("request_hash")
    op.drop_index(ONE_CHAMPION, "versions")
