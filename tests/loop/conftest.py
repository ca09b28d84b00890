"""The store on SQLite and on a real PostgreSQL (skipped when PostgreSQL is not installed)."""

import pytest

from tests.postgres import postgres_url


@pytest.fixture(scope="session")
def postgres_server():
    with postgres_url() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuneship.db'}"
    url = request.getfixturevalue("postgres_server")
    if url is None:
        pytest.skip("PostgreSQL is not installed (make setup installs it when run as root)")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)  # each test gets an empty schema
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def store(database_url):
    from tuneship.loop.store import open_store

    store = open_store(database_url)
    yield store
    store.close()
