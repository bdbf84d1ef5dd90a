"""A tied parameter split across devices: found as the runtime groups it, priced as one all-reduce per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxshard
from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.comm import ring_allreduce_time, tied_allreduce_time
from fxshard.cost_models import analyze
from fxshard.errors import PlanFormatError
from fxshard.passes.split import split_graph
from fxshard.passes.tied import parameter_readers, tied_parameters
from fxshard.plan import Plan, TiedParameter
from fxshard.simulate import StageTiming, simulate
from fxshard.simulate_plan import simulate_plan
from fxshard.zoo import build

DEVICES = "2xA100-80GB"


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    z = build("gpt2-tiny", batch_size=4, seq_len=16)
    return z, capture(z.model, z.example_inputs)


def test_the_tied_embedding_is_the_only_parameter_read_twice(gpt2):
    _, captured = gpt2
    readers = parameter_readers(captured, analyze(captured))
    assert list(readers) == ["wte.weight"]
    size, nodes = readers["wte.weight"]
    assert size == 64 * captured.gm.get_parameter("wte.weight").shape[0] * 4
    assert len(nodes) == 2  # the embedding and the LM head
    llama = build("llama-tiny", batch_size=2, seq_len=16)
    untied = capture(llama.model, llama.example_inputs)
    assert parameter_readers(untied, analyze(untied)) == {}


def test_tied_only_when_its_stages_sit_on_different_devices(gpt2):
    _, captured = gpt2
    readers = parameter_readers(captured, analyze(captured))
    _, nodes = readers["wte.weight"]
    first, last = sorted(nodes, key=[n.name for n in captured.gm.graph.nodes].index)
    stage_of = {first: 0, last: 1}
    assert tied_parameters(readers, stage_of, [(0,), (1,)]) == (
        TiedParameter(name="wte.weight", bytes=readers["wte.weight"][0], stages=(0, 1)),)
    assert tied_parameters(readers, stage_of, [(0,), (0,)]) == ()  # both stages on one device: one tensor


def test_a_sync_starts_when_the_last_of_its_ranks_is_ready():
    stages = [StageTiming(fwd_s=1.0, bwd_s=2.0), StageTiming(fwd_s=1.0, bwd_s=1.0, optimizer_s=0.5)]
    plain = simulate("gpipe", stages, 2)
    synced = simulate("gpipe", stages, 2, syncs=[((0, 1), 0.25)])
    ends = {a.rank: a.end for a in plain.timeline if a.kind in ("F", "B")}
    sums = [a for a in synced.timeline if a.kind == "T"]
    assert sorted(a.rank for a in sums) == [0, 1]
    assert all(a.start == pytest.approx(max(ends.values())) for a in sums)  # the later rank's end
    assert synced.step_time_s == pytest.approx(max(ends.values()) + 0.25 + 0.5)
    assert simulate("gpipe", stages, 2, syncs=[((1,), 0.25)]).step_time_s == plain.step_time_s  # one rank: no sum


def test_the_planner_prices_the_sum_and_the_plan_keeps_it(gpt2):
    z, _ = gpt2
    plan = fxshard.plan(z.model, DEVICES, z.example_inputs, strategy="pipeline", stages=2, schedule="1f1b",
                        microbatches=2)
    assert plan.tied == (TiedParameter(name="wte.weight", bytes=plan.tied[0].bytes, stages=(0, 1)),)
    assert simulate_plan(plan).step_time_s == pytest.approx(plan.estimate.step_time_s, rel=1e-12)
    cluster = Cluster.from_dict(plan.cluster)
    link = cluster.link(0, 1)
    seconds = tied_allreduce_time(cluster, [0, 1], plan.tied[0].bytes)
    assert seconds == ring_allreduce_time(plan.tied[0].bytes, 2, link.bandwidth, link.latency_s) > 0
    untied = simulate_plan(dataclasses.replace(plan, tied=())).step_time_s
    extra = plan.estimate.step_time_s - untied
    # the sum runs after the later rank's schedule and before the optimizer steps
    assert seconds - 1e-12 <= extra <= seconds + max(s.optimizer_time_s for s in plan.stages) + 1e-12
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.tied == plan.tied
    data = plan.to_dict()
    data.pop("tied")
    assert Plan.from_dict(data).tied == ()  # a plan written before the field: nothing tied
    data["tied"] = [{"name": "wte.weight", "bytes": 1, "stages": [0, 5]}]
    with pytest.raises(PlanFormatError, match=r"'wte.weight': stages \[0, 5\] must be stage indices 0..1"):
        Plan.from_dict(data)


def test_a_placement_holding_both_ends_on_one_device_pays_nothing(gpt2):
    z, _ = gpt2
    plan = fxshard.plan(z.model, DEVICES, z.example_inputs, strategy="pipeline", schedule="zbv", microbatches=2)
    ends = {plan.stages[0].device_indices[0], plan.stages[-1].device_indices[0]}
    assert len(ends) == 1 and plan.tied == ()


@pytest.mark.parametrize("model, stages", [("gpt2-tiny", 2), ("gpt2-tiny", 3), ("llama-tiny", 2)])
def test_the_plan_names_what_the_runtime_sums(model, stages):
    """The runtime groups the ranks holding each parameter several stages hold
    (``runtime.stages._shared_groups``); the plan's ``tied`` must name the same parameters."""
    torch.manual_seed(0)
    z = build(model, batch_size=4, seq_len=16)
    plan = fxshard.plan(z.model, f"{stages}xA100-80GB", z.example_inputs, strategy="pipeline", stages=stages,
                        schedule="gpipe", microbatches=2)
    captured = capture(z.model, z.example_inputs)
    split = split_graph(captured, plan.stage_of(), plan.num_stages)

    def canonical(module, name):
        return captured.param_names.get(id(module.get_parameter(name)), name)

    devices: dict[str, set[int]] = {}
    for stage, plan_stage in zip(split.stages, plan.stages):
        for name, _ in stage.module.named_parameters():
            devices.setdefault(canonical(stage.module, name), set()).add(plan_stage.device_indices[0])
    assert {t.name for t in plan.tied} == {n for n, d in devices.items() if len(d) > 1}
