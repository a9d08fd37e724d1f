"""The student encoder's starting weights (``StudentConfig.weights``), resolved before the network is built.

``None`` (random), ``"imagenet"`` (or another smp tag such as ``"ssl"``; from the local Hugging Face cache, else
the hub) or a local file holding the encoder's weights (``.safetensors`` or a torch file). A local file may be an
encoder state dict (what smp downloads, or ``student.model.encoder.state_dict()``), a whole smp model / student
state dict (its ``encoder.`` keys are used) or, for ``tu-`` encoders, a timm checkpoint (``model.safetensors`` /
``pytorch_model.bin`` of the timm model), loaded by timm's own pretrained loader. Offline, a tag whose file is not
cached fails at once with advice, never after a timeout.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from clipzss import hub
from clipzss.config import StudentConfig
from clipzss.errors import OfflineError, UsageError

_KEY_PREFIXES = ("", "encoder.", "model.encoder.", "module.", "module.encoder.", "module.model.encoder.")


@dataclass(frozen=True)
class StudentWeights:
    """Where the encoder's weights come from: a state dict to load into the built encoder, or timm's loader."""

    where: str = ""  # the file or tag, for messages
    encoder_state: dict[str, torch.Tensor] | None = None  # loaded into the built encoder
    timm: bool = False  # a tu- encoder's tag: the network is built by timm's pretrained loader
    timm_state: dict[str, torch.Tensor] | None = None  # the checkpoint timm loads; None: timm fetches its URL


def resolve_weights(cfg: StudentConfig) -> StudentWeights:
    """Read the weights ``cfg.weights`` names for ``cfg.encoder`` (from the hub cache or the hub for a tag).

    Raises:
        UsageError: a tag the encoder does not have, or a file that holds no state dict.
        FileNotFoundError: a file that does not exist.
        OfflineError: a tag's weights neither cached nor downloadable (offline).
    """
    source = _weights_source(cfg.weights, cfg.encoder)
    if source is None:
        return StudentWeights()
    if isinstance(source, Path):
        return StudentWeights(str(source), encoder_state=_read_state_dict(source))
    if not cfg.encoder.startswith("tu-"):
        return StudentWeights(source, encoder_state=_read_state_dict(_smp_hub_file(cfg.encoder, source)))
    return StudentWeights(source, timm=True, timm_state=_timm_hub_state_dict(cfg.encoder[3:]))


def _weights_source(weights: str | None, encoder: str) -> Path | str | None:
    """None (random), a hub tag ('imagenet', 'ssl', ...) or an existing local file."""
    if weights is None or weights.strip().lower() in ("", "none"):
        return None
    if encoder.startswith("tu-"):
        if weights == "imagenet":
            return weights
    else:
        tags = list(smp.encoders.encoders[encoder]["pretrained_settings"])
        any_tag = {tag for entry in smp.encoders.encoders.values() for tag in entry["pretrained_settings"]}
        if weights in tags:
            return weights
        if weights in any_tag and not Path(weights).is_file():
            raise UsageError(
                f"encoder '{encoder}' has no '{weights}' weights; its pretrained weights are: {', '.join(tags)}"
            )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"student weights file not found: {weights} (student.weights must be none, 'imagenet' or a local file)"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and safetensors raise many types; all mean "not a weights file"
        raise UsageError(f"cannot read student weights {path}: {err}") from err
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UsageError(f"student weights {path} do not hold a state dict (a mapping of names to tensors)")
    return data


def load_encoder_state(encoder: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> bool:
    """Load an encoder (or whole-model) state dict strictly; False when no key is the encoder's at all."""
    own = set(encoder.state_dict())
    best, best_hits = {}, 0
    for prefix in _KEY_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        hits = len(own & sub.keys())
        if hits > best_hits:
            best, best_hits = sub, hits
    if best_hits == 0 and isinstance(
        encoder, smp.encoders.TimmUniversalEncoder | smp.encoders.TimmViTEncoder
    ):
        return False
    if best_hits == 0:
        best = state_dict
    try:
        encoder.load_state_dict(dict(best))  # smp encoders drop their classifier keys themselves
    except RuntimeError as err:
        missing = sorted(own - best.keys())
        unexpected = sorted(best.keys() - own)
        detail = "; ".join(
            part
            for part in (_keys("missing", missing), _keys("unexpected", unexpected), _size_mismatch(err))
            if part
        )
        raise UsageError(f"student weights {where} do not fit the encoder: {detail}") from None
    return True


def _keys(kind: str, keys: list[str], show: int = 5) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - show} more)" if len(keys) > show else ""
    return f"{len(keys)} {kind} keys ({', '.join(keys[:show])}{more})"


def _size_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
    return lines[0] if lines else ""


def _offline_error(what: str) -> OfflineError:
    return OfflineError(
        f"cannot get {what}: not in the local Hugging Face cache and the hub is unreachable (offline); download the "
        "encoder weights on a connected machine and set student.weights=/path/to/encoder_weights.safetensors"
    )


def _hub_download(repo_id: str, filenames: tuple[str, ...], revision: str | None, what: str) -> Path:
    """The first of ``filenames`` in the repo: from the cache if there, else downloaded; fails fast offline."""
    try:
        return hub.fetch(repo_id, filenames, revision)
    except hub.HubDownloadFailed as err:
        raise FileNotFoundError(f"cannot download {what} from {repo_id}: {err}") from None
    except hub.HubUnavailable:
        raise _offline_error(what) from None


def _smp_hub_file(encoder: str, tag: str) -> Path:
    settings = smp.encoders.encoders[encoder]["pretrained_settings"][tag]
    return _hub_download(
        settings["repo_id"], ("model.safetensors",), settings["revision"], f"'{tag}' weights for {encoder}"
    )


def _timm_hub_state_dict(timm_name: str) -> dict[str, torch.Tensor] | None:
    """timm's pretrained checkpoint for the name (and tag), or None when timm must fetch it from a URL itself."""
    what = f"pretrained weights for tu-{timm_name}"
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as err:
        raise UsageError(f"no {what}: {err}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UsageError(f"timm has no {what}")
    if cfg.hf_hub_id:
        filenames = (
            (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        )
        return _read_state_dict(_hub_download(cfg.hf_hub_id, filenames, None, what))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(cfg.url).path).name
    if not cached.is_file() and (hub.offline() or not hub.reachable(cfg.url)[0]):
        raise _offline_error(what)
    return None
