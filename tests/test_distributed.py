"""Real multi-process runs with gloo: every rank's gradients equal a deep-copied reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fxshard.zoo import build
from tests.dist_harness import run

pytestmark = pytest.mark.slow  # every test here starts ranks in processes (torchrun or mp.spawn)


def _lm_loss(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def _build(name: str, batch: int):
    from fxshard.zoo import build

    z = build(name, batch_size=batch, seed=0)
    return z.model, z.example_inputs


def _check_rank(rank: int, world: int, name: str, schedule: str, microbatches: int, strategy: str,
                steps: int) -> None:
    import fxshard

    torch.manual_seed(0)
    model, inputs = _build(name, 4)
    reference = copy.deepcopy(model)
    target = torch.randint(0, 256, inputs[0].shape, generator=torch.Generator().manual_seed(1))
    compiled = fxshard.compile(model, f"{world}xcpu:1GB", inputs, strategy=strategy, schedule=schedule,
                               microbatches=microbatches, loss_fn=_lm_loss)
    assert compiled.plan.num_stages * compiled.plan.replicas >= world
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    owned = dict(compiled.named_parameters())
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = compiled.step(*inputs, target=target)
        ref_loss = _lm_loss(reference(*inputs), target)
        ref_loss.backward()
        ref_grads = dict(reference.named_parameters(remove_duplicate=False))
        for pname, p in owned.items():
            torch.testing.assert_close(p.grad, ref_grads[pname].grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=pname: f"rank {rank} grad of {n}: {m}")
        if loss is not None:
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        opt.step()
        ref_opt.step()
    # After a few optimizer steps the owned parameters still equal the eager model's.
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    for pname, p in owned.items():
        torch.testing.assert_close(p, ref_params[pname], rtol=1e-5, atol=1e-6)
    # state_dict under the original names, gathered, loads into the original model.
    state = compiled.state_dict(gather=True)
    fresh, _ = _build(name, 4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(*inputs), reference(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_two_rank_pipeline_matches_eager(name, schedule):
    run(_check_rank, 2, name, schedule, 2, "pipeline", 2)


@pytest.mark.parametrize("name,schedule", [("gpt2-tiny", "interleaved1f1b"), ("llama-tiny", "zbv"),
                                           ("gpt2-tiny", "zbv")])
def test_two_rank_multi_stage_schedules_match_eager(name, schedule):
    run(_check_rank, 2, name, schedule, 2, "pipeline", 1)


def test_four_rank_pipeline_matches_eager():
    run(_check_rank, 4, "gpt2-tiny", "1f1b", 4, "pipeline", 2)


def test_four_rank_hybrid_matches_eager():
    run(_check_rank, 4, "gpt2-tiny", "1f1b", 2, "hybrid", 2)


def test_two_rank_ddp_matches_eager():
    run(_check_rank, 2, "gpt2-tiny", None, None, "ddp", 2)


def _wrong_world(rank: int, world: int) -> None:
    import fxshard

    model, inputs = _build("gpt2-tiny", 4)
    plan = fxshard.plan(model, "2xcpu:1GB", inputs, strategy="pipeline", schedule="1f1b")
    assert {d for s in plan.stages for d in s.device_indices} == {0, 1}
    with pytest.raises(fxshard.ExecutionError, match=f"torchrun started {world}"):
        fxshard.CompiledModel(model, "2xcpu:1GB", inputs, plan=plan)


def test_world_size_that_does_not_match_the_plan_is_an_error():
    run(_wrong_world, 3)


def test_example_trains_under_torchrun(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun")
    command = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    script = Path(__file__).resolve().parents[1] / "examples" / "train_pipeline.py"
    result = subprocess.run([*command, "--standalone", "--nproc-per-node", "2", str(script), "--steps", "3"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if " loss " in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "pipeline (2 stages, 2 devices)" in result.stdout


def test_example_checkpoints_on_two_ranks_and_resumes_on_three(tmp_path):
    """The example's checkpoint from a 2-stage run resumes in a 3-stage run; the resumed
    losses are those of an uninterrupted eager run with the same optimizer."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun")
    command = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    script = Path(__file__).resolve().parents[1] / "examples" / "train_pipeline.py"
    ckpt = tmp_path / "ckpt.pt"

    def launch(n: int, *extra: str) -> list[float]:
        result = subprocess.run([*command, "--standalone", "--nproc-per-node", str(n), str(script), *extra],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if " loss " in line]

    first = launch(2, "--steps", "2", "--checkpoint", str(ckpt))
    resumed = launch(3, "--steps", "2", "--resume", str(ckpt))

    z = build("gpt2-tiny", batch_size=8, seed=0)
    model, (tokens,) = z.model, z.example_inputs
    target = torch.roll(tokens, shifts=-1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eager = []
    for _ in range(4):
        opt.zero_grad()
        loss = _lm_loss(model(tokens), target)
        loss.backward()
        opt.step()
        eager.append(loss.item())
    torch.testing.assert_close(torch.tensor(first + resumed), torch.tensor(eager), rtol=1e-4, atol=1e-5)


class _SizeAcross(torch.nn.Module):
    """``n = x.size(0)`` is taken on the first stage and used on the last: a number that
    crosses ranks, so the receiving stage computes with a received value."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        n = x.size(0)
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h.reshape(n, 4, 4).sum(-1)


def _check_exact(rank: int, world: int, which: str) -> None:
    import fxshard

    torch.manual_seed(0)
    if which == "size-across":
        model = _SizeAcross()
        kwargs = {"x": torch.randn(8, 16, generator=torch.Generator().manual_seed(1))}
        target = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
        loss_fn = F.mse_loss
    else:  # a transformers LLaMA from a small config: export graph, keyword inputs, ModelOutput
        from tests.test_patterns import CAUSAL_LMS, _tokens, logits_loss

        model = CAUSAL_LMS["llama"]()
        ids, mask, target = _tokens()
        kwargs = {"input_ids": ids, "attention_mask": mask}
        loss_fn = logits_loss
    reference = copy.deepcopy(model)
    compiled = fxshard.compile(model, f"{world}xcpu:1GB", example_kwargs=kwargs, strategy="pipeline",
                               stages=world, schedule="1f1b", microbatches=4, loss_fn=loss_fn)
    assert compiled.plan.num_stages == world
    loss = compiled.step(**kwargs, target=target)
    ref_loss = loss_fn(reference(**kwargs), target)
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    owned = list(compiled.named_parameters())
    assert owned
    for name, p in owned:
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"rank {rank} grad of {n}: {m}")
    if loss is not None:
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)


def test_a_number_crossing_ranks_arrives_with_its_value():
    """torch's dynamic metadata inference runs a stage on uninitialised buffers, so a received
    int was garbage there; fxshard gives such stages static metadata."""
    run(_check_exact, 2, "size-across")


def test_three_rank_transformers_llama_matches_eager():
    pytest.importorskip("transformers")
    run(_check_exact, 3, "transformers-llama")


# ---------------------------------------------------------------------------------------
# One plan for every rank, on the devices it was made for (issue 12, items 3 and 5)
# ---------------------------------------------------------------------------------------


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(32, 32), torch.nn.Tanh())],
                               torch.nn.Linear(32, 4))


def _mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 32, generator=gen), torch.randn(8, 4, generator=gen)


def _skewed_profiles(heavy_first: bool):
    """What the profiled cost model would report when a rank's core is busy during one half of the
    graph: that half 50x slower. The base times are the analytical ones, so the skew is the only
    difference between ranks (real measurements on a loaded machine could differ between two
    plans on one rank and make the test flaky)."""
    import dataclasses

    from fxshard.cost_models.analytical import AnalyticalCostModel

    def node_times(self, captured, works, device):
        times = AnalyticalCostModel().node_times(captured, works, device)
        half = len(times) // 2
        return [dataclasses.replace(t, fwd_s=t.fwd_s * 50, bwd_s=t.bwd_s * 50) if (i < half) == heavy_first else t
                for i, t in enumerate(times)]

    return node_times


def _step_matches_eager(compiled, reference, x, target) -> None:
    """One MSE step of ``compiled``: this rank's gradients and loss equal the eager reference's."""
    loss = compiled.step(x, target=target)
    ref_loss = F.mse_loss(reference(x), target)
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-7)
    if loss is not None:
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)


def _profiled_ranks(rank: int, world: int) -> None:
    from unittest import mock

    import torch.distributed as dist

    import fxshard
    from fxshard.cost_models.profiled import ProfiledCostModel

    model = _mlp()
    reference = copy.deepcopy(model)
    x, target = _mlp_batch()
    # Rank 0 measures the first half as slow, rank 1 the second: planned apart, they would split
    # the graph differently (2+13 nodes against 9+6).
    with mock.patch.object(ProfiledCostModel, "node_times", _skewed_profiles(heavy_first=rank == 0)):
        compiled = fxshard.compile(model, f"{world}xcpu:1GB", (x,), cost_model="profiled", strategy="pipeline",
                                   stages=world, schedule="gpipe", microbatches=2, loss_fn=F.mse_loss)
        alone = fxshard.plan(_mlp(), f"{world}xcpu:1GB", (x,), cost_model="profiled", strategy="pipeline",
                             stages=world, schedule="gpipe", microbatches=2)
    plans: list = [None] * world
    dist.all_gather_object(plans, compiled.plan.to_json())
    assert all(p == plans[0] for p in plans), "the ranks run different plans"
    if rank == 0:  # the shared plan is rank 0's own
        assert [s.nodes for s in compiled.plan.stages] == [s.nodes for s in alone.stages]
    else:  # what this rank would have planned alone differs: without sharing, the stages clash
        assert [s.nodes for s in compiled.plan.stages] != [s.nodes for s in alone.stages]
    _step_matches_eager(compiled, reference, x, target)


@pytest.mark.timeout(300)
def test_profiled_ranks_run_the_plan_rank_0_made():
    """Each rank profiling for itself chose its own split and the first step died inside torch
    ("forward() takes 5 positional arguments but 7 were given"); rank 0 now plans for all."""
    run(_profiled_ranks, 2, timeout=180)


def _different_plans(rank: int, world: int) -> None:
    import fxshard

    model = _mlp()
    x, target = _mlp_batch()
    plan = fxshard.plan(model, f"{world}xcpu:1GB", (x,), strategy="pipeline", stages=world, schedule="gpipe",
                        microbatches=2 if rank == 0 else 4)
    with pytest.raises(fxshard.ExecutionError) as info:
        fxshard.CompiledModel(model, f"{world}xcpu:1GB", (x,), plan=plan, loss_fn=F.mse_loss)
    text = str(info.value)
    assert "the ranks disagree on the plan" in text, text
    assert "rank 0: plan digest" in text and "2 micro-batches" in text, text
    assert "rank 1: plan digest" in text and "4 micro-batches" in text, text
    assert "differ in microbatches" in text and "fxshard.Plan.from_json" in text, text
    # Refused before any stage was built, alike on every rank: the job goes on with one plan.
    shared = fxshard.plan(model, f"{world}xcpu:1GB", (x,), strategy="pipeline", stages=world, schedule="gpipe",
                          microbatches=2)
    compiled = fxshard.CompiledModel(model, f"{world}xcpu:1GB", (x,), plan=shared, loss_fn=F.mse_loss)
    compiled.step(x, target=target)


def test_ranks_given_different_plans_refuse_naming_the_ranks():
    run(_different_plans, 2, timeout=120)


def _rank_0_cannot_plan(rank: int, world: int) -> None:
    import fxshard

    x, _ = _mlp_batch()
    with pytest.raises(fxshard.PlanError) as info:
        fxshard.compile(_mlp(), f"{world}xcpu:1KB", (x,), strategy="pipeline")
    text = str(info.value)
    assert "for training" in text and "2xcpu:1KB gives" in text, text  # the planner's own numbers
    if rank != 0:
        assert text.startswith("rank 0, which plans for every rank, could not plan: "), text


def test_a_planning_error_on_rank_0_reaches_every_rank():
    """Only rank 0 plans: its error must reach the ranks waiting for its plan, not leave them
    blocked until the process group's timeout."""
    run(_rank_0_cannot_plan, 2, timeout=120)


def _gpu_plan_on_cpu_ranks(rank: int, world: int) -> None:
    import fxshard

    model = _mlp()
    x, _ = _mlp_batch()
    plan = fxshard.plan(model, "2xH100-80GB", (x,), strategy="pipeline", stages=2, schedule="gpipe", microbatches=2)
    assert [s.devices for s in plan.stages] == [("cuda:0",), ("cuda:1",)]
    with pytest.raises(fxshard.ExecutionError) as info:
        fxshard.CompiledModel(model, "2xH100-80GB", (x,), plan=plan, loss_fn=F.mse_loss)
    text = str(info.value)
    assert f"rank {rank}'s work on cuda:{rank}" in text and "cuda:0, cuda:1" in text and "H100-80GB" in text, text
    assert "runs on cpu (gloo" in text and "Re-plan for these devices" in text and "'2xcpu'" in text, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_a_gpu_plan_is_refused_on_cpu_ranks():
    """An exported plan for 2xH100-80GB ran on the CPUs under torchrun without a word."""
    run(_gpu_plan_on_cpu_ranks, 2, timeout=120)


# ---------------------------------------------------------------------------------------
# The loss call under torchrun (issue 12, item 7)
# ---------------------------------------------------------------------------------------


def _loss_call_ranks(rank: int, world: int) -> None:
    import fxshard

    model = _mlp()
    reference = copy.deepcopy(model)
    x, target = _mlp_batch()
    compiled = fxshard.compile(model, f"{world}xcpu:1GB", (x,), strategy="pipeline", stages=world,
                               schedule="1f1b", microbatches=4, loss_fn=F.mse_loss)
    with pytest.raises(fxshard.ExecutionError) as info:
        compiled.step(x)
    text = str(info.value)
    assert "loss_fn(output)" in text and "mse_loss needs two arguments (output, target)" in text, text
    assert "a batch of 8 in 4 micro-batches of 2" in text and "the same target on every rank" in text, text
    with pytest.raises(fxshard.ExecutionError) as info:
        compiled.step(x, target=target[:6])
    text = str(info.value)
    assert "loss_fn(output, target)" in text and "the target has 6 rows" in text and "batch of 8" in text, text
    assert "4 micro-batches of 2" in text and "one row per input row (8 rows)" in text, text
    # Both refused alike on every rank before any message: the next step runs and is exact.
    assert all(p.grad is None for p in compiled.parameters())
    _step_matches_eager(compiled, reference, x, target)


def test_a_missing_or_misshapen_target_is_refused_on_every_rank():
    run(_loss_call_ranks, 2, timeout=120)
