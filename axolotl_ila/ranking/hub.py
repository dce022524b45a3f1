"""Rankings on the Hugging Face Hub: ``hf://OWNER/REPO[@REVISION]/PATH.json``.

The path form is that of ``huggingface_hub``'s ``HfFileSystem`` for model repos.
A Hub ranking is fetched with ``hf_hub_download`` into the user's Hugging Face
cache (so ``HF_HUB_OFFLINE=1`` works once it is there), then read and validated
like a local file. Nothing here writes to the Hub: sharing a ranking is
``hf upload``'s job, and a search never runs in place of a missing Hub file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

HUB_SCHEME = "hf://"
ACCEPTED_FORMS = "hf://OWNER/REPO/PATH.json or hf://OWNER/REPO@REVISION/PATH.json"
_REPO_TYPE_PREFIXES = ("datasets/", "spaces/", "buckets/")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PR_REVISION = re.compile(r"^(refs/pr/\d+)/(.+)$")
_PR_REF = re.compile(r"^refs/pr/\d+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub ranking that cannot be had, with the reason (``problem``) and the fix."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class HubPathError(HubError):
    """An ``hf://`` string that does not name a file of a model repo."""


class HubFetchError(HubError):
    """A well-formed ``hf://`` path whose file could not be fetched."""


@dataclass(frozen=True)
class HubPath:
    """A file of a model repo on the Hub, at a revision (None: the default branch)."""

    repo_id: str
    path_in_repo: str
    revision: str | None = None

    def __str__(self) -> str:
        revision = self.revision or ""
        if not _PR_REF.match(revision):
            revision = revision.replace("/", "%2F")
        at = f"@{revision}" if revision else ""
        return f"{HUB_SCHEME}{self.repo_id}{at}/{self.path_in_repo}"

    def download_command(self) -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} {self.path_in_repo}{revision}"

    @property
    def at_commit(self) -> bool:
        return bool(self.revision and _COMMIT.match(self.revision))

    def upload_command(self, local: str) -> str:
        """Upload ``local`` to this path (a commit cannot take new files: then the default branch)."""
        revision = f" --revision {self.revision}" if self.revision and not self.at_commit else ""
        return f"hf upload {self.repo_id} {local} {self.path_in_repo}{revision}"


def is_hub_path(value: Any) -> bool:
    """True for anything meant as a Hub path (``hf:`` prefix), valid or not."""
    return isinstance(value, str) and value.startswith("hf:")


def _malformed(value: str, problem: str) -> HubPathError:
    return HubPathError(f"ranking path {value!r}: {problem}. A Hub ranking is named {ACCEPTED_FORMS}.")


def parse_hub_path(value: str) -> HubPath:
    """``hf://OWNER/REPO/PATH.json`` or ``hf://OWNER/REPO@REVISION/PATH.json``.

    A revision with a ``/`` in it is written URL-encoded (``@my%2Fbranch``), as
    ``HfFileSystem`` does; pull-request refs (``@refs/pr/3``) are taken as they are.
    """
    if not value.startswith(HUB_SCHEME):
        raise _malformed(value, "a Hub path starts with hf:// (two slashes)")
    rest = value[len(HUB_SCHEME) :]
    if rest.startswith(_REPO_TYPE_PREFIXES):
        raise _malformed(value, f"rankings are read from model repos, not {rest.split('/')[0]} repos")
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise _malformed(value, "it names no file inside the repo")
    owner, repo, path = parts
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if revision == "refs":
            match = _PR_REVISION.match(f"refs/{path}")
            if not match:
                raise _malformed(value, "a pull-request revision is written @refs/pr/NUMBER")
            revision, path = match.groups()
        revision = unquote(revision)
        if not revision:
            raise _malformed(value, "the revision after @ is empty")
    for kind, name in (("owner", owner), ("repo name", repo)):
        if not _NAME.match(name) or "--" in name or ".." in name or len(name) > 96:
            raise _malformed(value, f"{name!r} is not a valid {kind} (letters, digits, '-', '_', '.')")
    if "@" in path:
        raise _malformed(value, "the revision goes right after the repo name (OWNER/REPO@REVISION)")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise _malformed(value, f"the path inside the repo ({path}) has an empty, '.' or '..' part")
    if not path.endswith(".json"):
        raise _malformed(value, f"the path inside the repo ({path}) is not a .json file")
    return HubPath(repo_id=f"{owner}/{repo}", path_in_repo=path, revision=revision)


@dataclass(frozen=True)
class HubFile:
    """A Hub file in the local Hugging Face cache."""

    source: HubPath
    local_path: Path
    commit: str | None  # the commit the cached file belongs to

    def identity(self) -> dict[str, Any]:
        return {
            "repo": self.source.repo_id,
            "path_in_repo": self.source.path_in_repo,
            "revision": self.source.revision or "main",
            "commit": self.commit,
        }


def how_to_make(source: HubPath) -> str:
    """What a user does when a Hub ranking is missing: search locally, then upload."""
    local = f"rankings/{Path(source.path_in_repo).name}"
    target = HubPath(source.repo_id, source.path_in_repo) if source.at_commit else source
    return (
        f"A missing Hub ranking is never replaced by a search. To make it: set ila_ranking: {local} "
        f"(a local path) and run `axolotl-ila search CONFIG` (or train once with ila_search: auto); "
        f"then upload it with `{source.upload_command(local)}` and point ila_ranking at {target}."
    )


def fetch(source: HubPath) -> HubFile:
    """Download (or find in the cache) the file ``source`` names.

    Errors are ``HubFetchError`` s naming the ``hf://`` path, what went wrong and
    what to do; with ``HF_HUB_OFFLINE=1`` only the cache is read."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fail(problem: str, fix: str) -> HubFetchError:
        return HubFetchError(f"ranking {source}: {problem}. {fix}", problem=problem)

    try:
        local = hf_hub_download(repo_id=source.repo_id, filename=source.path_in_repo, revision=source.revision)
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            problem = f"HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        else:
            problem = f"the Hub could not be reached and the file is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        raise fail(
            problem,
            f"If it is on the Hub, fetch it once with network (`{source.download_command()}`, or train once "
            f"online). {how_to_make(source)}",
        ) from exc
    except GatedRepoError as exc:
        raise fail(
            f"{source.repo_id} is gated and this machine has no access",
            "Request access on the repo's page and log in (`hf auth login`).",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise fail(
            f"repo {source.repo_id} does not exist on the Hub (or is private and you are not logged in)",
            f"Check the name, or log in (`hf auth login`). {how_to_make(source)}",
        ) from exc
    except RevisionNotFoundError as exc:
        raise fail(f"{source.repo_id} has no revision {source.revision}", "Check the branch, tag or commit after @.") from exc
    except EntryNotFoundError as exc:
        at = f" at {source.revision}" if source.revision else ""
        raise fail(f"{source.repo_id}{at} has no file {source.path_in_repo}", how_to_make(source)) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise fail(f"download failed ({type(exc).__name__}: {exc})", "Retry, or fetch it with `" + source.download_command() + "`.") from exc
    return HubFile(source=source, local_path=Path(local), commit=_snapshot_commit(Path(local), source))


def _snapshot_commit(local: Path, source: HubPath) -> str | None:
    """The cache keeps a file at ``.../snapshots/<commit>/<path in repo>``."""
    depth = len(source.path_in_repo.split("/"))
    snapshot = local.parents[depth - 1] if len(local.parents) >= depth else None
    if snapshot is not None and snapshot.parent.name == "snapshots" and _COMMIT.match(snapshot.name):
        return snapshot.name
    return None
