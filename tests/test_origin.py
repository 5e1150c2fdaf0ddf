"""Origin-labelled synthesis on toy teachers: slots, the shift, the generator and student terms."""

from __future__ import annotations

import pytest
import torch

from dfka.amalgamation.origin import (
    OriginSlots,
    cross_teacher_mix,
    diversity_hinge,
    fit_routing_bias,
    own_label_loss,
    routed_to_origin,
    shift,
    student_origin_terms,
    union_trust,
)
from dfka.amalgamation.regroup import FinetuneTrainer, TargetNet
from dfka.amalgamation.run import (
    bank_union_trust,
    build_student,
    sample_bank,
    teacher_set_from_bundles,
    train_gan,
)
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.amalgamation.union import UnionRule
from tests.test_amalgamation import tiny_config
from tests.toys import toy_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trio():
    """Three teachers with uneven label counts (3, 2, 3)."""
    return [
        toy_teacher([0, 1, 2], name="a", seed=1),
        toy_teacher([3, 4], name="b", seed=2),
        toy_teacher([5, 6, 7], name="c", seed=3),
    ]


def test_slots_cover_every_owned_label_and_decode_back(trio) -> None:
    teachers = teacher_set_from_bundles(trio, None)
    slots = OriginSlots.of(teachers)
    assert slots is not None and slots.size == 8 and slots.teachers == ("a", "b", "c")
    assert sorted(slots.pos_of.tolist()) == list(range(8))
    drawn = slots.draw(301, torch.Generator().manual_seed(0))
    counts = torch.bincount(slots.teacher_of[drawn], minlength=3)
    assert counts.max() - counts.min() <= 1  # equal teacher shares, whatever their label counts
    assert set(drawn.tolist()) == set(range(8))
    z = slots.encode(torch.randn(301, 5), drawn)
    assert z.shape == (301, 13) and torch.equal(slots.decode(z), drawn)
    w = slots.teacher_weights(drawn, z)
    assert torch.allclose(sum(w.values()), torch.full((301,), 3.0))


def test_multilabel_teachers_have_no_origin() -> None:
    ml = toy_teacher([0, 1, 2], name="m", seed=1, task="multilabel")
    teachers = teacher_set_from_bundles([ml, toy_teacher([3, 4], name="b", seed=2)], None)
    assert OriginSlots.of(teachers) is None
    gan = AmalgamatingGAN(teachers, UnionRule(teachers), tiny_config().gan)
    assert gan.origin is None and gan.generator.latent_dim == tiny_config().gan.latent_dim


def test_shift_moves_pixels_and_passes_gradients() -> None:
    image = torch.zeros(64, 1, 8, 8)
    image[:, :, 4, 4] = 1.0
    image.requires_grad_(True)
    out = shift(image, 2, torch.Generator().manual_seed(0))
    where = out.detach().flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6
    assert out.detach().sum(dim=(1, 2, 3)).eq(1).all()  # nothing lost at ±2 from the centre
    out.sum().backward()
    assert image.grad is not None and image.grad[:, :, 4, 4].eq(1).all()  # the pixel always lands
    assert torch.equal(shift(image, 0, torch.Generator()), image)


def test_generator_loss_judges_each_sample_by_its_own_teacher_only(trio) -> None:
    teachers = teacher_set_from_bundles(trio, None)
    slots = OriginSlots.of(teachers)
    chosen = torch.tensor([0, 3, 5])  # a:label 0, b:label 3, c:label 5
    logits = {n: torch.zeros(3, len(teachers.infos[n].sel)) for n in teachers.names}
    logits["a"][0, 0] = 20.0  # a is sure of its own sample
    logits["b"][1, 0] = 20.0
    logits["c"][2, 0] = 20.0
    logits["a"][1:, 1] = 50.0  # a's opinion on the others' samples must not count
    assert float(own_label_loss(teachers, slots, logits, chosen)) < 1e-6
    logits["c"][2, 1] = 40.0
    assert float(own_label_loss(teachers, slots, logits, chosen)) > 5


def test_diversity_hinge_only_pairs_samples_of_one_slot() -> None:
    same = torch.full((4, 1, 4, 4), 0.5)
    slots = torch.tensor([0, 1, 0, 1])
    assert float(diversity_hinge(same, slots, 0.1)) == pytest.approx(0.1)
    apart = same.clone()
    apart[2] = 0.0
    apart[3] = 1.0
    assert float(diversity_hinge(apart, slots, 0.1)) == 0.0
    assert float(diversity_hinge(same, torch.tensor([0, 1, 2, 3]), 0.1)) == 0.0


def test_student_terms_reward_the_origin_and_union_trust_reads_routing(trio) -> None:
    teachers = teacher_set_from_bundles(trio, None)
    slots = OriginSlots.of(teachers)
    chosen = torch.tensor([0, 3, 5])  # one sample per teacher: rolling the scores misroutes each
    logits = {n: torch.zeros(3, len(teachers.infos[n].sel)) for n in teachers.names}
    right = torch.full((3, 8), -10.0)
    right[torch.arange(3), slots.pos_of[chosen]] = 10.0
    good = student_origin_terms(right, teachers, slots, logits, chosen, 4.0)
    wrong = student_origin_terms(right.roll(1, 0), teachers, slots, logits, chosen, 4.0)
    assert good["ce"] < 1e-3 and good["which"] < 1e-3
    assert wrong["ce"] > 5 and wrong["which"] > 5
    assert union_trust(right, slots, chosen) == 1.0
    assert union_trust(right.roll(1, 0), slots, chosen) == 0.0


def test_routed_only_drops_the_misrouted_samples_from_ce_and_which(trio) -> None:
    teachers = teacher_set_from_bundles(trio, None)
    slots = OriginSlots.of(teachers)
    chosen = torch.tensor([0, 3, 5])
    logits = {n: torch.zeros(3, len(teachers.infos[n].sel)) for n in teachers.names}
    right = torch.full((3, 8), -10.0)
    right[torch.arange(3), slots.pos_of[chosen]] = 10.0
    student = right.clone()
    student[2] = right[0]  # the student misroutes the third sample (c's) to a
    union = right.clone()
    union[1] = right[0]  # the union sends b's sample to a: it is ambiguous, left out
    keep = routed_to_origin(union, slots, chosen)
    assert keep.tolist() == [True, False, True]
    masked = student_origin_terms(student, teachers, slots, logits, chosen, 4.0, keep=keep)
    subset = {n: v[[0, 2]] for n, v in logits.items()}
    only = student_origin_terms(student[[0, 2]], teachers, slots, subset, chosen[[0, 2]], 4.0)
    assert torch.allclose(masked["ce"], only["ce"]) and torch.allclose(masked["which"], only["which"])
    nothing = student_origin_terms(
        student, teachers, slots, logits, chosen, 4.0, keep=torch.zeros(3, dtype=torch.bool)
    )
    assert float(nothing["ce"]) == 0.0 and float(nothing["which"]) == 0.0


def test_cross_teacher_mix_blends_samples_of_different_teachers(trio) -> None:
    teachers = teacher_set_from_bundles(trio, None)
    slots_info = OriginSlots.of(teachers)
    rng = torch.Generator().manual_seed(0)
    slots = slots_info.draw(12, rng)
    # each sample is a constant image of its teacher's index: a mix of two teachers lies strictly between
    t = slots_info.teacher_of[slots].float()
    image = t.view(12, 1, 1, 1).expand(12, 1, 4, 4).clone()
    mixed = cross_teacher_mix(image, slots_info, slots, 400, rng)
    assert mixed.shape == (400, 1, 4, 4)
    assert torch.allclose(mixed, mixed[:, :, :1, :1].expand_as(mixed))  # a pixel-wise blend
    values = mixed[:, 0, 0, 0]
    assert float(values.min()) >= 0.0 and float(values.max()) <= 2.0
    same_teacher = (values - values.round()).abs() < 1e-6
    assert float(same_teacher.float().mean()) < 0.02
    assert len(torch.unique(values.round(decimals=3))) > 200  # λ varies per mix


@pytest.mark.parametrize(("mode", "mix"), [("origin", 0.0), ("all", 0.0), ("all", 0.5)])
def test_finetune_with_routed_only_trains_every_parameter(trio, mode, mix) -> None:
    cfg = tiny_config()
    cfg.regroup.origin.routed_only = mode
    cfg.regroup.origin.mix = mix
    teachers = teacher_set_from_bundles(trio, None)
    union = UnionRule(teachers)
    gan, trajectory, _ = train_gan(teachers, union, cfg, device=CPU, progress=False)
    bank, _ = sample_bank(gan, cfg, trajectory, device=CPU, progress=False)
    student = build_student(cfg.student, teachers)
    positions = {n: list(teachers.infos[n].pos) for n in teachers.names}
    net = TargetNet(student.spec, positions, teachers.target_labels, teachers.label_tasks, [0.0], [1.0])
    batches = bank.batches(32, torch.Generator().manual_seed(0), CPU)
    trainer = FinetuneTrainer(net, union, cfg.regroup, batches, CPU, origin=gan.origin, teachers=teachers)
    out = trainer.step(0, 10)
    assert torch.isfinite(out["loss"])
    assert ("mix" in out) == (mix > 0)
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_conditional_stage1_banks_origin_and_finetune_trains_every_parameter(trio) -> None:
    cfg = tiny_config()
    teachers = teacher_set_from_bundles(trio, None)
    union = UnionRule(teachers)
    gan, trajectory, report = train_gan(teachers, union, cfg, device=CPU, progress=False)
    assert gan.origin is not None
    assert any(k.endswith("div") for k in report.extra) and not any(k.endswith(".ie") for k in report.extra)
    bank, _ = sample_bank(gan, cfg, trajectory, device=CPU, progress=False)
    slots = gan.origin.decode(bank.tensors["z"].float())
    counts = torch.bincount(gan.origin.teacher_of[slots], minlength=3)
    assert counts.min() > 0.25 * len(bank)  # balanced by construction, trajectory and fresh alike
    trust = bank_union_trust(union, bank, gan.origin)
    assert 0.0 <= trust <= 1.0

    student = build_student(cfg.student, teachers)
    positions = {n: list(teachers.infos[n].pos) for n in teachers.names}
    net = TargetNet(student.spec, positions, teachers.target_labels, teachers.label_tasks, [0.0], [1.0])
    batches = bank.batches(16, torch.Generator().manual_seed(0), CPU)
    trainer = FinetuneTrainer(
        net, union, cfg.regroup, batches, CPU, origin=gan.origin, teachers=teachers, union_weight=0.5
    )
    out = trainer.step(0, 10)
    assert {"loss", "ce", "own_kd", "which", "union"} <= set(out)
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_routing_bias_corrects_a_loud_teacher_and_leaves_a_fair_union_alone(trio) -> None:
    teachers = teacher_set_from_bundles(trio[:2], None)
    slots = OriginSlots.of(teachers)
    chosen = slots.draw(400, torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    fair = torch.randn(400, 5, generator=rng)
    fair[torch.arange(400), slots.pos_of[chosen]] += 4.0  # the origin's label stands out
    fair_bias = fit_routing_bias(fair, slots, chosen)
    assert fair_bias.abs().max() < 0.5
    loud = fair.clone()
    loud[:, list(slots.groups[1])] += 6.0  # teacher b claims everything
    before = union_trust(loud, slots, chosen)
    bias = fit_routing_bias(loud, slots, chosen)
    calibrated = loud.clone()
    for m, g in enumerate(slots.groups):
        calibrated[:, list(g)] += bias[m]
    assert bias[1] - bias[0] < -4 and abs(float(bias.sum())) < 1e-5
    assert before < 0.6 and union_trust(calibrated, slots, chosen) > 0.9
