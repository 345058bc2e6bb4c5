"""Durable file writes: a file is replaced whole or not at all, and a full disk is one clear error.

Where it sits: below everything that writes run state (checkpoint.py, metrics.py, data/shards.py).
Writing to a temporary name, fsyncing it, renaming it over the target and fsyncing the folder is
what makes a rename survive a power cut, not only a killed process.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ownllm.errors import OwnLLMError


def write_error(path: Path, e: OSError, kept: bool = True) -> OwnLLMError:
    """An OSError from writing `path` as one line: the disk is full, or what else the system said."""
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    if not kept:
        return OwnLLMError(f"{path}: {why}")
    return OwnLLMError(f"{path}: cannot write ({why}); the files already there are unchanged")


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` in one step; on failure the old file stays and no temp file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fsync_write(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    fsync_dir(path.parent)


def home() -> Path:
    """Where ownllm keeps what it builds on first use (the demo knowledge base and shop): $OWNLLM_HOME,
    default ~/.cache/ownllm."""
    return Path(os.environ.get("OWNLLM_HOME") or Path.home() / ".cache" / "ownllm")
