"""Models on the Hugging Face Hub: repo ids, downloading a model into the Hub's cache, uploading a folder.

`huggingface_hub` (installed with `datasets`) is imported only when a repo is downloaded or uploaded, so
parsing a repo id costs nothing. Every failure is one VQGenError naming the repo and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vqgen.core.runtime.errors import VQGenError, one_line

# the Hub's own rule (huggingface_hub.utils.validate_repo_id): letters, digits, "-", "_", "."; neither part
# starts or ends with "-" or "."; no "--" or ".."; at most 96 characters; a revision is a branch, tag or commit
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?P<owner>{_PART})/(?P<name>{_PART})(?:@(?P<revision>[A-Za-z0-9_][\w./-]*))?")
REPO_ID_FORM = "owner/name or owner/name@revision"


@dataclass(frozen=True)
class RepoId:
    """owner/name on the Hub, at an optional revision (branch, tag or commit)."""

    owner: str
    name: str
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def local_name(self) -> str:
        """A folder name for what commands make from this model: owner--name (the Hub cache's own spelling)."""
        return f"{self.owner}--{self.name}" + (f"@{self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_id(text: str) -> RepoId | None:
    """`owner/name[@revision]` -> RepoId; None when `text` is not one."""
    m = _REPO_ID.fullmatch(text)
    if m is None:
        return None
    repo = f"{m['owner']}/{m['name']}"
    if len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if m["revision"] and (".." in m["revision"] or m["revision"].endswith(("/", "."))):
        return None
    return RepoId(m["owner"], m["name"], m["revision"])


def checked_repo_id(text: str, option: str = "--repo-id", revision: bool = False) -> RepoId:
    """A repo id the user gave, or one VQGenError naming it."""
    repo = parse_repo_id(text)
    if repo is None:
        raise VQGenError(f"{option} {text!r} is not a Hugging Face Hub repo id: expected "
                         f"{REPO_ID_FORM if revision else 'owner/name'} (letters, digits, '-', '_', '.')")
    if repo.revision and not revision:
        raise VQGenError(f"{option} {text!r} names a revision: give owner/name (uploads go to the main branch)")
    return repo


def offline() -> bool:
    """HF_HUB_OFFLINE is set: the Hub is not asked, only its cache is read."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(repo: RepoId, allow_patterns: list[str]) -> Path:
    """The files of `repo` that match `allow_patterns`, in the Hub's cache (downloaded if not there) -> the folder.

    Offline (HF_HUB_OFFLINE=1 or no network) with no cached copy: one line saying so.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = huggingface_hub.snapshot_download(repo.repo_id, revision=repo.revision, repo_type="model",
                                                   allow_patterns=allow_patterns, library_name="vqgen")
    except RevisionNotFoundError:
        why = f"it has no revision {repo.revision!r}"
    except GatedRepoError:
        why = "it is gated: accept its conditions on the Hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        why = "no such model repository, or it is private (log in with `hf auth login`)"
    except LocalEntryNotFoundError as err:  # what snapshot_download raises offline or without a network
        why = ("offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline()
               else f"no network or the Hub did not answer, and it is not in the local cache ({_reason(err)})")
    except Exception as err:  # noqa: BLE001 - HTTP and connection errors come from several libraries
        why = _reason(err)
    else:
        return Path(folder)
    raise VQGenError(f"could not download {str(repo)!r} from the Hugging Face Hub (nor is it a local folder): {why}")


def upload(folder: Path, repo: RepoId, private: bool, message: str) -> str:
    """Create `repo` if needed and upload every file of `folder` to it, removing files a previous upload left
    that `folder` no longer has -> the repo's URL."""
    if offline():
        raise VQGenError(f"cannot push to {repo.repo_id!r}: offline mode (HF_HUB_OFFLINE=1)")
    from huggingface_hub import HfApi

    api = HfApi(library_name="vqgen")
    try:
        url = api.create_repo(repo.repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, repo_type="model", folder_path=str(folder), commit_message=message,
                          delete_patterns="*")  # the Hub keeps .gitattributes whatever the pattern
    except Exception as err:  # noqa: BLE001 - HTTP, authentication and connection errors of several libraries
        raise VQGenError(f"could not push to {repo.repo_id!r} on the Hugging Face Hub: {_reason(err)}") from None
    return str(url)


def _reason(err: BaseException) -> str:
    """One line from a Hub error, whose messages run over several lines ("Got: ConnectError: ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0][:200] if lines else "") or one_line(err) or type(err).__name__
