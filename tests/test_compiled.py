"""`--compile` on the CPU: BatchNorm opaque to Inductor computes exactly what nn.BatchNorm2d does,
a compiled ResNet-20, ResNet-9 and ensemble of two ResNet-9 train like the eager ones (with BatchNorm
left to ATen and to Inductor), and which of the two a CPU gets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train import compiled
from train.compiled import OpaqueBatchNorm2d, batchnorm_backend, compile_module, opaque_batchnorm
from train.engine import training_loss
from train.models import create_model


def _bf16_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.clone() for p in model.parameters()]


def test_opaque_batchnorm_matches_batchnorm():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).to(memory_format=torch.channels_last)
    new = opaque_batchnorm(copy.deepcopy(ref))
    assert type(new[1]) is OpaqueBatchNorm2d and new.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(8, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        out_ref, grads_ref = _bf16_step(ref, x)
        out_new, grads_new = _bf16_step(new, x)
        assert torch.equal(out_ref, out_new)
        for a, b in zip(grads_ref, grads_new):
            assert torch.equal(a, b)
    bn_ref, bn_new = ref[1], new[1]
    assert bn_new.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 2
    torch.testing.assert_close(bn_new.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_new.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    ref.eval(), new.eval()
    torch.testing.assert_close(new(x), ref(x))


@pytest.mark.parametrize("name, classes, channels, size, kwargs, batchnorm", [
    ("resnet20", 10, 3, 32, {}, "aten"),
    ("resnet20", 10, 3, 32, {}, "inductor"),  # what CPUs with AMX get
    # ResNet-9's global max pooling as torch.amax gave non-finite gradients here from the first step
    ("resnet9", 7, 1, 48, {"width": 16}, "aten"),
    # --ensemble: the members' (members, N, classes) training logits through the compiled step
    ("resnet9", 7, 1, 48, {"width": 8, "ensemble": 2}, "aten"),
])
def test_compiled_model_trains_like_eager(name, classes, channels, size, kwargs, batchnorm, monkeypatch):
    monkeypatch.setenv("RESLAB_COMPILE_BATCHNORM", batchnorm)
    torch.manual_seed(0)
    eager = create_model(name, classes, channels, **kwargs).to(memory_format=torch.channels_last)
    model = copy.deepcopy(eager)
    step_fn = compile_module(model, torch.device("cpu"))
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == ({OpaqueBatchNorm2d} if batchnorm == "aten" else {nn.BatchNorm2d})
    # a batch of 8: on a CPU without bf16 instructions a bf16 step is ~8x slower than fp32 (2.4 s for ResNet-20
    # at 32 on an AVX2-only AMD EPYC, 0.45 s at 8); what is checked does not depend on the batch
    x = torch.randn(8, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (8,))
    losses = {}
    counters = torch._dynamo.utils.counters  # what Dynamo captured: a compile that fell back to eager captures nothing
    counters.clear()
    for mode, m, fn in (("eager", eager, eager), ("compiled", model, step_fn)):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses[mode] = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = training_loss(nn.CrossEntropyLoss(), fn(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters()), f"{mode}: non-finite gradients"
            opt.step()
            losses[mode].append(loss.item())
    # the whole network became one graph (forward; its backward follows it), with no break back to Python
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)
    # bf16 fusion changes rounding, not the computation: the losses agree to well under 1%
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)
    assert losses["compiled"][-1] < losses["compiled"][0]  # and it learns
    # the running statistics moved identically (the custom op updates them outside the graph, Inductor in it)
    for a, b in zip(eager.modules(), model.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 3
            torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0.05, atol=0.02)


def test_compile_decision_flags_win_and_auto_only_where_it_pays(monkeypatch):
    from train.config import TrainConfig
    from train.engine import AUTO_COMPILE_MIN_STEPS, compile_decision

    cpu, long = torch.device("cpu"), AUTO_COMPILE_MIN_STEPS

    def decide(steps: int = long, precision: str = "bf16", **kw) -> tuple[bool, str]:
        return compile_decision(TrainConfig(**kw).resolved(), cpu, precision, steps)

    assert decide(compile=True, model="resnet9", steps=10) == (True, "--compile")  # asked for: always
    assert decide(compile=False) == (False, "--no-compile")
    monkeypatch.setenv("CXX", "g++")  # the rule below does not depend on this machine's compilers
    assert decide() == (True, f"auto: resnet20, {long} steps on a bf16 CPU")  # CIFAR-10's default model
    assert decide(model="plain56")[0] and decide(model="resnet110")[0]
    assert not decide(steps=long - 1)[0]  # too short to repay ~25 s of compilation
    assert decide(time_budget=599.0) == (False, "auto: a 9:59 budget does not repay the compilation (< 10:00)")
    assert decide(time_budget=600.0)[0]  # a budget's own step count is only known once it is timed
    assert not decide(precision="fp32")[0]
    assert not decide(model="resnet9")[0]  # it compiles, but its compiled step was slower (docs/performance.md)
    assert not decide(model="resnet20", model_args={"shortcut": "B"})[0]  # not the checked variant
    assert not decide(dataset="fer2013")[0]  # FER-2013's default model is resnet9
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "")
    assert decide() == (False, "auto: no C++ compiler for Inductor")


def test_batchnorm_backend_by_cpu_and_by_request(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("RESLAB_COMPILE_BATCHNORM", raising=False)
    for amx, expected in ((True, "inductor"), (False, "aten")):  # measured faster on each (docs/performance.md)
        monkeypatch.setattr(compiled, "cpu_has_flag", lambda flag, amx=amx: amx and flag == "amx_bf16")
        assert batchnorm_backend(cpu) == expected
        assert batchnorm_backend(cuda) == "inductor"  # GPUs: Inductor's own kernels, as before
    monkeypatch.setenv("RESLAB_COMPILE_BATCHNORM", " ATen ")
    assert batchnorm_backend(cuda) == "aten"
    monkeypatch.setenv("RESLAB_COMPILE_BATCHNORM", "triton")
    with pytest.raises(ValueError, match="RESLAB_COMPILE_BATCHNORM='triton': choose aten or inductor"):
        batchnorm_backend(cpu)
