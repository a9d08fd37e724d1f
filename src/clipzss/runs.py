"""Run folders: what counts as a run, who may write one, and what a resume may change.

A run folder holds ``model.safetensors``, ``train_state.pt`` and ``config.yaml``. `clipzss train` refuses to start
afresh in a folder that already holds a run (unless told to resume it or to overwrite it), and holds a lock file,
``train.lock``, while it writes there, so that a second training into the same folder fails at once instead of
silently interleaving checkpoints. The lock records the PID, the host and the process's start time; a lock whose
process is gone (same host) is stale and is replaced with a log line.

Torch-free, so the quick start can choose its folder before anything heavy is imported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from clipzss.errors import ClipzssError
from clipzss.files import next_free_path
from clipzss.messages import shorten

logger = logging.getLogger(__name__)

RUN_FILES = ("model.safetensors", "train_state.pt", "config.yaml")
LOCK_NAME = "train.lock"
# A lock file is created empty and filled at once; one still empty or unreadable after this long is abandoned.
UNREADABLE_LOCK_GRACE_S = 30.0


class RunFolderError(ClipzssError, RuntimeError):
    """A run folder that holds another run, or that another training is writing."""


def run_files(folder: str | Path) -> list[str]:
    """The names of the run files `folder` holds (empty when it holds no run)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_fresh(folder: Path, resume_folder: Path | None = None, overwrite: bool = False) -> None:
    """Refuse to start a run in a folder that holds one, unless resuming that very run or overwriting it."""
    present = run_files(folder)
    if not present or overwrite:
        if present:
            logger.warning("overwriting the run in %s (%s)", folder, ", ".join(present))
        return
    if resume_folder is not None and same_folder(resume_folder, folder):
        return
    held = ", ".join(present)
    if resume_folder is not None:
        raise RunFolderError(
            f"{folder} already holds another run ({held}) and resuming {resume_folder} would write over it: "
            f"set train.output_dir to {resume_folder} or to a new folder, or pass --overwrite to replace it"
        )
    if "train_state.pt" not in present:  # e.g. a run killed before its first checkpoint: nothing to resume
        raise RunFolderError(
            f"{folder} already holds a run ({held}) with no training state to resume: choose another "
            "train.output_dir, or pass --overwrite to start it again"
        )
    raise RunFolderError(
        f"{folder} already holds a run ({held}): continue it with --resume {folder}, choose another "
        "train.output_dir, or pass --overwrite to replace it"
    )


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None when unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22 of stat(5); the name may hold spaces
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    try:  # a zombie has exited: its lock is stale too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return b"", {}
    except OSError:
        return b"", None
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw, None
    return raw, info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


class RunLock:
    """``train.lock`` in a run folder: created atomically (O_EXCL) with the PID and host, removed on release."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._content = b""

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "start": _process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        ).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, info = _read(self.path)
                if info == {}:  # removed between our open and our read: try again
                    continue
                reason = self._stale(info)
                if reason is None:
                    raise RunFolderError(self._busy_message(info)) from None
                if _read(self.path)[0] == raw:  # still the lock we judged, not a new one
                    self.path.unlink(missing_ok=True)
                    logger.warning("replaced a stale lock in %s: %s", self.folder, reason)
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held, self._content = True, content
            return self
        raise RunFolderError(f"{self.folder} is in use: could not take its lock {self.path}")

    def _stale(self, info: dict[str, Any] | None) -> str | None:
        """Why the lock is stale, or None when its holder may still be running."""
        if info is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return "its lock file disappeared"
            if age > UNREADABLE_LOCK_GRACE_S:
                return f"its lock file is unreadable and {age:.0f} s old"
            return None
        if info.get("host") != socket.gethostname():
            return None  # another machine's process: cannot be checked from here
        pid = info["pid"]
        if not _pid_alive(pid):
            return f"PID {pid} is no longer running"
        start = info.get("start")
        if start is not None and _process_start(pid) not in (None, start):
            return f"PID {pid} is now another process"
        return None

    def _busy_message(self, info: dict[str, Any] | None) -> str:
        if info is None:
            holder = "another process (its lock file is being written)"
        else:
            holder = f"PID {info['pid']} on {info.get('host', '?')}"
            if info.get("since"):
                holder += f", since {info['since']}"
        return (
            f"{self.folder} is in use by another training ({holder}): wait for it to finish or choose another "
            f"train.output_dir (if that process is gone, delete {self.path})"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_bytes() == self._content:  # never remove a lock someone else has taken since
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def taken(folder: str | Path) -> bool:
    """Whether `folder` holds a run or is being written by a training."""
    return bool(run_files(folder)) or (Path(folder) / LOCK_NAME).exists()


def next_free_folder(folder: str | Path) -> Path:
    """`folder` when it is not taken, else the first of ``folder-2``, ``folder-3``, ... that is not."""
    return next_free_path(folder, taken=taken)


# --- what a resume may change ------------------------------------------------------------------------------------

# Fields that decide which tensors exist or their shapes (student, teacher, synthesizer, GLM bank). A resume that
# changes one of them cannot load its state. student.weights only initialises the student, which a resume
# replaces by the saved weights, so it may change (a path on another machine).
SHAPE_FIELDS = frozenset(
    {
        "teacher.model",
        "teacher.model_overrides",
        "method.synthesizer",
        "method.bce_learnable",
        "method.glm",
        "method.bank",
        "method.bank_size",
    }
)
NOT_SHAPE_FIELDS = frozenset({"student.weights"})


def is_shape_field(name: str) -> bool:
    if name in NOT_SHAPE_FIELDS:
        return False
    return name in SHAPE_FIELDS or name.startswith(("student.", "method.synth_"))


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(section.key, old, new)`` for every field both configs (`Config.to_dict()` form) hold and that differs."""
    changes = []
    for section, values in new.items():
        before = old.get(section)
        if not isinstance(values, dict) or not isinstance(before, dict):
            continue
        for key, value in values.items():
            if key in before and _plain(before[key]) != _plain(value):
                changes.append((f"{section}.{key}", before[key], value))
    return changes


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_change(name: str, old: Any, new: Any) -> str:
    return f"{name}: {_short(old)} → {_short(new)}"


def _short(value: Any, limit: int = 60) -> str:
    return shorten(json.dumps(value, default=str) if not isinstance(value, str) else repr(value), limit)
