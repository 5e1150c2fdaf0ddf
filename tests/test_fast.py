"""The fast compute path gives the reference path's results up to float rounding, and never touches the
teachers: folded compute copies, the BN-statistics term from folded layers, the GEMM conv kernels, and
stage 1, stage 2 and fine-tune steps on both paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfka.amalgamation.losses import BNStatsRecorder, RoutedBNStats, owner_weights
from dfka.amalgamation.regroup import FinetuneTrainer, TargetNet
from dfka.amalgamation.run import build_student, teacher_set_from_bundles
from dfka.amalgamation.samples import SampleBank, Sampler
from dfka.amalgamation.stage1 import AmalgamatingGAN, GanTrainer
from dfka.amalgamation.stage2 import BlockTrainer, DualGenerator
from dfka.amalgamation.union import UnionRule
from dfka.engine import fast
from tests.test_amalgamation import snapshot, tiny_config
from tests.toys import SIZE, toy_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pair():
    return [toy_teacher([0, 1, 2, 3], name="a", seed=1), toy_teacher([4, 5, 6, 7], name="b", seed=2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --- compute copies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "blocks"), [("lenet5", 2), ("lenet5", 3), ("lenet5", 4), ("resnet", 3), ("resnet", 2)]
)
def test_compute_copy_equals_the_teacher_at_every_level(arch: str, blocks: int) -> None:
    teacher = toy_teacher([0, 1, 2], arch=arch, blocks=blocks, steps=20, seed=3).model
    before = snapshot(teacher)
    copy = fast.compute_copy(teacher)
    assert any(isinstance(m, fast.FoldedBatchNorm) for m in copy.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copy.modules())
    assert copy.state_dict() == {} and not list(copy.parameters())  # stateless: buffers only
    x = torch.rand(16, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), teacher(x), rtol=1e-5, atol=1e-5)
        for level in range(blocks + 1):
            h = teacher.run_blocks(x, 0, level)
            torch.testing.assert_close(copy.run_blocks(x, 0, level), h, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                copy.forward_from(h, level), teacher.forward_from(h, level), rtol=1e-5, atol=1e-5
            )
    after = snapshot(teacher)
    assert all(torch.equal(before[k], after[k]) and before[k].stride() == after[k].stride() for k in before)
    assert all(
        type(m) in (nn.Conv2d, nn.Linear) for m in teacher.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )


def test_input_gradients_agree_in_float64() -> None:
    """Folding, pool-before-ReLU and the thin-conv backward are exact: in float64 the image gradient of
    the copy equals the teacher's to 1e-12."""
    teacher = toy_teacher([0, 1, 2], steps=20, seed=4).model.double()
    copy = fast.compute_copy(teacher)
    x = torch.rand(8, 1, SIZE, SIZE, dtype=torch.float64)
    grads = []
    for model in (teacher, copy):
        xx = x.clone().requires_grad_()
        (model(xx) * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        grads.append(xx.grad)
    assert rel(grads[1], grads[0]) < 1e-12


def bn_term(models, x: torch.Tensor, path: fast.ComputePath = fast.FAST) -> torch.Tensor:
    recorder = BNStatsRecorder(models, path)
    recorder.active = True
    for m in models:
        m(x)
    term = recorder.pop()
    recorder.remove()
    return term


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_term_from_folded_layers_equals_the_unfolded_one(pair, dtype: torch.dtype) -> None:
    teachers = [b.model.to(dtype) for b in pair]
    try:
        copies = [fast.compute_copy(t) for t in teachers]
        x = torch.rand(32, 1, SIZE, SIZE, dtype=dtype, requires_grad=True)
        expected = bn_term(teachers, x, fast.REFERENCE)
        (g_expected,) = torch.autograd.grad(expected, x)
        got = bn_term(copies, x)
        (g_got,) = torch.autograd.grad(got, x)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        assert rel(g_got, g_expected) < (1e-3 if dtype == torch.float32 else 1e-10)
    finally:
        for t in teachers:
            t.float()


def routed_bn_term(
    models: dict, x: torch.Tensor, weights: dict | None, path: fast.ComputePath = fast.FAST
) -> torch.Tensor:
    recorder = RoutedBNStats(models, path)
    recorder.active = True
    for m in models.values():
        m(x)
    term = recorder.pop(weights)
    recorder.remove()
    return term


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_owner_routed_bn_term_matches_its_definition(pair, path: str) -> None:
    """Uniform weights give the batch term exactly; one-hot ownership gives each teacher's BN term on
    the samples it owns, scaled by its share of the batch; folded compute copies agree with the teachers."""
    teachers = {b.name: b.model for b in pair}
    models = teachers if path == "reference" else {n: fast.compute_copy(t) for n, t in teachers.items()}
    x = torch.rand(24, 1, SIZE, SIZE, requires_grad=True)
    compute = fast.REFERENCE if path == "reference" else fast.FAST
    batch = bn_term(list(models.values()), x, compute)
    uniform = routed_bn_term(models, x, None, compute)
    torch.testing.assert_close(uniform, batch, rtol=1e-5, atol=1e-5)
    owner_a = torch.zeros(24)
    owner_a[:8] = 1.0  # teacher a owns the first 8 samples, b the other 16
    weights = {"a": 2 * owner_a, "b": 2 * (1 - owner_a)}  # M·q, mean 1 over the batch
    got = routed_bn_term(models, x, weights, compute)
    expected = (8 / 24 * 2) * bn_term([models["a"]], x[:8], compute) + (16 / 24 * 2) * bn_term(
        [models["b"]], x[8:], compute
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(got, x)
    assert torch.any(grad[:8] != 0) and torch.any(grad[8:] != 0)


def test_stage1_routes_the_bn_term_by_ownership(pair) -> None:
    teachers = teacher_set_from_bundles(pair, None)
    gan = AmalgamatingGAN(teachers, UnionRule(teachers), tiny_config(gan={"bn_routing": "owner"}).gan)
    assert isinstance(gan.bn_stats, RoutedBNStats)
    logits = {
        "a": torch.tensor([[9.0, 0, 0, 0], [0, 0, 0, 0]]),
        "b": torch.tensor([[0.0, 0, 0, 0], [0, 0, 9, 0]]),
    }
    w = owner_weights(teachers, logits)
    assert w["a"][0] > 1.99 and w["b"][1] > 1.99 and torch.allclose(w["a"] + w["b"], torch.full((2,), 2.0))
    parts, _ = gan.losses(gan.sample_latent(8, torch.Generator().manual_seed(0), CPU))
    assert parts["bn"].requires_grad and float(parts["bn"]) > 0


def test_a_bn_with_tiny_gamma_is_kept_unfolded() -> None:
    teacher = toy_teacher([0, 1], steps=5, seed=5).model
    bn = teacher.blocks[0][1]
    with torch.no_grad():
        bn.weight[0] = 1e-9  # |β/γ| huge: recovering its input statistics from the folded output is lossy
    copy = fast.compute_copy(teacher)
    assert isinstance(copy.blocks[0][1], nn.BatchNorm2d)
    assert sum(isinstance(m, fast.FoldedBatchNorm) for m in copy.modules()) >= 2
    x = torch.rand(16, 1, SIZE, SIZE)
    expected = bn_term([teacher], x, fast.REFERENCE)
    torch.testing.assert_close(bn_term([copy], x), expected, rtol=1e-5, atol=1e-5)


def test_channel_moments_and_their_gradient() -> None:
    for shape, fmt in [
        ((6, 5, 4, 3), torch.contiguous_format),
        ((6, 5, 4, 3), torch.channels_last),
        ((7, 5), None),
    ]:
        x = torch.randn(*shape, dtype=torch.float64)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        got_mean, got_var = fast.batch_moments(x)
        torch.testing.assert_close(got_mean, mean)
        torch.testing.assert_close(got_var, var)
        assert torch.autograd.gradcheck(lambda t: fast.channel_moments(t), (x,))


@pytest.mark.parametrize(
    ("n", "c", "o", "h", "w", "k", "p"),
    [
        (2, 1, 3, 6, 5, 3, 1),
        (2, 2, 1, 5, 5, 5, 2),
        (3, 3, 2, 6, 7, 3, 0),
        (2, 5, 1, 4, 4, 5, 2),
        (2, 2, 3, 5, 6, (3, 5), (1, 2)),
    ],
)
def test_gemm_conv_kernels_are_convolutions(n, c, o, h, w, k, p) -> None:
    kk, pp = (k, k) if isinstance(k, int) else k, (p, p) if isinstance(p, int) else p
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        weight = torch.randn(o, c, *kk, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(o, dtype=torch.float64, requires_grad=True)
        expected = F.conv2d(x, weight, bias, padding=pp)
        torch.testing.assert_close(fast._TapSumConv.apply(x, weight, bias, pp), expected)
        assert torch.autograd.gradcheck(lambda *t: fast._TapSumConv.apply(*t, pp), (x, weight, bias))
        frozen_w, frozen_b = weight.detach(), bias.detach()
        torch.testing.assert_close(fast._FrozenThinConv.apply(x, frozen_w, frozen_b, pp), expected)
        assert torch.autograd.gradcheck(
            lambda t, w=frozen_w, b=frozen_b: fast._FrozenThinConv.apply(t, w, b, pp), (x,)
        )


def test_accelerate_keeps_parameters_names_and_export(pair) -> None:
    teachers = teacher_set_from_bundles(pair, None)
    net = TargetNet.from_dual(
        DualGenerator(build_student("lenet5:0.5", teachers), teachers, {0: 1, 1: 3, 2: 8}),
        teachers.label_tasks,
    )
    before = {k: (id(v), v.detach().clone()) for k, v in net.named_parameters()}
    keys = list(net.state_dict())
    x = torch.rand(4, 1, SIZE, SIZE)
    with torch.no_grad():
        expected = net.eval()(x)
    fast.accelerate(net, CPU)
    assert list(net.state_dict()) == keys
    assert all(id(v) == before[k][0] and torch.equal(v, before[k][1]) for k, v in net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(net, x)  # export traces the plain convolutions
    assert "fast" not in traced.inlined_graph.__str__()
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_autocast_only_on_cuda() -> None:
    from contextlib import nullcontext

    assert isinstance(fast.FAST.autocast(CPU), nullcontext)
    assert fast.FAST.adam_options(CPU) == {"fused": True}
    assert fast.REFERENCE.adam_options(CPU) == {}


# --- stages on both paths ------------------------------------------------------------------------------


def path_of(reference: bool) -> fast.ComputePath:
    return fast.REFERENCE if reference else fast.FAST


def build_gan(pair, reference: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    teachers = teacher_set_from_bundles(pair, None, path_of(reference)).to(dtype)
    union = UnionRule(teachers).to(dtype)
    gan = AmalgamatingGAN(teachers, union, tiny_config().gan).to(dtype)
    trainer = GanTrainer(gan, seed=0, device=CPU)
    return trainer


def test_stage1_losses_and_gradients_match_the_reference(pair) -> None:
    for dtype in (torch.float32, torch.float64):
        ref, quick = build_gan(pair, True, dtype), build_gan(pair, False, dtype)
        z = ref.gan.sample_latent(16, torch.Generator().manual_seed(0), CPU)
        assert quick.gan.compute["a"] is not ref.gan.compute["a"]
        assert isinstance(ref.gan.compute["a"].blocks[0][1], nn.BatchNorm2d)  # the teacher itself
        # the path is the object's, not the process's: the trainer built first keeps the reference path
        assert not ref.optimizer.defaults.get("fused") and quick.optimizer.defaults.get("fused")
        assert not ref.gan.bn_stats._fast and quick.gan.bn_stats._fast
        parts = {}
        for name, trainer in (("ref", ref), ("fast", quick)):
            p, _ = trainer.gan.losses(z.to(dtype))
            trainer.gan.weighted(p).backward()
            parts[name] = p
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for key in parts["ref"]:
            torch.testing.assert_close(parts["fast"][key], parts["ref"][key], rtol=tol, atol=tol)
        if dtype == torch.float64:  # float32 gradients flip on max-pool near-ties; float64 shows exactness
            for (name, p), q in zip(ref.gan.generator.named_parameters(), quick.gan.generator.parameters()):
                if p.grad is not None and p.grad.norm() > 1e-8:
                    assert rel(q.grad, p.grad) < 1e-9, name
    for b in pair:
        b.model.float()


def test_teachers_unchanged_after_fast_stages(pair) -> None:
    cfg = tiny_config()
    teachers = teacher_set_from_bundles(pair, None)
    before = snapshot(teachers)
    strides = {k: v.stride() for k, v in teachers.state_dict().items()}
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in teachers.models.modules()]
    union = UnionRule(teachers)
    gan = AmalgamatingGAN(teachers, union, cfg.gan)
    trainer = GanTrainer(gan, seed=0, device=CPU)
    for step in range(3):
        trainer.step(step, 3)
    bank = SampleBank.generate(Sampler(gan, seed=0, batch_size=32), 64, progress=False)
    channels = {lvl: s[0] for lvl, s in enumerate(gan.generator_level_shapes())}
    dual = DualGenerator(build_student("lenet5:0.5", teachers), teachers, channels)
    blocks = BlockTrainer(dual, union, cfg.blocks, bank.batches(16, torch.Generator().manual_seed(0)), CPU)
    for b in range(1, dual.num_blocks + 1):
        blocks.start_block(b)
        blocks.step(0, 2)
    after = snapshot(teachers)
    assert set(after) == set(before)  # the compute copies add no state
    assert all(torch.equal(before[k], after[k]) and after[k].stride() == strides[k] for k in before)
    for model in teachers.models.values():
        assert not model.training
        assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    # the stage-1 recorders hook the compute copies, not the teachers
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in teachers.models.modules()]
    assert not any(p.requires_grad or p.grad is not None for p in teachers.parameters())


def stage2_pair(pair, reference: bool, bank: SampleBank, gan_channels: dict[int, int]):
    teachers = teacher_set_from_bundles(pair, None, path_of(reference))
    union = UnionRule(teachers)
    torch.manual_seed(7)
    dual = DualGenerator(build_student("lenet5:0.5", teachers), teachers, gan_channels)
    trainer = BlockTrainer(dual, union, tiny_config().blocks, iter(()), CPU)
    return trainer


def test_stage2_and_finetune_losses_match_the_reference(pair) -> None:
    teachers = teacher_set_from_bundles(pair, None)
    gan = AmalgamatingGAN(teachers, UnionRule(teachers), tiny_config().gan)
    bank = SampleBank.generate(Sampler(gan, seed=0, batch_size=32), 32, progress=False)
    channels = {lvl: s[0] for lvl, s in enumerate(gan.generator_level_shapes())}
    batch = bank.batch(torch.arange(16))
    ref, quick = stage2_pair(pair, True, bank, channels), stage2_pair(pair, False, bank, channels)
    for b in range(1, ref.dual.num_blocks + 1):
        out = {}
        for name, trainer in (("ref", ref), ("fast", quick)):
            trainer.start_block(b)
            out[name] = trainer.block_loss(batch)
            out[name]["loss"].backward()
        for key in ("loss", "stream1", "stream2"):
            torch.testing.assert_close(out["fast"][key], out["ref"][key], rtol=1e-5, atol=1e-6)
        for p, q in zip(ref.dual.block_parameters(b), quick.dual.block_parameters(b)):
            assert rel(q.grad, p.grad) < 1e-3
    losses = []
    for reference, trainer in ((True, ref), (False, quick)):
        net = TargetNet.from_dual(trainer.dual, teachers.label_tasks)
        batches = iter([batch, batch])
        path = path_of(reference)
        tune = FinetuneTrainer(net, trainer.union, tiny_config().regroup, batches, CPU, path=path)
        losses.append([tune.step(0, 2)["loss"], tune.step(1, 2)["loss"]])
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-5, atol=1e-6)
