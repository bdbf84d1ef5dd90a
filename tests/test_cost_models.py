"""Cost models: FLOPs against textbook formulas, memory against real runs, times, registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshard
from fxshard.capture import capture
from fxshard.cluster import get_preset
from fxshard.cost_models import (
    AnalyticalCostModel,
    NodeTime,
    ProfiledCostModel,
    RooflineFactors,
    analyze,
    bytes_per_parameter,
    cost_models,
    estimate,
    get_cost_model,
    register_cost_model,
    training_memory,
)
from fxshard.errors import CostModelError, FxshardError
from fxshard.models import ResNet, ResNetConfig, UNet, UNetConfig
from fxshard.zoo import build

H100 = get_preset("H100-80GB")


def _works(model, inputs):
    return {w.name: w for w in analyze(capture(model, inputs))}


def test_linear_flops_match_the_formula():
    b, n_in, n_out = 16, 64, 32
    model = nn.Sequential(nn.Linear(n_in, n_out), nn.Linear(n_out, n_out))
    works = _works(model, (torch.randn(b, n_in),))
    first, second = works["_0"], works["_1"]
    assert first.fwd_flops == 2 * b * n_in * n_out
    # The first layer's input needs no gradient: backward is the weight gradient alone.
    assert first.bwd_flops == 2 * b * n_in * n_out
    assert second.fwd_flops == 2 * b * n_out * n_out
    assert second.bwd_flops == 2 * second.fwd_flops  # input and weight gradients
    assert first.param_bytes == (n_in * n_out + n_out) * 4
    assert first.params == ("0.weight", "0.bias")


def test_matmul_flops_match_the_formula():
    class MatMul(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b)

    m, k, n = 12, 20, 7
    works = _works(MatMul(), (torch.randn(3, m, k), torch.randn(3, k, n)))
    assert works["matmul"].fwd_flops == 3 * 2 * m * k * n
    assert works["matmul"].bwd_flops == 0  # nothing requires grad


def test_conv_flops_match_the_formula():
    b, c_in, c_out, h, w, k = 2, 3, 8, 16, 16, 3
    works = _works(nn.Conv2d(c_in, c_out, k, padding=1), (torch.randn(b, c_in, h, w),))
    conv = next(w for w in works.values() if w.fwd_flops)
    assert conv.fwd_flops == 2 * b * c_out * h * w * c_in * k * k
    assert "aten.convolution" in conv.flop_ops


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_flops_match_the_formula(device):
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    b, h, s, d = 2, 4, 32, 16
    q = torch.randn(b, h, s, d, device=device, requires_grad=True)
    works = _works(Attn(), (q, q, q))
    attn = works["scaled_dot_product_attention"]
    # QK^T and PV: 2 * (2 * b * h * s * s * d).
    assert attn.fwd_flops == 4 * b * h * s * s * d
    assert attn.bwd_flops > attn.fwd_flops


def test_shared_parameters_count_once():
    z = build("gpt2", device="meta")  # GPT-2 small: LM head tied to the token embedding
    costs = estimate(capture(z.model, z.example_inputs), H100)
    assert costs.param_bytes == 124_439_808 * 4
    holders = [c.name for c in costs if "wte.weight" in c.work.params]
    assert len(holders) == 2  # the embedding and the LM head both hold it
    assert costs.state_bytes(holders[-1:])[0] == 50257 * 768 * 4


def _real_saved_bytes(model, inputs):
    state = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in state:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(saved.values())


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny", "llama-tiny", "resnet", "unet"])
def test_saved_activation_bytes_match_a_real_backward_graph(name):
    torch.manual_seed(0)
    if name == "resnet":
        model, inputs = ResNet(ResNetConfig()), (torch.randn(2, 3, 64, 64),)
    elif name == "unet":
        model, inputs = UNet(UNetConfig()), (torch.randn(1, 3, 64, 64),)
    else:
        z = build(name, batch_size=2)
        model, inputs = z.model, z.example_inputs
    estimated = estimate(capture(model, inputs), get_preset("cpu")).saved_activation_bytes()
    real = _real_saved_bytes(model, inputs)
    assert estimated == pytest.approx(real, rel=0.01)


def test_views_move_no_data_and_cost_nothing():
    class Views(nn.Module):
        def forward(self, x):
            return x.view(4, 8).transpose(0, 1)

    costs = estimate(capture(Views(), (torch.randn(32),)), H100)
    for name in ("view", "transpose"):
        assert costs[name].work.is_view and costs[name].fwd_time_s == 0.0
    assert costs["transpose"].work.view_of == "view"


def test_roofline_compute_and_memory_bound():
    factors = RooflineFactors(matmul_eff=0.5, memory_eff=0.5, launch_overhead_s=1e-5)
    model = AnalyticalCostModel(factors)
    n = 4096
    x = torch.randn(n, n, dtype=torch.bfloat16, device="meta")

    class Net(nn.Module):
        def forward(self, a, b):
            return torch.relu(a @ b)

    captured = capture(Net(), (x, x))
    costs = estimate(captured, H100, cost_model=model)
    mm = costs["matmul"]
    assert mm.fwd_time_s == pytest.approx(1e-5 + 2 * n**3 / (989.5e12 * 0.5))
    relu = costs["relu"]
    assert relu.fwd_time_s == pytest.approx(1e-5 + 2 * n * n * 2 / (3350e9 * 0.5))
    # Slower device, slower matmul; fp32 is slower than bf16.
    assert estimate(captured, get_preset("A100-80GB"), cost_model=model)["matmul"].fwd_time_s > mm.fwd_time_s
    fp32 = capture(Net(), (x.float(), x.float()))
    assert estimate(fp32, H100, cost_model=model)["matmul"].fwd_time_s > 10 * mm.fwd_time_s


def test_roofline_factor_validation():
    with pytest.raises(CostModelError, match="matmul_eff"):
        RooflineFactors(matmul_eff=1.5, memory_eff=0.5, launch_overhead_s=0)


def test_profiled_times_nodes_and_leaves_the_model_alone():
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, (torch.randn(32, 64),))
    profiler = ProfiledCostModel(warmup=1, repeats=3, method="nodes")
    costs = estimate(captured, get_preset("cpu"), cost_model=profiler)
    assert costs.cost_model == "profiled"
    assert costs["_0"].fwd_time_s > 0 and costs["_0"].bwd_time_s > 0
    assert not profiler.fallbacks
    # Identical layers share one measurement; the first Linear differs (its input needs no
    # gradient, so its backward is cheaper) and is measured on its own.
    assert costs["_3"].fwd_time_s == costs["_6"].fwd_time_s
    assert costs["_1"].bwd_time_s == costs["_4"].bwd_time_s
    assert len(profiler.cache) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_profiled_meta_model_materialises_one_node_at_a_time():
    z = build("llama-tiny", device="meta", batch_size=1, seq_len=16)
    profiler = ProfiledCostModel(device="cpu", warmup=0, repeats=1)
    costs = estimate(capture(z.model, z.example_inputs), get_preset("cpu"), cost_model=profiler)
    measured = [c for c in costs if c.work.op == "call_module"]
    assert measured and all(c.fwd_time_s > 0 for c in measured)
    assert all(p.device.type == "meta" for p in z.model.parameters())


def test_profiled_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    captured = capture(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(CostModelError, match="CUDA"):
        estimate(captured, H100, cost_model=ProfiledCostModel(device="cuda"))


def test_registry(scratch_cost_models):
    assert {"analytical", "profiled"} <= set(cost_models())
    with pytest.raises(CostModelError, match="analytical"):
        get_cost_model("nope")

    class Constant:
        name = "constant-test"

        def node_times(self, captured, works, device):
            return [NodeTime(fwd_s=1.0, bwd_s=2.0) for _ in works]

    register_cost_model("constant-test")(Constant)
    costs = estimate(capture(nn.Linear(2, 2), (torch.randn(1, 2),)), H100, cost_model="constant-test")
    assert costs.fwd_time_s == len(costs) and costs.bwd_time_s == 2 * len(costs)
    fxshard.unregister_cost_model("constant-test")
    assert "constant-test" not in cost_models()
    with pytest.raises(CostModelError, match="constant-test"):
        fxshard.unregister_cost_model("constant-test")


def test_negative_or_nan_times_are_rejected():
    class Broken:
        name = "broken"

        def node_times(self, captured, works, device):
            return [NodeTime(fwd_s=math.nan, bwd_s=0.0) for _ in works]

    with pytest.raises(CostModelError, match="NaN"):
        estimate(capture(nn.Linear(2, 2), (torch.randn(1, 2),)), H100, cost_model=Broken())


@pytest.mark.parametrize("optimizer,precision,expected", [
    ("adam", "mixed", 16),  # ZeRO, section 3.1
    ("adam", "fp32", 16),
    ("sgd", "fp32", 8),
    ("sgd", "mixed", 8),  # 2 + 2 + fp32 master 4: STYLE's 552 GB for a 69B model
    ("none", "fp32", 8),
    ("none", "mixed", 4),
])
def test_training_bytes_per_parameter(optimizer, precision, expected):
    assert bytes_per_parameter(optimizer, precision) == expected


def test_inference_memory_is_the_weights():
    assert bytes_per_parameter("adam", "mixed", training=False) == 2
    assert training_memory("adam", "fp32", training=False).total == 4


def test_unknown_optimizer():
    with pytest.raises(CostModelError, match="adam") as info:
        bytes_per_parameter("lion")
    assert isinstance(info.value, FxshardError)


def test_inspect_rows_have_the_spec_fields():
    costs = estimate(capture(build("mlp").model, (torch.randn(2, 1024),)), H100)
    row = costs.nodes[1].to_row()
    for key in ("name", "op", "target", "flops", "param_bytes", "output_bytes", "time_s"):
        assert key in row


# --------------------------------------------------------------------------------------------
# The profiled model measures this machine: it prices only what this machine has, and says
# which nodes it could not measure.
# --------------------------------------------------------------------------------------------

class _Whitened(nn.Module):
    """A Cholesky factor of a diagonal matrix of the inputs' minima: fine on the real (positive)
    inputs, but the profiler's random stand-ins (for the graph's input when it times the graph
    as it runs, for the matrix when it times the node alone) are not positive-definite, so that
    node cannot be timed."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        gram = torch.diag(x.min(0).values)
        return h @ torch.linalg.cholesky(gram)


def _a_preset_this_machine_lacks() -> str:
    if not torch.cuda.is_available():
        return "H100-80GB"
    from fxshard.devices import local_gpu_spec

    local = local_gpu_spec(0).name
    return "A100-40GB" if local != "A100-40GB" else "H100-80GB"


def test_profiled_refuses_a_device_this_machine_lacks():
    preset = _a_preset_this_machine_lacks()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(CostModelError) as info:
        fxshard.plan(model, f"2x{preset}", (torch.randn(8, 16),), cost_model="profiled")
    text = str(info.value)
    for fragment in (preset, "this machine", "cost_model='analytical'", "fxshard calibrate", "devices=['cpu']"):
        assert fragment in text, text
    # A CPU host timing for a GPU preset (the profiler pinned to the CPU) is refused the same way.
    captured = capture(model, (torch.randn(8, 16),))
    with pytest.raises(CostModelError, match=f"CPU times would be labelled {preset}"):
        estimate(captured, get_preset(preset), cost_model=ProfiledCostModel(device="cpu", warmup=0, repeats=1))
    # The local device is fine, and so is the analytical model for any preset.
    assert estimate(captured, get_preset("cpu"), cost_model=ProfiledCostModel(device="cpu", warmup=0, repeats=1))
    assert estimate(captured, get_preset(preset)).cost_model == "analytical"


def test_nodes_the_profiler_cannot_run_are_reported_in_the_plan():
    from fxshard.plan import EstimatedNode, Plan

    torch.manual_seed(0)
    model, inputs = _Whitened(), (torch.rand(16, 8) + 0.1,)
    model(*inputs)  # runs for real
    profiler = ProfiledCostModel(warmup=0, repeats=1)
    captured = capture(model, inputs)
    costs = estimate(captured, get_preset("cpu"), cost_model=profiler)
    (name,) = costs.estimated
    assert "cholesky" in name and name in profiler.fallbacks
    assert "could not run on random inputs" in costs.estimated[name] and "positive-definite" in costs.estimated[name]
    assert costs[name].fwd_time_s == estimate(captured, get_preset("cpu"))[name].fwd_time_s  # the analytical time
    assert not {c.name for c in costs if c.name != name and c.estimated}
    assert costs[name].to_row()["estimated"] == costs.estimated[name]

    plan = fxshard.plan(model, "2xcpu:1GB", inputs, cost_model="profiled", strategy="pipeline")
    assert [n.node for n in plan.estimated_nodes] == [name]
    assert "positive-definite" in plan.estimated_nodes[0].reason
    assert f"estimated analytically, not measured: 1 node(s): {name} (could not run" in str(plan)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.estimated_nodes == (EstimatedNode(node=name, reason=plan.estimated_nodes[0].reason),)
    # JSON written before the field existed still loads, with nothing estimated.
    old = json.loads(plan.to_json())
    del old["estimated_nodes"]
    assert Plan.from_json(json.dumps(old)).estimated_nodes == ()
    # The analytical model estimates everything by definition and notes nothing.
    assert fxshard.plan(model, "2xcpu:1GB", inputs, strategy="pipeline").estimated_nodes == ()
