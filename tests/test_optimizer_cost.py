"""The optimizer step's temporaries and time (fxshard/cost_models/optimizer_step.py) and where
the planner and the simulator take them in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxshard
from fxshard.candidates import Pricer, optimizer_figures
from fxshard.candidates_whole import price_data_parallel
from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.cost_models.analytical import factors_for
from fxshard.cost_models.host_memory import ResidentPeak, pin_mmap_threshold
from fxshard.cost_models.optimizer_step import (
    optimizer_implementation,
    optimizer_step_bytes,
    optimizer_step_time,
    optimizer_step_transient_bytes,
)
from fxshard.devices import PRESETS
from fxshard.errors import CostModelError
from fxshard.plan_options import PlanOptions
from fxshard.simulate import StageTiming, simulate
from fxshard.simulate_plan import simulate_plan
from fxshard.zoo import build

SIZES = [4e6, 1e6, 2e6]


@pytest.mark.parametrize("optimizer,kind,impl,transient", [
    ("adam", "cpu", "single", 8e6),     # exp_avg_sq.sqrt() / bias_correction2_sqrt: two of the largest
    ("adam", "cuda", "foreach", 7e6),   # torch._foreach_sqrt over the whole group
    ("adam", "rocm", "foreach", 7e6),
    ("sgd", "cpu", "single", 0.0),      # param.add_(grad, alpha=-lr): in place
    ("sgd", "cuda", "foreach", 0.0),
    ("none", "cpu", "none", 0.0),
])
def test_transient_per_optimizer_and_device(optimizer, kind, impl, transient):
    assert optimizer_implementation(optimizer, kind) == impl
    assert optimizer_step_transient_bytes(optimizer, SIZES, kind) == transient


def test_fused_adam_and_no_parameters_hold_nothing():
    assert optimizer_step_transient_bytes("adam", SIZES, "cuda", fused=True) == 0.0
    assert optimizer_step_transient_bytes("adam", [], "cpu") == 0.0


def test_unknown_optimizer_is_refused():
    with pytest.raises(CostModelError, match="optimizer='lamb'"):
        optimizer_step_transient_bytes("lamb", SIZES, "cpu")


def test_step_time_is_a_memory_bound_pass():
    cpu = PRESETS["cpu"]
    adam, sgd = optimizer_step_time("adam", 1e8, cpu), optimizer_step_time("sgd", 1e8, cpu)
    assert optimizer_step_bytes("adam", 1e8, "cpu") == 18e8 and optimizer_step_bytes("sgd", 1e8, "cpu") == 3e8
    f = factors_for(cpu)
    assert adam == pytest.approx(18e8 / (cpu.memory_bandwidth * f.memory_eff) + 7 * f.launch_overhead_s)
    assert adam > sgd > 0.0
    assert optimizer_step_time("none", 1e8, cpu) == 0.0
    assert optimizer_step_time("adam", 1e8, cpu, training=False) == 0.0


def test_simulated_peak_takes_the_larger_phase_and_the_step_adds_the_optimizer():
    base = StageTiming(fwd_s=1.0, bwd_s=2.0, static_bytes=100.0, activation_bytes=10.0, transient_bytes=5.0)
    small = simulate("gpipe", [StageTiming(**{**vars(base), "optimizer_transient_bytes": 20.0})], 2)
    large = simulate("gpipe", [StageTiming(**{**vars(base), "optimizer_transient_bytes": 40.0})], 2)
    assert small.peak_memory_bytes == (125.0,)   # 100 + max(2 x 10 + 5, 20)
    assert large.peak_memory_bytes == (140.0,)   # 100 + max(25, 40)
    timed = simulate("gpipe", [StageTiming(**{**vars(base), "optimizer_s": 0.5})], 2)
    assert timed.step_time_s == pytest.approx(6.5)
    assert [a.kind for a in timed.timeline][-1] == "O"


@pytest.fixture(scope="module")
def tiny():
    z = build("gpt2-tiny", batch_size=2, seed=0)
    return z, capture(z.model, z.example_inputs)


def test_planner_peak_and_step_include_the_optimizer(tiny):
    _, captured = tiny
    cluster = Cluster.parse("1xcpu:1GB")
    pricer = Pricer(captured, "analytical", 2)
    priced = price_data_parallel(pricer, cluster, 1, PlanOptions())
    (st,) = priced.stages
    temps = 2 * max(st.optimizer_param_sizes)
    assert priced.peak[0] == pytest.approx(st.state_bytes + max(st.activation_bytes + st.transient_bytes, temps))
    seconds = optimizer_step_time("adam", st.param_bytes, cluster.devices[0].spec)
    assert priced.step_time_s == pytest.approx(st.fwd_time_s + st.bwd_time_s + seconds)
    inference = price_data_parallel(pricer, cluster, 1, PlanOptions(training=False))
    assert inference.step_time_s == pytest.approx(inference.stages[0].fwd_time_s)


@pytest.mark.parametrize("training", [True, False])
def test_simulate_plan_repeats_the_planner_with_the_optimizer_step(tiny, training):
    z, _ = tiny
    p = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", training=training)
    r = simulate_plan(p)
    assert r.step_time_s == pytest.approx(p.estimate.step_time_s)
    steps = [a for a in r.timeline if a.kind == "O"]
    if not training:
        assert not steps
        return
    cluster = Cluster.from_dict(p.cluster)
    assert sorted(a.stage for a in steps) == list(range(p.num_stages))
    for a in steps:
        st = p.stages[a.stage]
        expected = optimizer_step_time("adam", st.param_bytes, cluster.devices[st.device_indices[0]].spec)
        assert a.end - a.start == pytest.approx(expected)


@pytest.mark.skipif(not ResidentPeak.available(), reason="needs /proc/self/clear_refs (Linux)")
def test_measured_adam_step_peak_matches_the_prediction():
    """One Adam step of a model with one large embedding, on the CPU: the resident peak above
    the weights and moments is the gradients plus the larger of the backward's and the
    optimizer step's temporaries (two of the largest parameter), within 15%."""
    pin_mmap_threshold()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40000, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    tokens = torch.randint(0, 40000, (2, 8))
    captured = capture(model, (tokens,))
    priced = price_data_parallel(Pricer(captured, "analytical", 2), Cluster.parse("1xcpu:1GB"), 1, PlanOptions())
    (st,) = priced.stages
    held = 3 * st.param_bytes  # weights and Adam's two moments, held before the step begins
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        model(tokens).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the moments exist from here on
    measured = ResidentPeak.of(step)
    predicted = priced.peak[0] - held
    assert measured == pytest.approx(predicted, rel=0.15), (measured, predicted)


def test_a_ranks_temporaries_are_split_among_its_stages(tiny):
    """One optimizer per rank steps all its stages' parameters: its temporaries are counted once
    per device (two of the rank's largest on the CPU), split evenly among the stages on it."""
    _, captured = tiny
    cluster = Cluster.parse("1xcpu:1GB")
    pricer = Pricer(captured, "analytical", 2)
    (st,) = price_data_parallel(pricer, cluster, 1, PlanOptions()).stages
    spec, opts = cluster.devices[0].spec, PlanOptions()
    alone = optimizer_figures(st, spec, opts)
    small = dataclasses.replace(st, optimizer_param_sizes=(1.0,))
    shared = [optimizer_figures(x, spec, opts, share=2, rank_sizes=st.optimizer_param_sizes + (1.0,))
              for x in (st, small)]
    assert alone[1] == 2 * max(st.optimizer_param_sizes)
    assert [t for _, t in shared] == [alone[1] / 2] * 2  # sums to the rank's once
