"""Reading the downloads: folders and archives as a stream of entries, and the bytes of an entry as an image or a
MATLAB file."""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from clipzss.errors import UsageError
from clipzss.files import TEMPORARY

ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".zip")
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)


@dataclass(frozen=True)
class Entry:
    """One file inside a source. ``read`` of a streamed entry (archives) is valid only until the next entry."""

    path: str  # posix path inside the source
    size: int
    read: Callable[[], Any]
    streamed: bool
    local: Path | None = None
    # Reads another file of the same source by its path (folders and zips; a tar stream cannot go back).
    sibling: Callable[[str], bytes] | None = None


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise UsageError(f"cannot read {member.name} from the archive")
    return handle.read()


def _unreadable(source: Path, err: BaseException) -> UsageError:
    return UsageError(f"cannot read archive {source} (corrupt or truncated download?): {err}")


def _guarded(read: Callable[..., bytes], source: Path) -> Callable[..., bytes]:
    """``read`` with the archive's own errors as one line naming it: an entry's bytes are read by the caller,
    after `iter_entries` has handed the entry out, where a truncated member is first noticed."""

    def guarded(*args: Any) -> bytes:
        try:
            return read(*args)
        except _ARCHIVE_ERRORS as err:
            raise _unreadable(source, err) from None

    return guarded


def iter_entries(source: Path, wanted: re.Pattern[str]) -> Iterator[Entry]:
    """The files of a folder or archive whose posix path matches ``wanted``, in storage order.

    Tar archives (also gzip-compressed) are read as one stream, so a ``.tgz`` is decompressed once.

    Raises:
        ValueError: a corrupt or truncated archive (the message names it).
    """
    try:
        if source.is_dir():

            def sibling(other: str) -> bytes:
                return (source / other).read_bytes()

            for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
                dirnames.sort()
                rel_dir = Path(dirpath).relative_to(source).as_posix()
                for name in sorted(filenames):
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if wanted.search(rel) and not TEMPORARY.match(name):
                        path = Path(dirpath) / name
                        yield Entry(rel, path.stat().st_size, path.read_bytes, False, path, sibling)
        elif source.name.lower().endswith(".zip"):
            with zipfile.ZipFile(source) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and wanted.search(info.filename):
                        read = _guarded(partial(archive.read, info), source)
                        yield Entry(
                            info.filename, info.file_size, read, True, None, _guarded(archive.read, source)
                        )
        else:
            with tarfile.open(source, "r|*") as archive:
                for member in archive:
                    if member.isfile() and wanted.search(member.name):
                        read = _guarded(partial(_read_member, archive, member), source)
                        yield Entry(member.name, member.size, read, True)
    except _ARCHIVE_ERRORS as err:
        raise _unreadable(source, err) from None


def archive_names(path: Path, limit: int) -> list[str]:
    """The first ``limit`` member names of an archive (all of them for zip, whose index is at the end)."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return archive.namelist()
        names = []
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                names.append(member.name)
                if len(names) >= limit:
                    break
        return names
    except _ARCHIVE_ERRORS as err:
        raise _unreadable(path, err) from None


def open_image(data: bytes, what: str) -> Image.Image:
    """Decode an entry's bytes as an image (loaded); ``what`` names it in the error."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"cannot read {what}: {err}") from None
    return image


def load_mat(data: bytes, what: str) -> dict[str, Any]:
    """Decode an entry's bytes as a MATLAB file (structs as attribute objects); needs the optional scipy."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UsageError(
            "reading the .mat annotations needs scipy: pip install scipy (or clipzss[data])"
        ) from None
    try:
        return loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except (ValueError, TypeError, OSError, NotImplementedError, zlib.error) as err:
        raise UsageError(f"cannot read {what}: {err}") from None
