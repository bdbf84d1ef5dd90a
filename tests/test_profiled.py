"""The profiled cost model times the graph as it runs: segments at the micro-batch, each distinct once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxshard.capture import capture
from fxshard.cluster import get_preset
from fxshard.cost_models import ProfiledCostModel, analyze, estimate, scale_batch, segments
from fxshard.errors import CostModelError
from fxshard.zoo import build

CPU = get_preset("cpu")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    z = build("gpt2-tiny", batch_size=8)
    return capture(z.model, z.example_inputs)


def test_segment_times_sum_to_each_segments_measured_time(gpt2):
    profiler = ProfiledCostModel(warmup=0, repeats=1)
    costs = estimate(gpt2, CPU, cost_model=profiler, works=scale_batch(analyze(gpt2), 0.25))
    assert [s.segment.block for s in profiler.segments] == ["", "h.0", "h.1", ""]
    assert not profiler.segment_fallbacks and not costs.estimated
    covered = [n for s in profiler.segments for n in s.segment.nodes]
    assert len(covered) == len(set(covered))  # every compute node in exactly one segment
    for seg in profiler.segments:
        assert sum(costs[n].fwd_time_s for n in seg.segment.nodes) == pytest.approx(seg.fwd_s, rel=1e-9)
        assert sum(costs[n].bwd_time_s for n in seg.segment.nodes) == pytest.approx(seg.bwd_s, rel=1e-9)
        assert seg.fwd_s > 0
    assert costs.fwd_time_s == pytest.approx(sum(s.fwd_s for s in profiler.segments), rel=1e-9)
    assert profiler.threads_used == torch.get_num_threads()


def test_identical_blocks_are_timed_once_at_the_micro_batch(gpt2, monkeypatch):
    from fxshard.cost_models import profiled

    calls = []
    timed = profiled.interleaved_step_times

    def counting(jobs, *args, **kwargs):
        calls.extend([tuple(a.shape) for a in make() if isinstance(a, torch.Tensor)] for _, make in jobs)
        return timed(jobs, *args, **kwargs)

    monkeypatch.setattr(profiled, "interleaved_step_times", counting)
    profiler = ProfiledCostModel(warmup=0, repeats=1)
    estimate(gpt2, CPU, cost_model=profiler, works=scale_batch(analyze(gpt2), 0.25))
    assert len(calls) == 3  # before the blocks, one block (h.0 and h.1 alike), after them
    assert calls[0] == [(2, 64)] and calls[1][0][0] == 2  # batch 8 at fraction 1/4: micro-batch 2
    h0, h1 = profiler.segments[1:3]
    assert (h0.fwd_s, h0.bwd_s) == (h1.fwd_s, h1.bwd_s)
    calls.clear()
    told = ProfiledCostModel(warmup=0, repeats=1, batch_fraction=1.0)
    costs = estimate(gpt2, CPU, cost_model=told, works=scale_batch(analyze(gpt2), 0.25))
    assert calls[0] == [(8, 64)]  # told the fraction, it measures there, not at the works' micro-batch
    # ... and prices the works it was given: the measurement scaled to their micro-batch, once.
    assert costs.fwd_time_s == pytest.approx(0.25 * sum(s.fwd_s for s in told.segments), rel=1e-9)
    assert costs.bwd_time_s == pytest.approx(0.25 * sum(s.bwd_s for s in told.segments), rel=1e-9)


def test_a_pricer_that_scales_a_fixed_fraction_scales_it_once(gpt2):
    """The planner's pricer asks a measured cost model for the full batch and scales it to the
    micro-batch; a model measuring at its own micro-batch must then not be scaled twice (the
    training loss of a plan priced at 1/4 came out at 1/16 of the batch's)."""
    from fxshard.candidates import Pricer

    profiler = ProfiledCostModel(warmup=0, repeats=1, batch_fraction=0.25)
    costs = Pricer(gpt2, profiler, 8).costs(CPU, 0.25)
    assert costs.fwd_time_s == pytest.approx(sum(s.fwd_s for s in profiler.segments), rel=1e-9)
    assert costs.bwd_time_s == pytest.approx(sum(s.bwd_s for s in profiler.segments), rel=1e-9)


def test_a_model_on_meta_is_timed_with_materialised_weights():
    z = build("llama-tiny", device="meta", batch_size=2, seq_len=16)
    profiler = ProfiledCostModel(device="cpu", warmup=0, repeats=1)
    costs = estimate(capture(z.model, z.example_inputs), CPU, cost_model=profiler)
    assert not profiler.segment_fallbacks, profiler.segment_fallbacks
    assert len([s for s in profiler.segments if s.segment.block]) >= 2
    assert all(c.fwd_time_s > 0 for c in costs if c.work.op == "call_module")
    assert all(p.device.type == "meta" for p in z.model.parameters())


class _PositiveOnly(nn.Module):
    """Fine on its real (positive) inputs; random stand-ins make the Cholesky factor fail."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) @ torch.linalg.cholesky(torch.diag(x.min(0).values))


def test_a_segment_that_cannot_run_is_timed_node_by_node():
    torch.manual_seed(0)
    model, inputs = _PositiveOnly(), (torch.rand(16, 8) + 0.1,)
    model(*inputs)
    profiler = ProfiledCostModel(warmup=0, repeats=1)
    costs = estimate(capture(model, inputs), CPU, cost_model=profiler)
    (first, why), = profiler.segment_fallbacks.items()
    assert "positive-definite" in why and first == profiler.segments[0].segment.nodes[0]
    (name,) = costs.estimated  # the node that cannot run alone either: its analytical time
    assert "cholesky" in name and costs["proj"].fwd_time_s > 0 and not costs["proj"].estimated


def test_nodes_method_and_options():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    captured = capture(model, (torch.randn(8, 16),))
    profiler = ProfiledCostModel(method="nodes", warmup=0, repeats=1, threads=1)
    costs = estimate(captured, CPU, cost_model=profiler)
    assert profiler.segments == [] and profiler.threads_used == 1 and costs.fwd_time_s > 0
    with pytest.raises(CostModelError, match="method='layers'"):
        ProfiledCostModel(method="layers")  # type: ignore[arg-type]
    with pytest.raises(CostModelError, match="batch_fraction=2"):
        ProfiledCostModel(batch_fraction=2)


def test_step_times_runs_fresh_training_steps():
    """Each step: gradients None, a fresh forward, one backward (no replay through a retained graph)."""
    from fxshard.cost_models.profiled import step_times

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    forwards, grad_was_none = [], []
    module.register_forward_hook(lambda *_: forwards.append(1))
    weight = module[0].weight
    weight.register_hook(lambda g: grad_was_none.append(weight.grad is None))
    x = torch.randn(4, 8)
    t = step_times(module, lambda: [x.clone().requires_grad_()], torch.device("cpu"), warmup=1, repeats=3)
    assert t.fwd_s > 0 and t.bwd_s > 0 and t.host_fwd_s > 0 and t.host_bwd_s > 0
    assert len(forwards) == len(grad_was_none) >= 4 and all(grad_was_none)  # a backward per forward, onto None
    assert weight.grad is None
    with torch.no_grad():
        t = step_times(module, lambda: [x], torch.device("cpu"), warmup=0, repeats=2)
    assert t.fwd_s > 0 and t.bwd_s == 0.0  # nothing needs a gradient: no backward


def test_cpu_clock_counts_the_threads_cpu_time():
    """clock="cpu": the calling thread's CPU seconds (what one thread computes, not what it
    waited for a core); a sleep in the forward costs wall time, not CPU time (no speed asserted:
    the sleep only adds to wall, so CPU time below wall holds however loaded the machine is)."""
    import time

    from fxshard.cost_models.timing import step_times

    class Sleepy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.01)
            return super().forward(x)

    module, x = Sleepy(8, 8), torch.randn(4, 8)
    t = step_times(module, lambda: [x], torch.device("cpu"), warmup=0, repeats=2, clock="cpu")
    assert 0 < t.fwd_s < 0.01 <= t.host_fwd_s and 0 < t.cpu_fwd_s < 0.01 and t.bwd_s > 0
    profiler = ProfiledCostModel(warmup=0, repeats=1, threads=1, clock="cpu")
    captured = capture(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), (torch.randn(8, 16),))
    assert estimate(captured, CPU, cost_model=profiler).fwd_time_s > 0 and profiler.clock == "cpu"
    with pytest.raises(CostModelError, match="clock='gpu'"):
        ProfiledCostModel(clock="gpu")  # type: ignore[arg-type]


def test_segments_end_at_a_plans_stage_boundaries(gpt2):
    """Told the plan's stages, a block the plan cuts is timed as the two parts its stages hold."""
    names = [n.name for n in gpt2.gm.graph.nodes]
    h0 = [s for s in segments.segment_graph(gpt2.gm) if s.block == "h.0"][0]
    cut = names.index(h0.nodes[len(h0.nodes) // 2])
    stage_of = {name: int(i >= cut) for i, name in enumerate(names)}
    parts = [s for s in segments.segment_graph(gpt2.gm, stage_of) if s.block == "h.0"]
    assert [p.nodes for p in parts] == [h0.nodes[:len(h0.nodes) // 2], h0.nodes[len(h0.nodes) // 2:]]
    profiler = ProfiledCostModel(warmup=0, repeats=1, stage_of=stage_of)
    costs = estimate(gpt2, CPU, cost_model=profiler, works=scale_batch(analyze(gpt2), 0.25))
    assert [s.segment.block for s in profiler.segments] == ["", "h.0", "h.0", "h.1", ""]
    assert not profiler.segment_fallbacks and not costs.estimated
    for seg in profiler.segments:
        assert sum(costs[n].fwd_time_s for n in seg.segment.nodes) == pytest.approx(seg.fwd_s, rel=1e-9)


def _counting_jobs(monkeypatch):
    """Each timing call's jobs, as the micro-batch of their first tensor input."""
    from fxshard.cost_models import profiled

    calls: list[list[int]] = []
    timed = profiled.interleaved_step_times

    def counting(jobs, *args, **kwargs):
        calls.append([next(a.shape[0] for a in make() if isinstance(a, torch.Tensor)) for _, make in jobs])
        return timed(jobs, *args, **kwargs)

    monkeypatch.setattr(profiled, "interleaved_step_times", counting)
    return calls


def test_the_planners_pricer_measures_each_micro_batch_where_it_runs(gpt2, monkeypatch):
    """Each micro-batch size the planner prices is measured at that size, not scaled from the batch."""
    from fxshard.candidates import Pricer

    calls = _counting_jobs(monkeypatch)
    pricer = Pricer(gpt2, ProfiledCostModel(warmup=0, repeats=1), 8)
    for fraction in (1.0, 0.5, 0.25):
        pricer.costs(CPU, fraction)
    assert [c[0] for c in calls] == [8, 4, 2]
    pricer.costs(CPU, 0.5)
    assert len(calls) == 3  # each size once


def test_prepared_micro_batches_are_measured_together(gpt2, monkeypatch):
    """Told every size first, the model times them all in one interleaved measurement (the samples
    of every segment at every size in turns) and prices each from it without measuring again."""
    from fxshard.candidates import Pricer

    calls = _counting_jobs(monkeypatch)
    model = ProfiledCostModel(warmup=0, repeats=1)
    pricer = Pricer(gpt2, model, 8)
    pricer.prepare([CPU], [1.0, 0.5, 0.25])
    assert len(calls) == 1 and sorted(set(calls[0])) == [2, 4, 8]
    assert len(calls[0]) == 3 * 3  # before the blocks, one block (h.0 = h.1), after them: at each size
    for fraction in (1.0, 0.5, 0.25):
        costs = pricer.costs(CPU, fraction)  # each priced from its own size's segments
        assert costs.fwd_time_s == pytest.approx(sum(s.fwd_s for s in model.segments), rel=1e-9)
        assert costs.fwd_time_s > 0
    assert len(calls) == 1


def test_interleaved_step_times_takes_samples_in_turns():
    """Round r samples every job once, in order; a job that fails is reported, the others timed."""
    from fxshard.cost_models.timing import interleaved_step_times

    order = []

    class Tagged(nn.Linear):
        def __init__(self, tag):
            super().__init__(4, 4)
            self.tag = tag

        def forward(self, x):
            order.append(self.tag)
            if self.tag == "bad":
                raise ValueError("refuses its inputs")
            return super().forward(x)

    x = torch.randn(2, 4)
    jobs = [(Tagged(t), lambda: [x]) for t in ("a", "bad", "b")]
    out = interleaved_step_times(jobs, torch.device("cpu"), warmup=1, repeats=3, min_sample_s=0.0)
    assert isinstance(out[1], ValueError) and "refuses" in str(out[1])
    assert out[0].fwd_s > 0 and out[2].bwd_s > 0
    assert order[:3] == ["a", "bad", "b"]  # one warm-up step each ("bad" fails there)
    assert order.count("bad") == 1
    # (a heap kept warm by another test adds warm-up rounds of a, b; the samples come last)
    assert [t for t in order if t != "bad"][-6:] == ["a", "b"] * 3
    assert all(p.grad is None for m, _ in jobs for p in m.parameters())


def test_a_step_in_the_machines_speed_moves_no_job_against_another():
    """The machine turns 30% slower during round 3, after job a's sample and before b's and c's: the
    plain medians put a 30% below b and c; divided by each round's speed, every job keeps its own
    time, and an outlier (b's round 2) is left out."""
    from fxshard.cost_models.timing import StepTime, _median, _round_paired

    base = {"a": (1.0, 2.0), "b": (3.0, 1.0), "c": (0.5, 0.5)}

    def speed(job, r):
        return 1.0 if r < 2 or (r == 2 and job == "a") else 1.3

    samples = [[StepTime(fwd_s=f * speed(job, r) * (2.0 if (job, r) == ("b", 1) else 1.0), bwd_s=b * speed(job, r))
                for r in range(5)] for job, (f, b) in base.items()]
    plain = [_median(s).fwd_s / base[job][0] for s, job in zip(samples, base)]
    assert plain == pytest.approx([1.0, 1.3, 1.3])
    out = _round_paired(samples)
    ratios = [t.fwd_s / base[job][0] for t, job in zip(out, base)]
    ratios += [t.bwd_s / base[job][1] for t, job in zip(out, base)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    one = [[StepTime(fwd_s=x, bwd_s=x) for x in (1.0, 5.0, 2.0)]]
    assert _round_paired(one)[0].fwd_s == 2.0  # one job: the plain median


def test_the_planner_tells_a_measuring_model_every_size_first():
    """A cost model with a ``prepare`` hook hears every micro-batch the search prices before it prices
    any (a plug-in's contract: docs/cost_models.md)."""
    import fxshard
    from fxshard.cost_models import AnalyticalCostModel
    from fxshard.cost_models.profiled import _batch_fraction

    class Recording(AnalyticalCostModel):
        name = "recording"

        def __init__(self):
            super().__init__()
            self.prepared, self.priced = [], []

        def prepare(self, captured, device, fractions):
            assert not self.priced, "prepare must come before any pricing"
            self.prepared += [round(f, 12) for f in fractions]

        def node_times(self, captured, works, device):
            self.priced.append(round(_batch_fraction(captured, works), 12))
            return super().node_times(captured, works, device)

    z = build("gpt2-tiny", batch_size=8)
    model = Recording()
    fxshard.plan(z.model, 4, z.example_inputs, cost_model=model, exhaustive=True)
    assert set(model.priced) <= set(model.prepared) and {1.0, 0.5, 0.25} <= set(model.priced)
