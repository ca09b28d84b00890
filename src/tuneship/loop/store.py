"""The loop's store: one object over SQLAlchemy for every table (see tables.py), opened with `open_store(url)`.

The schema is applied with the Alembic migrations shipped in `tuneship/loop/migrations` every time a store is
opened, so an older database is upgraded in place. SQLite (the default, `<run.dir>/tuneship.db`) runs in WAL
mode with a busy timeout, so the server's threads and a cycle process can share it; any other SQLAlchemy URL
(PostgreSQL) works the same. Rows come back detached (safe to read after the session closed).

What must not be half done is one transaction: moving the champion (`promote`, `restore_previous`: ordered after
every other such move by the registry lock, and at most one champion by the partial unique index), a harvest
(`store_harvest`: its examples and its feedback marked processed). Inserts of examples are idempotent
(`INSERT ... ON CONFLICT DO NOTHING`), so racing writers store each example once. `use_timeout(seconds)`
bounds every wait for a lock or a connection (serve.db_timeout while serving).

Public API (stable; the web pages read it):
  open_store(url) -> Store;  default_database_url(cfg) -> str
  Store.add_generation(...) / generation(id) / recent_generations(limit) / delete_generations_before(cutoff)
  Store.add_feedback(..., client=) -> (Feedback, is_new) / feedback_for(generation_id) / feedback_count()
  Store.add_examples(list) -> added count / examples(status=, split=, kind=, unused=) / count_examples(...)
  Store.set_example_status(ids, status) / store_harvest(outcomes, examples)
  Store.versions() / version(id) / champion() / previous_champion() / add_version(...) / update_version(id, **f)
  Store.promote(version_id, actor, reason, ...) / restore_previous(actor, reason, check)
  Store.add_event(...) / events(limit)
  Store.acquire_lease(name, holder, seconds, stage) / renew_lease / release_lease / lease(name)
  Store.report_replica(id, host, url, version_id, problem) / replicas() / forget_replica(id)
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship.errors import TuneshipError
from tuneship.loop.tables import (
    Base,
    Event,
    Example,
    ExampleKind,
    ExampleStatus,
    Feedback,
    Generation,
    Lease,
    Replica,
    Split,
    Version,
    utcnow,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.orm import Session

    from tuneship.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
REGISTRY_LOCK = 7_301_911  # PostgreSQL advisory lock key: champion moves one at a time
MIGRATION_LOCK = 7_301_912  # PostgreSQL advisory lock key: processes that open a new store migrate one at a time


class StoreError(TuneshipError):
    """The loop's database cannot be opened or migrated."""


class UnknownGeneration(TuneshipError):
    """Feedback names a generation id the store does not have."""


class UnknownVersion(TuneshipError):
    """A version id the registry does not have."""


class StaleChampion(TuneshipError):
    """The champion is no longer the version a change was decided against (a cycle's parent)."""


class IdempotencyConflict(TuneshipError):
    """An Idempotency-Key this client already used with another request."""


def default_database_url(cfg: Config) -> str:
    """loop.database_url, else a SQLite file beside the runs: <run.dir>/tuneship.db."""
    if cfg.loop.database_url:
        return cfg.loop.database_url
    folder = Path(cfg.run.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'tuneship.db'}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def open_store(url: str, timeout: float | None = None) -> Store:
    """The store at `url`, migrated. `timeout`: the most seconds any wait for a lock, a connection or (PostgreSQL)
    a statement takes; None: SQLite waits SQLITE_BUSY_TIMEOUT_S for a lock, PostgreSQL as long as it takes."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = make_engine(url, timeout)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"loop.database_url={url!r}: {exc}") from None
    try:
        _upgrade(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open or migrate the loop database at {engine.url!r}: {exc}") from None
    return Store(engine)


def make_engine(url: str | URL, timeout: float | None = None) -> Engine:
    """An engine whose waits are bounded by `timeout` seconds (see open_store)."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url

    backend = make_url(url).get_backend_name()
    kwargs: dict[str, Any] = {} if timeout is None else {"pool_timeout": timeout}
    if backend == "sqlite":
        busy = SQLITE_BUSY_TIMEOUT_S if timeout is None else timeout
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(busy))
        return engine
    if backend == "postgresql" and timeout is not None:
        ms = max(1, round(timeout * 1000))
        kwargs["connect_args"] = {
            "connect_timeout": max(1, math.ceil(timeout)),
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
        }
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(busy_seconds: float) -> Callable[[DBAPIConnection, object], None]:
    def on_connect(connection: DBAPIConnection, _record: object) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={round(busy_seconds * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return on_connect


def request_hash(generation_id: str, rating: str | None, correction: str | None, comment: str | None) -> str:
    """What an Idempotency-Key is bound to: the feedback request's content."""
    canonical = json.dumps([generation_id, rating, correction, comment], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def example_row(example: Example) -> dict[str, Any]:
    """An Example as the values of an INSERT (the column defaults filled in)."""
    row = {column.key: getattr(example, column.key) for column in Example.__table__.columns}
    row["created_at"] = row["created_at"] or utcnow()
    row["split"] = row["split"] or "train"
    row["used_in"] = list(row["used_in"] or [])
    return row


def _no_check(_version: Version) -> None:
    return None


def _upgrade(engine: Engine) -> None:
    """Apply the migrations, one process at a time (PostgreSQL: an advisory lock; SQLite: its write lock, taken
    first), so replicas and workers started together on a new database do not create the same tables at once:
    the second waits, then finds them there."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import text

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        elif engine.dialect.name == "sqlite":
            connection.execute(text("BEGIN IMMEDIATE"))
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

    def use_timeout(self, seconds: float) -> None:
        """From now on every wait for a lock, a connection or a statement takes at most `seconds` (a new engine
        over the same, already migrated, database; this object changes in place, so every holder sees it)."""
        from sqlalchemy.orm import sessionmaker

        old = self.engine
        self.engine = make_engine(old.url, seconds)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        old.dispose()

    @contextmanager
    def _registry_transaction(self) -> Iterator[Session]:
        """A transaction that moves the champion, after any other such move has committed: SQLite's write lock is
        taken first (BEGIN IMMEDIATE, so what it reads is what it changes), PostgreSQL takes a transaction-scoped
        advisory lock. Readers (the chats looking up the champion) are never blocked and never see no champion."""
        from sqlalchemy import text

        with self.session.begin() as session:
            dialect = self.engine.dialect.name
            if dialect == "sqlite":
                session.execute(text("BEGIN IMMEDIATE"))
            elif dialect == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK})
            yield session

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
        client: str = "anonymous",
    ) -> tuple[Feedback, bool]:
        """(row, is_new). An Idempotency-Key is the client's own (two clients may use the same) and bound to the
        request: a retry with the same key and content returns the first row and is not counted again; the same
        key with other content is an IdempotencyConflict."""
        from sqlalchemy.exc import IntegrityError

        digest = request_hash(generation_id, rating, correction, comment)
        if idempotency_key:
            existing = self._feedback_by_key(client, idempotency_key)
            if existing is not None:
                return _replayed(existing, digest, idempotency_key), False
        row = Feedback(
            id=new_id("fb"),
            generation_id=generation_id,
            rating=rating,
            correction=correction,
            comment=comment,
            idempotency_key=idempotency_key,
            request_hash=digest,
            client=client,
            source=source,
        )
        try:
            with self.session.begin() as session:
                if session.get(Generation, generation_id) is None:
                    raise UnknownGeneration(f"generation_id: no generation {generation_id!r} in the store")
                session.add(row)
        except IntegrityError:
            existing = self._feedback_by_key(client, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return _replayed(existing, digest, idempotency_key), False
        return row, True

    def _feedback_by_key(self, client: str, key: str) -> Feedback | None:
        from sqlalchemy import select

        query = select(Feedback).where(Feedback.client == client, Feedback.idempotency_key == key)
        with self.session() as session:
            return session.scalars(query).first()

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
        with self.session.begin() as session:
            _mark_processed(session, {outcome: feedback_ids})

    def store_harvest(self, outcomes: dict[str, list[str]], examples: list[Example]) -> int:
        """One transaction: the examples a harvest made (idempotent) and its feedback rows marked processed
        (outcome -> feedback ids; a row another harvest processed meanwhile keeps its outcome). Either both are
        stored or neither, so no feedback is marked processed without its examples. Returns examples added."""
        with self.session.begin() as session:
            added = _insert_examples(session, _first_of_each(examples))
            _mark_processed(session, outcomes)
        return added

    # examples ------------------------------------------------------------------------------

    def add_examples(self, examples: list[Example]) -> int:
        """Insert the examples whose id is new; returns how many were added (same id = same content, so of two in
        one batch, e.g. the same wrong answer corrected twice, the first is kept). Idempotent: one INSERT ... ON
        CONFLICT DO NOTHING, so writers racing with the same example store it once."""
        with self.session.begin() as session:
            return _insert_examples(session, _first_of_each(examples))

    def examples(
        self,
        status: ExampleStatus | None = None,
        split: Split | None = None,
        unused: bool | None = None,
        kind: ExampleKind | None = None,
    ) -> list[Example]:
        from sqlalchemy import select

        query = _filtered(select(Example), status, split, unused, kind).order_by(Example.created_at, Example.id)
        with self.session() as session:
            return list(session.scalars(query))

    def count_examples(
        self,
        status: ExampleStatus | None = None,
        split: Split | None = None,
        unused: bool | None = None,
        kind: ExampleKind | None = None,
    ) -> int:
        """How many examples `examples(...)` would return, counted by the database."""
        from sqlalchemy import func, select

        with self.session() as session:
            return session.scalar(_filtered(select(func.count(Example.id)), status, split, unused, kind)) or 0

    def set_example_status(self, example_ids: list[str], status: ExampleStatus, reason: str | None = None) -> int:
        from sqlalchemy import update

        with self.session.begin() as session:
            result = session.execute(
                update(Example).where(Example.id.in_(example_ids)).values(status=status, reason=reason)
            )
        return result.rowcount

    def mark_used(self, example_ids: list[str], version_id: int) -> None:
        with self.session.begin() as session:
            _mark_used(session, example_ids, version_id)

    # versions ------------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        from sqlalchemy import select

        with self.session() as session:
            return list(session.scalars(select(Version).order_by(Version.id)))

    def version(self, version_id: int) -> Version | None:
        with self.session() as session:
            return session.get(Version, version_id)

    def champion(self) -> Version | None:
        with self.session() as session:
            return _champion(session)

    def previous_champion(self) -> Version | None:
        """The version a rollback restores: the latest promoted of the retired."""
        with self.session() as session:
            return _previous_champion(session)

    def promote(
        self,
        version_id: int,
        actor: str,
        reason: str,
        check: Callable[[Version], None] = _no_check,
        parent: int | None = None,
        used: Collection[str] = (),
    ) -> Version:
        """Make `version_id` the champion in one transaction, ordered after any other move of the champion:
        `check(version)` may refuse (raises); with `parent`, a champion other than `parent` is a StaleChampion
        (the version was decided against a champion that was since replaced); the champion is retired, the
        examples `used` are marked used by the version, and a "promoted" event is written."""
        with self._registry_transaction() as session:
            version = session.get(Version, version_id)
            if version is None:
                raise UnknownVersion(f"no version {version_id}; see `tuneship loop versions`")
            check(version)
            current = _champion(session)
            if parent is not None and (current is None or current.id != parent):
                now = f"v{current.id}" if current else "none"
                raise StaleChampion(f"v{version_id} was made from v{parent}, which is no longer the champion ({now})")
            if current is not None and current.id == version_id:
                return version
            _move_champion(session, current, "retired", version)
            _mark_used(session, used, version_id)
            data = {"from": current.id if current else None, "to": version_id}
            session.add(Event(kind="promoted", actor=actor, reason=reason, data=data, version_id=version_id))
        return version

    def restore_previous(
        self, actor: str, reason: str, check: Callable[[Version], None] = _no_check, champion: int | None = None
    ) -> Version | None:
        """Roll back in one transaction, ordered after any other move of the champion: the previous champion
        (`check` may refuse it: raises) becomes the champion again and the current one "rejected" (never restored
        again); a "rolled_back" event is written. With `champion`, a StaleChampion when the champion is another
        version now. None: there is no champion or no previous one."""
        with self._registry_transaction() as session:
            current, previous = _champion(session), _previous_champion(session)
            if champion is not None and (current is None or current.id != champion):
                now = f"v{current.id}" if current else "none"
                raise StaleChampion(f"v{champion} is no longer the champion ({now}); nothing rolled back")
            if current is None or previous is None:
                return None
            check(previous)
            _move_champion(session, current, "rejected", previous)
            data = {"from": current.id, "to": previous.id}
            session.add(Event(kind="rolled_back", actor=actor, reason=reason, data=data, version_id=previous.id))
        return previous

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

    # replicas ------------------------------------------------------------------------------

    def report_replica(
        self, replica_id: str, host: str, url: str | None, version_id: int | None, problem: str | None
    ) -> None:
        """A serving process's heartbeat: the version it serves now and why not the champion (None: no problem)."""
        with self.session.begin() as session:
            row = session.get(Replica, replica_id)
            if row is None:
                row = Replica(id=replica_id, host=host, started_at=utcnow())
                session.add(row)
            row.url, row.version_id, row.problem, row.reported_at = url, version_id, problem, utcnow()

    def replicas(self) -> list[Replica]:
        from sqlalchemy import select

        with self.session() as session:
            return list(session.scalars(select(Replica).order_by(Replica.started_at, Replica.id)))

    def forget_replica(self, replica_id: str) -> None:
        """A replica that stopped cleanly leaves the list (one killed stays, its last report ageing)."""
        from sqlalchemy import delete

        with self.session.begin() as session:
            session.execute(delete(Replica).where(Replica.id == replica_id))

    def _count(self, model: type[Base]) -> int:
        from sqlalchemy import func, select

        with self.session() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0


# helpers of one session --------------------------------------------------------------------


def _replayed(existing: Feedback, digest: str, key: str) -> Feedback:
    """The first row of a retry; another request under the same key is refused (a row stored before keys were
    bound to requests has no hash: replayed as before)."""
    if existing.request_hash is not None and existing.request_hash != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r}: already used for another request (generation_id "
            f"{existing.generation_id!r}); send each new feedback with a new key"
        )
    return existing


def _first_of_each(examples: list[Example]) -> list[Example]:
    """The examples with distinct ids, the first of each id, in order."""
    return list({e.id: e for e in reversed(examples)}.values())[::-1]


def _insert_examples(session: Session, examples: list[Example]) -> int:
    """INSERT ... ON CONFLICT (id) DO NOTHING (SQLite, PostgreSQL): how many rows were new."""
    if not examples:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # another database: check, then insert (not safe against a racing writer)
        fresh = [e for e in examples if session.get(Example, e.id) is None]
        session.add_all(fresh)
        return len(fresh)
    statement = insert(Example.__table__).on_conflict_do_nothing(index_elements=["id"]).returning(Example.id)
    return len(session.execute(statement, [example_row(e) for e in examples]).all())


def _mark_processed(session: Session, outcomes: dict[str, list[str]]) -> None:
    from sqlalchemy import update

    for outcome, feedback_ids in outcomes.items():
        if feedback_ids:
            unprocessed = Feedback.id.in_(feedback_ids), Feedback.outcome.is_(None)
            session.execute(update(Feedback).where(*unprocessed).values(outcome=outcome))


def _mark_used(session: Session, example_ids: Collection[str], version_id: int) -> None:
    from sqlalchemy import select

    if not example_ids:
        return
    for example in session.scalars(select(Example).where(Example.id.in_(list(example_ids)))):
        if version_id not in example.used_in:
            example.used_in = [*example.used_in, version_id]


def _filtered(query: Any, status: str | None, split: str | None, unused: bool | None, kind: str | None) -> Any:
    from sqlalchemy import func

    if status:
        query = query.where(Example.status == status)
    if split:
        query = query.where(Example.split == split)
    if kind:
        query = query.where(Example.kind == kind)
    if unused is not None:
        trained = func.json_array_length(Example.used_in)
        query = query.where(trained == 0 if unused else trained > 0)
    return query


def _champion(session: Session) -> Version | None:
    from sqlalchemy import select

    query = select(Version).where(Version.status == "champion")
    return session.scalars(query.order_by(Version.promoted_at.desc().nulls_last(), Version.id.desc())).first()


def _previous_champion(session: Session) -> Version | None:
    from sqlalchemy import select

    query = select(Version).where(Version.status == "retired", Version.promoted_at.is_not(None))
    return session.scalars(query.order_by(Version.promoted_at.desc(), Version.id.desc())).first()


def _move_champion(session: Session, current: Version | None, leaves_as: str, new: Version) -> None:
    """`current` leaves (flushed first: the unique index allows one champion at any moment), `new` is champion."""
    if current is not None:
        current.status = leaves_as
        session.flush()
    new.status = "champion"
    new.promoted_at = utcnow()
