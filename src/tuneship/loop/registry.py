"""The loop over one base run: its config, its store, and its registry of versions (promotion.py moves the
champion alias), with an event for every change saying who and why.

Version 1 is the base run itself, registered the first time the loop opens: its training data becomes
examples used by v1 (the replay pool), its eval split and `loop.golden` become the golden set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneship.chat.format import ChatFormat
from tuneship.config import Config, load_config
from tuneship.data.conversation import read_conversations
from tuneship.data.stage import audit_settings, prepare_data, write_data_outputs
from tuneship.errors import TuneshipError
from tuneship.loop.tables import Example, Split, Version, utcnow
from tuneship.loop.signals import example_id
from tuneship.loop.store import Store, default_database_url, open_store
from tuneship.run import Run


class RegistryError(TuneshipError):
    """A promotion or rollback that cannot be done."""


@dataclass
class Loop:
    """The loop of one base run: `cfg` is the base run's config, `base_run` its directory, `target` what it was
    opened from (the run directory or the config file; a cycle in another process opens the same)."""

    cfg: Config
    base_run: Path
    store: Store
    target: Path

    @property
    def name(self) -> str:
        return self.cfg.run.name

    def version_name(self, version_id: int) -> str:
        return self.name if version_id == 1 else f"{self.name}-v{version_id}"

    def cycle_dir(self, version_id: int) -> Path:
        """<run.dir>/<name>-loop/v<N>/: a cycle's training and golden files, a few-shot version's Modelfile."""
        return Path(self.cfg.run.dir).resolve() / f"{self.name}-loop" / f"v{version_id}"

    def version_config(self, version: Version) -> Config:
        """The resolved config a version's run was made with."""
        return load_config(Path(version.run_dir) / "config.yaml")


def open_loop(target: str | Path, overrides: list[str] | None = None, store: Store | None = None) -> Loop:
    """A run directory (its config.yaml) or a config file -> the Loop, with v1 registered when new."""
    path = Path(target)
    cfg = load_config(path / "config.yaml" if path.is_dir() else path, overrides)
    base_run = (path if path.is_dir() else cfg.run_dir).resolve()
    loop = Loop(cfg, base_run, store or open_store(default_database_url(cfg)), path.resolve())
    if not loop.store.versions():
        register_base_run(loop)
    return loop


def version_gguf(cfg: Config, run_dir: Path) -> Path:
    """The GGUF a version ships: the run's deployed GGUF (deploy.quant or the first export quant)."""
    return Run.of(cfg, run_dir).deployed_gguf


def version_chat_format(version: Version) -> ChatFormat:
    """The ChatFormat a version's run was trained with (saved with its adapter)."""
    return ChatFormat.load(Path(version.run_dir) / "adapter")


def register_base_run(loop: Loop) -> Version:
    """The base run as v1, the champion: its training data the replay pool, its eval split and loop.golden the
    golden set."""
    gguf = version_gguf(loop.cfg, loop.base_run)
    version = loop.store.add_version(
        id=1,
        name=loop.name,
        parent_id=None,
        run_dir=str(loop.base_run),
        gguf=str(gguf) if gguf.is_file() else None,
        status="champion",
        example_ids=[],
        metrics={},
        promoted_at=utcnow(),
    )
    data = loop.base_run / "data"
    imported = import_conversations(loop.store, data / "train.jsonl", "train", used_in=[1])
    golden = import_conversations(loop.store, data / "eval.jsonl", "golden")
    if loop.cfg.loop.golden:
        golden += import_golden_file(loop.store, Path(loop.cfg.loop.golden), loop.cfg)
    loop.store.add_event(
        "registered",
        "tuneship",
        f"base run {loop.base_run} registered as v1 (champion)",
        {"train_examples": imported, "golden_examples": golden, "gguf": version.gguf},
        version_id=1,
    )
    return version


def import_conversations(store: Store, path: Path, split: Split, used_in: list[int] | None = None) -> int:
    """A run's data file (Conversation JSONL) -> accepted SFT examples. A golden example gets its own id even
    when a training example has the same content, so it is never lost to the dedupe by content."""
    if not path.is_file():
        return 0
    examples = []
    for conversation in read_conversations(path):
        record = conversation.to_json()
        content_id = example_id("sft", record)
        examples.append(
            Example(
                id=f"golden-{content_id}" if split == "golden" else content_id,  # a golden twin of a train example
                kind="sft",
                conversation=record,
                provenance={"file": str(path), "line": conversation.source.line, "source": str(conversation.source)},
                split=split,
                status="accepted",
                used_in=list(used_in or []),
            )
        )
    return store.add_examples(examples)


def import_golden_file(store: Store, path: Path, cfg: Config) -> int:
    """loop.golden: any training format, audited; what the audit keeps becomes golden examples."""
    result = prepare_data([str(path)], audit_settings(cfg))
    kept = write_data_outputs(result, Path(cfg.run.dir) / f"{cfg.run.name}-loop" / "golden-audit")["train.jsonl"]
    return import_conversations(store, kept, "golden")


def require_servable(version: Version) -> None:
    """A version the loop can serve and train from: an exported GGUF and the run's adapter with its ChatFormat."""
    run_dir = Path(version.run_dir)
    if not version.gguf or not Path(version.gguf).is_file() or not (run_dir / "adapter" / "chat_format.json").is_file():
        raise RegistryError(
            f"v{version.id} ({version.name}) has no exported GGUF or adapter in {run_dir}; "
            f"run `tuneship run` (or `tuneship export {run_dir}`) first"
        )
