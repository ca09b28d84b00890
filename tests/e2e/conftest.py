"""The quickstart run, once for every e2e test: `tuneship run examples/quickstart.yaml` (the real SmolLM2 on
the 30 made-up facts: trained, evaluated, exported to Q4_K_M and Q8_0, template-checked, Modelfile written;
deploy target none). Tests read it; the loop test serves it (the loop writes beside it, never into it)."""

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, made_once


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """Made once per test session: under pytest-xdist, in the session's folder that every worker shares, by the
    first worker that needs it (the others wait on the lock, then read it)."""
    from tuneship.cli import main

    def make(runs: Path) -> None:
        overrides = [f"run.dir={runs}", "train.report_to=[]", "export.quants=[Q4_K_M,Q8_0]", "deploy.target=none"]
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(REPO / "examples" / "quickstart.yaml"), *[f"--set={o}" for o in overrides]])
        assert exit_info.value.code in (0, None)

    return made_once(tmp_path_factory, "quickstart-runs", make) / "quickstart"


def copy_of_quickstart(quickstart_run: Path, parent: Path) -> Path:
    """The quickstart run in `parent`/runs (GGUFs, adapter, data, reports; no checkpoints or merged folder), for a
    test that opens its own loop (its own store) on it."""
    target = parent / "runs" / quickstart_run.name
    shutil.copytree(quickstart_run, target, ignore=shutil.ignore_patterns("checkpoints", "merged"))
    return target
