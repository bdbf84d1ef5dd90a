"""The Plan: a frozen dataclass with an exact JSON round-trip, a schema version, a readable
text form, and stages that cover the captured graph exactly once."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshard
from fxshard.capture import capture
from fxshard.errors import FxshardError
from fxshard.plan import SCHEMA_VERSION, Alternative, Estimate, ModelInfo, Plan, PlanFormatError, StagePlan
from fxshard.zoo import build

CLUSTER = "2xcpu:1GB"


# -- plans made by the planner ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    z = build("gpt2-tiny", batch_size=4, seed=0)
    return z, capture(z.model, z.example_inputs)


@pytest.fixture(scope="module")
def planned(tiny):
    """One plan per strategy the tiny model gets on two devices."""
    z, _ = tiny
    return {
        "auto": fxshard.plan(z.model, CLUSTER, z.example_inputs),
        "single": fxshard.plan(z.model, CLUSTER, z.example_inputs, strategy="single"),
        "pipeline": fxshard.plan(z.model, CLUSTER, z.example_inputs, strategy="pipeline"),
        "gpipe": fxshard.plan(z.model, CLUSTER, z.example_inputs, strategy="pipeline", schedule="gpipe"),
        "inference": fxshard.plan(z.model, CLUSTER, z.example_inputs, training=False, strategy="pipeline"),
    }


KINDS = ["auto", "single", "pipeline", "gpipe", "inference"]


@pytest.mark.parametrize("kind", KINDS)
def test_json_round_trip_is_exact(planned, kind):
    p = planned[kind]
    text = p.to_json()
    q = Plan.from_json(text)
    assert q == p
    assert q.to_json() == text
    assert Plan.from_json(p.to_json(indent=None)) == p
    assert Plan.from_dict(json.loads(text)) == p


@pytest.mark.parametrize("kind", KINDS)
def test_to_json_is_stable(planned, kind):
    p = planned[kind]
    assert p.to_json() == p.to_json()
    assert p.to_json(indent=None) == p.to_json(indent=None)
    assert json.loads(p.to_json()) == json.loads(json.dumps(p.to_dict()))


@pytest.mark.parametrize("kind", KINDS)
def test_json_has_the_spec_fields(planned, kind):
    data = json.loads(planned[kind].to_json())
    assert next(iter(data)) == "fxshard_plan"
    assert data["fxshard_plan"] == SCHEMA_VERSION == 2
    for key in ("strategy", "partitioner", "schedule", "microbatches", "cluster", "model", "stages", "estimate"):
        assert key in data
    assert {"name", "nodes", "param_bytes", "fingerprint"} <= set(data["model"])
    for stage in data["stages"]:
        assert {"index", "devices", "nodes", "flops", "param_bytes", "peak_memory_bytes", "fwd_time_s",
                "bwd_time_s", "send_bytes"} <= set(stage)
    assert {"step_time_s", "bubble_fraction", "samples_per_s", "lower_bound_step_time_s"} <= set(data["estimate"])
    assert isinstance(data["cluster"], dict)


@pytest.mark.parametrize("kind", KINDS)
def test_stage_of_covers_the_captured_graph_exactly_once(planned, tiny, kind):
    _, captured = tiny
    p = planned[kind]
    names = [n.name for n in captured.nodes]
    listed = [n for s in p.stages for n in s.nodes]
    assert len(listed) == len(set(listed)), "a node is on two stages"
    assert sorted(listed) == sorted(names)
    stage_of = p.stage_of()
    assert set(stage_of) == set(names)
    assert set(stage_of.values()) == set(range(p.num_stages))
    assert p.model.nodes == len(names)
    assert p.model.fingerprint == captured.fingerprint()


@pytest.mark.parametrize("kind", KINDS)
def test_stage_i_only_needs_earlier_stages(planned, tiny, kind):
    _, captured = tiny
    stage_of = planned[kind].stage_of()
    for node in captured.nodes:
        for inp in node.all_input_nodes:
            assert stage_of[inp.name] <= stage_of[node.name], f"{node.name} reads {inp.name} from a later stage"


def test_pipeline_plan_shape(planned):
    p = planned["pipeline"]
    assert p.strategy == "pipeline" and p.num_stages >= 2 and p.replicas == 1
    assert p.stages[-1].send_bytes == 0
    assert all(s.send_bytes > 0 for s in p.stages[:-1])
    single = planned["single"]
    # flops are per micro-batch: the stages of one micro-batch add up to 1/m of the whole batch.
    assert sum(s.flops for s in p.stages) * p.microbatches == pytest.approx(single.stages[0].flops)
    assert single.num_stages == 1 and single.schedule is None and single.microbatches == 1


def test_inference_plan_records_no_optimizer(planned):
    p = planned["inference"]
    assert p.training is False and p.optimizer == "none"
    assert all(s.bwd_time_s == 0 for s in p.stages)


@pytest.mark.parametrize("kind", KINDS)
def test_str_mentions_strategy_stages_and_estimate(planned, kind):
    p = planned[kind]
    text = str(p)
    assert text.startswith("fxshard plan: ")
    assert p.strategy in text.splitlines()[0]
    for s in p.stages:
        assert f"stage {s.index} on " in text
    assert "estimate: step" in text and "samples/s" in text and "bubble" in text
    assert p.model.fingerprint in text
    if p.schedule:
        assert p.schedule in text
    assert ("inference" in text) == (not p.training)


def test_plan_takes_keyword_inputs_alone():
    # Issue 12, item 4: plan(..., example_kwargs=kw) with example_inputs left at None passed None
    # as a positional input ("multiple values for argument 'input_ids'").
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False, bos_token_id=None,
        eos_token_id=None))
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    p = fxshard.plan(model, CLUSTER, example_kwargs=batch)
    assert p.batch_size == 4 and p.model.name == "GPT2LMHeadModel"
    assert p.to_json() == fxshard.plan(model, CLUSTER, batch).to_json()  # the same as a dict of keyword inputs
    compiled = fxshard.compile(model, CLUSTER, example_kwargs=batch, strategy="pipeline", microbatches=2)
    assert compiled.plan.strategy == "pipeline"


def test_a_broken_plugins_refusal_names_a_function_that_exists(tiny):
    """The refusal of a non-pipeline assignment points at the repair function by its dotted name;
    it named ``refine.repair_order``, which does not exist."""
    import importlib
    import re

    import numpy as np

    from fxshard.errors import PlanError
    from fxshard.passes.partition import register_partitioner, unregister_partitioner

    def backwards(problem, seed):
        order = np.arange(problem.num_units)
        return (problem.k - 1) - (order * problem.k // max(problem.num_units, 1))

    z, _ = tiny
    register_partitioner("test-backwards-plan", backwards)
    try:
        with pytest.raises(PlanError) as e:
            fxshard.plan(z.model, CLUSTER, z.example_inputs, strategy="pipeline", partitioner="test-backwards-plan")
    finally:
        unregister_partitioner("test-backwards-plan")
    named = re.findall(r"fxshard(?:\.\w+)+", str(e.value))
    assert named, str(e.value)
    for dotted in named:
        module, _, attr = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{dotted} does not exist"


def test_plan_is_frozen(planned):
    p = planned["single"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.strategy = "ddp"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stages[0].nodes = ()


# -- hand-made plans ------------------------------------------------------------------------


def make_plan(**overrides) -> Plan:
    stages = (
        StagePlan(index=0, devices=("cuda:0", "cuda:2"), device_indices=(0, 2), nodes=("x", "embed", "block_0"),
                  flops=1.5e12, param_bytes=1_000_000, peak_memory_bytes=3.25e9, memory_capacity_bytes=7.6e10,
                  fwd_time_s=0.012, bwd_time_s=0.024, send_bytes=4.0e6, first_module="embed", last_module="block.0"),
        StagePlan(index=1, devices=("cuda:1", "cuda:3"), device_indices=(1, 3), nodes=("block_1", "head", "output"),
                  flops=1.25e12, param_bytes=900_000, peak_memory_bytes=2.5e9, memory_capacity_bytes=7.6e10,
                  fwd_time_s=0.011, bwd_time_s=0.022, send_bytes=0.0),
    )
    fields = {
        "strategy": "hybrid", "partitioner": "metis", "schedule": "1f1b", "microbatches": 8, "replicas": 2,
        "batch_size": 32, "training": True, "optimizer": "adam",
        "cluster": {"fxshard_cluster": 1, "devices": [{"index": 0, "name": "A100"}], "note": "hand-made"},
        "model": ModelInfo(name="Toy", nodes=6, param_bytes=1_900_000, fingerprint="0123456789abcdef",
                           method="symbolic_trace"),
        "stages": stages,
        "estimate": Estimate(step_time_s=0.31, bubble_fraction=1 / 3, samples_per_s=32 / 0.31,
                             lower_bound_step_time_s=0.2, allreduce_time_s=0.01),
        "reason": "the model does not fit one device",
        "alternatives": (
            Alternative(strategy="hybrid", stages=2, replicas=2, microbatches=8, schedule="1f1b", step_time_s=0.31,
                        samples_per_s=32 / 0.31, peak_memory_bytes=3.25e9, fits=True),
            Alternative(strategy="single", stages=1, replicas=1, microbatches=1, schedule=None, step_time_s=-1.0,
                        samples_per_s=0.0, peak_memory_bytes=9e10, fits=False, note="needs 90 GB, device has 76 GB"),
        ),
    }
    fields.update(overrides)
    return Plan(**fields)


def test_hand_made_round_trip():
    p = make_plan()
    text = p.to_json()
    assert Plan.from_json(text) == p
    assert Plan.from_json(text).to_json() == text
    assert p.to_json() == make_plan().to_json()
    assert p.stage_of() == {"x": 0, "embed": 0, "block_0": 0, "block_1": 1, "head": 1, "output": 1}
    assert p.num_stages == 2


def test_hand_made_text():
    text = str(make_plan())
    assert "hybrid (2 stages x 2 replicas, 4 devices)" in text
    assert "schedule 1f1b" in text and "8 micro-batches" in text
    assert "stage 0 on cuda:0,cuda:2" in text and "stage 1 on cuda:1,cuda:3" in text
    assert "embed .. block.0" in text
    assert "training with adam" in text
    assert "estimate: step 310.00 ms" in text
    assert "why: the model does not fit one device" in text


@pytest.mark.parametrize("strategy,shape", [("single", "1 device"), ("ddp", "2 data-parallel replicas"),
                                            ("pipeline", "2 stages, 4 devices"),
                                            ("hybrid", "2 stages x 2 replicas, 4 devices")])
def test_text_names_each_strategy(strategy, shape):
    assert f"{strategy} ({shape})" in str(make_plan(strategy=strategy))


def _virtual_plan(replicas: int, schedule: str = "zbv") -> Plan:
    """Hand-made V-shaped plan: 4 stages on 2 ranks (stages 0 and 3 share a rank), each rank x ``replicas``."""
    base = make_plan().stages[0]
    rank_of = (0, 1, 1, 0)
    stages = tuple(dataclasses.replace(base, index=i, devices=tuple(f"cuda:{rank_of[i] * replicas + r}"
                                                                    for r in range(replicas)),
                                       device_indices=tuple(rank_of[i] * replicas + r for r in range(replicas)),
                                       memory_capacity_bytes=3.8e10)
                   for i in range(4))
    return make_plan(strategy="hybrid" if replicas > 1 else "pipeline", replicas=replicas, schedule=schedule,
                     stages=stages, alternatives=())


@pytest.mark.parametrize("replicas,shape", [
    (4, "hybrid (4 stages x 4 replicas, 2 stages per device (zbv), 8 devices)"),
    (1, "pipeline (4 stages, 2 stages per device (zbv), 2 devices)"),
])
def test_text_says_how_many_stages_share_a_device(replicas, shape):
    # 4 stages x 4 replicas on 8 devices only adds up with 2 stages per device, each given half
    # of its memory: the text form says so (issue 12, item 10).
    p = _virtual_plan(replicas)
    assert (p.num_devices, p.stages_per_device) == (2 * replicas, 2)
    assert p.num_stages * p.replicas // p.stages_per_device == p.num_devices
    text = str(p)
    assert shape in text.splitlines()[0]
    assert "each device holds 2 stages (zbv places 2 per rank), each stage given 1/2 of its memory" in text


def test_one_stage_per_device_says_nothing_about_sharing():
    p = make_plan()
    assert (p.num_devices, p.stages_per_device) == (4, 1)
    assert "per device" not in str(p) and "each device holds" not in str(p)


def test_plan_without_schedule_round_trips():
    p = make_plan(strategy="ddp", schedule=None, microbatches=1, alternatives=(), reason="")
    assert Plan.from_json(p.to_json()) == p
    assert "schedule" not in str(p).splitlines()[0]


finite = st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False)
names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@st.composite
def plans(draw):
    k = draw(st.integers(1, 4))
    all_nodes = draw(st.lists(names, min_size=k, max_size=3 * k, unique=True))
    cuts = sorted(draw(st.lists(st.integers(1, len(all_nodes) - 1), min_size=k - 1, max_size=k - 1, unique=True))
                  if len(all_nodes) > k else range(1, k))
    bounds = [0, *cuts, len(all_nodes)]
    stages = tuple(StagePlan(index=i, devices=tuple(draw(st.lists(names, min_size=1, max_size=3))),
                             device_indices=tuple(draw(st.lists(st.integers(0, 64), min_size=1, max_size=3))),
                             nodes=tuple(all_nodes[bounds[i]:bounds[i + 1]]), flops=draw(finite),
                             param_bytes=draw(st.integers(0, 2**50)), peak_memory_bytes=draw(finite),
                             memory_capacity_bytes=draw(finite), fwd_time_s=draw(finite), bwd_time_s=draw(finite),
                             send_bytes=draw(finite), first_module=draw(st.text(max_size=8)))
                   for i in range(k))
    return make_plan(stages=stages, strategy=draw(st.sampled_from(["single", "ddp", "pipeline", "hybrid"])),
                     schedule=draw(st.none() | st.sampled_from(["gpipe", "1f1b", "zbv"])),
                     microbatches=draw(st.integers(1, 512)), replicas=draw(st.integers(1, 64)),
                     training=draw(st.booleans()), reason=draw(st.text(max_size=20)),
                     cluster={"k": draw(st.lists(finite, max_size=3)), "s": draw(names)},
                     estimate=Estimate(step_time_s=draw(finite), bubble_fraction=draw(st.floats(0, 1)),
                                       samples_per_s=draw(finite), lower_bound_step_time_s=draw(finite)))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(plans())
def test_round_trip_property(p):
    text = p.to_json()
    q = Plan.from_json(text)
    assert q == p
    assert q.to_json() == text
    assert str(q) == str(p)
    assert sorted(q.stage_of()) == sorted(n for s in p.stages for n in s.nodes)


# -- validation and malformed input -------------------------------------------------------------


def test_plan_format_error_is_an_fxshard_error():
    assert issubclass(PlanFormatError, FxshardError)


@pytest.mark.parametrize("version", [0, 3, 99, "1", None])
def test_schema_version_mismatch(version):
    data = make_plan().to_dict()
    data["fxshard_plan"] = version
    with pytest.raises(PlanFormatError, match=rf"schema version {version!r}.*versions 1, {SCHEMA_VERSION}"):
        Plan.from_json(json.dumps(data))


def test_version_1_plans_load_as_replicas_without_checkpointing():
    data = make_plan().to_dict()
    data["fxshard_plan"] = 1
    del data["data_parallel"], data["reshard_after_forward"]
    for stage in data["stages"]:
        del stage["activation_checkpointing"]
    for alt in data["alternatives"]:
        del alt["data_parallel"], alt["activation_checkpointing"]
    plan = Plan.from_json(json.dumps(data))
    assert plan.fxshard_plan == 2 and plan.data_parallel == "ddp"
    assert {s.activation_checkpointing for s in plan.stages} == {"none"}
    assert plan == make_plan()


def test_levers_are_checked():
    with pytest.raises(PlanFormatError, match="data_parallel='fsdp' with strategy 'pipeline'"):
        make_plan(strategy="pipeline", replicas=1, data_parallel="fsdp")
    stage = dataclasses.replace(make_plan().stages[0], activation_checkpointing="most")
    with pytest.raises(PlanFormatError, match="stage 0: activation_checkpointing='most'"):
        make_plan(stages=(stage, make_plan().stages[1]))
    sharded = make_plan(data_parallel="fsdp")
    assert Plan.from_json(sharded.to_json()) == sharded and "2 FSDP shards" in sharded.shape_text()


def test_missing_schema_version():
    data = make_plan().to_dict()
    del data["fxshard_plan"]
    with pytest.raises(PlanFormatError, match="schema version None"):
        Plan.from_dict(data)


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2", '{"fxshard_plan": 1,}'])
def test_malformed_json(text):
    with pytest.raises(PlanFormatError, match="not valid JSON"):
        Plan.from_json(text)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"plan"'])
def test_json_that_is_not_an_object(text):
    with pytest.raises(PlanFormatError, match="JSON object"):
        Plan.from_json(text)


def _drop(path):
    def mutate(d):
        *head, last = path
        for key in head:
            d = d[key]
        del d[last]
    mutate.__name__ = "drop-" + "/".join(map(str, path))
    return mutate


def _set(path, value):
    def mutate(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] = value
    mutate.__name__ = "set-" + "/".join(map(str, path))
    return mutate


@pytest.mark.parametrize("mutate", [
    _drop(["strategy"]), _drop(["model"]), _drop(["stages"]), _drop(["estimate"]), _drop(["microbatches"]),
    _drop(["model", "fingerprint"]), _drop(["estimate", "step_time_s"]), _drop(["stages", 0, "nodes"]),
    _drop(["stages", 1, "index"]), _drop(["alternatives", 0, "fits"]), _set(["unexpected"], 1),
    _set(["stages", 0, "colour"], "red"), _set(["model"], "Toy"), _set(["stages"], 5), _set(["stages", 0], None),
    _set(["stages", 0, "nodes"], None), _set(["estimate"], None), _set(["microbatches"], "8"),
    _set(["alternatives"], None), _set(["alternatives", 0, "colour"], "red"),
], ids=lambda f: f.__name__)
def test_missing_or_unexpected_fields(mutate):
    data = json.loads(make_plan().to_json())
    mutate(data)
    with pytest.raises(PlanFormatError):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("field,value,match", [
    ("strategy", "tensor-parallel", r"strategy='tensor-parallel'; use one of single, ddp, fsdp, pipeline, hybrid"),
    ("strategy", "", "strategy=''"),
    ("microbatches", 0, "microbatches=0"),
    ("microbatches", -3, "microbatches=-3"),
    ("replicas", 0, "replicas=0"),
])
def test_bad_fields_are_refused(field, value, match):
    with pytest.raises(PlanFormatError, match=match):
        make_plan(**{field: value})
    data = make_plan().to_dict()
    data[field] = value
    with pytest.raises(PlanFormatError, match=match):
        Plan.from_json(json.dumps(data))


def test_stage_indices_must_count_from_zero():
    p = make_plan()
    swapped = (dataclasses.replace(p.stages[0], index=1), dataclasses.replace(p.stages[1], index=0))
    with pytest.raises(PlanFormatError, match=r"stage indices \[1, 0\]"):
        make_plan(stages=swapped)
    data = p.to_dict()
    data["stages"][1]["index"] = 5
    with pytest.raises(PlanFormatError, match="stage indices"):
        Plan.from_dict(data)


# -- library bugs (see the report) -------------------------------------------------------------


def test_stage_that_is_a_string_is_a_format_error():
    data = make_plan().to_dict()
    data["stages"] = ["xy"]
    with pytest.raises(PlanFormatError):
        Plan.from_json(json.dumps(data))


def test_cluster_that_is_not_an_object_is_a_format_error():
    data = make_plan().to_dict()
    data["cluster"] = 5
    with pytest.raises(PlanFormatError):
        Plan.from_json(json.dumps(data)).to_json()


def test_schema_version_true_is_not_version_1():
    data = make_plan().to_dict()
    data["fxshard_plan"] = True
    with pytest.raises(PlanFormatError, match="schema version"):
        Plan.from_json(json.dumps(data))
