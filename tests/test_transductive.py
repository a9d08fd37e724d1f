"""The transductive and supervised settings: named pseudo labels, cluster modes, the EMA student, resume, the
checkpoint's setting, and that no target-class label ever reaches a pseudo label or a loss."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import clipzss.training.step as training_step
from clipzss.config import Config, MethodConfig, TransductiveConfig, load_config
from clipzss.data import IGNORE_INDEX, VOID_INDEX, build_dataset, build_eval_dataset, seen_lookup
from clipzss.method.transductive import EMAStudent, name_pixels, transductive_labels
from clipzss.training.loop import check_setting, train
from clipzss.training.state import load_training_state
from conftest import assert_same_tensors, tiny_config, train_until_checkpoint


def transductive_config(tmp_path: Path, **transductive: object) -> Config:
    cfg = tiny_config(tmp_path / "run", tmp_path / "text_cache")
    cfg.data.setting = "transductive"
    cfg.transductive = dataclasses.replace(cfg.transductive, **transductive)
    return cfg


# --- named pseudo labels ----------------------------------------------------------------------------------------


def test_name_pixels_names_only_confident_unlabelled_pixels() -> None:
    """2 seen + 1 target text; a 2x2 token grid over 4x4 labels. Only unlabelled, non-void pixels whose token wins a
    target confidently are named; a token that looks seen, or is unsure, leaves its pixels unlabelled."""
    texts = torch.eye(3)  # seen 0, seen 1, target (id 2)
    tokens = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 1.0]],  # dim 0 (seen 0): token (1, 1) only
            [[0.0, 0.0], [0.0, 0.0]],
            [[1.0, 1.0], [1.0, 1.0]],  # dim 2 (target): tokens (0,0), (0,1), (1,0); (1,1) is a tie
        ]
    )[None]  # (1, 3, 2, 2)
    tokens[0, :, 0, 1] = torch.tensor([0.99, 0.0, 1.0])  # target wins, but unsure at this scale
    labels = torch.full((1, 4, 4), IGNORE_INDEX)
    labels[0, :2, :2] = 1  # labelled seen class 1: never renamed
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3, 0] = False  # void: never named
    named = name_pixels(tokens, texts, labels, num_seen=2, scale=100.0, threshold=0.9, valid=valid)
    expected = torch.full((4, 4), IGNORE_INDEX)
    expected[:2, :2] = 1
    expected[2:, :2] = 2  # token (1, 0): confident target on unlabelled pixels
    expected[3, 0] = IGNORE_INDEX  # void
    # token (0, 1): cosines 0.704 vs 0.711 at scale 100 give the target 0.67 < 0.9; token (1, 1): a tie, 0.5
    assert torch.equal(named[0], expected)
    lower = name_pixels(tokens, texts, labels, num_seen=2, scale=100.0, threshold=0.6, valid=valid)
    assert (lower[0, :2, 2:] == 2).all() and (lower[0, 2:, 2:] == IGNORE_INDEX).all()


def test_cluster_modes_unnamed_and_replace() -> None:
    """ "unnamed": clusters are made on the pixels left after naming; "replace": the inductive clusters, with the
    named labels written over them. Both name the same pixels and leave every labelled pixel alone."""
    torch.manual_seed(0)
    dense = torch.nn.functional.normalize(torch.randn(2, 8, 8, 8), dim=1)
    labels = torch.full((2, 32, 32), IGNORE_INDEX)
    labels[:, :8] = 0
    named = labels.clone()
    named[:, 16:, :16] = 3  # 3 seen (0..2), one target (3)
    method = MethodConfig(min_region=0.0)
    num_known = 4
    unnamed, _ = transductive_labels(
        named, labels, dense, num_known, method, TransductiveConfig(clusters="unnamed")
    )
    replace, _ = transductive_labels(
        named, labels, dense, num_known, method, TransductiveConfig(clusters="replace")
    )
    inductive, _ = training_step.pseudo_labels(dense, labels, num_known, method)
    for fused in (unnamed, replace):
        assert (fused[:, :8] == 0).all() and (fused[:, 16:, :16] == 3).all()
        rest = labels == IGNORE_INDEX
        rest[:, 16:, :16] = False
        assert (fused[rest] >= num_known).all()  # every other unlabelled pixel got a cluster
    keep = named == labels
    assert torch.equal(replace[keep], inductive[keep])  # the inductive clusters where nothing is named
    no_plm = dataclasses.replace(method, pseudo_labels=False)
    alone, count = transductive_labels(named, labels, dense, num_known, no_plm, TransductiveConfig())
    assert torch.equal(alone, named) and (count == 0).all()
    with pytest.raises(ValueError, match=r"transductive.clusters"):
        transductive_labels(named, labels, dense, num_known, method, TransductiveConfig(clusters="both"))


# --- no target label reaches anything ---------------------------------------------------------------------------


def _parts(cfg: Config, ema_start: int | None = None) -> training_step.TrainParts:
    from clipzss.models.student import build_student
    from clipzss.models.teacher import build_teacher

    teacher = build_teacher(cfg.teacher, device=torch.device("cpu"))
    split = build_dataset(cfg, "train", train=True).split
    names = list(split.class_names)
    student = build_student(cfg.student)
    ema = EMAStudent(student, cfg.transductive.ema_decay) if ema_start is not None else None
    return training_step.TrainParts(
        cfg,
        teacher,
        student,
        None,
        None,
        teacher.text_embeddings([names[i] for i in split.seen]),
        seen_lookup(split),
        torch.device("cpu"),
        teacher.text_embeddings([names[i] for i in split.unseen]),
        ema,
    )


class _Captured(Exception):
    pass


def _captured_step(
    parts: training_step.TrainParts, masks: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> dict[str, torch.Tensor]:
    """Every label tensor the step hands to the clustering and the losses, for one batch (the step stops there)."""
    seen: dict[str, torch.Tensor] = {}
    cluster = training_step.transductive_labels

    def watch_clusters(named, labels, *args, **kwargs):
        seen["named"], seen["cluster_input"] = named.clone(), labels.clone()
        return cluster(named, labels, *args, **kwargs)

    def watch_losses(R, labels, texts, *args, **kwargs):
        seen["loss_labels"], seen["texts"] = labels.clone(), texts.clone()
        raise _Captured

    monkeypatch.setattr(training_step, "transductive_labels", watch_clusters)
    monkeypatch.setattr(training_step, "compute_losses", watch_losses)
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "mask": masks}
    optimizer = training_step.build_optimizer(parts.student, [], parts.cfg)
    with pytest.raises(_Captured):
        training_step.train_step(parts, batch, optimizer, training_step.grad_scaler(parts.cfg, parts.device))
    return seen


@pytest.mark.parametrize("namer", ["teacher", "ema student"])
def test_no_target_label_reaches_a_pseudo_label_or_a_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namer: str
) -> None:
    """Target pixels carry their true class id (a sentinel the dataset would have turned into 255), then another
    target's id, then 255: the labels given to the clustering and to the losses are the same every time."""
    cfg = transductive_config(tmp_path, threshold=0.0, self_threshold=0.0, self_train_start=0)
    parts = _parts(cfg, ema_start=0 if namer == "ema student" else None)
    split = build_dataset(cfg, "train", train=True).split
    first, second = split.unseen[0], split.unseen[-1]
    masks = torch.full((2, 64, 64), split.seen[0], dtype=torch.long)
    masks[:, :, 32:] = split.seen[1]
    masks[:, 20:44, 16:48] = first  # the target object
    masks[:, 60:] = VOID_INDEX
    runs = []
    for target_value in (first, second, IGNORE_INDEX):
        variant = masks.clone()
        variant[masks == first] = target_value
        runs.append(_captured_step(parts, variant, monkeypatch))
    reference = runs[0]
    for run in runs[1:]:
        for key in reference:
            assert torch.equal(reference[key], run[key]), key
    num_seen, num_targets = len(split.seen), len(split.unseen)
    assert reference["texts"].shape[0] == num_seen + num_targets
    target = masks == first
    assert (reference["cluster_input"][target] == IGNORE_INDEX).all()  # unlabelled, as the dataset gives it
    named = reference["named"][target]
    # not vacuous: at threshold 0 the namer names target pixels (any target id: the teacher's guess, not the truth)
    assert ((named >= num_seen) & (named < num_seen + num_targets)).any()
    assert (reference["loss_labels"][masks == VOID_INDEX] == IGNORE_INDEX).all()


# --- self-training ----------------------------------------------------------------------------------------------


def test_ema_student_averages_weights_and_counts_steps() -> None:
    live = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = EMAStudent(live, decay=0.75)
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(3.0)
    ema.update(live)
    assert torch.allclose(ema.model[0].weight, 0.75 * before + 0.25 * live[0].weight)
    assert torch.equal(ema.model[1].running_mean, live[1].running_mean)
    assert ema.done == 1 and int(ema.steps) == 1
    ema.train()
    assert not ema.model.training  # the copy always predicts with its running statistics
    other = EMAStudent(live, decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert other.done == 1 and torch.equal(other.model[0].weight, ema.model[0].weight)
    with pytest.raises(ValueError, match=r"transductive.ema_decay"):
        EMAStudent(live, decay=1.0)


def test_self_training_names_with_the_ema_student_from_its_start_step(tmp_path: Path) -> None:
    cfg = transductive_config(tmp_path, threshold=0.0, self_threshold=0.0, self_train_start=2)
    parts = _parts(cfg, ema_start=2)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.full((2, 64, 64), IGNORE_INDEX)
    valid = torch.ones_like(labels, dtype=torch.bool)
    _, dense = parts.teacher.encode_image(images)
    num_seen = parts.text_seen.shape[0]
    by_teacher = name_pixels(dense, parts.texts, labels, num_seen, 1 / cfg.transductive.tau, 0.0, valid)
    with torch.no_grad():
        by_student = name_pixels(
            parts.ema(images), parts.texts, labels, num_seen, cfg.method.alpha, 0.0, valid
        )
    assert not torch.equal(by_teacher, by_student)
    for done, expected in ((0, by_teacher), (1, by_teacher), (2, by_student), (5, by_student)):
        parts.ema.done = done
        assert torch.equal(training_step._named_labels(parts, images, dense, labels, valid), expected), done


def test_transductive_resume_with_the_ema_student_is_bit_exact(tmp_path: Path) -> None:
    """Self-training starts at step 1; the run is cut after step 1's checkpoint and resumed: weights and the EMA
    copy end as in the uninterrupted run."""
    straight = transductive_config(tmp_path / "a", self_train_start=1, threshold=0.0, self_threshold=0.0)
    straight.train.max_iters = 2
    cut = transductive_config(tmp_path / "b", self_train_start=1, threshold=0.0, self_threshold=0.0)
    cut.train.max_iters, cut.train.ckpt_interval = 2, 1
    full = load_file(str(train(straight)))
    train_until_checkpoint(cut, 1)
    assert load_training_state(Path(cut.train.output_dir))["ema"]["steps"] == 1
    resumed = load_file(str(train(cut, resume=Path(cut.train.output_dir))))
    assert_same_tensors(full, resumed)
    ema_full = load_training_state(Path(straight.train.output_dir))["ema"]
    ema_resumed = load_training_state(Path(cut.train.output_dir))["ema"]
    assert int(ema_full["steps"]) == 2
    for name in ema_full:
        assert torch.equal(ema_full[name], ema_resumed[name]), name


# --- settings, checkpoints and evaluation -----------------------------------------------------------------------


def test_bad_settings_are_refused_in_one_line_naming_the_field(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.data.setting = "semi"
    with pytest.raises(ValueError, match=r"^data.setting='semi' is not one of inductive, transductive"):
        build_dataset(cfg, "train", train=True)
    cfg.data.setting = "supervised"
    held_out = build_dataset(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, setting="inductive")), "train", True
    )
    with pytest.raises(ValueError, match=r"data.setting=supervised .* build it with unseen=\[\]"):
        check_setting(cfg, held_out.split)
    cfg.data.setting, cfg.data.unseen = "transductive", []
    with pytest.raises(ValueError, match=r"data.setting=transductive needs target names"):
        check_setting(cfg, build_dataset(cfg, "train", train=True).split)
    cfg.data.unseen = None
    for field, value in (
        ("self_train_start", -1),
        ("threshold", 1.5),
        ("self_threshold", -0.1),
        ("tau", 0.0),
        ("clusters", "both"),
    ):
        bad = dataclasses.replace(cfg, transductive=dataclasses.replace(cfg.transductive, **{field: value}))
        with pytest.raises(ValueError, match=rf"^transductive\.{field}="):
            check_setting(bad, held_out.split)


def test_supervised_trains_on_every_label_and_evaluates_over_the_split(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg.data.setting = "supervised"
    train_set = build_dataset(cfg, "train", train=True)
    assert train_set.split.unseen == ()
    masks = torch.stack([train_set[i]["mask"] for i in range(8)])
    val = build_eval_dataset(cfg)
    unseen = set(val.split.unseen)
    assert unseen and torch.isin(masks, torch.tensor(sorted(unseen))).any()  # unseen pixels keep their ids
    assert len(seen_lookup(train_set.split).unique()) == train_set.split.num_classes + 1  # all + 255


@pytest.fixture(scope="module")
def transductive_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transductive")
    cfg = transductive_config(root, self_train_start=1)
    cfg.train.max_iters = 2
    return train(cfg)


def test_transductive_checkpoint_records_its_setting_predicts_and_evaluates(
    transductive_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from clipzss.checkpoint import load_checkpoint
    from clipzss.cli import main
    from clipzss.models.segmenter import Segmenter
    from clipzss.models.student import build_student

    saved = load_checkpoint(transductive_checkpoint)
    assert saved.config.data.setting == "transductive"
    assert saved.state_dict.keys() == build_student(saved.config.student).state_dict().keys()  # no EMA copy
    seg = Segmenter.from_checkpoint(transductive_checkpoint, device="cpu")
    image = torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()
    assert seg.predict(image, ["a", "b", "c"]).shape == (40, 56)
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            str(transductive_checkpoint),
            "--dataset",
            "synthetic",
            "--max-images",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "trained in the transductive setting" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setting"] == "transductive" and "mIoU(U)" in metrics["summary"]


def test_a_checkpoint_config_without_a_setting_reads_as_inductive(tmp_path: Path) -> None:
    old = tiny_config(tmp_path / "run", tmp_path / "cache").to_dict()
    del old["data"]["setting"]
    del old["transductive"]
    assert Config.from_dict(old).data.setting == "inductive"


def test_setting_configs_follow_the_published_protocols() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, iters, start in (("voc", 30000, 20000), ("coco", 120000, 80000), ("context", 60000, 40000)):
        inductive = load_config(configs / f"{name}_inductive.yaml")
        trans = load_config(configs / f"{name}_transductive.yaml")
        sup = load_config(configs / f"{name}_supervised.yaml")
        assert (trans.data.setting, sup.data.setting) == ("transductive", "supervised")
        assert trans.data.dataset == sup.data.dataset == inductive.data.dataset
        assert trans.data.unseen == sup.data.unseen == inductive.data.unseen
        assert (trans.train.max_iters, trans.transductive.self_train_start) == (iters, start)
        assert sup.train.max_iters == inductive.train.max_iters
        assert sup.method == trans.method == inductive.method
