"""The official archives' published checksums, and checking a download against them (remembered per size and
modification time, so a big archive is hashed once)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clipzss.errors import UsageError

# Published checksums of the official archives (algorithm, digest). docs/protocols.md says where each comes from.
ARCHIVE_CHECKSUMS: dict[str, tuple[str, str]] = {
    "VOCtrainval_11-May-2012.tar": ("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
    "benchmark.tgz": ("md5", "82b4d87ceb2ed10f6038a1cba92111cb"),
    "VOCtrainval_03-May-2010.tar": ("md5", "da459979d0c395079b5c75ee67908abb"),
    "trainval.tar.gz": ("md5", "df034edb2c12aa7d33b42b20bb1796e3"),
    "train2017.zip": ("md5", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017.zip": ("md5", "442b8da7639aecaf257c1dceb8ba8c80"),
    "ADEChallengeData2016.zip": ("md5", "7328b3957e407ddae1d3cbf487f149ef"),
}


def file_digest(path: Path, algorithm: str = "md5", progress: bool = True) -> str:
    """Hash a file in 8 MiB chunks (with a progress bar for big archives)."""
    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"{algorithm} {path.name}", disable=not progress
        ) as bar,
    ):
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_archive(path: Path, state: dict[str, Any], progress: bool = True) -> str | None:
    """Check an archive against its published checksum; the result is remembered in ``state`` per size+mtime.

    Returns:
        A note for the summary when there is nothing to check against, else None.

    Raises:
        ValueError: the checksum differs (an incomplete or corrupt download).
    """
    if path.name not in ARCHIVE_CHECKSUMS:
        return f"{path.name}: no published checksum to verify against"
    algorithm, expected = ARCHIVE_CHECKSUMS[path.name]
    stat = path.stat()
    key = str(path.resolve())
    record = state.setdefault("verified", {}).get(key)
    if record and record == [stat.st_size, stat.st_mtime_ns, expected]:
        return None
    actual = file_digest(path, algorithm, progress)
    if actual != expected:
        raise UsageError(
            f"{path}: {algorithm} {actual} differs from the published {expected}; the download is incomplete "
            "or corrupt: download it again (or pass --no-verify to use it anyway)"
        )
    state["verified"][key] = [stat.st_size, stat.st_mtime_ns, expected]
    return None
