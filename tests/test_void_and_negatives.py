"""Void pixels stay out of the method, GLM's negatives are honest, and nothing depends on the number of processes.

Void = the dataset's own ignore pixels and crop padding (``VOID_INDEX`` in training masks): they never get a pseudo
label, never join K-Means (seeds, means, counts), the centring mean, GLM's pooling or any loss. An image is never its
own negative in GLM. Under torch.distributed (real gloo ranks) the GLM loss and the pseudo labels equal those of one
process holding the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from clipzss.config import MethodConfig
from clipzss.method.glm import GLM, UNKNOWN_IMAGE, CLSBank, bank_capacity, image_ids
from clipzss.method.losses import compute_losses, distill_loss, gap_shifted, info_nce
from clipzss.method.pseudo_labels import (
    center_tokens,
    kmeans_sets,
    mean_token,
    pseudo_labels,
    token_regions,
    token_validity,
    window_seeds,
)
from conftest import run_gloo_ranks

C = 8


def _tokens(b: int = 2, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Tokens of two or three clear 'objects' per image plus noise, L2-normalised (B, C, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(3, C, generator=gen), dim=-1)
    layout = torch.zeros(b, h, w, dtype=torch.long)
    layout[:, :, w // 2 :] = 1
    layout[:, h // 2 :, : w // 3] = 2
    x = centres[layout].permute(0, 3, 1, 2) + 0.2 * torch.randn(b, C, h, w, generator=gen)
    return F.normalize(x, dim=1)


def _scramble(x: torch.Tensor, keep: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``x`` (B, C, h, w) with the positions where ``keep`` (B, h, w) is False replaced by random unit tokens."""
    gen = torch.Generator().manual_seed(seed)
    noise = F.normalize(torch.randn(x.shape, generator=gen) * 50, dim=1)
    return torch.where(keep[:, None], x, noise)


# --- void in the pseudo-label pipeline ---------------------------------------------------------------------------


def test_void_tokens_never_seed_or_move_kmeans() -> None:
    dense = _tokens()
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, :, 6:] = False  # a void band (padding)
    valid[1, 5:, :] = False
    scrambled = _scramble(dense, valid)
    seeds = window_seeds(dense, 4, valid)
    torch.testing.assert_close(window_seeds(scrambled, 4, valid), seeds)
    x, y = (t.flatten(2).transpose(1, 2) for t in (dense, scrambled))
    a = kmeans_sets(x, [seeds], 10, valid=valid.flatten(1))[0]
    b = kmeans_sets(y, [seeds], 10, valid=valid.flatten(1))[0]
    torch.testing.assert_close(a.centroids, b.centroids)
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.counts.sum(dim=1), valid.flatten(1).sum(dim=1))  # only valid tokens are counted
    keep = valid.flatten(1)
    assert torch.equal(a.labels[keep], b.labels[keep])
    # Today's behaviour without a mask: the scrambled tokens move the clusters.
    plain = kmeans_sets(y, [window_seeds(scrambled, 4)], 10)[0]
    assert not torch.equal(plain.counts, a.counts)


def test_a_seed_window_of_void_tokens_is_dead() -> None:
    dense = _tokens(1)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, 4:, 4:] = False  # exactly one window of 4x4 is void
    seeds = window_seeds(dense, 4, valid)
    assert seeds[0, 3].abs().max() == 0  # the bottom-right cell's seed
    result = kmeans_sets(dense.flatten(2).transpose(1, 2), [seeds], 10, valid=valid.flatten(1))[0]
    assert result.counts[0, 3] == 0  # it wins no point, so fusion never sees it


def test_centring_mean_is_over_valid_tokens_only() -> None:
    dense = _tokens(3)
    valid = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.4
    want = dense.permute(0, 2, 3, 1)[valid].double().mean(dim=0)
    got = mean_token(dense, valid).flatten()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    per_image = mean_token(dense, valid, "image")
    for b in range(3):
        torch.testing.assert_close(per_image[b].flatten(), dense[b].permute(1, 2, 0)[valid[b]].mean(dim=0))
    scrambled = _scramble(dense, valid)
    torch.testing.assert_close(
        center_tokens(scrambled, valid)[valid[:, None].expand_as(dense)],
        center_tokens(dense, valid)[valid[:, None].expand_as(dense)],
    )
    with pytest.raises(ValueError, match=r"method\.center_scope"):
        mean_token(dense, valid, "galaxy")


def test_void_content_changes_no_pseudo_label() -> None:
    cfg = MethodConfig(min_region=0.0)
    dense = _tokens()
    gt = torch.full((2, 32, 32), 255, dtype=torch.long)
    gt[:, :, :8] = 0  # one seen class on the left; the rest is unlabelled
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :, 24:] = False
    valid[1, 20:, :] = False
    gt[~valid] = 255  # void pixels carry the ignore label, as the trainer gives them
    fused, _ = pseudo_labels(dense, gt.clone(), 1, cfg, valid)
    assert (fused[~valid] == 255).all()  # void never gets a pseudo id
    assert ((fused >= 1) & (fused != 255))[valid].any()  # the check is not vacuous
    tokens = token_validity(valid, (8, 8))
    again, _ = pseudo_labels(_scramble(dense, tokens), gt.clone(), 1, cfg, valid)
    assert torch.equal(again, fused)
    regions, _ = token_regions(_scramble(dense, tokens), cfg, tokens)
    assert torch.equal(regions[tokens], token_regions(dense, cfg, tokens)[0][tokens])


def test_token_validity_is_the_majority_of_each_tokens_pixels() -> None:
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[0, :, 10:] = False  # token column 2 (pixels 8-11) is half void, column 3 fully
    tokens = token_validity(valid, (4, 4))
    assert tokens[0, 0].tolist() == [True, True, False, False]


# --- void in the losses ------------------------------------------------------------------------------------------


def _loss_inputs(seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    b, h, w = 2, 32, 32
    labels = torch.randint(0, 3, (b, h, w), generator=gen)
    labels[:, :8, :8] = 255  # unlabelled, not void: ZegCLIP's NEL counts it as a negative
    labels[0, :, 20:] = 3  # a pseudo region
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, 24:, :] = False
    labels[~valid] = 255  # void pixels carry the ignore label, as the trainer gives them
    return {
        "R": torch.randn(b, C, h // 4, w // 4, generator=gen),
        "labels": labels,
        "text_seen": F.normalize(torch.randn(3, C, generator=gen), dim=-1),
        "teacher_cls": F.normalize(torch.randn(b, C, generator=gen), dim=-1),
        "teacher_dense": F.normalize(torch.randn(b, C, h // 8, w // 8, generator=gen), dim=1),
        "num_seen": 3,
        "valid": valid,
    }


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"loss_resolution": "full"},
        {"w_distill": 1.0},
        {"w_distill": 1.0, "distill_pixels": "unlabelled", "prototype_gap": "shift"},
        {"nel_norm": "entries", "focal_weight": 20.0},
    ],
)
def test_void_pixels_reach_no_loss(switches: dict[str, object]) -> None:
    cfg = dataclasses.replace(MethodConfig(bank=False), **switches)
    inputs = _loss_inputs()
    glm = GLM(cfg, C)
    base = compute_losses(**inputs, cfg=cfg, glm=glm)
    changed = dict(inputs)
    R = inputs["R"].clone()
    R[:, :, 7:, :] = (
        torch.randn(2, C, 1, 8) * 30
    )  # the student on void pixels only (rows 28-31; bilinear reach)
    dense = inputs["teacher_dense"].clone()
    dense[:, :, 3:, :] = F.normalize(torch.randn(2, C, 1, 4), dim=1)  # the teacher's void tokens (row 3)
    changed.update(R=R, teacher_dense=dense)
    again = compute_losses(**changed, cfg=cfg, glm=glm)
    assert set(base) == set(again)
    for key in base:
        torch.testing.assert_close(again[key], base[key], msg=key)
    # Without the void mask (today's trainer), the same change moves NEL and GLM.
    plain = {k: v for k, v in inputs.items() if k != "valid"}
    moved = compute_losses(**{**plain, "R": R, "teacher_dense": dense}, cfg=cfg, glm=glm)
    if cfg.nel_norm == "zegclip":
        assert not torch.allclose(moved["nel"], compute_losses(**plain, cfg=cfg, glm=glm)["nel"])


def test_zegclips_void_negatives_are_an_option() -> None:
    cfg = MethodConfig(bank=False, glm=False, nel_void_negatives=True)
    inputs = _loss_inputs()
    plain = {k: v for k, v in inputs.items() if k != "valid"}
    # With the option, NEL is ZegCLIP's criterion whatever the void mask says; CE still ignores void pixels.
    torch.testing.assert_close(
        compute_losses(**inputs, cfg=cfg)["nel"], compute_losses(**plain, cfg=cfg)["nel"]
    )
    skipped = compute_losses(**inputs, cfg=dataclasses.replace(cfg, nel_void_negatives=False))["nel"]
    assert not torch.allclose(skipped, compute_losses(**inputs, cfg=cfg)["nel"])


def test_distill_loss_hand_computed_and_token_selection() -> None:
    R = torch.zeros(1, 2, 2, 2)
    R[0, 0] = 1.0  # every student pixel points along e0
    teacher = torch.zeros(1, 2, 1, 2)
    teacher[0, 0, 0, 0] = 1.0  # token 0 along e0 (cos 1), token 1 along e1 (cos 0)
    teacher[0, 1, 0, 1] = 1.0
    assert float(distill_loss(R, teacher)) == pytest.approx(0.5)
    only_second = torch.tensor([[[False, True]]])
    assert float(distill_loss(R, teacher, only_second)) == pytest.approx(1.0)
    assert float(distill_loss(R, teacher, torch.zeros(1, 1, 2, dtype=torch.bool))) == 0.0


def test_gap_shift_moves_prototypes_by_the_difference_of_the_means() -> None:
    protos = F.normalize(torch.randn(2, 3, C), dim=-1)
    image_mean = torch.randn(C)
    text = F.normalize(torch.randn(4, C), dim=-1)
    want = F.normalize(protos - image_mean + text.mean(dim=0), dim=-1)
    torch.testing.assert_close(gap_shifted(protos, image_mean, text), want)


# --- honest negatives ---------------------------------------------------------------------------------------------


def test_an_image_is_never_its_own_negative() -> None:
    cfg = MethodConfig(bank=True, bank_size=8, bank_fraction=1.0)
    glm = GLM(cfg, C)
    R = torch.randn(3, C, 4, 4)
    S = F.normalize(torch.randn(3, C), dim=-1)
    ids = image_ids(["a.jpg", "b.jpg", "c.jpg"])
    others = F.normalize(torch.randn(2, C), dim=-1)
    glm.update_bank(torch.cat([S[:1], others]), image_ids(["a.jpg", "x.jpg", "y.jpg"]))  # a.jpg seen before
    loss = glm(R, S, ids=ids)
    pred, _ = glm.pool(R, S)
    # Reference: image a's row drops its own earlier CLS from the bank; b and c keep all three bank entries.
    rows = []
    for i in range(3):
        bank = others if i == 0 else torch.cat([S[:1], others])
        keys = torch.cat([S, bank])
        rows.append(-F.log_softmax(pred[i] @ keys.T / cfg.tau, dim=0)[i])
    assert float(loss) == pytest.approx(float(torch.stack(rows).mean()), rel=1e-6)
    # Without ids (today's GLM) the image's own earlier token counts as a negative.
    assert float(glm(R, S)) != pytest.approx(float(loss), rel=1e-6)


def test_a_repeated_image_in_the_batch_is_not_a_negative_of_itself() -> None:
    pred = F.normalize(torch.randn(3, C), dim=-1)
    target = F.normalize(torch.randn(3, C), dim=-1)
    ids = torch.tensor([7, 7, 9])
    exclude = ids[:, None] == ids[None, :]
    got = info_nce(pred, target, None, 0.1, exclude=exclude)
    logits = pred @ target.T / 0.1
    want = torch.stack(
        [
            -F.log_softmax(logits[0, [0, 2]], 0)[0],
            -F.log_softmax(logits[1, [1, 2]], 0)[0],
            -F.log_softmax(logits[2], 0)[2],
        ]
    ).mean()
    torch.testing.assert_close(got, want)


def test_bank_holds_at_most_its_fraction_of_the_training_set() -> None:
    cfg = MethodConfig(bank=True, bank_size=1024, bank_fraction=0.5)
    assert bank_capacity(cfg, 204) == 102
    assert bank_capacity(cfg, 100_000) == 1024
    assert bank_capacity(cfg) == 1024  # size unknown: the configured bank
    assert bank_capacity(dataclasses.replace(cfg, bank=False), 204) == 0
    bank = GLM(cfg, C, dataset_size=204).bank
    assert (bank.size, bank.capacity) == (1024, 102)  # the buffers keep their size: saved states load
    for step in range(30):  # 240 images through a 102-entry FIFO: the newest 102 are the negatives
        bank.enqueue(torch.full((8, C), float(step)), torch.arange(8) + 8 * step)
    assert bank.negatives().shape == (102, C)
    assert sorted(bank.negative_ids().tolist()) == list(range(240 - 102, 240))
    assert GLM(cfg, C, dataset_size=1).bank is None  # half an image: no bank at all
    with pytest.raises(ValueError, match=r"method\.bank_fraction"):
        GLM(dataclasses.replace(cfg, bank_fraction=1.5), C)


def test_a_state_saved_with_a_larger_bank_loads_into_a_capped_one() -> None:
    old = CLSBank(6, 2)
    old.enqueue(torch.arange(12.0).view(6, 2), torch.arange(6))
    capped = CLSBank(6, 2, capacity=4)
    capped.load_state_dict(old.state_dict())
    assert capped.negatives().shape == (4, 2)
    capped.enqueue(torch.full((1, 2), -1.0), torch.tensor([9]))
    assert capped.negatives().shape == (4, 2) and -1.0 in capped.negatives()


def test_bank_remembers_ids_and_loads_a_state_saved_without_them() -> None:
    bank = CLSBank(3, 2)
    bank.enqueue(torch.ones(2, 2), torch.tensor([5, 6]))
    bank.enqueue(torch.zeros(2, 2), torch.tensor([7, 8]))
    assert bank.negative_ids().tolist() == [8, 6, 7]
    old = {k: v for k, v in bank.state_dict().items() if k != "ids"}
    restored = CLSBank(3, 2)
    restored.load_state_dict(old)
    assert restored.negative_ids().tolist() == [UNKNOWN_IMAGE] * 3
    assert torch.equal(restored.negatives(), bank.negatives())


def test_image_ids_are_stable_and_optional() -> None:
    assert image_ids(["a", "b"]).tolist() == image_ids(["a", "b"]).tolist()
    assert image_ids(["a"]).item() != image_ids(["b"]).item()
    assert image_ids(None) is None


# --- the same results on any number of processes (real gloo ranks) ------------------------------------------------


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = 8
    dense = torch.cat([_tokens(1, seed=i) for i in range(b)])
    dense = F.normalize(dense + 0.3 * torch.randn(1, C, 1, 1, generator=gen), dim=1)  # a shared offset
    gt = torch.full((b, 32, 32), 255, dtype=torch.long)
    gt[:, :, :8] = 0
    valid = torch.ones(b, 32, 32, dtype=torch.bool)
    valid[::3, 24:, :] = False
    return {
        "R": torch.randn(b, C, 8, 8, generator=gen),
        "S": F.normalize(torch.randn(b, C, generator=gen), dim=-1),
        "ids": torch.tensor([0, 1, 2, 3, 4, 5, 0, 7]),  # image 0 twice (two processes hold one copy each)
        "bank": F.normalize(torch.randn(5, C, generator=gen), dim=-1),
        "bank_ids": torch.tensor([3, 11, 12, 5, 13]),
        "dense": dense,
        "gt": gt,
        "valid": valid,
    }


def _results(batch: dict[str, torch.Tensor], part: slice) -> tuple[float, torch.Tensor]:
    cfg = MethodConfig(bank=True, bank_size=8, bank_fraction=1.0, min_region=0.0)
    glm = GLM(cfg, C)
    # The same five past entries in every process's bank (enqueue would all-gather them under DDP).
    glm.bank.load_state_dict(
        {
            "queue": F.pad(batch["bank"], (0, 0, 0, 3)),
            "ids": F.pad(batch["bank_ids"], (0, 3), value=-1),
            "ptr": torch.tensor(5),
            "filled": torch.tensor(5),
        }
    )
    loss = glm(batch["R"][part], batch["S"][part], ids=batch["ids"][part])
    fused, _ = pseudo_labels(batch["dense"][part], batch["gt"][part].clone(), 1, cfg, batch["valid"][part])
    return float(loss), fused


def _layout_worker(rank: int, port: int, queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loss, fused = _results(_batch(), slice(4 * rank, 4 * rank + 4))
    queue.put((rank, (loss, fused.tolist())))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~10 s on 2 cores
def test_glm_loss_and_pseudo_labels_equal_across_rank_layouts() -> None:
    single_loss, single_fused = _results(_batch(), slice(0, 8))
    got = run_gloo_ranks(_layout_worker)
    # DDP averages the ranks' gradients: the mean of the ranks' losses is the single process's loss.
    assert (got[0][0] + got[1][0]) / 2 == pytest.approx(single_loss, rel=1e-5)
    fused = torch.cat([torch.tensor(got[0][1]), torch.tensor(got[1][1])])
    assert torch.equal(fused, single_fused)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.bank_fraction=1.5", "method.bank_fraction"),
        ("method.center_scope=galaxy", "method.center_scope"),
        ("method.prototype_gap=wide", "method.prototype_gap"),
        ("method.distill_pixels=some", "method.distill_pixels"),
        ("method.w_distill=-1", "method.w_distill"),
        ("method.max_seen_share=2", "method.max_seen_share"),
    ],
)
def test_new_method_values_are_refused_at_load_naming_the_field(override: str, field: str) -> None:
    from clipzss.config import ConfigValueError, load_config

    with pytest.raises(ConfigValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])
