"""`tuneship hub push`: a run's merged model, GGUFs, Modelfile and model card, uploaded in one commit."""

from __future__ import annotations

import shutil
from pathlib import Path

from tuneship.config import Config
from tuneship.hub.card import model_card
from tuneship.hub.client import HubError, call_hub, hub_api
from tuneship.run import Run


def stage_push_folder(run: Run, cfg: Config, staging: Path) -> Path:
    """What `hub push` uploads: merged model, GGUFs, tokenizer files, Modelfile and a model card."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if not run.merged_dir.is_dir():
        raise HubError(f"{run.path}: nothing exported yet; run `tuneship export {run.path}` first")
    for item in run.merged_dir.iterdir():
        shutil.copy2(item, staging / item.name)
    for gguf in run.model_ggufs():
        shutil.copy2(gguf, staging / gguf.name)
    if run.modelfile.is_file():
        text = run.modelfile.read_text(encoding="utf-8")
        (staging / "Modelfile").write_text(text.replace("FROM ./gguf/", "FROM ./"), encoding="utf-8")
    (staging / "README.md").write_text(model_card(run, cfg), encoding="utf-8")
    return staging


def push(run: Run, cfg: Config, repo_id: str, private: bool = True) -> str:
    """create_repo, then one create_commit with every staged file (the hub decides LFS or regular per file)."""
    from huggingface_hub import CommitOperationAdd

    staging = stage_push_folder(run, cfg, run.path / "hub-upload")
    api = hub_api()
    call_hub(repo_id, lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(staging.iterdir())]
    commit = call_hub(
        repo_id,
        lambda: api.create_commit(repo_id, operations=operations, commit_message=f"tuneship run {cfg.run.name}"),
    )
    return commit.commit_url
