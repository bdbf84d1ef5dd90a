"""Tests for fxshard.cluster: presets, links, the `devices` argument forms and the JSON round-trip."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshard.cluster as cluster_module
from fxshard.cluster import (
    DTYPE_KEYS,
    LINK_PRESETS,
    PRESETS,
    SELF_LINK,
    Cluster,
    Device,
    DeviceSpec,
    Link,
    default_link,
    format_bytes,
    get_preset,
    parse_bytes,
)
from fxshard.errors import ClusterError, DeviceSpecError, FxshardError

GiB = 1 << 30
REQUIRED_PRESETS = ["V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4", "T4", "MI300X", "cpu"]
GPU_PRESETS = [name for name in PRESETS if PRESETS[name].kind != "cpu"]


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: list[tuple[str, int]], major: int = 9) -> None:
    """Pretend this machine has the given (name, total_memory) GPUs."""
    props = [SimpleNamespace(name=name, total_memory=memory, multi_processor_count=80, major=major)
             for name, memory in gpus]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [])


# ---------------------------------------------------------------- presets


def test_required_presets_exist() -> None:
    assert set(REQUIRED_PRESETS) <= set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_sane(name: str) -> None:
    spec = PRESETS[name]
    assert spec.name == name
    assert spec.memory_bytes > 0 and spec.memory_bandwidth > 0
    assert spec.source
    table = dict(spec.peak_flops)
    assert set(table) <= set(DTYPE_KEYS) and "float32" in table
    assert all(value > 0 and math.isfinite(value) for value in table.values())
    if spec.kind != "cpu":
        # Every GPU preset is at least 8 GiB and does half precision no slower than float32.
        assert spec.memory_bytes >= 8 * GiB
        assert spec.peak_flops_for(torch.bfloat16) >= spec.peak_flops_for(torch.float32)
        assert spec.peak_flops_for(torch.float16) >= spec.peak_flops_for(torch.float32)
        assert spec.peak_flops_for(torch.float32, allow_tf32=True) >= spec.peak_flops_for(torch.float32)
    assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_memory_convention_is_binary() -> None:
    assert PRESETS["H100-80GB"].memory_bytes == 85_899_345_920
    assert PRESETS["A100-40GB"].memory_bytes == 40 * GiB
    assert PRESETS["H200-141GB"].memory_bytes == 141 * GiB


def test_peak_flops_for_fallbacks() -> None:
    h100, v100, cpu = PRESETS["H100-80GB"], PRESETS["V100-32GB"], PRESETS["cpu"]
    assert h100.peak_flops_for(torch.float32) == 67e12
    assert h100.peak_flops_for(torch.float32, allow_tf32=True) == 494.5e12
    assert h100.peak_flops_for(torch.bfloat16) == 989.5e12
    assert h100.peak_flops_for(torch.float8_e4m3fn) == 1979e12
    assert h100.peak_flops_for(torch.int8) == 1979e12
    assert v100.peak_flops_for(torch.bfloat16) == 15.7e12  # no bf16 units: float32 figure
    assert v100.peak_flops_for(torch.float32, allow_tf32=True) == 15.7e12  # no tf32 either
    assert v100.peak_flops_for(torch.float8_e5m2) == 125e12  # float8 falls back to float16
    assert v100.peak_flops_for(torch.int64) == 15.7e12
    assert v100.peak_flops_for(torch.bool) == 15.7e12
    assert v100.peak_flops_for(torch.float64) == 7.8e12
    assert v100.peak_flops_for(torch.complex128) == 7.8e12
    no_fp64 = DeviceSpec(name="x", memory_bytes=1, peak_flops={"float32": 10.0}, memory_bandwidth=1.0)
    assert no_fp64.peak_flops_for(torch.float64) == 5.0
    assert cpu.peak_flops_for(torch.float16) == cpu.peak_flops_for(torch.float32)
    with pytest.raises(DeviceSpecError, match="float32"):
        h100.peak_flops_for("float32")  # type: ignore[arg-type]


def test_with_memory_and_peak_flops_normalised() -> None:
    spec = PRESETS["A100-80GB"].with_memory(10)
    assert spec.memory_bytes == 10 and spec.name == "A100-80GB" and PRESETS["A100-80GB"].memory_bytes == 80 * GiB
    a = DeviceSpec(name="x", memory_bytes=1, peak_flops={"bfloat16": 2, "float32": 1}, memory_bandwidth=1)
    b = DeviceSpec(name="x", memory_bytes=1, peak_flops=(("float32", 1.0), ("bfloat16", 2.0)), memory_bandwidth=1.0)
    assert a == b and a.peak_flops == (("float32", 1.0), ("bfloat16", 2.0))


@pytest.mark.parametrize(("query", "expected"), [
    ("H100-80GB", "H100-80GB"), ("h100-80gb", "H100-80GB"), ("h100", "H100-80GB"), (" H200 ", "H200-141GB"),
    ("v100", "V100-32GB"), ("mi300x", "MI300X"), ("CPU", "cpu"), ("l4", "L4"),
    ("h100 80gb", "H100-80GB"), ("A100_40GB", "A100-40GB"),
])
def test_get_preset(query: str, expected: str) -> None:
    assert get_preset(query) is PRESETS[expected]


@pytest.mark.parametrize(("query", "fragments"), [
    ("A100-80G", ['"A100-80G"', 'did you mean "A100-80GB"', "Known presets"]),
    ("a100", ['"a100"', "ambiguous", "A100-40GB", "A100-80GB"]),
    ("quantum", ['"quantum"', "Known presets", "H100-80GB"]),
    ("", ['""', "Known presets"]),
])
def test_get_preset_errors(query: str, fragments: list[str]) -> None:
    with pytest.raises(DeviceSpecError) as info:
        get_preset(query)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"name": ""}, "empty"),
    ({"memory_bytes": 0}, "memory_bytes = 0"),
    ({"memory_bytes": 1.5}, "1.5"),
    ({"memory_bytes": True}, "bool"),
    ({"peak_flops": {}}, "float32"),
    ({"peak_flops": {"float32": -1.0}}, "-1.0"),
    ({"peak_flops": {"float32": math.nan}}, "nan"),
    ({"peak_flops": {"float32": 1.0, "fp4": 1.0}}, "'fp4'"),
    ({"peak_flops": (("float32", 1.0), ("float32", 2.0))}, "twice"),
    ({"peak_flops": "float32"}, "float32"),
    ({"memory_bandwidth": math.inf}, "inf"),
    ({"kind": "tpu"}, "'tpu'"),
])
def test_device_spec_validation(kwargs: dict, fragment: str) -> None:
    base = {"name": "x", "memory_bytes": 1, "peak_flops": {"float32": 1.0}, "memory_bandwidth": 1.0}
    with pytest.raises(DeviceSpecError) as info:
        DeviceSpec(**{**base, **kwargs})
    assert fragment in str(info.value)
    assert isinstance(info.value, FxshardError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------- links


def test_transfer_time() -> None:
    link = Link(bandwidth=1e9, latency_s=1e-6, name="t")
    assert link.transfer_time(0) == 0.0
    assert link.transfer_time(1e9) == pytest.approx(1.0 + 1e-6)
    assert SELF_LINK.transfer_time(1e12) == 0.0
    with pytest.raises(ClusterError, match="-1"):
        link.transfer_time(-1)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"bandwidth": 0}, "bandwidth = 0"), ({"bandwidth": -5.0}, "-5.0"), ({"latency_s": -1e-6}, "-1e-06"),
    ({"latency_s": math.inf}, "inf"), ({"bandwidth": "fast"}, "'fast'"),
])
def test_link_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ClusterError) as info:
        Link(**{"bandwidth": 1.0, "latency_s": 0.0, **kwargs})
    assert fragment in str(info.value)


def test_default_links() -> None:
    assert default_link([PRESETS["H100-80GB"]]).name == "nvlink4"
    assert default_link([PRESETS["H100-80GB"]], inter=True).name == "ib-ndr"
    assert default_link([PRESETS["A100-80GB"]]).name == "nvlink3"
    assert default_link([PRESETS["L4"]]).name == "pcie4"
    assert default_link([PRESETS["cpu"]]).name == "loopback"
    # A mixed cluster gets the slowest of its members' defaults.
    assert default_link([PRESETS["H100-80GB"], PRESETS["T4"]]).name == "pcie3"
    assert all(link.bandwidth > 0 and math.isfinite(link.bandwidth) for link in LINK_PRESETS.values())
    assert LINK_PRESETS["nvlink4"].bandwidth == 450e9 and LINK_PRESETS["ib-ndr"].bandwidth == 50e9


# ---------------------------------------------------------------- parse: cluster strings


@pytest.mark.parametrize(("text", "devices", "machines", "preset", "describe"), [
    ("A100-80GB", 1, 1, "A100-80GB", "A100-80GB"),
    ("8xA100-80GB", 8, 1, "A100-80GB", "8xA100-80GB"),
    ("2x8xH100-80GB", 16, 2, "H100-80GB", "2x8xH100-80GB"),
    ("2X8Xh100", 16, 2, "H100-80GB", "2x8xH100-80GB"),
    (" 2 x 4 x T4 ", 8, 2, "T4", "2x4xT4"),
    ("3x1xL4", 3, 3, "L4", "3x1xL4"),
    ("4xMI300X", 4, 1, "MI300X", "4xMI300X"),
    ("4xcpu", 4, 1, "cpu", "4xcpu"),
])
def test_parse_preset_strings(text: str, devices: int, machines: int, preset: str, describe: str) -> None:
    cluster = Cluster.parse(text)
    assert cluster.num_devices == devices and cluster.num_machines == machines
    assert all(device.spec == PRESETS[preset] for device in cluster.devices)
    assert cluster.is_homogeneous
    assert cluster.describe() == describe
    assert Cluster.parse(cluster.describe()) == cluster


def test_parse_machines_and_local_indices() -> None:
    cluster = Cluster.parse("2x4xH100-80GB")
    assert [d.index for d in cluster.devices] == list(range(8))
    assert [d.machine for d in cluster.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.local_index for d in cluster.devices] == [0, 1, 2, 3] * 2
    assert [d.torch_device for d in cluster.devices] == [f"cuda:{i}" for i in range(4)] * 2
    assert [d.torch_device for d in Cluster.parse("2xcpu").devices] == ["cpu", "cpu"]
    assert [d.index for d in cluster.devices_on(1)] == [4, 5, 6, 7]


@pytest.mark.parametrize(("text", "memory"), [
    ("4xcpu:2GB", 2_000_000_000), ("4xcpu:2gb", 2_000_000_000), ("2xcpu:512MiB", 512 << 20),
    ("cpu:1.5GiB", 3 << 29), ("2x2xH100-80GB:40GB", 40_000_000_000), ("2xcpu:4096", 4096),
])
def test_parse_memory_budget(text: str, memory: int) -> None:
    cluster = Cluster.parse(text)
    assert {device.spec.memory_bytes for device in cluster.devices} == {memory}
    assert Cluster.parse(cluster.describe()) == cluster


def test_parse_heterogeneous() -> None:
    cluster = Cluster.parse("4xA100-80GB+4xV100-32GB")
    assert cluster.num_devices == 8 and cluster.num_machines == 2 and not cluster.is_homogeneous
    assert [d.spec.name for d in cluster.devices] == ["A100-80GB"] * 4 + ["V100-32GB"] * 4
    assert [d.machine for d in cluster.devices] == [0] * 4 + [1] * 4
    assert [d.local_index for d in cluster.devices] == [0, 1, 2, 3] * 2
    assert cluster.intra_link.name == "nvlink2" and cluster.inter_link.name == "ib-edr"  # the slower kind's
    assert cluster.describe() == "4xA100-80GB+4xV100-32GB"
    three = Cluster.parse("2x8xH100-80GB + 4xcpu:1GB + T4")
    assert three.num_machines == 4 and three.num_devices == 21
    assert three.intra_link.name == "loopback"
    assert three.describe() == "2x8xH100-80GB+4xcpu:1GB+T4"
    assert Cluster.parse(three.describe()) == three


def test_parse_overrides_and_existing_cluster() -> None:
    base = Cluster.parse("2x2xA100-80GB")
    assert Cluster.parse(base) is base
    fast = Link(bandwidth=1e12, latency_s=0.0, name="fast")
    slow = Link(bandwidth=1e6, latency_s=1e-3, name="slow")
    custom = Cluster.parse("2x2xA100-80GB", intra_link=fast, inter_link=slow)
    assert custom.link(0, 1) == fast and custom.link(0, 2) == slow
    assert Cluster.parse(base, inter_link=slow).inter_link == slow
    assert Cluster.parse(base, inter_link=slow).intra_link == base.intra_link


# ---------------------------------------------------------------- parse: ints and device lists


def test_parse_int_without_cuda(no_cuda: None) -> None:
    cluster = Cluster.parse(4)
    assert cluster.num_devices == 4 and cluster.num_machines == 1
    assert [d.torch_device for d in cluster.devices] == ["cpu"] * 4
    host = cluster_module.host_memory_bytes()
    assert all(d.spec.memory_bytes == host // 4 for d in cluster.devices)
    assert Cluster.parse("4") == cluster == Cluster.parse(np.int64(4))
    # A lone "cpu:N" is torch's spelling of the CPU device, not a memory budget of N bytes.
    assert Cluster.parse("cpu:0") == Cluster.parse(["cpu"]) == Cluster.local()
    assert Cluster.parse(["cpu", torch.device("cpu")]).devices[1].spec.memory_bytes == host // 2


def test_local_without_cuda(no_cuda: None) -> None:
    cluster = Cluster.local()
    assert cluster.num_devices == 1 and cluster.devices[0].torch_device == "cpu"
    assert cluster.devices[0].spec.memory_bytes == cluster_module.host_memory_bytes() > 0
    assert cluster.devices[0].spec.kind == "cpu"


def test_local_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    real_memory = 85_031_714_816  # what an H100 80GB reports: a little under 80 GiB
    fake_cuda(monkeypatch, [("NVIDIA H100 80GB HBM3", real_memory)] * 2)
    cluster = Cluster.local()
    assert [d.torch_device for d in cluster.devices] == ["cuda:0", "cuda:1"]
    assert cluster.devices[0].spec == PRESETS["H100-80GB"].with_memory(real_memory)
    assert cluster.intra_link.name == "nvlink4"
    assert Cluster.parse(2) == cluster
    assert Cluster.parse(["cuda:0", "cuda:1"]) == cluster
    assert Cluster.parse("cuda:1").devices[0].torch_device == "cuda:1"
    with pytest.raises(DeviceSpecError, match="devices=3, but this machine has 2 CUDA devices"):
        Cluster.parse(3)
    with pytest.raises(DeviceSpecError, match="cuda:5"):
        Cluster.parse(["cuda:5"])
    with pytest.raises(DeviceSpecError, match="'cuda:0' twice"):
        Cluster.parse(["cuda:0", "cuda:0"])


@pytest.mark.parametrize(("name", "memory", "preset"), [
    ("NVIDIA A100-SXM4-80GB", 85_100_000_000, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 42_500_000_000, "A100-40GB"),
    ("Tesla V100-SXM2-32GB", 34_000_000_000, "V100-32GB"),
    ("NVIDIA L4", 23_000_000_000, "L4"),
    ("Tesla T4", 15_800_000_000, "T4"),
    ("NVIDIA H200", 150_000_000_000, "H200-141GB"),
    ("AMD Instinct MI300X", 205_000_000_000, "MI300X"),
])
def test_local_gpu_names(monkeypatch: pytest.MonkeyPatch, name: str, memory: int, preset: str) -> None:
    fake_cuda(monkeypatch, [(name, memory)])
    assert Cluster.local().devices[0].spec == PRESETS[preset].with_memory(memory)


def test_unknown_gpu_gets_conservative_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [("NVIDIA GeForce RTX 4090", 25_000_000_000), ("NVIDIA H100 PCIe", 85_000_000_000)])
    first, second = (d.spec for d in Cluster.local().devices)
    assert first.name == "NVIDIA GeForce RTX 4090" and first.memory_bytes == 25_000_000_000
    assert 0 < first.peak_flops_for(torch.bfloat16) < PRESETS["L4"].peak_flops_for(torch.bfloat16)
    assert second.name == "NVIDIA H100 PCIe"  # slower than the SXM preset: not matched to it
    assert Cluster.local().intra_link.name == "pcie4"


def test_cuda_without_cuda_suggests_cpu(no_cuda: None) -> None:
    with pytest.raises(DeviceSpecError) as info:
        Cluster.parse(["cuda:0", "cuda:1"])
    message = str(info.value)
    assert "cuda:0" in message and "no CUDA" in message and "'cpu'" in message and "xA100-80GB" in message


# ---------------------------------------------------------------- bad input


BAD_DEVICES = [
    ("", DeviceSpecError, ['devices=""', "8xA100-80GB"]),
    ("   ", DeviceSpecError, ["empty"]),
    ([], DeviceSpecError, ["devices=[]"]),
    ((), DeviceSpecError, ["devices=[]"]),
    (0, DeviceSpecError, ["devices=0", "positive"]),
    (-2, DeviceSpecError, ["devices=-2", "positive"]),
    ("0", DeviceSpecError, ["devices=0"]),
    (True, DeviceSpecError, ["devices=True", "bool"]),
    (False, DeviceSpecError, ["devices=False", "bool"]),
    (2.0, DeviceSpecError, ["devices=2.0", "float"]),
    (None, DeviceSpecError, ["devices=None"]),
    ({"cuda:0": 1}, DeviceSpecError, ["dict"]),
    ("0xH100-80GB", DeviceSpecError, ['"0xH100-80GB"', 'count "0"']),
    ("2x0xH100-80GB", DeviceSpecError, ['count "0"']),
    ("-1xH100-80GB", DeviceSpecError, ['count "-1"']),
    ("1.5xH100-80GB", DeviceSpecError, ['count "1.5"']),
    ("2x2x2xH100-80GB", DeviceSpecError, ["3 counts"]),
    ("4xcpu:0GB", DeviceSpecError, ['"4xcpu:0GB"', '"0GB"', "positive"]),
    ("4xcpu:0", DeviceSpecError, ['"4xcpu:0"', "positive"]),
    ("4xcpu:-1GB", DeviceSpecError, ['"4xcpu:-1GB"', '"-1GB"']),
    ("4xcpu:2XB", DeviceSpecError, ['"2XB"', 'unknown unit "XB"']),
    ("4xcpu:2 G B", DeviceSpecError, ['"2 G B"']),
    ("4xcpu:", DeviceSpecError, ['"4xcpu:"', "bad byte size"]),
    ("4xcpu:2GB:1GB", DeviceSpecError, ['"2GB:1GB"']),
    ("8xA100-80G", DeviceSpecError, ['"8xA100-80G"', 'unknown device preset "A100-80G"',
                                     'did you mean "A100-80GB"?', "Known presets: "]),
    ("8xA100", DeviceSpecError, ['"8xA100"', "ambiguous"]),
    ("8xTPUv5", DeviceSpecError, ['"TPUv5"', "Known presets"]),
    ("8x", DeviceSpecError, ['"8x"', "no device preset"]),
    ("8xH100-80GB+", DeviceSpecError, ['"8xH100-80GB+"', "empty term"]),
    ("+8xH100-80GB", DeviceSpecError, ["empty term"]),
    ("8xH100-80GB++T4", DeviceSpecError, ["empty term"]),
    ("8xH100-80GB, 2xT4", DeviceSpecError, ['"8xH100-80GB, 2xT4"']),
    ("!!@#", DeviceSpecError, ['"!!@#"']),
    ("\u00b2", DeviceSpecError, ['"\u00b2"']),  # str.isdigit() is true for a superscript two
    ("9999x9999xcpu", DeviceSpecError, ["99,980,001 devices", "65,536"]),
    ([3], DeviceSpecError, ["devices[0] = 3", "int"]),
    (["cpu", None], DeviceSpecError, ["devices[1] = None"]),
    (["cpu", 1.5], DeviceSpecError, ["devices[1] = 1.5"]),
    (["cpu", "gpu:0"], DeviceSpecError, ["devices[1] = 'gpu:0'"]),
    (["4xcpu"], DeviceSpecError, ["devices[0] = '4xcpu'", "goes alone"]),
    (["meta"], DeviceSpecError, ["'meta'", "not supported"]),
    ([""], DeviceSpecError, ["devices[0] = ''"]),
]


@pytest.mark.parametrize(("devices", "error", "fragments"), BAD_DEVICES, ids=[repr(case[0]) for case in BAD_DEVICES])
def test_bad_devices(no_cuda: None, devices: object, error: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(error) as info:
        Cluster.parse(devices)
    assert isinstance(info.value, FxshardError)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------- cluster queries


def test_link_selection() -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    assert cluster.link(0, 3) is cluster.intra_link and cluster.intra_link.name == "nvlink3"
    assert cluster.link(3, 4) is cluster.inter_link and cluster.inter_link.name == "ib-hdr"
    assert cluster.link(7, 0) is cluster.inter_link
    same = cluster.link(5, 5)
    assert same.bandwidth == math.inf and same.latency_s == 0.0 and same.transfer_time(1 << 40) == 0.0
    assert cluster.link(0, 1).transfer_time(300e9) == pytest.approx(1.0 + 3e-6)


def test_link_accepts_numpy_indices() -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    assert cluster.link(np.int64(0), np.int32(4)) is cluster.inter_link


def test_largest_cluster_is_quick() -> None:
    cluster = Cluster.parse("8192x8xH100-80GB")
    assert cluster.num_devices == 65_536 and cluster.describe() == "8192x8xH100-80GB"
    assert cluster.link(0, 65_535) is cluster.inter_link


@pytest.mark.parametrize(("a", "b", "bad"), [(0, 8, "8"), (-1, 0, "-1"), (0, 100, "100"), (True, 0, "True"),
                                             ("0", 1, "'0'"), (1.0, 1, "1.0")])
def test_link_index_out_of_range(a: object, b: object, bad: str) -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    with pytest.raises(ClusterError) as info:
        cluster.link(a, b)  # type: ignore[arg-type]
    assert f"device index {bad}" in str(info.value) and "0..7" in str(info.value)


def test_subset() -> None:
    cluster = Cluster.parse("2x4xH100-80GB")
    sub = cluster.subset([6, 1, 7])
    assert [d.index for d in sub.devices] == [0, 1, 2]
    assert [d.machine for d in sub.devices] == [0, 1, 1]
    assert [d.local_index for d in sub.devices] == [0, 0, 1]
    assert [d.torch_device for d in sub.devices] == ["cuda:1", "cuda:2", "cuda:3"]  # physical devices kept
    assert sub.link(1, 2) is sub.intra_link and sub.link(0, 1) is sub.inter_link
    assert sub.describe() == "H100-80GB+2xH100-80GB"
    assert cluster.subset(range(4)) == Cluster.parse("4xH100-80GB")
    for bad, fragment in (([], "subset([])"), ([1, 1], "repeats"), ([8], "device index 8")):
        with pytest.raises(ClusterError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            cluster.subset(bad)


def test_describe_mixed_machine_and_repr() -> None:
    a100, v100 = PRESETS["A100-80GB"], PRESETS["V100-32GB"]
    devices = tuple(Device(index=i, machine=0, local_index=i, spec=spec, torch_device=f"cuda:{i}")
                    for i, spec in enumerate([a100, a100, v100]))
    cluster = Cluster(devices=devices, intra_link=LINK_PRESETS["pcie4"], inter_link=LINK_PRESETS["ib-hdr"])
    assert cluster.describe() == "machine 0: 2xA100-80GB, 1xV100-32GB"
    assert "2x8xH100-80GB" in repr(Cluster.parse("2x8xH100-80GB"))


def test_cluster_validation() -> None:
    spec = PRESETS["T4"]
    link = LINK_PRESETS["pcie3"]
    with pytest.raises(ClusterError, match="non-empty"):
        Cluster(devices=(), intra_link=link, inter_link=link)
    with pytest.raises(ClusterError, match=r"\(1, 0, 0\)"):
        Cluster(devices=(Device(index=1, machine=0, local_index=0, spec=spec, torch_device="cuda:0"),),
                intra_link=link, inter_link=link)
    with pytest.raises(ClusterError, match="machine = -1"):
        Device(index=0, machine=-1, local_index=0, spec=spec, torch_device="cuda:0")
    with pytest.raises(ClusterError, match="expected a Link"):
        Cluster(devices=Cluster.parse("T4").devices, intra_link=link, inter_link="ib")  # type: ignore[arg-type]


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("text", ["cpu", "8xA100-80GB", "2x8xH100-80GB", "4xcpu:2GB", "4xA100-80GB+4xV100-32GB",
                                  "2x2xMI300X:100GiB+3xL4+T4"])
def test_json_round_trip(text: str) -> None:
    cluster = Cluster.parse(text)
    restored = Cluster.from_json(cluster.to_json())
    assert restored == cluster and restored.describe() == cluster.describe()
    assert Cluster.from_dict(json.loads(json.dumps(cluster.to_dict()))) == cluster
    assert len(cluster.to_dict()["specs"]) == len({d.spec for d in cluster.devices})


def test_json_round_trip_custom(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [("Mystery GPU", 12_345_678_901)])
    for cluster in (Cluster.local(), Cluster.parse("2x2xcpu").subset([0, 3]),
                    Cluster.parse("T4", intra_link=SELF_LINK, inter_link=Link(bandwidth=0.1, latency_s=1.0))):
        assert Cluster.from_json(cluster.to_json()) == cluster


specs = st.builds(
    DeviceSpec,
    name=st.text(min_size=1, max_size=12).filter(str.strip),
    memory_bytes=st.integers(min_value=1, max_value=1 << 50),
    peak_flops=st.dictionaries(st.sampled_from(DTYPE_KEYS), st.floats(min_value=1e-3, max_value=1e18),
                               min_size=0).map(lambda table: {**table, "float32": table.get("float32", 1.0)}),
    memory_bandwidth=st.floats(min_value=1e-3, max_value=1e15),
    kind=st.sampled_from(["cuda", "rocm", "cpu"]),
    source=st.text(max_size=20),
)
links = st.builds(Link, bandwidth=st.floats(min_value=1e-3, max_value=1e15) | st.just(math.inf),
                  latency_s=st.floats(min_value=0.0, max_value=1.0), name=st.text(max_size=8))


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    machines = draw(st.lists(st.lists(specs, min_size=1, max_size=3), min_size=1, max_size=3))
    devices = []
    for machine, machine_specs in enumerate(machines):
        for local, spec in enumerate(machine_specs):
            devices.append(Device(index=len(devices), machine=machine, local_index=local, spec=spec,
                                  torch_device="cpu" if spec.kind == "cpu" else f"cuda:{local}"))
    return Cluster(devices=tuple(devices), intra_link=draw(links), inter_link=draw(links))


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_json_round_trip_property(cluster: Cluster) -> None:
    assert Cluster.from_json(cluster.to_json()) == cluster
    assert cluster.num_devices == sum(len(cluster.devices_on(m)) for m in range(cluster.num_machines))


def _valid() -> dict:
    return Cluster.parse("2xT4").to_dict()


def _without(path: tuple) -> dict:
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def _with(path: tuple, value: object) -> dict:
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


BAD_JSON = [
    ("{not json", ["malformed"]),
    ("", ["malformed"]),
    ("[]", ["expected a JSON object", "list"]),
    ("null", ["expected a JSON object"]),
    (json.dumps(_without(("devices",))), ["missing fields ['devices']"]),
    (json.dumps(_without(("intra_link",))), ["missing fields ['intra_link']"]),
    (json.dumps(_without(("specs", 0, "memory_bytes"))), ["cluster specs", "missing fields ['memory_bytes']"]),
    (json.dumps(_without(("devices", 1, "machine"))), ["devices[1]", "missing fields ['machine']"]),
    (json.dumps(_without(("inter_link", "bandwidth"))), ["Link", "['bandwidth']"]),
    (json.dumps(_with(("extra",), 1)), ["unknown fields ['extra']"]),
    (json.dumps(_with(("fxshard_cluster",), 7)), ["version 7"]),
    (json.dumps(_with(("devices",), {})), ["cluster devices", "JSON list"]),
    (json.dumps(_with(("devices",), [])), ["non-empty"]),
    (json.dumps(_with(("devices", 1, "spec"), 3)), ["devices[1] spec = 3"]),
    (json.dumps(_with(("devices", 1, "index"), 5)), ["(5, 0, 1)"]),
    (json.dumps(_with(("devices", 0, "machine"), "zero")), ["machine = 'zero'"]),
    (json.dumps(_with(("specs", 0, "memory_bytes"), -1)), ["memory_bytes = -1"]),
    (json.dumps(_with(("specs", 0, "peak_flops"), {"bf16": 1.0})), ["'bf16'"]),
    (json.dumps(_with(("intra_link", "latency_s"), -1)), ["latency_s = -1"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_JSON, ids=range(len(BAD_JSON)))
def test_bad_json(text: str, fragments: list[str]) -> None:
    with pytest.raises(ClusterError) as info:
        Cluster.from_json(text)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_from_json_rejects_non_text() -> None:
    with pytest.raises(ClusterError, match="malformed"):
        Cluster.from_json(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2_000_000_000), ("2gb", 2_000_000_000), ("1.5GiB", 1_610_612_736), ("512MiB", 536_870_912),
    ("1KB", 1000), ("1KiB", 1024), ("3TB", 3 * 10**12), ("1TiB", 1 << 40), ("7B", 7), ("7", 7),
    ("0GB", 0), (" 4 GiB ", 4 << 30), (".5KiB", 512), ("1.1GB", 1_100_000_000), ("1.3B", 1),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "2XB", "2 G", "1e9", "nan", "inf GB", "2GB2", "1..5GB"])
def test_parse_bytes_errors(text: str) -> None:
    with pytest.raises(DeviceSpecError) as info:
        parse_bytes(text)
    assert f'"{text}"' in str(info.value)


def test_parse_bytes_non_string() -> None:
    with pytest.raises(DeviceSpecError, match="2000"):
        parse_bytes(2000)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "expected"), [
    (0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (80 * GiB, "80.0 GiB"), (85_031_714_816, "79.2 GiB"),
    (3 << 40, "3.0 TiB"), (5 << 60, "5120.0 PiB"), (-2048, "-2.0 KiB"), (1023.6, "1024 B"),
])
def test_format_bytes(n: float, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize("bad", [math.nan, "1GB", None, True])
def test_format_bytes_errors(bad: object) -> None:
    with pytest.raises(DeviceSpecError):
        format_bytes(bad)  # type: ignore[arg-type]
