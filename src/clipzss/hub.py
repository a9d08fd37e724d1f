"""Reaching the Hugging Face hub, in one place: the local cache first, a fast probe, then a download.

The hub client retries an unreachable host for a long time per file; a short socket probe (`PROBE_TIMEOUT_S`) before
any download makes an offline machine fail at once, for the CLIP teacher and the student's encoder alike. Sharing a trained student
(`save_pretrained`, `from_pretrained`, the model card) is `clipzss.sharing`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import constants as hf_constants

from clipzss.errors import ClipzssError

PROBE_TIMEOUT_S = 3.0


class HubUnavailable(ClipzssError, RuntimeError):
    """A file is not in the local cache and cannot be fetched; the message says why (offline, unreachable, ...)."""


class HubDownloadFailed(HubUnavailable):
    """The hub answered, but none of the files could be downloaded (missing, refused, ...)."""


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as the hub client reads them (at import or since)."""
    env = any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or hf_constants.is_offline_mode()


def reachable(url: str) -> tuple[bool, str]:
    """Open (and close) a TCP connection to ``url``'s host, or to the HTTPS proxy when one is configured."""
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        "",
    )
    try:
        parts = urlparse(proxy if proxy else url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        return False, f"{url}: {err}"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True, ""
    except OSError as err:
        return False, f"{host}:{port}: {err}"


class NotDownloaded(HubUnavailable):
    """None of the files is cached, and the caller asked for the cache only (``download=False``)."""


def fetch(repo_id: str, filenames: Sequence[str], revision: str | None = None, download: bool = True) -> Path:
    """The first of ``filenames`` in the hub repo: from the local cache when there, else downloaded.

    ``download=False`` reads the cache only: a name that came from someone else's file never reaches the network.

    Raises:
        NotDownloaded: none is cached and ``download`` is false.
        HubUnavailable: none is cached and the hub is switched off or unreachable.
        HubDownloadFailed: none is cached and the hub answered, but every download failed.
    """
    for name in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)
    if not download:
        raise NotDownloaded(f"{repo_id} is not in the local Hugging Face cache")
    if offline():
        raise HubUnavailable("HF_HUB_OFFLINE is set")
    ok, why = reachable(hf_constants.ENDPOINT)
    if not ok:
        raise HubUnavailable(f"the hub is unreachable ({why})")
    errors = []
    for name in filenames:
        try:
            return Path(
                huggingface_hub.hf_hub_download(
                    repo_id, name, revision=revision, etag_timeout=PROBE_TIMEOUT_S
                )
            )
        except Exception as err:  # a missing .safetensors variant is normal; try the next name
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise HubDownloadFailed(f"the download failed ({'; '.join(errors)})")
