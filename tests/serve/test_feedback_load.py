"""1,000 feedback POSTs from 50 concurrent clients against `tuneship serve` in its own process: 1,000 rows and
no error, on SQLite and on PostgreSQL (benchmarks/feedback_load.py prints the speed)."""

from benchmarks.feedback_load import run_load
from tests.loop.conftest import database_url, postgres_server  # noqa: F401


def test_a_thousand_concurrent_feedback_posts_store_a_thousand_rows(database_url):  # noqa: F811
    result = run_load(database_url, total=1000, concurrency=50)
    assert (result.errors, result.rows, len(result.latencies_ms)) == (0, 1000, 1000)
