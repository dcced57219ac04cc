"""One writer per run directory: a lock file naming its holder, worker processes that die with their parent, and
paths that stay inside the run directory (`inside`, `clear`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

LOCK_FILE = ".lock"


def file_problem(path: Path, shape: Callable[[object], str | None] | None = None) -> str | None:
    """Returns what is wrong with an output file (missing, unparsable JSON / YAML, a JSONL line that is not a JSON
    object, truncated safetensors, or what `shape` says of a parsed JSON / YAML file's content), else None."""
    if not path.is_file():
        return "missing"
    content = None
    try:
        if path.suffix == ".json":
            content = json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not isinstance(json.loads(line), dict):
                    return f"corrupt (line {n} is not a JSON object)"
        elif path.suffix == ".yaml":
            content = yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            data = path.read_bytes()
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + size])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if len(data) != 8 + size + end:
                return f"truncated ({len(data)} bytes, the header says {8 + size + end})"
    except (ValueError, yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"corrupt ({type(err).__name__})"
    return shape(content) if shape is not None and path.suffix in (".json", ".yaml") else None


class RunDirError(ValueError):
    """A run directory another process is using, or a path that leads out of one; the message names the directory
    and the holder or the path."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Holds `<run_dir>/.lock` while a pipeline runs (a context manager).

    The lock is created exclusively and holds the holder's pid and host. A second run on the same directory fails at
    once naming that pid; a lock whose process is gone (killed run, same host) is stale and taken over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (holder.get("host") != socket.gethostname() or _alive(holder["pid"])):
                    raise RunDirError(
                        f"{self.path.parent}: another memmcl pipeline (pid {holder['pid']} on {holder.get('host')}) is "
                        f"using this run directory; wait for it, stop it, or choose another `name` (if pid "
                        f"{holder['pid']} is not a memmcl run, remove {self.path})") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the run directory's lock")

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            pid = data.get("pid") if isinstance(data, dict) else None
            ok = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            return data if ok else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _steps(run_dir: str | os.PathLike, parts: tuple[str, ...]) -> list[str]:
    """Returns the steps of `parts` (`experts/sc_binary` is two); raises unless each is a name (not empty, `.`, `..`)."""
    steps = [step for part in parts for step in str(part).split("/")]
    if not steps or any(step in ("", ".", "..") for step in steps):
        raise RunDirError(f"{Path(run_dir).joinpath(*parts)}: expected a path inside the run directory "
                          f"{Path(run_dir).resolve()}, of relative steps without '.' or '..'")
    return steps


def inside(run_dir: str | os.PathLike, *parts: str) -> Path:
    """Returns `run_dir/parts...`, checked to lie inside the run directory with every symlink resolved, so no task
    name or planted link leads a write out of it."""
    path = Path(run_dir).joinpath(*_steps(run_dir, parts))
    root, real = Path(run_dir).resolve(), path.resolve()
    if root not in real.parents:
        raise RunDirError(f"{path}: expected a path inside the run directory {root}; it resolves to {real}")
    return path


def _remove(path: Path) -> None:
    """Removes a file, folder or symlink; a symlink is unlinked, never followed (shutil.rmtree refuses a linked
    folder and unlinks the links it meets inside a real one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clear(run_dir: str | os.PathLike, *parts: str) -> None:
    """Removes `run_dir/parts...` (a phase's folder) if there, never following a symlink out of the run directory:
    the folder holding it is `inside` the run directory, and a link in its place is unlinked, not emptied."""
    *folder, name = _steps(run_dir, parts)
    path = (inside(run_dir, *folder) if folder else Path(run_dir)) / name
    if path.is_symlink() or path.exists():
        _remove(path)


# what a killed writer leaves: `write_atomic`'s `.<name>.tmp` files and `atomic_save_dir`'s `.<name>.<8 chars>` and
# `.<name>.old.<8 chars>` folders (tempfile.mkdtemp)
_TEMPORARY = re.compile(r"^\.(.+\.tmp|[^/]+\.(old\.)?[a-z0-9_]{8})$")


def sweep_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Removes the temporary files and folders that killed writers left in a run directory (call it holding the
    run's lock, so no writer is active); returns what was removed."""
    found = [p for p in Path(run_dir).rglob(".*") if _TEMPORARY.match(p.name) and p.name != LOCK_FILE]
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts)):
        if not path.exists():  # inside a folder removed before it
            continue
        _remove(path)
        removed.append(path)
    return removed


def die_with_parent() -> None:
    """Makes this (worker) process exit when its parent dies, even by SIGKILL: the kernel's parent-death signal on
    Linux, else a thread that watches the parent pid."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def quiet_libraries() -> None:
    """Quiet runs (the default; `--verbose` or MEMMCL_VERBOSE=1 keeps everything): no warnings raised outside memmcl
    (library deprecations), no weight-loading bars, Lightning's info lines only from our own progress bars."""
    import logging
    import warnings

    if os.environ.get("MEMMCL_VERBOSE", "") not in ("", "0"):
        return
    warnings.filterwarnings("ignore", module=r"^(?!memmcl)")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def init_worker(threads: int) -> None:
    """Initializer of the pipeline's worker processes: die with the parent, use `threads` threads, stay quiet."""
    import torch

    die_with_parent()
    torch.set_num_threads(threads)
    quiet_libraries()


def file_sha(path: Path) -> str:
    """Returns a short content hash of a file (an expert's adapter: the fingerprint weak data and later phases keep)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file renamed into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes records as JSONL, atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def atomic_save_dir(out_dir: Path, write: Callable[[Path], object], replace: bool = False) -> None:
    """Writes a directory through `write(tmp)` beside `out_dir`, then renames it into place (no half-written dir).

    If `out_dir` exists it is kept (another process built it) unless `replace`, in which case it is swapped out
    only after the new directory is complete, so a failed write never loses the old one.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_hash(obj) -> str:
    """Returns a short, stable hash of a JSON-able object (the key that decides whether a phase is done)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# A setting added to a phase's key after runs existed enters the key only when it is not at its default, so a run
# directory made before the setting existed keeps its keys and is resumed, not redone. The one rule, for both forms:
def added_setting(value, default, name: str | None = None) -> list:
    """Returns the key's part for a setting added later: [] at `default`, else [value] ({name: value} if named)."""
    return [] if value == default else [{name: value} if name else value]


def added_settings(settings: dict, **defaults) -> dict:
    """Returns `settings` without the later-added ones (`defaults`: name -> default) that are at their default."""
    return {k: v for k, v in settings.items() if not (k in defaults and v == defaults[k])}


def write_json(path: Path, data) -> None:
    """Writes JSON atomically, on rank 0 only (every rank of a DDP run computes the same record)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        write_atomic(path, json.dumps(data, indent=1, default=str).encode())
