"""The training loop: each ablation runs, resume is bit-exact, DDP ranks agree, NaN stops with a name."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from clipzss.config import Config, TrainConfig
from clipzss.models.segmenter import Segmenter
from clipzss.training.loop import NonFiniteLossError, StreamSampler, check_schedule, due, train
from clipzss.training.state import load_training_state
from clipzss.training.step import TrainParts, lr_factor
from conftest import assert_same_tensors, free_port, tiny_config, tiny_overrides, train_until_checkpoint


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path / "run", tmp_path / "text_cache")


SWITCHES = ["glm", "bank", "pseudo_labels", "multi_scale", "mask_fusion", "synthesizer", "nel"]


@pytest.mark.parametrize("switch", [*SWITCHES, "ce", "all_off"])
def test_each_ablation_trains(cfg: Config, switch: str) -> None:
    """Every switch can be flipped from its default (the synthesizer and multi-scale seeds, off by default, are
    turned on), and all can be off: the plain supervised student with a text classifier."""
    if switch == "all_off":
        flips = {name: False for name in SWITCHES}
    else:
        flips = {switch: not getattr(cfg.method, switch)}
    cfg.method = dataclasses.replace(cfg.method, **flips)
    cfg.train.max_iters = 2
    ckpt = train(cfg)
    assert ckpt.is_file()
    weights = load_file(str(ckpt))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_train_end_to_end_then_predict(cfg: Config, tmp_path: Path) -> None:
    cfg.train.eval_interval = 4
    ckpt = train(cfg)
    run = Path(cfg.train.output_dir)
    assert (run / "config.yaml").is_file() and (run / "train_state.pt").is_file()
    assert any((run / "tb").iterdir()), "TensorBoard events are written"
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    image = torch.randint(0, 255, (50, 70, 3), dtype=torch.uint8).numpy()
    mask = seg.predict(image, ["red horizontal stripes", "a cat", "grass"])
    assert mask.shape == (50, 70) and set(mask.ravel().tolist()) <= {0, 1, 2}
    state = load_training_state(run)
    assert state["step"] == 4


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    straight = tiny_config(tmp_path / "straight", tmp_path / "cache", max_iters=4)
    first = tiny_config(tmp_path / "split", tmp_path / "cache", max_iters=4, ckpt_interval=2)
    full = load_file(str(train(straight)))
    train_until_checkpoint(first, 2)  # cut right after the step-2 checkpoint, as a kill would
    resumed = load_file(str(train(first, resume=Path(first.train.output_dir))))
    assert_same_tensors(full, resumed)


def test_nan_loss_names_term_and_keeps_checkpoint(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipzss.training.step as training_step

    real = training_step.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third step (step index 2), after the step-2 checkpoint
            losses["ce"] = losses["ce"] * float("nan")
            losses["loss"] = losses["loss"] + losses["ce"]
        return losses

    monkeypatch.setattr(training_step, "compute_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"ce.*step 2"):
        train(cfg)
    state = load_training_state(Path(cfg.train.output_dir))
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_lr_schedule_warmup_then_poly() -> None:
    cfg = Config(train=TrainConfig(max_iters=100, warmup_iters=10, poly_power=1.0, lr=1.0))
    assert lr_factor(0, cfg) == pytest.approx(1e-6, rel=1e-3)
    assert lr_factor(5, cfg) == pytest.approx(0.95 * (0.5 + 0.5e-6), rel=1e-3)
    assert lr_factor(10, cfg) == pytest.approx(0.9)
    assert lr_factor(100, cfg) == pytest.approx(0.0)


def test_due_every_interval_and_always_at_the_last_step() -> None:
    assert [d for d in range(1, 11) if due(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if due(d, 5, 10)] == [5, 10]
    assert [d for d in range(1, 11) if due(d, 0, 10)] == [10]  # 0: the last step only
    assert [d for d in range(1, 4) if due(d, 1, 3)] == [1, 2, 3]


def test_negative_intervals_are_refused_in_one_line(cfg: Config) -> None:
    check_schedule(TrainConfig(log_interval=0, eval_interval=0, ckpt_interval=0))
    for name in ("log_interval", "eval_interval", "ckpt_interval"):
        bad = dataclasses.replace(cfg.train, **{name: -1})
        with pytest.raises(ValueError, match=rf"train\.{name}=-1 is negative"):
            train(dataclasses.replace(cfg, train=bad))
    assert not Path(cfg.train.output_dir).exists()  # refused before anything is written


@pytest.mark.parametrize(("eval_interval", "evaluated"), [(0, [3]), (2, [2, 3])])
def test_eval_interval_zero_evaluates_a_given_val_set_once_at_the_end(
    cfg: Config, monkeypatch: pytest.MonkeyPatch, eval_interval: int, evaluated: list[int]
) -> None:
    """0 builds no evaluation set and evaluates a val_set passed to train after the last step only."""
    import clipzss.training.loop as training

    steps: dict[str, list[int]] = {"eval": [], "save": []}
    real_save = training.save_training_state

    def record_eval(parts, val_set, info, writer=None, step=0):
        assert val_set == "the val set"
        steps["eval"].append(step)
        return {}

    def record_save(out, step, *args, **kwargs):
        steps["save"].append(step)
        return real_save(out, step, *args, **kwargs)

    def no_eval_set(cfg):
        raise AssertionError("eval_interval=0 must not build an evaluation set")

    monkeypatch.setattr(training, "_evaluate_student", record_eval)
    monkeypatch.setattr(training, "save_training_state", record_save)
    monkeypatch.setattr(training, "build_eval_dataset", no_eval_set)
    cfg.train = dataclasses.replace(
        cfg.train, max_iters=3, eval_interval=eval_interval, ckpt_interval=0, log_interval=0
    )
    train(cfg, val_set="the val set")
    assert steps == {"eval": evaluated, "save": [3]}
    cfg.train = dataclasses.replace(cfg.train, eval_interval=0, output_dir=cfg.train.output_dir + "-no-val")
    train(cfg)  # no val_set and eval_interval=0: nothing is evaluated, no evaluation set is built
    assert steps["eval"] == evaluated


def test_stream_sampler_resumes_and_shards() -> None:
    full = StreamSampler(10, seed=3)
    stream = [next(it) for it in [iter(full)] for _ in range(25)]
    resumed_iter = iter(StreamSampler(10, seed=3, start=13))
    assert [next(resumed_iter) for _ in range(12)] == stream[13:]
    epoch = sorted(i for i, _ in stream[:10])
    assert epoch == list(range(10)), "each epoch is a permutation"
    ranks = [
        [i for i, _ in [next(it) for it in [iter(StreamSampler(10, 3, r, 2))] for _ in range(5)]]
        for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 10


def test_embed_dim_mismatch_is_explained(cfg: Config) -> None:
    cfg.student.embed_dim = 48
    with pytest.raises(ValueError, match=r"student\.embed_dim=32"):
        train(cfg)


def _ddp_worker(rank: int, cfg_dict: dict, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import clipzss.training.loop as training

    built = []
    real_build = training.build_student
    training.build_student = lambda student_cfg: built.append(real_build(student_cfg)) or built[-1]
    cfg = Config.from_dict(cfg_dict)
    if rank == 1:  # both ranks write the same run folder otherwise; only rank 0 writes anyway
        cfg.train.output_dir = str(Path(out) / "rank1_unused")
    train(cfg)
    # Parameters, not BatchNorm running statistics: on CPU (no SyncBatchNorm) each rank keeps its own, and rank 0's
    # are the ones saved; on CUDA the trainer converts to SyncBatchNorm.
    params = {name: p.detach() for name, p in built[0].named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")
    training.dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_end_identical(tmp_path: Path) -> None:
    """Two gloo processes (as torchrun starts them) train different shards and end with identical weights."""
    cfg = tiny_config(tmp_path / "ddp", tmp_path / "cache", max_iters=3, ckpt_interval=3)
    mp.spawn(_ddp_worker, args=(cfg.to_dict(), free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_torchrun_launches_ddp_training(tmp_path: Path) -> None:
    """The documented multi-GPU command, on CPU: `torchrun --nproc-per-node 2 -m clipzss train ...` (gloo)."""
    import subprocess
    import sys

    overrides = tiny_overrides(
        tmp_path / "cache",
        {
            "data.dataset": "synthetic",
            "train.max_iters": 2,
            "train.batch_size": 4,
            "train.warmup_iters": 1,
            "train.eval_interval": 0,
            "train.ckpt_interval": 2,
            "train.output_dir": tmp_path / "run",
        },
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "clipzss",
        "train",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert load_training_state(tmp_path / "run")["step"] == 2


def _parts(cfg: Config) -> TrainParts:
    from clipzss.data import build_dataset, seen_lookup
    from clipzss.method.glm import GLM
    from clipzss.method.synthesizer import Synthesizer
    from clipzss.models.student import build_student
    from clipzss.models.teacher import build_teacher

    teacher = build_teacher(cfg.teacher, device=torch.device("cpu"))
    split = build_dataset(cfg, "train", train=True).split
    text_seen = teacher.text_embeddings(list(split.class_names))[list(split.seen)]
    return TrainParts(
        cfg,
        teacher,
        build_student(cfg.student),
        GLM(cfg.method, teacher.embed_dim),
        Synthesizer.from_config(cfg.method, teacher.embed_dim),
        text_seen,
        seen_lookup(split),
        torch.device("cpu"),
    )


def test_crop_padding_never_gets_a_pseudo_label_and_reaches_the_losses_as_padding(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PadTo marks padding -1; train_step turns it into ignored labels plus a ``valid`` mask (GLM, synthesizer)."""
    import clipzss.training.step as training_step

    parts = _parts(cfg)
    seen: dict[str, torch.Tensor] = {}

    def capture(R: torch.Tensor, labels: torch.Tensor, *args: object, **kwargs: object) -> dict:
        seen["labels"], seen["valid"] = labels, kwargs["valid"]
        return {"loss": R.sum()}

    monkeypatch.setattr(training_step, "compute_losses", capture)
    masks = torch.full((2, 64, 64), 255, dtype=torch.long)  # all unlabelled image content...
    masks[:, :, 40:] = -1  # ...except the padded right part of each crop
    masks[0, :20, :20] = 0
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": masks}
    optimizer = training_step.build_optimizer(parts.student, [parts.synthesizer], cfg)
    training_step.train_step(parts, batch, optimizer, training_step.grad_scaler(cfg, parts.device))
    labels, valid = seen["labels"], seen["valid"]
    assert torch.equal(valid, masks != -1)
    # Padding gets no pseudo id and no seen id (the lookup of a clamped -1 would give seen class 0).
    assert (labels[~valid] == 255).all()
    num_seen = parts.text_seen.shape[0]
    assert (labels[valid & (masks == 255)] >= num_seen).any()  # unlabelled image content does get pseudo ids


def test_compiled_student_saves_a_checkpoint_that_loads(cfg: Config) -> None:
    """torch.compile prefixes state-dict keys with ``_orig_mod.``; checkpoints must hold the plain module's keys."""
    from clipzss.training.state import save_training_state
    from clipzss.training.step import build_optimizer

    parts = _parts(cfg)
    plain = parts.student
    parts.student = torch.compile(plain)  # compiled lazily: nothing runs until a forward
    assert all(k.startswith("_orig_mod.") for k in parts.student.state_dict())  # the bug's cause
    optimizer = build_optimizer(plain, [parts.synthesizer], cfg)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    ckpt = save_training_state(out, 3, parts, optimizer, {"class_names": "a,b"})
    assert not any(k.startswith("_orig_mod.") for k in load_file(str(ckpt)))
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    for key, value in plain.state_dict().items():
        assert torch.equal(seg.student.state_dict()[key], value)
    state = load_training_state(out)
    assert not any(k.startswith("_orig_mod.") for k in state["student"])


def test_training_never_encodes_an_unseen_class_name(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductive protocol: an unseen name is first read at test time. Both the cached entry point and the text
    # tower's input (every prompt is tokenized before encode_text) are watched.
    from clipzss.data import build_dataset
    from clipzss.models.teacher import CLIPTeacher

    asked: list[str] = []
    prompts: list[str] = []
    text_embeddings, tokenize = CLIPTeacher.text_embeddings, CLIPTeacher.tokenize

    def watch_names(self, class_names, templates=None):
        asked.extend(class_names)
        return text_embeddings(self, class_names, templates)

    def watch_prompts(self, texts):
        prompts.extend(texts)
        return tokenize(self, texts)

    monkeypatch.setattr(CLIPTeacher, "text_embeddings", watch_names)
    monkeypatch.setattr(CLIPTeacher, "tokenize", watch_prompts)
    cfg.train.max_iters = 2
    train(cfg)
    split = build_dataset(cfg, cfg.data.train_split, train=True).split
    unseen = {split.class_names[i] for i in split.unseen}
    seen = {split.class_names[i] for i in split.seen}
    assert unseen and set(asked) == seen
    assert prompts and not [p for p in prompts if any(name in p for name in unseen)]


def test_transductive_training_encodes_target_names_but_reads_no_target_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transductive twin of the test above: the text encoder sees the seen and the target names, but a training
    set whose target pixels keep their true ids gives the losses exactly what one with those pixels unlabelled
    gives (the pseudo labels included: they are part of the labels the losses get)."""
    import clipzss.training.step as training_step
    from clipzss.data import IGNORE_INDEX, SyntheticScenes, build_transforms
    from clipzss.models.teacher import CLIPTeacher

    asked: list[str] = []
    text_embeddings = CLIPTeacher.text_embeddings

    def watch_names(self, class_names, templates=None):
        asked.extend(class_names)
        return text_embeddings(self, class_names, templates)

    monkeypatch.setattr(CLIPTeacher, "text_embeddings", watch_names)
    losses_seen: list[tuple[torch.Tensor, dict[str, float]]] = []
    compute = training_step.compute_losses

    def watch_losses(R, labels, *args, **kwargs):
        out = compute(R, labels, *args, **kwargs)
        losses_seen.append((labels.clone(), {k: float(v.detach()) for k, v in out.items()}))
        return out

    monkeypatch.setattr(training_step, "compute_losses", watch_losses)

    class Sentinel(SyntheticScenes):
        """Training masks that still hold the target ids (``hide``: as the dataset gives them, 255)."""

        def __init__(self, hide: bool) -> None:
            super().__init__(8, size=64, transform=build_transforms(cfg.data, train=True), train=False)
            self.hide = hide

        def __getitem__(self, index: int) -> dict:
            item = super().__getitem__(index)
            if self.hide:
                item["mask"] = torch.where(
                    torch.isin(item["mask"], torch.tensor(self.unseen)), IGNORE_INDEX, item["mask"]
                )
            return item

    cfg = tiny_config(tmp_path / "run", tmp_path / "text_cache", max_iters=1)
    cfg.data.setting = "transductive"
    cfg.transductive.threshold = 0.0  # every unlabelled pixel the teacher calls a target is named
    runs = []
    for hide in (False, True):
        cfg.train.output_dir = str(tmp_path / f"run_{hide}")
        losses_seen.clear()
        train(cfg, train_set=Sentinel(hide))
        runs.append(list(losses_seen))
    (labels_a, losses_a), (labels_b, losses_b) = runs[0][0], runs[1][0]
    assert torch.equal(labels_a, labels_b) and losses_a == losses_b
    split = Sentinel(False).split
    assert set(asked) == set(split.class_names)  # seen and target names: their texts are allowed, and used


def test_train_step_runs_each_stage_in_a_profiler_scope(cfg: Config) -> None:
    """The scopes benchmarks/bench_train_step.py reads, in the order the step runs them."""
    from torch.profiler import ProfilerActivity, profile

    import clipzss.training.step as training_step

    parts = _parts(cfg)
    optimizer = training_step.build_optimizer(parts.student, [parts.synthesizer], cfg)
    masks = torch.full((2, 64, 64), 255, dtype=torch.long)
    masks[:, :32] = 0
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": masks}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        losses = training_step.train_step(
            parts, batch, optimizer, training_step.grad_scaler(cfg, parts.device)
        )
    ran = [
        e.name
        for e in sorted(prof.events(), key=lambda e: e.time_range.start)
        if e.name in training_step.STEP_SCOPES
    ]
    assert ran == list(training_step.STEP_SCOPES)
    assert (
        torch.isfinite(losses["loss"]) and parts.glm.bank.negatives().shape[0] == 2
    )  # the bank took the batch
