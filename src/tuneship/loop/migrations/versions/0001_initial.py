"""The loop's first schema: generations, feedback, examples, versions, events, leases.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.String(64), primary_key=True),
        _created_at(),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version_id", sa.Integer()),
        sa.Column("backend", sa.String(200), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(20), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(64), primary_key=True),
        _created_at(),
        sa.Column("generation_id", sa.String(64), sa.ForeignKey("generations.id"), nullable=False, index=True),
        sa.Column("rating", sa.String(8)),
        sa.Column("correction", sa.Text()),
        sa.Column("comment", sa.Text()),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("source", sa.String(500), nullable=False),
        sa.Column("outcome", sa.String(200)),
    )
    op.create_table(
        "examples",
        sa.Column("id", sa.String(64), primary_key=True),
        _created_at(),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("conversation", sa.JSON(), nullable=False),
        sa.Column("rejected_answer", sa.Text()),
        sa.Column("label", sa.Boolean()),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("reason", sa.Text()),
        sa.Column("used_in", sa.JSON(), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        _created_at(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("parent_id", sa.Integer()),
        sa.Column("run_dir", sa.Text(), nullable=False),
        sa.Column("gguf", sa.Text()),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("example_ids", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("promoted_at", sa.DateTime()),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False, index=True),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("version_id", sa.Integer()),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("stage", sa.String(40)),
        sa.Column("version_id", sa.Integer()),
    )


def downgrade() -> None:
    for table in ("leases", "events", "versions", "examples", "feedback", "generations"):
        op.drop_table(table)
