"""Refusals when nothing fits (fxshard/refusal.py): every way out a refusal offers is followed
and must plan, and every floor it states must be a real lower bound. The two LLaMA-70B
clusters of issue 12 are in tests/test_planner.py (they share its 70B capture)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

import fxshard
from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster
from fxshard.devices import format_bytes
from fxshard.errors import PlanError
from fxshard.models import GPT2, GPT2Config
from fxshard.planner import PlanOptions, plan_captured
from fxshard.refusal import Needs, WayOut, pipeline_floor
from fxshard.refusal.floors import fsdp_floor, lever_floor
from fxshard.zoo import build

RESERVE = PlanOptions().memory_reserve


def refusal(captured: CapturedGraph, devices: str | Cluster, batch: int, **options) -> PlanError:
    with pytest.raises(PlanError) as e:
        plan_captured(captured, Cluster.parse(devices), batch, PlanOptions(**options))
    return e.value


def follow(way: WayOut, capture_at: Callable[[int], CapturedGraph], devices: str | Cluster, batch: int,
           **options) -> fxshard.Plan:
    """Plan as the way out says: its devices, its batch (a new capture at that batch, as a user's
    new inputs would give), its options over the request's."""
    b = way.batch or batch
    cluster = way.cluster if way.cluster is not None else Cluster.parse(devices)
    if way.devices is not None:
        assert Cluster.parse(way.devices).num_devices == cluster.num_devices
    plan = plan_captured(capture_at(b), cluster, b, PlanOptions(**{**options, **way.kwargs}))
    for stage in plan.stages:
        assert stage.peak_memory_bytes <= stage.memory_capacity_bytes
    return plan


def check_each_way(error: PlanError, capture_at: Callable[[int], CapturedGraph], devices: str | Cluster,
                   batch: int, **options) -> dict[str, WayOut]:
    """Every way out is in the text, is one of a kind, and plans when followed."""
    ways = error.ways_out
    text = str(error)
    assert len({w.lever for w in ways}) == len(ways)
    for way in ways:
        assert way.text in text
        follow(way, capture_at, devices, batch, **options)
    return {w.lever: w for w in ways}


# -- the floors --------------------------------------------------------------------------------


GB = 1e9


def _needs(state: float, activations: float, transient: float = 0.0, nodes: int = 100) -> Needs:
    """A model of ``nodes`` equal nodes; sizes in GB."""
    each = np.full(nodes, GB / nodes)
    return Needs(state_bytes=state * GB, activation_bytes=activations * GB, transient_bytes=transient * GB,
                 node_names=tuple(f"n{i}" for i in range(nodes)), node_state=each * state,
                 node_activations=each * activations, node_transient=np.zeros(nodes))


def test_floor_gpipe_holds_the_whole_batch():
    # 1F1B needs 8 micro-batches for 8 stages; a batch of 4 gives at most 4: only GPipe runs.
    floor = pipeline_floor(_needs(700, 100), 4, 100 * GB, PlanOptions(strategy="pipeline"))
    assert floor.devices == 8 and floor.replicas == 1
    assert "GPipe holds the whole batch's" in floor.why and "1F1B would hold less" in floor.why


def test_floor_1f1b_holds_a_micro_batch_per_stage():
    # With 16 samples, 1F1B over 8 or more micro-batches holds at least 1/8 of the activations.
    floor = pipeline_floor(_needs(700, 160), 16, 100 * GB, PlanOptions(strategy="pipeline"))
    assert floor.devices == 8  # ceil((700 + 160 / 8) / 100); GPipe would need 9
    assert "1f1b over" in floor.why and "holds at least one per stage" in floor.why


def test_floor_with_forced_gpipe_and_microbatches():
    floor = pipeline_floor(_needs(700, 160), 16, 100 * GB, PlanOptions(strategy="pipeline", schedule="gpipe",
                                                                       microbatches=4))
    assert floor.devices == 9  # ceil((700 + 160) / 100): GPipe keeps every micro-batch


def test_floor_with_a_forced_count_does_not_assume_1f1b_limits():
    # Interleaved schedules run fewer micro-batches than stages when the count is given (torch
    # refuses that only for 1F1B): 2 micro-batches may then hold half the activations on 8 devices.
    needs = _needs(700, 160)
    given = pipeline_floor(needs, 16, 100 * GB, PlanOptions(strategy="pipeline", microbatches=2))
    one_f_one_b = pipeline_floor(needs, 16, 100 * GB, PlanOptions(strategy="pipeline", microbatches=2,
                                                                  schedule="1f1b"))
    assert given.devices == 8 and one_f_one_b.devices == math.inf
    assert "1f1b would need 8 or more stages" in one_f_one_b.why and "microbatches=2" in one_f_one_b.why


def test_floor_counts_each_replicas_state():
    # hybrid: at least two replicas, each holding all of the state
    floor = pipeline_floor(_needs(700, 0.0), 4, 100 * GB, PlanOptions(strategy="hybrid", training=False))
    assert floor.devices == 14 and floor.replicas == 2


def test_floor_is_infinite_when_one_node_overflows_a_device():
    needs = _needs(1000, 0.0, nodes=2)
    floor = pipeline_floor(needs, 1, 400 * GB, PlanOptions(strategy="pipeline", training=False))
    assert math.isinf(floor.devices)
    assert f"node 'n0' alone needs {format_bytes(500 * GB)}" in floor.why and format_bytes(400 * GB) in floor.why


# -- a small model: every way out plans, every floor holds ------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    z = build("gpt2-tiny", batch_size=4, seed=0)
    captured = {4: capture(z.model, z.example_inputs)}

    def capture_at(b: int) -> CapturedGraph:
        if b not in captured:
            captured[b] = capture(z.model, (z.example_inputs[0][:b],))
        return captured[b]

    single = plan_captured(captured[4], Cluster.parse("1xcpu:1GB"), 4, PlanOptions())
    return capture_at, single.stages[0].peak_memory_bytes


def budget(n: int, usable: float) -> str:
    return f"{n}xcpu:{math.ceil(usable / (1 - RESERVE)) + 1}"


# name: (device memory as a share of the single-device need, device count, options, levers that must
# be among the ways out): each request is refused
CASES = {
    "one-device-too-small": (0.6, 1, {}, {"devices", "inference"}),
    "one-device-far-too-small": (0.15, 1, {}, {"memory"}),
    "two-devices-too-small": (0.22, 2, {}, {"inference"}),
    "single-forced-on-two": (0.9, 2, {"strategy": "single"}, {"batch", "optimizer", "strategy"}),
    # replicas without the memory levers (no accumulation, no checkpointing), which would fit
    "ddp-forced": (0.6, 2, {"strategy": "ddp", "microbatches": 1, "activation_checkpointing": "none"},
                   {"devices", "batch", "optimizer", "strategy"}),
    "ddp-forced-needs-a-pipeline-and-devices": (0.35, 2, {"strategy": "ddp"}, {"devices"}),
    "gpipe-forced": (0.45, 2, {"strategy": "pipeline", "schedule": "gpipe"}, {"devices", "schedule"}),
    "microbatches-forced": (0.45, 2, {"strategy": "pipeline", "microbatches": 2}, {"microbatches"}),
    # the single-device need holds the tied embedding's two gradients and their sum; a 2-stage split,
    # one use a stage, does not: refused from 0.35 to 0.38 of it (0.40 fits, 0.33 has no way out in the list)
    "stages-forced": (0.36, 3, {"stages": 2}, {"batch", "stages"}),
    "pipeline-depth-and-schedule-forced": (0.45, 4, {"strategy": "pipeline", "stages": 2, "schedule": "gpipe"},
                                           {"strategy", "stages", "schedule"}),
}


def without_levers(options: dict) -> dict:
    """The options with the memory levers off (the refusals of issue 12, before the levers)."""
    off = {"activation_checkpointing": "none"}
    if options.get("strategy") in (None, "ddp", "hybrid"):
        off["data_parallel"] = "ddp"
    return {**off, **options}


@pytest.mark.parametrize("case", list(CASES))
def test_each_way_out_plans(tiny, case):
    capture_at, peak = tiny
    share, n, options, levers = CASES[case]
    options = without_levers(options)
    devices = budget(n, share * peak)
    error = refusal(capture_at(4), devices, 4, **options)
    ways = check_each_way(error, capture_at, devices, 4, **options)
    assert levers <= set(ways), f"{case}: {error}"
    assert str(error).count("Ways out, each checked by planning it") == 1
    if options.get("strategy") == "single":
        assert "devices" not in ways  # a single device is what was asked for
    if "strategy" in ways:  # a forced strategy that does not fit: the one that does, with its depth
        assert ways["strategy"].kwargs["strategy"] != options["strategy"]
    if case == "ddp-forced-needs-a-pipeline-and-devices":
        assert ways["devices"].kwargs["strategy"] in ("pipeline", "hybrid")


def test_stated_floor_is_a_lower_bound(tiny):
    """The refusal's 'at least N devices': N - 1 devices of that size do not plan."""
    capture_at, peak = tiny
    devices = budget(1, 0.15 * peak)
    error = refusal(capture_at(4), devices, 4)
    floor = int(re.search(r"A pipeline of it needs at least (\d+) devices", str(error))[1])
    assert floor >= 3
    fewer = Cluster.homogeneous(Cluster.parse(devices).devices[0].spec, devices_per_machine=floor - 1)
    with pytest.raises(PlanError):
        plan_captured(capture_at(4), fewer, 4, PlanOptions())


def test_smaller_batch_way_out(tiny):
    """Between the need of batch 1 and of batch 4, a smaller batch is offered and plans."""
    capture_at, _ = tiny
    one = plan_captured(capture_at(1), Cluster.parse("1xcpu:1GB"), 1, PlanOptions()).stages[0].peak_memory_bytes
    devices = budget(1, one * 1.05)
    error = refusal(capture_at(4), devices, 4)
    ways = check_each_way(error, capture_at, devices, 4)
    assert "batch" in ways and 1 <= ways["batch"].batch < 4
    assert f"a batch of {ways['batch'].batch} instead of 4" in str(error)


# -- a 1.7B GPT forced to ddp on 4x8xA100-80GB (issue 12) ---------------------------------------------


@pytest.fixture(scope="module")
def gpt_1_7b():
    """GPT-2 shape with 24 layers of 2304 (1.65B parameters: 24.6 GiB with fp32 Adam), on meta.
    Batch 74: the only replica counts up to 32 that divide it are 1 and 2, so DDP would hold 37
    samples per replica."""
    with torch.device("meta"):
        model = GPT2(GPT2Config(n_layer=24, n_head=16, n_embd=2304))
    captured: dict[int, CapturedGraph] = {}

    def capture_at(b: int) -> CapturedGraph:
        if b not in captured:
            captured[b] = capture(model, (torch.zeros(b, 1024, dtype=torch.long, device="meta"),))
        return captured[b]

    return model, capture_at


def test_forced_ddp_gpt_1_7b_says_how_many_replicas_and_each_way_out_plans(gpt_1_7b):
    model, capture_at = gpt_1_7b
    state = sum(p.numel() for p in model.parameters()) * 16  # fp32 Adam: weight, gradient, two moments
    assert format_bytes(state) == "24.6 GiB"
    # replicas accumulating gradients over micro-batches fit (a memory lever: issue 14) ...
    accumulated = plan_captured(capture_at(74), Cluster.parse("4x8xA100-80GB"), 74, PlanOptions(strategy="ddp"))
    assert accumulated.strategy == "ddp" and accumulated.microbatches > 1
    # ... without accumulation or checkpointing each replica must hold its share of the batch at once
    plain = {"strategy": "ddp", "microbatches": 1, "activation_checkpointing": "none"}
    error = refusal(capture_at(74), "4x8xA100-80GB", 74, **plain)
    text = str(error)
    assert "33 devices" not in text and "for the parameters and optimizer state alone" not in text
    assert "Each DDP replica holds the whole model (24.6 GiB of parameters and optimizer state)" in text
    assert "holds at most 13 samples" in text and "at least 37 replicas" in text
    ways = check_each_way(error, capture_at, "4x8xA100-80GB", 74, **plain)
    assert set(ways) >= {"devices", "batch", "inference", "strategy"}
    assert ways["devices"].devices == "5x8xA100-80GB" and ways["devices"].plan.replicas == 37
    assert ways["strategy"].kwargs["strategy"] in ("pipeline", "hybrid")


def test_forced_ddp_when_a_replica_cannot_hold_the_model_no_device_count_helps(gpt_1_7b):
    _, capture_at = gpt_1_7b
    error = refusal(capture_at(74), "4x8xL4", 74, strategy="ddp")
    text = str(error)
    assert "no device count helps ddp" in text
    assert "24.6 GiB of parameters and optimizer state plus 3.8 GiB per sample" in text and "22.8 GiB" in text
    ways = check_each_way(error, capture_at, "4x8xL4", 74, strategy="ddp")
    assert "devices" not in ways and "batch" not in ways
    assert ways["strategy"].kwargs["strategy"] in ("pipeline", "hybrid")


# -- the memory levers in a refusal (issue 14) ---------------------------------------------------


def test_fsdp_floor_shards_the_state():
    # 700 GB of state, 2 GB of units in flight, 10 GB of checkpointed activations for a batch of 10:
    # one sample's 1 GB beside the units leaves 97 GB per device for the shards: 8 devices.
    needs = dataclasses.replace(_needs(700, 100), checkpointed_bytes=10 * GB, in_flight_bytes=2 * GB)
    floor = fsdp_floor(needs, 10, 100 * GB)
    assert (floor.devices, floor.replicas) == (8, 8)
    assert "per device" in floor.why and "in flight" in floor.why
    # units in flight that fill a device leave no room for any shard
    assert not math.isfinite(fsdp_floor(dataclasses.replace(needs, in_flight_bytes=99.5 * GB), 10, 100 * GB).devices)


def test_lever_floor_is_the_least_of_one_device_fsdp_and_a_checkpointed_pipeline():
    opts = PlanOptions()
    # the state fits one device, and checkpointed activations leave room: one device
    small = dataclasses.replace(_needs(60, 100), checkpointed_bytes=10 * GB)
    assert lever_floor(small, 10, 100 * GB, opts).devices == 1
    # 700 GB of state and 400 GB of activations at batch 4 (too few micro-batches for 1F1B): GPipe
    # without levers needs ceil(1100 / 100) = 11; FSDP needs ceil(700 / (100 - 2 - 2.5)) = 8, and a
    # GPipe pipeline of the checkpointed batch (10 GB) ceil(710 / 100) = 8
    big = dataclasses.replace(_needs(700, 400), checkpointed_bytes=10 * GB, in_flight_bytes=2 * GB)
    assert pipeline_floor(big, 4, 100 * GB, opts).devices == 11
    assert lever_floor(big, 4, 100 * GB, opts).devices == 8


def test_levers_forced_off_the_refusal_offers_them(tiny):
    """One device 20% short of the model at batch 4 without checkpointing: the refusal offers
    the levers on these devices, with the options to drop, and following it plans."""
    capture_at, peak = tiny
    devices = budget(1, 0.8 * peak)
    off = {"activation_checkpointing": "none"}
    error = refusal(capture_at(4), devices, 4, **off)
    ways = check_each_way(error, capture_at, devices, 4, **off)
    assert "levers" in ways and "activation_checkpointing" in ways
    assert ways["levers"].kwargs == {"activation_checkpointing": None}
    assert ways["levers"].batch is None and ways["levers"].plan.activation_checkpointing != "none"
    assert "With FSDP and full activation checkpointing it needs at least 1 devices" in str(error)
    assert "this batch with activation_checkpointing=None on these devices" in str(error)


def test_levers_floor_names_the_devices_when_they_are_allowed(tiny):
    """Levers allowed and still nothing fits: the floor with them is stated, in numbers."""
    capture_at, peak = tiny
    error = refusal(capture_at(4), budget(2, 0.12 * peak), 4)
    found = re.search(r"With FSDP and full activation checkpointing it needs at least (\d+) devices", str(error))
    assert found is not None and int(found[1]) > 2
