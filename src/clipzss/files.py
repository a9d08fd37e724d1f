"""Writing files so that a crash never leaves half of one: the one atomic write of checkpoints, run files,
prepared datasets and caches (torch-free)."""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from clipzss.errors import ClipzssError

logger = logging.getLogger(__name__)

# The mode a plain open() gives a new file. mkstemp creates its temporaries 0600; the file renamed into place gets
# what the user's umask asks for (a prepared dataset or a checkpoint is often shared). Read once: reading the umask
# means setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: Path, write: Callable[[Path], None], replace: bool = True) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file.

    With ``replace=False`` a file that appeared at ``path`` meanwhile (another process) is never replaced: the
    write fails with `OutputExistsError` instead.
    """
    atomic_write_all([(path, write)], replace=replace)


def atomic_write_all(writes: Sequence[tuple[Path, Callable[[Path], None]]], replace: bool = True) -> None:
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
            try:
                write(Path(tmp))
                # After the write: some writers (safetensors, torch.save) recreate the file with mode 0600.
                os.chmod(tmp, FILE_MODE)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
            except OSError as err:
                if (
                    err.filename is None and err.errno is not None and err.strerror
                ):  # ENOSPC from write(): where
                    err.filename = str(path)
                raise
        for tmp, path in temporaries:
            if not replace:
                _place_new(tmp, path)
                continue
            # os.replace swaps a symlink at `path` for the new file: never writes through it to its target.
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` only if nothing is there: a hard link fails atomically on an existing name (a file
    system without hard links falls back to a check, then a rename)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise OutputExistsError(
            f"{path} appeared while this command ran (another process?): it was left as it is; choose another "
            "output, or pass --overwrite"
        ) from None
    except OSError:
        if os.path.lexists(path):
            raise OutputExistsError(f"{path} appeared while this command ran: it was left as it is") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


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


# --- outputs: never replace what this command did not create ------------------------------------------------------


class OutputExistsError(ClipzssError, FileExistsError):
    """An output path that already holds something this command did not create (and --overwrite was not given)."""


def refuse_existing(paths: Iterable[str | Path], overwrite: bool = False, option: str = "--out") -> None:
    """The one rule of every command that writes: refuse to replace an existing file (or link, or folder) unless
    told to, before anything is computed or written.

    A symlink counts as existing whatever it points to; with ``overwrite`` the link itself is replaced (the writes
    are `atomic_write`s), never the file it points to. A folder in the way is refused even with ``overwrite``.
    """
    found = [Path(p) for p in paths if os.path.lexists(p)]
    folders = [p for p in found if p.is_dir() and not p.is_symlink()]
    if folders:
        raise OutputExistsError(f"{folders[0]} is a folder: give a file name for {option}")
    if found and not overwrite:
        more = f" (and {len(found) - 1} more output{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise OutputExistsError(
            f"{found[0]} already exists{more}: choose another {option}, or pass --overwrite to replace it"
        )


def next_free_path(path: str | Path, taken: Callable[[Path], bool] | None = None, sep: str = "-") -> Path:
    """`path` when it is not taken, else the first of ``path-2``, ``path-3``, ... that is not.

    The default of a command whose user gave no output path: a re-run writes beside the earlier results instead
    of over them. ``taken`` defaults to "exists and is not an empty folder".
    """
    path = Path(path)
    is_taken = taken or _holds_something
    if not is_taken(path):
        return path
    number = 2
    while is_taken(path.with_name(f"{path.name}{sep}{number}")):
        number += 1
    return path.with_name(f"{path.name}{sep}{number}")


def _holds_something(path: Path) -> bool:
    if not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return True


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `folder` (resolved): no link leads a write elsewhere."""
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on device{where}: free some space, or write elsewhere",
    errno.EDQUOT: "disk quota exceeded{where}: free some space, or write elsewhere",
    errno.EEXIST: "cannot create {path}: a file of that name is in the way; choose another path or remove it",
    errno.ENOTDIR: "cannot use {path}: part of it is a file, not a folder; choose another path",
    errno.EISDIR: "{path} is a folder where a file was expected; give a file name",
    errno.EACCES: "permission denied{where}: choose a place you can write to (or read)",
    errno.EPERM: "operation not permitted{where}: choose a place you can write to",
    errno.EROFS: "read-only file system{where}: write elsewhere",
    errno.ENAMETOOLONG: "file name too long{where}: choose a shorter name",
}


def os_error_message(err: OSError) -> str:
    """One sentence for an OS error: what went wrong, where, and what to do (never a bare ``[Errno 28]``)."""
    path = err.filename if err.filename is not None else None
    hint = _OS_ERROR_HINTS.get(err.errno) if err.errno is not None else None
    if hint is None:
        reason = err.strerror or str(err)
        return f"{reason[:1].lower()}{reason[1:]}" + (f": {path}" if path is not None else "")
    return hint.format(path=path if path is not None else "the output", where=f" at {path}" if path else "")
