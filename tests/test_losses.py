"""Losses against hand computations and torch/torchvision references, on tiny tensors."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from clipzss.config import MethodConfig
from clipzss.method.glm import GLM
from clipzss.method.losses import (
    NEG_LOGIT,
    build_logits,
    ce_loss,
    compute_losses,
    info_nce,
    majority_labels,
    masked_dice_loss,
    masked_focal_loss,
    nel_loss,
    prototype_bce_loss,
    restrict_targets,
    upsample_logits,
)
from clipzss.method.regions import downsample_labels, teacher_pseudo_prototypes
from clipzss.method.synthesizer import Synthesizer

C = 16
NUM_SEEN = 3


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


# --- InfoNCE ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bank", [False, True])
def test_info_nce_matches_manual_log_softmax(with_bank: bool) -> None:
    pred, target = _unit(3, 8), _unit(3, 8)
    bank = _unit(2, 8) if with_bank else None
    tau = 0.1
    expected = 0.0
    for i in range(3):
        pos = float(target[i] @ pred[i]) / tau
        others = [float(target[j] @ pred[i]) / tau for j in range(3) if j != i]
        others += [float(n @ pred[i]) / tau for n in bank] if with_bank else []
        expected += -(pos - math.log(math.exp(pos) + sum(math.exp(o) for o in others)))
    assert float(info_nce(pred, target, bank, tau)) == pytest.approx(expected / 3, rel=1e-10)


def test_info_nce_empty_bank_equals_no_bank() -> None:
    pred, target = _unit(2, 8), _unit(2, 8)
    assert torch.equal(
        info_nce(pred, target, target.new_zeros(0, 8), 0.07), info_nce(pred, target, None, 0.07)
    )


# --- logits -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [None, 5.0])
def test_build_logits_are_scaled_cosines(beta: float | None) -> None:
    R = torch.randn(2, 8, 3, 2, dtype=torch.float64) * 3
    text = torch.randn(4, 8, dtype=torch.float64)
    protos = torch.randn(2, 2, 8, dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, False]])
    x = build_logits(R, text, protos, valid, alpha=10.0, beta=beta)
    assert x.shape == (2, 6, 3, 2)
    for b, i, j in itertools.product(range(2), range(3), range(2)):
        r = R[b, :, i, j]
        for k in range(4):
            assert float(x[b, k, i, j]) == pytest.approx(10.0 * float(F.cosine_similarity(r, text[k], dim=0)))
        for p in range(2):
            want = (
                NEG_LOGIT
                if not valid[b, p]
                else (beta or 10.0) * float(F.cosine_similarity(r, protos[b, p], dim=0))
            )
            assert float(x[b, 4 + p, i, j]) == pytest.approx(want)
    assert torch.equal(build_logits(R, text, None, None, alpha=10.0), x[:, :4])


def test_upsample_logits_is_bilinear_and_keeps_same_size() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(upsample_logits(x, (16, 16)), F.interpolate(x, (16, 16), mode="bilinear"))
    assert upsample_logits(x, (4, 4)) is x


# --- NEL --------------------------------------------------------------------------------------------------------


def _nel_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 2
    labels = torch.tensor(
        [[[0, 1, 255], [1, 1, 2], [255, 0, 0]], [[3, 3, 255], [0, 0, 255], [255, 255, 255]]], dtype=torch.long
    )
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return logits, labels, valid


def test_focal_entries_rule_matches_torchvision_on_valid_entries() -> None:
    logits, labels, valid = _nel_example()
    alpha, gamma = 0.25, 2.0
    by_hand, torchvision_terms = [], []
    for b, k, i, j in itertools.product(range(2), range(4), range(3), range(3)):
        if labels[b, i, j] == 255 or not valid[b, k]:
            continue
        x, t = float(logits[b, k, i, j]), float(labels[b, i, j] == k)
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        by_hand.append((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma)
        torchvision_terms.append(
            sigmoid_focal_loss(logits[b, k, i, j], torch.tensor(t, dtype=torch.float64), alpha, gamma, "none")
        )
    got = masked_focal_loss(logits, labels, valid, alpha, gamma, norm="entries")
    assert float(got) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    assert float(got) == pytest.approx(float(torch.stack(torchvision_terms).mean()), rel=1e-6)


def test_dice_part_hand_computed() -> None:
    # One image, 2 classes, 4 pixels, the last ignored; class 1 is absent, so only class 0 counts.
    logits = torch.tensor([[[[0.0, 2.0, -1.0, 5.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # (1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 0, 255]]])
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0)]
    expected = 1 - (2 * sum(p) + 1) / (sum(p) + 3 + 1)
    assert float(masked_dice_loss(logits, labels, norm="entries")) == pytest.approx(expected, rel=1e-6)
    # ZegCLIP's dice sums the prediction over every pixel, the ignored one included.
    p_all = sum(p) + 1 / (1 + math.exp(-5.0))
    zegclip = 1 - (2 * sum(p) + 1) / (p_all + 3 + 1)
    assert float(masked_dice_loss(logits, labels)) == pytest.approx(zegclip, rel=1e-6)
    # A second image where both classes are present: the mean is over the three (image, class) pairs.
    logits2 = torch.cat([logits, torch.zeros(1, 2, 1, 4)])
    labels2 = torch.cat([labels, torch.tensor([[[0, 1, 1, 255]]])])
    d0 = 1 - (2 * 0.5 + 1) / (1.5 + 1 + 1)
    d1 = 1 - (2 * 1.0 + 1) / (1.5 + 2 + 1)
    got = float(masked_dice_loss(logits2, labels2, norm="entries"))
    assert got == pytest.approx((expected + d0 + d1) / 3, rel=1e-6)


def test_nel_entries_rule_combines_focal_and_dice_and_ignores_ignored_pixels() -> None:
    logits, labels, valid = _nel_example()
    loss = nel_loss(logits, labels, valid, 0.25, 2.0, focal_weight=20.0, dice_weight=3.0, norm="entries")
    expected = 20.0 * masked_focal_loss(logits, labels, valid, norm="entries") + 3.0 * masked_dice_loss(
        logits, labels, valid, norm="entries"
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    changed = logits.clone()
    changed[labels[:, None].expand_as(logits) == 255] = 50.0  # ignored pixels
    changed[0, 3] = -30.0  # the invalid channel of image 0
    assert float(nel_loss(changed, labels, valid, norm="entries")) == pytest.approx(
        float(nel_loss(logits, labels, valid, norm="entries")), rel=1e-12
    )
    assert float(nel_loss(changed, labels, valid, norm="entries")) != pytest.approx(
        float(nel_loss(changed, labels, None, norm="entries"))
    )


def _zegclip_reference(
    logits: torch.Tensor, labels: torch.Tensor, mask_weight: float, dice_weight: float
) -> float:
    """ZegCLIP's SegLossPlus on one decoder output, step by step as its released criterion computes it.

    prepare_targets: the classes present in each image and one binary mask each; _get_target_mask_binary_cross_entropy:
    a (B, K, H·W) one-hot target with zero columns at ignored pixels; sigmoid_focal_loss: mean over the pixels of
    every (image, class) map, summed, divided by num_masks (the number of present masks, at least 1); dice_loss:
    over the present masks only, prediction summed over all pixels, summed, divided by num_masks.
    """
    b, k, h, w = logits.shape
    per_image = []
    for image in labels:
        classes = image.unique()
        classes = classes[classes != 255]
        per_image.append((classes, torch.stack([image == c for c in classes]) if len(classes) else None))
    num_masks = max(float(sum(len(c) for c, _ in per_image)), 1.0)
    onehot = torch.zeros(b, k, h * w, dtype=logits.dtype)
    for i, image in enumerate(labels):
        flat = image.reshape(-1)
        keep = flat != 255
        onehot[i, flat[keep], torch.arange(h * w)[keep]] = 1
    src = logits.reshape(b * k, h * w)
    tgt = onehot.reshape(b * k, h * w)
    ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    prob = src.sigmoid()
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    focal = ce * (1 - p_t) ** 2.0
    focal = (0.25 * tgt + 0.75 * (1 - tgt)) * focal
    loss_mask = focal.mean(1).sum() / num_masks
    dice_src = torch.cat([logits[i, c] for i, (c, _) in enumerate(per_image) if len(c)]).flatten(1).sigmoid()
    dice_tgt = torch.cat([m for _, m in per_image if m is not None]).flatten(1).to(logits.dtype)
    numerator = 2 * (dice_src * dice_tgt).sum(-1)
    denominator = dice_src.sum(-1) + dice_tgt.sum(-1)
    loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
    return float(mask_weight * loss_mask + dice_weight * loss_dice)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zegclip_nel_equals_zegclips_released_criterion(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    b, k, h, w = 3, 6, 8, 10
    logits = torch.randn(b, k, h, w, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, k, (b, h, w), generator=generator)
    labels[torch.rand(b, h, w, generator=generator) < 0.3] = 255
    labels[1][labels[1] == 2] = 0  # a class absent from one image
    labels[2] = 255  # an image with no label at all counts no mask
    cfg = MethodConfig(nel_norm="zegclip", focal_weight=100.0)  # ZegCLIP's VOC/COCO zero-shot mask_weight
    got = nel_loss(
        logits,
        labels,
        None,
        cfg.focal_alpha,
        cfg.focal_gamma,
        cfg.focal_weight,
        cfg.dice_weight,
        norm=cfg.nel_norm,
    )
    assert float(got) == pytest.approx(_zegclip_reference(logits, labels, 100.0, 1.0), abs=1e-6)


def test_zegclip_nel_ignores_only_padding_channels() -> None:
    logits, labels, valid = _nel_example()
    changed = logits.clone()
    changed[0, 3] = -30.0  # the invalid channel of image 0 never counts
    assert float(nel_loss(changed, labels, valid)) == pytest.approx(float(nel_loss(logits, labels, valid)))
    pushed = logits.clone()
    pushed[labels[:, None].expand_as(logits) == 255] = 50.0  # an ignored pixel is every class's negative
    assert float(nel_loss(pushed, labels, valid)) > float(nel_loss(logits, labels, valid)) + 1


def test_nel_rejects_an_unknown_normalisation() -> None:
    logits, labels, _ = _nel_example()
    with pytest.raises(ValueError, match=re.escape("method.nel_norm='mean' is not one of zegclip, entries")):
        nel_loss(logits, labels, norm="mean")


def test_majority_labels_take_each_blocks_most_frequent_id() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 12), generator=generator)
    labels[0, :4, :4] = 255  # a block of ignore stays ignore
    got = majority_labels(labels, (2, 3))
    for b, i, j in itertools.product(range(2), range(2), range(3)):
        block = labels[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(-1).tolist()
        counts = {v: block.count(v) for v in set(block)}
        best = max(counts.values())
        assert int(got[b, i, j]) == min(v for v, c in counts.items() if c == best)
    assert int(got[0, 0, 0]) == 255
    # Not a multiple of the logits' size: the cell centres are sampled (nearest-exact).
    odd = torch.arange(7 * 7).view(1, 7, 7)
    assert torch.equal(majority_labels(odd, (3, 3)), downsample_labels(odd, (3, 3)))


# --- CE and prototype BCE ---------------------------------------------------------------------------------------


def test_ce_matches_torch_cross_entropy_with_ignore() -> None:
    logits, labels, _ = _nel_example()
    assert float(ce_loss(logits, labels)) == pytest.approx(
        float(F.cross_entropy(logits, labels, ignore_index=255))
    )
    all_ignored = torch.full_like(labels, 255)
    assert float(ce_loss(logits, all_ignored)) == 0.0


def test_prototype_bce_matches_bce_with_logits_on_hand_built_target() -> None:
    protos, text = torch.randn(4, 8), torch.randn(3, 8)
    classes = torch.tensor([2, 0, 0, 1])
    scale = 1 / 0.07
    cos = F.normalize(protos, dim=-1) @ F.normalize(text, dim=-1).T
    target = torch.tensor([[0.0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0]])
    expected = F.binary_cross_entropy_with_logits(scale * cos, target)
    assert float(prototype_bce_loss(protos, classes, text, scale)) == pytest.approx(float(expected), rel=1e-5)
    valid = torch.tensor([True, False, True, False])
    subset = F.binary_cross_entropy_with_logits(scale * cos[valid], target[valid])
    got = prototype_bce_loss(protos, classes, text, scale, valid=valid)
    assert float(got) == pytest.approx(float(subset), rel=1e-5)
    assert (
        float(prototype_bce_loss(protos, classes, text, scale, valid=torch.zeros(4, dtype=torch.bool))) == 0.0
    )


def test_restrict_targets_ignores_ids_without_a_valid_channel() -> None:
    labels = torch.tensor([[[0, 3, 4, 255, 9]], [[1, 3, 4, 2, 255]]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, True, False, True]])
    want = torch.tensor([[[0, 3, 255, 255, 255]], [[1, 255, 4, 2, 255]]])
    assert torch.equal(restrict_targets(labels, valid), want)


# --- compute_losses ---------------------------------------------------------------------------------------------


def _step_inputs(pseudo: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    labels = torch.full((2, 16, 16), 255, dtype=torch.long)
    labels[0, :6, :8], labels[0, :6, 8:], labels[0, 6:10] = 0, 1, 3  # seen 0, 1; pseudo 3
    labels[0, 10:14] = 4  # pseudo 4
    labels[1, :8] = 2
    labels[1, 8:12, :8] = 3
    if not pseudo:
        labels[labels >= NUM_SEEN] = 255
    return {
        "R": torch.randn(2, C, 4, 4, generator=g).requires_grad_(),
        "labels": labels,
        "text_seen": F.normalize(torch.randn(NUM_SEEN, C, generator=g), dim=-1),
        "teacher_cls": F.normalize(torch.randn(2, C, generator=g), dim=-1),
        "teacher_dense": F.normalize(torch.randn(2, C, 4, 4, generator=g), dim=1),
    }


SWITCHES = ("glm", "synthesizer", "nel", "ce", "pseudo_labels")


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(SWITCHES))))
def test_compute_losses_returns_enabled_terms_and_backpropagates(flags: tuple[bool, ...]) -> None:
    on = dict(zip(SWITCHES, flags))
    cfg = MethodConfig(**on, bank=True, w_distill=0.0, bank_size=4, synth_layers=1, synth_heads=2)
    inputs = _step_inputs(on["pseudo_labels"])
    glm = GLM(cfg, C)
    glm.update_bank(F.normalize(torch.randn(3, C), dim=-1))
    synth = Synthesizer(C, 1, 2)
    if not (on["glm"] or on["synthesizer"] or on["nel"] or on["ce"]):
        with pytest.raises(ValueError, match="switched off"):
            compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg, glm=glm, synthesizer=synth)
        return
    losses = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg, glm=glm, synthesizer=synth)
    expected = {"glm": on["glm"], "bce": on["synthesizer"], "nel": on["nel"], "ce": on["ce"]}
    assert set(losses) == {k for k, v in expected.items() if v} | {"loss"}
    terms = [v for k, v in losses.items() if k != "loss"]
    assert torch.allclose(losses["loss"], torch.stack(terms).sum())
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    losses["loss"].backward()
    R = inputs["R"]
    if on["glm"] or on["nel"] or on["ce"]:
        assert R.grad is not None and torch.isfinite(R.grad).all() and R.grad.abs().sum() > 0
    else:  # L_bce alone trains the synthesizer: its prototypes come from the teacher, its context is detached
        assert R.grad is None or not R.grad.any()
    if on["synthesizer"]:
        grads = [p.grad for p in synth.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def _optimise_prototypes_alone(
    num_classes: int, scale: float, bias: float, mode: str = "bce"
) -> torch.Tensor:
    """Free prototypes trained by L_bce only (Adam, 300 steps); returns cos(P, own text) per class."""
    g = torch.Generator().manual_seed(num_classes)
    text = F.normalize(torch.randn(num_classes, 512, generator=g), dim=-1)
    protos = torch.nn.Parameter(torch.randn(num_classes, 512, generator=g))
    optimizer = torch.optim.Adam([protos], lr=0.05)
    classes = torch.arange(num_classes)
    for _ in range(300):
        loss = prototype_bce_loss(protos, classes, text, scale, None, bias, mode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (F.normalize(protos.detach(), dim=-1) * text).sum(dim=-1)


@pytest.mark.parametrize("num_classes", [15, 156])
def test_prototype_bce_default_optimum_is_the_own_text(num_classes: int) -> None:
    cfg = MethodConfig()
    cos = _optimise_prototypes_alone(num_classes, cfg.bce_scale, cfg.bce_bias)
    assert cos.min() > 0.9
    # The old setting (1/τ, bias 0) ties a prototype to its own text only weakly: the bug this default fixes.
    old = _optimise_prototypes_alone(num_classes, 1 / cfg.tau, 0.0)
    assert old.mean() < 0.35


def test_prototype_softmax_mode_is_cross_entropy_over_the_seen_texts() -> None:
    g = torch.Generator().manual_seed(3)
    protos, text = torch.randn(4, 8, generator=g), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    classes, valid = torch.tensor([0, 4, 2, 1]), torch.tensor([True, True, False, True])
    got = prototype_bce_loss(protos, classes, text, 7.0, valid, 3.0, mode="softmax")
    logits = 7.0 * F.normalize(protos, dim=-1) @ text.T
    expected = F.cross_entropy(logits[valid], classes[valid])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="softmax"):
        prototype_bce_loss(protos, classes, text, mode="siglip")


@pytest.mark.parametrize("resolution", ["full", "logits"])
def test_compute_losses_ce_only_is_the_plain_text_classifier_student(resolution: str) -> None:
    cfg = MethodConfig(
        glm=False,
        synthesizer=False,
        nel=False,
        ce=True,
        pseudo_labels=False,
        w_distill=0.0,
        w_ce=2.0,
        loss_resolution=resolution,
    )
    inputs = _step_inputs(pseudo=False)
    losses = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg)
    logits = cfg.alpha * torch.einsum(
        "bchw,kc->bkhw", F.normalize(inputs["R"], dim=1), inputs["text_seen"]
    )  # (B, S_n, h, w)
    if resolution == "full":
        logits, labels = F.interpolate(logits, (16, 16), mode="bilinear"), inputs["labels"]
    else:  # the labels come down to the logits by 4x4 block majority
        blocks = inputs["labels"].unfold(1, 4, 4).unfold(2, 4, 4).reshape(*logits.shape[:1], 4, 4, 16)
        labels = blocks.mode(dim=-1).values
    expected = 2.0 * F.cross_entropy(logits, labels, ignore_index=255)
    assert set(losses) == {"ce", "loss"}
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_losses_at_the_logits_stride_never_builds_full_size_maps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A label map 4x the logits' size: at "logits" the NEL/CE maps are (B, K, h, w), so a step's largest float
    # tensor is the logits' size, not 16x it (benchmarks/bench_losses.py measures the memory).
    cfg = MethodConfig(glm=False, synthesizer=False, nel=True, ce=True, pseudo_labels=True)
    inputs = _step_inputs(pseudo=True)
    shapes: list[tuple[int, ...]] = []
    original = F.binary_cross_entropy_with_logits

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", spy)  # torchvision's focal loss calls it
    compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg)
    assert shapes and all(shape[-2:] == tuple(inputs["R"].shape[-2:]) for shape in shapes)


def test_compute_losses_teacher_fallback_uses_teacher_region_means() -> None:
    cfg = MethodConfig(
        glm=False, synthesizer=False, nel=False, ce=True, pseudo_labels=True, loss_resolution="full"
    )
    inputs = _step_inputs(pseudo=True)
    got = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg)["ce"]
    protos, valid = teacher_pseudo_prototypes(inputs["teacher_dense"], inputs["labels"], NUM_SEEN, 2)
    logits = build_logits(inputs["R"], inputs["text_seen"], protos, valid, cfg.alpha)
    expected = F.cross_entropy(upsample_logits(logits, (16, 16)), inputs["labels"], ignore_index=255)
    assert valid.tolist() == [[True, True], [True, False]]  # image 1 has one pseudo region: slot 4 is padding
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_losses_max_pseudo_bound_gives_the_same_losses() -> None:
    cfg = MethodConfig(bank=False, synth_layers=1, synth_heads=2)
    inputs = _step_inputs(pseudo=True)
    synth = Synthesizer(C, 1, 2)
    inferred = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg, glm=GLM(cfg, C), synthesizer=synth)
    bounded = compute_losses(
        **inputs, num_seen=NUM_SEEN, cfg=cfg, glm=GLM(cfg, C), synthesizer=synth, max_pseudo=2
    )
    for key in inferred:
        assert bounded[key].item() == pytest.approx(inferred[key].item(), rel=1e-5)


def test_compute_losses_pseudo_region_lost_at_feature_size_is_ignored() -> None:
    # Pseudo id 3 covers one label pixel that the stride-4 downsampling does not sample: no prototype exists for
    # it, so its pixel must be ignored (same losses as labelling it 255), not become a target of a NEG_LOGIT channel.
    cfg = MethodConfig(glm=False, synthesizer=True, nel=True, ce=True, synth_layers=1, synth_heads=2)
    synth = Synthesizer(C, 1, 2)
    inputs = _step_inputs(pseudo=False)
    inputs["labels"][0, 0, 0] = 255
    reference = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg, synthesizer=synth)
    inputs["labels"][0, 0, 0] = 3
    losses = compute_losses(**inputs, num_seen=NUM_SEEN, cfg=cfg, synthesizer=synth)
    for key in reference:
        assert losses[key].item() == pytest.approx(reference[key].item(), rel=1e-5)


def test_compute_losses_requires_the_modules_it_is_told_to_use() -> None:
    inputs = _step_inputs(pseudo=False)
    with pytest.raises(ValueError, match="no GLM"):
        compute_losses(**inputs, num_seen=NUM_SEEN, cfg=MethodConfig(synthesizer=False))
    with pytest.raises(ValueError, match="no Synthesizer"):
        compute_losses(**inputs, num_seen=NUM_SEEN, cfg=MethodConfig(glm=False, synthesizer=True))
