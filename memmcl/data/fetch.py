"""`memmcl data fetch`: downloads the pinned source files into a source folder, resuming, verified before use."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from memmcl.data.sources import DataBuildError, Source, file_sha256, load_sources

Opener = Callable[[urllib.request.Request], object]  # urllib.request.urlopen or a test's stand-in


def fetch(dest: str | os.PathLike, repos: list[str] | None = None, opener: Opener | None = None,
          sources: dict[str, Source] | None = None) -> dict[str, int]:
    """Downloads every pinned file not yet in `dest` with its hash; returns {"downloaded": n, "present": n}.

    A partial download (`<file>.part`) resumes with an HTTP Range request; a finished file whose hash is not the
    pinned one is removed and is an error naming the source and file, never used.
    """
    opener = opener or (lambda request: urllib.request.urlopen(request, timeout=60))
    sources = sources or load_sources()
    unknown = sorted(set(repos or []) - set(sources))
    if unknown:
        raise DataBuildError(f"memmcl data fetch: unknown source(s) {unknown}; expected some of {sorted(sources)}")
    counts = {"downloaded": 0, "present": 0}
    for repo in repos or sorted(sources):
        source = sources[repo]
        for path, sha in sorted(source.files.items()):
            target = source.local(Path(dest), path)
            if target.is_file() and file_sha256(target) == sha:
                counts["present"] += 1
                continue
            _download(source, path, target, opener)
            counts["downloaded"] += 1
    return counts


def _download(source: Source, path: str, target: Path, opener: Opener) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(source.url(path), headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = opener(request)
    except OSError as err:
        raise DataBuildError(f"{source.repo}@{source.commit[:12]}:{path}: download failed ({err}); expected "
                             f"{source.url(path)} (or build offline: memmcl data build --source DIR)") from None
    resumed = start and getattr(response, "status", 206) == 206
    with response, open(part, "ab" if resumed else "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
    got = file_sha256(part)
    if got != source.files[path]:
        part.unlink()
        raise DataBuildError(f"{source.repo}@{source.commit[:12]}:{path}: downloaded SHA-256 {got[:16]}..., expected "
                             f"{source.files[path][:16]}...; removed, nothing built from it")
    os.replace(part, target)
