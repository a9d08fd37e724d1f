"""Writing files so that a crash never leaves half of one: the one atomic write of checkpoints, run files,
prepared datasets and caches (torch-free)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# The mode a plain open() gives a new file. mkstemp creates its temporaries 0600; the file renamed into place gets
# what the user's umask asks for (a prepared dataset or a checkpoint is often shared). Read once: reading the umask
# means setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    atomic_write_all([(path, write)])


def atomic_write_all(writes: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every file to a temporary beside it (fsynced), then rename them all: a failure in any write leaves
    every previous file unchanged, and removes the temporaries written so far.

    Temporaries are named ``.<name>.<8 random characters>.tmp`` (`TEMPORARY` matches them); only a kill can leave
    one behind, and `remove_stale_temporaries` clears those from a run folder.
    """
    temporaries: list[tuple[Path, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temporaries.append((Path(tmp), path))
            os.chmod(tmp, FILE_MODE)
            write(Path(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        for tmp, path in temporaries:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
        raise


# tempfile.mkstemp's names: the prefix, 8 characters of its alphabet, the suffix.
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> tuple[int, int]:
    """Remove the temporaries a killed `atomic_write_all` left directly in `folder`; (files, bytes) removed.

    Only regular files named like the writer's temporaries are touched; call it while no writer runs there (the
    run folder's lock is held).
    """
    folder = Path(folder)
    count = size = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for entry in entries:
        if not TEMPORARY.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            nbytes = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:
            continue
        count, size = count + 1, size + nbytes
    if count:
        logger.info(
            "removed %d stale temporary file%s (%s bytes) from %s, left by an interrupted write",
            count,
            "" if count == 1 else "s",
            f"{size:,}",
            folder,
        )
    return count, size


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/clipzss/<name>`` (default ``~/.cache/clipzss/<name>``): where caches live unless told."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipzss" / name
