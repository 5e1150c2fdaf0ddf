"""Label-conditioned synthesis for multi-label teachers: the target coder, the generator's BCE toward
the target, and the fine-tune's terms, on toy multi-label teachers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfka.amalgamation.origin import LabelTargets, agrees_with_target, label_targets_of, target_bce
from dfka.amalgamation.regroup import FinetuneTrainer, TargetNet
from dfka.amalgamation.run import (
    bank_target_agreement,
    build_student,
    sample_bank,
    targets_of,
    teacher_set_from_bundles,
    train_gan,
)
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.amalgamation.union import UnionRule
from tests.test_amalgamation import tiny_config
from tests.toys import toy_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def multilabel_pair():
    """Two multi-label teachers with uneven label counts (3 and 5)."""
    return [
        toy_teacher([0, 1, 2], name="a", seed=1, task="multilabel"),
        toy_teacher([3, 4, 5, 6, 7], name="b", seed=2, task="multilabel"),
    ]


def conditional_config(**regroup):
    cfg = tiny_config(gan={"batch_size": 16, "budget": {"steps": 20}, "widths": 8, "conditional": "on"})
    for key, value in regroup.items():
        setattr(cfg.regroup.targets, key, value)
    return cfg


def test_targets_encode_decode_and_cover_every_label(multilabel_pair) -> None:
    teachers = teacher_set_from_bundles(multilabel_pair, None)
    coder = LabelTargets.of(teachers, (1, 3))
    assert coder is not None and coder.size == 8 and coder.groups == ((0, 1, 2), (3, 4, 5, 6, 7))
    t = coder.draw(2000, torch.Generator().manual_seed(0))
    k = t.sum(1)
    assert t.shape == (2000, 8) and set(k.unique().tolist()) == {1.0, 2.0, 3.0}
    assert set(t.unique().tolist()) == {0.0, 1.0}
    share = t.mean(0) / t.mean()  # every label about equally often, whatever its teacher
    assert float(share.min()) > 0.85 and float(share.max()) < 1.15
    z = coder.encode(torch.randn(2000, 5), t)
    assert z.shape == (2000, 13) and torch.equal(coder.decode(z), t)
    keys = coder.keys(t[:4].repeat(2, 1))
    assert torch.equal(keys[:4], keys[4:]) and len(set(keys.tolist())) == len(
        {tuple(r) for r in t[:4].tolist()}
    )
    # more positives than labels: clamped
    assert LabelTargets.of(teachers, (9, 12)).draw(5, torch.Generator()).sum(1).eq(8).all()


def test_only_all_multilabel_sets_get_targets_and_only_when_asked(multilabel_pair) -> None:
    ml = teacher_set_from_bundles(multilabel_pair, None)
    mixed = teacher_set_from_bundles([multilabel_pair[0], toy_teacher([3, 4], name="c", seed=3)], None)
    assert LabelTargets.of(mixed, (1, 3)) is None
    assert label_targets_of(ml, "on", (1, 3)) is not None
    assert label_targets_of(ml, "off", (1, 3)) is None
    off = AmalgamatingGAN(ml, UnionRule(ml), tiny_config().gan)  # default: today's DAFL-style stage 1
    assert off.targets is None and off.generator.latent_dim == tiny_config().gan.latent_dim
    paper = tiny_config(preset="paper", gan={"conditional": "on"})
    assert paper.gan.conditional == "off"


def test_generator_loss_is_every_teachers_bce_toward_its_part_of_the_target(multilabel_pair) -> None:
    teachers = teacher_set_from_bundles(multilabel_pair, None)
    coder = LabelTargets.of(teachers, (1, 3))
    t = torch.zeros(2, 8)
    t[0, [0, 4]] = 1.0  # a sample with one label of each teacher
    t[1, 7] = 1.0  # a sample with one of b's labels only: a still judges it (all negatives)
    right = {"a": (t[:, :3] * 2 - 1) * 30, "b": (t[:, 3:] * 2 - 1) * 30}
    assert float(target_bce(teachers, coder, right, t)) < 1e-6
    wrong = {"a": right["a"].clone(), "b": right["b"]}
    wrong["a"][1, 0] = 30.0  # a claims its label 0 on the second sample
    assert float(target_bce(teachers, coder, wrong, t)) == pytest.approx(30.0 / 2, rel=1e-3)
    logits = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    expected = (
        F.binary_cross_entropy_with_logits(logits["a"], t[:, :3], reduction="sum")
        + F.binary_cross_entropy_with_logits(logits["b"], t[:, 3:], reduction="sum")
    ) / 2
    assert torch.allclose(target_bce(teachers, coder, logits, t), expected)


def test_conditional_gan_loss_and_gradients(multilabel_pair) -> None:
    cfg = conditional_config()
    teachers = teacher_set_from_bundles(multilabel_pair, None)
    gan = AmalgamatingGAN(teachers, UnionRule(teachers), cfg.gan)
    assert gan.targets is not None and gan.origin is None
    assert gan.generator.groups[0].body[0].in_features == cfg.gan.latent_dim + 8
    rng = torch.Generator().manual_seed(0)
    z = gan.sample_latent(16, rng, CPU)
    parts, batch = gan.losses(z, rng)
    assert {"oh", "div", "bn"} <= set(parts) and "ie" not in parts and "dis" not in parts
    expected = target_bce(teachers, gan.targets, batch.logits, gan.targets.decode(z))
    assert torch.allclose(parts["oh"], expected)
    gan.weighted(parts).backward()
    missing = [n for n, p in gan.generator.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("agree_only", [False, True])
def test_conditional_run_banks_targets_and_finetune_trains_every_parameter(
    multilabel_pair, agree_only
) -> None:
    cfg = conditional_config(agree_only=agree_only)
    teachers = teacher_set_from_bundles(multilabel_pair, None)
    union = UnionRule(teachers)
    gan, trajectory, report = train_gan(teachers, union, cfg, device=CPU, progress=False)
    assert any(k.endswith("div") for k in report.extra) and not any(k.endswith(".ie") for k in report.extra)
    bank, _ = sample_bank(gan, cfg, trajectory, device=CPU, progress=False)
    coder = targets_of(teachers, cfg, bank)
    assert coder is not None
    t = coder.decode(bank.tensors["z"].float())
    assert t.sum(1).min() >= 1 and t.sum(1).max() <= 3  # trajectory and fresh samples alike
    assert 0.0 <= bank_target_agreement(union, bank, coder) <= 1.0

    student = build_student(cfg.student, teachers)
    positions = {n: list(teachers.infos[n].pos) for n in teachers.names}
    net = TargetNet(student.spec, positions, teachers.target_labels, teachers.label_tasks, [0.0], [1.0])
    batches = bank.batches(32, torch.Generator().manual_seed(0), CPU)
    trainer = FinetuneTrainer(net, union, cfg.regroup, batches, CPU, teachers=teachers, targets=coder)
    out = trainer.step(0, 10)
    assert {"loss", "target", "union"} <= set(out) and torch.isfinite(out["loss"])
    assert ("kept" in out) == agree_only
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_agreement_filter_is_exact_match() -> None:
    t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    scores = torch.tensor([[3.0, -2.0, 1.0], [0.5, 2.0, -1.0]])
    assert agrees_with_target(scores, t).tolist() == [True, False]


def test_bank_without_targets_is_read_as_plain(multilabel_pair) -> None:
    cfg = tiny_config()
    teachers = teacher_set_from_bundles(multilabel_pair, None)
    union = UnionRule(teachers)
    gan, trajectory, _ = train_gan(teachers, union, cfg, device=CPU, progress=False)
    bank, _ = sample_bank(gan, cfg, trajectory, device=CPU, progress=False)
    assert targets_of(teachers, cfg, bank) is None
    cfg.gan.conditional = "on"  # a plain bank read with conditioning on: its z has no target
    assert targets_of(teachers, cfg, bank) is None
