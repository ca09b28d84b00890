"""The loop's tables (SQLAlchemy 2 declarative). The schema itself is created by the Alembic migrations in
`migrations/versions/`; these classes must match them (a test compares them).

- generations: every answer served (version, messages, answer, finish reason, latency, tokens).
- feedback: a rating / correction of one generation, with the client that sent it, its Idempotency-Key (unique per
  client) and the hash of the request it was sent with, and what became of it.
- examples: training data made from feedback (and the base run's data): a stable id, the Conversation, kind
  (sft / kto / dpo), provenance, split (train / golden), status, and the versions that trained on it.
- versions: the registry: run dir, parent, GGUF, metrics, status candidate/champion/retired/rejected/failed (at
  most one champion: a partial unique index, `ONE_CHAMPION`), and
  kind: "finetune" (a run of its own) or "fewshot" (its parent's run and GGUF, plus `shots`: example turns
  prepended to every conversation it answers; see fewshot.py).
- events: every cycle, gate decision, promotion and rollback, with who and why.
- leases: named locks with an expiry (one row "cycle": never two cycles at once; a crashed worker loses it).
- replicas: one row per `tuneship serve` process, its heartbeat: the version it serves, when it last reported,
  and why it does not serve the champion when it cannot (a file whose hash differs, storage unreachable).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

VersionStatus = Literal["training", "candidate", "champion", "retired", "rejected", "failed"]
ExampleStatus = Literal["pending_review", "accepted", "rejected", "superseded"]
ExampleKind = Literal["sft", "kto", "dpo"]
Split = Literal["train", "golden"]
VersionKind = Literal["finetune", "fewshot"]

ONE_CHAMPION = "ux_versions_one_champion"  # the partial unique index: at most one row with status "champion"
CHAMPION_ONLY = "status = 'champion'"
FEEDBACK_KEY = "uq_feedback_client_idempotency_key"  # an Idempotency-Key is unique per client


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp in the store is naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime()}


class Generation(Base):
    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model: Mapped[str] = mapped_column(String(200))
    version_id: Mapped[int | None] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(200))
    messages: Mapped[list[Any]]
    answer: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(20))
    latency_ms: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("client", "idempotency_key", name=FEEDBACK_KEY),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), index=True)
    rating: Mapped[str | None] = mapped_column(String(8))
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(200), default="anonymous")
    source: Mapped[str] = mapped_column(String(500), default="api")
    outcome: Mapped[str | None] = mapped_column(String(200))


class Example(Base):
    __tablename__ = "examples"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(8))
    conversation: Mapped[dict[str, Any]]
    rejected_answer: Mapped[str | None] = mapped_column(Text)
    label: Mapped[bool | None]
    provenance: Mapped[dict[str, Any]]
    split: Mapped[str] = mapped_column(String(8), default="train")
    status: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    used_in: Mapped[list[Any]] = mapped_column(default=list)

    def to_record(self) -> dict:
        """A `messages` record, with its rejected answer (DPO) or label (KTO): what the audit and a cycle's
        training file read."""
        conversation = self.conversation
        system = conversation.get("system")
        head = [{"role": "system", "content": system}] if system is not None else []
        preference: dict[str, Any] = {"rejected": self.rejected_answer} if self.rejected_answer is not None else {}
        if self.label is not None:
            preference["label"] = self.label
        return {"messages": head + conversation["messages"], **preference}


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (
        Index(
            ONE_CHAMPION,
            "status",
            unique=True,
            sqlite_where=text(CHAMPION_ONLY),
            postgresql_where=text(CHAMPION_ONLY),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(Integer)
    run_dir: Mapped[str] = mapped_column(Text)
    gguf: Mapped[str | None] = mapped_column(Text)  # the model file llama.cpp loads (adapter format: the base's)
    adapter: Mapped[str | None] = mapped_column(Text)  # adapter format: the LoRA GGUF applied on `gguf`
    status: Mapped[str] = mapped_column(String(20), index=True)
    example_ids: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    promoted_at: Mapped[datetime | None]
    kind: Mapped[str] = mapped_column(String(16), default="finetune")
    shots: Mapped[list[Any]] = mapped_column(default=list)
    # loop.artifacts_url: served file -> {"key", "sha256", "size"} (artifacts.py); {} when kept on local disk only
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")

    @property
    def shot_count(self) -> int:
        """How many corrections a few-shot version shows (each may be several turns)."""
        return len(self.example_ids) if self.kind == "fewshot" else 0


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(40))
    version_id: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Lease(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    stage: Mapped[str | None] = mapped_column(String(40))
    version_id: Mapped[int | None] = mapped_column(Integer)


class Replica(Base):
    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    url: Mapped[str | None] = mapped_column(Text)
    version_id: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    reported_at: Mapped[datetime] = mapped_column(default=utcnow)
    problem: Mapped[str | None] = mapped_column(Text)
