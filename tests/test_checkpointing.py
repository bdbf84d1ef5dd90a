"""Activation checkpointing in one process: losses and gradients equal eager; names unchanged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import fxshard
from fxshard.capture import capture
from fxshard.cost_models import estimate
from fxshard.cost_models.checkpointing import checkpoint_cost
from fxshard.devices import get_preset
from fxshard.errors import ExecutionError
from fxshard.models.language import GPT2, GPT2Config
from fxshard.passes.regions import regions_within, repeated_blocks
from fxshard.passes.split import split_graph
from fxshard.runtime.checkpointing import CheckpointedBlock, apply_checkpointing, kept_by_selective
from tests.tiny_models import hf_llama

POLICIES = ("selective", "full")


def _lm_loss(out, target):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _gpt2():
    """A 6-block GPT-2 with a tied LM head (a 2-stage pipeline then holds whole blocks)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=6, n_head=4, n_embd=64, vocab_size=256, block_size=64))
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, (idx,), idx.roll(-1, dims=1)


def _hf_llama():
    model, ids = hf_llama(layers=4, batch=4)
    return model, (ids,), ids.roll(-1, dims=1)


class _DropBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(16, 32), nn.Linear(32, 16), nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(self.fc2(self.drop(torch.relu(self.fc1(x)))))


class _DropNet(nn.Module):
    """Repeated blocks with dropout, in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_DropBlock() for _ in range(4))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _dropnet():
    torch.manual_seed(0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    return _DropNet().train(), (x,), torch.randn(8, 4, generator=torch.Generator().manual_seed(3))


MODELS = {"gpt2": (_gpt2, _lm_loss), "hf-llama": (_hf_llama, _lm_loss), "dropout": (_dropnet, F.mse_loss)}


def _eager(model, args, target, loss_fn):
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    loss = loss_fn(reference(*args), target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in reference.named_parameters()}


def _with_policy(plan, policy):
    stages = tuple(dataclasses.replace(s, activation_checkpointing=policy) for s in plan.stages)
    return dataclasses.replace(plan, stages=stages)


# The Hugging Face pipeline cases (about 6 s each) run in the slow lane; its single cases stay fast.
SLOW_CASES = {("pipeline", "hf-llama")}
TRAINING_CASES = [pytest.param(strategy, name, id=f"{strategy}-{name}",
                               marks=[pytest.mark.slow] if (strategy, name) in SLOW_CASES else [])
                  for strategy in ("single", "pipeline") for name in MODELS]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy, name", TRAINING_CASES)
def test_checkpointed_training_equals_eager(name, policy, strategy):
    make, loss_fn = MODELS[name]
    model, args, target = make()
    ref_loss, ref_grads = _eager(model, args, target, loss_fn)
    devices = "2xcpu:4GB" if strategy == "pipeline" else "1xcpu:4GB"
    plan = fxshard.plan(model, devices, args, strategy=strategy, **({"microbatches": 1} if strategy == "pipeline"
                                                                      else {}))
    plan = _with_policy(plan, policy)
    compiled = fxshard.CompiledModel(model, devices, args, plan=plan)
    blocks = [m for m in _modules_of(compiled) if isinstance(m, CheckpointedBlock)]
    assert blocks and all(b.policy == policy for b in blocks)
    torch.manual_seed(123)
    loss = compiled.step(*args, target=target, loss_fn=loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _modules_of(compiled):
    execution = compiled._execution
    if getattr(execution, "graph", None) is not None:
        return list(execution.graph.modules())
    return [m for st in execution.pipeline.split.stages for m in st.module.modules()]


@pytest.mark.parametrize("policy", POLICIES)
def test_pipeline_with_microbatches_and_one_checkpointed_stage(policy):
    model, args, target = _gpt2()
    ref_loss, ref_grads = _eager(model, args, target, _lm_loss)
    plan = fxshard.plan(model, "2xcpu:4GB", args, strategy="pipeline", microbatches=2)
    stages = (dataclasses.replace(plan.stages[0], activation_checkpointing=policy), *plan.stages[1:])
    plan = dataclasses.replace(plan, stages=stages)
    compiled = fxshard.CompiledModel(model, "2xcpu:4GB", args, plan=plan)
    loss = compiled.step(*args, target=target, loss_fn=_lm_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6)


def test_dropout_recompute_is_deterministic():
    model, args, target = _dropnet()
    captured = capture(model, args)
    full = apply_checkpointing(captured.gm, repeated_blocks(captured), "full")
    results = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(7)
        F.mse_loss(full(*args)[0], target).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_names_and_parameters_unchanged(policy):
    model, args, _ = _gpt2()
    captured = capture(model, args)
    gm = apply_checkpointing(captured.gm, repeated_blocks(captured), policy)
    before, after = captured.gm.state_dict(keep_vars=True), gm.state_dict(keep_vars=True)
    assert sorted(before) == sorted(after) and all(before[k] is after[k] for k in before)
    assert {n: id(p) for n, p in gm.named_parameters()} == {n: id(p) for n, p in captured.gm.named_parameters()}
    assert isinstance(gm.get_submodule("h.0"), CheckpointedBlock)
    assert apply_checkpointing(captured.gm, repeated_blocks(captured), "none") is captured.gm
    with pytest.raises(ExecutionError, match="selective"):
        apply_checkpointing(captured.gm, (), "some")


def test_selective_keeps_matmuls_and_attention():
    assert kept_by_selective(torch.ops.aten.mm.default)
    assert kept_by_selective(torch.ops.aten.addmm.default)
    assert kept_by_selective(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert not kept_by_selective(torch.ops.aten.gelu.default)
    assert not kept_by_selective(torch.ops.aten.add.Tensor)


# ---------------------------------------------------------------------------------------
# Memory truth: predicted saved-activation bytes equal the bytes measured, within 5%.
# ---------------------------------------------------------------------------------------


class _Created(TorchDispatchMode):
    """Weak references to the storage of every tensor an operator creates."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out


def _measured_saved_bytes(gm: torch.nn.Module, inputs: list) -> int:
    """Bytes alive from forward to backward: the storages autograd packs for nodes outside
    checkpointed blocks (saved_tensors_hooks), plus the storages made during forward that are
    still alive afterwards with only the outputs held (what checkpointing keeps: its inputs,
    selective's cached outputs), parameters, buffers and the outputs themselves left out."""
    state = {t.untyped_storage()._cdata for t in [*gm.parameters(), *gm.buffers()]}
    state |= {v.untyped_storage()._cdata for v in vars(gm).values() if isinstance(v, torch.Tensor)}
    packed: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in state:
            packed[storage._cdata] = storage.nbytes()
        return t

    created = _Created()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with created:
            # the stage's own copies of its inputs, made in the mode so they count when kept
            flat = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
            out = gm(*flat)
            del flat
    outputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
    alive = {key: size for key, (ref, size) in created.storages.items()
             if not ref.expired() and key not in state and key not in outputs}
    total = sum((packed | alive).values())
    del out
    return total


def _stage_case():
    """The second stage of a 2-stage split of the 6-block GPT-2, cut after block h.2."""
    model, args, _ = _gpt2()
    captured = capture(model, args)
    names = [n.name for n in captured.gm.graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    cut = names.index(repeated_blocks(captured)[2].nodes[-1]) + 1
    stage_of = {n: int(i >= cut) for i, n in enumerate(names)}
    split = split_graph(captured, stage_of, 2)
    with torch.no_grad():
        hidden = split.stages[0].module(*args)
    inputs = [h.detach().requires_grad_(h.is_floating_point()) for h in hidden]
    return captured, split.stages[1].module, names[cut:], inputs


def _whole_case(make):
    def case():
        model, args, _ = make()
        captured = capture(model, args)
        return captured, captured.gm, [n.name for n in captured.gm.graph.nodes], list(args)

    return case


TRUTH_CASES = {"gpt2": _whole_case(_gpt2), "hf-llama": _whole_case(_hf_llama), "gpt2-stage-2-of-2": _stage_case}


@pytest.mark.parametrize("case", list(TRUTH_CASES))
def test_predicted_saved_bytes_match_measured(case):
    captured, module, nodes, inputs = TRUTH_CASES[case]()
    costs = estimate(captured, get_preset("H100-80GB"))
    regions = regions_within(repeated_blocks(captured), nodes)
    assert regions
    figures = {}
    for policy in ("none", "selective", "full"):
        predicted = checkpoint_cost(costs, nodes, regions, policy)
        measured = _measured_saved_bytes(apply_checkpointing(module, regions, policy), inputs)
        figures[policy] = (predicted.saved_bytes, measured)
        assert predicted.saved_bytes == pytest.approx(measured, rel=0.05), (policy, figures)
        assert (predicted.recompute_fwd_s > 0) == (policy != "none")
    assert figures["full"][0] < figures["selective"][0] < figures["none"][0]
    none = checkpoint_cost(costs, nodes, regions, "none")
    assert none.saved_bytes == costs.saved_activation_bytes(nodes)
    full = checkpoint_cost(costs, nodes, regions, "full")
    assert full.transient_bytes > 0 and full.blocks == len(regions)


@pytest.mark.parametrize("strategy", ["single", "pipeline"])
def test_checkpointed_forward_equals_model(strategy):
    model, args, _ = _gpt2()
    devices = "2xcpu:4GB" if strategy == "pipeline" else "1xcpu:4GB"
    plan = _with_policy(fxshard.plan(model, devices, args, strategy=strategy), "full")
    compiled = fxshard.CompiledModel(model, devices, args, plan=plan)
    with torch.no_grad():
        expected = model(*args)
        torch.testing.assert_close(compiled(*args), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(*args).detach(), expected, rtol=1e-5, atol=1e-6)
    assert {n: id(p) for n, p in compiled.named_parameters()} == {n: id(p) for n, p in model.named_parameters()}
