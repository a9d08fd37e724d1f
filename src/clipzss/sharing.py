"""Sharing a trained student through the Hugging Face hub: `save_pretrained`, `push_to_hub`, `from_pretrained`
(a saved folder loads with no network access) and the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import huggingface_hub
import yaml
from huggingface_hub import EvalResult as HubEvalResult
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from clipzss.checkpoint import CHECKPOINT_NAME, FORMAT, save_checkpoint
from clipzss.config import Config

if TYPE_CHECKING:
    import torch

    from clipzss.evaluate import EvalResult


class SegmenterHubMixin(
    ModelHubMixin,
    library_name="clipzss",
    pipeline_tag="image-segmentation",
    tags=["clipzss", "zero-shot-segmentation", "open-vocabulary-segmentation", "clip"],
):
    """Sharing for `clipzss.models.segmenter.Segmenter`: the checkpoint (safetensors weights with the config inside),
    ``config.json`` and a model card; a saved folder loads back without any network access."""

    config: Config
    meta: dict[str, str]
    student: Any

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        eval_results: EvalResult | None = None,
        model_card_kwargs: dict[str, object] | None = None,
        **hub_kwargs: object,
    ) -> str | None:
        """Write model.safetensors (weights + config), config.yaml, config.json and a model card (README.md).

        ``eval_results`` (from `clipzss.evaluate.evaluate`) go into the card's tables and its model-index; an
        existing README.md in the folder is replaced. ``push_to_hub=True, repo_id=...`` also uploads the folder
        (needs the network and a token).
        """
        card = {"eval_results": eval_results, **(model_card_kwargs or {})}
        return super().save_pretrained(save_directory, model_card_kwargs=card, **hub_kwargs)

    def push_to_hub(
        self, repo_id: str, *, eval_results: EvalResult | None = None, **hub_kwargs: object
    ) -> str:
        """Upload what `save_pretrained` writes to the hub repository ``repo_id`` (created when missing)."""
        card = {"eval_results": eval_results, **(hub_kwargs.pop("model_card_kwargs", None) or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **hub_kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_checkpoint(save_directory, self.student.state_dict(), self.config, **self.meta)
        payload = {"format": FORMAT, "clipzss_config": self.config.to_dict(), "training": self.meta}
        (save_directory / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
        (save_directory / "README.md").unlink(missing_ok=True)  # the mixin writes a card only where none is

    def generate_model_card(self, eval_results: EvalResult | None = None, **_: object) -> ModelCard:
        """The card the hub shows: how to use the model, how it was trained, and how it scored."""
        return model_card(self.config, self.meta, eval_results)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        teacher_weights: str | None = None,
        text_encoder: Any = None,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> Self:
        """Load a folder written by `save_pretrained` (no network), or a hub repo id such as ``"user/model"``.

        The text side is rebuilt from the saved CLIP config as in `from_checkpoint`; ``teacher_weights`` points it
        at local CLIP weights, ``text_encoder`` replaces it (e.g. a `PrecomputedText`).
        """
        source = str(pretrained_model_name_or_path)
        local = Path(source).expanduser()
        if local.is_file():
            return cls.from_checkpoint(local, device, teacher_weights, text_encoder)
        if not local.is_dir() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise FileNotFoundError(f"no saved model folder at {source}")
        try:
            return super().from_pretrained(
                str(local) if local.is_dir() else source,
                force_download=force_download,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                revision=revision,
                device=device,
                teacher_weights=teacher_weights,
                text_encoder=text_encoder,
            )
        except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as err:
            reason = str(err).strip().splitlines()[0]
            raise FileNotFoundError(
                f"'{source}' is neither a local model folder nor a reachable hub repository ({reason})"
            ) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        device: str | torch.device | None = None,
        teacher_weights: str | None = None,
        text_encoder: Any = None,
        **hub_options: Any,  # revision, cache_dir, ... as the mixin passes them; and config.json as `config`
    ) -> Self:
        if Path(model_id).is_dir():
            path = Path(model_id) / CHECKPOINT_NAME
        else:
            download = {k: hub_options[k] for k in _DOWNLOAD_OPTIONS if k in hub_options}
            path = huggingface_hub.hf_hub_download(repo_id=model_id, filename=CHECKPOINT_NAME, **download)
        return cls.from_checkpoint(path, device, teacher_weights, text_encoder)


# What `_from_pretrained` hands on to the download (the weights file's own config is the one that counts).
_DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "token", "local_files_only")

_CARD_METRICS = ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU", "mIoU")


def _card_number(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) and value == value else "-"


def model_card(config: Config, meta: dict[str, str], eval_results: EvalResult | None = None) -> ModelCard:
    """A model card from the training config (and evaluation results when given), with a hub model-index.

    Local paths (data root, teacher weights file) are reduced to their last component: a card is for sharing.
    """
    data, teacher, student, train = config.data, config.teacher, config.student, config.train
    dataset = data.eval_dataset or data.dataset
    names = [n for n in meta.get("class_names", "").split(",") if n]
    unseen = [n for n in meta.get("unseen", "").split(",") if n]
    teacher_weights = Path(teacher.weights).name if teacher.weights else "none"
    off = [f.name for f in dataclasses.fields(config.method) if getattr(config.method, f.name) is False]
    model_name = f"clipzss-{student.arch}-{student.encoder}".lower()
    hub_results = None
    if eval_results is not None:
        hub_results = [
            HubEvalResult(
                task_type="image-segmentation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=key,
                metric_value=round(eval_results.metrics[key], 2),
            )
            for key in _CARD_METRICS
            if isinstance(eval_results.metrics.get(key), float)
            and eval_results.metrics[key] == eval_results.metrics[key]
        ]
    card_data = ModelCardData(
        library_name="clipzss",
        pipeline_tag="image-segmentation",
        tags=["clipzss", "zero-shot-segmentation", "open-vocabulary-segmentation", "clip", "model_hub_mixin"],
        model_name=model_name,
        eval_results=hub_results or None,
    )
    example = ", ".join(f'"{n}"' for n in (names or ["cat", "grass", "sky"])[:4])
    lines = [
        f"# {model_name}",
        "",
        f"A [CLIP-ZSS](https://arxiv.org/abs/2310.02296) student: a {student.arch} / {student.encoder} network trained "
        f"with a frozen CLIP {teacher.model} teacher. At inference the student alone embeds the image and CLIP's text "
        "embeddings of any class names are its classifier, so it segments classes it never saw labelled.",
        "",
        "## Use",
        "",
        "```python",
        "from clipzss import Segmenter",
        "",
        'segmenter = Segmenter.from_pretrained("path/to/this/folder")  # or a hub id; works offline from a folder',
        f'mask = segmenter.predict("photo.jpg", [{example}])  # (H, W) class ids',
        "```",
        "",
        f"The text classifier needs the CLIP {teacher.model} text tower (`teacher_weights=` a local weights file, or "
        "precomputed embeddings from `clipzss embed-text` as `text_encoder=`).",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| dataset | {data.dataset} (train split `{data.train_split}`) |",
        f"| classes | {len(names) or '?'}: {', '.join(names) or 'not recorded'} |",
        f"| unseen (never labelled) | {', '.join(unseen) or 'none'} |",
        f"| student | {student.arch} / {student.encoder}, {student.embed_dim}-d embeddings at stride 4 |",
        f"| teacher | CLIP {teacher.model} ({teacher_weights}), input {teacher.image_size} px |",
        f"| schedule | {train.max_iters} iterations × batch {train.batch_size}, crop {data.crop_size}, lr {train.lr:g} |",
        f"| steps done | {meta.get('step', '?')} |",
        f"| switched off (ablations) | {', '.join(off) or 'none'} |",
        f"| inference | {config.eval.mode}, short side {config.eval.short_side}, crop {config.eval.crop_size} |",
        "",
        "## Evaluation",
        "",
    ]
    if eval_results is None:
        lines += ["No evaluation results were given when this model was saved.", ""]
    else:
        m = eval_results.metrics
        lines += [
            f"{dataset}, {eval_results.num_images} images, every class predicted jointly (generalised zero-shot).",
            "",
            "| " + " | ".join(_CARD_METRICS) + " |",
            "|" + "---|" * len(_CARD_METRICS),
            "| " + " | ".join(_card_number(m.get(k)) for k in _CARD_METRICS) + " |",
            "",
            "| class | split | IoU | Acc |",
            "|---|---|---|---|",
            *(
                f"| {row['name']} | {row['split']} | {_card_number(row['IoU'])} | {_card_number(row['Acc'])} |"
                for row in eval_results.per_class
            ),
            "",
        ]
    plain = config.to_dict()
    plain["data"]["root"] = Path(data.root).name if data.root else ""
    if plain["data"].get("eval_root"):
        plain["data"]["eval_root"] = Path(plain["data"]["eval_root"]).name
    plain["teacher"]["weights"] = teacher_weights
    plain["teacher"]["cache_dir"] = None
    plain["train"]["output_dir"] = Path(train.output_dir).name
    lines += [
        "<details><summary>Full training config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(plain, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
