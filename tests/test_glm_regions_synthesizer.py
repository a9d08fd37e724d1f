"""GLM, CLS bank, region pooling and synthesizer against loop references and hand computations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from clipzss.config import MethodConfig
from clipzss.method.glm import GLM, CLSBank
from clipzss.method.losses import info_nce
from clipzss.method.regions import (
    count_pseudo_slots,
    downsample_labels,
    region_means,
    teacher_pseudo_prototypes,
)
from clipzss.method.synthesizer import Synthesizer
from conftest import run_gloo_ranks

# --- CLS bank ---------------------------------------------------------------------------------------------------


def test_bank_wraps_around_in_fifo_order() -> None:
    bank = CLSBank(5, 2)
    a = torch.tensor([[1.0, 1], [2, 2], [3, 3]])
    b = torch.tensor([[4.0, 4], [5, 5], [6, 6]])
    assert bank.negatives().shape == (0, 2)
    bank.enqueue(a)
    assert torch.equal(bank.negatives(), a)  # only the filled part
    bank.enqueue(b)
    # b[0], b[1] fill slots 3, 4; b[2] overwrites the oldest entry a[0] in slot 0.
    assert torch.equal(bank.negatives(), torch.stack([b[2], a[1], a[2], b[0], b[1]]))
    assert int(bank.ptr) == 1 and int(bank.filled) == 5


def test_bank_keeps_the_newest_when_a_batch_exceeds_its_size() -> None:
    bank = CLSBank(3, 1)
    bank.enqueue(torch.arange(2.0)[:, None])
    bank.enqueue(torch.arange(10.0, 15.0)[:, None])
    assert bank.negatives().flatten().tolist() == [12.0, 13.0, 14.0]
    bank.enqueue(torch.tensor([[20.0]]))  # the oldest (12) goes first
    assert bank.negatives().flatten().tolist() == [20.0, 13.0, 14.0]


def test_bank_state_dict_round_trip_restores_pointer_and_fill() -> None:
    bank = CLSBank(4, 2)
    bank.enqueue(torch.ones(3, 2))
    restored = CLSBank(4, 2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.negatives(), bank.negatives())
    bank.enqueue(torch.full((2, 2), 7.0))
    restored.enqueue(torch.full((2, 2), 7.0))
    assert torch.equal(restored.queue, bank.queue) and torch.equal(restored.negatives(), bank.negatives())


def test_bank_gathers_every_rank_before_enqueueing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake 2-rank world: rank 1's batch is all 9s; this rank's (rank 0) tokens come first, as all_gather orders."""
    import clipzss.method.glm as glm

    def fake_all_gather(parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        parts[0].copy_(tensor)
        parts[1].fill_(9.0)

    monkeypatch.setattr(glm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(glm.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(glm.dist, "all_gather", fake_all_gather)
    bank = CLSBank(5, 2)
    bank.enqueue(torch.ones(2, 2))
    bank.enqueue(torch.full((2, 2), 3.0))
    # First call: [1, 1, 9, 9] fill slots 0-3. Second: [3, 3, 9, 9] go to slot 4, then wrap to slots 0-2.
    want = torch.tensor([[3.0, 3], [9, 9], [9, 9], [9, 9], [3, 3]])
    assert torch.equal(bank.negatives(), want)


def _bank_worker(rank: int, port: int, queue: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bank = CLSBank(6, 2)
    bank.enqueue(torch.full((2, 2), float(rank + 1)))
    queue.put((rank, bank.negatives().tolist()))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~10 s on 2 cores
def test_bank_all_gathers_across_real_gloo_ranks() -> None:
    banks = run_gloo_ranks(_bank_worker)
    want = [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]  # rank order
    assert banks[0] == want and banks[1] == want


# --- GLM --------------------------------------------------------------------------------------------------------


def test_glm_attention_sums_to_one_and_has_no_parameters() -> None:
    glm = GLM(MethodConfig(), 8)
    R, S = torch.randn(3, 8, 4, 5), F.normalize(torch.randn(3, 8), dim=-1)
    pred, attn = glm.pool(R, S)
    assert attn.shape == (3, 4, 5)
    assert torch.allclose(attn.sum(dim=(1, 2)), torch.ones(3))
    assert torch.allclose(pred.norm(dim=-1), torch.ones(3))
    assert list(glm.parameters()) == []


def test_glm_pooling_never_attends_to_crop_padding() -> None:
    glm = GLM(MethodConfig(), 8)
    R, S = torch.randn(2, 8, 4, 5), F.normalize(torch.randn(2, 8), dim=-1)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[0, :, 3:] = False
    pred, attn = glm.pool(R, S, valid)
    assert (attn[~valid] == 0).all() and torch.allclose(attn.sum(dim=(1, 2)), torch.ones(2))
    changed = R.clone()
    changed[0, :, :, 3:] = torch.randn(8, 4, 2) * 100  # whatever the padding holds
    again, _ = glm.pool(changed, S, valid)
    torch.testing.assert_close(pred, again)
    reference, _ = glm.pool(R[:1, :, :, :3], S[:1])  # the same as pooling the image part alone
    torch.testing.assert_close(pred[:1], reference)


def test_glm_loss_hand_computed() -> None:
    # B=2, C=2, two positions per image; no bank.
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    R = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 3.0]]]])  # (2, 2, 1, 2)
    tau = 0.5
    preds = []
    for b in range(2):
        positions = [(float(R[b, 0, 0, pos]), float(R[b, 1, 0, pos])) for pos in range(2)]
        scores = [(S[b, 0] * x + S[b, 1] * y) / math.sqrt(2) for x, y in positions]
        weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        px = sum(w * x for w, (x, _) in zip(weights, positions))
        py = sum(w * y for w, (_, y) in zip(weights, positions))
        norm = math.hypot(px, py)
        preds.append((px / norm, py / norm))
    loss = 0.0
    for i in range(2):
        sims = [(float(S[j, 0]) * preds[i][0] + float(S[j, 1]) * preds[i][1]) / tau for j in range(2)]
        loss += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    glm = GLM(MethodConfig(tau=tau, bank=False), 2)
    assert float(glm(R, S)) == pytest.approx(loss / 2, rel=1e-6)


def test_glm_gradient_reaches_r_only_and_bank_adds_negatives() -> None:
    cfg = MethodConfig(bank=True, bank_size=4)
    glm = GLM(cfg, 8)
    R = torch.randn(2, 8, 3, 3, requires_grad=True)
    S = F.normalize(torch.randn(2, 8), dim=-1).requires_grad_()
    bank_tokens = F.normalize(torch.randn(3, 8), dim=-1)
    glm.update_bank(bank_tokens)
    loss = glm(R, S)
    loss.backward()
    assert R.grad is not None and R.grad.abs().sum() > 0
    assert S.grad is None
    pred, _ = glm.pool(R.detach(), S.detach())
    assert loss.item() == pytest.approx(info_nce(pred, S.detach(), bank_tokens, cfg.tau).item(), rel=1e-6)
    assert "bank.queue" in glm.state_dict()
    assert GLM(MethodConfig(bank=False), 8).bank is None


def test_glm_normalize_keys_pools_unit_features() -> None:
    R, S = torch.randn(2, 4, 2, 2) * 5, F.normalize(torch.randn(2, 4), dim=-1)
    plain = GLM(MethodConfig(bank=False), 4, normalize_keys=True).pool(R, S)
    unit = GLM(MethodConfig(bank=False), 4).pool(F.normalize(R, dim=1), S)
    assert torch.allclose(plain[0], unit[0]) and torch.allclose(plain[1], unit[1])


# --- region pooling ---------------------------------------------------------------------------------------------


def test_region_means_matches_loop_reference_and_passes_gradients() -> None:
    feats = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4, 4))
    labels[0, 0] = 255
    labels[1][labels[1] == 2] = 255  # id 2 absent in image 1
    means, valid = region_means(feats, labels, 5)
    for b in range(2):
        for k in range(5):
            mask = labels[b] == k
            assert bool(valid[b, k]) == bool(mask.any())
            want = feats[b][:, mask].mean(dim=1) if mask.any() else torch.zeros(3, dtype=torch.float64)
            assert torch.allclose(means[b, k], want)
    means[valid].sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert (feats.grad[0, :, 0] == 0).all()  # ignored pixels receive no gradient


def test_downsample_labels_samples_cell_centres() -> None:
    labels = torch.arange(64).view(1, 8, 8)
    assert downsample_labels(labels, (2, 2)).tolist() == [[[18, 22], [50, 54]]]  # pixels (2|6, 2|6)
    assert downsample_labels(labels, (8, 8)).equal(labels)


def test_teacher_pseudo_prototypes_are_normalised_teacher_means() -> None:
    dense = F.normalize(torch.randn(1, 4, 2, 2), dim=1).requires_grad_()
    labels = torch.tensor([[[3, 3], [5, 255]]])  # already at token resolution; seen 0..2, pseudo 3 and 5
    protos, valid = teacher_pseudo_prototypes(dense, labels, num_seen=3, num_pseudo=3)
    assert valid.tolist() == [[True, False, True]]
    assert torch.allclose(protos[0, 0], F.normalize(dense[0, :, 0].mean(dim=1), dim=0))
    assert torch.allclose(protos[0, 2], F.normalize(dense[0, :, 1, 0], dim=0))
    assert not protos.requires_grad


def test_count_pseudo_slots() -> None:
    labels = torch.tensor([[[0, 4, 255]], [[2, 6, 255]]])
    assert count_pseudo_slots(labels, 3) == 4
    assert count_pseudo_slots(torch.full((1, 2, 2), 255), 3) == 0


# --- synthesizer ------------------------------------------------------------------------------------------------


def _synth_inputs() -> dict:
    labels = torch.full((2, 8, 8), 255, dtype=torch.long)
    labels[0, :4] = 0
    labels[0, 4:, :4] = 1
    labels[0, 4:, 4:] = 3  # pseudo
    labels[1, :, :4] = 2  # image 1: one seen region, one pseudo region of id 4
    labels[1, :, 4:] = 4
    return {
        "R": torch.randn(2, 8, 4, 4, requires_grad=True),
        "labels": labels,
        "S": F.normalize(torch.randn(2, 8), dim=-1),
        "D": F.normalize(torch.randn(2, 8, 2, 2), dim=1),
    }


def _randomise_correction(synth: Synthesizer) -> Synthesizer:
    """The correction layer starts at zero (prototypes = teacher means); tests of the decoder need it non-zero."""
    with torch.no_grad():
        synth.proj.weight.normal_(0, 0.5)
        synth.proj.bias.normal_(0, 0.5)
    return synth


def test_synthesizer_regions_are_id_slots_normalised_and_trainable() -> None:
    synth = _randomise_correction(Synthesizer(8, num_layers=2, num_heads=2, learn_bce=True))
    inputs = _synth_inputs()
    regions = synth(inputs["R"], inputs["labels"], inputs["S"], inputs["D"], num_seen=3)
    assert regions.prototypes.shape == (2, 5, 8)
    assert regions.valid.tolist() == [[True, True, False, True, False], [False, False, True, False, True]]
    assert torch.allclose(regions.prototypes[regions.valid].norm(dim=-1), torch.ones(5))
    seen, seen_valid = regions.seen()
    assert seen_valid.tolist() == [[True, True, False], [False, False, True]]
    pseudo, pseudo_valid = regions.pseudo()
    assert seen.shape == (2, 3, 8) and pseudo.shape == (2, 2, 8)
    assert pseudo_valid.tolist() == [[True, False], [False, True]]
    loss = (regions.prototypes[regions.valid] * torch.randn(5, 8)).sum()
    (loss + regions.logit_scale + regions.logit_bias).backward()
    # The student's region means are context only (detached): L_bce trains the synthesizer, never R directly.
    assert inputs["R"].grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in synth.parameters())
    assert regions.logit_scale.item() == pytest.approx(10.0)
    assert regions.logit_bias.item() == pytest.approx(-10.0)


def test_synthesizer_prototypes_start_at_the_teacher_region_means() -> None:
    """Zero correction (the initial state): P_pseudo is exactly the no-synthesizer fallback, P_seen likewise."""
    synth = Synthesizer(8, num_layers=2, num_heads=2)
    inputs = _synth_inputs()
    regions = synth(inputs["R"], inputs["labels"], inputs["S"], inputs["D"], num_seen=3, num_pseudo=2)
    pseudo, pseudo_valid = regions.pseudo()
    fallback, fallback_valid = teacher_pseudo_prototypes(inputs["D"], inputs["labels"], 3, 2)
    assert torch.equal(pseudo_valid, fallback_valid)
    torch.testing.assert_close(pseudo[pseudo_valid], fallback[fallback_valid])
    small = F.interpolate(inputs["labels"][:, None].float(), size=(2, 2), mode="nearest-exact")[:, 0].long()
    for b, k in [(0, 0), (0, 1), (1, 2)]:  # seen slots: normalised mean teacher token over the class's tokens
        tokens = inputs["D"][b].flatten(1)[:, small[b].flatten() == k]
        torch.testing.assert_close(regions.seen()[0][b, k], F.normalize(tokens.mean(1), dim=0))
    corrected = _randomise_correction(synth)(inputs["R"], inputs["labels"], inputs["S"], inputs["D"], 3, 2)
    assert not torch.allclose(corrected.pseudo()[0], pseudo)


def test_synthesizer_ignores_teacher_tokens_of_crop_padding() -> None:
    synth = _randomise_correction(Synthesizer(8, num_layers=1, num_heads=2)).eval()
    inputs = _synth_inputs()
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :, 4:] = False  # the right half is padding
    labels = inputs["labels"].masked_fill(~valid, 255)
    first = synth(inputs["R"], labels, inputs["S"], inputs["D"], 3, 2, valid)
    D = inputs["D"].clone()
    D[:, :, :, 1] = F.normalize(torch.randn(2, 8, 2), dim=1)  # token column 1 lies on the padding
    second = synth(inputs["R"], labels, inputs["S"], D, 3, 2, valid)
    torch.testing.assert_close(first.prototypes[first.valid], second.prototypes[second.valid])
    unmasked = synth(inputs["R"], labels, inputs["S"], D, 3, 2)
    assert not torch.allclose(unmasked.prototypes[unmasked.valid], first.prototypes[first.valid])


def test_synthesizer_padding_slots_do_not_change_valid_outputs() -> None:
    synth = _randomise_correction(Synthesizer(8, num_layers=2, num_heads=2)).eval()
    queries, memory = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    valid = torch.tensor([[True, True, False, True], [False, True, False, False]])
    out = synth.decode(queries, valid, memory)
    changed = queries.clone()
    changed[~valid] = torch.randn(int((~valid).sum()), 8) * 10
    out2 = synth.decode(changed, valid, memory)
    assert torch.allclose(out[valid], out2[valid], atol=1e-6)
    assert not torch.allclose(out[~valid], out2[~valid])


def test_synthesizer_image_without_regions_keeps_gradients_finite() -> None:
    synth = _randomise_correction(Synthesizer(8, num_layers=1, num_heads=2))
    inputs = _synth_inputs()
    inputs["labels"][1] = 255
    regions = synth(inputs["R"], inputs["labels"], inputs["S"], inputs["D"], num_seen=3, num_pseudo=2)
    assert regions.valid[1].sum() == 0
    (regions.prototypes * regions.valid[..., None] * torch.randn(2, 5, 8)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in synth.parameters() if p.grad is not None)
    assert synth.proj.weight.grad is not None and synth.proj.weight.grad.abs().sum() > 0


def test_synthesizer_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Synthesizer(10, num_heads=3)
    synth = Synthesizer(8, 1, 2)
    with pytest.raises(ValueError, match="embed_dim=8"):
        synth(
            torch.randn(1, 4, 2, 2),
            torch.zeros(1, 8, 8, dtype=torch.long),
            torch.randn(1, 4),
            torch.randn(1, 4, 2, 2),
            1,
        )
