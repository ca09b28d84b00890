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

    @property
    def log_dir(self) -> Path:
        """<the base run's folder>/<name>-loop/: where cycle.log is (the cycles started by a server)."""
        return self.base_run.parent / f"{self.name}-loop"

    def cycle_dir(self, version_id: int) -> Path:
        """<run.dir>/<name>-loop/v<N>/: a cycle's training and golden files, a few-shot version's Modelfile."""
        return Path(self.cfg.run.dir).resolve() / f"{self.name}-loop" / f"v{version_id}"

    def version_config(self, version: Version) -> Config:
        """The resolved config a version's run was made with."""
        return load_config(Path(version.run_dir) / "config.yaml")


def open_loop(target: str | Path, overrides: list[str] | None = None, store: Store | None = None) -> Loop:
    """A run directory (its config.yaml) or a config file -> the Loop, with v1 registered when new.

    A run directory is taken where it is now: a copied or moved run keeps its store and its versions beside
    itself, never where it was created (see `run_where_it_is`); with the default store, copied along, its
    versions' paths follow it (`relocate_versions`)."""
    path = Path(target)
    if path.is_dir():
        cfg = run_where_it_is(load_config(path / "config.yaml", overrides), path, overrides)
        base_run = path.resolve()
    else:
        cfg = load_config(path, overrides)
        base_run = cfg.run_dir.resolve()
    loop = Loop(cfg, base_run, store or open_store(default_database_url(cfg)), path.resolve())
    if not loop.store.versions():
        register_base_run(loop)
    elif store is None and not cfg.loop.database_url:
        relocate_versions(loop)
    return loop


def run_where_it_is(cfg: Config, run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config of the run in `run_dir`, with run.dir = the folder the run is in now (its config.yaml says
    where it was made), unless `--set run.dir=` says otherwise. A path the config names under the old run.dir
    (loop.golden, data.sources, ...) is taken from the same place under the new one when something is there;
    paths written relative in config.yaml already resolve against the run folder (load_config)."""
    if any(o.partition("=")[0].strip() == "run.dir" for o in overrides or []):
        return cfg
    old, new = Path(cfg.run.dir).resolve(), run_dir.resolve().parent
    if old == new:
        return cfg
    cfg.run.dir = new
    cfg.data.sources = [moved_path(source, old, new) for source in cfg.data.sources]
    for section, key in (("loop", "golden"), ("eval", "prompts"), ("model", "adapter_from"), ("model", "base")):
        block = getattr(cfg, section)
        value = getattr(block, key)
        if value is not None:
            setattr(block, key, type(value)(moved_path(str(value), old, new)))
    return cfg


def moved_path(value: str, old: Path, new: Path) -> str:
    """A path under `old` -> the same place under `new` when something is there (the copy is taken, even when
    the original still exists); anything else (URIs, hub ids, paths outside `old`, nothing there) unchanged."""
    if "://" in value or not Path(value).is_absolute():
        return value
    try:
        relative = Path(value).relative_to(old)
    except ValueError:
        return value
    candidate = new / relative
    return str(candidate) if candidate.exists() else value


def relocate_versions(loop: Loop) -> list[int]:
    """A store copied along with the runs (the default SQLite beside them) names its versions' folders and GGUFs
    where they were: when v1 was registered elsewhere than the base run now is, every path under that old
    run.dir whose counterpart exists under this one is rewritten to it (an event says which). Returns the ids."""
    first = loop.store.version(1)
    if first is None or Path(first.run_dir) == loop.base_run:
        return []
    old, new = Path(first.run_dir).parent, loop.base_run.parent
    if old == new:  # another run's loop in the same folder (one default store per run.dir)
        return []
    moved = []
    for version in loop.store.versions():
        fields = {"run_dir": moved_path(version.run_dir, old, new)}
        for key in ("gguf", "adapter"):
            if getattr(version, key):
                fields[key] = moved_path(getattr(version, key), old, new)
        changed = {key: value for key, value in fields.items() if value != getattr(version, key)}
        if changed:
            loop.store.update_version(version.id, **changed)
            moved.append(version.id)
    if moved:
        loop.store.add_event(
            "relocated",
            "tuneship",
            f"the runs moved from {old} to {new}",
            {"from": str(old), "to": str(new), "versions": moved},
        )
    return moved


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


def served_files(version: Version) -> list[str]:
    """What llama.cpp loads for a version: its GGUF, and in adapter format its LoRA GGUF (what the row names)."""
    return [f for f in (version.gguf, version.adapter) if f]


def has_served_files(version: Version) -> bool:
    """A GGUF, and every file llama.cpp loads for the version, in place."""
    return bool(version.gguf) and all(Path(f).is_file() for f in served_files(version))


def is_published(version: Version) -> bool:
    """Its files are in loop.artifacts_url (replicas on other machines serve it from there)."""
    return "gguf" in (version.artifacts or {})


def require_servable(version: Version) -> None:
    """A version the loop can serve and train from: an exported GGUF and the run's adapter with its ChatFormat."""
    run_dir = Path(version.run_dir)
    if not has_served_files(version) or not (run_dir / "adapter" / "chat_format.json").is_file():
        raise RegistryError(
            f"v{version.id} ({version.name}) has no exported GGUF or adapter in {run_dir}; "
            f"run `tuneship run` (or `tuneship export {run_dir}`) first"
        )
