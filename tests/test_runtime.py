"""Transparency of ``fxshard.compile`` in one process (torchgpipe's ``test_transparency.py``).

A compiled model must behave like the model it was compiled from: the same outputs, the same
loss, and the same gradient in every parameter (tied ones included), within 1e-5 relative,
whatever the strategy, schedule and micro-batch count; a few SGD steps later the parameters
still agree. Every test builds the model with a fixed seed, keeps ``ref = copy.deepcopy(model)``
as the eager reference, and compiles ``model`` itself, so an optimizer built on
``model.parameters()`` trains what the compiled model runs.

In one process ``single`` and ``ddp`` plans run the plain model; ``pipeline`` plans run their
stages in sequence on local devices, micro-batched; ``hybrid`` plans run their first replica's
stages locally. CPU clusters such as "4xcpu:1GB" put every stage on "cpu"; tight budgets such
as "4xcpu:1MB" force the planner to pipeline on its own.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import fxshard
from fxshard.errors import ExecutionError, FxshardError
from fxshard.models import GPT2, Inception, InceptionConfig, Llama, ResNet, ResNetConfig, UNet, UNetConfig
from fxshard.zoo import build

DEVICES = "4xcpu:1GB"
REL = 1e-5
SGD_STEPS = 2
LR = 0.05


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, what: str, rel: float = REL) -> None:
    """Equal within ``rel`` of the expected tensor's largest magnitude (micro-batching and
    stage boundaries change float summation order, so exact equality is not expected)."""
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, expected a tensor"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    if not got.is_floating_point():
        assert torch.equal(got, expected), f"{what}: integer values differ"
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=rel, atol=rel * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


def assert_tree_close(got, expected, what: str = "output") -> None:
    """Same structure (types included, dataclasses too) and tensors within tolerance."""
    assert type(got) is type(expected), f"{what}: type {type(got).__name__} != {type(expected).__name__}"
    if dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_tree_close(getattr(got, f.name), getattr(expected, f.name), f"{what}.{f.name}")
        return
    got_leaves, got_spec = pytree.tree_flatten(got)
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    assert got_spec == exp_spec, f"{what}: structure {got_spec} != {exp_spec}"
    for i, (g, e) in enumerate(zip(got_leaves, exp_leaves)):
        if isinstance(e, torch.Tensor):
            assert_rel_close(g, e, f"{what} leaf {i}")
        else:
            assert g == e, f"{what} leaf {i}: {g!r} != {e!r}"


def assert_grads_close(model: nn.Module, ref: nn.Module) -> None:
    """Every parameter's gradient, under every name (tied ones too), equals the eager one.

    A gradient that is zero in exact arithmetic (an attention key's bias: softmax ignores a
    constant shift) is float noise of ~1e-11 in both runs; such a tensor is compared within
    1e-7 of the largest gradient in the model instead of its own scale."""
    got = dict(model.named_parameters(remove_duplicate=False))
    exp = dict(ref.named_parameters(remove_duplicate=False))
    assert got.keys() == exp.keys()
    largest = max((p.grad.abs().max().item() for p in exp.values() if p.grad is not None and p.grad.numel()),
                  default=0.0)
    for name, p in exp.items():
        if p.grad is None:
            assert got[name].grad is None, f"{name}: has a gradient, eager has none"
            continue
        assert got[name].grad is not None, f"{name}: no gradient after step (eager has one)"
        if p.grad.numel() and p.grad.is_floating_point() and p.grad.abs().max().item() < 1e-7 * largest:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=1e-7 * largest,
                                       msg=lambda m, n=name: f"grad of {n} (zero up to float noise): {m}")
            continue
        assert_rel_close(got[name].grad, p.grad, f"grad of {name}")


def assert_params_close(model: nn.Module, ref: nn.Module, *, buffers: bool = True) -> None:
    """Parameters (and buffers) equal; a parameter that is zero up to float noise (a key bias
    initialised to zero, moved only by its noise gradient) within 1e-7 of the largest one."""
    got = dict(model.named_parameters(remove_duplicate=False))
    largest = max((p.abs().max().item() for p in ref.parameters() if p.numel()), default=0.0)
    for name, p in ref.named_parameters(remove_duplicate=False):
        if p.numel() and p.abs().max().item() < 1e-7 * largest:
            torch.testing.assert_close(got[name].detach(), p.detach(), rtol=0, atol=1e-7 * largest,
                                       msg=lambda m, n=name: f"parameter {n} (zero up to float noise): {m}")
            continue
        assert_rel_close(got[name], p, f"parameter {name}")
    if buffers:
        got_b = dict(model.named_buffers())
        for name, b in ref.named_buffers():
            assert_rel_close(got_b[name], b, f"buffer {name}")


def check_transparency(model: nn.Module, args: tuple, target, loss_fn, *, kwargs: dict | None = None,
                       devices=DEVICES, lazy: bool = False, sgd_steps: int = SGD_STEPS,
                       **options) -> fxshard.CompiledModel:
    """Compile ``model`` and check outputs, loss, every gradient and a few SGD steps against a
    deep copy run eagerly. Returns the compiled model."""
    kwargs = kwargs or {}
    ref = copy.deepcopy(model)
    if lazy:
        compiled = fxshard.compile(model, devices, **options)
    else:
        compiled = fxshard.compile(model, devices, args, example_kwargs=kwargs or None, **options)
    assert model.training == ref.training, "compile changed the model's train/eval mode"

    # Forward over the whole batch.
    assert_tree_close(compiled(*args, **kwargs), ref(*args, **kwargs))

    # One step: loss and every gradient.
    loss = compiled.step(*args, target=target, **kwargs, loss_fn=loss_fn)
    out = ref(*args, **kwargs)
    ref_loss = loss_fn(out, target) if target is not None else loss_fn(out)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)

    # A few SGD steps with optimizers over the user's own parameters.
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    opt.step()
    ref_opt.step()
    assert_params_close(model, ref)
    for i in range(sgd_steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = compiled.step(*args, target=target, **kwargs, loss_fn=loss_fn)
        out = ref(*args, **kwargs)
        ref_loss = loss_fn(out, target) if target is not None else loss_fn(out)
        ref_loss.backward()
        assert_rel_close(loss, ref_loss.detach(), f"loss at SGD step {i + 1}")
        assert_grads_close(model, ref)
        opt.step()
        ref_opt.step()
        assert_params_close(model, ref)
    return compiled


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def zoo_case(name: str, batch: int = 4):
    """(model, args, target, loss_fn) for a zoo model, with fixed seeds."""
    if name == "mlp":
        z = build("mlp", batch_size=batch, seed=0)
        target = torch.randn(batch, z.model.config.out_features, generator=torch.Generator().manual_seed(1))
        return z.model, z.example_inputs, target, F.mse_loss
    z = build(name, batch_size=batch, seq_len=16, seed=0)
    vocab = z.model.config.vocab_size
    target = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(1))
    return z.model, z.example_inputs, target, lm_loss


def check_plan(compiled: fxshard.CompiledModel, strategy: str, schedule: str | None, microbatches: int | None) -> None:
    plan = compiled.plan
    assert compiled.strategy == plan.strategy == strategy
    if strategy in ("pipeline", "hybrid"):
        assert plan.num_stages >= 2, f"{strategy} plan with {plan.num_stages} stage(s)"
        assert plan.schedule == schedule
        assert plan.microbatches == microbatches
        assert all(d.endswith("cpu") for s in plan.stages for d in s.devices)
    if strategy == "hybrid":
        assert plan.replicas >= 2
    if strategy == "ddp":
        assert plan.replicas >= 2


# (strategy, schedule, micro-batches)
RUNS = [
    ("single", None, None),
    ("ddp", None, None),
    ("pipeline", "gpipe", 1),
    ("pipeline", "gpipe", 4),
    ("pipeline", "1f1b", 2),
    ("pipeline", "interleaved1f1b", 4),
    ("pipeline", "zbv", 2),
    ("hybrid", "1f1b", 2),
]


def _run_id(run) -> str:
    strategy, schedule, m = run
    return strategy if schedule is None else f"{strategy}-{schedule}-m{m}"


# ---------------------------------------------------------------------------------------
# Zoo models without BatchNorm: every strategy, schedule and micro-batch count
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny", "llama-tiny"])
def test_transparency_zoo(name, run):
    strategy, schedule, m = run
    torch.manual_seed(0)
    model, args, target, loss_fn = zoo_case(name)
    opts = {"strategy": strategy}
    if schedule is not None:
        opts.update(schedule=schedule, microbatches=m)
    compiled = check_transparency(model, args, target, loss_fn, **opts)
    check_plan(compiled, strategy, schedule, m)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_tight_budget_pipelines_on_its_own_and_stays_transparent(name):
    model, args, target, loss_fn = zoo_case(name)
    compiled = check_transparency(model, args, target, loss_fn, devices="4xcpu:1MB")
    assert compiled.strategy == "pipeline"
    assert compiled.plan.num_stages >= 2


@pytest.mark.parametrize("run", [("pipeline", "gpipe", 2), ("pipeline", "interleaved1f1b", 4),
                                 ("hybrid", "gpipe", 2)], ids=_run_id)
def test_tied_lm_head_stays_tied_and_gets_the_eager_gradient(run):
    strategy, schedule, m = run
    model, args, target, loss_fn = zoo_case("gpt2-tiny")
    assert model.lm_head.weight is model.wte.weight
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, args, strategy=strategy, schedule=schedule, microbatches=m)
    assert model.lm_head.weight is model.wte.weight
    # The embedding and the head land on different stages, so the tie crosses a boundary.
    stage_of = compiled.plan.stage_of()
    assert stage_of["wte"] != stage_of["lm_head"]
    loss = compiled.step(*args, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(*args), target)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert model.lm_head.weight is model.wte.weight
    # One gradient: the sum of the embedding's and the head's contributions, as in eager.
    assert_rel_close(model.wte.weight.grad, ref.wte.weight.grad, "grad of the tied weight")
    assert model.lm_head.weight.grad is model.wte.weight.grad
    # Each tied parameter counts once in parameters(), as in the model.
    assert sum(p is model.wte.weight for p in compiled.parameters()) == 1


# ---------------------------------------------------------------------------------------
# BatchNorm models
#
# In training mode BatchNorm normalises with the statistics of the batch it sees. With
# micro-batches > 1 each micro-batch is normalised by its own statistics and the running
# statistics are updated once per micro-batch, so outputs, gradients and running stats differ
# from eager BY DESIGN (as in GPipe and torchgpipe without DeferredBatchNorm). So: in train
# mode we compare with microbatches=1 (running stats included); with micro-batches > 1 we
# compare in eval mode, where BatchNorm uses the fixed running statistics.
# ---------------------------------------------------------------------------------------


def bn_case(name: str, batch: int | None = None):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "resnet":
        model, shape, classes = ResNet(ResNetConfig()), (batch or 2, 3, 64, 64), 1000
    elif name == "unet":
        model, shape, classes = UNet(UNetConfig()), (batch or 1, 3, 64, 64), 21
    else:
        model, shape, classes = Inception(InceptionConfig()), (batch or 2, 3, 96, 96), 1000
    x = torch.randn(*shape, generator=gen)
    if name == "unet":
        target = torch.randint(0, classes, (shape[0], *shape[2:]), generator=gen)
    else:
        target = torch.randint(0, classes, (shape[0],), generator=gen)
    return model, (x,), target, F.cross_entropy


BN_MODELS = ["resnet", "unet", "inception"]


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_train_mode_one_microbatch(name):
    """Train mode, microbatches=1: loss, every gradient, and the user's BatchNorm running
    statistics after one step are those of eager; then an SGD step and a forward agree too.
    In float64: after the step, batch-2 statistics in a deep net amplify float32 rounding
    (a reordered sum in another split) to ~1e-3 in the logits; in float64 they agree exactly."""
    model, args, target, loss_fn = bn_case(name)
    model.double().train()
    args = tuple(a.double() for a in args)
    before = {k: b.clone() for k, b in model.named_buffers()}
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=1)
    check_plan(compiled, "pipeline", "gpipe", 1)

    loss = compiled.step(*args, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(*args), target)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)
    # The running statistics live in the user's modules and moved exactly as eager's did.
    got = dict(model.named_buffers())
    n_bn = 0
    for k, b in ref.named_buffers():
        assert_rel_close(got[k], b, f"buffer {k} after one step")
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == 1, f"{k} = {int(got[k])} after one step with one micro-batch"
            n_bn += 1
        elif k.endswith("running_mean"):
            assert not torch.equal(got[k], before[k]), f"{k} did not move"
    assert n_bn > 0

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    opt.step()
    ref_opt.step()
    assert_params_close(model, ref)
    assert_tree_close(compiled(*args), ref(*args))  # train-mode forward: batch statistics again
    assert_params_close(model, ref)  # buffers included


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "unet" else n for n in BN_MODELS])
def test_batchnorm_eval_mode_many_microbatches(name):  # the U-Net case (6.5 s) runs outside the fast lane
    """Eval mode, several micro-batches, in float64: with random weights and fresh running
    statistics these deep nets amplify float32 rounding, so that eager itself, run on the same
    micro-batches, differs from eager on the whole batch by more than 1e-5 in some gradients
    (U-Net: 1e-3); in float64 that noise is ~1e-14 and any real difference shows."""
    model, args, target, loss_fn = bn_case(name, batch=2)
    model.double().eval()
    args = tuple(a.double() for a in args)
    # float64 doubles the state: 2 GB devices hold it with Adam's step temporaries (cost_models/optimizer_step.py)
    compiled = check_transparency(model, args, target, loss_fn, strategy="pipeline", schedule="1f1b",
                                  microbatches=2, sgd_steps=0, devices="4xcpu:2GB")
    check_plan(compiled, "pipeline", "1f1b", 2)
    assert not model.training


# ---------------------------------------------------------------------------------------
# Models written here: keyword inputs, dict and dataclass outputs, a parameter under two
# names, a module called twice, non-tensor values crossing stages
# ---------------------------------------------------------------------------------------

D = 16


class _Trunk(nn.Module):
    """Shared body: ``inp`` is also reachable as ``alias``; ``block`` runs twice; ``n`` (a
    Python int from ``x.size(1)``) is made first and used last, so it crosses every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.block = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.mid = nn.ModuleList(nn.Linear(D, D) for _ in range(4))
        self.alias = self.inp  # the same Parameters under a second name
        self.head = nn.Linear(D, 4)
        self.aux_head = nn.Linear(D, 1)

    def body(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.size(1)
        h = self.block(self.inp(x) * mask)
        for layer in self.mid:
            h = torch.relu(layer(h))
        h = self.block(h)  # the same module, second call
        h = self.alias(h) / n
        return self.head(h), self.aux_head(h).squeeze(-1) * n


class DictNet(_Trunk):
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux = self.body(x, mask)
        return {"logits": logits, "aux": aux}


@dataclasses.dataclass
class NetOutput:
    logits: torch.Tensor
    aux: torch.Tensor


class DataclassNet(_Trunk):
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> NetOutput:
        logits, aux = self.body(x, mask)
        return NetOutput(logits=logits, aux=aux)


def _custom_inputs(batch: int = 4):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, D, generator=gen)
    mask = torch.rand(batch, D, generator=gen)
    target = torch.randn(batch, 4, generator=gen)
    return x, mask, target


def dict_loss(out, target):
    return F.mse_loss(out["logits"], target) + out["aux"].pow(2).mean()


def dataclass_loss(out, target):
    return F.mse_loss(out.logits, target) + out.aux.pow(2).mean()


CUSTOM_RUNS = [("single", None, None), ("pipeline", "gpipe", 2), ("pipeline", "1f1b", 4),
               ("pipeline", "interleaved1f1b", 4), ("hybrid", "gpipe", 2)]


@pytest.mark.parametrize("run", [pytest.param(r, id=_run_id(r)) for r in CUSTOM_RUNS])
def test_keyword_inputs_and_dict_outputs(run):
    strategy, schedule, m = run
    torch.manual_seed(0)
    model = DictNet()
    x, mask, target = _custom_inputs()
    opts = {"strategy": strategy}
    if schedule is not None:
        opts.update(schedule=schedule, microbatches=m)
    compiled = check_transparency(model, (x,), target, dict_loss, kwargs={"mask": mask}, **opts)
    check_plan(compiled, strategy, schedule, m)


def test_captured_graph_rebuilds_a_plain_dict_output():
    """The smallest repro of the dict-output bug, at the capture level."""
    torch.manual_seed(0)
    model = DictNet()
    x, mask, _ = _custom_inputs()
    captured = fxshard.capture(model, (x,), example_kwargs={"mask": mask})
    out = captured(x, mask=mask)
    assert type(out) is dict
    assert_tree_close(out, model(x, mask=mask))


@pytest.mark.parametrize("run", [pytest.param(r, id=_run_id(r)) for r in CUSTOM_RUNS])
def test_keyword_inputs_dataclass_output_alias_reuse_and_int_across_stages(run):
    strategy, schedule, m = run
    torch.manual_seed(0)
    model = DataclassNet()
    x, mask, target = _custom_inputs()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "inp.weight" in names and "alias.weight" in names
    opts = {"strategy": strategy}
    if schedule is not None:
        opts.update(schedule=schedule, microbatches=m)
    compiled = check_transparency(model, (x,), target, dataclass_loss, kwargs={"mask": mask}, **opts)
    check_plan(compiled, strategy, schedule, m)
    assert model.alias is model.inp
    if strategy in ("pipeline", "hybrid"):
        # The int n = x.size(1) is made on stage 0 and read on the last stage.
        captured = fxshard.capture(model, (x,), example_kwargs={"mask": mask})
        stage_of = compiled.plan.stage_of()
        size = next(node for node in captured.nodes if node.op == "call_method" and node.target == "size")
        assert isinstance(size.meta["val"], int)
        last_use = max(stage_of[u.name] for u in size.users)
        assert last_use > stage_of[size.name], "the size value does not cross a stage boundary"
        if schedule == "interleaved1f1b":
            assert last_use - stage_of[size.name] >= 2, "expected the int to pass through a middle stage"


def test_keyword_inputs_as_a_dict_of_example_inputs():
    """SPEC: example_inputs may be a dict of keyword inputs."""
    torch.manual_seed(0)
    model = DataclassNet()
    x, mask, _target = _custom_inputs()
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, {"x": x, "mask": mask}, strategy="pipeline", schedule="gpipe",
                               microbatches=2)
    assert compiled.plan.num_stages >= 2
    assert_tree_close(compiled(x, mask=mask), ref(x, mask=mask))


def test_step_without_target_calls_loss_fn_on_the_output_alone():
    model, args, _, _ = zoo_case("gpt2-tiny")

    def loss_fn(logits):
        return logits.pow(2).mean()

    check_transparency(model, args, None, loss_fn, strategy="pipeline", schedule="1f1b", microbatches=2,
                       sgd_steps=1)


def test_loss_fn_given_to_compile_is_used_by_step():
    model, args, target, loss_fn = zoo_case("llama-tiny")
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=2,
                               loss_fn=loss_fn)
    loss = compiled.step(*args, target=target)
    ref_loss = loss_fn(ref(*args), target)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)


class ManyOutputs(nn.Module):
    """Outputs of every kind: an int, an early tensor, the input itself, a repeated tensor,
    None, a torch.Size and a chunk of a tensor; the early ones pass through later stages."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

    def forward(self, x: torch.Tensor):
        n, shape = x.size(1), x.shape
        early = self.layers[0](x)
        h = early
        for layer in self.layers[1:]:
            h = torch.tanh(layer(h))
        _, b = h.chunk(2, dim=-1)
        return h, n, early, x, (h, h), None, shape, b * 2.0


def many_outputs_loss(out):
    h, n, early, x, pair, _, _, b = out
    return h.pow(2).mean() + early.mean() + pair[1].mean() + b.mean() * n + x.mean()


@pytest.mark.parametrize("run", [("pipeline", "gpipe", 2), ("pipeline", "interleaved1f1b", 4)], ids=_run_id)
def test_non_tensor_and_pass_through_outputs(run):
    strategy, schedule, m = run
    torch.manual_seed(0)
    model = ManyOutputs()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    compiled = check_transparency(model, (x,), None, many_outputs_loss, strategy=strategy, schedule=schedule,
                                  microbatches=m, sgd_steps=1)
    check_plan(compiled, strategy, schedule, m)
    out = compiled(x)
    assert out[1] == 8 and type(out[1]) is int
    assert out[5] is None
    assert out[6] == torch.Size([4, 8])
    assert out[4][0] is out[4][1] or torch.equal(out[4][0], out[4][1])


class ListOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.a(x)
        return [self.b(torch.relu(h)), h]


class TupleOut(ListOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return self.b(torch.relu(h)), h


class OneItemListOut(ListOut):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.b(torch.relu(self.a(x)))]


@pytest.mark.parametrize("cls", [ListOut, OneItemListOut])
def test_list_output_comes_back_as_the_same_list(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(4, 8)
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, (x,), strategy="pipeline", schedule="gpipe", microbatches=2)
    assert_tree_close(compiled(x), ref(x))


def test_switching_the_model_to_eval_after_compile_is_followed():
    """BatchNorm (a module) reads the user's module's mode at call time."""
    model, args, _, _ = bn_case("resnet")
    model.train()
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=1)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_tree_close(compiled(*args), ref(*args))
    assert all(int(b) == 0 for k, b in model.named_buffers() if k.endswith("num_batches_tracked"))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.relu(self.a(x)), 0.5, self.training)
        return self.c(torch.relu(self.b(h)))


def test_functional_dropout_follows_eval_after_compile():
    torch.manual_seed(0)
    model = FunctionalDropout()
    x = torch.randn(4, 8)
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, (x,), strategy="pipeline", schedule="gpipe", microbatches=2)
    model.eval()
    ref.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        assert_tree_close(compiled(x), ref(x))


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_a_tuple_target_is_split_into_microbatches():
    torch.manual_seed(0)
    model = TupleOut()
    x = torch.randn(4, 8)
    target = (torch.randn(4, 8), torch.randn(4, 8))

    def loss_fn(out, tgt):
        return F.mse_loss(out[0], tgt[0]) + F.mse_loss(out[1], tgt[1])

    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, (x,), strategy="pipeline", schedule="gpipe", microbatches=2)
    loss = compiled.step(x, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(x), target)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)


@pytest.mark.parametrize("devices", [2, ["cpu", "cpu"], [torch.device("cpu")] * 3, "2xcpu:1GB"],
                         ids=["int", "strings", "torch-devices", "cluster-string"])
def test_every_form_of_devices_runs_locally(devices):
    model, args, target, loss_fn = zoo_case("gpt2-tiny")
    compiled = check_transparency(model, args, target, loss_fn, devices=devices, strategy="pipeline",
                                  schedule="gpipe", microbatches=2, sgd_steps=0)
    assert compiled.plan.num_stages >= 2


def test_frozen_parameters_get_no_gradient():
    model, args, target, loss_fn = zoo_case("llama-tiny")
    model.tok_embeddings.requires_grad_(False)
    model.layers[0].requires_grad_(False)
    check_transparency(model, args, target, loss_fn, strategy="pipeline", schedule="1f1b", microbatches=2,
                       sgd_steps=1)
    assert model.tok_embeddings.weight.grad is None
    assert all(p.grad is None for p in model.layers[0].parameters())


# ---------------------------------------------------------------------------------------
# Lazy planning
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["forward", "step"])
def test_compile_without_example_inputs_plans_at_the_first_call(first):
    model, args, target, loss_fn = zoo_case("gpt2-tiny")
    ref = copy.deepcopy(model)
    compiled = fxshard.compile(model, DEVICES, strategy="pipeline", schedule="gpipe", microbatches=2)
    with pytest.raises(ExecutionError, match="no plan yet"):
        _ = compiled.plan
    with pytest.raises(ExecutionError):
        _ = compiled.strategy
    if first == "forward":
        assert_tree_close(compiled(*args), ref(*args))
    else:
        loss = compiled.step(*args, target=target, loss_fn=loss_fn)
        ref_loss = loss_fn(ref(*args), target)
        ref_loss.backward()
        assert_rel_close(loss, ref_loss.detach(), "loss")
        assert_grads_close(model, ref)
    plan = compiled.plan
    assert plan.strategy == compiled.strategy == "pipeline"
    assert plan.batch_size == args[0].shape[0]
    assert plan.num_stages >= 2


def test_lazy_compile_with_keyword_inputs_is_transparent():
    torch.manual_seed(0)
    model = DataclassNet()
    x, mask, target = _custom_inputs()
    check_transparency(model, (x,), target, dataclass_loss, kwargs={"mask": mask}, lazy=True,
                       strategy="pipeline", schedule="1f1b", microbatches=2, sgd_steps=1)


def test_lazy_compile_auto_strategy_on_a_tight_budget():
    model, args, target, loss_fn = zoo_case("llama-tiny")
    compiled = check_transparency(model, args, target, loss_fn, devices="4xcpu:1MB", lazy=True, sgd_steps=1)
    assert compiled.strategy == "pipeline"


# ---------------------------------------------------------------------------------------
# parameters() and state_dict()
# ---------------------------------------------------------------------------------------


def _fresh(model: nn.Module) -> nn.Module:
    """A model of the same architecture with different weights."""
    torch.manual_seed(1234)
    if isinstance(model, (GPT2, Llama)):
        return type(model)(model.config)
    return type(model)()


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "dataclass-net"])
@pytest.mark.parametrize("strategy", ["single", "pipeline"])
def test_parameters_are_the_models_own_and_state_dict_round_trips(name, strategy):
    if name == "dataclass-net":
        torch.manual_seed(0)
        model = DataclassNet()
        x, mask, target = _custom_inputs()
        args, kwargs, loss_fn = (x,), {"mask": mask}, dataclass_loss
    else:
        model, args, target, loss_fn = zoo_case(name)
        kwargs = {}
    opts = {"strategy": strategy}
    if strategy == "pipeline":
        opts.update(schedule="gpipe", microbatches=2)
    compiled = fxshard.compile(model, DEVICES, args, example_kwargs=kwargs or None, **opts)

    # The model's own Parameter objects, in the model's order.
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in model.named_parameters()]

    # Train a step so the state differs from any fresh initialisation.
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    compiled.step(*args, target=target, loss_fn=loss_fn, **kwargs)
    opt.step()

    state = compiled.state_dict()
    assert list(state.keys()) == list(model.state_dict().keys())
    fresh = _fresh(model)
    assert not torch.equal(next(iter(fresh.parameters())), next(iter(model.parameters())))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert_tree_close(fresh(*args, **kwargs), compiled(*args, **kwargs))

    # And back: state saved from another model loads into the compiled one.
    other = _fresh(model)
    compiled.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_tree_close(compiled(*args, **kwargs), other(*args, **kwargs))
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_a_plan_for_another_model_is_refused_with_fingerprints():
    model_a, args_a, _, _ = zoo_case("gpt2-tiny")
    model_b, args_b, _, _ = zoo_case("llama-tiny")
    plan = fxshard.plan(model_a, DEVICES, args_a, strategy="pipeline", schedule="gpipe", microbatches=2)
    with pytest.raises(ExecutionError, match="fingerprint") as info:
        fxshard.CompiledModel(model_b, DEVICES, args_b, plan=plan)
    assert isinstance(info.value, FxshardError)
    assert plan.model.fingerprint in str(info.value)


def test_a_plan_for_other_input_shapes_is_refused():
    model, args, _, _ = zoo_case("gpt2-tiny")
    plan = fxshard.plan(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=2)
    longer = (torch.randint(0, 256, (4, 32)),)
    with pytest.raises(ExecutionError, match="fingerprint"):
        fxshard.CompiledModel(model, DEVICES, longer, plan=plan)


def test_a_plan_for_the_same_model_is_accepted_and_runs():
    model, args, target, loss_fn = zoo_case("llama-tiny")
    ref = copy.deepcopy(model)
    plan = fxshard.plan(model, DEVICES, args, strategy="pipeline", schedule="1f1b", microbatches=2)
    compiled = fxshard.CompiledModel(model, DEVICES, args, plan=plan)
    assert compiled.plan is plan
    loss = compiled.step(*args, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(*args), target)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)


@pytest.mark.parametrize("strategy", ["single", "pipeline"])
def test_step_without_a_loss_fn_is_refused(strategy):
    model, args, target, _ = zoo_case("mlp")
    opts = {"strategy": strategy}
    if strategy == "pipeline":
        opts.update(schedule="gpipe", microbatches=2)
    compiled = fxshard.compile(model, DEVICES, args, **opts)
    with pytest.raises(ExecutionError, match="loss_fn"):
        compiled.step(*args, target=target)
    assert all(p.grad is None for p in model.parameters())


def test_a_batch_the_microbatch_count_does_not_divide_is_refused():
    model, args, target, loss_fn = zoo_case("gpt2-tiny")
    compiled = fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=4)
    odd = (args[0][:3],)
    with pytest.raises(ExecutionError, match=r"3 .*4 .*micro-batches|4 .*3"):
        compiled.step(*odd, target=target[:3], loss_fn=loss_fn)
    # Nothing ran: no gradient was accumulated before the error.
    assert all(p.grad is None for p in model.parameters())


def test_microbatches_that_do_not_divide_the_example_batch_are_refused_at_planning():
    model, args, _, _ = zoo_case("gpt2-tiny")
    with pytest.raises(FxshardError):
        fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=3)


# ---------------------------------------------------------------------------------------
# The loss call: a missing or misshapen target, and the user's own errors (issue 12, item 7)
# ---------------------------------------------------------------------------------------


def _loss_case(strategy: str):
    model, args, target, loss_fn = zoo_case("gpt2-tiny")
    opts = {"strategy": strategy}
    if strategy == "pipeline":
        opts.update(schedule="gpipe", microbatches=2)
    return fxshard.compile(model, DEVICES, args, loss_fn=loss_fn, **opts), model, args, target


@pytest.mark.parametrize("strategy", ["single", "ddp", "pipeline"])
def test_step_without_a_target_the_loss_needs_is_refused_before_running(strategy):
    compiled, model, args, target = _loss_case(strategy)
    with pytest.raises(ExecutionError) as info:
        compiled.step(*args)
    text = str(info.value)
    assert "loss_fn(output)" in text and "lm_loss needs two arguments (output, target)" in text, text
    assert "a batch of 4" in text and "Pass target=" in text, text
    assert all(p.grad is None for p in model.parameters()), "refused, yet something ran"
    assert compiled.step(*args, target=target) is not None  # the model stays usable


@pytest.mark.parametrize("strategy", ["single", "ddp", "pipeline"])
def test_a_target_of_another_batch_size_is_an_execution_error_naming_the_sizes(strategy):
    compiled, model, args, target = _loss_case(strategy)
    with pytest.raises(ExecutionError) as info:
        compiled.step(*args, target=target[:3])
    text = str(info.value)
    assert "loss_fn(output, target)" in text and "lm_loss" in text, text
    assert "3 rows" in text and "batch of 4" in text and "one row per input row (4 rows)" in text, text
    if strategy == "pipeline":  # refused before any micro-batch ran
        assert "2 micro-batches of 2" in text and "target 1.5 rows" in text, text
        assert all(p.grad is None for p in model.parameters())
    else:  # one piece: torch's own error, explained and chained
        assert "the output has 4 rows and the target 3 rows (a batch of 4 in one piece)" in text, text
        assert isinstance(info.value.__cause__, ValueError), repr(info.value.__cause__)


def test_a_target_with_a_row_per_token_still_pairs_with_each_micro_batch():
    """A flattened target (batch x seq rows) is split with the batch: refusing it would break
    a loss that flattens its output the same way."""
    compiled, model, args, target = _loss_case("pipeline")
    ref = copy.deepcopy(model)

    def flat_loss(logits, flat_target):
        return F.cross_entropy(logits.flatten(0, 1), flat_target)

    loss = compiled.step(*args, target=target.flatten(), loss_fn=flat_loss)
    ref_loss = flat_loss(ref(*args), target.flatten())
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)


class _OwnLossError(Exception):
    pass


@pytest.mark.parametrize("strategy", ["single", "pipeline"])
def test_errors_from_inside_the_loss_stay_recognisable(strategy):
    compiled, _, args, target = _loss_case(strategy)

    def picky(logits, tgt):
        raise ValueError("logits must be float16")

    with pytest.raises(ExecutionError, match="ValueError: logits must be float16") as info:
        compiled.step(*args, target=target, loss_fn=picky)
    assert isinstance(info.value.__cause__, ValueError) and "float16" in str(info.value.__cause__)
    assert "inside the loss" in str(info.value)

    def own(logits, tgt):
        raise _OwnLossError("the user's own")

    with pytest.raises(_OwnLossError, match="the user's own"):
        compiled.step(*args, target=target, loss_fn=own)


# ---------------------------------------------------------------------------------------
# Call-time input checks say whether the shape or the dtype differs (issue 12, item 9)
# ---------------------------------------------------------------------------------------


def test_a_dtype_mismatch_is_reported_as_a_dtype_with_the_conversion():
    model, args, _, _ = zoo_case("mlp")
    compiled = fxshard.compile(model, DEVICES, args, strategy="pipeline", schedule="gpipe", microbatches=2)
    (x,) = args
    with pytest.raises(ExecutionError) as info:
        compiled(x.double())
    text = str(info.value)
    assert "has dtype torch.float64" in text and "compiled for dtype torch.float32" in text, text
    assert f"its shape {tuple(x.shape)} matches" in text and ".to(torch.float32)" in text, text
    assert "has shape" not in text, text
    with pytest.raises(ExecutionError) as info:
        compiled(x[:, :3])
    text = str(info.value)
    assert "has shape (4, 3)" in text and f"compiled for shape (batch, {x.shape[1]})" in text, text
    assert "its dtype torch.float32 matches" in text, text
    with pytest.raises(ExecutionError) as info:
        compiled(x[:, :3].double())
    text = str(info.value)
    assert "has shape (4, 3)" in text and "dtype differs too: torch.float64, compiled for torch.float32" in text


def test_data_parallel_plans_accumulate_in_one_process():
    """A ddp plan with micro-batches runs them one after another in one process (the memory
    its plan counted on), and the gradients are those of the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    rows: list[int] = []
    model[0].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    compiled = fxshard.compile(model, "2xcpu:1GB", (x,), strategy="ddp", microbatches=2)
    assert compiled.plan.microbatches == 2 and compiled.plan.data_parallel == "ddp"
    rows.clear()
    loss = compiled.step(x, target=y, loss_fn=F.mse_loss)
    assert rows == [4, 4]
    expected = F.mse_loss(reference(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
