"""The amalgamation engine on toy teachers: shapes, frozen teachers, trainable sets, Y_cst, end to end."""

from __future__ import annotations

import pytest
import torch

from dfka.amalgamation.config import EXPORT_SHARE, AmalgamationConfig, Budget, GanLoss
from dfka.amalgamation.losses import total_variation
from dfka.amalgamation.regroup import TargetNet
from dfka.amalgamation.run import amalgamate, build_student, remaining_budget, teacher_set_from_bundles
from dfka.amalgamation.samples import SampleBank, Sampler
from dfka.amalgamation.stage1 import AmalgamatingGAN, GanTrainer
from dfka.amalgamation.stage2 import BlockTrainer, DualGenerator
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.errors import CompatibilityError, LabelError
from tests.toys import SIZE, toy_teacher

CPU = torch.device("cpu")


def tiny_config(**overrides) -> AmalgamationConfig:
    base = {
        "student": "lenet5:0.5",
        "threads": 1,
        "device": "cpu",
        "gan": {"batch_size": 16, "budget": {"steps": 20}, "widths": 8},
        "export": {"samples": 256, "shard_size": 100},
        "blocks": {"batch_size": 16, "budget": {"steps": 30}},
        "regroup": {"batch_size": 16, "finetune": {"steps": 20}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return AmalgamationConfig.model_validate(base)


@pytest.fixture(scope="module")
def pair():
    return [toy_teacher([0, 1, 2, 3], name="a", seed=1), toy_teacher([4, 5, 6, 7], name="b", seed=2)]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- shapes -----------------------------------------------------------------------------------------


# lenet5 and resnet differ at level 3 with 4 blocks: that pair is the compatibility test's case
SHAPE_CASES = [
    (blocks, families)
    for blocks in (2, 3, 4)
    for families in [("lenet5", "lenet5"), ("resnet", "resnet"), ("lenet5", "resnet")]
    if not (blocks == 4 and families == ("lenet5", "resnet"))
]


@pytest.mark.parametrize(("blocks", "families"), SHAPE_CASES)
def test_shapes_at_every_level(blocks: int, families: tuple[str, str]) -> None:
    a = toy_teacher([0, 1, 2], arch=families[0], blocks=blocks, width=0.5, steps=1, name="a")
    b = toy_teacher([3, 4], arch=families[1], blocks=blocks, width=1.0, steps=1, name="b")
    cfg = tiny_config()
    teachers = teacher_set_from_bundles([a, b], None)
    union = UnionRule(teachers)
    gan = AmalgamatingGAN(teachers, union, cfg.gan)
    feats = gan.generator(gan.sample_latent(5, torch.Generator().manual_seed(0), CPU))
    assert len(feats) == blocks
    assert feats[-1].shape == (5, 1, SIZE, SIZE) and feats[-1].min() >= 0 and feats[-1].max() <= 1
    for j, feat in enumerate(feats[:-1], start=1):
        level = gan.generator.level_of_group(j)
        assert feat.shape[1:] == teachers.level_shape(level)
        for name, model in teachers:
            filtered = gan.filters[str(level)][name](feat)
            assert filtered.shape[1:] == model.level_shapes()[level]
            assert model.forward_from(filtered, level).shape == (5, model.num_outputs)
    student = build_student(f"{families[0]}:0.5", teachers)
    channels = {lvl: s[0] for lvl, s in enumerate(gan.generator_level_shapes())}
    dual = DualGenerator(student, teachers, channels)
    net = TargetNet.from_dual(dual, teachers.label_tasks)
    assert net(torch.rand(5, 1, SIZE, SIZE)).shape == (5, 5)


def test_incompatible_teachers_name_the_level() -> None:
    a = toy_teacher([0, 1], arch="lenet5", blocks=4, steps=1, name="a")
    b = toy_teacher([2, 3], arch="resnet", blocks=4, steps=1, name="b")
    with pytest.raises(CompatibilityError, match="level 3 differs"):
        teacher_set_from_bundles([a, b], None)
    c = toy_teacher([2, 3], arch="lenet5", blocks=2, steps=1, name="c")
    with pytest.raises(CompatibilityError, match="blocks"):
        teacher_set_from_bundles([a, c], None)


# --- Y_cst --------------------------------------------------------------------------------------------


def test_target_labels_subset_reorder_shared_and_mixed_tasks() -> None:
    a = toy_teacher([0, 1, 2, 3], steps=1, name="a")
    b = toy_teacher([4, 5, 6], steps=1, name="b", labels=["toy_4", "toy_5", "toy_2"])  # shares toy_2
    c = toy_teacher([6, 7], steps=1, name="c", task="multilabel")
    target = ["toy_5", "toy_2", "toy_0", "toy_7"]
    ts = TeacherSet(
        {"a": a.model, "b": b.model, "c": c.model},
        {"a": a.labels, "b": b.labels, "c": c.labels},
        {"a": "multiclass", "b": "multiclass", "c": "multilabel"},
        target,
    )
    assert ts.target_labels == target
    assert ts.infos["a"].sel == (0, 2) and ts.infos["a"].pos == (2, 1)  # toy_0 -> 2, toy_2 -> 1
    assert ts.infos["b"].sel == (1, 2) and ts.infos["b"].pos == (0, 1)  # toy_5 -> 0, toy_2 -> 1
    assert ts.infos["c"].sel == (1,) and ts.infos["c"].pos == (3,)
    assert ts.owners.tolist() == [1, 2, 1, 1]
    assert ts.label_tasks == ["multiclass", "multiclass", "multiclass", "multilabel"]
    assert ts.task == "mixed"
    logits = {
        "a": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "b": torch.tensor([[5.0, 6.0, 7.0]]),
        "c": torch.tensor([[0.0, 2.0]]),
    }
    scores = UnionRule(ts, "logits")(logits)
    torch.testing.assert_close(scores[0, :3], torch.tensor([6.0, (3.0 + 7.0) / 2, 1.0]))
    torch.testing.assert_close(scores[0, 3], torch.tensor(2.0))  # a lone multi-label owner keeps its logit
    # softmax rule: shared label averages probabilities
    soft = UnionRule(ts, "softmax")(logits)
    pa, pb = torch.softmax(logits["a"], 1)[0], torch.softmax(logits["b"], 1)[0]
    torch.testing.assert_close(soft[0, 1].exp(), (pa[2] + pb[2]) / 2)
    # a teacher owning none of the target labels is dropped
    ts2 = TeacherSet(
        {"a": a.model, "c": c.model, "b": b.model},
        {"a": a.labels, "c": c.labels, "b": b.labels},
        {"a": "multiclass", "c": "multilabel", "b": "multiclass"},
        ["toy_0", "toy_5"],
    )
    assert ts2.names == ["a", "b"]


@pytest.mark.parametrize(
    ("target", "message"),
    [([], "empty"), (["toy_0", "toy_0"], "duplicate"), (["toy_0", "cat"], r"\['cat'\] are not owned")],
)
def test_bad_target_labels(pair, target, message) -> None:
    with pytest.raises(LabelError, match=message):
        teacher_set_from_bundles(pair, target)


def test_needs_two_teachers(pair) -> None:
    with pytest.raises(CompatibilityError, match="at least 2 teachers"):
        teacher_set_from_bundles(pair[:1], None)


# --- frozen teachers and trainable sets -------------------------------------------------------------------


def test_stage1_trains_exactly_generator_and_filters(pair) -> None:
    cfg = tiny_config()
    teachers = teacher_set_from_bundles(pair, None)
    before = snapshot(teachers)
    gan = AmalgamatingGAN(teachers, UnionRule(teachers), cfg.gan)
    trainer = GanTrainer(gan, seed=0, device=CPU)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in [*gan.generator.parameters(), *gan.filters.parameters()]}
    assert in_optimizer == expected
    assert not any(id(p) in in_optimizer for p in teachers.parameters())
    parts, _ = gan.losses(gan.sample_latent(8, torch.Generator().manual_seed(0), CPU))
    gan.weighted(parts).backward()
    named = dict(gan.generator.named_parameters()) | {
        f"filters.{k}": v for k, v in gan.filters.named_parameters()
    }
    missing = [n for n, p in named.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing
    assert all(p.grad is None for p in teachers.parameters())
    for step in range(3):
        trainer.step(step, 3)
    after = snapshot(teachers)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teachers.models["a"].training  # parent .train() did not unfreeze them


def test_stage2_trains_exactly_block_b_and_its_helpers(pair) -> None:
    cfg = tiny_config()
    teachers = teacher_set_from_bundles(pair, None)
    union = UnionRule(teachers)
    gan = AmalgamatingGAN(teachers, union, cfg.gan)
    bank = SampleBank.generate(Sampler(gan, seed=0, batch_size=32), 64, progress=False)
    before = snapshot(teachers)
    gen_before = snapshot(gan.generator)
    channels = {lvl: s[0] for lvl, s in enumerate(gan.generator_level_shapes())}
    dual = DualGenerator(build_student("lenet5:0.5", teachers), teachers, channels)
    trainer = BlockTrainer(dual, union, cfg.blocks, bank.batches(16, torch.Generator().manual_seed(0)), CPU)
    for b in range(1, dual.num_blocks + 1):
        student_before = snapshot(dual.student)
        trainer.start_block(b)
        in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        expected = {id(p) for p in dual.student.blocks[b - 1].parameters()}
        expected |= {
            id(p) for p in (dual.filters[str(b)] if b < dual.num_blocks else dual.branches).parameters()
        }
        if b > 1:
            expected |= {id(p) for p in dual.stream2[str(b)].parameters()}
        assert in_optimizer == expected, f"block {b}"
        trainer.optimizer.zero_grad()
        trainer.block_loss(next(trainer.batches))["loss"].backward()
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        assert all(p.grad is not None and torch.any(p.grad != 0) for p in params), f"block {b}"
        assert all(p.grad is None for p in teachers.parameters())
        trainer.optimizer.zero_grad()
        trainer.step(0, 2)
        after = snapshot(dual.student)
        for k in before_keys_outside_block(dual, b):
            assert torch.equal(student_before[k], after[k]), f"block {b} changed frozen {k}"
    assert all(torch.equal(v, snapshot(teachers)[k]) for k, v in before.items())
    assert all(torch.equal(v, snapshot(gan.generator)[k]) for k, v in gen_before.items())


def before_keys_outside_block(dual: DualGenerator, b: int) -> list[str]:
    return [k for k in dual.student.state_dict() if not k.startswith(f"blocks.{b - 1}.")]


# --- end to end --------------------------------------------------------------------------------------------


def agreement(net: torch.nn.Module, union: UnionRule, teachers: TeacherSet, images: torch.Tensor) -> float:
    with torch.no_grad():
        target = union({n: m(images) for n, m in teachers}).argmax(1)
        return float((net.eval()(images).argmax(1) == target).float().mean())


def random_student(result, seed: int) -> TargetNet:
    """A randomly initialised TargetNet whose BatchNorm statistics have seen the generated samples, as a
    trained one's have: the fair "random student" to beat."""
    torch.manual_seed(seed)
    channels = {lvl: s[0] for lvl, s in enumerate(result.gan.generator_level_shapes())}
    dual = DualGenerator(build_student("lenet5:0.5", result.teachers), result.teachers, channels)
    net = TargetNet.from_dual(dual, result.teachers.label_tasks).train()
    with torch.no_grad():
        for start in range(0, len(result.bank), 16):
            net(result.bank.batch(torch.arange(start, min(start + 16, len(result.bank)))).image)
    return net


def clearly_beats(trained: float, random: float) -> bool:
    return trained > random + 0.3


def test_end_to_end_beats_a_random_student_and_needs_stage2(pair) -> None:
    # stage 2 alone (no fine-tune), so that switching its loss off leaves nothing else to learn from
    cfg = tiny_config(
        gan={"budget": {"steps": 60}},
        export={"samples": 1024},
        blocks={"budget": {"steps": 360}},
        regroup={"finetune": None},
    )
    result = amalgamate(pair, cfg, progress=False)
    images = result.bank.batch(torch.arange(512)).image
    trained = agreement(result.targetnet, result.union, result.teachers, images)
    random = max(agreement(random_student(result, s), result.union, result.teachers, images) for s in (5, 6))
    assert clearly_beats(trained, random), (trained, random)
    # the same check fails when stage 2's loss is switched off: it is not vacuous
    off_cfg = cfg.model_copy(
        update={"blocks": cfg.blocks.model_copy(update={"lambda_stream1": 0.0, "lambda_stream2": 0.0})}
    )
    off = amalgamate(pair, off_cfg, progress=False)
    untrained = agreement(off.targetnet, off.union, off.teachers, images)
    assert not clearly_beats(untrained, random), (untrained, random)


def test_same_seed_same_weights(pair) -> None:
    cfg = tiny_config()
    a = amalgamate(pair, cfg, progress=False).targetnet.state_dict()
    b = amalgamate(pair, cfg, progress=False).targetnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = amalgamate(pair, cfg.model_copy(update={"seed": 1}), progress=False).targetnet.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_union_loss_is_minimal_at_the_target() -> None:
    mask = torch.tensor([True, True, True, False])
    t = torch.randn(6, 4)
    s = t.clone().requires_grad_(True)
    at_target = union_loss(s, t, mask)
    at_target.backward()
    assert s.grad.abs().max() < 1e-6  # a stationary point (KL is 0 there, soft BCE at its minimum)
    assert union_loss(torch.randn(6, 4), t, mask) > at_target + 0.01


def test_bn_statistics_term_matches_the_definition() -> None:
    """Σ_ℓ ‖μ_ℓ - μ̂_ℓ‖₂ + ‖σ²_ℓ - σ̂²_ℓ‖₂ over 2-d and 1-d BatchNorm layers, as DeepInversion defines it."""
    from torch import nn

    from dfka.amalgamation.losses import BNStatsRecorder

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5)
    ).eval()
    for layer in (model[1], model[4]):
        layer.running_mean.uniform_()
        layer.running_var.uniform_(0.5, 2)
    recorder = BNStatsRecorder([model])
    x = torch.randn(16, 1, 6, 6)
    model(x)
    assert float(recorder.pop()) == 0.0  # inactive: nothing recorded
    recorder.active = True
    model(x)
    got = recorder.pop()
    expected = torch.zeros(())
    h = x
    for layer in model:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            dims = [0, 2, 3] if h.dim() == 4 else [0]
            var, mean = torch.var_mean(h, dim=dims, unbiased=False)
            expected = expected + (mean - layer.running_mean).norm() + (var - layer.running_var).norm()
        h = layer(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_total_variation_prior() -> None:
    flat = torch.full((2, 1, 6, 6), 0.3)
    assert float(total_variation(flat)) == 0.0
    stripes = flat.clone()
    stripes[..., ::2] = 0.8  # vertical stripes: |Δw| = 0.5 everywhere, Δh = 0
    assert float(total_variation(stripes)) == pytest.approx(0.5)


def test_tv_term_is_in_the_stage1_loss_only_when_weighted(pair) -> None:
    teachers = teacher_set_from_bundles(pair, None)
    off = AmalgamatingGAN(teachers, UnionRule(teachers), tiny_config().gan)
    z = off.sample_latent(8, torch.Generator().manual_seed(0), CPU)
    assert "tv" not in off.losses(z)[0]
    on = AmalgamatingGAN(teachers, UnionRule(teachers), tiny_config(gan={"loss": {"tv": 2.0}}).gan)
    parts, batch = on.losses(z)
    assert float(parts["tv"]) == pytest.approx(float(total_variation(batch.image)))
    image_group = on.generator.groups[-1].body[-2]  # the conv that makes the pixels
    torch.autograd.backward(parts["tv"])
    assert image_group.weight.grad is not None and torch.any(image_group.weight.grad != 0)


# --- wall-clock budgets -----------------------------------------------------------------------------


def test_every_gan_loss_weight_is_in_the_weighted_sum() -> None:
    """A weight field of GanLoss that weighted() does not sum would be a term silently dropped."""
    weights = [name for name, f in GanLoss.model_fields.items() if f.annotation is float]
    assert weights and set(weights) == set(GanLoss.terms())
    loss = GanLoss(**dict.fromkeys(weights, 1.0))
    parts = {name: 2.0**i for i, name in enumerate(weights)}  # one bit per term: none can hide
    assert loss.weighted(parts) == sum(parts.values())
    for name in weights:  # and each is weighted by its own field
        assert loss.model_copy(update={name: 3.0}).weighted(parts) == sum(parts.values()) + 2 * parts[name]


def test_gan_loss_sums_in_a_fixed_order() -> None:
    """The order terms are added in fixes the float rounding of L: it is the declaration order, pinned
    here so that a reordering (which changes the numbers) is a deliberate edit."""

    class Term:
        def __init__(self, names: tuple[str, ...]) -> None:
            self.names = names

        def __rmul__(self, weight: float) -> Term:
            return self

        def __add__(self, other: Term) -> Term:
            return Term(self.names + other.names)

    parts = {name: Term((name,)) for name in GanLoss.terms()}
    order = ("oh", "a", "ie", "dis", "bn", "consistency", "adv", "tv", "div", "route")
    assert GanLoss().weighted(parts).names == order
    dafl = {k: v for k, v in parts.items() if k in ("oh", "a", "ie", "dis", "bn")}
    assert GanLoss().weighted(dafl).names == ("oh", "a", "ie", "dis", "bn")


def test_total_budget_covers_the_export() -> None:
    """Stages 2 and 3 get what stage 1 and the export left of ``budget_minutes``, in their split ratio."""
    cfg = AmalgamationConfig(budget_minutes=10, budget_split={"gan": 0.4, "blocks": 0.3, "finetune": 0.3})
    assert cfg.blocks.budget.seconds == pytest.approx(180) and cfg.regroup.finetune.seconds == pytest.approx(
        180
    )
    after = remaining_budget(cfg, spent=240 + 60)  # an export of 60 s comes out of stages 2 and 3
    assert after.blocks.budget.seconds == pytest.approx(150)
    assert after.regroup.finetune.seconds == pytest.approx(150)
    assert cfg.blocks.budget.seconds == pytest.approx(180)  # the caller's config is left alone
    for no_ft in (
        AmalgamationConfig(budget_minutes=10, regroup={"finetune": None}),
        AmalgamationConfig(budget_minutes=10, preset="paper"),  # the default split has no stage-2 share
    ):
        assert no_ft.blocks.budget.seconds == pytest.approx(360)  # the fine-tune's 60% goes to stage 2
        assert remaining_budget(no_ft, spent=300).blocks.budget.seconds == pytest.approx(300)
        assert remaining_budget(no_ft, spent=900).blocks.budget.seconds == pytest.approx(1.0)
    steps = tiny_config()
    assert remaining_budget(steps, spent=1e6) == steps  # step budgets are not time budgets


def test_the_default_split_gives_stage_2_no_time_and_drops_the_consistency_term_it_serves() -> None:
    """40/0/60: the fine-tune gets stage 2's time; Eq. 11 (which only shapes the intermediate features
    stage 2 reads) is off unless the user sets it, and on wherever stage 2 trains."""
    cfg = AmalgamationConfig(budget_minutes=10)
    assert cfg.stage_shares() == pytest.approx({"gan": 0.4, "blocks": 0.0, "finetune": 0.6})
    assert cfg.gan.budget.seconds == pytest.approx(240)
    assert cfg.regroup.finetune.seconds == pytest.approx(360)
    assert cfg.blocks.budget == Budget(steps=1)  # runs and reports, and takes no time
    assert cfg.gan.loss.consistency == 0.0
    after = remaining_budget(cfg, spent=240 + 60)
    assert after.blocks.budget == Budget(steps=1)
    assert after.regroup.finetune.seconds == pytest.approx(300)
    asked = AmalgamationConfig(budget_minutes=10, gan={"loss": {"consistency": 0.5}})
    assert asked.gan.loss.consistency == 0.5  # the user's own weight is kept
    assert AmalgamationConfig(budget_minutes=10, preset="paper").gan.loss.consistency == 1.0
    with_blocks = AmalgamationConfig(budget_minutes=10, budget_split={"gan": 4, "blocks": 3, "finetune": 3})
    assert with_blocks.gan.loss.consistency == 1.0
    assert AmalgamationConfig().gan.loss.consistency == 1.0  # step budgets train stage 2 its steps
    one_step = AmalgamationConfig(blocks={"budget": {"steps": 1}})  # the same default split, in steps
    assert one_step.gan.loss.consistency == 0.0
    again = AmalgamationConfig.model_validate(cfg.model_dump())  # as a pipeline stage re-reads it
    assert again.gan.loss.consistency == 0.0 and again.stage_shares() == cfg.stage_shares()


def test_amalgamate_ends_within_its_wall_clock_budget(pair) -> None:
    """A bank larger than the GAN's trajectory makes the export top it up, for at most EXPORT_SHARE of
    the budget (the bank then holds what was made in time); that time is inside the budget."""
    cfg = tiny_config(budget_minutes=0.2, export={"samples": 100000, "shard_size": 25000})
    assert cfg.export_seconds() == pytest.approx(EXPORT_SHARE * 12.0)
    result = amalgamate(pair, cfg, progress=False)
    seconds = {k: s.seconds for k, s in result.stages.items()}
    export = result.stages["export"]
    assert export.samples > 0 and len(result.bank) < 100000  # cut by the cap, not by the sample count
    assert len(result.bank) == export.samples + export.extra["from_trajectory"]
    assert seconds["export"] < EXPORT_SHARE * 12.0 + 1.0, seconds  # the cap plus at most one batch
    assert sum(seconds.values()) < 12.0 + 1.0, seconds  # inside the 12 s, not on top of them
    uncapped = tiny_config(export={"samples": 3000, "shard_size": 3000})  # step budgets: no cap
    assert uncapped.export_seconds() is None
    assert len(amalgamate(pair, uncapped, progress=False).bank) == 3000
