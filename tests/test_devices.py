"""Tests for fxshard.devices: presets, specs, links, byte sizes and this machine's device specs."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshard.devices as devices_module
from fxshard.devices import (
    DTYPE_KEYS,
    LINK_PRESETS,
    PRESETS,
    SELF_LINK,
    DeviceSpec,
    Link,
    default_link,
    format_budget,
    format_bytes,
    get_preset,
    local_cpu_spec,
    local_gpu_spec,
    parse_bytes,
)
from fxshard.errors import ClusterError, DeviceSpecError, FxshardError

GiB = 1 << 30
REQUIRED_PRESETS = ["V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4", "T4", "MI300X", "cpu"]


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


# ---------------------------------------------------------------- memory budgets in cluster strings


@pytest.mark.parametrize(("n", "expected"), [
    # A short exact form: at most four significant digits of the largest unit that holds n exactly.
    (0, "0B"), (7, "7B"), (4096, "4KiB"), (1023, "1.023KB"), (3001, "3.001KB"), (2_000_000_000, "2GB"),
    (40_000_000_000, "40GB"), (1_100_000_000, "1.1GB"), (1234 * 10**6, "1.234GB"), (3 << 29, "1.5GiB"),
    (512 << 20, "512MiB"), (80 * GiB, "80GiB"), (1 << 40, "1TiB"), (10_000 * GiB, "10000GiB"),
    # None: three significant digits of the largest binary unit.
    (24_731_708 << 10, "23.6GiB"), (85_031_714_816, "79.2GiB"), (5 * 10**15 + 1, "4550TiB"),
    (1023 * 1024 + 700, "1020KiB"),
    # "6.32MiB" parses to 6,627,000 bytes, whose own form is "6.627MB": write that instead.
    (6_627_001, "6.627MB"), (12_345, "12.39KB"),
])
def test_format_budget(n: int, expected: str) -> None:
    text = format_budget(n)
    assert text == expected
    assert format_budget(parse_bytes(text)) == text
    assert abs(parse_bytes(text) - n) <= 0.005 * n + 1


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 60) | st.integers(min_value=0, max_value=1 << 20))
def test_format_budget_is_a_fixed_point(n: int) -> None:
    text = format_budget(n)
    assert format_budget(parse_bytes(text)) == text
    assert abs(parse_bytes(text) - n) <= 0.005 * n + 1


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", None, True])
def test_format_budget_errors(bad: object) -> None:
    with pytest.raises(DeviceSpecError, match="format_budget"):
        format_budget(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- this machine's devices


@pytest.mark.parametrize(("cores", "bandwidth"), [(1, 10e9), (8, 80e9), (64, 100e9)])
def test_local_cpu_spec(monkeypatch: pytest.MonkeyPatch, cores: int, bandwidth: float) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(devices_module, "host_memory_bytes", lambda: 12 * GiB)
    spec = local_cpu_spec()
    assert spec.name == "cpu" and spec.kind == "cpu" and spec.memory_bytes == 12 * GiB
    assert spec.peak_flops_for(torch.float32) == cores * 32 * 2.5e9
    assert spec.peak_flops_for(torch.float64) == cores * 16 * 2.5e9
    assert spec.memory_bandwidth == bandwidth
    assert f"{cores} cores" in spec.source and "nominal" in spec.source
    assert local_cpu_spec(devices=5).memory_bytes == 12 * GiB // 5
    assert default_link([spec]).name == "loopback"  # keyed on the name "cpu", like the preset
    assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_local_cpu_spec_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert local_cpu_spec().peak_flops_for(torch.float32) == 6 * 32 * 2.5e9
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert local_cpu_spec().peak_flops_for(torch.float32) == 32 * 2.5e9


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_local_cpu_spec_bad_devices(bad: object) -> None:
    with pytest.raises(DeviceSpecError, match="devices"):
        local_cpu_spec(devices=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "memory", "preset"), [
    ("NVIDIA H100 80GB HBM3", 85_031_714_816, "H100-80GB"),
    ("NVIDIA A100-SXM4-80GB", 85_100_000_000, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 42_500_000_000, "A100-40GB"),
    ("Tesla V100-SXM2-32GB", 34_000_000_000, "V100-32GB"),
    ("NVIDIA L4", 23_000_000_000, "L4"),
    ("Tesla T4", 15_800_000_000, "T4"),
    ("NVIDIA H200", 150_000_000_000, "H200-141GB"),
    ("AMD Instinct MI300X", 205_000_000_000, "MI300X"),
])
def test_local_gpu_names(monkeypatch: pytest.MonkeyPatch, name: str, memory: int, preset: str) -> None:
    props = SimpleNamespace(name=name, total_memory=memory, multi_processor_count=80, major=9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert local_gpu_spec(0) == PRESETS[preset].with_memory(memory)


@pytest.mark.parametrize(("name", "major", "dtypes"), [
    ("NVIDIA GeForce RTX 4090", 8, {"float32", "float16", "bfloat16"}),
    ("NVIDIA H100 PCIe", 9, {"float32", "float16", "bfloat16"}),  # slower than the SXM preset: not matched
    ("Tesla P100", 6, {"float32"}),
])
def test_unknown_gpu_spec(monkeypatch: pytest.MonkeyPatch, name: str, major: int, dtypes: set[str]) -> None:
    props = SimpleNamespace(name=name, total_memory=25_000_000_000, multi_processor_count=80, major=major)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    spec = local_gpu_spec(0)
    assert spec.name == name and spec.memory_bytes == 25_000_000_000
    assert set(dict(spec.peak_flops)) == dtypes and dict(spec.peak_flops)["float32"] == 80 * 128e9
    assert "estimated" in spec.source
