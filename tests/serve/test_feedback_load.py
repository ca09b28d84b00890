"""1,000 feedback POSTs from 50 concurrent clients against `tuneship serve` in its own process: 1,000 rows and
no error, on SQLite and on PostgreSQL, and across two replicas on one PostgreSQL with every tenth post retried on
the other replica: 1,000 rows, none twice (benchmarks/feedback_load.py prints the speed)."""

from benchmarks.feedback_load import run_load
from tests.loop.conftest import database_url, postgres_server  # noqa: F401


def test_a_thousand_concurrent_feedback_posts_store_a_thousand_rows(database_url):  # noqa: F811
    result = run_load(database_url, total=1000, concurrency=50)
    assert (result.errors, result.rows, len(result.latencies_ms)) == (0, 1000, 1000), result.error_kinds


def test_two_replicas_on_one_postgresql_lose_nothing_and_count_a_retry_once(postgres_server):  # noqa: F811
    import pytest

    from benchmarks.feedback_load import empty_schema

    if postgres_server is None:
        pytest.skip("PostgreSQL is not installed (make setup installs it when run as root)")
    empty_schema(postgres_server)
    result = run_load(postgres_server, total=1000, concurrency=50, replicas=2)
    assert (result.errors, result.rows, result.duplicated, result.retries) == (0, 1000, 0, 100), result.error_kinds
