"""The training loss priced on the last stage (fxshard/cost_models/loss.py): plans made with
``loss_fn`` (and ``example_target``) add it; plans that cannot price it say so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxshard
from fxshard.capture import capture
from fxshard.cost_models import analyze, estimate, scale_batch
from fxshard.cost_models.loss import capture_loss
from fxshard.cost_models.profiled import ProfiledCostModel
from fxshard.devices import PRESETS
from fxshard.passes.stages import summarize_stages
from fxshard.zoo import build

BATCH = 4


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


@pytest.fixture(scope="module")
def gpt2():
    z = build("gpt2-tiny", batch_size=BATCH, seed=0)
    (tokens,) = z.example_inputs
    return z, torch.roll(tokens, -1, dims=1)


def _pipeline(z, **options):
    return fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", stages=2, schedule="1f1b",
                        microbatches=2, activation_checkpointing="none", **options)


def test_the_loss_adds_to_the_last_stage_only(gpt2):
    z, target = gpt2
    plain = _pipeline(z)
    priced = _pipeline(z, loss_fn=_lm_loss, example_target=target)
    loss = capture_loss(capture(z.model, z.example_inputs), _lm_loss, target)
    assert loss.captured is not None and loss.note == ""
    # per micro-batch: half the batch
    costs = estimate(loss.captured, PRESETS["cpu"], works=scale_batch(analyze(loss.captured), 0.5))
    half = summarize_stages(loss.captured, costs, {}, 1)[0]
    first, last = plain.stages, priced.stages
    assert (last[0].fwd_time_s, last[0].bwd_time_s) == (first[0].fwd_time_s, first[0].bwd_time_s)
    assert last[1].fwd_time_s - first[1].fwd_time_s == pytest.approx(half.fwd_time_s, rel=1e-6)
    assert last[1].bwd_time_s - first[1].bwd_time_s == pytest.approx(half.bwd_time_s, rel=1e-6)
    assert last[1].peak_memory_bytes > first[1].peak_memory_bytes  # the log-softmax and its gradient
    assert priced.estimate.step_time_s > plain.estimate.step_time_s
    assert "loss is not priced" not in priced.reason


def test_a_loss_without_a_target_is_priced_on_the_output_alone(gpt2):
    z, _ = gpt2
    plain = _pipeline(z)
    priced = _pipeline(z, loss_fn=lambda out: out.float().square().mean())
    assert priced.stages[1].fwd_time_s > plain.stages[1].fwd_time_s
    assert "loss is not priced" not in priced.reason


def test_a_loss_that_needs_a_target_it_was_not_given_is_named_in_the_plan(gpt2):
    z, _ = gpt2
    plain = _pipeline(z)
    p = _pipeline(z, loss_fn=_lm_loss)
    assert "the loss is not priced" in p.reason and "example_target=" in p.reason
    assert [s.fwd_time_s for s in p.stages] == [s.fwd_time_s for s in plain.stages]


def test_inference_prices_no_loss(gpt2):
    z, target = gpt2
    a = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", training=False)
    b = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", training=False,
                     loss_fn=_lm_loss, example_target=target)
    assert a.estimate.step_time_s == b.estimate.step_time_s


def test_whole_model_candidates_price_the_loss(gpt2):
    z, target = gpt2
    plain = fxshard.plan(z.model, "1xcpu:2GB", z.example_inputs)
    priced = fxshard.plan(z.model, "1xcpu:2GB", z.example_inputs, loss_fn=_lm_loss, example_target=target)
    assert priced.strategy == plain.strategy == "single"
    assert priced.stages[0].fwd_time_s > plain.stages[0].fwd_time_s
    assert priced.stages[0].bwd_time_s > plain.stages[0].bwd_time_s


def test_compile_planned_at_the_first_step_prices_its_target(gpt2):
    z, target = gpt2
    compiled = fxshard.compile(z.model, "2xcpu:1GB", strategy="pipeline", loss_fn=_lm_loss)
    compiled.step(*z.example_inputs, target=target)
    priced = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", loss_fn=_lm_loss,
                          example_target=target)
    plain = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline")
    assert compiled.plan.estimate == priced.estimate != plain.estimate
    assert "loss is not priced" not in compiled.plan.reason


def test_the_profiled_model_runs_the_loss():
    z = build("gpt2-tiny", batch_size=BATCH, seed=0)
    (tokens,) = z.example_inputs
    loss = capture_loss(capture(z.model, z.example_inputs), _lm_loss, torch.roll(tokens, -1, dims=1))
    model = ProfiledCostModel(warmup=0, repeats=1, threads=1, clock="cpu")
    costs = estimate(loss.captured, PRESETS["cpu"], cost_model=model)
    assert not costs.estimated and not model.segment_fallbacks
    assert costs.fwd_time_s > 0 and costs.bwd_time_s > 0


def test_the_partitioner_sees_the_loss_on_the_output_node(gpt2):
    from fxshard.candidates import Pricer
    from fxshard.cluster import Cluster
    from fxshard.plan_options import PlanOptions

    z, target = gpt2
    captured = capture(z.model, z.example_inputs)
    loss = capture_loss(captured, _lm_loss, target)
    cluster, opts = Cluster.parse("2xcpu:1GB"), PlanOptions()
    plain = Pricer(captured, "analytical", BATCH).partition(cluster, 2, [0, 1], 1.0, opts)[1]
    priced = Pricer(captured, "analytical", BATCH, loss=loss)
    graph = priced.partition(cluster, 2, [0, 1], 1.0, opts)[1]
    full = priced.loss_summary(cluster.devices[0].spec, 1.0)
    out = next(n for n, a in graph.nodes(data=True) if a.get("pin") == "last")
    assert graph.nodes[out]["compute"] == pytest.approx(plain.nodes[out]["compute"] + full.fwd_time_s + full.bwd_time_s)
    assert graph.nodes[out]["memory"] == pytest.approx(plain.nodes[out]["memory"] + full.activation_bytes)
    others = [n for n in graph.nodes if n != out]
    assert all(graph.nodes[n]["compute"] == plain.nodes[n]["compute"] for n in others)
