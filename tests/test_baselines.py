"""Baselines on toy teachers: each learns the ensemble's target, data-free ones cannot read training images,
teachers stay frozen, and the layer-wise student folds its aux layers exactly."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import build_student, teacher_set_from_bundles
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.baselines import (
    DaflConfig,
    LayerwiseAmalgamator,
    LayerwiseConfig,
    NoiseSource,
    TeacherEnsemble,
    build_ensemble,
    train_dafl,
    train_dfad,
    train_kd_real,
    train_layerwise,
    train_noise,
    union_targets,
)
from dfka.baselines.layerwise import split_budget
from dfka.data import mnist_available
from dfka.errors import DataFreeViolation
from tests.toys import toy_batch, toy_teacher

CPU = torch.device("cpu")


def config(**overrides) -> AmalgamationConfig:
    base = {
        "student": "lenet5:0.5",
        "threads": 1,
        "device": "cpu",
        "gan": {"batch_size": 32, "widths": 8},
        "blocks": {"batch_size": 32},
    }
    return AmalgamationConfig.model_validate(base | overrides)


@pytest.fixture(scope="module")
def setup():
    pair = [toy_teacher([0, 1, 2, 3], name="a", seed=1), toy_teacher([4, 5, 6, 7], name="b", seed=2)]
    teachers = teacher_set_from_bundles(pair, None)
    return pair, teachers, UnionRule(teachers)


@pytest.fixture(scope="module")
def real():
    """Toy "real" images: unlabeled training images and held-out ones."""
    train, _ = toy_batch(range(8), 1500, torch.Generator().manual_seed(5))
    test, _ = toy_batch(range(8), 400, torch.Generator().manual_seed(6))
    return train, test


def agreement(model: torch.nn.Module, teachers, union, images: torch.Tensor) -> tuple[float, float]:
    """How often the model's argmax is the ensemble's on ``images``, and its KD loss to the ensemble there.

    Both are needed: on a collapsed generator's samples a constant model agrees often, but its loss to
    the ensemble's soft target stays high."""
    with torch.no_grad():
        target = union_targets(teachers, union, images)
        scores = model.eval()(images)
    agree = float((scores.argmax(1) == target.argmax(1)).float().mean())
    return agree, float(union_loss(scores, target, union.multiclass_mask))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ensemble_is_the_union_rule_and_exact_on_each_teachers_labels(setup, real) -> None:
    _, teachers, union = setup
    _, images = real
    ensemble, report = build_ensemble(teachers, union)
    assert isinstance(ensemble, TeacherEnsemble) and report.seconds == 0
    with torch.no_grad():
        scores = ensemble(images)
        assert torch.equal(scores, union({n: m(images) for n, m in teachers}))
        # logit concatenation of disjoint teachers: restricted to a teacher's labels it is that teacher
        for name, model in teachers:
            pos = list(teachers.infos[name].pos)
            assert torch.equal(scores[:, pos].argmax(1), model(images).argmax(1))


def _train(method: str, teachers, union, real, cfg):
    """(student, images to measure agreement on): generated samples, noise, or held-out real images."""
    train, test = real
    if method == "dafl":
        student, gen, report = train_dafl(teachers, union, cfg, Budget(steps=40), device=CPU, progress=False)
        with torch.no_grad():
            images = gen.train()(
                torch.randn(256, cfg.gan.latent_dim, generator=torch.Generator().manual_seed(9))
            )
    elif method == "dfad":
        student, gen, report = train_dfad(teachers, union, cfg, Budget(steps=12), device=CPU, progress=False)
        with torch.no_grad():
            images = gen.train()(
                torch.randn(256, cfg.gan.latent_dim, generator=torch.Generator().manual_seed(9))
            )
    elif method == "noise":
        student, _, report = train_noise(teachers, union, cfg, Budget(steps=80), device=CPU, progress=False)
        images = NoiseSource.for_teachers(teachers, seed=99)(256)
    elif method == "kd-real":
        student, report = train_kd_real(
            teachers, union, cfg, Budget(steps=80), train, device=CPU, progress=False
        )
        images = test
    else:
        student, stages = train_layerwise(
            teachers, union, cfg, Budget(steps=200), train, device=CPU, progress=False
        )
        assert list(stages) == ["ae", "layerwise", "finetune"]
        report = stages["layerwise"]
        images = test
    assert report.steps > 0 and report.seconds > 0 and report.samples_per_second > 0
    return student, images


@pytest.mark.parametrize("method", ["dafl", "dfad", "noise", "kd-real", "layerwise"])
def test_every_baseline_beats_a_random_student_and_keeps_teachers_frozen(method, setup, real) -> None:
    _, teachers, union = setup
    cfg = config()
    before = snapshot(teachers)
    student, images = _train(method, teachers, union, real, cfg)
    assert all(torch.equal(before[k], v) for k, v in teachers.state_dict().items()), "a teacher changed"
    # the deployed student is exactly the shared student architecture (layer-wise: aux layers folded in)
    reference = build_student(cfg.student, teachers)
    assert {k: v.shape for k, v in student.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    torch.manual_seed(123)
    random = build_student(cfg.student, teachers)
    (trained, trained_loss), (baseline, random_loss) = (
        agreement(student, teachers, union, images),
        agreement(random, teachers, union, images),
    )
    assert trained > baseline + 0.1, (method, trained, baseline)
    assert trained_loss < 0.8 * random_loss, (method, trained_loss, random_loss)


def test_dafl_bn_routing_option_for_the_routing_ablation(setup) -> None:
    """``baselines.dafl.bn_routing: owner`` gives DAFL dfka's owner-routed BN term; the default keeps
    the baseline's batch term (so the two differ from the first step on)."""
    _, teachers, union = setup
    cfg = config()
    runs = {}
    for routing in ("batch", "owner"):
        torch.manual_seed(0)
        student, _, report = train_dafl(
            teachers,
            union,
            cfg,
            Budget(steps=5),
            device=CPU,
            progress=False,
            options=DaflConfig(bn_routing=routing),
        )
        assert report.extra["dafl.bn"] > 0
        runs[routing] = (student.state_dict(), report.extra["dafl.bn"])
    assert runs["batch"][1] != runs["owner"][1]
    torch.manual_seed(0)
    default, _, _ = train_dafl(teachers, union, cfg, Budget(steps=5), device=CPU, progress=False)
    assert all(torch.equal(v, runs["batch"][0][k]) for k, v in default.state_dict().items())


# --- the data-free guard ---------------------------------------------------------------------------


def _reads_training_images(real_builder):
    """A student builder that first tries to read MNIST training images, as a leaky method would."""
    seen: list[str] = []

    def builder(*args, **kwargs):
        from dfka.data import load_split

        load_split("mnist", "train", labels=["digit_0"])
        seen.append("read")
        return real_builder(*args, **kwargs)

    return builder, seen


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
@pytest.mark.parametrize("method", ["dafl", "dfad", "noise", "dfka", "kd-real", "layerwise"])
def test_data_free_methods_cannot_read_training_images(method, setup, real, monkeypatch) -> None:
    """The guard raises when a data-free code path reads the train split; with-data baselines may."""
    import dfka.amalgamation.run as run_module
    import dfka.baselines.dafl as dafl_module
    import dfka.baselines.dfad as dfad_module
    import dfka.baselines.kd_real as kd_module
    import dfka.baselines.layerwise as layerwise_module
    import dfka.baselines.noise as noise_module

    pair, teachers, union = setup
    cfg = config(export={"samples": 64, "shard_size": 64})
    module = {
        "dafl": dafl_module,
        "dfad": dfad_module,
        "noise": noise_module,
        "dfka": run_module,
        "kd-real": kd_module,
        "layerwise": layerwise_module,
    }[method]
    spy, seen = _reads_training_images(module.build_student)
    monkeypatch.setattr(module, "build_student", spy)
    train, _ = real
    one = Budget(steps=1)
    calls = {
        "dafl": lambda: train_dafl(teachers, union, cfg, one, device=CPU, progress=False),
        "dfad": lambda: train_dfad(teachers, union, cfg, one, device=CPU, progress=False),
        "noise": lambda: train_noise(teachers, union, cfg, one, device=CPU, progress=False),
        "dfka": lambda: run_module.amalgamate(
            pair, cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"budget": one})}), progress=False
        ),
        "kd-real": lambda: train_kd_real(teachers, union, cfg, one, train, device=CPU, progress=False),
        "layerwise": lambda: train_layerwise(
            teachers, union, cfg, Budget(steps=3), train, device=CPU, progress=False
        ),
    }
    if method in ("kd-real", "layerwise"):
        calls[method]()
        assert seen == ["read"]
    else:
        with pytest.raises(DataFreeViolation, match="training split"):
            calls[method]()
        assert seen == []


# --- layer-wise amalgamation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "blocks", "aux_levels"),
    [
        ("lenet5", 2, [1, 2]),
        ("lenet5", 3, [1, 2, 3]),
        ("lenet5", 4, [1, 2, 3, 4]),
        ("resnet", 3, [1, 2, 3]),
        ("resnet", 4, [1, 2, 4]),
    ],
)
def test_layerwise_folding_is_exact(arch: str, blocks: int, aux_levels: list[int]) -> None:
    """The folded plain student computes exactly what the stacked part-nets with aux layers compute."""
    a = toy_teacher([0, 1, 2], arch=arch, blocks=blocks, steps=1, name="a")
    b = toy_teacher([3, 4], arch=arch, blocks=blocks, width=1.0, steps=1, name="b")
    teachers = teacher_set_from_bundles([a, b], None)
    amal = LayerwiseAmalgamator(build_student(f"{arch}:0.5", teachers), teachers)
    # ResNet's last stage at 4 blocks starts with an identity shortcut: no aux layer can fold in there
    assert sorted(int(k) for k in amal.aux) == aux_levels
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in amal.aux.values():
            layer.weight.add_(0.5 * torch.randn(layer.weight.shape, generator=g))
        for m in amal.student.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    amal.eval()
    folded = amal.folded().eval()
    x = torch.rand(6, *teachers.input_shape, generator=g)
    with torch.no_grad():
        expected, got = amal.unfolded(x), folded(x)
        plain = amal.student(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(plain, expected, atol=1e-3)  # the aux layers did change the function


def test_layerwise_options_and_budget_split() -> None:
    with pytest.raises(ValidationError):
        LayerwiseConfig(split={"ae": 0.0, "layerwise": 1.0})
    with pytest.raises(ValidationError):
        LayerwiseConfig(split={"ae": 0.5, "layerwise": 0.5, "distill": 0.1})
    two_step = split_budget(Budget(seconds=10), {"ae": 1, "layerwise": 3, "finetune": 0})
    assert list(two_step) == ["ae", "layerwise"] and two_step["layerwise"].seconds == pytest.approx(7.5)
    assert sum(b.steps for b in split_budget(Budget(steps=100), LayerwiseConfig().split).values()) == 100
