"""Shareable checkpoints: save_pretrained / from_pretrained round trips exactly and offline, with a model card."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml

from clipzss.config import Config
from clipzss.evaluate import EvalResult
from clipzss.models.segmenter import Segmenter


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else kwargs}")


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.fixture
def offline(no_sockets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No connections, and the hub client is never even asked for a file."""
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", _refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _refuse)


@pytest.fixture(scope="module")
def segmenter(trained_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_checkpoint, device="cpu")  # built once: CLIP takes seconds


def _result(names: tuple[str, ...], seen: list[int], unseen: list[int]) -> EvalResult:
    k = len(names)
    matrix = torch.eye(k, dtype=torch.int64) * 90 + 1  # 91 right per class, 1 pixel to each other class
    return EvalResult.from_matrix(matrix, names, seen, unseen, num_images=7)


def test_round_trip_is_exact_and_offline(segmenter: Segmenter, tmp_path: Path, offline: None) -> None:
    folder = tmp_path / "shared_model"
    segmenter.save_pretrained(folder)
    assert {"model.safetensors", "config.json", "config.yaml", "README.md"} <= {
        p.name for p in folder.iterdir()
    }

    loaded = Segmenter.from_pretrained(folder, device="cpu", text_encoder=segmenter.text_encoder)
    before, after = segmenter.student.state_dict(), loaded.student.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key  # bitwise
    assert loaded.config == segmenter.config
    assert isinstance(loaded.config, Config)
    assert loaded.meta == segmenter.meta and loaded.meta["step"] == "2"

    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    names = ["plain grey", "red horizontal stripes", "cyan waves"]
    np.testing.assert_array_equal(loaded.predict(image, names), segmenter.predict(image, names))


def test_from_pretrained_rebuilds_the_text_encoder_from_the_saved_config(
    segmenter: Segmenter, tmp_path: Path, offline: None
) -> None:
    segmenter.save_pretrained(tmp_path / "m")
    loaded = Segmenter.from_pretrained(str(tmp_path / "m"), device="cpu")  # tiny random CLIP, built offline
    names = ["plain grey", "purple dots"]
    torch.testing.assert_close(loaded.text_classifier(names), segmenter.text_classifier(names))


def test_config_json_holds_the_resolved_config(segmenter: Segmenter, tmp_path: Path) -> None:
    segmenter.save_pretrained(tmp_path / "m")
    payload = json.loads((tmp_path / "m" / "config.json").read_text())
    assert payload["format"] == "clipzss-student-v1"
    assert Config.from_dict(payload["clipzss_config"]) == segmenter.config
    assert payload["training"]["unseen"] == "purple dots,cyan waves"


def test_model_card_lists_training_config_and_evaluation(segmenter: Segmenter, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    segmenter.save_pretrained(folder)
    first = (folder / "README.md").read_text()
    assert "No evaluation results were given" in first

    names = tuple(segmenter.meta["class_names"].split(","))
    result = _result(names, seen=[0, 1, 2, 3, 5, 7], unseen=[4, 6])
    segmenter.save_pretrained(folder, eval_results=result)  # saving again replaces the card
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "clipzss"
    assert meta["pipeline_tag"] == "image-segmentation"
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    # 8 classes: 91 of 98 pixels right, 7 false positives; union = 91 + 7 + 7 = 105 → IoU 86.67 %
    assert reported["mIoU(S)"] == pytest.approx(100 * 91 / 105, abs=0.01)
    assert reported["hIoU"] == pytest.approx(100 * 91 / 105, abs=0.01)
    assert "Segformer / mit_b0" in body
    assert "| unseen (never labelled) | purple dots, cyan waves |" in body
    assert "| schedule | 2 iterations × batch 2, crop 64" in body
    assert "| purple dots | unseen | 86.67 | 92.86 |" in body  # Acc = 91 / 98
    assert "output_dir: run" in body  # local paths reduced to their last component


def test_missing_model_fails_clearly_without_network(tmp_path: Path, no_sockets: None) -> None:
    with pytest.raises(FileNotFoundError, match="no saved model folder"):
        Segmenter.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="someone/not-cached"):
        Segmenter.from_pretrained("someone/not-cached", local_files_only=True, cache_dir=tmp_path / "hub")


def test_push_to_hub_uploads_the_saved_folder(
    segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch, no_sockets: None
) -> None:
    uploaded: dict[str, str] = {}

    class FakeApi:  # stands in for the hub: records what would be uploaded
        def __init__(self, **kwargs: object) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> object:
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: object) -> str:
            uploaded.update({p.name: p.read_text(errors="replace") for p in Path(folder_path).iterdir()})
            return f"https://hub.invalid/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    names = tuple(segmenter.meta["class_names"].split(","))
    url = segmenter.push_to_hub("someone/tiny", eval_results=_result(names, [0, 1, 2, 3, 5, 7], [4, 6]))
    assert url.endswith("someone/tiny/commit/1")
    assert {"model.safetensors", "config.json", "README.md"} <= set(uploaded)
    assert "| cyan waves | unseen | 86.67 |" in uploaded["README.md"]
