"""Finding what a preparer needs among the sources a user gives: folders (searched a few levels deep) and archives
(recognised by their official names or by their member paths)."""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipzss.data.prepare.archives import archive_names, is_archive

logger = logging.getLogger(__name__)


def _some_files(folder: Path, count: int = 20) -> list[str]:
    names: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    names.append(entry.name)
                    if len(names) >= count:
                        break
    except OSError:
        return []
    return names


def has_files(folder: Path, pattern: str) -> bool:
    """Whether one of the first files of ``folder`` matches: enough to recognise a folder without listing it."""
    regex = re.compile(pattern)
    return any(regex.search(name) for name in _some_files(folder, 200))


def mat_variables(folder: Path) -> set[str]:
    """The variable names of one .mat file in ``folder`` (cheap: scipy reads only the headers)."""
    mats = [n for n in _some_files(folder, 50) if n.endswith(".mat")]
    if not mats:
        return set()
    try:
        from scipy.io import whosmat

        return {name for name, _, _ in whosmat(str(folder / mats[0]))}
    except (ImportError, OSError, ValueError, TypeError, NotImplementedError):  # then it identifies nothing
        return set()


@dataclass(frozen=True)
class Role:
    """One input a preparer needs, and how to recognise it as a folder or an archive."""

    key: str
    title: str
    archives: tuple[str, ...]  # official file names
    marker: str  # regex on member paths that only this input's archive has
    is_root: Callable[[Path], bool]  # is this folder the extracted input?
    download: str
    required: bool = True


def dir_role(name: str, suffix_regex: str) -> Callable[[Path], bool]:
    return lambda d: d.name == name and has_files(d, suffix_regex)


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def find_sources(
    srcs: Sequence[Path], roles: Sequence[Role], dst: Path | None = None, max_dirs: int = 5000
) -> dict[str, Path]:
    """Assign each role a folder or archive among ``srcs`` (and the folders inside them, 3 levels deep).

    Extracted folders win over archives. Archives are recognised by their official names or, failing that, by
    their member paths. ``dst`` (when inside a source) is not searched, so earlier output is never taken as input.

    Raises:
        FileNotFoundError: a source does not exist, or a required role was found nowhere (the message says what
            is missing and where to download it).
    """
    found: dict[str, Path] = {}
    archives: list[Path] = []
    files: list[Path] = []
    dst = dst.resolve() if dst else None
    for src in srcs:
        src = Path(src).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"source {src} does not exist")
        if src.is_file():
            (archives if is_archive(src) else files).append(src)
            continue
        skip_dst = dst is not None and not _inside(src.resolve(), dst)
        queue: deque[tuple[Path, int]] = deque([(src, 0)])
        visited = 0
        while queue and visited < max_dirs:
            folder, depth = queue.popleft()
            visited += 1
            if skip_dst and _inside(folder.resolve(), dst):  # type: ignore[arg-type]
                continue
            for role in roles:
                if role.key not in found and role.is_root(folder):
                    found[role.key] = folder
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for child in children:
                path = Path(child.path)
                if child.is_file() and depth < 2:
                    (archives if is_archive(path) else files).append(path)
                elif child.is_dir() and depth < 3:
                    queue.append((path, depth + 1))
    for path in files:
        for role in roles:
            if role.key not in found and path.name in role.archives:
                found[role.key] = path
    for path in archives:
        by_name = [r for r in roles if r.key not in found and path.name in r.archives]
        if by_name:
            found[by_name[0].key] = path
    for path in archives:
        if path in found.values() or any(path.name in r.archives for r in roles):
            continue
        open_roles = [r for r in roles if r.key not in found]
        if not open_roles:
            break
        names = archive_names(path, 500)
        for role in open_roles:
            if any(re.search(role.marker, n) for n in names):
                found[role.key] = path
                break
    missing = [r for r in roles if r.required and r.key not in found]
    if missing:
        where = ", ".join(str(s) for s in srcs)
        details = "; ".join(f"{r.title} ({' or '.join(r.archives)}, from {r.download})" for r in missing)
        raise FileNotFoundError(f"not found in {where}: {details}")
    titles = {r.key: r.title for r in roles}
    for key, path in found.items():
        logger.info("%s: %s", titles[key], path)
    return found
