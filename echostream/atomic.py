"""Writing files and folders so that nobody ever sees a partial one (torch-free, shared by every
writer: checkpoints, artifacts folders, plans, the translate outputs, caches).

Both helpers write beside the target (same file system, so the final rename is atomic) and clean
up on any failure, leaving an existing target untouched.

Examples:
    >>> with atomic_file("out.wav") as tmp:
    ...     soundfile.write(tmp, samples, 16000)      # renamed over out.wav only on success
    >>> with atomic_folder("engines/tiny") as tmp:
    ...     export_into(tmp)                           # replaces the old folder only on success
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield a temp file path beside ``path``; on success it is renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it gets ordinary permissions and replaces
    ``out`` (an old folder is deleted only once the new one is in place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files); give the finished folder the
    permissions an ordinary ``mkdir``/``open`` would have under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
