"""The public sources of the real-task data folder, each pinned to a commit and a SHA-256 of every file read.

A source folder holds each repository's files under `<owner>+<name>/<path>` (what `memmcl data fetch` writes, and the
layout `--source DIR` reads). Files come from `https://raw.githubusercontent.com/<owner>/<name>/<commit>/<path>`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import yaml

RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"


class DataBuildError(ValueError):
    """A missing or tampered source file, or a bad data folder; the message names the source, file and what was expected."""


@dataclass(frozen=True)
class Source:
    """A public repository at one commit and the files read from it ({path: SHA-256})."""

    repo: str
    commit: str
    files: dict[str, str]

    @property
    def folder(self) -> str:
        return self.repo.replace("/", "+")

    def url(self, path: str) -> str:
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=quote(path))  # 'V1去除conflict/...' too

    def local(self, root: Path, path: str) -> Path:
        return Path(root) / self.folder / path


def load_sources() -> dict[str, Source]:
    """Returns the pinned sources of `sources.yaml`, by repository."""
    data = yaml.safe_load((resources.files("memmcl.data") / "sources.yaml").read_text())
    return {repo: Source(repo, s["commit"], dict(s["files"])) for repo, s in data.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: Path, source: Source, paths: list[str] | None = None) -> None:
    """Checks that each file of `source` (or only `paths`) is under `root` with its pinned hash; one line otherwise."""
    for path in paths or sorted(source.files):
        local = source.local(root, path)
        if not local.is_file():
            raise DataBuildError(f"{source.repo}@{source.commit[:12]}:{path}: missing; expected it at {local} "
                                 f"(memmcl data fetch --dest {root}, or a copy of the repository there)")
        got = file_sha256(local)
        if got != source.files[path]:
            raise DataBuildError(f"{source.repo}@{source.commit[:12]}:{path}: SHA-256 {got[:16]}... at {local}, "
                                 f"expected {source.files[path][:16]}... (a changed or damaged copy)")
