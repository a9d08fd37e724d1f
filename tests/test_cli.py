"""The command line, run in-process through `main(argv)` as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipzss.cli import main
from conftest import TINY_CLIP


def test_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clipzss", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "eval", "predict", "embed-text", "quickstart"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["train", "eval", "predict", "embed-text", "quickstart"])
def test_each_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: clipzss" in text and ("examples:" in text or command == "quickstart")


def test_predict_with_student_checkpoint_on_real_photo(
    trained_checkpoint: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photo = sorted((shared_data / "voc-sample" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    code = main(
        [
            "predict",
            str(photo),
            "--checkpoint",
            str(trained_checkpoint.parent),
            "--classes",
            "person, bottle,sofa",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    mask = Image.open(tmp_path / f"{photo.stem}_mask.png")
    over = Image.open(tmp_path / f"{photo.stem}_overlay.png")
    original = Image.open(photo)
    assert mask.size == original.size and mask.mode == "P"
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
    assert over.width > original.width, "the overlay carries a legend beside the photo"
    assert "wrote" in capsys.readouterr().out


def test_predict_label_candidates_option(
    trained_checkpoint: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # --label-candidates M: approximate labels, opt-in; with M >= the number of classes they are the exact ones.
    photo = sorted((shared_data / "voc-sample" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    base = ["predict", str(photo), "--checkpoint", str(trained_checkpoint), "--classes", "person,bottle,sofa"]
    base += ["--device", "cpu", "--mode", "whole"]
    assert main([*base, "--out", str(tmp_path / "exact")]) == 0
    assert main([*base, "--label-candidates", "3", "--out", str(tmp_path / "three")]) == 0
    exact = np.asarray(Image.open(tmp_path / "exact" / f"{photo.stem}_mask.png"))
    three = np.asarray(Image.open(tmp_path / "three" / f"{photo.stem}_mask.png"))
    assert np.array_equal(exact, three)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*base, "--label-candidates", "-1", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2
    assert (
        "--label-candidates: expected an integer >= 0 (0: exact labels), got '-1'" in capsys.readouterr().err
    )
    assert not (tmp_path / "bad").exists()


def test_predict_with_maskclip_baseline_on_real_photo(shared_data: Path, tmp_path: Path) -> None:
    """The baseline is the real ViT-B-16 architecture (random weights offline) at the image's own size."""
    photo = sorted((shared_data / "voc-sample" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    code = main(
        [
            "predict",
            str(photo),
            "--baseline",
            "maskclip",
            "--teacher-weights",
            "none",
            "--classes",
            "person,bottle,chair",
            "--mode",
            "whole",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert Image.open(tmp_path / f"{photo.stem}_mask.png").size == Image.open(photo).size
    assert (tmp_path / f"{photo.stem}_overlay.png").is_file()


@pytest.fixture
def tiny_cli_teacher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--baseline builds the tiny random CLIP (TINY_CLIP) through build_teacher, as it builds real weights."""
    import dataclasses

    from clipzss.cli import _common

    given = _common.teacher_config

    def tiny(base, args):
        cfg = given(base, args)
        return dataclasses.replace(cfg, model_overrides=TINY_CLIP, cache_dir=str(tmp_path / "text"))

    monkeypatch.setattr(_common, "teacher_config", tiny)


@pytest.mark.parametrize("recipe", ["maskclip", "clearclip", "sclip", "naclip"])
def test_predict_with_every_baseline_on_real_photo(
    recipe: str, shared_data: Path, tmp_path: Path, tiny_cli_teacher: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recipe with its own input handling (its windows and short side, no --mode) on a real photo."""
    from clipzss.models import segmenter as predict

    photo = sorted((shared_data / "voc-sample" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    seen = []
    encode = predict.CLIPTeacher.encode_image

    def spy(self, images, size=None, dense=None):
        seen.append((dense, tuple(images.shape[-2:])))
        return encode(self, images, size, dense)

    monkeypatch.setattr(predict.CLIPTeacher, "encode_image", spy)
    argv = [
        "predict",
        str(photo),
        "--baseline",
        recipe,
        "--teacher-weights",
        "none",
        "--classes",
        "person,sofa",
    ]
    assert main([*argv, "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / f"{photo.stem}_mask.png").size == Image.open(photo).size
    assert {dense for dense, _ in seen} == {recipe}
    crop = {"maskclip": 512, "clearclip": 448, "sclip": 224, "naclip": 224}[recipe]
    assert max(max(shape) for _, shape in seen) == crop  # the recipe's released window


def test_eval_baseline_uses_the_recipes_input_handling(
    shared_data: Path, tmp_path: Path, tiny_cli_teacher: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipzss import evaluate

    used = []
    real = evaluate.evaluate

    def spy(logits_fn, dataset, cfg, **kwargs):
        used.append(cfg)
        return real(logits_fn, dataset, cfg, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", spy)
    argv = ["eval", "--baseline", "sclip", "--teacher-weights", "none", "--dataset", "folder"]
    argv += ["--data-root", str(shared_data / "camvid"), "--max-images", "1", "--workers", "0"]
    assert main([*argv, "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert (used[0].mode, used[0].short_side, used[0].crop_size, used[0].stride) == ("slide", 336, 224, 112)
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_eval_on_camvid_reports_seen_unseen_hiou(
    trained_checkpoint: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "eval",
            str(trained_checkpoint),
            "--dataset",
            "folder",
            "--data-root",
            str(shared_data / "camvid"),
            "--unseen",
            "car,tree,pedestrian",
            "--max-images",
            "3",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "eval"),
            "--seen-gamma",
            "0.1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for key in ("mIoU(S)", "mIoU(U)", "hIoU", "pedestrian", "calibrated (seen - 0.1)"):
        assert key in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert json.dumps(metrics)  # valid JSON with NaN written as null
    assert metrics["calibrated"]["seen_gamma"] == 0.1 and set(metrics["calibrated"]["summary"]) == set(
        metrics["summary"]
    )
    assert (tmp_path / "eval" / "per_class.csv").is_file()


def test_embed_text_then_predict_without_clip(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\ngrass\n\nsky\n")
    emb = tmp_path / "names.safetensors"
    assert (
        main(
            [
                "embed-text",
                "--classes-file",
                str(names),
                "--checkpoint",
                str(trained_checkpoint),
                "--out",
                str(emb),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 50, 3), 120, dtype=np.uint8)).save(image)
    assert (
        main(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(trained_checkpoint),
                "--text-embeddings",
                str(emb),
                "--out",
                str(tmp_path / "p"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "3 text embeddings" in capsys.readouterr().out
    assert (tmp_path / "p" / "img_overlay.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "predict",
                "missing.jpg",
                "--baseline",
                "maskclip",
                "--teacher-weights",
                "none",
                "--classes",
                "a",
            ],
            "image not found: missing.jpg",
        ),
        (
            ["predict", "x.jpg", "--checkpoint", "nowhere/model.safetensors", "--classes", "a"],
            "checkpoint not found",
        ),
        (["predict", "x.jpg", "--classes", "a"], "say which model to use"),
        (
            [
                "eval",
                "--baseline",
                "maskclip",
                "--teacher-weights",
                "/no/such/weights.safetensors",
                "--dataset",
                "voc",
            ],
            "teacher.weights",
        ),
        (["embed-text", "--out", "x.safetensors"], "exactly one of --classes or --classes-file"),
        (["train", "nope.yaml"], "config file not found: nope.yaml"),
        (["train", "train.max_iter=3"], "did you mean 'max_iters'"),
    ],
)
def test_user_errors_are_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(
        tmp_path
    )  # x.jpg exists there, missing.jpg does not: inputs are checked before the model
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save("x.jpg")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_class_names_and_dataset(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(trained_checkpoint), "--classes", "cat,cat"]) == 2
    assert "duplicate class names: cat" in capsys.readouterr().err
    assert main(["eval", str(trained_checkpoint), "--dataset", "pascal", "--data-root", str(tmp_path)]) == 2
    assert "unknown dataset 'pascal'" in capsys.readouterr().err
