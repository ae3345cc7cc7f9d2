"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync'ed, then ``os.replace``d.

    The parent folder is created if needed; the temporary name carries the process id, so concurrent
    writers never share one. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
