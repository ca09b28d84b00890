"""Hub operations through huggingface_hub (the endpoint follows HF_ENDPOINT, offline follows HF_HUB_OFFLINE).

Downloads are plain HTTP GETs of `<endpoint>/<repo>/resolve/<revision>/<file>`, hashed while they
stream and compared with the sha256 the hub's LFS metadata lists for that file; a mismatch deletes
the file and fails.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from tuneship.errors import TuneshipError
from tuneship.hub.gguf_files import GGUFChoice, RemoteFile, choose, group_ggufs
from tuneship.paths import sha256_file


class HubError(TuneshipError):
    """The hub could not be reached, or answered something unusable."""


@dataclass
class SearchHit:
    repo_id: str
    downloads: int
    likes: int
    choices: list[GGUFChoice]


def hub_api():
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HubError(
            "HF_HUB_OFFLINE is set: the hub cannot be reached; unset it, or pull on a machine with "
            "network and copy the .gguf file, then use model.base=path/to/file.gguf"
        )
    from huggingface_hub import HfApi

    return HfApi()


def call_hub(what: str, action):
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        return action()
    except GatedRepoError:
        raise HubError(
            f"{what}: a gated repository; accept its conditions on the hub page, then set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repository on the hub (or it is private: set HF_TOKEN)") from None
    except OfflineModeIsEnabled as exc:
        raise HubError(f"{what}: offline mode is enabled ({exc}); unset HF_HUB_OFFLINE") from None
    except HFValidationError as exc:
        raise HubError(f"{what}: not a valid hub repository id ({exc})") from None
    except LocalEntryNotFoundError as exc:
        unreachable = f"the hub at {constants.ENDPOINT} cannot be reached"
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable
        raise HubError(
            f"{what}: {reason} and the hub cache ({constants.HF_HUB_CACHE}) has no complete copy "
            f"({str(exc).splitlines()[0]}); check the network or HF_ENDPOINT, or download it once online"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"{what}: the hub answered {exc}") from None
    except OSError as exc:
        raise HubError(
            f"{what}: cannot reach the hub at {constants.ENDPOINT} ({exc}); check the network or HF_ENDPOINT"
        ) from None


def remote_files(repo_id: str, revision: str = "main") -> list[RemoteFile]:
    info = call_hub(repo_id, lambda: hub_api().model_info(repo_id, revision=revision, files_metadata=True))
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        sha = (lfs.sha256 if hasattr(lfs, "sha256") else lfs.get("sha256")) if lfs else None
        files.append(RemoteFile(sibling.rfilename, int(sibling.size or 0), sha))
    return files


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """The repo's files that match `patterns`, in the hub cache (HF_HUB_CACHE), as huggingface_hub keeps them:
    downloaded once per commit; offline (HF_HUB_OFFLINE) or unreachable, the cached snapshot."""
    from huggingface_hub import snapshot_download

    folder = call_hub(
        repo_id,
        lambda: snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir),
    )
    return Path(folder)


def search(query: str, limit: int = 10) -> list[SearchHit]:
    models = call_hub(
        "search", lambda: list(hub_api().list_models(search=query, filter="gguf", sort="downloads", limit=limit))
    )
    return [SearchHit(m.id, m.downloads or 0, m.likes or 0, group_ggufs(remote_files(m.id))) for m in models]


def pull(repo_id: str, dest: Path, quant: str | None = None, revision: str = "main") -> list[Path]:
    """Download the chosen GGUF (all parts of a split file), each verified against the hub's sha256."""
    choices = group_ggufs(remote_files(repo_id, revision))
    choice = choose(choices, quant)
    if choice is None:
        offered = ", ".join(sorted({c.quant for c in choices})) or "none"
        raise HubError(f"{repo_id}: no {quant or 'GGUF'} file (offered: {offered})")
    dest.mkdir(parents=True, exist_ok=True)
    return [_download(repo_id, revision, remote, dest) for remote in choice.files]


def _download(repo_id: str, revision: str, remote: RemoteFile, dest: Path) -> Path:
    from huggingface_hub import constants

    target = dest / Path(remote.name).name
    if target.is_file() and remote.sha256 and sha256_file(target) == remote.sha256:
        return target
    url = f"{constants.ENDPOINT}/{repo_id}/resolve/{revision}/{remote.name}"
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    try:
        with (
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response,
            open(partial, "wb") as out,
        ):
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise HubError(f"downloading {url} failed: {exc}") from None
    if remote.sha256 and digest.hexdigest() != remote.sha256:
        partial.unlink(missing_ok=True)
        raise HubError(
            f"{remote.name}: sha256 {digest.hexdigest()} differs from the hub's {remote.sha256}; "
            "the download is corrupt and was deleted"
        )
    partial.replace(target)
    return target
