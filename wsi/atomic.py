"""Atomic, durable file writes: the one way this project puts a file in place.

Readers (a later run, a colleague, a web server) must see either the old file
or the complete new one, never a half-written one, and the file must be
readable as the user's umask says. Every writer goes through here::

    atomic_write_text(path, "...")          # also _json, _bytes
    with atomic_path(path) as tmp:          # for writers that want a file name
        torch.save(obj, tmp)                # (torch.save, cv2.imwrite, Pillow...)

How: the content goes to a hidden sibling (``.tmp-<random>-<name>``) created
with mode ``0o666`` so the kernel applies the umask (``tempfile.mkstemp`` would
make it ``0600`` whatever the umask); the file is fsynced, renamed over the
target, and the directory is fsynced so the rename survives a power cut. On any
error the temporary file is removed and the old content stays.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "TEMP_PREFIX",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "temp_sibling",
]

#: Temporary files and folders start with this (``.tmp-<hex>-<name>``): hidden, never trusted by a
#: reader, and removed by the commands' clean-up of interrupted runs.
TEMP_PREFIX = ".tmp-"


def temp_sibling(path: str | Path) -> Path:
    """A unique hidden name beside ``path`` that keeps its suffix (some writers infer the format from it)."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


def fsync_dir(folder: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush one file's content to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, move it into place.

    The caller creates the file (its mode then follows the umask, as for any new
    file). ``durable=False`` skips the fsyncs (for large scratch files whose loss
    a later run detects anyway).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the path."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | Path, data: Any, *, durable: bool = True) -> Path:
    """Write ``data`` as indented JSON (non-JSON values as ``str``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", durable=durable)
