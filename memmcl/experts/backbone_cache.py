"""What every backbone resolver shares (`backbone.py` for the tiny model and local or hub names, `gguf_backbones.py`
for GGUF wheels): the cache directory built backbones go to, and the error for a backbone that cannot be loaded."""

from __future__ import annotations

import os
from pathlib import Path


class BackboneError(ValueError):
    """A backbone name or directory that cannot be loaded; the message names the path and what was expected."""


def cache_root() -> Path:
    """Returns the directory where built backbones are cached (`$MEMMCL_CACHE`, else ~/.cache/memmcl)."""
    return Path(os.environ.get("MEMMCL_CACHE", Path.home() / ".cache" / "memmcl"))
