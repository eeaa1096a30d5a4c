"""Artifact files on disk: <artifact_dir>/<job id>/<name>, written atomically, described by size + sha256.
What each file is (its media type, whether the dashboard shows it) is declared in consa.core.artifacts."""

import hashlib
import mimetypes
import os
import re
import shutil
from pathlib import Path

from consa.core.artifacts import ARTIFACTS

# One path segment of safe characters: no "/", no "..", no hidden files. Checked before any disk access.
# A plain regular expression (no look-ahead) so the OpenAPI spec can state the same rule as the server.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*"
NAME_MAX_LENGTH = 255
_NAME = re.compile(NAME_PATTERN)

mimetypes.add_type("text/markdown", ".md")


def valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX_LENGTH and bool(_NAME.fullmatch(name))


# A file the registry does not declare is served under the type its name suggests, when it is one of these.
_GUESSABLE = ("application/json", "image/png", "application/x-tar", "application/gzip", "text/markdown")
# Every media type content_type() can answer (the download's documented content types).
MEDIA_TYPES = tuple(dict.fromkeys([*_GUESSABLE, *(a.media_type for a in ARTIFACTS.values()),
                                   "application/octet-stream"]))


def content_type(name: str) -> str:
    """The registry's media type for a declared artifact; for any other name, a guess from its ending."""
    if name in ARTIFACTS:
        return ARTIFACTS[name].media_type
    if name.endswith(".tar.gz"):
        return "application/gzip"
    guessed = mimetypes.guess_type(name)[0]
    return guessed if guessed in _GUESSABLE else "application/octet-stream"


def shown_as(name: str) -> str | None:
    """How the dashboard shows the artifact ("image", "table"), or None: listed for download only."""
    return ARTIFACTS[name].shown_as if name in ARTIFACTS else None


def job_dir(root: Path, job_id: str) -> Path:
    return Path(root) / job_id


def artifact_path(root: Path, job_id: str, name: str) -> Path:
    if not valid_name(name):
        raise ValueError(f"invalid artifact name {name!r}")
    return job_dir(root, job_id) / name


def publish(src: Path, root: Path, job_id: str, name: str) -> tuple[int, str]:
    """Copy `src` into the store under `name`; return (size, sha256) of the bytes stored.

    The copy goes to a temporary file in the destination directory and is renamed into place, so a
    reader never sees a half-written artifact and a crash leaves no file with that name.
    """
    dest = artifact_path(root, job_id, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{name}.tmp")
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)
    return size, digest.hexdigest()


# The search's resume state (worker/runner.py): in the job's folder, but a hidden name that valid_name()
# refuses, so it is never listed or served; it outlives a lost attempt and goes when the job ends.
SEARCH_STATE = ".search_state.safetensors"


def search_state_path(root: Path, job_id: str) -> Path:
    return job_dir(root, job_id) / SEARCH_STATE


def remove_job_files(root: Path, job_id: str, keep_search_state: bool = False) -> None:
    """Remove a job's files; `keep_search_state` keeps what a requeued attempt resumes from."""
    folder = job_dir(root, job_id)
    if not keep_search_state:
        shutil.rmtree(folder, ignore_errors=True)
        return
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name == SEARCH_STATE:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
