"""Checkpoint and resume: saved under the original names, resumed on another number of stages.

A training run is interrupted after two steps, saved (model state and optimizer state, keyed
by parameter name), and resumed into a freshly built model compiled for a different number
of stages; two more steps later, every parameter and every optimizer state tensor equals an
uninterrupted eager run of four steps. In one process (3 stages -> 2, 2 -> the plain model)
and under torch.distributed with gloo (3 ranks -> 2 ranks).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxshard
from fxshard.errors import ExecutionError
from fxshard.runtime.checkpoint import load_named_optimizer_state, named_optimizer_state, state_aliases
from fxshard.zoo import build
from tests.dist_harness import run

STEPS = 2
REL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(name: str, seed: int = 0):
    z = build(name, batch_size=4, seq_len=16, seed=seed)
    target = torch.randint(0, z.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    return z.model, z.example_inputs, target


def lm_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _optimizer(kind: str, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _train(compiled, kind: str, inputs, target, optimizer_state=None):
    """STEPS optimizer steps of ``compiled`` (resuming ``optimizer_state``); returns the optimizer."""
    opt = _optimizer(kind, compiled.parameters())
    if optimizer_state is not None:
        compiled.load_optimizer_state_dict(opt, optimizer_state)
    for _ in range(STEPS):
        opt.zero_grad()
        compiled.step(*inputs, target=target)
        opt.step()
    return opt


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(expected.detach().abs().max().item(), 1e-12) if expected.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu(), expected.detach().cpu(), rtol=REL, atol=REL * scale,
                               msg=lambda m: f"{what}: {m}")


def _reference(name: str, kind: str, steps: int):
    """The uninterrupted eager run: (model, its optimizer's named state)."""
    model, inputs, target = _case(name)
    opt = _optimizer(kind, model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model(*inputs), target).backward()
        opt.step()
    names = {id(p): n for n, p in reversed(list(model.named_parameters()))}
    return model, named_optimizer_state(opt, names, aliases=state_aliases(model))


def _check_against_reference(state: dict, optim_state: dict, name: str, kind: str) -> None:
    ref, ref_optim = _reference(name, kind, 2 * STEPS)
    ref_state = ref.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        _close(state[key], value, f"parameter {key}")
    assert optim_state["state"].keys() == ref_optim["state"].keys()
    for pname, entries in ref_optim["state"].items():
        for k, v in entries.items():
            got = optim_state["state"][pname][k]
            if isinstance(v, torch.Tensor):
                _close(torch.as_tensor(got), v, f"optimizer {k} of {pname}")
            else:
                assert got == v, f"optimizer {k} of {pname}: {got} != {v}"
    assert [sorted(g["params"]) for g in optim_state["param_groups"]] == \
        [sorted(g["params"]) for g in ref_optim["param_groups"]]


@pytest.mark.parametrize("name,kind", [("llama-tiny", "adam"), ("gpt2-tiny", "sgd")])
def test_resume_on_a_different_number_of_stages_in_one_process(name, kind, tmp_path):
    model, inputs, target = _case(name)
    compiled = fxshard.compile(model, "3xcpu:1GB", inputs, strategy="pipeline", stages=3, schedule="1f1b",
                               microbatches=4, loss_fn=lm_loss)
    opt = _train(compiled, kind, inputs, target)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": compiled.state_dict(), "optimizer": compiled.optimizer_state_dict(opt),
                "plan": compiled.plan.to_json()}, path)

    # A new process would build the model afresh: other initial weights, a 2-stage plan.
    fresh, _, _ = _case(name, seed=123)
    resumed = fxshard.compile(fresh, "2xcpu:1GB", inputs, strategy="pipeline", stages=2, schedule="gpipe",
                              microbatches=2, loss_fn=lm_loss)
    assert resumed.plan.num_stages == 2
    ckpt = torch.load(path, weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _train(resumed, kind, inputs, target, optimizer_state=ckpt["optimizer"])
    _check_against_reference(resumed.state_dict(), resumed.optimizer_state_dict(opt2), name, kind)


def test_a_pipeline_checkpoint_resumes_in_the_plain_model():
    """The format is the plain model's too: named_optimizer_state of an eager optimizer."""
    name, kind = "llama-tiny", "adam"
    model, inputs, target = _case(name)
    compiled = fxshard.compile(model, "3xcpu:1GB", inputs, strategy="pipeline", stages=3, schedule="gpipe",
                               microbatches=2, loss_fn=lm_loss)
    opt = _train(compiled, kind, inputs, target)
    saved_model, saved_optim = compiled.state_dict(), compiled.optimizer_state_dict(opt)

    plain, _, _ = _case(name, seed=7)
    plain.load_state_dict(saved_model)
    single = fxshard.compile(plain, "1xcpu:1GB", inputs, strategy="single", loss_fn=lm_loss)
    opt2 = _optimizer(kind, plain.parameters())
    single.load_optimizer_state_dict(opt2, saved_optim)
    for _ in range(STEPS):
        opt2.zero_grad()
        lm_loss(plain(*inputs), target).backward()
        opt2.step()
    names = {id(p): n for n, p in reversed(list(plain.named_parameters()))}
    _check_against_reference(plain.state_dict(), named_optimizer_state(opt2, names, aliases=state_aliases(plain)),
                             name, kind)


def test_checkpoint_errors_are_execution_errors():
    model, inputs, target = _case("llama-tiny")
    compiled = fxshard.compile(model, "2xcpu:1GB", inputs, strategy="pipeline", stages=2, microbatches=2,
                               schedule="gpipe", loss_fn=lm_loss)
    opt = torch.optim.Adam(compiled.parameters())
    compiled.step(*inputs, target=target)
    opt.step()
    saved = compiled.optimizer_state_dict(opt)
    # An optimizer over a tensor the model does not have.
    stray = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ExecutionError, match="not a parameter of the compiled model"):
        compiled.optimizer_state_dict(stray)
    # A checkpoint of another model.
    other = copy.deepcopy(saved)
    dropped = other["param_groups"][0]["params"].pop()
    other["state"].pop(dropped, None)
    with pytest.raises(ExecutionError, match=r"lacks 1 parameter\(s\).*another model"):
        compiled.load_optimizer_state_dict(torch.optim.Adam(compiled.parameters()), other)
    with pytest.raises(ExecutionError, match="not a named optimizer state"):
        compiled.load_optimizer_state_dict(torch.optim.Adam(compiled.parameters()), opt.state_dict()["state"])
    # Model state of the wrong shape.
    bad = {k: torch.zeros(1) for k in compiled.state_dict()}
    with pytest.raises(ExecutionError, match="does not fit"):
        compiled.load_state_dict(bad)


# ---------------------------------------------------------------------------------------
# Under torch.distributed: 3 ranks save, 2 ranks resume
# ---------------------------------------------------------------------------------------


def _save_gathered(compiled, opt, rank: int, path: str) -> None:
    """Gather the model and optimizer state on every rank (a collective); rank 0 saves it."""
    state = compiled.state_dict(gather=True)
    optim_state = compiled.optimizer_state_dict(opt, gather=True)
    if rank == 0:
        torch.save({"model": state, "optimizer": optim_state}, path)


def _train_ranks(rank: int, world: int, name: str, kind: str, load: str | None, save: str, seed: int) -> None:
    model, _, _ = _case(name, seed=seed)  # a fresh model: other initial weights
    _, inputs, target = _case(name)  # the same data as the reference
    compiled = fxshard.compile(model, f"{world}xcpu:1GB", inputs, strategy="pipeline", stages=world,
                               schedule="1f1b", microbatches=4, loss_fn=lm_loss)
    assert compiled.plan.num_stages == world
    opt = _optimizer(kind, compiled.parameters())
    if load is not None:
        ckpt = torch.load(load, weights_only=False)
        compiled.load_state_dict(ckpt["model"])
        compiled.load_optimizer_state_dict(opt, ckpt["optimizer"])
    for _ in range(STEPS):
        opt.zero_grad()
        compiled.step(*inputs, target=target)
        opt.step()
    _save_gathered(compiled, opt, rank, save)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_under_torch_distributed_on_fewer_ranks(tmp_path: Path):
    name, kind = "gpt2-tiny", "sgd"  # a tied embedding held by the first and last stage
    first, second = str(tmp_path / "after3ranks.pt"), str(tmp_path / "after2ranks.pt")
    run(_train_ranks, 3, name, kind, None, first, 0)
    run(_train_ranks, 2, name, kind, first, second, 99)
    final = torch.load(second, weights_only=False)
    _check_against_reference(final["model"], final["optimizer"], name, kind)


# ---------------------------------------------------------------------------------------
# A tied parameter keeps every name (issue 12, item 2)
# ---------------------------------------------------------------------------------------


def _hf_gpt2():
    pytest.importorskip("transformers")
    from tests.test_patterns import CAUSAL_LMS, _tokens

    torch.manual_seed(0)
    model = CAUSAL_LMS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask, target = _tokens()
    return model, {"input_ids": ids, "attention_mask": mask}, target


def _hf_reference():
    """transformers GPT-2 after one eager Adam step: (model, its optimizer, named optimizer state)."""
    from tests.test_patterns import logits_loss

    model, kwargs, target = _hf_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits_loss(model(**kwargs), target).backward()
    opt.step()
    return model, opt


def _check_tied_checkpoint(state: dict, optim_state: dict) -> None:
    """Both names of the tied weight in both states; both load strictly into plain GPT-2 and
    equal the eager run."""
    ref, ref_opt = _hf_reference()
    tied = ("transformer.wte.weight", "lm_head.weight")
    assert set(tied) <= state.keys() and set(tied) <= optim_state["state"].keys(), (
        sorted(k for k in state if "wte" in k or "lm_head" in k), sorted(optim_state["state"])[:4])
    fresh, _, _ = _hf_gpt2()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # other values, so loading must set them all
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for key, value in ref.state_dict().items():
        _close(fresh.state_dict()[key], value, f"parameter {key}")
    opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    names = {id(p): n for n, p in reversed(list(fresh.named_parameters()))}
    load_named_optimizer_state(opt, names, optim_state, aliases=state_aliases(fresh))
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    for p, entries in ref_opt.state.items():
        got = opt.state[fresh.get_parameter(ref_names[id(p)])]
        for k, v in entries.items():
            _close(torch.as_tensor(got[k]), torch.as_tensor(v), f"optimizer {k} of {ref_names[id(p)]}")


def test_a_tied_parameter_keeps_every_name_in_one_process():
    from tests.test_patterns import logits_loss

    model, kwargs, target = _hf_gpt2()
    compiled = fxshard.compile(model, "2xcpu:1GB", example_kwargs=kwargs, strategy="pipeline", stages=2,
                               schedule="gpipe", microbatches=2, loss_fn=logits_loss)
    opt = torch.optim.Adam(compiled.parameters(), lr=1e-3)
    compiled.step(**kwargs, target=target)
    opt.step()
    _check_tied_checkpoint(compiled.state_dict(), compiled.optimizer_state_dict(opt))


def _tied_ranks(rank: int, world: int, out: str) -> None:
    from tests.test_patterns import logits_loss

    model, kwargs, target = _hf_gpt2()
    compiled = fxshard.compile(model, f"{world}xcpu:1GB", example_kwargs=kwargs, strategy="pipeline", stages=world,
                               schedule="gpipe", microbatches=2, loss_fn=logits_loss)
    holders = [s.index for s in compiled.plan.stages if rank in s.device_indices]
    assert holders == [rank]
    opt = torch.optim.Adam(compiled.parameters(), lr=1e-3)
    compiled.step(**kwargs, target=target)
    opt.step()
    _save_gathered(compiled, opt, rank, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tied_parameter_keeps_every_name_when_gathered_under_torch_distributed(tmp_path: Path):
    """transformers GPT-2 on 2 ranks: the embedding's stage calls the tied weight
    ``lm_head.weight``; the gathered state lacked ``transformer.wte.weight`` and did not load
    strictly into GPT2LMHeadModel."""
    out = str(tmp_path / "tied.pt")
    run(_tied_ranks, 2, out, timeout=180)
    saved = torch.load(out, weights_only=False)
    _check_tied_checkpoint(saved["model"], saved["optimizer"])
