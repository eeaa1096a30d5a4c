"""The local back end: <artifact_dir>/<job id>/<name>, the layout consa has always used (service/artifacts.py),
on a filesystem the API and the workers share. The default; `consa serve` needs nothing else."""

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

from service import artifacts
from service.store import ArtifactStore, StoredObject


class LocalStore(ArtifactStore):
    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, job_id: str, name: str) -> Path:
        if name == artifacts.SEARCH_STATE:
            return artifacts.search_state_path(self.root, job_id)
        return artifacts.artifact_path(self.root, job_id, name)

    def put(self, job_id: str, name: str, src: Path) -> tuple[int, str]:
        return artifacts.publish(src, self.root, job_id, name)

    def stat(self, job_id: str, name: str) -> StoredObject | None:
        try:
            st = self._path(job_id, name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredObject(name, st.st_size, dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc))

    def read(self, job_id: str, name: str, start: int = 0, end: int | None = None,
             chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(job_id, name), "rb") as f:
            f.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = f.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def files(self, job_id: str) -> list[StoredObject]:
        folder = artifacts.job_dir(self.root, job_id)
        if not folder.is_dir():
            return []
        return sorted((o for p in folder.iterdir() if p.is_file() and (o := self.stat(job_id, p.name))),
                      key=lambda o: o.name)

    def job_ids(self) -> Iterator[tuple[str, dt.datetime | None]]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            # ".staging-*" folders are running workers' scratch space, not a job's files
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                newest = max([p.stat().st_mtime for p in Path(entry.path).iterdir()] or [entry.stat().st_mtime])
                yield entry.name, dt.datetime.fromtimestamp(newest, dt.timezone.utc)

    def delete_job(self, job_id: str, keep_search_state: bool = False) -> None:
        artifacts.remove_job_files(self.root, job_id, keep_search_state=keep_search_state)

    def probe(self, job_id: str) -> None:
        """The worker's staging folder in the store proves the write (worker/runner.py writable_staging)."""

    def state_file(self, job_id: str) -> Path:
        return artifacts.search_state_path(self.root, job_id)

    def push_state(self, job_id: str, path: Path) -> None:
        """Written in place (atomic and fsynced by the search): nothing to do."""

    def pull_state(self, job_id: str, path: Path) -> bool:
        return path.exists()

    def delete_state(self, job_id: str) -> None:
        artifacts.search_state_path(self.root, job_id).unlink(missing_ok=True)

    def local_path(self, job_id: str, name: str) -> Path | None:
        return self._path(job_id, name)
