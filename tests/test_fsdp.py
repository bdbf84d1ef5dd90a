"""FSDP2, pipeline x FSDP, activation checkpointing and gradient accumulation under gloo ranks:
losses and every parameter after 3 AdamW steps equal an eager run; state and optimizer state
move between plans; the sharded bytes per rank equal the prediction.

Few launches, several configurations each (process start-up dominates on CI).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re

import pytest
import torch
import torch.nn.functional as F

from tests.dist_harness import run

pytestmark = pytest.mark.slow  # every test here starts ranks in processes

STEPS = 3
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _lm_loss(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def _gpt2(batch: int = 4):
    """gpt2-tiny ties its embedding and LM head (``wte.weight`` is ``lm_head.weight``)."""
    from fxshard.zoo import build

    z = build("gpt2-tiny", batch_size=batch, seed=0)
    (tokens,) = z.example_inputs
    target = torch.randint(0, 256, tokens.shape, generator=torch.Generator().manual_seed(1))
    return z.model, z.example_inputs, target


@functools.cache
def _base_plan(world: int, strategy: str, microbatches: int, schedule: str = "1f1b"):
    """The planner's plan of ``strategy`` for gpt2-tiny (planned once per process)."""
    import fxshard

    model, inputs, _ = _gpt2()
    options = {"schedule": schedule, "microbatches": microbatches} if strategy != "ddp" else {}
    return fxshard.plan(model, f"{world}xcpu:1GB", inputs, strategy=strategy, **options)


def _lever_plan(world: int, strategy: str, *, data_parallel: str | None, checkpointing: str = "none",
                microbatches: int = 1, reshard: bool = True, schedule: str = "1f1b"):
    """A plan of ``strategy`` turned to the lever under test (the planner does not choose
    these yet): still a valid Plan."""
    base = "ddp" if strategy in ("ddp", "fsdp") else strategy
    plan = _base_plan(world, base, 1 if base == "ddp" else microbatches, schedule)
    stages = tuple(dataclasses.replace(s, activation_checkpointing=checkpointing) for s in plan.stages)
    return dataclasses.replace(plan, strategy=strategy, data_parallel=data_parallel, microbatches=microbatches,
                               reshard_after_forward=reshard, stages=stages)


def _assert_state_equal(compiled, reference, what: str) -> None:
    state = compiled.state_dict(gather=True)
    expected = reference.state_dict()
    assert state.keys() == expected.keys(), what
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, **TOL, msg=lambda m, n=name: f"{what}: {n}: {m}")


def _check_levers_in_place(compiled, plan) -> None:
    """The levers run, not just the plan's words: shards are DTensors, checkpointed blocks are
    CheckpointedBlock modules at the blocks' own paths."""
    from torch.distributed.tensor import DTensor

    from fxshard.runtime.checkpointing import CheckpointedBlock

    params = dict(compiled.named_parameters())
    assert params and all(isinstance(p, DTensor) == (plan.data_parallel == "fsdp") for p in params.values())
    rank_modules = compiled._execution._modules()
    blocks = [name for m in rank_modules for name, sub in m.named_modules() if isinstance(sub, CheckpointedBlock)]
    wanted = {s.activation_checkpointing for s in plan.stages} != {"none"}
    assert bool(blocks) == wanted, blocks
    assert all(re.fullmatch(r"(stage\.)?h\.\d+", name) for name in blocks), blocks


def _step_both(compiled, opt, reference, ref_opt, inputs, target, what: str) -> None:
    """One AdamW step of the compiled model and of eager; their losses equal where one is returned."""
    opt.zero_grad()
    ref_opt.zero_grad()
    loss = compiled.step(*inputs, target=target)
    ref_loss = _lm_loss(reference(*inputs), target)
    ref_loss.backward()
    if loss is not None:
        torch.testing.assert_close(loss, ref_loss.detach(), **TOL, msg=lambda m: f"{what}: {m}")
    opt.step()
    ref_opt.step()


def _train_matches_eager(rank: int, world: int, plan, what: str):
    """3 AdamW steps of the compiled plan against eager: losses and every parameter. Returns
    the compiled model and its optimizer."""
    import fxshard

    model, inputs, target = _gpt2()
    reference = copy.deepcopy(model)
    assert plan.num_devices == world, plan.shape_text()
    compiled = fxshard.CompiledModel(model, f"{world}xcpu:1GB", inputs, plan=plan, loss_fn=_lm_loss)
    _check_levers_in_place(compiled, plan)
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(STEPS):
        _step_both(compiled, opt, reference, ref_opt, inputs, target, f"{what}, rank {rank}, loss of step {step}")
    _assert_state_equal(compiled, reference, f"{what}, rank {rank}, after {STEPS} steps")
    return compiled, opt


def _meta_model_sharded_then_loaded(rank: int, world: int, plan, what: str) -> None:
    """A model built on meta is sharded before it gets memory; real weights loaded into the
    shards then train as eager does."""
    import fxshard
    from fxshard.zoo import build

    reference, inputs, target = _gpt2()
    model = build("gpt2-tiny", batch_size=4, seed=0, device="meta").model
    compiled = fxshard.CompiledModel(model, f"{world}xcpu:1GB", inputs, plan=plan, loss_fn=_lm_loss)
    assert all(p.device.type == "cpu" for p in compiled.parameters()), what
    compiled.load_state_dict(reference.state_dict())
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    _step_both(compiled, opt, reference, ref_opt, inputs, target, f"{what} from meta, rank {rank}")
    _assert_state_equal(compiled, reference, f"{what} from meta, rank {rank}")


def _sharded_bytes_match_prediction(rank: int, compiled, opt) -> None:
    """Summed local shard bytes of this rank's parameters, gradients and Adam's moments equal
    cost_models.sharding's prediction for its shard index exactly."""
    from fxshard.cost_models.sharding import ParamSpec, sharded_state
    from fxshard.runtime.fsdp import sharded_bytes

    params = dict(compiled.named_parameters())  # DTensors: shape is the whole parameter's
    specs = [ParamSpec(name=n, shape=tuple(p.shape), itemsize=p.element_size()) for n, p in params.items()]
    shards = compiled.plan.replicas
    measured = sharded_bytes(list(params.values()), opt)
    predicted = sharded_state(specs, shards, rank % shards, optimizer="adam")
    assert measured == {"params": predicted.params, "grads": predicted.grads, "optimizer": predicted.optimizer}, \
        (rank, measured, predicted)


def _resume_across_plans(rank: int, world: int) -> None:
    """1 step under fsdp, saved gathered; resumed on a 2-stage pipeline for 1 step; saved and
    resumed under fsdp again for 1 step: the losses and parameters are eager's."""
    import fxshard

    _, inputs, target = _gpt2()
    reference, _, _ = _gpt2()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    plans = [_lever_plan(world, "fsdp", data_parallel="fsdp", checkpointing="full"),
             _lever_plan(world, "pipeline", data_parallel=None, microbatches=2),
             _lever_plan(world, "fsdp", data_parallel="fsdp", microbatches=2)]
    saved = None
    for i, plan in enumerate(plans):
        model, _, _ = _gpt2()
        if saved is not None:  # what the model holds must come from the checkpoint
            torch.nn.init.normal_(model.wte.weight)
        compiled = fxshard.CompiledModel(model, f"{world}xcpu:1GB", inputs, plan=plan, loss_fn=_lm_loss)
        opt = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
        if saved is not None:
            compiled.load_state_dict(saved[0])
            compiled.load_optimizer_state_dict(opt, saved[1])
        _step_both(compiled, opt, reference, ref_opt, inputs, target, f"plan {i}, rank {rank}")
        saved = (compiled.state_dict(gather=True), compiled.optimizer_state_dict(opt, gather=True))
        _assert_state_equal(compiled, reference, f"plan {i} ({compiled.plan.strategy}), rank {rank}")


def _two_ranks(rank: int, world: int) -> None:
    configs = {
        "fsdp": dict(data_parallel="fsdp"),
        "fsdp, full checkpointing, 2 micro-batches": dict(data_parallel="fsdp", checkpointing="full",
                                                          microbatches=2),
        "fsdp, selective checkpointing, kept unsharded": dict(data_parallel="fsdp", checkpointing="selective",
                                                              reshard=False),
    }
    for what, lever in configs.items():
        compiled, opt = _train_matches_eager(rank, world, _lever_plan(world, "fsdp", **lever), what)
        if what == "fsdp":
            assert {n for n, _ in compiled.named_parameters()} == {n for n, _ in _gpt2()[0].named_parameters()}
            _sharded_bytes_match_prediction(rank, compiled, opt)
    _train_matches_eager(rank, world, _lever_plan(world, "ddp", data_parallel="ddp", microbatches=2),
                         "ddp, 2 micro-batches")
    _resume_across_plans(rank, world)
    _meta_model_sharded_then_loaded(rank, world, _lever_plan(world, "fsdp", data_parallel="fsdp"), "fsdp")


def _four_ranks(rank: int, world: int) -> None:
    for checkpointing in ("none", "full"):
        compiled, opt = _train_matches_eager(rank, world, _lever_plan(world, "hybrid", data_parallel="fsdp",
                                                                      checkpointing=checkpointing, microbatches=2),
                                             f"pipeline x fsdp, checkpointing {checkpointing}")
    _sharded_bytes_match_prediction(rank, compiled, opt)
    _meta_model_sharded_then_loaded(rank, world, _lever_plan(world, "hybrid", data_parallel="fsdp", microbatches=2),
                                    "pipeline x fsdp")
    _train_matches_eager(rank, world, _lever_plan(world, "hybrid", data_parallel="ddp", checkpointing="selective",
                                                  microbatches=2), "pipeline x ddp, selective checkpointing")
    # Interleaved: each rank holds two stages; the tied embedding's stages are on two ranks.
    _train_matches_eager(rank, world, _lever_plan(world, "hybrid", data_parallel="fsdp", microbatches=2,
                                                  schedule="interleaved1f1b"), "pipeline x fsdp, interleaved1f1b")
    # V-shaped zero bubble: rank 0 holds the first and the last stage (the tied embedding twice);
    # exact with the parameters kept unsharded after forward, refused on every rank otherwise.
    _train_matches_eager(rank, world, _lever_plan(world, "hybrid", data_parallel="fsdp", microbatches=2,
                                                  schedule="zbv", reshard=False), "pipeline x fsdp, zbv")
    import fxshard

    model, inputs, _ = _gpt2()
    with pytest.raises(fxshard.ExecutionError, match="zero-bubble schedule's weight-gradient step"):
        fxshard.CompiledModel(model, f"{world}xcpu:1GB", inputs, loss_fn=_lm_loss,
                              plan=_lever_plan(world, "hybrid", data_parallel="fsdp", microbatches=2, schedule="zbv"))


def test_fsdp_ddp_accumulation_memory_and_resume_on_two_ranks_match_eager():
    run(_two_ranks, 2, timeout=240)


def test_pipeline_x_fsdp_on_four_ranks_matches_eager():
    run(_four_ranks, 4, timeout=240)
