"""Writing a file so that no reader ever sees it half-written: write a temporary file beside it, then rename.

Readers here are other processes (a second training process waiting for the base-activation cache) and background
Hub uploads of the output directory, both of which may open the file while it is being replaced.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Calls `write(tmp_path)` on a temporary file in `path`'s folder, then renames it to `path` (atomic on POSIX).

    On failure the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    # A unique name per writer; `write` creates the file, so it gets the usual permissions (mkstemp's are 0600).
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, content: Any) -> None:
    """Writes `content` as indented, key-sorted JSON (stable diffs between checkpoints) with [`atomic_write`]."""
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
