"""Atomic file writes: a crash mid-write never leaves a half-written file where a good one was; reading back the
caches written that way, where a damaged file is one clear error; and a file's sha256 (its identity)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFullError(OSError):
    """No space left where a file was being written; the message names the path."""


def _disk_full(e: BaseException, directory: Path) -> bool:
    """ENOSPC/EDQUOT, or a library error (torch.save raises RuntimeError) on a directory with < 1 MiB free."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(e, OSError | RuntimeError) and shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


# The process's umask, read once (reading it means setting it, which is not thread-safe to repeat per write).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path` (POSIX-atomic).
    On any failure the temporary file is removed and `path` is left as it was; a full disk raises DiskFullError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e, path.parent):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; free some space and run again "
                "(the previous file, if any, is unchanged)",
            ) from e
        raise


def load_cache(path: str | Path, keys: tuple[str, ...]) -> dict:
    """torch.load(path, weights_only=True) of a cache file this package wrote (a dict holding `keys`). One that
    cannot be read (truncated, foreign, edited) is a ValueError naming the file: delete it and it is rebuilt."""
    import torch

    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing error
        raise ValueError(
            f"cache file {path} cannot be read ({type(e).__name__}); delete it and the next run rebuilds it"
        ) from e
    missing = [k for k in keys if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise ValueError(f"cache file {path} lacks {missing}; delete it and the next run rebuilds it")
    return blob


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB blocks (a prepared chunk's or a checkpoint's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
