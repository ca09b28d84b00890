"""One real fine-tune of SmolLM2-135M-Instruct on the quickstart facts, shared by the e2e tests."""

from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    from tuneship.cli import main

    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                str(REPO / "examples" / "quickstart.yaml"),
                "--set",
                f"run.dir={runs}",
                "--set",
                "train.report_to=[]",
            ]
        )
    assert exit_info.value.code in (0, None)
    return runs / "quickstart"
