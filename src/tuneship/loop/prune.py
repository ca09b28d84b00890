"""Storage stays bounded: the heavy files of old versions, and old generations, are deleted.

Of the versions that ended (retired, rejected, failed), the newest `loop.keep_versions` keep everything; older
ones lose their checkpoints/, merged/ and gguf/ folders and their cycle folder (<run.dir>/<name>-loop/v<N>/),
while adapter/, chat/, reports/, config.yaml and manifest.json stay, so the registry row and its numbers stay
readable. Never pruned: the champion, the version a rollback would restore, a version in training or a candidate,
a version a `serve.routes` target names, anything another kept version points at (a few-shot version shares its
parent's run folder and GGUF), anything outside <run.dir>.

`tuneship loop prune` also deletes generations older than `loop.keep_generations_days` whose feedback is all
processed, except those an example waiting for a cycle or for review was made from.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from tuneship.config import Config
from tuneship.loop.promotion import previous_champion
from tuneship.loop.registry import Loop, served_files
from tuneship.loop.tables import Version, utcnow

ENDED = ("retired", "rejected", "failed")
HEAVY_FOLDERS = ("checkpoints", "merged", "gguf")
PRUNED_EVENT = "pruned"


@dataclass
class PruneResult:
    freed: dict[int, int] = field(default_factory=dict)  # version id -> bytes deleted
    paths: list[str] = field(default_factory=list)
    generations: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(self.freed.values())

    @property
    def is_empty(self) -> bool:
        return not self.paths and not self.generations and not self.problems


def prune_versions(loop: Loop, actor: str = "tuneship") -> PruneResult:
    """Delete the heavy files of ended versions beyond `loop.keep_versions`; a "pruned" event when any went.
    A file that cannot be deleted is a problem in the result, never an exception (a cycle calls this)."""
    result = _prune_files(loop)
    _record(loop, result, actor)
    return result


def prune_loop(loop: Loop, actor: str = "cli", now: datetime | None = None) -> PruneResult:
    """`tuneship loop prune`: old versions' heavy files and old generations, in one "pruned" event."""
    result = _prune_files(loop)
    result.generations = prune_generations(loop, now)
    _record(loop, result, actor)
    return result


def disk_use(loop: Loop) -> dict[int, int]:
    """Bytes of each version's own files: its run folder (a few-shot version's is its parent's, counted there)
    and its cycle folder."""
    return {version_id: sum(map(size_of, folders)) for version_id, folders in own_folders(loop).items()}


# versions -------------------------------------------------------------------------------------


def own_folders(loop: Loop, versions: list[Version] | None = None) -> dict[int, list[Path]]:
    """version id -> the folders it owns: its run folder, unless an earlier version named it first, and its cycle
    folder."""
    seen: set[Path] = set()
    owned = {}
    for version in sorted(versions if versions is not None else loop.store.versions(), key=lambda v: v.id):
        folders = [Path(version.run_dir).resolve(), loop.cycle_dir(version.id).resolve()]
        owned[version.id] = [f for f in folders if f not in seen]
        seen.update(folders)
    return owned


def versions_to_prune(loop: Loop, versions: list[Version]) -> list[Version]:
    """Ended versions beyond the newest `loop.keep_versions`, less the one a rollback restores and routed ones."""
    previous = previous_champion(loop)
    spared = routed_versions(loop.cfg) | ({previous.id} if previous else set())
    ended = sorted((v for v in versions if v.status in ENDED), key=lambda v: v.id, reverse=True)
    return [v for v in ended[loop.cfg.loop.keep_versions :] if v.id not in spared]


def routed_versions(cfg: Config) -> set[int]:
    """Versions a `serve.routes` target (`v<N>`) serves by name."""
    targets = [t for route in cfg.serve.routes.values() for t in [route.primary, *route.fallbacks]]
    return {int(t[1:]) for t in targets if t.startswith("v") and t[1:].isdigit()}


def heavy_paths(version: Version, owned: list[Path]) -> list[Path]:
    """checkpoints/, merged/ and gguf/ of an owned run folder; an owned cycle folder whole."""
    run_dir = Path(version.run_dir).resolve()
    paths = []
    for folder in owned:
        paths.extend([folder / name for name in HEAVY_FOLDERS] if folder == run_dir else [folder])
    return paths


def protected_paths(loop: Loop, kept: list[Version]) -> list[Path]:
    """What kept versions point at: their run folders, GGUFs and cycle folders."""
    paths = []
    for version in kept:
        paths += [Path(version.run_dir).resolve(), loop.cycle_dir(version.id).resolve()]
        paths += [Path(f).resolve() for f in served_files(version)]
    return paths


def is_deletable(path: Path, root: Path, protected: list[Path]) -> bool:
    """Inside <run.dir> (not <run.dir> itself), and neither inside nor around anything protected."""
    if path == root or root not in path.parents:
        return False
    return not any(path == p or p in path.parents or path in p.parents for p in protected)


def _prune_files(loop: Loop) -> PruneResult:
    versions = loop.store.versions()
    doomed = versions_to_prune(loop, versions)
    doomed_ids = {v.id for v in doomed}
    protected = protected_paths(loop, [v for v in versions if v.id not in doomed_ids])
    root = Path(loop.cfg.run.dir).resolve()
    owned = own_folders(loop, versions)
    result = PruneResult()
    deleted: dict[int, list[Path]] = {}
    for version in doomed:
        for path in heavy_paths(version, owned[version.id]):
            if is_deletable(path, root, protected) and (path.exists() or path.is_symlink()):
                freed = _delete(path, result)
                deleted.setdefault(version.id, []).append(path)
                result.freed[version.id] = result.freed.get(version.id, 0) + freed
                result.paths.append(str(path))
    _update_rows(loop, doomed, deleted, result)
    return result


def _delete(path: Path, result: PruneResult) -> int:
    """Delete a file or folder (a link itself, never what it points to); returns the bytes it freed."""
    before = size_of(path)
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError as exc:
        result.problems.append(f"{path}: {exc}")
    return before - size_of(path)


def _update_rows(loop: Loop, doomed: list[Version], deleted: dict[int, list[Path]], result: PruneResult) -> None:
    """Record what went in each pruned version's metrics; a version whose GGUF went has none (it cannot serve)."""
    gone = [p for paths in deleted.values() for p in paths]
    at = utcnow().isoformat()
    for version in doomed:
        fields = {}
        files = [Path(f).resolve() for f in served_files(version)]
        if any(not f.exists() and any(f == p or p in f.parents for p in gone) for f in files):
            fields.update(gguf=None, adapter=None)
        if version.id in deleted:
            earlier = version.metrics.get("pruned", {})
            paths = [*earlier.get("paths", []), *map(str, deleted[version.id])]
            record = {"at": at, "bytes": earlier.get("bytes", 0) + result.freed[version.id], "paths": paths}
            fields["metrics"] = {**version.metrics, "pruned": record}
        if fields:
            loop.store.update_version(version.id, **fields)


def _record(loop: Loop, result: PruneResult, actor: str) -> None:
    if result.is_empty:
        return
    versions = sorted(result.freed)
    reason = (
        f"freed {result.bytes:,} bytes from {', '.join(f'v{i}' for i in versions) or 'no version'}; "
        f"{result.generations} old generations deleted"
    )
    data = {
        "bytes": result.bytes,
        "versions": versions,
        "paths": result.paths,
        "generations": result.generations,
        "problems": result.problems,
        "keep_versions": loop.cfg.loop.keep_versions,
        "keep_generations_days": loop.cfg.loop.keep_generations_days,
    }
    loop.store.add_event(PRUNED_EVENT, actor, reason, data)


# generations ----------------------------------------------------------------------------------


def prune_generations(loop: Loop, now: datetime | None = None) -> int:
    """Delete generations older than `loop.keep_generations_days` (none when it is null)."""
    days = loop.cfg.loop.keep_generations_days
    if days is None:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    return loop.store.delete_generations_before(cutoff, keep=generations_in_use(loop))


def generations_in_use(loop: Loop) -> set[str]:
    """Generations whose examples still wait (for a cycle or for review): the fast path reads when their
    correction came in, the Review page shows the generation."""
    store = loop.store
    waiting = store.examples(status="accepted", split="train", unused=True)  # of every kind
    examples = [*waiting, *store.examples(status="pending_review")]
    return {e.provenance["generation"] for e in examples if (e.provenance or {}).get("generation")}


# sizes ----------------------------------------------------------------------------------------


def size_of(path: Path) -> int:
    """Bytes under a file or folder, links not followed; 0 when it is not there."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # deleted while counted
                continue
    return total
