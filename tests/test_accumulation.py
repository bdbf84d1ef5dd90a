"""Gradient accumulation across a step's micro-batches, and the step's passes measured by the
profiled cost model (fxshard/cost_models/optimizer_step.py: StepRates), where the planner, the
simulator and saved plans take them in."""

from __future__ import annotations

import pytest
import torch

import fxshard
from fxshard.candidates import Pricer
from fxshard.candidates_whole import price_data_parallel
from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.cost_models import estimate
from fxshard.cost_models.analytical import AnalyticalCostModel, RooflineFactors, factors_for
from fxshard.cost_models.host_memory import ResidentPeak, pin_mmap_threshold
from fxshard.cost_models.optimizer_step import StepRates, accumulate_time, measure_step_rates
from fxshard.cost_models.profiled import ProfiledCostModel
from fxshard.devices import PRESETS
from fxshard.plan import Plan
from fxshard.plan_options import PlanOptions
from fxshard.simulate import StageTiming, simulate
from fxshard.simulate_plan import simulate_plan
from fxshard.zoo import build


@pytest.fixture(scope="module")
def tiny():
    z = build("gpt2-tiny", batch_size=4, seed=0)
    return z, capture(z.model, z.example_inputs)


def test_accumulation_is_a_memory_pass_over_three_gradient_copies():
    cpu = PRESETS["cpu"]
    f = factors_for(cpu)
    assert accumulate_time(1e8, cpu) == pytest.approx(3e8 / (cpu.memory_bandwidth * f.memory_eff)
                                                      + f.launch_overhead_s)
    assert accumulate_time(0, cpu) == 0.0
    slow = RooflineFactors(matmul_eff=0.5, memory_eff=0.1, launch_overhead_s=0.0)
    assert StepRates(device=cpu, factors=slow).accumulate_s(1e8) == pytest.approx(3e8 / (cpu.memory_bandwidth * 0.1))


def test_measured_rates_price_linearly_and_fall_back_per_optimizer():
    cpu = PRESETS["cpu"]
    rates = StepRates(device=cpu, accumulate_s_per_byte=2e-10, optimizer_s_per_byte=(("adam", 1e-9),),
                      source="measured on cpu")
    assert rates.accumulate_s(1e6) == pytest.approx(2e-4)
    assert rates.optimizer_s("adam", 1e6) == pytest.approx(1e-3)
    assert rates.optimizer_s("sgd", 1e6) == StepRates(device=cpu).optimizer_s("sgd", 1e6)  # not measured
    assert rates.optimizer_s("adam", 1e6, training=False) == 0.0
    assert rates.optimizer_s("none", 1e6) == 0.0


def test_measure_step_rates_times_the_real_passes():
    rates = measure_step_rates(PRESETS["cpu"], torch.device("cpu"), numel=1 << 16, repeats=2, clock="cpu")
    measured = dict(rates.optimizer_s_per_byte)
    assert rates.accumulate_s_per_byte > 0 and set(measured) == {"adam", "sgd"}
    assert measured["adam"] > 0 and measured["sgd"] > 0
    assert rates.source == "measured on cpu"


def test_every_backward_but_the_first_accumulates():
    t = StageTiming(fwd_s=1.0, bwd_s=2.0, accumulate_s=0.5)
    r = simulate("1f1b", [t, t], 4)
    assert r.busy_s == pytest.approx((4 * 3.0 + 3 * 0.5,) * 2)
    backward = sorted((a for a in r.timeline if a.kind == "B" and a.stage == 0), key=lambda a: a.start)
    assert [round(a.end - a.start, 9) for a in backward] == [2.0, 2.5, 2.5, 2.5]
    one = simulate("gpipe", [t], 1)
    assert one.step_time_s == pytest.approx(3.0)  # a single micro-batch never accumulates


def test_a_split_backward_accumulates_in_its_weight_part():
    t = StageTiming(fwd_s=1.0, bwd_s=2.0, accumulate_s=0.5)
    r = simulate("zbv", [t] * 4, 4)
    for kind, extra in (("I", 0.0), ("W", 0.5)):
        durations = sorted(round(a.end - a.start, 9) for a in r.timeline if a.kind == kind and a.stage == 0)
        assert durations[-1] == pytest.approx(1.0 + extra)
    assert sum(a.end - a.start for a in r.timeline if a.rank == 0) == pytest.approx(2 * (4 * 3.0 + 3 * 0.5))


def test_the_new_gradient_is_in_the_peak_only_when_accumulating():
    t = StageTiming(fwd_s=1.0, bwd_s=2.0, static_bytes=100.0, activation_bytes=10.0, transient_bytes=5.0,
                    accumulate_bytes=7.0)
    assert simulate("gpipe", [t], 1).peak_memory_bytes == (115.0,)
    assert simulate("gpipe", [t], 2).peak_memory_bytes == (100.0 + 20.0 + 5.0 + 7.0,)


def test_gradient_accumulation_candidates_pay_for_it(tiny):
    _, captured = tiny
    cluster = Cluster.parse("2xcpu:1GB")
    pricer = Pricer(captured, "analytical", 4)
    one = price_data_parallel(pricer, cluster, 2, PlanOptions(), microbatches=1)
    two = price_data_parallel(pricer, cluster, 2, PlanOptions(), microbatches=2)
    st = two.stages[0]
    assert st.accumulate_time_s == pytest.approx(accumulate_time(st.param_bytes, cluster.devices[0].spec))
    half_work = 2 * (st.fwd_time_s + st.bwd_time_s)
    assert two.step_time_s == pytest.approx(half_work + st.accumulate_time_s + st.optimizer_time_s
                                            + two.allreduce_s)
    assert two.peak[0] - one.peak[0] == pytest.approx(
        st.largest_param_bytes - (one.stages[0].activation_bytes - st.activation_bytes)
        - (one.stages[0].transient_bytes - st.transient_bytes))


def test_plans_store_the_passes_and_old_plans_reprice_them(tiny):
    z, _ = tiny
    p = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", microbatches=4)
    cluster = Cluster.from_dict(p.cluster)
    for st in p.stages:
        spec = cluster.devices[st.device_indices[0]].spec
        assert st.accumulate_time_s == pytest.approx(accumulate_time(st.param_bytes, spec))
        assert st.optimizer_time_s > 0
    again = Plan.from_json(p.to_json())
    assert again == p
    assert simulate_plan(again).step_time_s == pytest.approx(p.estimate.step_time_s, rel=1e-9)
    data = p.to_dict()
    for stage in data["stages"]:  # a plan written before the passes were stored
        del stage["optimizer_time_s"], stage["accumulate_time_s"]
    old = Plan.from_dict(data)
    assert old.stages[0].accumulate_time_s is None
    assert simulate_plan(old).step_time_s == pytest.approx(p.estimate.step_time_s, rel=1e-9)


def test_the_profiled_model_prices_the_passes_it_measured(tiny):
    _, captured = tiny
    cpu = PRESETS["cpu"]
    model = ProfiledCostModel(warmup=0, repeats=1, threads=1, clock="cpu")
    rates = StepRates(device=cpu, accumulate_s_per_byte=1e-9, optimizer_s_per_byte=(("adam", 5e-9),),
                      source="measured on cpu")
    model._rates[(cpu.name, "cpu")] = rates  # what step_rates measured, fixed so that the figures are exact
    costs = estimate(captured, cpu, cost_model=model)
    assert costs.rates is rates
    assert estimate(captured, cpu).rates == AnalyticalCostModel().step_rates(cpu)
    cluster = Cluster.parse("1xcpu:1GB")
    pricer = Pricer(captured, model, 4)
    priced = price_data_parallel(pricer, cluster, 1, PlanOptions(), microbatches=1)
    st = priced.stages[0]
    assert st.optimizer_time_s == pytest.approx(5e-9 * st.param_bytes)
    assert st.accumulate_time_s == pytest.approx(1e-9 * st.param_bytes)


@pytest.mark.skipif(not ResidentPeak.available(), reason="needs /proc/self/clear_refs (Linux)")
def test_measured_accumulation_peak_matches_the_prediction():
    """Two micro-batches into the gradients of a model with one large embedding, on the CPU: the
    second backward holds its new gradient next to the accumulated ones. The resident peak
    above the weights is the predicted peak less the weights, within 15%."""
    pin_mmap_threshold()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40000, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    tokens = torch.randint(0, 40000, (4, 8))
    captured = capture(model, (tokens,))
    opts = PlanOptions(optimizer="sgd")  # no moments: the step holds the weights only
    priced = price_data_parallel(Pricer(captured, "analytical", 4), Cluster.parse("2xcpu:1GB"), 1, opts,
                                 microbatches=2)
    (st,) = priced.stages
    weights = st.param_bytes

    def step() -> None:
        for half in tokens.chunk(2):
            model(half).square().mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    measured = ResidentPeak.of(step)
    predicted = priced.peak[0] - weights
    assert measured == pytest.approx(predicted, rel=0.15), (measured, predicted)
