"""The loop's store: one object over SQLAlchemy for every table (see tables.py), opened with `open_store(url)`.

The schema is applied with the Alembic migrations shipped in `tuneship/loop/migrations` every time a store is
opened, so an older database is upgraded in place. SQLite (the default, `<run.dir>/tuneship.db`) runs in WAL
mode with a busy timeout, so the server's threads and a cycle process can share it; any other SQLAlchemy URL
(PostgreSQL) works the same. Rows come back detached (safe to read after the session closed).

Public API (stable; the web pages read it):
  open_store(url) -> Store;  default_database_url(cfg) -> str
  Store.add_generation(...) / generation(id) / recent_generations(limit) / delete_generations_before(cutoff)
  Store.add_feedback(...) -> (Feedback, is_new) / feedback_for(generation_id) / feedback_count()
  Store.add_examples(list) -> added count / examples(status=, split=, unused=) / set_example_status(ids, status)
  Store.versions() / version(id) / champion() / add_version(...) / update_version(id, **fields)
  Store.add_event(...) / events(limit)
  Store.acquire_lease(name, holder, seconds, stage) / renew_lease / release_lease / lease(name)
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship.errors import TuneshipError
from tuneship.loop.tables import (
    Base,
    Event,
    Example,
    ExampleStatus,
    Feedback,
    Generation,
    Lease,
    Split,
    Version,
    utcnow,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.interfaces import DBAPIConnection

    from tuneship.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(TuneshipError):
    """The loop's database cannot be opened or migrated."""


class UnknownGeneration(TuneshipError):
    """Feedback names a generation id the store does not have."""


def default_database_url(cfg: Config) -> str:
    """loop.database_url, else a SQLite file beside the runs: <run.dir>/tuneship.db."""
    if cfg.loop.database_url:
        return cfg.loop.database_url
    folder = Path(cfg.run.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'tuneship.db'}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def open_store(url: str) -> Store:
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import SQLAlchemyError

    is_sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}} if is_sqlite else {}
    try:
        engine = create_engine(url, pool_pre_ping=not is_sqlite, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"loop.database_url={url!r}: {exc}") from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        _upgrade(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open or migrate the loop database at {engine.url!r}: {exc}") from None
    return Store(engine)


def _sqlite_pragmas(connection: DBAPIConnection, _record: object) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Store:
    def __init__(self, engine: Engine):
        from sqlalchemy.orm import sessionmaker

        self.engine = engine
        self.session = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # generations ---------------------------------------------------------------------------

    def add_generation(self, **fields: Any) -> Generation:
        row = Generation(**fields)
        with self.session.begin() as session:
            session.add(row)
        return row

    def generation(self, generation_id: str) -> Generation | None:
        with self.session() as session:
            return session.get(Generation, generation_id)

    def recent_generations(self, limit: int = 50) -> list[Generation]:
        from sqlalchemy import select

        with self.session() as session:
            return list(session.scalars(select(Generation).order_by(Generation.created_at.desc()).limit(limit)))

    def delete_generations_before(self, cutoff: datetime, keep: Collection[str] = ()) -> int:
        """Delete the generations created before `cutoff` (naive UTC) whose feedback is all processed (or that have
        none), with their feedback rows, except the ids in `keep`; returns how many generations went."""
        from sqlalchemy import delete, select

        unprocessed = select(Feedback.generation_id).where(Feedback.outcome.is_(None))
        old = select(Generation.id).where(Generation.created_at < cutoff, Generation.id.not_in(unprocessed))
        if keep:
            old = old.where(Generation.id.not_in(list(keep)))
        plain = {"synchronize_session": False}  # nothing of these rows is loaded in the session
        with self.session.begin() as session:
            session.execute(delete(Feedback).where(Feedback.generation_id.in_(old)), execution_options=plain)
            return session.execute(delete(Generation).where(Generation.id.in_(old)), execution_options=plain).rowcount

    # feedback ------------------------------------------------------------------------------

    def add_feedback(
        self,
        generation_id: str,
        rating: str | None,
        correction: str | None,
        comment: str | None,
        idempotency_key: str | None = None,
        source: str = "api",
    ) -> tuple[Feedback, bool]:
        """(row, is_new): a retry with the same Idempotency-Key returns the first row and is not counted again."""
        from sqlalchemy.exc import IntegrityError

        if idempotency_key:
            existing = self._feedback_by_key(idempotency_key)
            if existing is not None:
                return existing, False
        row = Feedback(
            id=new_id("fb"),
            generation_id=generation_id,
            rating=rating,
            correction=correction,
            comment=comment,
            idempotency_key=idempotency_key,
            source=source,
        )
        try:
            with self.session.begin() as session:
                if session.get(Generation, generation_id) is None:
                    raise UnknownGeneration(f"generation_id: no generation {generation_id!r} in the store")
                session.add(row)
        except IntegrityError:
            existing = self._feedback_by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return row, True

    def _feedback_by_key(self, key: str) -> Feedback | None:
        from sqlalchemy import select

        with self.session() as session:
            return session.scalars(select(Feedback).where(Feedback.idempotency_key == key)).first()

    def feedback_for(self, generation_id: str) -> list[Feedback]:
        from sqlalchemy import select

        with self.session() as session:
            query = select(Feedback).where(Feedback.generation_id == generation_id).order_by(Feedback.created_at)
            return list(session.scalars(query))

    def unprocessed_feedback(self) -> list[Feedback]:
        from sqlalchemy import select

        with self.session() as session:
            return list(
                session.scalars(select(Feedback).where(Feedback.outcome.is_(None)).order_by(Feedback.created_at))
            )

    def feedback_count(self) -> int:
        return self._count(Feedback)

    def set_feedback_outcome(self, feedback_ids: list[str], outcome: str) -> None:
        from sqlalchemy import update

        with self.session.begin() as session:
            session.execute(update(Feedback).where(Feedback.id.in_(feedback_ids)).values(outcome=outcome))

    # examples ------------------------------------------------------------------------------

    def add_examples(self, examples: list[Example]) -> int:
        """Insert the examples whose id is new; returns how many were added (same id = same content, so of two in
        one batch, e.g. the same wrong answer corrected twice, the first is kept)."""
        unique = list({e.id: e for e in reversed(examples)}.values())[::-1]
        with self.session.begin() as session:
            fresh = [e for e in unique if session.get(Example, e.id) is None]
            session.add_all(fresh)
        return len(fresh)

    def examples(
        self, status: ExampleStatus | None = None, split: Split | None = None, unused: bool | None = None
    ) -> list[Example]:
        from sqlalchemy import select

        query = select(Example).order_by(Example.created_at, Example.id)
        if status:
            query = query.where(Example.status == status)
        if split:
            query = query.where(Example.split == split)
        with self.session() as session:
            rows = list(session.scalars(query))
        if unused is None:
            return rows
        return [e for e in rows if bool(e.used_in) != unused]

    def set_example_status(self, example_ids: list[str], status: ExampleStatus, reason: str | None = None) -> int:
        from sqlalchemy import update

        with self.session.begin() as session:
            result = session.execute(
                update(Example).where(Example.id.in_(example_ids)).values(status=status, reason=reason)
            )
        return result.rowcount

    def mark_used(self, example_ids: list[str], version_id: int) -> None:
        from sqlalchemy import select

        with self.session.begin() as session:
            for example in session.scalars(select(Example).where(Example.id.in_(example_ids))):
                if version_id not in example.used_in:
                    example.used_in = [*example.used_in, version_id]

    # versions ------------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        from sqlalchemy import select

        with self.session() as session:
            return list(session.scalars(select(Version).order_by(Version.id)))

    def version(self, version_id: int) -> Version | None:
        with self.session() as session:
            return session.get(Version, version_id)

    def champion(self) -> Version | None:
        from sqlalchemy import select

        with self.session() as session:
            return session.scalars(select(Version).where(Version.status == "champion")).first()

    def add_version(self, **fields: Any) -> Version:
        row = Version(**fields)
        with self.session.begin() as session:
            session.add(row)
        return row

    def update_version(self, version_id: int, **fields: Any) -> Version:
        with self.session.begin() as session:
            row = session.get(Version, version_id)
            for key, value in fields.items():
                setattr(row, key, value)
        return row

    def next_version_id(self) -> int:
        from sqlalchemy import func, select

        with self.session() as session:
            return (session.scalar(select(func.max(Version.id))) or 0) + 1

    # events --------------------------------------------------------------------------------

    def add_event(
        self, kind: str, actor: str, reason: str, data: dict | None = None, version_id: int | None = None
    ) -> Event:
        row = Event(kind=kind, actor=actor, reason=reason, data=data or {}, version_id=version_id)
        with self.session.begin() as session:
            session.add(row)
        return row

    def events(self, limit: int = 100, kind: str | None = None) -> list[Event]:
        from sqlalchemy import select

        query = select(Event).order_by(Event.id.desc()).limit(limit)
        if kind:
            query = query.where(Event.kind == kind)
        with self.session() as session:
            return list(session.scalars(query))

    # leases --------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, seconds: float, stage: str | None = None) -> bool:
        """Take the named lease when it is free, expired, or already ours. Atomic on SQLite and PostgreSQL:
        the conditional UPDATE (or the INSERT of the primary key) decides between two racing workers."""
        from sqlalchemy import or_, update
        from sqlalchemy.exc import IntegrityError

        now = utcnow()
        expires = now + timedelta(seconds=seconds)
        with self.session.begin() as session:
            taken = session.execute(
                update(Lease)
                .where(Lease.name == name, or_(Lease.expires_at < now, Lease.holder == holder))
                .values(holder=holder, expires_at=expires, stage=stage)
            ).rowcount
        if taken:
            return True
        try:
            with self.session.begin() as session:
                if session.get(Lease, name) is not None:
                    return False
                session.add(Lease(name=name, holder=holder, expires_at=expires, stage=stage))
        except IntegrityError:
            return False
        return True

    def renew_lease(self, name: str, holder: str, seconds: float, **fields: Any) -> bool:
        from sqlalchemy import update

        with self.session.begin() as session:
            values = {"expires_at": utcnow() + timedelta(seconds=seconds), **fields}
            return bool(
                session.execute(
                    update(Lease).where(Lease.name == name, Lease.holder == holder).values(**values)
                ).rowcount
            )

    def release_lease(self, name: str, holder: str) -> None:
        from sqlalchemy import delete

        with self.session.begin() as session:
            session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))

    def lease(self, name: str) -> Lease | None:
        """The lease when it is held and not expired."""
        with self.session() as session:
            row = session.get(Lease, name)
        return row if row is not None and row.expires_at >= utcnow() else None

    def _count(self, model: type[Base]) -> int:
        from sqlalchemy import func, select

        with self.session() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0
